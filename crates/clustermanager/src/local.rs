//! The local daemons, as clustermanager sees them: their Status (with a
//! short timeout, so one stuck daemon cannot stall the node table), Reload,
//! and the orchestration RPCs (vrrpd maintenance, conntrack-syncd's role,
//! cfg-syncd's direction).

use std::path::Path;
use std::time::Duration;

use tandem_proto::v1::{
    self, cfg_sync_client::CfgSyncClient, conntrack_sync_client::ConntrackSyncClient,
    lb_forwarder_client::LbForwarderClient, vrrpd_client::VrrpdClient,
};
use tandem_runtime::{ConfigCell, RuntimeError};
use tonic::transport::Channel;

/// A daemon that does not answer within this is "not responding".
pub const RPC_TIMEOUT: Duration = Duration::from_secs(2);

/// The daemons clustermanager conducts (itself excluded).
pub const CONDUCTED: [&str; 4] = ["vrrpd", "lb-forwarder", "conntrack-syncd", "cfg-syncd"];

/// What asking one daemon gave.
#[derive(Debug, Clone)]
pub enum Probe<T> {
    Running(T),
    NotRunning,
    /// Connected but the call failed or timed out: why.
    Failed(String),
}

impl<T> Probe<T> {
    pub fn running(&self) -> Option<&T> {
        match self {
            Probe::Running(t) => Some(t),
            _ => None,
        }
    }
}

/// The Status of every conducted daemon, taken at one moment.
#[derive(Debug, Clone)]
pub struct LocalStatuses {
    pub vrrpd: Probe<v1::VrrpStatus>,
    pub forwarder: Probe<v1::LbForwarderStatus>,
    pub conntrack: Probe<v1::ConntrackSyncStatus>,
    pub cfgsync: Probe<v1::CfgSyncStatus>,
}

async fn channel(runtime_dir: &Path, daemon: &str) -> Result<Channel, Probe<()>> {
    match tandem_runtime::connect(runtime_dir, daemon).await {
        Ok(c) => Ok(c),
        Err(RuntimeError::NotRunning { .. }) => Err(Probe::NotRunning),
        Err(e) => Err(Probe::Failed(e.to_string())),
    }
}

async fn probe<T, F, Fut>(runtime_dir: &Path, daemon: &str, call: F) -> Probe<T>
where
    F: FnOnce(Channel) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let ch = match channel(runtime_dir, daemon).await {
        Ok(c) => c,
        Err(Probe::NotRunning) => return Probe::NotRunning,
        Err(Probe::Failed(e)) => return Probe::Failed(e),
        Err(Probe::Running(())) => return Probe::Failed("unreachable".into()),
    };
    match tokio::time::timeout(RPC_TIMEOUT, call(ch)).await {
        Ok(Ok(r)) => Probe::Running(r.into_inner()),
        Ok(Err(s)) => Probe::Failed(format!("{}: {}", s.code(), s.message())),
        Err(_) => Probe::Failed(format!("no answer within {} s", RPC_TIMEOUT.as_secs())),
    }
}

pub async fn vrrpd_status(runtime_dir: &Path) -> Probe<v1::VrrpStatus> {
    probe(runtime_dir, "vrrpd", |ch| async move {
        VrrpdClient::new(ch).status(v1::StatusRequest {}).await
    })
    .await
}

pub async fn cfgsync_status(runtime_dir: &Path) -> Probe<v1::CfgSyncStatus> {
    probe(runtime_dir, "cfg-syncd", |ch| async move {
        CfgSyncClient::new(ch).status(v1::StatusRequest {}).await
    })
    .await
}

pub async fn conntrack_status(runtime_dir: &Path) -> Probe<v1::ConntrackSyncStatus> {
    probe(runtime_dir, "conntrack-syncd", |ch| async move {
        ConntrackSyncClient::new(ch)
            .status(v1::StatusRequest {})
            .await
    })
    .await
}

/// Every conducted daemon's Status, asked concurrently.
pub async fn statuses(runtime_dir: &Path) -> LocalStatuses {
    let (vrrpd, forwarder, conntrack, cfgsync) = tokio::join!(
        vrrpd_status(runtime_dir),
        probe(runtime_dir, "lb-forwarder", |ch| async move {
            LbForwarderClient::new(ch)
                .status(v1::StatusRequest {})
                .await
        }),
        conntrack_status(runtime_dir),
        cfgsync_status(runtime_dir),
    );
    LocalStatuses {
        vrrpd,
        forwarder,
        conntrack,
        cfgsync,
    }
}

/// The outcome of asking this node's daemons to reload.
#[derive(Debug, Default)]
pub struct Reloaded {
    pub reloaded: Vec<String>,
    /// "<daemon>: why", one per daemon that refused or failed.
    pub errors: Vec<String>,
}

