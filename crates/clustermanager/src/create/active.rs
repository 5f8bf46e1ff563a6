//! `CreateCluster` with `mode = "active-active"`: this node and 2-7
//! standalone nodes become one cluster of 3-8 nodes that all forward,
//! each announcing the farms' VIPs to the routers over BGP (routed and
//! BIRD). The same trust and the same steps as the pair, against every
//! node: host key first (each node's confirmed fingerprint pins its SSH
//! login), preflight of every node before anything is written, the
//! identity and the pins, the configuration, the first full sync, and the
//! start; a failure after the first write is rolled back on every node.
//!
//! What differs from the pair: no VRRP (no virtual router id, no floating
//! IPs, no sync key), `mode`, `hash_seed`, `[bgp]` and every node in
//! cluster.toml, this node first (the leader, where changes are made);
//! every node pins every other node's host key (any node asks any other
//! for the node table); preflight also checks that BIRD is installed on
//! every node and that every node reaches the BGP peers directly; the
//! start runs the start command on every node (BIRD's unit starts only
//! once routed has written its configuration) and reports each node's BGP
//! sessions.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use tandem_config::{BfdSettings, Config};
use tandem_proto::v1;
use tandem_ssh::SshSession;

use super::configure::with_cluster_link;
use super::facts::{self, Facts, Refusal, run_local, sh_quote};
use super::files::write_atomic;
use super::keys::{authorize_local, authorize_peer};
use super::preflight::{PeerAnswers, gather_peer, validate};
use super::start::{reload_local, reload_peer};
use super::sync::first_sync_to;
use super::undo::{Target, Undo};
use super::{CreateContext, Progress, sshd};

/// How long a node's routed may take to see the active-active cluster
/// after its reload (it reads the configuration at once; this is slack
/// for a loaded machine).
const ROUTED_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the start waits for the BGP sessions before it reports them
/// as they are (the routers may not be configured yet: not an error).
const SESSIONS_WAIT: Duration = Duration::from_secs(20);

/// A node joining, checked.
pub struct Joiner {
    pub address: IpAddr,
    pub password: String,
    /// The confirmed host key fingerprint.
    pub host_key: String,
}

/// What an active-active creation asks, checked.
struct Plan {
    local_ip: IpAddr,
    joiners: Vec<Joiner>,
    local_as: u32,
    peers: Vec<v1::BgpPeerInfo>,
    bfd: BfdSettings,
    hash_seed: u32,
}

/// A joining node's request, checked: its address, a confirmed host key,
/// a password.
pub fn parse_joiner(j: &v1::JoiningNode) -> anyhow::Result<Joiner> {
    let address: IpAddr = j
        .address
        .parse()
        .map_err(|_| anyhow!("node address `{}` is not an IP address", j.address))?;
    if j.host_key.trim().is_empty() {
        bail!(
            "the host key of {address} was not confirmed: a root password is sent only to a host key the operator has seen and confirmed (`tandemctl` shows it, or give --host-key {address}=SHA256:...)"
        );
    }
    let host_key = tandem_ssh::parse_fingerprint(&j.host_key)?;
    if j.root_password.is_empty() {
        bail!("the root password of {address} is empty");
    }
    Ok(Joiner {
        address,
        password: j.root_password.clone(),
        host_key,
    })
}

