package storage

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"time"
)

// readHead reads the head of a body of known length (opts.ExpectedSize >= 0),
// hashes it and looks up a stored blob of the same size and prefix. It
// returns a reader of the whole body (head included) and the candidate's
// record when one was found. With an unknown length it returns r unchanged.
func readHead(ctx context.Context, meta MetadataStore, r io.Reader, opts PutOptions) (body io.Reader, cand BlobRecord, found bool, err error) {
	if opts.ExpectedSize < 0 {
		return r, BlobRecord{}, false, nil
	}
	// At most 64 KiB per upload, sized to the body: small uploads stay small,
	// and nothing is shared between calls.
	head := make([]byte, min(opts.ExpectedSize, PrefixSize))
	n, err := io.ReadFull(r, head)
	if errors.Is(err, io.ErrUnexpectedEOF) || (errors.Is(err, io.EOF) && len(head) > 0) {
		return nil, BlobRecord{}, false, fmt.Errorf("body ended after %d of %d announced bytes: %w",
			n, opts.ExpectedSize, ErrSizeMismatch)
	}
	if err != nil {
		return nil, BlobRecord{}, false, fmt.Errorf("reading head: %w", err)
	}
	sum := sha256.Sum256(head)
	cand, err = meta.FindBlobByPrefix(ctx, opts.ExpectedSize, hex.EncodeToString(sum[:]))
	switch {
	case err == nil:
		found = true
	case errors.Is(err, ErrNotFound):
	default:
		return nil, BlobRecord{}, false, fmt.Errorf("looking up duplicate candidate: %w", err)
	}
	return io.MultiReader(bytes.NewReader(head), r), cand, found, nil
}

// IngestResult describes a blob stored by IngestTo.
type IngestResult struct {
	PutResult
	// Datastore names the datastore holding the blob. It differs from the
	// kind's datastore when the bytes were already stored in another one.
	Datastore string
}

// compareChunk is how many bytes IngestTo compares with a candidate in
// another datastore at a time.
const compareChunk = 64 << 10

