#!/usr/bin/env bash
# Starts the demo: the upstream FHIR server with demo data, the token issuer with demo
# clients for three tenants, a real OpenFGA server (memory datastore) seeded with
# `smart-fhir-proxy seed-openfga`, and (PROXY section below) the proxy in front of them:
# `demo` and `demo2` decide records by compartments, `demo-fga` by OpenFGA.
# State lives in .stack/demo/: pid files, logs, issuer.json, and `env` (ports, URLs,
# client credentials; `source .stack/demo/env` to use them). Stop with scripts/demo-down.sh.
#
# Usage: scripts/demo-up.sh
# Installs what is missing (scripts/install.sh) and builds the proxy first.
# Fixed ports instead of free ones: DEMO_FHIR_PORT, DEMO_ISSUER_PORT, DEMO_PROXY_PORT.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

demo=$STACK_DIR/demo
"$SCRIPTS_DIR/install.sh" >&2
require_installed
if [[ -f $demo/env ]]; then
  die "a demo seems to be running ($demo/env exists): run scripts/demo-down.sh first"
fi
mkdir -p "$demo"
started=$SECONDS

# Anything that fails from here on stops what was already started.
trap 'log "start failed, stopping what was started"; "$SCRIPTS_DIR/demo-down.sh" >/dev/null 2>&1 || true' ERR

fhir_port=${DEMO_FHIR_PORT:-$(free_port)}
issuer_port=${DEMO_ISSUER_PORT:-$(free_port)}
proxy_port=${DEMO_PROXY_PORT:-$(free_port)}
fga_port=${DEMO_OPENFGA_PORT:-$(free_port)}
while [[ $issuer_port == "$fhir_port" ]]; do issuer_port=$(free_port); done
while [[ $proxy_port == "$fhir_port" || $proxy_port == "$issuer_port" ]]; do proxy_port=$(free_port); done
while [[ $fga_port == "$fhir_port" || $fga_port == "$issuer_port" || $fga_port == "$proxy_port" ]]; do
  fga_port=$(free_port)
done

issuer_url=http://127.0.0.1:$issuer_port
tenant1_aud=http://127.0.0.1:$proxy_port/demo
tenant2_aud=http://127.0.0.1:$proxy_port/demo2
tenant3_aud=http://127.0.0.1:$proxy_port/demo-fga

# --- upstream FHIR server + demo data ---------------------------------------------------
fhir_base=$("$SCRIPTS_DIR/fhir-server.sh" --port "$fhir_port" --data-dir "$demo/fhir" --reset)
"$SCRIPTS_DIR/load-demo-data.sh" "$fhir_base"

# --- token issuer ----------------------------------------------------------------------
# Demo clients. Tenant `demo` uses SMART v2 scopes, tenant `demo2` SMART v1 scopes; each
# client may only ask for its own tenant's audience.
keys=$(node "$ISSUER_DIR/genkeys.mjs")
cat >"$demo/issuer.json" <<JSON
{
  "issuer": "$issuer_url",
  "port": $issuer_port,
  "keys": $keys,
  "resources": ["$tenant1_aud", "$tenant2_aud", "$tenant3_aud"],
  "clients": [
    {
      "client_id": "demo-patient-app", "client_secret": "demo-patient-secret",
      "scopes": "openid fhirUser launch/patient patient/Patient.rs patient/Observation.rs patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory patient/Condition.rs patient/AllergyIntolerance.rs patient/MedicationRequest.rs patient/Medication.rs patient/Encounter.rs patient/Observation.cu patient/Encounter.c",
      "patient": "p1", "fhirUser": "Patient/p1", "alg": "ES256", "resources": ["$tenant1_aud"]
    },
    {
      "client_id": "demo-practitioner-app", "client_secret": "demo-practitioner-secret",
      "scopes": "openid fhirUser user/*.rs user/Observation.cruds",
      "fhirUser": "Practitioner/pr1", "alg": "RS256", "resources": ["$tenant1_aud"]
    },
    {
      "client_id": "demo-backend", "client_secret": "demo-backend-secret",
      "scopes": "system/*.rs system/Patient.rs system/Observation.rs",
      "alg": "RS256", "resources": ["$tenant1_aud"]
    },
    {
      "client_id": "demo2-patient-app", "client_secret": "demo2-patient-secret",
      "scopes": "openid fhirUser launch/patient patient/*.read patient/Observation.read",
      "patient": "p2", "fhirUser": "Patient/p2", "alg": "RS256", "resources": ["$tenant2_aud"]
    },
    {
      "client_id": "demo2-practitioner-app", "client_secret": "demo2-practitioner-secret",
      "scopes": "openid fhirUser user/*.read user/Observation.write",
      "fhirUser": "Practitioner/pr2", "alg": "ES256", "resources": ["$tenant2_aud"]
    },
    {
      "client_id": "demo2-backend", "client_secret": "demo2-backend-secret",
      "scopes": "system/*.read", "alg": "ES256", "resources": ["$tenant2_aud"]
    },
    {
      "client_id": "demo-fga-clinician", "client_secret": "demo-fga-clinician-secret",
      "scopes": "openid user/Patient.rs user/Observation.rs", "alg": "RS256", "resources": ["$tenant3_aud"]
    }
  ]
}
JSON
"$SCRIPTS_DIR/issuer-server.sh" --config "$demo/issuer.json" \
  --pid-file "$demo/issuer.pid" --log "$demo/issuer.log" >/dev/null

