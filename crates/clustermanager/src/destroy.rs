//! `DestroyCluster`: both nodes standalone again. On each node the cluster
//! files go (cluster.toml, ssh/, keys/sync.key, the cluster key's line in
//! root's authorized_keys) and the daemons reload; the farms stay.
//!
//! The node that serves keeps the VIPs: whichever node holds the floating
//! IPs when destroy starts is made standalone last, and once its vrrpd has
//! left the cluster (stepping down removes the VIPs) the floating IPs are
//! added back as plain addresses of their interfaces, so its farms keep
//! answering on them (a gap of a few milliseconds: established connections
//! survive, their conntrack entries stay). The other node is made
//! standalone first, so it never takes the role when the serving node's
//! vrrpd steps down. The peer is reached over SSH with the cluster key; if
//! it is unreachable, this node is made standalone alone and the reply
//! says so.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context as _, anyhow, bail};
use tandem_config::{Config, FloatingIp};
use tandem_proto::v1;
use tandem_ssh::{Auth, HostKeyCheck, SshSession};

use crate::create::CreateContext;
use crate::create::facts::{self as preflight, sh_quote};
use crate::create::files::write_atomic;
use crate::create::keys::remove_key_line;
use crate::create::start::{reload_local, reload_peer, wait_local_vrrp, wait_peer_vrrp};

/// What a node loses when it leaves the cluster (relative to its config dir).
const CLUSTER_FILES: [&str; 3] = ["cluster.toml", "keys/sync.key", "ssh"];

pub async fn destroy_cluster(
    ctx: &CreateContext,
    _req: v1::DestroyClusterRequest,
) -> anyhow::Result<v1::DestroyClusterReply> {
    let config = Config::load(&ctx.config_dir).map_err(|e| {
        anyhow!(
            "this node's configuration is invalid: {}",
            e.iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        )
    })?;
    let me = config.node.name.clone();
    let Some(cluster) = config.cluster.clone() else {
        bail!("{me} is standalone (no cluster.toml): there is no cluster to destroy");
    };
    let peer = cluster
        .nodes
        .iter()
        .find(|n| n.name != me)
        .ok_or_else(|| anyhow!("cluster.toml names no peer of {me}"))?
        .clone();
    let addr = SocketAddr::new(peer.address, cluster.sync.ssh_port);
    let label = format!("{} ({addr})", peer.name);
    let cluster_public = tandem_ssh::load_identity(&ctx.local_path("ssh/id_ed25519"))
        .ok()
        .and_then(|k| k.public_key().to_openssh().ok());
    let floating = cluster.floating_ips.clone();
    let local_holds = holds(
        &preflight::run_local("ip", &["-o", "addr", "show"]).await?,
        &floating,
    );

    let session = SshSession::connect_labelled(
        &label,
        addr,
        "root",
        HostKeyCheck::Pinned {
            known_hosts: ctx.local_path("ssh/known_hosts"),
        },
        Auth::Key(ctx.local_path("ssh/id_ed25519")),
    )
    .await;
    let mut notes = Vec::new();
    let result = match session {
        Ok(ssh) => {
            let peer_holds = holds(
                &ssh.exec_ok("ip -o addr show").await?.stdout_text(),
                &floating,
            );
            // The node that does not serve leaves first.
            let r = if peer_holds && !local_holds {
                leave_local(
                    ctx,
                    &me,
                    cluster_public.as_deref(),
                    &floating,
                    false,
                    &mut notes,
                )
                .await?;
                leave_peer(
                    ctx,
                    &ssh,
                    &peer.name,
                    cluster_public.as_deref(),
                    &floating,
                    true,
                    &mut notes,
                )
                .await
            } else {
                leave_peer(
                    ctx,
                    &ssh,
                    &peer.name,
                    cluster_public.as_deref(),
                    &floating,
                    false,
                    &mut notes,
                )
                .await?;
                leave_local(
                    ctx,
                    &me,
                    cluster_public.as_deref(),
                    &floating,
                    local_holds,
                    &mut notes,
                )
                .await
            };
            ssh.close().await;
            r.map(|()| {
                let keeper = if peer_holds && !local_holds {
                    Some(peer.name.as_str())
                } else if local_holds {
                    Some(me.as_str())
                } else {
                    None
                };
                let vips = match keeper {
                    Some(k) => format!("; {k} keeps the floating IPs"),
                    None => "; neither node held the floating IPs".into(),
                };
                format!("{me} and {} are standalone again{vips}", peer.name)
            })
        }
        Err(e) => {
            tracing::warn!(peer = %label, "cluster destroy: the peer is unreachable, only this node leaves: {e}");
            leave_local(
                ctx,
                &me,
                cluster_public.as_deref(),
                &floating,
                local_holds,
                &mut notes,
            )
            .await?;
            Ok(format!(
                "{me} is standalone again{}; the peer {} was NOT changed ({e}): run `tandemctl cluster destroy` on it too",
                if local_holds {
                    " and keeps the floating IPs"
                } else {
                    ""
                },
                peer.name
            ))
        }
    }?;
    let message = if notes.is_empty() {
        result
    } else {
        format!("{result} ({})", notes.join("; "))
    };
    tracing::info!("cluster destroyed: {message}");
    Ok(v1::DestroyClusterReply { message })
}

