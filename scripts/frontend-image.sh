#!/bin/sh
# Packages a frontend binary (kiln-frontend, or a test frontend) as a frontend
# image built by kiln itself and pushes it: the binary and the shared
# libraries it loads, on scratch, as the entrypoint.
#   scripts/frontend-image.sh BINARY IMAGE_REF
# kiln reaches kilnd as usual (KILN_HOST / BUILDKIT_HOST / --addr via KILN_ARGS);
# KILN names the kiln binary (default: kiln on PATH).
set -eu
bin=$1
ref=$2
kiln=${KILN:-kiln}
ctx=$(mktemp -d /tmp/kiln-frontend-image.XXXXXX)
trap 'rm -rf "$ctx"' EXIT INT TERM
mkdir -p "$ctx/rootfs/bin"
cp "$bin" "$ctx/rootfs/bin/frontend"
# the dynamic loader and every library ldd resolves, at the same paths
ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u |
while read -r lib; do
  mkdir -p "$ctx/rootfs$(dirname "$lib")"
  cp -L "$lib" "$ctx/rootfs$lib"
done
cat > "$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
ENTRYPOINT ["/bin/frontend"]
DOCKERFILE
# shellcheck disable=SC2086
"$kiln" ${KILN_ARGS:-} build --progress plain --frontend dockerfile.v0 \
  --local context="$ctx" --local dockerfile="$ctx" \
  --output "type=image,name=$ref,push=true"
