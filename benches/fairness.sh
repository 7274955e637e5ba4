#!/usr/bin/env bash
# Fairness under a flood: does one noisy tenant slow a well-behaved one in another org?
#
#   benches/fairness.sh                 # defaults below; prints a markdown table
#   REPS=5 QUIET_RATE=5000 benches/fairness.sh
#
# The well-behaved tenant (org `quiet`): 1 device publisher → 1 application subscriber, QoS 1,
# QUIET_RATE msg/s, through mqtt-warden. Its throughput and p50/p99 end-to-end latency are measured
#   baseline         alone
#   flood-default    beside a flooder in org `noisy` under the §4 default limits (device 10/s)
#   flood-5000       beside a flooder whose org raised its per-connection limit to 5,000 msg/s
#   flood-unlimited  beside a flooder whose org has no effective limit (what quotas prevent)
# The flooder is 1 device publisher → 1 application subscriber in `noisy`, QoS 0 at saturation,
# started before the measured run and stopped after it. Runs rotate order every repetition;
# the table shows medians and the ratio against the baseline.
#
# Layout (2-core machine): Mosquitto on CPU 0, the proxy on CPU 1, the load generators unpinned.
# Environment: REPS (5), QUIET_RATE (2000), DURATION (10 s), WARMUP (2 s), PAYLOAD (64),
# QUIET_IDLE (90 %) and QUIET_WAIT (10 s) as in compare.sh, OUT (folder to keep configs, logs
# and results), CARGO_TARGET_DIR.
# On a quiet 2-core machine the script takes about 6 minutes.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPS=${REPS:-5}
QUIET_RATE=${QUIET_RATE:-2000}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
PAYLOAD=${PAYLOAD:-64}
BROKER_CPUS=0
PROXY_CPUS=1

log() { echo "[fairness] $*" >&2; }
# shellcheck source=benches/common.sh
source "$ROOT/benches/common.sh"

command -v mosquitto >/dev/null 2>&1 || [[ -x /usr/sbin/mosquitto ]] \
  || { apt-get update >/dev/null && apt-get install -y mosquitto >/dev/null; }
export PATH="$PATH:/usr/sbin"
build_release

start_mosquitto "$BROKER_CPUS"

# One warden per flood variant (its port in PORT[variant]), so each org's limits are exactly the
# variant's; all share the broker. `quiet` always has limits far above its rate.
start_warden() {
  local name=$1 noisy_limits=$2 port
  port=$(free_port)
  {
    "$LOADGEN" --print-policy 1 --org quiet
    "$LOADGEN" --print-policy 1 --org noisy | sed '1,2d' \
      | sed "s|^      publish_rate: .*|$noisy_limits|"
  } | sed '/^$/d' >"$WORK/policy-$name.yaml"
  cat >"$WORK/warden-$name.yaml" <<EOF
listeners:
  - bind: "127.0.0.1:$port"
upstream:
  address: "127.0.0.1:$BROKER_PORT"
  control_client_id: "warden-$name"
policies: policy-$name.yaml
telemetry: { log_format: text }
EOF
  RUST_LOG=warn taskset -c "$PROXY_CPUS" "$WARDEN_BIN" run --config "$WORK/warden-$name.yaml" \
    >"$WORK/warden-$name.log" 2>&1 &
  local pid=$!; PIDS+=("$pid")
  wait_port "$port" "$pid"
  PORT[$name]=$port
}

declare -A PORT
# §4 defaults: the publish_rate line is dropped, so device 10/s applies.
start_warden baseline '      publish_rate: { device: "1000000000/s" }'
start_warden flood-default ''
start_warden flood-5000 '      publish_rate: { device: "5000/s" }'
start_warden flood-unlimited '      publish_rate: { device: "1000000000/s" }'
log "mosquitto :$BROKER_PORT (cpu $BROKER_CPUS), wardens on cpu $PROXY_CPUS: $(for k in "${!PORT[@]}"; do printf '%s=:%s ' "$k" "${PORT[$k]}"; done)"

