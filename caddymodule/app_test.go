package caddymodule

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// provisionApp provisions a copy of cfg in its own Caddy context and returns
// it with the function that unloads the context (and so cleans up the app).
func provisionApp(t *testing.T, cfg App) (*App, context.CancelFunc) {
	t.Helper()
	ctx, cancel := newCaddyContext(t, nil)
	a := cfg
	if err := a.Provision(ctx); err != nil {
		cancel()
		t.Fatalf("provisioning app: %v", err)
	}
	return &a, func() {
		if err := a.Cleanup(); err != nil {
			t.Errorf("cleaning up app: %v", err)
		}
		cancel()
	}
}

// references returns how many configs use the pooled resources under key.
func references(key string) int {
	n, _ := resourcePool.References(key)
	return n
}

// metaWorks reports whether the resources' metadata store still answers.
func metaWorks(r *resources) error {
	_, err := r.meta.GetMedia(context.Background(), "example.org", "nothing")
	if errors.Is(err, storage.ErrNotFound) {
		return nil
	}
	return err
}

func TestAppPoolReusesStoresAcrossConfigs(t *testing.T) {
	cfg := *testAppConfig(t)

	first, unloadFirst := provisionApp(t, cfg)
	second, unloadSecond := provisionApp(t, cfg) // as a reload would
	if first.res != second.res {
		t.Fatal("two configs with the same settings got different stores; want one shared set")
	}
	key := first.poolKey
	if got := references(key); got != 2 {
		t.Fatalf("pool references = %d, want 2", got)
	}

	// Unloading the old config keeps the stores open for the new one.
	unloadFirst()
	if got := references(key); got != 1 {
		t.Fatalf("pool references after the first unload = %d, want 1", got)
	}
	select {
	case <-second.res.closed:
		t.Fatal("stores closed while a config still uses them")
	default:
	}
	if err := metaWorks(second.res); err != nil {
		t.Fatalf("metadata store after the first config was unloaded: %v", err)
	}

	res := second.res
	unloadSecond()
	if got := references(key); got != 0 {
		t.Fatalf("pool references after both unloads = %d, want 0", got)
	}
	<-res.closed // closed synchronously: no request was in flight
	if res.closeErr != nil {
		t.Errorf("closing stores: %v", res.closeErr)
	}
	if err := metaWorks(res); err == nil {
		t.Error("metadata store still answers after the last config was unloaded; want it closed")
	}
}

func TestAppPoolSeparatesDifferentSettings(t *testing.T) {
	a, unloadA := provisionApp(t, *testAppConfig(t))
	defer unloadA()
	b, unloadB := provisionApp(t, *testAppConfig(t))
	defer unloadB()
	if a.res == b.res || a.poolKey == b.poolKey {
		t.Fatal("configs with different databases and storage paths share stores")
	}

	// Same stores, different cache size: a new repository.
	cfg := *testAppConfig(t)
	c, unloadC := provisionApp(t, cfg)
	defer unloadC()
	cfg.MediaCacheSize = 10
	d, unloadD := provisionApp(t, cfg)
	defer unloadD()
	if c.res == d.res {
		t.Fatal("configs with different media_cache_size share one repository")
	}
	for _, r := range []*resources{a.res, b.res, c.res, d.res} {
		if err := metaWorks(r); err != nil {
			t.Errorf("metadata store: %v", err)
		}
	}
}

func TestAppDefaults(t *testing.T) {
	data := t.TempDir()
	t.Setenv("XDG_DATA_HOME", data)
	a, unload := provisionApp(t, App{})
	defer unload()
	if a.MaxUploadSize != DefaultMaxUploadSize {
		t.Errorf("MaxUploadSize = %d, want %d", a.MaxUploadSize, DefaultMaxUploadSize)
	}
	wantDB := filepath.Join(data, "caddy", "matrix_media", "media.db")
	wantBlobs := filepath.Join(data, "caddy", "matrix_media", "media")
	wantKey := storeSettings{driver: DriverSQLite, sqliteFullSync: true, dsn: wantDB, storagePath: wantBlobs, datastores: defaultDatastores(wantBlobs), mediaCacheSize: DefaultMediaCacheSize, maxRemoteSize: DefaultMaxUploadSize, jobs: jobTimings{lease: time.Minute, poll: 30 * time.Second}}.key()
	if a.poolKey != wantKey {
		t.Errorf("pool key = %q, want %q", a.poolKey, wantKey)
	}
	for _, p := range []string{wantDB, wantBlobs} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("default store not created: %v", err)
		}
	}
}

