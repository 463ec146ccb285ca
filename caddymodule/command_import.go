package caddymodule

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/spf13/cobra"

	"github.com/caddy-matrix-media/caddy-matrix-media/importer"
	"github.com/caddy-matrix-media/caddy-matrix-media/importer/dendrite"
	"github.com/caddy-matrix-media/caddy-matrix-media/importer/mmr"
	"github.com/caddy-matrix-media/caddy-matrix-media/importer/synapse"
	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
	"github.com/caddy-matrix-media/caddy-matrix-media/mediaarchive"
	"github.com/caddy-matrix-media/caddy-matrix-media/storage"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"
)

// importSourceOpener opens a source of one kind from what --from names: the
// source's own configuration file (or, for an archive, the archive). Every
// importer package exports one as Open.
type importSourceOpener func(ctx context.Context, from string) (importer.Source, error)

// importSources are the kinds of "caddy matrix-media import <kind>".
// Commands only read it; tests register sources of their own from _test.go
// files before running one.
var importSources = map[string]importSourceOpener{
	// A ZIP archive written by "caddy matrix-media export" (--from names
	// the archive file).
	"archive": mediaarchive.Open,
	// Dendrite's dendrite.yaml: its media API database and base_path.
	"dendrite": dendrite.Open,
	// matrix-media-repo's media-repo.yaml (or config directory): its
	// PostgreSQL database and file and S3 datastores.
	"mmr": mmr.Open,
	// Synapse's homeserver.yaml: its database and media_store_path.
	"synapse": synapse.Open,
}

// importKinds lists the kinds of importSources, for help texts.
func importKinds() string {
	return strings.Join(slices.Sorted(maps.Keys(importSources)), ", ")
}

// importCommand is "caddy matrix-media import".
func importCommand() *cobra.Command {
	c := &cobra.Command{
		Use:   "import <kind> (--from <file> | <file>) [--server-name <name>]... [--include-remote] [--dry-run] [--workers n]",
		Short: "Import media from another media repository into the running Caddy (IDs kept, deduplicated, verified, resumable)",
		Args:  cobra.RangeArgs(1, 2),
		RunE:  runImport,
	}
	c.Flags().String("from", "", "The source's own configuration file (for kind archive: the archive)")
	c.Flags().StringArray("server-name", nil, "Import only local media of this server name (repeatable; default: every server name)")
	c.Flags().Bool("include-remote", false, "Also import the source's cache of remote media")
	c.Flags().Bool("dry-run", false, "Read and verify every item that would be imported, write nothing")
	c.Flags().Int("workers", importer.DefaultWorkers, "How many items are read and stored at once")
	c.Flags().Bool("send-bytes", false, "Always send the bytes to Caddy, even when Caddy could read the source's files itself (same machine)")
	return c
}

// importRequest is what the command line asks to import.
type importRequest struct {
	kind, from string
	open       importSourceOpener
	opts       importer.Options
}

// parseImportArgs reads the arguments and flags of the import command.
func parseImportArgs(cmd *cobra.Command, args []string) (importRequest, error) {
	fl := cmd.Flags()
	req := importRequest{kind: args[0]}
	var ok bool
	if req.open, ok = importSources[req.kind]; !ok {
		return req, fmt.Errorf("unknown import kind %q (known: %s)", req.kind, importKinds())
	}
	req.from, _ = fl.GetString("from")
	if len(args) == 2 {
		if req.from != "" && req.from != args[1] {
			return req, fmt.Errorf("give the source once: --from %q or %q", req.from, args[1])
		}
		req.from = args[1]
	}
	if req.from == "" {
		return req, errors.New("--from is required: the source's configuration file")
	}
	req.opts.Filter.ServerNames, _ = fl.GetStringArray("server-name")
	for _, name := range req.opts.Filter.ServerNames {
		if !matrix.ValidServerName(name) {
			return req, fmt.Errorf("--server-name %q is not a server name", name)
		}
	}
	req.opts.Filter.IncludeRemote, _ = fl.GetBool("include-remote")
	req.opts.DryRun, _ = fl.GetBool("dry-run")
	req.opts.Workers, _ = fl.GetInt("workers")
	if req.opts.Workers < 1 || req.opts.Workers > 256 {
		return req, fmt.Errorf("--workers %d: want 1 to 256", req.opts.Workers)
	}
	return req, nil
}

