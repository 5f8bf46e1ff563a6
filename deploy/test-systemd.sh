#!/usr/bin/env bash
# The container test: Tandem as shipped (the .deb, its systemd units, sshd
# drop-in and journald logging) on two Debian containers booted with a real
# systemd as PID 1, forming a cluster, failing over, rebooting and being
# destroyed through systemctl and tandemctl (tests/systemd.rs).
#
#   deploy/test-systemd.sh [NEXTEST ARGS...]
#
# Builds the .deb (deploy/build-deb.sh --fast: a release build, packed with
# faster compression), then runs the
# test, which is ignored by `cargo nextest run --workspace` because it takes
# minutes. Needs root and the Debian packages systemd-container (nspawn),
# debootstrap, dpkg-dev, help2man, openssh-client and openssl. The first run
# builds the containers' base system into /var/cache/tandem-test (debootstrap
# from this machine's Debian mirror: a few minutes); later runs reuse it.
# Nothing touches the host's network or its systemd: see docs/install.md.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

die() { echo "test-systemd.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (containers, namespaces, overlay mounts)"
for tool in systemd-nspawn debootstrap; do
    command -v "$tool" >/dev/null || die "$tool is missing: apt-get install systemd-container debootstrap"
done

# The same package, compressed faster: it is installed at once, not shipped.
deploy/build-deb.sh --fast
exec cargo nextest run --workspace --run-ignored only -E 'binary(systemd)' --no-capture "$@"
