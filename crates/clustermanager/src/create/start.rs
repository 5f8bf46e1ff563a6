//! Step 6, **start**: this node's daemons reload and its vrrpd becomes
//! master first (the peer, which does not preempt, must not take the role),
//! then the peer's daemons reload, its start command runs, and the peer's
//! vrrpd is expected as backup. The reload and wait helpers serve cluster
//! destroy too.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::bail;
use tandem_proto::v1;
use tandem_ssh::SshSession;

use super::preflight::Prepared;
use super::undo::Undo;
use super::{CreateContext, DAEMONS, Progress};

/// How long a vrrpd may take to reach the expected state after a reload
/// (Master_Down_Interval is ~3.2 advert intervals; 1 s adverts by default).
const ROLE_TIMEOUT: Duration = Duration::from_secs(15);

/// Starts the pair; the final message of a successful creation.
pub(super) async fn start(
    ctx: &CreateContext,
    ssh: &SshSession,
    pre: &Prepared,
    p: &Progress,
    undo: &mut Undo,
) -> anyhow::Result<String> {
    let (local, peer) = (&pre.local, &pre.peer);
    undo.local_reloaded = true;
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
    undo.peer_reloaded = true;
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
    Ok(message)
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
