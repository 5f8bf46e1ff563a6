//! Changing an active-active cluster's members, on the leader:
//!
//! - **add-node**: a standalone node joins with the trust and preflight
//!   of `cluster create` (its host key confirmed before its root password
//!   is sent, preflight against this node before anything is written). It
//!   gets the cluster identity, every node's host key, its cluster link in
//!   node.toml and the replicated trees (with the new cluster.toml); its
//!   daemons reload and its start command runs; then the new cluster.toml
//!   is applied here and replicated to every node. Every existing node
//!   pins the new node's host key first, so every node must be reachable.
//! - **remove-node**: the node is put in maintenance first (its VIPs are
//!   withdrawn, the routers move its flows to the others, its datapath
//!   still serves what arrives meanwhile); then cluster.toml without it is
//!   applied and replicated, the node leaves (its cluster files go, its
//!   daemons reload: routed shuts its BIRD down) and the others forget its
//!   host key. An unreachable node is removed from the others all the
//!   same, and the reply says it was not changed.
//! - **destroy** (active-active): on the leader, every node leaves; on
//!   another node, only that node (a node removed while it was away).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use tandem_config::Config;
use tandem_proto::v1;
use tandem_ssh::{Auth, HostKeyCheck, SshSession};

use crate::active;
use crate::api::ClusterManagerApi;
use crate::create::active::{
    bgp_problems, bgp_sections, describe, parse_joiner, peer_routed, sessions_up, wait_routed,
};
use crate::create::facts::{self, Refusal, sh_quote};
use crate::create::files::write_atomic;
use crate::create::keys::{add_key_line, remove_key_line};
use crate::create::start::{reload_local, reload_peer};
use crate::create::{CreateContext, Progress};
use crate::replicate::Change;

/// What a node loses when it leaves the cluster (relative to its config
/// dir; farms and the other replicated trees stay).
const CLUSTER_FILES: [&str; 3] = ["cluster.toml", "keys/sync.key", "ssh"];
/// How long the routers get to move a draining node's flows before it
/// leaves (its datapath keeps serving meanwhile; BGP withdrawals take
/// milliseconds, this is slack for a loaded router).
const DRAIN: Duration = Duration::from_secs(1);
/// How long add-node waits for the new node's BGP sessions before it
/// reports them as they are.
const SESSIONS_WAIT: Duration = Duration::from_secs(20);

/// cluster.toml with node `name` at `address` appended to `[[nodes]]`
/// (comments and layout kept).
pub fn with_node(text: &str, name: &str, address: IpAddr) -> anyhow::Result<String> {
    let mut doc: toml_edit::DocumentMut = text.parse().context("cluster.toml does not parse")?;
    let nodes = doc
        .get_mut("nodes")
        .and_then(toml_edit::Item::as_array_of_tables_mut)
        .ok_or_else(|| anyhow!("cluster.toml has no [[nodes]]"))?;
    let mut t = toml_edit::Table::new();
    t["name"] = toml_edit::value(name);
    t["address"] = toml_edit::value(address.to_string());
    nodes.push(t);
    Ok(doc.to_string())
}

/// cluster.toml without node `name`: its `[[nodes]]` entry and its name in
/// any `[[bgp.peers]]` `nodes` list. A router that would be left with no
/// node is refused (an empty list means every node).
pub fn without_node(text: &str, name: &str) -> anyhow::Result<String> {
    let mut doc: toml_edit::DocumentMut = text.parse().context("cluster.toml does not parse")?;
    let nodes = doc
        .get_mut("nodes")
        .and_then(toml_edit::Item::as_array_of_tables_mut)
        .ok_or_else(|| anyhow!("cluster.toml has no [[nodes]]"))?;
    let before = nodes.len();
    nodes.retain(|t| t.get("name").and_then(|v| v.as_str()) != Some(name));
    if nodes.len() == before {
        bail!("no node `{name}` in cluster.toml");
    }
    if let Some(peers) = doc
        .get_mut("bgp")
        .and_then(|b| b.get_mut("peers"))
        .and_then(toml_edit::Item::as_array_of_tables_mut)
    {
        for peer in peers.iter_mut() {
            let peer_name = peer
                .get("name")
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_owned();
            if let Some(list) = peer.get_mut("nodes").and_then(|n| n.as_array_mut()) {
                let had = list.len();
                list.retain(|v| v.as_str() != Some(name));
                if had > 0 && list.is_empty() {
                    bail!(
                        "BGP peer `{peer_name}` peers with `{name}` only: give it other nodes (or remove it) in cluster.toml first; with an empty list every node would peer with it"
                    );
                }
            }
        }
    }
    Ok(doc.to_string())
}

