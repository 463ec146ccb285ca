#!/usr/bin/env bash
# Scale-out benchmark: the coordination cost per request of several
# caddy-matrix-media instances sharing one PostgreSQL, one S3 and one Redis,
# 1 instance vs 3 instances, both measured in ONE run (the 1-instance
# cluster first, then the 3-instance one, each on a fresh database).
# Everything binds to 127.0.0.1.
#
# Usage: bench/run-scale.sh [--quick]
#   --quick   N=20, no concurrent run, short capacity step (smoke run)
# Env: CADDY (path to a caddy built with ./xcaddy.sh build; default ./caddy),
#      N (requests per kind and configuration, sequential; default 200),
#      CONC (concurrency of the run under load, 0 = none; default 8),
#      SIZE_KIB (upload and download size, default 256), REMOTE_KIB (size of
#      remote media, default 64), QUIET (seconds of the idle baseline,
#      default 5), CAPACITY (0: skip the capacity step; default 1),
#      CAP_SECS (seconds per pgbench run, default 10), CAP_REDIS_N
#      (requests per redis-benchmark test, default 100000), PG_DSN, PG_OPTS
#      (see bench/lib.sh pg_database).
#
# Services, shared by every instance:
#   - PostgreSQL (a throwaway cluster, or PG_DSN's server) reached through
#     bench/scale/pgcount, a TCP proxy that counts round trips: frontend
#     Sync ('S') and simple Query ('Q') messages (and the backend's
#     ReadyForQuery as a check), and the write statements (INSERT, UPDATE,
#     DELETE, MERGE) and the transactions that wrote;
#   - redis-server (global option redis): token invalidations and the
#     rate-limit buckets (every site has rate_limits, set high enough that
#     nothing is refused, so every request checks its buckets in Redis);
#   - bench/s3/s3server (the fake S3, in memory, counting requests by
#     method) as the only datastore (kinds local remote thumbnails);
#   - a stand-in homeserver (whoami) and bench/scale/origin, a remote server
#     over TLS answering federation media downloads (remote fetches).
# Instances: K Caddy processes (same server_name, signing key and config)
# behind a load-balancer Caddy (reverse_proxy, round robin); every request
# goes through it except the async uploads (see below).
#
# Per configuration (K = 1, then K = 3), after seeding (not measured) and a
# restart of the instances (so that their in-memory caches are empty) and a
# warm-up (each instance's connections and prepared statements), N requests
# of each kind, one at a time:
#   upload         POST /_matrix/media/v3/upload, SIZE_KIB random bytes
#   download hot   the same item N times (client v1 download; cached row)
#   download cold  N distinct items uploaded before the restart (first read
#                  on the instance that serves it)
#   thumbnail cold 320x240 scale of N distinct 640x480 JPEGs (first request:
#                  generated; the module's generation counter must grow by N)
#   thumbnail warm the same thumbnail N times (stored)
#   remote fetch   N distinct remote items, first request (the origin must
#                  have answered exactly N federation downloads)
#   async          /create on instance i, a download waiting for it on
#                  instance i+1 (the same one when K = 1), the PUT on
#                  instance i 20 ms later; counted per create+PUT+wait;
#                  latency from the PUT's start to the waiter's last byte
# Per kind: PostgreSQL round trips per request (all, and the coordinator's
# own from caddy_matrix_media_cluster_round_trips_total), PostgreSQL write
# statements and write transactions per request (without the access-time
# flush, a deferred batch every 30 s per instance, counted apart), Redis commands per request
# (total_commands_processed, which counts the commands a script calls too)
# and script runs (EVAL/EVALSHA: the rate limiter's one call per request),
# S3 requests per request (and by method), p50/p99.
# Background activity (health checks, LISTEN connections, sweeps) is
# measured first over QUIET idle seconds and its rate times each kind's
# duration is subtracted; the idle rates are reported too.
# Then, with CONC > 0, uploads, hot and cold downloads at concurrency CONC
# (4N requests each; cold downloads on items seeded before the restart):
# requests/s and p50/p99, for the latency under load.
# Last, with CAPACITY=1, the capacity of the shared services alone on this
# machine: pgbench (select-only and TPC-B-like) on the same PostgreSQL and
# redis-benchmark (GET, and EVAL of a 4-bucket script shaped like the rate
# limiter's, one per round trip and pipelined) on the same Redis, for the
# capacity arithmetic in the README.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
source bench/lib.sh
CADDY=${CADDY:-$ROOT/caddy}
N=${N:-200}
CONC=${CONC:-8}
SIZE_KIB=${SIZE_KIB:-256}
REMOTE_KIB=${REMOTE_KIB:-64}
QUIET=${QUIET:-5}
CAPACITY=${CAPACITY:-1}
CAP_SECS=${CAP_SECS:-10}
CAP_REDIS_N=${CAP_REDIS_N:-100000}
if [[ ${1:-} == --quick ]]; then N=20; CONC=0; QUIET=3; CAP_SECS=3; CAP_REDIS_N=10000; fi
SIZE=$((SIZE_KIB * 1024))
REMOTE_SIZE=$((REMOTE_KIB * 1024))

