package mmr

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
	"github.com/aws/smithy-go"
	smithyhttp "github.com/aws/smithy-go/transport/http"

	"github.com/caddy-matrix-media/caddy-matrix-media/importer"
)

// store reads the objects of one datastore. Implementations are safe for
// concurrent use.
type store interface {
	// open opens the object at location, relative to the datastore's
	// directory or bucket. A missing object gives an error wrapping
	// importer.ErrMissing.
	open(ctx context.Context, location string) (io.ReadCloser, error)
	// String describes the datastore for Name and error messages.
	String() string
	// close releases what the store holds open.
	close() error
}

// newStore builds the reader of one configured datastore. A datastore of a
// type this package cannot read gives a store whose every open fails, so
// that its media is reported item by item.
func newStore(d datastoreConfig) (store, error) {
	switch d.Type {
	case typeFile:
		return newFileStore(d), nil
	case typeS3:
		return newS3Store(d)
	default:
		return unsupportedStore{id: d.ID, typ: d.Type}, nil
	}
}

// fileStore reads a file datastore: location is a slash-separated path
// below opts.path (matrix-media-repo writes ab/cd/rest-of-name). Files are
// opened through an os.Root, so neither ".." nor a symbolic link can reach
// outside the directory. A relative opts.path is taken relative to the
// importer's working directory (matrix-media-repo took it relative to its
// own).
type fileStore struct {
	id   string
	path string
	// root is the datastore's directory; nil when it could not be opened,
	// and rootErr says why.
	root    *os.Root
	rootErr error
}

// newFileStore opens the datastore's directory. A directory that cannot be
// opened is not an error here: every read from it reports it.
func newFileStore(d datastoreConfig) *fileStore {
	s := &fileStore{id: d.ID, path: d.Options["path"]}
	s.root, s.rootErr = os.OpenRoot(s.path)
	return s
}

func (s *fileStore) String() string { return fmt.Sprintf("file datastore %q at %s", s.id, s.path) }

func (s *fileStore) open(_ context.Context, location string) (io.ReadCloser, error) {
	if s.rootErr != nil {
		return nil, fmt.Errorf("%s: %w", s, s.rootErr)
	}
	if location == "." || !fs.ValidPath(location) {
		return nil, fmt.Errorf("%s: location %q is not a path inside the datastore: %w", s, location, importer.ErrInvalid)
	}
	// O_NONBLOCK: opening a named pipe must not wait for a writer; it
	// changes nothing for regular files.
	f, err := s.root.OpenFile(location, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%s: %s: %w", s, location, importer.ErrMissing)
	}
	if err != nil {
		return nil, fmt.Errorf("%s: %w", s, err)
	}
	info, err := f.Stat()
	if err == nil && !info.Mode().IsRegular() {
		err = fmt.Errorf("%s is not a regular file", location)
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", s, err)
	}
	return f, nil
}

func (s *fileStore) close() error {
	if s.root == nil {
		return nil
	}
	return s.root.Close()
}

// s3Store reads an S3 datastore: location is the object's key in the
// bucket (with matrix-media-repo's prefixLength, the key's first
// characters and a slash are part of it).
type s3Store struct {
	id       string
	endpoint string
	bucket   string
	client   *s3.Client
}

// s3Options are an S3 datastore's opts as matrix-media-repo reads them.
type s3Options struct {
	// endpoint is the service's host[:port], without scheme.
	endpoint string
	// bucket is opts.bucketName.
	bucket string
	// accessKey and secret sign requests; both empty means anonymous.
	accessKey, secret string
	// secure is opts.ssl (default true): HTTPS rather than HTTP.
	secure bool
	// region is opts.region, else derived from an AWS endpoint, else
	// us-east-1.
	region string
}

// s3HeaderTimeout bounds the wait for the headers of an S3 answer, so that
// an unresponsive server fails the item instead of stalling the import.
const s3HeaderTimeout = time.Minute

// newS3Store checks an S3 datastore's options and builds its client. It
// does not contact the service.
func newS3Store(d datastoreConfig) (*s3Store, error) {
	o, err := parseS3Options(d.Options)
	if err != nil {
		return nil, fmt.Errorf("matrix-media-repo config: s3 datastore %q: %w", d.ID, err)
	}
	scheme := "https"
	if !o.secure {
		scheme = "http"
	}
	creds := aws.CredentialsProvider(aws.AnonymousCredentials{})
	if o.accessKey != "" || o.secret != "" {
		creds = credentials.NewStaticCredentialsProvider(o.accessKey, o.secret, "")
	}
	cfg := aws.Config{
		Region:      o.region,
		Credentials: creds,
		// Only send and check the CRC checksums where an API requires them:
		// S3-compatible servers often reject or lack them.
		RequestChecksumCalculation: aws.RequestChecksumCalculationWhenRequired,
		ResponseChecksumValidation: aws.ResponseChecksumValidationWhenRequired,
	}
	cfg.HTTPClient = awshttp.NewBuildableClient().WithTransportOptions(func(tr *http.Transport) {
		tr.ResponseHeaderTimeout = s3HeaderTimeout
	})
	client := s3.NewFromConfig(cfg, func(opts *s3.Options) {
		opts.BaseEndpoint = aws.String(scheme + "://" + o.endpoint)
		opts.UsePathStyle = !virtualHosted(o.endpoint, o.bucket, o.secure)
	})
	return &s3Store{id: d.ID, endpoint: o.endpoint, bucket: o.bucket, client: client}, nil
}

