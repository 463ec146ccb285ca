// Package filestore is a storage.BlobStore that keeps each blob as one file on
// a local file system, named by the lowercase hex SHA-256 of its content.
//
// Layout under the root directory:
//
//	blobs/ab/cd/abcd…   one file per blob, sharded by the first two byte pairs
//	tmp/                uploads in progress (same file system, so a rename
//	                    moves a finished upload into place atomically)
//
// A blob appears under its name only once it has been fsynced and renamed into
// place, and its directory fsynced, so a crash leaves either the whole blob or
// nothing (plus perhaps a temp file, which New removes once it is an hour old).
package filestore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// chunkSize is the size of the copy buffers: large enough that a big upload
// costs few system calls, small enough that many concurrent uploads stay cheap.
const chunkSize = 256 << 10

// staleTempAge is how old a temp file must be before New treats it as left
// over by a crash and removes it.
const staleTempAge = time.Hour

// tempPattern names upload temp files (os.CreateTemp pattern).
const tempPattern = "put-*"

// Store is a content-addressed blob store on a local file system. It is safe
// for concurrent use. Create it with New.
type Store struct {
	// root is the store's root directory.
	root string
	// blobDir is root/blobs, the top of the sharded blob tree.
	blobDir string
	// tmpDir is root/tmp, where uploads are written before being renamed.
	tmpDir string
	// bufPool holds *[]byte buffers of chunkSize bytes, so that an upload's
	// memory does not grow with the size of the body.
	bufPool sync.Pool
	// settling counts, by path, the blobs renamed into place and the shard
	// directories created whose covering directory sync has not finished
	// yet, so that an upload that finds one of them does not rely on it (and
	// answer) before it is durable.
	settleMu sync.Mutex
	settling map[string]int
	// syncFile fsyncs a file or directory: (*os.File).Sync, replaced by
	// tests that watch the order of syncs.
	syncFile func(*os.File) error
}

var _ storage.BlobStore = (*Store)(nil)

// New opens (creating it if needed) a file blob store rooted at root. It
// creates root/blobs and root/tmp and removes temp files in root/tmp older
// than an hour, which a crash during an upload may have left behind.
func New(root string) (*Store, error) {
	if root == "" {
		return nil, errors.New("opening file store: empty root directory")
	}
	abs, err := filepath.Abs(root)
	if err != nil {
		return nil, fmt.Errorf("opening file store: resolving root: %w", err)
	}
	s := &Store{
		root:    abs,
		blobDir: filepath.Join(abs, "blobs"),
		tmpDir:  filepath.Join(abs, "tmp"),
	}
	s.bufPool.New = func() any {
		b := make([]byte, chunkSize)
		return &b
	}
	for _, dir := range []string{s.blobDir, s.tmpDir} {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, fmt.Errorf("opening file store: creating directory: %w", err)
		}
	}
	if err := s.removeStaleTemps(time.Now().Add(-staleTempAge)); err != nil {
		return nil, fmt.Errorf("opening file store: %w", err)
	}
	s.settling = make(map[string]int)
	s.syncFile = (*os.File).Sync
	return s, nil
}

// settle marks the path h (a blob or a shard directory) as created but not
// yet known durable; the returned function ends that.
func (s *Store) settle(h string) func() {
	s.settleMu.Lock()
	s.settling[h]++
	s.settleMu.Unlock()
	return func() {
		s.settleMu.Lock()
		if s.settling[h]--; s.settling[h] == 0 {
			delete(s.settling, h)
		}
		s.settleMu.Unlock()
	}
}

// isSettling reports whether the path h was created by an upload whose
// covering sync has not finished.
func (s *Store) isSettling(h string) bool {
	s.settleMu.Lock()
	defer s.settleMu.Unlock()
	return s.settling[h] > 0
}

