#!/usr/bin/env bash
# Installs the amd64 .deb on this machine, checks what it put where, upgrades
# it over a locally edited config, removes and purges it, and checks that
# nothing is left behind. Run by `make deb-test` and CI (as root).
#
#   scripts/deb-test.sh [PACKAGE.deb]     (default: build it with scripts/deb.sh)
#
# No systemd runs here, so the unit is not started: the package's scripts only
# enable it. If the systemd package itself is absent, dpkg is given
# --force-all, as the unit's helpers come with it.
set -euo pipefail

cd "$(dirname "$0")/.."

log() { printf 'deb-test: %s\n' "$*" >&2; }
fail() { log "FAIL: $*"; failed=$((failed + 1)); }
check() { if "$@"; then passed=$((passed + 1)); else fail "$*"; fi; }
passed=0 failed=0

if [[ "$(id -u)" -ne 0 ]]; then
    if [[ "${CI:-}" == true ]]; then
        log "must run as root"
        exit 1
    fi
    log "SKIP: dpkg -i needs root"
    exit 0
fi
if dpkg-query -W -f='${Status}' edge-replicator 2>/dev/null | grep -q 'installed'; then
    log "edge-replicator is already installed here; not touching it"
    exit 1
fi

deb=${1:-$(./scripts/deb.sh amd64)}
force=()
if ! dpkg-query -W -f='${Status}' systemd 2>/dev/null | grep -q 'ok installed'; then
    log "systemd is not installed: dpkg gets --force-all"
    force=(--force-all)
fi

bin=/usr/bin/edge-replicator
conf=/etc/edge-replicator/config.toml
unit=$(dpkg-deb -c "$deb" | awk '{print $6}' | sed -n 's#^\.\(/.*/systemd/system/edge-replicator\.service\)$#\1#p')
wants=/etc/systemd/system/multi-user.target.wants/edge-replicator.service

# What the package holds, before it touches the system.
contents=$(dpkg-deb -c "$deb")
for f in ./usr/bin/edge-replicator ./etc/edge-replicator/config.toml ./usr/share/doc/edge-replicator/README.md; do
    check grep -q " $f\$" <<<"$contents"
done
check test -n "$unit"
check grep -qx "$conf" <(dpkg-deb -I "$deb" conffiles)
check grep -q '^ Depends: libc6 (>= 2.34)' <(dpkg-deb -I "$deb")

cleanup() {
    if dpkg-query -W -f='${Status}' edge-replicator 2>/dev/null | grep -q 'installed'; then
        dpkg -P "${force[@]}" edge-replicator >/dev/null 2>&1 || true
    fi
}
trap cleanup EXIT

log "dpkg -i $deb"
dpkg -i "${force[@]}" "$deb" >/dev/null
check test "$(dpkg-query -W -f='${Status}' edge-replicator)" = "install ok installed"
check test -x "$bin"
check test "$(stat -c %a "$bin")" = 755
check test -f "$conf"
check test -f "$unit"
check "$bin" --version
check "$bin" check-config --config "$conf"
check test -L "$wants"
check systemd-analyze verify "$unit"
check cmp -s systemd/edge-replicator.service "$unit"

log "reinstall over an edited config (an upgrade keeps local edits)"
printf '\n# local edit\n' >>"$conf"
dpkg -i "${force[@]}" --force-confold "$deb" >/dev/null
check grep -q '^# local edit$' "$conf"

log "dpkg -r"
dpkg -r "${force[@]}" edge-replicator >/dev/null
check test ! -e "$bin"
check test ! -e "$unit"
check test ! -e "$wants"
check test -f "$conf" # a removed package keeps its conffiles until purged

log "dpkg -P"
dpkg -P "${force[@]}" edge-replicator >/dev/null
check test ! -e "$conf"
check test ! -e /etc/edge-replicator
check test -z "$(dpkg-query -W -f='${Status}' edge-replicator 2>/dev/null | grep installed || true)"

echo "deb-test: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
