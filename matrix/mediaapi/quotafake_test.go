package mediaapi

import (
	"cmp"
	"context"
	"slices"
	"sync"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// fakeQuotaStore is a storage.QuotaStore for SQL stores that have none: it
// computes the counters from the user's rows of testServer (so deletions
// count) and serializes the Limited insertions with a mutex (one instance
// only). The real store replaces it as soon as sqlstore implements
// QuotaStore (newEnvOn).
type fakeQuotaStore struct {
	meta  storage.MetadataStore
	admin storage.MediaAdmin
	mu    sync.Mutex
}

func (f *fakeQuotaStore) rows(ctx context.Context, userID string) ([]storage.Media, error) {
	page, _, err := f.admin.ListUserMedia(ctx, storage.UserMediaQuery{ServerName: testServer, UserID: userID, Limit: 1 << 20})
	return page, err
}

func (f *fakeQuotaStore) UserUsage(ctx context.Context, userID string) (storage.UserUsage, error) {
	rows, err := f.rows(ctx, userID)
	if err != nil {
		return storage.UserUsage{}, err
	}
	u := storage.UserUsage{UserID: userID, Files: int64(len(rows))}
	for _, m := range rows {
		u.Bytes += m.Size
	}
	return u, nil
}

func (f *fakeQuotaStore) UploadedSince(ctx context.Context, userID string, since time.Time) (bytes, files int64, err error) {
	rows, err := f.rows(ctx, userID)
	if err != nil {
		return 0, 0, err
	}
	for _, m := range rows {
		at := m.UploadedAt
		if at.IsZero() {
			at = m.CreatedAt
		}
		if !at.Before(since) {
			bytes += m.Size
			files++
		}
	}
	return bytes, files, nil
}

func (f *fakeQuotaStore) check(ctx context.Context, m storage.Media, lim storage.UploadLimits) error {
	u, err := f.UserUsage(ctx, m.UserID)
	if err != nil {
		return err
	}
	if lim.MaxFiles > 0 && u.Files+1 > lim.MaxFiles {
		return &storage.QuotaExceededError{Limit: storage.LimitFiles, Used: u.Files, Adding: 1, Max: lim.MaxFiles}
	}
	if lim.MaxBytes > 0 && u.Bytes+m.Size > lim.MaxBytes {
		return &storage.QuotaExceededError{Limit: storage.LimitBytes, Used: u.Bytes, Adding: m.Size, Max: lim.MaxBytes}
	}
	now := cmp.Or(lim.Now, time.Now())
	for _, w := range lim.Windows {
		b, n, err := f.UploadedSince(ctx, m.UserID, now.Add(-w.Window))
		if err != nil {
			return err
		}
		if w.MaxFiles > 0 && n+1 > w.MaxFiles {
			return &storage.QuotaExceededError{Limit: storage.LimitWindowFiles, Window: w.Window, Used: n, Adding: 1, Max: w.MaxFiles}
		}
		if w.MaxBytes > 0 && b+m.Size > w.MaxBytes {
			return &storage.QuotaExceededError{Limit: storage.LimitWindowBytes, Window: w.Window, Used: b, Adding: m.Size, Max: w.MaxBytes}
		}
	}
	return nil
}

func (f *fakeQuotaStore) InsertMediaLimited(ctx context.Context, m storage.Media, lim storage.UploadLimits) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.check(ctx, m, lim); err != nil {
		return err
	}
	return f.meta.InsertMedia(ctx, m)
}

func (f *fakeQuotaStore) CompletePendingLimited(ctx context.Context, m storage.Media, lim storage.UploadLimits) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.check(ctx, m, lim); err != nil {
		return err
	}
	return f.meta.CompletePending(ctx, m)
}

func (f *fakeQuotaStore) TopUsage(ctx context.Context, limit int) ([]storage.UserUsage, error) {
	page, _, err := f.admin.ListUsage(ctx, storage.UsageQuery{ServerName: testServer, OrderBy: storage.UsageByBytes, Descending: true, Limit: limit})
	if err != nil {
		return nil, err
	}
	var out []storage.UserUsage
	for _, u := range page {
		out = append(out, storage.UserUsage{UserID: u.UserID, Bytes: u.Bytes, Files: u.Count})
	}
	slices.SortStableFunc(out, func(a, b storage.UserUsage) int { return cmp.Compare(b.Bytes, a.Bytes) })
	return out, nil
}

func (f *fakeQuotaStore) RecountUsage(context.Context, string) (int64, error) { return 0, nil }
