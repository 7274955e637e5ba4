#!/usr/bin/env bash
# Runs Mosquitto (127.0.0.1:1884, proxy credentials only) and mqtt-warden in front of it
# (127.0.0.2:1883) with examples/warden.yaml and policies/example.yaml. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mosquitto >/dev/null || ! command -v mosquitto_passwd >/dev/null; then
    echo "installing mosquitto from the distribution's packages" >&2
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
fi

cargo build --release --quiet

mkdir -p target/example
export WARDEN_UPSTREAM_PASSWORD="${WARDEN_UPSTREAM_PASSWORD:-$(head -c 18 /dev/urandom | base64 | tr -d '/+=')}"
rm -f target/example/mosquitto.passwd
touch target/example/mosquitto.passwd && chmod 600 target/example/mosquitto.passwd
mosquitto_passwd -b target/example/mosquitto.passwd warden "$WARDEN_UPSTREAM_PASSWORD"
# Mosquitto started as root drops to the `mosquitto` user, which must be able to read the file.
if [ "$(id -u)" -eq 0 ] && id mosquitto >/dev/null 2>&1; then
    chown mosquitto target/example/mosquitto.passwd
fi

mosquitto -c examples/mosquitto.conf &
broker=$!
trap 'kill $broker 2>/dev/null || true' EXIT

target/release/mqtt-warden check --config examples/warden.yaml
echo "mqtt-warden: clients connect to 127.0.0.2:1883 (policy: policies/example.yaml)" >&2
target/release/mqtt-warden run --config examples/warden.yaml
