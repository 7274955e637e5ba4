#!/bin/sh
# Runs examples/blind_forward.rs in one of compare.sh's warden slots, which start
# "$WARDEN_BIN run --config SLOT.yaml" in the scratch folder: the slot's listen and broker
# addresses come from that config. Build it first: cargo build --release --example blind_forward
#
#   WARDEN_BIN=benches/blind_forward.sh WARDEN_MODE=direct \
#   BASELINE_BIN=benches/blind_forward.sh BASELINE_MODE=direct \
#   BLIND_WARDEN=uring BLIND_BASELINE=epoll LAYOUT=split benches/compare.sh
#
# BLIND_WARDEN (uring) and BLIND_BASELINE (epoll): the mode for the warden and the
# warden-baseline slot (epoll, uring or uring-defer); BLIND_FORWARD_BIN: the binary (default:
# this checkout's release build).
set -eu
config=$3
case "$config" in
  warden-baseline.yaml) mode=${BLIND_BASELINE:-epoll} ;;
  *) mode=${BLIND_WARDEN:-uring} ;;
esac
listen=$(sed -n 's/.*bind: "\(.*\)"/\1/p' "$config")
upstream=$(sed -n 's/.*address: "\(.*\)"/\1/p' "$config")
exec "${BLIND_FORWARD_BIN:-$(dirname "$0")/../target/release/examples/blind_forward}" \
  --mode "$mode" --listen "$listen" --upstream "$upstream"
