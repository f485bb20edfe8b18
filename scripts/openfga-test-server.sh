#!/usr/bin/env bash
# Starts the OpenFGA-API-compatible TEST server (examples/openfga_test_server.rs over
# tests/openfga/; in-memory stores, a dev and demo tool, not OpenFGA itself) on
# 127.0.0.1, waits until it serves, prints its API URL (http://127.0.0.1:PORT) on stdout
# and returns. The server keeps running in the background; its pid is in
# DATA_DIR/openfga.pid and its output in DATA_DIR/openfga.log. Stores live in memory
# only: a restart starts empty. Stop it with: kill -TERM "$(cat DATA_DIR/openfga.pid)".
#
# Usage: scripts/openfga-test-server.sh --port P --data-dir D [options] [-- SERVER_ARGS...]
#   --port P          TCP port on 127.0.0.1 (required; 0 picks a free one, the printed
#                     URL tells which)
#   --data-dir D      directory for the pid file and the log (required)
#   --parent-pid N    stop the server once process N is gone (watchdog, polled every second)
#   --bin PATH        prebuilt openfga_test_server binary (default: build it with
#                     `cargo build --release --example openfga_test_server` first)
#   --timeout S       seconds to wait for readiness, after any build (default 30)
#   --foreground      stay in the foreground until the server exits (SIGTERM stops it)
#   -- SERVER_ARGS    passed on to the server, e.g. `-- --model fga-model/model.json
#                     --tuples fga-model/tuples.example.json` (a preloaded store; its ids
#                     are logged to stderr) or `-- --latency-ms 50`; `--help` lists them
#
# Then, for example: smart-fhir-proxy seed-openfga --api-url URL --fhir-base FHIR_BASE
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

usage() { print_usage "${BASH_SOURCE[0]}"; exit 64; }

port="" data_dir="" parent_pid="" bin="" timeout=30 foreground=false
server_args=()
while (($# > 0)); do
  case $1 in
    --port) port=${2:?}; shift 2 ;;
    --data-dir) data_dir=${2:?}; shift 2 ;;
    --parent-pid) parent_pid=${2:?}; shift 2 ;;
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

mkdir -p "$data_dir"
data_dir=$(cd "$data_dir" && pwd)
pid_file=$data_dir/openfga.pid
log_file=$data_dir/openfga.log

if [[ -f $pid_file ]] && pid_alive "$(<"$pid_file")"; then
  die "a server from $data_dir is already running (pid $(<"$pid_file"))"
fi
if ((port != 0)) && curl -fsS -o /dev/null --max-time 2 "http://127.0.0.1:$port/healthz" 2>/dev/null; then
  die "something already answers at http://127.0.0.1:$port/healthz: port in use"
fi

if [[ -z $bin ]]; then
  command -v cargo >/dev/null || die "cargo not found on PATH (or give a prebuilt binary with --bin)"
  log "building the OpenFGA test server (cargo build --release --example openfga_test_server)"
  # Build output to stderr: our stdout carries only the URL.
  (cd "$REPO_ROOT" && cargo build --release --example openfga_test_server) >&2 \
    || die "building the OpenFGA test server failed"
  bin=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/examples/openfga_test_server
  [[ $bin == /* ]] || bin=$REPO_ROOT/$bin
fi
[[ -x $bin ]] || die "no executable OpenFGA test server at $bin"

# The server resolves --model/--tuples paths itself: run it from the caller's directory.
cmd=("$bin" --port "$port" "${server_args[@]}")
if [[ -n $parent_pid ]]; then
  cmd=("$SCRIPTS_DIR/lib/watchdog.sh" "$parent_pid" "${cmd[@]}")
fi
# No terminal streams: a caller reading our stdout must see EOF when this script returns.
"${cmd[@]}" </dev/null >"$log_file" 2>&1 &
pid=$!
echo "$pid" >"$pid_file"

# Ready when the server printed its URL (it does so once listening and loaded) and
# /healthz answers there. Reading the URL from our own log means the answer comes from
# our process, not from something else on the port.
url=""
deadline=$((SECONDS + timeout))
while ((SECONDS < deadline)); do
  url=$(sed -n 's/^OPENFGA_API_URL=//p' "$log_file" 2>/dev/null | head -n 1)
  [[ -n $url ]] && break
  pid_alive "$pid" || break
  sleep 0.1
done
if [[ -z $url ]] || ! "$SCRIPTS_DIR/lib/wait-http.sh" "$url/healthz" "$timeout" "$pid" || ! pid_alive "$pid"; then
  log "OpenFGA test server did not start; last lines of $log_file:"
  tail -n 20 "$log_file" >&2 || true
  stop_pidfile "$pid_file"
  exit 1
fi

while IFS= read -r line; do
  log "$line"
done < <(grep '^OPENFGA_\(STORE_ID\|AUTHORIZATION_MODEL_ID\)=' "$log_file" || true)
log "OpenFGA test server pid $pid, log $log_file"
echo "$url"

if $foreground; then
  trap 'stop_pid "$pid"' TERM INT HUP
  wait "$pid"
fi
