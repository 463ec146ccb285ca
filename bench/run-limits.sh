#!/usr/bin/env bash
# Load benchmark of issue 13's fair-use limits: upload and download
# throughput of a site with rate limits on (every class, per IP and per
# user, set so high they never trigger: every request still takes from its
# buckets) against the same site with them off, in ONE Caddy process (two
# site blocks), interleaved round by round, reported side by side with
# ratios (absolute numbers move with the machine's load; ratios are what
# count). Target: limits on within 5% of off (ratio >= 0.95).
#
# The limited site also has a quota rule for the benchmark's user (total
# bytes and files and a rolling one-hour window, all far above what the run
# uploads), so every upload checks usage before its body and inserts its row
# with the quota-checked insert (QUOTAS=0 leaves quotas out).
#
# Usage: bench/run-limits.sh [--quick]
# Env: CADDY (a caddy built with ./xcaddy.sh build; default ./caddy),
#      ROUNDS (default 3), DURATION (seconds per wrk run, default 8),
#      REDIS=1 (buckets in a throwaway redis-server instead of memory).
#
# Scenarios (each: limits off vs on):
#   1. 100 KiB authenticated download (/_matrix/client/v1, warm token
#      cache), c=32, req/s: download + download_bytes buckets, per IP and
#      per user (4 buckets, one limiter call for the request, one for its
#      bytes).
#   2. 64 MiB download, c=1, MB/s.
#   3. 256 KiB uploads, c=8, req/s (upload + upload_bytes, per IP and per
#      user, in one limiter call).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
source bench/lib.sh
CADDY=${CADDY:-$ROOT/caddy}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8}
QUOTAS=${QUOTAS:-1}
QUOTA_BLOCK=
# QUOTA_WINDOW=none leaves the rolling window out of the rule.
QUOTA_WINDOW=${QUOTA_WINDOW:-window 1h max_bytes 100TiB max_files 1000000000}
[[ $QUOTA_WINDOW == none ]] && QUOTA_WINDOW=
if [[ $QUOTAS == 1 ]]; then
	QUOTA_BLOCK="quotas {
			rule @*:localhost {
				max_bytes 100TiB
				max_files 1000000000
				$QUOTA_WINDOW
			}
		}"
fi
REDIS=${REDIS:-}
if [[ ${1:-} == --quick ]]; then ROUNDS=1; DURATION=3; fi

need wrk; need curl
need_caddy
[[ -z $REDIS ]] || need redis-server

WORK=$(mktemp -d /tmp/mm-bench-limits.XXXXXX)
ADMIN=$(free_port); HS=$(free_port); OFF=$(free_port); ON=$(free_port)
export XDG_DATA_HOME=$WORK/xdg/data XDG_CONFIG_HOME=$WORK/xdg/config
mkdir -p "$WORK/xdg/data" "$WORK/xdg/config"

head -c $((100 * 1024)) /dev/urandom >"$WORK/small.bin"
head -c $((64 * 1024 * 1024)) /dev/urandom >"$WORK/large.bin"
head -c $((256 * 1024)) /dev/urandom >"$WORK/up.bin"

APP_REDIS=
if [[ -n $REDIS ]]; then
	RP=$(free_port)
	redis-server --bind 127.0.0.1 --port "$RP" --save '' --appendonly no --dir "$WORK" >"$WORK/redis.log" 2>&1 &
	PIDS+=($!)
	for _ in $(seq 1 50); do redis-cli -p "$RP" ping >/dev/null 2>&1 && break; sleep 0.1; done
	APP_REDIS="redis redis://127.0.0.1:$RP/0"
fi

# Limits that never trigger: a billion requests a second, a petabyte a
# second, on every class, per IP and per user.
HIGH="upload 1000000000/1s
			download 1000000000/1s
			thumbnail 1000000000/1s
			preview 1000000000/1s
			remote 1000000000/1s
			upload_bytes 1PB/1s
			download_bytes 1PB/1s
			failed_auth per_ip 1000000000/1s"

cat >"$WORK/Caddyfile" <<EOF
{
$(caddy_globals "$ADMIN")
	matrix_media {
		storage_path $WORK/store
		database sqlite $WORK/store/media.db
		$APP_REDIS
	}
}
$(homeserver_site "$HS")
http://127.0.0.1:$OFF {
	matrix_media {
		server_name off.localhost
		homeserver http://127.0.0.1:$HS
		max_upload_size 1GiB
	}
}
http://127.0.0.1:$ON {
	matrix_media {
		server_name on.localhost
		homeserver http://127.0.0.1:$HS
		max_upload_size 1GiB
		rate_limits {
			$HIGH
		}
		$QUOTA_BLOCK
	}
}
EOF

run_caddy "$WORK/Caddyfile" "$WORK/caddy.log" "$ADMIN"
grep -q '"rate limits on"' "$WORK/caddy.log" || { echo "bench: the limited site did not turn rate limits on" >&2; exit 1; }

