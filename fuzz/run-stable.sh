#!/bin/sh
# Stable-toolchain fuzzing without libFuzzer (fuzz/README.md):
#   fuzz/run-stable.sh [--target NAME|all] [--seconds N] [--seed S] ...
#   fuzz/run-stable.sh --target NAME --reproduce FILE
#   fuzz/run-stable.sh SECONDS [SEED]     (the dockerfile target)
# Builds in the workspace's target dir with the workspace's Cargo.lock, so the
# dependencies the workspace build compiled are reused. PROFILE=release for
# long runs (a separate, slower build).
set -eu
root="$(cd "$(dirname "$0")/.." && pwd)"
cp "$root/Cargo.lock" "$root/fuzz/Cargo.lock"
profile="${PROFILE:-debug}"
flag=""
[ "$profile" = release ] && flag="--release"
CARGO_TARGET_DIR="$root/target" cargo build -q $flag --manifest-path "$root/fuzz/Cargo.toml" --bin stable_fuzz
exec "$root/target/$profile/stable_fuzz" "$@"
