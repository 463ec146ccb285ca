#!/usr/bin/env bash
# Import benchmark: "caddy matrix-media import synapse" from a Synapse-shaped
# media repository (bench/import/seed: homeserver.yaml, a SQLite homeserver
# database with Synapse's media tables, media_store/local_content files of
# random bytes with their SHA-256 in the rows) into a fresh Caddy on the
# embedded defaults (SQLite and a file datastore under XDG_DATA_HOME), against
# a plain "cp -r" of the same media_store on the same disk in the same run.
# Everything binds to 127.0.0.1.
#
# Usage: bench/run-import.sh [--quick]
#   --quick   5,000 small media and 4 x 64 MiB (a smoke run)
# Env: CADDY (path to a caddy built with ./xcaddy.sh build; default ./caddy),
#      BENCH_DIR (where the work directory goes; default /tmp; it needs room
#        for a dataset's source, its cp and one import per --workers value,
#        about 6.5 GiB with the defaults, checked first; it is removed at
#        the end),
#      SMALL_N (small media, default 100000; 0 skips the dataset),
#      SMALL_MIN/SMALL_MAX (their sizes in bytes, default 1024/8192),
#      SMALL_WORKERS (--workers of the small imports, default "4 8"),
#      LARGE_N (large media, default 16; 0 skips), LARGE_MIB (their size,
#        default 128: 16 x 128 MiB = 2 GiB),
#      LARGE_WORKERS (default "4"),
#      MODES (how the bytes reach Caddy, default "file": "file" lets Caddy
#        read the source's files itself, as the command does when Caddy is
#        on the same machine; "bytes" sends them over the admin socket,
#        --send-bytes; "file bytes" measures both),
#      ROUNDS (default 1: how many times each dataset's cp and imports are
#        repeated, interleaved, each import compared with the cp of its
#        round),
#      PROFILE (seconds of CPU profile to take from Caddy's admin
#        /debug/pprof/profile at the start of the first large import, saved
#        under bench/results/; default 0: none).
#
# Per dataset:
#   1. seed the source, then sync (not timed);
#   2. sync; cp -r media_store to a fresh directory; sync: the time is the
#      physical reference (the kernel's copy of the same files, made
#      durable);
#   3. per --workers value: a fresh Caddy (new data directory), sync, then
#      the import followed by sync, timed (the import makes every blob and
#      row durable itself; the sync is there to charge both sides alike):
#      items/s, MB/s, ratio of cp's time to the import's (1.0 = as fast as
#      cp; the large-file target is >= 0.7), and the CPU seconds of the
#      command and of Caddy; then the same import again (a no-op: every
#      item is already present), timed. The report of each run is checked
#      (imported N, nothing else), and the blob files' names are checked
#      against the SHA-256 column of the source database.
#
# The machine's other load moves every number: run it on a quiet machine,
# and compare the ratios of one run, not absolute numbers across runs.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
source bench/lib.sh
CADDY=${CADDY:-$ROOT/caddy}
BENCH_DIR=${BENCH_DIR:-/tmp}
SMALL_N=${SMALL_N:-100000}
SMALL_MIN=${SMALL_MIN:-1024}
SMALL_MAX=${SMALL_MAX:-8192}
SMALL_WORKERS=${SMALL_WORKERS:-4 8}
LARGE_N=${LARGE_N:-16}
LARGE_MIB=${LARGE_MIB:-128}
LARGE_WORKERS=${LARGE_WORKERS:-4}
PROFILE=${PROFILE:-0}
MODES=${MODES:-file}
ROUNDS=${ROUNDS:-1}
if [[ ${1:-} == --quick ]]; then SMALL_N=5000; LARGE_N=4; LARGE_MIB=64; fi

BENCH_NEED_HINT=
need go; need curl; need sqlite3; need sha256sum
need_caddy

# Space: a dataset's source, its cp and one imported copy per --workers
# value are kept until the dataset is done (see dataset); a small item takes
# up to its size plus a directory block in each, rounded up to 8 KiB here.
# The datasets come one after the other; plus 1 GiB of slack.
n_modes=$(wc -w <<<"$MODES")
n_small_w=$(($(wc -w <<<"$SMALL_WORKERS") * n_modes))
n_large_w=$(($(wc -w <<<"$LARGE_WORKERS") * n_modes))
SMALL_KB=$((SMALL_N * (SMALL_MAX / 1024 + 8) * (1 + ROUNDS * (1 + n_small_w))))
LARGE_KB=$((LARGE_N * LARGE_MIB * 1024 * (1 + ROUNDS * (1 + n_large_w))))
NEED_KB=$(((SMALL_KB > LARGE_KB ? SMALL_KB : LARGE_KB) + 1024 * 1024))
AVAIL_KB=$(df -Pk "$BENCH_DIR" | awk 'NR == 2 {print $4}')
((AVAIL_KB > NEED_KB)) || { echo "bench: $BENCH_DIR has $((AVAIL_KB / 1024)) MiB free, need $((NEED_KB / 1024)) MiB" >&2; exit 1; }

