#!/bin/sh
# Runs every test: unit tests, then integration tests with a real registry
# (started here, seeded with busybox) and the real kilnd/kiln binaries.
set -eu
cd "$(dirname "$0")/.."
work=$(mktemp -d /tmp/kiln-test.XXXXXX)
cleanup() { sh scripts/registry.sh stop "$work/registry"; sh scripts/containerd.sh stop "$work/containerd"; rm -rf "$work"; }
trap cleanup EXIT INT TERM
reg=$(sh scripts/registry.sh start "$work/registry")
sh scripts/seed-busybox.sh "$reg" >/dev/null
export KILN_TEST_REGISTRY="$reg"
ctrd=$(sh scripts/containerd.sh start "$work/containerd")
export KILN_TEST_CONTAINERD="$ctrd"
export KILN_BIN_DIR="$(pwd)/target/debug"
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast --test-threads 2
else
  cargo test --workspace --no-fail-fast -- --test-threads 2
fi
