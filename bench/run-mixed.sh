#!/usr/bin/env bash
# Mixed-workload benchmark (issue 14, measured without a target yet): the
# same mixed load against two Caddy processes that differ only in their
# metadata database, SQLite (the embedded default) and PostgreSQL (a
# throwaway cluster, or a database on PG_DSN's server), interleaved round by
# round, reported side by side: requests/s, p50 and p99 latency of all
# requests together, and how many requests of each kind ran.
#
# The load (bench/mixed.lua, one wrk run per side and round, 16
# connections): 80% authenticated downloads of a working set larger than the
# media cache (WORKING_SET items of 16 KiB, media_cache_size set to a
# quarter of it, so most downloads miss the cache and ask the database),
# 10% uploads (64 KiB bodies, each distinct: new blob, new row), 10%
# thumbnails (96x96 scale of IMAGES distinct 640x480 JPEGs: the first
# request of each is generated, the rest are stored thumbnails).
#
# Usage: bench/run-mixed.sh [--quick]
# Env: CADDY (a caddy built with ./xcaddy.sh build; default ./caddy),
#      ROUNDS (default 3), DURATION (seconds per wrk run, default 10),
#      WORKING_SET (default 4000), IMAGES (default 100), PG_DSN, PG_OPTS
#      (see bench/lib.sh pg_database).
set -euo pipefail
[[ -n ${BENCH_TRACE:-} ]] && set -x

cd "$(dirname "$0")/.."
ROOT=$PWD
source bench/lib.sh
CADDY=${CADDY:-$ROOT/caddy}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
WORKING_SET=${WORKING_SET:-4000}
IMAGES=${IMAGES:-100}
PG_DSN=${PG_DSN:-}
PG_OPTS=${PG_OPTS:-}
if [[ ${1:-} == --quick ]]; then ROUNDS=1; DURATION=4; WORKING_SET=400; IMAGES=20; fi

need wrk; need curl; need go; need psql
need_caddy

WORK=$(mktemp -d /tmp/mm-bench-mixed.XXXXXX)
export XDG_DATA_HOME=$WORK/xdg/data XDG_CONFIG_HOME=$WORK/xdg/config
mkdir -p "$WORK/xdg/data" "$WORK/xdg/config" "$WORK/bin" "$WORK/img" "$WORK/files"

pg_database media
PG_DATABASE_DSN=$DSN

echo "bench: making $WORKING_SET files and $IMAGES images" >&2
CGO_ENABLED=0 go build -o "$WORK/bin/" ./bench/thumbs/gen
"$WORK/bin/gen" -dir "$WORK/img" -n "$IMAGES" -width 640 -height 480 >/dev/null
python3 - "$WORK/files" "$WORKING_SET" <<'EOF'
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
for i in range(n):
    with open(os.path.join(d, "f%05d" % i), "wb") as f:
        f.write(os.urandom(16 * 1024))
EOF

CACHE=$((WORKING_SET / 4))
HS=$(free_port)
declare -A PORT ADMIN_PORT PID
for side in sqlite postgres; do
	PORT[$side]=$(free_port)
	ADMIN_PORT[$side]=$(free_port)
	db="sqlite $WORK/$side/media.db"
	[[ $side == postgres ]] && db="postgres \"$PG_DATABASE_DSN\""
	mkdir -p "$WORK/$side"
	hs_site=
	if [[ $side == sqlite ]]; then
		# One stand-in homeserver, served by the first Caddy.
		hs_site=$(homeserver_site "$HS")
	fi
	cat >"$WORK/$side/Caddyfile" <<EOF
{
$(caddy_globals "${ADMIN_PORT[$side]}")
	matrix_media {
		storage_path $WORK/$side/store
		database $db
		media_cache_size $CACHE
	}
}
$hs_site
http://127.0.0.1:${PORT[$side]} {
	matrix_media {
		server_name $side.localhost
		homeserver http://127.0.0.1:$HS
	}
}
EOF
	run_caddy "$WORK/$side/Caddyfile" "$WORK/$side/caddy.log" "${ADMIN_PORT[$side]}" "caddy ($side)"
	PID[$side]=$CADDY_PID
	PIDS+=("$CADDY_PID")
	CADDY_PID=
done

# upload_all SIDE DIR OUT: uploads every file of DIR to SIDE (8 at a time;
# each answer in a file of its own, so that parallel answers cannot mix)
# and writes their media IDs to OUT, one a line.
upload_all() {
	local port=${PORT[$1]} answers=$WORK/answers.$1.$(basename "$2")
	mkdir -p "$answers"
	find "$2" -type f | sort | xargs -P 8 -I{} sh -c 'curl -fsS -X POST -H "Authorization: Bearer bench" \
		-H "Content-Type: application/octet-stream" --data-binary "@$1" -o "$2/$(basename "$1").json" "$3"' _ {} "$answers" \
		"http://127.0.0.1:$port/_matrix/media/v3/upload"
	cat "$answers"/*.json | sed -E 's#\}#}\n#g' | sed -nE 's#.*mxc://[^/]+/([A-Za-z0-9_-]+).*#\1#p' >"$3"
	[[ $(wc -l <"$3") -eq $(find "$2" -type f | wc -l) ]] || { echo "bench: uploads to $1 failed" >&2; exit 1; }
}

head -c $((64 * 1024)) /dev/urandom >"$WORK/up.bin"
for side in sqlite postgres; do
	echo "bench: seeding $side" >&2
	upload_all "$side" "$WORK/files" "$WORK/$side/files.txt"
	upload_all "$side" "$WORK/img" "$WORK/$side/images.txt"
	# The script of this side: ids inlined, so every wrk thread has them.
	{
		echo "local server = \"$side.localhost\""
		echo "local files = {"; sed 's/.*/"&",/' "$WORK/$side/files.txt"; echo "}"
		echo "local images = {"; sed 's/.*/"&",/' "$WORK/$side/images.txt"; echo "}"
		echo "local body = io.open(\"$WORK/up.bin\", \"rb\"):read(\"*a\")"
		cat bench/mixed.lua
	} >"$WORK/$side/mixed.lua"
