#!/usr/bin/env bash
# Every test, as the README says: the workspace's tests (unit, property, CLI
# crash/corruption/full-disk harness, the .slt suite with its variants and
# batch checks), then a bounded run of every fuzz target from its corpus.
#   ./test.sh                      SLUICE_FUZZ_SECONDS=N sets the seconds per fuzz target (default 20)
set -euo pipefail
cd "$(dirname "$0")"
cargo test --workspace
fuzz/run.sh "${SLUICE_FUZZ_SECONDS:-20}"
