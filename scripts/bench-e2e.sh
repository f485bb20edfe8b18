#!/usr/bin/env bash
# End-to-end load benchmark: smart-fhir-proxy against a plain pass-through proxy
# (examples/passthrough.rs, same hyper stack, no authorization), measured in the same
# run, in front of the same upstream. Two upstreams:
#   static  examples/static_upstream.rs, fixed answers in microseconds: shows the proxy's
#           own cost (token, scopes, narrowing, response checks, URL rewriting);
#   real    the HAPI FHIR JPA server with tests/fixtures/base-bundle.json.
# Besides the compartment tenants, two `openfga` tenants per upstream decide `user/`
# scopes with a real OpenFGA server (memory datastore; a store with
# fga-model/model.json and a care team viewing an organization tree with p1, p2 and p10):
# `cache_ttl_seconds: 3600` (decisions cached: the proxy's own cost) and
# `cache_ttl_seconds: 0` (every request asks OpenFGA over loopback: a BatchCheck per read,
# a StreamedListObjects per search). Their rows are compared with the same pass-through.
# Every server binds to 127.0.0.1 on a free port and is stopped on exit; the load is
# bounded in requests and seconds.
#
# Usage: scripts/bench-e2e.sh            (BENCH_REQUESTS=4000 BENCH_CONCURRENCY=8 to change)
# Output: a table on stdout and target/bench-e2e/results.json.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

requests=${BENCH_REQUESTS:-4000}
real_requests=${BENCH_REAL_REQUESTS:-600}
concurrency=${BENCH_CONCURRENCY:-8}
out_dir=$REPO_ROOT/target/bench-e2e
work=$(mktemp -d)
mkdir -p "$out_dir"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

"$SCRIPTS_DIR/install.sh" >&2
log "building release binaries"
(cd "$REPO_ROOT" && cargo build --release --locked --quiet --bin smart-fhir-proxy \
  --example passthrough --example static_upstream --example loadgen)
bin=$REPO_ROOT/target/release
start() { # LOG CMD...: start in the background, remember the pid
  local logfile=$1
  shift
  "$@" >"$logfile" 2>&1 &
  pids+=("$!")
}

static_port=$(free_port); pass_static_port=$(free_port); pass_real_port=$(free_port)
proxy_port=$(free_port); issuer_port=$(free_port); fhir_port=$(free_port)
start "$work/static.log" "$bin/examples/static_upstream" "127.0.0.1:$static_port" 20
start "$work/pass-static.log" "$bin/examples/passthrough" "127.0.0.1:$pass_static_port" "http://127.0.0.1:$static_port/fhir"
# Full JIT for HAPI (no --fast-start), and a warm-up below before anything is measured.
fhir_base=$("$SCRIPTS_DIR/fhir-server.sh" --port "$fhir_port" --data-dir "$work/fhir" --parent-pid $$ \
  --load "$REPO_ROOT/tests/fixtures/base-bundle.json" --quiet --no-fast-start --xmx 1g)
pids+=("$(<"$work/fhir/server.pid")")
start "$work/pass-real.log" "$bin/examples/passthrough" "127.0.0.1:$pass_real_port" "$fhir_base"

# OpenFGA: user:bench-user is a member of a care team that views the hospital, whose
# ward holds the upstreams' patients (the real one has p1, p2 and p10; the fixed one
# answers with p1's records).
{
  echo '['
  echo '{"user": "organization:bench-hospital", "relation": "parent", "object": "organization:bench-ward"},'
  echo '{"user": "group:bench-team#member", "relation": "viewer", "object": "organization:bench-hospital"},'
  echo '{"user": "user:bench-user", "relation": "member", "object": "group:bench-team"},'
  echo '{"user": "organization:bench-ward", "relation": "assigned_organization", "object": "patient:p1"},'
  echo '{"user": "organization:bench-ward", "relation": "assigned_organization", "object": "patient:p2"},'
  echo '{"user": "organization:bench-ward", "relation": "assigned_organization", "object": "patient:p10"}'
  echo ']'
} >"$work/fga-tuples.json"
openfga_url=$("$SCRIPTS_DIR/openfga-server.sh" --port 0 --data-dir "$work/openfga" --parent-pid $$) \
  || die "OpenFGA did not start"
pids+=("$(<"$work/openfga/openfga.pid")")
fga_json() { "$VENV/bin/python" -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }
fga_store=$(curl -fsS -X POST "$openfga_url/stores" -d '{"name": "bench"}' | fga_json id)
fga_model=$(curl -fsS -X POST "$openfga_url/stores/$fga_store/authorization-models" \
  -d @"$REPO_ROOT/fga-model/model.json" | fga_json authorization_model_id)
"$VENV/bin/python" -c 'import json, sys; print(json.dumps({"writes": {"tuple_keys": json.load(open(sys.argv[1]))}, "authorization_model_id": sys.argv[2]}))' \
  "$work/fga-tuples.json" "$fga_model" >"$work/fga-write.json"
