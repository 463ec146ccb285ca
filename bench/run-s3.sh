#!/usr/bin/env bash
# S3 load benchmark: caddy-matrix-media with one S3 datastore, served by a
# local fake S3 (bench/s3/s3server: gofakes3, in memory), measured in ONE run,
# interleaved round by round and reported as ratios (absolute numbers move
# with the machine's load). Everything binds to 127.0.0.1.
#
# Usage: bench/run-s3.sh [--quick]
#   --quick   one short round (for a smoke run)
# Env: CADDY (path to a caddy built with ./xcaddy.sh build; default ./caddy),
#      CADDY_B (a second build, e.g. of another branch: run next to CADDY
#      with its own database and ports on the same S3 server, measured in
#      the same rounds; default none),
#      ROUNDS (default 3), FETCHES (timed 256 MiB fetches per side and round,
#      default 5), PART_SIZE (part_size of the datastore, e.g. 5MiB; default
#      unset: the module's default), PPROF=1 (save a heap profile of Caddy,
#      snapshots of Caddy, taken from the admin endpoint's /debug/pprof every
#      0.5 s during the uploads, and a CPU profile over extra module
#      downloads, next to the report), SERVER_OPTS (lines for Caddy's global servers block,
#      one directive a line, e.g. $'timeouts {\n write_idle -1s\n}' (a
#      block on one line is a Caddyfile error); default none: Caddy's
#      defaults),
#      SERVER_OPTS_B (the same for CADDY_B; default SERVER_OPTS),
#      SITE_OPTS (lines for the module's site block, written the same way,
#      e.g. $'timeouts {\n write_timeout 1m\n max_write_chunk 256KiB\n}';
#      default none), SITE_OPTS_B (the same for CADDY_B; default SITE_OPTS),
#      DS_OPTS (lines for the S3 datastore block, e.g. 'parallel_parts 8';
#      default none), DS_OPTS_B (the same for CADDY_B; default DS_OPTS),
#      CONN_RATE (cap on each S3 connection's sent bytes per second, e.g.
#      100MB: s3server -conn-rate, a model of real S3's per-connection
#      throughput; default none: loopback, where CPU is the limit),
#      PARALLEL_B=off (shorthand: CADDY_B=$CADDY with DS_OPTS_B
#      'parallel_parts off', so the same build with parallel ranged GETs on
#      (A) and off (B) is measured in the same rounds as the SDK's single
#      GetObject).
#
# Scenarios (S3 issue targets):
#   1. 256 MiB download of a media stored on S3, one connection, through the
#      module (legacy endpoint, curl to /dev/null) vs bench/s3/s3get fetching
#      the same object (blobs/<aa>/<bb>/<sha256>) directly from the same S3
#      server with the AWS SDK: MB/s ratio (>= 0.8x).
#      The same download redirected (the datastore has "redirect"; the
#      legacy endpoint with allow_redirect=true answers 307 to a presigned
#      URL, which curl follows): MB/s ratio to the SDK, the measurement that
#      decides between streaming and redirecting.
#      The same download fetched by s3get -url (the same Go HTTP client and
#      copy loop as the SDK side, without the SDK): module / SDK with equal
#      clients. curl costs about three times the CPU per byte of that client
#      here, and on two shared cores the client's CPU counts.
#      Caddy's CPU time per 256 MiB download (utime+stime from /proc, over
#      the module downloads of each round).
#      For reference, curl fetching the object straight from the S3 server
#      (unsigned; the fake S3 does not check signatures) and through Caddy's
#      plain reverse_proxy (the same extra hop without the module) are
#      reported too.
#   2. 8 concurrent 256 MiB downloads of that media (curl): peak RSS growth
#      of Caddy.
#   3. 8 concurrent 64 MiB uploads to the S3 datastore: peak RSS growth of
#      Caddy (< 64 MiB in total). The S3 server's own RSS is reported apart
#      (it keeps every object in memory; it is not part of the target).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
source bench/lib.sh
CADDY=${CADDY:-$ROOT/caddy}
CADDY_B=${CADDY_B:-}
ROUNDS=${ROUNDS:-3}
FETCHES=${FETCHES:-5}
PART_SIZE=${PART_SIZE:-}
PPROF=${PPROF:-}
SERVER_OPTS=${SERVER_OPTS:-}
SERVER_OPTS_B=${SERVER_OPTS_B-$SERVER_OPTS}
SITE_OPTS=${SITE_OPTS:-}
SITE_OPTS_B=${SITE_OPTS_B-$SITE_OPTS}
DS_OPTS=${DS_OPTS:-}
CONN_RATE=${CONN_RATE:-}
if [[ ${PARALLEL_B:-} == off ]]; then
	CADDY_B=${CADDY_B:-$CADDY}
	DS_OPTS_B=${DS_OPTS_B-parallel_parts off}
