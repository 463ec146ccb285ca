package mediaarchive

import (
	"archive/zip"
	"bufio"
	"encoding/json"
	"fmt"
	"html/template"
	"net/url"
	"strings"
	"time"
	"unicode"

	"github.com/dustin/go-humanize"

	"github.com/caddy-matrix-media/caddy-matrix-media/matrix"
)

// index.html is written in three parts, each its own template so that rows
// are rendered one at a time from the spool: the head (with every style
// inline: the page loads nothing from the network and runs no script), one
// row per item, and the foot.
var (
	indexHead = template.Must(template.New("head").Parse(`<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src 'self' file:; style-src 'unsafe-inline'">
<title>{{.Title}}</title>
<style>
body { font: 15px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1b1b1b; background: #fff; }
h1 { font-size: 1.4em; margin: 0 0 .2em; }
p.summary { color: #555; margin: 0 0 1.2em; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; vertical-align: middle; padding: .4em .6em; border-bottom: 1px solid #ddd; }
th { background: #f4f4f4; position: sticky; top: 0; }
td.preview { width: 96px; height: 72px; text-align: center; }
td.preview img { max-width: 96px; max-height: 72px; object-fit: contain; }
td.name { overflow-wrap: anywhere; max-width: 28em; }
td.size, td.date { white-space: nowrap; }
td.mxc code { font-size: .85em; overflow-wrap: anywhere; }
.note { display: block; color: #a33; font-size: .85em; }
tr.withheld td.name { color: #777; }
</style>
</head>
<body>
<h1>{{.Title}}</h1>
<p class="summary">Exported {{.Created}} &middot; {{.Items}} items &middot; {{.Files}} files, {{.Bytes}}</p>
<table>
<thead><tr><th>Preview</th><th>Name</th><th>Type</th><th>Size</th><th>Uploaded</th><th>Matrix URI</th></tr></thead>
<tbody>
`))
	indexRow = template.Must(template.New("row").Parse(`<tr class="item{{if not .File}} withheld{{end}}">
<td class="preview">{{if .Preview}}<a href="{{.File}}"><img src="{{.Preview}}" alt=""></a>{{end}}</td>
<td class="name">{{if .File}}<a class="label" href="{{.File}}">{{.Name}}</a>{{else}}<span class="label">{{.Name}}</span>{{end}}{{if .Note}}<span class="note">{{.Note}}</span>{{end}}</td>
<td class="type">{{.Type}}</td>
<td class="size">{{.Size}}</td>
<td class="date">{{.Date}}</td>
<td class="mxc"><code>{{.MXC}}</code></td>
</tr>
`))
	indexFoot = template.Must(template.New("foot").Parse(`</tbody>
</table>
</body>
</html>
`))
)

// indexHeadData fills indexHead.
type indexHeadData struct {
	Title, Created, Bytes string
	Items, Files          int64
}

// indexRowData fills indexRow.
type indexRowData struct {
	// File and Preview are escaped relative URLs (template.URL: each path
	// segment was escaped here, so that "#" or "?" in a name stay part of
	// it).
	File, Preview template.URL
	Name, Note    string
	Type, Size    string
	Date, MXC     string
}

// writeIndex writes index.html from the spool.
func (e *exporter) writeIndex() error {
	fw, err := e.zw.CreateHeader(&zip.FileHeader{Name: IndexName, Method: zip.Deflate, Modified: e.created})
	if err != nil {
		return fmt.Errorf("exporting media: %w", err)
	}
	bw := bufio.NewWriter(fw)
	title := "Media of " + e.subject.UserID
	if e.subject.Kind == KindServer {
		title = "Media of " + e.subject.ServerName
	}
	err = indexHead.Execute(bw, indexHeadData{
		Title: title, Created: e.created.Format("2006-01-02 15:04 UTC"),
		Items: e.sum.Items, Files: e.sum.Files, Bytes: humanize.IBytes(uint64(max(e.sum.Bytes, 0))),
	})
	if err != nil {
		return fmt.Errorf("exporting media: writing index.html: %w", err)
	}
	err = e.spoolLines(func(line []byte) error {
		var it Item
		if err := json.Unmarshal(line, &it); err != nil {
			return fmt.Errorf("decoding a spooled item: %w", err)
		}
		return indexRow.Execute(bw, rowData(it))
	})
	if err != nil {
		return fmt.Errorf("exporting media: writing index.html: %w", err)
	}
	if err := indexFoot.Execute(bw, nil); err != nil {
		return fmt.Errorf("exporting media: writing index.html: %w", err)
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("exporting media: writing index.html: %w", err)
	}
	return nil
}

// rowData is what index.html shows of an item.
func rowData(it Item) indexRowData {
	d := indexRowData{
		File: relURL(it.File), Name: DisplayName(it.UploadName), Type: it.ContentType,
		Size: humanize.IBytes(uint64(max(it.Size, 0))), Date: it.CreatedAt.UTC().Format(time.DateTime), MXC: it.MXC,
	}
	if d.Name == "" {
		d.Name = "(unnamed)"
	}
	switch {
	case it.Thumbnail != "":
		d.Preview = relURL(it.Thumbnail)
	case it.File != "" && it.Error == "" && browserImages[mediaType(it.ContentType)]:
		d.Preview = d.File
	}
	switch {
	case it.Quarantined && it.File == "":
		d.Note = "quarantined: content not included"
	case it.Error != "":
		d.Note = it.Error
	}
	return d
}

// relURL escapes each segment of an archive path for a relative link.
func relURL(p string) template.URL {
	if p == "" {
		return ""
	}
	segs := strings.Split(p, "/")
	for i, s := range segs {
		segs[i] = url.PathEscape(s)
	}
	return template.URL(strings.Join(segs, "/"))
}

// DisplayName is an upload name as index.html shows it: invalid UTF-8,
// control characters and bidirectional controls become U+FFFD, so that
// what is shown is what the name holds, in its real order.
func DisplayName(name string) string {
	s := strings.ToValidUTF8(name, "\uFFFD")
	return strings.Map(func(r rune) rune {
		if unicode.IsControl(r) || matrix.HasBidiControls(string(r)) {
			return '\uFFFD'
		}
		return r
	}, s)
}