# --- state for demo-down.sh, the proxy and the tour ---------------------------------------
cat >"$demo/env" <<ENV
# written by scripts/demo-up.sh; removed by scripts/demo-down.sh
FHIR_PORT=$fhir_port
FHIR_BASE=$fhir_base
FHIR_PID_FILE=$demo/fhir/server.pid
ISSUER_PORT=$issuer_port
ISSUER_URL=$issuer_url
ISSUER_TOKEN_URL=$issuer_url/token
ISSUER_JWKS_URL=$issuer_url/jwks
ISSUER_PID_FILE=$demo/issuer.pid
PROXY_PORT=$proxy_port
PROXY_PID_FILE=$demo/proxy.pid
TENANT1_AUD=$tenant1_aud
TENANT2_AUD=$tenant2_aud
# client_id:client_secret per tenant
TENANT1_PATIENT_CLIENT=demo-patient-app:demo-patient-secret
TENANT1_PRACTITIONER_CLIENT=demo-practitioner-app:demo-practitioner-secret
TENANT1_BACKEND_CLIENT=demo-backend:demo-backend-secret
TENANT2_PATIENT_CLIENT=demo2-patient-app:demo2-patient-secret
TENANT2_PRACTITIONER_CLIENT=demo2-practitioner-app:demo2-practitioner-secret
TENANT2_BACKEND_CLIENT=demo2-backend:demo2-backend-secret
TENANT3_AUD=$tenant3_aud
TENANT3_CLINICIAN_CLIENT=demo-fga-clinician:demo-fga-clinician-secret
OPENFGA_PID_FILE=$demo/openfga/openfga.pid
ENV

# token CLIENT_ID:SECRET SCOPE RESOURCE: print an access token from the demo issuer.
token() {
  curl -fsS -u "$1" --data-urlencode grant_type=client_credentials \
    --data-urlencode "scope=$2" --data-urlencode "resource=$3" "$issuer_url/token" \
    | "$VENV/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["access_token"])'
}
# The issuer hands out tokens for both tenants.
token demo-backend:demo-backend-secret "system/*.rs" "$tenant1_aud" >/dev/null
token demo2-backend:demo2-backend-secret "system/*.read" "$tenant2_aud" >/dev/null

# --- the proxy -----------------------------------------------------------------------------
log "building smart-fhir-proxy (release)"
(cd "$REPO_ROOT" && cargo build --release --locked --quiet --bin smart-fhir-proxy)
proxy_bin=$REPO_ROOT/target/release/smart-fhir-proxy

# --- OpenFGA (the real server, memory datastore), seeded from the upstream's patients ---
fga_url=$("$SCRIPTS_DIR/openfga-server.sh" --port "$fga_port" --data-dir "$demo/openfga")
"$proxy_bin" seed-openfga --api-url "$fga_url" --fhir-base "$fhir_base" --wards 2 \
  --sample-user demo-fga-clinician >"$demo/openfga/seed.json" 2>"$demo/openfga/seed.log"
