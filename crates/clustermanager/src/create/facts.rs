//! Preflight of cluster creation: the facts of each node (Tandem version,
//! node name, interfaces and addresses, clock, replicated files) and the
//! pure check that two nodes can form a pair. The facts of the peer are read
//! over SSH with the same commands as the local ones, so both sides are
//! judged alike: `ip -o link` / `ip -o addr` (netlink, per network namespace,
//! unlike /sys which shows the mount's namespace), `date +%s%3N`.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;

use tandem_config::IpNet;
use tandem_proto::v1;

/// The replicated files and trees, as cfg-syncd replicates them
/// (docs/cfg-syncd.md): what cluster creation erases on the peer and then
/// copies from the master.
pub const REPLICATED_FILES: [&str; 2] = ["cluster.toml", "keys/sync.key"];
pub const REPLICATED_DIRS: [&str; 5] = ["farms", "checks", "certs", "notifications", "routes"];

/// The largest clock difference the pair accepts: certificates, logs and
/// the conntrack sync protocol's timestamps assume close clocks.
pub const MAX_SKEW_MS: i64 = 2000;

/// What preflight knows about one node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// The Tandem version (`clustermanager --version`).
    pub version: String,
    /// node.toml's `name`: the node's identity in the cluster.
    pub node_name: String,
    /// Interface names, `lo` excluded.
    pub interfaces: BTreeSet<String>,
    /// (interface, address/prefix) of every address.
    pub addresses: Vec<(String, IpNet)>,
    /// The interface the route to the other node's address leaves by.
    pub route_dev: Option<String>,
}

impl Facts {
    /// The interface holding `ip`, if any.
    pub fn interface_of(&self, ip: IpAddr) -> Option<&str> {
        self.addresses
            .iter()
            .find(|(_, net)| net.addr == ip)
            .map(|(i, _)| i.as_str())
    }
}

/// Everything a refused preflight reports (all problems at once: the
/// operator fixes them in one go).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(pub Vec<String>);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "preflight refused the pair: {}", self.0.join("; "))
    }
}

/// Judges whether `local` (at `local_ip`) and `peer` (at `remote_ip`) can
/// form a cluster; `skew_ms` is the peer's clock minus ours. Returns the
/// cluster interface (the same name on both nodes).
pub fn check(
    local: &Facts,
    peer: &Facts,
    local_ip: IpAddr,
    remote_ip: IpAddr,
    skew_ms: i64,
) -> Result<String, Refusal> {
    let mut problems = Vec::new();
    let (me, other) = (&local.node_name, &peer.node_name);
    if local.version != peer.version {
        problems.push(format!(
            "Tandem versions differ: {me} runs {}, {other} runs {}; install the same version on both nodes",
            local.version, peer.version
        ));
    }
    if me == other {
        problems.push(format!(
            "both nodes are named `{me}` (node.toml `name`); the name is a node's identity in the cluster: rename one"
        ));
    }
    let only_local: Vec<&str> = local
        .interfaces
        .difference(&peer.interfaces)
        .map(String::as_str)
        .collect();
    let only_peer: Vec<&str> = peer
        .interfaces
        .difference(&local.interfaces)
        .map(String::as_str)
        .collect();
    if !only_local.is_empty() || !only_peer.is_empty() {
        problems.push(format!(
            "NIC names differ (floating IPs and tracked interfaces are named alike on both nodes): only on {me}: [{}]; only on {other}: [{}]",
            only_local.join(", "),
            only_peer.join(", ")
        ));
    }
    let cluster_if = local.interface_of(local_ip).map(str::to_owned);
    match &cluster_if {
        None => problems.push(format!(
            "local address {local_ip} is on no interface of {me}"
        )),
        Some(ifname) => {
            if !peer.interfaces.contains(ifname) {
                problems.push(format!(
                    "{local_ip} is on {me}'s {ifname}, which {other} does not have"
                ));
            }
            match peer.interface_of(remote_ip) {
                None => problems.push(format!(
                    "remote address {remote_ip} is on no interface of {other}"
                )),
                Some(pif) if pif != ifname => problems.push(format!(
                    "the cluster link must use the same interface on both nodes: {local_ip} is on {me}'s {ifname}, {remote_ip} on {other}'s {pif}"
                )),
                Some(_) => {}
            }
            if local.route_dev.as_deref() != Some(ifname) {
                problems.push(format!(
                    "{me} does not reach {remote_ip} over {ifname} (route: {})",
                    local.route_dev.as_deref().unwrap_or("none")
                ));
            }
            if peer.route_dev.as_deref() != Some(ifname) {
                problems.push(format!(
                    "{other} does not reach {local_ip} over {ifname} (route: {})",
                    peer.route_dev.as_deref().unwrap_or("none")
                ));
            }
        }
    }
    if skew_ms.abs() >= MAX_SKEW_MS {
        problems.push(format!(
            "clocks differ by {} ms ({other} is {}), more than {MAX_SKEW_MS} ms: synchronise them (NTP)",
            skew_ms.abs(),
            if skew_ms > 0 { "ahead" } else { "behind" }
        ));
    }
    match (problems.is_empty(), cluster_if) {
        (true, Some(i)) => Ok(i),
        _ => Err(Refusal(problems)),
    }
}

