#!/usr/bin/env bash
# Runs Mosquitto (127.0.0.1:1884, proxy credentials only) and mqtt-warden in front of it
# (127.0.0.2:1883) with examples/warden.yaml and policies/example.yaml. Ctrl-C stops both.
# Installs Mosquitto and its clients from the distribution's packages when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/prerequisites.sh

need_cargo
need_commands mosquitto:mosquitto mosquitto_passwd:mosquitto \
    mosquitto_pub:mosquitto-clients mosquitto_sub:mosquitto-clients

say "building mqtt-warden (release; the first build takes a few minutes)"
cargo build --release

mkdir -p target/example
export WARDEN_UPSTREAM_PASSWORD="${WARDEN_UPSTREAM_PASSWORD:-$(head -c 18 /dev/urandom | base64 | tr -d '/+=')}"
rm -f target/example/mosquitto.passwd
touch target/example/mosquitto.passwd && chmod 600 target/example/mosquitto.passwd
mosquitto_passwd -b target/example/mosquitto.passwd warden "$WARDEN_UPSTREAM_PASSWORD"
# Mosquitto started as root drops to the `mosquitto` user, which must be able to read the file.
if [ "$(id -u)" -eq 0 ] && id mosquitto >/dev/null 2>&1; then
    chown mosquitto target/example/mosquitto.passwd
fi

target/release/mqtt-warden check --strict --config examples/warden.yaml

say "starting Mosquitto on 127.0.0.1:1884"
mosquitto -c examples/mosquitto.conf &
broker=$!
trap 'kill $broker 2>/dev/null || true' EXIT
# Mosquitto exits at once when it cannot listen (for example a broker already on 1884).
for _ in 1 2 3 4 5 6 7 8 9 10; do
    kill -0 "$broker" 2>/dev/null || fail "Mosquitto did not start (is 127.0.0.1:1884 in use?)"
    if (exec 3<>/dev/tcp/127.0.0.1/1884) 2>/dev/null; then
        break
    fi
    sleep 0.2 # sleep-ok: polling for the broker's port, at most 2 s
done

cat >&2 <<'TRY'
==> starting mqtt-warden: clients connect to 127.0.0.2:1883 (policy: policies/example.yaml)

Try it from another terminal (the tokens are the example policy's):

  # an application watching device events and device status
  mosquitto_sub -h 127.0.0.2 -i a:myorg1:watcher -u a-myorg1-k7x2p9q4zz -P app-secret-token \
    -t 'iot-2/type/+/id/+/evt/+/fmt/+' -t 'iot-2/type/+/id/+/mon' -v
  # a device publishing an event
  mosquitto_pub -h 127.0.0.2 -i d:myorg1:sensor:dev001 -u use-token-auth -P dev001-secret-token \
    -t iot-2/evt/temperature/fmt/json -m '{"celsius": 21.5}'
  # the same event over the HTTP messaging API
  curl --fail-with-body -u use-token-auth:dev001-secret-token -H 'Content-Type: application/json' \
    --data-binary '{"celsius": 21.5}' \
    http://127.0.0.2:1883/api/v0002/org/myorg1/device/types/sensor/devices/dev001/events/temperature

The Python SDK example is in README.md ("Trying it"). Ctrl-C stops both.

TRY
target/release/mqtt-warden run --config examples/warden.yaml
