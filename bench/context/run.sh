#!/bin/sh
# bench/context/run.sh: kiln alone on scenarios 2/3 (the 10,000-file ~200 MB
# context, `COPY ctx/ /ctx/` + one RUN), with kilnd's per-phase timings.
#
#   sh bench/context/run.sh [REPS]
#
# Starts a registry seeded with busybox (or uses KILN_TEST_REGISTRY), a
# release kilnd (KILN_LOG=info,kiln_timing=debug by default: the phase lines
# "local source ..." and "copy ..." carry elapsed milliseconds), primes the
# build, then times REPS no-op rebuilds and REPS one-file-change rebuilds.
# Knobs: QUICK=1 (1,000 files / ~20 MB), BENCH_KILN_OUTPUT (default
# type=image,name=bench/big,compression=uncompressed; "none" = no output),
# BENCH_KILN_BIN_DIR (default target/release), BENCH_KEEP=1.
set -eu
cd "$(dirname "$0")/../.."
REPO=$(pwd)
. scripts/local-kilnd.sh
REPS=${1:-3}
BIN=${BENCH_KILN_BIN_DIR:-$REPO/target/release}
TMP=$(mktemp -d /tmp/kiln-ctxbench-XXXXXX)
cleanup() {
  [ -n "${KPID:-}" ] && kill "$KPID" 2>/dev/null && wait "$KPID" 2>/dev/null || true
  [ -n "${OWNREG:-}" ] && sh scripts/registry.sh stop "$TMP/reg" >/dev/null 2>&1 || true
  unmount_under "$TMP"
  [ -n "${BENCH_KEEP:-}" ] || rm -rf "$TMP"
}
trap cleanup EXIT INT TERM

use_test_registry "$TMP/reg"

# the same generator as bench/bench.py (10,000 files in 100 dirs, ~200 MB)
python3 - "$TMP/in" "${QUICK:-}" <<'PY'
import os, random, sys
d, q = sys.argv[1], sys.argv[2]
rnd = random.Random(7)
nfiles, total = (1000, 20 << 20) if q else (10000, 200 << 20)
per = total // nfiles
chunk = os.urandom(per * 64)
for i in range(nfiles):
    p = f"{d}/ctx/d{i % 100:02d}/f{i:05d}.bin"
    os.makedirs(os.path.dirname(p), exist_ok=True)
    off = rnd.randrange(0, len(chunk) - per)
    with open(p, "wb") as f:
        f.write(i.to_bytes(4, "little") + chunk[off:off + per - 4])
with open(f"{d}/Dockerfile", "w") as f:
    f.write("FROM busybox\nCOPY ctx/ /ctx/\nRUN find /ctx -type f | wc -l > /count && du -sk /ctx > /size\n")
PY

kilnd_toml "$TMP/root" "$TMP/kilnd.sock" "$REG" > "$TMP/kilnd.toml"
KILN_LOG=${KILN_LOG:-info,kiln_timing=debug} "$BIN/kilnd" --config "$TMP/kilnd.toml" >> "$TMP/kilnd.log" 2>&1 &
KPID=$!
wait_for_socket "$TMP/kilnd.sock"

OUT=${BENCH_KILN_OUTPUT:-type=image,name=bench/big,compression=uncompressed}
build() {
  if [ "$OUT" = none ]; then set --; else set -- --output "$OUT"; fi
  "$BIN/kiln" --addr "unix://$TMP/kilnd.sock" build --progress quiet --frontend dockerfile.v0 \
    --local "context=$TMP/in" --local "dockerfile=$TMP/in" "$@"
}
now() { python3 -c 'import time; print(time.monotonic())'; }
timed() {
  t0=$(now); build; t1=$(now); mark end
  python3 -c "print(f'{$t1 - $t0:.2f}')"
}
mark() { echo "$(date -u +%Y-%m-%dT%H:%M:%S.%6NZ) === $1" >> "$TMP/kilnd.log"; }

echo "output: $OUT; $(find "$TMP/in/ctx" -type f | wc -l) files, $(du -sm "$TMP/in/ctx" | cut -f1) MB"
mark prime
echo "prime (cold): $(timed) s"
for r in $(seq 1 "$REPS"); do
  mark "noop $r"
  echo "no-op rebuild $r: $(timed) s"
done
for r in $(seq 1 "$REPS"); do
  printf 'change %s %s\n' "$r" "$(date +%s%N)" >> "$TMP/in/ctx/d00/f00000.bin"
  mark "one-file $r"
  echo "one-file-change rebuild $r: $(timed) s"
done
echo "--- kilnd phase timings (kiln_timing)"
sed 's/\x1b\[[0-9;]*m//g' "$TMP/kilnd.log" | grep -E '===|kiln_timing' | cut -c12-300 | tail -n 80
