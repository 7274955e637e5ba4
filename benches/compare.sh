#!/usr/bin/env bash
# Direct Mosquitto vs HAProxy (mode tcp) vs mqtt-warden, in front of the same Mosquitto, same run.
#
#   benches/compare.sh                 # defaults below; prints markdown tables
#   LAYOUT=split REPS=5 benches/compare.sh
#   BASELINE_BIN=/work/bench/bin/mqtt-warden-0c050af REPS=5 benches/compare.sh
#
# Scenarios (SCENARIOS picks some, in this order; 64-byte payloads):
#   qos0-sat     1 publisher → 1 subscriber, QoS 0 saturation throughput
#   qos1-sat     1 → 1, QoS 1 saturation throughput (publisher window INFLIGHT)
#   qos0-10k     1 → 1, QoS 0 at a fixed RATE msg/s: p50/p99/p99.9 end-to-end latency
#   fan10-qos0   FANOUT publishers → FANOUT subscribers, QoS 0 saturation, every subscriber on the
#                wildcard filter iot-2/type/+/id/+/evt/+/fmt/+ (direct: bench/iot-2/...), so each
#                receives every publisher: delivered msg/s (all subscribers together)
# Targets: direct, haproxy, warden (this checkout's build, or WARDEN_BIN), and with BASELINE_BIN set
# warden-baseline (that binary, same config, its own process) in the same interleaved run. Each
# scenario runs against every target REPS times, the order rotating every repetition. The first
# table shows medians and ratios: each proxy against direct and each warden against HAProxy (and
# warden against warden-baseline); the second shows the spread: min–max of every target and of
# the ratio against direct paired within each repetition; the third, each warden against HAProxy
# paired within each repetition. Below them: CPU per delivered message (the proxy's, the broker's
# and the load generator's, with context switches), how idle the whole machine was during each run
# (a saturation run behind a proxy that leaves the machine idle was limited by something other
# than CPU), and the raw runs.
#
# CPU layouts (this is written for a 2-core machine; LAYOUT picks one):
#   shared  (default) Mosquitto and the proxy (HAProxy, each warden) share CPU 1, the load
#           generator runs on CPU 0: the proxy's cost shows as broker throughput taken away
#   split             Mosquitto on CPU 0, the proxy on CPU 1, the load generator unpinned
#   gen-broker        Mosquitto and the load generator on CPU 0, the proxy alone on CPU 1
#   gen-proxy         Mosquitto alone on CPU 0, the proxy and the load generator on CPU 1
#   none              nothing pinned
# Every proxy gets one thread per CPU it is pinned to (HAProxy nbthread; the warden's runtime sizes
# itself to the CPUs it may use).
#
# Environment: REPS (3), DURATION (5 s, saturation), LAT_DURATION (8 s), WARMUP (2 s),
# PAYLOAD (64), INFLIGHT (100), RATE (10000), FANOUT (10), FANOUT_MAX_LAG (2000 messages per
# subscriber that the fan-out publishers may run ahead), LAYOUT (shared), SCENARIOS (all four),
# BASELINE_BIN (none), WARDEN_BIN (default: built from this checkout), HAPROXY_SCHED (unset; batch
# runs HAProxy under SCHED_BATCH, as the warden runs by default, for reference), QUIET_IDLE (90 %) and
# QUIET_WAIT (10 s): how idle the machine should be before each run and how long to wait for it,
# OUT (folder to keep configs, logs and results.jsonl; default none), CARGO_TARGET_DIR (where cargo
# builds; the load generator always comes from this checkout), SYSCALLS (0; 1 counts the system
# calls of the broker and the proxy per delivered message with perf, which slows every target),
# WARDEN_MODE and BASELINE_MODE (warden; direct gives that slot HAProxy's traffic, for a blind
# forwarder such as examples/blind_forward.rs, which benches/blind_forward.sh starts in a slot).
# A run takes about 10 s (warm-up, window, drain, idle gate), so the script takes about 8 minutes
# with REPS=3 and four targets (BASELINE_BIN set), 13 with REPS=5; three quarters of that without.
# Related: benches/callgrind.sh (instructions per message), benches/idle_memory.sh (RSS per idle
# client), benches/fairness.sh.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPS=${REPS:-3}
DURATION=${DURATION:-5}
LAT_DURATION=${LAT_DURATION:-8}
WARMUP=${WARMUP:-2}
PAYLOAD=${PAYLOAD:-64}
INFLIGHT=${INFLIGHT:-100}
RATE=${RATE:-10000}
FANOUT=${FANOUT:-10}
FANOUT_MAX_LAG=${FANOUT_MAX_LAG:-2000}
LAYOUT=${LAYOUT:-shared}
SCENARIOS=${SCENARIOS:-qos0-sat qos1-sat qos0-10k fan10-qos0}
BASELINE_BIN=${BASELINE_BIN:-}
ORG=bench

