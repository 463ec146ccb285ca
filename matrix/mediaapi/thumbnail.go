package mediaapi

import (
	"bytes"
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/auth"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/thumbnails"
)

// Thumbnailer generates thumbnails; *thumbnails.Generator implements it.
type Thumbnailer interface {
	Generate(ctx context.Context, src []byte, req thumbnails.Request) (thumbnails.Result, error)
	Stats() thumbnails.Stats
}

// ThumbnailSize is one pre-defined thumbnail size.
type ThumbnailSize struct {
	// Width and Height are the box in pixels.
	Width, Height int
	// Method is thumbnails.MethodCrop or thumbnails.MethodScale.
	Method thumbnails.Method
}

// DefaultThumbnailSizes are the sizes the Matrix spec suggests.
var DefaultThumbnailSizes = []ThumbnailSize{
	{32, 32, thumbnails.MethodCrop},
	{96, 96, thumbnails.MethodCrop},
	{320, 240, thumbnails.MethodScale},
	{640, 480, thumbnails.MethodScale},
	{800, 600, thumbnails.MethodScale},
}

// DefaultMaxDynamicThumbnail is the default ThumbnailPolicy.MaxDynamic.
const DefaultMaxDynamicThumbnail = 1600

// ThumbnailPolicy decides which thumbnails exist.
type ThumbnailPolicy struct {
	// Sizes are the pre-defined sizes. Default DefaultThumbnailSizes.
	Sizes []ThumbnailSize
	// Dynamic generates the requested size itself (rounded up to a coarse
	// step, at most MaxDynamic per side) instead of the nearest pre-defined
	// size. Default false.
	Dynamic bool
	// MaxDynamic caps each side of dynamic sizes. Default 1600.
	MaxDynamic int
	// Formats are extra output formats served to clients whose Accept
	// header lists them (thumbnails.FormatWebP, thumbnails.FormatAVIF).
	// Default: none (JPEG or PNG, animated WebP).
	Formats []thumbnails.Format
	// FetchRemote asks the remote server for thumbnails of its media (its
	// federation thumbnail endpoint) instead of fetching the original and
	// thumbnailing it here; the original is still used when the remote
	// cannot make the thumbnail. Default false (generate here).
	FetchRemote bool
	// Pregenerate makes the pre-defined sizes right after an image upload,
	// in the background, when the generator has a free worker. Default
	// false.
	Pregenerate bool
}

// normalize maps a requested box to the box that is generated and stored, so
// that arbitrary requests cannot create unbounded numbers of thumbnails.
func (p *ThumbnailPolicy) normalize(w, h int, m thumbnails.Method) (int, int, thumbnails.Method) {
	if p.Dynamic {
		return roundUpSide(w, p.MaxDynamic), roundUpSide(h, p.MaxDynamic), m
	}
	// The smallest pre-defined size of the same method that is at least as
	// large as the request; else the smallest large enough of any method;
	// else the largest of the same method; else the largest.
	var best, largest *ThumbnailSize
	for i := range p.Sizes {
		c := &p.Sizes[i]
		if c.Method != m {
			continue
		}
		if c.Width >= w && c.Height >= h && (best == nil || c.Width*c.Height < best.Width*best.Height) {
			best = c
		}
		if largest == nil || c.Width*c.Height > largest.Width*largest.Height {
			largest = c
		}
	}
	if best == nil {
		// No size of this method is large enough: a larger one of the other
		// method beats a smaller one (never smaller than asked, where
		// possible).
		for i := range p.Sizes {
			c := &p.Sizes[i]
			if c.Width >= w && c.Height >= h && (best == nil || c.Width*c.Height < best.Width*best.Height) {
				best = c
			}
		}
	}
	if best == nil {
		best = largest
	}
	if best == nil {
		best = &p.Sizes[len(p.Sizes)-1]
		for i := range p.Sizes {
			if c := &p.Sizes[i]; c.Width*c.Height > best.Width*best.Height {
				best = c
			}
		}
	}
	return best.Width, best.Height, best.Method
}

