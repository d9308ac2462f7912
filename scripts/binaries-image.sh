#!/bin/sh
# Packages programs as an image built by kiln itself: each program and the
# shared libraries it loads (at the paths ldd resolves them to), on scratch,
# with an empty /tmp.
#   scripts/binaries-image.sh OUTPUT ENTRYPOINT SRC[:DEST]...
# OUTPUT is a `kiln build --output` value; ENTRYPOINT the image's entrypoint
# (a path in the image); each SRC is copied to DEST in the image (default:
# SRC's own path).
# kiln reaches kilnd as usual (KILN_HOST / BUILDKIT_HOST / --addr via
# KILN_ARGS); KILN names the kiln binary (default: kiln on PATH).
set -eu
output=$1
entry=$2
shift 2
kiln=${KILN:-kiln}
ctx=$(mktemp -d /tmp/kiln-binaries-image.XXXXXX)
trap 'rm -rf "$ctx"' EXIT INT TERM
root="$ctx/rootfs"
mkdir -p "$root/tmp"
chmod 1777 "$root/tmp"
for spec in "$@"; do
  src=${spec%%:*}
  dest=${spec#*:}
  [ "$spec" = "$src" ] && dest=$src
  mkdir -p "$root$(dirname "$dest")"
  cp -L "$src" "$root$dest"
  # the dynamic loader and every library ldd resolves (none for a static program)
  { ldd "$src" 2>/dev/null || true; } |
    awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u |
    while read -r lib; do
      [ -e "$root$lib" ] && continue
      mkdir -p "$root$(dirname "$lib")"
      cp -L "$lib" "$root$lib"
    done
done
cat > "$ctx/Dockerfile" <<DOCKERFILE
FROM scratch
COPY rootfs/ /
ENTRYPOINT ["$entry"]
DOCKERFILE
# shellcheck disable=SC2086
"$kiln" ${KILN_ARGS:-} build --progress plain --frontend dockerfile.v0 \
  --local context="$ctx" --local dockerfile="$ctx" \
  --output "$output"
