package s3store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// Put streams r into the store while hashing it; see storage.BlobStore.
//
// The body is read in 256 KiB chunks into part buffers. A body no longer than
// one part is written with a single PutObject to its final key once its hash
// is known, after a HeadObject showed that the blob is not stored yet. A
// longer body becomes a multipart upload to a tmp key (one part uploading
// while the next is read); at the end it is completed, copied server-side to
// its final key and the tmp object deleted, unless the blob already exists,
// in which case the upload is aborted.
//
// With a candidate (opts.Candidate naming a stored blob, of the expected size
// when that is known) the body is compared with the candidate, streamed with
// one GetObject, and nothing is buffered or written while they agree. At the
// first chunk that differs, or when the candidate ends early, the
// candidate's matched prefix is fetched again with a ranged GetObject and
// written, followed by the rest of the body. A candidate that is malformed,
// missing or cannot be opened is ignored.
//
// Any error, including cancellation of ctx (checked between chunks), aborts
// the multipart upload and deletes the tmp object; see the package comment.
func (s *Store) Put(ctx context.Context, r io.Reader, opts storage.PutOptions) (storage.PutResult, error) {
	if err := ctx.Err(); err != nil {
		return storage.PutResult{}, fmt.Errorf("storing blob: %w", err)
	}
	if opts.MaxSize > 0 && opts.ExpectedSize > opts.MaxSize {
		return storage.PutResult{}, fmt.Errorf("storing blob: announced length %d over limit %d: %w",
			opts.ExpectedSize, opts.MaxSize, storage.ErrTooLarge)
	}

	pctx, cancel := context.WithCancel(ctx)
	defer cancel()
	p := &put{
		s: s, ctx: pctx, opts: opts, digest: storage.NewDigest(opts),
		w: &partWriter{s: s, ctx: pctx, hint: opts.ExpectedSize},
	}
	defer func() {
		if !p.success {
			// Stop an upload in flight before cleaning up after it.
			cancel()
			p.w.discard()
		}
		p.releaseCandidate()
		p.w.release()
	}()

	if storage.ValidSHA256(opts.Candidate) {
		p.openCandidate(opts.Candidate)
	}

	bufp := s.getChunk()
	defer s.putChunk(bufp)
	buf := *bufp
	res, err := storage.Stream(ctx, r, buf, p.digest, p.consume, func(sum string) (bool, error) {
		err := p.finish(sum)
		return p.existed, err
	})
	p.success = err == nil
	return res, err
}

// put is the state of one Put call.
type put struct {
	s *Store
	// ctx is the Put's context, cancelled when Put returns.
	ctx  context.Context
	opts storage.PutOptions
	// digest hashes the body and checks its length.
	digest *storage.Digest
	// w buffers and uploads the bytes to store.
	w *partWriter
	// cand streams the candidate blob while the body still matches it; nil
	// when there is no candidate or the body diverged from it.
	cand io.ReadCloser
	// candKey and candSize are the candidate's key and size.
	candKey  string
	candSize int64
	// candBuf is the pooled buffer that candidate chunks are read into.
	candBuf *[]byte
	// existed is set by finish when the blob was already stored.
	existed bool
	// success is set once the blob is in place (or known to exist).
	success bool
}

// openCandidate starts streaming the candidate blob for comparison. The
// candidate is only a hint: one that is missing, cannot be read, or whose
// size differs from the announced length is ignored and the body is written
// as usual.
func (p *put) openCandidate(h string) {
	key := p.s.blobKey(h)
	size, ok, err := p.s.head(p.ctx, key)
	if err != nil || !ok || (p.opts.ExpectedSize >= 0 && size != p.opts.ExpectedSize) {
		return
	}
	body, err := p.s.getObject(p.ctx, key, 0, -1)
	if err != nil {
		return
	}
	p.cand, p.candKey, p.candSize = body, key, size
	p.candBuf = p.s.getChunk()
}

// closeCandidateStream closes the candidate's body stream, if open.
func (p *put) closeCandidateStream() {
	if p.cand != nil {
		p.cand.Close()
		p.cand = nil
	}
}

// releaseCandidate closes the candidate and returns its buffer, if any.
func (p *put) releaseCandidate() {
	p.closeCandidateStream()
	if p.candBuf != nil {
		p.s.putChunk(p.candBuf)
		p.candBuf = nil
	}
}

