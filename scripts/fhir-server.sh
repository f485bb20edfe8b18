#!/usr/bin/env bash
# Starts the upstream FHIR R4 server (sekmet-fhir) on 127.0.0.1, waits until it serves,
# loads data, prints its base URL (http://127.0.0.1:PORT/fhir) on stdout and returns.
# The server keeps running in the background; its pid is in DATA_DIR/server.pid and its
# output in DATA_DIR/server.log. Stop it with: kill -TERM "$(cat DATA_DIR/server.pid)".
#
# Usage: scripts/fhir-server.sh --port P --data-dir D [options]
#   --port P               TCP port on 127.0.0.1 (required)
#   --data-dir D           directory for settings.yaml, the SQLite db, pid and log (required)
#   --parent-pid N         stop the server once process N is gone (watchdog, polled every second)
#   --load FILE            load a batch/transaction Bundle after start (repeatable);
#                          `__FHIR_BASE__` in FILE becomes the base URL
#   --reset                delete an existing database in D first (default: reuse it)
#   --public-base URL      base URL the server writes into fullUrl, links and Location
#                          (default http://127.0.0.1:P/fhir); it ignores Host and X-Forwarded-*
#   --absolute-references  answer with absolute references (Type/id -> BASE/Type/id)
#   --quiet                no access log (by default every request is logged to server.log,
#                          which shows what a proxy sent upstream)
#   --timeout S            seconds to wait for readiness (default 30)
#   --foreground           stay in the foreground until the server exits (SIGTERM stops it)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

usage() { print_usage "${BASH_SOURCE[0]}"; exit 64; }

port="" data_dir="" parent_pid="" reset=false public_base="" absolute=false timeout=30 foreground=false
quiet=false
loads=()
while (($# > 0)); do
  case $1 in
    --port) port=${2:?}; shift 2 ;;
    --data-dir) data_dir=${2:?}; shift 2 ;;
    --parent-pid) parent_pid=${2:?}; shift 2 ;;
    --load) loads+=("$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"); shift 2 ;;
    --reset) reset=true; shift ;;
    --public-base) public_base=${2:?}; shift 2 ;;
    --absolute-references) absolute=true; shift ;;
    --quiet) quiet=true; shift ;;
    --timeout) timeout=${2:?}; shift 2 ;;
    --foreground) foreground=true; shift ;;
    -h | --help) usage ;;
    *) log "unknown argument: $1"; usage ;;
  esac
done
[[ $port =~ ^[0-9]+$ ]] || { log "--port is required"; usage; }
[[ -n $data_dir ]] || { log "--data-dir is required"; usage; }
[[ -x $VENV/bin/sekmet ]] || die "FHIR server not installed ($VENV/bin/sekmet missing): run scripts/install.sh"

mkdir -p "$data_dir"
data_dir=$(cd "$data_dir" && pwd)
base="http://127.0.0.1:$port/fhir"
public_base=${public_base:-$base}
pid_file=$data_dir/server.pid
log_file=$data_dir/server.log

if [[ -f $pid_file ]] && pid_alive "$(<"$pid_file")"; then
  die "a server from $data_dir is already running (pid $(<"$pid_file"))"
fi
if curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$port/fhir/metadata" 2>/dev/null; then
  die "something already answers at http://127.0.0.1:$port/fhir/metadata: port in use"
fi
if $reset; then
  rm -f "$data_dir"/sekmet.db "$data_dir"/sekmet.db-wal "$data_dir"/sekmet.db-shm
fi

# Settings: no inbound auth, no workflow simulator (it would answer MedicationRequest and
# friends with new resources), no traffic log (every request would be written to SQLite).
cat >"$data_dir/settings.yaml" <<YAML
base_url: "$public_base"
host: 127.0.0.1
port: $port
data_dir: "$data_dir"
own_private_key_path: "$data_dir/keys/sekmet_private.pem"
log_inbound: false
simulator:
  enabled: false
server_behaviour:
  absolute_references: $absolute
YAML

# uvicorn directly rather than `sekmet serve`, to control the access log.
cmd=(env "SEKMET_CONFIG=$data_dir/settings.yaml" "$VENV/bin/uvicorn" sekmet.main:app_factory --factory
  --host 127.0.0.1 --port "$port")
if $quiet; then cmd+=(--log-level warning --no-access-log); else cmd+=(--log-level info); fi
if [[ -n $parent_pid ]]; then
  cmd=("$SCRIPTS_DIR/lib/watchdog.sh" "$parent_pid" "${cmd[@]}")
fi
# Own working directory (sekmet writes relative paths such as reports/), no terminal
# streams: a caller reading our stdout must see EOF when this script returns.
(cd "$data_dir" && exec "${cmd[@]}") </dev/null >"$log_file" 2>&1 &
pid=$!
echo "$pid" >"$pid_file"

if ! "$SCRIPTS_DIR/lib/wait-http.sh" "http://127.0.0.1:$port/fhir/metadata" "$timeout" "$pid" || ! pid_alive "$pid"; then
  log "FHIR server did not start; last lines of $log_file:"
  tail -n 20 "$log_file" >&2 || true
  stop_pidfile "$pid_file"
  exit 1
fi

if ((${#loads[@]} > 0)); then
  if ! "$VENV/bin/python" "$SCRIPTS_DIR/lib/load_bundle.py" --placeholder-base="$public_base" \
    "http://127.0.0.1:$port/fhir" "${loads[@]}"; then
    stop_pidfile "$pid_file"
    die "loading data failed"
  fi
fi

log "FHIR server pid $pid, log $log_file"
echo "$public_base"

if $foreground; then
  trap 'stop_pid "$pid"' TERM INT HUP
  wait "$pid"
fi
