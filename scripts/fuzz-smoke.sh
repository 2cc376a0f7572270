#!/usr/bin/env bash
# Fuzz smoke test: runs each cargo-fuzz target in fuzz/ briefly (FUZZ_SECONDS, default 20).
# Only stable Rust is installed: cargo-fuzz's nightly flags (-Zsanitizer=address) are
# allowed through RUSTC_BOOTSTRAP=1. Exits non-zero when a target finds a crash; the
# reproducer is left in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1
seconds="${FUZZ_SECONDS:-20}"
for target in $(cargo fuzz list --fuzz-dir fuzz); do
    mkdir -p "fuzz/corpus/$target"
    echo "fuzzing $target for ${seconds}s"
    cargo fuzz run --fuzz-dir fuzz "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
        -max_total_time="$seconds" -max_len=4096
done
