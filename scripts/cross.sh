#!/usr/bin/env bash
# Builds or tests edge-replicator for other targets (Raspberry Pi):
#   scripts/cross.sh build TARGET...   release build, target/TARGET/release/edge-replicator
#   scripts/cross.sh test TARGET...    the test suite, run under qemu-user
#   scripts/cross.sh runner TARGET     print the qemu command line for TARGET
#
# With Docker and cross-rs (`cargo install cross`) available and working, the
# build uses `cross` and cross/Cross.toml. Otherwise (these machines have no
# Docker engine) it uses Debian's Rust compiler and gcc cross linkers, which
# scripts/cross-setup.sh installs, with rustup's cargo: see .cargo/config.toml
# for the linkers and the qemu runners. The host's own target builds natively.
#
# Tests: every test binary runs under qemu-user through the cargo runner. The
# integration tests also start the agent binary, which is an ARM binary here:
# with no binfmt_misc the kernel cannot exec it, so EDGE_REPLICATOR_TEST_RUNNER
# names the same qemu command line for the test harness to put in front of it.
# Programs the tests start that are built for the host (VictoriaMetrics,
# influxd, python) run natively: qemu-user passes their exec to the kernel.
# CROSS_TESTS=unit runs only the library's unit and property tests (quick);
# CROSS_TESTS=board runs them with the integration tests whose outcome can
# depend on the target (BOARD_TESTS below: the memory-mapped queue and its
# on-disk format, crash safety, the WAL decoder, TLS with ring's assembly, the
# CLI, one end-to-end run); the default, all, runs every test.
#
# Each test binary runs through scripts/emulated-test.sh, which gives it a
# deadline under the emulator and one more run if it hangs there.
set -euo pipefail

cd "$(dirname "$0")/.."
cargo=${CARGO:-cargo}
host=$(rustc -vV | sed -n 's/^host: //p')

log() { printf 'cross: %s\n' "$*" >&2; }

BOARD_TESTS=(cli crash e2e_victoria source_wal storage tls)

have_cross() {
    command -v cross >/dev/null 2>&1 && command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1
}

# The qemu command line of .cargo/config.toml's runner for $1, one line.
runner() {
    local section=$1
    awk -v s="[target.$section]" '
        index($0, s) == 1 { on = 1; next }
        /^\[/ { on = 0 }
        on && /^runner *=/ { sub(/^runner *= *\[/, ""); sub(/\].*$/, ""); gsub(/"/, ""); gsub(/, */, " "); print; exit }
    ' .cargo/config.toml
}

debian_toolchain() {
    case "$1" in
        aarch64-unknown-linux-gnu | armv7-unknown-linux-gnueabihf) ;;
        *) log "$1: Debian has no standard library for it; build it with cross on a Docker host"; exit 1 ;;
    esac
    ./scripts/cross-setup.sh
    export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc
}

build() {
    local t=$1
    if [[ "$t" == "$host" ]]; then
        "$cargo" build --release --locked
    elif have_cross; then
        log "$t: building with cross (Docker)"
        CROSS_CONFIG=cross/Cross.toml cross build --release --locked --target "$t"
    else
        (
            debian_toolchain "$t"
            "$cargo" build --release --locked --target "$t"
        )
    fi
    local bin=target/$t/release/edge-replicator
    [[ "$t" == "$host" ]] && bin=target/release/edge-replicator
    log "$t: $bin, $(stat -c %s "$bin") bytes"
}

test_target() {
    local t=$1 scope=(--all-targets)
    case "${CROSS_TESTS:-all}" in
        all) ;;
        unit) scope=(--lib --bins) ;;
        board)
            scope=(--lib --bins)
            for b in "${BOARD_TESTS[@]}"; do scope+=(--test "$b"); done
            ;;
        *) log "CROSS_TESTS=${CROSS_TESTS}: use all, board or unit"; exit 2 ;;
    esac
    if [[ "$t" == "$host" ]]; then
        "$cargo" test --locked "${scope[@]}"
        return
    fi
    local r
    r="$(runner "$t")"
    [[ -n "$r" ]] || { log "no runner for $t in .cargo/config.toml"; exit 1; }
    if have_cross; then
        # Inside cross's images the emulator is their /linux-runner script.
        log "$t: testing with cross (Docker)"
        CROSS_CONFIG=cross/Cross.toml EDGE_REPLICATOR_TEST_RUNNER="/linux-runner ${t%%-*}" \
            cross test --locked --target "$t" "${scope[@]}"
        return
    fi
    local start=$SECONDS
    (
        debian_toolchain "$t"
        export EDGE_REPLICATOR_TEST_RUNNER="$r"
        # Cargo's runner for this target, with a deadline per test binary.
        local var
        var="CARGO_TARGET_$(tr 'a-z-' 'A-Z_' <<<"$t")_RUNNER"
        export "$var=$PWD/scripts/emulated-test.sh $r"
        "$cargo" test --locked --target "$t" "${scope[@]}" --no-run
        local built=$SECONDS rc=0
        "$cargo" test --locked --no-fail-fast --target "$t" "${scope[@]}" || rc=$?
        log "$t: tests (${CROSS_TESTS:-all}) ran under qemu in $((SECONDS - built)) s (build $((built - start)) s)"
        exit $rc
    )
}

# Debian architecture names are accepted too.
triple() {
    case "$1" in
        amd64) echo x86_64-unknown-linux-gnu ;;
        arm64) echo aarch64-unknown-linux-gnu ;;
        armhf) echo armv7-unknown-linux-gnueabihf ;;
        *) echo "$1" ;;
    esac
}

cmd=${1:-}
shift || true
targets=()
for t in "$@"; do targets+=("$(triple "$t")"); done
set -- "${targets[@]}"
[[ $# -gt 0 ]] || { echo "usage: $0 build|test|runner TARGET..." >&2; exit 2; }
case "$cmd" in
    build) for t in "$@"; do build "$t"; done ;;
    test) for t in "$@"; do test_target "$t"; done ;;
    runner) runner "$1" ;;
    *) echo "usage: $0 build|test|runner TARGET..." >&2; exit 2 ;;
esac
