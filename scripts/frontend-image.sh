#!/bin/sh
# Packages a frontend binary (kiln-frontend, or a test frontend) as a frontend
# image built by kiln itself and pushes it: the binary and the shared
# libraries it loads, on scratch, as the entrypoint.
#   scripts/frontend-image.sh BINARY IMAGE_REF
# kiln reaches kilnd as usual (KILN_HOST / BUILDKIT_HOST / --addr via KILN_ARGS);
# KILN names the kiln binary (default: kiln on PATH).
set -eu
exec sh "$(dirname "$0")/binaries-image.sh" "type=image,name=$2,push=true" /bin/frontend "$1:/bin/frontend"