// roundUpSide rounds a requested side up to a coarse step (32 px up to 256,
// 64 up to 1024, 128 above), capped at max: every dynamic request maps to one
// of about forty values per side.
func roundUpSide(v, limit int) int {
	step := 128
	switch {
	case v <= 256:
		step = 32
	case v <= 1024:
		step = 64
	}
	v = (v + step - 1) / step * step
	return min(v, limit)
}

// thumbnailParams are the parsed query parameters of a thumbnail request.
type thumbnailParams struct {
	width, height int
	method        thumbnails.Method
	animated      bool
}

// parseThumbnailParams reads width, height (required, ≥ 1), method (crop or
// scale, default scale) and animated (true or false, default false).
func parseThumbnailParams(rawQuery string) (thumbnailParams, *matrix.Error) {
	p := thumbnailParams{method: thumbnails.MethodScale}
	for _, dim := range []struct {
		name string
		dst  *int
	}{{"width", &p.width}, {"height", &p.height}} {
		v, found, ok := matrix.QueryParam(rawQuery, dim.name)
		if !found {
			return p, matrix.MissingParam("Missing " + dim.name + " parameter")
		}
		n, err := strconv.Atoi(v)
		if !ok || err != nil || n < 1 {
			return p, matrix.InvalidParam(dim.name + " must be a positive integer")
		}
		*dim.dst = min(n, 1<<16)
	}
	if v, found, ok := matrix.QueryParam(rawQuery, "method"); found {
		switch {
		case ok && v == "crop":
			p.method = thumbnails.MethodCrop
		case ok && v == "scale":
		default:
			return p, matrix.InvalidParam("method must be crop or scale")
		}
	}
	if v, found, ok := matrix.QueryParam(rawQuery, "animated"); found {
		switch {
		case ok && v == "true":
			p.animated = true
		case ok && v == "false":
		default:
			return p, matrix.InvalidParam("animated must be true or false")
		}
	}
	return p, nil
}

// serveThumbnail handles GET and HEAD of .../thumbnail/{serverName}/{mediaId}.
func (s *Site) serveThumbnail(w http.ResponseWriter, r *http.Request, rt *route) int {
	if s.repo.thumbs == nil {
		return writeErr(w, matrix.Unrecognized("Thumbnails are not enabled on this server"))
	}
	var user *auth.User
	if !rt.legacy {
		// Guests may thumbnail (MSC4189).
		u, st := s.authenticate(w, r, true)
		if st != 0 {
			return st
		}
		user = &u
	}
	if st := s.limit(w, r, user, rateCost{class: RateThumbnail, cost: 1}); st != 0 {
		return st
	}
	server, id, merr := rt.mediaRef()
	if merr != nil {
		return writeErr(w, merr)
	}
	params, merr := parseThumbnailParams(r.URL.RawQuery)
	if merr != nil {
		return writeErr(w, merr)
	}
	timeout, merr := s.downloadTimeout(r.URL.RawQuery)
	if merr != nil {
		return writeErr(w, merr)
	}
	o := resolveOptions{legacy: rt.legacy, allowRemote: allowRemote(r.URL.RawQuery), timeout: timeout, req: r, user: user}
	if rth, ok := s.cfg.Remote.(RemoteThumbnailer); ok && !s.isLocal(server) && s.repo.thumbPolicy.FetchRemote && s.mayFetch(&o) {
		// The remote's own thumbnail, unless it cannot make one: then
		// the original, thumbnailed here.
		w2, h2, method := s.repo.thumbPolicy.normalize(params.width, params.height, params.method)
		k := storage.ThumbnailKey{ServerName: server, MediaID: id, Width: w2, Height: h2, Method: string(method), Animated: params.animated}
		te, err := s.remoteThumbnailEntry(r.Context(), rth, k, &o)
		if err == nil {
			te, err = s.admitRemoteThumbnail(r.Context(), server, id, te)
		}
		var me *matrix.Error
		switch {
		case err == nil && !(rt.legacy && s.frozen(te.m.CreatedAt)):
			s.repo.noteAccess(&te.m)
			return s.sendMedia(w, r, te, "", rt.legacy)
		case errors.Is(err, errRefused):
			return s.refuseThumbnail(w, r, rt.legacy)
		case r.Context().Err() != nil, errors.As(err, &me) && me.Status == http.StatusTooManyRequests:
			return s.fail(w, r, err)
		}
	}
	e, err := s.resolve(r.Context(), server, id, &o)
	if errors.Is(err, errRefused) {
		return s.refuseThumbnail(w, r, rt.legacy)
	}
	if err != nil {
		return s.fail(w, r, err)
	}
	tk := s.repo.thumbnailKey(e.m, params, r.Header.Get("Accept"))
	te, err := s.repo.thumbnail(r.Context(), e, tk, params.animated)
	if err != nil {
		if e.m.Remote && errors.Is(err, thumbnails.ErrTooLarge) {
			// The spec's answer for remote media too large to thumbnail.
			return writeErr(w, matrix.NewError(http.StatusBadGateway, matrix.CodeTooLarge, "Remote media is too large to thumbnail"))
		}
		return s.thumbnailError(w, r, err)
	}
	s.repo.noteThumbnailAccess(&e.m)
	return s.sendMedia(w, r, te, "", rt.legacy)
}

