# Shared by the benchmark scripts: build, process bookkeeping, ports, waiting for a quiet machine,
# and the awk helpers of their summaries. Source it after setting ROOT and defining `log`.

TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

# Builds the proxy and the load generator in release mode; sets WARDEN_BIN and LOADGEN.
build_release() {
  log "building (release)"
  (cd "$ROOT" && CARGO_TARGET_DIR="$TARGET_DIR" cargo build --release --quiet --bin mqtt-warden --example loadgen)
  WARDEN_BIN="$TARGET_DIR/release/mqtt-warden"
  LOADGEN="$TARGET_DIR/release/examples/loadgen"
}

# A scratch folder WORK; every pid pushed onto PIDS is stopped at exit, and with OUT set the
# configs, logs and results are kept there.
WORK=$(mktemp -d /tmp/warden-bench.XXXXXX)
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT" && cp "$WORK"/*.log "$WORK"/*.jsonl "$WORK"/*.yaml "$WORK"/*.cfg "$WORK"/*.conf "$OUT"/ 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A port nobody listens on, below the ephemeral range: a port inside it may be taken by some
# client's connection (thousands linger in TIME_WAIT after idle_memory.sh), and bind then fails.
EPHEMERAL_LOW=$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
((EPHEMERAL_LOW > 12000)) || EPHEMERAL_LOW=32768
free_port() {
  local port
  while :; do
    port=$((10000 + RANDOM % (EPHEMERAL_LOW - 10000)))
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || { echo "$port"; return; }
  done
}

wait_port() {
  local port=$1 pid=$2
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || { log "process $pid died"; return 1; }
    sleep 0.05
  done
  log "port $port did not open"; return 1
}

# Starts Mosquitto on CPUs $1 with a free port (BROKER_PORT, BROKER_PID); $2 holds extra config.
start_mosquitto() {
  local cpus=$1 extra=${2:-}
  BROKER_PORT=$(free_port)
  cat >"$WORK/mosquitto.conf" <<CONF
listener $BROKER_PORT 127.0.0.1
allow_anonymous true
persistence false
# The load generator bounds how far publishers run ahead, so queues never need a cap here.
max_queued_messages 0
max_queued_bytes 0
# Without this Mosquitto's small writes meet delayed ACKs: 40 ms stalls in the latency tail.
set_tcp_nodelay true
log_dest stderr
log_type error
log_type warning
$extra
CONF
  taskset -c "$cpus" mosquitto -c "$WORK/mosquitto.conf" 2>"$WORK/mosquitto.log" &
  BROKER_PID=$!; PIDS+=("$BROKER_PID")
  wait_port "$BROKER_PORT" "$BROKER_PID"
}

# This machine may be shared: before each run, wait (up to QUIET_WAIT s) until the CPUs are at
# least QUIET_IDLE % idle over half a second, and record what was seen in IDLE_BEFORE.
QUIET_IDLE=${QUIET_IDLE:-90}
QUIET_WAIT=${QUIET_WAIT:-10}
idle_pct() {
  local a b
  a=($(head -1 /proc/stat)); sleep 0.5; b=($(head -1 /proc/stat))
  local total=0 i
  for i in 1 2 3 4 5 6 7 8; do total=$((total + b[i] - a[i])); done
  echo $(((100 * (b[4] - a[4] + b[5] - a[5])) / (total > 0 ? total : 1)))
}
wait_quiet() {
  local waited=0 idle
  idle=$(idle_pct)
  while ((idle < QUIET_IDLE && waited < QUIET_WAIT)); do
    ((waited == 0)) && log "machine busy (${idle}% idle), waiting"
    sleep 2; waited=$((waited + 3)); idle=$(idle_pct)
  done
  IDLE_BEFORE=$idle
}

# awk functions for the summaries: field(line, key) reads a number or short string from a JSON
# line; median(key) is the median of the space-separated numbers in vals[key].
AWK_HELPERS='
  function field(line, key,   re, value) {
    re = "\"" key "\":\"?[-0-9.a-z]+"
    if (!match(line, re)) return ""
    value = substr(line, RSTART + length(key) + 3, RLENGTH - length(key) - 3)
    gsub(/"/, "", value); return value
  }
  function median(key,   n, i, j, t, a) {
    n = split(vals[key], a, " ")
    for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j-1] + 0 > a[j] + 0; j--) { t = a[j]; a[j] = a[j-1]; a[j-1] = t }
    if (n == 0) return 0
    return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
  }
'

# Prints the listed keys of every JSON line of the given files, one run per line.
raw_runs() {
  local keys=$1; shift
  awk -v keys="$keys" '{
    out = ""
    n = split(keys, k, " ")
    for (i = 1; i <= n; i++) if (match($0, "\"" k[i] "\":\"?[-0-9.a-z/]+")) out = out "  " substr($0, RSTART + length(k[i]) + 3, RLENGTH - length(k[i]) - 3)
    gsub(/"/, "", out); print out
  }' "$@"
}
