#!/usr/bin/env bash
# The polyglot clients' CI: toolchains, code generation, lint, and interop tests against a live
# service.
#
#   .ci/clients.sh                 everything: tools, regenerate + drift check, buf lint/breaking,
#                                  start fake provider + service (and, for Java, a second service
#                                  over mutual TLS), Go/TypeScript/Java/Python tests
#   .ci/clients.sh --regenerate    only install the plugins and run `buf generate` (after a proto change)
#   .ci/clients.sh --only go,java  run the interop tests of some languages only
#                  (go, typescript, java, python); generation and lint still run
#
# Caches live outside the checkout in ${ROUTESVC_CACHE:-$HOME/.cache/routesvc} and are reused:
#   bin/clients/<versions>/   buf-side plugins: protoc-gen-go(-grpc), protoc, protoc-gen-grpc-java
#   node-tools/<versions>/    buf and protoc-gen-es (npm)
#   npm/                      npm cache        go/mod, go/build   GOMODCACHE, GOCACHE
#   m2/                       Maven repository (offline after the first successful fill)
# The Python venv is ${VENV:-.venv} (the Makefile creates it and installs routesvc into it).
#
# buf breaking: against $BUF_BREAKING_AGAINST if set (any buf input, e.g. '.git#tag=v0.1.0'),
# else the newest tag, else branch main when HEAD is not main; skipped when that ref has no protos/.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD

# Pinned tool versions. grpc-java's runtime is 1.85.0 (clients/java/pom.xml), but Maven Central
# serves no Linux protoc-gen-grpc-java binary for 1.85.x or 1.84.x; 1.83.0's generated code uses
# only APIs that 1.85.0 keeps. protoc 25.9 matches protobuf-java 3.25.9, which grpc-java 1.85.0 uses.
BUF_VERSION=1.75.0
PROTOC_GEN_ES_VERSION=2.17.0
PROTOC_GEN_GO_VERSION=v1.36.12
PROTOC_GEN_GO_GRPC_VERSION=v1.6.2
PROTOC_VERSION=3.25.9
PROTOC_GEN_GRPC_JAVA_VERSION=1.83.0
MAVEN_DEPENDENCY_PLUGIN=org.apache.maven.plugins:maven-dependency-plugin:3.8.1

GENERATED=(clients/go/routesvcv1 clients/typescript/src/gen clients/java/src/main/java/dev/routesvc/v1)