need go; need curl; need python3; need redis-server; need redis-cli
need_caddy

WORK=$(mktemp -d /tmp/mm-bench-scale.XXXXXX)
export XDG_DATA_HOME=$WORK/xdg/data XDG_CONFIG_HOME=$WORK/xdg/config
mkdir -p "$WORK/bin" "$WORK/xdg/data" "$WORK/xdg/config"

echo "bench: building bench/scale programs" >&2
CGO_ENABLED=1 go build -o "$WORK/bin/" ./bench/scale/pgcount ./bench/scale/origin ./bench/scale/drive \
	./bench/s3/s3server ./bench/fed/pki ./bench/thumbs/gen

# start_helper NAME CMD...: starts a bench helper (output in $WORK/NAME.log)
# and waits for its "ready" line.
start_helper() {
	local name=$1 pid
	shift
	"$@" >"$WORK/$name.log" 2>&1 &
	pid=$!; PIDS+=("$pid")
	wait_ready "$WORK/$name.log" "$pid" "$name"
}

# Shared services.
S3=$(free_port); REDIS=$(free_port); PGC=$(free_port); PGC_STATS=$(free_port); ORIGIN=$(free_port)
start_helper s3server "$WORK/bin/s3server" -port "$S3" -bucket media
redis-server --port "$REDIS" --bind 127.0.0.1 --save '' --appendonly no --daemonize no >"$WORK/redis.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do redis-cli -p "$REDIS" ping >/dev/null 2>&1 && break; sleep 0.1; done
redis-cli -p "$REDIS" ping >/dev/null || { echo "bench: redis-server did not start" >&2; cat "$WORK/redis.log" >&2; exit 1; }
"$WORK/bin/pki" -dir "$WORK/pki"
start_helper origin "$WORK/bin/origin" -port "$ORIGIN" -cert "$WORK/pki/cert.pem" -key "$WORK/pki/key.pem" -size "$REMOTE_SIZE"
ORIGIN_NAME=127.0.0.1:$ORIGIN
"$CADDY" matrix-media generate-key --out "$WORK/signing.key" >"$WORK/generate-key.log" 2>&1 ||
	{ echo "bench: generate-key failed" >&2; cat "$WORK/generate-key.log" >&2; exit 1; }

# The counting proxy goes in front of the PostgreSQL server of the first
# database (every database of the run is on that server).
pg_database scale1
DSN1=$DSN
pg_database scale3
DSN3=$DSN
PG_HOSTPORT=$(python3 -c 'import sys, urllib.parse as u; p = u.urlsplit(sys.argv[1]); print(f"{p.hostname}:{p.port or 5432}")' "$DSN1")
# The access-time flush (every 30 s per instance: one transaction with one
# UPDATE of last_access_ts per distinct item read since the last flush) is
# counted apart (-tag), or it would land on whichever kind runs then.
start_helper pgcount "$WORK/bin/pgcount" -port "$PGC" -stats-port "$PGC_STATS" -upstream "$PG_HOSTPORT" -tag "SET last_access_ts"
# via_proxy DSN: the DSN with the proxy's address instead of the server's.
via_proxy() {
	python3 -c 'import sys, urllib.parse as u; p = u.urlsplit(sys.argv[1]); n = p.netloc.rsplit("@", 1); a = (n[0] + "@" if len(n) == 2 else "") + "127.0.0.1:" + sys.argv[2]; q = u.parse_qs(p.query); q["sslmode"] = ["disable"]; print(u.urlunsplit(p._replace(netloc=a, query=u.urlencode(q, doseq=True))))' "$1" "$PGC"
}

