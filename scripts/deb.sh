#!/usr/bin/env bash
# Builds the .deb for one architecture: scripts/deb.sh amd64|arm64|armhf
# (or a Rust target triple). Prints the package's path on stdout.
#
# The binary comes from scripts/cross.sh (the same build as `make cross`); the
# package layout (binary, systemd unit, default config as a conffile) is
# [package.metadata.deb] in Cargo.toml, packed by cargo-deb, which this script
# installs from crates.io at a fixed version when it is missing.
set -euo pipefail

cd "$(dirname "$0")/.."
cargo_deb_version=3.8.0

log() { printf 'deb: %s\n' "$*" >&2; }

case "${1:-}" in
    "" | amd64 | x86_64-unknown-linux-gnu) triple=x86_64-unknown-linux-gnu ;;
    arm64 | aarch64-unknown-linux-gnu) triple=aarch64-unknown-linux-gnu ;;
    armhf | armv7-unknown-linux-gnueabihf) triple=armv7-unknown-linux-gnueabihf ;;
    *) log "unknown architecture \"$1\" (amd64, arm64, armhf)"; exit 2 ;;
esac

if [[ "$(cargo deb --version 2>/dev/null)" != *" $cargo_deb_version"* ]]; then
    log "installing cargo-deb $cargo_deb_version (about 2 minutes, once)"
    cargo install --quiet --locked --version "$cargo_deb_version" cargo-deb
fi

./scripts/cross.sh build "$triple" >&2

host=$(rustc -vV | sed -n 's/^host: //p')
target_args=()
if [[ "$triple" != "$host" ]]; then
    target_args=(--target "$triple")
fi
# Already stripped by the release profile; packed as built.
out=$(cargo deb --no-build --no-strip --no-dbgsym --quiet "${target_args[@]}" --output target/debian/)
deb=$(printf '%s\n' "$out" | tail -n1)
[[ -f "$deb" ]] || { log "cargo deb did not report a package: $out"; exit 1; }
log "$(dpkg-deb -f "$deb" Package Version Architecture | paste -sd' ') $(stat -c %s "$deb") bytes"
echo "$deb"
