#!/bin/sh
# Checks deploy/ offline: every kustomization under deploy/kubernetes builds
# (kubectl kustomize), every document it makes is valid against the Kubernetes
# API's schemas with no unknown field (PyPI's kubernetes-validate, which
# carries the schemas), and deploy/certs.sh makes certificates that verify and
# Secrets that validate. Exits non-zero naming what failed.
#   scripts/check-deploy.sh
# KILN_K8S_VERSIONS: the Kubernetes versions to validate against (default
# "1.27.0 1.32.0": grpc probes are GA from 1.27).
# Needs, and installs when missing: kubectl with kustomize (Debian's
# kubernetes-client), python3 with pip, openssl. kubernetes-validate goes into
# target/check-deploy/ (pip, once; later runs need no network).
set -eu
cd "$(dirname "$0")/.."
versions=${KILN_K8S_VERSIONS:-1.27.0 1.32.0}
kv_version=1.37.0
work=$(mktemp -d /tmp/kiln-check-deploy.XXXXXX)
trap 'rm -rf "$work"' EXIT INT TERM
failed=
fail() {
  echo "check-deploy: FAILED: $*" >&2
  failed="$failed
  $*"
}
SUDO=
[ "$(id -u)" = 0 ] || SUDO=sudo
apt_install() {
  echo "check-deploy: installing $*" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

# (a) a kubectl that builds kustomizations: the one here, else Debian's
if ! { command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; }; then
  apt_install kubernetes-client
fi
kubectl kustomize --help >/dev/null 2>&1 || {
  echo "check-deploy: no kubectl with kustomize, and kubernetes-client did not provide one" >&2
  exit 1
}
echo "check-deploy: $(kubectl version --client 2>/dev/null | head -n 2 | tr '\n' ' ')" >&2

# (b) kubernetes-validate, with its schemas, in the build directory
py=$(pwd)/target/check-deploy/python
have_kv() {
  PYTHONPATH=$py python3 -c "import kubernetes_validate.version as v; assert v.__version__ == '$kv_version'" \
    >/dev/null 2>&1
}
if ! have_kv; then
  python3 -m pip --version >/dev/null 2>&1 || apt_install python3-pip
  mkdir -p "$py"
  # --target: no venv needed, and Debian's "externally managed" python allows it
  if ! PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --upgrade \
    --target "$py" "kubernetes-validate==$kv_version" "tomli; python_version < '3.11'"; then
    echo "check-deploy: pip could not install kubernetes-validate==$kv_version into $py" \
      "(no network?); the manifests are NOT validated" >&2
    exit 1
  fi
  have_kv || { echo "check-deploy: kubernetes-validate installed into $py does not import" >&2; exit 1; }
fi

# sources DIR KIND/NAME...: the files of kustomization DIR (or the base) that
# define these resources
sources() {
  dir=$1
  shift
  for r in "$@"; do
    kind=${r%%/*} name=${r#*/}
    for f in "$dir"/*.yaml deploy/kubernetes/base/*.yaml; do
      [ -f "$f" ] && grep -qix "kind: $kind" "$f" && grep -qx "  name: $name" "$f" && echo "$f"
    done
  done | sort -u | tr '\n' ' '
}

# validate FILE WHAT [DIR]: every document of FILE against each version's schemas,
# strictly (a kind without a schema is a failure too); a failure names the
# files that define the resources that failed
validate() {
  for v in $versions; do
    out=$(PYTHONPATH=$py python3 -m kubernetes_validate --strict --quiet -k "$v" "$1" 2>&1) && rc=0 || rc=$?
    if [ "$rc" != 0 ] || printf '%s\n' "$out" | grep -q 'WARN\|ERROR'; then
      printf '%s\n' "$out" | sed "s|$1|$2|g" >&2
      bad=$(printf '%s\n' "$out" | sed -n 's|.* for resource \([^ ]*\) against .*|\1|p' | sort -u | tr '\n' ' ' | sed 's/ $//')
      files=
      [ -n "${3:-}" ] && files=$(sources "$3" $bad)
      fail "${files:-$2 }(${bad:+$bad: }Kubernetes $v schemas; in $2)"
    fi
  done
}

n=0
for k in deploy/kubernetes/base deploy/kubernetes/overlays/*; do
  [ -f "$k/kustomization.yaml" ] || continue
  n=$((n + 1))
  name=$(echo "$k" | tr / _)
  # v5 warns about v2.0.3's field names on stderr; only the exit status counts
  if ! kubectl kustomize "$k" > "$work/$name.yaml" 2> "$work/$name.err"; then
    cat "$work/$name.err" >&2
    fail "$k: kubectl kustomize"
    continue
  fi
  if ! grep -q '^kind:' "$work/$name.yaml"; then
    fail "$k: kubectl kustomize made no resources"
    continue
  fi
  validate "$work/$name.yaml" "kubectl kustomize $k" "$k"
  echo "check-deploy: $k: $(grep -c '^kind:' "$work/$name.yaml") resources" >&2
done
[ "$n" -ge 3 ] || fail "deploy/kubernetes: expected the base and two overlays, found $n kustomizations"

# every kilnd.toml the overlays ship is TOML
for t in deploy/kilnd.toml deploy/kubernetes/*/*/kilnd.toml deploy/kubernetes/*/kilnd.toml; do
  [ -f "$t" ] || continue
  PYTHONPATH=$py python3 -c '
import sys
try:
    import tomllib
except ImportError:
    import tomli as tomllib
tomllib.load(open(sys.argv[1], "rb"))' "$t" 2>"$work/toml.err" || {
    cat "$work/toml.err" >&2
    fail "$t: not TOML"
  }
done

# (c) deploy/certs.sh: its syntax, a real run, each certificate verified for its use
if ! sh -n deploy/certs.sh; then
  fail "deploy/certs.sh: sh -n"
elif ! sh deploy/certs.sh -o "$work/certs" -s DNS:kiln.example.com > "$work/secrets.yaml" 2> "$work/certs.err"; then
  cat "$work/certs.err" >&2
  fail "deploy/certs.sh: run"
else
  validate "$work/secrets.yaml" "deploy/certs.sh (its Secrets)"
  c=$work/certs
  verify() { # DIR PURPOSE [HOSTNAME]
    openssl verify -CAfile "$c/$1/ca.crt" -purpose "$2" ${3:+-verify_hostname "$3"} "$c/$1/tls.crt" \
      > "$work/verify.out" 2>&1 || { cat "$work/verify.out" >&2; fail "deploy/certs.sh: $1/tls.crt for $2 ${3:-}"; }
  }
  verify kilnd sslserver kilnd.kiln.svc
  verify kilnd sslserver kiln-scheduler
  verify kilnd sslserver kiln.example.com
  verify ci sslclient
  for s in scheduler frontend exporter; do
    verify "$s" sslserver "kiln-$s"
    verify "$s" sslclient
  done
  verify worker sslserver kiln-worker-0.kiln-worker.kiln.svc
  verify worker sslclient
  # the CI client's certificate opens the client port only: the farm CA does not sign it
  if openssl verify -CAfile "$c/farm-ca/ca.crt" "$c/ci/tls.crt" >/dev/null 2>&1; then
    fail "deploy/certs.sh: the farm CA accepts the CI client's certificate"
  fi
  # every Secret the manifests mount is one certs.sh makes
  made=$(sed -n 's/^  name: \(kiln-.*-tls\)$/\1/p' "$work/secrets.yaml" | sort -u)
  for f in "$work"/deploy_kubernetes_*.yaml; do
    for s in $(sed -n 's/^ *secretName: //p' "$f" | sort -u); do
      echo "$made" | grep -qx "$s" ||
        fail "$(basename "$f" .yaml | tr _ /): mounts Secret $s, which deploy/certs.sh does not make"
    done
  done
fi

if [ -n "$failed" ]; then
  echo "check-deploy: failed:$failed" >&2
  exit 1
fi
echo "check-deploy: ok (kustomize builds, Kubernetes $versions schemas, certs.sh)" >&2
