#!/bin/sh
# Stable-toolchain fuzzing of kiln_dockerfile::parse + expansion, without
# libFuzzer: `fuzz/run-stable.sh [SECONDS]` (default 600). Not run by CI.
# With a nightly toolchain and cargo-fuzz, prefer:
#   cd fuzz && cargo +nightly fuzz run parse_and_expand -- -max_total_time=600
set -eu
cd "$(dirname "$0")"
secs="${1:-600}"
cargo build --release --bin stable_fuzz
exec ./target/release/stable_fuzz "$secs" "${SEED:-$(date +%s)}"
