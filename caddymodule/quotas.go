package caddymodule

import (
	"strconv"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix/mediaapi"
)

// QuotaConfig is a site's per-user quotas (handler field "quotas"): ordered
// rules, the first whose user-ID pattern matches the uploader applies, and
// a user no rule matches has no quota. In every rule, a limit of 0 (or
// absent) is no limit from that field: a rule never refuses an upload
// because of a 0. See the README's "Fair use: quotas" section.
//
// Caddyfile:
//
//	quotas {
//		exempt_admins
//		exempt_appservices
//		rule @bot_*:example.org {
//			max_bytes 10GiB
//			max_files 100000
//			max_pending 20
//			max_upload_size 500MiB
//			window 1h max_bytes 1GiB max_files 1000
//			info_uri https://example.org/limits
//			can_upgrade
//		}
//		rule @*:example.org {
//			max_bytes 2GiB
//		}
//	}
type QuotaConfig struct {
	// Rules are tried in order. Default: none (no quotas).
	Rules []QuotaRuleConfig `json:"rules,omitempty"`
	// ExemptAdmins exempts the site's media admins from every rule.
	// Default false.
	ExemptAdmins bool `json:"exempt_admins,omitempty"`
	// ExemptAppservices exempts users authenticated with an appservice's
	// as_token (the appservice's sender and the users it acts as). Default
	// false.
	ExemptAppservices bool `json:"exempt_appservices,omitempty"`
}

// QuotaRuleConfig is one quota rule.
type QuotaRuleConfig struct {
	// Users is a glob of the user IDs the rule applies to: `*` matches any
	// run of characters and `?` one character, e.g. "@*:example.org",
	// "@bot_*:example.org" or an exact user ID. Required.
	Users string `json:"users,omitempty"`
	// MaxBytes bounds the bytes of media a user stores (each upload at its
	// size, also when its content was already stored). Default 0: no
	// limit.
	MaxBytes int64 `json:"max_bytes,omitempty"`
	// MaxFiles bounds the media items a user stores. Default 0: no limit.
	MaxFiles int64 `json:"max_files,omitempty"`
	// MaxPending replaces the site's max_pending_uploads for these users.
	// Default 0: the site's; -1: no limit.
	MaxPending int `json:"max_pending,omitempty"`
	// MaxUploadSize replaces the site's max_upload_size for these users
	// (and is what config advertises to them). Default 0: the site's.
	MaxUploadSize int64 `json:"max_upload_size,omitempty"`
	// Windows bound uploads within rolling windows. Default: none.
	Windows []QuotaWindowConfig `json:"windows,omitempty"`
	// InfoURI makes refusals 403 M_USER_LIMIT_EXCEEDED with this info_uri
	// instead of 403 M_FORBIDDEN. Default: none.
	InfoURI string `json:"info_uri,omitempty"`
	// CanUpgrade is sent as can_upgrade with M_USER_LIMIT_EXCEEDED (needs
	// info_uri). Default false.
	CanUpgrade bool `json:"can_upgrade,omitempty"`
}

// QuotaWindowConfig bounds uploads within a rolling window (as Synapse's
// media_upload_limits).
type QuotaWindowConfig struct {
	// Window is the window's length, e.g. "1h" or "1d". Required.
	Window caddy.Duration `json:"window,omitempty"`
	// MaxBytes bounds the bytes uploaded within the window. Default 0: no
	// limit.
	MaxBytes int64 `json:"max_bytes,omitempty"`
	// MaxFiles bounds the files uploaded within the window. Default 0: no
	// limit.
	MaxFiles int64 `json:"max_files,omitempty"`
}

// mediaQuotas converts the config for the media API (which validates it).
func (q *QuotaConfig) mediaQuotas() mediaapi.QuotaConfig {
	if q == nil {
		return mediaapi.QuotaConfig{}
	}
	out := mediaapi.QuotaConfig{ExemptAdmins: q.ExemptAdmins, ExemptAppservices: q.ExemptAppservices}
	for _, r := range q.Rules {
		rule := mediaapi.QuotaRule{
			Users: r.Users, MaxBytes: r.MaxBytes, MaxFiles: r.MaxFiles, MaxPending: r.MaxPending,
			MaxUploadSize: r.MaxUploadSize, InfoURI: r.InfoURI, CanUpgrade: r.CanUpgrade,
		}
		for _, w := range r.Windows {
			rule.Windows = append(rule.Windows, mediaapi.QuotaWindow{Window: time.Duration(w.Window), MaxBytes: w.MaxBytes, MaxFiles: w.MaxFiles})
		}
		out.Rules = append(out.Rules, rule)
	}
	return out
}

