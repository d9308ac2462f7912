#!/bin/sh
# kiln's own images, built by kiln from deploy/images/Dockerfile: kilnd (with
# runc, for workers), kilnd-containerd (a worker running steps through a
# containerd of its own), kilnd-rootless (kilnd as an unprivileged user under
# rootlesskit) and kiln, on a base made from the Debian packages
# installed on this machine (nothing is pulled).
#   scripts/images.sh REGISTRY [TAG]
# pushes REGISTRY/kiln/NAME:TAG for each (TAG: the git commit) and, when a
# Docker engine answers, loads them as kiln/NAME:TAG. A registry on 127.0.0.1/localhost is spoken to over plain HTTP.
# KILN_BIN_DIR: where kilnd and kiln are (default target/release);
# KILN_ARGS: how kiln reaches a kilnd (default: one started here for the build).
set -eu
cd "$(dirname "$0")/.."
reg=$1
tag=${2:-$(git rev-parse --short HEAD 2>/dev/null || echo latest)}
bin=${KILN_BIN_DIR:-target/release}
work=$(mktemp -d /tmp/kiln-images.XXXXXX)
. scripts/local-kilnd.sh
cleanup() {
  [ -n "${kpid:-}" ] && kill "$kpid" 2>/dev/null && sleep 0.5
  unmount_under "$work"
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

ctx=$work/ctx
root=$ctx/debian
mkdir -p "$root/usr/bin" "$root/usr/sbin" "$root/usr/lib" "$root/usr/lib64" "$root/etc/ssl/certs" \
  "$root/tmp" "$root/var/lib/kiln" "$root/root" "$ctx/bin"
chmod 1777 "$root/tmp"
# merged /usr, as Debian has it
for d in bin sbin lib lib64; do ln -s "usr/$d" "$root/$d"; done
# each package's installed files (not its docs), at their real paths under $1
packages() {
  into=$1
  shift
  for pkg in "$@"; do
    dpkg -L "$pkg" | while read -r f; do
      case "$f" in /usr/share/doc/*|/usr/share/man/*|/usr/share/lintian/*|/usr/share/locale/*) continue ;; esac
      [ -d "$f" ] && [ ! -L "$f" ] && continue
      [ -e "$f" ] || [ -L "$f" ] || continue
      dir=$(realpath "$(dirname "$f")")
      mkdir -p "$into$dir"
      cp -a "$f" "$into$dir/"
    done
  done
}
packages "$root" libc6 libgcc-s1 libseccomp2 runc busybox-static
for applet in sh cat ls mkdir mount umount ps kill sleep env; do
  ln -sf busybox "$root/usr/bin/$applet"
done
cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"
for b in kilnd kiln; do
  cp "$bin/$b" "$ctx/bin/$b"
  strip --strip-debug "$ctx/bin/$b" 2>/dev/null || true
done
cp deploy/images/Dockerfile "$ctx/Dockerfile"
# the kilnd-containerd image: containerd's binaries and the entrypoint starting it
mkdir -p "$ctx/containerd/usr/bin"
for b in containerd containerd-shim-runc-v2 ctr; do
  cp "$(command -v "$b")" "$ctx/containerd/usr/bin/$b"
done
cp deploy/images/kilnd-containerd "$ctx/containerd/usr/bin/kilnd-containerd"
# the kilnd-rootless image: rootlesskit, the set-uid id mappers and their
# libraries, the user kiln (1000) with 65536 subordinate ids, its dirs
rl=$ctx/rootless
packages "$rl" rootlesskit uidmap libaudit1 libselinux1 libcap-ng0 libpcre2-8-0
rm -f "$rl/usr/bin/rootlesskit-docker-proxy" "$rl/usr/bin/getsubids"
# the id mappers with file capabilities instead of set-uid root: a set-uid root
# newuidmap needs CAP_SYS_ADMIN in the container's bounding set to write another
# namespace's map (it is not the namespace's owner then); with cap_setuid it stays
# the user and only needs CAP_SETUID, which containers have by default
chmod 0755 "$rl/usr/bin/newuidmap" "$rl/usr/bin/newgidmap"
setcap cap_setuid=ep "$rl/usr/bin/newuidmap"
setcap cap_setgid=ep "$rl/usr/bin/newgidmap"
mkdir -p "$rl/etc"
printf 'root:x:0:0:root:/root:/bin/sh\nkiln:x:1000:1000:kiln:/home/kiln:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$rl/etc/passwd"
printf 'root:x:0:\nkiln:x:1000:\nnogroup:x:65534:\n' > "$rl/etc/group"
echo 'kiln:100000:65536' > "$rl/etc/subuid"
echo 'kiln:100000:65536' > "$rl/etc/subgid"
cp deploy/images/kilnd-rootless "$rl/usr/bin/kilnd-rootless"
mkdir -p "$ctx/rootless-home/home/kiln/.local/share/kiln" "$ctx/rootless-home/run/user/1000"
chmod 700 "$ctx/rootless-home/run/user/1000"

case "$reg" in
127.0.0.1:*|localhost:*|127.0.0.1|localhost) http="[registry.\"$reg\"]
http = true" ;;
*) http= ;;
esac
if [ -z "${KILN_ARGS:-}" ]; then
  printf 'root = "%s"\n[grpc]\naddress = ["unix://%s"]\n%s\n' "$work/root" "$work/kilnd.sock" "$http" > "$work/kilnd.toml"
  "$bin/kilnd" --config "$work/kilnd.toml" > "$work/kilnd.log" 2>&1 &
  kpid=$!
  wait_for_socket "$work/kilnd.sock"
  KILN_ARGS="--addr unix://$work/kilnd.sock"
fi
docker_ok=
if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then docker_ok=1; fi
# KILN_IMAGE_TARGETS: which images (default all four)
for target in ${KILN_IMAGE_TARGETS:-kilnd kilnd-containerd kilnd-rootless kiln}; do
  # shellcheck disable=SC2086
  "$bin/kiln" $KILN_ARGS build --progress plain --frontend dockerfile.v0 --opt target="$target" \
    --local context="$ctx" --local dockerfile="$ctx" \
    --output "type=image,name=$reg/kiln/$target:$tag,push=true" >&2
  echo "pushed $reg/kiln/$target:$tag"
  if [ -n "$docker_ok" ]; then
    # shellcheck disable=SC2086
    "$bin/kiln" $KILN_ARGS build --progress plain --frontend dockerfile.v0 --opt target="$target" \
      --local context="$ctx" --local dockerfile="$ctx" \
      --output "type=docker,name=kiln/$target:$tag,dest=$work/$target.tar" >&2
    docker load -i "$work/$target.tar" >&2
    echo "loaded kiln/$target:$tag"
  fi
done
