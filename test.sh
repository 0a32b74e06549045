#!/usr/bin/env bash
# Every test, as the README says: the workspace's tests (unit, property, CLI
# crash/corruption/full-disk harness, the Kafka tests against a real broker,
# the .slt suite with its variants and batch checks), then a bounded, seeded
# run of every fuzz target from its corpus. The Kafka tests start their own
# tansu brokers on 127.0.0.1; the first line installs tansu once per machine
# (into ~/.cache/sluice/tools, outside the checkout), the second Chromium,
# ChromeDriver and promtool for the HTTP endpoint's tests, the third moto's
# S3 server for the object-storage tests.
#   ./test.sh                      SLUICE_FUZZ_SECONDS=N sets the seconds per fuzz target (default 20)
set -euo pipefail
cd "$(dirname "$0")"
scripts/kafka-broker.sh install
scripts/web-tools.sh install
scripts/s3-server.sh install
cargo test --workspace
fuzz/run.sh "${SLUICE_FUZZ_SECONDS:-20}"
