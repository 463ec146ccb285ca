package testpg

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// dirPattern names the temporary directories of throwaway clusters.
const dirPattern = "matrix-media-testpg-*"

// cluster is a throwaway PostgreSQL cluster run by this process.
type cluster struct {
	// dir holds the data directory, the socket, the log and owner.pid.
	dir  string
	port int
	proc *os.Process
	// exited is closed once the postmaster has exited; waitErr is then set.
	exited  chan struct{}
	waitErr error
}

// dsn connects to the cluster's maintenance database as the superuser.
func (c *cluster) dsn() string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable&connect_timeout=10", c.port)
}

// pgBinaries finds the directory holding initdb and postgres: the newest
// /usr/lib/postgresql/<version>/bin, else the directory of initdb on PATH.
func pgBinaries() (string, error) {
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(dirs, func(i, j int) bool {
		vi, _ := strconv.ParseFloat(filepath.Base(filepath.Dir(dirs[i])), 64)
		vj, _ := strconv.ParseFloat(filepath.Base(filepath.Dir(dirs[j])), 64)
		return vi > vj
	})
	for _, d := range dirs {
		if isExecutable(filepath.Join(d, "initdb")) && isExecutable(filepath.Join(d, "postgres")) {
			return d, nil
		}
	}
	if p, err := exec.LookPath("initdb"); err == nil {
		d := filepath.Dir(p)
		if isExecutable(filepath.Join(d, "postgres")) {
			return d, nil
		}
	}
	return "", errors.New("no PostgreSQL binaries in /usr/lib/postgresql/*/bin or on PATH (install the postgresql package)")
}

func isExecutable(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0
}

// runAs is the identity the cluster's processes run under: the postgres user
// when this process is root (PostgreSQL refuses to run as root), else nil for
// the current user.
func runAs() (*syscall.Credential, error) {
	if os.Geteuid() != 0 {
		return nil, nil
	}
	u, err := user.Lookup("postgres")
	if err != nil {
		return nil, fmt.Errorf("running as root needs a postgres user to run PostgreSQL as: %w", err)
	}
	uid, err := strconv.ParseUint(u.Uid, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("parsing uid of postgres: %w", err)
	}
	gid, err := strconv.ParseUint(u.Gid, 10, 32)
	if err != nil {
		return nil, fmt.Errorf("parsing gid of postgres: %w", err)
	}
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), Groups: []uint32{}}, nil
}

// pgEnv is the environment of the cluster's processes: none of the caller's
// PG* variables, C locale.
func pgEnv(dir string) []string {
	return []string{"PATH=" + os.Getenv("PATH"), "LC_ALL=C", "LANG=C", "HOME=" + dir}
}

// startCluster initializes a cluster in a new temporary directory and starts
// it on a free loopback port (trust authentication, durability off). It
// retries with another port if the chosen one was taken in the meantime.
func startCluster(ctx context.Context) (*cluster, error) {
	bin, err := pgBinaries()
	if err != nil {
		return nil, err
	}
	cred, err := runAs()
	if err != nil {
		return nil, err
	}
	removeStaleDirs()
	dir, err := os.MkdirTemp("", dirPattern)
	if err != nil {
		return nil, fmt.Errorf("creating cluster directory: %w", err)
	}
	ok := false
	defer func() {
		if !ok {
			_ = os.RemoveAll(dir)
		}
	}()
	if err := os.WriteFile(filepath.Join(dir, "owner.pid"), []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
		return nil, fmt.Errorf("writing owner.pid: %w", err)
	}
	if cred != nil {
		if err := os.Chown(dir, int(cred.Uid), int(cred.Gid)); err != nil {
			return nil, fmt.Errorf("giving cluster directory to postgres: %w", err)
		}
	}
	data := filepath.Join(dir, "data")
	initdb := exec.CommandContext(ctx, filepath.Join(bin, "initdb"),
		"-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-locale", "--no-sync")
	initdb.Env = pgEnv(dir)
	initdb.Dir = dir
	initdb.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	if out, err := initdb.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("running initdb: %w: %s", err, lastLines(out, 10))
	}
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		port, err := freePort()
		if err != nil {
			return nil, err
		}
		c := &cluster{dir: dir, port: port, exited: make(chan struct{})}
		if err := c.start(ctx, bin, cred); err != nil {
			lastErr = err
			continue
		}
		ok = true
		return c, nil
	}
	return nil, lastErr
}