CACHE=${ROUTESVC_CACHE:-$HOME/.cache/routesvc}
VENV=${VENV:-.venv}
[[ $VENV = /* ]] || VENV=$ROOT/$VENV
PY=$VENV/bin/python

mode=all
only="go,typescript,java,python"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --regenerate) mode=regenerate ;;
    --only) only=$2; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

started=$SECONDS
step_started=$SECONDS
step() {
  echo "[clients.sh] ($((SECONDS - started))s, previous step $((SECONDS - step_started))s) $*"
  step_started=$SECONDS
}
wants() { [[ ",$only," == *",$1,"* ]]; }

# --- (a) toolchains, plugins and dependencies ---------------------------------------------------

export GOMODCACHE=$CACHE/go/mod GOCACHE=$CACHE/go/build GOTOOLCHAIN=local GOSUMDB=off GOFLAGS=-mod=readonly
export npm_config_cache=$CACHE/npm npm_config_audit=false npm_config_fund=false npm_config_update_notifier=false
M2=$CACHE/m2
MVN=(mvn -B --no-transfer-progress "-Dmaven.repo.local=$M2")

PLUGINS=$CACHE/bin/clients/go-$PROTOC_GEN_GO_VERSION-grpc-$PROTOC_GEN_GO_GRPC_VERSION-protoc-$PROTOC_VERSION-java-$PROTOC_GEN_GRPC_JAVA_VERSION
NODE_TOOLS=$CACHE/node-tools/buf-$BUF_VERSION-es-$PROTOC_GEN_ES_VERSION
mkdir -p "$PLUGINS" "$NODE_TOOLS" "$GOMODCACHE" "$GOCACHE" "$M2"

for tool in go node npm java mvn git; do
  command -v "$tool" >/dev/null || { echo "[clients.sh] $tool is not on PATH" >&2; exit 1; }
done
[[ -x $PY ]] || { echo "[clients.sh] no Python venv at $VENV (run 'make install' first)" >&2; exit 1; }

step "tools: buf $BUF_VERSION, protoc-gen-es $PROTOC_GEN_ES_VERSION (npm)"
if [[ ! -x $NODE_TOOLS/node_modules/.bin/buf || ! -x $NODE_TOOLS/node_modules/.bin/protoc-gen-es ]]; then
  [[ -f $NODE_TOOLS/package.json ]] || echo '{"private": true}' >"$NODE_TOOLS/package.json"
  npm install --prefix "$NODE_TOOLS" --no-save --prefer-offline \
    "@bufbuild/buf@$BUF_VERSION" "@bufbuild/protoc-gen-es@$PROTOC_GEN_ES_VERSION"
fi

step "tools: protoc-gen-go $PROTOC_GEN_GO_VERSION, protoc-gen-go-grpc $PROTOC_GEN_GO_GRPC_VERSION (Go proxy)"
if [[ ! -x $PLUGINS/protoc-gen-go || ! -x $PLUGINS/protoc-gen-go-grpc ]]; then
  GOFLAGS= GOBIN=$PLUGINS go install "google.golang.org/protobuf/cmd/protoc-gen-go@$PROTOC_GEN_GO_VERSION"
  GOFLAGS= GOBIN=$PLUGINS go install "google.golang.org/grpc/cmd/protoc-gen-go-grpc@$PROTOC_GEN_GO_GRPC_VERSION"
fi

step "tools: protoc $PROTOC_VERSION, protoc-gen-grpc-java $PROTOC_GEN_GRPC_JAVA_VERSION (Maven Central)"
fetch_exe() {  # groupId:artifactId:version -> $PLUGINS/<name>
  local coords=$1 name=$2
  [[ -x $PLUGINS/$name ]] && return
  rm -rf "$PLUGINS/download-$name"
  "${MVN[@]}" -q "$MAVEN_DEPENDENCY_PLUGIN:copy" "-Dartifact=$coords:exe:linux-x86_64" \
    "-DoutputDirectory=$PLUGINS/download-$name"
  chmod +x "$PLUGINS/download-$name/"*.exe
  mv "$PLUGINS/download-$name/"*.exe "$PLUGINS/$name"
  rmdir "$PLUGINS/download-$name"
}
fetch_exe "com.google.protobuf:protoc:$PROTOC_VERSION" protoc
fetch_exe "io.grpc:protoc-gen-grpc-java:$PROTOC_GEN_GRPC_JAVA_VERSION" protoc-gen-grpc-java

# Our plugins first: buf runs `protoc` from PATH for the java builtin, and another protoc would drift.
export PATH=$PLUGINS:$NODE_TOOLS/node_modules/.bin:$PATH

# --- (b) regenerate and fail on drift ------------------------------------------------------------

step "buf generate"
rm -rf "${GENERATED[@]}"
buf generate
if [[ $mode == regenerate ]]; then
  step "regenerated ${GENERATED[*]}"
  exit 0
fi
drift=$(git status --porcelain -- "${GENERATED[@]}")
if [[ -n $drift ]]; then
  echo "[clients.sh] generated client code differs from protos/: run '.ci/clients.sh --regenerate' and commit" >&2
  echo "$drift" >&2
  git --no-pager diff --stat -- "${GENERATED[@]}" >&2
  exit 1
fi

# --- (c) buf lint and buf breaking ---------------------------------------------------------------

step "buf lint"
buf lint

against=${BUF_BREAKING_AGAINST:-}
if [[ -z $against ]]; then
  if tag=$(git describe --tags --abbrev=0 2>/dev/null); then
    ref=$tag against=".git#tag=$tag,subdir=protos"
  elif git rev-parse -q --verify refs/heads/main >/dev/null &&
       [[ $(git rev-parse HEAD) != $(git rev-parse refs/heads/main) ]]; then
    ref=main against=".git#branch=main,subdir=protos"
  fi
fi
if [[ -z $against ]]; then
  step "buf breaking: skipped (no tag, and HEAD is main)"
elif [[ -n ${ref:-} ]] && ! git cat-file -e "$ref:protos" 2>/dev/null; then
  step "buf breaking: skipped ($ref has no protos/)"
else
  step "buf breaking against $against"
  buf breaking protos --against "$against"
fi

# --- dependencies of the clients -----------------------------------------------------------------

step "deps: go mod download"
(cd clients/go && go mod download)

step "deps: npm ci (clients/typescript)"
(cd clients/typescript && npm ci --prefer-offline --loglevel=error)

# Maven: online until one full build has filled the repository for this pom, offline after that;
# an offline run that misses an artifact retries online.
MVN_FILLED=$M2/.routesvc-filled-$(sha256sum clients/java/pom.xml | cut -c1-16)
mvn_run() {  # args... ; runs in clients/java, logs to $LOGS/maven.log
  local offline=()
  [[ -f $MVN_FILLED ]] && offline=(-o)
  if (cd clients/java && "${MVN[@]}" "${offline[@]}" "$@") 2>&1 | tee "$LOGS/maven.log"; then
    touch "$MVN_FILLED"
    return 0
  fi
  if [[ ${#offline[@]} -gt 0 ]] && grep -q -e 'offline mode' -e 'has not been downloaded' "$LOGS/maven.log"; then
    echo "[clients.sh] Maven offline build missed an artifact; retrying online"
    rm -f "$MVN_FILLED"
    mvn_run "$@"
    return
  fi
  return 1
}

# --- (d) fake provider + service, then each language's interop tests -----------------------------

LOGS=$(mktemp -d "${TMPDIR:-/tmp}/routesvc-clients.XXXXXX")
fake_pid=
service_pid=
tls_service_pid=
stop_processes() {
  local status=$?
  for pid in $tls_service_pid $service_pid $fake_pid; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in $tls_service_pid $service_pid $fake_pid; do
    wait "$pid" 2>/dev/null || true
  done
  if [[ $status -ne 0 && -f $LOGS/service.log ]]; then
    for log in "$LOGS"/service*.log; do
      echo "[clients.sh] last lines of the service log ($log):" >&2
      tail -n 30 "$log" >&2
    done
  elif [[ $status -eq 0 ]]; then
    rm -rf "$LOGS"
  fi
  exit "$status"
}
trap stop_processes EXIT
trap 'exit 130' INT TERM

step "start fake provider"
"$PY" -m routesvc.testing --host 127.0.0.1 --port 0 >"$LOGS/fake.out" 2>"$LOGS/fake.log" &
fake_pid=$!
for _ in $(seq 100); do
  [[ -s $LOGS/fake.out ]] && break
  kill -0 "$fake_pid" 2>/dev/null || { cat "$LOGS/fake.log" >&2; exit 1; }
  sleep 0.1
done
FAKE_URL=$(head -n1 "$LOGS/fake.out")
[[ $FAKE_URL == http://* ]] || { echo "[clients.sh] fake provider did not start" >&2; cat "$LOGS/fake.log" >&2; exit 1; }

free_port() {
  "$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
start_service() {  # port log [config]: routesvc behind the fake provider, in the background
  env -u ROUTESVC_CONFIG \
    OPENAI_API_KEY=fake-openai-key OPENAI_BASE_URL="$FAKE_URL/v1" \
    ANTHROPIC_API_KEY=fake-anthropic-key ANTHROPIC_BASE_URL="$FAKE_URL" \
    "$PY" -m routesvc serve --port "$1" ${3:+--config "$3"} >"$2" 2>&1 &
}
wait_serving() {  # target pid [tls-folder]: until RouterService is SERVING (over mutual TLS with a folder)
  "$PY" - "$@" <<'EOF'
import os, sys, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from routesvc.client import direct_channel_options

target, pid = sys.argv[1], int(sys.argv[2])
if len(sys.argv) > 3:
    def read(name):
        with open(os.path.join(sys.argv[3], name), "rb") as file:
            return file.read()
    credentials = grpc.ssl_channel_credentials(read("ca.pem"), read("client.key"), read("client.pem"))
    channel = grpc.secure_channel(target, credentials, options=direct_channel_options(target))
else:  # straight to this host, not through a proxy the environment names
    channel = grpc.insecure_channel(target, options=direct_channel_options(target))
deadline = time.monotonic() + 60
with channel:
    stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service="routesvc.v1.RouterService")
    while True:
        try:
            if stub.Check(request, timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                break
        except grpc.RpcError:
            pass
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            sys.exit("routesvc exited before it was SERVING")
        if time.monotonic() > deadline:
            sys.exit(f"routesvc at {target} was not SERVING within 60s")
        time.sleep(0.2)
EOF
}

step "start routesvc (fake provider at $FAKE_URL)"
port=$(free_port)
start_service "$port" "$LOGS/service.log"
service_pid=$!
TARGET=127.0.0.1:$port

# The Java client's TLS options are tested against a second routesvc that requires client
# certificates (mutual TLS): a CA, a server certificate for 127.0.0.1 and a client certificate.
if wants java; then
  step "start routesvc over mutual TLS (the Java client's TLS tests)"
  command -v openssl >/dev/null || { echo "[clients.sh] openssl is not on PATH (it makes the test certificates)" >&2; exit 1; }
  TLS_DIR=$LOGS/tls
  mkdir -p "$TLS_DIR"
  echo "subjectAltName=DNS:localhost,IP:127.0.0.1" >"$TLS_DIR/server.ext"
  (
    cd "$TLS_DIR"
    key=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)  # PKCS#8 PEM, as grpc-java reads it
    openssl req -x509 "${key[@]}" -keyout ca.key -out ca.pem -days 2 -subj "/CN=routesvc interop CA"
    openssl req "${key[@]}" -keyout server.key -out server.csr -subj "/CN=interop-server"
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile server.ext
    openssl req "${key[@]}" -keyout client.key -out client.csr -subj "/CN=interop-client"
    openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem -days 2
  ) >"$LOGS/openssl.log" 2>&1 || { cat "$LOGS/openssl.log" >&2; exit 1; }
  "$PY" - "$TLS_DIR" >"$TLS_DIR/config.yaml" <<'EOF'
import sys
from importlib import resources

import yaml

folder = sys.argv[1]
config = yaml.safe_load(resources.files("routesvc").joinpath("default_config.yaml").read_text())
config["server"]["tls"] = {
    "cert_file": f"{folder}/server.pem",
    "key_file": f"{folder}/server.key",
    "client_ca_file": f"{folder}/ca.pem",
}
yaml.safe_dump(config, sys.stdout, sort_keys=False)
EOF
  tls_port=$(free_port)
  start_service "$tls_port" "$LOGS/service-tls.log" "$TLS_DIR/config.yaml"
  tls_service_pid=$!
  TLS_TARGET=127.0.0.1:$tls_port
fi

wait_serving "$TARGET" "$service_pid"  # the TLS one starts up meanwhile; the Java step waits for it
export ROUTESVC_TARGET=$TARGET ROUTESVC_FAKE_URL=$FAKE_URL

declare -A passed failed
record() {  # language passed failed
  passed[$1]=$2 failed[$1]=$3
}

if wants go; then
  step "go: vet, example, interop tests against $TARGET"
  (cd clients/go && go vet ./... && go run ./cmd/example -insecure -target "$TARGET" "Say hello")
  # The benchmark's Go load generator is built on these stubs: formatted and vetted with them.
  (cd bench/goload && unformatted=$(gofmt -l .) && [[ -z $unformatted ]] && go vet ./...) ||
    { echo "bench/goload: gofmt or go vet failed" >&2; exit 1; }
  (cd clients/go && go test -count=1 -v ./...) 2>&1 | tee "$LOGS/go.log"
  record go "$(grep -c '^--- PASS' "$LOGS/go.log" || true)" "$(grep -c '^--- FAIL' "$LOGS/go.log" || true)"
fi

if wants typescript; then
  step "typescript: tsc, example, interop tests against $TARGET"
  (cd clients/typescript && rm -rf dist && node_modules/.bin/tsc -p tsconfig.json &&
    node dist/examples/example.js "$TARGET" "Say hello")
  (cd clients/typescript && node --test dist/test/) 2>&1 | tee "$LOGS/typescript.log"
  record typescript "$(sed -n 's/^# pass //p' "$LOGS/typescript.log")" "$(sed -n 's/^# fail //p' "$LOGS/typescript.log")"
fi

if wants java; then
  step "java: mvn test, example, interop tests against $TARGET and $TLS_TARGET (mutual TLS)"
  wait_serving "$TLS_TARGET" "$tls_service_pid" "$TLS_DIR"
  export ROUTESVC_TLS_TARGET=$TLS_TARGET ROUTESVC_TLS_DIR=$TLS_DIR
  mvn_run test "$MAVEN_DEPENDENCY_PLUGIN:build-classpath" -Dmdep.outputFile=target/classpath.txt -Dmdep.includeScope=runtime
  cp "$LOGS/maven.log" "$LOGS/java.log"
  (cd clients/java && java -cp "target/classes:$(cat target/classpath.txt)" dev.routesvc.client.Example "$TARGET" "Say hello")
  totals=$(grep -E '^\[[A-Z]+\] Tests run: [0-9]+, Failures: [0-9]+, Errors: [0-9]+, Skipped: [0-9]+$' "$LOGS/java.log" | tail -n1)
  read -r run failures errors skipped < <(echo "$totals" | sed -E 's/.*run: ([0-9]+), Failures: ([0-9]+), Errors: ([0-9]+), Skipped: ([0-9]+)/\1 \2 \3 \4/')
  record java "$((run - failures - errors - skipped))" "$((failures + errors))"
fi

if wants python; then
  step "python: example, interop tests against $TARGET"
  export PYTHONPATH=$ROOT/clients/python/src${PYTHONPATH:+:$PYTHONPATH}
  (cd clients/python && "$PY" examples/example.py "$TARGET" "Say hello")
  (cd clients/python && "$PY" -m pytest -q -p no:cacheprovider tests) 2>&1 | tee "$LOGS/python.log"
  record python "$(grep -oE '[0-9]+ passed' "$LOGS/python.log" | tail -n1 | cut -d' ' -f1)" \
    "$(grep -oE '[0-9]+ failed' "$LOGS/python.log" | tail -n1 | cut -d' ' -f1)"
fi

step "done"
total_passed=0 total_failed=0
for language in go typescript java python; do
  [[ -n ${passed[$language]+x} ]] || continue
  echo "[clients.sh] $language: ${passed[$language]:-0} passed, ${failed[$language]:-0} failed"
  total_passed=$((total_passed + ${passed[$language]:-0}))
  total_failed=$((total_failed + ${failed[$language]:-0}))
done
echo "interop: $total_passed passed, $total_failed failed"
[[ $total_failed -eq 0 ]]
