# shellcheck shell=bash
# bench/lib.sh: what every bench/run-*.sh script shares. Sourced, after the
# script has cd'd to the repository root:
#
#	source bench/lib.sh
#
# Sourcing it installs an EXIT trap (cleanup) that stops $CADDY_PID and
# every process in PIDS, runs the script's cleanup_hook if it defines one
# (for what is not a process: a database to drop), then removes $WORK.
# Scripts append the PIDs of their background helpers to PIDS.

CADDY_PID=
PIDS=()

# stop_pid PID: stops a background process (if PID is set) and reaps it.
stop_pid() {
	[[ -n ${1:-} ]] && kill "$1" 2>/dev/null && wait "$1" 2>/dev/null || true
}

cleanup() {
	stop_pid "$CADDY_PID"
	local p
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
	for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
	if declare -F cleanup_hook >/dev/null; then cleanup_hook; fi
	pg_cleanup
	if [[ -n ${WORK:-} ]]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT

# need CMD: exits unless CMD is installed. The message ends with
# BENCH_NEED_HINT (default: where ./xcaddy.sh deps installs it).
need() {
	command -v "$1" >/dev/null 2>&1 ||
		{ echo "bench: missing $1${BENCH_NEED_HINT- (./xcaddy.sh deps installs it)}" >&2; exit 1; }
}

# need_caddy: exits unless $CADDY is an executable.
need_caddy() {
	[[ -x $CADDY ]] || { echo "bench: no caddy at $CADDY; run ./xcaddy.sh build first" >&2; exit 1; }
}

# free_port: prints a free TCP port of 127.0.0.1.
free_port() {
	python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null ||
		echo $((20000 + RANDOM % 20000))
}

# wait_http URL LOG WHAT [PID]: waits up to 10 s for URL to answer 2xx
# (giving up early when PID has exited); else prints "WHAT did not start"
# and LOG, and exits.
wait_http() {
	local url=$1 log=$2 what=$3 pid=${4:-}
	for _ in $(seq 1 100); do
		curl -fsS "$url" >/dev/null 2>&1 && return 0
		[[ -z $pid ]] || kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	curl -fsS "$url" >/dev/null 2>&1 && return 0
	echo "bench: $what did not start" >&2; cat "$log" >&2; exit 1
}

# wait_ready LOG PID WHAT: waits up to 10 s for a "ready" line in LOG (the
# bench helper programs print one when listening); else as wait_http.
wait_ready() {
	for _ in $(seq 1 100); do
		grep -q '^ready' "$1" 2>/dev/null && return 0
		kill -0 "$2" 2>/dev/null || break
		sleep 0.1
	done
	grep -q '^ready' "$1" 2>/dev/null && return 0
	echo "bench: $3 did not start" >&2; cat "$1" >&2; exit 1
}

# run_caddy CONFIG LOG ADMIN_PORT [WHAT]: starts $CADDY on CONFIG (output
# in LOG), sets CADDY_PID, and waits for the admin API on ADMIN_PORT. Call
# it in the script's own shell, not in $(...), or CADDY_PID is lost.
run_caddy() {
	"$CADDY" run --config "$1" >"$2" 2>&1 &
	CADDY_PID=$!
	wait_http "http://127.0.0.1:$3/config/" "$2" "${4:-caddy}" "$CADDY_PID"
}

# say TEXT...: prints a line and appends it to $REPORT.
say() { echo "$*" | tee -a "$REPORT"; }

# ratio A B [DECIMALS]: A/B with DECIMALS decimals (default 2); n/a when B
# is 0.
ratio() { awk -v a="$1" -v b="$2" -v d="${3:-2}" 'BEGIN { if (b == 0) print "n/a"; else printf "%." d "f", a / b }'; }

# median: the median of the space-separated numbers on stdin (empty fields
# ignored, so lists built as "$x " are fine).
median() { tr ' ' '\n' | sort -g | awk 'NF {a[++n] = $1} END {print (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2}'; }

# PostgreSQL for the benchmarks (pg_database). PG_BIN and PG_DIR are set
# while a throwaway cluster runs; PG_DBS lists the databases made on
# PG_DSN's server.
PG_BIN=
PG_DIR=
PG_PORT=
PG_DBS=()

# as_pg CMD...: runs a PostgreSQL binary as the postgres user when the
# script runs as root (PostgreSQL refuses root), else as the current user.
as_pg() {
	if ((EUID == 0)); then runuser -u postgres -- "$@"; else "$@"; fi
}

# pg_database NAME: makes an empty database and sets DSN to it and PG_WHAT
# to a description. With PG_DSN set, the database is made on that server
# (named NAME_<pid>_<random>, dropped at exit); otherwise on a throwaway
# cluster from /usr/lib/postgresql/*/bin under $WORK/pg, started on the
# first call (with PG_OPTS as extra server options) and stopped at exit.
pg_database() {
	if [[ -n ${PG_DSN:-} ]]; then
		local db=${1}_$$_$RANDOM
		psql -q -v ON_ERROR_STOP=1 -d "$PG_DSN" -c "CREATE DATABASE $db" >/dev/null
		PG_DBS+=("$db")
		DSN=$(python3 -c 'import sys, urllib.parse as u; p = u.urlsplit(sys.argv[1]); print(u.urlunsplit(p._replace(path="/" + sys.argv[2])))' "$PG_DSN" "$db")
		PG_WHAT="server of PG_DSN, database $db"
		return
	fi
	if [[ -z $PG_DIR ]]; then
		local d
		for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k4 -V -r); do
			[[ -x $d/initdb && -x $d/pg_ctl ]] && { PG_BIN=$d; break; }
		done
		[[ -n $PG_BIN ]] || { echo "bench: no PostgreSQL binaries in /usr/lib/postgresql/*/bin (./xcaddy.sh deps installs them) and no PG_DSN" >&2; exit 1; }
		PG_PORT=$(free_port)
		chmod 755 "$WORK"
		mkdir -p "$WORK/pg"
		((EUID == 0)) && chown postgres: "$WORK/pg"
		as_pg "$PG_BIN/initdb" -D "$WORK/pg/data" -U postgres -A trust -E UTF8 --no-locale >"$WORK/initdb.log" 2>&1 ||
			{ cat "$WORK/initdb.log" >&2; exit 1; }
		PG_DIR=$WORK/pg
		# shellcheck disable=SC2086 # PG_OPTS is a list of options
		as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w \
			-o "-p $PG_PORT -k $PG_DIR -c listen_addresses=127.0.0.1 -c max_connections=100 ${PG_OPTS:-}" start >/dev/null ||
			{ cat "$PG_DIR/server.log" >&2; exit 1; }
	fi
	psql -q -v ON_ERROR_STOP=1 -d "postgres://postgres@127.0.0.1:$PG_PORT/postgres?sslmode=disable" -c "CREATE DATABASE $1" >/dev/null
	DSN="postgres://postgres@127.0.0.1:$PG_PORT/$1?sslmode=disable"
	PG_WHAT="throwaway cluster $("$PG_BIN/postgres" --version | awk '{print $3}'), defaults${PG_OPTS:+ + $PG_OPTS}"
}

