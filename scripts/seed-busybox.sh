#!/bin/sh
# seed-busybox.sh HOST:PORT  builds a busybox image from Debian's busybox-static
# and pushes it as HOST:PORT/library/busybox:latest (what `FROM busybox` resolves
# to through a registry mirror).
set -eu
reg=$1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
arch=$(dpkg --print-architecture 2>/dev/null || echo amd64)
umoci init --layout "$work/layout"
umoci new --image "$work/layout:latest"
umoci unpack --image "$work/layout:latest" "$work/bundle" >/dev/null
root="$work/bundle/rootfs"
mkdir -p "$root/bin" "$root/etc" "$root/tmp" "$root/root" "$root/home/user" "$root/var" "$root/usr/bin"
chmod 1777 "$root/tmp"
cp /bin/busybox "$root/bin/busybox"
for applet in $(/bin/busybox --list); do
  [ "$applet" = busybox ] || ln -sf /bin/busybox "$root/bin/$applet"
done
cat > "$root/etc/passwd" <<P
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
user:x:1000:1000:user:/home/user:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
P
cat > "$root/etc/group" <<G
root:x:0:
daemon:x:1:
user:x:1000:
nogroup:x:65534:
G
chown 1000:1000 "$root/home/user"
umoci repack --image "$work/layout:latest" "$work/bundle" >/dev/null
umoci config --image "$work/layout:latest" --architecture "$arch" --os linux \
  --config.cmd sh --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
skopeo copy -q --dest-tls-verify=false "oci:$work/layout:latest" "docker://$reg/library/busybox:latest"
echo "seeded $reg/library/busybox:latest"
