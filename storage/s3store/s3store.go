// Package s3store is a storage.BlobStore that keeps each blob as one object in
// an S3-compatible bucket, named by the lowercase hex SHA-256 of its content.
//
// Layout under the configured key prefix:
//
//	blobs/ab/cd/abcd…   one object per blob, sharded like the file store
//	tmp/<random>        large uploads in progress (multipart uploads and
//	                    their completed objects before the copy into place)
//
// A body that fits in one part is buffered, hashed and written straight to
// its final key with PutObject. A larger body is streamed as a multipart
// upload to a tmp key (at most two parts in memory), completed, copied
// server-side to its final key and the tmp object deleted. Any failure aborts
// the multipart upload and deletes the tmp object; when S3 is unreachable
// that clean-up is retried in the background until it succeeds, the retry
// window ends or the store is closed. A crash of the process itself can still
// leave tmp objects or multipart uploads behind: give the bucket a lifecycle
// rule that expires "<prefix>tmp/" objects and aborts incomplete multipart
// uploads after a day.
//
// Errors caused by S3 being unreachable, answering 5xx or timing out wrap
// ErrUnavailable, so that callers can answer 502/503 rather than 500.
package s3store

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sync/semaphore"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/aws/retry"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	smithyhttp "github.com/aws/smithy-go/transport/http"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// ErrUnavailable reports that S3 could not be reached, answered with a server
// error (5xx) or timed out. It wraps storage.ErrUnavailable, so callers may
// test either with errors.Is; they usually answer 502 or 503.
var ErrUnavailable = fmt.Errorf("s3: %w", storage.ErrUnavailable)

// Defaults and limits.
const (
	// DefaultRegion is the region used when Config.Region is empty.
	DefaultRegion = "us-east-1"
	// DefaultPartSize is the multipart part size used when Config.PartSize is
	// 0, and the largest body written with a single PutObject.
	DefaultPartSize = 8 << 20
	// MinPartSize is the smallest part size S3 accepts for all but the last
	// part of a multipart upload.
	MinPartSize = 5 << 20
	// DefaultMaxRetries is the number of retries used when Config.MaxRetries
	// is 0.
	DefaultMaxRetries = 3
	// DefaultRetryMaxBackoff is the longest wait between two attempts when
	// Config.RetryMaxBackoff is 0.
	DefaultRetryMaxBackoff = time.Second
	// DefaultCleanupRetryWindow is how long a failed clean-up is retried in
	// the background when Config.CleanupRetryWindow is 0.
	DefaultCleanupRetryWindow = 15 * time.Minute
	// DefaultReadIdleTimeout is Config.ReadIdleTimeout when it is 0.
	DefaultReadIdleTimeout = 30 * time.Second
	// DefaultParallelParts is Config.ParallelParts when it is 0.
	DefaultParallelParts = 4
	// DefaultParallelPartSize is Config.ParallelPartSize when it is 0.
	DefaultParallelPartSize = 8 << 20
	// MinParallelPartSize is the smallest Config.ParallelPartSize.
	MinParallelPartSize = 1 << 20

	// maxParts is the largest number of parts of one multipart upload.
	maxParts = 10000
	// maxCopySize is the largest object CopyObject copies in one request;
	// larger ones are copied with UploadPartCopy.
	maxCopySize = 5 << 30
	// copyPartSize is the part size of a multipart copy.
	copyPartSize = 512 << 20
	// chunkSize is the size of the body read buffers, of the WriterTo
	// buffer of an object reader and of the transport's write buffer.
	chunkSize = 256 << 10
	// transportReadBufSize is the transport's read buffer. It is small on
	// purpose: bufio.Reader hands a Read at least its buffer's size straight
	// to the socket, but fills its buffer and copies out of it for smaller
	// ones. With a 256 KiB buffer, the io.ReadFull of a download's 256 KiB
	// buffers (whose later reads ask for the rest) went through that copy:
	// 9% of Caddy's CPU in a 256 MiB download. With 4 KiB, only the
	// response headers and the last few bytes of a buffer are copied.
	transportReadBufSize = 4 << 10
	// cleanupTimeout bounds one attempt to abort an upload or delete a tmp
	// object.
	cleanupTimeout = 30 * time.Second
)

