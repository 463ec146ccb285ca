package mediaapi

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// This file tracks when media and thumbnails were last read, for retention
// (remote media and thumbnails not accessed for a while) and the admin API,
// without a database write per read: reads are noted in memory (the latest
// time per item) and written in one batch per kind every
// AccessFlushInterval by RunAccessFlush, through storage.MediaAdmin's
// RecordAccess and RecordThumbnailAccess (which never move a time
// backwards). A crash loses at most one interval of access history; a clean
// shutdown loses none (RunAccessFlush flushes once more when it is stopped,
// and Drain flushes what requests noted after that).

// accessGranularity is how close to the noted time a read may be and still
// take only the read lock: a popular item read many times a second updates
// its time at most once a second.
const accessGranularity = time.Second

// finalFlushTimeout bounds the flush RunAccessFlush makes once stopped.
const finalFlushTimeout = 10 * time.Second

// accessRecorder notes reads in memory until they are flushed.
type accessRecorder struct {
	mu sync.RWMutex
	// media and thumbs hold the latest read of each item (thumbs: of any
	// of its thumbnails) since the last flush.
	media, thumbs map[mediaKey]time.Time
	// max bounds each map; full is signalled (never blocking) when a map
	// reaches it, so that RunAccessFlush flushes early.
	max  int
	full chan struct{}
}

// newAccessRecorder returns a recorder holding at most max items per kind.
func newAccessRecorder(max int) *accessRecorder {
	return &accessRecorder{
		media:  make(map[mediaKey]time.Time),
		thumbs: make(map[mediaKey]time.Time),
		max:    max,
		full:   make(chan struct{}, 1),
	}
}

// note records a read of k at at in the map of the kind (thumb or not). It
// reports false when the read was dropped because the map was full.
func (a *accessRecorder) note(k mediaKey, at time.Time, thumb bool) bool {
	a.mu.RLock()
	m := a.mapOf(thumb)
	prev, ok := m[k]
	a.mu.RUnlock()
	if ok && at.Sub(prev) < accessGranularity {
		return true
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	m = a.mapOf(thumb) // swapped by a flush meanwhile, perhaps
	prev, ok = m[k]
	switch {
	case ok && !at.After(prev):
		// Never backwards.
		return true
	case ok || len(m) < a.max:
		m[k] = at
		if len(m) >= a.max {
			a.signalFull()
		}
		return true
	default:
		a.signalFull()
		return false
	}
}

// mapOf returns the map of a kind; the caller holds mu.
func (a *accessRecorder) mapOf(thumb bool) map[mediaKey]time.Time {
	if thumb {
		return a.thumbs
	}
	return a.media
}

// signalFull asks for an early flush; the caller holds mu.
func (a *accessRecorder) signalFull() {
	select {
	case a.full <- struct{}{}:
	default:
	}
}

// take returns the reads noted so far (nil for a kind without any) and
// starts afresh.
func (a *accessRecorder) take() (media, thumbs map[mediaKey]time.Time) {
	a.mu.Lock()
	defer a.mu.Unlock()
	// An empty map stays in place and nil is returned for it: a map handed
	// out must never be the one note writes into.
	if len(a.media) > 0 {
		media, a.media = a.media, make(map[mediaKey]time.Time, len(a.media))
	}
	if len(a.thumbs) > 0 {
		thumbs, a.thumbs = a.thumbs, make(map[mediaKey]time.Time, len(a.thumbs))
	}
	return media, thumbs
}

// putBack merges reads whose flush failed back in, keeping the later time
// of each item and at most max items per kind (the rest is dropped). It
// returns how many were dropped.
func (a *accessRecorder) putBack(media, thumbs map[mediaKey]time.Time) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	dropped := 0
	for _, kind := range []struct {
		from map[mediaKey]time.Time
		into map[mediaKey]time.Time
	}{{media, a.media}, {thumbs, a.thumbs}} {
		for k, at := range kind.from {
			prev, ok := kind.into[k]
			switch {
			case ok && !at.After(prev):
			case ok || len(kind.into) < a.max:
				kind.into[k] = at
			default:
				dropped++
			}
		}
	}
	return dropped
}

// pending returns how many items have a read noted, per kind.
func (a *accessRecorder) pending() (media, thumbs int) {
	a.mu.RLock()
	defer a.mu.RUnlock()
	return len(a.media), len(a.thumbs)
}

