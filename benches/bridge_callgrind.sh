#!/usr/bin/env bash
# Instructions per forwarded PUBLISH of the session alone: examples/bridge_bench (the session
# in-process over in-memory streams, no sockets) under callgrind, each direction and QoS against
# a run with no messages.
#
#   benches/bridge_callgrind.sh                 # builds this checkout's example, prints the table
#   COUNT=20000 PAYLOAD=64 benches/bridge_callgrind.sh
#   RULES=1 benches/bridge_callgrind.sh         # WIoTP org against a generic tenant with 50 rules
#
# With RULES=1 the same traffic (COUNT PUBLISHes of PAYLOAD bytes, topics of the same length,
# broker prefixes of the same length) runs for a WIoTP application (group-limited API key) and for
# a user of a generic tenant whose topic is decided by the 43rd of 50 rules, in one invocation, and
# the table gives both and generic / WIoTP per direction and QoS.
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

if [[ "${RULES:-0}" == 1 ]]; then
  declare -A base per
  for profile in wiotp generic; do
    base[$profile]=$(ir "none-$profile" --direction none --profile "$profile")
  done
  echo "| direction, QoS | WIoTP org, Ir per PUBLISH | generic tenant (50 rules), Ir per PUBLISH | generic / WIoTP |"
  echo "|---|---:|---:|---:|"
  for direction in in out; do
    for qos in 0 1; do
      for profile in wiotp generic; do
        total=$(ir "$direction-$qos-$profile" --direction "$direction" --qos "$qos" --profile "$profile")
        per[$profile]=$(( (total - base[$profile]) / COUNT ))
      done
      ratio=$(awk -v g="${per[generic]}" -v w="${per[wiotp]}" 'BEGIN { printf "%.3f", g / w }')
      echo "| $direction, QoS $qos | ${per[wiotp]} | ${per[generic]} | $ratio |"
    done
  done
  echo
  echo "$COUNT messages of $PAYLOAD B per run; in: client → broker, out: broker → client."
  exit 0
fi

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