fi
DS_OPTS_B=${DS_OPTS_B-$DS_OPTS}
if [[ ${1:-} == --quick ]]; then ROUNDS=1; FETCHES=2; fi

need go; need curl; need sha256sum
need_caddy
[[ -z $CADDY_B || -x $CADDY_B ]] || { echo "bench: no caddy at CADDY_B=$CADDY_B" >&2; exit 1; }

WORK=$(mktemp -d /tmp/mm-bench-s3.XXXXXX)

ADMIN=$(free_port); HS=$(free_port); MM=$(free_port); S3=$(free_port); RP=$(free_port)
ADMIN_B=$(free_port); MM_B=$(free_port); HS_B=$(free_port)
export XDG_DATA_HOME=$WORK/xdg/data XDG_CONFIG_HOME=$WORK/xdg/config
mkdir -p "$WORK/bin" "$WORK/xdg/data" "$WORK/xdg/config"

echo "bench: building bench/s3 programs" >&2
go build -o "$WORK/bin/" ./bench/s3/s3server ./bench/s3/s3get

BUCKET=media
S3_KEY_ID=bench
S3_SECRET=bench-secret

# Fake S3: wait for its "ready" line.
"$WORK/bin/s3server" -port "$S3" -bucket "$BUCKET" ${CONN_RATE:+-conn-rate "$CONN_RATE"} >"$WORK/s3.log" 2>&1 &
S3_PID=$!; PIDS+=("$S3_PID")
wait_ready "$WORK/s3.log" "$S3_PID" s3server

# Test data.
head -c $((256 * 1024 * 1024)) /dev/urandom >"$WORK/large.bin"
head -c $((64 * 1024 * 1024)) /dev/urandom >"$WORK/up64.bin"
for i in $(seq 1 8); do
	# distinct bodies: a few changed bytes each, so no dedup shortcut
	cp "$WORK/up64.bin" "$WORK/up64.$i.bin"
	printf '%08d' "$i" | dd of="$WORK/up64.$i.bin" bs=1 seek=0 conv=notrunc status=none
done

part_size_line=
[[ -n $PART_SIZE ]] && part_size_line="part_size $PART_SIZE"
# caddyfile ADMIN HS MM DB [RP]: the Caddyfile of one Caddy (RP: the port of
# the reverse_proxy reference site, only in the first).
caddyfile() {
	local admin=$1 hs=$2 mm=$3 db=$4 rp=${5:-}
	cat <<EOF
{
$(caddy_globals "$admin")
	servers {
		$SERVER_OPTS
	}
	matrix_media {
		database sqlite $db
		datastore s3bench s3 {
			kinds local
			endpoint http://127.0.0.1:$S3
			region us-east-1
			bucket $BUCKET
			path_style
			access_key_id $S3_KEY_ID
			secret_access_key $S3_SECRET
			redirect
			$part_size_line
			$DS_OPTS
		}
	}
}
# Stand-in homeserver: only whoami is needed (uploads are authenticated).
$(homeserver_site "$hs")
$(media_site "$mm" "$hs" "	$SITE_OPTS")
EOF
	[[ -n $rp ]] || return 0
	cat <<EOF
# Reference: Caddy's own reverse_proxy in front of the S3 server (one hop, no
# module), for the cost of the extra hop on this machine.
http://127.0.0.1:$rp {
	reverse_proxy 127.0.0.1:$S3
}
EOF
}
caddyfile "$ADMIN" "$HS" "$MM" "$WORK/media.db" "$RP" >"$WORK/Caddyfile"

run_caddy "$WORK/Caddyfile" "$WORK/caddy.log" "$ADMIN"
CADDY_B_PID=
if [[ -n $CADDY_B ]]; then
	SERVER_OPTS=$SERVER_OPTS_B SITE_OPTS=$SITE_OPTS_B DS_OPTS=$DS_OPTS_B caddyfile "$ADMIN_B" "$HS_B" "$MM_B" "$WORK/media-b.db" >"$WORK/Caddyfile.b"
	"$CADDY_B" run --config "$WORK/Caddyfile.b" >"$WORK/caddy-b.log" 2>&1 &
	CADDY_B_PID=$!; PIDS+=("$CADDY_B_PID")
	wait_http "http://127.0.0.1:$ADMIN_B/config/" "$WORK/caddy-b.log" "caddy B" "$CADDY_B_PID"
fi

