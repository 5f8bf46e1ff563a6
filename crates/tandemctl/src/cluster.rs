//! `tandemctl cluster show|nodes|edit`, `tandemctl node maintenance` and
//! the farm changes that go through clustermanager's ApplyChange (so the
//! backup receives them at once and a change on the backup is refused).

use std::io::IsTerminal;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use comfy_table::{Table, presets};
use serde::Serialize;
use tandem_proto::v1::{self, NodeHealth, NodeRole};

async fn client(runtime_dir: &Path) -> anyhow::Result<crate::remote::Cm> {
    crate::remote::cluster_manager(runtime_dir).await
}

/// A gRPC error as the operator reads it: the server's message.
fn rpc(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", s.message())
}

pub fn role_word(r: NodeRole) -> &'static str {
    match r {
        NodeRole::Master => "master",
        NodeRole::Backup => "backup",
        NodeRole::Maintenance => "maintenance",
        NodeRole::Standalone => "standalone",
        NodeRole::Unspecified => "unknown",
    }
}

pub fn health_words(h: NodeHealth) -> (&'static str, &'static str) {
    match h {
        NodeHealth::Operational => ("green", "operational"),
        NodeHealth::Maintenance => ("orange", "maintenance"),
        NodeHealth::Unreachable => ("grey", "unreachable"),
        NodeHealth::Failure => ("red", "failure"),
        NodeHealth::Degraded => ("yellow", "degraded"),
        NodeHealth::Unspecified => ("grey", "unknown"),
    }
}

/// `● green operational`, the dot coloured when printing to a terminal.
pub fn health_badge(h: NodeHealth) -> String {
    let (colour, word) = health_words(h);
    if !std::io::stdout().is_terminal() {
        return format!("● {colour} {word}");
    }
    let code = match h {
        NodeHealth::Operational => "32",
        NodeHealth::Maintenance => "33",
        NodeHealth::Failure => "31",
        NodeHealth::Degraded => "93",
        _ => "90",
    };
    format!("\x1b[{code}m●\x1b[0m {colour} {word}")
}

#[derive(Serialize)]
struct NodeRow {
    node: String,
    local: bool,
    role: String,
    /// When an unreachable node was last heard (Unix ms).
    #[serde(skip_serializing_if = "Option::is_none")]
    last_seen_unix_ms: Option<i64>,
    address: String,
    hostname: String,
    status: String,
    health: String,
    message: String,
}

/// The ROLE column: an unreachable node's role is the last one heard, with
/// its age (`unreachable, master 42 s ago`), or `unreachable` if never heard.
pub fn row_role(n: &v1::NodeEntry, now_ms: i64) -> String {
    if n.health() != NodeHealth::Unreachable {
        return role_word(n.role()).to_owned();
    }
    if n.role() == NodeRole::Unspecified || n.last_seen_unix_ms <= 0 {
        return "unreachable".to_owned();
    }
    let age = (now_ms - n.last_seen_unix_ms).max(0) / 1000;
    let age = match age {
        a if a < 120 => format!("{a} s"),
        a if a < 7200 => format!("{} min", a / 60),
        a => format!("{} h", a / 3600),
    };
    format!("unreachable (was {} {age} ago)", role_word(n.role()))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn node_rows(t: &v1::NodeTable) -> Vec<NodeRow> {
    t.nodes
        .iter()
        .map(|n| {
            let (colour, word) = health_words(n.health());
            NodeRow {
                node: n.name.clone(),
                local: n.local,
                role: row_role(n, now_ms()),
                last_seen_unix_ms: (n.last_seen_unix_ms > 0).then_some(n.last_seen_unix_ms),
                address: n.address.clone(),
                hostname: n.hostname.clone(),
                status: colour.into(),
                health: word.into(),
                message: n.message.clone(),
            }
        })
        .collect()
}

fn print_nodes(t: &v1::NodeTable, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&node_rows(t))?);
        return Ok(());
    }
    let mut table = Table::new();
    table.load_style(presets::UTF8_FULL_CONDENSED);
    table.set_header(["NODE", "", "ROLE", "IP", "HOSTNAME", "STATUS", "MESSAGE"]);
    for n in &t.nodes {
        table.add_row([
            n.name.clone(),
            if n.local { "local" } else { "remote" }.to_owned(),
            row_role(n, now_ms()),
            n.address.clone(),
            n.hostname.clone(),
            health_badge(n.health()),
            n.message.clone(),
        ]);
    }
    println!("{table}");
    Ok(())
}