// Observer receives one call per S3 operation, for metrics. Implementations
// must be safe for concurrent use and return quickly.
type Observer interface {
	// ObserveS3 reports one operation: its S3 name (PutObject, GetObject,
	// HeadObject, UploadPart, CopyObject, DeleteObject, …), how long it took
	// (for GetObject: until its body was closed), how many body bytes it sent
	// or received, and its error (nil on success).
	ObserveS3(op string, dur time.Duration, bytes int64, err error)
}

// Config configures a Store.
type Config struct {
	// Endpoint is the base URL of the S3 service, e.g.
	// "http://127.0.0.1:9000" for a local server. Empty (the default) means
	// AWS S3 in Region.
	Endpoint string
	// Region is the bucket's region. Default "us-east-1".
	Region string
	// Bucket is the bucket holding the blobs. Required.
	Bucket string
	// Prefix is prepended to every key, e.g. "media/". Default "" (keys start
	// at the bucket root).
	Prefix string
	// PathStyle addresses the bucket as endpoint/bucket/key instead of
	// bucket.endpoint/key. Most self-hosted S3 servers need it. Default false.
	PathStyle bool
	// AccessKeyID is the access key to sign requests with. Required (with
	// SecretAccessKey) unless UseDefaultCredentials is set.
	AccessKeyID string
	// SecretAccessKey is the secret key matching AccessKeyID.
	SecretAccessKey string
	// SessionToken is the session token of temporary credentials. Default
	// none.
	SessionToken string
	// UseDefaultCredentials takes the credentials from the environment
	// variables AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN
	// when AccessKeyID is empty. Shared config files, SSO and instance roles
	// are not consulted. Default false: keys must be given explicitly.
	UseDefaultCredentials bool
	// StorageClass is the storage class of new objects, e.g. "STANDARD_IA".
	// Default "" (the bucket's default).
	StorageClass string
	// MaxBufferBytes caps the memory that all uploads of this store together
	// hold in part buffers. An upload needs one buffer (the size of its body
	// when it is known and at most PartSize, else PartSize) to make progress
	// and waits for it when the budget is used up; a second one (reading the
	// next part while one uploads) is taken only when free. Parallel reads
	// (ParallelParts) take their read-ahead buffers from it too, only when
	// free and up to half of it together. Default 6*PartSize (48 MiB with
	// the default part size); at least PartSize.
	MaxBufferBytes int64
	// PartSize is the multipart part size in bytes; bodies up to this size are
	// written with one PutObject. Each upload holds at most two parts in
	// memory. Default 8 MiB, minimum 5 MiB. A body may have at most 10000
	// parts.
	PartSize int64
	// MaxRetries is how many times a failed request is retried by the SDK's
	// standard retryer (transient network errors, 5xx, throttling). Default 3;
	// negative disables retries.
	MaxRetries int
	// RetryMaxBackoff is the longest wait between two attempts. Default 1s.
	RetryMaxBackoff time.Duration
	// CleanupRetryWindow is how long aborting a failed multipart upload and
	// deleting its tmp object is retried in the background while S3 is
	// unreachable. Default 15 minutes.
	CleanupRetryWindow time.Duration
	// ReadIdleTimeout is how long a GetObject may go without receiving
	// anything (its response headers, then each read of its body) before it
	// fails with an error wrapping ErrUnavailable, so that a stalled S3
	// connection cannot hold a download, a thumbnail source or a migration
	// forever. Default 30s; negative disables it.
	ReadIdleTimeout time.Duration
	// ParallelParts is how many ranged GetObjects a large read keeps in
	// flight: a read (OpenRange) longer than ParallelPartSize is fetched as
	// consecutive parts of that size, the part being read streaming
	// straight from S3 and up to ParallelParts-1 parts after it read ahead
	// into buffers of ParallelPartSize bytes. Those buffers come from the
	// MaxBufferBytes budget, only when it has room at once (a read never
	// waits for budget: it fetches fewer parts ahead, down to one GetObject
	// for the rest of the range), and reads together hold at most half of
	// it, so uploads always keep the other half. Default 4; 1 or negative
	// disables parallel reads (one GetObject per read).
	ParallelParts int
	// ParallelPartSize is the part size of parallel reads, in bytes.
	// Default 8 MiB, minimum 1 MiB.
	ParallelPartSize int64
	// HTTPClient sends the requests. Default: a client whose transport has
	// a 256 KiB write buffer, a 4 KiB read buffer (larger reads go straight
	// to the socket), keep-alives and up to 64 idle connections per host.
	// Not part of the settings encoded as JSON (it is runtime state).
	HTTPClient *http.Client `json:"-"`
	// Observer, when set, is told about every S3 operation. Default none.
	// Not encoded as JSON either.
	Observer Observer `json:"-"`
}

