#!/bin/sh
# bench/run.sh: `make bench` — installs what is missing, builds kiln in release
# mode, then runs bench/bench.py (which starts its own registry, kilnd, dockerd
# under a temp dir). QUICK=1: one repetition, smaller inputs.
# Extra knobs: BENCH_REPS=N, BENCH_PEERS=docker,buildah,buildctl,
# BENCH_SCENARIOS=1,2,4,5,6,7,9, BUILDCTL=/path/buildctl BUILDKIT_HOST=unix://...
# [BUILDKITD_PID=pid], BENCH_KEEP=1 (keep the temp dir).
set -eu
cd "$(dirname "$0")/.."
sh scripts/install-deps.sh
sh bench/install.sh
${CARGO:-cargo} build --release -p kiln -p kilnd
exec python3 bench/bench.py "$@"