// makeDurable makes the existing blob h durable (its file and its directory
// entry): an upload that found h in place while another upload was still
// syncing it must not answer before that sync is done.
func (s *Store) makeDurable(h string) error {
	outer, inner := s.shardDirs(h)
	if err := s.ensureShard(outer, inner); err != nil {
		return err
	}
	f, err := os.Open(s.blobPath(h))
	if err != nil {
		return fmt.Errorf("opening blob to sync: %w", err)
	}
	err = s.syncFile(f)
	f.Close()
	if err != nil {
		return fmt.Errorf("syncing blob: %w", err)
	}
	return s.syncDir(inner)
}

// Root returns the absolute root directory of the store.
func (s *Store) Root() string { return s.root }

// removeStaleTemps removes regular files in the temp directory last modified
// before cutoff.
func (s *Store) removeStaleTemps(cutoff time.Time) error {
	entries, err := os.ReadDir(s.tmpDir)
	if err != nil {
		return fmt.Errorf("listing temp directory: %w", err)
	}
	for _, e := range entries {
		if !e.Type().IsRegular() {
			continue
		}
		info, err := e.Info()
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return fmt.Errorf("inspecting temp file: %w", err)
		}
		if info.ModTime().Before(cutoff) {
			err := os.Remove(filepath.Join(s.tmpDir, e.Name()))
			if err != nil && !errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("removing stale temp file: %w", err)
			}
		}
	}
	return nil
}

// shardDirs returns the two shard directories of a valid hash.
func (s *Store) shardDirs(h string) (outer, inner string) {
	outer = filepath.Join(s.blobDir, h[0:2])
	return outer, filepath.Join(outer, h[2:4])
}

// blobPath returns the path of the blob with a valid hash.
func (s *Store) blobPath(h string) string {
	_, inner := s.shardDirs(h)
	return filepath.Join(inner, h)
}

// checkedPath validates h and returns its blob path, or an error wrapping
// storage.ErrNotFound for a malformed hash (which can never name a blob).
func (s *Store) checkedPath(h string) (string, error) {
	if !storage.ValidSHA256(h) {
		return "", fmt.Errorf("invalid blob hash %q: %w", truncate(h, 80), storage.ErrNotFound)
	}
	return s.blobPath(h), nil
}

// truncate shortens s for inclusion in an error message.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

// getBuf takes a chunkSize buffer from the pool.
func (s *Store) getBuf() *[]byte { return s.bufPool.Get().(*[]byte) }

// putBuf returns a buffer to the pool.
func (s *Store) putBuf(b *[]byte) { s.bufPool.Put(b) }

// Put streams r into the store while hashing it; see storage.BlobStore.
//
// Without a candidate the body is written to a temp file as it arrives. With
// a candidate (opts.Candidate naming a stored blob, of the expected size when
// that is known) the body is compared with the candidate chunk by chunk and
// nothing is written while they agree; at the first chunk that differs, or
// when the candidate ends early, a temp file is started with the candidate's
// matched prefix and the rest of the body follows. A body equal to the
// candidate therefore costs hashing and a (usually page-cached) read only.
// A candidate that is malformed, missing or unreadable is ignored.
//
// When the final hash is already stored, the temp file (if any) is dropped
// without being synced and PutResult.Existed is true. Otherwise the temp file
// is fsynced, renamed into place and its directory fsynced. Any error,
// including cancellation of ctx (checked between chunks), removes the temp
// file.
func (s *Store) Put(ctx context.Context, r io.Reader, opts storage.PutOptions) (storage.PutResult, error) {
	if err := ctx.Err(); err != nil {
		return storage.PutResult{}, fmt.Errorf("storing blob: %w", err)
	}
	if opts.MaxSize > 0 && opts.ExpectedSize > opts.MaxSize {
		return storage.PutResult{}, fmt.Errorf("storing blob: announced length %d over limit %d: %w",
			opts.ExpectedSize, opts.MaxSize, storage.ErrTooLarge)
	}

	p := &put{s: s, opts: opts, digest: storage.NewDigest(opts)}
	defer func() {
		if !p.success {
			p.discard()
		}
		p.releaseCandidate()
	}()

	if storage.ValidSHA256(opts.Candidate) {
		p.openCandidate(opts.Candidate)
	}
	if p.cand == nil {
		if err := p.startTemp(); err != nil {
			return storage.PutResult{}, fmt.Errorf("storing blob: %w", err)
		}
	}

	bufp := s.getBuf()
	defer s.putBuf(bufp)
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
	s    *Store
	opts storage.PutOptions
	// digest hashes the body and checks its length.
	digest *storage.Digest
	// tmp is the temp file being written; nil while comparing with cand.
	tmp *os.File
	// cand is the open candidate blob while the body still matches it; nil
	// when there is no candidate or the body diverged from it.
	cand *os.File
	// candBuf is the pooled buffer that candidate chunks are read into.
	candBuf *[]byte
	// existed is set by finish when the blob was already stored.
	existed bool
	// success is set once the blob is in place (or known to exist); until
	// then the deferred cleanup removes the temp file.
	success bool
}