// Store is a content-addressed blob store in an S3 bucket. It is safe for
// concurrent use. Create it with New.
type Store struct {
	client  *s3.Client
	presign *s3.PresignClient
	bucket  string
	prefix  string
	// storageClass is the storage class of new objects; empty for the default.
	storageClass string
	partSize     int64
	// copyLimit is the largest object copied with a single CopyObject.
	copyLimit int64
	observer  Observer
	// readIdle is Config.ReadIdleTimeout; 0 when disabled.
	readIdle time.Duration
	// parallel is Config.ParallelParts; at most 1 when parallel reads are
	// off. rangePartSize is Config.ParallelPartSize.
	parallel      int
	rangePartSize int64
	// rangePool holds *[]byte buffers of rangePartSize bytes; rangeHeld is
	// the part of budget that parallel reads hold, at most rangeMax.
	rangePool sync.Pool
	rangeHeld atomic.Int64
	rangeMax  int64
	// ownClient is the HTTP client New created, whose idle connections Close
	// closes; nil when the caller supplied one.
	ownClient *http.Client

	// partPool holds *[]byte buffers of partSize bytes; chunkPool holds
	// *[]byte buffers of chunkSize bytes.
	partPool, chunkPool sync.Pool
	// budget bounds the bytes held in part buffers (Config.MaxBufferBytes).
	budget *semaphore.Weighted

	// cleanupCtx is cancelled by Close to stop background clean-ups, which
	// cleanups tracks.
	cleanupCtx    context.Context
	cleanupCancel context.CancelFunc
	cleanups      sync.WaitGroup
	cleanupWindow time.Duration
}

var (
	_ storage.BlobStore   = (*Store)(nil)
	_ storage.RangeOpener = (*Store)(nil)
	_ storage.Presigner   = (*Store)(nil)
)