// parseS3Options reads the options matrix-media-repo's S3 datastore uses
// to reach its bucket. Options for writing (storageClass, prefixLength,
// multipartUploads, tempPath) and redirects (publicBaseUrl) do not matter
// for reading: prefixLength is already part of every stored location.
func parseS3Options(opts map[string]string) (s3Options, error) {
	o := s3Options{
		endpoint:  opts["endpoint"],
		bucket:    opts["bucketName"],
		accessKey: opts["accessKeyId"],
		secret:    opts["accessSecret"],
		secure:    true,
		region:    opts["region"],
	}
	if u, err := url.Parse("https://" + o.endpoint); err != nil || u.Host != o.endpoint || o.endpoint == "" {
		return o, fmt.Errorf("endpoint %q is not a host[:port] (matrix-media-repo takes no scheme or path there)", o.endpoint)
	}
	if v := opts["ssl"]; v != "" {
		b, err := strconv.ParseBool(v)
		if err != nil {
			return o, fmt.Errorf("ssl %q is not a boolean", v)
		}
		o.secure = b
	}
	if o.region == "" {
		o.region = awsRegion(o.endpoint)
	}
	return o, nil
}

// defaultRegion signs requests when neither the configuration nor the
// endpoint names a region; S3-compatible servers accept it.
const defaultRegion = "us-east-1"

// awsRegion returns the region an AWS S3 endpoint names, such as
// s3.eu-west-1.amazonaws.com or s3-eu-west-1.amazonaws.com, else
// defaultRegion.
func awsRegion(endpoint string) string {
	host := strings.ToLower(hostOnly(endpoint))
	rest, ok := strings.CutSuffix(host, ".amazonaws.com")
	if !ok {
		return defaultRegion
	}
	last := rest[strings.LastIndexByte(rest, '.')+1:]
	if r, ok := strings.CutPrefix(last, "s3-"); ok {
		last = r
	} else if !strings.Contains(rest, "s3.") {
		return defaultRegion
	}
	// s3.amazonaws.com, bucket.s3.amazonaws.com, s3-external-1 and
	// s3-accelerate name no region.
	if last == "s3" || last == "external-1" || last == "accelerate" || last == "" {
		return defaultRegion
	}
	return last
}

// virtualHosted reports whether the bucket is addressed as a subdomain of
// the endpoint, as the client matrix-media-repo uses does: for AWS, Google
// and Aliyun endpoints, unless the bucket name has a dot and the
// connection is HTTPS (its certificate would not match). Other servers are
// addressed path-style (endpoint/bucket/key).
func virtualHosted(endpoint, bucket string, secure bool) bool {
	if secure && strings.Contains(bucket, ".") {
		return false
	}
	host := strings.ToLower(hostOnly(endpoint))
	return strings.HasSuffix(host, ".amazonaws.com") || strings.HasSuffix(host, ".amazonaws.com.cn") ||
		host == "storage.googleapis.com" || strings.HasSuffix(host, ".aliyuncs.com")
}

// hostOnly returns endpoint without its port.
func hostOnly(endpoint string) string {
	u, err := url.Parse("https://" + endpoint)
	if err != nil {
		return endpoint
	}
	return u.Hostname()
}

func (s *s3Store) String() string {
	return fmt.Sprintf("s3 datastore %q at %s/%s", s.id, s.endpoint, s.bucket)
}

func (s *s3Store) open(ctx context.Context, location string) (io.ReadCloser, error) {
	if location == "" {
		return nil, fmt.Errorf("%s: empty location: %w", s, importer.ErrInvalid)
	}
	out, err := s.client.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String(s.bucket), Key: aws.String(location)})
	if err != nil {
		if notFound(err) {
			return nil, fmt.Errorf("%s: %s: %w", s, location, importer.ErrMissing)
		}
		return nil, fmt.Errorf("%s: getting %s: %w", s, location, err)
	}
	return out.Body, nil
}

// notFound reports whether err is S3's answer for a missing object (and
// not for a missing bucket, which is no answer about the object).
func notFound(err error) bool {
	var nsk *types.NoSuchKey
	if errors.As(err, &nsk) {
		return true
	}
	var api smithy.APIError
	if errors.As(err, &api) && api.ErrorCode() == "NoSuchBucket" {
		return false
	}
	var resp *smithyhttp.ResponseError
	return errors.As(err, &resp) && resp.HTTPStatusCode() == http.StatusNotFound
}

func (s *s3Store) close() error { return nil }

// unsupportedStore stands for a datastore of a type this package cannot
// read (matrix-media-repo before 1.3 also knew "ipfs").
type unsupportedStore struct {
	id, typ string
}

func (u unsupportedStore) String() string {
	return fmt.Sprintf("%s datastore %q", u.typ, u.id)
}

func (u unsupportedStore) open(context.Context, string) (io.ReadCloser, error) {
	return nil, fmt.Errorf("%s: datastore type %q cannot be imported", u, u.typ)
}

func (u unsupportedStore) close() error { return nil }
