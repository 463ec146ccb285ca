package testpg

import (
	"context"
	"errors"
	"os"
	"syscall"
	"testing"
	"time"
)

// Cluster is a throwaway PostgreSQL cluster owned by one test, which may stop
// it and start it again (same port, same data) to simulate an outage. Unlike
// DSN's shared server it is never taken from the environment: it always runs
// from the installed PostgreSQL binaries.
type Cluster struct {
	c *cluster
}

// NewCluster starts a cluster for t and removes it when t ends. It fails the
// test if no cluster can be started.
func NewCluster(t testing.TB) *Cluster {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, err := startCluster(ctx)
	if err != nil {
		t.Fatalf("testpg: starting a cluster: %v", err)
	}
	t.Cleanup(func() {
		if err := c.stop(); err != nil {
			t.Errorf("testpg: %v", err)
		}
	})
	return &Cluster{c: c}
}

// DSN connects to the cluster's postgres database as the superuser.
func (c *Cluster) DSN() string { return c.c.dsn() }

// Stop shuts the server down as "pg_ctl stop -m fast" does (SIGINT: every
// connection is dropped at once, committed data is flushed) and waits for it
// to exit; a server still running after 15 s is killed. Stopping a stopped
// cluster does nothing. (An immediate shutdown would lose the last commits,
// since the cluster runs with synchronous_commit off.)
func (c *Cluster) Stop(t testing.TB) {
	t.Helper()
	select {
	case <-c.c.exited:
		return
	default:
	}
	if err := c.c.proc.Signal(syscall.SIGINT); err != nil && !errors.Is(err, os.ErrProcessDone) {
		t.Fatalf("testpg: stopping the cluster: %v", err)
	}
	select {
	case <-c.c.exited:
	case <-time.After(15 * time.Second):
		if err := c.c.kill(); err != nil {
			t.Fatalf("testpg: stopping the cluster: %v", err)
		}
	}
}

// Start starts a stopped server again on the same port with the same data
// and waits until it accepts connections. Starting a running cluster does
// nothing.
func (c *Cluster) Start(t testing.TB) {
	t.Helper()
	select {
	case <-c.c.exited:
	default:
		return
	}
	bin, err := pgBinaries()
	if err != nil {
		t.Fatalf("testpg: %v", err)
	}
	cred, err := runAs()
	if err != nil {
		t.Fatalf("testpg: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	c.c.exited = make(chan struct{})
	c.c.proc = nil
	if err := c.c.start(ctx, bin, cred); err != nil {
		t.Fatalf("testpg: restarting the cluster: %v", err)
	}
}