// New creates a store from cfg and checks that the bucket is reachable with
// HeadBucket. It does not read ~/.aws or any other shared configuration.
func New(ctx context.Context, cfg Config) (*Store, error) {
	if cfg.Bucket == "" {
		return nil, errors.New("opening s3 store: no bucket configured")
	}
	if cfg.Region == "" {
		cfg.Region = DefaultRegion
	}
	if cfg.PartSize == 0 {
		cfg.PartSize = DefaultPartSize
	}
	if cfg.PartSize < MinPartSize {
		return nil, fmt.Errorf("opening s3 store: part size %d below the minimum %d", cfg.PartSize, MinPartSize)
	}
	if cfg.PartSize > maxCopySize {
		return nil, fmt.Errorf("opening s3 store: part size %d over the maximum %d", cfg.PartSize, int64(maxCopySize))
	}
	if cfg.MaxBufferBytes == 0 {
		cfg.MaxBufferBytes = 6 * cfg.PartSize
	}
	if cfg.MaxBufferBytes < cfg.PartSize {
		return nil, fmt.Errorf("opening s3 store: max buffer bytes %d below the part size %d", cfg.MaxBufferBytes, cfg.PartSize)
	}
	if cfg.MaxRetries == 0 {
		cfg.MaxRetries = DefaultMaxRetries
	}
	if cfg.MaxRetries < 0 {
		cfg.MaxRetries = 0
	}
	if cfg.RetryMaxBackoff <= 0 {
		cfg.RetryMaxBackoff = DefaultRetryMaxBackoff
	}
	if cfg.CleanupRetryWindow <= 0 {
		cfg.CleanupRetryWindow = DefaultCleanupRetryWindow
	}
	switch {
	case cfg.ReadIdleTimeout == 0:
		cfg.ReadIdleTimeout = DefaultReadIdleTimeout
	case cfg.ReadIdleTimeout < 0:
		cfg.ReadIdleTimeout = 0
	}
	if cfg.ParallelParts == 0 {
		cfg.ParallelParts = DefaultParallelParts
	}
	if cfg.ParallelPartSize == 0 {
		cfg.ParallelPartSize = DefaultParallelPartSize
	}
	if cfg.ParallelPartSize < MinParallelPartSize {
		return nil, fmt.Errorf("opening s3 store: parallel part size %d below the minimum %d", cfg.ParallelPartSize, MinParallelPartSize)
	}
	creds, err := credentialsFor(cfg)
	if err != nil {
		return nil, fmt.Errorf("opening s3 store: %w", err)
	}

	s := &Store{
		bucket:        cfg.Bucket,
		prefix:        cfg.Prefix,
		storageClass:  cfg.StorageClass,
		partSize:      cfg.PartSize,
		copyLimit:     maxCopySize,
		observer:      cfg.Observer,
		readIdle:      cfg.ReadIdleTimeout,
		parallel:      cfg.ParallelParts,
		rangePartSize: cfg.ParallelPartSize,
		rangeMax:      cfg.MaxBufferBytes / 2,
		cleanupWindow: cfg.CleanupRetryWindow,
	}
	httpClient := cfg.HTTPClient
	if httpClient == nil {
		httpClient = defaultHTTPClient()
		s.ownClient = httpClient
	}
	awsCfg := aws.Config{
		Region:      cfg.Region,
		Credentials: creds,
		HTTPClient:  httpClient,
		Retryer: func() aws.Retryer {
			return retry.NewStandard(func(o *retry.StandardOptions) {
				o.MaxAttempts = cfg.MaxRetries + 1
				o.MaxBackoff = cfg.RetryMaxBackoff
			})
		},
		// Third-party S3 servers reject the CRC checksums that the SDK sends
		// and validates by default; only send them where an API requires one.
		RequestChecksumCalculation: aws.RequestChecksumCalculationWhenRequired,
		ResponseChecksumValidation: aws.ResponseChecksumValidationWhenRequired,
	}
	s.client = s3.NewFromConfig(awsCfg, func(o *s3.Options) {
		o.UsePathStyle = cfg.PathStyle
		if cfg.Endpoint != "" {
			o.BaseEndpoint = aws.String(cfg.Endpoint)
		}
	})
	s.presign = s3.NewPresignClient(s.client)
	s.budget = semaphore.NewWeighted(cfg.MaxBufferBytes)
	s.partPool.New = func() any {
		b := make([]byte, s.partSize)
		return &b
	}
	s.rangePool.New = func() any {
		b := make([]byte, s.rangePartSize)
		return &b
	}
	s.chunkPool.New = func() any {
		b := make([]byte, chunkSize)
		return &b
	}
	s.cleanupCtx, s.cleanupCancel = context.WithCancel(context.Background())

	start := time.Now()
	_, err = s.client.HeadBucket(ctx, &s3.HeadBucketInput{Bucket: aws.String(s.bucket)})
	s.observe("HeadBucket", start, 0, err)
	if err != nil {
		s.Close()
		return nil, fmt.Errorf("opening s3 store: checking bucket %q: %w", s.bucket, classify(err))
	}
	return s, nil
}

