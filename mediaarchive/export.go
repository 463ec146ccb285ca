package mediaarchive

import (
	"archive/zip"
	"bufio"
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// Defaults of ExportOptions.
const (
	// DefaultPageSize is the default ExportOptions.PageSize.
	DefaultPageSize = 200
	// DefaultMaxThumbnailBytes is the default ExportOptions.MaxThumbnailBytes.
	DefaultMaxThumbnailBytes = 1 << 20
)

// ErrInvalidSelection reports a Selection that names no valid server name
// or user.
var ErrInvalidSelection = errors.New("invalid export selection")

// ExportSource is the store side of an export.
type ExportSource struct {
	// Meta lists the media; it must implement storage.MediaAdmin.
	Meta storage.MetadataStore
	// Stores open the blobs (each item's Datastore names its store).
	Stores *storage.Datastores
}

// Selection is what to export.
type Selection struct {
	// ServerName is the server name whose local media are exported.
	// Required.
	ServerName string
	// UserID, when set, exports only this user's media on ServerName.
	UserID string
}

// UserSelection selects a user's media on the server name of their ID.
func UserSelection(userID string) (Selection, error) {
	_, server, err := matrix.SplitUserID(userID)
	if err != nil {
		return Selection{}, fmt.Errorf("%w: %w", ErrInvalidSelection, err)
	}
	return Selection{ServerName: server, UserID: userID}, nil
}

// subject checks the selection and describes it for the manifest.
func (s Selection) subject() (Subject, error) {
	if !matrix.ValidServerName(s.ServerName) {
		return Subject{}, fmt.Errorf("%w: %q is not a server name", ErrInvalidSelection, s.ServerName)
	}
	if s.UserID == "" {
		return Subject{Kind: KindServer, ServerName: s.ServerName}, nil
	}
	if _, _, err := matrix.SplitUserID(s.UserID); err != nil {
		return Subject{}, fmt.Errorf("%w: %w", ErrInvalidSelection, err)
	}
	return Subject{Kind: KindUser, ServerName: s.ServerName, UserID: s.UserID}, nil
}

// Thumbnail is a small preview image.
type Thumbnail struct {
	// ContentType is "image/jpeg" or "image/png".
	ContentType string
	// Data is the encoded image.
	Data []byte
}

// Thumbnailer makes previews of images for index.html.
type Thumbnailer interface {
	// Thumbnail returns a small JPEG or PNG preview of m, whose content
	// reads (it may stop reading early), or an error when it cannot make
	// one (the export then goes on without it).
	Thumbnail(ctx context.Context, m storage.Media, content io.Reader) (Thumbnail, error)
}

// ThumbnailerFunc adapts a function to Thumbnailer.
type ThumbnailerFunc func(ctx context.Context, m storage.Media, content io.Reader) (Thumbnail, error)

// Thumbnail calls f.
func (f ThumbnailerFunc) Thumbnail(ctx context.Context, m storage.Media, content io.Reader) (Thumbnail, error) {
	return f(ctx, m, content)
}

// ExportOptions tune Export. Zero values take the documented default.
type ExportOptions struct {
	// Thumbnailer makes previews of images (content type image/*). Default
	// none: index.html then scales the images themselves.
	Thumbnailer Thumbnailer
	// MaxThumbnailBytes drops previews larger than this. Default
	// DefaultMaxThumbnailBytes (1 MiB).
	MaxThumbnailBytes int
	// TempDir holds the spool file of the item list. Default os.TempDir().
	TempDir string
	// PageSize is how many media rows one listing query returns. Default
	// DefaultPageSize (200).
	PageSize int
	// Now is the clock of the manifest's created_at. Default time.Now.
	Now func() time.Time
}

// Summary is what an export wrote.
type Summary struct {
	// Items is how many items the manifest lists; Files how many have
	// their bytes in the archive, and Bytes their total size.
	Items, Files, Bytes int64
	// Quarantined counts the refused items listed without their bytes.
	Quarantined int64
	// Missing counts the items whose blob was missing from its datastore;
	// Damaged those whose bytes did not match their SHA-256.
	Missing, Damaged int64
	// Thumbnails counts the previews written; ThumbnailFailures the images
	// the Thumbnailer could not preview.
	Thumbnails, ThumbnailFailures int64
}

// farFuture is the cutoff that makes storage.OldMediaQuery select every
// item.
var farFuture = time.Date(9999, 1, 1, 0, 0, 0, 0, time.UTC)

// Export writes the archive of sel to w, streaming: see the package doc for
// what it holds and the memory it uses. It fails (leaving w with an
// incomplete archive, which readers refuse) when the store fails, a blob
// cannot be read to its end, or w fails; a blob missing from its datastore
// is listed with an error instead.
//
// Media are listed in pages while the export runs: media uploaded during
// the export may or may not be included, media deleted during it are
// included if their page was listed before, and no other item is ever
// skipped or listed twice (a server's media are listed by key; a user's by
// offset, with the checks of listUser).
func Export(ctx context.Context, w io.Writer, src ExportSource, sel Selection, opts ExportOptions) (Summary, error) {
	subject, err := sel.subject()
	if err != nil {
		return Summary{}, err
	}
	admin, ok := src.Meta.(storage.MediaAdmin)
	if !ok || src.Stores == nil {
		return Summary{}, fmt.Errorf("exporting media: the metadata store %T cannot list media (storage.MediaAdmin) or no datastores were given", src.Meta)
	}
	e, err := newExporter(w, src.Stores, subject, opts)
	if err != nil {
		return Summary{}, err
	}
	defer e.discard()
	list := e.listServer
	if subject.Kind == KindUser {
		list = e.listUser
	}
	if err := list(ctx, admin, func(m storage.Media) error { return e.add(ctx, m) }); err != nil {
		return e.sum, err
	}
	if err := e.finish(); err != nil {
		return e.sum, err
	}
	return e.sum, nil
}

// exporter is one export in progress.
type exporter struct {
	zw      *zip.Writer
	stores  *storage.Datastores
	subject Subject
	opts    ExportOptions
	created time.Time
	// spool receives one JSON line per item (spoolW buffers it).
	spool  *os.File
	spoolW *bufio.Writer
	sum    Summary
	// copyBuf is the buffer of every blob copy.
	copyBuf []byte
}

// newExporter creates the spool file and the ZIP writer.
func newExporter(w io.Writer, stores *storage.Datastores, subject Subject, opts ExportOptions) (*exporter, error) {
	opts.PageSize = cmp.Or(opts.PageSize, DefaultPageSize)
	opts.MaxThumbnailBytes = cmp.Or(opts.MaxThumbnailBytes, DefaultMaxThumbnailBytes)
	if opts.PageSize < 0 || opts.MaxThumbnailBytes < 0 {
		return nil, errors.New("exporting media: negative page size or thumbnail bound")
	}
	now := opts.Now
	if now == nil {
		now = time.Now
	}
	spool, err := os.CreateTemp(opts.TempDir, "matrix-media-export-*.jsonl")
	if err != nil {
		return nil, fmt.Errorf("exporting media: creating the item spool: %w", err)
	}
	return &exporter{
		zw: zip.NewWriter(w), stores: stores, subject: subject, opts: opts,
		created: now().UTC(), spool: spool, spoolW: bufio.NewWriterSize(spool, 64<<10),
		copyBuf: make([]byte, 256<<10),
	}, nil
}

// discard removes the spool file.
func (e *exporter) discard() {
	name := e.spool.Name()
	_ = e.spool.Close()
	_ = os.Remove(name)
}

// listServer calls fn for every ready local media item of the server name,
// quarantined and protected ones included, by (server name, media ID).
func (e *exporter) listServer(ctx context.Context, admin storage.MediaAdmin, fn func(storage.Media) error) error {
	q := storage.OldMediaQuery{ServerName: e.subject.ServerName, Before: farFuture,
		IncludeQuarantined: true, IncludeProtected: true, Limit: e.opts.PageSize}
	for {
		page, err := admin.ListOldMedia(ctx, q)
		if err != nil {
			return fmt.Errorf("listing the media of %s: %w", e.subject.ServerName, err)
		}
		for _, m := range page {
			if err := fn(m); err != nil {
				return err
			}
		}
		if len(page) < q.Limit {
			return nil
		}
		last := page[len(page)-1]
		q.After = storage.MediaRef{ServerName: last.ServerName, MediaID: last.MediaID}
	}
}

// listUser calls fn for every ready media item of the user on the server
// name, by media ID (byte order), each once.
//
// The store lists a user's media by offset only, so each page is asked to
// overlap the previous one and is used only if it does: its first item must
// not sort after the last item exported. Then the page is a contiguous run
// of the sorted list that reaches back to the cursor, and nothing between
// the cursor and its end is skipped, whatever was deleted meanwhile. A page
// that starts after the cursor (items before it were deleted) is asked
// again from earlier.
func (e *exporter) listUser(ctx context.Context, admin storage.MediaAdmin, fn func(storage.Media) error) error {
	limit := max(e.opts.PageSize, 2)
	overlap := max(limit/4, 1)
	q := storage.UserMediaQuery{ServerName: e.subject.ServerName, UserID: e.subject.UserID,
		OrderBy: storage.OrderMediaID, Limit: limit}
	last := ""
	for {
		page, _, err := admin.ListUserMedia(ctx, q)
		if err != nil {
			return fmt.Errorf("listing the media of %s: %w", e.subject.UserID, err)
		}
		if q.Offset > 0 && (len(page) == 0 || page[0].MediaID > last) {
			q.Offset = max(q.Offset-(limit-overlap), 0)
			continue
		}
		for _, m := range page {
			if m.MediaID <= last {
				continue // exported with the previous page
			}
			if err := fn(m); err != nil {
				return err
			}
			last = m.MediaID
		}
		if len(page) < limit {
			return nil
		}
		q.Offset += limit - overlap
	}
}

// add writes one item: its content (unless refused), its preview, and its
// manifest line.
func (e *exporter) add(ctx context.Context, m storage.Media) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("exporting media: %w", err)
	}
	it := Item{
		MXC: "mxc://" + m.ServerName + "/" + m.MediaID, ServerName: m.ServerName, MediaID: m.MediaID,
		Remote: m.Remote, UserID: m.UserID, UploadName: m.Filename, ContentType: m.ContentType,
		Size: m.Size, SHA256: m.SHA256, CreatedAt: m.CreatedAt.UTC(),
		Quarantined: m.QuarantinedBy != "", QuarantinedBy: m.QuarantinedBy, Protected: m.Protected,
	}
	if m.Refused() {
		e.sum.Quarantined++
	} else if err := e.addContent(ctx, m, &it); err != nil {
		return err
	}
	line, err := itemLine(it)
	if err != nil {
		return err
	}
	if _, err := e.spoolW.Write(line); err != nil {
		return fmt.Errorf("exporting media: writing the item spool: %w", err)
	}
	e.sum.Items++
	return nil
}

