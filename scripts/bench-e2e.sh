#!/usr/bin/env bash
# End-to-end load benchmark of smart-fhir-proxy, in one run: the proxy's own cost per
# authorization mode, each compared with a plain pass-through proxy (examples/passthrough.rs,
# the same hyper stack, no authorization) in front of the same upstream.
#
# Usage: scripts/bench-e2e.sh [options]
#   --seconds S          measured seconds per row (default 4)
#   --warmup S           unmeasured seconds before each row, same connections (default 1)
#   --requests N         at most N measured requests per row (default 1000000)
#   --concurrency LIST   connections per row, comma separated (default 1,8,32)
#   --real               also the same rows in front of the real HAPI FHIR server
#                        (as many rows again, HAPI's start and a 15 s warm-up: 3-5 min more)
#   --soak SECONDS       afterwards, compartment-mode read and search at concurrency 32
#                        together for SECONDS (at most 100000 requests a second), sampling
#                        the proxy's resident set; the report gives first, last and peak
#   --no-pin             do not pin processes to CPUs
#   --markdown FILE      the report (default BENCHMARKS.md)
#   --plot FILE          latency vs concurrency, SVG (default docs/bench-latency.svg)
#   --json FILE          every measurement (default target/bench-e2e/results.json)
#
# Modes (rows), each for a read of Patient/p1 and the ~10 KB search Observation?patient=p1:
#   pass-through  examples/passthrough.rs, no authorization: the baseline
#   token-only    a `system/*.rs` token: token, scopes and forwarding, no record limits
#   compartment   a patient token (p1): searches narrowed, every answer checked
#   fga-hit       an `openfga` tenant, `user/` token, decisions cached (cache_ttl 3600)
#   fga-miss      the same without the cache (0): every request asks the real OpenFGA
# Upstreams: `static` (examples/static_upstream.rs, fixed answers in microseconds, so the
# proxy's own cost shows) and, with --real, `real` (HAPI with tests/fixtures/base-bundle.json).
#
# Pinning: on N >= 2 CPUs (taskset from util-linux), the load generator runs on the upper
# half of the CPUs and everything it measures (proxies, upstreams, OpenFGA) on the lower
# half: on 2 CPUs the load generator on CPU 1, the rest on CPU 0. Without taskset or with
# one CPU nothing is pinned, and the report says so.
#
# Every server binds to 127.0.0.1 on a free port and is stopped on exit; every row is
# bounded in requests and seconds. Outputs: the report, the plot and the JSON above;
# exits 1 (after writing them) if any row had a transport error or a non-2xx answer.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

quote() { # ARG: as typed in a shell, quoted only when it needs it
  if [[ $1 =~ ^[A-Za-z0-9_./,=:+-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
command_line="scripts/${0##*/}"
for arg in "$@"; do command_line+=" $(quote "$arg")"; done
seconds=4 warmup=1 requests=1000000 concurrency=1,8,32 real=false soak=0 pin=true
markdown=$REPO_ROOT/BENCHMARKS.md plot=$REPO_ROOT/docs/bench-latency.svg
json_out=$REPO_ROOT/target/bench-e2e/results.json
usage() { print_usage "${BASH_SOURCE[0]}"; exit 64; }
number() { [[ $2 =~ ^[0-9]+([.][0-9]+)?$ ]] || { log "$1 needs a number, not \`$2\`"; usage; }; }
while (($# > 0)); do
  case $1 in
    --seconds) number "$1" "${2:-}"; seconds=$2; shift 2 ;;
    --warmup) number "$1" "${2:-}"; warmup=$2; shift 2 ;;
    --requests) number "$1" "${2:-}"; requests=$2; shift 2 ;;
    --concurrency)
      [[ ${2:-} =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || { log "--concurrency needs a list like 1,8,32"; usage; }
      concurrency=$2; shift 2 ;;
    --real) real=true; shift ;;
    --soak) number "$1" "${2:-}"; soak=$2; shift 2 ;;
    --no-pin) pin=false; shift ;;
    --markdown) markdown=${2:?}; shift 2 ;;
    --plot) plot=${2:?}; shift 2 ;;
    --json) json_out=${2:?}; shift 2 ;;
    -h | --help) usage ;;
    *) log "unknown argument: $1"; usage ;;
  esac
