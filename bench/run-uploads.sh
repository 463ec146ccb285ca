#!/usr/bin/env bash
# Upload benchmark (issue 14): caddy-matrix-media against bench/uploads/sink,
# a plain Go HTTP server that hashes each body into a temp file and renames
# it to its hash (no fsync, no database), on the same disk, interleaved
# round by round and reported as ratios (absolute numbers move with the
# machine's load; ratios are what count). A second sink with -durable (file
# fsynced before the rename, directory after it: the module's promise for
# the bytes, still without a database) runs in the same rounds as the
# physical limit of a durable upload. Everything binds to 127.0.0.1.
#
# Usage: bench/run-uploads.sh [--quick]
# Env: CADDY (a caddy built with ./xcaddy.sh build; default ./caddy),
#      ROUNDS (default 3), DURATION (seconds per wrk run, default 8),
#      LARGE_N (64 MiB uploads per side and round, default 4),
#      PROFILE=DIR (also write a 10 s CPU profile of Caddy during a
#      256 KiB run, and strace -c -f of it, into DIR),
#      ONLY=small|large|rss (one scenario),
#      PRESHARD=1 (the first Caddy's store starts with all 65536 shard
#      directories blobs/xx/yy, as an established store has them: a young
#      store creates one, and syncs its parent, for nearly every upload),
#      CADDY_B (a second caddy, e.g. the build before a change: run as a
#      third side in the same rounds of scenarios 1 and 2, reported as
#      B/sink and module/B), SYNC_B=full (B's SQLite database with
#      "synchronous full"; with CADDY_B=$CADDY it measures that setting).
#
# Scenarios:
#   1. 256 KiB uploads, c=8 (wrk, 2 threads): uploads/s, p50 and CPU time
#      per upload (from /proc/PID/stat), module vs sink and vs durable sink. Every request sends distinct bytes (a counter in the first 32
#      bytes), so neither side can deduplicate. Target >= 0.8x the sink.
#   2. 64 MiB uploads, one at a time (curl -T, streamed), distinct bodies:
#      MB/s, module vs sink and vs durable sink.
#   3. 8 concurrent 64 MiB uploads: peak RSS growth of each process,
#      measured first, on fresh processes.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
source bench/lib.sh
CADDY=${CADDY:-$ROOT/caddy}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8}
LARGE_N=${LARGE_N:-4}
PROFILE=${PROFILE:-}
ONLY=${ONLY:-}
if [[ ${1:-} == --quick ]]; then ROUNDS=1; DURATION=3; LARGE_N=2; fi

need wrk; need curl
need_caddy
[[ -z $PROFILE ]] || need strace

WORK=$(mktemp -d /tmp/mm-bench-uploads.XXXXXX)
ADMIN=$(free_port); HS=$(free_port); MM=$(free_port); SINK=$(free_port); DSINK=$(free_port)
export XDG_DATA_HOME=$WORK/xdg/data XDG_CONFIG_HOME=$WORK/xdg/config
mkdir -p "$WORK/xdg/data" "$WORK/xdg/config" "$WORK/bin"

go build -o "$WORK/bin/" ./bench/uploads/sink
"$WORK/bin/sink" -listen "127.0.0.1:$SINK" -dir "$WORK/sink" >"$WORK/sink.log" 2>&1 &
SINK_PID=$!
PIDS+=("$SINK_PID")
wait_ready "$WORK/sink.log" "$SINK_PID" sink
"$WORK/bin/sink" -listen "127.0.0.1:$DSINK" -dir "$WORK/dsink" -durable >"$WORK/dsink.log" 2>&1 &
DSINK_PID=$!
PIDS+=("$DSINK_PID")
wait_ready "$WORK/dsink.log" "$DSINK_PID" "durable sink"

head -c $((256 * 1024)) /dev/urandom >"$WORK/up256.bin"
head -c $((64 * 1024 * 1024)) /dev/urandom >"$WORK/up64.bin"

