//! `CreateCluster`: run on the future master, it joins a standalone peer
//! over SSH (the peer's root password, used once), checks the pair
//! (preflight), installs the cluster identity and pins both host keys,
//! writes the cluster configuration on both nodes, makes the peer's
//! replicated trees exactly this node's and starts the pair, this node as
//! master. Each step is streamed as a `CreateClusterProgress`.
//!
//! Nothing changes on either node before preflight has passed, the
//! operator has confirmed what the peer loses, and both configurations
//! that will be written have been validated.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, anyhow, bail};
use tandem_config::{Config, IpNet};
use tandem_proto::v1;
use tandem_ssh::{Auth, HostKeyCheck, SshSession};
use tokio::sync::mpsc;

use crate::preflight::{self, Facts, sh_quote};

/// Default VRRP virtual router id of a new cluster.
pub const DEFAULT_VRID: u8 = 51;
/// VRRP priorities written to cluster.toml: the creating node is master.
pub const MASTER_PRIORITY: u8 = 150;
pub const BACKUP_PRIORITY: u8 = 100;
/// Every daemon of a node, reloaded after its configuration changed.
pub const DAEMONS: [&str; 5] = [
    "lb-forwarder",
    "vrrpd",
    "conntrack-syncd",
    "cfg-syncd",
    "clustermanager",
];
/// How long a vrrpd may take to reach the expected state after a reload
/// (Master_Down_Interval is ~3.2 advert intervals; 1 s adverts by default).
const ROLE_TIMEOUT: Duration = Duration::from_secs(15);

/// Where things are on both nodes. The defaults fit a real pair; the tests
/// (two nodes on one filesystem) override the peer's paths.
#[derive(Debug, Clone)]
pub struct CreateContext {
    /// This node's configuration directory (absolute).
    pub config_dir: PathBuf,
    /// This node's runtime directory (the daemons' sockets).
    pub runtime_dir: PathBuf,
    /// The peer's configuration directory (default /etc/tandem).
    pub peer_config_dir: PathBuf,
    /// The peer's runtime directory (default /run/tandem).
    pub peer_runtime_dir: PathBuf,
    /// Where the peer's Tandem binaries are (default /usr/bin).
    pub peer_bin_dir: PathBuf,
    /// root's authorized_keys on this node (default /root/.ssh/authorized_keys).
    pub authorized_keys: PathBuf,
    /// root's authorized_keys on the peer (default /root/.ssh/authorized_keys).
    pub peer_authorized_keys: PathBuf,
    /// This node's sshd host key, public part (default
    /// /etc/ssh/ssh_host_ed25519_key.pub): pinned on the peer.
    pub host_key_pub: PathBuf,
    /// Run on the peer once its configuration is in place (default
    /// `systemctl start tandem.target`; empty: nothing).
    pub peer_start_command: String,
    /// Both sshds' port (`[sync] ssh_port`, default 22).
    pub ssh_port: u16,
}

impl CreateContext {
    /// The production defaults for a node whose directories are given.
    pub fn new(config_dir: PathBuf, runtime_dir: PathBuf) -> CreateContext {
        CreateContext {
            config_dir,
            runtime_dir,
            peer_config_dir: tandem_config::DEFAULT_CONFIG_DIR.into(),
            peer_runtime_dir: "/run/tandem".into(),
            peer_bin_dir: "/usr/bin".into(),
            authorized_keys: "/root/.ssh/authorized_keys".into(),
            peer_authorized_keys: "/root/.ssh/authorized_keys".into(),
            host_key_pub: "/etc/ssh/ssh_host_ed25519_key.pub".into(),
            peer_start_command: "systemctl start tandem.target".into(),
            ssh_port: 22,
        }
    }

    pub fn peer_path(&self, rel: &str) -> PathBuf {
        self.peer_config_dir.join(rel)
    }

    pub fn local_path(&self, rel: &str) -> PathBuf {
        self.config_dir.join(rel)
    }
}

/// The progress stream's sender, with the step names in one place.
struct Progress {
    tx: mpsc::Sender<v1::CreateClusterProgress>,
}

impl Progress {
    async fn step(&self, step: &str, message: impl Into<String>) {
        let message = message.into();
        tracing::info!(step, "cluster create: {message}");
        let _ = self
            .tx
            .send(v1::CreateClusterProgress {
                step: step.into(),
                ok: true,
                message,
                ..Default::default()
            })
            .await;
    }

