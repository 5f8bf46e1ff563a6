//! Step 2, **preflight**: the facts of both nodes (the peer's read over the
//! password session with the same commands as ours), the pure pair check,
//! the floating IPs derived from this node's farms, the peer's files that
//! will be erased, and both cluster configurations validated before
//! anything is written. Nothing changes on either node here.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context as _, anyhow, bail};
use tandem_config::{Config, IpNet};
use tandem_proto::v1;
use tandem_ssh::SshSession;

use super::configure::{cluster_toml, with_cluster_link};
use super::facts::{self, Facts, Refusal, sh_quote};
use super::keys::sync_key;
use super::sshd;
use super::vrid;
use super::{CreateContext, Plan, Progress};

/// What preflight found, and the files the confirmed run will write.
pub struct Prepared {
    pub local: Facts,
    pub peer: Facts,
    /// The cluster link's interface (the same name on both nodes).
    pub cluster_if: String,
    /// The floating IPs, each on this node's interface whose subnet holds it.
    pub floating: Vec<(IpNet, String)>,
    /// The peer's replicated files, which the creation erases.
    pub would_erase: Vec<String>,
    pub cluster_toml: String,
    pub local_node_toml: String,
    pub peer_node_toml: String,
}

/// Runs preflight over `ssh` and reports it; Err when the pair is refused.
pub async fn run(
    ctx: &CreateContext,
    plan: &Plan,
    local_config: &Config,
    ssh: &SshSession,
    p: &Progress,
    listening: Option<vrid::Listening>,
) -> anyhow::Result<Prepared> {
    let local = facts::gather_local(&ctx.config_dir, Some(plan.remote_ip)).await?;
    let answers = gather_peer(ctx, ssh, plan).await?;
    let (peer, skew_ms) = (answers.facts, answers.skew_ms);
    // Each sshd must let the other node in with the cluster key.
    let mut problems = Vec::new();
    match sshd::local(
        &ctx.sshd_config,
        plan.remote_ip,
        plan.local_ip,
        ctx.ssh_port,
    )
    .await
    {
        Ok(f) => problems.extend(sshd::problems(&local.node_name, &f, &ctx.authorized_keys)),
        Err(e) => problems.push(format!("{}: {e}", local.node_name)),
    }
    match &answers.sshd {
        Ok(f) => problems.extend(sshd::problems(
            &peer.node_name,
            f,
            &ctx.peer_authorized_keys,
        )),
        Err(e) => problems.push(format!("{}: {e}", peer.node_name)),
    }
    // Nobody else may advertise our VRID on the cluster link.
    let mut routers = Vec::new();
    // (No listener: no interface holds the local address; the pair check
    // says so.)
    if let Some(l) = listening {
        match l.handle.await {
            Ok(Ok(heard)) => {
                if let Err(e) =
                    vrid::judge(plan.vrid, plan.vrid_chosen, &heard, plan.remote_ip, l.duration)
                {
                    problems.push(e);
                }
                routers = vrid::others(plan.vrid, &heard);
            }
            Ok(Err(e)) => problems.push(format!(
                "cannot listen for VRRP adverts on {} (to check that virtual router id {} is free): {e}",
                l.ifname, plan.vrid
            )),
            Err(e) => problems.push(format!("listening for VRRP adverts: {e}")),
        }
    }
    let cluster_if = match facts::check(&local, &peer, plan.local_ip, plan.remote_ip, skew_ms) {
        Ok(i) if problems.is_empty() => i,
        Ok(_) => return Err(anyhow!("{}; nothing was changed", Refusal(problems))),
        Err(mut r) => {
            r.0.extend(problems);
            return Err(anyhow!("{r}; nothing was changed"));
        }
    };
    let floating = floating_ips(local_config, &local)?;
    let would_erase = answers.replicated;
    let summary = format!(
        "{me} and {other}: Tandem {v}, NICs [{nics}], cluster link {cluster_if}, virtual router id {vrid} free{routers}, clock skew {skew_ms} ms; floating IPs {fl}; {n} replicated file(s) on {other} will be erased",
        me = local.node_name,
        other = peer.node_name,
        v = local.version,
        nics = local
            .interfaces
            .iter()
            .cloned()
            .collect::<Vec<_>>()
            .join(", "),
        fl = floating
            .iter()
            .map(|(ip, i)| format!("{ip} dev {i}"))
            .collect::<Vec<_>>()
            .join(", "),
        n = would_erase.len(),
        vrid = plan.vrid,
        routers = if routers.is_empty() {
            String::new()
        } else {
            format!(" (other VRRP routers on the link: {})", routers.join(", "))
        },
    );
    tracing::info!(step = "preflight", "cluster create: {summary}");
    p.send(v1::CreateClusterProgress {
        step: "preflight".into(),
        ok: true,
        message: summary,
        would_erase: would_erase.clone(),
        ..Default::default()
    })
    .await;

    // What will be written, validated before anything is.
    let cluster_toml = cluster_toml(
        plan,
        &local.node_name,
        &peer.node_name,
        &floating,
        ctx.ssh_port,
    );
    let local_node_toml = with_cluster_link(
        &std::fs::read_to_string(ctx.local_path(tandem_config::NODE_FILE))
            .context("reading this node's node.toml")?,
        &cluster_if,
        plan.local_ip,
    );
    let peer_node_toml = with_cluster_link(&answers.node_toml, &cluster_if, plan.remote_ip);
    validate(
        &ctx.config_dir,
        &local_node_toml,
        &cluster_toml,
        &local.node_name,
    )?;
    validate(
        &ctx.config_dir,
        &peer_node_toml,
        &cluster_toml,
        &peer.node_name,
    )?;
    Ok(Prepared {
        local,
        peer,
        cluster_if,
        floating,
        would_erase,
        cluster_toml,
        local_node_toml,
        peer_node_toml,
    })
}

