#!/usr/bin/env bash
# Benchmark: planned handovers under live traffic (a new request every 5 ms,
# 50 long-lived connections), vrrpd (maintenance, SIGTERM of vrrpd, failback)
# and keepalived's graceful stop (Debian package) in the same lab and run.
# Per direction: failed requests, broken long-lived connections, client gap
# median and max. Release build.
# Usage: deploy/bench-handover.sh [HANDOVERS_EACH_WAY [KIND ...]]
#        KIND: maintenance stop failback keepalived (default: all; 20 each way)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v keepalived >/dev/null || { echo "needs keepalived: apt-get install keepalived" >&2; exit 1; }
cargo build --workspace --release --quiet
exec target/release/tandem-bench-handover "$@"
