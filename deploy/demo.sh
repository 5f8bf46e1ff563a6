#!/usr/bin/env bash
# Tandem's main job on one machine: build Tandem, then run a two-node cluster
# (vrrpd, lb-forwarder, conntrack-syncd on each node), three backends and a
# client in network namespaces; crash the master under live traffic and print
# the failover time, the connections that survived, the requests that failed
# and the node table before and after. Needs root (namespaces), nftables and
# conntrack (apt-get install nftables conntrack iproute2).
# Leaves nothing behind: the lab removes its namespaces and processes.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in nft conntrack ip; do
    command -v "$tool" >/dev/null || { echo "needs $tool: apt-get install nftables conntrack iproute2" >&2; exit 1; }
done
cargo build --workspace --quiet
# The daemons log to stderr; keep only their warnings and errors (and any panic).
exec target/debug/tandem-demo 2> >(grep --line-buffered -v " INFO " >&2)
