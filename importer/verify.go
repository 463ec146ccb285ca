package importer

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
)

// verifier passes an item's bytes through and checks them against what the
// source recorded: it fails (ErrHashMismatch) as soon as the body is longer
// than the recorded size, and, instead of ending, when the body ends short
// of it or (when it hashes) hashes to another SHA-256. A store reading
// through it therefore never completes a blob from wrong bytes.
type verifier struct {
	r io.Reader
	// hash hashes the bytes read; nil for a size check only.
	hash   hash.Hash
	sha256 string
	size   int64
	n      int64
	err    error
}

// newVerifier checks r against sha (empty: not checked) and size (-1: not
// checked), and hashes it (see sum).
func newVerifier(r io.Reader, sha string, size int64) *verifier {
	return &verifier{r: r, hash: sha256.New(), sha256: sha, size: size}
}

// newSizeVerifier checks r against size only (-1: not checked), without
// hashing it: for a reader whose consumer checks the hash itself.
func newSizeVerifier(r io.Reader, size int64) *verifier {
	return &verifier{r: r, size: size}
}

// Read implements io.Reader. After the end or an error it keeps returning
// the same error.
func (v *verifier) Read(p []byte) (int, error) {
	if v.err != nil {
		return 0, v.err
	}
	n, err := v.r.Read(p)
	if v.hash != nil {
		v.hash.Write(p[:n])
	}
	v.n += int64(n)
	if v.size >= 0 && v.n > v.size {
		v.err = fmt.Errorf("source body is longer than its recorded %d bytes: %w", v.size, ErrHashMismatch)
		return 0, v.err
	}
	switch {
	case errors.Is(err, io.EOF):
		v.err = v.check()
		return n, v.err
	case err != nil:
		v.err = err
	}
	return n, err
}

// check compares the complete body with the recorded size and hash.
func (v *verifier) check() error {
	if v.size >= 0 && v.n != v.size {
		return fmt.Errorf("source body has %d bytes, %d recorded: %w", v.n, v.size, ErrHashMismatch)
	}
	if v.sha256 != "" {
		if got := v.sum(); got != v.sha256 {
			return fmt.Errorf("source body hashes to %s, %s recorded: %w", got, v.sha256, ErrHashMismatch)
		}
	}
	return io.EOF
}

// sum is the hex SHA-256 of the bytes read so far (by a verifier of
// newVerifier).
func (v *verifier) sum() string { return hex.EncodeToString(v.hash.Sum(nil)) }
