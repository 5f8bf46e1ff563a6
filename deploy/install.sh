#!/usr/bin/env bash
# Installs Tandem from a source checkout on any systemd distribution (the
# .deb, deploy/build-deb.sh, is the way on Debian and Ubuntu).
#
#   deploy/install.sh [--build] [--bin-dir DIR] [--prefix DIR] [--destdir DIR] [--no-enable]
#   deploy/install.sh --uninstall [--prefix DIR] [--destdir DIR]
#
# What goes where (PREFIX=/usr by default, everything under $DESTDIR if set):
#   PREFIX/bin/                          the seven binaries
#   PREFIX/lib/systemd/system/           six daemon units, tandem-bird.service, tandem.target
#   PREFIX/lib/tmpfiles.d/tandem.conf    /run/tandem, the shared socket directory
#   PREFIX/share/doc/tandem/             docs, examples/ (the example /etc/tandem)
#   PREFIX/share/man/man8/               a man page per binary, man5/tandem.toml.5 (deploy/man.sh)
#   PREFIX/share/doc/tandem/help/        the plain --help texts if help2man or go-md2man is missing
#   PREFIX/share/{bash-completion,zsh,fish}/...   tandemctl completions
#   /etc/ssh/sshd_config.d/tandem.conf   sshd reads the cluster key from /etc/tandem/ssh
#                                        (kept if you changed it; removed by --uninstall
#                                        only if unchanged)
#   /etc/tandem/                         created empty (0750) if missing; never removed
#
# Without DESTDIR it also creates /run/tandem, reloads systemd (and sshd, for
# its drop-in) and enables the
# units (they start only once /etc/tandem/node.toml exists: see
# docs/install.md). With DESTDIR the units are enabled offline
# (systemctl --root), so an image built this way boots with Tandem enabled.
# --uninstall stops and disables the units and removes every file above
# except /etc/tandem, which belongs to the administrator.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BINARIES=(lb-forwarder vrrpd conntrack-syncd cfg-syncd clustermanager routed tandemctl)
DAEMONS=(lb-forwarder vrrpd conntrack-syncd cfg-syncd clustermanager routed)

destdir=${DESTDIR:-}
prefix=/usr
bin_dir=
build=no
enable=yes
action=install

die() { echo "install.sh: $*" >&2; exit 1; }
usage() { sed -n '2,6p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case $1 in
        --build) build=yes ;;
        --bin-dir) bin_dir=${2:?--bin-dir needs a directory}; shift ;;
        --prefix) prefix=${2:?--prefix needs a directory}; shift ;;
        --destdir) destdir=${2:?--destdir needs a directory}; shift ;;
        --no-enable) enable=no ;;
        --uninstall) action=uninstall ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
    shift
