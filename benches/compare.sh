#!/usr/bin/env bash
# Direct Mosquitto vs HAProxy (mode tcp) vs mqtt-warden, in front of the same Mosquitto, same run.
#
#   benches/compare.sh                 # defaults below; prints a markdown table
#   LAYOUT=shared REPS=5 benches/compare.sh
#
# Scenarios (1 publisher → 1 subscriber, 64-byte payloads):
#   qos0-sat   QoS 0 saturation throughput
#   qos1-sat   QoS 1 saturation throughput (publisher window INFLIGHT)
#   qos0-10k   QoS 0 at a fixed RATE msg/s: p50/p99 end-to-end latency
# Each scenario runs against direct, haproxy and warden REPS times, the order rotating every
# repetition; the table shows medians and ratios against direct.
#
# CPU layouts (this is written for a 2-core machine; LAYOUT picks one):
#   split   (default) Mosquitto on CPU 0, the proxy on CPU 1, the load generator unpinned
#   gen-broker        Mosquitto and the load generator on CPU 0, the proxy alone on CPU 1
#   gen-proxy         Mosquitto alone on CPU 0, the proxy and the load generator on CPU 1
#   none              nothing pinned
#
# Environment: REPS (3), DURATION (5 s, saturation), LAT_DURATION (8 s), WARMUP (2 s),
# PAYLOAD (64), INFLIGHT (100), RATE (10000), LAYOUT (split), QUIET_IDLE (90 %) and QUIET_WAIT
# (10 s): how idle the machine should be before each run and how long to wait for it, OUT (folder
# to keep configs, logs and results.jsonl; default none), CARGO_TARGET_DIR (where cargo builds).
# On a quiet 2-core machine the whole script takes about 5 minutes.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPS=${REPS:-3}
DURATION=${DURATION:-5}
LAT_DURATION=${LAT_DURATION:-8}
WARMUP=${WARMUP:-2}
PAYLOAD=${PAYLOAD:-64}
INFLIGHT=${INFLIGHT:-100}
RATE=${RATE:-10000}
LAYOUT=${LAYOUT:-split}
ORG=bench

case "$LAYOUT" in
  split)      BROKER_CPUS=0; PROXY_CPUS=1; GEN_CPUS=0,1 ;;
  gen-broker) BROKER_CPUS=0; PROXY_CPUS=1; GEN_CPUS=0 ;;
  gen-proxy)  BROKER_CPUS=0; PROXY_CPUS=1; GEN_CPUS=1 ;;
  none)       BROKER_CPUS=0,1; PROXY_CPUS=0,1; GEN_CPUS=0,1 ;;
  *) echo "unknown LAYOUT $LAYOUT" >&2; exit 2 ;;
esac
# HAProxy gets as many threads as the warden's runtime gets workers: one per CPU it may use.
PROXY_THREADS=$(awk -F, '{print NF}' <<<"$PROXY_CPUS")

log() { echo "[compare] $*" >&2; }
# shellcheck source=benches/common.sh
source "$ROOT/benches/common.sh"

