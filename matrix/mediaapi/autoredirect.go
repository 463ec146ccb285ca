package mediaapi

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// Automatic redirects (RedirectPolicy.Auto).
//
// A presigned redirect takes the bytes of a download off this server (a
// 256 MiB download through it runs at about 0.6x of the bucket's own speed
// on loopback, redirected at the bucket's speed; see the README), but it
// only works for clients that can reach the URL and, in browsers, follow a
// cross-origin redirect. The spec makes clients of the authenticated
// endpoints (/_matrix/client/v1/media/...) expect redirects, and legacy
// clients ask for them with allow_redirect=true; what the spec cannot
// promise is the bucket. An automatic policy therefore redirects only while
// the datastore passes checks made here, and streams otherwise:
//
//   - the presigned URLs (after a CDN rebase) are https;
//   - their host resolves to public addresses only (the federation
//     address guard: no loopback, private, link-local, ... address), so an
//     S3 endpoint on a private network is never handed to clients;
//   - the bucket's CORS configuration has a rule that lets any origin ("*")
//     GET, so that web clients fetching media with fetch() can follow the
//     cross-origin 307 (buckets have no CORS configuration by default).
//
// The checks run when RunRedirectChecks starts and every
// RedirectCheckInterval, so a CORS rule added or removed later takes effect
// without a reload. A check that cannot reach the bucket keeps the previous
// decision.

// DefaultRedirectCheckInterval is the default
// RepositoryOptions.RedirectCheckInterval.
const DefaultRedirectCheckInterval = 10 * time.Minute

// probeHash is the blob address presigned to learn the URLs' scheme and
// host; presigning does not contact the store.
const probeHash = "0000000000000000000000000000000000000000000000000000000000000000"

// RedirectState is whether downloads of a datastore are redirected.
type RedirectState struct {
	// Auto is true for an automatic policy (RedirectPolicy.Auto).
	Auto bool `json:"auto"`
	// Active is true while downloads are redirected.
	Active bool `json:"active"`
	// Reason explains the decision of an automatic policy.
	Reason string `json:"reason,omitempty"`
	// CheckedAt is when an automatic policy was last checked; zero before
	// the first check (downloads are streamed until then).
	CheckedAt time.Time `json:"checked_at,omitzero"`
}

// autoRedirect holds the current decision of one automatic policy.
type autoRedirect struct {
	state atomic.Pointer[RedirectState]
}

// active reports whether downloads are redirected now.
func (a *autoRedirect) active() bool {
	s := a.state.Load()
	return s != nil && s.Active
}

// RedirectStates returns the redirect state of every datastore that has a
// redirect policy, by datastore name.
func (r *Repository) RedirectStates() map[string]RedirectState {
	out := make(map[string]RedirectState, len(r.redirects))
	for name := range r.redirects {
		a, ok := r.autoRedirects[name]
		if !ok {
			out[name] = RedirectState{Active: true}
			continue
		}
		if s := a.state.Load(); s != nil {
			out[name] = *s
		} else {
			out[name] = RedirectState{Auto: true, Reason: "not checked yet"}
		}
	}
	return out
}

// RunRedirectChecks checks every automatic redirect policy now and then
// every RedirectCheckInterval until ctx ends. It returns at once when there
// is no automatic policy.
func (r *Repository) RunRedirectChecks(ctx context.Context) {
	if len(r.autoRedirects) == 0 {
		return
	}
	t := time.NewTicker(r.redirectCheckInterval)
	defer t.Stop()
	for {
		for name, a := range r.autoRedirects {
			_ = r.safely("redirect_check", func() error {
				r.checkAutoRedirect(ctx, name, a)
				return nil
			})
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// checkAutoRedirect runs the checks of one automatic policy and records the
// decision, logging it when it changes.
func (r *Repository) checkAutoRedirect(ctx context.Context, name string, a *autoRedirect) {
	active, reason, err := r.redirectable(ctx, name, r.redirects[name])
	prev := a.state.Load()
	if err != nil {
		if ctx.Err() != nil {
			return
		}
		// The bucket could not be asked: keep what was decided.
		next := RedirectState{Auto: true, CheckedAt: r.now()}
		if prev != nil {
			next.Active, next.Reason = prev.Active, prev.Reason
		}
		next.Reason = strings.TrimSpace(next.Reason + " (last check failed: " + err.Error() + ")")
		a.state.Store(&next)
		r.logger.Warn("checking whether downloads may be redirected failed; keeping the previous decision",
			zap.String("datastore", name), zap.Bool("redirecting", next.Active), zap.Error(err))
		return
	}
	a.state.Store(&RedirectState{Auto: true, Active: active, Reason: reason, CheckedAt: r.now()})
	if prev == nil || prev.Active != active || prev.Reason != reason {
		msg := "downloads are streamed, not redirected"
		if active {
			msg = "downloads are redirected to presigned URLs"
		}
		r.logger.Info(msg, zap.String("datastore", name), zap.String("reason", reason))
	}
}

// redirectable runs the checks of an automatic policy on the datastore
// name: whether its downloads may be redirected and why. err reports a
// check that could not be made (the bucket unreachable).
func (r *Repository) redirectable(ctx context.Context, name string, policy RedirectPolicy) (ok bool, reason string, err error) {
	store, found := r.stores.Get(name)
	if !found {
		return false, "the datastore does not exist", nil
	}
	ps, canPresign := store.(storage.Presigner)
	cr, canCORS := store.(storage.CORSReporter)
	if !canPresign || !canCORS {
		return false, "the datastore cannot presign URLs", nil
	}
	raw, err := ps.PresignGet(ctx, probeHash, policy.Lifetime, "application/octet-stream", "")
	if err != nil {
		return false, "", fmt.Errorf("presigning a probe URL: %w", err)
	}
	if policy.CDNBaseURL != nil {
		if raw, err = rebase(raw, policy.CDNBaseURL); err != nil {
			return false, "", err
		}
	}
	u, err := url.Parse(raw)
	if err != nil {
		return false, "", fmt.Errorf("parsing a presigned URL: %w", err)
	}
	if u.Scheme != "https" {
		return false, fmt.Sprintf("presigned URLs are %s, not https", u.Scheme), nil
	}
	if err := r.redirectGuard.CheckHost(ctx, u.Hostname()); err != nil {
		return false, fmt.Sprintf("clients may not reach the presigned URLs' host %s: %v", u.Hostname(), err), nil
	}
	rules, err := cr.BucketCORS(ctx)
	switch {
	case errors.Is(err, storage.ErrNotFound):
		return false, "the bucket has no CORS configuration, so web clients could not follow a redirect", nil
	case err != nil:
		return false, "", err
	}
	if !slices.ContainsFunc(rules, allowsAnyOriginGET) {
		return false, `no CORS rule of the bucket lets any origin ("*") GET, so web clients could not follow a redirect`, nil
	}
	return true, fmt.Sprintf("presigned URLs are https on public addresses (%s) and the bucket's CORS lets any origin GET", u.Hostname()), nil
}

// allowsAnyOriginGET reports whether a CORS rule lets every origin make GET
// requests.
func allowsAnyOriginGET(rule storage.CORSRule) bool {
	return slices.Contains(rule.AllowedOrigins, "*") &&
		slices.ContainsFunc(rule.AllowedMethods, func(m string) bool { return strings.EqualFold(m, "GET") })
}
