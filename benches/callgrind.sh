#!/usr/bin/env bash
# Instructions per forwarded message: mqtt-warden under callgrind, a fixed number of messages.
#
#   benches/callgrind.sh                                     # builds this checkout, measures it
#   benches/callgrind.sh /work/bench/bin/mqtt-warden-0c050af # measures that binary
#   benches/callgrind.sh OLD_BINARY NEW_BINARY               # both, same settings, one table
#
# Timings on this shared 2-core machine are noise; instruction counts are not. For each binary the
# script starts Mosquitto (natively, CPU 0) and, for every run below, a fresh proxy under
# `valgrind --tool=callgrind` (pinned to CPU 1, so its runtime has one worker). The load generator
# (CPU 0, this checkout's examples/loadgen: it needs --count) sends exactly COUNT messages through
# it in lockstep: each message goes out only after the previous one reached the subscriber and, at
# QoS 1, its PUBACK came back, then the generator pauses PAUSE_US so that the subscriber's PUBACK
# is through too. So the proxy handles every message on its own (one wake-up, read, check,
# rewrite and write per packet), as at a low or fixed rate, and does the same work in every run.
#
#   idle   the same clients connect, subscribe and disconnect; no message
#   qos0   COUNT QoS 0 PUBLISHes, device → app (d:bench:loadgen:pub0 → a:bench:sub0, wildcard
#          subscription `iot-2/type/loadgen/id/+/evt/load/fmt/bin`), through the proxy both ways
#   qos1   the same at QoS 1: PUBLISH and PUBACK each way
# With DIRECTIONS=1 also, for each QoS, with an idle run of the same clients:
#   in     the device publishes through the proxy, the subscriber is on the broker directly
#   out    the publisher is on the broker directly, the app subscribes through the proxy
#
# Ir per message = (Ir of the proxy process in the run − Ir of the matching idle run) / COUNT:
# startup, connect, subscribe and teardown cancel out. Every run is a whole process: all threads,
# from exec to exit (SIGTERM after the clients have gone). One thing is left out: the inclusive
# cost of every call to a function named EXCLUDE (default `quanta::Calibration::calibrate`, a
# one-time clock calibration for the rate limiters that loops for a fixed wall time, so its count
# varies with valgrind's speed) is subtracted from each run's total; the log shows how much.
# Repeatability on 0c050af: within 0.4 % between runs (BURST=1). With BURST=16 (batches; the
# broker's deliveries then arrive in varying segments) within about 1.5 %.
#
# Environment:
#   COUNT       messages per run (20000)
#   PAYLOAD     bytes (64)
#   BURST       messages per lockstep step, written at once by the publisher (1)
#   PAUSE_US    pause between steps in µs (1000; 0 lets the subscriber's PUBACK race the next
#               message, which moves the QoS 1 figure by about 1 %)
#   DIRECTIONS  1: add the in and out runs (0)
#   TOP         functions listed with the highest self cost per message, qos0 and qos1 (15; 0: none)
#   EXCLUDE     a function whose calls are left out (quanta::Calibration::calibrate)
#   LOADGEN     the load generator binary (default: built from this checkout)
#   OUT         folder to keep the callgrind files, configs and logs (default: none)
#   CARGO_TARGET_DIR
# One binary takes about 2 minutes (idle + qos0 + qos1 at 20,000 messages); 4 with DIRECTIONS=1.
# Compare with callgrind_annotate on the kept files, e.g.
#   callgrind_annotate --inclusive=yes OUT/callgrind.mqtt-warden.qos0.out | head -60
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
COUNT=${COUNT:-20000}
PAYLOAD=${PAYLOAD:-64}
BURST=${BURST:-1}
PAUSE_US=${PAUSE_US:-1000}
DIRECTIONS=${DIRECTIONS:-0}
TOP=${TOP:-15}
ORG=bench
BROKER_CPUS=0
PROXY_CPUS=1
GEN_CPUS=0
EXCLUDE=${EXCLUDE:-quanta::Calibration::calibrate}

log() { echo "[callgrind] $*" >&2; }
# shellcheck source=benches/common.sh
source "$ROOT/benches/common.sh"