// credentialsFor returns the credentials provider for cfg.
func credentialsFor(cfg Config) (aws.CredentialsProvider, error) {
	key, secret, token := cfg.AccessKeyID, cfg.SecretAccessKey, cfg.SessionToken
	if key == "" && cfg.UseDefaultCredentials {
		key, secret, token = os.Getenv("AWS_ACCESS_KEY_ID"), os.Getenv("AWS_SECRET_ACCESS_KEY"), os.Getenv("AWS_SESSION_TOKEN")
		if key == "" || secret == "" {
			return nil, errors.New("no credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not set")
		}
	}
	if key == "" || secret == "" {
		return nil, errors.New("no credentials: access key ID and secret access key are required")
	}
	return credentials.NewStaticCredentialsProvider(key, secret, token), nil
}

// defaultHTTPClient returns the HTTP client used when Config.HTTPClient is nil.
func defaultHTTPClient() *http.Client {
	dialer := &net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}
	return &http.Client{Transport: &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           dialer.DialContext,
		MaxIdleConns:          256,
		MaxIdleConnsPerHost:   64,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ExpectContinueTimeout: time.Second,
		ResponseHeaderTimeout: 2 * time.Minute,
		WriteBufferSize:       chunkSize,
		ReadBufferSize:        transportReadBufSize,
	}}
}

// observe reports one operation to the observer, if any.
func (s *Store) observe(op string, start time.Time, n int64, err error) {
	if s.observer != nil {
		s.observer.ObserveS3(op, time.Since(start), n, err)
	}
}

// classify wraps err with ErrUnavailable when it shows that S3 is unreachable,
// failing (5xx) or too slow. A cancelled context is the caller's doing and is
// returned as is.
func classify(err error) error {
	if err == nil || errors.Is(err, ErrUnavailable) || !unavailable(err) {
		return err
	}
	return fmt.Errorf("%w: %w", ErrUnavailable, err)
}

