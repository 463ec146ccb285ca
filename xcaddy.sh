#!/usr/bin/env bash
# xcaddy.sh: install the tools, build, run and test caddy-matrix-media.
#
#   ./xcaddy.sh deps    install what is missing (Debian packages, xcaddy)
#   ./xcaddy.sh build   deps, then build ./caddy: Caddy with this module
#   ./xcaddy.sh run     build, then run ./caddy with Caddyfile.example
#                       (extra arguments are passed to "caddy run")
#   ./xcaddy.sh test    deps, gofmt, go vet, staticcheck, fuzz targets briefly,
#                       then every test with -race
#
# The module uses cgo (SQLite, libvips), so every build sets CGO_ENABLED=1:
# xcaddy builds without cgo unless that variable is exactly 1.
set -euo pipefail

readonly CADDY_VERSION=v2.11.9
readonly XCADDY_VERSION=v0.4.5
# Dendrite is the real homeserver of the end-to-end tests (login, logout).
readonly DENDRITE_VERSION=v0.13.8
readonly DENDRITE_CMDS=(dendrite generate-keys)
# staticcheck runs in the test command (static analysis, must be clean).
readonly STATICCHECK_VERSION=v0.8.2
readonly MODULE=github.com/caddy-matrix-media/caddy-matrix-media
# Debian packages: cgo toolchain and libvips headers for the build, PostgreSQL
# server binaries for throwaway test clusters, redis-server and wrk for
# integration tests and benchmarks, chromium for the test that opens an
# export archive's index.html in a headless browser, prometheus (prometheus
# and promtool) for the test of contrib/'s dashboard and alert rules (it runs
# its own Prometheus on a loopback port and never uses the package's service).
readonly APT_PACKAGES=(libvips-dev pkg-config gcc postgresql redis-server wrk chromium prometheus)

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly ROOT
cd "$ROOT"

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'xcaddy.sh: %s\n' "$*" >&2; exit 1; }

require_go() {
	command -v go >/dev/null 2>&1 || die "go is not installed or not in PATH (Go 1.26 or newer is needed)"
}

# go_bin prints the directory "go install" writes to.
go_bin() {
	local d
	d=$(go env GOBIN)
	printf '%s\n' "${d:-$(go env GOPATH)/bin}"
}

# xcaddy_path prints the xcaddy binary to use, or nothing if none is found.
xcaddy_path() {
	local gobin
	gobin=$(go_bin)
	if [[ -x $gobin/xcaddy ]]; then
		printf '%s\n' "$gobin/xcaddy"
	elif command -v xcaddy >/dev/null 2>&1; then
		command -v xcaddy
	fi
}

deps() {
	require_go
	local missing=() pkg
	for pkg in "${APT_PACKAGES[@]}"; do
		if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
			missing+=("$pkg")
		fi
	done
	if ((${#missing[@]} > 0)); then
		if [[ $(id -u) -eq 0 ]]; then
			log "installing Debian packages: ${missing[*]}"
			apt-get update -qq
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
		else
			printf 'Missing Debian packages. Install them with:\n\n  sudo apt-get update && sudo apt-get install -y --no-install-recommends %s\n\n' "${missing[*]}" >&2
			exit 1
		fi
	fi
	local xc
	xc=$(xcaddy_path)
	if [[ -z $xc ]] || ! "$xc" version 2>/dev/null | grep -q "^$XCADDY_VERSION\b"; then
		log "installing xcaddy $XCADDY_VERSION"
		go install "github.com/caddyserver/xcaddy/cmd/xcaddy@$XCADDY_VERSION"
	fi
}

# test_deps installs what only the tests need: Dendrite's binaries and
# staticcheck.
test_deps() {
	local gobin cmd missing=()
	gobin=$(go_bin)
	if [[ ! -x $gobin/staticcheck ]] || ! go version -m "$gobin/staticcheck" 2>/dev/null | grep -q "honnef.co/go/tools.*$STATICCHECK_VERSION"; then
		log "installing staticcheck $STATICCHECK_VERSION"
		(cd "${TMPDIR:-/tmp}" && GOFLAGS= go install "honnef.co/go/tools/cmd/staticcheck@$STATICCHECK_VERSION")
	fi
	for cmd in "${DENDRITE_CMDS[@]}"; do
		if [[ ! -x $gobin/$cmd ]] || ! go version -m "$gobin/$cmd" 2>/dev/null | grep -q "dendrite.*$DENDRITE_VERSION"; then
			missing+=("github.com/matrix-org/dendrite/cmd/$cmd@$DENDRITE_VERSION")
		fi
	done
	if ((${#missing[@]} > 0)); then
		log "installing Dendrite $DENDRITE_VERSION (end-to-end tests' homeserver)"
		(cd "${TMPDIR:-/tmp}" && GOFLAGS= go install "${missing[@]}")
	fi
}

build() {
	deps
	local xc
	xc=$(xcaddy_path)
	[[ -n $xc ]] || die "xcaddy not found; run ./xcaddy.sh deps first"
	log "building ./caddy (Caddy $CADDY_VERSION with $MODULE)"
	# The @v0.0.0 version on the local replacement keeps the Go toolchain from
	# asking the module proxy about this module's path.
	CGO_ENABLED=1 "$xc" build "$CADDY_VERSION" \
		--with "$MODULE@v0.0.0=$ROOT" \
		--output "$ROOT/caddy"
}

run() {
	build
	log "running ./caddy with Caddyfile.example"
	exec "$ROOT/caddy" run --config "$ROOT/Caddyfile.example" --adapter caddyfile "$@"
}

run_tests() {
	deps
	test_deps
	log "checking formatting"
	local unformatted
	unformatted=$(gofmt -l .)
	if [[ -n $unformatted ]]; then
		printf 'These files are not gofmt-formatted:\n%s\n' "$unformatted" >&2
		exit 1
	fi
	# vet and staticcheck read race-built packages, which the tests below
	# reuse from Go's build cache: on a fresh machine the dependency tree is
	# compiled once for all three instead of once more without -race.
	log "go vet"
	CGO_ENABLED=1 go vet -race ./...
	log "staticcheck"
	GOFLAGS="${GOFLAGS:+$GOFLAGS }-race" CGO_ENABLED=1 "$(go_bin)/staticcheck" ./...
	# Every fuzz target briefly, after its committed seed corpus (before the
	# tests, so that go test's summary closes the output).
	log "fuzz targets"
	./.ci/fuzz.sh
	# Tests that run Caddy must not touch the real ~/.local/share/caddy or
	# ~/.config/caddy.
	TEST_XDG=$(mktemp -d "${TMPDIR:-/tmp}/matrix-media-test.XXXXXX")
	trap 'rm -rf -- "$TEST_XDG"' EXIT
	mkdir -p "$TEST_XDG/data" "$TEST_XDG/config"
	log "go test -race"
	XDG_DATA_HOME="$TEST_XDG/data" XDG_CONFIG_HOME="$TEST_XDG/config" CGO_ENABLED=1 \
		go test -race -count=1 -timeout 30m ./...
}

usage() {
	sed -n '2,9s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
	exit 2
}

case "${1:-}" in
deps) deps ;;
build) build ;;
run)
	shift
	run "$@"
	;;
test) run_tests ;;
*) usage ;;
esac
