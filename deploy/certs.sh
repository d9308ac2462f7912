#!/bin/sh
# Certificates for a kiln farm on Kubernetes (deploy/kubernetes), made with
# openssl, and the Secrets that carry them.
#
#   deploy/certs.sh [-o DIR] [-n NAMESPACE] [-d CLUSTER_DOMAIN] [-s SAN]... [--days N] [--apply]
#
# Two CAs, so that a CI job's certificate opens the client port and nothing else:
#   client-ca  signs the client listener's certificate (kilnd/) and the CI
#              client's (ci/); kilnd's --tlscacert, buildctl's --tlscacert
#   farm-ca    signs one certificate per internal service (scheduler/,
#              frontend/, exporter/, worker/), each good as a server and as a
#              client: [farm.tls] makes every service-to-service call mutual TLS
# Each directory holds ca.crt, tls.crt and tls.key (the keys of a
# kubernetes.io/tls Secret, and what `kiln --tlsdir` reads). The CAs are kept
# and reused when DIR already has them; the other certificates are made anew
# on every run (renewal: run again, apply, restart the pods).
#
# -o DIR      where the files go (default ./kiln-certs)
# -n NS       the namespace the manifests run in (default kiln): names in SANs
# -d DOMAIN   the cluster's DNS domain (default cluster.local)
# -s SAN      another name for the client listener, e.g. DNS:kiln.example.com
#             or IP:203.0.113.7 (a LoadBalancer's); repeatable
# --days N    how long the service and client certificates last (default 365)
# --apply     kubectl apply the Secrets instead of printing them
#
# Printed (or applied): Secrets kiln-client-tls, kiln-scheduler-tls,
# kiln-frontend-tls, kiln-exporter-tls, kiln-worker-tls and kiln-ci-tls (the CI
# client's, for CI jobs that run in the cluster), all in NAMESPACE.
set -eu

out=./kiln-certs
ns=kiln
domain=cluster.local
days=365
apply=
extra=
while [ $# -gt 0 ]; do
  case "$1" in
    -o) out=$2; shift 2 ;;
    -n) ns=$2; shift 2 ;;
    -d) domain=$2; shift 2 ;;
    -s) extra="$extra,$2"; shift 2 ;;
    --days) days=$2; shift 2 ;;
    --apply) apply=1; shift ;;
    -h|--help) sed -n '2,/^set -eu/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "certs.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
command -v openssl >/dev/null 2>&1 || { echo "certs.sh: openssl is needed" >&2; exit 1; }

mkdir -p "$out"
umask 077
tmp=$(mktemp -d "${TMPDIR:-/tmp}/kiln-certs.XXXXXX")
trap 'rm -rf "$tmp"' EXIT INT TERM

# a request config with no defaults from the system's openssl.cnf
cat > "$tmp/req.cnf" <<'EOF'
[req]
distinguished_name = dn
prompt = no
[dn]
[ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
EOF

# ca NAME CN: a CA's key and self-signed certificate, kept if already there
ca() {
  dir=$out/$1
  if [ -s "$dir/ca.crt" ] && [ -s "$dir/ca.key" ]; then
    echo "certs.sh: keeping the CA in $dir" >&2
    return
  fi
  mkdir -p "$dir"
  openssl req -x509 -config "$tmp/req.cnf" -extensions ca -newkey ec \
    -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 -subj "/O=kiln/CN=$2" \
    -set_serial "0x$(openssl rand -hex 16)" \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
}

# leaf DIR CA CN EKU [SANS]: a key and a certificate CA signed, with ca.crt beside them
leaf() {
  dir=$out/$1
  mkdir -p "$dir"
  {
    echo "[leaf]"
    echo "basicConstraints = critical, CA:FALSE"
    echo "keyUsage = critical, digitalSignature"
    echo "extendedKeyUsage = $4"
    echo "subjectKeyIdentifier = hash"
    echo "authorityKeyIdentifier = keyid"
    [ -n "${5:-}" ] && echo "subjectAltName = $5"
  } > "$tmp/$1.ext"
  openssl req -new -config "$tmp/req.cnf" -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
    -nodes -subj "/O=kiln/CN=$3" -keyout "$dir/tls.key" -out "$tmp/$1.csr" 2>/dev/null
  openssl x509 -req -in "$tmp/$1.csr" -CA "$out/$2/ca.crt" -CAkey "$out/$2/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days "$days" \
    -extfile "$tmp/$1.ext" -extensions leaf -out "$dir/tls.crt" 2>/dev/null
  cp "$out/$2/ca.crt" "$dir/ca.crt"
}

# names SERVICE: the DNS names a Service answers to inside the cluster
names() {
  printf 'DNS:%s,DNS:%s.%s,DNS:%s.%s.svc,DNS:%s.%s.svc.%s' "$1" "$1" "$ns" "$1" "$ns" "$1" "$ns" "$domain"
}

ca client-ca "kiln client CA"
ca farm-ca "kiln farm CA"
# the client listener: the all-in-one's Service (kilnd) and the farm's scheduler
# (kiln-scheduler), and loopback for `kubectl port-forward`
leaf kilnd client-ca "kiln client listener" serverAuth \
  "$(names kilnd),$(names kiln-scheduler),DNS:localhost,IP:127.0.0.1$extra"
leaf ci client-ca "kiln ci client" clientAuth
leaf scheduler farm-ca "kiln solver-scheduler" serverAuth,clientAuth "$(names kiln-scheduler)"
leaf frontend farm-ca "kiln frontend-gateway" serverAuth,clientAuth "$(names kiln-frontend)"
leaf exporter farm-ca "kiln registry-exporter" serverAuth,clientAuth "$(names kiln-exporter)"
# every worker pod: POD.kiln-worker.NS.svc, the name it advertises
leaf worker farm-ca "kiln worker-executor" serverAuth,clientAuth \
  "DNS:*.kiln-worker.$ns.svc,DNS:*.kiln-worker.$ns.svc.$domain"

# each certificate against its CA, for what it is used for
check() {
  openssl verify -CAfile "$out/$1/ca.crt" -purpose "$2" ${3:+-verify_hostname "$3"} \
    "$out/$1/tls.crt" >/dev/null || { echo "certs.sh: $out/$1/tls.crt does not verify" >&2; exit 1; }
}
check kilnd sslserver "kiln-scheduler.$ns.svc"
check kilnd sslserver kilnd
check ci sslclient
for s in scheduler frontend exporter; do
  check "$s" sslserver "kiln-$s"
  check "$s" sslclient
done
check worker sslserver "kiln-worker-0.kiln-worker.$ns.svc"
check worker sslclient
echo "certs.sh: certificates in $out (CA keys: $out/client-ca/ca.key, $out/farm-ca/ca.key; keep them safe)" >&2

b64() { base64 < "$1" | tr -d '\n'; }
secret() {
  cat <<EOF
---
apiVersion: v1
kind: Secret
metadata:
  name: $1
  namespace: $ns
  labels:
    app.kubernetes.io/part-of: kiln
type: kubernetes.io/tls
data:
  ca.crt: $(b64 "$out/$2/ca.crt")
  tls.crt: $(b64 "$out/$2/tls.crt")
  tls.key: $(b64 "$out/$2/tls.key")
EOF
}
secrets() {
  secret kiln-client-tls kilnd
  secret kiln-scheduler-tls scheduler
  secret kiln-frontend-tls frontend
  secret kiln-exporter-tls exporter
  secret kiln-worker-tls worker
  secret kiln-ci-tls ci
}
if [ -n "$apply" ]; then
  secrets | kubectl apply -f -
else
  secrets
fi
