// Command s3get measures how fast one object can be fetched straight from an
// S3 endpoint with the AWS SDK v2, configured like storage/s3store configures
// it (path-style, static credentials, checksums only when required, an HTTP
// transport with 256 KiB buffers). It is the baseline of the S3 load
// benchmark (bench/run-s3.sh).
//
// With -url it instead fetches that URL with a plain HTTP GET through the same
// transport and copy loop (no SDK, no signing): the same client measuring a
// server in front of S3, such as the module, so that the ratio of the two
// compares servers rather than clients.
//
// It fetches the object n times, one after another, each with GetObject and a
// copy of the body into io.Discard through a 256 KiB buffer, and prints the
// median throughput in MB/s (10^6 bytes per second) followed by every run's:
//
//	s3get -endpoint http://127.0.0.1:9000 -bucket media -key blobs/ab/cd/abcd… -n 3
//	812.4 790.1 812.4 830.0
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path"
	"slices"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"
)

// bufSize is the size of the copy buffer and of the transport's read and
// write buffers, as in storage/s3store.
const bufSize = 256 << 10

// options are the command-line flags.
type options struct {
	endpoint, region, bucket, key string
	url                           string
	accessKey, secretKey          string
	n                             int
	verify                        bool
}

func main() {
	var o options
	flag.StringVar(&o.endpoint, "endpoint", "", "S3 endpoint URL, e.g. http://127.0.0.1:9000 (required)")
	flag.StringVar(&o.region, "region", "us-east-1", "region to sign requests for")
	flag.StringVar(&o.bucket, "bucket", "media", "bucket holding the object")
	flag.StringVar(&o.key, "key", "", "key of the object to fetch (required)")
	flag.StringVar(&o.accessKey, "access-key-id", "bench", "access key ID")
	flag.StringVar(&o.secretKey, "secret-access-key", "bench-secret", "secret access key")
	flag.StringVar(&o.url, "url", "", "fetch this URL with a plain GET instead of the object (-endpoint and -key are then not needed)")
	flag.IntVar(&o.n, "n", 3, "number of timed fetches")
	flag.BoolVar(&o.verify, "verify", false, "before timing, check that the object's SHA-256 is the key's last path element")
	flag.Parse()
	if (o.url == "" && (o.endpoint == "" || o.key == "")) || o.n < 1 {
		flag.Usage()
		os.Exit(2)
	}
	if err := run(context.Background(), o); err != nil {
		fmt.Fprintln(os.Stderr, "s3get:", err)
		os.Exit(1)
	}
}

// run fetches the object o.n times and prints the throughputs.
func run(ctx context.Context, o options) error {
	client := newClient(o)
	get := func(buf []byte, w io.Writer) (int64, error) { return fetch(ctx, client, o, buf, w) }
	if o.url != "" {
		hc := newHTTPClient()
		get = func(buf []byte, w io.Writer) (int64, error) { return fetchURL(ctx, hc, o.url, buf, w) }
	} else if o.verify {
		if err := verify(ctx, client, o); err != nil {
			return err
		}
	}
	buf := make([]byte, bufSize)
	rates := make([]float64, 0, o.n)
	for range o.n {
		start := time.Now()
		n, err := get(buf, io.Discard)
		if err != nil {
			return err
		}
		rates = append(rates, float64(n)/time.Since(start).Seconds()/1e6)
	}
	sorted := slices.Clone(rates)
	slices.Sort(sorted)
	median := sorted[len(sorted)/2]
	if len(sorted)%2 == 0 {
		median = (sorted[len(sorted)/2-1] + sorted[len(sorted)/2]) / 2
	}
	parts := []string{fmt.Sprintf("%.1f", median)}
	for _, r := range rates {
		parts = append(parts, fmt.Sprintf("%.1f", r))
	}
	fmt.Println(strings.Join(parts, " "))
	return nil
}

// newClient returns an S3 client set up like storage/s3store's.
func newClient(o options) *s3.Client {
	cfg := aws.Config{
		Region:                     o.region,
		Credentials:                credentials.NewStaticCredentialsProvider(o.accessKey, o.secretKey, ""),
		HTTPClient:                 newHTTPClient(),
		RequestChecksumCalculation: aws.RequestChecksumCalculationWhenRequired,
		ResponseChecksumValidation: aws.ResponseChecksumValidationWhenRequired,
	}
	return s3.NewFromConfig(cfg, func(so *s3.Options) {
		so.UsePathStyle = true
		so.BaseEndpoint = aws.String(o.endpoint)
	})
}

// newHTTPClient returns the HTTP client of both modes: 256 KiB transport
// buffers, keep-alives.
func newHTTPClient() *http.Client {
	dialer := &net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}
	return &http.Client{Transport: &http.Transport{
		DialContext:         dialer.DialContext,
		MaxIdleConnsPerHost: 4,
		IdleConnTimeout:     90 * time.Second,
		WriteBufferSize:     bufSize,
		ReadBufferSize:      bufSize,
	}}
}

// fetchURL GETs url and copies the body into w through buf, like fetch.
func fetchURL(ctx context.Context, hc *http.Client, url string, buf []byte, w io.Writer) (int64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, fmt.Errorf("getting %s: %w", url, err)
	}
	resp, err := hc.Do(req)
	if err != nil {
		return 0, fmt.Errorf("getting %s: %w", url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("getting %s: status %s", url, resp.Status)
	}
	n, err := io.CopyBuffer(struct{ io.Writer }{w}, struct{ io.Reader }{resp.Body}, buf)
	if err != nil {
		return n, fmt.Errorf("reading %s: %w", url, err)
	}
	if resp.ContentLength >= 0 && n != resp.ContentLength {
		return n, fmt.Errorf("reading %s: got %d bytes, want %d", url, n, resp.ContentLength)
	}
	return n, nil
}

// fetch gets the object and copies its body into w through buf, returning the
// number of bytes copied.
func fetch(ctx context.Context, client *s3.Client, o options, buf []byte, w io.Writer) (int64, error) {
	out, err := client.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String(o.bucket), Key: aws.String(o.key)})
	if err != nil {
		return 0, fmt.Errorf("getting object %s: %w", o.key, err)
	}
	defer out.Body.Close()
	// Hide ReaderFrom and WriterTo, so the copy goes through buf rather than
	// through a small buffer of io.Discard's or of the body's.
	n, err := io.CopyBuffer(struct{ io.Writer }{w}, struct{ io.Reader }{out.Body}, buf)
	if err != nil {
		return n, fmt.Errorf("reading object %s: %w", o.key, err)
	}
	if out.ContentLength != nil && n != *out.ContentLength {
		return n, fmt.Errorf("reading object %s: got %d bytes, want %d", o.key, n, *out.ContentLength)
	}
	return n, nil
}

// verify fetches the object once and checks its SHA-256 against the key.
func verify(ctx context.Context, client *s3.Client, o options) error {
	h := sha256.New()
	if _, err := fetch(ctx, client, o, make([]byte, bufSize), h); err != nil {
		return err
	}
	if got, want := hex.EncodeToString(h.Sum(nil)), path.Base(o.key); got != want {
		return errors.New("verifying object: sha256 " + got + " does not match key " + o.key)
	}
	return nil
}