/// Whether `ip -o addr show` output holds any of the floating IPs.
fn holds(ip_addr: &str, floating: &[FloatingIp]) -> bool {
    let addrs = preflight::parse_ip_addr(ip_addr);
    floating
        .iter()
        .any(|f| addrs.iter().any(|(_, n)| n.addr == f.address.addr))
}

/// `ip addr replace` arguments of each floating IP.
fn keep_commands(floating: &[FloatingIp]) -> Vec<Vec<String>> {
    floating
        .iter()
        .map(|f| {
            vec![
                "addr".into(),
                "replace".into(),
                f.address.to_string(),
                "dev".into(),
                f.interface.clone(),
            ]
        })
        .collect()
}

async fn leave_local(
    ctx: &CreateContext,
    me: &str,
    cluster_public: Option<&str>,
    floating: &[FloatingIp],
    keep_vips: bool,
    notes: &mut Vec<String>,
) -> anyhow::Result<()> {
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
    if let Some(public) = cluster_public {
        deauthorize_local(&ctx.authorized_keys, public)?;
    }
    let reloaded = reload_local(&ctx.runtime_dir).await;
    tracing::info!("cluster destroy: {me} reloaded: {}", reloaded.join(", "));
    if keep_vips {
        wait_local_vrrp(&ctx.runtime_dir, &[v1::VrrpState::Standalone]).await;
        for args in keep_commands(floating) {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            if let Err(e) = preflight::run_local("ip", &args).await {
                notes.push(format!("{me}: {e:#}"));
            }
        }
    }
    Ok(())
}

async fn leave_peer(
    ctx: &CreateContext,
    ssh: &SshSession,
    name: &str,
    cluster_public: Option<&str>,
    floating: &[FloatingIp],
    keep_vips: bool,
    notes: &mut Vec<String>,
) -> anyhow::Result<()> {
    let targets: Vec<String> = CLUSTER_FILES
        .iter()
        .map(|p| sh_quote(&ctx.peer_path(p).display().to_string()))
        .collect();
    ssh.exec_ok(&format!("rm -rf -- {}", targets.join(" ")))
        .await?;
    if let Some(public) = cluster_public {
        let path = &ctx.peer_authorized_keys;
        if let Some(old) = ssh.read_file(path).await?
            && let Some(new) = remove_key_line(&String::from_utf8_lossy(&old), public)
        {
            ssh.write_file(path, new.as_bytes(), 0o600).await?;
        }
    }
    let reloaded = reload_peer(ssh, &ctx.peer_runtime_dir).await;
    tracing::info!("cluster destroy: {name} reloaded: {}", reloaded.join(", "));
    if keep_vips {
        wait_peer_vrrp(ssh, &ctx.peer_runtime_dir, v1::VrrpState::Standalone).await;
        for args in keep_commands(floating) {
            let cmd = format!(
                "ip {}",
                args.iter()
                    .map(|a| sh_quote(a))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            if let Err(e) = ssh.exec_ok(&cmd).await {
                notes.push(e.to_string());
            }
        }
    }
    Ok(())
}

fn deauthorize_local(path: &Path, public: &str) -> anyhow::Result<()> {
    let old = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    if let Some(new) = remove_key_line(&old, public) {
        write_atomic(path, new.as_bytes(), 0o600)?;
    }
    Ok(())
}
