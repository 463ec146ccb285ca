#!/usr/bin/env bash
# Purge benchmark: Synapse's POST /_synapse/admin/v1/purge_media_cache over a
# cache of ROWS remote media (PostgreSQL, file datastore) in ONE Caddy
# process, with uploads and downloads of local media running at fixed rates
# before and during the purge. Everything binds to 127.0.0.1.
#
# Usage: bench/run-purge.sh [--quick]
#   --quick   2000 rows, 5 s before and after the purge (smoke run)
# Env: CADDY (path to a caddy built with ./xcaddy.sh build; default ./caddy),
#      ROWS (remote media rows, default 100000), SEED_SIZE (bytes per remote
#      blob, default 1024), BEFORE (seconds of load before the purge, default
#      15), AFTER (seconds of load after the purge, a control; default 15;
#      0: none), UPLOAD_RATE and DOWNLOAD_RATE (requests started per second,
#      default 10 and 50), UPLOAD_SIZE (bytes per upload and per downloaded
#      media, default 65536), PG_DSN (a PostgreSQL server to use, as a
#      connection string to a database of a role that may CREATE DATABASE;
#      default: a throwaway cluster started in the temporary directory from
#      /usr/lib/postgresql/*/bin with PostgreSQL's default durability, fsync
#      and synchronous_commit on), PG_OPTS (extra "-c name=value" options of
#      the throwaway cluster), PPROF=1 (a CPU profile of Caddy over PPROF_SECONDS,
#      default 10, and an execution trace over 2 s, taken from the admin
#      endpoint's /debug/pprof as the purge starts, saved next to the report).
#
# Scenario (issue 11 target):
#   1. bench/purge/seed writes ROWS remote media items (50 server names) with
#      one distinct SEED_SIZE blob each through the storage packages (bytes in
#      the file datastore, blob record, media row), cached 48 h ago and never
#      read since: older than the purge cutoff (24 h ago) and than the
#      garbage collector's grace (1 h), so the purge removes rows and blobs.
#   2. Caddy starts on that database and datastore; one site, a stand-in
#      homeserver answering whoami, a media admin token.
#   3. bench/purge/load uploads 50 local media, then runs uploads (fresh
#      random UPLOAD_SIZE bytes) and downloads (of those 50, bytes checked)
#      open-loop at the given rates for BEFORE seconds ("before"), then asks
#      for the purge as the media admin and keeps the load running until the
#      purge answers ("during"; Synapse's endpoint answers {"deleted": n} when
#      the background job is done), then for AFTER seconds more ("after",
#      the same load on the same database: a control for noise that has
#      nothing to do with the purge). It follows the job's progress through
#      Caddy's admin API (GET /matrix_media/jobs).
#   Reported: items/s of the purge (deleted / time to the answer, and the
#   job's own items over its run time), p50/p99/max latency, req/s, errors
#   and skipped starts of uploads and downloads before, during and after the purge,
#   and what is left afterwards (remote rows, blob records, blob files:
#   expected 0 remote rows, and only the local media's blobs).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
source bench/lib.sh
CADDY=${CADDY:-$ROOT/caddy}
ROWS=${ROWS:-100000}
SEED_SIZE=${SEED_SIZE:-1024}
BEFORE=${BEFORE:-15}
AFTER=${AFTER:-15}
UPLOAD_RATE=${UPLOAD_RATE:-10}
DOWNLOAD_RATE=${DOWNLOAD_RATE:-50}
UPLOAD_SIZE=${UPLOAD_SIZE:-65536}
PG_DSN=${PG_DSN:-}
PG_OPTS=${PG_OPTS:-}
PPROF=${PPROF:-}
PPROF_SECONDS=${PPROF_SECONDS:-10}
LOCAL=50
if [[ ${1:-} == --quick ]]; then ROWS=2000; BEFORE=5; AFTER=5; fi

need go; need curl; need psql
need_caddy

WORK=$(mktemp -d /tmp/mm-bench-purge.XXXXXX)
ADMIN=$(free_port); HS=$(free_port); MM=$(free_port)
export XDG_DATA_HOME=$WORK/xdg/data XDG_CONFIG_HOME=$WORK/xdg/config
mkdir -p "$WORK/bin" "$WORK/xdg/data" "$WORK/xdg/config"

echo "bench: building bench/purge programs" >&2
CGO_ENABLED=1 go build -o "$WORK/bin/" ./bench/purge/seed ./bench/purge/load