/// known_hosts text without the lines that pin `addr` (port 22 or
/// `[addr]:port`); None when it had none.
pub fn without_pin(text: &str, addr: IpAddr, port: u16) -> Option<String> {
    let plain = addr.to_string();
    let bracketed = format!("[{addr}]:{port}");
    let pins = |l: &str| {
        l.split_whitespace().next().is_some_and(|hosts| {
            hosts
                .split(',')
                .any(|h| h == bracketed || (port == 22 && h == plain))
        })
    };
    if !text.lines().any(pins) {
        return None;
    }
    let mut out: String = text
        .lines()
        .filter(|l| !pins(l))
        .collect::<Vec<_>>()
        .join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    Some(out)
}

/// A pinned session to another node with the cluster identity.
async fn session_to(ctx: &CreateContext, name: &str, addr: IpAddr) -> anyhow::Result<SshSession> {
    let at = SocketAddr::new(addr, ctx.ssh_port);
    SshSession::connect_labelled(
        &format!("{name} ({at})"),
        at,
        "root",
        HostKeyCheck::Pinned {
            known_hosts: ctx.local_path("ssh/known_hosts"),
        },
        Auth::Key(ctx.local_path("ssh/id_ed25519")),
    )
    .await
    .map_err(|e| anyhow!("{e}"))
}

/// The node's routed in (or out of) maintenance, over `ssh`.
async fn routed_maintenance(
    ssh: &SshSession,
    ctx: &CreateContext,
    on: bool,
    reason: &str,
) -> anyhow::Result<v1::RoutedStatus> {
    let ch = ssh
        .grpc_channel(&ctx.peer_runtime_dir.join("routed.sock"))
        .await?;
    let mut client = v1::routed_client::RoutedClient::new(ch);
    let call = client.set_maintenance(v1::SetRoutedMaintenanceRequest {
        maintenance: on,
        reason: reason.to_owned(),
    });
    match tokio::time::timeout(Duration::from_secs(10), call).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => bail!("routed: {}", s.message()),
        Err(_) => bail!("routed: no answer to SetMaintenance within 10 s"),
    }
}

/// The cluster public key, as this node's identity has it.
fn cluster_public(ctx: &CreateContext) -> Option<String> {
    tandem_ssh::load_identity(&ctx.local_path("ssh/id_ed25519"))
        .ok()
        .and_then(|k| k.public_key().to_openssh().ok())
}

/// A remote node leaves: its cluster files and the cluster key's line go,
/// its daemons reload (routed shuts its BIRD down), its maintenance is
/// lifted (nothing is announced any more; a node that joins again must not
/// stay withdrawn).
async fn leave_remote(
    ctx: &CreateContext,
    ssh: &SshSession,
    name: &str,
    public: Option<&str>,
) -> anyhow::Result<String> {
    let targets: Vec<String> = CLUSTER_FILES
        .iter()
        .map(|p| sh_quote(&ctx.peer_path(p).display().to_string()))
        .collect();
    ssh.exec_ok(&format!("rm -rf -- {}", targets.join(" ")))
        .await?;
    if let Some(public) = public {
        let path = &ctx.peer_authorized_keys;
        if let Some(old) = ssh.read_file(path).await?
            && let Some(new) = remove_key_line(&String::from_utf8_lossy(&old), public)
        {
            ssh.write_file(path, new.as_bytes(), 0o600).await?;
        }
    }
    let reloaded = reload_peer(ssh, &ctx.peer_runtime_dir).await;
    tracing::info!(node = %name, "{name} left the cluster; it reloaded: {}", reloaded.join(", "));
    let _ = routed_maintenance(ssh, ctx, false, "").await;
    Ok(reloaded.join(", "))
}

