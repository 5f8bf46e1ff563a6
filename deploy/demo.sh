#!/usr/bin/env bash
# Tandem's main job on one machine: build Tandem, then start two standalone
# Tandem nodes (all daemons and an sshd each), two backends and a client in
# network namespaces; form the cluster with `tandemctl cluster create`, crash
# the master under live traffic and print the failover time, the connections
# that survived, the requests that failed and the node table before and
# after. Needs root (namespaces); installs the Debian packages it needs
# (nftables conntrack iproute2 openssh-server openssl) when they are missing.
# Leaves nothing behind: the lab removes its namespaces and processes.
set -euo pipefail
cd "$(dirname "$0")/.."
. deploy/common.sh
need_root
need_cargo
need_packages nftables conntrack iproute2 openssh-server openssl util-linux
cargo build --workspace --quiet
target=$(target_dir)
[ -n "$target" ] || { echo "cannot find cargo's target directory (cargo metadata failed)" >&2; exit 1; }
# The daemons log to stderr; keep only their warnings and errors (and any panic).
exec "$target/debug/tandem-demo" 2> >(grep --line-buffered -v " INFO " >&2)