fga_field() { "$VENV/bin/python" -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$demo/openfga/seed.json" "$1"; }
fga_store=$(fga_field store_id)
fga_model=$(fga_field authorization_model_id)
echo "OPENFGA_API_URL=$fga_url" >>"$demo/env"
echo "OPENFGA_STORE_ID=$fga_store" >>"$demo/env"
tenant_json() { # ID AUDIENCE DENIED_STATUS [AUTHORIZATION_JSON] [MATCH_JSON]
  local authz=${4:-"{ \"mode\": \"compartment\", \"denied_read_status\": $3 }"}
  local match=${5:-'{ "mode": "auto" }'}
  cat <<JSON
    "$1": {
      "public_base_url": "$2",
      "upstream": { "base_url": "$fhir_base" },
      "token": {
        "issuers": ["$issuer_url"],
        "jwks_uri": "$issuer_url/jwks",
        "audience": "$2",
        "algorithms": ["RS256", "ES256"]
      },
      "smart": {
        "authorization_endpoint": "$issuer_url/auth",
        "token_endpoint": "$issuer_url/token",
        "introspection_endpoint": "$issuer_url/token/introspection",
        "revocation_endpoint": "$issuer_url/token/revocation"
      },
      "authorization": $authz,
      "match": $match
    }
JSON
}
{
  echo '{ "tenants": {'
  # Patient/$match: `demo` scores candidates itself, the others use HAPI's MDM (`auto`).
  tenant_json demo "$tenant1_aud" 404 "" '{ "mode": "score", "input_level": "IDI-Patient-L0" }'
  echo ','
  tenant_json demo2 "$tenant2_aud" 403
  echo ','
  tenant_json demo-fga "$tenant3_aud" 404 "{ \"mode\": \"openfga\", \"openfga\": {
        \"api_url\": \"$fga_url\", \"store_id\": \"$fga_store\",
        \"authorization_model_id\": \"$fga_model\", \"cache_ttl_seconds\": 5 } }"
  echo '} }'
} >"$demo/tenants.json"
# --- UDAP: tenant demo publishes signed metadata; a community's x5c tokens are trusted ---
# The PKI is made now (scripts/udap-pki.sh: root, intermediate, the tenant's RSA
# certificate with its base URL as URI SAN; a community CA and its EC certificate, whose
# SANs also name the community's app issuer, so the tour can sign an x5c token with it).
udap_app_issuer=https://apps.demo-community.example
"$SCRIPTS_DIR/udap-pki.sh" "$demo/udap" "$tenant1_aud" "$udap_app_issuer"
"$VENV/bin/python" - "$demo/tenants.json" "$demo/udap" "$issuer_url" "$udap_app_issuer" <<'PY'
import json, sys
path, pki, issuer, app_issuer = sys.argv[1:]
d = json.load(open(path))
d["tenants"]["demo"]["udap"] = {
    "certificate": {"format": "pem", "chain_file": f"{pki}/server-chain.pem",
                    "key_file": f"{pki}/server-key.pem"},
    "trust_anchor_files": [f"{pki}/ca.pem"],
    "metadata": {"registration_endpoint": f"{issuer}/reg"},
    "communities": [{
        "uri": "urn:example:demo-community",
        "trust_anchor_files": [f"{pki}/community-ca.pem"],
        "certificate": {"format": "pem", "chain_file": f"{pki}/community-chain.pem",
                        "key_file": f"{pki}/community-key.pem"},
        "issuers": [{"issuer": app_issuer, "x5c": True}],
    }],
}
json.dump(d, open(path, "w"), indent=2)
PY
"$proxy_bin" check-config --tenants "$demo/tenants.json" >"$demo/check-config.txt"
nohup "$proxy_bin" --tenants "$demo/tenants.json" --listen "127.0.0.1:$proxy_port" \
  </dev/null >"$demo/proxy.log" 2>&1 &
echo $! >"$demo/proxy.pid"
"$SCRIPTS_DIR/lib/wait-http.sh" "http://127.0.0.1:$proxy_port/_health" 20 "$(<"$demo/proxy.pid")" >/dev/null \
  || die "proxy did not start; see $demo/proxy.log"

# --- the tour ------------------------------------------------------------------------------
show() { # TITLE, then the curl arguments
  local title=$1
  shift
  printf '\n\033[1m%s\033[0m\n$ curl %s\n' "$title" "$(printf '%q ' "$@" | sed -E 's/Bearer(\\ | )[A-Za-z0-9._-]+/Bearer\1$TOKEN/')"
  curl -sS -o "$demo/last.json" -w '%{http_code}' "$@" >"$demo/last.status"
  printf 'HTTP %s\n' "$(<"$demo/last.status")"
}
say() { "$VENV/bin/python" "$SCRIPTS_DIR/lib/summarize.py" "$demo/last.json"; }

patient_token=$(token demo-patient-app:demo-patient-secret "launch/patient patient/Patient.rs patient/Observation.rs" "$tenant1_aud")
backend_token=$(token demo-backend:demo-backend-secret "system/Observation.rs" "$tenant1_aud")

show "1. Discovery, no token needed" "$tenant1_aud/.well-known/smart-configuration"; say
show "2. Allowed read: the patient app (patient p1) reads its own Patient record" \
  -H "Authorization: Bearer $patient_token" "$tenant1_aud/Patient/p1"; say
show "3. Denied read: the same app asks for patient p2 (looks exactly like a missing record)" \
  -H "Authorization: Bearer $patient_token" "$tenant1_aud/Patient/p2"; say
show "4. Narrowed search: the patient app searches all Observations and gets only p1's" \
  -H "Authorization: Bearer $patient_token" "$tenant1_aud/Observation?_count=200"; say
show "   ... while a backend service with system/Observation.rs sees every patient's" \
  -H "Authorization: Bearer $backend_token" "$tenant1_aud/Observation?_count=200"; say
show "5. No token: 401 with a Bearer challenge" "$tenant1_aud/Patient/p1"; say
# The seed assigned the upstream's patients to wards in turn (ward-1, ward-2, ...), in
# the order of `Patient?_elements=id`; the clinician is in ward-1's care team.
clinician_token=$(token demo-fga-clinician:demo-fga-clinician-secret "user/Patient.rs user/Observation.rs" "$tenant3_aud")
ward2_patient=$(curl -fsS -H 'Accept: application/fhir+json' "$fhir_base/Patient?_count=2&_elements=id" \
  | "$VENV/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["entry"][1]["resource"]["id"])')
show "6. OpenFGA tenant: a ward-1 clinician searches Patients and gets ward-1's only" \
  -H "Authorization: Bearer $clinician_token" "$tenant3_aud/Patient?_count=200"; say
show "   ... and cannot read a ward-2 patient" \
  -H "Authorization: Bearer $clinician_token" "$tenant3_aud/Patient/$ward2_patient"; say
# --- Patient $match, scored by the proxy (tenant `demo`, match.mode = score) ---
match_params() { # MRN FAMILY GIVEN BIRTHDATE: Parameters for Patient/$match (IDI-Patient-L0: 10)
  cat <<JSON
{"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": {"resourceType": "Patient",
  "identifier": [{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]},
                  "system": "urn:oid:1.2.3.4.5.1", "value": "$1"}],
  "name": [{"family": "$2", "given": ["$3"]}], "gender": "female", "birthDate": "$4"}},
  {"name": "count", "valueInteger": 5}]}
