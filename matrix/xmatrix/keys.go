package xmatrix

import (
	"bytes"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// dendritePEMType is the PEM block type of Dendrite (and matrix-media-repo)
// signing key files.
const dendritePEMType = "MATRIX PRIVATE KEY"

// dendriteKeyIDHeader is the PEM header carrying the key ID.
const dendriteKeyIDHeader = "Key-ID"

// SigningKey is one ed25519 server signing key.
type SigningKey struct {
	// ID is the key ID including the algorithm, e.g. "ed25519:a_AbCd".
	ID string
	// Private is the ed25519 private key (seed and public half).
	Private ed25519.PrivateKey
}

// Public returns the public half of the key.
func (k SigningKey) Public() ed25519.PublicKey {
	return k.Private.Public().(ed25519.PublicKey)
}

// PublicBase64 returns the public key as unpadded standard base64, the form
// published in verify_keys.
func (k SigningKey) PublicBase64() string {
	return base64.RawStdEncoding.EncodeToString(k.Public())
}

// seed returns the 32-byte ed25519 seed of the key.
func (k SigningKey) seed() []byte {
	return k.Private.Seed()
}

// version returns the part of the key ID after "ed25519:".
func (k SigningKey) version() string {
	return strings.TrimPrefix(k.ID, "ed25519:")
}

// validKeyVersion reports whether v is a valid key identifier (the part after
// the algorithm): one or more of [a-zA-Z0-9_].
func validKeyVersion(v string) bool {
	if v == "" {
		return false
	}
	for i := 0; i < len(v); i++ {
		c := v[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_') {
			return false
		}
	}
	return true
}

// decodeBase64 decodes standard base64 with or without padding, the way
// Matrix implementations accept it.
func decodeBase64(s string) ([]byte, error) {
	return base64.RawStdEncoding.DecodeString(strings.TrimRight(s, "="))
}

// newSigningKey builds a SigningKey from an ID and a 32-byte seed.
func newSigningKey(id string, seed []byte) (SigningKey, error) {
	if len(seed) != ed25519.SeedSize {
		return SigningKey{}, fmt.Errorf("key %s: seed is %d bytes, want %d", id, len(seed), ed25519.SeedSize)
	}
	if !strings.HasPrefix(id, "ed25519:") || !validKeyVersion(strings.TrimPrefix(id, "ed25519:")) {
		return SigningKey{}, fmt.Errorf("key ID %q: want ed25519:<[a-zA-Z0-9_]+>", id)
	}
	return SigningKey{ID: id, Private: ed25519.NewKeyFromSeed(seed)}, nil
}

// ParseSynapseKey parses a Synapse signing key file: one key per line,
// "ed25519 <version> <base64 seed>", the seed in padded or unpadded standard
// base64. Blank lines and lines starting with '#' are ignored. It fails when
// the file holds no key, a line is malformed, or a key ID repeats.
func ParseSynapseKey(data []byte) ([]SigningKey, error) {
	keys, err := parseSynapse(data)
	if err != nil {
		return nil, err
	}
	if len(keys) == 0 {
		return nil, errors.New("parsing synapse signing key: no keys found")
	}
	return keys, nil
}

// parseSynapse is ParseSynapseKey but accepts a file without keys.
func parseSynapse(data []byte) ([]SigningKey, error) {
	var keys []SigningKey
	seen := map[string]bool{}
	for n, line := range strings.Split(string(data), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Fields(line)
		if len(f) != 3 {
			return nil, fmt.Errorf("parsing synapse signing key: line %d: want \"ed25519 <version> <seed>\"", n+1)
		}
		if f[0] != "ed25519" {
			return nil, fmt.Errorf("parsing synapse signing key: line %d: unsupported algorithm %q", n+1, f[0])
		}
		seed, err := decodeBase64(f[2])
		if err != nil {
			return nil, fmt.Errorf("parsing synapse signing key: line %d: decoding seed: %w", n+1, err)
		}
		k, err := newSigningKey("ed25519:"+f[1], seed)
		if err != nil {
			return nil, fmt.Errorf("parsing synapse signing key: line %d: %w", n+1, err)
		}
		if seen[k.ID] {
			return nil, fmt.Errorf("parsing synapse signing key: line %d: duplicate key %s", n+1, k.ID)
		}
		seen[k.ID] = true
		keys = append(keys, k)
	}
	return keys, nil
}

// ParseDendriteKey parses a Dendrite-style PEM signing key file: blocks of
// type "MATRIX PRIVATE KEY" with a "Key-ID: ed25519:xyz" header and the
// 32-byte seed as body. Blocks of other types are skipped; non-PEM data after
// the last block, a missing Key-ID, a wrong seed size or a repeated key ID
// are errors, and so is a file without keys.
func ParseDendriteKey(data []byte) ([]SigningKey, error) {
	var keys []SigningKey
	seen := map[string]bool{}
	rest := data
	for {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		if block.Type != dendritePEMType {
			continue
		}
		id := block.Headers[dendriteKeyIDHeader]
		if id == "" {
			return nil, fmt.Errorf("parsing dendrite signing key: block %d: missing %s header", len(keys)+1, dendriteKeyIDHeader)
		}
		k, err := newSigningKey(id, block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("parsing dendrite signing key: %w", err)
		}
		if seen[k.ID] {
			return nil, fmt.Errorf("parsing dendrite signing key: duplicate key %s", k.ID)
		}
		seen[k.ID] = true
		keys = append(keys, k)
	}
	if len(bytes.TrimSpace(rest)) != 0 {
		return nil, errors.New("parsing dendrite signing key: trailing data that is not a PEM block")
	}
	if len(keys) == 0 {
		return nil, fmt.Errorf("parsing dendrite signing key: no %q blocks found", dendritePEMType)
	}
	return keys, nil
}

// keyFileFormat is the on-disk format of a signing key file.
type keyFileFormat int

const (
	formatSynapse keyFileFormat = iota
	formatDendrite
)

// detectFormat tells PEM (Dendrite) files from Synapse's line format.
func detectFormat(data []byte) keyFileFormat {
	if bytes.Contains(data, []byte("-----BEGIN ")) {
		return formatDendrite
	}
	return formatSynapse
}

// LoadSigningKeys reads a signing key file in Synapse or Dendrite (PEM)
// format, detected from its content.
func LoadSigningKeys(path string) ([]SigningKey, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading signing key file: %w", err)
	}
	var keys []SigningKey
	if detectFormat(data) == formatDendrite {
		keys, err = ParseDendriteKey(data)
	} else {
		keys, err = ParseSynapseKey(data)
	}
	if err != nil {
		return nil, fmt.Errorf("loading %s: %w", path, err)
	}
	return keys, nil
}

