#!/usr/bin/env bash
# Runs every fuzz target under fuzz/ for SECONDS each (default 60), or, with
# FUZZ_RUNS=N, for N executions each however long that takes, on the
# stable toolchain (RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its -Z flags),
# starting from the seeds in fuzz/seeds/<target> and keeping what it learns
# in fuzz/corpus/<target>. Stops at the first crash; libFuzzer then names
# the input it saved under fuzz/artifacts/<target>/.
set -euo pipefail

seconds="${1:-60}"
runs_wanted="${FUZZ_RUNS:-}"
cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"
export RUSTC_BOOTSTRAP=1
if [[ -n "$runs_wanted" ]]; then
    limit=(-runs="$runs_wanted")
else
    limit=(-max_total_time="$seconds")
fi

for target in $(cargo fuzz list); do
    mkdir -p "corpus/$target" "seeds/$target"
    log="$(mktemp)"
    started=$SECONDS
    if ! cargo fuzz run "$target" "corpus/$target" "seeds/$target" -- \
        "${limit[@]}" -rss_limit_mb=1024 -print_final_stats=1 2>"$log"; then
        tail -n 60 "$log" >&2
        echo "fuzz: $target FAILED" >&2
        rm -f "$log"
        exit 1
    fi
    runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")"
    echo "fuzz: $target: ${runs:-?} executions in $((SECONDS - started))s, no failure"
    rm -f "$log"
done
