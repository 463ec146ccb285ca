#!/usr/bin/env bash
# Federation benchmark: two federating Caddy processes, A and B, over TLS on
# loopback, measured in ONE run, interleaved round by round and reported as
# ratios (absolute numbers move with the machine's load; ratios are what
# count). Everything binds to 127.0.0.1.
#
# Usage: bench/run-federation.sh [--quick]
#   --quick   two rounds (for a smoke run)
# Env: CADDY (path to a caddy built with ./xcaddy.sh build; default ./caddy;
#      when it lacks the module or "caddy matrix-media generate-key", the
#      script builds one with xcaddy into its temporary directory),
#      ROUNDS (default 5), SIZE_MIB (media size, default 64),
#      PPROF=1 (after the rounds, CPU profiles of A and B from their admin
#      endpoints' /debug/pprof over extra remote downloads, saved next to the
#      report), PREWARM_MIB (default 0: off; before the rounds, write and
#      delete a file of that many MiB, so the page cache pages the run
#      allocates were touched before: on a VM whose memory was never used, the
#      first write into fresh guest pages is several times slower, a cost that
#      falls on the remote side only, as B writes its copy, while A serves
#      pages it already holds), SERVER_OPTS (lines for Caddy's global servers block of both
#      nodes, e.g. "timeouts { write_idle -1s }"; default none).
#
# Each node is one site https://127.0.0.1:PORT (Matrix server name
# "127.0.0.1:PORT") with a certificate for 127.0.0.1 from a throwaway CA
# (bench/fed/pki), a signing key from "caddy matrix-media generate-key", and
# a stand-in homeserver (bench/fed/hs: whoami, and the site's server keys
# signed with its key, reached through the site's reverse_proxy).
#
# Scenario (federation issue target): every round uploads a NEW random
# SIZE_MIB body on A, then, in alternating order,
#   - local:  curl downloads it from A (authenticated client v1 endpoint,
#             HTTPS, -o /dev/null): MB/s;
#   - remote: curl downloads it from B, B's first download, so B fetches it
#             from A over federation; timed end to end: MB/s;
# then B's second download (served from B's cache): MB/s.
# Ratio remote/local per round and its median; target >= 0.70.
# MB/s is 10^6 bytes per second (curl's speed_download). CPU seconds used by
# A and B (utime+stime from /proc) and their read+write system calls (syscr +
# syscw from /proc/PID/io) during each timed download are reported, and B's
# CPU and system calls per remote first download as medians: on a shared
# machine they move far less than the ratios.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
source bench/lib.sh
CADDY=${CADDY:-$ROOT/caddy}
ROUNDS=${ROUNDS:-5}
SIZE_MIB=${SIZE_MIB:-64}
PPROF=${PPROF:-}
PREWARM_MIB=${PREWARM_MIB:-0}
SERVER_OPTS=${SERVER_OPTS:-}
if [[ ${1:-} == --quick ]]; then ROUNDS=2; fi

need go; need curl; need sha256sum

WORK=$(mktemp -d /tmp/mm-bench-fed.XXXXXX)

export XDG_DATA_HOME=$WORK/xdg/data XDG_CONFIG_HOME=$WORK/xdg/config
mkdir -p "$WORK/bin" "$WORK/xdg/data" "$WORK/xdg/config" "$WORK/a" "$WORK/b"

caddy_ok() {
	# Outputs are captured first: with pipefail, grep -q closing the pipe
	# early would fail the check through SIGPIPE.
	local mods help
	[[ -x $1 ]] || return 1
	mods=$("$1" list-modules 2>/dev/null) || return 1
	help=$("$1" matrix-media generate-key --help 2>&1) || return 1
	grep -qx 'matrix_media' <<<"$mods" && grep -q -- '--out' <<<"$help"
}
if ! caddy_ok "$CADDY"; then
	echo "bench: $CADDY is missing or lacks matrix_media / generate-key; building one into $WORK/bin" >&2
	XC=$(go env GOPATH)/bin/xcaddy
	[[ -x $XC ]] || XC=$(command -v xcaddy) || { echo "bench: no xcaddy (./xcaddy.sh deps installs it)" >&2; exit 1; }
	CGO_ENABLED=1 "$XC" build v2.11.9 --with "github.com/caddy-matrix-media/caddy-matrix-media@v0.0.0=$ROOT" \
		--output "$WORK/bin/caddy" >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log" >&2; exit 1; }
	CADDY=$WORK/bin/caddy
	caddy_ok "$CADDY" || { echo "bench: the built caddy lacks generate-key" >&2; exit 1; }