func TestAppResolvesPlaceholders(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("MATRIX_MEDIA_TEST_DIR", dir)
	secret := filepath.Join(dir, "dbpath")
	if err := os.WriteFile(secret, []byte(filepath.Join(dir, "from-file.db")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	a, unload := provisionApp(t, App{
		Database:    &Database{Driver: DriverSQLite, DSN: "{file." + secret + "}"},
		StoragePath: "{env.MATRIX_MEDIA_TEST_DIR}/blobs",
	})
	defer unload()
	want := storeSettings{
		driver:         DriverSQLite,
		sqliteFullSync: true,
		dsn:            filepath.Join(dir, "from-file.db"),
		storagePath:    filepath.Join(dir, "blobs"),
		datastores:     defaultDatastores(filepath.Join(dir, "blobs")),
		mediaCacheSize: DefaultMediaCacheSize,
		maxRemoteSize:  DefaultMaxUploadSize,
		jobs:           jobTimings{lease: time.Minute, poll: 30 * time.Second},
	}.key()
	if a.poolKey != want {
		t.Errorf("pool key = %q, want %q", a.poolKey, want)
	}
}

func TestAppProvisionErrors(t *testing.T) {
	t.Setenv("MATRIX_MEDIA_TEST_EMPTY", "")
	t.Setenv("MATRIX_MEDIA_TEST_SECRET", "hunter2-very-secret")
	dir := t.TempDir()
	for i, tc := range []struct {
		app     App
		wantErr string
	}{
		{App{Database: &Database{Driver: "mysql"}}, `unknown driver "mysql"`},
		{App{Database: &Database{Driver: DriverPostgres}}, "a dsn is required for the postgres driver"},
		{App{Database: &Database{DSN: "{env.MATRIX_MEDIA_TEST_EMPTY}"}, StoragePath: dir}, "{env.MATRIX_MEDIA_TEST_EMPTY} is empty"},
		{App{Database: &Database{DSN: "{nope.x}"}, StoragePath: dir}, "unrecognized placeholder {nope.x}"},
		{App{StoragePath: "{env.MATRIX_MEDIA_TEST_EMPTY}"}, "storage_path: resolving placeholders"},
		{App{StoragePath: dir, MediaCacheSize: -1}, "media_cache_size must not be negative"},
		{App{StoragePath: dir, MaxUploadSize: -1}, "max_upload_size must not be negative"},
		// A database that cannot be reached: the error must not carry the
		// password resolved from the environment.
		{App{
			Database:    &Database{Driver: DriverPostgres, DSN: "postgres://media:{env.MATRIX_MEDIA_TEST_SECRET}@127.0.0.1:1/media?sslmode=disable&connect_timeout=5"},
			StoragePath: dir,
		}, "opening matrix_media stores"},
	} {
		ctx, cancel := newCaddyContext(t, nil)
		a := tc.app
		err := a.Provision(ctx)
		if cerr := a.Cleanup(); cerr != nil {
			t.Errorf("Test %d: Cleanup after failed Provision: %v", i, cerr)
		}
		cancel()
		if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
			t.Errorf("Test %d: Provision error = %v, want one containing %q", i, err, tc.wantErr)
			continue
		}
		if strings.Contains(err.Error(), "hunter2") {
			t.Errorf("Test %d: error reveals the database password: %v", i, err)
		}
	}
}

func TestAppCleanupIsNilSafe(t *testing.T) {
	var a App
	if err := a.Cleanup(); err != nil {
		t.Errorf("Cleanup of an unprovisioned app: %v", err)
	}
}

func TestResourcesCloseAfterInFlightRequests(t *testing.T) {
	cfg := *testAppConfig(t)
	a, unload := provisionApp(t, cfg)
	res := a.res
	if !res.acquire() {
		t.Fatal("acquire on open resources failed")
	}
	unload() // last reference: Destruct runs while a request is in flight
	select {
	case <-res.closed:
		t.Fatal("stores closed under an in-flight request")
	default:
	}
	if err := metaWorks(res); err != nil {
		t.Fatalf("metadata store during the in-flight request: %v", err)
	}
	if res.acquire() {
		t.Fatal("acquire succeeded on resources being closed")
	}
	res.release()
	select {
	case <-res.closed:
	case <-time.After(time.Minute):
		t.Fatal("stores not closed after the last in-flight request ended")
	}
	if res.closeErr != nil {
		t.Errorf("closing stores: %v", res.closeErr)
	}
}

func TestAppRegistersMetrics(t *testing.T) {
	ctx, cancel := newCaddyContext(t, nil)
	defer cancel()
	a := *testAppConfig(t)
	if err := a.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	defer a.Cleanup()
	collectors := a.res.metrics.Collectors()
	// Registering the same collectors again (a second Provision against the
	// same registry) is tolerated.
	if err := registerCollectors(ctx.GetMetricsRegistry(), collectors); err != nil {
		t.Fatalf("registering the same collectors twice: %v", err)
	}
	if len(collectors) == 0 {
		t.Fatal("the repository exposes no metrics collectors")
	}
	families, err := ctx.GetMetricsRegistry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	gauges := map[string]float64{}
	for _, f := range families {
		names[f.GetName()] = true
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "datastore" && m.GetGauge() != nil {
					gauges[f.GetName()+"/"+l.GetValue()] = m.GetGauge().GetValue()
				}
			}
		}
	}
	// The default file datastore reports its filesystem's space.
	free, size := gauges["caddy_matrix_media_datastore_free_bytes/default"], gauges["caddy_matrix_media_datastore_size_bytes/default"]
	if size <= 0 || free < 0 || free > size {
		t.Errorf("file datastore space: %v free of %v bytes (gauges %v); want a size and free <= size", free, size, gauges)
	}
	// Families with no labels appear at once; labelled ones only once
	// observed, so check the unlabelled ones of each collector set.
	for _, want := range []string{
		"caddy_matrix_media_upload_bytes_total",
		"caddy_matrix_media_token_cache_entries",
		"caddy_matrix_media_token_cache_evictions_total",
		"caddy_matrix_media_whoami_rejected_total",
	} {
		if !names[want] {
			t.Errorf("metric family %s missing from the config's registry (have %v)", want, names)
		}
	}

	// A different collector under a taken name is an error.
	clash := prometheus.NewCounter(prometheus.CounterOpts{Name: "clash_total", Help: "x"})
	reg := prometheus.NewRegistry()
	if err := registerCollectors(reg, []prometheus.Collector{clash}); err != nil {
		t.Fatal(err)
	}
	other := prometheus.NewCounter(prometheus.CounterOpts{Name: "clash_total", Help: "y"})
	if err := registerCollectors(reg, []prometheus.Collector{other}); err == nil {
		t.Error("registering a different collector under a taken name: no error")
	}
}

