// Package mediaarchive is the archive format of media exports: one user's
// media, or one server name's local media, in a ZIP file that a person can
// open offline and that package importer brings into another installation
// ("caddy matrix-media import archive <file>").
//
// # Layout (version 1)
//
//	media/<server>/<media_id>/<name>   the content, byte for byte as stored
//	thumbnails/<server>/<media_id>.jpg a small preview of an image (or .png),
//	                                   when the exporter had a Thumbnailer
//	manifest.json                      what the archive holds (Manifest)
//	index.html                         a self-contained page listing every
//	                                   item, with previews of images
//
// <server> is the server name with ":" written "_" (a port separator is not
// allowed in Windows file names); <name> is the upload name made safe
// (SafeFileName): never a path, never a control character, at most
// maxNameBytes bytes. The manifest's "file" of each item is authoritative:
// readers never derive a path from a name. Content types that are already
// compressed (JPEG, PNG, WebP, GIF, video, audio, ZIP, ...) are stored as
// they are; everything else is deflated.
//
// Quarantined media that are refused (Media.Refused) are listed in the
// manifest, marked quarantined, without their bytes. Media whose blob is
// missing from its datastore are listed with "error" and no file; media
// whose bytes do not hash to their recorded SHA-256 are exported as read,
// with "error" set, and an importer reports them as mismatches.
//
// # Writing is streaming
//
// Export copies each blob from its datastore straight into the ZIP writer
// (sendfile-free, but never buffered whole), and writes manifest.json and
// index.html at the end of the archive from a spool file on disk that
// received one line of JSON per item while the files were written. Memory
// use is therefore bounded by one item's metadata, one thumbnail
// (Thumbnailer's bound), the ZIP writer's buffers, and the ZIP central
// directory that archive/zip keeps until it is written at the very end:
// about 180 bytes plus the entry's path per file in the archive (measured:
// 241 bytes with a 65-byte path), i.e. about 50 MB for 100,000 images with
// their previews. Nothing grows with the size of the content.
//
// # Reading validates
//
// OpenSource reads an archive through io.ReaderAt (the ZIP central
// directory, then manifest.json streamed with a bound on every JSON value)
// and validates it before anything is listed: format and version, IDs with
// the matrix validators, SHA-256 syntax, and that every file the manifest
// names is an entry of the archive. Items are then listed in manifest order
// without holding the manifest in memory, and their bytes are read from the
// ZIP entry, whose CRC-32 archive/zip checks and whose SHA-256 the import
// core checks against the manifest.
//
// The package does not import the thumbnails package (libvips, cgo):
// thumbnails come through the Thumbnailer interface, which the Caddy layer
// implements with the module's thumbnail generator.
package mediaarchive

import (
	"mime"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
)

// Format and Version identify the archive format in manifest.json.
const (
	// Format is the manifest's "format".
	Format = "caddy-matrix-media-archive"
	// Version is the manifest's "version" this package writes and reads.
	Version = 1
)

// Names of the archive's fixed entries and directories.
const (
	// ManifestName is the manifest's entry.
	ManifestName = "manifest.json"
	// IndexName is the HTML index's entry.
	IndexName = "index.html"
	// mediaDir and thumbnailDir hold the content and the previews.
	mediaDir     = "media/"
	thumbnailDir = "thumbnails/"
)

// Manifest is manifest.json, as written. Items are written between the
// header fields and the end of the object; readers stream them.
type Manifest struct {
	// Format is always Format; Version is Version.
	Format  string `json:"format"`
	Version int    `json:"version"`
	// CreatedAt is when the export started.
	CreatedAt time.Time `json:"created_at"`
	// Export says what was exported.
	Export Subject `json:"export"`
	// Totals count what the manifest lists.
	Totals Totals `json:"totals"`
	// Items are the media items, in listing order.
	Items []Item `json:"items"`
}

// Subject is what an export selected: one user's media on a server name, or
// a server name's local media.
type Subject struct {
	// Kind is "user" or "server".
	Kind string `json:"kind"`
	// ServerName is the server name whose local media were exported.
	ServerName string `json:"server_name"`
	// UserID is the user whose media were exported (Kind "user").
	UserID string `json:"user_id,omitempty"`
}

