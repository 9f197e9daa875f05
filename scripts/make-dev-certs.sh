#!/usr/bin/env bash
# Makes a DEVELOPMENT certificate authority, a server certificate and client certificates
# with OpenSSL, for trying cds-server's TLS and mutual TLS. Never use them in production.
#
# Usage: scripts/make-dev-certs.sh OUT_DIR [CLIENT_NAME...]
#   OUT_DIR/ca.pem, ca.key             the development CA (ca.key signs; keep it private)
#   OUT_DIR/server.pem, server.key     for --tls_cert / --tls_key; valid for localhost,
#                                      127.0.0.1 and ::1 (add more with SERVER_NAMES="a b")
#   OUT_DIR/<name>.pem, <name>.key     one client certificate per CLIENT_NAME (default:
#                                      dev-client), subject CN=<name>, SAN URI:cds:<name>
# DAYS (default 30) sets the validity. EXPIRED_CLIENTS="a b" also makes client certificates
# a and b that expired yesterday (for tests). Keys are EC P-256. Existing files are overwritten.
set -euo pipefail

if [ $# -lt 1 ]; then
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
OUT=$1
shift
CLIENTS=("$@")
if [ ${#CLIENTS[@]} -eq 0 ]; then CLIENTS=(dev-client); fi
DAYS=${DAYS:-30}
SERVER_NAMES=${SERVER_NAMES:-}

mkdir -p "$OUT"
cd "$OUT"
umask 077
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

# The CA.
newkey ca.key
openssl req -x509 -new -key ca.key -sha256 -days "$DAYS" -subj "/CN=cds development CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out ca.pem 2>/dev/null

# sign NAME SUBJECT EXTENSIONS [DAYS]: NAME.key and NAME.pem signed by the CA.
sign() {
  newkey "$1.key"
  openssl req -new -key "$1.key" -subj "$2" -out "$TMP/$1.csr" 2>/dev/null
  printf '%s\n' "$3" > "$TMP/$1.ext"
  openssl x509 -req -in "$TMP/$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial \
    -CAserial "$TMP/ca.srl" -days "${4:-$DAYS}" -sha256 -extfile "$TMP/$1.ext" -out "$1.pem" 2>/dev/null
}

SAN="DNS:localhost,IP:127.0.0.1,IP:::1"
for name in $SERVER_NAMES; do SAN="$SAN,DNS:$name"; done
sign server "/CN=localhost" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=$SAN"

for name in "${CLIENTS[@]}"; do
  case "$name" in
    ca|server|*/*|"") echo "make-dev-certs: bad client name '$name'" >&2; exit 2 ;;
  esac
  sign "$name" "/CN=$name" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth
subjectAltName=URI:cds:$name"
done
for name in ${EXPIRED_CLIENTS:-}; do
  sign "$name" "/CN=$name" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth
subjectAltName=URI:cds:$name" -1
done
chmod 644 ./*.pem
echo "make-dev-certs: CA, server and ${#CLIENTS[@]} client certificate(s) in $(pwd)" >&2
