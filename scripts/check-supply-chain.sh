#!/usr/bin/env bash
# Checks the dependency tree against deny.toml with cargo-deny (the pinned version,
# installed by scripts/install.sh): licences, bans (duplicate versions, wildcards) and
# sources always; security advisories (the RustSec database) whenever the database can
# be had:
#   - CARGO_DENY_ADVISORY_DB=DIR: the advisory databases in DIR as `cargo deny fetch`
#     leaves them (cargo-deny's `db-path`, e.g. a copy of ~/.cargo/advisory-dbs from a
#     machine that can reach GitHub), used without fetching; cargo-deny refuses a
#     database older than 90 days;
#   - else fetched from GitHub, when GitHub can be reached;
#   - else the advisories are SKIPPED: said loudly, and the other checks still run.
# Exit status: non-zero when any check that ran failed.
#
# Usage: scripts/check-supply-chain.sh
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
cd "$REPO_ROOT"

(($# == 0)) || { print_usage "${BASH_SOURCE[0]}"; exit 64; }

advisory_db_url=https://github.com/RustSec/advisory-db

found=$(cargo deny --version 2>/dev/null || true)
if [[ $found != "cargo-deny $CARGO_DENY_VERSION" ]]; then
  die "cargo-deny $CARGO_DENY_VERSION is required (found: ${found:-none}): run scripts/install.sh"
fi

# `cargo deny` with the lock file as it is (never updated by the check).
deny() { cargo deny --locked "$@"; }

status=0
if [[ -n ${CARGO_DENY_ADVISORY_DB:-} ]]; then
  db=$CARGO_DENY_ADVISORY_DB
  [[ -d $db ]] || die "CARGO_DENY_ADVISORY_DB=$db is not a directory"
  db=$(cd "$db" && pwd)
  [[ $db != *[\"\\]* ]] || die "CARGO_DENY_ADVISORY_DB must not contain quotes or backslashes"
  # deny.toml with the database directory set (deny.toml itself leaves it at
  # cargo-deny's default).
  config=$(mktemp "${TMPDIR:-/tmp}/deny.XXXXXX.toml")
  trap 'rm -f "$config"' EXIT
  awk -v db="$db" '{ print } /^\[advisories\][[:space:]]*$/ { printf "db-path = \"%s\"\n", db }' \
    deny.toml >"$config"
  log "advisories: checked against the local database in $db (not fetched)"
  # cargo-deny runs offline here, so the crates it reads are fetched first.
  cargo fetch --locked --quiet
  deny --offline --config "$config" check || status=$?
  summary="licences, bans, sources and advisories (local database)"
elif GIT_TERMINAL_PROMPT=0 timeout 20 git ls-remote --heads "$advisory_db_url" >/dev/null 2>&1; then
  log "advisories: fetching the RustSec database from $advisory_db_url"
  deny check || status=$?
  summary="licences, bans, sources and advisories"
else
  log "=================================================================================="
  log "ADVISORIES SKIPPED: the RustSec advisory database ($advisory_db_url)"
  log "cannot be reached from this machine and CARGO_DENY_ADVISORY_DB is not set, so the"
  log "dependencies were NOT checked for known vulnerabilities or yanked versions."
  log "Licences, bans and sources are still checked."
  log "=================================================================================="
  deny check licenses bans sources || status=$?
  summary="licences, bans and sources (ADVISORIES SKIPPED: no advisory database)"
fi

if ((status == 0)); then
  log "supply chain ok: $summary"
else
  log "supply chain check FAILED (checked: $summary)"
fi
exit "$status"