    async fn send(&self, p: v1::CreateClusterProgress) {
        let _ = self.tx.send(p).await;
    }
}

/// Runs cluster creation, streaming its steps to `progress`. The last
/// message has `done` set: `ok` with the outcome, or not `ok` with the
/// error (and what was left changed, if anything).
pub async fn create_cluster(
    ctx: &CreateContext,
    req: v1::CreateClusterRequest,
    progress: mpsc::Sender<v1::CreateClusterProgress>,
) {
    let p = Progress { tx: progress };
    let mut current = String::from("request");
    let result = run(ctx, &req, &p, &mut current).await;
    match result {
        Ok(last) => p.send(last).await,
        Err(e) => {
            let message = format!("{e:#}");
            tracing::error!(step = %current, "cluster creation failed: {message}");
            p.send(v1::CreateClusterProgress {
                step: current,
                ok: false,
                message,
                done: true,
                ..Default::default()
            })
            .await;
        }
    }
}

/// What the request asks, checked.
struct Plan {
    local_ip: IpAddr,
    remote_ip: IpAddr,
    vrid: u8,
}

fn parse_request(req: &v1::CreateClusterRequest) -> anyhow::Result<Plan> {
    let local_ip: IpAddr = req
        .local_ip
        .parse()
        .map_err(|_| anyhow!("local IP `{}` is not an IP address", req.local_ip))?;
    let remote_ip: IpAddr = req
        .remote_ip
        .parse()
        .map_err(|_| anyhow!("remote IP `{}` is not an IP address", req.remote_ip))?;
    if local_ip == remote_ip {
        bail!("the local and remote IPs are the same ({local_ip})");
    }
    if local_ip.is_ipv4() != remote_ip.is_ipv4() {
        bail!("the local and remote IPs must be of the same family ({local_ip}, {remote_ip})");
    }
    let vrid = match req.virtual_router_id {
        0 => DEFAULT_VRID,
        v @ 1..=255 => v as u8,
        v => bail!("virtual router id {v} is out of range 1-255"),
    };
    if req.remote_root_password.is_empty() {
        bail!("the peer's root password is empty");
    }
    Ok(Plan {
        local_ip,
        remote_ip,
        vrid,
    })
}

async fn run(
    ctx: &CreateContext,
    req: &v1::CreateClusterRequest,
    p: &Progress,
    current: &mut String,
) -> anyhow::Result<v1::CreateClusterProgress> {
    let plan = parse_request(req)?;
    if ctx.local_path(tandem_config::CLUSTER_FILE).exists() {
        bail!(
            "this node is already clustered ({} exists); run `tandemctl cluster destroy` first",
            ctx.local_path(tandem_config::CLUSTER_FILE).display()
        );
    }
    let local_config = Config::load(&ctx.config_dir).map_err(|e| {
        anyhow!(
            "this node's configuration is invalid, fix it first: {}",
            e.iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        )
    })?;

    // 1. Connect with the password, recording the peer's host key.
    *current = "connect".into();
    let addr = SocketAddr::new(plan.remote_ip, ctx.ssh_port);
    let ssh = SshSession::connect(
        addr,
        "root",
        HostKeyCheck::RecordFirst,
        Auth::Password(req.remote_root_password.clone()),
    )
    .await?;
    p.step(
        "connect",
        format!(
            "connected to {addr} as root; its host key is {}",
            tandem_ssh::fingerprint(ssh.host_key())
        ),
    )
    .await;
    let outcome = joined(ctx, req, &plan, &local_config, &ssh, p, current).await;
    ssh.close().await;
    outcome
}

