package caddymodule

import (
	"fmt"
	"math"
	"strconv"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/caddy-matrix-media/caddy-matrix-media/internal/bytesize"
)

func init() {
	httpcaddyfile.RegisterGlobalOption("matrix_media", parseGlobalOption)
	httpcaddyfile.RegisterHandlerDirective("matrix_media", parseHandlerDirective)
	httpcaddyfile.RegisterDirectiveOrder("matrix_media", httpcaddyfile.Before, "reverse_proxy")
}

// parseGlobalOption parses the matrix_media global option into the
// matrix_media app:
//
//	matrix_media {
//		database sqlite [<path>]
//		database postgres <dsn>
//		storage_path <path>
//		media_cache_size <entries>
//		max_upload_size <size>
//		token_cache_size <entries>
//		rate_limit_keys <entries>
//		token_cache_ttl <duration>
//		token_negative_ttl <duration>
//		redis <url>
//		breaker_threshold <failures>
//		breaker_cooldown <duration>
//		datastore <name> file <path> {
//			kinds local|remote|thumbnails...
//		}
//		datastore <name> s3 {
//			kinds local|remote|thumbnails...
//			endpoint <url>
//			region <region>
//			bucket <bucket>
//			prefix <prefix>
//			path_style
//			access_key_id <key>
//			secret_access_key <secret>
//			session_token <token>
//			use_env_credentials
//			storage_class <class>
//			part_size <size>
//			max_buffer <size>
//			max_retries <n>
//			parallel_parts <n>|off
//			parallel_part_size <size>
//			redirect [<lifetime>] {
//				cdn_base_url <url>
//			}
//		}
//	}
//		previews off
//		previews {
//			allowed_networks <cidr>...
//			https_only
//			max_page_size <size>
//			max_image_size <size>
//			timeout <duration>
//		}
//		federation {
//			trusted_ca_file <pem file>
//			insecure_skip_verify
//			allowed_networks <cidr>...
//			max_remote_size <size>
//			max_fetches <n>
//			max_fetches_per_server <n>
//			notary <server_name> <key_id> <public_key>
//		}
//		thumbnails off
//		thumbnails {
//			size <width> <height> crop|scale
//			dynamic [<max side>]
//			formats webp|avif...
//			pregenerate
//			remote generate|fetch
//			max_pixels <n>
//			max_source_size <size>
//			allow_heif
//			max_frames <n>
//			workers <n>
//			queue <n>
//			max_memory <size>
//			timeout <duration>
//			quarantine_placeholder <image file>
//		}
//		gc off
//		gc {
//			interval <duration>
//			grace <duration>
//			off
//		}
//		retention {
//			remote_max_age <duration>
//			remote_max_bytes <size>
//			thumbnail_max_age <duration>
//			interval <duration>
//		}
//		jobs {
//			lease <duration>
//			poll_interval <duration>
//		}
//
// datastore may be repeated, and size inside thumbnails.
func parseGlobalOption(d *caddyfile.Dispenser, existing any) (any, error) {
	if existing != nil {
		return nil, d.Err("the matrix_media global option may appear only once")
	}
	app := new(App)
	if err := app.UnmarshalCaddyfile(d); err != nil {
		return nil, err
	}
	return httpcaddyfile.App{Name: "matrix_media", Value: caddyconfig.JSON(app, nil)}, nil
}

