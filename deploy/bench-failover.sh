#!/usr/bin/env bash
# Benchmark: VRRP failover time of vrrpd vs keepalived (Debian package), same
# lab, same run, at 1 s and 50 ms advertisement intervals. Release build.
# Usage: deploy/bench-failover.sh [RUNS [INTERVAL_MS ...]]   (default: 5 runs; 1000 and 50 ms)
#        deploy/bench-failover.sh --stress [SECONDS [INTERVAL_MS ...]]
#          no node fails; 4 CPU hogs per core for SECONDS (default 60) at each
#          interval (default 100, 50 and 10 ms): role changes, worst client
#          outage, worst advert gap on the wire, vrrpd and keepalived side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v keepalived >/dev/null || { echo "needs keepalived: apt-get install keepalived" >&2; exit 1; }
cargo build --workspace --release --quiet
exec target/release/tandem-bench-failover "$@"
