// Package caddymatrixmedia is the package xcaddy imports when this module is
// given to "xcaddy build --with github.com/caddy-matrix-media/caddy-matrix-media":
// importing it registers the matrix_media Caddy modules (see caddymodule).
package caddymatrixmedia

import (
	// Registers the matrix_media app, handler, global option and directive.
	_ "github.com/caddy-matrix-media/caddy-matrix-media/caddymodule"
)
