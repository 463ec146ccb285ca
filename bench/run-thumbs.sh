#!/usr/bin/env bash
# Thumbnail load benchmark: caddy-matrix-media's thumbnail endpoint in ONE
# Caddy process (global matrix_media { thumbnails { workers 2 } }, a
# stand-in homeserver answering whoami), measured in one run, interleaved
# round by round where two sides are compared, and reported as ratios
# (absolute numbers move with the machine's load). Everything binds to
# 127.0.0.1.
#
# Usage: bench/run-thumbs.sh [--quick]
#   --quick   one short round, 20 sources, 200 flatness thumbnails (smoke run)
# Env: CADDY (path to a caddy built with ./xcaddy.sh build; default ./caddy),
#      N (distinct 4000x3000 source JPEGs, default 60), ROUNDS (default 3),
#      DURATION (seconds per wrk run, default 8), CHUNK (thumbnails per
#      interleaved HTTP/direct chunk of scenario 1, default 10), FLAT (cold thumbnails of
#      the RSS flatness run, a multiple of 5 and at least 100, default 1000).
#      PROFILE=1 adds one more round of cold HTTP thumbnails (after the
#      measured ones, not in the report's numbers) with a CPU profile of
#      Caddy (admin /debug/pprof/profile) and then another with strace -c -f
#      attached; both land in bench/results/ (thumbs-*.pprof, -strace.txt).
#      HEAP_PROFILE=1 saves a heap profile of Caddy after everything else
#      (bench/results/thumbs-heap-*.pprof). The environment is passed to Caddy, so MALLOC_ARENA_MAX=2 (the report's
#      header shows it) compares glibc's arena limit set from outside.
#
# Scenarios (thumbnail issue targets):
#   1. Cold 320x240 scale thumbnails of N distinct 4000x3000 JPEGs (~3.8 MB,
#      photo-like: gradients, waves, noise; bench/thumbs/gen), uploaded
#      first (not timed), fetched through HTTP at concurrency 2 (= workers)
#      with bench/thumbs/load, vs bench/thumbs/direct calling the same
#      thumbnails.Generator (Workers 2) in-process on the same files at
#      concurrency 2, interleaved in chunks of CHUNK (default 10) thumbnails
#      so that both sides see the same background load: thumbnails/s, p50,
#      p99. Two ratios, each the median
#      of the per-round ratios: p50 latency HTTP/direct (target <= 1.5) and
#      throughput HTTP/direct (target >= 0.9).
#      Every round uses fresh uploads (new media IDs of the same bytes), so
#      every HTTP request generates; the module's generation counter
#      (caddy_matrix_media_thumbnail_generation_seconds_count on the admin
#      /metrics) is checked to have grown by exactly N.
#   2. Warm (stored) thumbnail at concurrency 16 vs a 100 KiB download at
#      concurrency 16, wrk, same Caddy: req/s ratio >= 0.8.
#   3. Peak RSS of Caddy while generating 2 thumbnails concurrently from
#      fresh 4000x3000 uploads: idle RSS after the uploads, then VmHWM
#      (reset through /proc/PID/clear_refs) during the 2 generations: peak
#      < 150 MB. Measured on a fresh process (before scenario 1) and again
#      after everything else.
#   4. RSS flatness: FLAT cold thumbnails in a row (concurrency 2) of FLAT/5
#      fresh uploads (cycling over the N sources) in the 5 default sizes
#      (32x32 crop, 96x96 crop, 320x240, 640x480, 800x600 scale; every
#      request is a different stored thumbnail, so every request
#      generates): Caddy RSS at the start, after 100 and after FLAT, every
#      100 in between; target: no growth between 100 and FLAT beyond noise.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
source bench/lib.sh
CADDY=${CADDY:-$ROOT/caddy}
N=${N:-60}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-8}
FLAT=${FLAT:-1000}
if [[ ${1:-} == --quick ]]; then N=20; ROUNDS=1; DURATION=3; FLAT=200; fi
((FLAT >= 100 && FLAT % 5 == 0)) || { echo "bench: FLAT must be a multiple of 5, at least 100" >&2; exit 2; }

need go; need wrk; need curl
need_caddy

WORK=$(mktemp -d /tmp/mm-bench-thumbs.XXXXXX)
ADMIN=$(free_port); HS=$(free_port); MM=$(free_port)
export XDG_DATA_HOME=$WORK/xdg/data XDG_CONFIG_HOME=$WORK/xdg/config
mkdir -p "$WORK/bin" "$WORK/xdg/data" "$WORK/xdg/config"