/// Everything after the password login, on the one session.
async fn joined(
    ctx: &CreateContext,
    req: &v1::CreateClusterRequest,
    plan: &Plan,
    local_config: &Config,
    ssh: &SshSession,
    p: &Progress,
    current: &mut String,
) -> anyhow::Result<v1::CreateClusterProgress> {
    // 2. Preflight.
    *current = "preflight".into();
    let local = preflight::gather_local(&ctx.config_dir, Some(plan.remote_ip)).await?;
    let (peer, skew_ms, peer_node_toml) = gather_peer(ctx, ssh, plan.local_ip).await?;
    let cluster_if = preflight::check(&local, &peer, plan.local_ip, plan.remote_ip, skew_ms)
        .map_err(|r| anyhow!("{r}; nothing was changed"))?;
    let floating = floating_ips(local_config, &local)?;
    let would_erase: Vec<String> = ssh
        .exec_ok(&preflight::list_replicated_command(&ctx.peer_config_dir))
        .await?
        .stdout_text()
        .lines()
        .map(|l| l.trim_start_matches("./").to_owned())
        .filter(|l| preflight::is_replicated(l))
        .collect();
    let summary = format!(
        "{me} and {other}: Tandem {v}, NICs [{nics}], cluster link {cluster_if}, clock skew {skew_ms} ms; floating IPs {fl}; {n} replicated file(s) on {other} will be erased",
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
    let peer_node_toml = with_cluster_link(&peer_node_toml, &cluster_if, plan.remote_ip);
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

    if !req.confirmed {
        return Ok(v1::CreateClusterProgress {
            step: "confirm".into(),
            ok: true,
            message: format!(
                "preflight passed; nothing was changed. Creating the cluster erases {} replicated file(s) on {} and replaces them with {}'s",
                would_erase.len(),
                peer.node_name,
                local.node_name
            ),
            done: true,
            would_erase,
            needs_confirmation: true,
        });
    }

    // 3. Identity, host keys, sync key.
    *current = "keys".into();
    let (private, public) = tandem_ssh::generate_identity()?;
    let own_host_key = std::fs::read_to_string(&ctx.host_key_pub).with_context(|| {
        format!(
            "reading this node's SSH host key {} (pinned on the peer)",
            ctx.host_key_pub.display()
        )
    })?;
    let peer_pin = tandem_ssh::known_hosts_line(plan.remote_ip, ctx.ssh_port, &ssh.host_key_line());
    let own_pin = tandem_ssh::known_hosts_line(plan.local_ip, ctx.ssh_port, own_host_key.trim());
    let sync_key = sync_key()?;

    // Local side first: if the peer then fails, `tandemctl cluster destroy`
    // on this node cleans both.
    write_atomic(&ctx.local_path("ssh/id_ed25519"), private.as_bytes(), 0o600)?;
    write_atomic(
        &ctx.local_path("ssh/id_ed25519.pub"),
        format!("{public}\n").as_bytes(),
        0o644,
    )?;
    write_atomic(
        &ctx.local_path("ssh/known_hosts"),
        peer_pin.as_bytes(),
        0o644,
    )?;
    write_atomic(&ctx.local_path("keys/sync.key"), sync_key.as_bytes(), 0o600)?;
    authorize_local(&ctx.authorized_keys, &public)?;
    ssh.write_file(&ctx.peer_path("ssh/id_ed25519"), private.as_bytes(), 0o600)
        .await?;
    ssh.write_file(
        &ctx.peer_path("ssh/id_ed25519.pub"),
        format!("{public}\n").as_bytes(),
        0o644,
    )
    .await?;
    ssh.write_file(&ctx.peer_path("ssh/known_hosts"), own_pin.as_bytes(), 0o644)
        .await?;
    authorize_peer(ssh, &ctx.peer_authorized_keys, &public).await?;
    p.step(
        "keys",
        format!(
            "cluster identity {} installed on both nodes; {} pins {}, {} pins {}; new sync key",
            tandem_ssh::fingerprint_of_line(&public),
            local.node_name,
            tandem_ssh::fingerprint(ssh.host_key()),
            peer.node_name,
            tandem_ssh::fingerprint_of_line(&own_host_key),
        ),
    )
    .await;

    // 4. Configuration files.
    *current = "configure".into();
    write_atomic(
        &ctx.local_path(tandem_config::NODE_FILE),
        local_node_toml.as_bytes(),
        0o644,
    )?;
    write_atomic(
        &ctx.local_path(tandem_config::CLUSTER_FILE),
        cluster_toml.as_bytes(),
        0o644,
    )?;
    ssh.write_file(
        &ctx.peer_path(tandem_config::NODE_FILE),
        peer_node_toml.as_bytes(),
        0o644,
    )
    .await?;
    p.step(
        "configure",
        format!(
            "cluster.toml written (virtual router {}, {} priority {MASTER_PRIORITY}, {} priority {BACKUP_PRIORITY}, failback none); node.toml of both nodes names {cluster_if}",
            plan.vrid, local.node_name, peer.node_name
        ),
    )
    .await;

    // 5. First full sync: the peer's replicated trees become this node's.
    *current = "sync".into();
    let backup = backup_peer_tree(ctx, ssh, &would_erase).await?;
    erase_peer_tree(ctx, ssh).await?;
    let files = preflight::replicated_files(&ctx.config_dir)
        .with_context(|| format!("listing {}", ctx.config_dir.display()))?;
    let mut bytes = 0usize;
    for rel in &files {
        let path = ctx.local_path(rel);
        let data = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let mode = file_mode(&path)?;
        bytes += data.len();
        ssh.write_file(&ctx.peer_path(rel), &data, mode).await?;
    }
    p.step(
        "sync",
        format!(
            "{} replicated file(s), {bytes} bytes, copied to {}{}",
            files.len(),
            peer.node_name,
            backup
                .map(|b| format!(" (its previous files are kept in {b})"))
                .unwrap_or_default()
        ),
    )
    .await;

    // This node first: its vrrpd must be master before the peer's starts,
    // or the peer (failback none: no preemption) could keep the role.
    *current = "start".into();
    let reloaded = reload_local(&ctx.runtime_dir).await;
    p.step(
        "start",
        format!("{} reloaded: {}", local.node_name, reloaded.join(", ")),
    )
    .await;
    let state = wait_local_vrrp(&ctx.runtime_dir, &[v1::VrrpState::Master]).await;
    if state != Some(v1::VrrpState::Master) {
        bail!(
            "{}'s vrrpd did not become master within {ROLE_TIMEOUT:?} (state {:?}); the configuration is written on both nodes, check `tandemctl status`",
            local.node_name,
            state
        );
    }
    p.step("start", format!("{} is master", local.node_name))
        .await;
    let reloaded = reload_peer(ssh, &ctx.peer_runtime_dir).await;
    p.step(
        "start",
        format!("{} reloaded: {}", peer.node_name, reloaded.join(", ")),
    )
    .await;
    if !ctx.peer_start_command.trim().is_empty() {
        ssh.exec_ok(&ctx.peer_start_command).await?;
        p.step(
            "start",
            format!("{}: `{}` done", peer.node_name, ctx.peer_start_command),
        )
        .await;
    }
    let peer_state = wait_peer_vrrp(ssh, &ctx.peer_runtime_dir, v1::VrrpState::Backup).await;
    let message = match peer_state {
        Some(v1::VrrpState::Backup) => format!(
            "cluster created: {} is master, {} is backup",
            local.node_name, peer.node_name
        ),
        other => format!(
            "cluster created: {} is master; {}'s vrrpd is {} (expected backup): check `tandemctl cluster nodes`",
            local.node_name,
            peer.node_name,
            other
                .map(|s| s.as_str_name().to_owned())
                .unwrap_or_else(|| "not running".into())
        ),
    };
    tracing::info!("{message}");
    Ok(v1::CreateClusterProgress {
        step: "done".into(),
        ok: true,
        message,
        done: true,
        ..Default::default()
    })
}

/// The peer's facts, its clock skew (ms, peer minus us) and its node.toml.
async fn gather_peer(
    ctx: &CreateContext,
    ssh: &SshSession,
    local_ip: IpAddr,
) -> anyhow::Result<(Facts, i64, String)> {
    let bin = ctx.peer_bin_dir.join("clustermanager");
    let version_out = ssh
        .exec(&format!(
            "{} --version",
            sh_quote(&bin.display().to_string())
        ))
        .await?;
    if !version_out.success() {
        bail!(
            "the peer has no working {} ({}): install Tandem there first",
            bin.display(),
            version_out.stderr_text().trim()
        );
    }
    let node_file = ctx.peer_path(tandem_config::NODE_FILE);
    let node_out = ssh
        .exec(&format!(
            "cat {}",
            sh_quote(&node_file.display().to_string())
        ))
        .await?;
    if !node_out.success() {
        bail!(
            "the peer has no readable {} ({}): configure its node name first",
            node_file.display(),
            node_out.stderr_text().trim()
        );
    }
    let node_toml = node_out.stdout_text();
    let node_name = preflight::parse_node_name(&node_toml)
        .map_err(|e| anyhow!("the peer's {}: {e}", node_file.display()))?;
    let links = ssh.exec_ok("ip -o link show").await?.stdout_text();
    let addrs = ssh.exec_ok("ip -o addr show").await?.stdout_text();
    let route = ssh
        .exec(&format!("ip -o route get {local_ip}"))
        .await?
        .stdout_text();
    // The peer's clock against the middle of the round trip.
    let before = tandem_runtime::unix_ms(SystemTime::now());
    let date = ssh.exec_ok("date +%s%3N").await?.stdout_text();
    let after = tandem_runtime::unix_ms(SystemTime::now());
    let peer_ms: i64 = date
        .trim()
        .parse()
        .map_err(|_| anyhow!("the peer's `date +%s%3N` answered `{}`", date.trim()))?;
    let skew = peer_ms - (before + after) / 2;
    let facts = Facts {
        version: preflight::parse_version(&version_out.stdout_text()).unwrap_or_default(),
        node_name,
        interfaces: preflight::parse_ip_link(&links),
        addresses: preflight::parse_ip_addr(&addrs),
        route_dev: preflight::parse_route_dev(&route),
    };
    Ok((facts, skew, node_toml))
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

/// cluster.toml of the new pair (identical on both nodes).
fn cluster_toml(
    plan: &Plan,
    master: &str,
    backup: &str,
    floating: &[(IpNet, String)],
    ssh_port: u16,
) -> String {
    let mut s = format!(
        "# Written by `tandemctl cluster create` on {master}; replicated to {backup} by cfg-syncd.\n\
         virtual_router_id = {vrid}\nfailback = \"none\"\n\n\
         [[nodes]]\nname = \"{master}\"\naddress = \"{l}\"\npriority = {MASTER_PRIORITY}\n\n\
         [[nodes]]\nname = \"{backup}\"\naddress = \"{r}\"\npriority = {BACKUP_PRIORITY}\n",
        vrid = plan.vrid,
        l = plan.local_ip,
        r = plan.remote_ip,
    );
    for (net, ifname) in floating {
        s.push_str(&format!(
            "\n[[floating_ips]]\naddress = \"{net}\"\ninterface = \"{ifname}\"\n"
        ));
    }
    s.push_str("\n[sync]\nkey_file = \"keys/sync.key\"\n");
    if ssh_port != 22 {
        s.push_str(&format!("ssh_port = {ssh_port}\n"));
    }
    s
}

/// node.toml with `cluster_interface` / `cluster_address` set (other lines,
/// comments included, kept). The keys are top-level: they go before the
/// first table.
pub fn with_cluster_link(node_toml: &str, ifname: &str, addr: IpAddr) -> String {
    let mut head = Vec::new();
    let mut tail = Vec::new();
    let mut in_tables = false;
    for line in node_toml.lines() {
        let t = line.trim_start();
        if t.starts_with('[') {
            in_tables = true;
        }
        if in_tables {
            tail.push(line);
            continue;
        }
        let key = t.split('=').next().unwrap_or("").trim();
        if key != "cluster_interface" && key != "cluster_address" {
            head.push(line);
        }
    }
    while head.last().is_some_and(|l| l.trim().is_empty()) {
        head.pop();
    }
    let mut out = head.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    out.push_str(&format!(
        "cluster_interface = \"{ifname}\"\ncluster_address = \"{addr}\"\n"
    ));
    if !tail.is_empty() {
        out.push('\n');
        out.push_str(&tail.join("\n"));
        out.push('\n');
    }
    out
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

/// 32 random bytes from the kernel, hex, newline-terminated: the conntrack
/// sync key.
fn sync_key() -> anyhow::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom for the sync key")?;
    let mut s: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    s.push('\n');
    Ok(s)
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

fn file_mode(path: &Path) -> anyhow::Result<u32> {
    use std::os::unix::fs::PermissionsExt;
    Ok(std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .permissions()
        .mode()
        & 0o7777)
}

/// Replaces `path` atomically (temporary file, fsync, rename), creating its
/// parent directory (0700) if needed.
pub fn write_atomic(path: &Path, content: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let dir = path
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent directory", path.display()))?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(content)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow!("writing {}: {e}", path.display())
    })
}

/// Adds `public` to a local authorized_keys (once).
fn authorize_local(path: &Path, public: &str) -> anyhow::Result<()> {
    let old = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => bail!("reading {}: {e}", path.display()),
    };
    if let Some(new) = add_key_line(&old, public) {
        write_atomic(path, new.as_bytes(), 0o600)?;
    }
    Ok(())
}

