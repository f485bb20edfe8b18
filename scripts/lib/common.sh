# shellcheck shell=bash
# Shared helpers for the stack scripts. Source it; it defines paths and small functions.
#
# Paths and pinned versions (override paths with the environment variables in brackets):
#   REPO_ROOT    repository root
#   STACK_DIR    installed components and demo state [SMART_FHIR_STACK_DIR, default REPO_ROOT/.stack]
#   VENV         Python venv with carebundle and the fga CLI (STACK_DIR/venv)
#   ISSUER_DIR   scripts/issuer (oidc-provider, its node_modules)
#   OPENFGA_BIN  the OpenFGA server binary [OPENFGA_BIN, default STACK_DIR/bin/openfga]
#   HAPI_DIR     the built HAPI FHIR server (STACK_DIR/hapi)
#   CARGO_DENY_VERSION  the cargo-deny that deny.toml is written for (installed by install.sh)
#   CARGO_FUZZ   cargo-fuzz, for scripts/fuzz.sh (STACK_DIR/cargo-fuzz/bin/cargo-fuzz)

SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPO_ROOT=$(cd "$SCRIPTS_DIR/.." && pwd)
STACK_DIR=${SMART_FHIR_STACK_DIR:-$REPO_ROOT/.stack}
VENV=$STACK_DIR/venv
ISSUER_DIR=$SCRIPTS_DIR/issuer
OPENFGA_BIN=${OPENFGA_BIN:-$STACK_DIR/bin/openfga}
HAPI_DIR=$STACK_DIR/hapi
CARGO_DENY_VERSION=0.20.2
CARGO_FUZZ=$STACK_DIR/cargo-fuzz/bin/cargo-fuzz
export SCRIPTS_DIR REPO_ROOT STACK_DIR VENV ISSUER_DIR OPENFGA_BIN HAPI_DIR CARGO_DENY_VERSION CARGO_FUZZ

log() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# require_installed: fail with a pointer to install.sh when a component is missing.
require_installed() {
  [[ -f $HAPI_DIR/app.jar ]] \
    || die "FHIR server not installed ($HAPI_DIR/app.jar missing): run scripts/install.sh"
  [[ -x $VENV/bin/carebundle ]] \
    || die "demo data generator not installed ($VENV missing): run scripts/install.sh"
  [[ -x $OPENFGA_BIN ]] || die "OpenFGA not installed ($OPENFGA_BIN missing): run scripts/install.sh"
  [[ -f $ISSUER_DIR/node_modules/oidc-provider/package.json ]] \
    || die "token issuer not installed ($ISSUER_DIR/node_modules missing): run scripts/install.sh"
  command -v node >/dev/null || die "node not found on PATH"
}

# free_port: print a TCP port on 127.0.0.1 that was free a moment ago.
free_port() { "$SCRIPTS_DIR/lib/free-port.sh"; }

# pid_alive PID: true while the process exists (zombies count as gone).
pid_alive() {
  local state
  kill -0 "$1" 2>/dev/null || return 1
  state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
  [[ $state != Z* ]]
}

# stop_pid PID [GRACE_SECONDS]: SIGTERM, wait, then SIGKILL.
stop_pid() {
  local pid=$1 grace=${2:-5} i
  pid_alive "$pid" || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < grace * 10; i++)); do
    pid_alive "$pid" || return 0
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
}

# stop_pidfile FILE: stop the process whose pid FILE holds, then remove FILE.
stop_pidfile() {
  local file=$1 pid
  [[ -f $file ]] || return 0
  pid=$(<"$file")
  [[ $pid =~ ^[0-9]+$ ]] && stop_pid "$pid"
  rm -f "$file"
}

# print_usage FILE: print FILE's header comment (line 2 up to the first non-comment line).
print_usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$1" >&2
}
