#!/usr/bin/env bash
# Installs what `make fuzz` needs: cargo-fuzz (from crates.io, built with the
# stable toolchain) and a C++ compiler for libFuzzer. The fuzz targets then
# build on stable with RUSTC_BOOTSTRAP=1 (cargo-fuzz passes -Z sanitizer
# flags), so no nightly toolchain is needed.
#
# Idempotent and quiet when everything is present. Needs root only when the
# compiler is missing.
set -euo pipefail

log() { printf 'install-fuzz-deps: %s\n' "$*" >&2; }

if ! command -v c++ >/dev/null 2>&1; then
    if [[ "$(id -u)" -ne 0 ]]; then
        log "missing a C++ compiler (Debian: g++); run this script as root to install it"
        exit 1
    fi
    log "installing g++"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends g++ >/dev/null
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    log "installing cargo-fuzz (a few minutes, once)"
    cargo install --locked --quiet cargo-fuzz
fi
