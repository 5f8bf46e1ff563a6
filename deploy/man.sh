#!/usr/bin/env bash
# Writes Tandem's man pages into OUTDIR:
#   OUTDIR/man8/<binary>.8.gz   each binary's --help (help2man) with the
#                               EXIT STATUS, FILES, EXAMPLES and SEE ALSO
#                               sections of deploy/man/<binary>.h2m
#   OUTDIR/man5/tandem.toml.5.gz   the configuration files, made from
#                               docs/configuration.md (go-md2man): one source
#                               for the page and the docs
#
#   deploy/man.sh BIN_DIR OUTDIR [VERSION]
#
# Used by deploy/build-deb.sh and deploy/install.sh. Needs help2man and
# go-md2man (apt-get install help2man go-md2man).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
die() { echo "man.sh: $*" >&2; exit 1; }

[ $# -ge 2 ] || die "usage: deploy/man.sh BIN_DIR OUTDIR [VERSION]"
bin_dir=$1 out=$2
command -v help2man >/dev/null || die "help2man is missing: apt-get install help2man"
command -v go-md2man >/dev/null || die "go-md2man is missing: apt-get install go-md2man"
version=${3:-$("$bin_dir/tandemctl" --version | awk '{print $2}')}
# A fixed date keeps the pages reproducible from one build to the next.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$repo" log -1 --format=%ct 2>/dev/null || date +%s)}

declare -A names=(
    [lb-forwarder]="Tandem load balancer: farms, health checks and the nftables datapath"
    [vrrpd]="Tandem VRRPv3 heartbeat and floating IPs"
    [conntrack-syncd]="Tandem connection-tracking replication"
    [cfg-syncd]="Tandem configuration replication over SSH"
    [clustermanager]="Tandem cluster manager"
    [routed]="Tandem active-active routing: the VIPs announced over BGP by BIRD"
    [tandemctl]="the operator's CLI of a Tandem load-balancer cluster"
)
mkdir -p "$out/man8" "$out/man5"
for b in "${!names[@]}"; do
    [ -x "$bin_dir/$b" ] || die "$bin_dir/$b is missing: build the workspace first"
    help2man --no-info --section 8 --name "${names[$b]}" \
        --include "$repo/deploy/man/$b.h2m" \
        --source "Tandem $version" --manual Tandem "$bin_dir/$b" \
        | gzip -9n > "$out/man8/$b.8.gz"
done

# A page's tables are too wide for a terminal: each row becomes an item,
# `- **first cell** — header: cell; header: cell ...`.
tables_as_lists() {
    awk '
        function trim(s) { gsub(/^[ \t]+|[ \t]+$/, "", s); return s }
        function cells(line, out,   n, i) {
            sub(/^[ \t]*\|/, "", line); sub(/\|[ \t]*$/, "", line)
            n = split(line, out, / \| /)
            for (i = 1; i <= n; i++) out[i] = trim(out[i])
            return n
        }
        /^[ \t]*\|/ {
            if (!intable) { nh = cells($0, head); intable = 1; sep = 1; next }
            if (sep) { sep = 0; next }
            n = cells($0, c)
            item = "- **" c[1] "**"
            for (i = 2; i <= n; i++) {
                if (c[i] == "" || c[i] == "—") continue
                item = item (i == 2 ? " — " : "; ") head[i] ": " c[i]
            }
            print item
            next
        }
        { if (intable) { intable = 0; print "" } print }
    '
}

# tandem.toml(5): docs/configuration.md with a man page's title and NAME;
# its `##` sections become the page's sections.
date=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y-%m-%d)
{
    printf '%% TANDEM.TOML 5 "%s" "Tandem %s" "Tandem"\n\n' "$date" "$version"
    printf '# NAME\n\ntandem.toml - the configuration files of a Tandem node: node.toml, cluster.toml, farms/*.toml\n\n'
    sed -e '1{/^# /d}' -e 's/^## /# /' -e 's/^### /## /' -e 's/^#### /### /' \
        "$repo/docs/configuration.md" | tables_as_lists
    printf '\n# SEE ALSO\n\ntandemctl(8), lb-forwarder(8), vrrpd(8), conntrack-syncd(8), cfg-syncd(8), clustermanager(8); the documentation in /usr/share/doc/tandem.\n'
} | go-md2man | gzip -9n > "$out/man5/tandem.toml.5.gz"
echo "man pages written to $out"