// UnmarshalCaddyfile sets up the app from the matrix_media global option (see
// parseGlobalOption for the syntax).
func (a *App) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume the option name
	if d.NextArg() {
		return d.ArgErr()
	}
	seen := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		sub := d.Val()
		if seen[sub] {
			return d.Errf("matrix_media: %s specified more than once", sub)
		}
		var err error
		switch sub {
		case "database":
			a.Database, err = parseDatabase(d)
		case "storage_path":
			a.StoragePath, err = singleArg(d)
		case "media_cache_size":
			a.MediaCacheSize, err = positiveInt(d)
		case "max_upload_size":
			a.MaxUploadSize, err = byteSize(d)
		case "rate_limit_keys":
			a.RateLimitKeys, err = positiveInt(d)
		case "token_cache_size":
			a.TokenCacheSize, err = positiveInt(d)
		case "token_cache_ttl":
			a.TokenCacheTTL, err = positiveDuration(d)
		case "token_negative_ttl":
			a.TokenNegativeTTL, err = positiveDuration(d)
		case "breaker_cooldown":
			a.BreakerCooldown, err = positiveDuration(d)
		case "redis":
			a.Redis, err = singleArg(d)
		case "breaker_threshold":
			a.BreakerThreshold, err = positiveInt(d)
		case "previews":
			a.Previews, err = parsePreviews(d)
		case "federation":
			a.Federation, err = parseFederation(d)
		case "thumbnails":
			a.Thumbnails, err = parseThumbnails(d)
		case "gc":
			a.GC, err = parseGC(d)
		case "retention":
			a.Retention, err = parseRetention(d)
		case "jobs":
			a.Jobs, err = parseJobs(d)
		case "datastore":
			var ds DatastoreConfig
			ds, err = parseDatastore(d)
			a.Datastores = append(a.Datastores, ds)
		default:
			return d.Errf("matrix_media: unrecognized global option subdirective '%s'", sub)
		}
		if err != nil {
			return err
		}
		if sub == "datastore" {
			continue // repeatable
		}
		seen[sub] = true
	}
	return nil
}

// parseGC parses "gc off" or a gc block with interval, grace and off.
func parseGC(d *caddyfile.Dispenser) (*GCConfig, error) {
	c := &GCConfig{}
	if d.NextArg() {
		if d.Val() != "off" || d.NextArg() {
			return nil, d.Err("matrix_media: gc takes a block, or 'off'")
		}
		c.Off = true
		return c, nil
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		var err error
		switch sub := d.Val(); sub {
		case "interval":
			c.Interval, err = positiveDuration(d)
		case "grace":
			c.Grace, err = positiveDuration(d)
		case "off":
			if d.NextArg() {
				return nil, d.ArgErr()
			}
			c.Off = true
		default:
			return nil, d.Errf("matrix_media: gc: unrecognized subdirective '%s'", sub)
		}
		if err != nil {
			return nil, err
		}
	}
	return c, nil
}

// parsePreviews parses "previews off" or a previews block.
func parsePreviews(d *caddyfile.Dispenser) (*PreviewsConfig, error) {
	p := &PreviewsConfig{}
	if d.NextArg() {
		if d.Val() != "off" || d.NextArg() {
			return nil, d.Err("matrix_media: previews takes a block, or 'off'")
		}
		p.Disabled = true
		return p, nil
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		var err error
		switch sub := d.Val(); sub {
		case "allowed_networks":
			nets := d.RemainingArgs()
			if len(nets) == 0 {
				return nil, d.ArgErr()
			}
			p.AllowedNetworks = append(p.AllowedNetworks, nets...)
		case "https_only":
			if d.NextArg() {
				return nil, d.ArgErr()
			}
			no := false
			p.AllowHTTP = &no
		case "max_page_size":
			p.MaxPageSize, err = byteSize(d)
		case "max_image_size":
			p.MaxImageSize, err = byteSize(d)
		case "timeout":
			p.Timeout, err = positiveDuration(d)
		default:
			return nil, d.Errf("matrix_media: previews: unrecognized subdirective '%s'", sub)
		}
		if err != nil {
			return nil, err
		}
	}
	return p, nil
}

// parseFederation parses the federation block of the global option.
func parseFederation(d *caddyfile.Dispenser) (*FederationConfig, error) {
	f := &FederationConfig{}
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		var err error
		switch sub := d.Val(); sub {
		case "trusted_ca_file":
			f.TrustedCAFile, err = singleArg(d)
		case "insecure_skip_verify":
			if d.NextArg() {
				return nil, d.ArgErr()
			}
			f.InsecureSkipVerify = true
		case "allowed_networks":
			nets := d.RemainingArgs()
			if len(nets) == 0 {
				return nil, d.ArgErr()
			}
			f.AllowedNetworks = append(f.AllowedNetworks, nets...)
		case "max_remote_size":
			f.MaxRemoteSize, err = byteSize(d)
		case "max_fetches":
			f.MaxFetches, err = positiveInt(d)
		case "max_fetches_per_server":
			f.MaxFetchesPerServer, err = positiveInt(d)
		case "notary":
			args := d.RemainingArgs()
			if len(args) != 3 {
				return nil, d.Err("matrix_media: federation: notary <server_name> <key_id> <public_key>")
			}
			f.Notaries = append(f.Notaries, NotaryConfig{ServerName: args[0], KeyID: args[1], PublicKey: args[2]})
		default:
			return nil, d.Errf("matrix_media: federation: unrecognized subdirective '%s'", sub)
		}
		if err != nil {
			return nil, err
		}
	}
	return f, nil
}

