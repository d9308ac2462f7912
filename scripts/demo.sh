#!/bin/sh
# demo.sh DIR [stop]: registry + all-in-one kilnd, then builds examples/hello
# to DIR/hello.oci.tar and DIR/hello-rootfs/.
set -eu
cd "$(dirname "$0")/.."
. scripts/local-kilnd.sh
dir=$1
if [ "${2:-}" = stop ]; then
  [ -f "$dir/kilnd.pid" ] && kill "$(cat "$dir/kilnd.pid")" 2>/dev/null || true
  sh scripts/registry.sh stop "$dir/registry"
  exit 0
fi
mkdir -p "$dir"
if [ -f "$dir/kilnd.pid" ] && kill -0 "$(cat "$dir/kilnd.pid")" 2>/dev/null; then
  kill "$(cat "$dir/kilnd.pid")"; sleep 1
fi
sh scripts/registry.sh stop "$dir/registry"
reg=$(sh scripts/registry.sh start "$dir/registry")
sh scripts/seed-busybox.sh "$reg"
sock="$dir/kilnd.sock"
kilnd_toml "$dir/root" "$sock" "$reg" > "$dir/kilnd.toml"
./target/debug/kilnd --config "$dir/kilnd.toml" > "$dir/kilnd.log" 2>&1 &
echo $! > "$dir/kilnd.pid"
wait_for_socket "$sock"
export KILN_HOST="unix://$sock"
kiln=./target/debug/kiln
echo "== kiln build (OCI image tarball + local rootfs) =="
start=$(date +%s.%N)
$kiln build --progress plain --frontend dockerfile.v0 \
  --local context=examples/hello --local dockerfile=examples/hello \
  --output type=oci,dest="$dir/hello.oci.tar",name=kiln.local/hello:latest \
  --output type=local,dest="$dir/hello-rootfs"
end=$(date +%s.%N)
echo "cold build: $(python3 -c "print(round($end-$start,2))")s"
start=$(date +%s.%N)
$kiln build --progress plain examples/hello
end=$(date +%s.%N)
echo "warm build: $(python3 -c "print(round($end-$start,2))")s"
echo "== result =="
skopeo inspect "oci-archive:$dir/hello.oci.tar" | head -20
echo "rootfs: $dir/hello-rootfs"; cat "$dir/hello-rootfs/app/all.txt"
echo "kilnd is still running (log: $dir/kilnd.log); stop it with: make demo-stop"