// IngestTo stores the body r in the datastore of kind and records the blob in
// meta, deduplicating across all datastores.
//
// When the body's length is known (opts.ExpectedSize >= 0), IngestTo first
// reads its head (the first PrefixSize bytes, or the whole body when
// shorter), hashes it and asks meta for a stored blob of the same size and
// prefix: a likely duplicate. A body that ends before its head is complete
// fails with ErrSizeMismatch; an announced length over opts.MaxSize fails
// with ErrTooLarge before anything is read. A Candidate already set in opts
// is kept when the lookup finds none. A body that does not hash to
// opts.ExpectedSHA256 (when set) fails with ErrHashMismatch once read:
// nothing is written or recorded for it, and no duplicate is relied on.
//
// When the lookup finds a likely duplicate in the kind's datastore, that store
// compares the bytes itself (PutOptions.Candidate). When the duplicate lives
// in another configured datastore, IngestTo streams the body and that blob
// side by side, a chunk at a time: if they are equal to the end (and the
// bytes hash to the candidate's address) nothing is written and the result
// names the candidate's datastore with Existed set. At the first differing
// byte n the body is written to the kind's datastore from the candidate's
// first n bytes (read again, and checked against the hash of the body's first
// n bytes), the unmatched rest of the chunk and the rest of the body.
//
// After a write, a hash that is already recorded in another datastore keeps
// its record: the copy just written is deleted again (unless the target held
// it before), Existed is set and the result names the recorded datastore. A
// new hash is recorded under the kind's datastore once the blob is durable.
//
// Claims keep the garbage collector (storage/gc) away from the blob until the
// caller's media row references it: a likely duplicate is claimed
// (BlobCollector.TouchBlob) before its bytes are relied on, and one whose
// record was collected since the lookup is ignored, so the body is written in
// full; the result is claimed by RecordBlob. A result that relies on bytes
// this call did not write is checked after that claim: bytes collected in
// between fail the ingest with ErrUnavailable (retry) rather than letting a
// row point at them.
func IngestTo(ctx context.Context, stores *Datastores, meta MetadataStore, kind Kind, r io.Reader, opts PutOptions) (IngestResult, error) {
	if opts.MaxSize > 0 && opts.ExpectedSize > opts.MaxSize {
		return IngestResult{}, fmt.Errorf("ingesting body: announced length %d over limit %d: %w",
			opts.ExpectedSize, opts.MaxSize, ErrTooLarge)
	}
	target, store := stores.ForKind(kind)
	body, cand, found, err := readHead(ctx, meta, r, opts)
	if err != nil {
		return IngestResult{}, fmt.Errorf("ingesting body: %w", err)
	}
	if found {
		// Claim the candidate before relying on its bytes: once claimed, the
		// collector leaves it alone for its grace period. A candidate whose
		// record was collected since the lookup is no candidate: the body is
		// then written in full.
		if c, ok := meta.(BlobCollector); ok {
			alive, err := c.TouchBlob(ctx, cand.SHA256, time.Now())
			if err != nil {
				return IngestResult{}, fmt.Errorf("ingesting body: claiming duplicate candidate: %w", err)
			}
			if !alive {
				found, cand = false, BlobRecord{}
			}
		}
	}

	var res PutResult
	recordIn := target
	candStore, candKnown := stores.Get(cand.Datastore)
	switch {
	case found && cand.Datastore == target:
		opts.Candidate = cand.SHA256
		res, err = store.Put(ctx, body, opts)
	case found && candKnown:
		opts.Candidate = ""
		var same bool
		res, same, err = putComparing(ctx, candStore, cand, body, store, opts)
		if same {
			recordIn = cand.Datastore
		}
	default:
		res, err = store.Put(ctx, body, opts)
	}
	if err != nil {
		return IngestResult{}, fmt.Errorf("ingesting body into datastore %s: %w", target, err)
	}
	// The stores check opts.ExpectedSHA256 before a blob is put in place, and
	// putComparing before it relies on a duplicate; this is the last guard
	// before the blob is recorded.
	if err := checkExpectedSHA256(opts, res.SHA256); err != nil {
		return IngestResult{}, fmt.Errorf("ingesting body into datastore %s: %w", target, err)
	}
	wroteTarget := !res.Existed

	// Record the blob, or claim the existing record: either way the
	// collector now leaves it alone for its grace period. A concurrent
	// ingest of the same bytes may have recorded them in another datastore
	// first, and that record wins.
	// The record returned is the one that stands after the claim.
	rec, err := meta.RecordBlob(ctx, BlobRecord{
		SHA256:       res.SHA256,
		Size:         res.Size,
		PrefixSHA256: res.PrefixSHA256,
		Datastore:    recordIn,
		CreatedAt:    time.Now(),
	})
	if err != nil {
		return IngestResult{}, fmt.Errorf("ingesting body: recording blob: %w", err)
	}
	if rec.Datastore == target && wroteTarget {
		return IngestResult{PutResult: res, Datastore: rec.Datastore}, nil
	}

	// The result relies on bytes this call did not write. They were there
	// before the claim, but the collector may have deleted them (and their
	// record) in between; the claim waited for such a deletion to commit, so
	// checking now is conclusive.
	holder, ok := stores.Get(rec.Datastore)
	if !ok {
		return IngestResult{}, fmt.Errorf("ingesting body: blob %s is recorded in unknown datastore %q", res.SHA256, rec.Datastore)
	}
	_, serr := holder.Stat(ctx, res.SHA256)
	switch {
	case serr == nil:
		if rec.Datastore != target && wroteTarget {
			// The recorded datastore holds the bytes; this copy is
			// unreferenced. A failed delete leaves a stray copy, which the
			// collector does not remove (it leaves bytes in a datastore
			// other than the recorded one alone, see storage/gc); the
			// upload still succeeds.
			_ = store.Delete(context.WithoutCancel(ctx), res.SHA256)
		}
		res.Existed = true
		return IngestResult{PutResult: res, Datastore: rec.Datastore}, nil
	case errors.Is(serr, ErrNotFound) && wroteTarget:
		// Collected elsewhere meanwhile, but this call wrote a copy: point
		// the record at it.
		if err := meta.MoveBlob(ctx, res.SHA256, rec.Datastore, target); err != nil {
			return IngestResult{}, fmt.Errorf("ingesting body: repointing collected blob %s: %w", res.SHA256, err)
		}
		return IngestResult{PutResult: res, Datastore: target}, nil
	case errors.Is(serr, ErrNotFound):
		return IngestResult{}, fmt.Errorf("ingesting body: the stored copy of blob %s was garbage-collected while being reused (retry): %w",
			res.SHA256, ErrUnavailable)
	default:
		return IngestResult{}, fmt.Errorf("ingesting body: checking stored copy of blob %s: %w", res.SHA256, serr)
	}
}