async fn authorize_peer(ssh: &SshSession, path: &Path, public: &str) -> anyhow::Result<()> {
    let old = ssh
        .read_file(path)
        .await?
        .map(|d| String::from_utf8_lossy(&d).into_owned())
        .unwrap_or_default();
    if let Some(new) = add_key_line(&old, public) {
        ssh.write_file(path, new.as_bytes(), 0o600).await?;
    }
    Ok(())
}

/// The authorized_keys text with `public` appended; None if already there.
pub fn add_key_line(old: &str, public: &str) -> Option<String> {
    let key = key_blob(public)?;
    if old.lines().any(|l| key_blob(l) == Some(key)) {
        return None;
    }
    let mut new = old.to_owned();
    if !new.is_empty() && !new.ends_with('\n') {
        new.push('\n');
    }
    new.push_str(public.trim());
    new.push('\n');
    Some(new)
}

/// The authorized_keys text without any line of `public`'s key; None if
/// it had none.
pub fn remove_key_line(old: &str, public: &str) -> Option<String> {
    let key = key_blob(public)?;
    if !old.lines().any(|l| key_blob(l) == Some(key)) {
        return None;
    }
    let mut new: String = old
        .lines()
        .filter(|l| key_blob(l) != Some(key))
        .collect::<Vec<_>>()
        .join("\n");
    if !new.is_empty() {
        new.push('\n');
    }
    Some(new)
}