// parseQuotas parses the quotas block (syntax in QuotaConfig's doc).
func parseQuotas(d *caddyfile.Dispenser) (*QuotaConfig, error) {
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	q := &QuotaConfig{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		switch sub := d.Val(); sub {
		case "exempt_admins", "exempt_appservices":
			if d.NextArg() {
				return nil, d.ArgErr()
			}
			if sub == "exempt_admins" {
				q.ExemptAdmins = true
			} else {
				q.ExemptAppservices = true
			}
		case "rule":
			r, err := parseQuotaRule(d)
			if err != nil {
				return nil, err
			}
			q.Rules = append(q.Rules, r)
		default:
			return nil, d.Errf("matrix_media: quotas: unrecognized subdirective '%s'", sub)
		}
	}
	if len(q.Rules) == 0 {
		return nil, d.Err("matrix_media: quotas: at least one rule is required")
	}
	return q, nil
}

// parseQuotaRule parses "rule <users glob> { ... }".
func parseQuotaRule(d *caddyfile.Dispenser) (QuotaRuleConfig, error) {
	users, err := singleArg(d)
	if err != nil {
		return QuotaRuleConfig{}, err
	}
	r := QuotaRuleConfig{Users: users}
	seen := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		sub := d.Val()
		if seen[sub] && sub != "window" {
			return r, d.Errf("matrix_media: quota rule %s: %s specified more than once", users, sub)
		}
		seen[sub] = true
		switch sub {
		case "max_bytes":
			r.MaxBytes, err = quotaSize(d)
		case "max_upload_size":
			r.MaxUploadSize, err = quotaSize(d)
		case "max_files":
			r.MaxFiles, err = quotaCount(d)
		case "max_pending":
			var v string
			if v, err = singleArg(d); err == nil {
				if v == "unlimited" {
					r.MaxPending = -1
				} else if n, perr := strconv.Atoi(v); perr != nil || n < 0 {
					err = d.Errf("matrix_media: max_pending must be a non-negative integer or 'unlimited', got '%s'", v)
				} else {
					r.MaxPending = n
				}
			}
		case "window":
			var w QuotaWindowConfig
			w, err = parseQuotaWindow(d)
			r.Windows = append(r.Windows, w)
		case "info_uri":
			r.InfoURI, err = singleArg(d)
		case "can_upgrade":
			if d.NextArg() {
				return r, d.ArgErr()
			}
			r.CanUpgrade = true
		default:
			return r, d.Errf("matrix_media: quota rule %s: unrecognized subdirective '%s'", users, sub)
		}
		if err != nil {
			return r, err
		}
	}
	return r, nil
}

// parseQuotaWindow parses "window <duration> [max_bytes <size>] [max_files <n>]".
func parseQuotaWindow(d *caddyfile.Dispenser) (QuotaWindowConfig, error) {
	var w QuotaWindowConfig
	if !d.NextArg() {
		return w, d.ArgErr()
	}
	dur, err := caddy.ParseDuration(d.Val())
	if err != nil || dur <= 0 {
		return w, d.Errf("matrix_media: window: the length must be a positive duration such as 1h or 1d, got '%s'", d.Val())
	}
	w.Window = caddy.Duration(dur)
	for d.NextArg() {
		key := d.Val()
		if !d.NextArg() {
			return w, d.ArgErr()
		}
		switch key {
		case "max_bytes":
			w.MaxBytes, err = parseQuotaSize(d, key, d.Val())
		case "max_files":
			w.MaxFiles, err = parseQuotaCount(d, key, d.Val())
		default:
			return w, d.Errf("matrix_media: window: unknown limit '%s' (want max_bytes or max_files)", key)
		}
		if err != nil {
			return w, err
		}
	}
	return w, nil
}

// maxQuotaBytes bounds the sizes of quota rules (4 EiB), so that a usage
// plus a limit cannot overflow.
const maxQuotaBytes = 1 << 62

// quotaSize parses the one argument of the line as a size (50MiB, 1GB,
// 1048576); 0 is allowed and means no limit.
func quotaSize(d *caddyfile.Dispenser) (int64, error) {
	return sizeArg(d, 0, maxQuotaBytes)
}

func parseQuotaSize(d *caddyfile.Dispenser, name, v string) (int64, error) {
	n, err := parseSize(v, 0, maxQuotaBytes)
	if err != nil {
		return 0, d.Errf("matrix_media: parsing %s: %v", name, err)
	}
	return n, nil
}

// quotaCount parses the one argument of the line as a count >= 0 (0: no
// limit).
func quotaCount(d *caddyfile.Dispenser) (int64, error) {
	name := d.Val()
	v, err := singleArg(d)
	if err != nil {
		return 0, err
	}
	return parseQuotaCount(d, name, v)
}

func parseQuotaCount(d *caddyfile.Dispenser, name, v string) (int64, error) {
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil || n < 0 {
		return 0, d.Errf("matrix_media: %s must be a non-negative integer, got '%s'", name, v)
	}
	return n, nil
}