curl -fsS -o /dev/null -X POST "$openfga_url/stores/$fga_store/write" -d @"$work/fga-write.json" \
  || die "writing the OpenFGA tuples failed"

issuer_url=http://127.0.0.1:$issuer_port
cat >"$work/issuer.json" <<JSON
{ "issuer": "$issuer_url", "port": $issuer_port, "resources": ["http://127.0.0.1:$proxy_port/*"],
  "clients": [ { "client_id": "bench", "client_secret": "bench", "scopes": "*", "patient": "p1", "fhirUser": "Patient/p1" },
               { "client_id": "bench-user", "client_secret": "bench-user", "scopes": "*", "fhirUser": "Practitioner/pr1" } ] }
JSON
"$SCRIPTS_DIR/issuer-server.sh" --config "$work/issuer.json" --parent-pid $$ \
  --pid-file "$work/issuer.pid" --log "$work/issuer.log" >/dev/null
pids+=("$(<"$work/issuer.pid")")

tenant() { # ID UPSTREAM [AUTHORIZATION_JSON]
  local authz='{ "mode": "compartment" }'
  [[ -n ${3:-} ]] && authz=$3
  cat <<JSON
  "$1": { "public_base_url": "http://127.0.0.1:$proxy_port/$1", "upstream": { "base_url": "$2" },
    "token": { "issuers": ["$issuer_url"], "jwks_uri": "$issuer_url/jwks", "audience": "http://127.0.0.1:$proxy_port/$1" },
    "smart": { "authorization_endpoint": "$issuer_url/auth", "token_endpoint": "$issuer_url/token" },
    "authorization": $authz }
JSON
}
fga() { # CACHE_TTL_SECONDS
  printf '{ "mode": "openfga", "openfga": { "api_url": "%s", "store_id": "%s", "authorization_model_id": "%s", "cache_ttl_seconds": %s } }' \
    "$openfga_url" "$fga_store" "$fga_model" "$1"
}
{
  echo '{"tenants": {'
  tenant static "http://127.0.0.1:$static_port/fhir"; echo ','
  tenant real "$fhir_base"; echo ','
  tenant fga-hit-static "http://127.0.0.1:$static_port/fhir" "$(fga 3600)"; echo ','
  tenant fga-miss-static "http://127.0.0.1:$static_port/fhir" "$(fga 0)"; echo ','
  tenant fga-hit "$fhir_base" "$(fga 3600)"; echo ','
  tenant fga-miss "$fhir_base" "$(fga 0)"
  echo '}}'
} >"$work/tenants.json"
start "$work/proxy.log" env RUST_LOG=warn "$bin/smart-fhir-proxy" --tenants "$work/tenants.json" --listen "127.0.0.1:$proxy_port"
for port in "$static_port" "$pass_static_port" "$pass_real_port" "$proxy_port"; do
  "$SCRIPTS_DIR/lib/wait-http.sh" "http://127.0.0.1:$port/" 20 >/dev/null 2>&1 || true
done
"$SCRIPTS_DIR/lib/wait-http.sh" "http://127.0.0.1:$proxy_port/_health" 20 >/dev/null

token() { # TENANT [CLIENT SCOPE] (the client's secret is its id)
  local client=${2:-bench} scope=${3:-patient/Observation.rs}
  curl -fsS -u "$client:$client" --data-urlencode grant_type=client_credentials \
    --data-urlencode "scope=$scope" --data-urlencode "resource=http://127.0.0.1:$proxy_port/$1" \
    "$issuer_url/token" | "$VENV/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["access_token"])'
}
static_token=$(token static)
real_token=$(token real)
fga_scope="user/Observation.rs user/Patient.rs"
declare -A fga_token
for t in fga-hit-static fga-miss-static fga-hit fga-miss; do
  fga_token[$t]=$(token "$t" bench-user "$fga_scope")
done

# Each openfga tenant must release records before it is measured (an empty answer
# would be cheap and still 200).
matches() { # URL TOKEN: the number of entries (search) or 1 (a resource)
  curl -fsS -H "Authorization: Bearer $2" "$1" | "$VENV/bin/python" -c '
import json, sys
r = json.load(sys.stdin)
print(len(r.get("entry", [])) if r.get("resourceType") == "Bundle" else int(r.get("resourceType") == "Observation"))'
}
for t in fga-hit-static fga-miss-static fga-hit fga-miss; do
  read_path=Observation/obs-p1-glucose search_path="Observation?_count=50"
  [[ $t == *-static ]] && read_path=Observation/obs-0
  n_read=$(matches "http://127.0.0.1:$proxy_port/$t/$read_path" "${fga_token[$t]}") || die "$t: read failed"
  n_search=$(matches "http://127.0.0.1:$proxy_port/$t/$search_path" "${fga_token[$t]}") || die "$t: search failed"
  ((n_read == 1 && n_search > 0)) || die "$t: released $n_read read, $n_search search entries"
  log "$t: read released, search released $n_search entries"
done

