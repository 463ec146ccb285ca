// Package matrix holds the small pieces of the Matrix protocol that every part
// of the media repository shares: the standard error response, identifier
// grammars (server names, media IDs) and the Content-Disposition rules of the
// content repository.
package matrix

import (
	"encoding/json"
	"net/http"
	"strconv"
	"time"
)

// Standard Matrix error codes used by the media repository.
const (
	CodeNotFound              = "M_NOT_FOUND"
	CodeUnrecognized          = "M_UNRECOGNIZED"
	CodeMissingToken          = "M_MISSING_TOKEN"
	CodeUnknownToken          = "M_UNKNOWN_TOKEN"
	CodeForbidden             = "M_FORBIDDEN"
	CodeGuestAccessForbidden  = "M_GUEST_ACCESS_FORBIDDEN"
	CodeTooLarge              = "M_TOO_LARGE"
	CodeLimitExceeded         = "M_LIMIT_EXCEEDED"
	CodeNotYetUploaded        = "M_NOT_YET_UPLOADED"
	CodeCannotOverwriteMedia  = "M_CANNOT_OVERWRITE_MEDIA"
	CodeInvalidParam          = "M_INVALID_PARAM"
	CodeMissingParam          = "M_MISSING_PARAM"
	CodeBadJSON               = "M_BAD_JSON"
	CodeNotJSON               = "M_NOT_JSON"
	CodeUnknown               = "M_UNKNOWN"
	CodeUnauthorized          = "M_UNAUTHORIZED"
	CodeResourceLimitExceeded = "M_RESOURCE_LIMIT_EXCEEDED"
	// CodeUserLimitExceeded (Matrix v1.18, MSC4335) is a limit of the
	// user's account, sent with info_uri and optionally can_upgrade.
	CodeUserLimitExceeded = "M_USER_LIMIT_EXCEEDED"
)

// Error is a Matrix error response: an HTTP status and a JSON body
// {"errcode": ..., "error": ...}. It also implements the error interface so it
// can travel through ordinary Go error returns.
type Error struct {
	// Status is the HTTP status code.
	Status int
	// ErrCode is the Matrix error code, e.g. M_NOT_FOUND.
	ErrCode string
	// Message is the human-readable "error" field.
	Message string
	// RetryAfter, when positive on a 429, is sent as the Retry-After header
	// (whole seconds, rounded up) and as the deprecated retry_after_ms field.
	RetryAfter time.Duration
	// Extra holds further top-level fields of the JSON body. It cannot
	// override errcode or error.
	Extra map[string]any
}

// Error implements the error interface.
func (e *Error) Error() string {
	return strconv.Itoa(e.Status) + " " + e.ErrCode + ": " + e.Message
}

// Body returns the JSON body of the error.
func (e *Error) Body() []byte {
	if len(e.Extra) == 0 && e.RetryAfter <= 0 {
		// The common case: no map, no reflection over a map.
		b, err := json.Marshal(struct {
			ErrCode string `json:"errcode"`
			Message string `json:"error"`
		}{e.ErrCode, e.Message})
		if err != nil {
			// Marshalling two strings cannot fail.
			return []byte(`{"errcode":"M_UNKNOWN","error":"internal error"}`)
		}
		return b
	}
	m := make(map[string]any, len(e.Extra)+3)
	for k, v := range e.Extra {
		m[k] = v
	}
	m["errcode"] = e.ErrCode
	m["error"] = e.Message
	if e.Status == http.StatusTooManyRequests && e.RetryAfter > 0 {
		m["retry_after_ms"] = e.RetryAfter.Milliseconds()
	}
	b, err := json.Marshal(m)
	if err != nil {
		// Extra held something JSON cannot encode: send the standard fields only.
		fallback := *e
		fallback.Extra = nil
		fallback.RetryAfter = 0
		return fallback.Body()
	}
	return b
}

