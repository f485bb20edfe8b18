#!/usr/bin/env bash
# Stops the demo started by scripts/demo-up.sh (proxy, OpenFGA test server, issuer, FHIR server) through the
# pid files in .stack/demo/, and removes .stack/demo/env. Logs and data stay.
#
# Usage: scripts/demo-down.sh
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

demo=$STACK_DIR/demo
for pid_file in "$demo/proxy.pid" "$demo/openfga/openfga.pid" "$demo/issuer.pid" "$demo/fhir/server.pid"; do
  if [[ -f $pid_file ]]; then
    log "stopping pid $(<"$pid_file") ($pid_file)"
    stop_pidfile "$pid_file"
  fi
done
rm -f "$demo/env"
log "demo stopped"