// maxExportedField bounds the upload name and content type of an item
// whose manifest entry would otherwise exceed maxItemJSON (never the case
// for names and types this module accepts at upload: 255 bytes).
const maxExportedField = 4096

// itemLine encodes it as one spool line. An entry over maxItemJSON, which
// readers refuse, gets its upload name and content type shortened, noted in
// its Error.
func itemLine(it Item) ([]byte, error) {
	line, err := json.Marshal(it)
	if err == nil && len(line) >= maxItemJSON {
		it.UploadName = truncateName(strings.ToValidUTF8(it.UploadName, "_"), maxExportedField)
		it.ContentType = truncateName(strings.ToValidUTF8(it.ContentType, "_"), maxExportedField)
		it.Error = strings.TrimPrefix(it.Error+"; upload name and content type shortened", "; ")
		line, err = json.Marshal(it)
	}
	if err != nil {
		return nil, fmt.Errorf("exporting %s: encoding its manifest entry: %w", it.MXC, err)
	}
	return append(line, '\n'), nil
}

// addContent copies the item's blob into the archive, checking its length
// and SHA-256, then adds its preview.
func (e *exporter) addContent(ctx context.Context, m storage.Media, it *Item) error {
	blob, err := e.openBlob(ctx, m)
	if errors.Is(err, storage.ErrNotFound) {
		e.sum.Missing++
		it.Error = "content missing from its datastore"
		return nil
	}
	if err != nil {
		return fmt.Errorf("exporting %s: %w", it.MXC, err)
	}
	defer blob.Content.Close()
	name := mediaPath(m.ServerName, m.MediaID, SafeFileName(m.Filename, m.MediaID, m.ContentType))
	method := zip.Deflate
	if stored(m.ContentType) {
		method = zip.Store
	}
	fw, err := e.zw.CreateHeader(&zip.FileHeader{Name: name, Method: method, Modified: m.CreatedAt.UTC()})
	if err != nil {
		return fmt.Errorf("exporting %s: %w", it.MXC, err)
	}
	h := sha256.New()
	n, err := io.CopyBuffer(io.MultiWriter(fw, h), readerOnly{blob.Content}, e.copyBuf)
	if err != nil {
		return fmt.Errorf("exporting %s: copying its content: %w", it.MXC, err)
	}
	it.File = name
	e.sum.Files++
	e.sum.Bytes += n
	if got := hex.EncodeToString(h.Sum(nil)); n != m.Size || got != m.SHA256 {
		e.sum.Damaged++
		it.Error = fmt.Sprintf("content does not match its record: read %d bytes with SHA-256 %s", n, got)
		return nil
	}
	return e.addThumbnail(ctx, m, blob.Content, it)
}

