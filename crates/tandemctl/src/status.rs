//! `tandemctl status` and `tandemctl reload`: one question to each daemon.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use comfy_table::{Table, presets};
use serde::Serialize;
use tandem_proto::DAEMONS;
use tandem_proto::v1::{
    self, NodeHealth, cfg_sync_client::CfgSyncClient, cluster_manager_client::ClusterManagerClient,
    conntrack_sync_client::ConntrackSyncClient, lb_forwarder_client::LbForwarderClient,
    routed_client::RoutedClient, vrrpd_client::VrrpdClient,
};
use tandem_runtime::RuntimeError;
use tonic::transport::Channel;

/// A daemon that does not answer within this is reported as not responding.
const RPC_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Serialize)]
struct DaemonRow {
    daemon: String,
    /// "running", "not running" or "not responding".
    state: String,
    pid: Option<u32>,
    version: Option<String>,
    node: Option<String>,
    config_generation: Option<u64>,
    /// What the daemon says of itself (role, VRRP state, farms ...).
    detail: String,
    /// The last configuration reload error, if the last reload was refused.
    reload_error: Option<String>,
    /// clustermanager's row: the control API's address and the SHA-256
    /// fingerprint of its certificate (for `--remote … --fingerprint`),
    /// when node.toml has `control_listen`.
    #[serde(skip_serializing_if = "Option::is_none")]
    control_api: Option<ControlApi>,
    /// cfg-syncd's row: the SHA-256 over the replicated tree (path, content
    /// hash, size, mode, owner), equal on two nodes whose configurations are
    /// identical.
    #[serde(skip_serializing_if = "Option::is_none")]
    manifest_hash: Option<String>,
}

#[derive(Debug, Serialize)]
struct ControlApi {
    listen: String,
    fingerprint: String,
}

pub async fn run(runtime_dir: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let (rows, node) = if crate::remote::get().is_some() {
        remote_rows(runtime_dir).await?
    } else {
        let mut rows = Vec::with_capacity(DAEMONS.len());
        for daemon in DAEMONS {
            rows.push(query(runtime_dir, daemon).await);
        }
        (rows, crate::cluster::node_status(runtime_dir).await)
    };
    let mut rows = rows;
    if let Some(n) = &node
        && !n.control_listen.is_empty()
        && let Some(r) = rows.iter_mut().find(|r| r.daemon == "clustermanager")
    {
        r.control_api = Some(ControlApi {
            listen: n.control_listen.clone(),
            fingerprint: n.control_fingerprint.clone(),
        });
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!("{}", crate::cluster::summary_line(node.as_ref()));
        print_table(&rows);
        if let Some(c) = rows.iter().find_map(|r| r.control_api.as_ref()) {
            println!(
                "control API on {} (certificate {})",
                c.listen, c.fingerprint
            );
        }
    }
    // A daemon idle in this node's mode (vrrpd and conntrack-syncd in an
    // active-active cluster, routed elsewhere) may be stopped.
    let mode = node.as_ref().map(|n| n.mode.clone()).unwrap_or_default();
    let all_running = rows
        .iter()
        .all(|r| r.state == "running" || !tandem_proto::needed_in(&r.daemon, &mode));
    Ok(ExitCode::from(exit_code(
        all_running,
        node.map(|n| n.health()),
    )))
}

