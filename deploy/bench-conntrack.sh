#!/usr/bin/env bash
# Benchmark: conntrack-syncd (inject and cache modes) against conntrackd
# (FTFW, external cache and inject) in the same namespace lab and run:
# replication rate and losses, replication lag, CPU, the cache modes' commit
# cost, and 100 connections across the master's death. Release build.
# Usage: deploy/bench-conntrack.sh [syncd-inject|syncd-cache|conntrackd-cache|conntrackd-inject ...]
set -euo pipefail
cd "$(dirname "$0")/.."
command -v conntrackd >/dev/null || { echo "needs conntrackd: apt-get install conntrackd" >&2; exit 1; }
command -v conntrack >/dev/null || { echo "needs conntrack: apt-get install conntrack" >&2; exit 1; }
cargo build --release --quiet -p conntrack-syncd -p vrrpd -p lb-forwarder
cargo build --release --quiet -p tandem-demo --bin tandem-bench-conntrack
exec target/release/tandem-bench-conntrack "$@"
