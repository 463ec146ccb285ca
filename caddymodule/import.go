package caddymodule

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/importer"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// The import endpoints of Caddy's admin API, through which "caddy
// matrix-media import" stores media into the running app's stores (see
// adminSink, their client):
//
//	POST /matrix_media/import/lookup                   {"media":["mxc://s/id",...]} -> {"present":{"mxc://s/id":{"sha256":"…","size":n,"deleted":false},...}}
//	PUT  /matrix_media/import/media/<server>/<id>      the item's bytes as the body, its metadata in the
//	                                                   Matrix-Media-Import-Item header -> {"outcome":"imported"|"already_present"}
//	PUT  /matrix_media/import/file/<server>/<id>       no body: Caddy reads the source's file itself (importfile.go)
//	POST /matrix_media/import/quarantine               {"sha256":"…","quarantined_by":"…"} -> {}
//
// The body of the PUT is streamed into the stores (importer.StoreSink),
// never buffered; its read deadline is lifted, so that large items are not
// cut off by the admin server's read timeout. The Matrix-Media-Import-Item
// header holds importItem as JSON, base64url-encoded without padding.
// Refused items are answered with {"error":"…","code":"…"}: 400 "invalid"
// (IDs, header, recorded hash), 409 "conflict" (the ID holds other content,
// is pending, or was deleted), 422 "mismatch" (the bytes do not match the
// recorded SHA-256 or size; nothing is kept), 413 "too_large", 503
// "unavailable", 500 "failed".

// importItemHeader carries the metadata of an imported item.
const importItemHeader = "Matrix-Media-Import-Item"

// maxImportItemHeader bounds the encoded metadata of one item (a file name
// and a Content-Type of at most 255 bytes each, IDs, hashes).
const maxImportItemHeader = 8 << 10

// maxImportLookupRefs bounds the refs of one lookup request, and
// maxImportLookupBody its body (mxc URIs of up to ~520 bytes each).
const (
	maxImportLookupRefs = 4096
	maxImportLookupBody = 4 << 20
)

// importItem is the metadata of PUT /matrix_media/import/media/<server>/<id>.
type importItem struct {
	// Remote marks a cached copy of another server's media.
	Remote bool `json:"remote,omitempty"`
	// UserID is the uploader of local media.
	UserID string `json:"user_id,omitempty"`
	// ContentType and Filename are as uploaded.
	ContentType string `json:"content_type,omitempty"`
	Filename    string `json:"filename,omitempty"`
	// CreatedTS is the upload time in Unix milliseconds (0: unknown, the
	// import time is used).
	CreatedTS int64 `json:"created_ts,omitempty"`
	// Size is the recorded length, -1 when unknown; required.
	Size *int64 `json:"size"`
	// SHA256 is the recorded lowercase hex SHA-256, empty when unknown.
	SHA256 string `json:"sha256,omitempty"`
	// QuarantinedBy carries a quarantine over.
	QuarantinedBy string `json:"quarantined_by,omitempty"`
	// Protected carries the protection from quarantine over.
	Protected bool `json:"protected,omitempty"`
}

// newImportItem describes it for the header.
func newImportItem(it importer.Item) importItem {
	size := it.Size
	doc := importItem{Remote: it.Remote, UserID: it.UserID, ContentType: it.ContentType, Filename: it.Filename,
		Size: &size, SHA256: it.SHA256, QuarantinedBy: it.QuarantinedBy, Protected: it.Protected}
	if !it.CreatedAt.IsZero() {
		doc.CreatedTS = it.CreatedAt.UnixMilli()
	}
	return doc
}

// encode is the header value of the item.
func (doc importItem) encode() (string, error) {
	b, err := json.Marshal(doc)
	if err != nil {
		return "", fmt.Errorf("encoding item metadata: %w", err)
	}
	return base64.RawURLEncoding.EncodeToString(b), nil
}