# Test data: 2 x (N + warm-up) distinct JPEGs (one set per configuration)
# and one for the warm thumbnail.
WARM=10
NIMG=$((N + 3 * WARM + 1))
echo "bench: generating $((2 * NIMG)) source JPEGs (640x480)" >&2
mapfile -t IMGS < <("$WORK/bin/gen" -dir "$WORK/img" -n $((2 * NIMG)) -width 640 -height 480)

HS=$(free_port); LB_ADMIN=$(free_port); LB=$(free_port)
# worker_caddyfile I DSN: the Caddyfile of instance I.
worker_caddyfile() {
	cat <<EOF
{
$(caddy_globals "${ADMINS[$1]}")
	matrix_media {
		database postgres "$2"
		redis redis://127.0.0.1:$REDIS/0
		datastore s3bench s3 {
			kinds local remote thumbnails
			endpoint http://127.0.0.1:$S3
			region us-east-1
			bucket media
			path_style
			access_key_id bench
			secret_access_key bench-secret
		}
		federation {
			trusted_ca_file $WORK/pki/ca.pem
			allowed_networks 127.0.0.0/8
		}
	}
}
http://127.0.0.1:${PORTS[$1]} {
	matrix_media {
		server_name localhost
		homeserver http://127.0.0.1:$HS
		max_upload_size 1GiB
		signing_key $WORK/signing.key
		rate_limits {
			upload 1000000/1m
			download 1000000/1m
			download per_server 1000000/1m
			thumbnail 1000000/1m
			thumbnail per_server 1000000/1m
			remote 1000000/1m
			upload_bytes 1000GiB/1m
			download_bytes 1000GiB/1m
		}
	}
}
EOF
}
# lb_caddyfile K: the load balancer in front of instances 1..K, and the
# stand-in homeserver.
lb_caddyfile() {
	local ups="" i
	for i in $(seq 1 "$1"); do ups+=" 127.0.0.1:${PORTS[$i]}"; done
	cat <<EOF
{
$(caddy_globals "$LB_ADMIN")
}
$(homeserver_site "$HS")
http://127.0.0.1:$LB {
	reverse_proxy$ups {
		lb_policy round_robin
	}
}
EOF
}
ADMINS=(); PORTS=(); WPIDS=()
for i in 1 2 3; do ADMINS[i]=$(free_port); PORTS[i]=$(free_port); done
# start_worker I DSN / stop_worker I
start_worker() {
	worker_caddyfile "$1" "$2" >"$WORK/Caddyfile.$1"
	"$CADDY" run --config "$WORK/Caddyfile.$1" >>"$WORK/caddy.$1.log" 2>&1 &
	WPIDS[$1]=$!; PIDS+=("${WPIDS[$1]}")
	wait_http "http://127.0.0.1:${ADMINS[$1]}/config/" "$WORK/caddy.$1.log" "caddy $1" "${WPIDS[$1]}"
}
stop_worker() { stop_pid "${WPIDS[$1]}"; WPIDS[$1]=; }

