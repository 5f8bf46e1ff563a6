#!/usr/bin/env bash
# Builds the tandem .deb: every binary, the systemd units, tmpfiles.d, the
# example configuration, the docs, the man pages (deploy/man.sh) and
# tandemctl's bash/zsh/fish completions. The package metadata lives in
# crates/tandemctl/Cargo.toml, [package.metadata.deb].
#
#   deploy/build-deb.sh            -> target/debian/tandem_<version>-1_<arch>.deb
#
# Needs cargo, help2man, go-md2man and dpkg-dev (dpkg-shlibdeps, for the libc
# dependency); installs cargo-deb (the version below, `cargo install --locked`)
# if it is missing.
set -euo pipefail

CARGO_DEB_VERSION=3.8.0

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

die() { echo "build-deb.sh: $*" >&2; exit 1; }

command -v help2man >/dev/null || die "help2man is missing: apt-get install help2man"
command -v go-md2man >/dev/null || die "go-md2man is missing: apt-get install go-md2man"
if ! cargo deb --version >/dev/null 2>&1; then
    echo "installing cargo-deb $CARGO_DEB_VERSION"
    cargo install --locked "cargo-deb@$CARGO_DEB_VERSION"
fi

# One release build of the whole workspace (one feature set); cargo-deb then
# only packs, it does not rebuild tandemctl alone with other features.
cargo build --release --workspace --bins

target=$(cargo metadata --format-version 1 --no-deps \
    | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
[ -n "$target" ] || die "cannot find the cargo target directory"
release=$target/release
version=$("$release/tandemctl" --version | awk '{print $2}')

# Generated assets, referenced as target/release/tandem-deb/... in the
# metadata (cargo-deb maps target/release to the real target directory).
gen=$release/tandem-deb
rm -rf "$gen"
mkdir -p "$gen/completions"
# Man pages: each binary's --help with EXIT STATUS, FILES and EXAMPLES, and
# tandem.toml(5) from docs/configuration.md.
"$repo/deploy/man.sh" "$release" "$gen" "$version"
"$release/tandemctl" completions bash > "$gen/completions/tandemctl"
"$release/tandemctl" completions zsh > "$gen/completions/_tandemctl"
"$release/tandemctl" completions fish > "$gen/completions/tandemctl.fish"

cargo deb -p tandemctl --no-build "$@"

deb=$(ls -t "$target"/debian/tandem_"$version"-*.deb | head -n 1)
echo
echo "built $deb ($(du -h "$deb" | cut -f1))"
echo "inspect: dpkg-deb -I $deb; dpkg-deb -c $deb"