func runImport(cmd *cobra.Command, args []string) error {
	req, err := parseImportArgs(cmd, args)
	if err != nil {
		return err
	}
	addr, err := adminAddress(cmd)
	if err != nil {
		return err
	}
	ctx := cmd.Context()
	if ctx == nil {
		ctx = context.Background()
	}
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt)
	defer stop()
	sendBytes, _ := cmd.Flags().GetBool("send-bytes")
	return runImportWith(ctx, req, &adminSink{addr: addr, streamOnly: sendBytes}, cmd.OutOrStdout(), newProgressBar(cmd.ErrOrStderr()))
}

// runImportWith runs the import into sink, drawing progress on bar and
// printing the final report to out. It fails when the run did not finish or
// when anything was mismatched, conflicting or failed.
func runImportWith(ctx context.Context, req importRequest, sink importer.Sink, out io.Writer, bar *progressBar) error {
	src, err := req.open(ctx, req.from)
	if err != nil {
		return fmt.Errorf("opening the %s source %s: %w", req.kind, req.from, err)
	}
	defer src.Close()
	req.opts.Progress = func(p importer.Progress) { bar.text(importProgressLine(p), !p.Final) }
	rep, err := importer.Run(ctx, src, sink, req.opts)
	bar.finish()
	fmt.Fprint(out, rep.String())
	switch {
	case errors.Is(err, context.Canceled):
		return errors.New("import interrupted: run the same command again to resume")
	case err != nil:
		return err
	case !rep.OK():
		return fmt.Errorf("%d hash mismatches, %d conflicts and %d failures (see the report); run the same command again after fixing them",
			rep.Mismatched, rep.Conflicts, rep.Failed)
	}
	return nil
}

// importProgressLine is one line of an import's progress: a bar when the
// source announced its size, items and bytes done, problems, and the ETA.
func importProgressLine(p importer.Progress) string {
	var b strings.Builder
	if frac, ok := p.Fraction(); ok {
		b.WriteString(meter(frac) + " ")
	}
	fmt.Fprintf(&b, "%d", p.Total())
	if p.Totals.Items >= 0 {
		fmt.Fprintf(&b, "/%d", p.Totals.Items)
	}
	fmt.Fprintf(&b, " items, %s", humanize.IBytes(uint64(max(p.Bytes, 0))))
	if p.Totals.Bytes >= 0 {
		fmt.Fprintf(&b, "/%s", humanize.IBytes(uint64(p.Totals.Bytes)))
	}
	fmt.Fprintf(&b, ", %d imported, %d already present", p.Imported, p.AlreadyPresent)
	if n := p.Total() - p.Imported - p.AlreadyPresent; n > 0 {
		fmt.Fprintf(&b, ", %d not imported", n)
	}
	if eta, ok := p.ETA(); ok && !p.Final {
		fmt.Fprintf(&b, ", ETA %s", eta.Round(time.Second))
	}
	return b.String()
}

// adminSink is an importer.Sink that stores into a running Caddy through
// the import endpoints of its admin API (import.go). Every request closes
// its connection: caddycmd.AdminAPIRequest builds a new client per call,
// whose idle connections would otherwise stay open until the admin server
// closes them.
type adminSink struct {
	// addr is the admin API's address.
	addr string
	// streamOnly sends every item's bytes, never asking Caddy to read the
	// source's files itself (--send-bytes).
	streamOnly bool
}

// importSendChunk is the most an item's body is sent in at once: its bytes
// are read from the source and written to the connection in pieces of this
// size (net/http's own copy of a request body uses 32 KiB), so that a large
// item costs few system calls on either side.
const importSendChunk = 256 << 10

// sendChunk is the piece size for a body of size bytes (-1: unknown): the
// whole body and one byte more (to see its end in the same read) when that
// is less than importSendChunk.
func sendChunk(size int64) int {
	if size >= 0 && size < importSendChunk {
		return int(size) + 1
	}
	return importSendChunk
}

var _ importer.Sink = (*adminSink)(nil)