BASE=http://127.0.0.1:$LB
drive() { "$WORK/bin/drive" "$@" || { for f in "$WORK"/caddy.*.log; do echo "== $f" >&2; tail -20 "$f" >&2; done; exit 1; }; }
# metric NAME K: the sum of a module counter over instances 1..K.
metric() {
	local i
	for i in $(seq 1 "$2"); do curl -fsS "http://127.0.0.1:${ADMINS[$i]}/metrics"; done |
		awk -v m="$1" '$1 == m || index($1, m "{") == 1 { s += $NF } END { printf "%.0f\n", s }'
}
# counters K: prints "pg_round_trips cluster_round_trips redis_commands
# s3_requests thumbnail_generations origin_downloads seconds redis_scripts
# s3_get s3_head s3_put s3_post s3_delete pg_writes pg_write_txs
# flush_statements flush_writes flush_txs" (redis_commands counts the
# commands scripts call too; redis_scripts the EVAL/EVALSHA runs).
counters() {
	local pg cl rd s3 gen org
	pg=$(curl -fsS "http://127.0.0.1:$PGC_STATS/stats" | awk '{ v[$1] = $2 } END { print v["round_trips"], v["writes"], v["write_txs"], v["tagged"], v["tagged_writes"], v["tagged_write_txs"] }')
	cl=$(metric caddy_matrix_media_cluster_round_trips_total "$1")
	rd=$(redis-cli -p "$REDIS" info all | tr -d '\r' | awk -F'[:=,]' '
		$1 == "total_commands_processed" { t = $2 }
		$1 == "cmdstat_evalsha" || $1 == "cmdstat_eval" || $1 == "cmdstat_evalsha_ro" || $1 == "cmdstat_eval_ro" { e += $3 }
		END { print t, e + 0 }')
	s3=$(curl -fsS "http://127.0.0.1:$S3/_stats" | awk '{ v[$1] = $2 } END { print v["requests"], v["GET"], v["HEAD"], v["PUT"], v["POST"], v["DELETE"] }')
	gen=$(metric caddy_matrix_media_thumbnail_generation_seconds_count "$1")
	org=$(curl -fsS --cacert "$WORK/pki/ca.pem" "https://$ORIGIN_NAME/stats" | awk '{ print $2 }')
	read -r rd_total rd_scripts <<<"$rd"
	read -r s3_total s3_methods <<<"$s3"
	read -r pg_rt pg_writes <<<"$pg"
	echo "$pg_rt $cl $rd_total $s3_total $gen $org $(date +%s.%N) $rd_scripts $s3_methods $pg_writes"
}
# per_request BEFORE AFTER N: per-request deltas, idle rates subtracted:
# "pg cluster redis s3 gens origin seconds redis_scripts s3_get s3_head
# s3_put s3_post s3_delete pg_writes pg_write_txs flush_statements"
# (PostgreSQL figures without the access-time flush's statements, counted
# apart in flush_statements, total not per request). The INFO call of the "after" sample is itself
# one Redis command, not the requests'.
per_request() {
	awk -v n="$3" -v rpg="$RATE_PG" -v rcl="$RATE_CL" -v rrd="$RATE_RD" -v rs3="$RATE_S3" -v rpw="$RATE_PGW" -v rpx="$RATE_PGX" '
		BEGIN { split(ARGV[1], a, " "); split(ARGV[2], b, " "); ARGV[1] = ""; ARGV[2] = ""
			t = b[7] - a[7]
			fl = b[16] - a[16]
			printf "%.2f %.2f %.2f %.2f %d %d %.1f %.2f", (b[1] - a[1] - fl - rpg * t) / n, (b[2] - a[2] - rcl * t) / n,
				(b[3] - a[3] - 1 - rrd * t) / n, (b[4] - a[4] - rs3 * t) / n, b[5] - a[5], b[6] - a[6], t, (b[8] - a[8]) / n
			for (i = 9; i <= 13; i++) printf " %.2f", (b[i] - a[i]) / n
			printf " %.2f %.2f %d", (b[14] - a[14] - (b[17] - a[17]) - rpw * t) / n, (b[15] - a[15] - (b[18] - a[18]) - rpx * t) / n, fl
			printf "\n" }' "$1" "$2"
}

REPORT=$WORK/report.txt
say "caddy-matrix-media scale-out benchmark $(date -u +%FT%TZ) on $(nproc) cores; N=$N sequential requests per kind, concurrency run c=$CONC; uploads ${SIZE_KIB} KiB, remote media ${REMOTE_KIB} KiB, 640x480 JPEG thumbnails; PostgreSQL: $PG_WHAT (through the counting proxy); $(redis-server --version | awk '{print $1, $3}'); fake S3 in memory"
say "   load at start:$(uptime | sed 's/.*load average://')"

# paths_for KIND IDS_FILE: media IDs (one a line) as client v1 paths: dl
# (download) or th (320x240 scale thumbnail).
paths_for() {
	case $1 in
	dl) sed 's#^#/_matrix/client/v1/media/download/localhost/#' "$2" ;;
	th) sed 's#^#/_matrix/client/v1/media/thumbnail/localhost/#; s#$#?width=320\&height=240\&method=scale#' "$2" ;;
	esac
}

