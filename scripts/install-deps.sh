#!/bin/sh
# Installs what building and testing kiln needs, when missing (Debian).
set -eu
need=""
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
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
# the remote conformance group fetches git over ssh from a loopback sshd
[ -x /usr/sbin/sshd ] || need="$need openssh-server"
have git || need="$need git"
have python3 || need="$need python3"
# the observability tests: a real Prometheus scrapes kilnd, a headless browser opens the dashboard
have prometheus || need="$need prometheus"
have chromium || need="$need chromium"
# multi-platform builds: RUN steps of other architectures through QEMU user-mode
# emulation (scripts/binfmt.sh registers its handlers with binfmt_misc)
have qemu-aarch64-static || need="$need qemu-user-static"
have update-binfmts || need="$need binfmt-support"
# rootless kilnd: rootlesskit makes the user namespace, newuidmap/newgidmap map the
# user's subordinate ids into it
have rootlesskit || need="$need rootlesskit"
have newuidmap || need="$need uidmap"
# the kilnd-rootless image's id mappers get file capabilities (scripts/images.sh)
have setcap || need="$need libcap2-bin"
# rootless snapshots where a kernel cannot mount overlayfs in a user namespace
have fuse-overlayfs || need="$need fuse-overlayfs"
# a rootless daemon's isolated network (rootlesskit --net=slirp4netns)
have slirp4netns || need="$need slirp4netns"
if [ -n "$need" ]; then
  echo "installing:$need"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $need >/dev/null
fi
# busybox-static of the seeded busybox index's second platform (arm64; amd64 on
# arm64 hosts), for scripts/seed-busybox.sh; kept in /var/cache/kiln
foreign=arm64
[ "$(dpkg --print-architecture)" = arm64 ] && foreign=amd64
if ! ls /var/cache/kiln/busybox-static_*_"$foreign".deb >/dev/null 2>&1; then
  echo "downloading busybox-static:$foreign"
  if ! dpkg --print-foreign-architectures | grep -qx "$foreign"; then
    $SUDO dpkg --add-architecture "$foreign"
  fi
  $SUDO apt-get update -qq
  $SUDO mkdir -p /var/cache/kiln
  (cd /var/cache/kiln && $SUDO apt-get download -qq -o APT::Sandbox::User=root "busybox-static:$foreign")
fi
