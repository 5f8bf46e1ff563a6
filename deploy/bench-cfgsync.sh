#!/usr/bin/env bash
# Benchmark: cfg-syncd's change-to-visible latency (p50/p99 over N single-file
# changes) and the full sync of 1,000 farm files, side by side with
# `rsync -a --delete` over the same SSH link and keys, in a two-namespace lab
# with a real sshd on the backup. Release build.
# Usage: deploy/bench-cfgsync.sh [N] [--scale]
#   --scale: also 100,000 files holding 1 GiB to an empty backup (cfg-syncd's
#   tested limits: time and peak RSS), against rsync; about 2 GiB of /dev/shm.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v rsync >/dev/null || { echo "needs rsync: apt-get install rsync" >&2; exit 1; }
command -v sshd >/dev/null || [ -x /usr/sbin/sshd ] || { echo "needs sshd: apt-get install openssh-server" >&2; exit 1; }
cargo build --release --quiet -p cfg-syncd
cargo build --release --quiet -p tandem-demo --bin tandem-bench-cfgsync
exec target/release/tandem-bench-cfgsync "$@"