KINDS=(upload dl_hot dl_cold th_cold th_warm remote async)
declare -A RES # RES[kind,K] = "pg cluster redis s3 p50 p99 rate"
declare -A LOADRES # LOADRES[kind,K] = "rate p50 p99"
declare -A IDLE # IDLE[K] = idle rates

# run_config K DSN IMG_OFFSET
run_config() {
	local k=$1 dsn img0=$3 i before after out pr
	local d=$WORK/k$k
	mkdir -p "$d"
	redis-cli -p "$REDIS" flushall >/dev/null
	for i in $(seq 1 "$k"); do start_worker "$i" "$2"; done
	lb_caddyfile "$k" >"$WORK/Caddyfile.lb"
	stop_pid "$CADDY_PID"
	run_caddy "$WORK/Caddyfile.lb" "$WORK/lb.$k.log" "$LB_ADMIN" "load balancer"
	echo "bench: K=$k: seeding" >&2
	# seed: cold downloads (+ warm-up + the concurrent run), cold thumbnails
	# (+ warm-up), the hot item and the warm thumbnail's source
	local ncold=$((N + WARM * k + (CONC > 0 ? 4 * N : 0)))
	drive -mode upload -base "$BASE" -n "$ncold" -size "$SIZE" -ids-out "$d/cold.ids" >/dev/null
	printf '%s\n' "${IMGS[@]:img0:NIMG}" >"$d/img.list"
	drive -mode upload -base "$BASE" -files "$d/img.list" -ids-out "$d/img.ids" >/dev/null
	# restart: empty caches
	for i in $(seq 1 "$k"); do stop_worker "$i"; done
	for i in $(seq 1 "$k"); do start_worker "$i" "$2"; done
	echo "bench: K=$k: warm-up" >&2
	local w=$((WARM * k))
	drive -mode upload -base "$BASE" -n "$w" -size "$SIZE" -ids-out "$d/warm.ids" >/dev/null
	head -n "$w" "$d/cold.ids" | paths_for dl /dev/stdin >"$d/warm-dl.paths"
	drive -mode get -base "$BASE" -paths "$d/warm-dl.paths" -size "$SIZE" >/dev/null
	head -n "$w" "$d/img.ids" | paths_for th /dev/stdin >"$d/warm-th.paths"
	drive -mode get -base "$BASE" -paths "$d/warm-th.paths" -type image/jpeg >/dev/null
	for i in $(seq 1 "$w"); do echo "/_matrix/client/v1/media/download/$ORIGIN_NAME/k${k}w$i"; done >"$d/warm-remote.paths"
	drive -mode get -base "$BASE" -paths "$d/warm-remote.paths" -size "$REMOTE_SIZE" >/dev/null
	local bases="" ; for i in $(seq 1 "$k"); do bases+="${bases:+,}http://127.0.0.1:${PORTS[$i]}"; done
	drive -mode async -bases "$bases" -n "$w" -size "$SIZE" >/dev/null
	# hot item and warm thumbnail: the last image, read once per instance
	local hot_id thumb_id
	hot_id=$(head -1 "$d/warm.ids")
	thumb_id=$(tail -1 "$d/img.ids")
	for i in $(seq 1 "$N"); do echo "/_matrix/client/v1/media/download/localhost/$hot_id"; done >"$d/hot.paths"
	for i in $(seq 1 "$N"); do echo "/_matrix/client/v1/media/thumbnail/localhost/$thumb_id?width=320&height=240&method=scale"; done >"$d/warm-thumb.paths"
	head -n $((2 * k)) "$d/hot.paths" >"$d/hot-warm.paths"; head -n $((2 * k)) "$d/warm-thumb.paths" >"$d/th-warm.paths"
	drive -mode get -base "$BASE" -paths "$d/hot-warm.paths" -size "$SIZE" >/dev/null
	drive -mode get -base "$BASE" -paths "$d/th-warm.paths" -type image/jpeg >/dev/null
	sed -n "$((w + 1)),$((w + N))p" "$d/cold.ids" | paths_for dl /dev/stdin >"$d/cold.paths"
	sed -n "$((w + 1)),$((w + N))p" "$d/img.ids" | paths_for th /dev/stdin >"$d/thumb-cold.paths"
	for i in $(seq 1 "$N"); do echo "/_matrix/client/v1/media/download/$ORIGIN_NAME/k${k}r$i"; done >"$d/remote.paths"

	echo "bench: K=$k: idle baseline (${QUIET}s)" >&2
	sleep 1
	before=$(counters "$k"); sleep "$QUIET"; after=$(counters "$k")
	read -r RATE_PG RATE_CL RATE_RD RATE_S3 RATE_PGW RATE_PGX <<<"$(awk 'BEGIN { split(ARGV[1], a, " "); split(ARGV[2], b, " "); ARGV[1] = ""; ARGV[2] = ""; t = b[7] - a[7]
		printf "%.3f %.3f %.3f %.3f %.3f %.3f\n", (b[1] - a[1] - (b[16] - a[16])) / t, (b[2] - a[2]) / t, (b[3] - a[3] - 1) / t, (b[4] - a[4]) / t,
			(b[14] - a[14] - (b[17] - a[17])) / t, (b[15] - a[15] - (b[18] - a[18])) / t }' "$before" "$after")"
	IDLE[$k]="$RATE_PG $RATE_CL $RATE_RD $RATE_S3 $RATE_PGW $RATE_PGX"

	local kind
	for kind in "${KINDS[@]}"; do
		echo "bench: K=$k: $kind" >&2
		before=$(counters "$k")
		case $kind in
		upload) out=$(drive -mode upload -base "$BASE" -n "$N" -size "$SIZE") ;;
		dl_hot) out=$(drive -mode get -base "$BASE" -paths "$d/hot.paths" -size "$SIZE") ;;
		dl_cold) out=$(drive -mode get -base "$BASE" -paths "$d/cold.paths" -size "$SIZE") ;;
		th_cold) out=$(drive -mode get -base "$BASE" -paths "$d/thumb-cold.paths" -type image/jpeg) ;;
		th_warm) out=$(drive -mode get -base "$BASE" -paths "$d/warm-thumb.paths" -type image/jpeg) ;;
		remote) out=$(drive -mode get -base "$BASE" -paths "$d/remote.paths" -size "$REMOTE_SIZE") ;;
		async) out=$(drive -mode async -bases "$bases" -n "$N" -size "$SIZE") ;;
		esac
		after=$(counters "$k")
		pr=$(per_request "$before" "$after" "$N")
		read -r p_pg p_cl p_rd p_s3 p_gen p_org _ p_rs s3g s3h s3p s3o s3d p_pw p_px p_fl <<<"$pr"
		FLUSHED[$k]=$(( ${FLUSHED[$k]:-0} + p_fl ))
		read -r rate p50 p99 _ <<<"$(head -1 <<<"$out")"
		case $kind in
		th_cold) ((p_gen == N)) || { echo "bench: K=$k: $N cold thumbnails, $p_gen generations" >&2; exit 1; } ;;
		th_warm) ((p_gen == 0)) || { echo "bench: K=$k: warm thumbnails generated $p_gen" >&2; exit 1; } ;;
		remote) ((p_org == N)) || { echo "bench: K=$k: $N remote items, the origin answered $p_org downloads" >&2; exit 1; } ;;
		esac
		if [[ $kind == async ]]; then
			read -r _ wp50 wp99 <<<"$(tail -1 <<<"$out")"
			WAKE[$k]="$wp50 $wp99"
		fi
		RES[$kind,$k]="$p_pg $p_cl $p_rd $p_rs $p_s3 $p50 $p99 $rate $p_pw $p_px"
		S3M[$kind,$k]=$(awk -v g="$s3g" -v h="$s3h" -v p="$s3p" -v o="$s3o" -v d="$s3d" 'BEGIN {
			if (g > 0) s = s sep "GET " g; if (g > 0) sep = ", "; if (h > 0) { s = s sep "HEAD " h; sep = ", " }
			if (p > 0) { s = s sep "PUT " p; sep = ", " } if (o > 0) { s = s sep "POST " o; sep = ", " } if (d > 0) s = s sep "DELETE " d; print s }')
	done

	if ((CONC > 0)); then
		echo "bench: K=$k: concurrent run, c=$CONC" >&2
		out=$(drive -mode upload -base "$BASE" -n $((4 * N)) -size "$SIZE" -c "$CONC")
		LOADRES[upload,$k]=$(awk '{ print $1, $2, $3 }' <<<"$out")
		for i in $(seq 1 4); do cat "$d/hot.paths"; done >"$d/hot4.paths"
		out=$(drive -mode get -base "$BASE" -paths "$d/hot4.paths" -size "$SIZE" -c "$CONC")
		LOADRES[dl_hot,$k]=$(awk '{ print $1, $2, $3 }' <<<"$out")
		sed -n "$((w + N + 1)),$((w + 5 * N))p" "$d/cold.ids" | paths_for dl /dev/stdin >"$d/cold4.paths"
		out=$(drive -mode get -base "$BASE" -paths "$d/cold4.paths" -size "$SIZE" -c "$CONC")
		LOADRES[dl_cold,$k]=$(awk '{ print $1, $2, $3 }' <<<"$out")
	fi
	for i in $(seq 1 "$k"); do stop_worker "$i"; done
}
declare -A WAKE S3M FLUSHED
run_config 1 "$(via_proxy "$DSN1")" 0
run_config 3 "$(via_proxy "$DSN3")" "$NIMG"