case "$LAYOUT" in
  shared)     BROKER_CPUS=1; PROXY_CPUS=1; GEN_CPUS=0 ;;
  split)      BROKER_CPUS=0; PROXY_CPUS=1; GEN_CPUS=0,1 ;;
  gen-broker) BROKER_CPUS=0; PROXY_CPUS=1; GEN_CPUS=0 ;;
  gen-proxy)  BROKER_CPUS=0; PROXY_CPUS=1; GEN_CPUS=1 ;;
  none)       BROKER_CPUS=0,1; PROXY_CPUS=0,1; GEN_CPUS=0,1 ;;
  *) echo "unknown LAYOUT $LAYOUT" >&2; exit 2 ;;
esac
for scenario in $SCENARIOS; do
  case "$scenario" in
    qos0-sat | qos1-sat | qos0-10k | fan10-qos0) ;;
    *) echo "unknown scenario $scenario" >&2; exit 2 ;;
  esac
done
if [[ -n "$BASELINE_BIN" && ! -x "$BASELINE_BIN" ]]; then
  echo "BASELINE_BIN $BASELINE_BIN is not an executable" >&2; exit 2
fi
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

given_warden=${WARDEN_BIN:-}
build_release
[[ -z "$given_warden" ]] || WARDEN_BIN=$given_warden
# The wardens run in the scratch folder.
WARDEN_BIN=$(readlink -f "$WARDEN_BIN")
[[ -z "$BASELINE_BIN" ]] || BASELINE_BIN=$(readlink -f "$BASELINE_BIN")

start_mosquitto "$BROKER_CPUS" "max_inflight_messages $INFLIGHT"
HAPROXY_PORT=$(free_port)

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
# HAPROXY_SCHED=batch runs HAProxy under SCHED_BATCH (chrt -b 0), the warden's default policy,
# for reference: users run HAProxy as it starts.
haproxy_sched=()
[[ "${HAPROXY_SCHED:-}" != batch ]] || haproxy_sched=(chrt -b 0)
taskset -c "$PROXY_CPUS" "${haproxy_sched[@]}" haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 &
HAPROXY_PID=$!; PIDS+=("$HAPROXY_PID")
wait_port "$HAPROXY_PORT" "$HAPROXY_PID"

# Enough devices for the fan-out's publishers.
"$LOADGEN" --print-policy "$((FANOUT > 1 ? FANOUT : 1))" --org "$ORG" >"$WORK/policy.yaml"

# Starts a warden (binary $2) as target $1; sets PORT[$1] and PID[$1]. Each has its own control
# client ID, so two wardens on one broker do not displace each other's control connection.
declare -A PORT PID
start_warden() {
  local name=$1 bin=$2 port
  port=$(free_port)
  cat >"$WORK/$name.yaml" <<EOF
listeners:
  - bind: "127.0.0.1:$port"
upstream:
  address: "127.0.0.1:$BROKER_PORT"
  topic_prefix: "{org}/"
  control_client_id: "$name-control"
policies: policy.yaml
telemetry: { log_format: text }
EOF
  (cd "$WORK" && RUST_LOG=warn exec taskset -c "$PROXY_CPUS" "$bin" run --config "$name.yaml") \
    >"$WORK/$name.log" 2>&1 &
  PID[$name]=$!; PIDS+=("${PID[$name]}")
  PORT[$name]=$port
  wait_port "$port" "${PID[$name]}"
}

