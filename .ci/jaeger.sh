#!/usr/bin/env bash
# Build (once) and cache the Jaeger v1 all-in-one binary from the Go module proxy.
#
# No registry ships a Jaeger binary here, but Jaeger is a Go module. `go install ...@latest`
# is refused because jaeger's go.mod carries a `replace` line, so we build from a throwaway
# scratch module that requires a pinned release and copies that replace line.
#
# Cache layout (outside the checkout, reused across runs and worktrees):
#   ${ROUTESVC_CACHE:-$HOME/.cache/routesvc}/jaeger/<version>/jaeger-all-in-one   the binary
#   ${ROUTESVC_CACHE:-$HOME/.cache/routesvc}/go/mod                                GOMODCACHE
#   ${ROUTESVC_CACHE:-$HOME/.cache/routesvc}/go/build                              GOCACHE
#
# Usage: .ci/jaeger.sh            # prints the binary path on the last line of stdout
#        JAEGER_VERSION=v1.76.0 .ci/jaeger.sh
#        .ci/jaeger.sh --rebuild  # ignore a cached binary
# Everything but the final path goes to stderr. Idempotent: a cached binary is reused.
set -euo pipefail

JAEGER_VERSION="${JAEGER_VERSION:-v1.76.0}"
# The v1 all-in-one main package (Jaeger v2 releases ship cmd/jaeger instead).
JAEGER_MAIN="${JAEGER_MAIN:-github.com/jaegertracing/jaeger/cmd/all-in-one}"

CACHE_ROOT="${ROUTESVC_CACHE:-$HOME/.cache/routesvc}"
OUT_DIR="$CACHE_ROOT/jaeger/$JAEGER_VERSION"
BIN="$OUT_DIR/jaeger-all-in-one"

log() { printf '[jaeger.sh] %s\n' "$*" >&2; }

rebuild=0
for arg in "$@"; do
  case "$arg" in
    --rebuild) rebuild=1 ;;
    -h|--help) sed -n '2,18p' "$0" >&2; exit 0 ;;
    *) log "unknown argument: $arg"; exit 2 ;;
  esac
done

cached() { [[ $rebuild -eq 0 && -x "$BIN" ]] && "$BIN" version >/dev/null 2>&1; }

if cached; then
  log "cached: $BIN"
  echo "$BIN"
  exit 0
fi

# One build at a time per version (parallel test workers may all find the binary missing);
# whoever waited on the lock re-checks the cache first.
mkdir -p "$OUT_DIR"
exec 9>"$OUT_DIR/.build.lock"
if command -v flock >/dev/null; then
  log "taking the build lock $OUT_DIR/.build.lock"
  flock 9
  if cached; then
    log "cached (built by another process): $BIN"
    echo "$BIN"
    exit 0
  fi
fi

command -v go >/dev/null || { log "go not found on PATH (need Go >= 1.24)"; exit 1; }

export GOMODCACHE="$CACHE_ROOT/go/mod"
export GOCACHE="$CACHE_ROOT/go/build"
# Only the module proxy is reachable here, not the checksum database (sum.golang.org), so
# module contents are trusted as the proxy serves them.
export GOPROXY="${GOPROXY_OVERRIDE:-https://proxy.golang.org}"
export GOSUMDB="${GOSUMDB_OVERRIDE:-off}"
export GOTOOLCHAIN=local
export GOFLAGS="-buildvcs=false -mod=mod"
export CGO_ENABLED=0
mkdir -p "$GOMODCACHE" "$GOCACHE"

scratch="$(mktemp -d "${TMPDIR:-/tmp}/routesvc-jaeger-build.XXXXXX")"
tmp_bin="$OUT_DIR/.jaeger-all-in-one.tmp.$$"
trap 'chmod -R u+w "$scratch" 2>/dev/null || true; rm -rf "$scratch" "$tmp_bin"' EXIT

log "building $JAEGER_MAIN@$JAEGER_VERSION with $(go version | cut -d' ' -f3) in $scratch"
start=$(date +%s)
(
  cd "$scratch"
  # `replace` directives only apply in the main module, so copy jaeger's own (v1.76.0 has one:
  # github.com/Shopify/sarama => v1.33.0) into the scratch go.mod; local-path ones cannot apply.
  download="$(go mod download -json "github.com/jaegertracing/jaeger@$JAEGER_VERSION" 2>&1 || true)"
  jaeger_gomod="$(sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p' <<<"$download")"
  if [[ ! -f "$jaeger_gomod" ]]; then
    log "could not fetch github.com/jaegertracing/jaeger@$JAEGER_VERSION from $GOPROXY:"
    printf '%s\n' "$download" >&2
    exit 1
  fi
  replaces="$(awk '
    /^replace[[:space:]]*\(/ { block = 1; next }
    block && /^\)/           { block = 0; next }
    block                    { print; next }
    /^replace[[:space:]]/     { sub(/^replace[[:space:]]+/, ""); print }
  ' "$jaeger_gomod" | sed 's://.*$::' | grep -v -E '=>[[:space:]]*\.{1,2}/' | grep -v -E '^[[:space:]]*$' || true)"
  {
    echo "module routesvc.local/jaegerbuild"
    echo
    echo "go 1.24"
    echo
    echo "require github.com/jaegertracing/jaeger $JAEGER_VERSION"
    while IFS= read -r r; do
      if [[ -n "$r" ]]; then echo "replace $r"; fi
    done <<<"$replaces"
  } > go.mod
  log "scratch go.mod:"; sed 's/^/    /' go.mod >&2
  # Resolve the full dependency graph of the main package and record go.sum.
  go get "$JAEGER_MAIN@$JAEGER_VERSION" >&2
  go build -trimpath \
    -ldflags "-s -w -X github.com/jaegertracing/jaeger/internal/version.latestVersion=$JAEGER_VERSION" \
    -o "$tmp_bin" "$JAEGER_MAIN" >&2
  mv -f "$tmp_bin" "$BIN"   # atomic, so a concurrent reader never sees half a binary
)
log "built $BIN in $(( $(date +%s) - start ))s"
{ "$BIN" version 2>/dev/null || true; echo; } >&2
echo "$BIN"