// noteAccess notes a read of a media item's content (a download, or a
// federation download) at the repository's clock.
func (r *Repository) noteAccess(m *storage.Media) {
	if r.access == nil {
		return
	}
	if !r.access.note(mediaKey{m.ServerName, m.MediaID}, r.now(), false) {
		r.metrics.accessDropped.Inc()
	}
}

// noteThumbnailAccess notes a read of one of a media item's thumbnails: it
// counts as a read of the thumbnails and of the item (whose thumbnails
// would be lost with it).
func (r *Repository) noteThumbnailAccess(m *storage.Media) {
	if r.access == nil {
		return
	}
	now, k := r.now(), mediaKey{m.ServerName, m.MediaID}
	if !r.access.note(k, now, true) {
		r.metrics.accessDropped.Inc()
	}
	if !r.access.note(k, now, false) {
		r.metrics.accessDropped.Inc()
	}
}

// FlushAccess writes the reads noted since the last flush: one
// MediaAdmin.RecordAccess batch for media and one RecordThumbnailAccess
// batch for thumbnails. Reads whose batch failed are kept for the next
// flush (within the buffer's bound) and the error is returned. It does
// nothing when the metadata store cannot record access. Safe for concurrent
// use; RunAccessFlush calls it periodically.
func (r *Repository) FlushAccess(ctx context.Context) error {
	if r.access == nil {
		return nil
	}
	media, thumbs := r.access.take()
	var errs []error
	var failedMedia, failedThumbs map[mediaKey]time.Time
	if len(media) > 0 {
		if err := r.admin.RecordAccess(ctx, accessBatch(media)); err != nil {
			errs = append(errs, fmt.Errorf("recording media access: %w", err))
			failedMedia = media
		} else {
			r.metrics.accessFlushed.WithLabelValues("media").Add(float64(len(media)))
		}
	}
	if len(thumbs) > 0 {
		if err := r.admin.RecordThumbnailAccess(ctx, accessBatch(thumbs)); err != nil {
			errs = append(errs, fmt.Errorf("recording thumbnail access: %w", err))
			failedThumbs = thumbs
		} else {
			r.metrics.accessFlushed.WithLabelValues("thumbnail").Add(float64(len(thumbs)))
		}
	}
	if len(errs) == 0 {
		return nil
	}
	r.metrics.accessFlushErrors.Add(float64(len(errs)))
	if n := r.access.putBack(failedMedia, failedThumbs); n > 0 {
		r.metrics.accessDropped.Add(float64(n))
	}
	return errors.Join(errs...)
}

// accessBatch turns noted reads into a batch.
func accessBatch(m map[mediaKey]time.Time) []storage.Access {
	batch := make([]storage.Access, 0, len(m))
	for k, at := range m {
		batch = append(batch, storage.Access{MediaRef: storage.MediaRef{ServerName: k.server, MediaID: k.id}, At: at})
	}
	return batch
}

// RunAccessFlush writes the noted reads (FlushAccess) every
// AccessFlushInterval (default 30 seconds), and early when the buffer
// fills up, until ctx is done; then it flushes once more, bounded by ten
// seconds, so that a clean shutdown loses nothing. It blocks; run it like
// RunPendingExpiry, through Go, for as long as the repository lives:
//
//	repo.Go("access_flush", func() { repo.RunAccessFlush(ctx) })
//
// A failed flush is logged and counted in
// caddy_matrix_media_access_flush_errors_total; its reads are retried at the
// next one. It returns at once when the metadata store cannot record
// access.
func (r *Repository) RunAccessFlush(ctx context.Context) {
	if r.access == nil {
		return
	}
	t := time.NewTicker(r.accessFlushInterval)
	defer t.Stop()
	flush := func(ctx context.Context) {
		_ = r.safely("access_flush", func() error {
			if err := r.FlushAccess(ctx); err != nil {
				r.logger.Warn("recording media access times failed; retrying at the next flush", zap.Error(err))
			}
			return nil
		})
	}
	for {
		select {
		case <-ctx.Done():
			fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), finalFlushTimeout)
			defer cancel()
			flush(fctx)
			return
		case <-t.C:
		case <-r.access.full:
		}
		flush(ctx)
	}
}
