#!/usr/bin/env bash
# Memory per idle client: RSS slope of direct Mosquitto, HAProxy and mqtt-warden between STEPS.
#
#   benches/idle_memory.sh
#   BASELINE_BIN=/work/bench/bin/mqtt-warden-0c050af benches/idle_memory.sh
#
# For each target, a fresh Mosquitto and a fresh proxy (pinned to CPU 1 like compare.sh's shared
# layout, so the warden's runtime has one worker and HAProxy one thread); examples/idle_connections
# (CPU 0) opens idle MQTT 3.1.1 connections (quickstart devices d:quickstart:idle:cN, keep-alive
# 600 s) through it, and reads the RSS of the process measured (Mosquitto for direct, else the
# proxy) from /proc/PID/status 2 s after each step. The table shows the RSS at 0 and at each step,
# and the slope between the first and the last step, KiB per client. The warden runs with its
# policy checks, monitoring and limits on (quickstart org; limits.connect_rate_per_address raised
# so that the burst of connections is not refused).
#
# Environment: STEPS (1000,9000), BASELINE_BIN (none: adds target warden-baseline), WARDEN_BIN
# (default: built from this checkout), OUT (folder to keep configs and logs), CARGO_TARGET_DIR.
# Takes about a minute.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STEPS=${STEPS:-1000,9000}
BASELINE_BIN=${BASELINE_BIN:-}
PROXY_CPUS=1
CLIENT_CPUS=0

log() { echo "[idle-memory] $*" >&2; }
# shellcheck source=benches/common.sh
source "$ROOT/benches/common.sh"

need_pkgs=()
command -v mosquitto >/dev/null 2>&1 || [[ -x /usr/sbin/mosquitto ]] || need_pkgs+=(mosquitto)
command -v haproxy >/dev/null 2>&1 || [[ -x /usr/sbin/haproxy ]] || need_pkgs+=(haproxy)
if ((${#need_pkgs[@]})); then
  log "installing ${need_pkgs[*]}"
  apt-get install -y "${need_pkgs[@]}" >/dev/null 2>&1 \
    || { apt-get update >/dev/null && apt-get install -y "${need_pkgs[@]}" >/dev/null; }
fi
export PATH="$PATH:/usr/sbin"

given_warden=${WARDEN_BIN:-}
log "building (release)"
(cd "$ROOT" && CARGO_TARGET_DIR="$TARGET_DIR" cargo build --release --quiet --bin mqtt-warden --example idle_connections)
WARDEN_BIN=${given_warden:-$TARGET_DIR/release/mqtt-warden}
# The wardens run in the scratch folder.
WARDEN_BIN=$(readlink -f "$WARDEN_BIN")
[[ -z "$BASELINE_BIN" ]] || BASELINE_BIN=$(readlink -f "$BASELINE_BIN")
IDLE=$TARGET_DIR/release/examples/idle_connections

# Every process started from here on may hold two descriptors per client.
last=${STEPS##*,}
want=$((3 * last + 1024))
ulimit -n "$want" 2>/dev/null || ulimit -n "$(ulimit -Hn)"
# Connections a proxy may hold: HAProxy wants two descriptors per connection plus a margin.
maxconn=$((($(ulimit -n) - 200) / 2))
((maxconn >= last)) || { log "ulimit -n $(ulimit -n) is too low for $last clients"; exit 2; }

cat >"$WORK/policy.yaml" <<EOF
orgs:
  quickstart: { quickstart: true }
EOF

# One target: fresh Mosquitto, fresh proxy, one idle_connections run; appends a table row.
ROWS=()
measure() {
  local target=$1 bin=${2:-} port pid out
  start_mosquitto "$PROXY_CPUS" "max_connections -1"
  case "$target" in
    direct) port=$BROKER_PORT; pid=$BROKER_PID ;;
    haproxy)
      port=$(free_port)
      cat >"$WORK/haproxy.cfg" <<EOF
global
  nbthread 1
  maxconn $maxconn
defaults
  mode tcp
  maxconn $maxconn
  timeout connect 5s
  timeout client 1h
  timeout server 1h
frontend mqtt
  bind 127.0.0.1:$port
  default_backend broker
backend broker
  server mosquitto 127.0.0.1:$BROKER_PORT maxconn $maxconn
EOF
      taskset -c "$PROXY_CPUS" haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 &
      pid=$!; PIDS+=("$pid"); wait_port "$port" "$pid" ;;
    *)
      port=$(free_port)
      cat >"$WORK/$target.yaml" <<EOF
listeners:
  - bind: "127.0.0.1:$port"
upstream:
  address: "127.0.0.1:$BROKER_PORT"
  topic_prefix: "{org}/"
  control_client_id: "$target-control"
policies: policy.yaml
limits:
  max_connections: $maxconn
  connect_rate_per_address: "1000000/s"
telemetry: { log_format: text }
EOF
      (cd "$WORK" && RUST_LOG=warn exec taskset -c "$PROXY_CPUS" "$bin" run --config "$target.yaml") \
        >"$WORK/$target.log" 2>&1 &
      pid=$!; PIDS+=("$pid"); wait_port "$port" "$pid" ;;
  esac
  sleep 1
  out=$(taskset -c "$CLIENT_CPUS" "$IDLE" --target "127.0.0.1:$port" --pid "$pid" --steps "$STEPS" \
    2>>"$WORK/idle_connections.log") || { log "idle_connections failed for $target: $(tail -3 "$WORK/idle_connections.log")"; return 1; }
  echo "$out" | sed "s/^/$target,/" >>"$WORK/results.csv"
  # Rows of the CSV: connections,rss_kib,kib_per_connection_since_baseline
  ROWS+=("$(echo "$out" | awk -F, -v t="$target" 'NR > 1 { n++; c[n] = $1; r[n] = $2 }
    END { line = "| " t " |"; for (i = 1; i <= n; i++) line = line sprintf(" %.1f |", r[i] / 1024)
          printf "%s %s |\n", line, (n > 2 ? sprintf("%.2f", (r[n] - r[2]) / (c[n] - c[2])) : "–") }')")
  log "$target: ${ROWS[-1]}"
  # Stop this target's processes before the next one.
  kill "$pid" "$BROKER_PID" 2>/dev/null || true
  wait "$pid" "$BROKER_PID" 2>/dev/null || true
}

: >"$WORK/results.csv"
measure direct
measure haproxy
[[ -z "$BASELINE_BIN" ]] || measure warden-baseline "$BASELINE_BIN"
measure warden "$WARDEN_BIN"

echo
echo "### RSS per idle client (quickstart devices, keep-alive 600 s), steps $STEPS"
echo
line="| target | RSS at 0, MiB |"; sep="|---|---:|"
IFS=, read -ra steps <<<"$STEPS"
for s in "${steps[@]}"; do line+=" RSS at $s, MiB |"; sep+="---:|"; done
echo "$line KiB per client, slope ${steps[0]} → ${steps[-1]} |"
echo "$sep---:|"
printf '%s\n' "${ROWS[@]}"
echo
echo "direct = Mosquitto's own RSS; the other rows are the proxy's RSS only (the broker behind it"
echo "holds its connections too). warden = $WARDEN_BIN${BASELINE_BIN:+, warden-baseline = $BASELINE_BIN}"