run() { # NAME N URL [TOKEN]
  local args=("$3" --requests "$2" --concurrency "$concurrency" --max-seconds 60)
  [[ -n ${4:-} ]] && args+=(--header "Authorization: Bearer $4")
  "$bin/examples/loadgen" "${args[@]}" | sed "s/^/{\"name\":\"$1\",\"result\":/; s/\$/}/"
}
# Warm-up, not measured: HAPI's JIT and caches, the proxy's pools and token cache.
warm_requests=${BENCH_WARM_REQUESTS:-400}
log "warming up HAPI and the proxies ($warm_requests requests per real scenario)"
for url_token in \
  "http://127.0.0.1:$pass_real_port/t/Observation/obs-p1-glucose|" \
  "http://127.0.0.1:$proxy_port/real/Observation/obs-p1-glucose|$real_token" \
  "http://127.0.0.1:$pass_real_port/t/Observation?subject=Patient/p1|" \
  "http://127.0.0.1:$proxy_port/real/Observation|$real_token" \
  "http://127.0.0.1:$pass_real_port/t/Observation?_count=50|" \
  "http://127.0.0.1:$proxy_port/fga-hit/Observation?_count=50|${fga_token[fga-hit]}"; do
  run warm-up "$warm_requests" "${url_token%%|*}" "${url_token#*|}" >/dev/null
done
log "running: $requests requests per static scenario, $real_requests per real one, concurrency $concurrency"
{
  run static-read-passthrough "$requests" "http://127.0.0.1:$pass_static_port/t/Observation/obs-0"
  run static-read-proxy "$requests" "http://127.0.0.1:$proxy_port/static/Observation/obs-0" "$static_token"
  run static-search-passthrough "$requests" "http://127.0.0.1:$pass_static_port/t/Observation"
  run static-search-proxy "$requests" "http://127.0.0.1:$proxy_port/static/Observation" "$static_token"
  run real-read-passthrough "$real_requests" "http://127.0.0.1:$pass_real_port/t/Observation/obs-p1-glucose"
  run real-read-proxy "$real_requests" "http://127.0.0.1:$proxy_port/real/Observation/obs-p1-glucose" "$real_token"
  # The search the proxy sends for the patient token (HAPI has no compartment search).
  run real-search-passthrough "$real_requests" "http://127.0.0.1:$pass_real_port/t/Observation?subject=Patient/p1"
  run real-search-proxy "$real_requests" "http://127.0.0.1:$proxy_port/real/Observation" "$real_token"
  for cache in hit miss; do
    run "static-read-fga-$cache" "$requests" "http://127.0.0.1:$proxy_port/fga-$cache-static/Observation/obs-0" "${fga_token[fga-$cache-static]}"
    run "static-search-fga-$cache" "$requests" "http://127.0.0.1:$proxy_port/fga-$cache-static/Observation?_count=20" "${fga_token[fga-$cache-static]}"
  done
  run real-search-all-passthrough "$real_requests" "http://127.0.0.1:$pass_real_port/t/Observation?_count=50"
  for cache in hit miss; do
    run "real-read-fga-$cache" "$real_requests" "http://127.0.0.1:$proxy_port/fga-$cache/Observation/obs-p1-glucose" "${fga_token[fga-$cache]}"
    run "real-search-fga-$cache" "$real_requests" "http://127.0.0.1:$proxy_port/fga-$cache/Observation?_count=50" "${fga_token[fga-$cache]}"
  done
} >"$out_dir/results.jsonl"

"$VENV/bin/python" - "$out_dir/results.jsonl" "$out_dir/results.json" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
json.dump(rows, open(sys.argv[2], "w"), indent=2)
by = {r["name"]: r["result"] for r in rows}
print("| scenario | pass-through rps | proxy rps | rps ratio | pass-through p50 / p99 ms | proxy p50 / p99 ms | p50 ratio | proxy statuses |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
# (row, pass-through run, proxy run): compartment tenants, then openfga tenants with
# cached decisions (hit) and without (miss), each against the same pass-through.
table = [(s, f"{s}-passthrough", f"{s}-proxy") for s in ["static-read", "static-search", "real-read", "real-search"]]
for s, base in [("static-read", "static-read"), ("static-search", "static-search"),
                ("real-read", "real-read"), ("real-search", "real-search-all")]:
    table += [(f"{s}-fga-{c}", f"{base}-passthrough", f"{s}-fga-{c}") for c in ["hit", "miss"]]
for s, pn, xn in table:
    p, x = by[pn], by[xn]
    print(f"| {s} | {p['rps']:.0f} | {x['rps']:.0f} | {x['rps'] / p['rps']:.2f} | "
          f"{p['p50_ms']:.2f} / {p['p99_ms']:.2f} | {x['p50_ms']:.2f} / {x['p99_ms']:.2f} | "
          f"{x['p50_ms'] / max(p['p50_ms'], 1e-9):.2f} | {x['statuses']} |")
bad = [n for n, r in by.items() if r["errors"] or any(k != "200" for k in r["statuses"])]
if bad:
    print(f"\nnon-200 answers or errors in: {', '.join(bad)}")
    sys.exit(1)
PY
