package auth

import (
	"net/http"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
)

// RequestCredentials returns the credentials a client request presents: the
// access token from the Authorization Bearer header, else from the
// access_token query parameter (still sent by SyTest and old clients), and the
// user_id query parameter of appservices. The token is empty when there is
// none (or it is malformed).
func RequestCredentials(r *http.Request) Credentials {
	var c Credentials
	if vs := r.Header["Authorization"]; len(vs) > 0 {
		v := vs[0]
		const scheme = "Bearer "
		if len(v) > len(scheme) && matrix.EqualFoldASCII(v[:len(scheme)], scheme) {
			c.Token = matrix.TrimSpaceASCII(v[len(scheme):])
		}
	}
	if r.URL.RawQuery == "" {
		return c
	}
	if c.Token == "" {
		if tok, _, ok := matrix.QueryParam(r.URL.RawQuery, "access_token"); ok {
			c.Token = tok
		}
	}
	if uid, _, ok := matrix.QueryParam(r.URL.RawQuery, "user_id"); ok {
		c.AssertedUserID = uid
	}
	return c
}