upload() { # $1 file [$2 port] -> prints media id
	curl -fsS -X POST -H 'Authorization: Bearer bench' -H 'Content-Type: application/octet-stream' \
		--data-binary "@$1" "http://127.0.0.1:${2:-$MM}/_matrix/media/v3/upload?filename=$(basename "$1")" |
		sed -E 's#.*mxc://[^/]+/([A-Za-z0-9_-]+).*#\1#'
}

mb() { awk -v b="$1" 'BEGIN { printf "%.0f", b }'; }

REPORT=$WORK/report.txt

say "caddy-matrix-media S3 load benchmark $(date -u +%FT%TZ) on $(nproc) cores; rounds=$ROUNDS fetches=$FETCHES part_size=${PART_SIZE:-default} conn_rate=${CONN_RATE:-none}${DS_OPTS:+; datastore: $DS_OPTS}${SERVER_OPTS:+; servers: $SERVER_OPTS}${SITE_OPTS:+; site: $SITE_OPTS}${CADDY_B:+; B: $CADDY_B${SERVER_OPTS_B:+ with servers: $SERVER_OPTS_B}${SITE_OPTS_B:+ with site: $SITE_OPTS_B}${DS_OPTS_B:+ with datastore: $DS_OPTS_B}}"

# 1. Large download: module vs direct SDK fetch of the same object.
LARGE_ID=$(upload "$WORK/large.bin")
[[ $LARGE_ID =~ ^[A-Za-z0-9_-]+$ ]] || { echo "bench: upload failed: $LARGE_ID" >&2; cat "$WORK/caddy.log" >&2; exit 1; }
SHA=$(sha256sum "$WORK/large.bin" | cut -d' ' -f1)
KEY=blobs/${SHA:0:2}/${SHA:2:2}/$SHA
MM_LARGE="http://127.0.0.1:$MM/_matrix/media/v3/download/localhost/$LARGE_ID"
S3GET=("$WORK/bin/s3get" -endpoint "http://127.0.0.1:$S3" -bucket "$BUCKET" -key "$KEY"
	-access-key-id "$S3_KEY_ID" -secret-access-key "$S3_SECRET")
# sanity: the module serves the bytes, and the object is where s3store puts it
cmp <(curl -fsS "$MM_LARGE") "$WORK/large.bin"
"${S3GET[@]}" -verify -n 1 >/dev/null
if [[ -n $CADDY_B ]]; then
	LARGE_ID_B=$(upload "$WORK/large.bin" "$MM_B")
	[[ $LARGE_ID_B =~ ^[A-Za-z0-9_-]+$ ]] || { echo "bench: upload to B failed: $LARGE_ID_B" >&2; cat "$WORK/caddy-b.log" >&2; exit 1; }
	MM_B_LARGE="http://127.0.0.1:$MM_B/_matrix/media/v3/download/localhost/$LARGE_ID_B"
	cmp <(curl -fsS "$MM_B_LARGE") "$WORK/large.bin"
fi

# curl_rate URL: median MB/s of FETCHES sequential downloads with curl
curl_rate() {
	local rates=() bps
	for _ in $(seq 1 "$FETCHES"); do
		# shellcheck disable=SC2086 # $1 may carry curl options
		bps=$(curl -fsS -o /dev/null -w '%{speed_download}' $1)
		rates+=("$(awk -v b="$bps" 'BEGIN { printf "%.1f", b / 1e6 }')")
	done
	echo "${rates[*]}" | median
}
# go_rate URL: median MB/s of FETCHES downloads with s3get -url (the SDK
# side's Go HTTP client and copy loop, without the SDK)
go_rate() { "$WORK/bin/s3get" -url "$1" -n "$FETCHES" | cut -d' ' -f1; }
# cpu_ticks PID: the process's user+system CPU time in clock ticks
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
CLK_TCK=$(getconf CLK_TCK)
# module_side URL PID: curl and Go-client rates of URL, then the CPU
# milliseconds PID spent per download; sets MOD_CURL, MOD_GO, MOD_CPU
module_side() {
	local t0 t1
	t0=$(cpu_ticks "$2")
	MOD_CURL=$(curl_rate "$1"); MOD_GO=$(go_rate "$1")
	t1=$(cpu_ticks "$2")
	MOD_CPU=$(awk -v t=$((t1 - t0)) -v hz="$CLK_TCK" -v n=$((2 * FETCHES)) 'BEGIN { printf "%.0f", t * 1000 / hz / n }')
}
# The same download redirected (allow_redirect=true on the legacy endpoint:
# 307 to a presigned URL, which curl follows to the S3 server).
MM_REDIRECT="$MM_LARGE?allow_redirect=true"
redirect_rate() { curl_rate "-L $MM_REDIRECT"; }
s3_rate() { "${S3GET[@]}" -n "$FETCHES" | cut -d' ' -f1; }

