//go:build linux || darwin || freebsd || openbsd || netbsd || dragonfly

package caddymodule

import (
	"bufio"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
)

// sqliteHolder is a helper process started by startSQLiteHolder.
type sqliteHolder struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	// answer is its first line: "held" or "refused: <error>".
	answer string
}

// startSQLiteHolder starts another process that tries to claim db and
// returns once it has answered.
func startSQLiteHolder(t *testing.T, db string) *sqliteHolder {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), sqliteHolderEnv+"="+db)
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	h := &sqliteHolder{cmd: cmd, stdin: stdin}
	t.Cleanup(h.stop)
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatalf("reading the helper process's answer: %v", err)
	}
	h.answer = strings.TrimSpace(line)
	return h
}

// stop makes the helper process release its claim and waits for its end.
func (h *sqliteHolder) stop() {
	if h.stdin == nil {
		return
	}
	_ = h.stdin.Close()
	h.stdin = nil
	_ = h.cmd.Wait()
}

// wantInUse checks that err is the error of a database held by process pid.
func wantInUse(t *testing.T, what, got, db string, pid int) {
	t.Helper()
	want := "the SQLite database " + db + " is in use by another Caddy process (pid " + strconv.Itoa(pid) + "): SQLite serves one instance; to run several instances, use PostgreSQL"
	if !strings.Contains(got, want) {
		t.Fatalf("%s: got %q, want it to contain %q", what, got, want)
	}
}

// An SQLite database serves one Caddy process: a second process is refused
// with an error naming the holder, while the same process may open the
// database again (a reload that rebuilds the resources) as often as it
// likes; once every store of the holder is closed, another process may
// take the database.
func TestSQLiteOneProcess(t *testing.T) {
	cfg := *testAppConfig(t)
	db := cfg.Database.DSN

	// Another process holds the database: provisioning fails, and claims
	// nothing.
	other := startSQLiteHolder(t, db)
	if other.answer != "held" {
		t.Fatalf("helper process: %s", other.answer)
	}
	ctx, cancel := newCaddyContext(t, nil)
	refused := cfg
	err := refused.Provision(ctx)
	if err == nil {
		t.Fatal("provisioning succeeded on a database another process holds")
	}
	wantInUse(t, "provisioning", err.Error(), db, other.cmd.Process.Pid)
	if err := refused.Cleanup(); err != nil {
		t.Fatalf("cleanup after the failed provisioning: %v", err)
	}
	cancel()
	if n, _ := sqliteClaims.References(db); n != 0 {
		t.Fatalf("a failed provisioning left %d claims", n)
	}

	// The other process releases it: this one takes it, and holds it
	// across a reload that rebuilds the resources on the same file.
	other.stop()
	first, unloadFirst := provisionApp(t, cfg)
	reload := cfg
	reload.MediaCacheSize = 10
	second, unloadSecond := provisionApp(t, reload)
	firstRes, secondRes := first.res, second.res
	if firstRes == secondRes {
		t.Fatal("the reload reused the resources; it must open the database again")
	}
	if err := metaWorks(secondRes); err != nil {
		t.Fatalf("database reopened by the reload: %v", err)
	}
	h := startSQLiteHolder(t, db)
	wantInUse(t, "another process while both configs hold the database", h.answer, db, os.Getpid())

	// The old config goes: the new one still holds the database.
	unloadFirst()
	<-firstRes.closed
	h = startSQLiteHolder(t, db)
	wantInUse(t, "another process after the reload", h.answer, db, os.Getpid())

	// The last config goes: another process may take the database.
	unloadSecond()
	<-secondRes.closed
	if h := startSQLiteHolder(t, db); h.answer != "held" {
		t.Fatalf("another process after the last store closed: %s", h.answer)
	}
}