/// Interface names from `ip -o link show` (`2: eth0@if7: <...> ...`),
/// without `lo` and without the `@peer` suffix of veths.
pub fn parse_ip_link(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).trim().to_owned())
        .filter(|n| !n.is_empty() && n != "lo")
        .collect()
}

/// (interface, address/prefix) from `ip -o addr show`
/// (`2: eth0    inet 10.0.0.1/24 brd ... scope global eth0\ ...`).
pub fn parse_ip_addr(text: &str) -> Vec<(String, IpNet)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let (Some(_idx), Some(ifname), Some(family), Some(net)) =
            (f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        if family != "inet" && family != "inet6" {
            continue;
        }
        if let Ok(net) = net.parse::<IpNet>() {
            let ifname = ifname.split('@').next().unwrap_or(ifname).to_owned();
            out.push((ifname, net));
        }
    }
    out
}

/// The `dev` of `ip -o route get ADDR`.
pub fn parse_route_dev(text: &str) -> Option<String> {
    let mut f = text.split_whitespace();
    while let Some(w) = f.next() {
        if w == "dev" {
            return f.next().map(str::to_owned);
        }
    }
    None
}

/// The version from `clustermanager --version` (`clustermanager 0.1.0`).
pub fn parse_version(text: &str) -> Option<String> {
    text.split_whitespace().last().map(str::to_owned)
}

/// node.toml's `name`.
pub fn parse_node_name(text: &str) -> Result<String, String> {
    let node: tandem_config::NodeConfig =
        toml::from_str(text).map_err(|e| e.message().to_owned())?;
    Ok(node.name)
}

/// Whether a path relative to the config dir is replicated (the lists of
/// docs/cfg-syncd.md; dotfiles and `*.tmp` never are).
pub fn is_replicated(rel: &str) -> bool {
    if rel
        .split('/')
        .any(|c| c.is_empty() || c.starts_with('.') || c.ends_with(".tmp"))
    {
        return false;
    }
    REPLICATED_FILES.contains(&rel)
        || REPLICATED_DIRS
            .iter()
            .any(|d| rel.strip_prefix(d).is_some_and(|r| r.starts_with('/')))
}