S3_URL="http://127.0.0.1:$S3/$BUCKET/$KEY"
RP_URL="http://127.0.0.1:$RP/$BUCKET/$KEY"
cmp <(curl -fsS "$RP_URL") "$WORK/large.bin"
[[ $(curl -sS -o /dev/null -w '%{http_code}' "$MM_REDIRECT") == 307 ]] || { echo "bench: no redirect from $MM_REDIRECT" >&2; exit 1; }
cmp <(curl -fsSL "$MM_REDIRECT") "$WORK/large.bin"
dl_ratios=(); dl_mm=(); dl_s3=(); dl_curl=(); curl_ratios=(); dl_rp=(); rp_ratios=(); dl_redir=(); redir_ratios=()
dl_go=(); go_ratios=(); cpu_a=()
dl_b=(); b_ratios=(); dl_bgo=(); bgo_ratios=(); cpu_b=(); ab_ratios=()
# step NAME: one measurement of a round, into the variables named after it
step() {
	case $1 in
	mm) module_side "$MM_LARGE" "$CADDY_PID"; m=$MOD_CURL; g=$MOD_GO; ca=$MOD_CPU ;;
	mmb) [[ -z $CADDY_B ]] || { module_side "$MM_B_LARGE" "$CADDY_B_PID"; mb_=$MOD_CURL; gb=$MOD_GO; cb=$MOD_CPU; } ;;
	s3) s=$(s3_rate) ;;
	curl) c=$(curl_rate "$S3_URL") ;;
	rp) r=$(curl_rate "$RP_URL") ;;
	redir) d=$(redirect_rate) ;;
	esac
}
for round in $(seq 1 "$ROUNDS"); do
	# alternate the order, so drift of the machine's load does not favour
	# one side
	order=(mm s3 mmb curl rp redir)
	if ! ((round % 2)); then order=(redir rp curl mmb s3 mm); fi
	for st in "${order[@]}"; do step "$st"; done
	dl_redir+=("$d"); redir_ratios+=("$(ratio "$d" "$s")")
	dl_mm+=("$m"); dl_s3+=("$s"); dl_curl+=("$c"); dl_rp+=("$r"); rp_ratios+=("$(ratio "$r" "$s")")
	dl_ratios+=("$(ratio "$m" "$s")"); curl_ratios+=("$(ratio "$m" "$c")")
	dl_go+=("$g"); go_ratios+=("$(ratio "$g" "$s")"); cpu_a+=("$ca")
	if [[ -n $CADDY_B ]]; then
		dl_b+=("$mb_"); b_ratios+=("$(ratio "$mb_" "$s")"); dl_bgo+=("$gb"); bgo_ratios+=("$(ratio "$gb" "$s")")
		cpu_b+=("$cb"); ab_ratios+=("$(ratio "$gb" "$g")")
	fi
done
say ""
say "256 MiB download from S3, c=1: module $(mb "$(echo "${dl_mm[*]}" | median)") MB/s, direct SDK GetObject $(mb "$(echo "${dl_s3[*]}" | median)") MB/s, ratio median $(echo "${dl_ratios[*]}" | median) (rounds: ${dl_ratios[*]}) target >= 0.80"
say "   same Go client as the SDK side (s3get -url): module $(mb "$(echo "${dl_go[*]}" | median)") MB/s, / direct SDK ratio median $(echo "${go_ratios[*]}" | median) (rounds: ${go_ratios[*]}); Caddy CPU per download $(echo "${cpu_a[*]}" | median) ms (rounds: ${cpu_a[*]})"
if [[ -n $CADDY_B ]]; then
	say "   B ($CADDY_B): curl $(mb "$(echo "${dl_b[*]}" | median)") MB/s, / SDK median $(echo "${b_ratios[*]}" | median) (rounds: ${b_ratios[*]}); Go client $(mb "$(echo "${dl_bgo[*]}" | median)") MB/s, / SDK median $(echo "${bgo_ratios[*]}" | median) (rounds: ${bgo_ratios[*]}), B/A median $(echo "${ab_ratios[*]}" | median) (rounds: ${ab_ratios[*]}); Caddy B CPU per download $(echo "${cpu_b[*]}" | median) ms (rounds: ${cpu_b[*]})"
