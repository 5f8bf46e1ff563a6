#!/usr/bin/env bash
# Benchmark: throughput through a VIP each for Tandem's nftables datapath
# (round-robin, persistent and Maglev farms), a minimal hand-written nftables
# DNAT rule (the ceiling) and HAProxy in TCP mode, all driven at once in the
# same namespace lab; then the time to apply a change to a farm of 1,000
# backends. Release build. Usage: deploy/bench-forwarder.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
command -v haproxy >/dev/null || { echo "needs haproxy: apt-get install haproxy" >&2; exit 1; }
cargo build --workspace --release --quiet
exec target/release/tandem-bench-forwarder "$@"
