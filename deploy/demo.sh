#!/usr/bin/env bash
# Tandem's main job on one machine: build Tandem, then run a two-node cluster
# with a client in network namespaces, crash the master under live probing,
# and print the failover figures and the node table before and after.
# Needs root (namespaces), iproute2, and keepalived only for the benchmark.
# Leaves nothing behind: the lab removes its namespaces and processes.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --quiet
exec target/debug/tandem-demo
