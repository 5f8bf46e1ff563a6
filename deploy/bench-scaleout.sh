#!/usr/bin/env bash
# Benchmark: an active-active cluster of three nodes behind a BIRD router
# with kernel ECMP (network namespaces on this machine). Reports how new
# connections split over the nodes, a node crash (BFD detection, when the
# router dropped the node, when the last long-lived DSR flow it carried
# moved on, how many of 100 survived), and CPU per connection with one node
# carrying everything (the pair's master) vs three. Release build.
# Usage: deploy/bench-scaleout.sh [RUNS]   (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v bird >/dev/null || { echo "needs BIRD 2: apt-get install bird2" >&2; exit 1; }
cargo build --workspace --release --quiet
exec target/release/tandem-bench-scaleout "$@"
