#!/usr/bin/env bash
# Starts the OAuth2 token issuer (oidc-provider, scripts/issuer/issuer.mjs) in the
# background, waits for its discovery document, prints the issuer URL and returns.
#
# Usage: scripts/issuer-server.sh --config FILE [options]
#   --config FILE     issuer config JSON (format: scripts/issuer/issuer.mjs, scripts/README.md)
#   --parent-pid N    the issuer exits once process N is gone (polled every second)
#   --pid-file F      where to write the issuer pid (default: FILE with .pid instead of .json)
#   --log F           issuer output (default: FILE with .log instead of .json)
#   --timeout S       seconds to wait for readiness (default 30)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

usage() { print_usage "${BASH_SOURCE[0]}"; exit 64; }

config="" parent_pid="" pid_file="" log_file="" timeout=30
while (($# > 0)); do
  case $1 in
    --config) config=${2:?}; shift 2 ;;
    --parent-pid) parent_pid=${2:?}; shift 2 ;;
    --pid-file) pid_file=${2:?}; shift 2 ;;
    --log) log_file=${2:?}; shift 2 ;;
    --timeout) timeout=${2:?}; shift 2 ;;
    -h | --help) usage ;;
    *) log "unknown argument: $1"; usage ;;
  esac
done
[[ -f $config ]] || { log "--config FILE is required"; usage; }
[[ -f $ISSUER_DIR/node_modules/oidc-provider/package.json ]] \
  || die "token issuer not installed ($ISSUER_DIR/node_modules missing): run scripts/install.sh"
command -v node >/dev/null || die "node not found on PATH"

config=$(cd "$(dirname "$config")" && pwd)/$(basename "$config")
pid_file=${pid_file:-${config%.json}.pid}
log_file=${log_file:-${config%.json}.log}
issuer=$(node -e 'process.stdout.write(JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")).issuer ?? "")' "$config")
[[ -n $issuer ]] || die "$config has no \"issuer\""

if curl -fsS -o /dev/null --max-time 2 "$issuer/.well-known/openid-configuration" 2>/dev/null; then
  die "something already answers at $issuer/.well-known/openid-configuration: port in use"
fi
args=("$ISSUER_DIR/issuer.mjs" "$config")
[[ -n $parent_pid ]] && args+=(--parent-pid "$parent_pid")
node "${args[@]}" </dev/null >"$log_file" 2>&1 &
pid=$!
echo "$pid" >"$pid_file"

# Ready when discovery answers and our process has said it listens (not another one).
ready() {
  "$SCRIPTS_DIR/lib/wait-http.sh" "$issuer/.well-known/openid-configuration" "$timeout" "$pid" || return 1
  local i
  for ((i = 0; i < 50; i++)); do
    grep -q "\"ready\":true,.*\"pid\":$pid}" "$log_file" 2>/dev/null && return 0
    pid_alive "$pid" || return 1
    sleep 0.1
  done
  return 1
}
if ! ready; then
  log "issuer did not start; last lines of $log_file:"
  tail -n 20 "$log_file" >&2 || true
  stop_pidfile "$pid_file"
  exit 1
fi
log "issuer pid $pid, log $log_file"
echo "$issuer"
