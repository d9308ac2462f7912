#!/bin/sh
# bench/install.sh: installs what the benchmark's peers need, when missing
# (Debian): docker.io (dockerd with BuildKit built in, containerd) and buildah.
# kiln's own needs are scripts/install-deps.sh's.
set -eu
need=""
have() { command -v "$1" >/dev/null 2>&1; }
have dockerd || need="$need docker.io"
have buildah || need="$need buildah"
have python3 || need="$need python3"
have gzip || need="$need gzip"
if [ -n "$need" ]; then
  echo "bench: installing:$need"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  # policy-rc.d 101: never start the distribution's own docker service; the
  # bench starts its own dockerd on its own socket and data root.
  pol=/usr/sbin/policy-rc.d
  made=""
  if [ ! -e "$pol" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$pol" >/dev/null && $SUDO chmod +x "$pol" && made=1
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $need >/dev/null
  [ -z "$made" ] || $SUDO rm -f "$pol"
fi