# pg_cleanup (run by cleanup): stops the throwaway cluster, drops the
# databases made on PG_DSN's server.
pg_cleanup() {
	if [[ -n $PG_DIR ]]; then
		as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null 2>&1 || true
	fi
	local db
	for db in "${PG_DBS[@]}"; do
		psql -q -d "$PG_DSN" -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
	done
}

# Caddyfile pieces every benchmark's Caddy shares; use them inside an
# unquoted heredoc: $(caddy_globals "$ADMIN") in the global options block,
# $(homeserver_site "$HS") as a site.

# caddy_globals ADMIN_PORT: the global options of a benchmark Caddy: its
# admin endpoint, plain HTTP on loopback, no saved config.
caddy_globals() {
	printf '\tadmin 127.0.0.1:%s\n\tauto_https off\n\tdefault_bind 127.0.0.1\n\tpersist_config off' "$1"
}

# homeserver_site PORT: a stand-in homeserver on PORT answering whoami for
# the benchmark's token with @bench:localhost (all the module asks of it).
homeserver_site() {
	printf 'http://127.0.0.1:%s {\n\trespond /_matrix/client/v3/account/whoami `{"user_id":"@bench:localhost","device_id":"BENCH"}` 200\n}' "$1"
}

# media_site PORT HS_PORT [EXTRA]: the benchmark's media site on PORT
# (server name localhost, the stand-in homeserver on HS_PORT, uploads up to
# 1 GiB); EXTRA (lines of Caddyfile) goes into the site block after the
# handler.
media_site() {
	printf 'http://127.0.0.1:%s {\n\tmatrix_media {\n\t\tserver_name localhost\n\t\thomeserver http://127.0.0.1:%s\n\t\tmax_upload_size 1GiB\n\t}\n%s\n}' "$1" "$2" "${3:-}"
}
