#!/bin/sh
# bench/rootless/run.sh [REPS]: rootless kilnd against root kilnd (issue 21), see
# bench/rootless/bench.py. Needs root (it makes the test user and switches to it).
set -eu
cd "$(dirname "$0")/../.."
sh scripts/install-deps.sh
sh scripts/rootless-user.sh >/dev/null
cargo build --release -p kiln -p kilnd
exec python3 bench/rootless/bench.py "$@"
