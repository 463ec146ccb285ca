// Command origin is the remote homeserver of the scale benchmark
// (bench/run-scale.sh): the server every remote fetch goes to. On a
// 127.0.0.1 port, over TLS (a certificate from bench/fed/pki), it answers
//
//   - GET /_matrix/federation/v1/media/download/{mediaId}: a multipart/mixed
//     federation media response, "{}" and then -size bytes derived from the
//     media ID (the same ID always gets the same bytes), without checking
//     the request's X-Matrix signature (the benchmark measures the fetching
//     side);
//   - GET /stats: "downloads <n>", the media downloads answered so far, so
//     the benchmark can check that each remote item was fetched once
//     cluster-wide.
//
// It prints "ready <addr>" on standard output once it listens.
//
// Usage:
//
//	origin -port 8448 -cert cert.pem -key key.pem -size 65536
package main

import (
	"crypto/sha256"
	"encoding/binary"
	"flag"
	"fmt"
	"mime/multipart"
	"net"
	"net/http"
	"net/textproto"
	"os"
	"strconv"
	"sync/atomic"
	"time"
)

func main() {
	port := flag.Int("port", 0, "TCP port on 127.0.0.1 (default 0: any free port)")
	cert := flag.String("cert", "", "TLS certificate file (required)")
	key := flag.String("key", "", "TLS key file (required)")
	size := flag.Int("size", 64<<10, "bytes of every media")
	flag.Parse()
	if *cert == "" || *key == "" || *size < 0 {
		flag.Usage()
		os.Exit(2)
	}
	if err := run(*port, *cert, *key, *size); err != nil {
		fmt.Fprintln(os.Stderr, "origin:", err)
		os.Exit(1)
	}
}

// run serves until the process ends.
func run(port int, cert, key string, size int) error {
	ln, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(port))
	if err != nil {
		return fmt.Errorf("listening: %w", err)
	}
	var downloads atomic.Int64
	mux := http.NewServeMux()
	mux.HandleFunc("GET /_matrix/federation/v1/media/download/{id}", func(w http.ResponseWriter, r *http.Request) {
		downloads.Add(1)
		mw := multipart.NewWriter(w)
		w.Header().Set("Content-Type", "multipart/mixed; boundary="+mw.Boundary())
		meta, err := mw.CreatePart(textproto.MIMEHeader{"Content-Type": {"application/json"}})
		if err == nil {
			_, err = meta.Write([]byte("{}"))
		}
		var part interface{ Write([]byte) (int, error) }
		if err == nil {
			part, err = mw.CreatePart(textproto.MIMEHeader{"Content-Type": {"application/octet-stream"}})
		}
		if err == nil {
			_, err = part.Write(content(r.PathValue("id"), size))
		}
		if err == nil {
			err = mw.Close()
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "origin: writing a response:", err)
		}
	})
	mux.HandleFunc("GET /stats", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintf(w, "downloads %d\n", downloads.Load())
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	fmt.Println("ready", ln.Addr().String())
	return srv.ServeTLS(ln, cert, key)
}

// content returns size bytes derived from id: SHA-256 in counter mode.
func content(id string, size int) []byte {
	out := make([]byte, 0, size+sha256.Size)
	var ctr [8]byte
	for i := uint64(0); len(out) < size; i++ {
		binary.BigEndian.PutUint64(ctr[:], i)
		sum := sha256.Sum256(append([]byte(id), ctr[:]...))
		out = append(out, sum[:]...)
	}
	return out[:size]
}
