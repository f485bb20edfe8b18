#!/usr/bin/env bash
# Loads the demo data into a running FHIR server: the base fixture bundle
# (tests/fixtures/base-bundle.json: patients p1, p2, p10 and friends) plus synthetic
# patients from carebundle, generated at a fixed seed so every run loads the same
# resources with the same ids (urn:uuid fullUrls become PUT Type/<uuid>).
#
# Usage: scripts/load-demo-data.sh BASE_URL [--count N] [--seed S]
#   BASE_URL   FHIR base, e.g. http://127.0.0.1:8090/fhir
#   --count N  synthetic patients (default 20)
#   --seed S   carebundle seed (default 20240101)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

base=${1:-}
[[ $base == http* ]] || { echo "usage: scripts/load-demo-data.sh BASE_URL [--count N] [--seed S]" >&2; exit 64; }
shift
count=20 seed=20240101
while (($# > 0)); do
  case $1 in
    --count) count=${2:?}; shift 2 ;;
    --seed) seed=${2:?}; shift 2 ;;
    *) echo "usage: scripts/load-demo-data.sh BASE_URL [--count N] [--seed S]" >&2; exit 64 ;;
  esac
done
[[ -x $VENV/bin/carebundle ]] || die "carebundle not installed: run scripts/install.sh"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$VENV/bin/python" "$SCRIPTS_DIR/lib/load_bundle.py" "$base" "$REPO_ROOT/tests/fixtures/base-bundle.json"
# --reference-date keeps the output independent of today's date.
"$VENV/bin/carebundle" generate --profile mixed --sex mixed --count "$count" --seed "$seed" \
  --reference-date 2024-06-01 --out "$tmp" >"$tmp/generate.log" 2>&1 \
  || { cat "$tmp/generate.log" >&2; die "carebundle failed"; }
"$VENV/bin/python" "$SCRIPTS_DIR/lib/load_bundle.py" --put-ids "$base" "$tmp"/*.json 2>"$tmp/load.log" \
  || { cat "$tmp/load.log" >&2; die "loading carebundle patients failed"; }
log "loaded the base bundle and $count synthetic patients (carebundle seed $seed) into $base"