// request sends one request and decodes its JSON answer into out; refused
// requests give the error their answer names (see importAnswerError).
func (s *adminSink) request(method, path string, headers http.Header, body io.Reader, out any) error {
	h := http.Header{"Connection": {"close"}}
	maps.Copy(h, headers)
	resp, err := caddycmd.AdminAPIRequest(s.addr, method, path, h, body)
	if err != nil {
		return importAnswerError(err)
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(io.LimitReader(resp.Body, 64<<20)).Decode(out); err != nil {
		return fmt.Errorf("decoding the answer to %s %s: %w", method, path, err)
	}
	return nil
}

// Lookup implements importer.Sink, asking about at most
// maxImportLookupRefs refs per request.
func (s *adminSink) Lookup(ctx context.Context, refs []storage.MediaRef) (map[storage.MediaRef]importer.Present, error) {
	out := make(map[storage.MediaRef]importer.Present, len(refs))
	for chunk := range slices.Chunk(refs, maxImportLookupRefs) {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		req := importLookupRequest{Media: make([]string, len(chunk))}
		for i, r := range chunk {
			req.Media[i] = mxc(r)
		}
		body, err := json.Marshal(req)
		if err != nil {
			return nil, fmt.Errorf("encoding lookup: %w", err)
		}
		var ans importLookupAnswer
		if err := s.request(http.MethodPost, adminPrefix+"import/lookup", nil, strings.NewReader(string(body)), &ans); err != nil {
			return nil, err
		}
		for uri, p := range ans.Present {
			ref, err := parseMXC(uri)
			if err != nil {
				return nil, fmt.Errorf("lookup answer: %w", err)
			}
			out[ref] = importer.Present{SHA256: p.SHA256, Size: p.Size, Deleted: p.Deleted}
		}
	}
	return out, nil
}

// Put implements importer.Sink: the body streams as the request body,
// through a gate that is shut before Put returns, so that nothing reads it
// afterwards (the HTTP client may still be sending when the answer
// arrives). A body that fails (for example the importer's check of the
// recorded hash, or ctx) fails the request with that error.
func (s *adminSink) Put(ctx context.Context, it importer.Item, body io.Reader) (importer.Outcome, error) {
	hdr, err := newImportItem(it).encode()
	if err != nil {
		return 0, err
	}
	gate := &gatedBody{ctx: ctx, r: body, chunk: sendChunk(it.Size)}
	path := adminPrefix + "import/media/" + url.PathEscape(it.ServerName) + "/" + url.PathEscape(it.MediaID)
	var ans importPutAnswer
	err = s.request(http.MethodPut, path, http.Header{importItemHeader: {hdr}, "Content-Type": {"application/octet-stream"}}, gate, &ans)
	if berr := gate.shut(); berr != nil {
		return 0, fmt.Errorf("sending mxc://%s/%s: %w", it.ServerName, it.MediaID, berr)
	}
	if err != nil {
		return 0, fmt.Errorf("storing mxc://%s/%s: %w", it.ServerName, it.MediaID, err)
	}
	return importOutcome(it, ans)
}

var _ importer.FileSink = (*adminSink)(nil)

// PutFile implements importer.FileSink: Caddy is asked to read f's file
// itself (importfile.go). A Caddy that cannot, or that predates the
// endpoint (404), gives an error wrapping importer.ErrFileUnreachable.
func (s *adminSink) PutFile(ctx context.Context, it importer.Item, f *os.File) (importer.Outcome, error) {
	if s.streamOnly {
		return 0, fmt.Errorf("--send-bytes: %w", importer.ErrFileUnreachable)
	}
	if err := ctx.Err(); err != nil {
		return 0, err
	}
	file, err := localFileName(f)
	if err != nil {
		return 0, err
	}
	fileHdr, err := file.encode()
	if err != nil {
		return 0, err
	}
	hdr, err := newImportItem(it).encode()
	if err != nil {
		return 0, err
	}
	path := adminPrefix + "import/file/" + url.PathEscape(it.ServerName) + "/" + url.PathEscape(it.MediaID)
	var ans importPutAnswer
	err = s.request(http.MethodPut, path, http.Header{importItemHeader: {hdr}, importFileHeader: {fileHdr}}, nil, &ans)
	if err != nil {
		if !errors.Is(err, importer.ErrFileUnreachable) && strings.Contains(err.Error(), "HTTP 404") {
			err = fmt.Errorf("%w: %w", err, importer.ErrFileUnreachable)
		}
		return 0, fmt.Errorf("storing mxc://%s/%s: %w", it.ServerName, it.MediaID, err)
	}
	return importOutcome(it, ans)
}

// importOutcome reads the answer of a stored item.
func importOutcome(it importer.Item, ans importPutAnswer) (importer.Outcome, error) {
	switch ans.Outcome {
	case outcomeImported:
		return importer.Imported, nil
	case outcomeAlreadyPresent:
		return importer.AlreadyPresent, nil
	default:
		return 0, fmt.Errorf("storing mxc://%s/%s: unknown outcome %q", it.ServerName, it.MediaID, ans.Outcome)
	}
}

// Quarantine implements importer.Sink.
func (s *adminSink) Quarantine(ctx context.Context, sha256, by string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	body, err := json.Marshal(importQuarantineRequest{SHA256: sha256, QuarantinedBy: by})
	if err != nil {
		return fmt.Errorf("encoding quarantine: %w", err)
	}
	var ans struct{}
	return s.request(http.MethodPost, adminPrefix+"import/quarantine", nil, strings.NewReader(string(body)), &ans)
}

// gatedBody passes a body to the HTTP client until shut.
type gatedBody struct {
	ctx context.Context
	r   io.Reader
	// chunk is the size of the pieces WriteTo sends.
	chunk int

	mu     sync.Mutex
	closed bool
	// err is the first error of r or ctx (io.EOF excluded).
	err error
}

// errGateShut fails reads after Put returned.
var errGateShut = errors.New("request body read after the request ended")

// Read implements io.Reader.
func (g *gatedBody) Read(p []byte) (int, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	switch {
	case g.closed:
		return 0, errGateShut
	case g.err != nil:
		return 0, g.err
	}
	if err := g.ctx.Err(); err != nil {
		g.err = err
		return 0, err
	}
	n, err := g.r.Read(p)
	if err != nil && !errors.Is(err, io.EOF) {
		g.err = err
	}
	return n, err
}

// WriteTo implements io.WriterTo, which the HTTP client's copy of a
// request body prefers: the body is sent in pieces of g.chunk bytes, each
// read through Read (and so through the gate). The buffer is WriteTo's own,
// so a piece read before shut may still be written to w afterwards without
// touching anything of Put's.
func (g *gatedBody) WriteTo(w io.Writer) (int64, error) {
	buf := make([]byte, max(g.chunk, 1))
	var total int64
	for {
		n, err := g.Read(buf)
		if n > 0 {
			wn, werr := w.Write(buf[:n])
			total += int64(wn)
			if werr != nil {
				return total, werr
			}
		}
		if errors.Is(err, io.EOF) {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}

// shut stops further reads, waiting for one in progress, and returns the
// body's error, if any.
func (g *gatedBody) shut() error {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.closed = true
	return g.err
}

// remoteError is an import request refused by the admin API: the answer's
// message, wrapping the importer error its code names.
type remoteError struct {
	msg  string
	kind error
}

func (e *remoteError) Error() string { return e.msg }
func (e *remoteError) Unwrap() error { return e.kind }

// importAnswerError turns an error of caddycmd.AdminAPIRequest into the
// import error its answer describes: the request helper reports a refused
// request as "caddy responded with error: HTTP <status>: <body>", and the
// import endpoints' bodies are importError. Other errors stay as they are.
func importAnswerError(err error) error {
	msg := err.Error()
	i := strings.Index(msg, "HTTP ")
	if i < 0 {
		return err
	}
	status, body, ok := strings.Cut(msg[i+len("HTTP "):], ": ")
	if _, serr := strconv.Atoi(status); !ok || serr != nil {
		return err
	}
	var e importError
	if json.Unmarshal([]byte(body), &e) != nil || e.Error == "" {
		return err
	}
	kinds := map[string]error{
		importCodeInvalid:     importer.ErrInvalid,
		importCodeConflict:    importer.ErrConflict,
		importCodeMismatch:    importer.ErrHashMismatch,
		importCodeTooLarge:    storage.ErrTooLarge,
		importCodeUnavailable: storage.ErrUnavailable,
		// Caddy cannot read the source's file itself: send the bytes.
		importCodeFileUnreachable: importer.ErrFileUnreachable,
	}
	kind, ok := kinds[e.Code]
	if !ok {
		return fmt.Errorf("admin API (HTTP %s): %s", status, e.Error)
	}
	return &remoteError{msg: e.Error, kind: kind}
}
