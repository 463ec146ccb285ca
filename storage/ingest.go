package storage

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"time"
)

// Ingest stores the body r in blobs and records the blob in meta under the
// datastore name, using the metadata to deduplicate cheaply.
//
// When the body's length is known (opts.ExpectedSize >= 0), Ingest first reads
// its head (the first PrefixSize bytes, or the whole body when shorter),
// hashes it and asks meta for a stored blob of the same size and prefix; if
// there is one it becomes opts.Candidate, so that a duplicate upload is
// compared with the stored blob instead of being written again. A body that
// ends before its head is complete fails with ErrSizeMismatch; an announced
// length over opts.MaxSize fails with ErrTooLarge before anything is read.
// A Candidate already set in opts is kept when the lookup finds none.
//
// The blob record is written only after the blob is durable, and also when
// the blob already existed, so that a blob stored by a run that crashed before
// recording it gets its record.
func Ingest(ctx context.Context, blobs BlobStore, meta MetadataStore, datastore string, r io.Reader, opts PutOptions) (PutResult, error) {
	if opts.MaxSize > 0 && opts.ExpectedSize > opts.MaxSize {
		return PutResult{}, fmt.Errorf("ingesting body: announced length %d over limit %d: %w",
			opts.ExpectedSize, opts.MaxSize, ErrTooLarge)
	}
	body := r
	if opts.ExpectedSize >= 0 {
		// At most 64 KiB per upload, sized to the body: small uploads stay
		// small, and nothing is shared between calls.
		head := make([]byte, min(opts.ExpectedSize, PrefixSize))
		n, err := io.ReadFull(r, head)
		if errors.Is(err, io.ErrUnexpectedEOF) || (errors.Is(err, io.EOF) && len(head) > 0) {
			return PutResult{}, fmt.Errorf("ingesting body: body ended after %d of %d announced bytes: %w",
				n, opts.ExpectedSize, ErrSizeMismatch)
		}
		if err != nil {
			return PutResult{}, fmt.Errorf("ingesting body: reading head: %w", err)
		}
		sum := sha256.Sum256(head)
		cand, err := meta.FindBlobByPrefix(ctx, opts.ExpectedSize, hex.EncodeToString(sum[:]))
		switch {
		case err == nil:
			opts.Candidate = cand.SHA256
		case errors.Is(err, ErrNotFound):
		default:
			return PutResult{}, fmt.Errorf("ingesting body: looking up duplicate candidate: %w", err)
		}
		body = io.MultiReader(bytes.NewReader(head), r)
	}

	res, err := blobs.Put(ctx, body, opts)
	if err != nil {
		return PutResult{}, fmt.Errorf("ingesting body: %w", err)
	}
	err = meta.RecordBlob(ctx, BlobRecord{
		SHA256:       res.SHA256,
		Size:         res.Size,
		PrefixSHA256: res.PrefixSHA256,
		Datastore:    datastore,
		CreatedAt:    time.Now(),
	})
	if err != nil {
		return PutResult{}, fmt.Errorf("ingesting body: recording blob: %w", err)
	}
	return res, nil
}
