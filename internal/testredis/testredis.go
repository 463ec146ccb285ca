// Package testredis gives tests a throwaway redis-server of their own.
//
// Start runs redis-server (found on PATH, else /usr/bin/redis-server) on a
// free loopback port with persistence off and its working directory in the
// test's temporary directory, and stops it when the test ends. When
// redis-server is not installed, Start fails the test; it never skips.
//
// The server is a child of the test binary and is killed by the kernel if the
// test binary dies.
package testredis

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// fallbackBinary is where Debian's redis-server package installs the server.
const fallbackBinary = "/usr/bin/redis-server"

// readyTimeout bounds how long Start and Restart wait for the server to
// answer PING.
const readyTimeout = 15 * time.Second

// Server is a running (or stopped) redis-server started by Start.
type Server struct {
	bin  string
	dir  string
	port int

	// mu guards proc and exited.
	mu sync.Mutex
	// proc is the running server, nil when stopped.
	proc *os.Process
	// exited is closed once proc has exited.
	exited chan struct{}
}

// Start starts a redis-server on a free 127.0.0.1 port and waits until it
// answers PING. The server is stopped in t.Cleanup. Start fails the test when
// redis-server is missing or does not come up.
func Start(t testing.TB) *Server {
	t.Helper()
	bin, err := findBinary()
	if err != nil {
		t.Fatalf("testredis: %v", err)
	}
	s := &Server{bin: bin, dir: t.TempDir()}
	// Another process may take the free port between finding and binding
	// it, so try a few ports.
	var errs []error
	for range 3 {
		port, err := freePort()
		if err != nil {
			t.Fatalf("testredis: %v", err)
		}
		s.port = port
		if err = s.start(); err == nil {
			t.Cleanup(s.Stop)
			return s
		}
		errs = append(errs, err)
	}
	t.Fatalf("testredis: %v", errors.Join(errs...))
	return nil
}

// URL returns the server's URL for database 0, e.g. redis://127.0.0.1:6379/0.
func (s *Server) URL() string { return "redis://" + s.Addr() + "/0" }

// Addr returns the server's host:port.
func (s *Server) Addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(s.port)) }

// Stop kills the server and waits for it to exit. Clients see their
// connections drop. Stop does nothing when the server is not running.
func (s *Server) Stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stopLocked()
}

// Restart stops the server if it is running, starts it again on the same port
// and waits until it answers PING. The new server starts empty. Restart fails
// the test when the server does not come back.
func (s *Server) Restart(t testing.TB) {
	t.Helper()
	s.Stop()
	// The old listening socket is gone once the process has exited, but
	// retry briefly in case the port is still being released.
	deadline := time.Now().Add(readyTimeout)
	for {
		err := s.start()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("testredis: restarting redis-server on port %d: %v", s.port, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// stopLocked kills the server and waits for it; s.mu must be held.
func (s *Server) stopLocked() {
	if s.proc == nil {
		return
	}
	_ = s.proc.Kill()
	<-s.exited
	s.proc = nil
	s.exited = nil
}

// start runs redis-server on s.port and waits until it answers PING. On
// failure the process is stopped and the error includes the end of its log.
func (s *Server) start() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.proc != nil {
		return errors.New("redis-server is already running")
	}
	logPath := filepath.Join(s.dir, "redis.log")
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return fmt.Errorf("creating server log: %w", err)
	}
	cmd := exec.Command(s.bin,
		"--bind", "127.0.0.1",
		"--port", strconv.Itoa(s.port),
		"--save", "",
		"--appendonly", "no",
		"--dir", s.dir,
	)
	cmd.Dir = s.dir
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	// The kernel kills the server when the thread that started it dies, so
	// it is started from a goroutine locked to its thread that lives exactly
	// as long as the server.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}

	exited := make(chan struct{})
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// Never unlocked: the thread ends with this goroutine, after the
		// server has exited.
		if err := cmd.Start(); err != nil {
			started <- err
			close(exited)
			return
		}
		started <- nil
		_ = cmd.Wait()
		_ = logFile.Close()
		close(exited)
	}()
	if err := <-started; err != nil {
		_ = logFile.Close()
		return fmt.Errorf("starting redis-server: %w", err)
	}
	s.proc = cmd.Process
	s.exited = exited

	deadline := time.Now().Add(readyTimeout)
	for {
		select {
		case <-exited:
			s.proc = nil
			s.exited = nil
			return fmt.Errorf("redis-server exited during startup: %s", lastLines(logPath, 10))
		default:
		}
		err := ping(s.Addr())
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			s.stopLocked()
			return fmt.Errorf("redis-server did not answer PING within %s (%v): %s", readyTimeout, err, lastLines(logPath, 10))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// ping sends one PING to addr and expects +PONG.
func ping(addr string) error {
	conn, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	defer conn.Close()
	if err := conn.SetDeadline(time.Now().Add(time.Second)); err != nil {
		return err
	}
	if _, err := conn.Write([]byte("*1\r\n$4\r\nPING\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return err
	}
	if line = strings.TrimSpace(line); line != "+PONG" {
		return fmt.Errorf("unexpected answer to PING: %q", line)
	}
	return nil
}

// findBinary returns the path of redis-server.
func findBinary() (string, error) {
	if p, err := exec.LookPath("redis-server"); err == nil {
		return p, nil
	}
	if _, err := os.Stat(fallbackBinary); err == nil {
		return fallbackBinary, nil
	}
	return "", errors.New("redis-server not found on PATH or at " + fallbackBinary + " (install it: apt-get install redis-server)")
}

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("finding a free port: %w", err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	if err := l.Close(); err != nil {
		return 0, fmt.Errorf("finding a free port: %w", err)
	}
	return port, nil
}

// lastLines returns the last n lines of the file at path, for error messages.
func lastLines(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	lines := bytes.Split(bytes.TrimSpace(b), []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return string(bytes.Join(lines, []byte("\n")))
}
