#!/usr/bin/env bash
# Instructions per forwarded PUBLISH of the session alone: examples/bridge_bench (the session
# in-process over in-memory streams, no sockets) under callgrind, each direction and QoS against
# a run with no messages.
#
#   benches/bridge_callgrind.sh                 # builds this checkout's example, prints the table
#   COUNT=20000 PAYLOAD=64 benches/bridge_callgrind.sh
#
# Ir per message = (Ir of the run − Ir of the run with no messages) / COUNT: the proxy's own
# work per PUBLISH (decode, checks, rewrite, encode, the loop and the runtime's wake-ups), with
# the benchmark's own client and broker code in it too (a few hundred instructions: one write
# and one frame read per message). Kernel work does not exist here, so this is the user-space
# cost benches/callgrind.sh measures with real sockets, less the system calls.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
COUNT=${COUNT:-20000}
PAYLOAD=${PAYLOAD:-64}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

command -v valgrind >/dev/null || { echo "valgrind is missing: apt-get install valgrind" >&2; exit 2; }
(cd "$ROOT" && cargo build --release --example bridge_bench >&2)
BENCH=$ROOT/target/release/examples/bridge_bench
[[ -n "${CARGO_TARGET_DIR:-}" ]] && BENCH=$CARGO_TARGET_DIR/release/examples/bridge_bench

ir() {
  local out=$WORK/callgrind.$1.out
  valgrind --tool=callgrind --callgrind-out-file="$out" "$BENCH" "${@:2}" --messages "$COUNT" \
    --payload "$PAYLOAD" 2>/dev/null >/dev/null
  awk '/^summary:/ { print $2 }' "$out"
}

base=$(ir none --direction none)
echo "| direction | QoS 0, Ir per PUBLISH | QoS 1, Ir per PUBLISH (and its PUBACK) |"
echo "|---|---:|---:|"
for direction in in out; do
  row="| $direction |"
  for qos in 0 1; do
    total=$(ir "$direction-$qos" --direction "$direction" --qos "$qos")
    row+=" $(( (total - base) / COUNT )) |"
  done
  echo "$row"
done
echo
echo "$COUNT messages of $PAYLOAD B per run; in: client → broker, out: broker → client."