need_pkgs=()
command -v mosquitto >/dev/null 2>&1 || [[ -x /usr/sbin/mosquitto ]] || need_pkgs+=(mosquitto)
command -v valgrind >/dev/null 2>&1 || need_pkgs+=(valgrind)
if ((${#need_pkgs[@]})); then
  log "installing ${need_pkgs[*]}"
  apt-get install -y "${need_pkgs[@]}" >/dev/null 2>&1 \
    || { apt-get update >/dev/null && apt-get install -y "${need_pkgs[@]}" >/dev/null; }
fi
export PATH="$PATH:/usr/sbin"

BINARIES=("$@")
if [[ -z "${LOADGEN:-}" ]] || ((${#BINARIES[@]} == 0)); then
  given_loadgen=${LOADGEN:-}
  build_release
  [[ -z "$given_loadgen" ]] || LOADGEN=$given_loadgen
fi
((${#BINARIES[@]})) || BINARIES=("$WARDEN_BIN")
for index in "${!BINARIES[@]}"; do
  bin=${BINARIES[$index]}
  [[ -x "$bin" ]] || { log "not an executable: $bin"; exit 2; }
  BINARIES[$index]=$(readlink -f "$bin") # the proxies run in the scratch folder
done
"$LOADGEN" --help | grep -q -- --count || { log "$LOADGEN has no --count: use this checkout's"; exit 2; }

start_mosquitto "$BROKER_CPUS"
"$LOADGEN" --print-policy 1 --org "$ORG" >"$WORK/policy.yaml"

# One proxy process ($BIN) under callgrind for one load generator run; sets MEASURED to its Ir.
# $1 = name of the run, the rest = loadgen arguments (PROXY in them is replaced by its address).
measure() {
  local name=$1; shift
  local port pid args=() arg total
  port=$(free_port)
  cat >"$WORK/warden-$name.yaml" <<EOF
listeners:
  - bind: "127.0.0.1:$port"
upstream:
  address: "127.0.0.1:$BROKER_PORT"
  topic_prefix: "{org}/"
  control_client_id: "warden-callgrind"
policies: policy.yaml
telemetry: { log_format: text }
EOF
  (cd "$WORK" && RUST_LOG=warn exec taskset -c "$PROXY_CPUS" valgrind --tool=callgrind \
    --callgrind-out-file="$WORK/callgrind.$name.out" \
    "$BIN" run --config "warden-$name.yaml") >"$WORK/warden-$name.log" 2>&1 &
  pid=$!; PIDS+=("$pid")
  # valgrind takes a few seconds to start the proxy.
  for _ in $(seq 600); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    kill -0 "$pid" 2>/dev/null || { log "the proxy died: $(tail -5 "$WORK/warden-$name.log")"; return 1; }
    sleep 0.1
  done
  for arg in "$@"; do args+=("${arg//PROXY/127.0.0.1:$port}"); done
  taskset -c "$GEN_CPUS" "$LOADGEN" --org "$ORG" --payload "$PAYLOAD" --burst "$BURST" \
    --step-pause-us "$PAUSE_US" --keep-alive 600 --json --label "$name" "${args[@]}" >>"$WORK/loadgen.jsonl" \
    || { log "loadgen failed in $name"; return 1; }
  # The clients waited for the proxy to close their connections; let it finish the upstream side.
  sleep 1
  kill -TERM "$pid"
  wait "$pid" || true
  # Names are compressed: "cfn=(12) name" the first time, "cfn=(12)" after. The cost line after
  # "calls=" is the inclusive cost of those calls.
  read -r MEASURED EXCLUDED < <(awk -v exclude="$EXCLUDE" '
    /^c?fn=\(/ { id = $1; sub(/^c?fn=/, "", id); if (NF > 1) { n = $0; sub(/^[^ ]* /, "", n); names[id] = n } }
    /^cfn=/ { callee = names[id] }
    /^calls=/ { pending = (callee == exclude); next }
    pending { excluded += $NF; pending = 0 }
    /^totals:/ { total = $2 }
    END { printf "%d %d\n", total - excluded, excluded }' "$WORK/callgrind.$name.out")
  [[ "$MEASURED" -gt 0 ]] || { log "no callgrind totals for $name"; return 1; }
  [[ -z "${OUT:-}" ]] || { mkdir -p "$OUT" && cp "$WORK/callgrind.$name.out" "$OUT/"; }
  log "$name: $MEASURED Ir ($EXCLUDED Ir in $EXCLUDE left out)"
}

# Self cost per function of run $1 minus run $2, per message; the TOP largest.
top_functions() {
  local run=$1 idle=$2
  for f in "$run" "$idle"; do
    # The function list is the section after the sixth line of dashes; a line reads
    # "1,234 (12.34%)  file:function [object]"; inlined code is summed into its function.
    callgrind_annotate --inclusive=no --auto=no --threshold=100 "$WORK/callgrind.$f.out" 2>>"$WORK/annotate.err" \
      | awk '/^-+$/ { dash++; next } dash == 6 && /^ *[0-9,]+ / {
               ir = $1; gsub(",", "", ir); line = $0
               sub(/^ *[0-9,]+ +\( *[0-9.]+%\) +/, "", line); sub(/ \[[^]]*\]$/, "", line)
               sub(/^[^:]*:/, "", line); cost[line] += ir }
             END { for (fn in cost) print cost[fn] "\t" fn }' >"$WORK/self.$f.tsv"
    [[ -s "$WORK/self.$f.tsv" ]] || log "callgrind_annotate found no functions in $f: $(tail -3 "$WORK/annotate.err")"
  done
  # (awk, not head, takes the first lines: head would end the pipe early, and pipefail with it)
  # The excluded function is left out here too (its callees, clock_gettime, are not).
  awk -F'\t' -v n="$COUNT" -v exclude="$EXCLUDE" 'FNR == 1 { file++ } $2 == exclude { next }
    file == 1 { c[$2] += $1 } file == 2 { c[$2] -= $1 }
    END { for (fn in c) if (c[fn] > 0) printf "%10.1f  %s\n", c[fn] / n, fn }' \
    "$WORK/self.$run.tsv" "$WORK/self.$idle.tsv" | sort -rn | awk -v top="$TOP" 'NR <= top { print substr($0, 1, 160) }'
}

declare -A IR
RESULTS=()
for index in "${!BINARIES[@]}"; do
  BIN=${BINARIES[$index]}
  tag=$(basename "$BIN")
  [[ -z "${IR[$tag|idle]:-}" ]] || tag="$tag#$((index + 1))"
  runs=("idle|--target PROXY --mode warden --count 0 --qos 1"
        "qos0|--target PROXY --mode warden --count $COUNT --qos 0"
        "qos1|--target PROXY --mode warden --count $COUNT --qos 1")
  if [[ "$DIRECTIONS" == 1 ]]; then
    direct_sub="--sub-target 127.0.0.1:$BROKER_PORT --sub-mode direct"
    direct_pub="--target 127.0.0.1:$BROKER_PORT --mode direct --sub-target PROXY --sub-mode warden"
    runs+=("idle-in|--target PROXY --mode warden $direct_sub --count 0 --qos 1"
           "in-qos0|--target PROXY --mode warden $direct_sub --count $COUNT --qos 0"
           "in-qos1|--target PROXY --mode warden $direct_sub --count $COUNT --qos 1"
           "idle-out|$direct_pub --count 0 --qos 1"
           "out-qos0|$direct_pub --count $COUNT --qos 0"
           "out-qos1|$direct_pub --count $COUNT --qos 1")
  fi
  for run in "${runs[@]}"; do
    name=${run%%|*}
    # shellcheck disable=SC2086 # the arguments are words
    measure "$tag.$name" ${run#*|}
    IR[$tag|$name]=$MEASURED
  done
  per() { awk -v a="${IR[$tag|$1]}" -v b="${IR[$tag|$2]}" -v n="$COUNT" 'BEGIN { printf "%.0f", (a - b) / n }'; }
  row="| $tag | $(per qos0 idle) | $(per qos1 idle) |"
  if [[ "$DIRECTIONS" == 1 ]]; then
    row+=" $(per in-qos0 idle-in) | $(per out-qos0 idle-out) | $(per in-qos1 idle-in) | $(per out-qos1 idle-out) |"
  fi
  row+=" ${IR[$tag|idle]} |"
  RESULTS+=("$row")
  if ((TOP > 0)); then
    for q in qos0 qos1; do
      echo
      echo "$tag, $q: the $TOP functions with the highest self cost, Ir per message (run − idle)"
      top_functions "$tag.$q" "$tag.idle"
    done >>"$WORK/top.txt"
  fi
done

echo
echo "### Instructions per forwarded message (callgrind Ir), $COUNT messages per run, payload $PAYLOAD B, lockstep steps of $BURST"
echo
if [[ "$DIRECTIONS" == 1 ]]; then
  echo "| binary | QoS 0, device → app | QoS 1, device → app | QoS 0 in | QoS 0 out | QoS 1 in | QoS 1 out | Ir of the idle run |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|"
else
  echo "| binary | QoS 0, device → app | QoS 1, device → app | Ir of the idle run |"
  echo "|---|---:|---:|---:|"
fi
printf '%s\n' "${RESULTS[@]}"
echo
echo "Ir per message = (Ir of the run − Ir of the idle run with the same clients) / $COUNT; the whole"
echo "proxy process, all threads, both directions (in: device → broker only, out: broker → app only)."
[[ ! -s "$WORK/top.txt" ]] || cat "$WORK/top.txt"