// readerOnly hides every method but Read, so that io.CopyBuffer uses the
// buffer given rather than a WriterTo/ReaderFrom of the parts.
type readerOnly struct{ io.Reader }

// openBlob opens the item's blob in its datastore. A datastore that is not
// configured counts as a missing blob.
func (e *exporter) openBlob(ctx context.Context, m storage.Media) (storage.Blob, error) {
	store, ok := e.stores.Get(m.Datastore)
	if !ok {
		return storage.Blob{}, fmt.Errorf("datastore %q of the content is not configured: %w", m.Datastore, storage.ErrNotFound)
	}
	b, err := store.Open(ctx, m.SHA256)
	if err != nil {
		return storage.Blob{}, fmt.Errorf("opening its content in datastore %q: %w", m.Datastore, err)
	}
	return b, nil
}

// addThumbnail writes a preview of an image, read again from the start of
// its blob. The Thumbnailer's failures are counted, not returned; the
// export's own (a cancelled context, a failing writer) are.
func (e *exporter) addThumbnail(ctx context.Context, m storage.Media, content io.ReadSeeker, it *Item) error {
	if e.opts.Thumbnailer == nil || mediaTypeClass(m.ContentType) != "image" {
		return nil
	}
	if _, err := content.Seek(0, io.SeekStart); err != nil {
		return fmt.Errorf("exporting %s: rewinding its content: %w", it.MXC, err)
	}
	th, err := e.opts.Thumbnailer.Thumbnail(ctx, m, content)
	if err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("exporting %s: %w", it.MXC, ctx.Err())
		}
		e.sum.ThumbnailFailures++
		return nil
	}
	ext := map[string]string{"image/jpeg": ".jpg", "image/png": ".png"}[th.ContentType]
	if ext == "" || len(th.Data) == 0 || len(th.Data) > e.opts.MaxThumbnailBytes {
		e.sum.ThumbnailFailures++
		return nil
	}
	name := thumbnailPath(m.ServerName, m.MediaID, ext)
	fw, err := e.zw.CreateHeader(&zip.FileHeader{Name: name, Method: zip.Store, Modified: m.CreatedAt.UTC()})
	if err != nil {
		return fmt.Errorf("exporting %s: %w", it.MXC, err)
	}
	if _, err := fw.Write(th.Data); err != nil {
		return fmt.Errorf("exporting %s: writing its preview: %w", it.MXC, err)
	}
	it.Thumbnail = name
	e.sum.Thumbnails++
	return nil
}

