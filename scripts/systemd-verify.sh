#!/usr/bin/env bash
# Checks systemd/edge-replicator.service with systemd-analyze: `verify` (syntax,
# directives, referenced units and commands) and the offline `security`
# review, which fails above an exposure of 2.0 (0 = fully locked down,
# 10 = unprotected) so hardening cannot silently regress. Needs no running
# systemd; installs Debian's systemd package for the tool if it is missing.
set -euo pipefail

cd "$(dirname "$0")/.."
unit=systemd/edge-replicator.service
max_exposure=20 # tenths

if ! command -v systemd-analyze >/dev/null; then
    [[ "$(id -u)" -eq 0 ]] || { echo "systemd-verify: systemd-analyze is missing; run as root to install it" >&2; exit 1; }
    echo "systemd-verify: installing systemd for systemd-analyze" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd >/dev/null
fi

# verify wants the commands to exist: point them at a stand-in binary, so the
# check does not depend on the package being installed.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp /bin/true "$tmp/edge-replicator"
sed "s#/usr/bin/edge-replicator#$tmp/edge-replicator#g" "$unit" >"$tmp/edge-replicator.service"

systemd-analyze verify "$tmp/edge-replicator.service"
if systemd-analyze security --help 2>/dev/null | grep -q -- '--offline'; then
    out=$(systemd-analyze security --offline=true --threshold=$max_exposure "$tmp/edge-replicator.service" 2>&1) || {
        printf '%s\n' "$out"
        echo "systemd-verify: exposure above $((max_exposure / 10)).$((max_exposure % 10))" >&2
        exit 1
    }
    printf '%s\n' "$out" | grep 'Overall exposure level'
else
    echo "systemd-verify: this systemd-analyze has no --offline security review; skipped" >&2
fi
echo "systemd-verify: $unit ok"