fi
say "   reference: curl straight from the S3 server $(mb "$(echo "${dl_curl[*]}" | median)") MB/s; module / that ratio median $(echo "${curl_ratios[*]}" | median) (rounds: ${curl_ratios[*]})"
say "   redirected (allow_redirect=true: 307 to a presigned URL, followed by curl) $(mb "$(echo "${dl_redir[*]}" | median)") MB/s; / direct SDK ratio median $(echo "${redir_ratios[*]}" | median) (rounds: ${redir_ratios[*]})"
say "   reference: Caddy reverse_proxy (no module) in front of the S3 server $(mb "$(echo "${dl_rp[*]}" | median)") MB/s; that / direct SDK ratio median $(echo "${rp_ratios[*]}" | median) (rounds: ${rp_ratios[*]})"

if [[ -n $PPROF ]]; then
	# CPU profile of Caddy over module downloads (untimed, after the rounds)
	curl -fsS -o "$WORK/cpu.1.pprof" "http://127.0.0.1:$ADMIN/debug/pprof/profile?seconds=4" &
	prof=$!
	while kill -0 "$prof" 2>/dev/null; do curl -fsS -o /dev/null "$MM_LARGE"; done
	wait "$prof" || true
fi

# 3. Uploads: peak RSS of 8 concurrent 64 MiB uploads. VmHWM is reset through
# /proc/PID/clear_refs (5) after an idle baseline.
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }
reset_hwm() { echo 5 2>/dev/null >"/proc/$1/clear_refs" || { echo "bench: cannot reset VmHWM of $1; the peak includes earlier work" >&2; return 0; }; }
# concurrent_downloads PID URL: peak RSS growth of PID during 8 concurrent
# downloads of URL
concurrent_downloads() {
	local idle peak p pids=()
	sleep 1
	idle=$(rss_kib "$1"); reset_hwm "$1"
	for _ in $(seq 1 8); do curl -fsS -o /dev/null "$2" & pids+=($!); done
	for p in "${pids[@]}"; do wait "$p"; done
	peak=$(hwm_kib "$1")
	echo "idle RSS $((idle / 1024)) MiB, peak $((peak / 1024)) MiB, growth $(((peak - idle) / 1024)) MiB"
}
say ""
say "8 concurrent 256 MiB downloads from S3: caddy $(concurrent_downloads "$CADDY_PID" "$MM_LARGE")"
[[ -z $CADDY_B ]] || say "   B: $(concurrent_downloads "$CADDY_B_PID" "$MM_B_LARGE")"

sleep 1
IDLE=$(rss_kib "$CADDY_PID"); S3_IDLE=$(rss_kib "$S3_PID")
reset_hwm "$CADDY_PID"; reset_hwm "$S3_PID"
pids=()
for i in $(seq 1 8); do
	curl -fsS -o "$WORK/up64.$i.out" -X POST -H 'Authorization: Bearer bench' --data-binary "@$WORK/up64.$i.bin" \
		"http://127.0.0.1:$MM/_matrix/media/v3/upload" &
	pids+=($!)
done
if [[ -n $PPROF ]]; then
	# heap snapshots every 0.5 s while the uploads run (each forces a GC, so
	# the peak measured with PPROF=1 is not comparable with one without)
	n=0
	while ((n < 40)) && kill -0 "${pids[0]}" 2>/dev/null; do
		sleep 0.5; n=$((n + 1))
		curl -fsS -o "$WORK/heap.$n.pprof" "http://127.0.0.1:$ADMIN/debug/pprof/heap?gc=1" || true
	done
fi
for p in "${pids[@]}"; do wait "$p"; done
PEAK=$(hwm_kib "$CADDY_PID"); S3_PEAK=$(hwm_kib "$S3_PID")
for i in $(seq 1 8); do grep -q 'mxc://' "$WORK/up64.$i.out" || { echo "bench: upload $i failed" >&2; cat "$WORK/up64.$i.out" >&2; exit 1; }; done
say ""
say "8 concurrent 64 MiB uploads to S3: caddy idle RSS $((IDLE / 1024)) MiB, peak RSS $((PEAK / 1024)) MiB, growth $(((PEAK - IDLE) / 1024)) MiB (target < 64 MiB)"
say "   s3server (not part of the target; keeps all objects in memory): RSS before $((S3_IDLE / 1024)) MiB, peak $((S3_PEAK / 1024)) MiB"

mkdir -p "$ROOT/bench/results"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
cp "$REPORT" "$ROOT/bench/results/s3-$STAMP.txt"
for f in "$WORK"/heap.*.pprof "$WORK"/cpu.*.pprof; do
	[[ -s $f ]] && cp "$f" "$ROOT/bench/results/s3-$STAMP.${f##*/}"
done
echo "report saved under bench/results/"
