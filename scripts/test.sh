#!/usr/bin/env bash
# The test command: every config and policy shipped must pass `check`, then the full test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet
export WARDEN_UPSTREAM_PASSWORD=check-only
target/debug/mqtt-warden check --config examples/warden.yaml
# The compose config is checked where the container has it: /etc/mqtt-warden/{warden.yaml,policies/}.
etc=$(mktemp -d)
trap 'rm -rf "$etc"' EXIT
cp examples/compose/warden.yaml "$etc/warden.yaml"
cp -r policies "$etc/policies"
target/debug/mqtt-warden check --config "$etc/warden.yaml"
for policy in policies/*.yaml; do
    target/debug/mqtt-warden check --policy "$policy"
done
cargo test
