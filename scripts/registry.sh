#!/bin/sh
# registry.sh start DIR   start Debian's docker-registry on a free loopback port;
#                         prints HOST:PORT and writes it to DIR/addr
# registry.sh stop DIR    stop it
set -eu
cmd=$1; dir=$2
case "$cmd" in
start)
  mkdir -p "$dir/data"
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  cat > "$dir/config.yml" <<YML
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $dir/data
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
YML
  /usr/bin/docker-registry serve "$dir/config.yml" > "$dir/registry.log" 2>&1 &
  echo $! > "$dir/pid"
  for i in $(seq 1 100); do
    if curl -fsS "http://127.0.0.1:$port/v2/" >/dev/null 2>&1; then
      echo "127.0.0.1:$port" > "$dir/addr"
      echo "127.0.0.1:$port"
      exit 0
    fi
    sleep 0.1
  done
  echo "registry did not start; log:" >&2
  cat "$dir/registry.log" >&2
  exit 1
  ;;
stop)
  [ -f "$dir/pid" ] && kill "$(cat "$dir/pid")" 2>/dev/null || true
  ;;
*) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