JSON
}
grades() { "$VENV/bin/python" -c 'import json, sys
v = json.load(open(sys.argv[1]))
for e in v.get("entry", []):
    g = [x["valueCode"] for x in e["search"].get("extension", []) if x["url"].endswith("/match-grade")]
    print("  Patient/%s  score %s  %s" % (e["resource"]["id"], e["search"]["score"], g[0] if g else "?"))' "$demo/last.json"; }
match_token=$(token demo-backend:demo-backend-secret "system/Patient.rs" "$tenant1_aud")
show "7. Patient \$match scored by the proxy: a backend service matches Amy Patient-One (MRN, name, birth date)" \
  -X POST -H "Authorization: Bearer $match_token" -H 'Content-Type: application/fhir+json' \
  --data "$(match_params MRN-P1 Patient-One Amy 1970-01-01)" "$tenant1_aud/Patient/\$match"; say; grades
show "   ... the patient app (p1) matching p2's demographics gets nothing, not even a count" \
  -X POST -H "Authorization: Bearer $patient_token" -H 'Content-Type: application/fhir+json' \
  --data "$(match_params MRN-P2 Patient-Two Ben 1980-02-02)" "$tenant1_aud/Patient/\$match"; say
show "   ... and a name alone is too weak an input (HL7 IDI weighting)" \
  -X POST -H "Authorization: Bearer $match_token" -H 'Content-Type: application/fhir+json' \
  --data '{"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": {"resourceType": "Patient", "name": [{"family": "Patient-One", "given": ["Amy"]}]}}]}' \
  "$tenant1_aud/Patient/\$match"; say
# UDAP: the signed metadata, checked as a client would (scripts/verify-udap.py: PyJWT and
# cryptography; openssl verify for the x5c chain), then a token a community app signed
# with its certificate (x5c), accepted on demo and refused on demo2.
show "8. UDAP server metadata, signed with the tenant's certificate" "$tenant1_aud/.well-known/udap"
"$VENV/bin/python" "$SCRIPTS_DIR/verify-udap.py" --metadata "$demo/last.json" \
  --anchor "$demo/udap/ca.pem" --base-url "$tenant1_aud" --max-lifetime 300
"$VENV/bin/python" - "$demo/last.json" "$demo/udap/x5c" <<'PY'
import base64, json, sys, textwrap
header = json.loads(base64.urlsafe_b64decode(json.load(open(sys.argv[1]))["signed_metadata"].split(".")[0] + "=="))
for i, c in enumerate(header["x5c"]):
    with open(f"{sys.argv[2]}-{i}.pem", "w") as f:
        f.write("-----BEGIN CERTIFICATE-----\n" + "\n".join(textwrap.wrap(c, 64)) + "\n-----END CERTIFICATE-----\n")
PY
printf '$ openssl verify -CAfile ca.pem -untrusted x5c-1.pem x5c-0.pem\n'
openssl verify -CAfile "$demo/udap/ca.pem" -untrusted "$demo/udap/x5c-1.pem" "$demo/udap/x5c-0.pem"
show "   ... an unknown community: 204, no body" "$tenant1_aud/.well-known/udap?community=urn:example:nobody"
community_token=$("$VENV/bin/python" - "$demo/udap" "$udap_app_issuer" "$tenant1_aud" <<'PY'
import base64, sys, time, jwt
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
pki, iss, aud = sys.argv[1:]
cert = x509.load_pem_x509_certificate(open(f"{pki}/community-chain.pem", "rb").read())
x5c = [base64.b64encode(cert.public_bytes(Encoding.DER)).decode()]
now = int(time.time())
claims = {"iss": iss, "aud": aud, "sub": "community-app", "client_id": "community-app",
          "iat": now, "exp": now + 300, "scope": "patient/Patient.rs", "patient": "p1"}
print(jwt.encode(claims, open(f"{pki}/community-key.pem").read(), algorithm="ES256", headers={"x5c": x5c}))
PY
)
show "9. A community app's x5c-signed token (chained to the community CA) reads Patient p1" \
  -H "Authorization: Bearer $community_token" "$tenant1_aud/Patient/p1"; say
show "   ... and is refused on demo2, which trusts no community" \
  -H "Authorization: Bearer $community_token" "$tenant2_aud/Patient/p1"; say
# --- Batches and transactions: every entry authorized on its own -----------------------
writer_token=$(token demo-patient-app:demo-patient-secret "launch/patient patient/Patient.rs patient/Observation.rs patient/Observation.cu patient/Encounter.c" "$tenant1_aud")
visit() { # PATIENT: a transaction recording a home visit and a reading linked to it by urn:uuid
  cat <<JSON
{"resourceType": "Bundle", "type": "transaction", "entry": [
  {"fullUrl": "urn:uuid:5b2d6c1e-0f3a-4c8e-9d21-7a6b3c2e1f00",
   "resource": {"resourceType": "Encounter", "status": "finished", "class": {"code": "HH"},
                "subject": {"reference": "Patient/p1"}},
   "request": {"method": "POST", "url": "Encounter"}},
  {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "home blood pressure"},
                "subject": {"reference": "Patient/$1"},
                "encounter": {"reference": "urn:uuid:5b2d6c1e-0f3a-4c8e-9d21-7a6b3c2e1f00"}},
   "request": {"method": "POST", "url": "Observation"}}]}