WORK=$(mktemp -d "$BENCH_DIR/mm-bench-import.XXXXXX")
mkdir -p "$WORK/bin"
echo "bench: building bench/import/seed" >&2
CGO_ENABLED=1 go build -o "$WORK/bin/" ./bench/import/seed

REPORT=$WORK/report.txt
RESULTS=$ROOT/bench/results
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
per_s() { awk -v n="$1" -v s="$2" 'BEGIN { printf "%.0f", n / s }'; }
mb_s() { awk -v n="$1" -v s="$2" 'BEGIN { printf "%.1f", n / s / 1e6 }'; }
# cpu_s PID: user+system CPU seconds of a process so far.
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / hz }' "/proc/$1/stat"; }
sub() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a - b }'; }

start_caddy() { # $1 data directory
	ADMIN=$(free_port)
	mkdir -p "$1/xdg/data" "$1/xdg/config"
	cat >"$1/Caddyfile" <<EOF
{
	admin 127.0.0.1:$ADMIN
	persist_config off
	matrix_media
}
EOF
	XDG_DATA_HOME=$1/xdg/data XDG_CONFIG_HOME=$1/xdg/config "$CADDY" run --config "$1/Caddyfile" >"$1/caddy.log" 2>&1 &
	CADDY_PID=$!
	wait_http "http://127.0.0.1:$ADMIN/matrix_media/datastores" "$1/caddy.log" caddy "$CADDY_PID"
}

stop_caddy() {
	stop_pid "$CADDY_PID"
	CADDY_PID=
}

# import_run SRC LOG WORKERS [FLAG...] -> prints "seconds cli_cpu": the
# import and a sync, timed; the command's CPU from bash's times of the child.
import_run() {
	local t0 out rc
	sync
	t0=$(now)
	rc=0
	TIMEFORMAT='%U %S'
	out=$({ time "$CADDY" matrix-media import synapse --from "$1/homeserver.yaml" --address "127.0.0.1:$ADMIN" \
		--workers "$3" "${@:4}" >"$2" 2>"$2.progress"; } 2>&1) || rc=$?
	sync
	local secs
	secs=$(since "$t0")
	((rc == 0)) || { echo "bench: import failed ($rc)" >&2; tail -20 "$2" "$2.progress" >&2; exit 1; }
	echo "$secs $(awk '{ printf "%.2f", $1 + $2 }' <<<"$out")"
}

# check_report LOG FIELD N: the report counts N for FIELD and 0 problems.
check_report() {
	local got
	got=$(awk -v f="$2:" '$1 " " $2 == f || $1 == f { for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+$/) { print $i; exit } }' "$1")
	[[ $got == "$3" ]] || { echo "bench: expected $2 $3 in the report, got '$got'" >&2; cat "$1" >&2; exit 1; }
	grep -q '^problems:' "$1" && { echo "bench: the import reported problems" >&2; cat "$1" >&2; exit 1; }
	return 0
}

# check_blobs SRC DATA: the file datastore holds exactly the source's hashes,
# and three random blobs hash to their names.
check_blobs() {
	local blobs=$2/xdg/data/caddy/matrix_media/media/blobs
	diff <(sqlite3 "$1/homeserver.db" 'SELECT sha256 FROM local_media_repository' | sort -u) \
		<(find "$blobs" -type f -printf '%f\n' | sort) >/dev/null ||
		{ echo "bench: the stored blobs differ from the source's hashes" >&2; exit 1; }
	local f
	for f in $(find "$blobs" -type f | shuf -n 3); do
		[[ $(sha256sum "$f" | cut -d' ' -f1) == "$(basename "$f")" ]] || { echo "bench: blob $f does not hash to its name" >&2; exit 1; }
	done
}

