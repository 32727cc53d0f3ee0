#!/usr/bin/env bash
# Installs what the Raspberry Pi builds need on a Debian 12 host without Docker:
# Debian's Rust compiler (rustc-web) with the standard library for the host,
# arm64 and armhf at exactly the same version, the gcc cross linkers, and
# qemu-user to run ARM test binaries.
#
# rustup cannot fetch other targets on these machines, so the target std comes
# from Debian's libstd-rust-web-dev for arm64/armhf, unpacked into
# /usr/lib/rustlib/<triple>/. The system's dpkg architectures are left alone:
# the foreign packages are fetched with apt using a private list directory.
#
# The version is chosen here, not left to apt's default candidate: the newest
# rustc-web version whose libstd-rust-web-dev can be had for all three
# architectures (override with RUST_DEB_VERSION=...). Rustc refuses rlibs of
# another version (E0514), so after an upgrade of rustc-web this script
# notices the mismatch and unpacks the matching target std again.
#
# Idempotent and silent when everything is in place; needs root otherwise.
set -euo pipefail

targets=(aarch64-unknown-linux-gnu:arm64 armv7-unknown-linux-gnueabihf:armhf)
packages=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross gcc-arm-linux-gnueabihf libc6-dev-armhf-cross qemu-user)
stamp_name=.debian-version