fn parse(req: &v1::CreateClusterRequest) -> anyhow::Result<Plan> {
    let local_ip: IpAddr = req
        .local_ip
        .parse()
        .map_err(|_| anyhow!("local IP `{}` is not an IP address", req.local_ip))?;
    let total = req.nodes.len() + 1;
    if !(tandem_config::MIN_ACTIVE_NODES..=tandem_config::MAX_ACTIVE_NODES).contains(&total) {
        bail!(
            "an active-active cluster has {}-{} nodes: this one and {}-{} others; {} given ({total} nodes)",
            tandem_config::MIN_ACTIVE_NODES,
            tandem_config::MAX_ACTIVE_NODES,
            tandem_config::MIN_ACTIVE_NODES - 1,
            tandem_config::MAX_ACTIVE_NODES - 1,
            req.nodes.len()
        );
    }
    let mut joiners: Vec<Joiner> = Vec::new();
    for j in &req.nodes {
        let joiner = parse_joiner(j)?;
        if joiner.address == local_ip {
            bail!("{} is this node's own address", joiner.address);
        }
        if joiner.address.is_ipv4() != local_ip.is_ipv4() {
            bail!(
                "every node's address must be of one family ({local_ip}, {})",
                joiner.address
            );
        }
        if joiners.iter().any(|o| o.address == joiner.address) {
            bail!("node address {} is given twice", joiner.address);
        }
        joiners.push(joiner);
    }
    let bgp = req.bgp.clone().unwrap_or_default();
    if bgp.local_as == 0 {
        bail!("the cluster's AS number (--local-as) is missing");
    }
    if bgp.peers.is_empty() {
        bail!(
            "no BGP peer: give at least one upstream router (--bgp-peer NAME,ADDRESS,AS), the routers every node announces the VIPs to"
        );
    }
    let mut bfd = BfdSettings::default();
    if bgp.bfd_interval_ms != 0 {
        bfd.interval_ms = bgp.bfd_interval_ms;
    }
    if bgp.bfd_multiplier != 0 {
        bfd.multiplier = u8::try_from(bgp.bfd_multiplier).map_err(|_| {
            anyhow!(
                "BFD multiplier {} is out of range (2-255)",
                bgp.bfd_multiplier
            )
        })?;
    }
    let hash_seed = match req.hash_seed {
        0 => random_seed()?,
        s => s,
    };
    Ok(Plan {
        local_ip,
        joiners,
        local_as: bgp.local_as,
        peers: bgp.peers,
        bfd,
        hash_seed,
    })
}

fn random_seed() -> anyhow::Result<u32> {
    use std::io::Read;
    let mut b = [0u8; 4];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("reading /dev/urandom for the hash seed")?;
    Ok(u32::from_be_bytes(b).max(1))
}

/// cluster.toml of an active-active cluster: `names[0]` (this node) first.
fn cluster_toml(plan: &Plan, nodes: &[(String, IpAddr)], ssh_port: u16) -> String {
    let mut s = format!(
        "# Written by `tandemctl cluster create` on {leader}, the leader (the first of\n\
         # [[nodes]]: configuration changes are made there); replicated to every\n\
         # node by cfg-syncd.\n\
         mode = \"active-active\"\n\
         # Every node hashes a flow to the same backend with this seed.\n\
         hash_seed = {seed:#010x}\n",
        leader = nodes[0].0,
        seed = plan.hash_seed,
    );
    for (name, addr) in nodes {
        s.push_str(&format!(
            "\n[[nodes]]\nname = \"{name}\"\naddress = \"{addr}\"\n"
        ));
    }
    s.push_str(&format!(
        "\n[bgp]\nlocal_as = {}\n\n[bgp.bfd]\ninterval_ms = {}\nmultiplier = {}\n",
        plan.local_as, plan.bfd.interval_ms, plan.bfd.multiplier
    ));
    for p in &plan.peers {
        s.push_str(&format!(
            "\n[[bgp.peers]]\nname = \"{}\"\naddress = \"{}\"\nremote_as = {}\n",
            p.name, p.address, p.remote_as
        ));
    }
    if ssh_port != 22 {
        s.push_str(&format!("\n[sync]\nssh_port = {ssh_port}\n"));
    }
    s
}

/// The extra questions of an active-active preflight, for one node: is
/// BIRD installed, and how does the node reach each BGP peer.
pub(crate) fn bgp_sections(peers: &[v1::BgpPeerInfo]) -> Vec<(String, String)> {
    let mut parts = vec![("bird".to_owned(), "bird --version".to_owned())];
    for (i, p) in peers.iter().enumerate() {
        parts.push((
            format!("bgp{i}"),
            format!("ip -o route get {}", sh_quote(&p.address)),
        ));
    }
    parts
}

