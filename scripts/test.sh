#!/usr/bin/env bash
# The test command. On a fresh Debian machine with the Rust toolchain, Python 3 and git, it
# installs what the tests need (Mosquitto and its clients, openssl, redis-server and redis-cli, Node.js with MQTT.js from
# tests/js, and wiotp-sdk with paho-mqtt in a private Python environment, target/test-venv), checks
# every shipped config and policy, then runs the whole suite. Arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/prerequisites.sh

say "checking test prerequisites"
need_cargo
need_commands mosquitto:mosquitto mosquitto_pub:mosquitto-clients mosquitto_sub:mosquitto-clients \
    openssl:openssl curl:curl redis-server:redis-server redis-cli:redis-tools \
    nats-server:nats-server /usr/lib/rabbitmq/bin/rabbitmq-server:rabbitmq-server
need_mqtt_js
need_test_venv
# The tests run the Python clients with this interpreter (tests/support: python()).
export WARDEN_TEST_PYTHON=$TEST_VENV_PYTHON

say "building mqtt-warden"
cargo build

say "checking the shipped configs and policies"
# With a stand-in secret, so `--strict` holds them to what `run` needs.
export WARDEN_UPSTREAM_PASSWORD=check-only
target/debug/mqtt-warden check --strict --config examples/warden.yaml
# The compose config is checked where the container has it: /etc/mqtt-warden/{warden.yaml,policies/}.
etc=$(mktemp -d)
trap 'rm -rf "$etc"' EXIT
cp examples/compose/warden.yaml "$etc/warden.yaml"
cp -r policies "$etc/policies"
target/debug/mqtt-warden check --strict --config "$etc/warden.yaml"
for instance in a b; do
    cp "examples/compose/warden-$instance.yaml" "$etc/warden.yaml"
    target/debug/mqtt-warden check --strict --config "$etc/warden.yaml"
done
for policy in policies/*.yaml; do
    target/debug/mqtt-warden check --policy "$policy"
done

say "running the test suite"
unset WARDEN_UPSTREAM_PASSWORD
cargo test "$@"
