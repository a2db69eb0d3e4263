#!/usr/bin/env bash
# Creates a lab CA for Tessera with openssl only.
#   certs/make-lab-ca.sh [--trust-domain TD] [--out DIR] [--days N] [--intermediate] [--force]
# Writes DIR/ca.pem (signing certificate first, then its chain) and DIR/ca.key (PKCS#8, 0600),
# and prints the [ca] config to use. With --intermediate, a root signs an intermediate that
# signs SVIDs; the root's key is kept in DIR/root.key so it can be taken offline.
set -euo pipefail

td="tessera.internal"; out="./lab-ca"; days=365; intermediate=0; force=0
while (($#)); do
  case "$1" in
    --trust-domain) td="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --days) days="$2"; shift 2 ;;
    --intermediate) intermediate=1; shift ;;
    --force) force=1; shift ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
[[ "$td" =~ ^[a-z0-9._-]+$ ]] || { echo "trust domain must be lower-case [a-z0-9._-]" >&2; exit 2; }
command -v openssl >/dev/null || { echo "openssl is required" >&2; exit 1; }
mkdir -p "$out"
for f in ca.pem ca.key root.pem root.key; do
  if [[ -e "$out/$f" && $force -eq 0 ]]; then echo "$out/$f exists; use --force to replace" >&2; exit 1; fi
done
umask 077
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
cat > "$tmp/ext.cnf" <<CNF
[root]
basicConstraints=critical,CA:true
keyUsage=critical,keyCertSign,cRLSign
subjectKeyIdentifier=hash
subjectAltName=URI:spiffe://$td
[inter]
basicConstraints=critical,CA:true,pathlen:0
keyUsage=critical,keyCertSign,cRLSign
subjectKeyIdentifier=hash
authorityKeyIdentifier=keyid
subjectAltName=URI:spiffe://$td
CNF
newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; chmod 600 "$1"; }

newkey "$out/root.key"
openssl req -x509 -new -key "$out/root.key" -subj "/O=Tessera lab/CN=$td root CA" -days "$days" \
  -config "$tmp/ext.cnf" -extensions root -out "$out/root.pem"
if ((intermediate)); then
  newkey "$out/ca.key"
  openssl req -new -key "$out/ca.key" -subj "/O=Tessera lab/CN=$td intermediate CA" -out "$tmp/inter.csr"
  openssl x509 -req -in "$tmp/inter.csr" -CA "$out/root.pem" -CAkey "$out/root.key" -CAcreateserial \
    -CAserial "$tmp/serial" -days "$((days > 1 ? days - 1 : 1))" -extfile "$tmp/ext.cnf" -extensions inter \
    -out "$tmp/inter.pem" 2>/dev/null
  cat "$tmp/inter.pem" "$out/root.pem" > "$out/ca.pem"
  openssl verify -CAfile "$out/root.pem" "$tmp/inter.pem" >/dev/null
else
  cp "$out/root.key" "$out/ca.key"
  cp "$out/root.pem" "$out/ca.pem"
fi
chmod 600 "$out"/*.key
chmod 644 "$out"/*.pem
abs=$(cd "$out" && pwd)
cat <<MSG
Created a lab CA for spiffe://$td in $abs
Add to tesserad.toml:

trust_domain = "$td"
[ca]
cert = "$abs/ca.pem"
key = "$abs/ca.key"
MSG