/// Judges a node's answers to [`bgp_sections`]: every problem, named.
pub(crate) fn bgp_problems(
    node: &str,
    peers: &[v1::BgpPeerInfo],
    answer: impl Fn(&str) -> (String, i32),
) -> Vec<String> {
    let mut out = Vec::new();
    let (bird, rc) = answer("bird");
    if rc != 0 {
        out.push(format!(
            "{node} has no working BIRD (`bird --version`: {}): install bird2 there (the routing daemon that announces the VIPs)",
            bird.trim()
        ));
    }
    for (i, p) in peers.iter().enumerate() {
        let (route, rc) = answer(&format!("bgp{i}"));
        if rc != 0 {
            out.push(format!(
                "{node} has no route to BGP peer {} ({}): {}",
                p.name,
                p.address,
                route.trim()
            ));
        } else if let Some(via) = via(&route) {
            out.push(format!(
                "{node} reaches BGP peer {} ({}) through the gateway {via}: an upstream router must be directly connected to the nodes that peer with it",
                p.name, p.address
            ));
        }
    }
    out
}

/// The gateway of `ip -o route get` output, if the route has one.
fn via(route: &str) -> Option<String> {
    let mut f = route.split_whitespace();
    while let Some(w) = f.next() {
        if w == "via" {
            return f.next().map(str::to_owned);
        }
    }
    None
}

/// One joining node during the run.
struct Member<'a> {
    joiner: &'a Joiner,
    ssh: SshSession,
    answers: Option<PeerAnswers>,
    facts: Facts,
    node_toml: String,
}

/// Runs an active-active creation (the request's mode is checked by the
/// caller); the last message, or the error.
pub(super) async fn run(
    ctx: &CreateContext,
    req: &v1::CreateClusterRequest,
    p: &Progress,
    current: &mut String,
) -> anyhow::Result<v1::CreateClusterProgress> {
    let plan = parse(req)?;
    if ctx.local_path(tandem_config::CLUSTER_FILE).exists() {
        bail!(
            "this node is already clustered ({} exists); run `tandemctl cluster destroy` first",
            ctx.local_path(tandem_config::CLUSTER_FILE).display()
        );
    }
    Config::load(&ctx.config_dir).map_err(|e| {
        anyhow!(
            "this node's configuration is invalid, fix it first: {}",
            e.iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        )
    })?;

    *current = "connect".into();
    let mut members: Vec<Member<'_>> = Vec::new();
    for j in &plan.joiners {
        let ssh = super::connect::open_to(ctx, j.address, &j.host_key, &j.password, p).await;
        match ssh {
            Ok(ssh) => members.push(Member {
                joiner: j,
                ssh,
                answers: None,
                facts: Facts::default(),
                node_toml: String::new(),
            }),
            Err(e) => {
                for m in members {
                    m.ssh.close().await;
                }
                return Err(e);
            }
        }
    }
    let outcome = run_connected(ctx, req, &plan, &mut members, p, current).await;
    for m in members {
        m.ssh.close().await;
    }
    outcome
}