label() {
	case $1 in
	upload) echo "upload ${SIZE_KIB} KiB" ;; dl_hot) echo "download hot" ;; dl_cold) echo "download cold" ;;
	th_cold) echo "thumbnail cold" ;; th_warm) echo "thumbnail warm" ;; remote) echo "remote fetch ${REMOTE_KIB} KiB" ;;
	async) echo "async create+PUT+wait" ;;
	esac
}
say ""
say "Per request (N=$N each, sequential, through the load balancer; idle rates subtracted): 1 instance | 3 instances | ratio 3/1"
say ""
say "| request | PG round trips | of which coordinator | PG write statements | PG write transactions | Redis commands (in scripts too) | Redis script runs | S3 requests | p50 ms | p99 ms | p50 ratio |"
say "|---|---|---|---|---|---|---|---|---|---|---|"
for kind in "${KINDS[@]}"; do
	read -r a_pg a_cl a_rd a_rs a_s3 a_50 a_99 _ a_pw a_px <<<"${RES[$kind,1]}"
	read -r b_pg b_cl b_rd b_rs b_s3 b_50 b_99 _ b_pw b_px <<<"${RES[$kind,3]}"
	say "| $(label "$kind") | $a_pg / $b_pg | $a_cl / $b_cl | $a_pw / $b_pw | $a_px / $b_px | $a_rd / $b_rd | $a_rs / $b_rs | $a_s3 / $b_s3 | $a_50 / $b_50 | $a_99 / $b_99 | $(ratio "$b_50" "$a_50") |"
