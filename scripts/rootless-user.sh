#!/bin/sh
# Makes the unprivileged user a rootless kilnd runs as in the tests (default
# kiln-rootless), with 65536 subordinate uids and gids, once; prints its name.
# Idempotent and safe to run from parallel tests (flock).
set -eu
user=${1:-kiln-rootless}
[ "$(id -u)" = 0 ] || { echo "rootless-user.sh: run as root" >&2; exit 1; }
exec 9>/run/kiln-rootless-user.lock
flock 9
if ! id "$user" >/dev/null 2>&1; then
  useradd --create-home --shell /bin/sh "$user"
fi
touch /etc/subuid /etc/subgid
# a free range of 65536 ids above every range already given out
next() {
  awk -F: 'BEGIN { n = 100000 } { e = $2 + $3; if (e > n) n = e } END { print n }' "$1"
}
if ! grep -q "^$user:" /etc/subuid; then
  echo "$user:$(next /etc/subuid):65536" >> /etc/subuid
fi
if ! grep -q "^$user:" /etc/subgid; then
  echo "$user:$(next /etc/subgid):65536" >> /etc/subgid
fi
echo "$user"
