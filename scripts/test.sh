#!/usr/bin/env bash
# The project's test command (README, .ci/run): installs the test stack if needed
# (idempotent), runs the OpenFGA model's store tests (fga-model/check.sh), checks the
# layer order of src/ (scripts/check-layers.py) and the supply chain against deny.toml
# (scripts/check-supply-chain.sh), tests the scripts (scripts/tests/), then checks
# formatting and lints, and
# runs every test: unit tests, integration tests against the real FHIR server (HAPI),
# OpenFGA and token issuer, the benches in test mode (each benchmark runs once), and
# a short run of every fuzz target (scripts/fuzz.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/install.sh
# The OpenFGA model: model.json in step with model.fga, store tests in the real engine.
fga-model/check.sh
# The one-way layering of src/ (docs/architecture.md): no new upward import.
python3 scripts/check-layers.py
# The threat model (docs/threat-model.md): every test it names exists, every threat has a
# test or is a listed gap, nothing pending.
python3 scripts/check-threat-model.py
# Licences, bans and sources of the dependency tree (cargo-deny, deny.toml); advisories
# when the RustSec database can be had, else a loud ADVISORIES SKIPPED line.
scripts/check-supply-chain.sh
# The scripts' own tests (the benchmark report generator on a synthetic run, the
# supply-chain and threat-model checks on fixtures): seconds.
python3 -m unittest discover -s scripts/tests
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
# Benches first (each benchmark runs once), so the suites' summaries close the output.
cargo test --benches --locked
# The fuzz targets of fuzz/ for 10 s each, unoptimized (the build is most of the time:
# about 2 min from scratch on 2 cores); longer runs: README, *Fuzzing*.
(cd fuzz && cargo fmt -- --check)
scripts/fuzz.sh --dev --seconds 10
cargo test --lib --bins --tests --locked
