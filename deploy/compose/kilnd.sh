#!/bin/sh
# The entrypoint of every service in compose.yaml (run by the image's busybox):
#   kilnd.sh KILND-FLAGS...
# - kilnd.toml is /etc/kiln/kilnd.toml, plus, when KILN_REGISTRY_MIRROR is set
#   (e.g. "http://mirror.internal:5000"), that host as docker.io's mirror;
# - the cgroup hierarchies are remounted writable (a worker's runc makes each
#   step's cgroups; an unprivileged container sees them read-only);
# - with KILN_ADVERTISE_PORT set (workers), the worker advertises
#   tcp://HOSTNAME:PORT: the container's hostname, which Docker's DNS resolves
#   on the project network for each replica of a scaled service;
# - with KILN_ROOTLESS set (the kilnd-rootless image), kilnd starts rootless.
set -eu
config=/etc/kiln/kilnd.toml
if [ -n "${KILN_REGISTRY_MIRROR:-}" ]; then
  config=/tmp/kilnd.toml
  cat /etc/kiln/kilnd.toml > "$config"
  printf '\n[registry."docker.io"]\nmirrors = ["%s"]\n' "$KILN_REGISTRY_MIRROR" >> "$config"
fi
for m in /sys/fs/cgroup /sys/fs/cgroup/*/; do
  /bin/busybox mount -o remount,bind,rw "$m" 2>/dev/null || true
done
if [ -n "${KILN_ADVERTISE_PORT:-}" ]; then
  set -- "$@" --advertise-addr "tcp://$(cat /etc/hostname):$KILN_ADVERTISE_PORT"
fi
if [ -n "${KILN_ROOTLESS:-}" ]; then
  # the kilnd-rootless image: rootlesskit, then kilnd --rootless, its root
  # under the user's ~/.local/share/kiln (the service's volume)
  exec /usr/bin/kilnd-rootless --config "$config" "$@"
fi
exec /usr/bin/kilnd --config "$config" --root /var/lib/kiln "$@"
