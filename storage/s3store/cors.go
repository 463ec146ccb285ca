package s3store

import (
	"context"
	"errors"
	"fmt"

	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/smithy-go"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

var _ storage.CORSReporter = (*Store)(nil)

// BucketCORS reads the bucket's CORS configuration (GetBucketCors). A
// bucket without one gives storage.ErrNotFound; S3 unreachable gives an
// error wrapping ErrUnavailable.
func (s *Store) BucketCORS(ctx context.Context) ([]storage.CORSRule, error) {
	out, err := s.client.GetBucketCors(ctx, &s3.GetBucketCorsInput{Bucket: &s.bucket})
	if err != nil {
		var api smithy.APIError
		if errors.As(err, &api) && api.ErrorCode() == "NoSuchCORSConfiguration" {
			return nil, fmt.Errorf("reading the CORS configuration of bucket %s: %w", s.bucket, storage.ErrNotFound)
		}
		return nil, fmt.Errorf("reading the CORS configuration of bucket %s: %w", s.bucket, classify(err))
	}
	rules := make([]storage.CORSRule, 0, len(out.CORSRules))
	for _, r := range out.CORSRules {
		rules = append(rules, storage.CORSRule{
			AllowedOrigins: r.AllowedOrigins,
			AllowedMethods: r.AllowedMethods,
			AllowedHeaders: r.AllowedHeaders,
		})
	}
	return rules, nil
}