# The database: a fresh one on PG_DSN's server, or a throwaway cluster
# (bench/lib.sh).
pg_database media
sql() { psql -qtA -v ON_ERROR_STOP=1 -d "$DSN" -c "$1"; }

REPORT=$WORK/report.txt
say "caddy-matrix-media purge benchmark $(date -u +%FT%TZ) on $(nproc) cores; rows=$ROWS seed_size=$SEED_SIZE before=${BEFORE}s after=${AFTER}s upload_rate=$UPLOAD_RATE/s download_rate=$DOWNLOAD_RATE/s upload_size=$UPLOAD_SIZE; PostgreSQL: $PG_WHAT"

echo "bench: seeding $ROWS remote media" >&2
SEED_OUT=$("$WORK/bin/seed" -dsn "$DSN" -store "$WORK/store" -rows "$ROWS" -size "$SEED_SIZE" -age 48h)
say "$SEED_OUT"
sql "ANALYZE" >/dev/null

cat >"$WORK/Caddyfile" <<EOF
{
$(caddy_globals "$ADMIN")
	matrix_media {
		storage_path $WORK/store
		database postgres "$DSN"
	}
}
# Stand-in homeserver: only whoami is needed (uploads and v1 downloads are
# authenticated; the admin token needs no homeserver).
$(homeserver_site "$HS")
http://127.0.0.1:$MM {
	matrix_media {
		server_name localhost
		homeserver http://127.0.0.1:$HS
		admin_token bench-purge-admin-token-0123456789abcdef
	}
}
EOF

run_caddy "$WORK/Caddyfile" "$WORK/caddy.log" "$ADMIN"

count_files() { find "$WORK/store/blobs" -type f | wc -l; }
say "before: $(sql "SELECT count(*) FROM media WHERE remote") remote rows, $(sql "SELECT count(*) FROM blobs") blob records, $(count_files) blob files"

PPROF_PIDS=()
if [[ -n $PPROF ]]; then
	# Both start BEFORE seconds from now, as the purge does.
	(sleep "$BEFORE"; curl -fsS -o "$WORK/cpu.pprof" "http://127.0.0.1:$ADMIN/debug/pprof/profile?seconds=$PPROF_SECONDS" || true) &
	PPROF_PIDS+=($!)
	(sleep "$((BEFORE + 1))"; curl -fsS -o "$WORK/trace.out" "http://127.0.0.1:$ADMIN/debug/pprof/trace?seconds=2" || true) &
	PPROF_PIDS+=($!)
fi

echo "bench: load for ${BEFORE}s, then the purge under load, then ${AFTER}s more" >&2
BEFORE_TS=$(($(date +%s) * 1000 - 24 * 3600 * 1000))
LOAD_RC=0
"$WORK/bin/load" -base "http://127.0.0.1:$MM" -caddy-admin "http://127.0.0.1:$ADMIN" \
	-admin-token bench-purge-admin-token-0123456789abcdef -before-ts "$BEFORE_TS" -expect "$ROWS" \
	-before "${BEFORE}s" -after "${AFTER}s" -upload-rate "$UPLOAD_RATE" -download-rate "$DOWNLOAD_RATE" -upload-size "$UPLOAD_SIZE" \
	-local "$LOCAL" >"$WORK/load.txt" 2>"$WORK/load.err" || LOAD_RC=$?
for p in "${PPROF_PIDS[@]}"; do wait "$p" || true; done
say ""
tee -a "$REPORT" <"$WORK/load.txt"
[[ -s $WORK/load.err ]] && { tee -a "$REPORT" <"$WORK/load.err" >&2; }
say ""
say "after: $(sql "SELECT count(*) FROM media WHERE remote") remote rows, $(sql "SELECT count(*) FROM media WHERE NOT remote") local rows, $(sql "SELECT count(*) FROM blobs") blob records, $(count_files) blob files"
grep -q '"level":"error"' "$WORK/caddy.log" && { say "caddy logged errors:"; grep '"level":"error"' "$WORK/caddy.log" | head -5 | tee -a "$REPORT"; }

mkdir -p "$ROOT/bench/results"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
cp "$REPORT" "$ROOT/bench/results/purge-$STAMP.txt"
for f in "$WORK/cpu.pprof" "$WORK/trace.out"; do
	[[ -s $f ]] && cp "$f" "$ROOT/bench/results/purge-$STAMP.${f##*/}"
done
echo "report saved under bench/results/"
exit "$LOAD_RC"
