package caddymodule

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"

	"github.com/caddyserver/caddy/v2"
)

func init() {
	caddy.RegisterModule(AdminAPI{})
}

// adminPrefix is where the admin API of the module lives.
const adminPrefix = "/matrix_media/"

// AdminAPI adds the module's endpoints to Caddy's admin API:
//
//	GET    /matrix_media/datastores          the datastores and their blob counts
//	GET    /matrix_media/stats[?top=n]       headline numbers: storage, deduplication, media per site, top uploaders, jobs (stats.go)
//	POST   /matrix_media/migrations          {"from":"a","to":"b"}: start moving every blob of a to b
//	GET    /matrix_media/migrations          every migration job and its progress
//	GET    /matrix_media/migrations/<id>     one job
//	DELETE /matrix_media/migrations/<id>     cancel a job (what moved stays moved; start again to resume)
//	POST   /matrix_media/gc                  {"dry_run":true,"grace":"10m"} (both optional): collect orphan blobs now
//	GET    /matrix_media/jobs[?limit=n]      background jobs (purges, retention), newest first, with progress
//	GET    /matrix_media/jobs/<id>           one background job
//	DELETE /matrix_media/jobs/<id>           cancel a background job (what it removed stays removed)
//	POST   /matrix_media/purge               {"before_ts":<ms>}: start removing remote media last accessed before it (202)
//	POST   /matrix_media/quarantine          {"media":["mxc://s/id",...]} or {"user_id":"@u:s"}: quarantine by content
//	POST   /matrix_media/unquarantine        {"media":[...]}: lift the quarantine of their content
//	POST   /matrix_media/protect             {"media":[...],"undo":false}: protect from (or expose to) quarantine
//	POST   /matrix_media/delete              {"media":[...]}, {"user_id":"@u:s","limit":n} or {"server_name":"s","before_ts":ms,"size_gt":n}
//	GET    /matrix_media/media/<server>/<id> what is stored about one media item
//	GET    /matrix_media/usage?server_name=s per-user media counts and bytes (order_by, dir, from, limit, search_term, from_ts, until_ts)
//	GET    /matrix_media/usage/top?limit=n   the users storing the most bytes (usage counters, quotaadmin.go)
//	GET    /matrix_media/usage/user/<user>   one user's usage, quota rule per site and window usage
//	POST   /matrix_media/usage/recount       {"user_id":"@u:s"} (optional): rebuild usage counters
//	GET    /matrix_media/export?user=@u:s    a ZIP archive of the user's media (package mediaarchive), streamed
//	GET    /matrix_media/export?server=s     a ZIP archive of the server name's local media, streamed
//	POST   /matrix_media/import/lookup       {"media":[...]}: which of them are stored (for imports)
//	PUT    /matrix_media/import/media/<server>/<id>  store one imported item (body: its bytes)
//	PUT    /matrix_media/import/file/<server>/<id>   store one imported item read from a local file
//	POST   /matrix_media/import/quarantine   {"sha256":"…","quarantined_by":"…"}: carry a quarantine over
//
// The operators' endpoints are described in adminops.go; they log
// "caddy-admin-api" as who asked. Exports are in export.go, the import
// endpoints in import.go.
//
// It acts on the running config's matrix_media app.
type AdminAPI struct{}

// CaddyModule returns the Caddy module information.
func (AdminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.matrix_media",
		New: func() caddy.Module { return new(AdminAPI) },
	}
}

// Routes implements caddy.AdminRouter.
func (a AdminAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{
		{Pattern: adminPrefix + "datastores", Handler: caddy.AdminHandlerFunc(a.handleDatastores)},
		{Pattern: adminPrefix + "stats", Handler: onResources((*resources).serveStats)},
		{Pattern: adminPrefix + "migrations", Handler: caddy.AdminHandlerFunc(a.handleMigrations)},
		{Pattern: adminPrefix + "migrations/", Handler: caddy.AdminHandlerFunc(a.handleMigration)},
		{Pattern: adminPrefix + "gc", Handler: caddy.AdminHandlerFunc(a.handleGC)},
		{Pattern: adminPrefix + "jobs", Handler: caddy.AdminHandlerFunc(a.handleJobs)},
		{Pattern: adminPrefix + "jobs/", Handler: caddy.AdminHandlerFunc(a.handleJob)},
		{Pattern: adminPrefix + "purge", Handler: caddy.AdminHandlerFunc(a.handlePurge)},
		{Pattern: adminPrefix + "quarantine", Handler: onResources((*resources).serveQuarantine)},
		{Pattern: adminPrefix + "unquarantine", Handler: onResources((*resources).serveUnquarantine)},
		{Pattern: adminPrefix + "protect", Handler: onResources((*resources).serveProtect)},
		{Pattern: adminPrefix + "delete", Handler: onResources((*resources).serveDelete)},
		{Pattern: adminPrefix + "media/", Handler: onResources((*resources).serveMediaInfo)},
		{Pattern: adminPrefix + "usage", Handler: onResources((*resources).serveUsage)},
		{Pattern: adminPrefix + "usage/", Handler: onResources((*resources).serveUsageSub)},
		{Pattern: adminPrefix + "export", Handler: onResources((*resources).serveExport)},
		{Pattern: adminPrefix + "import/lookup", Handler: onResources((*resources).serveImportLookup)},
		{Pattern: adminPrefix + "import/media/", Handler: onResources((*resources).serveImportMedia)},
		{Pattern: adminPrefix + "import/file/", Handler: onResources((*resources).serveImportFile)},
		{Pattern: adminPrefix + "import/quarantine", Handler: onResources((*resources).serveImportQuarantine)},
	}
}