# --- tools ---------------------------------------------------------------------------------
need_pkgs=()
command -v mosquitto >/dev/null 2>&1 || [[ -x /usr/sbin/mosquitto ]] || need_pkgs+=(mosquitto)
command -v haproxy >/dev/null 2>&1 || [[ -x /usr/sbin/haproxy ]] || need_pkgs+=(haproxy)
command -v taskset >/dev/null 2>&1 || need_pkgs+=(util-linux)
if ((${#need_pkgs[@]})); then
  log "installing ${need_pkgs[*]}"
  apt-get install -y "${need_pkgs[@]}" >/dev/null 2>&1 \
    || { apt-get update >/dev/null && apt-get install -y "${need_pkgs[@]}" >/dev/null; }
fi
export PATH="$PATH:/usr/sbin"

build_release

start_mosquitto "$BROKER_CPUS" "max_inflight_messages $INFLIGHT"
HAPROXY_PORT=$(free_port)
WARDEN_PORT=$(free_port)

cat >"$WORK/haproxy.cfg" <<EOF
global
  nbthread $PROXY_THREADS
  maxconn 4096
defaults
  mode tcp
  timeout connect 5s
  timeout client 1h
  timeout server 1h
frontend mqtt
  bind 127.0.0.1:$HAPROXY_PORT
  default_backend broker
backend broker
  server mosquitto 127.0.0.1:$BROKER_PORT
EOF
taskset -c "$PROXY_CPUS" haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 &
HAPROXY_PID=$!; PIDS+=("$HAPROXY_PID")
wait_port "$HAPROXY_PORT" "$HAPROXY_PID"

"$LOADGEN" --print-policy 1 --org "$ORG" >"$WORK/policy.yaml"
cat >"$WORK/warden.yaml" <<EOF
listeners:
  - bind: "127.0.0.1:$WARDEN_PORT"
upstream:
  address: "127.0.0.1:$BROKER_PORT"
  topic_prefix: "{org}/"
policies: policy.yaml
telemetry: { log_format: text }
EOF
RUST_LOG=warn taskset -c "$PROXY_CPUS" "$WARDEN_BIN" run --config "$WORK/warden.yaml" >"$WORK/warden.log" 2>&1 &
WARDEN_PID=$!; PIDS+=("$WARDEN_PID")
wait_port "$WARDEN_PORT" "$WARDEN_PID"

log "mosquitto :$BROKER_PORT (cpu $BROKER_CPUS)  haproxy :$HAPROXY_PORT  warden :$WARDEN_PORT (cpu $PROXY_CPUS, $PROXY_THREADS thread(s))  loadgen cpu $GEN_CPUS"

# CPU seconds a process has used so far (utime + stime of all its threads).
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.3f", ($14 + $15) / hz}' "/proc/$1/stat"; }

run_one() {
  local scenario=$1 target=$2 rep=$3 port mode proxy_pid args
  case "$target" in
    direct)  port=$BROKER_PORT;  mode=direct; proxy_pid= ;;
    haproxy) port=$HAPROXY_PORT; mode=direct; proxy_pid=$HAPROXY_PID ;;
    warden)  port=$WARDEN_PORT;  mode=warden; proxy_pid=$WARDEN_PID ;;
  esac
  case "$scenario" in
    qos0-sat) args=(--qos 0 --rate 0 --duration "$DURATION") ;;
    qos1-sat) args=(--qos 1 --rate 0 --duration "$DURATION" --inflight "$INFLIGHT") ;;
    qos0-10k) args=(--qos 0 --rate "$RATE" --duration "$LAT_DURATION") ;;
  esac
  local b0 p0=0 b1 p1=0 line
  wait_quiet
  b0=$(cpu_s "$BROKER_PID"); [[ -n "$proxy_pid" ]] && p0=$(cpu_s "$proxy_pid")
  line=$(timeout 120 taskset -c "$GEN_CPUS" "$LOADGEN" --target "127.0.0.1:$port" --mode "$mode" \
    --org "$ORG" --publishers 1 --subscribers 1 --payload "$PAYLOAD" --warmup "$WARMUP" \
    "${args[@]}" --json --label "$scenario/$target/$rep") || { log "loadgen failed: $scenario $target"; return 1; }
  b1=$(cpu_s "$BROKER_PID"); [[ -n "$proxy_pid" ]] && p1=$(cpu_s "$proxy_pid")
  line="${line%\}},\"scenario\":\"$scenario\",\"via\":\"$target\",\"rep\":$rep,\"broker_cpu_s\":$(awk "BEGIN{print $b1-$b0}"),\"proxy_cpu_s\":$(awk "BEGIN{print $p1-$p0}"),\"idle_before\":$IDLE_BEFORE}"
  echo "$line" >>"$WORK/results.jsonl"
  log "$(awk -v l="$line" 'BEGIN{
      n=split("throughput p50_us p99_us loss proxy_cpu_s idle_before",k," "); s="";
      for(i=1;i<=n;i++){ if (match(l, "\"" k[i] "\":[-0-9.e]+")) s=s" "k[i]"="substr(l,RSTART+length(k[i])+3,RLENGTH-length(k[i])-3) }
      print s }') [$scenario $target #$rep]"
  sleep 0.5
}