log() { printf 'cross-setup: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

installed_version() { dpkg-query -W -f='${Status} ${Version}' "$1" 2>/dev/null | sed -n 's/^install ok installed //p'; }

# Fast path: nothing to do when the compiler, its host std and every target
# std carry the same version and the cross tools are installed.
up_to_date() {
    local v pkg t
    v="$(installed_version rustc-web)"
    [[ -n "$v" && "$(installed_version libstd-rust-web-dev)" == "$v" ]] || return 1
    for pkg in "${packages[@]}"; do
        [[ -n "$(installed_version "$pkg")" ]] || return 1
    done
    for t in "${targets[@]}"; do
        [[ "$(cat "/usr/lib/rustlib/${t%%:*}/$stamp_name" 2>/dev/null)" == "$v" ]] || return 1
    done
}

if up_to_date; then
    exit 0
fi
[[ "$(id -u)" -eq 0 ]] || die "the cross toolchain is missing or out of date; run $0 as root"
command -v curl >/dev/null || die "curl is needed"

export DEBIAN_FRONTEND=noninteractive DEBCONF_NOWARNINGS=yes
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

log "updating package lists"
apt-get update -qq >/dev/null

# apt options that view one foreign architecture through private lists,
# without touching the system's dpkg configuration or state.
apt_for() {
    local arch=$1
    mkdir -p "$work/lists-$arch/partial" "$work/cache-$arch/archives/partial"
    printf '%s\n' "-oAPT::Architecture=$arch" "-oAPT::Architectures=$arch" \
        "-oDir::State::Lists=$work/lists-$arch" "-oDir::State::Status=/dev/null" \
        "-oDir::Cache=$work/cache-$arch"
}
for t in "${targets[@]}"; do
    arch=${t#*:}
    mapfile -t opts < <(apt_for "$arch")
    # A mirror caught mid-sync fails one index; the others are still usable.
    apt-get "${opts[@]}" update -qq >/dev/null 2>"$work/update-$arch.err" || true
done

# Fetches libstd-rust-web-dev for $arch at version $v into $work/$arch.deb.
# First through apt (signature-checked index). If the mirror's index for that
# architecture is stale (seen: "File has unexpected size ... Mirror sync in
# progress?"), the file is taken from the archive pool beside the amd64 one,
# checked against the SHA256 the mirror's own index lists for it, and its
# control fields are checked before use.
fetch_std() {
    local arch=$1 v=$2 opts uri file sum expected
    mapfile -t opts < <(apt_for "$arch")
    rm -f "$work/$arch.deb"
    if (cd "$work" && apt-get "${opts[@]}" download -qq "libstd-rust-web-dev:$arch=$v" >/dev/null 2>&1); then
        mv "$work"/libstd-rust-web-dev_*_"$arch".deb "$work/$arch.deb"
    else
        uri="$(apt-get download --print-uris "libstd-rust-web-dev=$v" 2>/dev/null | head -n1 | cut -d"'" -f2)"
        [[ -n "$uri" ]] || return 1
        uri="${uri%_amd64.deb}_$arch.deb"
        file="$(basename "$uri" | sed 's/%2b/+/g; s/%7e/~/g')"
        curl -fsS -o "$work/$arch.deb" "$uri" || return 1
        expected="$(sha256_from_pool_index "$arch" "$uri" "$file")"
        sum="$(sha256sum "$work/$arch.deb" | cut -d' ' -f1)"
        if [[ -z "$expected" || "$sum" != "$expected" ]]; then
            log "$file: SHA256 does not match the archive index; not using it"
            return 1
        fi
        log "$arch: apt's index lacks $v; took $file from the archive pool (SHA256 checked)"
    fi
    [[ "$(dpkg-deb -f "$work/$arch.deb" Package Version Architecture | tr '\n' ' ')" \
        == "Package: libstd-rust-web-dev Version: $v Architecture: $arch " ]] || {
        log "$work/$arch.deb is not libstd-rust-web-dev $v for $arch"
        return 1
    }
}

# The SHA256 of pool file $3 as listed in the Packages index of the suite that
# serves URI $2 for $1 (read from the mirror even when it is older than the
# signed Release file, which is why apt refused it).
sha256_from_pool_index() {
    local arch=$1 uri=$2 file=$3 base suite sum
    base="${uri%%/pool/*}"
    for suite in bookworm-security bookworm-updates bookworm; do
        sum="$(curl -fsS "$base/dists/$suite/main/binary-$arch/Packages.xz" 2>/dev/null | xz -dc 2>/dev/null |
            awk -v f="$file" '/^Filename: /{n=$2; sub(".*/", "", n); hit=(n==f)} hit&&/^SHA256: /{print $2; exit}')" || true
        if [[ -n "$sum" ]]; then
            echo "$sum"
            return 0
        fi
    done
}

if [[ -n "${RUST_DEB_VERSION:-}" ]]; then
    candidates=("$RUST_DEB_VERSION")
else
    mapfile -t candidates < <(apt-cache madison rustc-web | awk -F'|' '{gsub(/ /, "", $2); print $2}' | sort -uVr)
fi
[[ ${#candidates[@]} -gt 0 ]] || die "no rustc-web in the package lists"

chosen=""
for v in "${candidates[@]}"; do
    ok=1
    for t in "${targets[@]}"; do
        fetch_std "${t#*:}" "$v" || { ok=0; break; }
    done
    if ((ok)); then
        chosen=$v
        break
    fi
    log "libstd-rust-web-dev $v is not available for every target; trying an older version"
done
[[ -n "$chosen" ]] || die "no rustc-web version has a standard library for both arm64 and armhf"

log "installing rustc-web $chosen, cross linkers and qemu-user"
apt-get install -y -qq --no-install-recommends --allow-downgrades \
    "rustc-web=$chosen" "libstd-rust-web-dev=$chosen" "${packages[@]}" >/dev/null

for t in "${targets[@]}"; do
    triple=${t%%:*} arch=${t#*:}
    # Remove rlibs of an older version first: rustc would find two std crates.
    rm -rf "/usr/lib/rustlib/$triple"
    dpkg-deb -x "$work/$arch.deb" "$work/root-$arch"
    [[ -d "$work/root-$arch/usr/lib/rustlib/$triple/lib" ]] || die "$arch package has no std for $triple"
    mkdir -p /usr/lib/rustlib
    cp -a "$work/root-$arch/usr/lib/rustlib/$triple" /usr/lib/rustlib/
    printf '%s\n' "$chosen" >"/usr/lib/rustlib/$triple/$stamp_name"
done
log "ready: $(/usr/bin/rustc --version) for ${targets[*]%%:*}"
