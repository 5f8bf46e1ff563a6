# Shared by deploy/*.sh: sourced, not run.

# need_packages PKG...: installs the Debian packages that are missing
# (quietly, as root, with apt-get), or says what to install and exits.
need_packages() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
        echo "$(basename "$0") needs these Debian packages: ${missing[*]}" >&2
        echo "install them as root: apt-get install ${missing[*]}" >&2
        exit 1
    fi
    echo "installing ${missing[*]} (apt-get)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null || { echo "apt-get update failed" >&2; exit 1; }
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
        { echo "apt-get install ${missing[*]} failed" >&2; exit 1; }
}

# need_root: the labs build network namespaces.
need_root() {
    [ "$(id -u)" -eq 0 ] || { echo "$(basename "$0") must run as root (it builds network namespaces)" >&2; exit 1; }
}

# need_cargo: a Rust toolchain new enough for the workspace.
need_cargo() {
    command -v cargo >/dev/null || {
        echo "needs a Rust toolchain: curl https://sh.rustup.rs -sSf | sh -s -- -y --profile minimal, then . ~/.cargo/env" >&2
        exit 1
    }
}

# target_dir: where cargo puts binaries (honours CARGO_TARGET_DIR and
# .cargo/config's build.target-dir).
target_dir() {
    cargo metadata --format-version 1 --no-deps 2>/dev/null |
        sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p'
}