// refuseThumbnail answers a thumbnail request of refused (quarantined)
// media: the configured placeholder image, or 404 M_NOT_FOUND.
func (s *Site) refuseThumbnail(w http.ResponseWriter, r *http.Request, legacy bool) int {
	pe := s.repo.placeholderEntry
	if pe == nil {
		return writeErr(w, errRefused)
	}
	h := w.Header()
	setMediaSecurity(h, legacy)
	h["Content-Type"] = pe.contentType
	h["Content-Disposition"] = pe.disposition
	h["Content-Length"] = pe.contentLength
	// Not to be kept: the quarantine may be lifted.
	h["Cache-Control"] = []string{"no-store"}
	w.WriteHeader(http.StatusOK)
	if r.Method != http.MethodHead {
		_, _ = w.Write(s.repo.placeholder)
	}
	return http.StatusOK
}

// newPlaceholderEntry describes the quarantine placeholder image.
func newPlaceholderEntry(data []byte, contentType string) *mediaEntry {
	sum := sha256.Sum256(data)
	return newMediaEntry(storage.Media{
		State: storage.StateReady, SHA256: hex.EncodeToString(sum[:]), Size: int64(len(data)),
		ContentType: contentType, Filename: thumbnailFileName(contentType),
	})
}

// thumbnailKey is the stored key of the thumbnail answering params.
func (r *Repository) thumbnailKey(m storage.Media, params thumbnailParams, accept string) storage.ThumbnailKey {
	w, h, method := r.thumbPolicy.normalize(params.width, params.height, params.method)
	k := storage.ThumbnailKey{
		ServerName: m.ServerName, MediaID: m.MediaID,
		Width: w, Height: h, Method: string(method), Animated: params.animated,
	}
	for _, f := range r.thumbPolicy.Formats {
		if acceptsType(accept, f.ContentType()) {
			k.Format = string(f)
			break
		}
	}
	return k
}

// acceptsType reports whether an Accept header lists contentType explicitly
// (wildcards do not count: every browser sends */*).
func acceptsType(accept, contentType string) bool {
	for accept != "" {
		var item string
		item, accept, _ = strings.Cut(accept, ",")
		mt, params, _ := strings.Cut(item, ";")
		if !strings.EqualFold(strings.TrimSpace(mt), contentType) {
			continue
		}
		if q, ok := strings.CutPrefix(strings.TrimSpace(params), "q="); ok {
			if v, err := strconv.ParseFloat(q, 64); err == nil && v == 0 {
				return false
			}
		}
		return true
	}
	return false
}