// Kinds of Subject.
const (
	KindUser   = "user"
	KindServer = "server"
)

// Totals count the items of a manifest.
type Totals struct {
	// Items is how many items the manifest lists.
	Items int64 `json:"items"`
	// Files is how many of them have their bytes in the archive, and Bytes
	// the sum of their sizes.
	Files int64 `json:"files"`
	Bytes int64 `json:"bytes"`
}

// Item is one media item in the manifest.
type Item struct {
	// MXC is mxc://ServerName/MediaID.
	MXC        string `json:"mxc"`
	ServerName string `json:"server_name"`
	MediaID    string `json:"media_id"`
	// Remote is true for a cached copy of another server's media.
	Remote bool `json:"remote"`
	// UserID is the uploader; empty for remote media.
	UserID string `json:"user_id,omitempty"`
	// UploadName is the file name given at upload, exactly; empty when none.
	UploadName string `json:"upload_name,omitempty"`
	// ContentType is the Content-Type exactly as uploaded.
	ContentType string `json:"content_type"`
	// Size and SHA256 are the content's length and lowercase hex SHA-256,
	// as recorded by the exporting store.
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"`
	// CreatedAt is when the item was uploaded (or cached).
	CreatedAt time.Time `json:"created_at"`
	// Quarantined is true when the item's content was quarantined;
	// QuarantinedBy says by whom. A quarantined item that is not Protected
	// is refused: its bytes are not in the archive.
	Quarantined   bool   `json:"quarantined"`
	QuarantinedBy string `json:"quarantined_by,omitempty"`
	// Protected items are never quarantined.
	Protected bool `json:"protected"`
	// File is the archive entry holding the content; empty when the bytes
	// are not in the archive (refused, or missing at export).
	File string `json:"file,omitempty"`
	// Thumbnail is the archive entry of a small preview; empty when none.
	Thumbnail string `json:"thumbnail,omitempty"`
	// Error describes a problem found at export: the content was missing
	// from its datastore, or did not match its SHA-256.
	Error string `json:"error,omitempty"`
}

// maxNameBytes bounds a file name in the archive (most file systems allow
// 255 bytes; a margin is left for extraction tools that add suffixes).
const maxNameBytes = 120

// maxExtBytes is the longest extension SafeFileName keeps when it shortens
// a name.
const maxExtBytes = 16

// SafeFileName returns name as a file name that is safe on every common file
// system and never a path: invalid UTF-8, control and bidirectional control
// characters, path separators and the characters Windows forbids become
// "_"; leading dots and spaces and trailing dots and spaces are dropped;
// Windows' reserved device names get a "_" prefix; the result is at most
// maxNameBytes bytes, keeping the extension. An empty result is fallback
// plus an extension for contentType (when one is known).
func SafeFileName(name, fallback, contentType string) string {
	s := strings.ToValidUTF8(name, "_")
	s = matrix.StripBidiControls(s)
	s = strings.Map(func(r rune) rune {
		switch {
		case r == '/' || r == '\\' || r == 0:
			return '_'
		case strings.ContainsRune(`<>:"|?*`, r):
			return '_'
		case unicode.IsControl(r) || r == utf8.RuneError || r == '\uFEFF':
			return '_'
		}
		return r
	}, s)
	s = strings.TrimLeft(s, ". ")
	s = strings.TrimRight(s, ". ")
	if s == "" {
		s = fallback + extensionFor(contentType)
	}
	if reservedWindowsName(s) {
		s = "_" + s
	}
	return truncateName(s, maxNameBytes)
}

// truncateName shortens s to at most n bytes on a rune boundary, keeping a
// short extension.
func truncateName(s string, n int) string {
	if len(s) <= n {
		return s
	}
	ext := ""
	if i := strings.LastIndexByte(s, '.'); i > 0 && len(s)-i <= maxExtBytes {
		ext = s[i:]
	}
	base := s[:len(s)-len(ext)]
	cut := n - len(ext)
	for cut > 0 && !utf8.RuneStart(base[cut]) {
		cut--
	}
	return strings.TrimRight(base[:cut], ". ") + ext
}