JSON
}
show "10. A transaction: the patient app records a home visit and a reading linked to it (urn:uuid)" \
  -X POST -H "Authorization: Bearer $writer_token" -H 'Content-Type: application/fhir+json' \
  --data "$(visit p1)" "$tenant1_aud"; say
show "    ... the same with the reading for patient p2: refused whole, nothing written" \
  -X POST -H "Authorization: Bearer $writer_token" -H 'Content-Type: application/fhir+json' \
  --data "$(visit p2)" "$tenant1_aud"; say
show "11. A batch: p1's own record, a reading for p2 (refused on its own), p2's record (hidden)" \
  -X POST -H "Authorization: Bearer $writer_token" -H 'Content-Type: application/fhir+json' \
  --data '{"resourceType": "Bundle", "type": "batch", "entry": [
    {"request": {"method": "GET", "url": "Patient/p1"}},
    {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": "Patient/p2"}},
     "request": {"method": "POST", "url": "Observation"}},
    {"request": {"method": "GET", "url": "Patient/p2"}}]}' "$tenant1_aud"; say
echo

trap - ERR
trap - ERR
log "demo up in $((SECONDS - started))s"
cat <<EOF
FHIR server  $fhir_base   (pid $(<"$demo/fhir/server.pid"), log $demo/fhir/server.log)
Issuer       $issuer_url   (pid $(<"$demo/issuer.pid"), log $demo/issuer.log)
OpenFGA      $fga_url (store $fga_store)   (pid $(<"$demo/openfga/openfga.pid"), log $demo/openfga/openfga.log)
Proxy        $tenant1_aud, $tenant2_aud and $tenant3_aud   (pid $(<"$demo/proxy.pid"), log $demo/proxy.log)
State        $demo/env
Stop         scripts/demo-down.sh
EOF
