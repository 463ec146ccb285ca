package s3store

import (
	"context"
	"fmt"
	"path"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/s3"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

var _ storage.Lister = (*Store)(nil)

// List calls fn for every object under "<prefix>blobs/" whose name is a blob
// hash, in key order, one ListObjectsV2 page at a time. Objects under
// "<prefix>tmp/" (uploads in progress) are not listed. Errors that show S3
// unreachable wrap ErrUnavailable.
func (s *Store) List(ctx context.Context, fn func(storage.StoredBlob) error) error {
	p := s3.NewListObjectsV2Paginator(s.client, &s3.ListObjectsV2Input{
		Bucket: aws.String(s.bucket),
		Prefix: aws.String(s.prefix + "blobs/"),
	})
	for p.HasMorePages() {
		start := time.Now()
		page, err := p.NextPage(ctx)
		s.observe("ListObjectsV2", start, 0, err)
		if err != nil {
			return fmt.Errorf("listing blobs: %w", classify(err))
		}
		for _, o := range page.Contents {
			key := aws.ToString(o.Key)
			name := path.Base(key)
			if !storage.ValidSHA256(name) || key != s.blobKey(name) || strings.HasSuffix(key, "/") {
				continue
			}
			if err := fn(storage.StoredBlob{SHA256: name, Size: aws.ToInt64(o.Size), ModTime: aws.ToTime(o.LastModified)}); err != nil {
				return fmt.Errorf("listing blobs: %w", err)
			}
		}
	}
	return nil
}