cat >"$WORK/Caddyfile" <<EOF
{
$(caddy_globals "$ADMIN")
	matrix_media {
		storage_path $WORK/store
		database sqlite $WORK/store/media.db
	}
}
# Stand-in homeserver: only whoami is needed (uploads are authenticated; the
# module caches the answer).
$(homeserver_site "$HS")
$(media_site "$MM" "$HS")
EOF
if [[ ${PRESHARD:-} == 1 ]]; then
	for a in $(printf '%02x ' $(seq 0 255)); do
		mkdir -p $(printf "$WORK/store/blobs/$a/%02x " $(seq 0 255))
	done
	sync
fi
run_caddy "$WORK/Caddyfile" "$WORK/caddy.log" "$ADMIN"

CADDY_B=${CADDY_B:-}
if [[ -n $CADDY_B ]]; then
	ADMIN_B=$(free_port); MM_B=$(free_port)
	sed -e "s#127.0.0.1:$ADMIN#127.0.0.1:$ADMIN_B#" -e "s#$WORK/store#$WORK/store-b#g" \
		-e "s#^http://127.0.0.1:$MM {#http://127.0.0.1:$MM_B {#" "$WORK/Caddyfile" |
		awk -v hs="$HS" '/^http:\/\/127.0.0.1:/ && index($0, ":" hs " {") {skip=1} skip && /^}/ {skip=0; next} !skip' |
		awk -v sync="${SYNC_B:-}" 'sync != "" && $1 == "database" && $2 == "sqlite" {print $0 " {"; print "\t\t\tsynchronous " sync; print "\t\t}"; next} {print}' >"$WORK/Caddyfile.b"
	"$CADDY_B" run --config "$WORK/Caddyfile.b" >"$WORK/caddy-b.log" 2>&1 &
	B_PID=$!
	PIDS+=("$B_PID")
	wait_http "http://127.0.0.1:$ADMIN_B/config/" "$WORK/caddy-b.log" "caddy B" "$B_PID"
	MM_B_URL="http://127.0.0.1:$MM_B/_matrix/media/v3/upload"
	curl -fsS -X POST -H 'Authorization: Bearer bench' --data-binary "@$WORK/up256.bin" "$MM_B_URL" | grep -q '"content_uri":"mxc://localhost/'
fi

MM_URL="http://127.0.0.1:$MM/_matrix/media/v3/upload"
SINK_URL="http://127.0.0.1:$SINK/upload"
DSINK_URL="http://127.0.0.1:$DSINK/upload"
# sanity: both answer a content URI
curl -fsS -X POST -H 'Authorization: Bearer bench' --data-binary "@$WORK/up256.bin" "$MM_URL" | grep -q '"content_uri":"mxc://localhost/'
curl -fsS -X POST --data-binary "@$WORK/up256.bin" "$SINK_URL" | grep -q '"content_uri":"mxc://sink/'
curl -fsS -X POST --data-binary "@$WORK/up256.bin" "$DSINK_URL" | grep -q '"content_uri":"mxc://sink/'

# The wrk script: every request is the 256 KiB body with its first 32 bytes
# replaced by the thread's id, a counter and a per-run nonce, so that no two
# requests (of any run) carry the same bytes.
cat >"$WORK/post.lua" <<EOF
local f = io.open("$WORK/up256.bin", "rb")
local base = f:read("*a")
f:close()
local rest = base:sub(33)
local threads = 0
function setup(thread)
	threads = threads + 1
	thread:set("tid", threads)
end
local n = 0
function request()
	n = n + 1
	local head = string.format("%04d%012d%016d", tid, n, NONCE)
	return wrk.format("POST", nil, nil, head .. rest)
end
EOF

# cpu_ticks PID: user+system CPU time of PID in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TICK=$(getconf CLK_TCK)

