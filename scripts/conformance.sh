#!/usr/bin/env bash
# MQTT conformance through the proxy: Eclipse Paho's interoperability client tests
# (github.com/eclipse/paho.mqtt.testing, interoperability/client_test.py for MQTT 3.1.1 and
# client_test5.py for MQTT 5) run directly against Mosquitto, then through mqtt-warden with a
# generic tenant whose rules allow everything but subscribing to test/nosubscribe (the suites'
# "subscribe failure" topic). The direct broker gets `topic deny test/nosubscribe` in an acl_file,
# but Mosquitto 2.0 grants subscriptions and filters deliveries, so its subscribe-failure test
# fails directly and passes through the proxy: that one difference is expected. Prints each test's
# result both ways and exits 1 when any other differs.
#
#   scripts/conformance.sh                      # clones the suite into target/ (commit 9d7bb80)
#   PAHO_TESTING=/path/to/paho.mqtt.testing scripts/conformance.sh
#   WARDEN=target/release/mqtt-warden scripts/conformance.sh
#
# Every process is private: Mosquitto and the proxy on free loopback ports, config in a temp dir.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
WORK=$(mktemp -d)
# Mosquitto started as root reads its acl_file as the mosquitto user.
chmod 755 "$WORK"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
export PATH="$PATH:/usr/sbin"

SUITE=${PAHO_TESTING:-$TARGET/paho.mqtt.testing}
if [[ ! -d "$SUITE/interoperability" ]]; then
  git clone -q https://github.com/eclipse/paho.mqtt.testing "$SUITE"
  git -C "$SUITE" checkout -q 9d7bb80
fi
if [[ -z "${WARDEN:-}" ]]; then
  (cd "$ROOT" && cargo build -q --bin mqtt-warden)
  WARDEN=$TARGET/debug/mqtt-warden
fi

[[ -x "$WARDEN" ]] || { echo "no mqtt-warden binary at $WARDEN" >&2; exit 2; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 1 100); do
    python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$1),0.2)" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on $1" >&2; return 1
}
mosquitto_on() {
  local port=$1 extra=$2
  printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n%b\n' "$port" "$extra" > "$WORK/mosquitto-$port.conf"
  mosquitto -c "$WORK/mosquitto-$port.conf" 2>"$WORK/mosquitto-$port.log" &
  PIDS+=($!)
  wait_port "$port"
}

# Direct: Mosquitto refuses test/nosubscribe itself.
printf 'topic deny test/nosubscribe\ntopic readwrite #\ntopic readwrite $SYS/#\n' > "$WORK/acl"
chmod 644 "$WORK/acl"
DIRECT=$(free_port)
mosquitto_on "$DIRECT" "acl_file $WORK/acl"

# Through the proxy: a plain Mosquitto behind it, one allow-all tenant.
BEHIND=$(free_port)
mosquitto_on "$BEHIND" ""
PROXY=$(free_port)
cat > "$WORK/policy.yaml" <<POLICY
tenants:
  conformance:
    anonymous: true
    retained: keep
    limits:
      max_subscriptions: { application: 1000 }
      publish_rate: { application: "100000/s" }
      subscribe_rate: "10000/s"
    rules:
      - { deny: [subscribe], topic: "test/nosubscribe" }
      - { allow: [publish, subscribe], topic: "#" }
      - { allow: [publish, subscribe], topic: "\$SYS/#" }
POLICY
cat > "$WORK/warden.yaml" <<CONFIG
listeners:
  - { bind: "127.0.0.1:$PROXY", tenant: conformance }
upstream:
  address: "127.0.0.1:$BEHIND"
policies: policy.yaml
CONFIG
"$WARDEN" run --config "$WORK/warden.yaml" >"$WORK/warden.log" 2>&1 &
PIDS+=($!)
wait_port "$PROXY"

status=0
for suite in client_test client_test5; do
  start=$(date +%s)
  python3 "$ROOT/scripts/conformance.py" "$SUITE/interoperability" "$suite" 127.0.0.1 "$DIRECT" > "$WORK/$suite.direct" 2>"$WORK/$suite.direct.err" || true
  python3 "$ROOT/scripts/conformance.py" "$SUITE/interoperability" "$suite" 127.0.0.1 "$PROXY" > "$WORK/$suite.proxy" 2>"$WORK/$suite.proxy.err" || true
  echo "## $suite ($(( $(date +%s) - start )) s for both runs)"
  echo "| test | Mosquitto | through mqtt-warden |"
  echo "|---|---|---|"
  join -1 2 -2 2 <(sort -k2 "$WORK/$suite.direct") <(sort -k2 "$WORK/$suite.proxy") \
    | while read -r name direct proxy; do
        mark=""; [[ "$direct" != "$proxy" ]] && mark=" **differs**"
        echo "| $name | $direct | $proxy$mark |"
      done
  expected='^(testSubscribeFailure|test_subscribe_failure)$'
  if join -1 2 -2 2 <(sort -k2 "$WORK/$suite.direct") <(sort -k2 "$WORK/$suite.proxy") \
    | awk -v ok="$expected" '$2 != $3 && !($1 ~ ok && $3 == "ok") { bad = 1 } END { exit !bad }'; then
    status=1
  fi
  [[ -s "$WORK/$suite.direct" ]] || { echo "no results: $(tail -3 "$WORK/$suite.direct.err")"; status=1; }
  echo
done
exit $status
