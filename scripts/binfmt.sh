#!/bin/sh
# binfmt.sh: makes sure the kernel runs binaries of other architectures through
# QEMU user-mode emulation (Debian's qemu-user-static, from install-deps.sh), as
# the multi-platform tests need: binfmt_misc mounted and enabled, qemu's handlers
# registered with the F flag (so they work inside a step's root). Idempotent,
# harmless when already done; exits non-zero, saying why, when the kernel refuses.
set -eu
d=/proc/sys/fs/binfmt_misc
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo
fail() { echo "binfmt.sh: $*" >&2; exit 1; }
if [ ! -e "$d/status" ]; then
  $SUDO mount -t binfmt_misc binfmt_misc "$d" || fail "cannot mount binfmt_misc at $d"
fi
[ "$(cat "$d/status")" = enabled ] || echo 1 | $SUDO tee "$d/status" >/dev/null
# the handler the tests use: arm64 on other hosts, amd64 on arm64 ones
want=qemu-aarch64
[ "$(dpkg --print-architecture 2>/dev/null || uname -m)" = arm64 ] && want=qemu-x86_64
usable() { [ -f "$d/$1" ] && grep -qx enabled "$d/$1" && grep -q '^flags:.*F' "$d/$1"; }
if ! usable "$want"; then
  if command -v update-binfmts >/dev/null 2>&1; then
    # binfmt-support: every format installed packages declare (qemu-user-static's have fix_binary)
    $SUDO update-binfmts --enable 2>/dev/null || true
  fi
  # else systemd's format: one ":name:type:offset:magic:mask:interpreter:flags" line per file
  for f in /usr/lib/binfmt.d/qemu-*.conf; do
    [ -f "$f" ] || continue
    name=$(basename "$f" .conf)
    [ -e "$d/$name" ] && continue
    grep -v '^#' "$f" | grep . | $SUDO tee "$d/register" >/dev/null || fail "registering $name refused"
  done
  [ -f "$d/$want" ] && ! grep -qx enabled "$d/$want" && echo 1 | $SUDO tee "$d/$want" >/dev/null
fi
usable "$want" || fail "no usable $want handler in $d (install qemu-user-static; a handler registered without the F flag does not work in steps: $(cat "$d/$want" 2>/dev/null | tr '\n' ' '))"