// openCandidate opens the candidate blob for comparison. The candidate is
// only a hint: one that is missing, is not a readable regular file, or whose
// size differs from the announced length is ignored and the body is written
// as usual.
func (p *put) openCandidate(h string) {
	f, err := os.Open(p.s.blobPath(h))
	if err != nil {
		return
	}
	info, err := f.Stat()
	if err != nil || !info.Mode().IsRegular() ||
		(p.opts.ExpectedSize >= 0 && info.Size() != p.opts.ExpectedSize) {
		f.Close()
		return
	}
	p.cand = f
	p.candBuf = p.s.getBuf()
}

// releaseCandidate closes the candidate and returns its buffer, if any.
func (p *put) releaseCandidate() {
	if p.cand != nil {
		p.cand.Close()
		p.cand = nil
	}
	if p.candBuf != nil {
		p.s.putBuf(p.candBuf)
		p.candBuf = nil
	}
}

// startTemp creates the temp file.
func (p *put) startTemp() error {
	f, err := os.CreateTemp(p.s.tmpDir, tempPattern)
	if err != nil {
		return fmt.Errorf("creating temp file: %w", err)
	}
	p.tmp = f
	return nil
}

// discard closes and removes the temp file, if any.
func (p *put) discard() {
	if p.tmp != nil {
		name := p.tmp.Name()
		p.tmp.Close()
		os.Remove(name)
		p.tmp = nil
	}
}

// consume hashes one chunk of the body, enforces the size limits, and either
// compares it with the candidate or writes it to the temp file.
func (p *put) consume(chunk []byte) error {
	offset, err := p.digest.Add(chunk)
	if err != nil {
		return err
	}

	if p.cand != nil {
		cbuf := (*p.candBuf)[:len(chunk)]
		n, err := io.ReadFull(p.cand, cbuf)
		if err != nil && err != io.EOF && err != io.ErrUnexpectedEOF {
			return fmt.Errorf("reading candidate blob: %w", err)
		}
		if n == len(chunk) && bytes.Equal(chunk, cbuf) {
			return nil
		}
		// The body diverges from the candidate within this chunk (or the
		// candidate ends in it): keep the matched prefix, then write on.
		if err := p.divergeAt(offset); err != nil {
			return err
		}
	}
	if _, err := p.tmp.Write(chunk); err != nil {
		return fmt.Errorf("writing temp file: %w", err)
	}
	return nil
}