done
case $prefix in /*) ;; *) die "--prefix must be absolute: $prefix" ;; esac
if [ -n "$destdir" ]; then
    destdir=$(mkdir -p "$destdir" && cd "$destdir" && pwd)
fi

root=$destdir
bindir=$prefix/bin
# systemd and systemd-tmpfiles read /usr/lib and /usr/local/lib; any other
# prefix puts units and tmpfiles in /etc, where they are found too.
case $prefix in
    /usr|/usr/local)
        unitdir=$prefix/lib/systemd/system
        tmpfilesdir=$prefix/lib/tmpfiles.d ;;
    *)
        unitdir=/etc/systemd/system
        tmpfilesdir=/etc/tmpfiles.d ;;
esac
docdir=$prefix/share/doc/tandem
mandir=$prefix/share/man/man8
man5dir=$prefix/share/man/man5
bashdir=$prefix/share/bash-completion/completions
zshdir=$prefix/share/zsh/site-functions
fishdir=$prefix/share/fish/vendor_completions.d
# tandem-bird.service runs BIRD (bird2) for routed, on active-active nodes only.
units=("${DAEMONS[@]/%/.service}" tandem-bird.service tandem.target)
sshd_dropin=/etc/ssh/sshd_config.d/tandem.conf

# True when this script acts on the running system and systemd manages it.
live_systemd() { [ -z "$root" ] && [ -d /run/systemd/system ]; }

# Every file the install creates, for the uninstall and for the summary.
installed_files() {
    local b u
    for b in "${BINARIES[@]}"; do
        echo "$bindir/$b"
        echo "$mandir/$b.8.gz"
    done
    for u in "${units[@]}"; do echo "$unitdir/$u"; done
    echo "$man5dir/tandem.toml.5.gz"
    echo "$tmpfilesdir/tandem.conf"
    echo "$bashdir/tandemctl"
    echo "$zshdir/_tandemctl"
    echo "$fishdir/tandemctl.fish"
}

uninstall() {
    if live_systemd; then
        systemctl stop tandem.target "${units[@]}" 2>/dev/null || true
    fi
    if [ "$enable" = yes ] && command -v systemctl >/dev/null; then
        # Offline or live, this removes the .wants symlinks enable made.
        systemctl ${root:+--root="$root"} disable "${units[@]}" >/dev/null 2>&1 || true
    fi
    local f
    while read -r f; do rm -f "$root$f"; done < <(installed_files)
    # share/doc/tandem is Tandem's own: docs, examples, --help texts.
    rm -rf "$root$docdir"
    # sshd's drop-in, unless the administrator changed it.
    if [ -f "$root$sshd_dropin" ] && cmp -s "$root$sshd_dropin" "$repo/deploy/sshd/tandem.conf"; then
        rm -f "$root$sshd_dropin"
        reload_sshd
    fi
    if live_systemd; then systemctl daemon-reload; fi
    echo "Tandem removed from ${root:-/}; /etc/tandem was kept."
}

# sshd reads its drop-ins when it starts or reloads.
reload_sshd() {
    if live_systemd; then
        systemctl try-reload-or-restart ssh.service >/dev/null 2>&1 || true
    fi
}

# /etc/ssh/sshd_config.d/tandem.conf: installed when missing or unchanged, an
# administrator's edited copy is kept (as dpkg keeps a changed conffile).
install_sshd_dropin() {
    local src=$repo/deploy/sshd/tandem.conf dst=$root$sshd_dropin
    if [ -f "$dst" ] && ! cmp -s "$dst" "$src"; then
        echo "keeping your $sshd_dropin (it differs from $src)"
        return
    fi
    install -D -m 0644 "$src" "$dst"
    reload_sshd
}

find_binaries() {
    if [ -z "$bin_dir" ]; then
        bin_dir=${CARGO_TARGET_DIR:-$repo/target}/release
    fi
    if [ "$build" = yes ]; then
        (cd "$repo" && cargo build --release --workspace --bins)
    fi
    local b missing=()
    for b in "${BINARIES[@]}"; do
        [ -x "$bin_dir/$b" ] || missing+=("$b")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        die "missing in $bin_dir: ${missing[*]}. Build them first (cargo build --release --workspace --bins) or pass --build."
    fi
}

# The man pages (deploy/man.sh: each binary's --help with its EXIT STATUS,
# FILES and EXAMPLES, and tandem.toml(5)), else the --help texts themselves.
document_binaries() {
    local b pages
    if command -v help2man >/dev/null && command -v go-md2man >/dev/null; then
        pages=$(mktemp -d)
        "$repo/deploy/man.sh" "$bin_dir" "$pages" >/dev/null
        for b in "${BINARIES[@]}"; do
            install -D -m 0644 "$pages/man8/$b.8.gz" "$root$mandir/$b.8.gz"
        done
        install -D -m 0644 "$pages/man5/tandem.toml.5.gz" "$root$man5dir/tandem.toml.5.gz"
        rm -rf "$pages"
    else
        echo "help2man or go-md2man is missing: the --help texts go to $docdir/help instead of man pages"
        install -d -m 0755 "$root$docdir/help"
        for b in "${BINARIES[@]}"; do
            "$bin_dir/$b" --help > "$root$docdir/help/$b.txt"
            chmod 0644 "$root$docdir/help/$b.txt"
        done
    fi
}

install_all() {
    find_binaries
    local b u
    for b in "${BINARIES[@]}"; do
        install -D -m 0755 "$bin_dir/$b" "$root$bindir/$b"
    done
    for u in "${units[@]}"; do
        install -D -m 0644 "$repo/systemd/$u" "$root$unitdir/$u"
        # The units name /usr/bin; follow another prefix.
        if [ "$bindir" != /usr/bin ]; then
            sed -i "s|/usr/bin/|$bindir/|g" "$root$unitdir/$u"
        fi
    done
    install -D -m 0644 "$repo/systemd/tandem.conf" "$root$tmpfilesdir/tandem.conf"

    install -d -m 0755 "$root$docdir"
    install -m 0644 "$repo/README.md" "$repo"/docs/*.md "$root$docdir/"
    rm -rf "$root$docdir/examples"
    cp -R "$repo/deploy/examples" "$root$docdir/examples"
    find "$root$docdir/examples" -type d -exec chmod 0755 {} +
    find "$root$docdir/examples" -type f -exec chmod 0644 {} +
    find "$root$docdir/examples" -type f -name '*.sh' -exec chmod 0755 {} +

    document_binaries

    install -d -m 0755 "$root$bashdir" "$root$zshdir" "$root$fishdir"
    "$bin_dir/tandemctl" completions bash > "$root$bashdir/tandemctl"
    "$bin_dir/tandemctl" completions zsh > "$root$zshdir/_tandemctl"
    "$bin_dir/tandemctl" completions fish > "$root$fishdir/tandemctl.fish"
    chmod 0644 "$root$bashdir/tandemctl" "$root$zshdir/_tandemctl" "$root$fishdir/tandemctl.fish"

    install_sshd_dropin

    # The administrator's directory: created, never overwritten, never removed.
    [ -d "$root/etc/tandem" ] || install -d -m 0750 "$root/etc/tandem"

    if [ -z "$root" ]; then
        systemd-tmpfiles --create "$tmpfilesdir/tandem.conf" 2>/dev/null \
            || install -d -m 0700 /run/tandem
    fi
    if live_systemd; then systemctl daemon-reload; fi
    if [ "$enable" = yes ]; then
        command -v systemctl >/dev/null || die "systemctl not found: pass --no-enable"
        systemctl ${root:+--root="$root"} enable "${units[@]}" >/dev/null 2>&1 \
            || die "systemctl ${root:+--root=$root }enable ${units[*]} failed"
    fi

    echo "Tandem installed into ${root:-/} (binaries in $bindir, units in $unitdir)."
    if [ -z "$root" ] && [ ! -f /etc/tandem/node.toml ]; then
        echo "Next: write /etc/tandem/node.toml (examples in $docdir/examples), then"
        echo "      tandemctl config check /etc/tandem && systemctl start tandem.target"
    fi
}

case $action in
    install) install_all ;;
    uninstall) uninstall ;;
esac