// TestAppDatabaseSynchronous: database synchronous reaches the store
// settings (and the pool key, so changing it and reloading reopens the
// database), and is refused where it does not apply.
func TestAppDatabaseSynchronous(t *testing.T) {
	for _, tc := range []struct {
		name     string
		db       Database
		wantFull bool
		wantErr  string
	}{
		{name: "default", db: Database{Driver: DriverSQLite, DSN: "/tmp/x.db"}, wantFull: true},
		{name: "normal", db: Database{Driver: DriverSQLite, DSN: "/tmp/x.db", Synchronous: SynchronousNormal}},
		{name: "postgres default", db: Database{Driver: DriverPostgres, DSN: "postgres://h/db"}},
		{name: "postgres normal", db: Database{Driver: DriverPostgres, DSN: "postgres://h/db", Synchronous: SynchronousNormal}, wantErr: "synchronous applies to sqlite only"},
		{name: "full", db: Database{Driver: DriverSQLite, DSN: "/tmp/x.db", Synchronous: SynchronousFull}, wantFull: true},
		{name: "unknown", db: Database{Driver: DriverSQLite, DSN: "/tmp/x.db", Synchronous: "off"}, wantErr: `unknown synchronous "off"`},
		{name: "postgres", db: Database{Driver: DriverPostgres, DSN: "postgres://h/db", Synchronous: SynchronousFull}, wantErr: "synchronous applies to sqlite only"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			db := tc.db
			a := App{Database: &db}
			s, err := a.resolveSettings(caddy.NewReplacer())
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if s.sqliteFullSync != tc.wantFull {
				t.Fatalf("sqliteFullSync = %v, want %v", s.sqliteFullSync, tc.wantFull)
			}
			other := s
			other.sqliteFullSync = !s.sqliteFullSync
			if s.key() == other.key() {
				t.Fatal("the pool key does not depend on the synchronous setting")
			}
		})
	}

	// A provisioned app with synchronous normal opens a working store.
	cfg := *testAppConfig(t)
	cfg.Database.Synchronous = SynchronousNormal
	a, unload := provisionApp(t, cfg)
	defer unload()
	if err := metaWorks(a.res); err != nil {
		t.Fatalf("metadata store with synchronous normal: %v", err)
	}
}