/// The remote node's daemons, as its clustermanager reads them
/// (DaemonStatuses over the control API).
async fn remote_rows(
    runtime_dir: &Path,
) -> anyhow::Result<(Vec<DaemonRow>, Option<v1::ClusterManagerStatus>)> {
    use v1::daemon_status_entry::Status as S;
    let reply = crate::remote::cluster_manager(runtime_dir)
        .await?
        .daemon_statuses(v1::DaemonStatusesRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    let mut node = None;
    let rows = reply
        .daemons
        .into_iter()
        .map(|d| {
            let manifest_hash = match &d.status {
                Some(S::CfgSync(s)) if !s.manifest_hash.is_empty() => Some(s.manifest_hash.clone()),
                _ => None,
            };
            let (info, detail) = match d.status {
                Some(S::ClusterManager(s)) => {
                    let detail = format!(
                        "role {}: {}",
                        lower(s.role().as_str_name(), "NODE_ROLE_"),
                        s.message
                    );
                    let info = s.daemon.clone();
                    node = Some(s);
                    (info, detail)
                }
                Some(S::Vrrpd(s)) => {
                    let detail = format!(
                        "{}: {}",
                        lower(s.state().as_str_name(), "VRRP_STATE_"),
                        s.reason
                    );
                    (s.daemon, detail)
                }
                Some(S::LbForwarder(s)) => {
                    let datapath = if s.datapath_loaded {
                        "loaded"
                    } else {
                        "not loaded"
                    };
                    let detail = format!(
                        "{} farms, {} backends, datapath {datapath}",
                        s.farms, s.backends
                    );
                    (s.daemon, detail)
                }
                Some(S::ConntrackSync(s)) => {
                    let detail = format!(
                        "role {}, peer {}",
                        lower(s.role().as_str_name(), "SYNC_ROLE_"),
                        or_none(&s.peer)
                    );
                    (s.daemon, detail)
                }
                Some(S::CfgSync(s)) => {
                    let detail = format!(
                        "direction {}, peer {}",
                        lower(s.direction().as_str_name(), "SYNC_DIRECTION_"),
                        or_none(&s.peer)
                    );
                    (s.daemon, detail)
                }
                None => (None, d.error.clone()),
            };
            DaemonRow {
                daemon: d.daemon,
                state: d.state,
                pid: info.as_ref().map(|i| i.pid),
                version: info.as_ref().map(|i| i.version.clone()),
                node: info.as_ref().map(|i| i.node_name.clone()),
                config_generation: info.as_ref().map(|i| i.config_generation),
                detail,
                reload_error: info.map(|i| i.last_reload_error).filter(|e| !e.is_empty()),
                control_api: None,
                manifest_hash,
            }
        })
        .collect();
    Ok((rows, node))
}

fn lower(name: &str, prefix: &str) -> String {
    name.trim_start_matches(prefix).to_lowercase()
}

fn or_none(s: &str) -> String {
    if s.is_empty() {
        "none".to_owned()
    } else {
        s.to_owned()
    }
}

/// `tandemctl status`'s exit status: 3 a daemon is not running, 4 this node
/// is red (failure), 5 yellow (degraded); 0 green, or orange (maintenance,
/// the operator's choice).
pub fn exit_code(all_running: bool, health: Option<NodeHealth>) -> u8 {
    match (all_running, health) {
        (false, _) => 3,
        (true, Some(NodeHealth::Failure)) => 4,
        (true, Some(NodeHealth::Degraded)) => 5,
        _ => 0,
    }
}

fn print_table(rows: &[DaemonRow]) {
    let mut table = Table::new();
    table.load_style(presets::UTF8_FULL_CONDENSED);
    table.set_header(["DAEMON", "STATE", "PID", "VERSION", "CONFIG", "DETAIL"]);
    for r in rows {
        let mut detail = r.detail.clone();
        if let Some(e) = &r.reload_error {
            detail.push_str(&format!(" (last reload refused: {e})"));
        }
        table.add_row([
            r.daemon.clone(),
            r.state.clone(),
            r.pid.map(|p| p.to_string()).unwrap_or_default(),
            r.version.clone().unwrap_or_default(),
            r.config_generation
                .map(|g| format!("gen {g}"))
                .unwrap_or_default(),
            detail,
        ]);
    }
    println!("{table}");
}

async fn query(runtime_dir: &Path, daemon: &str) -> DaemonRow {
    let mut row = DaemonRow {
        daemon: daemon.to_owned(),
        state: "not running".into(),
        pid: None,
        version: None,
        node: None,
        config_generation: None,
        detail: String::new(),
        reload_error: None,
        control_api: None,
        manifest_hash: None,
    };
    let channel = match tandem_runtime::connect(runtime_dir, daemon).await {
        Ok(c) => c,
        Err(RuntimeError::NotRunning { path, .. }) => {
            row.detail = format!("no daemon listening on {}", path.display());
            return row;
        }
        Err(e) => {
            row.detail = e.to_string();
            return row;
        }
    };
    match tokio::time::timeout(RPC_TIMEOUT, status_of(daemon, channel)).await {
        Ok(Ok((info, detail, manifest_hash))) => {
            row.manifest_hash = manifest_hash;
            row.state = "running".into();
            row.pid = Some(info.pid);
            row.version = Some(info.version);
            row.node = Some(info.node_name);
            row.config_generation = Some(info.config_generation);
            row.reload_error = Some(info.last_reload_error).filter(|e| !e.is_empty());
            row.detail = detail;
        }
        Ok(Err(e)) => {
            row.state = "not responding".into();
            row.detail = e.to_string();
        }
        Err(_) => {
            row.state = "not responding".into();
            row.detail = format!("no answer within {} s", RPC_TIMEOUT.as_secs());
        }
    }
    row
}

/// Calls the daemon's Status RPC; returns its identity, a one-line summary
/// and, for cfg-syncd, its manifest hash.
async fn status_of(
    daemon: &str,
    ch: Channel,
) -> anyhow::Result<(v1::DaemonInfo, String, Option<String>)> {
    let mut manifest_hash = None;
    let (info, detail) = match daemon {
        "clustermanager" => {
            let s = ClusterManagerClient::new(ch)
                .status(v1::StatusRequest {})
                .await?
                .into_inner();
            let role = s
                .role()
                .as_str_name()
                .trim_start_matches("NODE_ROLE_")
                .to_lowercase();
            (s.daemon, format!("role {role}: {}", s.message))
        }
        "vrrpd" => {
            let s = VrrpdClient::new(ch)
                .status(v1::StatusRequest {})
                .await?
                .into_inner();
            let state = s
                .state()
                .as_str_name()
                .trim_start_matches("VRRP_STATE_")
                .to_lowercase();
            (s.daemon, format!("{state}: {}", s.reason))
        }
        "lb-forwarder" => {
            let s = LbForwarderClient::new(ch)
                .status(v1::StatusRequest {})
                .await?
                .into_inner();
            let datapath = if s.datapath_loaded {
                "loaded"
            } else {
                "not loaded"
            };
            (
                s.daemon,
                format!(
                    "{} farms, {} backends, datapath {datapath}",
                    s.farms, s.backends
                ),
            )
        }
        "conntrack-syncd" => {
            let s = ConntrackSyncClient::new(ch)
                .status(v1::StatusRequest {})
                .await?
                .into_inner();
            let role = s
                .role()
                .as_str_name()
                .trim_start_matches("SYNC_ROLE_")
                .to_lowercase();
            let peer = if s.peer.is_empty() {
                "none".to_owned()
            } else {
                s.peer.clone()
            };
            (s.daemon, format!("role {role}, peer {peer}"))
        }
        "cfg-syncd" => {
            let s = CfgSyncClient::new(ch)
                .status(v1::StatusRequest {})
                .await?
                .into_inner();
            let dir = s
                .direction()
                .as_str_name()
                .trim_start_matches("SYNC_DIRECTION_")
                .to_lowercase();
            let peer = if s.peer.is_empty() {
                "none".to_owned()
            } else {
                s.peer.clone()
            };
            manifest_hash = Some(s.manifest_hash.clone()).filter(|h| !h.is_empty());
            (s.daemon, format!("direction {dir}, peer {peer}"))
        }
        "routed" => {
            let s = RoutedClient::new(ch)
                .status(v1::StatusRequest {})
                .await?
                .into_inner();
            let detail = if s.mode != "active-active" {
                format!("{}: nothing to announce", s.mode)
            } else {
                format!(
                    "{}/{} VIPs announced, {}/{} BGP sessions established{}",
                    s.vips.iter().filter(|v| v.announced).count(),
                    s.vips.len(),
                    s.sessions.iter().filter(|x| x.established).count(),
                    s.sessions.len(),
                    if s.maintenance { ", maintenance" } else { "" }
                )
            };
            (s.daemon, detail)
        }
        other => bail!("unknown daemon `{other}`"),
    };
    let info = info.ok_or_else(|| anyhow::anyhow!("{daemon} answered without its identity"))?;
    Ok((info, detail, manifest_hash))
}

pub async fn reload(runtime_dir: &Path, only: Option<&str>) -> anyhow::Result<ExitCode> {
    if let Some(name) = only
        && !DAEMONS.contains(&name)
    {
        bail!(
            "unknown daemon `{name}`; the daemons are {}",
            DAEMONS.join(", ")
        );
    }
    if let Some(r) = crate::remote::get() {
        if only.is_some_and(|o| o != "clustermanager") {
            bail!(
                "over --remote {} only clustermanager reloads (`tandemctl reload clustermanager`); it reloads node.toml and the replicated files",
                r.address
            );
        }
        let reply = crate::remote::cluster_manager(runtime_dir)
            .await?
            .reload(v1::ReloadRequest {})
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?
            .into_inner();
        return Ok(print_reload("clustermanager", &reply));
    }
    let mut failed = false;
    let mut reached = 0;
    for daemon in DAEMONS.iter().filter(|d| only.is_none_or(|o| o == **d)) {
        let channel = match tandem_runtime::connect(runtime_dir, daemon).await {
            Ok(c) => c,
            Err(RuntimeError::NotRunning { .. }) if only.is_none() => continue,
            Err(e) => {
                println!("{daemon}: {e}");
                failed = true;
                continue;
            }
        };
        reached += 1;
        let req = v1::ReloadRequest {};
        let reply = match *daemon {
            "clustermanager" => ClusterManagerClient::new(channel).reload(req).await,
            "vrrpd" => VrrpdClient::new(channel).reload(req).await,
            "lb-forwarder" => LbForwarderClient::new(channel).reload(req).await,
            "conntrack-syncd" => ConntrackSyncClient::new(channel).reload(req).await,
            "cfg-syncd" => CfgSyncClient::new(channel).reload(req).await,
            other => bail!("unknown daemon `{other}`"),
        };
        match reply.map(tonic::Response::into_inner) {
            Ok(r) => {
                if print_reload(daemon, &r) != ExitCode::SUCCESS {
                    failed = true;
                }
            }
            Err(e) => {
                failed = true;
                println!("{daemon}: {}", e.message());
            }
        }
    }
    if reached == 0 && !failed {
        bail!(
            "no daemon is running (no socket answers in {}): start them with `systemctl start tandem.target`, or give --runtime-dir",
            runtime_dir.display()
        );
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn print_reload(daemon: &str, r: &v1::ReloadReply) -> ExitCode {
    if r.applied {
        println!("{daemon}: reloaded (config gen {})", r.config_generation);
        ExitCode::SUCCESS
    } else {
        println!("{daemon}: reload refused, previous configuration stays in force:");
        for e in &r.errors {
            println!("  {e}");
        }
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exit_status_says_how_the_node_is() {
        assert_eq!(exit_code(true, Some(NodeHealth::Operational)), 0);
        assert_eq!(exit_code(true, Some(NodeHealth::Maintenance)), 0);
        assert_eq!(exit_code(true, Some(NodeHealth::Failure)), 4);
        assert_eq!(exit_code(true, Some(NodeHealth::Degraded)), 5);
        assert_eq!(exit_code(false, Some(NodeHealth::Operational)), 3);
        assert_eq!(exit_code(false, None), 3);
    }
}
