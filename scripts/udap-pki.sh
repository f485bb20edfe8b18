#!/usr/bin/env bash
# Makes a UDAP test/demo PKI with openssl: a root CA, an intermediate, a server (RSA)
# certificate whose URI subject alternative names are the given tenant base URLs, the
# same identity as PKCS#12 (AES, password from UDAP_P12_PASSWORD), and a second
# community CA with its own EC server certificate for the same URLs.
#
# Usage: scripts/udap-pki.sh OUT_DIR BASE_URL [BASE_URL...]
# Writes in OUT_DIR: ca.pem, intermediate.pem, server-chain.pem (leaf, intermediate),
# server-key.pem, server.p12, community-ca.pem, community-chain.pem,
# community-key.pem (and the CAs' keys, *-ca-key.pem). Valid for UDAP_PKI_DAYS
# (default 825) days.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

(($# >= 2)) || { print_usage "${BASH_SOURCE[0]}"; exit 64; }
out=$1
shift
mkdir -p "$out"
cd "$out"
sans=$(printf 'URI:%s,' "$@")
sans=${sans%,}
days=${UDAP_PKI_DAYS:-825}
ca_ext='basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n'
leaf_ext="basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nsubjectAltName=$sans\n"

openssl req -x509 -newkey rsa:2048 -nodes -keyout ca-key.pem -out ca.pem -days "$days" \
  -subj "/CN=smart-fhir-proxy UDAP example root CA (do not trust)" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout intermediate-ca-key.pem -out intermediate.csr \
  -subj "/CN=smart-fhir-proxy UDAP example intermediate CA (do not trust)" 2>/dev/null
openssl x509 -req -in intermediate.csr -CA ca.pem -CAkey ca-key.pem -out intermediate.pem \
  -days "$days" -extfile <(printf '%b' "$ca_ext") 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout server-key.pem -out server.csr \
  -subj "/CN=smart-fhir-proxy UDAP example server" 2>/dev/null
openssl x509 -req -in server.csr -CA intermediate.pem -CAkey intermediate-ca-key.pem \
  -out server.pem -days "$days" -extfile <(printf '%b' "$leaf_ext") 2>/dev/null
cat server.pem intermediate.pem >server-chain.pem
UDAP_P12_PASSWORD=${UDAP_P12_PASSWORD:-example-only} openssl pkcs12 -export \
  -inkey server-key.pem -in server.pem -certfile intermediate.pem \
  -passout env:UDAP_P12_PASSWORD -out server.p12

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout community-ca-key.pem \
  -out community-ca.pem -days "$days" -subj "/CN=smart-fhir-proxy UDAP example community CA (do not trust)" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout community-key.pem \
  -out community.csr -subj "/CN=smart-fhir-proxy UDAP example server (community)" 2>/dev/null
openssl x509 -req -in community.csr -CA community-ca.pem -CAkey community-ca-key.pem \
  -out community-chain.pem -days "$days" -extfile <(printf '%b' "$leaf_ext") 2>/dev/null
rm -f ./*.csr ./*.srl server.pem
