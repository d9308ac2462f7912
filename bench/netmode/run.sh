#!/bin/sh
# bench/netmode/run.sh [STEPS] [ROUNDS]: the cost of a step's own network.
#
# Builds `FROM busybox` + STEPS (default 20) `RUN true` steps with --no-cache,
# ROUNDS (default 5) times, on one kilnd per network mode (host, none, bridge),
# and prints the median build time and the time per step, plus the worker's own
# figure for the bridge network setup (kiln_timing). Needs a registry with
# busybox: KILN_TEST_REGISTRY=HOST:PORT (scripts/registry.sh + seed-busybox.sh).
#
# Uses ./target/release binaries when present, else ./target/debug.
set -eu
cd "$(dirname "$0")/../.."
. scripts/local-kilnd.sh
steps=${1:-20}
rounds=${2:-5}
reg=${KILN_TEST_REGISTRY:?set KILN_TEST_REGISTRY to a registry seeded with busybox}
bin=target/release
[ -x "$bin/kilnd" ] && [ -x "$bin/kiln" ] || bin=target/debug
work=$(mktemp -d /tmp/kiln-bench-netmode.XXXXXX)
pid=""
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  sleep 0.5
  unmount_under "$work"
  rm -rf "$work"
}
trap cleanup EXIT INT TERM
mkdir -p "$work/ctx"
{
  echo "FROM busybox"
  i=0
  while [ $i -lt "$steps" ]; do i=$((i + 1)); echo "RUN true $i"; done
} > "$work/ctx/Dockerfile"
registry_mirror_toml "$reg" > "$work/kilnd.toml"
echo "| mode | median build (ms) | per RUN step (ms) |"
echo "|---|---|---|"
for mode in host none bridge; do
  "$bin/kilnd" --config "$work/kilnd.toml" --root "$work/root-$mode" --addr "unix://$work/$mode.sock" \
    --network-mode "$mode" --log info,kiln_timing=debug 2> "$work/$mode.log" &
  pid=$!
  while [ ! -S "$work/$mode.sock" ]; do sleep 0.1; done
  # warm: pull the base once
  "$bin/kiln" --addr "unix://$work/$mode.sock" build --no-cache "$work/ctx" >/dev/null 2>&1
  times=""
  r=0
  while [ $r -lt "$rounds" ]; do
    r=$((r + 1))
    t0=$(date +%s%N)
    "$bin/kiln" --addr "unix://$work/$mode.sock" build --no-cache "$work/ctx" >/dev/null 2>&1
    t1=$(date +%s%N)
    times="$times $(((t1 - t0) / 1000000))"
  done
  med=$(echo $times | tr ' ' '\n' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
  echo "| $mode | $med | $(awk "BEGIN {printf \"%.1f\", $med / $steps}") |"
  if [ "$mode" = bridge ]; then
    grep -o 'network [0-9]* us (waited [0-9]* us)' "$work/$mode.log" | awk '{n+=$2; w+=$5; c++} END {if (c) printf "\nbridge network setup: %.1f ms per step, of which the step waited %.1f ms (the rest overlaps the mounts)\n", n/c/1000, w/c/1000}' >&2
  fi
  kill "$pid"; wait "$pid" 2>/dev/null || true
  pid=""
done