const alnum = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"

// GenerateSigningKey creates a new ed25519 key from rand (use crypto/rand's
// Reader) with a Synapse-style ID: "ed25519:a_" followed by four random
// letters or digits.
func GenerateSigningKey(rand io.Reader) (SigningKey, error) {
	seed := make([]byte, ed25519.SeedSize)
	if _, err := io.ReadFull(rand, seed); err != nil {
		return SigningKey{}, fmt.Errorf("generating signing key seed: %w", err)
	}
	suffix := make([]byte, 0, 4)
	var buf [16]byte
	for len(suffix) < 4 {
		if _, err := io.ReadFull(rand, buf[:]); err != nil {
			return SigningKey{}, fmt.Errorf("generating signing key ID: %w", err)
		}
		for _, c := range buf {
			// Reject bytes ≥ 248 (= 4×62) to avoid modulo bias.
			if c < 4*byte(len(alnum)) && len(suffix) < 4 {
				suffix = append(suffix, alnum[int(c)%len(alnum)])
			}
		}
	}
	return SigningKey{ID: "ed25519:a_" + string(suffix), Private: ed25519.NewKeyFromSeed(seed)}, nil
}

// FormatSynapse renders keys in Synapse's signing key file format, one
// "ed25519 <version> <unpadded base64 seed>" line per key.
func FormatSynapse(keys ...SigningKey) []byte {
	var b bytes.Buffer
	for _, k := range keys {
		b.WriteString("ed25519 ")
		b.WriteString(k.version())
		b.WriteByte(' ')
		b.WriteString(base64.RawStdEncoding.EncodeToString(k.seed()))
		b.WriteByte('\n')
	}
	return b.Bytes()
}

// FormatDendrite renders keys as Dendrite-style PEM blocks of type
// "MATRIX PRIVATE KEY" with a Key-ID header.
func FormatDendrite(keys ...SigningKey) []byte {
	var b bytes.Buffer
	for _, k := range keys {
		// pem.Encode only fails on invalid headers, which a plain Key-ID
		// never is, and writes to a bytes.Buffer never fail.
		_ = pem.Encode(&b, &pem.Block{
			Type:    dendritePEMType,
			Headers: map[string]string{dendriteKeyIDHeader: k.ID},
			Bytes:   k.seed(),
		})
	}
	return b.Bytes()
}