/// What the peer told preflight, in one SSH round trip (its clock in a
/// second, short one).
struct PeerAnswers {
    facts: Facts,
    /// Its clock minus ours, ms.
    skew_ms: i64,
    node_toml: String,
    /// Its replicated files (relative paths): what the creation erases.
    replicated: Vec<String>,
    /// Its sshd (`sshd -T`), or why it could not be read.
    sshd: Result<sshd::SshdFacts, String>,
}

async fn gather_peer(
    ctx: &CreateContext,
    ssh: &SshSession,
    plan: &Plan,
) -> anyhow::Result<PeerAnswers> {
    let bin = ctx.peer_bin_dir.join("clustermanager");
    let node_file = ctx.peer_path(tandem_config::NODE_FILE);
    let sshd_cmd: Vec<String> = sshd::command(
        &ctx.peer_sshd_config,
        plan.local_ip,
        plan.remote_ip,
        ctx.ssh_port,
    )
    .iter()
    .map(|a| sh_quote(a))
    .collect();
    let script = facts::sections_script(&[
        (
            "version",
            format!("{} --version", sh_quote(&bin.display().to_string())),
        ),
        (
            "node",
            format!("cat {}", sh_quote(&node_file.display().to_string())),
        ),
        ("link", "ip -o link show".into()),
        ("addr", "ip -o addr show".into()),
        ("route", format!("ip -o route get {}", plan.local_ip)),
        (
            "replicated",
            facts::list_replicated_command(&ctx.peer_config_dir),
        ),
        ("sshd", sshd_cmd.join(" ")),
    ]);
    let out = ssh.exec_ok(&script).await?.stdout_text();
    let sections = facts::parse_sections(&out);
    let section = |name: &str| sections.get(name).cloned().unwrap_or((String::new(), -1));
    let (version, rc) = section("version");
    if rc != 0 {
        bail!(
            "the peer has no working {} ({}): install Tandem there first",
            bin.display(),
            version.trim()
        );
    }
    let (node_toml, rc) = section("node");
    if rc != 0 {
        bail!(
            "the peer has no readable {} ({}): configure its node name first",
            node_file.display(),
            node_toml.trim()
        );
    }
    let node_name = facts::parse_node_name(&node_toml)
        .map_err(|e| anyhow!("the peer's {}: {e}", node_file.display()))?;
    for name in ["link", "addr"] {
        let (text, rc) = section(name);
        if rc != 0 {
            bail!("the peer's `ip -o {name} show` failed: {}", text.trim());
        }
    }
    let (sshd_out, rc) = section("sshd");
    let sshd = if rc == 0 {
        Ok(sshd::parse(&sshd_out))
    } else {
        Err(format!("`sshd -T` failed on the peer: {}", sshd_out.trim()))
    };
    // The peer's clock against the middle of the round trip.
    let before = tandem_runtime::unix_ms(SystemTime::now());
    let date = ssh.exec_ok("date +%s%3N").await?.stdout_text();
    let after = tandem_runtime::unix_ms(SystemTime::now());
    let peer_ms: i64 = date
        .trim()
        .parse()
        .map_err(|_| anyhow!("the peer's `date +%s%3N` answered `{}`", date.trim()))?;
    Ok(PeerAnswers {
        facts: Facts {
            version: facts::parse_version(&version).unwrap_or_default(),
            node_name,
            interfaces: facts::parse_ip_link(&section("link").0),
            addresses: facts::parse_ip_addr(&section("addr").0),
            route_dev: facts::parse_route_dev(&section("route").0),
        },
        skew_ms: peer_ms - (before + after) / 2,
        node_toml,
        replicated: section("replicated")
            .0
            .lines()
            .map(|l| l.trim_start_matches("./").to_owned())
            .filter(|l| facts::is_replicated(l))
            .collect(),
        sshd,
    })
}