done
IFS=, read -r -a levels <<<"$concurrency"

started_at=$SECONDS
out_dir=$REPO_ROOT/target/bench-e2e
work=$(mktemp -d)
mkdir -p "$out_dir"
pids=()
# shellcheck disable=SC2329 # run by the EXIT trap below
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

report=("$VENV/bin/python" "$SCRIPTS_DIR/bench-report.py")
"$SCRIPTS_DIR/install.sh" >&2
# Before anything of ours runs: the load average says whether the machine is quiet.
"${report[@]}" machine >"$work/machine.json"

# CPU sets: the load generator on the upper half of the CPUs this script may use, the
# measured processes on the lower half.
cpu_list() { # LIST like 0-3,6: one CPU id a line
  local part
  IFS=, read -r -a parts <<<"$1"
  for part in "${parts[@]}"; do
    if [[ $part == *-* ]]; then seq "${part%-*}" "${part#*-}"; else echo "$part"; fi
  done
}
mapfile -t cpus < <(cpu_list "$(awk '/^Cpus_allowed_list:/ { print $2 }' /proc/self/status)")
server_pin=() load_pin=() server_cpus="" load_cpus=""
if ! $pin; then
  pinning="not pinned (--no-pin): the load generator and the measured processes share all ${#cpus[@]} CPUs"
elif ! command -v taskset >/dev/null; then
  pinning="not pinned: taskset (util-linux) not found; the load generator and the measured processes share all ${#cpus[@]} CPUs"