// MergeKeyFile adds key to the existing signing key file at path, keeping
// the file's format (Synapse lines or Dendrite PEM). It is idempotent: when
// a key with the same ID and seed is already present it changes nothing and
// returns false; the same ID with a different seed is an error. Before
// changing the file it writes a copy of the old content to
// path+".bak-<unix time>", then replaces the file atomically (temporary file
// in the same directory, fsync, rename), keeping its permission bits. A
// symbolic link at path is followed and its target replaced. File ownership
// is not preserved, and concurrent writers are not coordinated.
func MergeKeyFile(path string, key SigningKey) (changed bool, err error) {
	if len(key.Private) != ed25519.PrivateKeySize {
		return false, fmt.Errorf("merging signing key: private key of %s is %d bytes, want %d", key.ID, len(key.Private), ed25519.PrivateKeySize)
	}
	if _, err := newSigningKey(key.ID, key.seed()); err != nil {
		return false, fmt.Errorf("merging signing key: %w", err)
	}
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		return false, fmt.Errorf("merging signing key: resolving %s: %w", path, err)
	}
	st, err := os.Stat(real)
	if err != nil {
		return false, fmt.Errorf("merging signing key: %w", err)
	}
	if !st.Mode().IsRegular() {
		return false, fmt.Errorf("merging signing key: %s is not a regular file", real)
	}
	old, err := os.ReadFile(real)
	if err != nil {
		return false, fmt.Errorf("merging signing key: reading key file: %w", err)
	}
	format := detectFormat(old)
	var existing []SigningKey
	if format == formatDendrite {
		existing, err = ParseDendriteKey(old)
	} else {
		existing, err = parseSynapse(old)
	}
	if err != nil {
		return false, fmt.Errorf("merging signing key: %w", err)
	}
	for _, k := range existing {
		if k.ID != key.ID {
			continue
		}
		if bytes.Equal(k.seed(), key.seed()) {
			return false, nil
		}
		return false, fmt.Errorf("merging signing key: %s already holds key %s with a different seed", path, key.ID)
	}

	next := append([]byte(nil), old...)
	if len(next) > 0 && next[len(next)-1] != '\n' {
		next = append(next, '\n')
	}
	if format == formatDendrite {
		next = append(next, FormatDendrite(key)...)
	} else {
		next = append(next, FormatSynapse(key)...)
	}

	mode := st.Mode().Perm()
	if _, err := writeBackup(real, old, mode); err != nil {
		return false, fmt.Errorf("merging signing key: %w", err)
	}
	if err := replaceFile(real, next, mode); err != nil {
		return false, fmt.Errorf("merging signing key: %w", err)
	}
	return true, nil
}

// writeBackup writes data to path+".bak-<unix time>" (with a numeric suffix
// if that name is taken) and returns the backup's name.
func writeBackup(path string, data []byte, mode fs.FileMode) (string, error) {
	base := path + ".bak-" + strconv.FormatInt(time.Now().Unix(), 10)
	name := base
	for i := 1; ; i++ {
		f, err := os.OpenFile(name, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
		if errors.Is(err, fs.ErrExist) && i < 100 {
			name = base + "." + strconv.Itoa(i)
			continue
		}
		if err != nil {
			return "", fmt.Errorf("creating backup: %w", err)
		}
		if _, err := f.Write(data); err != nil {
			f.Close()
			return "", fmt.Errorf("writing backup %s: %w", name, err)
		}
		if err := f.Sync(); err != nil {
			f.Close()
			return "", fmt.Errorf("syncing backup %s: %w", name, err)
		}
		if err := f.Close(); err != nil {
			return "", fmt.Errorf("closing backup %s: %w", name, err)
		}
		return name, nil
	}
}

// replaceFile atomically replaces path with data: a temporary file in the
// same directory is written, given mode, synced and renamed over path; the
// directory is synced afterwards (best effort).
func replaceFile(path string, data []byte, mode fs.FileMode) (err error) {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("creating temporary file: %w", err)
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if _, err := tmp.Write(data); err != nil {
		return fmt.Errorf("writing temporary file: %w", err)
	}
	if err := tmp.Chmod(mode); err != nil {
		return fmt.Errorf("setting mode of temporary file: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("syncing temporary file: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("closing temporary file: %w", err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("renaming temporary file: %w", err)
	}
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return nil
}
