#!/bin/sh
# seed-busybox.sh HOST:PORT  builds busybox images from Debian's busybox-static and
# pushes them as one index, HOST:PORT/library/busybox:latest (what `FROM busybox`
# resolves to through a registry mirror): the host's platform from the installed
# /bin/busybox, and arm64 (amd64 on arm64 hosts) from the busybox-static .deb of
# that architecture that scripts/install-deps.sh keeps in /var/cache/kiln.
set -eu
reg=$1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
arch=$(dpkg --print-architecture 2>/dev/null || echo amd64)
foreign=arm64
[ "$arch" = arm64 ] && foreign=amd64
deb=$(ls /var/cache/kiln/busybox-static_*_"$foreign".deb 2>/dev/null | head -n 1)
if [ -z "$deb" ]; then
  echo "seed-busybox.sh: no busybox-static .deb for $foreign in /var/cache/kiln; run scripts/install-deps.sh" >&2
  exit 1
fi
dpkg-deb -x "$deb" "$work/$foreign-deb"
umoci init --layout "$work/layout"

# image ARCH BUSYBOX: one busybox image, tagged ARCH in the layout
image() {
  a=$1; bin=$2
  umoci new --image "$work/layout:$a"
  umoci unpack --image "$work/layout:$a" "$work/bundle-$a" >/dev/null
  root="$work/bundle-$a/rootfs"
  mkdir -p "$root/bin" "$root/etc" "$root/tmp" "$root/root" "$root/home/user" "$root/var" "$root/usr/bin"
  chmod 1777 "$root/tmp"
  cp "$bin" "$root/bin/busybox"
  # the same Debian release on both platforms: the host's busybox lists the applets
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
  umoci repack --image "$work/layout:$a" "$work/bundle-$a" >/dev/null
  umoci config --image "$work/layout:$a" --architecture "$a" --os linux \
    --config.cmd sh --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
}
image "$arch" /bin/busybox
image "$foreign" "$work/$foreign-deb/bin/busybox"

# the index of both, tagged latest
python3 - "$work/layout" "$arch" "$foreign" <<'PY'
import hashlib, json, os, sys
layout, archs = sys.argv[1], sys.argv[2:]
path = os.path.join(layout, "index.json")
top = json.load(open(path))
by_tag = {m["annotations"]["org.opencontainers.image.ref.name"]: m for m in top["manifests"]}
manifests = []
for a in sorted(archs):
    d = dict(by_tag[a])
    d.pop("annotations", None)
    d["platform"] = {"architecture": a, "os": "linux"}
    manifests.append(d)
index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                    "manifests": manifests}).encode()
digest = hashlib.sha256(index).hexdigest()
with open(os.path.join(layout, "blobs", "sha256", digest), "wb") as f:
    f.write(index)
top["manifests"].append({"mediaType": "application/vnd.oci.image.index.v1+json",
                         "digest": "sha256:" + digest, "size": len(index),
                         "annotations": {"org.opencontainers.image.ref.name": "latest"}})
json.dump(top, open(path, "w"))
PY
skopeo copy -q --all --dest-tls-verify=false "oci:$work/layout:latest" "docker://$reg/library/busybox:latest"
echo "seeded $reg/library/busybox:latest ($arch, $foreign)"