pub async fn nodes(runtime_dir: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let t = client(runtime_dir)
        .await?
        .list_nodes(v1::ListNodesRequest {})
        .await
        .map_err(rpc)?
        .into_inner();
    print_nodes(&t, json)?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct ClusterView {
    clustered: bool,
    virtual_router_id: u32,
    interface: String,
    failback: String,
    check_interval_ms: u32,
    tracked_interfaces: Vec<String>,
    floating_ips: Vec<FloatingView>,
}

#[derive(Serialize)]
struct FloatingView {
    address: String,
    interface: String,
}

fn print_cluster(c: &v1::ClusterInfo, json: bool) -> anyhow::Result<()> {
    if json {
        let view = ClusterView {
            clustered: c.clustered,
            virtual_router_id: c.virtual_router_id,
            interface: c.interface.clone(),
            failback: c.failback.clone(),
            check_interval_ms: c.check_interval_ms,
            tracked_interfaces: c.tracked_interfaces.clone(),
            floating_ips: c
                .floating_ips
                .iter()
                .map(|f| FloatingView {
                    address: f.address.clone(),
                    interface: f.interface.clone(),
                })
                .collect(),
        };
        println!("{}", serde_json::to_string_pretty(&view)?);
        return Ok(());
    }
    if !c.clustered {
        println!("standalone node (no cluster.toml)");
        return Ok(());
    }
    let tracked = if c.tracked_interfaces.is_empty() {
        "none".to_owned()
    } else {
        c.tracked_interfaces.join(", ")
    };
    println!("interface:          {}", c.interface);
    println!("virtual router id:  {}", c.virtual_router_id);
    println!("failback:           {}", c.failback);
    println!("check interval:     {} ms", c.check_interval_ms);
    println!("tracked interfaces: {tracked}");
    println!("floating IPs:");
    for f in &c.floating_ips {
        println!("  {} dev {}", f.address, f.interface);
    }
    Ok(())
}

pub async fn show(runtime_dir: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let c = client(runtime_dir)
        .await?
        .show_cluster(v1::ShowClusterRequest {})
        .await
        .map_err(rpc)?
        .into_inner();
    print_cluster(&c, json)?;
    Ok(ExitCode::SUCCESS)
}

pub async fn edit(
    runtime_dir: &Path,
    failback: Option<String>,
    check_interval_ms: Option<u32>,
    tracked: Option<String>,
) -> anyhow::Result<ExitCode> {
    if failback.is_none() && check_interval_ms.is_none() && tracked.is_none() {
        bail!("nothing to change: give --failback, --check-interval or --tracked");
    }
    let tracked_list: Vec<String> = tracked
        .as_deref()
        .map(|t| {
            t.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let c = client(runtime_dir)
        .await?
        .edit_cluster(v1::EditClusterRequest {
            failback,
            check_interval_ms,
            set_tracked_interfaces: tracked.is_some(),
            tracked_interfaces: tracked_list,
        })
        .await
        .map_err(rpc)?
        .into_inner();
    if c.replication_pending {
        println!(
            "cluster.toml: applied here, will be replicated when the peer returns ({})",
            c.replication_error
        );
    } else {
        println!("cluster.toml changed and replicated to the peer");
    }
    print_cluster(&c, false)?;
    Ok(ExitCode::SUCCESS)
}

pub async fn maintenance(
    runtime_dir: &Path,
    enabled: bool,
    node: Option<String>,
) -> anyhow::Result<ExitCode> {
    let t = client(runtime_dir)
        .await?
        .set_node_maintenance(v1::SetNodeMaintenanceRequest {
            node: node.unwrap_or_default(),
            enabled,
        })
        .await
        .map_err(rpc)?
        .into_inner();
    print_nodes(&t, false)?;
    Ok(ExitCode::SUCCESS)
}

/// Exit status of a change applied here whose replication the peer
/// refused (it answered, and said no): the message says why.
pub const EXIT_PEER_REFUSED: u8 = 4;

/// Reports ApplyChange's answer for `what`; the exit status:
/// 0 applied (replicated, or pending because the peer cannot be reached:
/// it is replicated when the peer returns), 1 refused (nothing changed) or
/// a local daemon refused the new configuration, 4 applied here but the
/// peer refused it.
pub fn report_apply(what: &str, r: &v1::ApplyChangeReply) -> ExitCode {
    if !r.applied {
        eprintln!("{what}: refused, nothing changed:");
        for e in &r.errors {
            eprintln!("  {e}");
        }
        return ExitCode::FAILURE;
    }
    for e in &r.errors {
        eprintln!("warning: {e}");
    }
    let code = if r.replicated {
        println!("{what}: applied and replicated to the peer");
        0
    } else if r.replication_pending {
        println!(
            "{what}: applied here, will be replicated when the peer returns ({})",
            r.replication_error
        );
        0
    } else if !r.replication_error.is_empty() {
        println!(
            "{what}: applied here; NOT replicated: {}",
            r.replication_error
        );
        EXIT_PEER_REFUSED
    } else {
        println!("{what}: applied");
        0
    };
    if r.errors.is_empty() {
        ExitCode::from(code)
    } else {
        ExitCode::FAILURE
    }
}

/// Sends one change — a file written or deleted, or several at once — to
/// ApplyChange and reports it.
pub async fn apply_files(
    runtime_dir: &Path,
    what: &str,
    files: Vec<v1::FileChange>,
) -> anyhow::Result<ExitCode> {
    let change = match <[v1::FileChange; 1]>::try_from(files) {
        Ok([one]) => v1::ConfigChange {
            path: one.path,
            content: one.content,
            ..Default::default()
        },
        Err(files) => v1::ConfigChange {
            files,
            ..Default::default()
        },
    };
    let r = client(runtime_dir)
        .await?
        .apply_change(change)
        .await
        .map_err(rpc)?
        .into_inner();
    Ok(report_apply(what, &r))
}

/// Sends one change through ApplyChange and reports it.
async fn apply(
    runtime_dir: &Path,
    path: String,
    content: Option<Vec<u8>>,
) -> anyhow::Result<ExitCode> {
    apply_files(
        runtime_dir,
        &path.clone(),
        vec![v1::FileChange { path, content }],
    )
    .await
}

/// The farm's name in a farm file (the file must be `farms/<name>.toml`).
fn farm_name(text: &str, file: &Path) -> anyhow::Result<String> {
    let t: toml::Table = text
        .parse()
        .with_context(|| format!("{} is not valid TOML", file.display()))?;
    t.get("name")
        .and_then(toml::Value::as_str)
        .map(str::to_owned)
        .with_context(|| format!("{}: no `name = \"...\"` in the farm", file.display()))
}

/// Whether `path` (farms/NAME.toml) exists: here, or with --remote on
/// the remote node.
async fn farm_exists(config_dir: &Path, runtime_dir: &Path, path: &str) -> anyhow::Result<bool> {
    Ok(match crate::remote::config_files(runtime_dir).await? {
        Some(files) => files.iter().any(|(p, _)| p == path),
        None => config_dir.join(path).exists(),
    })
}

/// `farm add FILE` (`must_exist` false) or `farm edit FILE` (true).
pub async fn farm_put(
    config_dir: &Path,
    runtime_dir: &Path,
    file: &Path,
    must_exist: bool,
) -> anyhow::Result<ExitCode> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let name = farm_name(&text, file)?;
    let path = format!("{}/{name}.toml", tandem_config::FARMS_DIR);
    let exists = farm_exists(config_dir, runtime_dir, &path).await?;
    if must_exist && !exists {
        bail!("farm `{name}` does not exist; use `tandemctl farm add`");
    }
    if !must_exist && exists {
        bail!("farm `{name}` exists already; use `tandemctl farm edit`");
    }
    apply(runtime_dir, path, Some(text.into_bytes())).await
}

pub async fn farm_delete(
    config_dir: &Path,
    runtime_dir: &Path,
    name: &str,
) -> anyhow::Result<ExitCode> {
    let path = format!("{}/{name}.toml", tandem_config::FARMS_DIR);
    if !farm_exists(config_dir, runtime_dir, &path).await? {
        bail!("farm `{name}` does not exist; `tandemctl farm list` shows the farms");
    }
    apply(runtime_dir, path, None).await
}

/// This node's clustermanager Status (5 s timeout), None when it does not
/// answer.
pub async fn node_status(runtime_dir: &Path) -> Option<v1::ClusterManagerStatus> {
    let status = async {
        client(runtime_dir)
            .await?
            .status(v1::StatusRequest {})
            .await
            .map_err(rpc)
            .map(tonic::Response::into_inner)
    };
    match tokio::time::timeout(std::time::Duration::from_secs(5), status).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(_)) | Err(_) => None,
    }
}