// unavailable reports whether err means S3 could not serve the request.
func unavailable(err error) bool {
	if errors.Is(err, context.Canceled) {
		return false
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return true
	}
	// A request that could not be sent is reported inside a ResponseError
	// without a response (status 0), so check for it first.
	var send *smithyhttp.RequestSendError
	if errors.As(err, &send) {
		return true
	}
	if code := statusCode(err); code != 0 {
		return code >= 500
	}
	var netErr net.Error
	if errors.As(err, &netErr) {
		return true
	}
	return errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// statusCode returns the HTTP status of an S3 error response, or 0.
func statusCode(err error) int {
	var resp *smithyhttp.ResponseError
	if errors.As(err, &resp) {
		return resp.HTTPStatusCode()
	}
	return 0
}

// truncate shortens s for inclusion in an error message.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

// blobKey returns the object key of the blob with a valid hash.
func (s *Store) blobKey(h string) string {
	return s.prefix + "blobs/" + h[0:2] + "/" + h[2:4] + "/" + h
}

// checkedKey validates h and returns its object key, or an error wrapping
// storage.ErrNotFound for a malformed hash (which can never name a blob).
func (s *Store) checkedKey(h string) (string, error) {
	if !storage.ValidSHA256(h) {
		return "", fmt.Errorf("invalid blob hash %q: %w", truncate(h, 80), storage.ErrNotFound)
	}
	return s.blobKey(h), nil
}

// newTmpKey returns a fresh key for an upload in progress.
func (s *Store) newTmpKey() string {
	var b [16]byte
	rand.Read(b[:])
	return s.prefix + "tmp/" + hex.EncodeToString(b[:])
}

// copySource returns the x-amz-copy-source value naming key in the bucket.
func (s *Store) copySource(key string) string {
	segs := strings.Split(key, "/")
	for i, seg := range segs {
		segs[i] = url.PathEscape(seg)
	}
	return s.bucket + "/" + strings.Join(segs, "/")
}

// head returns the size of the object at key; ok is false when it does not
// exist.
func (s *Store) head(ctx context.Context, key string) (size int64, ok bool, err error) {
	start := time.Now()
	out, err := s.client.HeadObject(ctx, &s3.HeadObjectInput{Bucket: aws.String(s.bucket), Key: aws.String(key)})
	if statusCode(err) == http.StatusNotFound {
		s.observe("HeadObject", start, 0, nil)
		return 0, false, nil
	}
	s.observe("HeadObject", start, 0, err)
	if err != nil {
		return 0, false, classify(err)
	}
	return aws.ToInt64(out.ContentLength), true, nil
}

// Stat returns the size of the blob with the given hash; a missing blob or a
// malformed hash gives an error wrapping storage.ErrNotFound.
func (s *Store) Stat(ctx context.Context, sha256 string) (int64, error) {
	if err := ctx.Err(); err != nil {
		return 0, fmt.Errorf("inspecting blob: %w", err)
	}
	key, err := s.checkedKey(sha256)
	if err != nil {
		return 0, fmt.Errorf("inspecting blob: %w", err)
	}
	size, ok, err := s.head(ctx, key)
	if err != nil {
		return 0, fmt.Errorf("inspecting blob: %w", err)
	}
	if !ok {
		return 0, fmt.Errorf("inspecting blob %s: %w", sha256, storage.ErrNotFound)
	}
	return size, nil
}

// Delete removes the blob with the given hash. Deleting a missing blob is not
// an error; a malformed hash gives an error wrapping storage.ErrNotFound, as
// in the file store.
func (s *Store) Delete(ctx context.Context, sha256 string) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("deleting blob: %w", err)
	}
	key, err := s.checkedKey(sha256)
	if err != nil {
		return fmt.Errorf("deleting blob: %w", err)
	}
	if err := s.deleteObject(ctx, key); err != nil {
		return fmt.Errorf("deleting blob: %w", err)
	}
	return nil
}

// deleteObject deletes key; a missing object is not an error.
func (s *Store) deleteObject(ctx context.Context, key string) error {
	start := time.Now()
	_, err := s.client.DeleteObject(ctx, &s3.DeleteObjectInput{Bucket: aws.String(s.bucket), Key: aws.String(key)})
	if statusCode(err) == http.StatusNotFound {
		err = nil
	}
	s.observe("DeleteObject", start, 0, err)
	return classify(err)
}

// Close stops background clean-ups and closes idle connections. Blob readers
// still open keep working until closed.
func (s *Store) Close() error {
	s.cleanupCancel()
	s.cleanups.Wait()
	if s.ownClient != nil {
		s.ownClient.CloseIdleConnections()
	}
	return nil
}

// String describes the store for logs (never the credentials).
func (s *Store) String() string {
	return fmt.Sprintf("s3 blob store in bucket %s, prefix %q", s.bucket, s.prefix)
}

// getChunk takes a chunkSize buffer from the pool.
func (s *Store) getChunk() *[]byte { return s.chunkPool.Get().(*[]byte) }

// putChunk returns a chunkSize buffer to the pool.
func (s *Store) putChunk(b *[]byte) { s.chunkPool.Put(b) }

// getPart takes a partSize buffer from the pool.
func (s *Store) getPart() *[]byte { return s.partPool.Get().(*[]byte) }

// putPart returns a partSize buffer to the pool.
func (s *Store) putPart(b *[]byte) { s.partPool.Put(b) }
