#!/usr/bin/env bash
# Starts the demo: the upstream FHIR server with demo data, the token issuer with demo
# clients for two tenants, and (PROXY section below) the proxy in front of them.
# State lives in .stack/demo/: pid files, logs, issuer.json, and `env` (ports, URLs,
# client credentials; `source .stack/demo/env` to use them). Stop with scripts/demo-down.sh.
#
# Usage: scripts/demo-up.sh
# Fixed ports instead of free ones: DEMO_FHIR_PORT, DEMO_ISSUER_PORT, DEMO_PROXY_PORT.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

demo=$STACK_DIR/demo
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
while [[ $issuer_port == "$fhir_port" ]]; do issuer_port=$(free_port); done
while [[ $proxy_port == "$fhir_port" || $proxy_port == "$issuer_port" ]]; do proxy_port=$(free_port); done

issuer_url=http://127.0.0.1:$issuer_port
tenant1_aud=http://127.0.0.1:$proxy_port/demo
tenant2_aud=http://127.0.0.1:$proxy_port/demo2

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
  "resources": ["$tenant1_aud", "$tenant2_aud"],
  "clients": [
    {
      "client_id": "demo-patient-app", "client_secret": "demo-patient-secret",
      "scopes": "openid fhirUser launch/patient patient/Patient.rs patient/Observation.rs patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory patient/Condition.rs patient/AllergyIntolerance.rs patient/MedicationRequest.rs patient/Medication.rs patient/Encounter.rs",
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

# PROXY: ---------------------------------------------------------------------------------
# PROXY: start smart-fhir-proxy on 127.0.0.1:$proxy_port with tenants `demo` (audience
# PROXY: $tenant1_aud) and `demo2` (audience $tenant2_aud), both in front of $fhir_base,
# PROXY: trusting $issuer_url (JWKS $issuer_url/jwks); write its pid to $demo/proxy.pid
# PROXY: and its log to $demo/proxy.log; wait for it with lib/wait-http.sh.
# PROXY:
# PROXY: tour (curl calls), e.g.:
# PROXY:   t=$(token demo-patient-app:demo-patient-secret "patient/Observation.rs" "$tenant1_aud")
# PROXY:   curl -H "Authorization: Bearer $t" "$tenant1_aud/Observation?category=laboratory"
# PROXY: ---------------------------------------------------------------------------------

trap - ERR
log "demo up in $((SECONDS - started))s"
cat <<EOF
FHIR server  $fhir_base   (pid $(<"$demo/fhir/server.pid"), log $demo/fhir/server.log)
Issuer       $issuer_url   (pid $(<"$demo/issuer.pid"), log $demo/issuer.log)
Proxy port   $proxy_port   tenants $tenant1_aud and $tenant2_aud
State        $demo/env
Stop         scripts/demo-down.sh
EOF
