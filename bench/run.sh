#!/usr/bin/env bash
# Load benchmark: caddy-matrix-media against Caddy's own file_server on the
# same bytes, in ONE Caddy process, interleaved round by round, reported as
# ratios (absolute numbers move with the machine's load; ratios are what
# count). Everything binds to 127.0.0.1.
#
# Usage: bench/run.sh [--quick]
#   --quick   shorter rounds (for a smoke run)
# Env: CADDY (path to a caddy built with ./xcaddy.sh build; default ./caddy),
#      ROUNDS (default 3), DURATION (seconds per wrk run, default 8),
#      ONLY=auth (run scenario 5 alone).
#
# Scenarios (issue #2 targets):
#   1. 100 KiB download, concurrency 32: module vs file_server req/s (>= 0.8x),
#      under Caddy's default server options and with write_idle off.
#   2. 256 MiB download, one connection: MB/s vs file_server (>= 0.9x with
#      write_idle off; report the defaults too).
#   3. 8 concurrent 64 MiB uploads: peak RSS growth (< 64 MiB in total).
#   4. the same 32 MiB body uploaded again: time vs first upload and vs
#      sha256sum of the bytes (no second write).
#   5. (issue #3) authenticated 100 KiB download (/_matrix/client/v1, bearer
#      token, warm token cache), concurrency 32, vs the same download with
#      auth disabled (the legacy endpoint): >= 0.9x.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
source bench/lib.sh
CADDY=${CADDY:-$ROOT/caddy}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8}
ONLY=${ONLY:-}
if [[ ${1:-} == --quick ]]; then ROUNDS=1; DURATION=3; fi

need wrk; need curl; need sha256sum
need_caddy

WORK=$(mktemp -d /tmp/mm-bench.XXXXXX)
ADMIN=$(free_port); HS=$(free_port); MM=$(free_port); FS=$(free_port)
export XDG_DATA_HOME=$WORK/xdg/data XDG_CONFIG_HOME=$WORK/xdg/config
mkdir -p "$WORK/files" "$WORK/xdg/data" "$WORK/xdg/config"

# Test data: the same bytes are uploaded through the module and placed in the
# file_server root.
head -c $((100 * 1024)) /dev/urandom >"$WORK/files/small.bin"
head -c $((256 * 1024 * 1024)) /dev/urandom >"$WORK/files/large.bin"
head -c $((64 * 1024 * 1024)) /dev/urandom >"$WORK/up64.bin"
head -c $((32 * 1024 * 1024)) /dev/urandom >"$WORK/up32.bin"

write_config() { # $1 = extra global server options
	cat >"$WORK/Caddyfile" <<EOF
{
$(caddy_globals "$ADMIN")
	servers {
		$1
	}
	matrix_media {
		storage_path $WORK/store
		database sqlite $WORK/store/media.db
	}
}
# Stand-in homeserver: only whoami is needed (uploads are authenticated).
$(homeserver_site "$HS")
$(media_site "$MM" "$HS")
http://127.0.0.1:$FS {
	root * $WORK/files
	file_server
}
EOF
}

start_caddy() { run_caddy "$WORK/Caddyfile" "$WORK/caddy.log" "$ADMIN"; }

reload_caddy() { "$CADDY" reload --force --config "$WORK/Caddyfile" --address "127.0.0.1:$ADMIN" >/dev/null 2>&1; }

upload() { # $1 file -> prints media id
	curl -fsS -X POST -H 'Authorization: Bearer bench' -H 'Content-Type: application/octet-stream' \
		--data-binary "@$1" "http://127.0.0.1:$MM/_matrix/media/v3/upload?filename=$(basename "$1")" |
		sed -E 's#.*mxc://[^/]+/([A-Za-z0-9_-]+).*#\1#'
}

