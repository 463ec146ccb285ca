#!/usr/bin/env bash
# fuzz.sh runs every fuzz target of the module for a short time each, after
# its seed corpus (f.Add seeds and testdata/fuzz/FuzzXxx/ files), and exits
# non-zero if any target fails. A failing input is written by Go to the
# package's testdata/fuzz/FuzzXxx/ directory: fix the bug and commit the
# file as a regression seed.
#
# Go fuzzes one target per run, so each package's instrumented test binary
# is built once (go test -c -fuzz=.) and run once per target listed by
# -test.list '^Fuzz'. Environment:
#
#	FUZZTIME        budget per target (default 2000x: 2000 generated inputs).
#	                A count, not a duration: with a duration, Go 1.26's fuzz
#	                coordinator can fail a target with a bare "context
#	                deadline exceeded" when a worker is slow to stop at the
#	                deadline (golang/go#75804, fixed in Go 1.27); it did once
#	                here on a cold, busy machine. A count has no deadline.
#	FUZZ_CACHE_DIR  where generated inputs are kept between runs (default
#	                $(go env GOCACHE)/fuzz, shared with go test -fuzz)
#	FUZZ_PACKAGES   packages to fuzz (default: every package with a Fuzz
#	                function except caddymodule). Fuzzing instruments every
#	                dependency of the package, and caddymodule's are all of
#	                Caddy: 6+ minutes of compiling on a fresh 2-core machine
#	                for two Caddyfile targets. Their seed corpora still run
#	                in every "go test" (as all fuzz targets' do); fuzz them
#	                with FUZZ_PACKAGES=.../caddymodule when changing the
#	                Caddyfile parser.
set -euo pipefail

cd "$(dirname "$0")/.."
fuzztime=${FUZZTIME:-2000x}
cache=${FUZZ_CACHE_DIR:-$(go env GOCACHE)/fuzz}
export CGO_ENABLED=1 # thumbnails links libvips

if [[ -n "${FUZZ_PACKAGES:-}" ]]; then
	read -r -a pkgs <<<"$FUZZ_PACKAGES"
else
	mapfile -t dirs < <(grep -rlE --include='*_test.go' '^func Fuzz[A-Za-z0-9_]*\(' . | xargs -n1 dirname | sort -u)
	pkgs=()
	for d in "${dirs[@]}"; do
		[[ $d == ./caddymodule ]] && continue
		pkgs+=("$(go list "$d")")
	done
fi

bindir=$(mktemp -d)
trap 'rm -rf "$bindir"' EXIT

start=$SECONDS
failed=()
count=0
for pkg in "${pkgs[@]}"; do
	dir=$(go list -f '{{.Dir}}' "$pkg")
	bin="$bindir/$(echo "$pkg" | tr '/.' '__').test"
	if ! go test -c -fuzz=. -o "$bin" "$pkg"; then
		failed+=("$pkg (build)")
		continue
	fi
	mapfile -t targets < <(cd "$dir" && "$bin" -test.list '^Fuzz' | grep '^Fuzz' || true)
	for t in "${targets[@]}"; do
		count=$((count + 1))
		echo "--- fuzz $pkg $t ($fuzztime)"
		if ! (cd "$dir" && "$bin" -test.run '^$' -test.fuzz "^${t}\$" -test.fuzztime "$fuzztime" \
			-test.fuzzcachedir "$cache/$pkg" >"$bindir/out" 2>&1); then
			grep -v '^fuzz: elapsed' "$bindir/out" | tail -40
			failed+=("$pkg $t")
		fi
	done
done

echo "fuzz: $count targets in $((SECONDS - start))s"
if ((${#failed[@]} > 0)); then
	printf 'fuzz: FAILED %s\n' "${failed[@]}" >&2
	exit 1
fi
