#!/usr/bin/env bash
# Cargo's runner for test binaries under qemu-user (scripts/cross.sh test):
#   scripts/emulated-test.sh QEMU-COMMAND... TEST-BINARY [ARGS...]
#
# qemu-user can deadlock a child forked from a multi-threaded program before
# the child execs, and a test waiting on such a child waits forever. The test
# harness retries the spawns it makes itself (tests/util, spawn_past_exec),
# but a hang anywhere would otherwise hold `make test-cross` until CI's own
# limit kills everything with no word about where. So each test binary gets
# EMULATED_TEST_TIMEOUT seconds (default 900; the slowest binary takes about
# 140 s under qemu on a 2-core machine); one that runs out is killed, with
# every process it started (they share its process group), named, and run
# once more. A second timeout fails the run. The native `make test` runs the
# same tests with no such allowance, so a real hang still fails there.
set -uo pipefail

limit=${EMULATED_TEST_TIMEOUT:-900}
binary=
for arg in "$@"; do
    case "$arg" in
        */deps/*) binary=$(basename "$arg"); break ;;
    esac
done

for attempt in 1 2; do
    timeout -k 10 "$limit" "$@"
    rc=$?
    # 124: timed out; 137: killed after the grace period.
    [[ $rc -ne 124 && $rc -ne 137 ]] && exit $rc
    echo "emulated-test: ${binary:-test binary} still running after $limit s under the emulator (attempt $attempt of 2)" >&2
done
exit 124
