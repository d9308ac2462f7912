# Sourced (`. scripts/local-kilnd.sh`) by the benchmarks and scripts/demo.sh: a
# registry seeded with busybox and an all-in-one kilnd on a unix socket, set up
# the way the integration tests set them up. Run from the repository root.

# registry_mirror_toml REG: kilnd.toml lines making REG docker.io's mirror, over plain HTTP.
registry_mirror_toml() {
  printf '[registry."docker.io"]\nmirrors = ["%s"]\n[registry."%s"]\nhttp = true\n' "$1" "$1"
}

# kilnd_toml ROOT SOCK REG: a kilnd.toml with its state in ROOT, listening on the
# unix socket SOCK, pulling docker.io images from REG.
kilnd_toml() {
  printf 'root = "%s"\n[grpc]\naddress = ["unix://%s"]\n' "$1" "$2"
  registry_mirror_toml "$3"
}

# use_test_registry DIR: sets REG to KILN_TEST_REGISTRY, or to a registry started
# in DIR and seeded with busybox (then OWNREG=1: stop it with
# `sh scripts/registry.sh stop DIR`).
use_test_registry() {
  if [ -n "${KILN_TEST_REGISTRY:-}" ]; then
    REG=$KILN_TEST_REGISTRY
  else
    OWNREG=1
    REG=$(sh scripts/registry.sh start "$1")
    sh scripts/seed-busybox.sh "$REG" >/dev/null
  fi
}

# wait_for_socket SOCK: returns once SOCK exists, or after 10 s.
wait_for_socket() {
  _tries=0
  while [ ! -S "$1" ] && [ "$_tries" -lt 100 ]; do
    sleep 0.1
    _tries=$((_tries + 1))
  done
}

# unmount_under DIR: detaches whatever a killed kilnd left mounted under DIR, deepest first.
unmount_under() {
  grep -o " $1[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
}
