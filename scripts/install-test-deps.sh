#!/usr/bin/env bash
# Installs what the integration tests talk to: real InfluxDB-compatible servers
# (VictoriaMetrics, InfluxDB 1.6 and its CLI `influx`) from the Debian archive,
# iproute2 and iptables for the network lab of tests/link.rs,
# the Python clients (PyPI influxdb-client and the v1 client influxdb) in a
# private venv at target/pyenv, and the npm client @influxdata/influxdb-client
# in a project-local folder at target/node (Debian's nodejs and npm only when
# no `node`/`npm` is on the machine).
#
# Idempotent and quiet when everything is already present, so CI and developers
# can run it before every `cargo test`. Needs root only when a package is missing.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo_root/target/pyenv"
packages=(victoria-metrics influxdb influxdb-client python3-venv iproute2 iptables)
node_dir="$repo_root/target/node"
# Pinned client versions, so every machine drives the same client code.
js_client="@influxdata/influxdb-client@1.35.0"
py_v1_client="influxdb==5.3.2"
# A machine that already has Node.js (e.g. from NodeSource) keeps it.
if ! command -v node >/dev/null 2>&1; then
    packages+=(nodejs)
fi
if ! command -v npm >/dev/null 2>&1; then
    packages+=(npm)
fi

log() { printf 'install-test-deps: %s\n' "$*" >&2; }

missing=()
for pkg in "${packages[@]}"; do
    status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
    if [[ "$status" != "install ok installed" ]]; then
        missing+=("$pkg")
    fi
done

if ((${#missing[@]} > 0)); then
    if [[ "$(id -u)" -ne 0 ]]; then
        log "missing Debian packages: ${missing[*]}; run this script as root to install them"
        exit 1
    fi
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's python3 (not a pyenv shim that may lack venv/ensurepip) builds the venv.
python=/usr/bin/python3
if [[ ! -x "$python" ]]; then
    python="$(command -v python3)"
fi

if [[ ! -x "$venv/bin/python" ]]; then
    log "creating Python venv at $venv"
    mkdir -p "$repo_root/target"
    "$python" -m venv "$venv"
fi

if ! "$venv/bin/python" -c 'import influxdb_client' >/dev/null 2>&1; then
    log "installing PyPI influxdb-client into $venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check influxdb-client
fi

if ! "$venv/bin/python" -c 'import influxdb' >/dev/null 2>&1; then
    log "installing PyPI $py_v1_client into $venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$py_v1_client"
fi

if [[ ! -f "$node_dir/node_modules/@influxdata/influxdb-client/package.json" ]]; then
    log "installing npm $js_client into $node_dir"
    mkdir -p "$node_dir"
    npm install --prefix "$node_dir" --no-audit --no-fund --silent "$js_client" >/dev/null
fi