TARGETS=(direct haproxy)
PORT[direct]=$BROKER_PORT; PID[direct]=
PORT[haproxy]=$HAPROXY_PORT; PID[haproxy]=$HAPROXY_PID
if [[ -n "$BASELINE_BIN" ]]; then
  start_warden warden-baseline "$BASELINE_BIN"
  TARGETS+=(warden-baseline)
fi
start_warden warden "$WARDEN_BIN"
TARGETS+=(warden)

log "mosquitto :$BROKER_PORT (cpu $BROKER_CPUS), loadgen cpu $GEN_CPUS, proxies on cpu $PROXY_CPUS with $PROXY_THREADS thread(s): haproxy :$HAPROXY_PORT, warden :${PORT[warden]} ($WARDEN_BIN)${BASELINE_BIN:+, warden-baseline :${PORT[warden-baseline]} ($BASELINE_BIN)}"

# CPU seconds a process has used so far (utime + stime of all its threads).
cpu_s() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.3f", ($14 + $15) / hz}' "/proc/$1/stat"; }
# The user-space part of it (utime).
user_s() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.3f", $14 / hz}' "/proc/$1/stat"; }
# Context switches of all of a process's threads so far: voluntary and not, or with a second
# argument "nonvoluntary_" only the involuntary ones (the process was preempted, not waiting).
ctx_switches() {
  cat /proc/"$1"/task/*/status 2>/dev/null |
    awk -v kind="^${2:-.*}ctxt_switches" '$1 ~ kind {n += $2} END {print n + 0}'
}

# With SYSCALLS=1: counts a process's system calls (all kinds, every thread) from now until
# syscalls_stop, with perf's raw_syscalls:sys_enter tracepoint (counting only; it costs every
# target alike, so keep it off for the figures that go into the tables).
syscalls_start() { # pid name
  [[ "${SYSCALLS:-0}" == 1 && -n "$1" ]] || return 0
  perf stat -x, -e raw_syscalls:sys_enter -p "$1" -o "$WORK/syscalls.$2" 2>/dev/null &
  SYSCALL_PERF[$2]=$!
}
syscalls_stop() { # name; sets SYSCALLS_COUNTED (not in a subshell: the perf process is a child of this one)
  local pid=${SYSCALL_PERF[$1]:-}
  SYSCALLS_COUNTED=0
  [[ -n "$pid" ]] || return 0
  kill -INT "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true
  SYSCALL_PERF[$1]=
  SYSCALLS_COUNTED=$(awk -F, '/raw_syscalls/ {n = $1 + 0} END {print n + 0}' "$WORK/syscalls.$1")
}
declare -A SYSCALL_PERF
# CPU seconds this shell's waited-for children have used so far, from the `times` builtin saved
# to a file (in a subshell it would count the subshell's children only).
children_cpu_s() { # file
  awk 'NR == 2 { split($1, u, /[ms]/); split($2, y, /[ms]/); printf "%.3f", 60 * u[1] + u[2] + 60 * y[1] + y[2] }' "$1"
}
# Idle and total jiffies of the whole machine so far (/proc/stat), "idle total".
machine_jiffies() { awk '/^cpu / {t = 0; for (i = 2; i <= NF; i++) t += $i; print $5 + $6, t}' /proc/stat; }
# The share of the time between two machine_jiffies readings that the machine was idle.
idle_share() { # before after
  awk -v a="$1" -v b="$2" 'BEGIN { split(a, x, " "); split(b, y, " "); print (y[2] > x[2]) ? (y[1] - x[1]) / (y[2] - x[2]) : 0 }'
}

run_one() {
  local scenario=$1 target=$2 rep=$3 port=${PORT[$2]} proxy_pid=${PID[$2]} mode=warden args
  [[ "$target" == direct || "$target" == haproxy ]] && mode=direct
  # A blind forwarder in a warden's slot (WARDEN_MODE/BASELINE_MODE=direct) gets HAProxy's traffic.
  [[ "$target" == warden && "${WARDEN_MODE:-warden}" == direct ]] && mode=direct
  [[ "$target" == warden-baseline && "${BASELINE_MODE:-warden}" == direct ]] && mode=direct
  case "$scenario" in
    qos0-sat) args=(--publishers 1 --subscribers 1 --qos 0 --rate 0 --duration "$DURATION") ;;
    qos1-sat) args=(--publishers 1 --subscribers 1 --qos 1 --rate 0 --duration "$DURATION"
                    --inflight "$INFLIGHT") ;;
    qos0-10k) args=(--publishers 1 --subscribers 1 --qos 0 --rate "$RATE" --duration "$LAT_DURATION") ;;
    fan10-qos0) args=(--publishers "$FANOUT" --subscribers "$FANOUT" --sub-filter all --qos 0
                      --rate 0 --duration "$DURATION" --max-lag "$FANOUT_MAX_LAG") ;;
  esac
  local b0 p0=0 u0=0 c0=0 i0=0 b1 p1=0 u1=0 c1=0 i1=0 bs0=0 bs1 ps0=0 ps1=0 bc0 bc1 j0 j1 loadgen_cpu line
  wait_quiet
  b0=$(cpu_s "$BROKER_PID"); bc0=$(ctx_switches "$BROKER_PID"); j0=$(machine_jiffies); syscalls_start "$BROKER_PID" broker
  [[ -z "$proxy_pid" ]] || { p0=$(cpu_s "$proxy_pid"); u0=$(user_s "$proxy_pid"); c0=$(ctx_switches "$proxy_pid"); i0=$(ctx_switches "$proxy_pid" nonvoluntary_); syscalls_start "$proxy_pid" proxy; }
  times >"$WORK/times.before"
  line=$(timeout 120 taskset -c "$GEN_CPUS" "$LOADGEN" --target "127.0.0.1:$port" --mode "$mode" \
    --org "$ORG" --payload "$PAYLOAD" --warmup "$WARMUP" \
    "${args[@]}" --json --label "$scenario/$target/$rep") || { log "loadgen failed: $scenario $target"; return 1; }
  times >"$WORK/times.after"
  loadgen_cpu=$(awk -v a="$(children_cpu_s "$WORK/times.before")" -v b="$(children_cpu_s "$WORK/times.after")" 'BEGIN{print b - a}')
  b1=$(cpu_s "$BROKER_PID"); bc1=$(ctx_switches "$BROKER_PID"); j1=$(machine_jiffies); syscalls_stop broker; bs1=$SYSCALLS_COUNTED
  [[ -z "$proxy_pid" ]] || { p1=$(cpu_s "$proxy_pid"); u1=$(user_s "$proxy_pid"); c1=$(ctx_switches "$proxy_pid"); i1=$(ctx_switches "$proxy_pid" nonvoluntary_); syscalls_stop proxy; ps1=$SYSCALLS_COUNTED; }
  line="${line%\}},\"scenario\":\"$scenario\",\"via\":\"$target\",\"rep\":$rep,\"broker_cpu_s\":$(awk "BEGIN{print $b1-$b0}"),\"proxy_cpu_s\":$(awk "BEGIN{print $p1-$p0}"),\"proxy_user_s\":$(awk "BEGIN{print $u1-$u0}"),\"proxy_cs\":$((c1 - c0)),\"proxy_ics\":$((i1 - i0)),\"proxy_sys\":$((ps1 - ps0)),\"broker_sys\":$((bs1 - bs0)),\"broker_cs\":$((bc1 - bc0)),\"loadgen_cpu_s\":$loadgen_cpu,\"machine_idle\":$(idle_share "$j0" "$j1"),\"idle_before\":$IDLE_BEFORE}"
  echo "$line" >>"$WORK/results.jsonl"
  log "$(awk -v l="$line" 'BEGIN{
      n=split("throughput p50_us p99_us loss proxy_cpu_s idle_before",k," "); s="";
      for(i=1;i<=n;i++){ if (match(l, "\"" k[i] "\":[-0-9.e]+")) s=s" "k[i]"="substr(l,RSTART+length(k[i])+3,RLENGTH-length(k[i])-3) }
      print s }') [$scenario $target #$rep]"
  sleep 0.5
}

: >"$WORK/results.jsonl"
START=$(date +%s)
n=${#TARGETS[@]}
for scenario in $SCENARIOS; do
  for rep in $(seq "$REPS"); do
    for i in $(seq 0 $((n - 1))); do
      run_one "$scenario" "${TARGETS[$(((i + rep - 1) % n))]}" "$rep"
    done
  done
done
log "runs took $(($(date +%s) - START)) s"

# --- summary -------------------------------------------------------------------------------
# Ratio columns: every proxy against direct, each warden against HAProxy, and the warden against
# warden-baseline. The spread table: min–max of every target, and min–max of the ratio against
# direct taken within each repetition. The paired table: each warden's ratio to HAProxy (and to
# warden-baseline) taken within each repetition, median and min–max: the targets of one
# repetition run back to back, so a pair shares most of the host's slow drifts.
summarize() {
  awk -v targets="${TARGETS[*]}" -v scenarios="$SCENARIOS" -v rate="$RATE" -v fanout="$FANOUT" -v syscalls="${SYSCALLS:-0}" "$AWK_HELPERS"'
    function lo(key,   n, i, a, m) { n = split(vals[key], a, " "); m = a[1]; for (i = 2; i <= n; i++) if (a[i] + 0 < m + 0) m = a[i]; return m }
    function hi(key,   n, i, a, m) { n = split(vals[key], a, " "); m = a[1]; for (i = 2; i <= n; i++) if (a[i] + 0 > m + 0) m = a[i]; return m }
    function short(t) { return t == "haproxy" ? "HAProxy" : t == "warden-baseline" ? "baseline" : t }
    function num(x, fmt) { return x == "" ? "–" : sprintf(fmt, x) }
    function ratio(a, b) { return b ? a / b : 0 }
    # A per-run figure of target t in scenario s, over the messages delivered in the whole run.
    function per_msg(s, t, key) {
      return median(s "|" t "|" key) / (median(s "|" t "|sent_total") * median(s "|" t "|subscribers") + 1e-9)
    }
    function broker_label(i) { return i == 1 ? "direct" : "via " short(t[i]) }
    # The ratio of target a to target b within each repetition, kept in vals[] under the returned
    # key (for median()), with their range in pair_lo and pair_hi ("" when no repetition has both).
    function pairs(s, a, b, key,   pk, r, x, y, q) {
      pk = "paired|" s "|" a "|" b "|" key; vals[pk] = ""; pair_lo = ""; pair_hi = ""
      for (r in reps) {
        x = per[s "|" a "|" key "|" r]; y = per[s "|" b "|" key "|" r]
        if (x == "" || y == "" || y + 0 == 0) continue
        q = x / y; vals[pk] = vals[pk] " " q
        if (pair_lo == "" || q < pair_lo) pair_lo = q; if (pair_hi == "" || q > pair_hi) pair_hi = q
      }
      return pk
    }
    function addrow(label, s, key, fmt) {
      if (seen[s]) { nrows++; rl[nrows] = label; rs[nrows] = s; rk[nrows] = key; rf[nrows] = fmt }
    }
    {
      s = field($0, "scenario"); v = field($0, "via"); r = field($0, "rep")
      split("throughput p50_us p99_us p999_us loss proxy_cpu_s proxy_user_s broker_cpu_s sent_total subscribers proxy_cs proxy_ics proxy_sys broker_sys broker_cs machine_idle loadgen_cpu_s", ks, " ")
      for (k in ks) {
        x = field($0, ks[k]); vals[s "|" v "|" ks[k]] = vals[s "|" v "|" ks[k]] " " x
        per[s "|" v "|" ks[k] "|" r] = x
      }
      reps[r] = 1; seen[s] = 1
    }
    END {
      nt = split(targets, t, " ")
      nc = 0
      for (i = 2; i <= nt; i++) { nc++; cn[nc] = t[i]; cd[nc] = "direct" }
      for (i = 3; i <= nt; i++) { nc++; cn[nc] = t[i]; cd[nc] = "haproxy" }
      if (nt == 4) { nc++; cn[nc] = "warden"; cd[nc] = "warden-baseline" }
      addrow("1→1 QoS 0 saturation, msg/s", "qos0-sat", "throughput", "%.0f")
      addrow("1→1 QoS 1 saturation, msg/s", "qos1-sat", "throughput", "%.0f")
      addrow("1→1 QoS 0 @ " rate " msg/s, p50 µs", "qos0-10k", "p50_us", "%.1f")
      addrow("1→1 QoS 0 @ " rate " msg/s, p99 µs", "qos0-10k", "p99_us", "%.1f")
      addrow("1→1 QoS 0 @ " rate " msg/s, p99.9 µs", "qos0-10k", "p999_us", "%.1f")
      addrow(fanout "→" fanout " QoS 0 saturation, wildcard subs, delivered msg/s", "fan10-qos0", "throughput", "%.0f")

      line = "| scenario |"; sep = "|---|"
      for (i = 1; i <= nt; i++) { line = line " " short(t[i]) " |"; sep = sep "---:|" }
      for (c = 1; c <= nc; c++) { line = line " " short(cn[c]) "/" short(cd[c]) " |"; sep = sep "---:|" }
      print line; print sep
      for (row = 1; row <= nrows; row++) {
        s = rs[row]; key = rk[row]; line = "| " rl[row] " |"
        for (i = 1; i <= nt; i++) line = line " " num(median(s "|" t[i] "|" key), rf[row]) " |"
        for (c = 1; c <= nc; c++) line = line sprintf(" %.2f |", ratio(median(s "|" cn[c] "|" key), median(s "|" cd[c] "|" key)))
        print line
      }
      print ""
      print "Spread over the repetitions: min–max of each target, and min–max of the ratio against direct"
      print "within each repetition (the targets of one repetition run back to back)."
      print ""
      line = "| scenario |"; sep = "|---|"
      for (i = 1; i <= nt; i++) { line = line " " short(t[i]) " |"; sep = sep "---:|" }
      for (i = 2; i <= nt; i++) { line = line " " short(t[i]) "/direct, per rep |"; sep = sep "---:|" }
      print line; print sep
      for (row = 1; row <= nrows; row++) {
        s = rs[row]; key = rk[row]; line = "| " rl[row] " |"
        for (i = 1; i <= nt; i++) line = line " " num(lo(s "|" t[i] "|" key), rf[row]) "–" num(hi(s "|" t[i] "|" key), rf[row]) " |"
        for (i = 2; i <= nt; i++) {
          pairs(s, t[i], "direct", key)
          line = line " " (pair_lo == "" ? "–" : sprintf("%.2f–%.2f", pair_lo, pair_hi)) " |"
        }
        print line
      }
      if (nt > 2) {
        print ""
        print "Paired ratios: each warden against HAProxy (and the warden against warden-baseline), taken"
        print "within each repetition, then the median over the repetitions (min–max in brackets)."
        print ""
        line = "| scenario |"; sep = "|---|"
        for (c = 1; c <= nc; c++) if (cd[c] != "direct") { line = line " " short(cn[c]) "/" short(cd[c]) ", paired |"; sep = sep "---:|" }
        print line; print sep
        for (row = 1; row <= nrows; row++) {
          s = rs[row]; key = rk[row]; line = "| " rl[row] " |"
          for (c = 1; c <= nc; c++) {
            if (cd[c] == "direct") continue
            pk = pairs(s, cn[c], cd[c], key)
            line = line " " (pair_lo == "" ? "–" : sprintf("%.2f (%.2f–%.2f)", median(pk), pair_lo, pair_hi)) " |"
          }
          print line
        }
      }
      if (seen["qos0-10k"]) {
        print ""
        line = "Added p99 latency at " rate " msg/s (median p99 − direct median p99):"
        for (i = 2; i <= nt; i++) line = line sprintf(" %s %+.1f µs%s", short(t[i]), median("qos0-10k|" t[i] "|p99_us") - median("qos0-10k|direct|p99_us"), i < nt ? "," : "")
        print line
      }
      print ""
      print "CPU per delivered message, µs (median CPU seconds of the process over the whole run / messages"
      print "delivered in the whole run, published × subscribers), with the proxy'"'"'s user-space part and its"
      print "context switches per delivered message (and how many of those were preemptions, involuntary) in brackets:"
      ns = split(scenarios, ss, " ")
      for (j = 1; j <= ns; j++) {
        s = ss[j]; line = "  " s ": proxy"
        for (i = 2; i <= nt; i++)
          line = line sprintf(" %s %.2f (%.2f user, %.2f cs, %.2f of them preempted)", short(t[i]), 1e6 * per_msg(s, t[i], "proxy_cpu_s"), 1e6 * per_msg(s, t[i], "proxy_user_s"), per_msg(s, t[i], "proxy_cs"), per_msg(s, t[i], "proxy_ics"))
        line = line "; broker"
        for (i = 1; i <= nt; i++)
          line = line sprintf(" %s %.2f (%.2f cs)", broker_label(i), 1e6 * per_msg(s, t[i], "broker_cpu_s"), per_msg(s, t[i], "broker_cs"))
        line = line "; load generator"
        for (i = 1; i <= nt; i++)
          line = line sprintf(" %s %.2f", broker_label(i), 1e6 * per_msg(s, t[i], "loadgen_cpu_s"))
        print line
      }
      print ""
      print "Machine idle during the run (all CPUs, /proc/stat, median share of the time, load generator included):"
      for (j = 1; j <= ns; j++) {
        s = ss[j]; line = "  " s ":"
        for (i = 1; i <= nt; i++) line = line sprintf(" %s %.1f %%", short(t[i]), 100 * median(s "|" t[i] "|machine_idle"))
        print line
      }
      if (!syscalls) exit
      print ""
      print "System calls per delivered message (SYSCALLS=1: perf raw_syscalls:sys_enter, every kind, median"
      print "over the repetitions, whole run):"
      for (j = 1; j <= ns; j++) {
        s = ss[j]; line = "  " s ": proxy"
        for (i = 2; i <= nt; i++) line = line sprintf(" %s %.3f", short(t[i]), per_msg(s, t[i], "proxy_sys"))
        line = line "; broker"
        for (i = 1; i <= nt; i++) line = line sprintf(" %s %.3f", broker_label(i), per_msg(s, t[i], "broker_sys"))
        print line
      }
    }' "$WORK/results.jsonl"
}

echo
echo "### LAYOUT=$LAYOUT (mosquitto cpu $BROKER_CPUS, proxy cpu $PROXY_CPUS, loadgen cpu $GEN_CPUS), payload $PAYLOAD B, $REPS reps, median"
echo
echo "Targets: ${TARGETS[*]}; warden = $WARDEN_BIN${BASELINE_BIN:+, warden-baseline = $BASELINE_BIN}"
echo
summarize
echo
echo "Raw runs (label, throughput msg/s, p50/p99 µs, loss, proxy CPU s, % CPU idle just before):"
raw_runs "label throughput p50_us p99_us loss proxy_cpu_s idle_before" "$WORK/results.jsonl"