// parseThumbnails parses "thumbnails off" or a thumbnails block.
func parseThumbnails(d *caddyfile.Dispenser) (*ThumbnailsConfig, error) {
	t := &ThumbnailsConfig{}
	if d.NextArg() {
		if d.Val() != "off" || d.NextArg() {
			return nil, d.Err("matrix_media: thumbnails takes a block, or 'off'")
		}
		t.Disabled = true
		return t, nil
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		var err error
		switch sub := d.Val(); sub {
		case "size":
			args := d.RemainingArgs()
			if len(args) != 3 {
				return nil, d.Err("matrix_media: thumbnails: size <width> <height> crop|scale")
			}
			w, werr := strconv.Atoi(args[0])
			h, herr := strconv.Atoi(args[1])
			if werr != nil || herr != nil || w < 1 || h < 1 || (args[2] != "crop" && args[2] != "scale") {
				return nil, d.Errf("matrix_media: thumbnails: invalid size '%s %s %s'", args[0], args[1], args[2])
			}
			t.Sizes = append(t.Sizes, ThumbnailSizeConfig{Width: w, Height: h, Method: args[2]})
		case "dynamic":
			t.Dynamic = true
			if d.NextArg() {
				n, aerr := strconv.Atoi(d.Val())
				if aerr != nil || n < 1 {
					return nil, d.Errf("matrix_media: thumbnails: dynamic max side must be a positive integer, got '%s'", d.Val())
				}
				t.MaxDynamic = n
				if d.NextArg() {
					return nil, d.ArgErr()
				}
			}
		case "formats":
			t.Formats = d.RemainingArgs()
			if len(t.Formats) == 0 {
				return nil, d.ArgErr()
			}
		case "pregenerate", "allow_heif":
			if d.NextArg() {
				return nil, d.ArgErr()
			}
			if sub == "pregenerate" {
				t.Pregenerate = true
			} else {
				t.AllowHEIF = true
			}
		case "remote":
			t.Remote, err = singleArg(d)
		case "max_pixels":
			var n int
			n, err = positiveInt(d)
			t.MaxPixels = int64(n)
		case "max_source_size":
			t.MaxSourceBytes, err = byteSize(d)
		case "max_frames":
			t.MaxFrames, err = positiveInt(d)
		case "workers":
			t.Workers, err = positiveInt(d)
		case "queue":
			t.Queue, err = positiveInt(d)
		case "max_memory":
			t.MaxMemory, err = byteSize(d)
		case "timeout":
			t.Timeout, err = positiveDuration(d)
		case "quarantine_placeholder":
			t.QuarantinePlaceholder, err = singleArg(d)
		default:
			return nil, d.Errf("matrix_media: thumbnails: unrecognized subdirective '%s'", sub)
		}
		if err != nil {
			return nil, err
		}
	}
	return t, nil
}

// parseDatastore parses one "datastore <name> <type> ..." block.
func parseDatastore(d *caddyfile.Dispenser) (DatastoreConfig, error) {
	args := d.RemainingArgs()
	if len(args) < 2 {
		return DatastoreConfig{}, d.ArgErr()
	}
	ds := DatastoreConfig{Name: args[0], Type: args[1]}
	switch ds.Type {
	case DatastoreFile:
		if len(args) != 3 {
			return ds, d.Errf("matrix_media: datastore %s: a file datastore takes one path: datastore <name> file <path>", ds.Name)
		}
		ds.Path = args[2]
	case DatastoreS3:
		if len(args) != 2 {
			return ds, d.ArgErr()
		}
		ds.S3 = &S3Config{}
	default:
		return ds, d.Errf("matrix_media: datastore %s: unknown type '%s' (want file or s3)", ds.Name, ds.Type)
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		sub := d.Val()
		if sub == "kinds" {
			kinds := d.RemainingArgs()
			if len(kinds) == 0 {
				return ds, d.ArgErr()
			}
			ds.Kinds = append(ds.Kinds, kinds...)
			continue
		}
		if ds.S3 == nil {
			return ds, d.Errf("matrix_media: datastore %s: unrecognized subdirective '%s' (a file datastore only takes kinds)", ds.Name, sub)
		}
		if err := parseS3Option(d, ds.Name, sub, ds.S3); err != nil {
			return ds, err
		}
	}
	return ds, nil
}