// consume hashes one chunk of the body, enforces the size limits, and either
// compares it with the candidate or hands it to the part writer.
func (p *put) consume(chunk []byte) error {
	offset, err := p.digest.Add(chunk)
	if err != nil {
		return err
	}

	if p.cand != nil {
		cbuf := (*p.candBuf)[:len(chunk)]
		n, err := io.ReadFull(p.cand, cbuf)
		if err != nil && err != io.EOF && err != io.ErrUnexpectedEOF {
			return fmt.Errorf("reading candidate blob: %w", classify(err))
		}
		// The candidate has candSize bytes: a shorter read than that allows
		// means the stream broke off, not that the candidate ended.
		if want := min(int64(len(chunk)), max(p.candSize-offset, 0)); int64(n) < want {
			return fmt.Errorf("reading candidate blob: stream ended at %d of %d bytes: %w",
				offset+int64(n), p.candSize, classify(io.ErrUnexpectedEOF))
		}
		if n == len(chunk) && bytes.Equal(chunk, cbuf) {
			return nil
		}
		// The body diverges from the candidate within this chunk (or the
		// candidate ends in it): write the matched prefix, then go on.
		if err := p.divergeAt(offset); err != nil {
			return err
		}
	}
	return p.w.write(chunk)
}

// divergeAt stops comparing with the candidate: it writes the candidate's
// first n bytes, which are known to equal the body's, fetching them again
// with a ranged GetObject, and releases the candidate.
func (p *put) divergeAt(n int64) error {
	p.closeCandidateStream()
	if n > 0 {
		rc, err := p.s.getObject(p.ctx, p.candKey, 0, n)
		if err != nil {
			return fmt.Errorf("re-reading matched candidate prefix: %w", err)
		}
		copied, err := io.CopyBuffer(writerOnly{p.w}, rc, *p.candBuf)
		rc.Close()
		if err != nil {
			return fmt.Errorf("copying matched candidate prefix: %w", classify(err))
		}
		if copied != n {
			return fmt.Errorf("copying matched candidate prefix: got %d bytes, need %d: %w",
				copied, n, classify(io.ErrUnexpectedEOF))
		}
	}
	p.releaseCandidate()
	return nil
}

// writerOnly hides any io.ReaderFrom of a writer, so that io.CopyBuffer uses
// the buffer it is given.
type writerOnly struct{ io.Writer }

// finish moves the body into place under sum, or notes that it exists.
func (p *put) finish(sum string) error {
	final := p.s.blobKey(sum)
	_, exists, err := p.s.head(p.ctx, final)
	if err != nil {
		return fmt.Errorf("checking for existing blob: %w", err)
	}
	if exists {
		p.existed = true
		p.w.discard()
		return nil
	}
	if p.cand != nil {
		// The body equals the candidate's first p.digest.Size() bytes, but no blob is
		// stored under its hash: the candidate is longer than the body (or
		// was removed meanwhile). Materialise the body from the candidate.
		if err := p.divergeAt(p.digest.Size()); err != nil {
			return err
		}
	}
	return p.w.commit(final, p.digest.Size())
}

// partWriter collects the bytes to store in part buffers. It writes nothing
// until a second part is needed: a body of at most one part is written by
// commit with one PutObject. Longer bodies become a multipart upload to a tmp
// key, uploading each full part in the background while the next one fills,
// so at most two parts are in memory.
type partWriter struct {
	s   *Store
	ctx context.Context
	// hint is the announced body length, -1 when unknown.
	hint int64
	// buf is the part being filled and n how much of it is; buf is nil
	// before the first byte and after handing a part to an upload. weight
	// is what buf holds of the store's buffer budget; pooled tells whether
	// buf is a partSize buffer from the pool (else an exact-size one).
	buf    *[]byte
	n      int
	weight int64
	pooled bool
	// tmpKey and uploadID name the multipart upload; empty until one is
	// started.
	tmpKey, uploadID string
	// parts are the uploaded parts, in order.
	parts []types.CompletedPart
	// inflight delivers the result of the part upload running in the
	// background; nil when none runs.
	inflight chan partResult
	// completed is set once the multipart upload is completed, so the tmp
	// object exists.
	completed bool
	// done is set once the upload is committed or cleaned up.
	done bool
}

// partResult is the outcome of one part upload.
type partResult struct {
	part types.CompletedPart
	err  error
}

