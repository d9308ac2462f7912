#!/bin/sh
# Runs every test: unit tests, then integration tests with a real registry
# (started here, seeded with busybox) and the real kilnd/kiln binaries.
set -eu
cd "$(dirname "$0")/.."
work=$(mktemp -d /tmp/kiln-test.XXXXXX)
cleanup() { sh scripts/registry.sh stop "$work/registry"; sh scripts/containerd.sh stop "$work/containerd"; rm -rf "$work"; }
trap cleanup EXIT INT TERM
# multi-platform tests: the kernel runs foreign binaries through QEMU (fails loudly if it cannot)
sh scripts/binfmt.sh
reg=$(sh scripts/registry.sh start "$work/registry")
sh scripts/seed-busybox.sh "$reg" >/dev/null
export KILN_TEST_REGISTRY="$reg"
# deploy/: the Kubernetes manifests build and validate offline, certs.sh works
sh scripts/check-deploy.sh
ctrd=$(sh scripts/containerd.sh start "$work/containerd")
export KILN_TEST_CONTAINERD="$ctrd"
export KILN_BIN_DIR="$(pwd)/target/debug"
# the farm's container tests run kiln's own image on a private Docker network
if docker info >/dev/null 2>&1; then
  export KILN_TEST_DOCKER=1
else
  echo "warning: no Docker engine answers; the farm's container tests are skipped" >&2
fi
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast --test-threads 2
else
  cargo test --workspace --no-fail-fast -- --test-threads 2
fi
# Fuzz every parser of untrusted input for a short while (fuzz/README.md):
# FUZZ_SECONDS per target (default 10; 0 skips), built in this target dir with
# this Cargo.lock so the workspace build's dependencies are reused.
fuzz_secs="${FUZZ_SECONDS:-10}"
if [ "$fuzz_secs" != 0 ]; then
  cp Cargo.lock fuzz/Cargo.lock
  CARGO_TARGET_DIR="$(pwd)/target" cargo build --manifest-path fuzz/Cargo.toml --bin stable_fuzz
  # a failure saves its input under fuzz/crashes/<target>/ and prints how to reproduce it
  target/debug/stable_fuzz --target all --seconds "$fuzz_secs" --seed "${FUZZ_SEED:-$(date +%s)}"
fi