/// This node leaves: the same, here.
async fn leave_local(ctx: &CreateContext, me: &str, public: Option<&str>) -> anyhow::Result<()> {
    for rel in CLUSTER_FILES {
        let path = ctx.local_path(rel);
        let r = if rel == "ssh" {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match r {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => bail!("removing {}: {e}", path.display()),
        }
    }
    if let Some(public) = public {
        match std::fs::read_to_string(&ctx.authorized_keys) {
            Ok(old) => {
                if let Some(new) = remove_key_line(&old, public) {
                    write_atomic(&ctx.authorized_keys, new.as_bytes(), 0o600)?;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => bail!("reading {}: {e}", ctx.authorized_keys.display()),
        }
    }
    let reloaded = reload_local(&ctx.runtime_dir).await;
    tracing::info!(node = %me, "{me} left the cluster; it reloaded: {}", reloaded.join(", "));
    let _ = crate::local::set_routed_maintenance(&ctx.runtime_dir, false, "").await;
    Ok(())
}

/// Adds (or removes) a pin line in a remote node's known_hosts.
async fn edit_remote_pins(
    ctx: &CreateContext,
    ssh: &SshSession,
    edit: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<()> {
    let path = ctx.peer_path("ssh/known_hosts");
    let old = ssh
        .read_file(&path)
        .await?
        .map(|d| String::from_utf8_lossy(&d).into_owned())
        .unwrap_or_default();
    if let Some(new) = edit(&old) {
        ssh.write_file(&path, new.as_bytes(), 0o644).await?;
    }
    Ok(())
}

fn edit_local_pins(
    ctx: &CreateContext,
    edit: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<()> {
    let path = ctx.local_path("ssh/known_hosts");
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    if let Some(new) = edit(&old) {
        write_atomic(&path, new.as_bytes(), 0o644)?;
    }
    Ok(())
}

fn append_pin(old: &str, pin: &str) -> Option<String> {
    if old.lines().any(|l| l.trim() == pin.trim()) {
        return None;
    }
    let mut new = old.to_owned();
    if !new.is_empty() && !new.ends_with('\n') {
        new.push('\n');
    }
    new.push_str(pin);
    Some(new)
}

/// The configuration in force, as an active-active leader sees it.
fn leader_config(
    api: &ClusterManagerApi,
) -> anyhow::Result<std::sync::Arc<tandem_runtime::Loaded>> {
    let loaded = api.shared.config.current();
    let c = &loaded.config;
    if !active::is_active(c) {
        bail!(
            "{} is not in an active-active cluster: add-node and remove-node change the members of an active-active cluster (a pair has exactly two nodes)",
            c.node.name
        );
    }
    if !active::leads(c) {
        let leader = c
            .cluster
            .as_ref()
            .and_then(active::leader)
            .map(|n| format!("{} ({})", n.name, n.address))
            .unwrap_or_default();
        bail!(
            "{} is not the cluster's leader: run this on the leader {leader}, the first of cluster.toml's [[nodes]]",
            c.node.name
        );
    }
    Ok(loaded)
}

/// AddNode: streams its steps to `p`; the last message, or the error.
pub async fn add_node(
    api: &ClusterManagerApi,
    req: v1::AddNodeRequest,
    p: &Progress,
    current: &mut String,
) -> anyhow::Result<v1::CreateClusterProgress> {
    let ctx = &api.create;
    let loaded = leader_config(api)?;
    let config = &loaded.config;
    let me = config.node.name.clone();
    let Some(cluster) = config.cluster.as_ref() else {
        bail!("{me} is standalone");
    };
    if cluster.nodes.len() >= tandem_config::MAX_ACTIVE_NODES {
        bail!(
            "the cluster has {} nodes already, the most an active-active cluster has",
            cluster.nodes.len()
        );
    }
    let joiner = parse_joiner(req.node.as_ref().ok_or_else(|| anyhow!("no node given"))?)?;
    if let Some(n) = cluster.nodes.iter().find(|n| n.address == joiner.address) {
        bail!("{} is node {}'s address already", joiner.address, n.name);
    }
    let local_ip = config
        .node
        .cluster_address
        .ok_or_else(|| anyhow!("node.toml has no cluster_address"))?;
    if local_ip.is_ipv4() != joiner.address.is_ipv4() {
        bail!(
            "the new node's address {} is not of the cluster's family ({local_ip})",
            joiner.address
        );
    }

    *current = "connect".into();
    let ssh =
        crate::create::connect::open_to(ctx, joiner.address, &joiner.host_key, &joiner.password, p)
            .await?;
    let outcome = async {
        *current = "preflight".into();
        let local = facts::gather_local(&ctx.config_dir, Some(joiner.address)).await?;
        let answers =
            crate::create::preflight::gather_peer(ctx, &ssh, local_ip, joiner.address).await?;
        let name = answers.facts.node_name.clone();
        let mut problems = Vec::new();
        match crate::create::sshd::local(&ctx.sshd_config, joiner.address, local_ip, ctx.ssh_port)
            .await
        {
            Ok(f) => problems.extend(crate::create::sshd::problems(&me, &f, &ctx.authorized_keys)),
            Err(e) => problems.push(format!("{me}: {e}")),
        }
        match &answers.sshd {
            Ok(f) => problems.extend(crate::create::sshd::problems(&name, f, &ctx.peer_authorized_keys)),
            Err(e) => problems.push(format!("{name}: {e}")),
        }
        let cluster_if = match facts::check(&local, &answers.facts, local_ip, joiner.address, answers.skew_ms) {
            Ok(i) => Some(i),
            Err(Refusal(r)) => {
                problems.extend(r);
                None
            }
        };
        if cluster.nodes.iter().any(|n| n.name == name) {
            problems.push(format!(
                "the cluster has a node named `{name}` already (node.toml `name` of {}): rename the new node",
                joiner.address
            ));
        }
        let bgp_peers: Vec<v1::BgpPeerInfo> = cluster
            .bgp
            .iter()
            .flat_map(|b| b.peers.iter())
            .filter(|p| p.nodes.is_empty())
            .map(|p| v1::BgpPeerInfo {
                name: p.name.clone(),
                address: p.address.to_string(),
                remote_as: p.remote_as,
                bfd: p.bfd,
            })
            .collect();
        let script = facts::sections_script(
            &bgp_sections(&bgp_peers)
                .iter()
                .map(|(n, c)| (n.as_str(), c.clone()))
                .collect::<Vec<_>>(),
        );
        let sections = facts::parse_sections(&ssh.exec_ok(&script).await?.stdout_text());
        problems.extend(bgp_problems(&name, &bgp_peers, |n| {
            sections.get(n).cloned().unwrap_or((String::new(), -1))
        }));
        let cluster_if = match cluster_if {
            Some(i) if problems.is_empty() => i,
            _ => bail!(
                "{}; nothing was changed",
                Refusal(problems)
                    .to_string()
                    .replace("preflight refused the pair", "preflight refused the new node")
            ),
        };
        let cluster_path = ctx.local_path(tandem_config::CLUSTER_FILE);
        let old_cluster = std::fs::read_to_string(&cluster_path)
            .with_context(|| format!("reading {}", cluster_path.display()))?;
        let new_cluster = with_node(&old_cluster, &name, joiner.address)?;
        let node_toml = crate::create::configure::with_cluster_link(&answers.node_toml, &cluster_if, joiner.address);
        crate::create::preflight::validate(&ctx.config_dir, &node_toml, &new_cluster, &name)?;
        let local_node = std::fs::read_to_string(ctx.local_path(tandem_config::NODE_FILE))
            .context("reading this node's node.toml")?;
        crate::create::preflight::validate(&ctx.config_dir, &local_node, &new_cluster, &me)?;
        let would_erase: Vec<String> = answers
            .replicated
            .iter()
            .map(|f| format!("{name}: {f}"))
            .collect();
        let summary = format!(
            "{name} ({}): Tandem {}, BIRD installed, cluster link {cluster_if}, BGP peers reached directly, clock skew {} ms; {} replicated file(s) on {name} will be erased",
            joiner.address,
            answers.facts.version,
            answers.skew_ms,
            would_erase.len()
        );
        tracing::info!(step = "preflight", node = %name, "add-node: {summary}");
        p.send(v1::CreateClusterProgress {
            step: "preflight".into(),
            ok: true,
            message: summary,
            would_erase: would_erase.clone(),
            ..Default::default()
        })
        .await;
        if !req.confirmed {
            return Ok(v1::CreateClusterProgress {
                step: "confirm".into(),
                ok: true,
                message: format!(
                    "preflight passed; nothing was changed. Adding {name} erases {} replicated file(s) on it and replaces them with the cluster's",
                    would_erase.len()
                ),
                done: true,
                would_erase,
                needs_confirmation: true,
            });
        }
        // Every node pins the new node's host key: every node must answer.
        let mut others = Vec::new();
        let mut away = Vec::new();
        for (n, addr) in active::others(config) {
            match session_to(ctx, &n, addr).await {
                Ok(s) => others.push((n, s)),
                Err(e) => away.push(format!("{n}: {e}")),
            }
        }
        if !away.is_empty() {
            for (_, s) in others {
                s.close().await;
            }
            bail!(
                "every node pins the new node's host key, but some cannot be reached ({}); nothing was changed: bring them back, or remove them first",
                away.join("; ")
            );
        }
        *current = "keys".into();
        let mut undo = crate::create::undo::Undo::save(ctx, &[&ssh], Vec::new()).await?;
        let pin = tandem_ssh::known_hosts_line(joiner.address, ctx.ssh_port, &ssh.host_key_line());
        let steps = async {
            // The cluster identity and the pins.
            let private = std::fs::read(ctx.local_path("ssh/id_ed25519"))
                .context("reading the cluster identity")?;
            let public = std::fs::read_to_string(ctx.local_path("ssh/id_ed25519.pub"))
                .context("reading the cluster identity's public key")?;
            let own_host_key = std::fs::read_to_string(&ctx.host_key_pub)
                .with_context(|| format!("reading {}", ctx.host_key_pub.display()))?;
            let mut known = std::fs::read_to_string(ctx.local_path("ssh/known_hosts")).unwrap_or_default();
            known.push_str(&tandem_ssh::known_hosts_line(local_ip, ctx.ssh_port, own_host_key.trim()));
            ssh.write_file(&ctx.peer_path("ssh/id_ed25519"), &private, 0o600).await?;
            ssh.write_file(&ctx.peer_path("ssh/id_ed25519.pub"), public.as_bytes(), 0o644).await?;
            ssh.write_file(&ctx.peer_path("ssh/known_hosts"), known.as_bytes(), 0o644).await?;
            let authorized = ssh
                .read_file(&ctx.peer_authorized_keys)
                .await?
                .map(|d| String::from_utf8_lossy(&d).into_owned())
                .unwrap_or_default();
            if let Some(new) = add_key_line(&authorized, public.trim()) {
                ssh.write_file(&ctx.peer_authorized_keys, new.as_bytes(), 0o600).await?;
            }
            edit_local_pins(ctx, |old| append_pin(old, &pin))?;
            for (_, s) in &others {
                edit_remote_pins(ctx, s, |old| append_pin(old, &pin)).await?;
            }
            p.step(
                "keys",
                format!(
                    "{name} holds the cluster identity {} and pins every node's host key; every node pins {name}'s ({})",
                    tandem_ssh::fingerprint_of_line(&public),
                    tandem_ssh::fingerprint(ssh.host_key())
                ),
            )
            .await;
            *current = "configure".into();
            ssh.write_file(&ctx.peer_path(tandem_config::NODE_FILE), node_toml.as_bytes(), 0o644)
                .await?;
            p.step("configure", format!("{name}'s node.toml names {cluster_if}")).await;
            *current = "sync".into();
            crate::create::sync::first_sync_to(
                ctx,
                &ssh,
                &name,
                &answers.replicated,
                &[(tandem_config::CLUSTER_FILE, new_cluster.as_bytes())],
                p,
            )
            .await?;
            *current = "start".into();
            undo.peer_reloaded(0);
            let reloaded = reload_peer(&ssh, &ctx.peer_runtime_dir).await;
            p.step("start", format!("{name} reloaded: {}", reloaded.join(", "))).await;
            wait_routed(&name, || async { peer_routed(&ssh, &ctx.peer_runtime_dir).await }).await?;
            if !ctx.peer_start_command.trim().is_empty() {
                ssh.exec_ok(&ctx.peer_start_command).await?;
                p.step("start", format!("{name}: `{}` done", ctx.peer_start_command)).await;
            }
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = steps {
            // Nobody lists the node yet: put it back as it was, and let the
            // others forget its key.
            let _ = edit_local_pins(ctx, |old| without_pin(old, joiner.address, ctx.ssh_port));
            for (_, s) in &others {
                let _ = edit_remote_pins(ctx, s, |old| without_pin(old, joiner.address, ctx.ssh_port)).await;
            }
            for (_, s) in others {
                s.close().await;
            }
            let target = crate::create::undo::Target {
                name: &name,
                ssh: &ssh,
                addr: SocketAddr::new(joiner.address, ctx.ssh_port),
                host_key: &joiner.host_key,
                password: &joiner.password,
            };
            let report = undo.roll_back(ctx, &me, &[target]).await;
            bail!("{e:#}; {report}");
        }
        undo.discard(&[&ssh]).await;
        for (_, s) in others {
            s.close().await;
        }
        // The cluster learns the node: cluster.toml changed here and
        // replicated to every node (the new one holds it already).
        *current = "configure".into();
        let reply = api
            .apply_change_inner(vec![Change {
                path: tandem_config::CLUSTER_FILE.into(),
                content: Some(new_cluster.into_bytes()),
            }])
            .await
            .map_err(|s| anyhow!("{}", s.message()))?;
        if !reply.applied {
            bail!(
                "{name} is set up, but the new cluster.toml was refused here: {}; run `tandemctl cluster remove-node {name}`",
                reply.errors.join("; ")
            );
        }
        let replicated = if reply.replicated {
            "replicated to every node".to_owned()
        } else {
            format!("not yet replicated everywhere: {}", reply.replication_error)
        };
        p.step("configure", format!("cluster.toml lists {name}: applied here, {replicated}"))
            .await;
        let deadline = tokio::time::Instant::now() + SESSIONS_WAIT;
        let status = loop {
            let s = peer_routed(&ssh, &ctx.peer_runtime_dir).await;
            if sessions_up(s.as_ref()) || tokio::time::Instant::now() >= deadline {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        let message = format!(
            "{name} joined the cluster ({} nodes); {}",
            cluster.nodes.len() + 1,
            describe(&name, status.as_ref())
        );
        tracing::info!(node = %name, "{message}");
        api.shared.event("membership", message.clone());
        Ok(v1::CreateClusterProgress {
            step: "done".into(),
            ok: true,
            message,
            done: true,
            ..Default::default()
        })
    }
    .await;
    ssh.close().await;
    outcome
}

/// RemoveNode: streams its steps to `p`; the last message, or the error.
pub async fn remove_node(
    api: &ClusterManagerApi,
    req: v1::RemoveNodeRequest,
    p: &Progress,
    current: &mut String,
) -> anyhow::Result<v1::CreateClusterProgress> {
    let ctx = &api.create;
    let loaded = leader_config(api)?;
    let config = &loaded.config;
    let me = config.node.name.clone();
    let Some(cluster) = config.cluster.as_ref() else {
        bail!("{me} is standalone");
    };
    let name = req.node.trim().to_owned();
    let Some(node) = cluster.nodes.iter().find(|n| n.name == name).cloned() else {
        bail!(
            "no node `{name}` in this cluster (nodes: {})",
            cluster
                .nodes
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    if cluster.nodes.len() <= tandem_config::MIN_ACTIVE_NODES {
        bail!(
            "the cluster has {} nodes, the fewest an active-active cluster has: add a node first, or dissolve the cluster (`tandemctl cluster destroy`)",
            cluster.nodes.len()
        );
    }
    let cluster_path = ctx.local_path(tandem_config::CLUSTER_FILE);
    let old_cluster = std::fs::read_to_string(&cluster_path)
        .with_context(|| format!("reading {}", cluster_path.display()))?;
    let new_cluster = without_node(&old_cluster, &name)?;
    let remaining: Vec<(String, IpAddr)> = cluster
        .nodes
        .iter()
        .filter(|n| n.name != name)
        .map(|n| (n.name.clone(), n.address))
        .collect();
    // The new cluster.toml, judged by the node that will lead it.
    let judge = &remaining[0];
    let judge_node = format!(
        "name = \"{}\"\ncluster_interface = \"{}\"\ncluster_address = \"{}\"\n",
        judge.0,
        config.node.cluster_interface.clone().unwrap_or_default(),
        judge.1
    );
    crate::create::preflight::validate(&ctx.config_dir, &judge_node, &new_cluster, &judge.0)?;
    let public = cluster_public(ctx);
    let leaving_self = name == me;
    let mut notes = Vec::new();

    // 1. Drain: the node withdraws its VIPs and the routers move its flows.
    *current = "drain".into();
    let session = if leaving_self {
        None
    } else {
        match session_to(ctx, &name, node.address).await {
            Ok(s) => Some(s),
            Err(e) => {
                notes.push(format!(
                    "{name} could not be reached ({e}) and was not changed: it still holds its cluster files; when it returns, run `tandemctl cluster destroy` on it (only that node leaves)"
                ));
                None
            }
        }
    };
    let reason = format!("leaving the cluster (remove-node on {me})");
    let drained = if leaving_self {
        crate::local::set_routed_maintenance(&ctx.runtime_dir, true, &reason)
            .await
            .map_err(|e| anyhow!(e))
            .map(Some)
    } else if let Some(s) = &session {
        routed_maintenance(s, ctx, true, &reason).await.map(Some)
    } else {
        Ok(None)
    };
    match drained {
        Ok(Some(s)) => {
            let still = s.vips.iter().filter(|v| v.announced).count();
            tokio::time::sleep(DRAIN).await;
            p.step(
                "drain",
                format!("{name} is in maintenance: its VIPs are withdrawn from the routers ({still} still announced), its flows moved to the other nodes"),
            )
            .await;
        }
        Ok(None) => {
            p.step("drain", format!("{name} is unreachable: nothing to drain (the routers dropped it when its BGP sessions ended)"))
                .await;
        }
        Err(e) => {
            if let Some(s) = session {
                s.close().await;
            }
            bail!("{name} could not be put in maintenance, nothing was changed: {e:#}");
        }
    }

    // 2. The cluster forgets it.
    *current = "configure".into();
    let change = Change {
        path: tandem_config::CLUSTER_FILE.into(),
        content: Some(new_cluster.clone().into_bytes()),
    };
    if leaving_self {
        // This node leaves: the next node leads. cluster.toml goes to
        // every other node as this leader's last change.
        let msg = v1::ConfigChange {
            path: change.path.clone(),
            content: change.content.clone(),
            sequence: api.shared.sequence(),
            from_node: me.clone(),
            files: Vec::new(),
        };
        let mut reply = v1::ApplyChangeReply {
            applied: true,
            ..Default::default()
        };
        api.replicate_to_members("cluster.toml", msg.sequence, msg, &mut reply)
            .await;
        if !reply.replicated && !reply.replication_pending {
            bail!(
                "the other nodes did not take the cluster.toml without {name}: {}; {name} stays in maintenance: `tandemctl node maintenance disable` takes it back",
                reply.replication_error
            );
        }
        if !reply.replication_error.is_empty() {
            notes.push(format!("not every node has the new cluster.toml yet ({}); cfg-syncd of the new leader {} carries it", reply.replication_error, remaining[0].0));
        }
        p.step(
            "configure",
            format!(
                "cluster.toml without {name} replicated; {} leads the cluster now",
                remaining[0].0
            ),
        )
        .await;
    } else {
        let reply = api
            .apply_change_inner(vec![change])
            .await
            .map_err(|s| anyhow!("{}", s.message()))?;
        if !reply.applied {
            bail!(
                "cluster.toml without {name} was refused: {}; {name} stays in maintenance",
                reply.errors.join("; ")
            );
        }
        if !reply.replication_error.is_empty() {
            notes.push(format!(
                "not every node has the new cluster.toml yet: {}",
                reply.replication_error
            ));
        }
        p.step(
            "configure",
            format!("cluster.toml without {name} applied here and replicated"),
        )
        .await;
    }

    // 3. The others forget its host key.
    let port = ctx.ssh_port;
    if !leaving_self
        && let Err(e) = edit_local_pins(ctx, |old| without_pin(old, node.address, port))
    {
        notes.push(format!("{me}: {e:#}"));
    }
    for (n, addr) in remaining.iter().filter(|(n, _)| *n != me) {
        match session_to(ctx, n, *addr).await {
            Ok(s) => {
                if let Err(e) =
                    edit_remote_pins(ctx, &s, |old| without_pin(old, node.address, port)).await
                {
                    notes.push(format!("{n} still pins {name}'s host key: {e:#}"));
                }
                s.close().await;
            }
            Err(e) => notes.push(format!(
                "{n} still pins {name}'s host key (unreachable: {e})"
            )),
        }
    }

    // 4. It leaves.
    *current = "leave".into();
    if leaving_self {
        leave_local(ctx, &me, public.as_deref()).await?;
        p.step(
            "leave",
            format!("{me} is standalone: its cluster files are removed, its BIRD is shut down"),
        )
        .await;
    } else if let Some(s) = session {
        let r = leave_remote(ctx, &s, &name, public.as_deref()).await;
        s.close().await;
        match r {
            Ok(reloaded) => {
                p.step("leave", format!("{name} is standalone: its cluster files are removed, its BIRD is shut down (reloaded: {reloaded})")).await;
            }
            Err(e) => notes.push(format!(
                "{name} did not leave cleanly: {e:#}; run `tandemctl cluster destroy` on it"
            )),
        }
    }
    let mut message = format!(
        "{name} removed from the cluster ({} nodes: {})",
        remaining.len(),
        remaining
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !notes.is_empty() {
        message.push_str(&format!("; {}", notes.join("; ")));
    }
    tracing::info!(node = %name, "{message}");
    api.shared.event("membership", message.clone());
    Ok(v1::CreateClusterProgress {
        step: "done".into(),
        ok: true,
        message,
        done: true,
        ..Default::default()
    })
}

/// DestroyCluster on an active-active node: on the leader every node
/// leaves (each withdrawn by its BIRD's shutdown); on another node only
/// that node does.
pub async fn destroy(api: &ClusterManagerApi, config: &Config) -> anyhow::Result<String> {
    let ctx = &api.create;
    let me = config.node.name.clone();
    let public = cluster_public(ctx);
    if !active::leads(config) {
        leave_local(ctx, &me, public.as_deref()).await?;
        let leader = config
            .cluster
            .as_ref()
            .and_then(active::leader)
            .map(|n| n.name.clone())
            .unwrap_or_default();
        return Ok(format!(
            "{me} left the active-active cluster and is standalone; the other nodes still list it: run `tandemctl cluster remove-node {me}` on the leader {leader}"
        ));
    }
    let mut left = Vec::new();
    let mut notes = Vec::new();
    for (n, addr) in active::others(config) {
        match session_to(ctx, &n, addr).await {
            Ok(s) => {
                match leave_remote(ctx, &s, &n, public.as_deref()).await {
                    Ok(_) => left.push(n),
                    Err(e) => notes.push(format!("{n}: {e:#}")),
                }
                s.close().await;
            }
            Err(e) => notes.push(format!(
                "{n} was NOT changed ({e}): run `tandemctl cluster destroy` on it"
            )),
        }
    }
    leave_local(ctx, &me, public.as_deref()).await?;
    left.insert(0, me);
    let mut message = format!("{} are standalone again", left.join(", "));
    if !notes.is_empty() {
        message.push_str(&format!("; {}", notes.join("; ")));
    }
    Ok(message)
}

/// A membership change.
pub enum Job {
    Add(v1::AddNodeRequest),
    Remove(v1::RemoveNodeRequest),
}

/// Runs a membership change in a task of its own (it finishes even if the
/// operator's CLI goes away: stopping half-way would leave a node
/// half-joined), its steps streamed; the last message has `done`.
pub fn stream(
    api: ClusterManagerApi,
    job: Job,
) -> std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<v1::CreateClusterProgress, tonic::Status>> + Send>,
> {
    use tokio_stream::StreamExt;
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let p = Progress { tx: tx.clone() };
        let mut current = String::from("request");
        let (what, result) = match job {
            Job::Add(req) => ("add-node", add_node(&api, req, &p, &mut current).await),
            Job::Remove(req) => (
                "remove-node",
                remove_node(&api, req, &p, &mut current).await,
            ),
        };
        let last = match result {
            Ok(last) => last,
            Err(e) => {
                let message = format!("{e:#}");
                tracing::error!(step = %current, "{what} failed: {message}");
                v1::CreateClusterProgress {
                    step: current,
                    ok: false,
                    message,
                    done: true,
                    ..Default::default()
                }
            }
        };
        let _ = tx.send(last).await;
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: &str = "# lb1 leads\nmode = \"active-active\"\n\n[[nodes]]\nname = \"lb1\"\naddress = \"10.2.0.11\"\n\n[[nodes]]\nname = \"lb2\"\naddress = \"10.2.0.12\"\n\n[[nodes]]\nname = \"lb3\"\naddress = \"10.2.0.13\"\n\n[bgp]\nlocal_as = 65010\n\n[[bgp.peers]]\nname = \"tor1\"\naddress = \"10.2.0.1\"\nremote_as = 65000\n\n[[bgp.peers]]\nname = \"tor2\"\naddress = \"10.2.0.2\"\nremote_as = 65000\nnodes = [\"lb2\", \"lb3\"] # the second rack\n";

    fn names(text: &str) -> Vec<String> {
        let c: tandem_config::ClusterConfig = toml::from_str(text).unwrap();
        c.nodes.into_iter().map(|n| n.name).collect()
    }

    #[test]
    fn a_node_is_appended_and_comments_stay() {
        let out = with_node(CLUSTER, "lb4", "10.2.0.14".parse().unwrap()).unwrap();
        assert_eq!(names(&out), ["lb1", "lb2", "lb3", "lb4"]);
        assert!(out.starts_with("# lb1 leads\n"), "{out}");
        assert!(out.contains("# the second rack"), "{out}");
    }

    #[test]
    fn a_node_is_removed_from_the_nodes_and_the_peers_lists() {
        let out = without_node(CLUSTER, "lb2").unwrap();
        assert_eq!(names(&out), ["lb1", "lb3"]);
        let c: tandem_config::ClusterConfig = toml::from_str(&out).unwrap();
        assert_eq!(c.bgp.unwrap().peers[1].nodes, ["lb3"]);
        // tor2 would be left with nobody (an empty list means everyone).
        let e = without_node(&out, "lb3").unwrap_err().to_string();
        assert!(e.contains("BGP peer `tor2` peers with `lb3` only"), "{e}");
        assert!(without_node(CLUSTER, "lb9").is_err());
    }

    #[test]
    fn pins_are_added_once_and_removed_by_address() {
        let known = "10.2.0.12 ssh-ed25519 AAAA2\n10.2.0.13 ssh-ed25519 AAAA3\n";
        let pin = "10.2.0.14 ssh-ed25519 AAAA4\n";
        let with = append_pin(known, pin).unwrap();
        assert_eq!(append_pin(&with, pin), None);
        let without = without_pin(&with, "10.2.0.13".parse().unwrap(), 22).unwrap();
        assert_eq!(
            without,
            "10.2.0.12 ssh-ed25519 AAAA2\n10.2.0.14 ssh-ed25519 AAAA4\n"
        );
        assert_eq!(
            without_pin(&without, "10.2.0.13".parse().unwrap(), 22),
            None
        );
        let other_port = "[10.2.0.13]:2222 ssh-ed25519 AAAA3\n";
        assert_eq!(
            without_pin(other_port, "10.2.0.13".parse().unwrap(), 2222).unwrap(),
            ""
        );
    }
}
