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
