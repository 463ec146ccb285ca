// Command pgcount is the PostgreSQL counting proxy of the scale benchmark
// (bench/run-scale.sh). It listens on a 127.0.0.1 port, forwards every
// connection to a PostgreSQL server unchanged, and counts the protocol
// messages that pass, so that the benchmark can tell how many round trips
// each kind of request costs the database:
//
//   - from the client (frontend): Sync ('S', the end of one extended-protocol
//     exchange) and Query ('Q', one simple-protocol exchange); each is one
//     round trip, their sum is printed as "round_trips";
//   - from the server (backend): ReadyForQuery ('Z', one per round trip
//     answered, a cross-check) and NotificationResponse ('A', a NOTIFY
//     delivered to a listener);
//   - statements executed (a simple Query's statements, an Execute of a
//     portal bound to a parsed statement) by their first keyword: "writes"
//     are INSERT, UPDATE, DELETE and MERGE (or a WITH that contains one),
//     "write_txs" the transactions that wrote: an explicit one (BEGIN ...
//     COMMIT/END) with at least one write, or a write outside one
//     (autocommit). Statement texts are tracked per connection from Parse
//     and Bind messages, so prepared statements are classified too;
//   - with -tag, the executions of statements whose text contains that
//     string ("tagged", "tagged_writes" of them and "tagged_write_txs", the
//     transactions they wrote in), so that a background batch (the
//     benchmark tags the access-time flush) can be told apart from the
//     requests' own statements.
//
// The startup packet, and an SSLRequest or GSSENCRequest before it (answered
// with one byte, 'N' on a server without TLS), are forwarded and not
// counted. When the server accepts TLS or GSS encryption the connection is
// still forwarded but no longer parsed (counted in "unparsed_conns"); the
// benchmark connects with sslmode=disable.
//
// GET /stats on the -stats port answers the counters as "name value" lines:
//
//	round_trips 1234
//	sync 1200
//	query 34
//	ready 1234
//	notifications 5
//	writes 300
//	write_txs 100
//	tagged 0
//	tagged_writes 0
//	tagged_write_txs 0
//	conns 12
//	unparsed_conns 0
//
// It prints "ready <addr>" on standard output once both ports listen.
//
// Usage:
//
//	pgcount -port 6432 -stats-port 6433 -upstream 127.0.0.1:5432
package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"unicode"
)

// Protocol codes of the untyped packets a client may send first.
const (
	sslRequest    = 80877103
	gssEncRequest = 80877104
	cancelRequest = 80877102
	// maxStartup bounds an untyped packet's length (PostgreSQL's own limit
	// is 10000 bytes).
	maxStartup = 10000
)

// counters are the proxy's totals, updated by every connection.
type counters struct {
	sync, query, ready, notifications, conns, unparsed atomic.Int64
	writes, writeTxs, tagged, taggedWrites, taggedTxs  atomic.Int64
	// tag is the -tag substring ("" = none).
	tag string
}

func main() {
	port := flag.Int("port", 0, "TCP port on 127.0.0.1 for clients (default 0: any free port)")
	statsPort := flag.Int("stats-port", 0, "TCP port on 127.0.0.1 for GET /stats (default 0: any free port)")
	upstream := flag.String("upstream", "", "host:port of the PostgreSQL server (required)")
	tag := flag.String("tag", "", "count the executions of statements containing this string apart (default none)")
	flag.Parse()
	if *upstream == "" {
		flag.Usage()
		os.Exit(2)
	}
	if err := run(*port, *statsPort, *upstream, *tag); err != nil {
		fmt.Fprintln(os.Stderr, "pgcount:", err)
		os.Exit(1)
	}
}

// run serves the proxy and the stats endpoint until the process ends.
func run(port, statsPort int, upstream, tag string) error {
	ln, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(port))
	if err != nil {
		return fmt.Errorf("listening: %w", err)
	}
	sln, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(statsPort))
	if err != nil {
		return fmt.Errorf("listening for stats: %w", err)
	}
	c := &counters{tag: tag}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /stats", func(w http.ResponseWriter, _ *http.Request) {
		s, q := c.sync.Load(), c.query.Load()
		fmt.Fprintf(w, "round_trips %d\nsync %d\nquery %d\nready %d\nnotifications %d\nwrites %d\nwrite_txs %d\ntagged %d\ntagged_writes %d\ntagged_write_txs %d\nconns %d\nunparsed_conns %d\n",
			s+q, s, q, c.ready.Load(), c.notifications.Load(), c.writes.Load(), c.writeTxs.Load(),
			c.tagged.Load(), c.taggedWrites.Load(), c.taggedTxs.Load(), c.conns.Load(), c.unparsed.Load())
	})
	go func() { _ = http.Serve(sln, mux) }()
	fmt.Println("ready", ln.Addr().String(), sln.Addr().String())
	return c.serve(ln, upstream)
}

