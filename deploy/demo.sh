#!/usr/bin/env bash
# Tandem's main job, as far as it exists today: build Tandem, start one node's
# five daemons on the example configuration (in a private runtime directory,
# touching nothing of the host's /etc or /run), show what tandemctl sees,
# reload, stop. The two-node failover demo replaces this as the daemons land.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --workspace --quiet
bin=target/debug
work=$(mktemp -d /tmp/tandem-demo.XXXXXX)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

cp -r deploy/examples "$work/etc"
mkdir -p "$work/run"
echo "== tandemctl config check $work/etc"
"$bin/tandemctl" config check "$work/etc"

for d in clustermanager vrrpd lb-forwarder conntrack-syncd cfg-syncd; do
    "$bin/$d" --config-dir "$work/etc" --runtime-dir "$work/run" 2>>"$work/daemons.log" &
    pids+=($!)
done
for d in clustermanager vrrpd lb-forwarder conntrack-syncd cfg-syncd; do
    for _ in $(seq 100); do [ -S "$work/run/$d.sock" ] && break; sleep 0.05; done
done

echo; echo "== tandemctl status"
"$bin/tandemctl" --runtime-dir "$work/run" status || true

echo; echo "== an invalid farm is refused; the running configuration stays"
printf 'name = "broken"\nvip = "10.0.0.100"\nport = 70000\n' > "$work/etc/farms/broken.toml"
"$bin/tandemctl" --runtime-dir "$work/run" reload lb-forwarder || true
rm "$work/etc/farms/broken.toml"

echo; echo "== stopping (SIGTERM); daemon logs:"
for pid in "${pids[@]}"; do kill -TERM "$pid"; done
for pid in "${pids[@]}"; do wait "$pid" || true; done
pids=()
cat "$work/daemons.log"
