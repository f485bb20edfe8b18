#!/usr/bin/env bash
# Regenerates compartments/ from the official FHIR R4 examples package on the npm
# registry (hl7.fhir.r4.examples@4.0.1, CC0-1.0): the five CompartmentDefinitions and
# the SearchParameters they reference (reduced), and every core R4 SearchParameter
# (reduced, for scope constraints). See compartments/README.md.
#
# Usage: scripts/update-compartments.sh
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

package=hl7.fhir.r4.examples@4.0.1
command -v npm >/dev/null || die "npm is required"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

log "fetching $package"
(cd "$tmp" && npm pack "$package" --silent >/dev/null)
tar -xzf "$tmp"/hl7.fhir.r4.examples-4.0.1.tgz -C "$tmp" \
  --wildcards 'package/package.json' 'package/CompartmentDefinition-*.json' 'package/SearchParameter-*.json'
python3 "$SCRIPTS_DIR/lib/reduce_compartments.py" "$tmp/package" "$REPO_ROOT/compartments"
log "compartments/ updated; review with: git diff --stat compartments/"