/// The base64 blob of a key line (after any options and the type).
fn key_blob(line: &str) -> Option<&str> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let i = words
        .iter()
        .position(|w| w.starts_with("ssh-") || w.starts_with("ecdsa-") || w.starts_with("sk-"))?;
    words.get(i + 1).copied()
}

/// Copies the peer's replicated files into `backups/cluster-create-<ms>/`
/// (never replicated) before they are erased; returns that directory.
async fn backup_peer_tree(
    ctx: &CreateContext,
    ssh: &SshSession,
    files: &[String],
) -> anyhow::Result<Option<String>> {
    if files.is_empty() {
        return Ok(None);
    }
    let rel = format!(
        "backups/cluster-create-{}",
        tandem_runtime::unix_ms(SystemTime::now())
    );
    let list: Vec<String> = files.iter().map(|f| sh_quote(f)).collect();
    ssh.exec_ok(&format!(
        "cd {} && mkdir -p {rel} && cp -a --parents -- {} {rel}/",
        sh_quote(&ctx.peer_config_dir.display().to_string()),
        list.join(" ")
    ))
    .await?;
    Ok(Some(ctx.peer_path(&rel).display().to_string()))
}

/// Removes the peer's replicated trees.
async fn erase_peer_tree(ctx: &CreateContext, ssh: &SshSession) -> anyhow::Result<()> {
    let targets: Vec<String> = preflight::REPLICATED_FILES
        .iter()
        .chain(preflight::REPLICATED_DIRS.iter())
        .map(|p| sh_quote(&ctx.peer_path(p).display().to_string()))
        .collect();
    ssh.exec_ok(&format!("rm -rf -- {}", targets.join(" ")))
        .await?;
    Ok(())
}