run_one() {
  local variant=$1 rep=$2 port=${PORT[$1]} flood_pid= line flood
  wait_quiet
  if [[ "$variant" != baseline ]]; then
    "$LOADGEN" --target "127.0.0.1:$port" --mode warden --org noisy --publishers 1 --subscribers 1 \
      --qos 0 --rate 0 --payload "$PAYLOAD" --warmup 0 --duration $((WARMUP + DURATION + 2)) \
      --json --label "flood/$variant/$rep" >"$WORK/flood-now.json" 2>"$WORK/flood.log" &
    flood_pid=$!
    sleep 1 # let the flood reach its steady state before the measured run connects
  fi
  line=$(timeout 120 "$LOADGEN" --target "127.0.0.1:$port" --mode warden --org quiet \
    --publishers 1 --subscribers 1 --qos 1 --rate "$QUIET_RATE" --payload "$PAYLOAD" \
    --warmup "$WARMUP" --duration "$DURATION" --json --label "$variant/$rep") \
    || { log "loadgen failed: $variant"; return 1; }
  # The flood outlasts the measured run by about a second, then reports its own throughput.
  if [[ -n "$flood_pid" ]]; then
    wait "$flood_pid" || log "flooder failed: $variant"
    flood=$(cat "$WORK/flood-now.json")
    echo "${flood%\}},\"variant\":\"$variant\",\"rep\":$rep}" >>"$WORK/flood.jsonl"
  fi
  line="${line%\}},\"variant\":\"$variant\",\"rep\":$rep,\"idle_before\":$IDLE_BEFORE}"
  echo "$line" >>"$WORK/results.jsonl"
  log "$(awk -v l="$line" 'BEGIN{
      n=split("throughput p50_us p99_us loss",k," "); s="";
      for(i=1;i<=n;i++){ if (match(l, "\"" k[i] "\":[-0-9.e]+")) s=s" "k[i]"="substr(l,RSTART+length(k[i])+3,RLENGTH-length(k[i])-3) }
      print s }') [$variant #$rep]"
  sleep 0.5
}

: >"$WORK/results.jsonl"
: >"$WORK/flood.jsonl"
VARIANTS=(baseline flood-default flood-5000 flood-unlimited)
for rep in $(seq "$REPS"); do
  for i in 0 1 2 3; do
    run_one "${VARIANTS[$(((i + rep - 1) % 4))]}" "$rep"
  done
done

# A flooder's rate is what its own subscriber received over its whole run.
echo
echo "### quiet org: 1→1 QoS 1 @ $QUIET_RATE msg/s, payload $PAYLOAD B, $REPS reps, median"
echo
awk "$AWK_HELPERS"'
  FNR == 1 { file++ }
  file == 1 {
    v = field($0, "variant")
    split("throughput p50_us p99_us loss", ks, " ")
    for (k in ks) vals[v "|" ks[k]] = vals[v "|" ks[k]] " " field($0, ks[k])
  }
  file == 2 { v = field($0, "variant"); vals[v "|flood"] = vals[v "|flood"] " " field($0, "throughput") }
  END {
    print "| variant | flood msg/s | quiet msg/s | p50 µs | p99 µs | lost | p99 / baseline | msg/s / baseline |"
    print "|---|---:|---:|---:|---:|---:|---:|---:|"
    b99 = median("baseline|p99_us"); bt = median("baseline|throughput")
    split("baseline flood-default flood-5000 flood-unlimited", vs, " ")
    for (i = 1; i <= 4; i++) {
      v = vs[i]
      printf "| %s | %.0f | %.0f | %.1f | %.1f | %s | %.2f | %.3f |\n", v, median(v "|flood"), \
        median(v "|throughput"), median(v "|p50_us"), median(v "|p99_us"), median(v "|loss"), \
        (b99 ? median(v "|p99_us") / b99 : 0), (bt ? median(v "|throughput") / bt : 0)
    }
  }' "$WORK/results.jsonl" "$WORK/flood.jsonl"
echo
echo "Raw runs (label, throughput msg/s, p50/p99 µs, loss, % CPU idle just before). A rate-limited"
echo "flooder's \"loss\" is what back-pressure still held in its socket buffers when it stopped."
raw_runs "label throughput p50_us p99_us loss idle_before" "$WORK/results.jsonl" "$WORK/flood.jsonl"