// thumbnailCacheKey is the in-memory cache key of a thumbnail row.
func thumbnailCacheKey(k storage.ThumbnailKey) mediaKey {
	anim := "s"
	if k.Animated {
		anim = "a"
	}
	return mediaKey{k.ServerName, k.MediaID + "/" + strconv.Itoa(k.Width) + "x" + strconv.Itoa(k.Height) + "/" + k.Method + "/" + anim + "/" + k.Format}
}

// thumbnail returns the entry of thumbnail k of the media e, generating it
// first when it does not exist. Concurrent requests for one thumbnail make
// one generation. A generated thumbnail is answered from memory while it is
// stored in the background (see storeLater), unless the store backlog is
// full: storing it (blob fsync, metadata rows) is not on the response's
// path, and a crash before it is stored only loses a cache entry, since
// thumbnails are made again on demand.
func (r *Repository) thumbnail(ctx context.Context, e *mediaEntry, k storage.ThumbnailKey, animated bool) (*mediaEntry, error) {
	ck := thumbnailCacheKey(k)
	if te, err := r.existingThumbnail(ctx, ck, k); te != nil || err != nil {
		return te, err
	}
	if r.hooks.thumbnailMissed != nil {
		r.hooks.thumbnailMissed()
	}
	ch := r.thumbFlights.DoChan(ck.server+"\x00"+ck.id, func() (any, error) {
		// Detached from the first caller (others may be waiting) but bounded
		// by the generation deadline, holding the stores open, and with a
		// panic turned into this flight's error: singleflight would re-raise
		// it on a goroutine of its own and end the process.
		var te *mediaEntry
		err := r.run("thumbnail", func() error {
			gctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.thumbTimeout)
			defer cancel()
			// A flight that ended after this request looked has left its
			// thumbnail behind: look again rather than generate twice.
			var err error
			if te, err = r.existingThumbnail(gctx, ck, k); te != nil || err != nil {
				return err
			}
			// Cluster-wide, one instance generates; the others wait for
			// its row.
			t, err := r.waitTurn(gctx, thumbnailTopic(ck), func(c context.Context) (bool, error) {
				te, err = r.existingThumbnail(c, ck, k)
				return te != nil, err
			})
			if t == nil {
				return err
			}
			te, err = r.generateThumbnail(gctx, e, k, ck, t)
			return err
		})
		return te, err
	})
	if r.hooks.thumbnailJoined != nil {
		r.hooks.thumbnailJoined()
	}
	select {
	case res := <-ch:
		if res.Err != nil {
			return nil, res.Err
		}
		return res.Val.(*mediaEntry), nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// thumbnailTopic is the cluster topic (and lock) of the generation of the
// thumbnail cached under ck.
func thumbnailTopic(ck mediaKey) string { return "thumbnail/" + ck.server + "/" + ck.id }

// existingThumbnail returns the entry of thumbnail k when it exists: cached,
// answered and being stored (pending), or recorded; nil when it does not.
// The order matters: a pending thumbnail leaves the pending set only after
// its row is recorded and cached.
func (r *Repository) existingThumbnail(ctx context.Context, ck mediaKey, k storage.ThumbnailKey) (*mediaEntry, error) {
	if r.thumbCache != nil {
		if te := r.thumbCache.get(ck); te != nil {
			return te, nil
		}
	}
	if te := r.thumbPending.get(ck); te != nil {
		return te, nil
	}
	t, err := r.meta.GetThumbnail(ctx, k)
	switch {
	case err == nil:
		return r.cacheThumbnail(ck, t), nil
	case errors.Is(err, storage.ErrNotFound):
		return nil, nil
	}
	return nil, fmt.Errorf("looking up thumbnail: %w", err)
}

// cacheThumbnail makes the entry of a stored thumbnail and caches it.
func (r *Repository) cacheThumbnail(ck mediaKey, t storage.Thumbnail) *mediaEntry {
	te := newMediaEntry(storage.Media{
		ServerName: t.ServerName, MediaID: t.MediaID, State: storage.StateReady,
		SHA256: t.SHA256, Size: t.Size, ContentType: t.ContentType,
		Filename: thumbnailFileName(t.ContentType), Datastore: t.Datastore,
		CreatedAt: t.CreatedAt, UploadedAt: t.CreatedAt,
	})
	if r.thumbCache != nil {
		r.thumbCache.put(ck, te)
	}
	return te
}

// thumbnailFileName is the file name of a thumbnail in Content-Disposition.
func thumbnailFileName(contentType string) string {
	ext := strings.TrimPrefix(contentType, "image/")
	if ext == "jpeg" {
		ext = "jpg"
	}
	return "thumbnail." + ext
}

// generateThumbnail admits the source into the memory budget, reads it,
// generates thumbnail k and returns its entry: held in memory while it is
// stored in the background (storeLater), or stored first when the backlog is
// full. When the source is already small enough it records the source itself
// as the thumbnail. ctx carries the generation's deadline. It ends the
// cluster turn tn once the thumbnail's row is recorded or the generation
// failed (storeLater's goroutine ends it when it stores the thumbnail).
func (r *Repository) generateThumbnail(ctx context.Context, e *mediaEntry, k storage.ThumbnailKey, ck mediaKey, tn *turn) (*mediaEntry, error) {
	handedOff := false
	defer func() {
		if !handedOff {
			tn.end()
		}
	}()
	if e.m.Size > r.thumbMaxSource {
		r.metrics.thumbnailRejected("too_large")
		return nil, fmt.Errorf("thumbnailing %d-byte source: %w", e.m.Size, thumbnails.ErrTooLarge)
	}
	if !thumbnailableType(e.m.ContentType) {
		r.metrics.thumbnailRejected("unsupported")
		return nil, fmt.Errorf("thumbnailing %q: %w", e.m.ContentType, thumbnails.ErrUnsupported)
	}
	release, err := r.admitSource(ctx, e.m.Size)
	if err != nil {
		r.metrics.thumbnailRejected(thumbnailErrorReason(err))
		return nil, err
	}
	defer release()
	src, err := r.readContent(ctx, e)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	r.metrics.thumbnailLoad(r.thumbs.Stats())
	res, err := r.thumbs.Generate(ctx, src, thumbnails.Request{
		Width: k.Width, Height: k.Height, Method: thumbnails.Method(k.Method),
		Animated: k.Animated, Output: thumbnails.Format(k.Format),
	})
	r.metrics.thumbnailLoad(r.thumbs.Stats())
	now := r.now()
	switch {
	case errors.Is(err, thumbnails.ErrSmallerThanRequest):
		// Never upscale: the source itself answers this request.
		r.metrics.thumbnailRejected("original")
		info, perr := thumbnails.Probe(src)
		if perr != nil {
			return nil, fmt.Errorf("probing small source: %w", perr)
		}
		t := storage.Thumbnail{ThumbnailKey: k, CreatedAt: now,
			ContentType: info.Format.ContentType(), SHA256: e.m.SHA256, Size: e.m.Size,
			ActualWidth: info.Width, ActualHeight: info.Height}
		if t, err = r.recordThumbnail(ctx, t); err != nil {
			return nil, err
		}
		return r.cacheThumbnail(ck, t), nil
	case err != nil:
		r.metrics.thumbnailRejected(thumbnailErrorReason(err))
		return nil, err
	}
	r.metrics.thumbnailGenerated(time.Since(start))
	if te := r.storeLater(ck, k, res, now, tn); te != nil {
		handedOff = true
		return te, nil
	}
	t, err := r.storeThumbnail(ctx, k, res, now)
	if err != nil {
		return nil, err
	}
	return r.cacheThumbnail(ck, t), nil
}

// storeLater answers a generated thumbnail from memory: it adds the
// thumbnail's entry (content in memory) to the pending set and stores it on
// a background goroutine, which records it, caches the stored entry and only
// then leaves the pending set. It returns nil, and does nothing, when the
// pending set is full (DefaultThumbnailStoreBacklog bytes) or the
// repository is draining: the caller then stores the thumbnail itself. A
// failed store is logged; the thumbnail is then generated again on its next
// request. When it returns an entry, it ends the cluster turn tn once the
// row is recorded (or storing failed); tn may be nil.
func (r *Repository) storeLater(ck mediaKey, k storage.ThumbnailKey, res thumbnails.Result, now time.Time, tn *turn) *mediaEntry {
	sum := sha256.Sum256(res.Data)
	target, _ := r.stores.ForKind(storage.KindThumbnails)
	te := newMediaEntry(storage.Media{
		ServerName: k.ServerName, MediaID: k.MediaID, State: storage.StateReady,
		SHA256: hex.EncodeToString(sum[:]), Size: int64(len(res.Data)), ContentType: res.ContentType,
		Filename: thumbnailFileName(res.ContentType), Datastore: target,
		CreatedAt: now, UploadedAt: now,
	})
	te.data = res.Data
	if !r.thumbPending.add(ck, te) {
		return nil
	}
	gen := r.cacheGen.Load()
	started := r.Go("thumbnail_store", func() {
		defer tn.end()
		defer r.thumbPending.remove(ck, te)
		if r.hooks.thumbnailStoring != nil {
			r.hooks.thumbnailStoring()
		}
		ctx, cancel := context.WithTimeout(context.Background(), r.thumbTimeout)
		defer cancel()
		t, err := r.storeThumbnail(ctx, k, res, now)
		if err != nil {
			r.logger.Warn("storing a generated thumbnail failed; it will be generated again when requested",
				zap.String("server_name", k.ServerName), zap.String("media_id", k.MediaID), zap.Error(err))
			return
		}
		// Not cached when the caches were invalidated meanwhile (Forget):
		// the next request reads the row.
		if r.cacheGen.Load() == gen {
			r.cacheThumbnail(ck, t)
		}
	})
	if !started {
		r.thumbPending.remove(ck, te)
		return nil
	}
	return te
}

// storeThumbnail stores the generated thumbnail res as thumbnail k (its blob,
// then its row) and returns the recorded row.
func (r *Repository) storeThumbnail(ctx context.Context, k storage.ThumbnailKey, res thumbnails.Result, now time.Time) (storage.Thumbnail, error) {
	stored, err := storage.IngestTo(ctx, r.stores, r.meta, storage.KindThumbnails, bytes.NewReader(res.Data),
		storage.PutOptions{ExpectedSize: int64(len(res.Data))})
	if err != nil {
		return storage.Thumbnail{}, fmt.Errorf("storing thumbnail: %w", err)
	}
	return r.recordThumbnail(ctx, storage.Thumbnail{ThumbnailKey: k, CreatedAt: now,
		ContentType: res.ContentType, SHA256: stored.SHA256, Size: stored.Size,
		ActualWidth: res.Width, ActualHeight: res.Height})
}

// recordThumbnail inserts the row t and returns it as stored; when another
// instance recorded the thumbnail first, its row.
func (r *Repository) recordThumbnail(ctx context.Context, t storage.Thumbnail) (storage.Thumbnail, error) {
	err := r.meta.InsertThumbnail(ctx, t)
	if err != nil && !errors.Is(err, storage.ErrConflict) {
		return storage.Thumbnail{}, fmt.Errorf("recording thumbnail: %w", err)
	}
	return r.meta.GetThumbnail(ctx, t.ThumbnailKey)
}

// thumbnailableType reports whether media of this declared type is worth
// reading to thumbnail: images only (the generator still checks the bytes).
func thumbnailableType(contentType string) bool {
	return strings.HasPrefix(strings.ToLower(contentType), "image/") || contentType == "" || contentType == "application/octet-stream"
}

// thumbnailErrorReason is the metric label of a generation failure.
func thumbnailErrorReason(err error) string {
	switch {
	case errors.Is(err, thumbnails.ErrUnsupported):
		return "unsupported"
	case errors.Is(err, thumbnails.ErrTooLarge):
		return "too_large"
	case errors.Is(err, thumbnails.ErrBusy):
		return "busy"
	default:
		return "error"
	}
}

// admitSource takes room for a size-byte thumbnail source in the memory
// budget (the whole budget for a larger source), waiting up to
// thumbMemoryWait; beyond it the error wraps thumbnails.ErrBusy (429). The
// returned function gives the room back.
func (r *Repository) admitSource(ctx context.Context, size int64) (func(), error) {
	n := min(max(size, 1), r.thumbMemoryCap)
	if !r.thumbMemory.TryAcquire(n) {
		err := errors.New("no wait allowed")
		if r.thumbMemoryWait > 0 {
			wctx, cancel := context.WithTimeout(ctx, r.thumbMemoryWait)
			err = r.thumbMemory.Acquire(wctx, n)
			cancel()
		}
		switch {
		case err == nil:
		case ctx.Err() != nil:
			return nil, fmt.Errorf("waiting for thumbnail source memory: %w", ctx.Err())
		default:
			return nil, fmt.Errorf("admitting a %d-byte thumbnail source: %d-byte budget in use: %w", size, r.thumbMemoryCap, thumbnails.ErrBusy)
		}
	}
	return func() { r.thumbMemory.Release(n) }, nil
}

// readContent reads the whole content of a media item (a thumbnail source,
// admitted by the caller) from its datastore. When ctx ends first the reader
// is closed, which ends a read blocked on a stalled store (a network body
// whose server stopped sending), and the error wraps ctx's error.
func (r *Repository) readContent(ctx context.Context, e *mediaEntry) ([]byte, error) {
	store, ok := r.stores.Get(e.m.Datastore)
	if !ok {
		return nil, fmt.Errorf("reading thumbnail source: datastore %q not configured: %w", e.m.Datastore, storage.ErrNotFound)
	}
	var rc io.ReadCloser
	if ro, ok := store.(storage.RangeOpener); ok {
		var err error
		if rc, err = ro.OpenRange(ctx, e.m.SHA256, 0, e.m.Size); err != nil {
			return nil, fmt.Errorf("reading thumbnail source: %w", withCtxErr(ctx, err))
		}
	} else {
		b, err := store.Open(ctx, e.m.SHA256)
		if err != nil {
			return nil, fmt.Errorf("reading thumbnail source: %w", withCtxErr(ctx, err))
		}
		rc = b.Content
	}
	defer rc.Close()
	stop := context.AfterFunc(ctx, func() { _ = rc.Close() })
	defer stop()
	buf := make([]byte, e.m.Size)
	if _, err := io.ReadFull(rc, buf); err != nil {
		return nil, fmt.Errorf("reading thumbnail source: %w", withCtxErr(ctx, err))
	}
	return buf, nil
}

// withCtxErr adds ctx's error to err when ctx has ended, so that a read
// failing because its deadline closed the reader is seen as a timeout.
func withCtxErr(ctx context.Context, err error) error {
	if cerr := ctx.Err(); cerr != nil && !errors.Is(err, cerr) {
		return fmt.Errorf("%w: %w", cerr, err)
	}
	return err
}

// thumbnailError answers a failure to produce a thumbnail.
func (s *Site) thumbnailError(w http.ResponseWriter, r *http.Request, err error) int {
	switch {
	case r.Context().Err() != nil:
		writeErr(w, matrix.Unknown(http.StatusInternalServerError, "Request cancelled"))
		return statusClientGone
	case errors.Is(err, thumbnails.ErrUnsupported), errors.Is(err, thumbnails.ErrInvalidRequest):
		return writeErr(w, matrix.Unknown(http.StatusBadRequest, "Cannot generate a thumbnail for this media"))
	case errors.Is(err, thumbnails.ErrTooLarge):
		return writeErr(w, matrix.TooLarge("Media is too large to thumbnail"))
	case errors.Is(err, thumbnails.ErrBusy):
		return writeErr(w, matrix.LimitExceeded("Too many thumbnails are being generated, retry shortly", 2*time.Second))
	case errors.Is(err, context.DeadlineExceeded):
		s.repo.logger.Warn("thumbnail generation timed out", zap.Error(err))
		return writeErr(w, matrix.Unknown(http.StatusGatewayTimeout, "Timed out generating the thumbnail, try again later"))
	case errors.Is(err, storage.ErrNotFound):
		s.repo.logger.Error("thumbnail source content missing", zap.Error(err))
		return writeErr(w, matrix.NotFound("Media content not found"))
	default:
		// Including storage.ErrUnavailable: 503 with Retry-After.
		return s.internalError(w, "generating thumbnail", err)
	}
}

// pregenerate makes the pre-defined thumbnails of a freshly uploaded image in
// the background (holding the stores open, see Go), skipping any size when
// the generator has no free worker: requests always come first.
func (r *Repository) pregenerate(m storage.Media) {
	if r.thumbs == nil || !r.thumbPolicy.Pregenerate || !strings.HasPrefix(m.ContentType, "image/") || m.Size > r.thumbMaxSource {
		return
	}
	select {
	case r.pregen <- struct{}{}:
	default:
		return // one pre-generation at a time; this upload goes without
	}
	started := r.Go("thumbnail_pregeneration", func() {
		defer func() { <-r.pregen }()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		e := newMediaEntry(m)
		for _, size := range r.thumbPolicy.Sizes {
			if st := r.thumbs.Stats(); st.Queued > 0 {
				return
			}
			k := storage.ThumbnailKey{ServerName: m.ServerName, MediaID: m.MediaID,
				Width: size.Width, Height: size.Height, Method: string(size.Method)}
			if _, err := r.thumbnail(ctx, e, k, false); err != nil {
				if !errors.Is(err, thumbnails.ErrUnsupported) {
					r.logger.Debug("pre-generating a thumbnail failed", zap.String("media_id", m.MediaID), zap.Error(err))
				}
				return
			}
		}
	})
	if !started {
		<-r.pregen // draining: no pre-generation
	}
}

// DefaultThumbnailStoreBacklog is how many bytes of generated thumbnails may
// be held in memory, answered but not yet stored; beyond it a thumbnail is
// stored before it is answered.
const DefaultThumbnailStoreBacklog int64 = 32 << 20

// pendingThumbnails are generated thumbnails answered from memory while they
// are being stored, keyed like the thumbnail cache, bounded in bytes.
type pendingThumbnails struct {
	mu    sync.Mutex
	items map[mediaKey]*mediaEntry
	bytes int64
	// limit is the most bytes held (DefaultThumbnailStoreBacklog when 0).
	limit int64
}

// get returns the pending entry of k, or nil.
func (p *pendingThumbnails) get(k mediaKey) *mediaEntry {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.items[k]
}

// add adds e under k, unless its content would take the set over its limit
// or k is already pending; it reports whether e was added.
func (p *pendingThumbnails) add(k mediaKey, e *mediaEntry) bool {
	n := int64(len(e.data))
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.bytes+n > cmp.Or(p.limit, DefaultThumbnailStoreBacklog) || p.items[k] != nil {
		return false
	}
	if p.items == nil {
		p.items = make(map[mediaKey]*mediaEntry)
	}
	p.items[k] = e
	p.bytes += n
	return true
}

// remove drops k if it still holds e.
func (p *pendingThumbnails) remove(k mediaKey, e *mediaEntry) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.items[k] == e {
		delete(p.items, k)
		p.bytes -= int64(len(e.data))
	}
}

// removeIf drops every entry for which drop returns true.
func (p *pendingThumbnails) removeIf(drop func(mediaKey, *mediaEntry) bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for k, e := range p.items {
		if drop(k, e) {
			delete(p.items, k)
			p.bytes -= int64(len(e.data))
		}
	}
}

// size returns the number of pending thumbnails and their bytes.
func (p *pendingThumbnails) size() (int, int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.items), p.bytes
}
