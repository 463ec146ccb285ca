// Command sink is the reference of the upload benchmark (bench/run-uploads.sh):
// the least an HTTP server can do to store an upload by content. For every
// POST it reads the body while hashing it with SHA-256 into a temp file in
// its directory, then renames the file to its hash and answers
// {"content_uri":"mxc://sink/<hash>"}. It does not fsync and keeps no
// database: it is what "the speed of the disk" means for the module.
//
// With -durable it keeps the module's promise for the bytes, and nothing
// more: the temp file is fsynced before the rename and the directory after
// it, so an answer means the blob survives a crash of the machine. It is the
// physical limit of a durable upload on the same disk (still no database).
//
//	sink -listen 127.0.0.1:8080 -dir /tmp/sink [-durable]
//
// It prints "ready" once it listens.
package main

import (
	"crypto/sha256"
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
)

// chunkSize is the copy buffer, as large as the module's.
const chunkSize = 256 << 10

var bufs = sync.Pool{New: func() any { b := make([]byte, chunkSize); return &b }}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to listen on")
	dir := flag.String("dir", "", "directory the blobs are written to (required)")
	durable := flag.Bool("durable", false, "fsync each file before its rename and the directory after it")
	flag.Parse()
	if *dir == "" {
		fmt.Fprintln(os.Stderr, "usage: sink -listen ADDR -dir DIR")
		os.Exit(2)
	}
	if err := os.MkdirAll(*dir, 0o755); err != nil {
		fmt.Fprintf(os.Stderr, "sink: %v\n", err)
		os.Exit(1)
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintf(os.Stderr, "sink: %v\n", err)
		os.Exit(1)
	}
	fmt.Println("ready", ln.Addr())
	err = http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			http.Error(w, "POST only", http.StatusMethodNotAllowed)
			return
		}
		sum, err := store(*dir, r.Body, *durable)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"content_uri":"mxc://sink/`+sum+`"}`)
	}))
	fmt.Fprintf(os.Stderr, "sink: %v\n", err)
	os.Exit(1)
}

// store writes body to a temp file in dir while hashing it and renames the
// file to the hex SHA-256 of its content, which it returns. With durable the
// file is fsynced before the rename and dir after it.
func store(dir string, body io.Reader, durable bool) (string, error) {
	f, err := os.CreateTemp(dir, "tmp-*")
	if err != nil {
		return "", fmt.Errorf("creating temp file: %w", err)
	}
	h := sha256.New()
	bp := bufs.Get().(*[]byte)
	_, err = io.CopyBuffer(io.MultiWriter(f, h), body, *bp)
	bufs.Put(bp)
	if durable && err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(f.Name())
		return "", fmt.Errorf("writing body: %w", err)
	}
	sum := hex.EncodeToString(h.Sum(nil))
	if err := os.Rename(f.Name(), filepath.Join(dir, sum)); err != nil {
		os.Remove(f.Name())
		return "", fmt.Errorf("renaming: %w", err)
	}
	if durable {
		if err := syncDir(dir); err != nil {
			return "", err
		}
	}
	return sum, nil
}

// syncDir fsyncs the directory dir, making a rename in it durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("opening directory: %w", err)
	}
	err = d.Sync()
	if cerr := d.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("syncing directory: %w", err)
	}
	return nil
}