// WriteError writes err as a Matrix JSON error response with
// Content-Type application/json. A 429 with a positive RetryAfter also gets a
// Retry-After header. Headers already set on w (CORS, Content-Range on a 416,
// ...) are kept.
func WriteError(w http.ResponseWriter, err *Error) {
	body := err.Body()
	h := w.Header()
	h["Content-Type"] = jsonContentType
	h["Content-Length"] = []string{strconv.Itoa(len(body))}
	if err.Status == http.StatusTooManyRequests && err.RetryAfter > 0 {
		secs := int64((err.RetryAfter + time.Second - 1) / time.Second)
		h["Retry-After"] = []string{strconv.FormatInt(secs, 10)}
	}
	w.WriteHeader(err.Status)
	_, _ = w.Write(body)
}

// jsonContentType is the Content-Type of every JSON response. It has
// len == cap, so an append by a later writer copies instead of sharing.
var jsonContentType = []string{"application/json"}[:1:1]

// NewError builds an Error.
func NewError(status int, errCode, message string) *Error {
	return &Error{Status: status, ErrCode: errCode, Message: message}
}

// NotFound is 404 M_NOT_FOUND.
func NotFound(msg string) *Error { return NewError(http.StatusNotFound, CodeNotFound, msg) }

// Unrecognized is 404 M_UNRECOGNIZED, the answer to an unknown endpoint.
func Unrecognized(msg string) *Error {
	return NewError(http.StatusNotFound, CodeUnrecognized, msg)
}

// MethodNotAllowed is 405 M_UNRECOGNIZED, the answer to a known endpoint
// called with the wrong method.
func MethodNotAllowed(msg string) *Error {
	return NewError(http.StatusMethodNotAllowed, CodeUnrecognized, msg)
}

// MissingToken is 401 M_MISSING_TOKEN.
func MissingToken(msg string) *Error {
	return NewError(http.StatusUnauthorized, CodeMissingToken, msg)
}

// UnknownToken is 401 M_UNKNOWN_TOKEN.
func UnknownToken(msg string) *Error {
	return NewError(http.StatusUnauthorized, CodeUnknownToken, msg)
}

// Forbidden is 403 M_FORBIDDEN.
func Forbidden(msg string) *Error { return NewError(http.StatusForbidden, CodeForbidden, msg) }

// GuestAccessForbidden is 403 M_GUEST_ACCESS_FORBIDDEN.
func GuestAccessForbidden(msg string) *Error {
	return NewError(http.StatusForbidden, CodeGuestAccessForbidden, msg)
}

// TooLarge is 413 M_TOO_LARGE.
func TooLarge(msg string) *Error {
	return NewError(http.StatusRequestEntityTooLarge, CodeTooLarge, msg)
}

// LimitExceeded is 429 M_LIMIT_EXCEEDED; retryAfter > 0 adds Retry-After.
func LimitExceeded(msg string, retryAfter time.Duration) *Error {
	e := NewError(http.StatusTooManyRequests, CodeLimitExceeded, msg)
	e.RetryAfter = retryAfter
	return e
}

// NotYetUploaded is 504 M_NOT_YET_UPLOADED.
func NotYetUploaded(msg string) *Error {
	return NewError(http.StatusGatewayTimeout, CodeNotYetUploaded, msg)
}

// CannotOverwriteMedia is 409 M_CANNOT_OVERWRITE_MEDIA.
func CannotOverwriteMedia(msg string) *Error {
	return NewError(http.StatusConflict, CodeCannotOverwriteMedia, msg)
}

// InvalidParam is 400 M_INVALID_PARAM.
func InvalidParam(msg string) *Error {
	return NewError(http.StatusBadRequest, CodeInvalidParam, msg)
}

// MissingParam is 400 M_MISSING_PARAM.
func MissingParam(msg string) *Error {
	return NewError(http.StatusBadRequest, CodeMissingParam, msg)
}

// BadJSON is 400 M_BAD_JSON: well-formed JSON with wrong content.
func BadJSON(msg string) *Error { return NewError(http.StatusBadRequest, CodeBadJSON, msg) }

// NotJSON is 400 M_NOT_JSON: a body that is not JSON at all.
func NotJSON(msg string) *Error { return NewError(http.StatusBadRequest, CodeNotJSON, msg) }

// Unknown is M_UNKNOWN with the given status (400, 500, 502, 504, ...).
func Unknown(status int, msg string) *Error { return NewError(status, CodeUnknown, msg) }
