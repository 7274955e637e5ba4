#!/usr/bin/env bash
# The test command: every policy and config shipped must pass `check`, then the full test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet
WARDEN_UPSTREAM_PASSWORD=check-only target/debug/mqtt-warden check --config examples/warden.yaml
cargo test
