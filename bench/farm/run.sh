#!/bin/sh
# bench/farm/run.sh: the build farm (issue 16), on real processes and in simulation.
#
#   sh bench/farm/run.sh [REPS]
#
# 1. the 12-stage graph (each stage `sleep 2` and hashing 64 MiB) on farms of 1, 2
#    and 3 workers with 2 step slots each, cold every rep (`--no-cache`; every
#    RUN's run is checked in the progress), interleaved rep by rep: median
#    wall time and the speedup against one worker (target ≥ 0.8·N);
# 2. a 1 GiB snapshot moved between two workers (producer and consumer pinned
#    to them by LLB worker constraints) against the raw throughput of one TCP
#    stream on the same link (loopback), measured in the same run (target ≥ 0.7);
# 3. the real scheduler code over 1,000 simulated workers (fake executors; real
#    placement, keepalive and rescheduling, 1% of the workers lost halfway) with
#    10,000 and 100,000 steps queued: placements per second, p50/p99 decision
#    latency, memory of the queue (target ≥ 10,000/s, p99 < 5 ms, linear).
#
# The farm runs as release kilnd processes on loopback, driven by the test
# harness (kiln_integration_tests::farm); results go to stdout and
# bench/results/<date>-farm.md.
set -eu
cd "$(dirname "$0")/../.."
REPO=$(pwd)
. scripts/local-kilnd.sh
REPS=${1:-3}
TMP=$(mktemp -d /tmp/kiln-farmbench-XXXXXX)
cleanup() {
  [ -n "${OWNREG:-}" ] && sh scripts/registry.sh stop "$TMP/reg" >/dev/null 2>&1 || true
  unmount_under "$TMP"
  rm -rf "$TMP"
}
trap cleanup EXIT INT TERM

use_test_registry "$TMP/reg"
export KILN_TEST_REGISTRY="$REG"
cargo build --release -p kiln -p kilnd
OUT="bench/results/$(date +%Y-%m-%d)-farm.md"
{
  echo "# farm benchmark, $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $REPS reps"
  echo
  for t in twelve_stages one_gib; do
    BENCH_REPS=$REPS KILN_BIN_DIR="$REPO/target/release" \
      cargo nextest run -p kiln-integration-tests --test farm_bench \
      --run-ignored only --no-capture -E "test(/$t/)" 2>/dev/null | grep '^|' || true
    echo
  done
  echo '```'
  cargo test --release -p solver-scheduler --lib farm::tests::simulated -- --ignored --nocapture 2>/dev/null \
    | sed -n 's/^SIM //p'
  echo '```'
} | tee "$OUT"