// serve proxies every connection ln accepts to upstream until ln is closed.
func (c *counters) serve(ln net.Listener, upstream string) error {
	for {
		conn, err := ln.Accept()
		if err != nil {
			return fmt.Errorf("accepting: %w", err)
		}
		go func() {
			if err := c.proxy(conn, upstream); err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				fmt.Fprintln(os.Stderr, "pgcount:", err)
			}
		}()
	}
}

// proxy forwards one client connection to upstream, counting messages.
func (c *counters) proxy(client net.Conn, upstream string) error {
	defer client.Close()
	server, err := net.Dial("tcp", upstream)
	if err != nil {
		return fmt.Errorf("dialing %s: %w", upstream, err)
	}
	defer server.Close()
	c.conns.Add(1)
	cr, sr := bufio.NewReader(client), bufio.NewReader(server)
	parsed, err := startup(cr, client, sr, server)
	if err != nil {
		return err
	}
	done := make(chan error, 2)
	if !parsed {
		c.unparsed.Add(1)
		go func() { _, err := io.Copy(server, cr); done <- err }()
		go func() { _, err := io.Copy(client, sr); done <- err }()
	} else {
		st := &session{c: c, stmts: map[string]string{}, portals: map[string]string{}}
		go func() { done <- relay(cr, server, st.frontend) }()
		go func() {
			done <- relay(sr, client, func(t byte, _ []byte) {
				switch t {
				case 'Z':
					c.ready.Add(1)
				case 'A':
					c.notifications.Add(1)
				}
			})
		}()
	}
	err = <-done
	// the first direction to end closes both sockets (deferred), which
	// ends the other
	return err
}

// startup forwards the client's untyped packets: SSL or GSS encryption
// requests (and the server's one-byte answers) until the startup message.
// It reports false when the server accepted encryption (the rest cannot be
// parsed) or the packet was a cancel request.
func startup(cr *bufio.Reader, client net.Conn, sr *bufio.Reader, server net.Conn) (bool, error) {
	for {
		var hdr [8]byte
		if _, err := io.ReadFull(cr, hdr[:]); err != nil {
			return false, fmt.Errorf("reading the startup packet: %w", err)
		}
		n := binary.BigEndian.Uint32(hdr[:4])
		code := binary.BigEndian.Uint32(hdr[4:])
		if n < 8 || n > maxStartup {
			return false, fmt.Errorf("startup packet length %d out of range", n)
		}
		pkt := make([]byte, n)
		copy(pkt, hdr[:])
		if _, err := io.ReadFull(cr, pkt[8:]); err != nil {
			return false, fmt.Errorf("reading the startup packet: %w", err)
		}
		if _, err := server.Write(pkt); err != nil {
			return false, fmt.Errorf("forwarding the startup packet: %w", err)
		}
		switch code {
		case sslRequest, gssEncRequest:
			b, err := sr.ReadByte()
			if err != nil {
				return false, fmt.Errorf("reading the encryption answer: %w", err)
			}
			if _, err := client.Write([]byte{b}); err != nil {
				return false, fmt.Errorf("forwarding the encryption answer: %w", err)
			}
			if b != 'N' {
				return false, nil
			}
		case cancelRequest:
			return false, nil
		default:
			return true, nil
		}
	}
}

// relay copies typed protocol messages (1 type byte, a 4-byte length that
// counts itself, the payload) from r to dst, calling count with each type,
// and with the payload of the small frontend messages statements are
// classified from (Query, Parse, Bind, Execute; nil for others).
// Messages are written through a buffer flushed whenever r has nothing more
// buffered, so a batch the peer sent in one write leaves in one write.
func relay(r *bufio.Reader, dst io.Writer, count func(t byte, payload []byte)) error {
	var hdr [5]byte
	w := bufio.NewWriterSize(dst, 32<<10)
	for {
		if r.Buffered() == 0 {
			if err := w.Flush(); err != nil {
				return err
			}
		}
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return err
		}
		n := binary.BigEndian.Uint32(hdr[1:])
		if n < 4 {
			return fmt.Errorf("message %q with length %d", hdr[0], n)
		}
		if _, err := w.Write(hdr[:]); err != nil {
			return err
		}
		switch hdr[0] {
		case 'Q', 'P', 'B', 'E':
			if n-4 <= maxPayload {
				payload := make([]byte, n-4)
				if _, err := io.ReadFull(r, payload); err != nil {
					return err
				}
				count(hdr[0], payload)
				if _, err := w.Write(payload); err != nil {
					return err
				}
				continue
			}
		}
		count(hdr[0], nil)
		if _, err := io.CopyN(w, r, int64(n-4)); err != nil {
			return err
		}
	}
}