// Write appends p to the part buffers; it implements io.Writer.
func (w *partWriter) Write(p []byte) (int, error) {
	if err := w.write(p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// write appends p, starting the upload of the current part when it is full
// and more bytes arrive.
func (w *partWriter) write(p []byte) error {
	for len(p) > 0 {
		if w.buf == nil {
			if err := w.take(); err != nil {
				return err
			}
		}
		if w.n == len(*w.buf) {
			if err := w.flush(); err != nil {
				return err
			}
			continue
		}
		c := copy((*w.buf)[w.n:], p)
		w.n += c
		p = p[c:]
	}
	return nil
}

// flush starts the multipart upload if needed, waits for the previous part,
// and starts uploading the current one in the background.
func (w *partWriter) flush() error {
	if w.uploadID == "" {
		if err := w.start(); err != nil {
			return err
		}
	}
	if err := w.wait(); err != nil {
		return err
	}
	if len(w.parts) >= maxParts {
		return fmt.Errorf("body needs more than %d parts of %d bytes: %w", maxParts, w.s.partSize, storage.ErrTooLarge)
	}
	num := int32(len(w.parts) + 1)
	buf, n, weight, pooled := w.buf, w.n, w.weight, w.pooled
	w.buf, w.n = nil, 0
	ch := make(chan partResult, 1)
	w.inflight = ch
	go func() {
		part, err := w.uploadPart(num, (*buf)[:n])
		w.s.releaseBuf(buf, weight, pooled)
		ch <- partResult{part: part, err: err}
	}()
	return nil
}

// take gets the next buffer within the store's budget. The first buffer of a
// body whose announced length is below one part is exactly that long; others
// are part buffers. While a part uploads, a second buffer is taken only if
// the budget has room; otherwise the upload waits for its own part first, so
// an upload never waits for budget while holding any.
func (w *partWriter) take() error {
	size, pooled := w.s.partSize, true
	if w.uploadID == "" && w.hint >= 0 && w.hint < w.s.partSize {
		size, pooled = max(w.hint, 1), false
	}
	if w.inflight == nil || !w.s.budget.TryAcquire(size) {
		if err := w.wait(); err != nil {
			return err
		}
		if err := w.s.budget.Acquire(w.ctx, size); err != nil {
			return fmt.Errorf("waiting for an upload buffer: %w", err)
		}
	}
	if pooled {
		w.buf = w.s.getPart()
	} else {
		b := make([]byte, size)
		w.buf = &b
	}
	w.n, w.weight, w.pooled = 0, size, pooled
	return nil
}

// start creates the multipart upload to a fresh tmp key.
func (w *partWriter) start() error {
	w.tmpKey = w.s.newTmpKey()
	in := &s3.CreateMultipartUploadInput{Bucket: aws.String(w.s.bucket), Key: aws.String(w.tmpKey)}
	if w.s.storageClass != "" {
		in.StorageClass = types.StorageClass(w.s.storageClass)
	}
	start := time.Now()
	out, err := w.s.client.CreateMultipartUpload(w.ctx, in)
	w.s.observe("CreateMultipartUpload", start, 0, err)
	if err != nil {
		return fmt.Errorf("starting multipart upload: %w", classify(err))
	}
	w.uploadID = aws.ToString(out.UploadId)
	if w.uploadID == "" {
		return errors.New("starting multipart upload: no upload ID in the response")
	}
	return nil
}

// uploadPart uploads one part of the multipart upload.
func (w *partWriter) uploadPart(num int32, data []byte) (types.CompletedPart, error) {
	start := time.Now()
	out, err := w.s.client.UploadPart(w.ctx, &s3.UploadPartInput{
		Bucket:        aws.String(w.s.bucket),
		Key:           aws.String(w.tmpKey),
		UploadId:      aws.String(w.uploadID),
		PartNumber:    aws.Int32(num),
		Body:          bytes.NewReader(data),
		ContentLength: aws.Int64(int64(len(data))),
	})
	w.s.observe("UploadPart", start, int64(len(data)), err)
	if err != nil {
		return types.CompletedPart{}, fmt.Errorf("uploading part %d: %w", num, classify(err))
	}
	return types.CompletedPart{ETag: out.ETag, PartNumber: aws.Int32(num)}, nil
}

// wait waits for the part upload in flight, if any, and records its part.
func (w *partWriter) wait() error {
	if w.inflight == nil {
		return nil
	}
	res := <-w.inflight
	w.inflight = nil
	if res.err != nil {
		return res.err
	}
	w.parts = append(w.parts, res.part)
	return nil
}

// commit writes the collected body, size bytes long, to the final key.
func (w *partWriter) commit(final string, size int64) error {
	if w.uploadID == "" {
		var data []byte
		if w.buf != nil {
			data = (*w.buf)[:w.n]
		}
		in := &s3.PutObjectInput{
			Bucket:        aws.String(w.s.bucket),
			Key:           aws.String(final),
			Body:          bytes.NewReader(data),
			ContentLength: aws.Int64(int64(len(data))),
		}
		if w.s.storageClass != "" {
			in.StorageClass = types.StorageClass(w.s.storageClass)
		}
		start := time.Now()
		_, err := w.s.client.PutObject(w.ctx, in)
		w.s.observe("PutObject", start, int64(len(data)), err)
		if err != nil {
			return fmt.Errorf("writing blob object: %w", classify(err))
		}
		w.done = true
		return nil
	}

	if w.buf != nil && w.n > 0 {
		if err := w.flush(); err != nil {
			return err
		}
	}
	if err := w.wait(); err != nil {
		return err
	}
	start := time.Now()
	_, err := w.s.client.CompleteMultipartUpload(w.ctx, &s3.CompleteMultipartUploadInput{
		Bucket:          aws.String(w.s.bucket),
		Key:             aws.String(w.tmpKey),
		UploadId:        aws.String(w.uploadID),
		MultipartUpload: &types.CompletedMultipartUpload{Parts: w.parts},
	})
	w.s.observe("CompleteMultipartUpload", start, 0, err)
	if err != nil {
		return fmt.Errorf("completing multipart upload: %w", classify(err))
	}
	w.completed = true
	if err := w.s.copyObject(w.ctx, w.tmpKey, final, size); err != nil {
		return fmt.Errorf("moving blob into place: %w", err)
	}
	// The blob is in place: a failure to delete the tmp object must not fail
	// the Put, so the deletion is left to the clean-up, retried if needed.
	w.done = true
	w.s.cleanup(pendingCleanup{deleteKey: w.tmpKey})
	return nil
}

// discard drops whatever was uploaded: it waits for a part upload in flight
// (whose context the caller cancelled) and hands the multipart upload and tmp
// object to the clean-up.
func (w *partWriter) discard() {
	w.wait()
	w.release()
	if w.done || w.uploadID == "" {
		return
	}
	w.done = true
	w.s.cleanup(pendingCleanup{uploadKey: w.tmpKey, uploadID: w.uploadID, deleteKey: w.tmpKey})
}

// release returns the part buffer being filled, if any, to the pool and
// the budget.
func (w *partWriter) release() {
	if w.buf != nil {
		w.s.releaseBuf(w.buf, w.weight, w.pooled)
		w.buf, w.n = nil, 0
	}
}

// releaseBuf gives back a buffer taken by partWriter.take.
func (s *Store) releaseBuf(b *[]byte, weight int64, pooled bool) {
	if pooled {
		s.putPart(b)
	}
	s.budget.Release(weight)
}

// copyObject copies src to dst server-side; size is src's size.
func (s *Store) copyObject(ctx context.Context, src, dst string, size int64) error {
	if size > s.copyLimit {
		return s.multipartCopy(ctx, src, dst, size)
	}
	in := &s3.CopyObjectInput{
		Bucket:     aws.String(s.bucket),
		Key:        aws.String(dst),
		CopySource: aws.String(s.copySource(src)),
	}
	if s.storageClass != "" {
		in.StorageClass = types.StorageClass(s.storageClass)
	}
	start := time.Now()
	_, err := s.client.CopyObject(ctx, in)
	s.observe("CopyObject", start, size, err)
	if err != nil {
		return fmt.Errorf("copying object: %w", classify(err))
	}
	return nil
}

// multipartCopy copies src to dst with UploadPartCopy, for objects larger
// than a single CopyObject may copy. On failure the copy's multipart upload
// is aborted.
func (s *Store) multipartCopy(ctx context.Context, src, dst string, size int64) (err error) {
	in := &s3.CreateMultipartUploadInput{Bucket: aws.String(s.bucket), Key: aws.String(dst)}
	if s.storageClass != "" {
		in.StorageClass = types.StorageClass(s.storageClass)
	}
	start := time.Now()
	out, err := s.client.CreateMultipartUpload(ctx, in)
	s.observe("CreateMultipartUpload", start, 0, err)
	if err != nil {
		return fmt.Errorf("starting multipart copy: %w", classify(err))
	}
	uploadID := aws.ToString(out.UploadId)
	defer func() {
		if err != nil {
			s.cleanup(pendingCleanup{uploadKey: dst, uploadID: uploadID})
		}
	}()
	var parts []types.CompletedPart
	for off, num := int64(0), int32(1); off < size; off, num = off+copyPartSize, num+1 {
		end := min(off+copyPartSize, size) - 1
		start := time.Now()
		pout, err := s.client.UploadPartCopy(ctx, &s3.UploadPartCopyInput{
			Bucket:          aws.String(s.bucket),
			Key:             aws.String(dst),
			UploadId:        aws.String(uploadID),
			PartNumber:      aws.Int32(num),
			CopySource:      aws.String(s.copySource(src)),
			CopySourceRange: aws.String(fmt.Sprintf("bytes=%d-%d", off, end)),
		})
		s.observe("UploadPartCopy", start, end-off+1, err)
		if err != nil {
			return fmt.Errorf("copying part %d: %w", num, classify(err))
		}
		if pout.CopyPartResult == nil {
			return fmt.Errorf("copying part %d: no result in the response", num)
		}
		parts = append(parts, types.CompletedPart{ETag: pout.CopyPartResult.ETag, PartNumber: aws.Int32(num)})
	}
	start = time.Now()
	_, err = s.client.CompleteMultipartUpload(ctx, &s3.CompleteMultipartUploadInput{
		Bucket:          aws.String(s.bucket),
		Key:             aws.String(dst),
		UploadId:        aws.String(uploadID),
		MultipartUpload: &types.CompletedMultipartUpload{Parts: parts},
	})
	s.observe("CompleteMultipartUpload", start, 0, err)
	if err != nil {
		return fmt.Errorf("completing multipart copy: %w", classify(err))
	}
	return nil
}

// pendingCleanup is what must be removed after a failed or finished upload.
type pendingCleanup struct {
	// uploadKey and uploadID name a multipart upload to abort; empty when
	// none.
	uploadKey, uploadID string
	// deleteKey is an object to delete; empty when none.
	deleteKey string
}

// cleanup removes what c names. It tries once right away, with a fresh
// context so that a cancelled Put still cleans up; if S3 cannot be reached it
// keeps trying in the background, backing off, until it succeeds, the
// store's clean-up window ends or the store is closed.
func (s *Store) cleanup(c pendingCleanup) {
	if s.cleanupOnce(c) == nil {
		return
	}
	s.cleanups.Add(1)
	go func() {
		defer s.cleanups.Done()
		deadline := time.Now().Add(s.cleanupWindow)
		delay := 100 * time.Millisecond
		for time.Now().Before(deadline) {
			select {
			case <-s.cleanupCtx.Done():
				return
			case <-time.After(delay):
			}
			if s.cleanupOnce(c) == nil {
				return
			}
			delay = min(delay*2, 5*time.Second)
		}
	}()
}

// cleanupOnce makes one attempt at removing what c names.
func (s *Store) cleanupOnce(c pendingCleanup) error {
	ctx, cancel := context.WithTimeout(s.cleanupCtx, cleanupTimeout)
	defer cancel()
	if c.uploadID != "" {
		start := time.Now()
		_, err := s.client.AbortMultipartUpload(ctx, &s3.AbortMultipartUploadInput{
			Bucket:   aws.String(s.bucket),
			Key:      aws.String(c.uploadKey),
			UploadId: aws.String(c.uploadID),
		})
		// NoSuchUpload: already aborted, or completed after all (then the
		// tmp object is deleted below).
		if statusCode(err) == http.StatusNotFound {
			err = nil
		}
		s.observe("AbortMultipartUpload", start, 0, err)
		if err != nil {
			return fmt.Errorf("aborting multipart upload: %w", classify(err))
		}
	}
	if c.deleteKey != "" {
		if err := s.deleteObject(ctx, c.deleteKey); err != nil {
			return fmt.Errorf("deleting tmp object: %w", err)
		}
	}
	return nil
}
