package mediaadmin

import (
	"errors"
	"net/http"
	"strconv"
	"strings"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
)

// query reads query parameters with Synapse's rules and messages (its
// parse_integer, parse_boolean and parse_string): the first value of a
// parameter counts.
type query string

// get returns the first value of name and whether it is present; a
// malformed escape gives a 400 M_INVALID_PARAM.
func (q query) get(name string) (string, bool, error) {
	v, found, ok := matrix.QueryParam(string(q), name)
	if !ok {
		return "", true, matrix.InvalidParam("Query parameter " + name + " is not correctly escaped")
	}
	return v, found, nil
}

// has reports whether name is present.
func (q query) has(name string) bool {
	_, found, _ := matrix.QueryParam(string(q), name)
	return found
}

// integer parses a non-negative integer parameter: absent gives def, or
// 400 M_MISSING_PARAM when required; not an integer or negative, 400
// M_INVALID_PARAM.
func (q query) integer(name string, def int64, required bool) (value int64, present bool, err error) {
	v, found, err := q.get(name)
	if err != nil {
		return 0, false, err
	}
	if !found {
		if required {
			return 0, false, matrix.MissingParam("Missing required integer query parameter " + name)
		}
		return def, false, nil
	}
	n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
	if err != nil {
		return 0, true, matrix.InvalidParam("Query parameter " + name + " must be an integer")
	}
	if n < 0 {
		return 0, true, matrix.InvalidParam("Query parameter " + name + " must be a positive integer.")
	}
	return n, true, nil
}

// boolean parses "true" or "false"; absent gives def.
func (q query) boolean(name string, def bool) (bool, error) {
	v, found, err := q.get(name)
	if err != nil || !found {
		return def, err
	}
	switch v {
	case "true":
		return true, nil
	case "false":
		return false, nil
	}
	return false, matrix.InvalidParam("Boolean query parameter '" + name + "' must be one of ['true', 'false']")
}

// enum parses a parameter that must be one of allowed; absent gives def.
func (q query) enum(name, def string, allowed ...string) (string, error) {
	v, found, err := q.get(name)
	if err != nil || !found {
		return def, err
	}
	for _, a := range allowed {
		if v == a {
			return v, nil
		}
	}
	quoted := make([]string, len(allowed))
	for i, a := range allowed {
		quoted[i] = "'" + a + "'"
	}
	return "", matrix.InvalidParam("Query parameter '" + name + "' must be one of [" + strings.Join(quoted, ", ") + "]")
}

// minTimestampMillis is the smallest before_ts accepted: Synapse refuses
// earlier ones as probably given in seconds (Dec 1970 in milliseconds, Aug
// 2920 in seconds).
const minTimestampMillis = 30_000_000_000

// beforeTS parses the required before_ts of the deletion endpoints.
func (q query) beforeTS() (int64, error) {
	ts, _, err := q.integer("before_ts", 0, true)
	if err != nil {
		return 0, err
	}
	if ts < minTimestampMillis {
		return 0, matrix.InvalidParam("Query parameter before_ts you provided is from the year 1970. " +
			"Double check that you are providing a timestamp in milliseconds.")
	}
	return ts, nil
}

// direction parses dir ("f" or "b"): true for backwards.
func (q query) direction() (bool, error) {
	d, err := q.enum("dir", "f", "f", "b")
	return d == "b", err
}

// localUser checks a user ID path parameter of the user media endpoints
// with matrix.SplitUserID, answering as Synapse does: no '@', 400
// M_INVALID_PARAM "Expected UserID string to start with '@'"; no ':' or an
// invalid localpart or length, 400 M_INVALID_PARAM "Expected UserID of the
// form '@localname:domain'"; an invalid server name or one of another
// server, 400 M_UNKNOWN "Can only look up local users".
func localUser(userID, serverName string) error {
	_, server, err := matrix.SplitUserID(userID)
	switch {
	case errors.Is(err, matrix.ErrUserIDNoSigil):
		return matrix.InvalidParam("Expected UserID string to start with '@'")
	case errors.Is(err, matrix.ErrInvalidServerName):
		return matrix.Unknown(http.StatusBadRequest, "Can only look up local users")
	case err != nil:
		return matrix.InvalidParam("Expected UserID of the form '@localname:domain'")
	case server != serverName:
		return matrix.Unknown(http.StatusBadRequest, "Can only look up local users")
	}
	return nil
}