// maxPayload bounds the messages whose payload is parsed; a longer one is
// forwarded without classification.
const maxPayload = 1 << 20

// session is the statement tracking of one connection (used by its
// frontend relay goroutine only).
type session struct {
	c *counters
	// stmts maps a prepared statement's name to its text, portals a
	// portal's name to its statement's text.
	stmts, portals map[string]string
	// inTx is set between BEGIN and COMMIT/ROLLBACK; wrote when a write
	// ran in it, taggedWrote when a tagged one did.
	inTx, wrote, taggedWrote bool
}

// frontend counts one frontend message.
func (s *session) frontend(t byte, payload []byte) {
	switch t {
	case 'S':
		s.c.sync.Add(1)
	case 'Q':
		s.c.query.Add(1)
		if q, _, ok := cstring(payload); ok {
			for stmt := range strings.SplitSeq(q, ";") {
				s.executed(stmt)
			}
		}
	case 'P':
		name, rest, ok := cstring(payload)
		if q, _, ok2 := cstring(rest); ok && ok2 {
			s.stmts[name] = q
		}
	case 'B':
		portal, rest, ok := cstring(payload)
		if name, _, ok2 := cstring(rest); ok && ok2 {
			s.portals[portal] = s.stmts[name]
		}
	case 'E':
		if portal, _, ok := cstring(payload); ok {
			s.executed(s.portals[portal])
		}
	}
}

// executed classifies one executed statement.
func (s *session) executed(stmt string) {
	tagged := s.c.tag != "" && strings.Contains(stmt, s.c.tag)
	if tagged {
		s.c.tagged.Add(1)
	}
	switch keyword(stmt) {
	case "BEGIN", "START":
		s.inTx, s.wrote, s.taggedWrote = true, false, false
	case "COMMIT", "END":
		if s.inTx && s.wrote {
			s.c.writeTxs.Add(1)
		}
		if s.inTx && s.taggedWrote {
			s.c.taggedTxs.Add(1)
		}
		s.inTx, s.wrote, s.taggedWrote = false, false, false
	case "ROLLBACK", "ABORT":
		s.inTx, s.wrote, s.taggedWrote = false, false, false
	case "INSERT", "UPDATE", "DELETE", "MERGE":
		s.write(tagged)
	case "WITH":
		u := strings.ToUpper(stmt)
		for _, w := range []string{"INSERT ", "UPDATE ", "DELETE ", "MERGE "} {
			if strings.Contains(u, w) {
				s.write(tagged)
				return
			}
		}
	}
}

// write counts a write statement (tagged: also as a tagged write), and its
// transaction when it runs outside an explicit one.
func (s *session) write(tagged bool) {
	s.c.writes.Add(1)
	if tagged {
		s.c.taggedWrites.Add(1)
	}
	if s.inTx {
		s.wrote = true
		s.taggedWrote = s.taggedWrote || tagged
	} else {
		s.c.writeTxs.Add(1)
		if tagged {
			s.c.taggedTxs.Add(1)
		}
	}
}

// keyword returns the first word of a statement, upper-cased, after
// whitespace, parentheses and comments.
func keyword(stmt string) string {
	for {
		stmt = strings.TrimLeft(stmt, " \t\r\n(")
		switch {
		case strings.HasPrefix(stmt, "--"):
			i := strings.IndexByte(stmt, '\n')
			if i < 0 {
				return ""
			}
			stmt = stmt[i+1:]
		case strings.HasPrefix(stmt, "/*"):
			i := strings.Index(stmt, "*/")
			if i < 0 {
				return ""
			}
			stmt = stmt[i+2:]
		default:
			end := strings.IndexFunc(stmt, func(r rune) bool { return !unicode.IsLetter(r) })
			if end < 0 {
				end = len(stmt)
			}
			return strings.ToUpper(stmt[:end])
		}
	}
}

// cstring splits a NUL-terminated string off b.
func cstring(b []byte) (string, []byte, bool) {
	i := bytes.IndexByte(b, 0)
	if i < 0 {
		return "", nil, false
	}
	return string(b[:i]), b[i+1:], true
}
