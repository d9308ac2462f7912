#!/bin/sh
# bench/export/run.sh [SIZE_MIB]: export throughput of a large layer.
#
# Generates a context with one SIZE_MIB file (default 1024: half random, half
# text), builds `FROM scratch / COPY big /` with kiln to an OCI tarball with
# gzip and with zstd, pushes it to a local registry, and times single-threaded
# `gzip -1` and `zstd` on the same data. Prints a markdown table with MB/s.
#
# Uses ./target/release binaries when present (cargo build --release -p kiln
# -p kilnd), else ./target/debug.
set -eu
cd "$(dirname "$0")/../.."
. scripts/local-kilnd.sh
size=${1:-1024}
bin=${BENCH_KILN_BIN_DIR:-target/release}
[ -x "$bin/kilnd" ] && [ -x "$bin/kiln" ] || bin=target/debug
command -v zstd >/dev/null || { apt-get update -qq && apt-get install -y -qq zstd >/dev/null; }
work=$(mktemp -d /tmp/kiln-bench-export.XXXXXX)
cleanup() {
  [ -f "$work/kilnd.pid" ] && kill "$(cat "$work/kilnd.pid")" 2>/dev/null || true
  sleep 0.5
  unmount_under "$work"
  sh scripts/registry.sh stop "$work/registry"
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

half=$((size / 2))
mkdir -p "$work/ctx"
head -c "${half}M" /dev/urandom > "$work/ctx/big"
# text: repeated source-like lines
python3 - "$work/ctx/big" "$half" <<'PY'
import sys, random
path, mib = sys.argv[1], int(sys.argv[2])
words = "fn let mut struct impl match return self Some None Ok Err while for in loop use pub mod".split()
random.seed(1)
line_pool = [" ".join(random.choice(words) for _ in range(random.randint(3, 12))) + ";\n" for _ in range(4096)]
block = "".join(line_pool).encode()
with open(path, "ab") as f:
    left = mib * 1024 * 1024
    while left > 0:
        n = min(left, len(block))
        f.write(block[:n]); left -= n
PY
printf 'FROM scratch\nCOPY big /big\n' > "$work/ctx/Dockerfile"
bytes=$(stat -c %s "$work/ctx/big")

reg=$(sh scripts/registry.sh start "$work/registry")
cat > "$work/kilnd.toml" <<TOML
[registry."$reg"]
http = true
TOML
"$bin/kilnd" --config "$work/kilnd.toml" --root "$work/root" --addr "unix://$work/kilnd.sock" > "$work/kilnd.log" 2>&1 &
echo $! > "$work/kilnd.pid"
wait_for_socket "$work/kilnd.sock"
export KILN_HOST="unix://$work/kilnd.sock"

now() { python3 -c 'import time; print(time.time())'; }
secs() { python3 -c "print(round($2 - $1, 2))"; }
mbps() { python3 -c "print(round($bytes / 1e6 / ($2 - $1), 1))"; }

# prime: the COPY step (context transfer) is not what is measured
"$bin/kiln" build --progress quiet --frontend dockerfile.v0 --local context="$work/ctx" --local dockerfile="$work/ctx"

row() { printf '| %s | %s s | %s MB/s |\n' "$1" "$2" "$3"; }
echo "| step ($((bytes / 1048576)) MiB layer, half random, half text) | time | throughput |"
echo "|---|---|---|"
for comp in gzip zstd; do
  t0=$(now)
  "$bin/kiln" build --progress quiet --frontend dockerfile.v0 --local context="$work/ctx" --local dockerfile="$work/ctx" \
    --output "type=oci,dest=$work/img-$comp.tar,compression=$comp,force-compression=true"
  t1=$(now)
  row "kiln export to OCI tarball, $comp ($(($(stat -c %s "$work/img-$comp.tar") / 1048576)) MiB)" "$(secs "$t0" "$t1")" "$(mbps "$t0" "$t1")"
  rm -f "$work/img-$comp.tar"
done
# zlib's level 6 (BuildKit's default level is Go's 6), for the size/speed trade-off
t0=$(now)
"$bin/kiln" build --progress quiet --frontend dockerfile.v0 --local context="$work/ctx" --local dockerfile="$work/ctx" \
  --output "type=oci,dest=$work/img-gzip6.tar,compression=gzip,compression-level=6,force-compression=true"
t1=$(now)
row "kiln export to OCI tarball, gzip level 6 ($(($(stat -c %s "$work/img-gzip6.tar") / 1048576)) MiB)" "$(secs "$t0" "$t1")" "$(mbps "$t0" "$t1")"
rm -f "$work/img-gzip6.tar"
t0=$(now)
"$bin/kiln" build --progress quiet --frontend dockerfile.v0 --local context="$work/ctx" --local dockerfile="$work/ctx" \
  --output "type=image,name=$reg/bench/export:1,push=true"
t1=$(now)
row "kiln export + push to local registry, gzip" "$(secs "$t0" "$t1")" "$(mbps "$t0" "$t1")"
t0=$(now); gzip -1 -c "$work/ctx/big" > /dev/null; t1=$(now)
row "gzip -1 (one core)" "$(secs "$t0" "$t1")" "$(mbps "$t0" "$t1")"
t0=$(now); zstd -q -T1 -3 -c "$work/ctx/big" > /dev/null; t1=$(now)
row "zstd -3 (one core)" "$(secs "$t0" "$t1")" "$(mbps "$t0" "$t1")"
echo
echo "cores: $(nproc); binaries: $bin"