done
say ""
say "S3 requests per request by method (1 instance | 3 instances):"
for kind in "${KINDS[@]}"; do say "   $(label "$kind"): ${S3M[$kind,1]} | ${S3M[$kind,3]}"; done
say ""
say "async: waiter answered after the PUT's answer by p50/p99 $(echo "${WAKE[1]}" | tr ' ' '/') ms (1 instance, same instance) vs $(echo "${WAKE[3]}" | tr ' ' '/') ms (3 instances, waiter on another instance)"
read -r i1pg i1cl i1rd i1s3 i1pw i1px <<<"${IDLE[1]}"; read -r i3pg i3cl i3rd i3s3 i3pw i3px <<<"${IDLE[3]}"
say "idle (background) per second: PG round trips $i1pg / $i3pg (coordinator $i1cl / $i3cl), PG write statements $i1pw / $i3pw, Redis commands $i1rd / $i3rd, S3 requests $i1s3 / $i3s3 (1 / 3 instances)"
EVAL_US=$(redis-cli -p "$REDIS" info commandstats | tr -d '\r' | awk -F'[:=,]' '$1 == "cmdstat_evalsha" { for (i = 2; i < NF; i += 2) if ($i == "usec_per_call") print $(i + 1) }')
say "access-time flush (deferred: every 30 s per instance, one transaction with one UPDATE round trip per distinct item read there since its last flush), counted apart, not in the table: ${FLUSHED[1]:-0} / ${FLUSHED[3]:-0} UPDATEs during the measured kinds (1 / 3 instances)"
say "Redis server time per rate-limit script run (EVALSHA, INFO commandstats over the whole run): ${EVAL_US:-?} µs"
if ((CONC > 0)); then
	say ""
	say "Under load, c=$CONC, $((4 * N)) requests each (req/s, p50 ms, p99 ms): 1 instance | 3 instances"
	say ""
	say "| request | req/s | p50 ms | p99 ms |"
	say "|---|---|---|---|"
	for kind in upload dl_hot dl_cold; do
		read -r ar a5 a9 <<<"${LOADRES[$kind,1]}"; read -r br b5 b9 <<<"${LOADRES[$kind,3]}"
		say "| $(label "$kind") | $ar / $br | $a5 / $b5 | $a9 / $b9 |"
	done
