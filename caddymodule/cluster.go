package caddymodule

import (
	"context"
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage/cluster"
)

// openCluster opens the coordinator of the instances sharing the database
// of s: through PostgreSQL (LISTEN/NOTIFY and advisory locks, on two
// connections of its own) when the database is PostgreSQL; in-process on
// SQLite, which serves a single instance.
func openCluster(ctx context.Context, s storeSettings, logger *zap.Logger) (cluster.Coordinator, error) {
	if s.driver != "postgres" {
		return cluster.NewLocal(0), nil
	}
	c, err := cluster.NewPostgres(ctx, s.dsn, cluster.PostgresOptions{Logger: logger.Named("cluster")})
	if err != nil {
		// The coordinator's errors never hold the DSN.
		return nil, fmt.Errorf("opening the cluster coordinator on PostgreSQL: %w", err)
	}
	return c, nil
}

// clusterMetrics exports the counters of a PostgreSQL coordinator.
//
//	caddy_matrix_media_cluster_round_trips_total     counter (queries the coordinator sent to PostgreSQL)
//	caddy_matrix_media_cluster_publishes_total       counter (notifications sent)
//	caddy_matrix_media_cluster_notifications_total   counter (notifications received)
//	caddy_matrix_media_cluster_lock_attempts_total   counter
//	caddy_matrix_media_cluster_locks_acquired_total  counter
//	caddy_matrix_media_cluster_locks_lost_total      counter (held locks lost with their session)
//	caddy_matrix_media_cluster_reconnects_total{connection}  counter (listener, session)
type clusterMetrics struct {
	collectors []prometheus.Collector
}

// newClusterMetrics returns the collectors of c; none for a coordinator
// without counters (Local).
func newClusterMetrics(c cluster.Coordinator) *clusterMetrics {
	pg, ok := c.(*cluster.Postgres)
	if !ok {
		return &clusterMetrics{}
	}
	counter := func(name, help string, value func(cluster.Stats) uint64) prometheus.Collector {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: name, Help: help,
		}, func() float64 { return float64(value(pg.Stats())) })
	}
	reconnects := func(conn string, value func(cluster.Stats) uint64) prometheus.Collector {
		return prometheus.NewCounterFunc(prometheus.CounterOpts{
			Namespace: "caddy", Subsystem: "matrix_media", Name: "cluster_reconnects_total",
			Help:        "Reconnections of the cluster coordinator's PostgreSQL connections, by connection: listener (LISTEN), session (locks and NOTIFY).",
			ConstLabels: prometheus.Labels{"connection": conn},
		}, func() float64 { return float64(value(pg.Stats())) })
	}
	return &clusterMetrics{collectors: []prometheus.Collector{
		counter("cluster_round_trips_total", "Queries the cluster coordinator sent to PostgreSQL (locks, notifications, health checks).",
			func(s cluster.Stats) uint64 { return s.RoundTrips }),
		counter("cluster_publishes_total", "Cluster notifications sent (an async upload completed, a remote fetch or thumbnail generation ended).",
			func(s cluster.Stats) uint64 { return s.Publishes }),
		counter("cluster_notifications_total", "Cluster notifications received from PostgreSQL.",
			func(s cluster.Stats) uint64 { return s.NotificationsReceived }),
		counter("cluster_lock_attempts_total", "Attempts to take a cluster-wide lock.",
			func(s cluster.Stats) uint64 { return s.LockAttempts }),
		counter("cluster_locks_acquired_total", "Cluster-wide locks taken.",
			func(s cluster.Stats) uint64 { return s.LocksAcquired }),
		counter("cluster_locks_lost_total", "Held cluster-wide locks lost because their PostgreSQL session ended.",
			func(s cluster.Stats) uint64 { return s.LocksLost }),
		reconnects("listener", func(s cluster.Stats) uint64 { return s.ListenerReconnects }),
		reconnects("session", func(s cluster.Stats) uint64 { return s.SessionReconnects }),
	}}
}