// putComparing compares body with the candidate blob held by candStore. When
// they are equal it writes nothing and reports same; otherwise it writes body
// to target (see IngestTo). A candidate that cannot be opened is ignored.
func putComparing(ctx context.Context, candStore BlobStore, cand BlobRecord, body io.Reader, target BlobStore, opts PutOptions) (res PutResult, same bool, err error) {
	blob, err := candStore.Open(ctx, cand.SHA256)
	if err != nil {
		// Only a hint: the blob may have been moved or deleted meanwhile.
		res, err := target.Put(ctx, body, opts)
		return res, false, err
	}
	defer blob.Content.Close()

	h := sha256.New()
	prefix := sha256.New()
	bbuf := make([]byte, compareChunk)
	cbuf := make([]byte, compareChunk)
	var matched int64
	for {
		if err := ctx.Err(); err != nil {
			return PutResult{}, false, err
		}
		n, rerr := io.ReadFull(body, bbuf)
		eof := rerr == io.EOF || rerr == io.ErrUnexpectedEOF
		if rerr != nil && !eof {
			return PutResult{}, false, fmt.Errorf("reading body: %w", rerr)
		}
		c, cerr := io.ReadFull(blob.Content, cbuf[:n])
		if cerr != nil && cerr != io.EOF && cerr != io.ErrUnexpectedEOF {
			return PutResult{}, false, fmt.Errorf("reading candidate blob %s: %w", cand.SHA256, cerr)
		}
		i := commonPrefix(bbuf[:n], cbuf[:c])
		h.Write(bbuf[:i])
		if matched < PrefixSize {
			prefix.Write(bbuf[:min(int64(i), PrefixSize-matched)])
		}
		matched += int64(i)
		if i < n {
			rest := io.MultiReader(bytes.NewReader(bbuf[i:n]), body)
			res, err := putDiverged(ctx, candStore, cand.SHA256, matched, h.Sum(nil), rest, target, opts)
			return res, false, err
		}
		if !eof {
			continue
		}
		// The body ended and matched so far; it is a duplicate only if the
		// candidate ends here too and really has the address it is stored
		// under.
		more, cerr := io.ReadFull(blob.Content, cbuf[:1])
		if cerr != nil && cerr != io.EOF {
			return PutResult{}, false, fmt.Errorf("reading candidate blob %s: %w", cand.SHA256, cerr)
		}
		sum := hex.EncodeToString(h.Sum(nil))
		if more == 0 && sum == cand.SHA256 && matched == opts.ExpectedSize {
			if err := checkExpectedSHA256(opts, sum); err != nil {
				return PutResult{}, false, err
			}
			return PutResult{
				SHA256:       sum,
				Size:         matched,
				PrefixSHA256: hex.EncodeToString(prefix.Sum(nil)),
				Existed:      true,
			}, true, nil
		}
		res, err := putDiverged(ctx, candStore, cand.SHA256, matched, h.Sum(nil), bytes.NewReader(nil), target, opts)
		return res, false, err
	}
}

// commonPrefix returns the length of the longest common prefix of a and b.
func commonPrefix(a, b []byte) int {
	n := min(len(a), len(b))
	if bytes.Equal(a[:n], b[:n]) {
		return n
	}
	for i := range n {
		if a[i] != b[i] {
			return i
		}
	}
	return n
}

// putDiverged writes to target the first n bytes of the candidate blob,
// which must hash to prefixSum (the hash of the body's first n bytes), then
// rest.
func putDiverged(ctx context.Context, candStore BlobStore, candSHA string, n int64, prefixSum []byte, rest io.Reader, target BlobStore, opts PutOptions) (PutResult, error) {
	var head io.Reader = bytes.NewReader(nil)
	if n > 0 {
		blob, err := candStore.Open(ctx, candSHA)
		if err != nil {
			return PutResult{}, fmt.Errorf("reopening candidate blob %s: %w", candSHA, err)
		}
		defer blob.Content.Close()
		head = &checkedReader{r: io.LimitReader(blob.Content, n), hash: sha256.New(), want: prefixSum, n: n}
	}
	return target.Put(ctx, io.MultiReader(head, rest), opts)
}

// errCandidateChanged reports that a candidate blob read twice gave different
// bytes.
var errCandidateChanged = errors.New("candidate blob changed while being read")

// checkedReader passes r through and, at its end, checks that exactly n bytes
// with the SHA-256 want were read; otherwise it fails instead of ending.
type checkedReader struct {
	r     io.Reader
	hash  hash.Hash
	want  []byte
	n     int64
	count int64
}

// Read implements io.Reader.
func (c *checkedReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.hash.Write(p[:n])
	c.count += int64(n)
	if err == io.EOF && (c.count != c.n || !bytes.Equal(c.hash.Sum(nil), c.want)) {
		return n, fmt.Errorf("re-reading %d matched bytes (got %d): %w", c.n, c.count, errCandidateChanged)
	}
	return n, err
}