# wrk_rate URL CONNS THREADS [HEADER] -> prints "req/s bytes/s"
wrk_rate() {
	local out hdr=()
	[[ -n ${4:-} ]] && hdr=(-H "$4")
	out=$(wrk -t"$3" -c"$2" -d"${DURATION}s" --latency "${hdr[@]}" "$1" 2>&1)
	if grep -q 'Non-2xx' <<<"$out"; then echo "bench: non-2xx responses from $1" >&2; echo "$out" >&2; exit 1; fi
	local rps tps
	rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
	tps=$(awk '/^Transfer\/sec/ {v=$2; u=substr(v,length(v)-1); n=substr(v,1,length(v)-2);
		m=(u=="GB")?1e9*1.073741824:(u=="MB")?1048576:(u=="KB")?1024:1; printf "%.0f", n*m}' <<<"$out")
	echo "$rps $tps"
}


REPORT=$WORK/report.txt

say "caddy-matrix-media load benchmark $(date -u +%FT%TZ) on $(nproc) cores; rounds=$ROUNDS duration=${DURATION}s"

for mode in default write_idle_off; do
	if [[ $mode == default ]]; then write_config ""; else write_config "timeouts {
			write_idle -1s
		}"; fi
	if [[ -z $CADDY_PID ]]; then start_caddy; else reload_caddy; fi
	SMALL_ID=${SMALL_ID:-$(upload "$WORK/files/small.bin")}
	LARGE_ID=${LARGE_ID:-$(upload "$WORK/files/large.bin")}
	MM_SMALL="http://127.0.0.1:$MM/_matrix/media/v3/download/localhost/$SMALL_ID"
	MM_LARGE="http://127.0.0.1:$MM/_matrix/media/v3/download/localhost/$LARGE_ID"
	# sanity: identical bytes from both servers
	cmp <(curl -fsS "$MM_SMALL") "$WORK/files/small.bin"
	cmp <(curl -fsS "http://127.0.0.1:$FS/small.bin") "$WORK/files/small.bin"

	MM_SMALL_V1="http://127.0.0.1:$MM/_matrix/client/v1/media/download/localhost/$SMALL_ID"
	cmp <(curl -fsS -H 'Authorization: Bearer bench' "$MM_SMALL_V1") "$WORK/files/small.bin" # also warms the token cache

	small_ratios=(); large_ratios=(); small_mm=(); small_fs=(); large_mm=(); large_fs=()
	auth_ratios=(); auth_on=(); auth_off=()
	for round in $(seq 1 "$ROUNDS"); do
		# alternate which runs first, so drift of the machine's load
		# does not favour one side
		if ((round % 2)); then
			read -r off_rps _ < <(wrk_rate "$MM_SMALL" 32 2)
			read -r on_rps _ < <(wrk_rate "$MM_SMALL_V1" 32 2 'Authorization: Bearer bench')
		else
			read -r on_rps _ < <(wrk_rate "$MM_SMALL_V1" 32 2 'Authorization: Bearer bench')
			read -r off_rps _ < <(wrk_rate "$MM_SMALL" 32 2)
		fi
		auth_off+=("$off_rps"); auth_on+=("$on_rps"); auth_ratios+=("$(ratio "$on_rps" "$off_rps")")
		[[ $ONLY == auth ]] && continue
		read -r fs_rps _ < <(wrk_rate "http://127.0.0.1:$FS/small.bin" 32 2)
		read -r mm_rps _ < <(wrk_rate "$MM_SMALL" 32 2)
		small_fs+=("$fs_rps"); small_mm+=("$mm_rps"); small_ratios+=("$(ratio "$mm_rps" "$fs_rps")")
		read -r _ fs_bps < <(wrk_rate "http://127.0.0.1:$FS/large.bin" 1 1)
		read -r _ mm_bps < <(wrk_rate "$MM_LARGE" 1 1)
		large_fs+=("$fs_bps"); large_mm+=("$mm_bps"); large_ratios+=("$(ratio "$mm_bps" "$fs_bps")")
	done
	say ""
	[[ $ONLY == auth ]] || say "[$mode] 100 KiB download, c=32: module $(echo "${small_mm[*]}" | median) req/s, file_server $(echo "${small_fs[*]}" | median) req/s, ratio median $(echo "${small_ratios[*]}" | median) (rounds: ${small_ratios[*]}) target >= 0.80"
	say "[$mode] 100 KiB authenticated download (warm token cache), c=32: $(echo "${auth_on[*]}" | median) req/s, auth disabled (legacy endpoint) $(echo "${auth_off[*]}" | median) req/s, ratio median $(echo "${auth_ratios[*]}" | median) (rounds: ${auth_ratios[*]}) target >= 0.90"
	[[ $ONLY == auth ]] || say "[$mode] 256 MiB download, c=1: module $(awk -v b="$(echo "${large_mm[*]}" | median)" 'BEGIN{printf "%.0f", b/1e6}') MB/s, file_server $(awk -v b="$(echo "${large_fs[*]}" | median)" 'BEGIN{printf "%.0f", b/1e6}') MB/s, ratio median $(echo "${large_ratios[*]}" | median) (rounds: ${large_ratios[*]}) target >= 0.90 with write_idle off"