# dataset NAME N MIN MAX SEED WORKERS...
#
# Nothing of a dataset is deleted before all its runs are done: right after
# many files were deleted, ext4's inode allocator skips (and scans past) the
# recently freed inodes, which makes creating files and directories
# measurably slower for a while; a run that follows a mass deletion would
# pay for it and the cp run before it would not.
dataset() {
	local name=$1 n=$2 min=$3 max=$4 seed=$5
	shift 5
	local dir=$WORK/$name src=$WORK/$name/src
	mkdir -p "$dir"
	echo "bench: seeding $name ($n media)" >&2
	local items bytes out
	out=$("$WORK/bin/seed" -dir "$src" -n "$n" -min "$min" -max "$max" -seed "$seed")
	read -r items bytes <<<"$out"
	sync
	say ""
	say "$name: $items media, $bytes bytes ($(mb_s "$bytes" 1) MB; $min-$max bytes each, random), Synapse media_store + SQLite homeserver.db"

	local round w mode
	for ((round = 1; round <= ROUNDS; round++)); do
		local tag=""
		((ROUNDS > 1)) && tag=" (round $round)"
		echo "bench: cp -r $name$tag" >&2
		sync
		local t0 cp_s
		t0=$(now)
		cp -r "$src/media_store" "$dir/cp-$round"
		sync
		cp_s=$(since "$t0")
		say "   cp -r media_store + sync$tag:    $(printf '%7.2f' "$cp_s") s  $(printf '%7s' "$(per_s "$items" "$cp_s")") items/s  $(printf '%7s' "$(mb_s "$bytes" "$cp_s")") MB/s"

		for w in "$@"; do
			for mode in $MODES; do
				local flags=()
				[[ $mode == bytes ]] && flags=(--send-bytes)
				local cdir=$dir/caddy-r$round-w$w-$mode
				start_caddy "$cdir"
				local prof_pid=
				if [[ $name == large && $PROFILE -gt 0 && ! -e $RESULTS/import-$STAMP-caddy.pprof ]]; then
					mkdir -p "$RESULTS"
					curl -fsS -o "$RESULTS/import-$STAMP-caddy.pprof" "http://127.0.0.1:$ADMIN/debug/pprof/profile?seconds=$PROFILE" &
					prof_pid=$!
				fi
				echo "bench: importing $name, --workers $w, $mode$tag" >&2
				local c0 secs cli c1
				c0=$(cpu_s "$CADDY_PID")
				out=$(import_run "$src" "$cdir/import1.txt" "$w" "${flags[@]}")
				read -r secs cli <<<"$out"
				c1=$(cpu_s "$CADDY_PID")
				check_report "$cdir/import1.txt" "imported" "$items"
				if [[ $mode == file ]] && ! grep -q "items were read by the target from the source's files directly" "$cdir/import1.txt"; then
					echo "bench: Caddy did not read the source's files itself" >&2
					cat "$cdir/import1.txt" >&2
					exit 1
				fi
				[[ -n $prof_pid ]] && { wait "$prof_pid" || echo "bench: profile failed" >&2; }
				say "   import --workers $w, $mode + sync:  $(printf '%7.2f' "$secs") s  $(printf '%7s' "$(per_s "$items" "$secs")") items/s  $(printf '%7s' "$(mb_s "$bytes" "$secs")") MB/s  ratio $(ratio "$cp_s" "$secs")x  (CPU s: command $cli, caddy $(sub "$c1" "$c0"))"
				if ((round == 1)); then
					echo "bench: second run of $name, --workers $w, $mode" >&2
					out=$(import_run "$src" "$cdir/import2.txt" "$w" "${flags[@]}")
					read -r secs cli <<<"$out"
					check_report "$cdir/import2.txt" "already present" "$items"
					say "   second run (no-op), --workers $w, $mode: $(printf '%7.2f' "$secs") s  $(printf '%7s' "$(per_s "$items" "$secs")") items/s"
				fi
				stop_caddy
				check_blobs "$src" "$cdir"
			done
		done
	done
	rm -rf "$dir"
	sync
}

say "caddy-matrix-media import benchmark $(date -u +%FT%TZ) on $(nproc) cores, $(df -PT "$WORK" | awk 'NR == 2 {print $2 " on " $1}'); ratio = cp time / import time"
if ((SMALL_N > 0)); then
	# shellcheck disable=SC2086 # word splitting of the workers list
	dataset small "$SMALL_N" "$SMALL_MIN" "$SMALL_MAX" 1 $SMALL_WORKERS
fi
if ((LARGE_N > 0)); then
	# shellcheck disable=SC2086
	dataset large "$LARGE_N" $((LARGE_MIB << 20)) $((LARGE_MIB << 20)) 2 $LARGE_WORKERS
fi

mkdir -p "$RESULTS"
cp "$REPORT" "$RESULTS/import-$STAMP.txt"
echo "report saved under bench/results/"