// divergeAt stops comparing with the candidate: it starts the temp file with
// the candidate's first n bytes, which are known to equal the body's, and
// releases the candidate.
func (p *put) divergeAt(n int64) error {
	if err := p.startTemp(); err != nil {
		return err
	}
	if n > 0 {
		if _, err := p.cand.Seek(0, io.SeekStart); err != nil {
			return fmt.Errorf("rewinding candidate blob: %w", err)
		}
		// *os.File to *os.File through a LimitedReader lets the kernel copy
		// (copy_file_range) without the bytes passing through user space.
		copied, err := io.Copy(p.tmp, io.LimitReader(p.cand, n))
		if err != nil {
			return fmt.Errorf("copying matched candidate prefix: %w", err)
		}
		if copied != n {
			return fmt.Errorf("copying matched candidate prefix: candidate shrank to %d bytes, need %d", copied, n)
		}
	}
	p.releaseCandidate()
	return nil
}

// finish moves the body into place under sum, or notes that it exists.
func (p *put) finish(sum string) error {
	final := p.s.blobPath(sum)
	if _, err := os.Lstat(final); err == nil {
		p.existed = true
		p.discard()
		if p.s.isSettling(final) {
			return p.s.makeDurable(sum)
		}
		return nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("checking for existing blob: %w", err)
	}

	if p.cand != nil {
		// The body equals the candidate's first p.digest.Size() bytes, but no blob is
		// stored under its hash: the candidate is longer than the body (or
		// was removed meanwhile). Materialise the body from the candidate.
		if err := p.divergeAt(p.digest.Size()); err != nil {
			return err
		}
	}
	// The file's data and a missing shard directory (created and its
	// parent synced) are made durable side by side: both must be before
	// the rename, neither needs the other.
	outer, inner := p.s.shardDirs(sum)
	var shardErr chan error
	if !p.s.shardReady(inner) {
		shardErr = make(chan error, 1)
		go func() { shardErr <- p.s.ensureShard(outer, inner) }()
	}
	err := p.s.syncFile(p.tmp)
	if shardErr != nil {
		err = errors.Join(err, <-shardErr)
	}
	if err != nil {
		return fmt.Errorf("syncing blob before moving it into place: %w", err)
	}
	if err := p.tmp.Close(); err != nil {
		return fmt.Errorf("closing temp file: %w", err)
	}
	// Registered before the rename: an upload of the same bytes that finds
	// the blob from now on syncs it too before relying on it.
	defer p.s.settle(final)()
	if err := os.Rename(p.tmp.Name(), final); err != nil {
		return fmt.Errorf("moving blob into place: %w", err)
	}
	// The file is closed and renamed: nothing is left to clean up, and a
	// failure below must not remove the finished blob.
	p.tmp = nil
	return p.s.syncDir(inner)
}

// shardReady reports whether the shard directory inner exists and is
// durable (not just created by an upload still syncing its parent).
func (s *Store) shardReady(inner string) bool {
	info, err := os.Stat(inner)
	return err == nil && info.IsDir() && !s.isSettling(inner)
}

// ensureShard creates the shard directories of a blob if they are missing,
// syncing each parent whose entries changed so the new directory survives a
// crash. A directory that exists but was created by an upload still syncing
// its parent has its parent synced again: it is not relied on before it is
// durable.
func (s *Store) ensureShard(outer, inner string) error {
	if s.shardReady(inner) {
		return nil
	}
	for _, d := range []struct{ dir, parent string }{{outer, s.blobDir}, {inner, outer}} {
		done := s.settle(d.dir)
		err := os.Mkdir(d.dir, 0o755)
		if err != nil && !errors.Is(err, fs.ErrExist) {
			done()
			return fmt.Errorf("creating shard directory: %w", err)
		}
		if created := err == nil; created || s.settlingOthers(d.dir) {
			err = s.syncDir(d.parent)
		} else {
			err = nil
		}
		done()
		if err != nil {
			return err
		}
	}
	return nil
}

// settlingOthers reports whether the path h is being created by another
// upload too (the caller's own settle counts once).
func (s *Store) settlingOthers(h string) bool {
	s.settleMu.Lock()
	defer s.settleMu.Unlock()
	return s.settling[h] > 1
}

