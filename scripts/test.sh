#!/usr/bin/env bash
# The project's test command (README, .ci/run): installs the test stack if needed
# (idempotent), runs the OpenFGA model's store tests (fga-model/check.sh), checks the
# layer order of src/ (scripts/check-layers.py), tests the benchmark report generator
# (scripts/tests/), then checks formatting and lints, and
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
# The benchmark report generator (scripts/bench-report.py) on a synthetic run: seconds.
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
