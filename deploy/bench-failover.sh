#!/usr/bin/env bash
# Benchmark: VRRP failover time of vrrpd vs keepalived (Debian package), same
# lab, same run, at 1 s and 50 ms advertisement intervals. Release build.
# Usage: deploy/bench-failover.sh [RUNS [INTERVAL_MS ...]]   (default: 5 runs; 1000 and 50 ms)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v keepalived >/dev/null || { echo "needs keepalived: apt-get install keepalived" >&2; exit 1; }
cargo build --workspace --release --quiet
exec target/release/tandem-bench-failover "$@"