async fn run_connected(
    ctx: &CreateContext,
    req: &v1::CreateClusterRequest,
    plan: &Plan,
    members: &mut [Member<'_>],
    p: &Progress,
    current: &mut String,
) -> anyhow::Result<v1::CreateClusterProgress> {
    *current = "preflight".into();
    let pre = preflight(ctx, plan, members, p).await?;
    if !req.confirmed {
        return Ok(v1::CreateClusterProgress {
            step: "confirm".into(),
            ok: true,
            message: format!(
                "preflight passed; nothing was changed. Creating the cluster erases {} replicated file(s) on {} and replaces them with {}'s",
                pre.would_erase.len(),
                members
                    .iter()
                    .map(|m| m.facts.node_name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                pre.local.node_name
            ),
            done: true,
            would_erase: pre.would_erase,
            needs_confirmation: true,
        });
    }
    *current = "keys".into();
    let sessions: Vec<&SshSession> = members.iter().map(|m| &m.ssh).collect();
    let mut undo = Undo::save(ctx, &sessions, Vec::new()).await?;
    let steps = async {
        *current = "keys".into();
        keys(ctx, plan, members, &pre, p).await?;
        *current = "configure".into();
        configure(ctx, members, &pre, p).await?;
        *current = "sync".into();
        for m in members.iter() {
            let erase: Vec<String> = m
                .answers
                .as_ref()
                .map(|a| a.replicated.clone())
                .unwrap_or_default();
            first_sync_to(ctx, &m.ssh, &m.facts.node_name, &erase, &[], p).await?;
        }
        *current = "start".into();
        start(ctx, members, &pre, p, &mut undo).await
    }
    .await;
    match steps {
        Ok(message) => {
            undo.discard(&sessions).await;
            tracing::info!("{message}");
            Ok(v1::CreateClusterProgress {
                step: "done".into(),
                ok: true,
                message,
                done: true,
                ..Default::default()
            })
        }
        Err(e) => {
            let targets: Vec<Target<'_>> = members
                .iter()
                .map(|m| Target {
                    name: &m.facts.node_name,
                    ssh: &m.ssh,
                    addr: SocketAddr::new(m.joiner.address, ctx.ssh_port),
                    host_key: &m.joiner.host_key,
                    password: &m.joiner.password,
                })
                .collect();
            let report = undo.roll_back(ctx, &pre.local.node_name, &targets).await;
            bail!("{e:#}; {report}");
        }
    }
}

/// What preflight found and the files the confirmed run writes.
struct Prepared {
    local: Facts,
    cluster_if: String,
    /// "<node>: <file>" of every joining node's replicated files.
    would_erase: Vec<String>,
    cluster_toml: String,
    local_node_toml: String,
}

async fn preflight(
    ctx: &CreateContext,
    plan: &Plan,
    members: &mut [Member<'_>],
    p: &Progress,
) -> anyhow::Result<Prepared> {
    let first = members
        .first()
        .map(|m| m.joiner.address)
        .ok_or_else(|| anyhow!("no other node"))?;
    let local = facts::gather_local(&ctx.config_dir, Some(first)).await?;
    let mut problems = Vec::new();
    // This node's sshd must let the others in with the cluster key (judged
    // for a login from the first of them), and each node's sshd this one.
    match sshd::local(&ctx.sshd_config, first, plan.local_ip, ctx.ssh_port).await {
        Ok(f) => problems.extend(sshd::problems(&local.node_name, &f, &ctx.authorized_keys)),
        Err(e) => problems.push(format!("{}: {e}", local.node_name)),
    }
    // This node's BIRD and routes to the routers.
    let mut local_answers = std::collections::BTreeMap::new();
    for (name, cmd) in bgp_sections(&plan.peers) {
        let r = run_local("sh", &["-c", &format!("{cmd} 2>&1")]).await;
        local_answers.insert(
            name,
            match r {
                Ok(out) => (out, 0),
                Err(e) => (e.to_string(), 1),
            },
        );
    }
    problems.extend(bgp_problems(&local.node_name, &plan.peers, |n| {
        local_answers.get(n).cloned().unwrap_or((String::new(), -1))
    }));
    let mut cluster_if: Option<String> = None;
    let mut names = vec![local.node_name.clone()];
    for m in members.iter_mut() {
        let answers = gather_peer(ctx, &m.ssh, plan.local_ip, m.joiner.address).await?;
        let name = answers.facts.node_name.clone();
        match &answers.sshd {
            Ok(f) => problems.extend(sshd::problems(&name, f, &ctx.peer_authorized_keys)),
            Err(e) => problems.push(format!("{name}: {e}")),
        }
        match facts::check(
            &local,
            &answers.facts,
            plan.local_ip,
            m.joiner.address,
            answers.skew_ms,
        ) {
            Ok(i) => cluster_if = Some(i),
            Err(Refusal(r)) => problems.extend(r),
        }
        if names.contains(&name) && name != local.node_name {
            problems.push(format!(
                "two nodes are named `{name}` (node.toml `name`); the name is a node's identity in the cluster: rename one"
            ));
        }
        names.push(name.clone());
        let script = facts::sections_script(
            &bgp_sections(&plan.peers)
                .iter()
                .map(|(n, c)| (n.as_str(), c.clone()))
                .collect::<Vec<_>>(),
        );
        let out = m.ssh.exec_ok(&script).await?.stdout_text();
        let sections = facts::parse_sections(&out);
        problems.extend(bgp_problems(&name, &plan.peers, |n| {
            sections.get(n).cloned().unwrap_or((String::new(), -1))
        }));
        m.facts = answers.facts.clone();
        m.answers = Some(answers);
    }
    let cluster_if = match cluster_if {
        Some(i) if problems.is_empty() => i,
        _ => {
            return Err(anyhow!(
                "{}; nothing was changed",
                Refusal(problems).to_string().replace(
                    "preflight refused the pair",
                    "preflight refused the cluster"
                )
            ));
        }
    };
    let mut would_erase = Vec::new();
    for m in members.iter() {
        for f in m.answers.iter().flat_map(|a| a.replicated.iter()) {
            would_erase.push(format!("{}: {f}", m.facts.node_name));
        }
    }
    let mut nodes = vec![(local.node_name.clone(), plan.local_ip)];
    nodes.extend(
        members
            .iter()
            .map(|m| (m.facts.node_name.clone(), m.joiner.address)),
    );
    let summary = format!(
        "{all}: Tandem {v}, BIRD on every node, cluster link {cluster_if}, BGP peers {peers} reached directly; {n} replicated file(s) on the other nodes will be erased",
        all = names.join(", "),
        v = local.version,
        peers = plan
            .peers
            .iter()
            .map(|p| format!("{} ({})", p.name, p.address))
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
    let cluster_toml = cluster_toml(plan, &nodes, ctx.ssh_port);
    let local_node_toml = with_cluster_link(
        &std::fs::read_to_string(ctx.local_path(tandem_config::NODE_FILE))
            .context("reading this node's node.toml")?,
        &cluster_if,
        plan.local_ip,
    );
    validate(
        &ctx.config_dir,
        &local_node_toml,
        &cluster_toml,
        &local.node_name,
    )?;
    for m in members.iter_mut() {
        let text = m
            .answers
            .as_ref()
            .map(|a| a.node_toml.clone())
            .unwrap_or_default();
        m.node_toml = with_cluster_link(&text, &cluster_if, m.joiner.address);
        validate(
            &ctx.config_dir,
            &m.node_toml,
            &cluster_toml,
            &m.facts.node_name,
        )?;
    }
    Ok(Prepared {
        local,
        cluster_if,
        would_erase,
        cluster_toml,
        local_node_toml,
    })
}

/// One new identity on every node, its key authorized on every node, and
/// every node's host key pinned on every other node.
async fn keys(
    ctx: &CreateContext,
    plan: &Plan,
    members: &[Member<'_>],
    pre: &Prepared,
    p: &Progress,
) -> anyhow::Result<()> {
    let (private, public) = tandem_ssh::generate_identity()?;
    let own_host_key = std::fs::read_to_string(&ctx.host_key_pub).with_context(|| {
        format!(
            "reading this node's SSH host key {} (pinned on the other nodes)",
            ctx.host_key_pub.display()
        )
    })?;
    let own_pin = tandem_ssh::known_hosts_line(plan.local_ip, ctx.ssh_port, own_host_key.trim());
    let pins: Vec<String> = members
        .iter()
        .map(|m| {
            tandem_ssh::known_hosts_line(m.joiner.address, ctx.ssh_port, &m.ssh.host_key_line())
        })
        .collect();
    write_atomic(&ctx.local_path("ssh/id_ed25519"), private.as_bytes(), 0o600)?;
    write_atomic(
        &ctx.local_path("ssh/id_ed25519.pub"),
        format!("{public}\n").as_bytes(),
        0o644,
    )?;
    write_atomic(
        &ctx.local_path("ssh/known_hosts"),
        pins.concat().as_bytes(),
        0o644,
    )?;
    authorize_local(&ctx.authorized_keys, &public)?;
    for (i, m) in members.iter().enumerate() {
        let mut known = own_pin.clone();
        for (j, pin) in pins.iter().enumerate() {
            if i != j {
                known.push_str(pin);
            }
        }
        m.ssh
            .write_file(&ctx.peer_path("ssh/id_ed25519"), private.as_bytes(), 0o600)
            .await?;
        m.ssh
            .write_file(
                &ctx.peer_path("ssh/id_ed25519.pub"),
                format!("{public}\n").as_bytes(),
                0o644,
            )
            .await?;
        m.ssh
            .write_file(&ctx.peer_path("ssh/known_hosts"), known.as_bytes(), 0o644)
            .await?;
        authorize_peer(&m.ssh, &ctx.peer_authorized_keys, &public).await?;
    }
    let mut pinned = vec![format!(
        "{} {}",
        pre.local.node_name,
        tandem_ssh::fingerprint_of_line(&own_host_key)
    )];
    pinned.extend(members.iter().map(|m| {
        format!(
            "{} {}",
            m.facts.node_name,
            tandem_ssh::fingerprint(m.ssh.host_key())
        )
    }));
    p.step(
        "keys",
        format!(
            "cluster identity {} installed on every node; every node pins the others' host keys ({})",
            tandem_ssh::fingerprint_of_line(&public),
            pinned.join(", ")
        ),
    )
    .await;
    Ok(())
}

/// node.toml of every node (its cluster link added) and cluster.toml here
/// (the others get it with the first sync).
async fn configure(
    ctx: &CreateContext,
    members: &[Member<'_>],
    pre: &Prepared,
    p: &Progress,
) -> anyhow::Result<()> {
    write_atomic(
        &ctx.local_path(tandem_config::NODE_FILE),
        pre.local_node_toml.as_bytes(),
        0o644,
    )?;
    write_atomic(
        &ctx.local_path(tandem_config::CLUSTER_FILE),
        pre.cluster_toml.as_bytes(),
        0o644,
    )?;
    for m in members {
        m.ssh
            .write_file(
                &ctx.peer_path(tandem_config::NODE_FILE),
                m.node_toml.as_bytes(),
                0o644,
            )
            .await?;
    }
    p.step(
        "configure",
        format!(
            "cluster.toml written (active-active, {} nodes, {} the leader); node.toml of every node names {}",
            members.len() + 1,
            pre.local.node_name,
            pre.cluster_if
        ),
    )
    .await;
    Ok(())
}

/// This node's daemons reload and its start command runs, then each other
/// node's; every node's BGP sessions reported.
async fn start(
    ctx: &CreateContext,
    members: &[Member<'_>],
    pre: &Prepared,
    p: &Progress,
    undo: &mut Undo,
) -> anyhow::Result<String> {
    let me = &pre.local.node_name;
    undo.local_reloaded = true;
    let reloaded = reload_local(&ctx.runtime_dir).await;
    p.step("start", format!("{me} reloaded: {}", reloaded.join(", ")))
        .await;
    wait_routed(me, || async { local_routed(&ctx.runtime_dir).await }).await?;
    run_start_command_here(&ctx.start_command).await?;
    if !ctx.start_command.trim().is_empty() {
        p.step("start", format!("{me}: `{}` done", ctx.start_command))
            .await;
    }
    for (i, m) in members.iter().enumerate() {
        let name = &m.facts.node_name;
        undo.peer_reloaded(i);
        let reloaded = reload_peer(&m.ssh, &ctx.peer_runtime_dir).await;
        p.step("start", format!("{name} reloaded: {}", reloaded.join(", ")))
            .await;
        wait_routed(name, || async {
            peer_routed(&m.ssh, &ctx.peer_runtime_dir).await
        })
        .await?;
        if !ctx.peer_start_command.trim().is_empty() {
            m.ssh.exec_ok(&ctx.peer_start_command).await?;
            p.step(
                "start",
                format!("{name}: `{}` done", ctx.peer_start_command),
            )
            .await;
        }
    }
    // The routers may take a moment (or not be configured yet): report
    // what each node's routed sees, waiting a while for the sessions.
    let deadline = Instant::now() + SESSIONS_WAIT;
    let report = loop {
        let mut all = true;
        let mut parts = Vec::new();
        let local = local_routed(&ctx.runtime_dir).await;
        all &= sessions_up(local.as_ref());
        parts.push(describe(me, local.as_ref()));
        for m in members {
            let s = peer_routed(&m.ssh, &ctx.peer_runtime_dir).await;
            all &= sessions_up(s.as_ref());
            parts.push(describe(&m.facts.node_name, s.as_ref()));
        }
        if all || Instant::now() >= deadline {
            break parts.join("; ");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let mut names = vec![format!("{me} (leader)")];
    names.extend(members.iter().map(|m| m.facts.node_name.clone()));
    Ok(format!(
        "cluster created: {} are active-active; {report}",
        names.join(", ")
    ))
}

pub(crate) fn sessions_up(s: Option<&v1::RoutedStatus>) -> bool {
    s.is_some_and(|s| !s.sessions.is_empty() && s.sessions.iter().all(|x| x.established))
}

/// "lb2: 1/1 BGP session(s) established, 1 VIP(s) announced".
pub(crate) fn describe(name: &str, s: Option<&v1::RoutedStatus>) -> String {
    match s {
        None => format!("{name}: routed does not answer"),
        Some(s) => format!(
            "{name}: {}/{} BGP session(s) established, {} VIP(s) announced",
            s.sessions.iter().filter(|x| x.established).count(),
            s.sessions.len(),
            s.vips.iter().filter(|v| v.announced).count()
        ),
    }
}

/// routed's Status here.
pub async fn local_routed(runtime_dir: &Path) -> Option<v1::RoutedStatus> {
    let ch = tandem_runtime::connect(runtime_dir, "routed").await.ok()?;
    routed_status(ch).await
}

/// routed's Status on a node reached over `ssh`.
pub async fn peer_routed(ssh: &SshSession, runtime_dir: &Path) -> Option<v1::RoutedStatus> {
    let ch = ssh
        .grpc_channel(&runtime_dir.join("routed.sock"))
        .await
        .ok()?;
    routed_status(ch).await
}

async fn routed_status(ch: tonic::transport::Channel) -> Option<v1::RoutedStatus> {
    let r = tokio::time::timeout(
        Duration::from_secs(3),
        v1::routed_client::RoutedClient::new(ch).status(v1::StatusRequest {}),
    )
    .await
    .ok()?
    .ok()?;
    Some(r.into_inner())
}

/// Waits until a node's routed runs the active-active cluster (it has
/// written BIRD's configuration: BIRD's unit may start).
pub(crate) async fn wait_routed<F, Fut>(node: &str, status: F) -> anyhow::Result<()>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Option<v1::RoutedStatus>>,
{
    let deadline = Instant::now() + ROUTED_TIMEOUT;
    let mut last = None;
    while Instant::now() < deadline {
        last = status().await;
        if last.as_ref().is_some_and(|s| s.mode == "active-active") {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "{node}'s routed did not take the active-active configuration within {ROUTED_TIMEOUT:?} ({})",
        match last {
            None => "it does not answer: is routed installed and running?".to_owned(),
            Some(s) => format!("it sees {}", s.mode),
        }
    )
}

/// Runs the start command on this node (`sh -c`).
pub async fn run_start_command_here(command: &str) -> anyhow::Result<()> {
    if command.trim().is_empty() {
        return Ok(());
    }
    run_local("sh", &["-c", command])
        .await
        .map(drop)
        .with_context(|| format!("running the start command `{command}` here"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str, address: &str, remote_as: u32) -> v1::BgpPeerInfo {
        v1::BgpPeerInfo {
            name: name.into(),
            address: address.into(),
            remote_as,
            bfd: true,
        }
    }

    fn plan() -> Plan {
        Plan {
            local_ip: "10.2.0.11".parse().unwrap(),
            joiners: Vec::new(),
            local_as: 65010,
            peers: vec![peer("tor1", "10.2.0.1", 65000)],
            bfd: BfdSettings::default(),
            hash_seed: 0x5eed_0001,
        }
    }

    #[test]
    fn the_cluster_toml_lists_the_leader_first_and_validates() {
        let nodes: Vec<(String, IpAddr)> = (1..=3)
            .map(|i| (format!("lb{i}"), format!("10.2.0.1{i}").parse().unwrap()))
            .collect();
        let text = cluster_toml(&plan(), &nodes, 22);
        assert!(text.contains("hash_seed = 0x5eed0001"), "{text}");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("node.toml"),
            "name = \"lb2\"\ncluster_interface = \"eth0\"\ncluster_address = \"10.2.0.12\"\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("cluster.toml"), &text).unwrap();
        let c = Config::load(dir.path()).unwrap();
        let cl = c.cluster.unwrap();
        assert_eq!(cl.mode, tandem_config::ClusterMode::ActiveActive);
        assert_eq!(cl.nodes[0].name, "lb1");
        assert_eq!(cl.hash_seed, 0x5eed_0001);
        assert_eq!(cl.bgp.unwrap().peers[0].remote_as, 65000);
    }

    #[test]
    fn requests_are_checked_before_anything_is_asked() {
        let node = |a: &str| v1::JoiningNode {
            address: a.into(),
            root_password: "pw".into(),
            host_key: "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s".into(),
        };
        let req = v1::CreateClusterRequest {
            local_ip: "10.2.0.11".into(),
            mode: "active-active".into(),
            nodes: vec![node("10.2.0.12"), node("10.2.0.13")],
            bgp: Some(v1::BgpPlan {
                local_as: 65010,
                peers: vec![peer("tor1", "10.2.0.1", 65000)],
                ..Default::default()
            }),
            ..Default::default()
        };
        let p = parse(&req).unwrap();
        assert_eq!(p.joiners.len(), 2);
        assert_ne!(p.hash_seed, 0, "a random seed when none is given");
        let one = v1::CreateClusterRequest {
            nodes: vec![node("10.2.0.12")],
            ..req.clone()
        };
        let e = parse(&one).err().unwrap().to_string();
        assert!(e.contains("has 3-8 nodes"), "{e}");
        let twice = v1::CreateClusterRequest {
            nodes: vec![node("10.2.0.12"), node("10.2.0.12")],
            ..req.clone()
        };
        assert!(
            parse(&twice)
                .err()
                .unwrap()
                .to_string()
                .contains("given twice")
        );
        let mut unconfirmed = req.clone();
        unconfirmed.nodes[1].host_key.clear();
        let e = parse(&unconfirmed).err().unwrap().to_string();
        assert!(e.contains("host key of 10.2.0.13 was not confirmed"), "{e}");
        let no_bgp = v1::CreateClusterRequest { bgp: None, ..req };
        assert!(
            parse(&no_bgp)
                .err()
                .unwrap()
                .to_string()
                .contains("AS number")
        );
    }

    #[test]
    fn bird_and_direct_routes_to_the_routers_are_required() {
        let peers = vec![
            peer("tor1", "10.2.0.1", 65000),
            peer("tor2", "10.3.0.1", 65000),
        ];
        let answers = |n: &str| match n {
            "bird" => ("sh: 1: bird: not found\n".to_owned(), 127),
            "bgp0" => ("10.2.0.1 dev eth0 src 10.2.0.12 uid 0\n".to_owned(), 0),
            _ => (
                "10.3.0.1 via 10.2.0.254 dev eth0 src 10.2.0.12\n".to_owned(),
                0,
            ),
        };
        let problems = bgp_problems("lb2", &peers, answers);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].contains("lb2 has no working BIRD"),
            "{problems:?}"
        );
        assert!(
            problems[1]
                .contains("lb2 reaches BGP peer tor2 (10.3.0.1) through the gateway 10.2.0.254"),
            "{problems:?}"
        );
    }
}