# wrk_upload URL [PID] -> prints "uploads/s p50_ms cpu_ms_per_upload" (the
# last is the CPU time PID spent per upload during the run, 0 without PID);
# any non-2xx fails the run.
RUN=0
wrk_upload() {
	local out c0=0 c1=0
	RUN=$((RUN + 1))
	[[ -z ${2:-} ]] || c0=$(cpu_ticks "$2")
	sed "s/NONCE/$RUN$RANDOM/" "$WORK/post.lua" >"$WORK/post.$RUN.lua"
	out=$(wrk -t2 -c8 -d"${DURATION}s" --latency -H 'Authorization: Bearer bench' \
		-H 'Content-Type: application/octet-stream' -s "$WORK/post.$RUN.lua" "$1" 2>&1)
	if grep -q 'Non-2xx\|Socket errors' <<<"$out"; then echo "bench: errors from $1" >&2; echo "$out" >&2; exit 1; fi
	[[ -z ${2:-} ]] || c1=$(cpu_ticks "$2")
	local rps p50 n
	rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
	n=$(awk '/requests in/ {print $1}' <<<"$out")
	p50=$(awk '$1 == "50%" {v=$2; if (v ~ /us$/) {sub(/us$/,"",v); v/=1000} else if (v ~ /ms$/) sub(/ms$/,"",v); else if (v ~ /s$/) {sub(/s$/,"",v); v*=1000}; print v}' <<<"$out")
	echo "$rps $p50 $(awk -v c=$((c1 - c0)) -v t="$TICK" -v n="$n" 'BEGIN{printf "%.2f", c * 1000 / t / n}')"
}

# large_mbs URL -> MB/s of LARGE_N sequential 64 MiB uploads, each with
# distinct first bytes (curl -T streams the file; POST like the module wants).
large_mbs() {
	local total=0 t i
	for i in $(seq 1 "$LARGE_N"); do
		printf '%016d%016d' "$RANDOM$RANDOM" "$((++RUN))" | dd of="$WORK/up64.bin" bs=1 seek=0 conv=notrunc status=none
		t=$(curl -fsS -o /dev/null -w '%{time_total}' -X POST -T "$WORK/up64.bin" \
			-H 'Authorization: Bearer bench' -H 'Content-Type: application/octet-stream' "$1")
		total=$(awk -v a="$total" -v b="$t" 'BEGIN{print a + b}')
	done
	awk -v n="$LARGE_N" -v t="$total" 'BEGIN{printf "%.0f", n * 64 * 1048576 / t / 1e6}'
}

REPORT=$WORK/report.txt
say "caddy-matrix-media upload benchmark $(date -u +%FT%TZ) on $(nproc) cores; rounds=$ROUNDS duration=${DURATION}s large_n=$LARGE_N; $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

if [[ -z $ONLY || $ONLY == rss ]]; then
	# Peak RSS of 8 concurrent 64 MiB uploads (distinct bodies), measured
	# first, while the processes are fresh (a Go heap grown by the other
	# scenarios is kept and would hide the growth); VmHWM is reset through
	# /proc/PID/clear_refs (5) after an idle baseline.
	rss8() { # $1 pid, $2 url -> "idle_MiB peak_MiB"
		local idle peak i pids=()
		sleep 1
		idle=$(awk '/^VmRSS/ {print $2}' "/proc/$1/status")
		echo 5 >"/proc/$1/clear_refs" 2>/dev/null || true
		for i in $(seq 1 8); do
			cp "$WORK/up64.bin" "$WORK/up64.$i.bin"
			printf '%016d%016d' "$i" "$((++RUN))$RANDOM" | dd of="$WORK/up64.$i.bin" bs=1 seek=0 conv=notrunc status=none
		done
		for i in $(seq 1 8); do
			curl -fsS -o /dev/null -X POST -T "$WORK/up64.$i.bin" -H 'Authorization: Bearer bench' \
				-H 'Content-Type: application/octet-stream' "$2" &
			pids+=($!)
		done
		for i in "${pids[@]}"; do wait "$i"; done
		peak=$(awk '/^VmHWM/ {print $2}' "/proc/$1/status")
		rm -f "$WORK"/up64.?.bin
		echo "$((idle / 1024)) $((peak / 1024))"
	}
	read -r mi mpk < <(rss8 "$CADDY_PID" "$MM_URL")
	read -r si spk < <(rss8 "$SINK_PID" "$SINK_URL")
	RSS_LINE="8 concurrent 64 MiB uploads (fresh processes, before the other scenarios): module RSS idle $mi MiB, peak $mpk MiB (growth $((mpk - mi)) MiB); sink idle $si MiB, peak $spk MiB (growth $((spk - si)) MiB)"