// syncDir fsyncs a directory, making renames and creations in it durable.
func (s *Store) syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("opening directory for sync: %w", err)
	}
	err = s.syncFile(d)
	cerr := d.Close()
	if err != nil {
		return fmt.Errorf("syncing directory: %w", err)
	}
	if cerr != nil {
		return fmt.Errorf("closing directory: %w", cerr)
	}
	return nil
}

// Open returns the blob with the given hash. Blob.Content is the *os.File
// itself, so that copying it to a network connection can use sendfile. A
// missing blob or a malformed hash gives an error wrapping
// storage.ErrNotFound.
func (s *Store) Open(ctx context.Context, sha256 string) (storage.Blob, error) {
	if err := ctx.Err(); err != nil {
		return storage.Blob{}, fmt.Errorf("opening blob: %w", err)
	}
	path, err := s.checkedPath(sha256)
	if err != nil {
		return storage.Blob{}, fmt.Errorf("opening blob: %w", err)
	}
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return storage.Blob{}, fmt.Errorf("opening blob %s: %w", sha256, storage.ErrNotFound)
	}
	if err != nil {
		return storage.Blob{}, fmt.Errorf("opening blob: %w", err)
	}
	info, err := f.Stat()
	if err != nil {
		f.Close()
		return storage.Blob{}, fmt.Errorf("opening blob: inspecting file: %w", err)
	}
	return storage.Blob{Content: f, Size: info.Size()}, nil
}

// Stat returns the size of the blob with the given hash; a missing blob or a
// malformed hash gives an error wrapping storage.ErrNotFound.
func (s *Store) Stat(ctx context.Context, sha256 string) (int64, error) {
	if err := ctx.Err(); err != nil {
		return 0, fmt.Errorf("inspecting blob: %w", err)
	}
	path, err := s.checkedPath(sha256)
	if err != nil {
		return 0, fmt.Errorf("inspecting blob: %w", err)
	}
	info, err := os.Stat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return 0, fmt.Errorf("inspecting blob %s: %w", sha256, storage.ErrNotFound)
	}
	if err != nil {
		return 0, fmt.Errorf("inspecting blob: %w", err)
	}
	return info.Size(), nil
}

// Delete removes the blob with the given hash. Deleting a missing blob is not
// an error; a malformed hash, which can never name a blob, gives an error
// wrapping storage.ErrNotFound so that callers notice the bad input. Readers
// that already opened the blob keep reading it until they close it.
func (s *Store) Delete(ctx context.Context, sha256 string) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("deleting blob: %w", err)
	}
	path, err := s.checkedPath(sha256)
	if err != nil {
		return fmt.Errorf("deleting blob: %w", err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("deleting blob: %w", err)
	}
	return nil
}

// Close releases the store's resources. The file store holds none between
// calls, so Close only exists to satisfy storage.BlobStore.
func (s *Store) Close() error { return nil }

// String describes the store for logs.
func (s *Store) String() string {
	return "file blob store at " + s.root
}

// List calls fn for every blob file under root/blobs (temp files under
// root/tmp are not blobs), walking the shard directories in lexical order.
// Files whose name is not a blob hash are skipped.
func (s *Store) List(ctx context.Context, fn func(storage.StoredBlob) error) error {
	err := filepath.WalkDir(s.blobDir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				// Removed during the walk (an emptied shard, a deleted blob).
				return nil
			}
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if d.IsDir() || !d.Type().IsRegular() || !storage.ValidSHA256(d.Name()) {
			return nil
		}
		info, err := d.Info()
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		return fn(storage.StoredBlob{SHA256: d.Name(), Size: info.Size(), ModTime: info.ModTime()})
	})
	if err != nil {
		return fmt.Errorf("listing blobs: %w", err)
	}
	return nil
}

var _ storage.Lister = (*Store)(nil)
