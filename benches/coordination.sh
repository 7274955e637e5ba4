#!/usr/bin/env bash
# Throughput with coordination against without, in one interleaved run: a release mqtt-warden
# process in front of a private Mosquitto, with and without `coordination:` (a private
# redis-server), and the org's publish rate limited far above what the run reaches, so that the
# coordinated run takes its org tokens from Redis in batches. loadgen saturates QoS 0 and QoS 1
# (1 publisher, 1 subscriber, 64-byte payloads) for DURATION seconds, REPS times each.
#   cargo build --release --bin mqtt-warden --example loadgen && benches/coordination.sh
# Needs mosquitto and redis-server on PATH; every process listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}/release
duration=${DURATION:-5}
reps=${REPS:-3}
work=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done; echo "nothing on $1" >&2; exit 1; }

broker=$(free_port)
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$broker" > "$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" >/dev/null 2>&1 & pids+=($!)
redis=$(free_port)
redis-server --bind 127.0.0.1 --port "$redis" --save '' --appendonly no >/dev/null 2>&1 & pids+=($!)
wait_port "$broker"; wait_port "$redis"
"$target/examples/loadgen" --print-policy 2 --org org1 \
    | sed 's/^    limits:$/    limits:\n      org_publish_rate: "100000000\/s"/' > "$work/policy.yaml"

start_proxy() { # NAME EXTRA-CONFIG
    local port; port=$(free_port)
    printf 'listeners:\n  - bind: "127.0.0.1:%s"\nupstream:\n  address: "127.0.0.1:%s"\n  control_client_id: bench-%s\npolicies: policy.yaml\n%s' \
        "$port" "$broker" "$1" "$2" > "$work/$1.yaml"
    "$target/mqtt-warden" run --config "$work/$1.yaml" >/dev/null 2>&1 & pids+=($!)
    wait_port "$port"
    echo "$port"
}
local_port=$(start_proxy local "")
coord_port=$(start_proxy coordinated "coordination: { redis: \"redis://127.0.0.1:$redis/0\", instance_id: bench }
")

for rep in $(seq "$reps"); do
    for qos in 0 1; do
        for setup in local coordinated; do
            port=$local_port; [ "$setup" = coordinated ] && port=$coord_port
            printf 'rep %s qos %s %-12s ' "$rep" "$qos" "$setup"
            "$target/examples/loadgen" --target "127.0.0.1:$port" --mode warden --org org1 \
                --publishers 1 --subscribers 1 --qos "$qos" --payload 64 --rate 0 \
                --duration "$duration" --warmup 1 --json --label "$setup-qos$qos" \
                | python3 -c 'import json,sys; r=json.loads(sys.stdin.readline()); print("%d msg/s  p50 %s us  p99 %s us  loss %s  errors %s" % (r["throughput"], r["p50_us"], r["p99_us"], r["loss"], r["errors"]))'
        done
    done
done