fi

# Capacity of the shared services on this machine (no Caddy running):
# pgbench on the same PostgreSQL (select-only: one round trip per
# transaction; TPC-B-like: 7 round trips, 3 updates and an insert per
# transaction, the write path), and redis-benchmark on the same Redis (GET,
# and an EVAL of a token-bucket script shaped like the rate limiter's).
if ((CAPACITY)); then
	echo "bench: capacity of PostgreSQL and Redis (pgbench, redis-benchmark)" >&2
	PGB=${PG_BIN:+$PG_BIN/}pgbench
	command -v "$PGB" >/dev/null 2>&1 || PGB=$(ls /usr/lib/postgresql/*/bin/pgbench 2>/dev/null | sort -V | tail -1)
	say ""
	if [[ -x $PGB ]]; then
		pg_database pgbench
		"$PGB" -q -i -s 4 "$DSN" >"$WORK/pgbench-init.log" 2>&1 || { cat "$WORK/pgbench-init.log" >&2; exit 1; }
		pgb() { "$PGB" -n -c 8 -j 2 -T "$CAP_SECS" "$@" "$DSN" 2>&1 | awk '/^tps/ { printf "%.0f", $3 }'; }
		sel=$(pgb -S); tpcb=$(pgb)
		sel_p=$(pgb -S -M prepared)
		say "PostgreSQL capacity (pgbench, c=8, ${CAP_SECS}s each, client on the same 2 cores): select-only $sel tps simple protocol, $sel_p tps prepared (1 round trip each); TPC-B-like $tpcb tps (7 round trips: BEGIN, 3 UPDATE, SELECT, INSERT, END)"
	else
		say "PostgreSQL capacity: pgbench not found"
	fi
	if command -v redis-benchmark >/dev/null 2>&1; then
		rb() { redis-benchmark -p "$REDIS" -c 8 -r 1000000 -n "$CAP_REDIS_N" -q "$@" | tr '\r' '\n' | awk '/requests per second/ { for (i = 1; i <= NF; i++) if ($i == "requests") { printf "%.0f", $(i - 1); exit } }'; }
		# the rate limiter's shape for a request with 4 buckets: TIME, then
		# HMGET, HSET and PEXPIRE per bucket (13 calls, 14 commands counted)
		local_script="local t = redis.call('TIME') for i = 1, #KEYS do redis.call('HMGET', KEYS[i], 'l', 't') redis.call('HSET', KEYS[i], 'l', '1', 't', t[1]) redis.call('PEXPIRE', KEYS[i], 60000) end return 1"
		bucket_keys=(4 "rl:a:__rand_int__" "rl:b:__rand_int__" "rl:c:__rand_int__" "rl:d:__rand_int__")
		get=$(rb -t get)
		ev=$(rb eval "$local_script" "${bucket_keys[@]}")
		evp=$(rb -P 16 eval "$local_script" "${bucket_keys[@]}")
		say "Redis capacity (redis-benchmark, c=8, $CAP_REDIS_N requests, client on the same 2 cores): GET $get/s; EVAL of a 4-bucket script shaped like the rate limiter's (13 calls) $ev/s one per round trip, $evp/s pipelined 16 deep"
	fi
fi

say ""
say "   load at end:$(uptime | sed 's/.*load average://')"

mkdir -p "$ROOT/bench/results"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
cp "$REPORT" "$ROOT/bench/results/scale-$STAMP.txt"
echo "report saved under bench/results/"
