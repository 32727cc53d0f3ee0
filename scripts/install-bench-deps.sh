#!/usr/bin/env bash
# Installs what `make bench` compares against and drives: vmagent and
# VictoriaMetrics (Debian's victoria-metrics package), the hey load client,
# iproute2 and iptables for the link phase's network lab, and perf for `make
# profile`.
# Idempotent and silent when everything is in place; needs root otherwise.
set -euo pipefail

missing=()
command -v vmagent >/dev/null && command -v victoria-metrics >/dev/null || missing+=(victoria-metrics)
command -v hey >/dev/null || missing+=(hey)
# The link phase: a network namespace, shaping and a black hole.
command -v ip >/dev/null && command -v tc >/dev/null || missing+=(iproute2)
command -v iptables >/dev/null || missing+=(iptables)
# make profile (which installs inferno, from crates.io, itself).
command -v perf >/dev/null || missing+=(linux-perf)
[[ ${#missing[@]} -eq 0 ]] && exit 0

if [[ "$(id -u)" -ne 0 ]]; then
    echo "install-bench-deps: missing ${missing[*]}; run $0 as root (or apt-get install ${missing[*]})" >&2
    exit 1
fi
echo "install-bench-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