// reservedWindowsName reports whether s is, before its first dot, a device
// name Windows reserves (CON, NUL, COM1, ...).
func reservedWindowsName(s string) bool {
	stem, _, _ := strings.Cut(s, ".")
	switch strings.ToUpper(strings.TrimRight(stem, " ")) {
	case "CON", "PRN", "AUX", "NUL",
		"COM1", "COM2", "COM3", "COM4", "COM5", "COM6", "COM7", "COM8", "COM9",
		"LPT1", "LPT2", "LPT3", "LPT4", "LPT5", "LPT6", "LPT7", "LPT8", "LPT9":
		return true
	}
	return false
}

// extensions are the file extensions given to unnamed content of common
// types (a fixed table, so that archives do not depend on the exporting
// machine's mime.types).
var extensions = map[string]string{
	"image/jpeg": ".jpg", "image/png": ".png", "image/gif": ".gif", "image/webp": ".webp",
	"image/avif": ".avif", "image/heic": ".heic", "image/svg+xml": ".svg", "image/bmp": ".bmp",
	"image/tiff": ".tiff", "video/mp4": ".mp4", "video/webm": ".webm", "video/quicktime": ".mov",
	"video/ogg": ".ogv", "audio/ogg": ".ogg", "audio/mpeg": ".mp3", "audio/mp4": ".m4a",
	"audio/webm": ".weba", "audio/wav": ".wav", "audio/flac": ".flac", "audio/aac": ".aac",
	"text/plain": ".txt", "text/html": ".html", "text/csv": ".csv", "application/json": ".json",
	"application/pdf": ".pdf", "application/zip": ".zip", "application/gzip": ".gz",
}

// mediaType returns the lowercase media type of a Content-Type, without
// parameters; "" when it cannot be parsed.
func mediaType(contentType string) string {
	mt, _, err := mime.ParseMediaType(contentType)
	if err != nil {
		return ""
	}
	return mt
}

// extensionFor returns the extension of unnamed content of contentType, or
// "".
func extensionFor(contentType string) string {
	return extensions[mediaType(contentType)]
}

// precompressed are media types whose content is already compressed; they
// are stored, not deflated again.
var precompressed = map[string]bool{
	"image/jpeg": true, "image/png": true, "image/webp": true, "image/gif": true, "image/avif": true,
	"image/heic": true, "image/heif": true, "image/jxl": true,
	"application/zip": true, "application/gzip": true, "application/x-gzip": true, "application/zstd": true,
	"application/x-xz": true, "application/x-bzip2": true, "application/x-7z-compressed": true,
	"application/vnd.rar": true, "application/x-rar-compressed": true, "application/epub+zip": true,
	"application/java-archive": true, "application/vnd.android.package-archive": true,
}

// stored reports whether content of contentType is stored rather than
// deflated.
func stored(contentType string) bool {
	mt := mediaType(contentType)
	return precompressed[mt] || strings.HasPrefix(mt, "video/") || strings.HasPrefix(mt, "audio/")
}

// serverDir is a server name as a directory name: ":" (the port separator)
// becomes "_", which no server name contains, so that distinct server names
// give distinct directories.
func serverDir(serverName string) string {
	return strings.ReplaceAll(serverName, ":", "_")
}

// mediaPath is the entry of an item's content.
func mediaPath(serverName, mediaID, name string) string {
	return mediaDir + serverDir(serverName) + "/" + mediaID + "/" + name
}

// thumbnailPath is the entry of an item's preview; ext includes the dot.
func thumbnailPath(serverName, mediaID, ext string) string {
	return thumbnailDir + serverDir(serverName) + "/" + mediaID + ext
}

// browserImages are the image types every current browser displays in an
// <img>; index.html scales the original of these when there is no preview.
var browserImages = map[string]bool{
	"image/jpeg": true, "image/png": true, "image/gif": true, "image/webp": true,
	"image/avif": true, "image/bmp": true, "image/apng": true,
}
