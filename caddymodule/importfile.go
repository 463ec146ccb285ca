package caddymodule

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/caddy-matrix-media/caddy-matrix-media/importer"
)

// Imports from files on the same machine. When "caddy matrix-media import"
// talks to a Caddy on the same machine, Caddy can read the source's files
// itself instead of receiving their bytes over the admin socket, which
// saves copying every byte through the command and the socket (about a
// third of the CPU of a large import):
//
//	PUT /matrix_media/import/file/<server>/<id>   no body; the item's metadata in the Matrix-Media-Import-Item
//	                                              header, the file in Matrix-Media-Import-File -> as import/media
//
// The command opens the source's file, as it would to send it, and names
// it by its absolute path (as the kernel resolved it) together with its
// device, inode and size. Caddy opens that path without following a final
// symbolic link and imports it only when it is the same file: same device
// and inode, a regular file of the same size. Anything else (a Caddy in
// another container or on another machine, a file Caddy's user may not
// read, a path that names another file by now) is refused with 400
// "file_unreachable", and the command sends the bytes through
// import/media instead, for that item and the rest of the run.
//
// The endpoint is answered only on a connection from a loopback address or
// over a Unix socket: the admin API can already load any configuration
// (including a file_server of /), so it grants nothing new there; on any
// other address it is refused the same way.

// importFileHeader carries importFile, as JSON encoded in base64url
// without padding.
const importFileHeader = "Matrix-Media-Import-File"

// importCodeFileUnreachable is the importError code of a file Caddy cannot
// read itself.
const importCodeFileUnreachable = "file_unreachable"

// importFile names a source file by path and identity.
type importFile struct {
	// Path is the file's absolute path.
	Path string `json:"path"`
	// Device and Inode identify the file the command opened.
	Device uint64 `json:"dev"`
	Inode  uint64 `json:"ino"`
	// Size is its length when the command opened it.
	Size int64 `json:"size"`
}

// encode is the header value of f.
func (f importFile) encode() (string, error) {
	b, err := json.Marshal(f)
	if err != nil {
		return "", fmt.Errorf("encoding file identity: %w", err)
	}
	return base64.RawURLEncoding.EncodeToString(b), nil
}

// decodeImportFile reads the header value; errors wrap importer.ErrInvalid.
func decodeImportFile(value string) (importFile, error) {
	var f importFile
	if value == "" || len(value) > maxImportItemHeader {
		return f, fmt.Errorf("the %s header is missing or longer than %d bytes: %w", importFileHeader, maxImportItemHeader, importer.ErrInvalid)
	}
	raw, err := base64.RawURLEncoding.DecodeString(value)
	if err != nil {
		return f, fmt.Errorf("the %s header is not base64url (%w): %w", importFileHeader, err, importer.ErrInvalid)
	}
	if err := decodeStrict(strings.NewReader(string(raw)), &f); err != nil {
		return f, fmt.Errorf("the %s header: %w", importFileHeader, err)
	}
	if !strings.HasPrefix(f.Path, "/") || strings.ContainsRune(f.Path, 0) || f.Size < 0 {
		return f, fmt.Errorf("the %s header: want an absolute path and a size: %w", importFileHeader, importer.ErrInvalid)
	}
	return f, nil
}

// errFileUnreachable marks the refusals answered with
// importCodeFileUnreachable.
var errFileUnreachable = importer.ErrFileUnreachable

// localAdminConn reports whether r came over a Unix socket or from a
// loopback address.
func localAdminConn(r *http.Request) bool {
	if r.RemoteAddr == "" || strings.HasPrefix(r.RemoteAddr, "@") || strings.HasPrefix(r.RemoteAddr, "/") {
		// A Unix socket's peer: unnamed ("" or "@"), abstract or a path.
		return true
	}
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return false
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// openImportFile opens the file the command named, making sure it is the
// same file; errors wrap importer.ErrFileUnreachable.
func openImportFile(want importFile) (*os.File, error) {
	f, err := openNoFollow(want.Path)
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w: %w", want.Path, err, errFileUnreachable)
	}
	fi, err := f.Stat()
	if err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("%s: %w: %w", want.Path, err, errFileUnreachable)
	}
	dev, ino, ok := fileIdentity(fi)
	switch {
	case !fi.Mode().IsRegular():
		err = errors.New("not a regular file")
	case !ok || dev != want.Device || ino != want.Inode:
		err = errors.New("not the file the command opened (another machine, container or file)")
	case fi.Size() != want.Size:
		err = fmt.Errorf("%d bytes, the command saw %d", fi.Size(), want.Size)
	}
	if err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("%s: %w: %w", want.Path, err, errFileUnreachable)
	}
	return f, nil
}

func (res *resources) serveImportFile(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodPut {
		return apiError(http.StatusMethodNotAllowed, errors.New("method not allowed"))
	}
	if !localAdminConn(r) {
		return writeImportError(w, fmt.Errorf("files are read only for commands on this machine (peer %s): %w", r.RemoteAddr, errFileUnreachable))
	}
	server, id, _ := strings.Cut(strings.TrimPrefix(r.URL.Path, adminPrefix+"import/file/"), "/")
	ref, err := parseMXC("mxc://" + server + "/" + id)
	if err != nil {
		return writeImportError(w, fmt.Errorf("%w: %w", err, importer.ErrInvalid))
	}
	it, err := decodeImportItem(ref, r.Header.Get(importItemHeader))
	if err != nil {
		return writeImportError(w, fmt.Errorf("%s: %w", mxc(ref), err))
	}
	want, err := decodeImportFile(r.Header.Get(importFileHeader))
	if err != nil {
		return writeImportError(w, fmt.Errorf("%s: %w", mxc(ref), err))
	}
	f, err := openImportFile(want)
	if err != nil {
		return writeImportError(w, err)
	}
	defer f.Close()
	// Reading a large file takes longer than the admin server's write
	// timeout allows for the answer.
	_ = http.NewResponseController(w).SetWriteDeadline(time.Time{})
	out, err := res.importSink().Put(r.Context(), it, f)
	if err != nil {
		return writeImportError(w, err)
	}
	return writeImportOutcome(w, out)
}

// localFileName describes f for importFile: the absolute path the kernel
// resolved for it, its identity and size; errors wrap
// importer.ErrFileUnreachable.
func localFileName(f *os.File) (importFile, error) {
	fi, err := f.Stat()
	if err != nil {
		return importFile{}, fmt.Errorf("%w: %w", err, errFileUnreachable)
	}
	dev, ino, ok := fileIdentity(fi)
	if !ok || !fi.Mode().IsRegular() {
		return importFile{}, fmt.Errorf("%s: no file identity on this system: %w", f.Name(), errFileUnreachable)
	}
	path, err := resolvedPath(f)
	if err != nil {
		return importFile{}, fmt.Errorf("%s: %w: %w", f.Name(), err, errFileUnreachable)
	}
	return importFile{Path: path, Device: dev, Inode: ino, Size: fi.Size()}, nil
}