/// Asks `Reload` of one daemon over `channel`.
pub async fn reload_over(
    daemon: &str,
    channel: tonic::transport::Channel,
) -> Result<v1::ReloadReply, tonic::Status> {
    use v1::*;
    let req = ReloadRequest {};
    let reply = match daemon {
        "lb-forwarder" => {
            lb_forwarder_client::LbForwarderClient::new(channel)
                .reload(req)
                .await
        }
        "vrrpd" => vrrpd_client::VrrpdClient::new(channel).reload(req).await,
        "conntrack-syncd" => {
            conntrack_sync_client::ConntrackSyncClient::new(channel)
                .reload(req)
                .await
        }
        "cfg-syncd" => {
            cfg_sync_client::CfgSyncClient::new(channel)
                .reload(req)
                .await
        }
        "clustermanager" => {
            cluster_manager_client::ClusterManagerClient::new(channel)
                .reload(req)
                .await
        }
        other => {
            return Err(tonic::Status::invalid_argument(format!(
                "unknown daemon {other}"
            )));
        }
    };
    reply.map(tonic::Response::into_inner)
}

fn reload_word(daemon: &str, r: Result<v1::ReloadReply, String>) -> String {
    match r {
        Ok(r) if r.applied => format!("{daemon} (generation {})", r.config_generation),
        Ok(r) => format!("{daemon} REFUSED ({})", r.errors.join("; ")),
        Err(e) => format!("{daemon} not running ({e})"),
    }
}

