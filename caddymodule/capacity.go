package caddymodule

import (
	"math"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/caddy-matrix-media/caddy-matrix-media/storage"
)

// capacityCollectors export the free and total bytes of the filesystem of
// every datastore that knows them (file datastores):
//
//	caddy_matrix_media_datastore_free_bytes{datastore}  gauge (bytes an unprivileged writer may still use)
//	caddy_matrix_media_datastore_size_bytes{datastore}  gauge
//
// A filesystem that cannot be read reports NaN.
func capacityCollectors(stores *storage.Datastores) []prometheus.Collector {
	var out []prometheus.Collector
	for _, name := range stores.Names() {
		bs, _ := stores.Get(name)
		cr, ok := bs.(storage.CapacityReporter)
		if !ok {
			continue
		}
		gauge := func(metric, help string, pick func(free, size uint64) uint64) prometheus.Collector {
			return prometheus.NewGaugeFunc(prometheus.GaugeOpts{
				Namespace: "caddy", Subsystem: "matrix_media", Name: metric, Help: help,
				ConstLabels: prometheus.Labels{"datastore": name},
			}, func() float64 {
				free, size, err := cr.Capacity()
				if err != nil {
					return math.NaN()
				}
				return float64(pick(free, size))
			})
		}
		out = append(out,
			gauge("datastore_free_bytes", "Bytes still free for the module on the filesystem of a file datastore.",
				func(free, _ uint64) uint64 { return free }),
			gauge("datastore_size_bytes", "Size of the filesystem of a file datastore.",
				func(_, size uint64) uint64 { return size }))
	}
	return out
}
