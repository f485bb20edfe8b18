#!/usr/bin/env bash
# Builds the fuzz targets of fuzz/ (cargo-fuzz, libFuzzer) and runs each for a bounded
# time. Each run starts from the target's seed corpus (fuzz/corpus/TARGET) and its
# past crash inputs (fuzz/regressions/TARGET), which are only read: what the run finds
# goes to a fresh corpus directory (temporary unless --corpus-dir). A crash, a failed
# property, a timeout or running out of memory fails the target: libFuzzer saves the
# input in fuzz/artifacts/TARGET/ and the script prints how to reproduce it, runs the
# remaining targets, and exits 1.
#
# Usage: scripts/fuzz.sh [options] [TARGET...]
#   --seconds N        fuzzing time per target (default 20)
#   --dev              unoptimized build: about a third of the build time and of the
#                      speed; for short runs (scripts/test.sh)
#   --sanitizer S      address or none (default: address; with --dev: none)
#   --rss-limit-mb N   memory limit of a run (default 2048)
#   --timeout N        seconds one input may take (default 10)
#   --max-len N        longest input in bytes (default 8192)
#   --corpus-dir DIR   keep each target's new corpus in DIR/TARGET
#   TARGET...          the targets to run (default: all of fuzz/fuzz_targets/)
# Toolchain: cargo-fuzz needs unstable compiler flags. The `nightly` rustup toolchain
# is used when installed; otherwise the default toolchain with RUSTC_BOOTSTRAP=1.
# FUZZ_TOOLCHAIN=NAME picks a rustup toolchain (RUSTC_BOOTSTRAP=1 if it is not a
# nightly). cargo-fuzz itself comes from scripts/install.sh ($CARGO_FUZZ).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

usage() { print_usage "${BASH_SOURCE[0]}"; exit 64; }

seconds=20 dev=false sanitizer="" rss_limit_mb=2048 timeout=10 max_len=8192 corpus_dir=""
targets=()
number() { [[ $2 =~ ^[1-9][0-9]*$ ]] || { log "$1 needs a positive number, got \`$2\`"; usage; }; }
while (($# > 0)); do
  case $1 in
    --seconds) number "$1" "${2:-}"; seconds=$2; shift 2 ;;
    --dev) dev=true; shift ;;
    --sanitizer)
      [[ ${2:-} == address || ${2:-} == none ]] || { log "--sanitizer is address or none"; usage; }
      sanitizer=$2; shift 2 ;;
    --rss-limit-mb) number "$1" "${2:-}"; rss_limit_mb=$2; shift 2 ;;
    --timeout) number "$1" "${2:-}"; timeout=$2; shift 2 ;;
    --max-len) number "$1" "${2:-}"; max_len=$2; shift 2 ;;
    --corpus-dir) [[ -n ${2:-} ]] || usage; corpus_dir=$2; shift 2 ;;
    -h | --help) usage ;;
    -*) log "unknown option: $1"; usage ;;
    *) targets+=("$1"); shift ;;
  esac
done
if [[ -z $sanitizer ]]; then
  if $dev; then sanitizer=none; else sanitizer=address; fi
fi