/// Reloads every local daemon; a daemon that is not running is skipped.
pub async fn reload_local(runtime_dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for d in DAEMONS {
        let r = match tandem_runtime::connect(runtime_dir, d).await {
            Ok(ch) => tokio::time::timeout(Duration::from_secs(10), reload_over(d, ch))
                .await
                .map_err(|_| "no answer within 10 s".to_owned())
                .and_then(|r| r.map_err(|e| e.message().to_owned())),
            Err(e) => Err(e.to_string()),
        };
        out.push(reload_word(d, r));
    }
    out
}

/// Reloads every daemon of the peer through the SSH session.
pub async fn reload_peer(ssh: &SshSession, peer_runtime_dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for d in DAEMONS {
        let sock = peer_runtime_dir.join(format!("{d}.sock"));
        let r = match ssh.grpc_channel(&sock).await {
            Ok(ch) => tokio::time::timeout(Duration::from_secs(10), reload_over(d, ch))
                .await
                .map_err(|_| "no answer within 10 s".to_owned())
                .and_then(|r| r.map_err(|e| e.message().to_owned())),
            Err(_) => Err("no socket".to_owned()),
        };
        out.push(reload_word(d, r));
    }
    out
}

async fn vrrp_state(channel: tonic::transport::Channel) -> Option<v1::VrrpState> {
    let r = tokio::time::timeout(
        Duration::from_secs(3),
        v1::vrrpd_client::VrrpdClient::new(channel).status(v1::StatusRequest {}),
    )
    .await
    .ok()?
    .ok()?;
    Some(r.into_inner().state())
}

/// Waits for the local vrrpd to reach one of `want`; the last state seen.
pub async fn wait_local_vrrp(runtime_dir: &Path, want: &[v1::VrrpState]) -> Option<v1::VrrpState> {
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < ROLE_TIMEOUT {
        // The socket outlives reloads: no socket, no vrrpd to wait for.
        let Ok(ch) = tandem_runtime::connect(runtime_dir, "vrrpd").await else {
            return None;
        };
        last = vrrp_state(ch).await;
        if last.is_some_and(|s| want.contains(&s)) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last
}

/// Waits for the peer's vrrpd to reach `want`; the last state seen.
pub async fn wait_peer_vrrp(
    ssh: &SshSession,
    peer_runtime_dir: &Path,
    want: v1::VrrpState,
) -> Option<v1::VrrpState> {
    let start = Instant::now();
    let mut last = None;
    let sock = peer_runtime_dir.join("vrrpd.sock");
    while start.elapsed() < ROLE_TIMEOUT {
        if let Ok(ch) = ssh.grpc_channel(&sock).await {
            last = vrrp_state(ch).await;
            if last == Some(want) {
                return last;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_link_is_set_and_everything_else_kept() {
        let before = "# lb2\nname = \"lb2\"\ncluster_interface = \"eth9\"\nmetrics_listen = \"127.0.0.1:9100\"\n\n[[api_keys]]\nname = \"m\"\nsha256 = \"x\"\n";
        let after = with_cluster_link(before, "eth2", "192.168.100.2".parse().unwrap());
        assert_eq!(
            after,
            "# lb2\nname = \"lb2\"\nmetrics_listen = \"127.0.0.1:9100\"\ncluster_interface = \"eth2\"\ncluster_address = \"192.168.100.2\"\n\n[[api_keys]]\nname = \"m\"\nsha256 = \"x\"\n"
        );
        let node: tandem_config::NodeConfig = toml::from_str(&after).unwrap();
        assert_eq!(node.cluster_interface.as_deref(), Some("eth2"));
    }

    #[test]
    fn authorized_keys_lines_are_added_once_and_removed() {
        let k = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKQ5W2r2Gh8wnYoF6v2eG4yRj6DpzPz1d0iTo1cbgHwV tandem-cluster";
        let other = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOther admin@desk";
        let with = add_key_line(other, k).unwrap();
        assert_eq!(with, format!("{other}\n{k}\n"));
        assert_eq!(add_key_line(&with, k), None, "added once");
        assert_eq!(remove_key_line(&with, k).unwrap(), format!("{other}\n"));
        assert_eq!(remove_key_line(other, k), None);
    }

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
