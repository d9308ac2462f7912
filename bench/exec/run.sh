#!/bin/sh
# bench/exec/run.sh: per-step overhead of `RUN true` on each exec backend
# (runc run directly, and containerd tasks through the runc shim).
#
#   sh bench/exec/run.sh [REPS]
#
# For each backend it starts a release kilnd (BENCH_KILN_BIN_DIR, default
# target/release) on a registry seeded with busybox (or KILN_TEST_REGISTRY)
# and, for containerd, a private containerd (scripts/containerd.sh). Per rep it
# builds cold (a fresh nonce in every step) a chain of 20 `RUN true` steps and
# a single-step build, and reports:
#   step median  the median of the 20 steps' own durations (started..completed
#                in the progress stream, `kiln --progress rawjson`)
#   per step     (wall(20 steps) - wall(1 step)) / 19
# Knobs: BENCH_BACKENDS (default "runc containerd"), BENCH_KEEP=1.
set -eu
cd "$(dirname "$0")/../.."
REPO=$(pwd)
. scripts/local-kilnd.sh
REPS=${1:-3}
BIN=${BENCH_KILN_BIN_DIR:-$REPO/target/release}
TMP=$(mktemp -d /tmp/kiln-execbench-XXXXXX)
STEPS=20
cleanup() {
  [ -n "${KPID:-}" ] && kill "$KPID" 2>/dev/null && wait "$KPID" 2>/dev/null || true
  [ -n "${OWNREG:-}" ] && sh scripts/registry.sh stop "$TMP/reg" >/dev/null 2>&1 || true
  sh scripts/containerd.sh stop "$TMP/containerd" >/dev/null 2>&1 || true
  unmount_under "$TMP"
  [ -n "${BENCH_KEEP:-}" ] || rm -rf "$TMP"
}
trap cleanup EXIT INT TERM

use_test_registry "$TMP/reg"

now() { python3 -c 'import time; print(time.monotonic())'; }

# build NAME N: a cold chain of N `RUN true` steps; prints the wall time and
# leaves the rawjson progress in $TMP/NAME.json
build() {
  d="$TMP/ctx-$1"
  mkdir -p "$d"
  nonce=$(python3 -c 'import uuid; print(uuid.uuid4().hex[:12])')
  {
    echo "FROM busybox"
    for k in $(seq 1 "$2"); do echo "RUN true #$nonce-$k"; done
  } > "$d/Dockerfile"
  t0=$(now)
  "$BIN/kiln" --addr "unix://$TMP/kilnd.sock" build --progress rawjson --frontend dockerfile.v0 \
    --local "context=$d" --local "dockerfile=$d" > "$TMP/$1.json" 2>&1
  t1=$(now)
  python3 -c "print(f'{$t1 - $t0:.4f}')"
}

step_median() {
  python3 - "$1" <<'PY'
import json, sys, statistics
from datetime import datetime
def ts(s):
    s = s.rstrip("Z")
    base, _, frac = s.partition(".")
    return datetime.fromisoformat(base).timestamp() + float("0." + (frac or "0"))
spans = {}
for line in open(sys.argv[1]):
    line = line.strip()
    if not line.startswith("{"):
        continue
    for v in json.loads(line).get("vertexes", []):
        if "RUN true" in v.get("name", "") and v.get("started") and v.get("completed"):
            spans[v["digest"]] = ts(v["completed"]) - ts(v["started"])
print(f"{statistics.median(spans.values()):.4f} {len(spans)}")
PY
}

echo "| backend | rep | wall 1 step (s) | wall $STEPS steps (s) | per step (ms) | step median (ms, n) |"
echo "|---|---|---|---|---|---|"
for backend in ${BENCH_BACKENDS:-runc containerd}; do
  kilnd_toml "$TMP/root-$backend" "$TMP/kilnd.sock" "$REG" > "$TMP/kilnd.toml"
  if [ "$backend" = containerd ]; then
    sock=$(sh scripts/containerd.sh start "$TMP/containerd")
    printf '[worker.containerd]\nenabled = true\naddress = "%s"\n' "$sock" >> "$TMP/kilnd.toml"
  fi
  rm -f "$TMP/kilnd.sock"
  "$BIN/kilnd" --config "$TMP/kilnd.toml" > "$TMP/kilnd-$backend.log" 2>&1 &
  KPID=$!
  wait_for_socket "$TMP/kilnd.sock"
  build warm 1 > /dev/null  # pulls and unpacks busybox once
  for rep in $(seq 1 "$REPS"); do
    w1=$(build one 1)
    wn=$(build chain "$STEPS")
    set -- $(step_median "$TMP/chain.json")
    python3 -c "print(f'| $backend | $rep | {$w1:.3f} | {$wn:.3f} | {($wn - $w1) / ($STEPS - 1) * 1000:.1f} | {$1 * 1000:.1f} ($2) |')"
  done
  kill "$KPID" 2>/dev/null && wait "$KPID" 2>/dev/null || true
  KPID=
  [ "$backend" = containerd ] && sh scripts/containerd.sh stop "$TMP/containerd"
done