upload() { # $1 port, $2 file -> media id
	curl -fsS -X POST -H 'Authorization: Bearer bench' -H 'Content-Type: application/octet-stream' \
		--data-binary "@$2" "http://127.0.0.1:$1/_matrix/media/v3/upload" |
		sed -E 's#.*mxc://[^/]+/([A-Za-z0-9_-]+).*#\1#'
}

# wrk_rate URL CONNS THREADS [SCRIPT] -> prints "req/s bytes/s"; any non-2xx
# (a 429 would mean the limits triggered) fails the run.
wrk_rate() {
	local out s=()
	[[ -n ${4:-} ]] && s=(-s "$4")
	out=$(wrk -t"$3" -c"$2" -d"${DURATION}s" -H 'Authorization: Bearer bench' "${s[@]}" "$1" 2>&1)
	if grep -q 'Non-2xx' <<<"$out"; then echo "bench: non-2xx responses from $1" >&2; echo "$out" >&2; exit 1; fi
	local rps tps
	rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
	tps=$(awk '/^Transfer\/sec/ {v=$2; u=substr(v,length(v)-1); n=substr(v,1,length(v)-2);
		m=(u=="GB")?1e9*1.073741824:(u=="MB")?1048576:(u=="KB")?1024:1; printf "%.0f", n*m}' <<<"$out")
	echo "$rps $tps"
}

# The upload script: POST the 256 KiB body (the same bytes each time: the
# blob is deduplicated, each upload still hashes its body and records a row).
cat >"$WORK/post.lua" <<EOF
local f = io.open("$WORK/up.bin", "rb")
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/octet-stream"
EOF

mb() { awk -v b="$1" 'BEGIN{printf "%.0f", b/1e6}'; }

REPORT=$WORK/report.txt
store="memory"; [[ -n $REDIS ]] && store="redis"
say "caddy-matrix-media fair-use limits benchmark $(date -u +%FT%TZ) on $(nproc) cores; rounds=$ROUNDS duration=${DURATION}s; buckets in $store; quotas on the limited site: $([[ $QUOTAS == 1 ]] && echo "yes (bytes, files, 1h window)" || echo no)"

declare -A ID
for port in $OFF $ON; do
	ID[$port.small]=$(upload "$port" "$WORK/small.bin")
	ID[$port.large]=$(upload "$port" "$WORK/large.bin")
done
url() { # $1 port, $2 small|large
	local name=off.localhost; [[ $1 == "$ON" ]] && name=on.localhost
	echo "http://127.0.0.1:$1/_matrix/client/v1/media/download/$name/${ID[$1.$2]}"
}
# sanity and warm token caches
for port in $OFF $ON; do cmp <(curl -fsS -H 'Authorization: Bearer bench' "$(url "$port" small)") "$WORK/small.bin"; done

declare -A res
run() { # $1 scenario, $2 side (off|on), $3 port
	local r b
	case $1 in
	small) read -r r b < <(wrk_rate "$(url "$3" small)" 32 2); res[$1.$2]+="$r " ;;
	large) read -r r b < <(wrk_rate "$(url "$3" large)" 1 1); res[$1.$2]+="$b " ;;
	upload) read -r r b < <(wrk_rate "http://127.0.0.1:$3/_matrix/media/v3/upload" 8 2 "$WORK/post.lua"); res[$1.$2]+="$r " ;;
	esac
}
declare -A ratios
for round in $(seq 1 "$ROUNDS"); do
	for sc in small large upload; do
		# alternate which side runs first, so drift of the machine's load
		# does not favour one
		if ((round % 2)); then run $sc off "$OFF"; run $sc on "$ON"; else run $sc on "$ON"; run $sc off "$OFF"; fi
		on=$(echo "${res[$sc.on]}" | awk '{print $NF}'); off=$(echo "${res[$sc.off]}" | awk '{print $NF}')
		ratios[$sc]+="$(ratio "$on" "$off" 3) "
	done
done

say ""
say "scenario                                   limits off        limits on         on/off median (rounds)        target"
printf -v line "%-42s %-17s %-17s %-29s %s" "100 KiB authenticated download, c=32" "$(echo "${res[small.off]}" | median) req/s" "$(echo "${res[small.on]}" | median) req/s" "$(echo "${ratios[small]}" | median) (${ratios[small]% })" ">= 0.95"; say "$line"
printf -v line "%-42s %-17s %-17s %-29s %s" "64 MiB download, c=1" "$(mb "$(echo "${res[large.off]}" | median)") MB/s" "$(mb "$(echo "${res[large.on]}" | median)") MB/s" "$(echo "${ratios[large]}" | median) (${ratios[large]% })" ">= 0.95"; say "$line"
printf -v line "%-42s %-17s %-17s %-29s %s" "256 KiB upload, c=8" "$(echo "${res[upload.off]}" | median) req/s" "$(echo "${res[upload.on]}" | median) req/s" "$(echo "${ratios[upload]}" | median) (${ratios[upload]% })" ">= 0.95"; say "$line"

mkdir -p "$ROOT/bench/results"
cp "$REPORT" "$ROOT/bench/results/limits-$(date -u +%Y%m%dT%H%M%SZ).txt"
echo "report saved under bench/results/"