fuzz_dir=$REPO_ROOT/fuzz
all_targets=()
for f in "$fuzz_dir"/fuzz_targets/*.rs; do all_targets+=("$(basename "$f" .rs)"); done
((${#targets[@]} > 0)) || targets=("${all_targets[@]}")
for t in "${targets[@]}"; do
  [[ -f $fuzz_dir/fuzz_targets/$t.rs ]] || die "no fuzz target \`$t\` (targets: ${all_targets[*]})"
done

[[ -x $CARGO_FUZZ ]] || die "cargo-fuzz is not installed ($CARGO_FUZZ missing): run scripts/install.sh"
command -v cargo >/dev/null || die "cargo not found on PATH"

# --- toolchain ---------------------------------------------------------------------
if [[ -n ${FUZZ_TOOLCHAIN:-} ]]; then
  export RUSTUP_TOOLCHAIN=$FUZZ_TOOLCHAIN
elif command -v rustup >/dev/null && rustup run nightly rustc --version >/dev/null 2>&1; then
  export RUSTUP_TOOLCHAIN=nightly
fi
rustc_version=$(rustc --version) || die "rustc does not run (toolchain ${RUSTUP_TOOLCHAIN:-default})"
if [[ $rustc_version == *nightly* ]]; then
  log "toolchain: $rustc_version"
else
  export RUSTC_BOOTSTRAP=1
  log "toolchain: $rustc_version with RUSTC_BOOTSTRAP=1 (not a nightly)"
fi
triple=$(rustc -vV | sed -n 's/^host: //p')

# --- build -------------------------------------------------------------------------
build_args=(--sanitizer "$sanitizer" --debug-assertions)
if $dev; then
  build_args+=(--dev)
  profile_dir=debug
else
  build_args+=(--release)
  profile_dir=release
fi
# cargo-fuzz has no --locked: check fuzz/Cargo.lock first, so the build never edits it.
(cd "$fuzz_dir" && cargo fetch --locked --quiet) \
  || die "fuzz/Cargo.lock is not up to date with fuzz/Cargo.toml (run cargo update in fuzz/)"
started=$SECONDS
log "building the fuzz targets (${build_args[*]})"
(cd "$fuzz_dir" && "$CARGO_FUZZ" fuzz build "${build_args[@]}") >&2 || die "the fuzz targets do not build"
log "built in $((SECONDS - started)) s"

# --- run ---------------------------------------------------------------------------
work=$(mktemp -d "${TMPDIR:-/tmp}/smart-fhir-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT
passed=0 failed=0 failures=()
for t in "${targets[@]}"; do
  bin=$fuzz_dir/target/$triple/$profile_dir/$t
  [[ -x $bin ]] || die "$bin was not built"
  if [[ -n $corpus_dir ]]; then out=$corpus_dir/$t; else out=$work/corpus/$t; fi
  artifacts=$fuzz_dir/artifacts/$t
  mkdir -p "$out" "$artifacts"
  # Read-only inputs: the seeds and every past crash (run first, as the corpus loads).
  seeds=()
  for d in "$fuzz_dir/corpus/$t" "$fuzz_dir/regressions/$t"; do [[ -d $d ]] && seeds+=("$d"); done
  args=(-max_total_time="$seconds" -rss_limit_mb="$rss_limit_mb" -timeout="$timeout"
    -max_len="$max_len" -artifact_prefix="$artifacts/" -print_final_stats=1)
  dict=$fuzz_dir/dicts/$t.dict
  [[ $t == answer ]] && dict=$fuzz_dir/dicts/json.dict
  [[ -f $dict ]] && args+=(-dict="$dict")
  logfile=$work/$t.log
  log "$t: fuzzing for $seconds s (${#seeds[@]} seed directories)"
  if "$bin" "${args[@]}" "$out" "${seeds[@]}" >"$logfile" 2>&1; then
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logfile")
    log "$t: passed: ${runs:-?} inputs, corpus of $(find "$out" -type f | wc -l) new inputs"
    passed=$((passed + 1))
  else
    rc=$?
    failed=$((failed + 1))
    failures+=("$t")
    log "$t: FAILED (libFuzzer exit $rc); the end of its log:"
    tail -n 60 "$logfile" >&2
    crash=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$logfile" | tail -n 1)
    if [[ -n $crash ]]; then
      log "$t: reproduce with: $bin $crash"
      log "$t: once fixed, keep the input as a regression: fuzz/regressions/$t/"
    fi
  fi
done
log "fuzzed ${#targets[@]} targets for $seconds s each in $((SECONDS - started)) s (build included)"
# The plain summary line the CI log reader counts.
echo "fuzz: $passed passed, $failed failed"
((failed == 0)) || die "fuzz targets failed: ${failures[*]}"