/// The floating IPs: every farm VIP and SNAT address, each on the local
/// interface whose subnet holds it (with that subnet's prefix).
pub fn floating_ips(config: &Config, local: &Facts) -> anyhow::Result<Vec<(IpNet, String)>> {
    let mut wanted: Vec<(IpAddr, String)> = Vec::new();
    for f in &config.farms {
        wanted.push((f.vip, format!("farm {} VIP", f.name)));
        if let Some(s) = f.snat_address {
            wanted.push((s, format!("farm {} SNAT address", f.name)));
        }
    }
    if wanted.is_empty() {
        bail!(
            "no farm VIPs on this node: the cluster's floating IPs are the farms' VIPs and SNAT addresses, create a farm first"
        );
    }
    let mut out: Vec<(IpNet, String)> = Vec::new();
    let mut problems = Vec::new();
    for (ip, what) in wanted {
        if out.iter().any(|(n, _)| n.addr == ip) {
            continue;
        }
        // Prefer an interface's own subnet over the VIP itself, which a
        // standalone node may carry as a plain address.
        let holder = local
            .addresses
            .iter()
            .filter(|(_, n)| n.addr != ip && contains(n, ip))
            .chain(local.addresses.iter().filter(|(_, n)| n.addr == ip))
            .next();
        match holder {
            Some((ifname, net)) => out.push((
                IpNet {
                    addr: ip,
                    prefix_len: net.prefix_len,
                },
                ifname.clone(),
            )),
            None => problems.push(format!(
                "{what} {ip} is in no subnet of {}'s interfaces",
                local.node_name
            )),
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    Ok(out)
}

/// Whether `ip` is in the subnet `net`.
fn contains(net: &IpNet, ip: IpAddr) -> bool {
    match (net.addr, ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) => {
            let bits = u32::from(net.prefix_len.min(32));
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            u32::from(n) & mask == u32::from(a) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(a)) => {
            let bits = u32::from(net.prefix_len.min(128));
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

/// Loads the configuration a node would have (its node.toml, the new
/// cluster.toml, this node's farms) in a scratch directory.
fn validate(
    config_dir: &Path,
    node_toml: &str,
    cluster_toml: &str,
    node: &str,
) -> anyhow::Result<()> {
    let scratch = Scratch::new()?;
    let dir = scratch.0.as_path();
    std::fs::write(dir.join(tandem_config::NODE_FILE), node_toml)?;
    std::fs::write(dir.join(tandem_config::CLUSTER_FILE), cluster_toml)?;
    std::fs::create_dir_all(dir.join("keys"))?;
    std::fs::write(dir.join("keys/sync.key"), sync_key()?)?;
    let farms = config_dir.join(tandem_config::FARMS_DIR);
    if farms.is_dir() {
        std::fs::create_dir_all(dir.join(tandem_config::FARMS_DIR))?;
        for e in std::fs::read_dir(&farms)? {
            let e = e?;
            if e.file_type()?.is_file() {
                std::fs::copy(
                    e.path(),
                    dir.join(tandem_config::FARMS_DIR).join(e.file_name()),
                )?;
            }
        }
    }
    Config::load(dir).map(|_| ()).map_err(|errors| {
        anyhow!(
            "the cluster configuration {node} would get is invalid, nothing was changed: {}",
            errors
                .iter()
                .map(|e| {
                    // Name the file as the operator knows it, not the scratch copy.
                    let file = e
                        .file
                        .file_name()
                        .map(|f| f.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let mut s = file;
                    if let (Some(l), Some(c)) = (e.line, e.column) {
                        s.push_str(&format!(":{l}:{c}"));
                    }
                    format!("{s}: {}", e.message)
                })
                .collect::<Vec<_>>()
                .join("; ")
        )
    })
}

/// A private scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> anyhow::Result<Scratch> {
        use std::os::unix::fs::DirBuilderExt;
        let path = std::env::temp_dir().join(format!(
            "tandem-create-{}-{}",
            std::process::id(),
            tandem_runtime::unix_ms(SystemTime::now())
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        Ok(Scratch(path))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floating_ips_take_the_subnet_of_the_interface_holding_them() {
        let facts = Facts {
            node_name: "lb1".into(),
            addresses: vec![
                ("eth0".into(), "10.0.0.1/24".parse().unwrap()),
                ("eth0".into(), "10.0.0.100/32".parse().unwrap()),
                ("eth1".into(), "10.1.0.1/16".parse().unwrap()),
            ],
            ..Default::default()
        };
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("node.toml"), "name = \"lb1\"\n").unwrap();
        std::fs::create_dir(dir.path().join("farms")).unwrap();
        std::fs::write(
            dir.path().join("farms/web.toml"),
            "name = \"web\"\nvip = \"10.0.0.100\"\nport = 80\nsnat_address = \"10.1.0.100\"\n[[backends]]\naddress = \"10.1.0.11\"\n",
        )
        .unwrap();
        let config = Config::load(dir.path()).unwrap();
        let fl = floating_ips(&config, &facts).unwrap();
        let text: Vec<String> = fl.iter().map(|(n, i)| format!("{n} {i}")).collect();
        assert_eq!(text, vec!["10.0.0.100/24 eth0", "10.1.0.100/16 eth1"]);

        let empty = Config::load(&{
            let d = dir.path().join("empty");
            std::fs::create_dir(&d).unwrap();
            std::fs::write(d.join("node.toml"), "name = \"lb1\"\n").unwrap();
            d
        })
        .unwrap();
        let e = floating_ips(&empty, &facts).unwrap_err().to_string();
        assert!(e.contains("no farm VIPs"), "{e}");
    }
}