: >"$WORK/results.jsonl"
TARGETS=(direct haproxy warden)
START=$(date +%s)
for scenario in qos0-sat qos1-sat qos0-10k; do
  for rep in $(seq "$REPS"); do
    for i in 0 1 2; do
      run_one "$scenario" "${TARGETS[$(((i + rep - 1) % 3))]}" "$rep"
    done
  done
done
log "runs took $(($(date +%s) - START)) s"

# --- summary -------------------------------------------------------------------------------
summarize() {
  awk "$AWK_HELPERS"'
    {
      s = field($0, "scenario"); v = field($0, "via")
      split("throughput p50_us p99_us p999_us loss proxy_cpu_s broker_cpu_s sent_total", ks, " ")
      for (k in ks) vals[s "|" v "|" ks[k]] = vals[s "|" v "|" ks[k]] " " field($0, ks[k])
    }
    function row(label, s, key, fmt,   d, h, w) {
      d = median(s "|direct|" key); h = median(s "|haproxy|" key); w = median(s "|warden|" key)
      printf "| %s | " fmt " | " fmt " | " fmt " | %.2f | %.2f | %.2f |\n", label, d, h, w, \
        (d ? h / d : 0), (d ? w / d : 0), (h ? w / h : 0)
    }
    END {
      print "| scenario | direct | HAProxy | warden | HAProxy/direct | warden/direct | warden/HAProxy |"
      print "|---|---:|---:|---:|---:|---:|---:|"
      row("1→1 QoS 0 saturation, msg/s", "qos0-sat", "throughput", "%.0f")
      row("1→1 QoS 1 saturation, msg/s", "qos1-sat", "throughput", "%.0f")
      row("1→1 QoS 0 @ '"$RATE"' msg/s, p50 µs", "qos0-10k", "p50_us", "%.1f")
      row("1→1 QoS 0 @ '"$RATE"' msg/s, p99 µs", "qos0-10k", "p99_us", "%.1f")
      row("1→1 QoS 0 @ '"$RATE"' msg/s, p99.9 µs", "qos0-10k", "p999_us", "%.1f")
      print ""
      printf "Added p99 latency at '"$RATE"' msg/s (median p99 − direct median p99): HAProxy %+.1f µs, warden %+.1f µs\n", \
        median("qos0-10k|haproxy|p99_us") - median("qos0-10k|direct|p99_us"), median("qos0-10k|warden|p99_us") - median("qos0-10k|direct|p99_us")
      print ""
      print "CPU per message, µs (median CPU seconds of the process over the whole run / messages published in the whole run):"
      split("qos0-sat qos1-sat qos0-10k", ss, " ")
      for (i = 1; i <= 3; i++) {
        s = ss[i]
        printf "  %s: HAProxy %.2f  warden %.2f   (broker: direct %.2f, via HAProxy %.2f, via warden %.2f)\n", s, \
          1e6 * median(s "|haproxy|proxy_cpu_s") / (median(s "|haproxy|sent_total") + 1e-9), \
          1e6 * median(s "|warden|proxy_cpu_s") / (median(s "|warden|sent_total") + 1e-9), \
          1e6 * median(s "|direct|broker_cpu_s") / (median(s "|direct|sent_total") + 1e-9), \
          1e6 * median(s "|haproxy|broker_cpu_s") / (median(s "|haproxy|sent_total") + 1e-9), \
          1e6 * median(s "|warden|broker_cpu_s") / (median(s "|warden|sent_total") + 1e-9)
      }
    }' "$WORK/results.jsonl"
}

echo
echo "### LAYOUT=$LAYOUT (mosquitto cpu $BROKER_CPUS, proxy cpu $PROXY_CPUS, loadgen cpu $GEN_CPUS), payload $PAYLOAD B, $REPS reps, median"
echo
summarize
echo
echo "Raw runs (label, throughput msg/s, p50/p99 µs, loss, proxy CPU s, % CPU idle just before):"
raw_runs "label throughput p50_us p99_us loss proxy_cpu_s idle_before" "$WORK/results.jsonl"