// currentResources returns the resources of the running config's app,
// acquired: the caller must call release when done.
func currentResources() (*resources, error) {
	appIface, err := caddy.ActiveContext().AppIfConfigured("matrix_media")
	if err != nil {
		return nil, apiError(http.StatusNotFound, fmt.Errorf("no matrix_media app is running: %w", err))
	}
	app, ok := appIface.(*App)
	var res *resources
	if ok && app.live != nil {
		res = app.live.Load()
	}
	if res == nil || !res.acquire() {
		return nil, apiError(http.StatusServiceUnavailable, errors.New("the matrix_media app is not ready or is stopping"))
	}
	return res, nil
}

// datastoreInfo describes one datastore in GET /matrix_media/datastores.
type datastoreInfo struct {
	Name  string `json:"name"`
	Blobs int64  `json:"blobs"`
	Bytes int64  `json:"bytes"`
}

func (AdminAPI) handleDatastores(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet {
		return apiError(http.StatusMethodNotAllowed, errors.New("method not allowed"))
	}
	res, err := currentResources()
	if err != nil {
		return err
	}
	defer res.release()
	out, err := res.datastoreInfos(r.Context())
	if err != nil {
		return err
	}
	return writeAdminJSON(w, http.StatusOK, out)
}

// datastoreInfos counts the blobs of each datastore, in configuration
// order.
func (res *resources) datastoreInfos(ctx context.Context) ([]datastoreInfo, error) {
	var out []datastoreInfo
	for _, name := range res.stores.Names() {
		n, b, err := res.meta.CountBlobs(ctx, name)
		if err != nil {
			return nil, apiError(http.StatusInternalServerError, fmt.Errorf("counting blobs of %s: %w", name, err))
		}
		out = append(out, datastoreInfo{Name: name, Blobs: n, Bytes: b})
	}
	return out, nil
}

// migrationRequest is the body of POST /matrix_media/migrations.
type migrationRequest struct {
	From string `json:"from"`
	To   string `json:"to"`
}

func (AdminAPI) handleMigrations(w http.ResponseWriter, r *http.Request) error {
	res, err := currentResources()
	if err != nil {
		return err
	}
	defer res.release()
	switch r.Method {
	case http.MethodGet:
		list, err := res.migrations.list(r.Context())
		if err != nil {
			return apiError(http.StatusInternalServerError, err)
		}
		return writeAdminJSON(w, http.StatusOK, list)
	case http.MethodPost:
		var req migrationRequest
		if err := decodeAdminJSON(r, &req); err != nil {
			return err
		}
		if req.From == "" || req.To == "" {
			return apiError(http.StatusBadRequest, errors.New(`"from" and "to" datastore names are required`))
		}
		job, err := res.migrations.start(r.Context(), req.From, req.To)
		switch {
		case errors.Is(err, errMigrationRunning):
			return apiError(http.StatusConflict, err)
		case errors.Is(err, errMigrationsClosed):
			return apiError(http.StatusServiceUnavailable, err)
		case errors.Is(err, errUnknownDatastore), errors.Is(err, errSameDatastore):
			return apiError(http.StatusBadRequest, err)
		case err != nil:
			return apiError(http.StatusInternalServerError, err)
		}
		return writeAdminJSON(w, http.StatusAccepted, job)
	default:
		return apiError(http.StatusMethodNotAllowed, errors.New("method not allowed"))
	}
}

func (AdminAPI) handleMigration(w http.ResponseWriter, r *http.Request) error {
	id := strings.TrimPrefix(r.URL.Path, adminPrefix+"migrations/")
	res, err := currentResources()
	if err != nil {
		return err
	}
	defer res.release()
	switch r.Method {
	case http.MethodGet, http.MethodDelete:
		get := res.migrations.get
		if r.Method == http.MethodDelete {
			get = res.migrations.cancel
		}
		job, ok, err := get(r.Context(), id)
		switch {
		case err != nil:
			return apiError(http.StatusInternalServerError, err)
		case !ok:
			return apiError(http.StatusNotFound, fmt.Errorf("no migration %q", id))
		}
		return writeAdminJSON(w, http.StatusOK, job)
	default:
		return apiError(http.StatusMethodNotAllowed, errors.New("method not allowed"))
	}
}

func apiError(status int, err error) error {
	return caddy.APIError{HTTPStatus: status, Err: err}
}

// maxAdminBody bounds the JSON body of an admin API request.
const maxAdminBody = 64 << 10

// decodeAdminJSON decodes the JSON body of an admin API request into v,
// refusing unknown fields; an empty body leaves v as it is. A bad body is a
// 400 API error.
func decodeAdminJSON(r *http.Request, v any) error {
	dec := json.NewDecoder(io.LimitReader(r.Body, maxAdminBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil && !errors.Is(err, io.EOF) {
		return apiError(http.StatusBadRequest, fmt.Errorf("decoding request body: %w", err))
	}
	return nil
}

// writeAdminJSON writes v as the JSON answer of an admin API request.
func writeAdminJSON(w http.ResponseWriter, status int, v any) error {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	return json.NewEncoder(w).Encode(v)
}

// Interface guard.
var _ caddy.AdminRouter = AdminAPI{}
