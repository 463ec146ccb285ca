package testredis

import (
	"net"
	"strings"
	"testing"
)

func TestStartStopRestart(t *testing.T) {
	s := Start(t)
	if want := "redis://" + s.Addr() + "/0"; s.URL() != want {
		t.Errorf("URL = %q, want %q", s.URL(), want)
	}
	if !strings.HasPrefix(s.Addr(), "127.0.0.1:") {
		t.Errorf("Addr = %q, want a loopback address", s.Addr())
	}
	if err := ping(s.Addr()); err != nil {
		t.Fatalf("PING after Start: %v", err)
	}
	s.Stop()
	if err := ping(s.Addr()); err == nil {
		t.Fatal("PING succeeded after Stop")
	}
	s.Stop() // idempotent
	addr := s.Addr()
	s.Restart(t)
	if s.Addr() != addr {
		t.Errorf("Restart moved the server from %s to %s", addr, s.Addr())
	}
	if err := ping(s.Addr()); err != nil {
		t.Fatalf("PING after Restart: %v", err)
	}
	s.Restart(t) // restarting a running server works too
	if err := ping(s.Addr()); err != nil {
		t.Fatalf("PING after second Restart: %v", err)
	}
}

func TestServersAreIndependent(t *testing.T) {
	a, b := Start(t), Start(t)
	if a.Addr() == b.Addr() {
		t.Fatalf("both servers on %s", a.Addr())
	}
	a.Stop()
	if err := ping(b.Addr()); err != nil {
		t.Fatalf("stopping one server broke the other: %v", err)
	}
}

func TestPingFailsOnNonRedis(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		_, _ = c.Write([]byte("-ERR nope\r\n"))
		_ = c.Close()
	}()
	if err := ping(l.Addr().String()); err == nil {
		t.Fatal("ping accepted a non-PONG answer")
	}
}