// freePort asks the kernel for a loopback port that is free right now.
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

// start runs the postmaster in the foreground as a child of this process and
// waits until it accepts connections. The child gets SIGKILL if the thread
// that started it dies, so it is started from a goroutine locked to its
// thread that lives exactly as long as the postmaster.
func (c *cluster) start(ctx context.Context, bin string, cred *syscall.Credential) error {
	logPath := filepath.Join(c.dir, "server.log")
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return fmt.Errorf("creating server log: %w", err)
	}
	cmd := exec.Command(filepath.Join(bin, "postgres"),
		"-D", filepath.Join(c.dir, "data"),
		"-p", strconv.Itoa(c.port),
		"-k", c.dir,
		"-c", "listen_addresses=127.0.0.1",
		"-c", "fsync=off",
		"-c", "synchronous_commit=off",
		"-c", "full_page_writes=off",
		"-c", "max_connections=300",
		"-c", "logging_collector=off",
	)
	cmd.Env = pgEnv(c.dir)
	cmd.Dir = c.dir
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred, Pdeathsig: syscall.SIGKILL, Setpgid: true}

	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// Never unlocked: the thread ends with this goroutine, after the
		// postmaster has exited.
		if err := cmd.Start(); err != nil {
			started <- err
			close(c.exited)
			return
		}
		c.proc = cmd.Process
		started <- nil
		c.waitErr = cmd.Wait()
		_ = logFile.Close()
		close(c.exited)
	}()
	if err := <-started; err != nil {
		_ = logFile.Close()
		return fmt.Errorf("starting postgres: %w", err)
	}

	// Wait until the server accepts connections, it exits, or time runs out.
	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case <-c.exited:
			log, _ := os.ReadFile(logPath)
			return fmt.Errorf("postgres exited during startup (%v): %s", c.waitErr, lastLines(log, 10))
		default:
		}
		if err := ping(ctx, c.dsn()); err == nil {
			return nil
		} else if time.Now().After(deadline) || ctx.Err() != nil {
			_ = c.kill()
			log, _ := os.ReadFile(logPath)
			return fmt.Errorf("postgres did not accept connections within 30s (%v): %s", err, lastLines(log, 10))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// ping opens one connection to dsn.
func ping(ctx context.Context, dsn string) error {
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		return err
	}
	defer db.Close()
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	return db.PingContext(ctx)
}

// kill stops the postmaster at once (SIGQUIT: immediate shutdown, then
// SIGKILL if it lingers) and waits for it to exit.
func (c *cluster) kill() error {
	if c.proc == nil {
		return nil
	}
	if err := c.proc.Signal(syscall.SIGQUIT); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("signalling postgres: %w", err)
	}
	select {
	case <-c.exited:
		return nil
	case <-time.After(15 * time.Second):
	}
	// Children of the postmaster are in its process group.
	_ = syscall.Kill(-c.proc.Pid, syscall.SIGKILL)
	<-c.exited
	return nil
}

// stop shuts the cluster down and removes its directory.
func (c *cluster) stop() error {
	err := c.kill()
	if rmErr := os.RemoveAll(c.dir); rmErr != nil {
		err = errors.Join(err, fmt.Errorf("removing cluster directory: %w", rmErr))
	}
	return err
}

// removeStaleDirs deletes cluster directories whose owning test binary has
// died and whose postmaster is no longer running. Directories in doubt are
// left alone.
func removeStaleDirs() {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), dirPattern))
	for _, d := range dirs {
		owner, ok := readPID(filepath.Join(d, "owner.pid"))
		if !ok || processAlive(owner) {
			continue
		}
		if pm, ok := readPID(filepath.Join(d, "data", "postmaster.pid")); ok && processAlive(pm) {
			continue
		}
		_ = os.RemoveAll(d)
	}
}

// readPID reads the first line of a pid file.
func readPID(path string) (int, bool) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, false
	}
	line, _, _ := strings.Cut(string(b), "\n")
	pid, err := strconv.Atoi(strings.TrimSpace(line))
	return pid, err == nil && pid > 0
}

// processAlive reports whether a process with the pid exists.
func processAlive(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}

// lastLines returns the last n lines of b, for error messages.
func lastLines(b []byte, n int) string {
	lines := bytes.Split(bytes.TrimSpace(b), []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return string(bytes.Join(lines, []byte(" | ")))
}