done

save_report() {
	mkdir -p "$ROOT/bench/results"
	cp "$REPORT" "$ROOT/bench/results/$(date -u +%Y%m%dT%H%M%SZ).txt"
	echo "report saved under bench/results/"
}
if [[ $ONLY == auth ]]; then save_report; exit 0; fi

# Uploads: peak RSS of 8 concurrent 64 MiB uploads. VmHWM is reset through
# /proc/PID/clear_refs (5) after an idle baseline.
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$CADDY_PID/status"; }
hwm_kib() { awk '/^VmHWM/ {print $2}' "/proc/$CADDY_PID/status"; }
sleep 1
IDLE=$(rss_kib)
echo 5 >"/proc/$CADDY_PID/clear_refs" 2>/dev/null || true
pids=()
for i in $(seq 1 8); do
	# distinct bodies: one changed byte each, so no dedup shortcut
	cp "$WORK/up64.bin" "$WORK/up64.$i.bin"; printf '%08d' "$i" | dd of="$WORK/up64.$i.bin" bs=1 seek=0 conv=notrunc status=none
	curl -fsS -o /dev/null -X POST -H 'Authorization: Bearer bench' --data-binary "@$WORK/up64.$i.bin" \
		"http://127.0.0.1:$MM/_matrix/media/v3/upload" &
	pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
PEAK=$(hwm_kib)
say ""
say "8 concurrent 64 MiB uploads: idle RSS $((IDLE / 1024)) MiB, peak RSS $((PEAK / 1024)) MiB, growth $(((PEAK - IDLE) / 1024)) MiB (target < 64 MiB)"

# Repeated upload of stored bytes.
time_upload() { curl -fsS -o /dev/null -w '%{time_total}\n' -X POST -H 'Authorization: Bearer bench' \
	--data-binary "@$1" "http://127.0.0.1:$MM/_matrix/media/v3/upload"; }
first=$(time_upload "$WORK/up32.bin")
repeats=(); for _ in 1 2 3 4 5; do repeats+=("$(time_upload "$WORK/up32.bin")"); done
TIMEFORMAT=%R
hash_s=$( { time sha256sum "$WORK/up32.bin" >/dev/null; } 2>&1 | tail -1)
rep=$(echo "${repeats[*]}" | median)
say "32 MiB upload: first ${first}s, repeat median ${rep}s (ratio $(ratio "$rep" "$first"); target <= 0.30x first), sha256sum of the bytes ${hash_s}s"
say "   the store keeps one blob for it: $(find "$WORK/store" -type f -size +31M -size -33M | wc -l) file(s) of ~32 MiB"

save_report