// parseS3Option parses one line of an s3 datastore block.
func parseS3Option(d *caddyfile.Dispenser, name, sub string, c *S3Config) error {
	var err error
	str := map[string]*string{
		"endpoint": &c.Endpoint, "region": &c.Region, "bucket": &c.Bucket, "prefix": &c.Prefix,
		"access_key_id": &c.AccessKeyID, "secret_access_key": &c.SecretAccessKey,
		"session_token": &c.SessionToken, "storage_class": &c.StorageClass,
	}
	if p, ok := str[sub]; ok {
		*p, err = singleArg(d)
		return err
	}
	switch sub {
	case "path_style", "use_env_credentials":
		if d.NextArg() {
			return d.ArgErr()
		}
		if sub == "path_style" {
			c.PathStyle = true
		} else {
			c.UseEnvCredentials = true
		}
	case "part_size":
		c.PartSize, err = byteSize(d)
	case "max_buffer":
		c.MaxBufferBytes, err = byteSize(d)
	case "max_retries":
		c.MaxRetries, err = positiveInt(d)
	case "parallel_parts":
		v, aerr := singleArg(d)
		if aerr != nil {
			return aerr
		}
		if v == "off" {
			c.ParallelParts = 1
			return nil
		}
		n, aerr := strconv.Atoi(v)
		if aerr != nil || n <= 0 {
			return d.Errf("matrix_media: datastore %s: parallel_parts must be a positive integer or off, got '%s'", name, v)
		}
		c.ParallelParts = n
	case "parallel_part_size":
		c.ParallelPartSize, err = byteSize(d)
	case "redirect":
		c.Redirect = &RedirectConfig{}
		if d.NextArg() {
			dur, perr := caddy.ParseDuration(d.Val())
			if perr != nil || dur <= 0 {
				return d.Errf("matrix_media: datastore %s: redirect lifetime must be a positive duration, got '%s'", name, d.Val())
			}
			c.Redirect.Lifetime = caddy.Duration(dur)
			if d.NextArg() {
				return d.ArgErr()
			}
		}
		for nesting := d.Nesting(); d.NextBlock(nesting); {
			if d.Val() != "cdn_base_url" {
				return d.Errf("matrix_media: datastore %s: redirect: unrecognized subdirective '%s'", name, d.Val())
			}
			if c.Redirect.CDNBaseURL, err = singleArg(d); err != nil {
				return err
			}
		}
	default:
		return d.Errf("matrix_media: datastore %s: unrecognized s3 subdirective '%s'", name, sub)
	}
	return err
}

// parseDatabase parses "database sqlite [<path>]" or "database postgres <dsn>".
func parseDatabase(d *caddyfile.Dispenser) (*Database, error) {
	args := d.RemainingArgs()
	if len(args) == 0 {
		return nil, d.ArgErr()
	}
	db := &Database{Driver: args[0]}
	switch args[0] {
	case DriverSQLite:
		if len(args) > 2 {
			return nil, d.ArgErr()
		}
	case DriverPostgres:
		if len(args) != 2 {
			return nil, d.Err("matrix_media: database postgres needs exactly one connection string")
		}
	default:
		return nil, d.Errf("matrix_media: unknown database driver '%s' (want %s or %s)", args[0], DriverSQLite, DriverPostgres)
	}
	if len(args) == 2 {
		db.DSN = args[1]
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		switch d.Val() {
		case "synchronous":
			v, err := singleArg(d)
			if err != nil {
				return nil, err
			}
			if err := checkSynchronous(db.Driver, v); err != nil {
				return nil, d.Errf("matrix_media: database %v", err)
			}
			db.Synchronous = v
		default:
			return nil, d.Errf("matrix_media: unknown database option '%s'", d.Val())
		}
	}
	return db, nil
}