/// Asks clustermanager's own configuration and every running conducted
/// daemon to reload; a daemon that is not running is skipped (it reads the
/// files when it starts).
pub async fn reload_all(runtime_dir: &Path, own: &ConfigCell) -> Reloaded {
    let mut out = Reloaded::default();
    let mut record = |daemon: &str, r: Result<v1::ReloadReply, String>| match r {
        Ok(r) if r.applied => out.reloaded.push(daemon.to_owned()),
        Ok(r) => out
            .errors
            .push(format!("{daemon}: reload refused: {}", r.errors.join("; "))),
        Err(e) => out.errors.push(format!("{daemon}: {e}")),
    };
    record("clustermanager", Ok(own.reload().into()));
    for daemon in CONDUCTED {
        let ch = match channel(runtime_dir, daemon).await {
            Ok(c) => c,
            Err(Probe::NotRunning) => continue,
            Err(Probe::Failed(e)) => {
                record(daemon, Err(e));
                continue;
            }
            Err(Probe::Running(())) => continue,
        };
        let req = v1::ReloadRequest {};
        let call = async {
            match daemon {
                "vrrpd" => VrrpdClient::new(ch).reload(req).await,
                "lb-forwarder" => LbForwarderClient::new(ch).reload(req).await,
                "conntrack-syncd" => ConntrackSyncClient::new(ch).reload(req).await,
                _ => CfgSyncClient::new(ch).reload(req).await,
            }
        };
        let r = match tokio::time::timeout(RPC_TIMEOUT * 5, call).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(s.message().to_owned()),
            Err(_) => Err("no answer to Reload within 10 s".into()),
        };
        record(daemon, r);
    }
    out
}

async fn connect_to(runtime_dir: &Path, daemon: &str) -> Result<Channel, String> {
    match channel(runtime_dir, daemon).await {
        Ok(c) => Ok(c),
        Err(Probe::NotRunning) => Err(format!("{daemon} is not running")),
        Err(Probe::Failed(e)) => Err(format!("{daemon}: {e}")),
        Err(Probe::Running(())) => Err(format!("{daemon} unreachable")),
    }
}

fn rpc_error(daemon: &str, s: tonic::Status) -> String {
    format!("{daemon}: {}", s.message())
}

/// vrrpd's SetMaintenance; returns once the router is in (or out of)
/// maintenance.
pub async fn set_maintenance(runtime_dir: &Path, enabled: bool) -> Result<v1::VrrpStatus, String> {
    set_vrrpd_maintenance(runtime_dir, enabled, false).await
}

/// The failback gate's hold: like [`set_maintenance`], but not persisted by
/// vrrpd and kept apart from the operator's maintenance.
pub async fn set_maintenance_hold(
    runtime_dir: &Path,
    enabled: bool,
) -> Result<v1::VrrpStatus, String> {
    set_vrrpd_maintenance(runtime_dir, enabled, true).await
}

async fn set_vrrpd_maintenance(
    runtime_dir: &Path,
    enabled: bool,
    transient: bool,
) -> Result<v1::VrrpStatus, String> {
    let ch = connect_to(runtime_dir, "vrrpd").await?;
    VrrpdClient::new(ch)
        .set_maintenance(v1::SetMaintenanceRequest { enabled, transient })
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| rpc_error("vrrpd", s))
}

pub async fn set_conntrack_role(runtime_dir: &Path, role: v1::SyncRole) -> Result<(), String> {
    let ch = connect_to(runtime_dir, "conntrack-syncd").await?;
    let mut client = ConntrackSyncClient::new(ch);
    let call = client.set_role(v1::SetSyncRoleRequest { role: role.into() });
    match tokio::time::timeout(RPC_TIMEOUT, call).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(s)) => Err(rpc_error("conntrack-syncd", s)),
        Err(_) => Err("conntrack-syncd: no answer to SetRole".into()),
    }
}

pub async fn set_cfg_direction(
    runtime_dir: &Path,
    direction: v1::SyncDirection,
) -> Result<(), String> {
    let ch = connect_to(runtime_dir, "cfg-syncd").await?;
    let mut client = CfgSyncClient::new(ch);
    let call = client.set_direction(v1::SetDirectionRequest {
        direction: direction.into(),
    });
    match tokio::time::timeout(RPC_TIMEOUT, call).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(s)) => Err(rpc_error("cfg-syncd", s)),
        Err(_) => Err("cfg-syncd: no answer to SetDirection".into()),
    }
}

/// Asks conntrack-syncd for a bulk resync of the peer's table.
pub async fn resync_conntrack(runtime_dir: &Path) -> Result<(), String> {
    let ch = connect_to(runtime_dir, "conntrack-syncd").await?;
    let mut client = ConntrackSyncClient::new(ch);
    let call = client.resync(v1::ResyncRequest {});
    match tokio::time::timeout(RPC_TIMEOUT, call).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(s)) => Err(rpc_error("conntrack-syncd", s)),
        Err(_) => Err("conntrack-syncd: no answer to Resync".into()),
    }
}