fi


if [[ -n $PROFILE ]]; then
	# The CPU profile and the system-call count come from two separate runs
	# (strace slows the process it traces).
	mkdir -p "$PROFILE"
	curl -fsS -o "$PROFILE/cpu.pprof" "http://127.0.0.1:$ADMIN/debug/pprof/profile?seconds=10" &
	prof=$!
	sleep 0.2
	DURATION=11 wrk_upload "$MM_URL" "$CADDY_PID" >"$PROFILE/wrk.txt"
	wait "$prof"
	timeout 10 strace -c -f -p "$CADDY_PID" -o "$PROFILE/strace.txt" 2>/dev/null &
	st=$!
	sleep 0.5
	DURATION=8 wrk_upload "$MM_URL" >"$PROFILE/wrk-strace.txt"
	wait "$st" || true
	echo "profile: $PROFILE/cpu.pprof (uploads/s, p50 ms, CPU ms per upload: $(cat "$PROFILE/wrk.txt")), $PROFILE/strace.txt ($(cat "$PROFILE/wrk-strace.txt") under strace)"
fi

sm_mm=(); sm_sk=(); sm_r=(); p50_mm=(); p50_sk=(); p50_r=(); lg_mm=(); lg_sk=(); lg_r=()
sm_d=(); sm_dr=(); sm_md=(); p50_d=(); cpu_d=(); lg_d=(); lg_dr=(); lg_md=()
cpu_mm=(); cpu_sk=(); cpu_b=(); sm_b=(); sm_br=(); sm_ab=(); p50_b=(); lg_b=(); lg_br=(); lg_ab=()
for round in $(seq 1 "$ROUNDS"); do
	if [[ -z $ONLY || $ONLY == small ]]; then
		# rotate which side runs first, so drift of the machine's load
		# does not favour one
		sides=(m s d); [[ -z $CADDY_B ]] || sides=(m s d b)
		for ((k = 0; k < ${#sides[@]}; k++)); do
			case ${sides[(k + round) % ${#sides[@]}]} in
			m) read -r mr mp mc < <(wrk_upload "$MM_URL" "$CADDY_PID") ;;
			s) read -r sr sp sc < <(wrk_upload "$SINK_URL" "$SINK_PID") ;;
			d) read -r dr dp dc < <(wrk_upload "$DSINK_URL" "$DSINK_PID") ;;
			b) read -r br bp bc < <(wrk_upload "$MM_B_URL" "$B_PID") ;;
			esac
		done
		if [[ -n $CADDY_B ]]; then
			sm_b+=("$br"); p50_b+=("$bp"); cpu_b+=("$bc"); sm_br+=("$(ratio "$br" "$sr")"); sm_ab+=("$(ratio "$mr" "$br")")
		fi
		sm_mm+=("$mr"); sm_sk+=("$sr"); sm_r+=("$(ratio "$mr" "$sr")"); cpu_mm+=("$mc"); cpu_sk+=("$sc")
		sm_d+=("$dr"); p50_d+=("$dp"); cpu_d+=("$dc"); sm_dr+=("$(ratio "$dr" "$sr")"); sm_md+=("$(ratio "$mr" "$dr")")
		p50_mm+=("$mp"); p50_sk+=("$sp"); p50_r+=("$(ratio "$mp" "$sp")")
	fi
	if [[ -z $ONLY || $ONLY == large ]]; then
		sides=(m s d); [[ -z $CADDY_B ]] || sides=(m s d b)
		for ((k = 0; k < ${#sides[@]}; k++)); do
			case ${sides[(k + round) % ${#sides[@]}]} in
			m) m=$(large_mbs "$MM_URL") ;;
			s) s=$(large_mbs "$SINK_URL") ;;
			d) d=$(large_mbs "$DSINK_URL") ;;
			b) b=$(large_mbs "$MM_B_URL") ;;
			esac
		done
		if [[ -n $CADDY_B ]]; then
			lg_b+=("$b"); lg_br+=("$(ratio "$b" "$s")"); lg_ab+=("$(ratio "$m" "$b")")
		fi
		lg_mm+=("$m"); lg_sk+=("$s"); lg_r+=("$(ratio "$m" "$s")")
		lg_d+=("$d"); lg_dr+=("$(ratio "$d" "$s")"); lg_md+=("$(ratio "$m" "$d")")
	fi
done

say ""
if [[ -z $ONLY || $ONLY == small ]]; then
	say "256 KiB uploads, c=8: module $(echo "${sm_mm[*]}" | median)/s, sink $(echo "${sm_sk[*]}" | median)/s, ratio median $(echo "${sm_r[*]}" | median) (rounds: ${sm_r[*]}) target >= 0.80"
	say "256 KiB uploads, c=8, p50: module $(echo "${p50_mm[*]}" | median) ms, sink $(echo "${p50_sk[*]}" | median) ms, ratio median $(echo "${p50_r[*]}" | median) (rounds: ${p50_r[*]})"
	say "256 KiB uploads, c=8, CPU per upload: module $(echo "${cpu_mm[*]}" | median) ms, sink $(echo "${cpu_sk[*]}" | median) ms (rounds: ${cpu_mm[*]} / ${cpu_sk[*]})"
	say "256 KiB uploads, c=8, durable sink: $(echo "${sm_d[*]}" | median)/s, p50 $(echo "${p50_d[*]}" | median) ms, CPU $(echo "${cpu_d[*]}" | median) ms/upload; durable sink/sink median $(echo "${sm_dr[*]}" | median) (rounds: ${sm_dr[*]}); module/durable sink median $(echo "${sm_md[*]}" | median) (rounds: ${sm_md[*]})"
	if [[ -n $CADDY_B ]]; then
		say "   B ($CADDY_B): $(echo "${sm_b[*]}" | median)/s, p50 $(echo "${p50_b[*]}" | median) ms, CPU $(echo "${cpu_b[*]}" | median) ms/upload, B/sink median $(echo "${sm_br[*]}" | median) (rounds: ${sm_br[*]}); module/B median $(echo "${sm_ab[*]}" | median) (rounds: ${sm_ab[*]})"
	fi
fi
if [[ -z $ONLY || $ONLY == large ]]; then
	say "64 MiB uploads, sequential: module $(echo "${lg_mm[*]}" | median) MB/s, sink $(echo "${lg_sk[*]}" | median) MB/s, ratio median $(echo "${lg_r[*]}" | median) (rounds: ${lg_r[*]})"
	say "64 MiB uploads, sequential, durable sink: $(echo "${lg_d[*]}" | median) MB/s; durable sink/sink median $(echo "${lg_dr[*]}" | median) (rounds: ${lg_dr[*]}); module/durable sink median $(echo "${lg_md[*]}" | median) (rounds: ${lg_md[*]})"
	if [[ -n $CADDY_B ]]; then
		say "   B: $(echo "${lg_b[*]}" | median) MB/s, B/sink median $(echo "${lg_br[*]}" | median) (rounds: ${lg_br[*]}); module/B median $(echo "${lg_ab[*]}" | median) (rounds: ${lg_ab[*]})"
	fi
fi

[[ -z ${RSS_LINE:-} ]] || say "$RSS_LINE"

mkdir -p "$ROOT/bench/results"
cp "$REPORT" "$ROOT/bench/results/uploads-$(date -u +%Y%m%dT%H%M%SZ).txt"
echo "report saved under bench/results/"
