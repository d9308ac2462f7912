#!/bin/sh
# containerd.sh start DIR   start a private containerd (Debian's package) with its root,
#                           state and socket under DIR; prints the socket path and writes
#                           it to DIR/address
# containerd.sh stop DIR    stop it
# It never touches any other containerd on the machine: everything it uses is under DIR.
set -eu
cmd=$1; dir=$2
case "$cmd" in
start)
  mkdir -p "$dir/root" "$dir/state"
  dir=$(cd "$dir" && pwd)
  sock="$dir/state/containerd.sock"
  cat > "$dir/config.toml" <<TOML
version = 2
root = "$dir/root"
state = "$dir/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$sock"
[ttrpc]
  address = "$sock.ttrpc"
[debug]
  address = "$dir/state/debug.sock"
  level = "warn"
[metrics]
  address = ""
TOML
  containerd --config "$dir/config.toml" > "$dir/containerd.log" 2>&1 &
  echo $! > "$dir/pid"
  for i in $(seq 1 100); do
    if [ -S "$sock" ] && ctr -a "$sock" version >/dev/null 2>&1; then
      echo "$sock" > "$dir/address"
      echo "$sock"
      exit 0
    fi
    sleep 0.1
  done
  echo "containerd did not start; log:" >&2
  cat "$dir/containerd.log" >&2
  exit 1
  ;;
stop)
  if [ -f "$dir/pid" ]; then
    pid=$(cat "$dir/pid")
    kill "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    rm -f "$dir/pid"
  fi
  ;;
*) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
