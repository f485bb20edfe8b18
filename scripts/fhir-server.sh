#!/usr/bin/env bash
# Starts the upstream FHIR R4 server (HAPI FHIR JPA server, H2) on 127.0.0.1, waits until it
# serves, loads data, prints its base URL (http://127.0.0.1:PORT/fhir) on stdout and returns.
# The server keeps running in the background; its pid is in DATA_DIR/server.pid, its output in
# DATA_DIR/hapi.log and its access log in DATA_DIR/server.log.
# Stop it with: kill -TERM "$(cat DATA_DIR/server.pid)".
#
# Usage: scripts/fhir-server.sh --port P --data-dir D [options]
#   --port P               TCP port on 127.0.0.1 (required)
#   --data-dir D           directory for the pid, logs and (with --persist) the H2 database (required)
#   --parent-pid N         stop the server once process N is gone (watchdog, polled every second)
#   --load FILE            load a batch/transaction Bundle after start (repeatable);
#                          `__FHIR_BASE__` in FILE becomes the base URL
#   --reset                delete an existing database in D first (with --persist)
#   --persist              keep the database in D/hapi.mv.db (default: in memory, gone on stop)
#   --public-base URL      base URL the server writes into fullUrl, links and Location
#                          (default: derived from each request, http://127.0.0.1:P/fhir)
#   --compartment-search   add compartment search (Patient/p1/Observation), which a stock
#                          HAPI JPA server does not have (the project's CompartmentSearchFilter)
#   --quiet                no access log (by default every request is logged to server.log,
#                          one line `127.0.0.1 - "GET /fhir/...?... HTTP/1.1" 200`)
#   --timeout S            seconds to wait for readiness (default 120)
#   --foreground           stay in the foreground until the server exits (SIGTERM stops it)
#   --build-dir DIR        the built server (default $STACK_DIR/hapi, see scripts/hapi/build.sh)
#   --no-fast-start        plain JVM flags (default: C1 only, serial GC, AppCDS archive if built)
#   --xmx SIZE             maximum heap (default 768m)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

usage() { print_usage "${BASH_SOURCE[0]}"; exit 64; }

port="" data_dir="" parent_pid="" reset=false persist=false public_base="" timeout=120 foreground=false
quiet=false fast=true xmx=768m build_dir=$STACK_DIR/hapi compartment=false
loads=()
while (($# > 0)); do
  case $1 in
    --port) port=${2:?}; shift 2 ;;
    --data-dir) data_dir=${2:?}; shift 2 ;;
    --parent-pid) parent_pid=${2:?}; shift 2 ;;
    --load) loads+=("$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"); shift 2 ;;
    --reset) reset=true; shift ;;
    --persist) persist=true; shift ;;
    --public-base) public_base=${2:?}; shift 2 ;;
    --quiet) quiet=true; shift ;;
    --compartment-search) compartment=true; shift ;;
    --timeout) timeout=${2:?}; shift 2 ;;
    --foreground) foreground=true; shift ;;
    --build-dir) build_dir=${2:?}; shift 2 ;;
    --fast-start) fast=true; shift ;;
    --no-fast-start) fast=false; shift ;;
    --xmx) xmx=${2:?}; shift 2 ;;
    -h | --help) usage ;;
    *) log "unknown argument: $1"; usage ;;
  esac
done
[[ $port =~ ^[0-9]+$ ]] || { log "--port is required"; usage; }
[[ -n $data_dir ]] || { log "--data-dir is required"; usage; }
[[ -f $build_dir/app.jar && -d $build_dir/lib ]] \
  || die "HAPI FHIR server not built ($build_dir/app.jar missing): run scripts/hapi/build.sh"
command -v java >/dev/null || die "java not found on PATH"

mkdir -p "$data_dir"
data_dir=$(cd "$data_dir" && pwd)
base="http://127.0.0.1:$port/fhir"
public_base=${public_base%/}
pid_file=$data_dir/server.pid
out_file=$data_dir/hapi.log
access_log=$data_dir/server.log

if [[ -f $pid_file ]] && pid_alive "$(<"$pid_file")"; then
  die "a server from $data_dir is already running (pid $(<"$pid_file"))"
fi
if curl -fsS -o /dev/null --max-time 2 "$base/metadata" 2>/dev/null; then
  die "something already answers at $base/metadata: port in use"
fi
if $reset; then
  rm -f "$data_dir"/hapi.mv.db "$data_dir"/hapi.trace.db
fi

java_opts=("-Xmx$xmx" -Xss1m -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true -Dfile.encoding=UTF-8)
if $fast; then
  # Start-up is dominated by class loading and JIT of Spring/Hibernate/HAPI: C1 only, serial
  # GC, and the AppCDS archive made by build.sh when it is there.
  java_opts+=(-XX:TieredStopAtLevel=1 -XX:+UseSerialGC -XX:CICompilerCount=1)
  if [[ -f $build_dir/app.jsa ]]; then
    java_opts+=(-XX:SharedArchiveFile="$build_dir/app.jsa" -Xshare:auto)
  fi
fi
args=(--port "$port")
[[ -n $public_base ]] && args+=(--public-base "$public_base")
$compartment && args+=(--compartment-search)
$quiet || { : >>"$access_log"; args+=(--access-log "$access_log"); }
if $persist; then args+=(--db "file:$data_dir/hapi"); else args+=(--db mem); fi

cmd=(java "${java_opts[@]}" -cp "$build_dir/lib/*:$build_dir/app.jar" org.smartfhirproxy.hapi.Main "${args[@]}")
if [[ -n $parent_pid ]]; then
  cmd=("$SCRIPTS_DIR/lib/watchdog.sh" "$parent_pid" "${cmd[@]}")
fi
# No terminal streams: a caller reading our stdout must see EOF when this script returns.
(cd "$data_dir" && exec "${cmd[@]}") </dev/null >"$out_file" 2>&1 &
pid=$!
echo "$pid" >"$pid_file"

if ! "$SCRIPTS_DIR/lib/wait-http.sh" "$base/metadata" "$timeout" "$pid" || ! pid_alive "$pid"; then
  log "HAPI FHIR server did not start; last lines of $out_file:"
  tail -n 20 "$out_file" >&2 || true
  stop_pidfile "$pid_file"
  exit 1
fi

if ((${#loads[@]} > 0)); then
  python=python3
  [[ -x $VENV/bin/python ]] && python=$VENV/bin/python
  if ! "$python" "$SCRIPTS_DIR/lib/load_bundle.py" --placeholder-base="${public_base:-$base}" \
    "$base" "${loads[@]}"; then
    stop_pidfile "$pid_file"
    die "loading data failed"
  fi
fi

if $quiet; then log "HAPI FHIR server pid $pid, output $out_file"; else log "HAPI FHIR server pid $pid, output $out_file, access log $access_log"; fi
echo "${public_base:-$base}"

if $foreground; then
  trap 'stop_pid "$pid" 30' TERM INT HUP
  wait "$pid"
fi