// parseHandlerDirective parses the matrix_media directive into a handler.
func parseHandlerDirective(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	m := new(Handler)
	if err := m.UnmarshalCaddyfile(h.Dispenser); err != nil {
		return nil, err
	}
	return m, nil
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens:
//
//	matrix_media {
//		server_name <name>
//		homeserver <url>
//		homeserver_timeout <duration>
//		max_upload_size <size>
//		max_pending_uploads <n>|unlimited
//		pending_expiry <duration>
//		max_download_timeout <duration>
//		freeze_legacy [<since RFC 3339>]
//		appservice_registration <path>
//		appservice <id> {
//			as_token <token>
//			sender_localpart <localpart>
//			user_namespace <regex>
//		}
//		admins <user_id>...
//		detect_homeserver_admins
//		allow_user_export
//		admin_token <secret> [<user_id>]
//		signing_key <path>
//		quotas {
//			exempt_admins
//			exempt_appservices
//			rule <user glob> {
//				max_bytes <size>
//				max_files <n>
//				max_pending <n>|unlimited
//				max_upload_size <size>
//				window <duration> [max_bytes <size>] [max_files <n>]
//				info_uri <url>
//				can_upgrade
//			}
//		}
//		rate_limits {
//			<class> [per_ip|per_user|per_server] <limit>/<window> [burst <n>]
//			<class> [per_ip|per_user|per_server] off
//			exempt <cidr|address>...
//			exempt_loopback
//			exempt_admins
//			exempt_appservices
//		}
//	}
//
// In quota rules 0 means no limit (see QuotaConfig); rule and window may be
// repeated. server_name and homeserver are required. appservice_registration,
// appservice, admins, admin_token and user_namespace may be repeated.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume the directive name
	if d.NextArg() {
		return d.ArgErr()
	}
	seen := make(map[string]bool)
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		sub := d.Val()
		if seen[sub] {
			return d.Errf("matrix_media: %s specified more than once", sub)
		}
		var err error
		switch sub {
		case "server_name":
			h.ServerName, err = singleArg(d)
		case "homeserver":
			h.Homeserver, err = singleArg(d)
		case "homeserver_timeout":
			h.HomeserverTimeout, err = positiveDuration(d)
		case "max_upload_size":
			h.MaxUploadSize, err = byteSize(d)
		case "max_pending_uploads":
			h.MaxPendingUploads, err = pendingLimit(d)
		case "pending_expiry":
			h.PendingExpiry, err = positiveDuration(d)
		case "max_download_timeout":
			h.MaxDownloadTimeout, err = positiveDuration(d)
		case "freeze_legacy":
			err = h.parseFreeze(d)
		case "appservice_registration":
			var p string
			p, err = singleArg(d)
			h.AppserviceRegistrations = append(h.AppserviceRegistrations, p)
		case "appservice":
			err = h.parseAppservice(d)
		case "admins":
			ids := d.RemainingArgs()
			if len(ids) == 0 {
				return d.ArgErr()
			}
			h.Admins = append(h.Admins, ids...)
		case "detect_homeserver_admins":
			if d.NextArg() {
				return d.ArgErr()
			}
			h.DetectHomeserverAdmins = true
		case "allow_user_export":
			if d.NextArg() {
				return d.ArgErr()
			}
			h.AllowUserExport = true
		case "signing_key":
			h.SigningKey, err = singleArg(d)
		case "quotas":
			h.Quotas, err = parseQuotas(d)
		case "rate_limits":
			h.RateLimits, err = parseRateLimits(d)
		case "admin_token":
			args := d.RemainingArgs()
			if len(args) < 1 || len(args) > 2 {
				return d.ArgErr()
			}
			t := AdminTokenConfig{Token: args[0]}
			if len(args) == 2 {
				t.UserID = args[1]
			}
			h.AdminTokens = append(h.AdminTokens, t)
		default:
			return d.Errf("matrix_media: unrecognized subdirective '%s'", sub)
		}
		if err != nil {
			return err
		}
		switch sub {
		case "appservice_registration", "appservice", "admins", "admin_token":
		default:
			seen[sub] = true
		}
	}
	if h.ServerName == "" {
		return d.Err("matrix_media: server_name is required")
	}
	if h.Homeserver == "" {
		return d.Err("matrix_media: homeserver is required")
	}
	return nil
}

// parseAppservice parses an "appservice <id> { ... }" block.
func (h *Handler) parseAppservice(d *caddyfile.Dispenser) error {
	id, err := singleArg(d)
	if err != nil {
		return err
	}
	a := AppserviceConfig{ID: id}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		switch sub := d.Val(); sub {
		case "as_token":
			a.ASToken, err = singleArg(d)
		case "sender_localpart":
			a.SenderLocalpart, err = singleArg(d)
		case "user_namespace":
			var re string
			re, err = singleArg(d)
			a.UserNamespaces = append(a.UserNamespaces, re)
		default:
			return d.Errf("matrix_media: appservice %s: unrecognized subdirective '%s'", id, sub)
		}
		if err != nil {
			return err
		}
	}
	if a.ASToken == "" || a.SenderLocalpart == "" {
		return d.Errf("matrix_media: appservice %s: as_token and sender_localpart are required", id)
	}
	h.Appservices = append(h.Appservices, a)
	return nil
}

