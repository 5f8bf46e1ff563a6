#!/usr/bin/env bash
# Benchmark: conntrack-syncd against conntrackd (FTFW) in the same namespace
# lab and run. Release build. Parts (default: all):
#   capacity  entries created straight in the master's table over ctnetlink
#             at set rates (10k to 200k/s, 30 s each): the highest rate with
#             zero loss, CPU µs per entry on each side, lag p50/p99, changes
#             per datagram (inject modes)
#   burst     50,000 new flows through the VIP in 10 s (SYNs): what the
#             backup holds 2 s after, peak RSS, retransmissions, packing
#   datapath  new TCP connections/s through the VIP with no sync daemon,
#             conntrack-syncd and conntrackd, twice interleaved
#   datapath-split  the same with the backup's daemons on CPU 1 and all
#             else on CPU 0, as if the backup were a second machine
#             (not in the default set)
#   classic   real connections as fast as two client threads open them,
#             lag one at a time, the cache modes' commit, 100 connections
#             across the master's death (all four modes)
# Usage: deploy/bench-conntrack.sh [capacity|burst|datapath|datapath-split|classic ...] [syncd-inject|syncd-cache|conntrackd-cache|conntrackd-inject ...]
# TANDEM_BENCH_CAPACITY_S / TANDEM_BENCH_DATAPATH_S set the run lengths,
# TANDEM_BENCH_ROUNDS the datapath parts' interleaved rounds (default 2);
# TANDEM_BENCH_KEEP_LOGS=1 keeps every daemon's log (the directory is printed).
# TANDEM_BENCH_SYNCD_ARGS="--nice -10" passes extra arguments to conntrack-syncd.
# TANDEM_BENCH_CONNTRACKD_NICE=1 moves conntrackd from its real-time
# scheduler to the normal one at nice -10 (where conntrack-syncd runs).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v conntrackd >/dev/null || { echo "needs conntrackd: apt-get install conntrackd" >&2; exit 1; }
command -v conntrack >/dev/null || { echo "needs conntrack: apt-get install conntrack" >&2; exit 1; }
cargo build --release --quiet -p conntrack-syncd -p vrrpd -p lb-forwarder
cargo build --release --quiet -p tandem-demo --bin tandem-bench-conntrack
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg) on $(nproc) CPUs"
target/release/tandem-bench-conntrack "$@"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