/// The replicated files of a local config dir, relative, sorted (regular
/// files only; symlinks are not followed, as cfg-syncd does).
pub fn replicated_files(config_dir: &Path) -> std::io::Result<Vec<String>> {
    let mut out = Vec::new();
    for f in REPLICATED_FILES {
        if std::fs::symlink_metadata(config_dir.join(f)).is_ok_and(|m| m.is_file()) {
            out.push(f.to_owned());
        }
    }
    let mut stack: Vec<String> = REPLICATED_DIRS.iter().map(|d| (*d).to_owned()).collect();
    while let Some(rel) = stack.pop() {
        let entries = match std::fs::read_dir(config_dir.join(&rel)) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for e in entries {
            let e = e?;
            let r = format!("{rel}/{}", e.file_name().to_string_lossy());
            let t = e.file_type()?;
            if t.is_dir() {
                stack.push(r);
            } else if t.is_file() && is_replicated(&r) {
                out.push(r);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The shell command listing a peer's replicated files (relative paths,
/// one per line) under `config_dir`.
pub fn list_replicated_command(config_dir: &Path) -> String {
    let mut cmd = format!(
        "cd {} 2>/dev/null || exit 0; find",
        sh_quote(&config_dir.display().to_string())
    );
    for p in REPLICATED_FILES.iter().chain(REPLICATED_DIRS.iter()) {
        cmd.push(' ');
        cmd.push_str(p);
    }
    cmd.push_str(" -type f 2>/dev/null; true");
    cmd
}

/// One shell script running several commands on the peer in one SSH
/// round trip (each a named section with its exit status; stderr is kept
/// only when the command fails, for the message): preflight asks its
/// questions at once, not one exec each.
pub fn sections_script(parts: &[(&str, String)]) -> String {
    let mut script = String::from("e=$(mktemp) || exit 1");
    for (name, cmd) in parts {
        script.push_str(&format!(
            "; printf '@@begin {name}\\n'; {{ {cmd} ; }} 2>\"$e\"; rc=$?; [ $rc -eq 0 ] || cat \"$e\"; printf '\\n@@end {name} %s\\n' $rc"
        ));
    }
    script.push_str("; rm -f \"$e\"");
    script
}

/// The output of a [`sections_script`]: section name → (output, exit status).
pub fn parse_sections(text: &str) -> std::collections::BTreeMap<String, (String, i32)> {
    let mut out = std::collections::BTreeMap::new();
    let mut current: Option<(String, Vec<&str>)> = None;
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("@@begin ") {
            current = Some((name.to_owned(), Vec::new()));
        } else if let Some(rest) = line.strip_prefix("@@end ") {
            let mut f = rest.split_whitespace();
            let (name, status) = (f.next().unwrap_or(""), f.next().unwrap_or(""));
            if let Some((n, mut lines)) = current.take()
                && n == name
            {
                // The newline printed before `@@end`.
                if lines.last() == Some(&"") {
                    lines.pop();
                }
                let mut body = lines.join("\n");
                if !body.is_empty() {
                    body.push('\n');
                }
                out.insert(n, (body, status.parse().unwrap_or(-1)));
            }
        } else if let Some((_, lines)) = current.as_mut() {
            lines.push(line);
        }
    }
    out
}

/// Single-quotes `s` for a POSIX shell.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Runs a local command (inside this process's network namespace) and
/// returns its stdout.
pub async fn run_local(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .map_err(|e| anyhow::anyhow!("running `{program} {}`: {e}", args.join(" ")))?;
    if !out.status.success() {
        anyhow::bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// This node's facts; `toward` is the other node's address (for the route
/// check), if known.
pub async fn gather_local(config_dir: &Path, toward: Option<IpAddr>) -> anyhow::Result<Facts> {
    let node_file = config_dir.join(tandem_config::NODE_FILE);
    let text = std::fs::read_to_string(&node_file)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", node_file.display()))?;
    let node_name =
        parse_node_name(&text).map_err(|e| anyhow::anyhow!("{}: {e}", node_file.display()))?;
    let route_dev = match toward {
        Some(ip) => parse_route_dev(
            &run_local("ip", &["-o", "route", "get", &ip.to_string()])
                .await
                .unwrap_or_default(),
        ),
        None => None,
    };
    Ok(Facts {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        node_name,
        interfaces: parse_ip_link(&run_local("ip", &["-o", "link", "show"]).await?),
        addresses: parse_ip_addr(&run_local("ip", &["-o", "addr", "show"]).await?),
        route_dev,
    })
}

/// The facts this node gives a peer that asks (the `Preflight` RPC).
pub async fn local_facts(config_dir: &Path) -> anyhow::Result<v1::PreflightReply> {
    let facts = gather_local(config_dir, None).await?;
    Ok(v1::PreflightReply {
        version: facts.version,
        hostname: facts.node_name,
        interfaces: facts.interfaces.into_iter().collect(),
        unix_ms: tandem_runtime::unix_ms(std::time::SystemTime::now()),
        would_erase: replicated_files(config_dir)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(name: &str, ifs: &[&str], addrs: &[(&str, &str)], route: &str) -> Facts {
        Facts {
            version: "0.1.0".into(),
            node_name: name.into(),
            interfaces: ifs.iter().map(|s| (*s).to_owned()).collect(),
            addresses: addrs
                .iter()
                .map(|(i, a)| ((*i).to_owned(), a.parse().unwrap()))
                .collect(),
            route_dev: Some(route.into()),
        }
    }

    fn pair() -> (Facts, Facts) {
        (
            facts(
                "lb1",
                &["eth0", "eth2"],
                &[("eth2", "192.168.100.1/24")],
                "eth2",
            ),
            facts(
                "lb2",
                &["eth0", "eth2"],
                &[("eth2", "192.168.100.2/24")],
                "eth2",
            ),
        )
    }

    fn ips() -> (IpAddr, IpAddr) {
        (
            "192.168.100.1".parse().unwrap(),
            "192.168.100.2".parse().unwrap(),
        )
    }

    #[test]
    fn a_matching_pair_passes_and_names_the_cluster_interface() {
        let (a, b) = pair();
        let (l, r) = ips();
        assert_eq!(check(&a, &b, l, r, 15).unwrap(), "eth2");
    }

    #[test]
    fn each_mismatch_is_named() {
        let (l, r) = ips();
        let (a, mut b) = pair();
        b.node_name = "lb1".into();
        let e = check(&a, &b, l, r, 0).unwrap_err().to_string();
        assert!(e.contains("both nodes are named `lb1`"), "{e}");

        let (a, mut b) = pair();
        b.interfaces.remove("eth0");
        b.interfaces.insert("eth9".into());
        let e = check(&a, &b, l, r, 0).unwrap_err().to_string();
        assert!(
            e.contains("only on lb1: [eth0]; only on lb2: [eth9]"),
            "{e}"
        );

        let (a, mut b) = pair();
        b.version = "0.2.0".into();
        let e = check(&a, &b, l, r, 0).unwrap_err().to_string();
        assert!(e.contains("lb1 runs 0.1.0, lb2 runs 0.2.0"), "{e}");

        let (a, b) = pair();
        let e = check(&a, &b, l, r, -2500).unwrap_err().to_string();
        assert!(e.contains("2500 ms (lb2 is behind)"), "{e}");

        let (a, b) = pair();
        let e = check(&a, &b, "192.168.100.9".parse().unwrap(), r, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("192.168.100.9 is on no interface of lb1"), "{e}");

        let (mut a, b) = pair();
        a.route_dev = Some("eth0".into());
        let e = check(&a, &b, l, r, 0).unwrap_err().to_string();
        assert!(
            e.contains("lb1 does not reach 192.168.100.2 over eth2"),
            "{e}"
        );
    }

    #[test]
    fn ip_outputs_parse() {
        let link = "1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue state UNKNOWN mode DEFAULT group default qlen 1000\\    link/loopback 00:00:00:00:00:00 brd 00:00:00:00:00:00\n\
                    2: eth0@if12: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue state UP mode DEFAULT group default qlen 1000\\    link/ether 2a:1b:00:00:00:01 brd ff:ff:ff:ff:ff:ff link-netns x\n";
        assert_eq!(
            parse_ip_link(link).into_iter().collect::<Vec<_>>(),
            vec!["eth0"]
        );
        let addr = "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever\n\
                    2: eth0    inet 10.0.0.1/24 scope global eth0\\       valid_lft forever preferred_lft forever\n\
                    2: eth0    inet6 fe80::1/64 scope link \\       valid_lft forever preferred_lft forever\n";
        let a = parse_ip_addr(addr);
        assert_eq!(a.len(), 3);
        assert_eq!(a[1].0, "eth0");
        assert_eq!(a[1].1.to_string(), "10.0.0.1/24");
        assert_eq!(
            parse_route_dev("192.168.100.2 dev eth2 src 192.168.100.1 uid 0 \\    cache "),
            Some("eth2".into())
        );
        assert_eq!(
            parse_version("clustermanager 0.1.0\n"),
            Some("0.1.0".into())
        );
    }

    #[test]
    fn sections_come_back_apart_with_their_status() {
        let script = sections_script(&[
            ("a", "printf 'x\\ny'".into()),
            ("b", "echo oops >&2; false".into()),
            ("c", "echo noise >&2; true".into()),
        ]);
        let out = std::process::Command::new("sh")
            .args(["-c", &script])
            .output()
            .unwrap();
        let s = parse_sections(&String::from_utf8_lossy(&out.stdout));
        assert_eq!(s["a"], ("x\ny\n".to_owned(), 0));
        assert_eq!(s["b"], ("oops\n".to_owned(), 1));
        assert_eq!(s["c"], (String::new(), 0));
    }

    #[test]
    fn the_replicated_lists_follow_cfg_syncd() {
        for yes in [
            "cluster.toml",
            "keys/sync.key",
            "farms/web.toml",
            "checks/a/b.sh",
        ] {
            assert!(is_replicated(yes), "{yes}");
        }
        for no in [
            "node.toml",
            "ssh/id_ed25519",
            "keys/other.key",
            "farms/.web.toml.swp",
            "farms/web.toml.tmp",
            "farmsx/web.toml",
            "backups/x",
        ] {
            assert!(!is_replicated(no), "{no}");
        }
    }
}