fi

echo "bench: building bench/fed programs" >&2
go build -o "$WORK/bin/" ./bench/fed/hs ./bench/fed/pki
"$WORK/bin/pki" -dir "$WORK/pki"
CA=$WORK/pki/ca.pem

# start_node N: a key, a homeserver and a Caddy for node N (a or b); sets
# PORT_N, ADMIN_N, CADDY_PID_N.
start_node() {
	local n=$1 dir=$WORK/$1 port admin hs pid
	port=$(free_port); admin=$(free_port); hs=$(free_port)
	"$CADDY" matrix-media generate-key --out "$dir/signing.key" >"$dir/generate-key.log" 2>&1 ||
		{ echo "bench: generate-key failed" >&2; cat "$dir/generate-key.log" >&2; exit 1; }
	"$WORK/bin/hs" -port "$hs" -server-name "127.0.0.1:$port" -key "$dir/signing.key" -user "@bench:$n" >"$dir/hs.log" 2>&1 &
	pid=$!; PIDS+=("$pid")
	wait_ready "$dir/hs.log" "$pid" "homeserver $n"
	cat >"$dir/Caddyfile" <<EOF
{
	admin 127.0.0.1:$admin
	default_bind 127.0.0.1
	auto_https disable_redirects
	persist_config off
	skip_install_trust
	http_port $(free_port)
	https_port $port
	servers {
		$SERVER_OPTS
	}
	matrix_media {
		database sqlite $dir/media.db
		storage_path $dir/media
		max_upload_size 1GiB
		federation {
			trusted_ca_file $CA
			allowed_networks 127.0.0.0/8 ::1/128
		}
	}
}
https://127.0.0.1:$port {
	tls $WORK/pki/cert.pem $WORK/pki/key.pem
	matrix_media {
		server_name 127.0.0.1:$port
		homeserver http://127.0.0.1:$hs
		signing_key $dir/signing.key
	}
	reverse_proxy 127.0.0.1:$hs
}
EOF
	"$CADDY" run --config "$dir/Caddyfile" >"$dir/caddy.log" 2>&1 &
	pid=$!; PIDS+=("$pid")
	wait_http "http://127.0.0.1:$admin/config/" "$dir/caddy.log" "caddy $n" "$pid"
	printf -v "PORT_$n" %s "$port"; printf -v "ADMIN_$n" %s "$admin"; printf -v "CADDY_PID_$n" %s "$pid"
}
start_node a
start_node b
A=127.0.0.1:$PORT_a
B=127.0.0.1:$PORT_b

upload_a() { # $1 file -> prints media id
	curl -fsS --cacert "$CA" -X POST -H 'Authorization: Bearer bench' -H 'Content-Type: application/octet-stream' \
		--data-binary "@$1" "https://$A/_matrix/media/v3/upload?filename=$(basename "$1")" |
		sed -nE "s#.*\"mxc://$A/([A-Za-z0-9_-]+)\".*#\\1#p"
}

# fetch HOST ID -> prints "MB/s bytes http_code" of one download of
# mxc://A/ID from HOST.
fetch() {
	curl -sS --cacert "$CA" -o /dev/null -H 'Authorization: Bearer bench' \
		-w '%{speed_download} %{size_download} %{http_code}\n' \
		"https://$1/_matrix/client/v1/media/download/$A/$2" |
		awk '{ printf "%.1f %d %s\n", $1 / 1e6, $2, $3 }'
}

CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
cpu_s() { awk -v t="$1" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", t / hz }'; }
# sys_rw PID: the read and write system calls of process PID so far (syscr
# + syscw of /proc/PID/io, all its threads; read(2), write(2), recvmsg,
# sendmsg, pread, pwrite and their vector forms, not futex or epoll).
sys_rw() { awk '/^sysc[rw]:/ { s += $2 } END { print s + 0 }' "/proc/$1/io"; }

# timed NAME HOST ID: one download, checked, with the CPU and the read/write
# system calls of A and B; sets RATE_<NAME>, CPUA_<NAME>, CPUB_<NAME>,
# SYSA_<NAME>, SYSB_<NAME>.
timed() {
	local a0 b0 a1 b1 sa0 sb0 sa1 sb1 rate bytes code
	a0=$(cpu_ticks "$CADDY_PID_a"); b0=$(cpu_ticks "$CADDY_PID_b")
	sa0=$(sys_rw "$CADDY_PID_a"); sb0=$(sys_rw "$CADDY_PID_b")
	read -r rate bytes code < <(fetch "$2" "$3")
	a1=$(cpu_ticks "$CADDY_PID_a"); b1=$(cpu_ticks "$CADDY_PID_b")
	sa1=$(sys_rw "$CADDY_PID_a"); sb1=$(sys_rw "$CADDY_PID_b")
	if [[ $code != 200 || $bytes != "$SIZE" ]]; then
		echo "bench: $1 download of $3 from $2: HTTP $code, $bytes bytes (want 200, $SIZE)" >&2
		tail -20 "$WORK/b/caddy.log" >&2; exit 1
	fi
	printf -v "RATE_$1" %s "$rate"
	printf -v "CPUA_$1" %s "$(cpu_s $((a1 - a0)))"
	printf -v "CPUB_$1" %s "$(cpu_s $((b1 - b0)))"
	printf -v "SYSA_$1" %s $((sa1 - sa0))
	printf -v "SYSB_$1" %s $((sb1 - sb0))
}

# fed_served: federation downloads A has answered with 200 (admin /metrics).
fed_served() {
	curl -fsS "http://127.0.0.1:$ADMIN_a/metrics" |
		awk '/^caddy_matrix_media_requests_total\{/ && /endpoint="federation_download"/ && /code="200"/ { s += $2 } END { print s + 0 }'
}

# fetch_s ID: seconds B took to fetch mxc://A/ID and store it (its "remote
# media cached" log line), before serving the first client.
fetch_s() {
	grep '"remote media cached"' "$WORK/b/caddy.log" | grep -F "\"media_id\":\"$1\"" |
		sed -nE 's/.*"duration":([0-9.e+-]+).*/\1/p' | tail -1 | awk '{ printf "%.3f", $1 }'
}
secs() { awk -v r="$1" -v s="$SIZE" 'BEGIN { printf "%.3f", s / (r * 1e6) }'; }


REPORT=$WORK/report.txt

SIZE=$((SIZE_MIB * 1024 * 1024))
if ((PREWARM_MIB > 0)); then
	echo "bench: touching ${PREWARM_MIB} MiB of page cache" >&2
	head -c $((PREWARM_MIB * 1024 * 1024)) /dev/zero >"$WORK/prewarm.bin"
	rm -f "$WORK/prewarm.bin"
fi
say "caddy-matrix-media federation benchmark $(date -u +%FT%TZ) on $(nproc) cores; rounds=$ROUNDS size=${SIZE_MIB} MiB prewarm=${PREWARM_MIB} MiB; load at start:$(uptime | sed 's/.*load average://')"
say "   A = https://$A, B = https://$B (two Caddy processes, TLS on loopback)"

# Warm-up, untimed: B fetches A's keys, both open their connections.
head -c 4096 /dev/urandom >"$WORK/warm.bin"
WARM=$(upload_a "$WORK/warm.bin")
[[ -n $WARM ]] || { echo "bench: upload on A failed" >&2; cat "$WORK/a/caddy.log" >&2; exit 1; }
cmp <(curl -fsS --cacert "$CA" -H 'Authorization: Bearer bench' "https://$B/_matrix/client/v1/media/download/$A/$WARM") "$WORK/warm.bin" ||
	{ echo "bench: warm-up remote download on B failed" >&2; tail -20 "$WORK/b/caddy.log" >&2; exit 1; }

local_r=(); remote_r=(); cached_r=(); ratios=(); cached_ratios=()
cpu_lines=(); fetch_mbs=(); cpub_remote=(); sysb_remote=()
for round in $(seq 1 "$ROUNDS"); do
	head -c "$SIZE" /dev/urandom >"$WORK/body.bin"
	ID=$(upload_a "$WORK/body.bin")
	[[ -n $ID ]] || { echo "bench: upload on A failed (round $round)" >&2; tail -20 "$WORK/a/caddy.log" >&2; exit 1; }
	served0=$(fed_served)
	# alternate which runs first, so drift of the machine's load does not
	# favour one side
	if ((round % 2)); then
		timed local "$A" "$ID"; timed remote "$B" "$ID"
	else
		timed remote "$B" "$ID"; timed local "$A" "$ID"
	fi
	timed cached "$B" "$ID"
	served=$(($(fed_served) - served0))
	((served == 1)) || { echo "bench: round $round: A answered $served federation downloads, want 1" >&2; exit 1; }
	# untimed: B's copy holds the uploaded bytes
	cmp <(curl -fsS --cacert "$CA" -H 'Authorization: Bearer bench' "https://$B/_matrix/client/v1/media/download/$A/$ID") "$WORK/body.bin" ||
		{ echo "bench: round $round: B's copy differs from the upload" >&2; exit 1; }
	fs=$(fetch_s "$ID"); rs=$(secs "$RATE_remote")
	fetch_mbs+=("$(awk -v s="$SIZE" -v t="$fs" 'BEGIN { if (t > 0) printf "%.1f", s / t / 1e6; else print 0 }')")
	local_r+=("$RATE_local"); remote_r+=("$RATE_remote"); cached_r+=("$RATE_cached")
	ratios+=("$(ratio "$RATE_remote" "$RATE_local")"); cached_ratios+=("$(ratio "$RATE_cached" "$RATE_local")")
	cpub_remote+=("$CPUB_remote"); sysb_remote+=("$SYSB_remote")
	cpu_lines+=("round $round: local ${RATE_local} MB/s (CPU A ${CPUA_local}s B ${CPUB_local}s; read+write syscalls A ${SYSA_local}), remote ${RATE_remote} MB/s = ${rs}s of which B's fetch+store ${fs}s (CPU A ${CPUA_remote}s B ${CPUB_remote}s; syscalls A ${SYSA_remote} B ${SYSB_remote}), cached ${RATE_cached} MB/s (CPU A ${CPUA_cached}s B ${CPUB_cached}s; syscalls B ${SYSB_cached})")
	rm -f "$WORK/body.bin"
done
say ""
say "${SIZE_MIB} MiB download, c=1, HTTPS: local on A $(echo "${local_r[*]}" | median) MB/s, remote on B (first download, fetched over federation) $(echo "${remote_r[*]}" | median) MB/s, ratio median $(echo "${ratios[*]}" | median) (rounds: ${ratios[*]}) target >= 0.70"
say "   B's second download (cached copy) $(echo "${cached_r[*]}" | median) MB/s; cached/local ratio median $(echo "${cached_ratios[*]}" | median) (rounds: ${cached_ratios[*]})"
say "   B's fetch from A + store (its \"remote media cached\" log duration, which ends after the flush to disk and the row): $(echo "${fetch_mbs[*]}" | median) MB/s; the first client is streamed the bytes while they are stored"
say "   B's CPU per remote first download: median $(echo "${cpub_remote[*]}" | median) s; B's read+write syscalls per remote first download: median $(echo "${sysb_remote[*]}" | median)"
for l in "${cpu_lines[@]}"; do say "   $l"; done
say "   load at end:$(uptime | sed 's/.*load average://')"

if [[ -n $PPROF ]]; then
	# CPU profiles of A and B over extra remote first downloads (untimed):
	# enough fresh media for 5 s at the median remote rate are uploaded on A
	# first, so the uploads stay out of the profiles.
	n=$(awk -v r="$(echo "${remote_r[*]}" | median)" -v s="$SIZE" 'BEGIN { n = int(5 * r * 1e6 / s) + 2; print (n > 20) ? 20 : n }')
	ids=()
	for _ in $(seq 1 "$n"); do
		head -c "$SIZE" /dev/urandom >"$WORK/body.bin"
		ids+=("$(upload_a "$WORK/body.bin")")
	done
	rm -f "$WORK/body.bin"
	curl -fsS -o "$WORK/cpu-a.pprof" "http://127.0.0.1:$ADMIN_a/debug/pprof/profile?seconds=5" &
	pa=$!
	curl -fsS -o "$WORK/cpu-b.pprof" "http://127.0.0.1:$ADMIN_b/debug/pprof/profile?seconds=5" &
	pb=$!
	for id in "${ids[@]}"; do
		kill -0 "$pa" 2>/dev/null || break
		fetch "$B" "$id" >/dev/null
	done
	wait "$pa" || true; wait "$pb" || true
	say "   PPROF: CPU profiles (5 s) of A and B over remote first downloads on B of fresh A media saved as fed-<stamp>.cpu-a/cpu-b.pprof"
fi

mkdir -p "$ROOT/bench/results"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
cp "$REPORT" "$ROOT/bench/results/fed-$STAMP.txt"
for f in "$WORK"/cpu-*.pprof; do
	[[ -s $f ]] && cp "$f" "$ROOT/bench/results/fed-$STAMP.${f##*/}"
done
echo "report saved under bench/results/"