echo "bench: building bench/thumbs programs" >&2
CGO_ENABLED=1 go build -o "$WORK/bin/" ./bench/thumbs/gen ./bench/thumbs/direct ./bench/thumbs/load

echo "bench: generating $N + 4 source JPEGs" >&2
mapfile -t SRC < <("$WORK/bin/gen" -dir "$WORK/src" -n "$N")
mapfile -t FRESH < <("$WORK/bin/gen" -dir "$WORK/src" -n 4 -first "$N")
head -c $((100 * 1024)) /dev/urandom >"$WORK/small.bin"
SRC_MB=$(du -cb "${SRC[@]}" | awk 'END { printf "%.2f", $1 / NR / 1e6 }')

cat >"$WORK/Caddyfile" <<EOF
{
$(caddy_globals "$ADMIN")
	matrix_media {
		storage_path $WORK/store
		database sqlite $WORK/store/media.db
		thumbnails {
			workers 2
		}
	}
}
# Stand-in homeserver: only whoami is needed (uploads are authenticated).
$(homeserver_site "$HS")
$(media_site "$MM" "$HS")
EOF

run_caddy "$WORK/Caddyfile" "$WORK/caddy.log" "$ADMIN"

BASE=http://127.0.0.1:$MM
upload() { # $1 file [$2 content type] -> prints media id
	local out
	out=$(curl -fsS -X POST -H 'Authorization: Bearer bench' -H "Content-Type: ${2:-image/jpeg}" \
		--data-binary "@$1" "$BASE/_matrix/media/v3/upload?filename=$(basename "$1")")
	[[ $out =~ mxc://[^/]+/([A-Za-z0-9_-]+) ]] || { echo "bench: upload of $1 failed: $out" >&2; cat "$WORK/caddy.log" >&2; exit 1; }
	echo "${BASH_REMATCH[1]}"
}
thumb_path() { # $1 id $2 width $3 height $4 method
	echo "/_matrix/media/v3/thumbnail/localhost/$1?width=$2&height=$3&method=$4"
}

# wrk_rate URL CONNS THREADS -> prints req/s
wrk_rate() {
	local out
	out=$(wrk -t"$3" -c"$2" -d"${DURATION}s" "$1" 2>&1)
	if grep -q 'Non-2xx' <<<"$out"; then echo "bench: non-2xx responses from $1" >&2; echo "$out" >&2; exit 1; fi
	awk '/^Requests\/sec/ {print $2}' <<<"$out"
}
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$CADDY_PID/status"; }
# rss_split prints "anon MiB/file MiB" of the resident set (file: the caddy
# binary's and libraries' pages; anon: Go heap, glibc arenas, libvips).
# The Go heap's share of anon comes from the admin endpoint's /debug/vars
# (memstats): in use, and free but not yet returned to the system.
rss_split() {
	awk '/^RssAnon/ {a = $2} /^RssFile/ {f = $2} END { printf "anon %.1f MiB, file %.1f MiB", a / 1024, f / 1024 }' "/proc/$CADDY_PID/status"
	curl -fsS "http://127.0.0.1:$ADMIN/debug/vars" 2>/dev/null | go_heap || true
}
# go_heap reads expvar JSON and prints "; Go heap in use X MiB, retained free Y MiB".
go_heap() {
	tr ',' '\n' | awk -F: '
		/"HeapInuse"/ {u = $2} /"HeapIdle"/ {i = $2} /"HeapReleased"/ {r = $2}
		END { if (u != "") printf "; Go heap in use %.1f MiB, retained free %.1f MiB", u / 1048576, (i - r) / 1048576 }'
}
hwm_kib() { awk '/^VmHWM/ {print $2}' "/proc/$CADDY_PID/status"; }
reset_hwm() { echo 5 2>/dev/null >"/proc/$CADDY_PID/clear_refs" || echo "bench: cannot reset VmHWM; the peak includes earlier work" >&2; }
# generations prints the module's count of generated thumbnails ("?" when
# the admin endpoint does not expose it).
generations() {
	curl -fsS "http://127.0.0.1:$ADMIN/metrics" 2>/dev/null |
		awk '/^caddy_matrix_media_thumbnail_generation_seconds_count/ {n += $NF; f = 1} END { if (f) print n; else print "?" }'
}
check_generated() { # $1 count before $2 expected growth $3 what
	local now
	now=$(generations)
	if [[ $1 == "?" || $now == "?" ]]; then
		echo "bench: generation counter not available; not checked ($3)" >&2
		echo "$3: unchecked" >>"$WORK/generated.txt"
		return 0
	fi
	(( now - $1 == $2 )) || { echo "bench: $3: expected $2 generations, the module counted $((now - $1))" >&2; exit 1; }
	echo "$3: $2" >>"$WORK/generated.txt"
}

REPORT=$WORK/report.txt
say "caddy-matrix-media thumbnail load benchmark $(date -u +%FT%TZ) on $(nproc) cores; workers=2 N=$N rounds=$ROUNDS duration=${DURATION}s flat=$FLAT; sources 4000x3000 JPEG, mean $SRC_MB MB; MALLOC_ARENA_MAX=${MALLOC_ARENA_MAX:-unset}"

# Uploads (not timed): ROUNDS x N for scenario 1, FLAT/5 for scenario 4,
# 4 fresh sources for scenario 3, one 100 KiB file for scenario 2.
echo "bench: uploading" >&2
SMALL_ID=$(upload "$WORK/small.bin" application/octet-stream)
declare -a RIDS # RIDS[r] = space-separated ids of round r
UPLOAD_ROUNDS=$ROUNDS
[[ -z ${PROFILE:-} ]] || UPLOAD_ROUNDS=$((ROUNDS + 2))
for r in $(seq 1 "$UPLOAD_ROUNDS"); do
	ids=()
	for f in "${SRC[@]}"; do ids+=("$(upload "$f")"); done
	RIDS[r]="${ids[*]}"
done
FLAT_IDS=()
for i in $(seq 0 $((FLAT / 5 - 1))); do FLAT_IDS+=("$(upload "${SRC[i % N]}")"); done
FRESH_IDS=()
for f in "${FRESH[@]}"; do FRESH_IDS+=("$(upload "$f")"); done

# 3. Peak RSS of 2 concurrent cold generations.
peak_two() { # $1 $2 ids -> prints "idle_kib peak_kib"
	local idle peak p1 p2
	sleep 2
	idle=$(rss_kib)
	rss_split >"$WORK/idle-split.txt"
	reset_hwm
	curl -fsS -o "$WORK/peak1.jpg" "$BASE$(thumb_path "$1" 320 240 scale)" & p1=$!
	curl -fsS -o "$WORK/peak2.jpg" "$BASE$(thumb_path "$2" 320 240 scale)" & p2=$!
	wait "$p1" && wait "$p2" || { echo "bench: peak RSS thumbnails failed" >&2; cat "$WORK/caddy.log" >&2; exit 1; }
	peak=$(hwm_kib)
	echo "$idle $peak"
}
out=$(peak_two "${FRESH_IDS[0]}" "${FRESH_IDS[1]}")
read -r IDLE1 PEAK1 <<<"$out"
SPLIT1=$(cat "$WORK/idle-split.txt")

# 1. Cold thumbnails: HTTP vs in-process generator, interleaved in chunks of
# CHUNK thumbnails (HTTP chunk, direct chunk, alternating which goes first),
# so that both sides see the same load from other processes. Per round:
# thumbs/s = N / summed chunk time, p50 and p99 over the pooled latencies.
http_cold() { # $1 round [$2 first $3 count] -> "rate p50 p99 n"
	local before out first=${2:-0} count=${3:-$N}
	for id in ${RIDS[$1]}; do thumb_path "$id" 320 240 scale; done | tail -n +$((first + 1)) | head -n "$count" >"$WORK/cold.$1.$first.txt"
	before=$(generations)
	out=$("$WORK/bin/load" -base "$BASE" -urls "$WORK/cold.$1.$first.txt" -c 2 ${LAT_OUT:+-lat-out "$LAT_OUT"}) || { cat "$WORK/caddy.log" >&2; exit 1; }
	check_generated "$before" "$count" "cold round $1 from $first"
	echo "$out"
}
direct_cold() { # [$1 first $2 count]
	"$WORK/bin/direct" -workers 2 -c 2 -width 320 -height 240 -method scale ${LAT_OUT:+-lat-out "$LAT_OUT"} "${SRC[@]:${1:-0}:${2:-$N}}"
}
# pooled FILE: prints "p50 p99" (nearest rank) of the latencies in FILE.
pooled() { sort -g "$1" | awk '{a[NR] = $1} END { r50 = int((50 * NR + 99) / 100); r99 = int((99 * NR + 99) / 100); printf "%.1f %.1f", a[r50 < 1 ? 1 : r50], a[r99 < 1 ? 1 : r99] }'; }
CHUNK=${CHUNK:-10}
h_rate=(); h_p50=(); h_p99=(); d_rate=(); d_p50=(); d_p99=(); cold_ratios=(); p50_ratios=()
chunk_no=0
for r in $(seq 1 "$ROUNDS"); do
	: >"$WORK/lat.h.$r"; : >"$WORK/lat.d.$r"
	h_secs=0; d_secs=0
	for ((first = 0; first < N; first += CHUNK)); do
		count=$((N - first < CHUNK ? N - first : CHUNK))
		if ((chunk_no++ % 2)); then
			d=$(LAT_OUT=$WORK/lat.d.$r direct_cold "$first" "$count"); h=$(LAT_OUT=$WORK/lat.h.$r http_cold "$r" "$first" "$count")
		else
			h=$(LAT_OUT=$WORK/lat.h.$r http_cold "$r" "$first" "$count"); d=$(LAT_OUT=$WORK/lat.d.$r direct_cold "$first" "$count")
		fi
		read -r hr _ <<<"$h"; read -r dr _ <<<"$d"
		h_secs=$(awk -v s="$h_secs" -v n="$count" -v r="$hr" 'BEGIN { print s + n / r }')
		d_secs=$(awk -v s="$d_secs" -v n="$count" -v r="$dr" 'BEGIN { print s + n / r }')
	done
	hr=$(awk -v n="$N" -v s="$h_secs" 'BEGIN { printf "%.2f", n / s }'); dr=$(awk -v n="$N" -v s="$d_secs" 'BEGIN { printf "%.2f", n / s }')
	read -r hp50 hp99 <<<"$(pooled "$WORK/lat.h.$r")"; read -r dp50 dp99 <<<"$(pooled "$WORK/lat.d.$r")"
	h_rate+=("$hr"); h_p50+=("$hp50"); h_p99+=("$hp99")
	d_rate+=("$dr"); d_p50+=("$dp50"); d_p99+=("$dp99")
	cold_ratios+=("$(ratio "$hr" "$dr")")
	p50_ratios+=("$(ratio "$hp50" "$dp50")")
done
say ""
say "cold 320x240 scale thumbnails of $N distinct 4000x3000 JPEGs, c=2 (workers 2): HTTP $(echo "${h_rate[*]}" | median) thumbs/s (p50 $(echo "${h_p50[*]}" | median) ms, p99 $(echo "${h_p99[*]}" | median) ms), direct generator $(echo "${d_rate[*]}" | median) thumbs/s (p50 $(echo "${d_p50[*]}" | median) ms, p99 $(echo "${d_p99[*]}" | median) ms)"
say "   p50 ratio HTTP/direct median $(echo "${p50_ratios[*]}" | median) (rounds: ${p50_ratios[*]}) target <= 1.50"
say "   throughput ratio HTTP/direct median $(echo "${cold_ratios[*]}" | median) (rounds: ${cold_ratios[*]}) target >= 0.90"
say "   per round: HTTP thumbs/s ${h_rate[*]}, p50 ms ${h_p50[*]}; direct thumbs/s ${d_rate[*]}, p50 ms ${d_p50[*]}"

# Optional: where the time of a cold HTTP thumbnail goes.
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
if [[ -n ${PROFILE:-} ]]; then
	mkdir -p "$ROOT/bench/results"
	PROF_SECS=$(( N / 5 + 2 ))
	curl -fsS -o "$ROOT/bench/results/thumbs-$STAMP.pprof" "http://127.0.0.1:$ADMIN/debug/pprof/profile?seconds=$PROF_SECS" & prof=$!
	sleep 0.5
	http_cold $((ROUNDS + 1)) >/dev/null
	wait "$prof"
	need strace
	strace -c -f -p "$CADDY_PID" -o "$ROOT/bench/results/thumbs-$STAMP-strace.txt" & st=$!
	sleep 1
	http_cold $((ROUNDS + 2)) >/dev/null
	kill -INT "$st"; wait "$st" || true
	echo "bench: profile and strace summary in bench/results/thumbs-$STAMP*" >&2
fi

# 2. Warm thumbnail vs 100 KiB download, c=16.
read -r WARM_ID _ <<<"${RIDS[1]}"
WARM_URL=$BASE$(thumb_path "$WARM_ID" 320 240 scale)
SMALL_URL=$BASE/_matrix/media/v3/download/localhost/$SMALL_ID
cmp <(curl -fsS "$SMALL_URL") "$WORK/small.bin"
WARM_BYTES=$(curl -fsS "$WARM_URL" | wc -c)
before=$(generations)
warm_ratios=(); warm_t=(); warm_d=()
for r in $(seq 1 "$ROUNDS"); do
	if ((r % 2)); then
		t=$(wrk_rate "$WARM_URL" 16 2); d=$(wrk_rate "$SMALL_URL" 16 2)
	else
		d=$(wrk_rate "$SMALL_URL" 16 2); t=$(wrk_rate "$WARM_URL" 16 2)
	fi
	warm_t+=("$t"); warm_d+=("$d"); warm_ratios+=("$(ratio "$t" "$d")")
done
check_generated "$before" 0 "warm thumbnail"
say ""
say "warm 320x240 thumbnail ($WARM_BYTES bytes), c=16: $(echo "${warm_t[*]}" | median) req/s, 100 KiB download $(echo "${warm_d[*]}" | median) req/s, ratio median $(echo "${warm_ratios[*]}" | median) (rounds: ${warm_ratios[*]}) target >= 0.80"

# 4. RSS flatness over FLAT cold generations.
SIZES=("32 32 crop" "96 96 crop" "320 240 scale" "640 480 scale" "800 600 scale")
for i in $(seq 0 $((FLAT - 1))); do
	read -r w h m <<<"${SIZES[i % 5]}"
	thumb_path "${FLAT_IDS[i / 5]}" "$w" "$h" "$m"
done >"$WORK/flat.txt"
sleep 2
before=$(generations)
FLAT_OUT=$("$WORK/bin/load" -base "$BASE" -urls "$WORK/flat.txt" -c 2 -rss-pid "$CADDY_PID" -rss-every 100) || { cat "$WORK/caddy.log" >&2; exit 1; }
check_generated "$before" "$FLAT" "flatness run"
read -r f_rate f_p50 f_p99 _ <<<"$(head -1 <<<"$FLAT_OUT")"
rss_at() { awk -v n="$1" '$1 == "rss" && $2 == n {print $3}' <<<"$FLAT_OUT"; }
R0=$(rss_at 0); R100=$(rss_at 100); RN=$(rss_at "$FLAT")
SERIES=$(awk '$1 == "rss" && $2 > 0 { printf "%s%.0f", sep, $3 / 1024; sep = " " }' <<<"$FLAT_OUT")
sleep 2
R_IDLE=$(rss_kib); R_SPLIT=$(rss_split)
say ""
say "RSS flatness, $FLAT cold thumbnails in a row (c=2; 5 default sizes of $((FLAT / 5)) fresh uploads; $f_rate thumbs/s, p50 $f_p50 ms, p99 $f_p99 ms): RSS at start $(mib "$R0") MiB, after 100 $(mib "$R100") MiB, after $FLAT $(mib "$RN") MiB, growth 100->$FLAT $(mib $((RN - R100))) MiB ($(awk -v a="$R100" -v b="$RN" 'BEGIN { printf "%+.1f", (b - a) * 100 / a }')%), 2 s idle after $(mib "$R_IDLE") MiB ($R_SPLIT) (target: no growth between 100 and $FLAT beyond noise)"
say "   RSS every 100 thumbnails (MiB): $SERIES"

out=$(peak_two "${FRESH_IDS[2]}" "${FRESH_IDS[3]}")
read -r IDLE2 PEAK2 <<<"$out"
SPLIT2=$(cat "$WORK/idle-split.txt")
if [[ -n ${HEAP_PROFILE:-} ]]; then
	mkdir -p "$ROOT/bench/results"
	HEAP_FILE=$ROOT/bench/results/thumbs-heap-$(date -u +%Y%m%dT%H%M%SZ).pprof
	curl -fsS -o "$HEAP_FILE" "http://127.0.0.1:$ADMIN/debug/pprof/heap" && echo "heap profile after everything: $HEAP_FILE" >&2
fi
say ""
say "2 concurrent cold thumbnails of fresh 4000x3000 uploads: fresh process idle RSS $(mib "$IDLE1") MiB ($SPLIT1), peak RSS $(mib "$PEAK1") MiB ($(awk -v k="$PEAK1" 'BEGIN { printf "%.0f", k * 1024 / 1e6 }') MB); after everything else idle $(mib "$IDLE2") MiB ($SPLIT2), peak $(mib "$PEAK2") MiB ($(awk -v k="$PEAK2" 'BEGIN { printf "%.0f", k * 1024 / 1e6 }') MB) (target peak < 150 MB)"

say ""
say "generations counted by the module (caddy_matrix_media_thumbnail_generation_seconds_count growth): $(paste -sd ';' "$WORK/generated.txt" | sed 's/;/; /g')"

mkdir -p "$ROOT/bench/results"
cp "$REPORT" "$ROOT/bench/results/thumbs-$STAMP.txt"
echo "report saved under bench/results/"
