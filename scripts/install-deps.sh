#!/bin/sh
# Installs what building and testing kiln needs, when missing (Debian).
set -eu
need=""
have() { command -v "$1" >/dev/null 2>&1; }
have protoc || need="$need protobuf-compiler"
[ -e /usr/include/google/protobuf/timestamp.proto ] || need="$need libprotobuf-dev"
have runc || need="$need runc"
# bridge network mode: veth pairs on kiln's bridge, NAT and host isolation rules
have ip || need="$need iproute2"
have iptables || need="$need iptables"
have containerd || need="$need containerd"
[ -x /usr/bin/docker-registry ] || need="$need docker-registry"
[ -x /bin/busybox ] || need="$need busybox-static"
have skopeo || need="$need skopeo"
have umoci || need="$need umoci"
have curl || need="$need curl"
have htpasswd || need="$need apache2-utils"
have zstd || need="$need zstd"
have openssl || need="$need openssl"
have ssh-agent || need="$need openssh-client"
have git || need="$need git"
have python3 || need="$need python3"
# the observability tests: a real Prometheus scrapes kilnd, a headless browser opens the dashboard
have prometheus || need="$need prometheus"
have chromium || need="$need chromium"
if [ -n "$need" ]; then
  echo "installing:$need"
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $need >/dev/null
fi