elif ((${#cpus[@]} < 2)); then
  pinning="not pinned: one CPU, the load generator and the measured processes share it"
else
  n_load=$((${#cpus[@]} / 2))
  server_cpus=$(IFS=,; echo "${cpus[*]:0:${#cpus[@]}-n_load}")
  load_cpus=$(IFS=,; echo "${cpus[*]: -n_load}")
  server_pin=(taskset -c "$server_cpus") load_pin=(taskset -c "$load_cpus")
  pinning="load generator on CPU $load_cpus; proxies, upstreams and OpenFGA on CPU $server_cpus (taskset)"
fi
log "pinning: $pinning"

log "building release binaries"
(cd "$REPO_ROOT" && cargo build --release --locked --quiet --bin smart-fhir-proxy \
  --example passthrough --example static_upstream --example loadgen)
bin=$REPO_ROOT/target/release
declare -A pid_of # the processes whose CPU time and memory every row records
start() { # NAME CMD...: start pinned in the background (taskset execs, so $! is CMD's pid)
  local name=$1
  shift
  "${server_pin[@]}" "$@" >"$work/$name.log" 2>&1 &
  pids+=("$!")
  pid_of[$name]=$!
}

static_port=$(free_port); pass_static_port=$(free_port); proxy_port=$(free_port)
issuer_port=$(free_port)
# 13 Observations make a searchset Bundle of about 10 KB.
start upstream-static "$bin/examples/static_upstream" "127.0.0.1:$static_port" 13
start passthrough-static "$bin/examples/passthrough" "127.0.0.1:$pass_static_port" "http://127.0.0.1:$static_port/fhir"
declare -A upstream_url=([static]="http://127.0.0.1:$static_port/fhir")
declare -A passthrough_url=([static]="http://127.0.0.1:$pass_static_port/t")
upstreams=(static)
if $real; then
  fhir_port=$(free_port); pass_real_port=$(free_port)
  # Full JIT for HAPI (no --fast-start), and a warm-up below before anything is measured.
  # It starts on every CPU (on one, with full JIT, it takes minutes) and is pinned once
  # it is up: every thread it has (-a); threads it starts later inherit the set.
  upstream_url[real]=$("$SCRIPTS_DIR/fhir-server.sh" --port "$fhir_port" \
    --data-dir "$work/fhir" --parent-pid $$ --load "$REPO_ROOT/tests/fixtures/base-bundle.json" \
    --quiet --no-fast-start --xmx 1g --timeout 300)
  pid_of[upstream-real]=$(<"$work/fhir/server.pid")
  pids+=("${pid_of[upstream-real]}")
  if [[ -n $server_cpus ]]; then
    taskset -a -p -c "$server_cpus" "${pid_of[upstream-real]}" >/dev/null || die "pinning HAPI failed"
  fi
  start passthrough-real "$bin/examples/passthrough" "127.0.0.1:$pass_real_port" "${upstream_url[real]}"
  passthrough_url[real]="http://127.0.0.1:$pass_real_port/t"
  upstreams+=(real)
fi

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
openfga_url=$("${server_pin[@]}" "$SCRIPTS_DIR/openfga-server.sh" --port 0 --data-dir "$work/openfga" --parent-pid $$) \
  || die "OpenFGA did not start"
pid_of[openfga]=$(<"$work/openfga/openfga.pid")
pids+=("${pid_of[openfga]}")
fga_json() { "$VENV/bin/python" -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }
fga_store=$(curl -fsS -X POST "$openfga_url/stores" -d '{"name": "bench"}' | fga_json id)
fga_model=$(curl -fsS -X POST "$openfga_url/stores/$fga_store/authorization-models" \
  -d @"$REPO_ROOT/fga-model/model.json" | fga_json authorization_model_id)
"$VENV/bin/python" -c 'import json, sys; print(json.dumps({"writes": {"tuple_keys": json.load(open(sys.argv[1]))}, "authorization_model_id": sys.argv[2]}))' \
  "$work/fga-tuples.json" "$fga_model" >"$work/fga-write.json"
curl -fsS -o /dev/null -X POST "$openfga_url/stores/$fga_store/write" -d @"$work/fga-write.json" \
  || die "writing the OpenFGA tuples failed"

# The issuer is not measured (tokens are fetched once), so it is not pinned.
issuer_url=http://127.0.0.1:$issuer_port
cat >"$work/issuer.json" <<JSON
{ "issuer": "$issuer_url", "port": $issuer_port, "resources": ["http://127.0.0.1:$proxy_port/*"],
  "clients": [ { "client_id": "bench", "client_secret": "bench", "scopes": "*", "patient": "p1", "fhirUser": "Patient/p1" },
               { "client_id": "bench-system", "client_secret": "bench-system", "scopes": "*" },
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
  first=true
  for u in "${upstreams[@]}"; do
    $first || echo ','
    first=false
    tenant "$u" "${upstream_url[$u]}"; echo ','
    tenant "fga-hit-$u" "${upstream_url[$u]}" "$(fga 3600)"; echo ','
    tenant "fga-miss-$u" "${upstream_url[$u]}" "$(fga 0)"
  done
  echo '}}'
} >"$work/tenants.json"
start proxy env RUST_LOG=warn "$bin/smart-fhir-proxy" --tenants "$work/tenants.json" --listen "127.0.0.1:$proxy_port"
for port in "$static_port" "$pass_static_port" ${pass_real_port:+"$pass_real_port"}; do
  "$SCRIPTS_DIR/lib/wait-http.sh" "http://127.0.0.1:$port/" 20 >/dev/null 2>&1 || true
done
"$SCRIPTS_DIR/lib/wait-http.sh" "http://127.0.0.1:$proxy_port/_health" 20 "${pid_of[proxy]}" >/dev/null

token() { # TENANT CLIENT SCOPE (the client's secret is its id)
  curl -fsS -u "$2:$2" --data-urlencode grant_type=client_credentials \
    --data-urlencode "scope=$3" --data-urlencode "resource=http://127.0.0.1:$proxy_port/$1" \
    "$issuer_url/token" | "$VENV/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["access_token"])'
}
modes=(passthrough token-only compartment fga-hit fga-miss)
declare -A workload_path=([read]="Patient/p1" [search]="Observation?patient=p1")
declare -A base_url token_of # MODE/UPSTREAM
for u in "${upstreams[@]}"; do
  base_url[passthrough/$u]=${passthrough_url[$u]}
  base_url[token-only/$u]=http://127.0.0.1:$proxy_port/$u
  base_url[compartment/$u]=http://127.0.0.1:$proxy_port/$u
  base_url[fga-hit/$u]=http://127.0.0.1:$proxy_port/fga-hit-$u
  base_url[fga-miss/$u]=http://127.0.0.1:$proxy_port/fga-miss-$u
  token_of[passthrough/$u]=""
  token_of[token-only/$u]=$(token "$u" bench-system "system/*.rs")
  token_of[compartment/$u]=$(token "$u" bench "patient/Patient.rs patient/Observation.rs")
  for c in hit miss; do
    token_of[fga-$c/$u]=$(token "fga-$c-$u" bench-user "user/Patient.rs user/Observation.rs")
  done
done

# Every mode must answer what the pass-through answers before it is measured: an empty
# or refused answer would be cheap and, for a search, still 200.
answer() { # URL TOKEN: "Patient/p1" for the patient, or "Bundle:N" for a searchset of N
  local auth=()
  [[ -n $2 ]] && auth=(-H "Authorization: Bearer $2")
  curl -fsS "${auth[@]}" "$1" | "$VENV/bin/python" -c '
import json, sys
r = json.load(sys.stdin)
if r.get("resourceType") == "Bundle":
    print("Bundle:%d" % len(r.get("entry", [])))
else:
    print("%s/%s" % (r.get("resourceType"), r.get("id")))'
}
for u in "${upstreams[@]}"; do
  for w in read search; do
    expected=$(answer "${passthrough_url[$u]}/${workload_path[$w]}" "") || die "$u $w: pass-through failed"
    [[ $expected == Patient/p1 || ($expected == Bundle:* && $expected != Bundle:0) ]] \
      || die "$u $w: the pass-through answered $expected"
    for m in "${modes[@]:1}"; do
      got=$(answer "${base_url[$m/$u]}/${workload_path[$w]}" "${token_of[$m/$u]}") || die "$u $w $m: request failed"
      [[ $got == "$expected" ]] || die "$u $w $m: answered $got, the pass-through $expected"
    done
    log "$u $w: every mode answers $expected"
  done
done

affinity() { awk '/^Cpus_allowed_list:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo "?"; }
watch_args=() affinity_args=()
for name in "${!pid_of[@]}"; do
  watch_args+=(--watch "$name=${pid_of[$name]}")
  affinity_args+=(--affinity "$name=$(affinity "${pid_of[$name]}")")
done
load_affinity=$("${load_pin[@]}" grep '^Cpus_allowed_list:' /proc/self/status)
affinity_args+=(--affinity "loadgen=${load_affinity##*[[:space:]]}")
clk_tck=$(getconf CLK_TCK 2>/dev/null || echo 100)
load() { # URL TOKEN CONCURRENCY SECONDS WARMUP REQUESTS [LOADGEN_ARGS...]: one JSON line
  local args=("$1" --concurrency "$3" --max-seconds "$4" --warmup-seconds "$5" --requests "$6"
    --clk-tck "$clk_tck" "${watch_args[@]}" "${@:7}")
  [[ -n $2 ]] && args+=(--header "Authorization: Bearer $2")
  "${load_pin[@]}" "$bin/examples/loadgen" "${args[@]}"
}
row() { # UPSTREAM MODE WORKLOAD CONCURRENCY [WARMUP]
  local u=$1 m=$2 w=$3 c=$4 server=proxy result
  [[ $m == passthrough ]] && server=passthrough-$u
  result=$(load "${base_url[$m/$u]}/${workload_path[$w]}" "${token_of[$m/$u]}" "$c" "$seconds" \
    "${5:-$warmup}" "$requests")
  printf '{"upstream": "%s", "mode": "%s", "workload": "%s", "concurrency": %s, "server": "%s", "upstream_process": "upstream-%s", "result": %s}\n' \
    "$u" "$m" "$w" "$c" "$server" "$u" "$result"
  "$VENV/bin/python" -c '
import json, sys
r = json.loads(sys.argv[1])
print("%s: %.0f req/s, p50 %.2f ms, p99 %.2f ms, statuses %s, errors %d" % (
    sys.argv[2], r["rps"], r["p50_ms"], r["p99_ms"], r["statuses"], r["errors"]))' \
    "$result" "$u $w $m c=$c" >&2
}

n_rows=$((${#upstreams[@]} * 2 * ${#levels[@]} * ${#modes[@]}))
log "measuring $n_rows rows: ${warmup}s warm-up + ${seconds}s (at most $requests requests) each, concurrency $concurrency"
: >"$work/rows.jsonl"
for u in "${upstreams[@]}"; do
  if [[ $u == real ]]; then
    # HAPI's JIT and caches: unmeasured requests through the pass-through and the proxy.
    log "warming up HAPI (15 s)"
    for w in read search; do
      for m in passthrough compartment; do
        load "${base_url[$m/$u]}/${workload_path[$w]}" "${token_of[$m/$u]}" 8 3.75 0 1000000 >/dev/null
      done
    done
  fi
  # The modes of one workload and concurrency back to back, so their ratios compare
  # neighbouring seconds of the machine.
  for w in read search; do
    for c in "${levels[@]}"; do
      for m in "${modes[@]}"; do
        row "$u" "$m" "$w" "$c" >>"$work/rows.jsonl"
      done
    done
  done
done

soak_args=()
if [[ $soak != 0 ]]; then
  log "soak: compartment read and search at concurrency 16 each for ${soak}s, sampling the proxy's memory"
  soak_requests=$("$VENV/bin/python" -c 'import sys; print(int(float(sys.argv[1]) * 100000))' "$soak")
  sample=$("$VENV/bin/python" -c 'import sys; print(max(1.0, float(sys.argv[1]) / 120))' "$soak")
  load "${base_url[compartment/static]}/${workload_path[read]}" "${token_of[compartment/static]}" 16 \
    "$soak" 1 "$soak_requests" >"$work/soak-read.json" &
  soak_pid=$!
  pids+=("$soak_pid")
  load "${base_url[compartment/static]}/${workload_path[search]}" "${token_of[compartment/static]}" 16 \
    "$soak" 1 "$soak_requests" --sample-seconds "$sample" >"$work/soak-search.json"
  wait "$soak_pid"
  soak_args=(--soak "$work/soak-read.json" --soak "$work/soak-search.json")
fi

elapsed=$((SECONDS - started_at))
cp "$work/rows.jsonl" "$out_dir/rows.jsonl"
mkdir -p "$(dirname "$json_out")" "$(dirname "$markdown")" "$(dirname "$plot")"
"${report[@]}" assemble --machine "$work/machine.json" --rows "$work/rows.jsonl" "${soak_args[@]}" \
  --command "$command_line" --pinning "$pinning" --server-cpus "$server_cpus" --loadgen-cpus "$load_cpus" \
  "${affinity_args[@]}" --seconds "$seconds" --warmup "$warmup" --requests "$requests" \
  --elapsed "$elapsed" --out "$json_out"
status=0
"${report[@]}" render "$json_out" --markdown "$markdown" --plot "$plot" || status=$?
log "report $markdown, plot $plot, measurements $json_out"
log "elapsed: $((SECONDS - started_at)) s"
exit "$status"