// decodeStrict decodes one JSON value from r into v, refusing unknown
// fields; errors wrap importer.ErrInvalid.
func decodeStrict(r io.Reader, v any) error {
	dec := json.NewDecoder(r)
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("decoding JSON (%w): %w", err, importer.ErrInvalid)
	}
	return nil
}

// decodeImportItem reads the header value of ref's item; errors wrap
// importer.ErrInvalid.
func decodeImportItem(ref storage.MediaRef, value string) (importer.Item, error) {
	if value == "" || len(value) > maxImportItemHeader {
		return importer.Item{}, fmt.Errorf("the %s header is missing or longer than %d bytes: %w", importItemHeader, maxImportItemHeader, importer.ErrInvalid)
	}
	raw, err := base64.RawURLEncoding.DecodeString(value)
	if err != nil {
		return importer.Item{}, fmt.Errorf("the %s header is not base64url (%w): %w", importItemHeader, err, importer.ErrInvalid)
	}
	var doc importItem
	if err := decodeStrict(strings.NewReader(string(raw)), &doc); err != nil {
		return importer.Item{}, fmt.Errorf("the %s header: %w", importItemHeader, err)
	}
	if doc.Size == nil {
		return importer.Item{}, fmt.Errorf(`the %s header has no "size" (-1 when unknown): %w`, importItemHeader, importer.ErrInvalid)
	}
	it := importer.Item{ServerName: ref.ServerName, MediaID: ref.MediaID, Remote: doc.Remote, UserID: doc.UserID,
		ContentType: doc.ContentType, Filename: doc.Filename, Size: *doc.Size, SHA256: doc.SHA256,
		QuarantinedBy: doc.QuarantinedBy, Protected: doc.Protected}
	if doc.CreatedTS != 0 {
		it.CreatedAt = time.UnixMilli(doc.CreatedTS).UTC()
	}
	return it, importer.ValidateItem(it)
}

// importLookupRequest is the body of POST /matrix_media/import/lookup.
type importLookupRequest struct {
	Media []string `json:"media"`
}

// importPresent is what the target holds for one ref.
type importPresent struct {
	SHA256  string `json:"sha256,omitempty"`
	Size    int64  `json:"size"`
	Deleted bool   `json:"deleted,omitempty"`
}

// importLookupAnswer is the answer of POST /matrix_media/import/lookup:
// the refs the target holds, by mxc URI.
type importLookupAnswer struct {
	Present map[string]importPresent `json:"present"`
}

// importQuarantineRequest is the body of POST /matrix_media/import/quarantine.
type importQuarantineRequest struct {
	SHA256        string `json:"sha256"`
	QuarantinedBy string `json:"quarantined_by"`
}

// importPutAnswer is the answer of a successful PUT.
type importPutAnswer struct {
	Outcome string `json:"outcome"`
}

// Outcome names in importPutAnswer.
const (
	outcomeImported       = "imported"
	outcomeAlreadyPresent = "already_present"
)

// importError is the answer to a refused item.
type importError struct {
	Error string `json:"error"`
	Code  string `json:"code"`
}

// Codes of importError.
const (
	importCodeInvalid     = "invalid"
	importCodeConflict    = "conflict"
	importCodeMismatch    = "mismatch"
	importCodeTooLarge    = "too_large"
	importCodeUnavailable = "unavailable"
	importCodeFailed      = "failed"
)

// importErrorStatus maps an error of the import sink to its status and
// code.
func importErrorStatus(err error) (int, string) {
	switch {
	case errors.Is(err, importer.ErrFileUnreachable):
		return http.StatusBadRequest, importCodeFileUnreachable
	case errors.Is(err, importer.ErrInvalid):
		return http.StatusBadRequest, importCodeInvalid
	case errors.Is(err, importer.ErrConflict):
		return http.StatusConflict, importCodeConflict
	case errors.Is(err, importer.ErrHashMismatch):
		return http.StatusUnprocessableEntity, importCodeMismatch
	case errors.Is(err, storage.ErrTooLarge):
		return http.StatusRequestEntityTooLarge, importCodeTooLarge
	case errors.Is(err, storage.ErrUnavailable):
		return http.StatusServiceUnavailable, importCodeUnavailable
	default:
		return http.StatusInternalServerError, importCodeFailed
	}
}

