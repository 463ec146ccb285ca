package storage

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
)

// Digest tracks what a blob store must know of a body while it streams in:
// its length, checked against the PutOptions limits, its SHA-256 and the
// hash of its first PrefixSize bytes.
type Digest struct {
	opts PutOptions
	size int64
	hash hash.Hash
	// prefixSum is the hash of the first PrefixSize bytes, taken from hash
	// (Sum leaves its state alone) when the body reaches that length, so no
	// byte is hashed twice; nil while the body is shorter.
	prefixSum []byte
}

// NewDigest starts the digest of a body stored with opts.
func NewDigest(opts PutOptions) *Digest {
	return &Digest{opts: opts, hash: sha256.New()}
}

// Add accounts for the next chunk of the body and returns its offset. It
// fails, wrapping ErrTooLarge or ErrSizeMismatch, as soon as the body is
// longer than MaxSize or than ExpectedSize.
func (d *Digest) Add(chunk []byte) (offset int64, err error) {
	offset = d.size
	d.size += int64(len(chunk))
	if d.opts.MaxSize > 0 && d.size > d.opts.MaxSize {
		return offset, fmt.Errorf("body over limit %d: %w", d.opts.MaxSize, ErrTooLarge)
	}
	if d.opts.ExpectedSize >= 0 && d.size > d.opts.ExpectedSize {
		return offset, fmt.Errorf("body longer than announced %d: %w", d.opts.ExpectedSize, ErrSizeMismatch)
	}
	if offset < PrefixSize && d.size >= PrefixSize {
		n := PrefixSize - offset
		d.hash.Write(chunk[:n])
		d.prefixSum = d.hash.Sum(nil)
		chunk = chunk[n:]
	}
	d.hash.Write(chunk)
	return offset, nil
}

// Size is the length of the body so far.
func (d *Digest) Size() int64 { return d.size }

// Finish checks that the body had its announced length and its expected
// SHA-256 (when PutOptions set them) and returns its hashes and size
// (Existed is left to the store).
func (d *Digest) Finish() (PutResult, error) {
	if d.opts.ExpectedSize >= 0 && d.size != d.opts.ExpectedSize {
		return PutResult{}, fmt.Errorf("got %d bytes, announced %d: %w", d.size, d.opts.ExpectedSize, ErrSizeMismatch)
	}
	sum := d.hash.Sum(nil)
	prefix := d.prefixSum
	if prefix == nil {
		// Shorter than PrefixSize: the prefix is the whole body.
		prefix = sum
	}
	res := PutResult{
		SHA256:       hex.EncodeToString(sum),
		Size:         d.size,
		PrefixSHA256: hex.EncodeToString(prefix),
	}
	if err := checkExpectedSHA256(d.opts, res.SHA256); err != nil {
		return PutResult{}, err
	}
	return res, nil
}

// checkExpectedSHA256 fails, wrapping ErrHashMismatch, when opts expects a
// SHA-256 (PutOptions.ExpectedSHA256) and sum is another.
func checkExpectedSHA256(opts PutOptions, sum string) error {
	if opts.ExpectedSHA256 != "" && sum != opts.ExpectedSHA256 {
		return fmt.Errorf("body hashes to %s, expected %.80s: %w", sum, opts.ExpectedSHA256, ErrHashMismatch)
	}
	return nil
}

// Stream is the common course of a store's Put: it reads r in chunks of up
// to len(buf) bytes into consume (which calls d.Add and stores or compares
// the chunk), completes the digest, and hands the content's hash to commit,
// which puts the blob in place and reports whether it already existed.
func Stream(ctx context.Context, r io.Reader, buf []byte, d *Digest, consume func(chunk []byte) error,
	commit func(sha256 string) (existed bool, err error)) (PutResult, error) {
	if err := readChunks(ctx, r, buf, consume); err != nil {
		return PutResult{}, fmt.Errorf("storing blob: %w", err)
	}
	res, err := d.Finish()
	if err != nil {
		return PutResult{}, fmt.Errorf("storing blob: %w", err)
	}
	if res.Existed, err = commit(res.SHA256); err != nil {
		return PutResult{}, fmt.Errorf("storing blob: %w", err)
	}
	return res, nil
}

// readChunks reads r to its end in chunks of up to len(buf) bytes and hands
// each to fn, checking ctx between chunks. Errors of r are wrapped "reading
// body"; errors of fn and of ctx are returned as they are.
func readChunks(ctx context.Context, r io.Reader, buf []byte, fn func(chunk []byte) error) error {
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		n, err := io.ReadFull(r, buf)
		eof := errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)
		if err != nil && !eof {
			return fmt.Errorf("reading body: %w", err)
		}
		if n > 0 {
			if err := fn(buf[:n]); err != nil {
				return err
			}
		}
		if eof {
			return ctx.Err()
		}
	}
}

// ValidSHA256 reports whether h is a blob address: exactly 64 lowercase hex
// digits. It is the one check of a content hash given from outside (blob
// stores' keys, dedup candidates, hashes recorded by import sources).
func ValidSHA256(h string) bool {
	if len(h) != sha256.Size*2 {
		return false
	}
	for i := 0; i < len(h); i++ {
		c := h[i]
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}
