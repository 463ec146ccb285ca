package s3store

import (
	"bytes"
	"context"
	"io"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage/blobtest"
)

// BenchmarkOpenRead256MiB reads a 256 MiB object from the fake S3 server on
// loopback, through Store.Open + io.Copy (WriterTo, 256 KiB buffer) and
// through a bare SDK GetObject + io.Copy, to show the reader's overhead. Both
// report MB/s. The fake server (in the same process) dominates the cost, so
// compare the two, not the absolute numbers.
func BenchmarkOpenRead256MiB(b *testing.B) {
	const size = 256 << 20
	s, _ := newTestStore(b, nil)
	defer s.Close()
	ctx := context.Background()
	body := blobtest.RandomBytes(42, size)
	res, err := s.Put(ctx, bytes.NewReader(body), storage.PutOptions{ExpectedSize: size})
	if err != nil {
		b.Fatalf("Put: %v", err)
	}
	body = nil

	b.Run("StoreOpen", func(b *testing.B) {
		b.SetBytes(size)
		for b.Loop() {
			blob, err := s.Open(ctx, res.SHA256)
			if err != nil {
				b.Fatalf("Open: %v", err)
			}
			n, err := io.Copy(io.Discard, blob.Content)
			blob.Content.Close()
			if err != nil || n != size {
				b.Fatalf("io.Copy = %d, %v", n, err)
			}
		}
	})
	b.Run("SDKGetObject", func(b *testing.B) {
		b.SetBytes(size)
		for b.Loop() {
			out, err := s.client.GetObject(ctx, &s3.GetObjectInput{
				Bucket: aws.String(s.bucket), Key: aws.String(s.blobKey(res.SHA256)),
			})
			if err != nil {
				b.Fatalf("GetObject: %v", err)
			}
			n, err := io.Copy(io.Discard, out.Body)
			out.Body.Close()
			if err != nil || n != size {
				b.Fatalf("io.Copy = %d, %v", n, err)
			}
		}
	})
}