// parseFreeze parses "freeze_legacy [<since>]".
func (h *Handler) parseFreeze(d *caddyfile.Dispenser) error {
	h.FreezeLegacy = true
	if !d.NextArg() {
		return nil
	}
	since, err := time.Parse(time.RFC3339, d.Val())
	if err != nil {
		return d.Errf("matrix_media: freeze_legacy: the cut-off must be an RFC 3339 time such as 2024-09-01T00:00:00Z: %v", err)
	}
	h.FreezeSince = since
	if d.NextArg() {
		return d.ArgErr()
	}
	return nil
}

// singleArg returns the one argument of the current line.
func singleArg(d *caddyfile.Dispenser) (string, error) {
	if !d.NextArg() {
		return "", d.ArgErr()
	}
	v := d.Val()
	if d.NextArg() {
		return "", d.ArgErr()
	}
	return v, nil
}

// positiveInt parses the one argument of the current line as an integer > 0.
func positiveInt(d *caddyfile.Dispenser) (int, error) {
	name := d.Val()
	v, err := singleArg(d)
	if err != nil {
		return 0, err
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		return 0, d.Errf("matrix_media: %s must be a positive integer, got '%s'", name, v)
	}
	return n, nil
}

// pendingLimit parses max_pending_uploads: a positive integer, or "unlimited"
// (stored as -1).
func pendingLimit(d *caddyfile.Dispenser) (int, error) {
	v, err := singleArg(d)
	if err != nil {
		return 0, err
	}
	if v == "unlimited" {
		return -1, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		return 0, d.Errf("matrix_media: max_pending_uploads must be a positive integer or 'unlimited', got '%s'", v)
	}
	return n, nil
}

// byteSize parses the one argument of the current line as a size of at
// least one byte (internal/bytesize syntax: 50MiB, 10MB, 1.5GiB, 1048576).
func byteSize(d *caddyfile.Dispenser) (int64, error) {
	return sizeArg(d, 1, math.MaxInt64)
}

// sizeArg parses the one argument of the current line as a size from min
// to max bytes.
func sizeArg(d *caddyfile.Dispenser, min, max int64) (int64, error) {
	name := d.Val()
	v, err := singleArg(d)
	if err != nil {
		return 0, err
	}
	n, err := parseSize(v, min, max)
	if err != nil {
		return 0, d.Errf("matrix_media: parsing %s: %v", name, err)
	}
	return n, nil
}

// parseSize parses v as a size (internal/bytesize syntax) from min to max
// bytes: the one way the Caddyfile reads a size.
func parseSize(v string, min, max int64) (int64, error) {
	n, err := bytesize.Parse(v)
	if err != nil {
		return 0, err
	}
	if n < min || n > max {
		return 0, fmt.Errorf("size '%s' must be between %s and %s", v, sizeBound(min), sizeBound(max))
	}
	return n, nil
}

// sizeBound writes a bound of parseSize for an error message.
func sizeBound(n int64) string {
	switch n {
	case 1:
		return "1 byte"
	case math.MaxInt64:
		return "8EiB"
	}
	return bytesize.Format(n)
}

// positiveDuration parses the one argument of the current line as a duration
// greater than zero (Caddy syntax: 90s, 1h30m, 2d).
func positiveDuration(d *caddyfile.Dispenser) (caddy.Duration, error) {
	name := d.Val()
	v, err := singleArg(d)
	if err != nil {
		return 0, err
	}
	dur, err := caddy.ParseDuration(v)
	if err != nil {
		return 0, d.Errf("matrix_media: parsing %s: %v", name, err)
	}
	if dur <= 0 {
		return 0, d.Errf("matrix_media: %s must be positive, got '%s'", name, v)
	}
	return caddy.Duration(dur), nil
}

// Interface guards.
var (
	_ caddyfile.Unmarshaler = (*App)(nil)
	_ caddyfile.Unmarshaler = (*Handler)(nil)
)
