package s3store

import (
	"context"
	"errors"
	"reflect"
	"testing"

	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

func TestBucketCORS(t *testing.T) {
	s, _ := newTestStore(t, nil)
	defer s.Close()
	ctx := context.Background()

	if rules, err := s.BucketCORS(ctx); !errors.Is(err, storage.ErrNotFound) {
		t.Fatalf("BucketCORS without a configuration = %v, %v; want ErrNotFound", rules, err)
	}
	want := []storage.CORSRule{
		{AllowedOrigins: []string{"*"}, AllowedMethods: []string{"GET", "HEAD"}, AllowedHeaders: []string{"*"}},
		{AllowedOrigins: []string{"https://app.example.org"}, AllowedMethods: []string{"PUT"}},
	}
	var in []types.CORSRule
	for _, r := range want {
		in = append(in, types.CORSRule{AllowedOrigins: r.AllowedOrigins, AllowedMethods: r.AllowedMethods, AllowedHeaders: r.AllowedHeaders})
	}
	if _, err := s.client.PutBucketCors(ctx, &s3.PutBucketCorsInput{
		Bucket: &s.bucket, CORSConfiguration: &types.CORSConfiguration{CORSRules: in},
	}); err != nil {
		t.Fatalf("PutBucketCors: %v", err)
	}
	got, err := s.BucketCORS(ctx)
	if err != nil {
		t.Fatalf("BucketCORS: %v", err)
	}
	// The second rule has no headers: nil or empty, either is right.
	if len(got) == 2 && len(got[1].AllowedHeaders) == 0 {
		got[1].AllowedHeaders = nil
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("BucketCORS = %+v, want %+v", got, want)
	}
	if _, err := s.client.DeleteBucketCors(ctx, &s3.DeleteBucketCorsInput{Bucket: &s.bucket}); err != nil {
		t.Fatalf("DeleteBucketCors: %v", err)
	}
	if _, err := s.BucketCORS(ctx); !errors.Is(err, storage.ErrNotFound) {
		t.Errorf("BucketCORS after deleting the configuration = %v, want ErrNotFound", err)
	}
}
