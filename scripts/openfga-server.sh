#!/usr/bin/env bash
# Starts a real OpenFGA server (`openfga run`, installed into .stack/bin by
# scripts/install.sh) on 127.0.0.1 with the in-memory datastore, waits until it serves,
# prints its HTTP API URL (http://127.0.0.1:PORT) on stdout and returns. The server keeps
# running in the background; its pid is in DATA_DIR/openfga.pid and its output in
# DATA_DIR/openfga.log. Stores live in memory: a restart starts empty. Its gRPC listener
# takes a second free port on 127.0.0.1; the playground, the metrics listener and the
# profiler are off. Stop it with: kill -TERM "$(cat DATA_DIR/openfga.pid)".
#
# Usage: scripts/openfga-server.sh --port P --data-dir D [options] [-- OPENFGA_RUN_ARGS...]
#   --port P               HTTP port on 127.0.0.1 (required; 0 picks a free one)
#   --data-dir D           directory for the pid file and the log (required)
#   --parent-pid N         stop the server once process N is gone (watchdog, polled every second)
#   --preshared-key KEY    require `Authorization: Bearer KEY` (OpenFGA's pre-shared-key authn)
#   --bin PATH             openfga binary (default: .stack/bin/openfga)
#   --timeout S            seconds to wait for readiness (default 30)
#   --foreground           stay in the foreground until the server exits (SIGTERM stops it)
#   -- OPENFGA_RUN_ARGS    passed on to `openfga run`, e.g. `-- --listObjects-deadline 300ms`
#                          or `-- --listObjects-max-results 100`
#
# Then, for example: smart-fhir-proxy seed-openfga --api-url URL --fhir-base FHIR_BASE
# For production use the PostgreSQL datastore instead (README, "OpenFGA mode").
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

usage() { print_usage "${BASH_SOURCE[0]}"; exit 64; }

port="" data_dir="" parent_pid="" bin=$OPENFGA_BIN timeout=30 foreground=false key=""
server_args=()
while (($# > 0)); do
  case $1 in
    --port) port=${2:?}; shift 2 ;;
    --data-dir) data_dir=${2:?}; shift 2 ;;
    --parent-pid) parent_pid=${2:?}; shift 2 ;;
    --preshared-key) key=${2:?}; shift 2 ;;
    --bin) bin=${2:?}; shift 2 ;;
    --timeout) timeout=${2:?}; shift 2 ;;
    --foreground) foreground=true; shift ;;
    --) shift; server_args=("$@"); break ;;
    -h | --help) usage ;;
    *) log "unknown argument: $1"; usage ;;
  esac
done
[[ $port =~ ^[0-9]+$ ]] || { log "--port is required"; usage; }
[[ -n $data_dir ]] || { log "--data-dir is required"; usage; }
[[ $timeout =~ ^[0-9]+$ ]] || { log "--timeout must be a number of seconds"; usage; }
[[ -x $bin ]] || die "OpenFGA not installed ($bin missing): run scripts/install.sh"

mkdir -p "$data_dir"
data_dir=$(cd "$data_dir" && pwd)
pid_file=$data_dir/openfga.pid
log_file=$data_dir/openfga.log

if [[ -f $pid_file ]] && pid_alive "$(<"$pid_file")"; then
  die "a server from $data_dir is already running (pid $(<"$pid_file"))"
fi
((port != 0)) || port=$(free_port)
if curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$port/healthz" 2>/dev/null; then
  die "something already answers at http://127.0.0.1:$port/healthz: port in use"
fi
grpc_port=$(free_port)
while ((grpc_port == port)); do grpc_port=$(free_port); done

cmd=("$bin" run
  --datastore-engine memory
  --http-addr "127.0.0.1:$port"
  --grpc-addr "127.0.0.1:$grpc_port"
  --playground-enabled=false
  --metrics-enabled=false
  --log-format json
  --log-level warn)
if [[ -n $key ]]; then
  cmd+=(--authn-method preshared --authn-preshared-keys "$key")
fi
cmd+=("${server_args[@]}")
if [[ -n $parent_pid ]]; then
  cmd=("$SCRIPTS_DIR/lib/watchdog.sh" "$parent_pid" "${cmd[@]}")
fi
# No terminal streams: a caller reading our stdout must see EOF when this script returns.
"${cmd[@]}" </dev/null >"$log_file" 2>&1 &
pid=$!
echo "$pid" >"$pid_file"

url="http://127.0.0.1:$port"
if ! "$SCRIPTS_DIR/lib/wait-http.sh" "$url/healthz" "$timeout" "$pid" || ! pid_alive "$pid"; then
  log "OpenFGA did not start; last lines of $log_file:"
  tail -n 20 "$log_file" >&2 || true
  stop_pidfile "$pid_file"
  exit 1
fi

log "OpenFGA pid $pid, log $log_file"
echo "$url"

if $foreground; then
  trap 'stop_pid "$pid"' TERM INT HUP
  wait "$pid"
fi
