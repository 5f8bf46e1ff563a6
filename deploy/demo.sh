#!/usr/bin/env bash
# Tandem's main job on one machine: build Tandem, then start two standalone
# Tandem nodes (all daemons and an sshd each), two backends and a client in
# network namespaces; form the cluster with `tandemctl cluster create`, crash
# the master under live traffic and print the failover time, the connections
# that survived, the requests that failed and the node table before and
# after. Needs root (namespaces) and: apt-get install nftables conntrack
# iproute2 openssh-server openssl.
# Leaves nothing behind: the lab removes its namespaces and processes.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in nft conntrack ip /usr/sbin/sshd ssh-keygen openssl unshare; do
    command -v "$tool" >/dev/null || { echo "needs $tool: apt-get install nftables conntrack iproute2 openssh-server openssl" >&2; exit 1; }
done
cargo build --workspace --quiet
# The daemons log to stderr; keep only their warnings and errors (and any panic).
exec target/debug/tandem-demo 2> >(grep --line-buffered -v " INFO " >&2)