// mediaTypeClass is the top-level type of a Content-Type ("image",
// "video", ...), or "".
func mediaTypeClass(contentType string) string {
	mt := mediaType(contentType)
	for i := 0; i < len(mt); i++ {
		if mt[i] == '/' {
			return mt[:i]
		}
	}
	return ""
}

// finish writes manifest.json and index.html from the spool, then the ZIP
// central directory.
func (e *exporter) finish() error {
	if err := e.spoolW.Flush(); err != nil {
		return fmt.Errorf("exporting media: writing the item spool: %w", err)
	}
	if err := e.writeManifest(); err != nil {
		return err
	}
	if err := e.writeIndex(); err != nil {
		return err
	}
	if err := e.zw.Close(); err != nil {
		return fmt.Errorf("exporting media: finishing the archive: %w", err)
	}
	return nil
}

// spoolLines calls fn with each item line of the spool, in order.
func (e *exporter) spoolLines(fn func(line []byte) error) error {
	if _, err := e.spool.Seek(0, io.SeekStart); err != nil {
		return fmt.Errorf("exporting media: rewinding the item spool: %w", err)
	}
	sc := bufio.NewScanner(e.spool)
	// A line is one item: bounded by the store's own bounds on names and
	// types; allow generous room.
	sc.Buffer(make([]byte, 0, 64<<10), maxItemJSON)
	for sc.Scan() {
		if err := fn(sc.Bytes()); err != nil {
			return err
		}
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("exporting media: reading the item spool: %w", err)
	}
	return nil
}

// writeManifest writes manifest.json: the header fields, then the items
// from the spool.
func (e *exporter) writeManifest() error {
	fw, err := e.zw.CreateHeader(&zip.FileHeader{Name: ManifestName, Method: zip.Deflate, Modified: e.created})
	if err != nil {
		return fmt.Errorf("exporting media: %w", err)
	}
	head, err := json.Marshal(Manifest{Format: Format, Version: Version, CreatedAt: e.created, Export: e.subject,
		Totals: Totals{Items: e.sum.Items, Files: e.sum.Files, Bytes: e.sum.Bytes}})
	if err != nil {
		return fmt.Errorf("exporting media: encoding the manifest: %w", err)
	}
	// Manifest's last field is "items":null; the items replace the null.
	const tail = `null}`
	head = head[:len(head)-len(tail)]
	bw := bufio.NewWriter(fw)
	_, _ = bw.Write(head)
	_, _ = bw.WriteString("[\n")
	first := true
	err = e.spoolLines(func(line []byte) error {
		if !first {
			_, _ = bw.WriteString(",\n")
		}
		first = false
		_, err := bw.Write(line)
		return err
	})
	if err != nil {
		return fmt.Errorf("exporting media: writing the manifest: %w", err)
	}
	_, _ = bw.WriteString("\n]}\n")
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("exporting media: writing the manifest: %w", err)
	}
	return nil
}