done
# Sanity: a download answers the uploaded bytes.
for side in sqlite postgres; do
	id=$(curl -fsS -X POST -H 'Authorization: Bearer bench' -H 'Content-Type: application/octet-stream' \
		--data-binary "@$WORK/up.bin" "http://127.0.0.1:${PORT[$side]}/_matrix/media/v3/upload" |
		sed -E 's#.*mxc://[^/]+/([A-Za-z0-9_-]+).*#\1#')
	cmp <(curl -fsS -H 'Authorization: Bearer bench' "http://127.0.0.1:${PORT[$side]}/_matrix/client/v1/media/download/$side.localhost/$id") "$WORK/up.bin"
	img=$(head -1 "$WORK/$side/images.txt")
	code=$(curl -sS -o "$WORK/thumb.out" -w '%{http_code}' -H 'Authorization: Bearer bench' \
		"http://127.0.0.1:${PORT[$side]}/_matrix/client/v1/media/thumbnail/$side.localhost/$img?width=96&height=96&method=scale")
	[[ $code == 200 ]] || { echo "bench: thumbnail on $side answered $code: $(head -c 300 "$WORK/thumb.out")" >&2; exit 1; }
done

REPORT=$WORK/report.txt
say "caddy-matrix-media mixed-workload benchmark $(date -u +%FT%TZ) on $(nproc) cores; rounds=$ROUNDS duration=${DURATION}s; working set $WORKING_SET x 16 KiB, media_cache_size $CACHE, $IMAGES images; PostgreSQL: $PG_WHAT"

declare -A RPS P50 P99 KIND R429
# run SIDE: one wrk run; appends req/s, p50 and p99 (ms) to the side's
# lists and the counts per kind the script prints.
run() {
	local out
	out=$(wrk -t2 -c16 -d"${DURATION}s" --latency -H 'Authorization: Bearer bench' -s "$WORK/$1/mixed.lua" "http://127.0.0.1:${PORT[$1]}" 2>&1)
	# Refusals other than 429 (the thumbnail queue being full is an answer
	# under this load) fail the run.
	if grep -E '^failed' <<<"$out" | grep -vqE '^failed [0-9]+ x 429 ' || ! grep -q '^kind' <<<"$out"; then
		echo "bench: wrk failed on $1 (error responses or a script error)" >&2; echo "$out" >&2; exit 1
	fi
	R429[$1]+="$(awk '/^failed [0-9]+ x 429 / {n += $2} END {print n + 0}' <<<"$out") "
	RPS[$1]+="$(awk '/^Requests\/sec/ {print $2}' <<<"$out") "
	P50[$1]+="$(awk '$1 == "50%" {print $2}' <<<"$out" | to_ms) "
	P99[$1]+="$(awk '$1 == "99%" {print $2}' <<<"$out" | to_ms) "
	KIND[$1]+="$(awk '/^kind/ {printf "%s;", $0}' <<<"$out")|"
}
# to_ms: wrk's "1.23ms" / "850.00us" / "1.20s" on stdin, as milliseconds.
to_ms() { awk '{v=$1; if (v ~ /us$/) printf "%.2f", v/1000; else if (v ~ /ms$/) printf "%.2f", v+0; else printf "%.2f", v*1000}'; }

for round in $(seq 1 "$ROUNDS"); do
	if ((round % 2)); then run sqlite; run postgres; else run postgres; run sqlite; fi
done

say ""
say "side       req/s median (rounds)                  p50 ms   p99 ms   429s per round"
for side in sqlite postgres; do
	printf -v line "%-10s %-40s %-8s %-8s %s" "$side" "$(echo "${RPS[$side]}" | median) (${RPS[$side]% })" "$(echo "${P50[$side]}" | median)" "$(echo "${P99[$side]}" | median)" "${R429[$side]% }"
	say "$line"
done
say "postgres/sqlite req/s: $(ratio "$(echo "${RPS[postgres]}" | median)" "$(echo "${RPS[sqlite]}" | median)")"
say ""
say "requests of each kind, last round:"
for side in sqlite postgres; do
	say "$side: $(echo "${KIND[$side]}" | tr '|' '\n' | awk 'NF' | tail -1)"
done

mkdir -p "$ROOT/bench/results"
cp "$REPORT" "$ROOT/bench/results/mixed-$(date -u +%Y%m%dT%H%M%SZ).txt"
echo "report saved under bench/results/"