// writeImportError answers a refused import request.
func writeImportError(w http.ResponseWriter, err error) error {
	status, code := importErrorStatus(err)
	return writeAdminJSON(w, status, importError{Error: err.Error(), Code: code})
}

// importSink is the sink the import endpoints store into: the resources'
// stores, with the media cache told of quarantines carried over.
func (res *resources) importSink() *importer.StoreSink {
	return &importer.StoreSink{Meta: res.meta, Stores: res.stores, Quarantined: res.repo.ForgetContent}
}

func (res *resources) serveImportLookup(w http.ResponseWriter, r *http.Request) error {
	if err := postOnly(r); err != nil {
		return err
	}
	var req importLookupRequest
	if err := decodeStrict(io.LimitReader(r.Body, maxImportLookupBody), &req); err != nil {
		return writeImportError(w, fmt.Errorf("request body: %w", err))
	}
	if len(req.Media) > maxImportLookupRefs {
		return writeImportError(w, fmt.Errorf("at most %d media per lookup: %w", maxImportLookupRefs, importer.ErrInvalid))
	}
	refs := make([]storage.MediaRef, len(req.Media))
	for i, uri := range req.Media {
		ref, err := parseMXC(uri)
		if err != nil {
			return writeImportError(w, fmt.Errorf("%w: %w", err, importer.ErrInvalid))
		}
		refs[i] = ref
	}
	present, err := res.importSink().Lookup(r.Context(), refs)
	if err != nil {
		return writeImportError(w, err)
	}
	out := importLookupAnswer{Present: make(map[string]importPresent, len(present))}
	for ref, p := range present {
		out.Present[mxc(ref)] = importPresent{SHA256: p.SHA256, Size: p.Size, Deleted: p.Deleted}
	}
	return writeAdminJSON(w, http.StatusOK, out)
}

func (res *resources) serveImportMedia(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodPut {
		return apiError(http.StatusMethodNotAllowed, errors.New("method not allowed"))
	}
	server, id, _ := strings.Cut(strings.TrimPrefix(r.URL.Path, adminPrefix+"import/media/"), "/")
	ref, err := parseMXC("mxc://" + server + "/" + id)
	if err != nil {
		return writeImportError(w, fmt.Errorf("%w: %w", err, importer.ErrInvalid))
	}
	it, err := decodeImportItem(ref, r.Header.Get(importItemHeader))
	if err != nil {
		return writeImportError(w, fmt.Errorf("%s: %w", mxc(ref), err))
	}
	// The admin server's read timeout would cut large items off; the body
	// is read at the pace of the stores.
	_ = http.NewResponseController(w).SetReadDeadline(time.Time{})
	out, err := res.importSink().Put(r.Context(), it, r.Body)
	if err != nil {
		return writeImportError(w, err)
	}
	return writeImportOutcome(w, out)
}

// writeImportOutcome answers a stored item.
func writeImportOutcome(w http.ResponseWriter, out importer.Outcome) error {
	name := outcomeImported
	if out == importer.AlreadyPresent {
		name = outcomeAlreadyPresent
	}
	return writeAdminJSON(w, http.StatusOK, importPutAnswer{Outcome: name})
}

func (res *resources) serveImportQuarantine(w http.ResponseWriter, r *http.Request) error {
	if err := postOnly(r); err != nil {
		return err
	}
	var req importQuarantineRequest
	if err := decodeStrict(io.LimitReader(r.Body, maxAdminBody), &req); err != nil {
		return writeImportError(w, fmt.Errorf("request body: %w", err))
	}
	if err := res.importSink().Quarantine(r.Context(), req.SHA256, req.QuarantinedBy); err != nil {
		return writeImportError(w, err)
	}
	return writeAdminJSON(w, http.StatusOK, struct{}{})
}