/// The first line of `tandemctl status`: `lb1: ● green operational, master`.
pub fn summary_line(status: Option<&v1::ClusterManagerStatus>) -> String {
    match status {
        Some(s) => {
            let node = s
                .daemon
                .as_ref()
                .map(|d| d.node_name.clone())
                .unwrap_or_default();
            let mut line = format!(
                "{node}: {}, {}",
                health_badge(s.health()),
                role_word(s.role())
            );
            if s.health() != NodeHealth::Operational && !s.message.is_empty() {
                line.push_str(&format!(" ({})", s.message));
            }
            line
        }
        // The table below says why (not running, not responding).
        None => format!(
            "this node: {}, role unknown (no answer from clustermanager)",
            health_badge(NodeHealth::Unspecified)
        ),
    }
}

#[cfg(test)]
mod role_tests {
    use super::*;

    #[test]
    fn an_unreachable_node_shows_its_last_role_and_age() {
        let mut n = v1::NodeEntry {
            name: "lb2".into(),
            ..Default::default()
        };
        n.set_role(NodeRole::Backup);
        n.set_health(NodeHealth::Operational);
        assert_eq!(row_role(&n, 0), "backup");
        n.set_health(NodeHealth::Unreachable);
        n.last_seen_unix_ms = 1_000_000;
        assert_eq!(row_role(&n, 1_042_000), "unreachable (was backup 42 s ago)");
        assert_eq!(
            row_role(&n, 1_000_000 + 600_000),
            "unreachable (was backup 10 min ago)"
        );
        // Never heard: no role to claim.
        n.set_role(NodeRole::Unspecified);
        n.last_seen_unix_ms = 0;
        assert_eq!(row_role(&n, 5), "unreachable");
    }
}
