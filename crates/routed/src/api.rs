//! The gRPC face of routed: Status from the engine's snapshot,
//! maintenance (persisted, then handed to the engine), reload.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use routed::engine::Snapshot;
use routed::maintenance;
use tandem_proto::v1::{self, routed_server::Routed};
use tandem_runtime::{ConfigCell, unix_ms};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

/// How long SetMaintenance waits for BIRD to take the change.
const MAINTENANCE_WAIT: Duration = Duration::from_secs(3);

pub struct RoutedApi {
    pub config: Arc<ConfigCell>,
    pub snapshot: watch::Receiver<Snapshot>,
    pub maintenance: watch::Sender<Option<String>>,
    pub state_dir: PathBuf,
    pub bird_config: PathBuf,
}

impl RoutedApi {
    fn status(&self) -> v1::RoutedStatus {
        let s = self.snapshot.borrow().clone();
        v1::RoutedStatus {
            daemon: Some(self.config.daemon_info()),
            mode: s.mode,
            maintenance: s.maintenance.is_some(),
            maintenance_reason: s.maintenance.unwrap_or_default(),
            datapath_ready: s.datapath_ready,
            datapath_message: s.datapath_message,
            vips: s
                .vips
                .iter()
                .map(|v| v1::VipAnnouncement {
                    vip: v.decision.vip.to_string(),
                    announced: v.decision.announce,
                    reason: v.decision.reason.clone(),
                    farms: v.decision.farms.clone(),
                    since_unix_ms: unix_ms(v.since),
                })
                .collect(),
            sessions: s
                .sessions
                .iter()
                .map(|x| v1::BgpSession {
                    peer: x.peer.clone(),
                    address: x.address.clone(),
                    state: x.state.clone(),
                    bgp_state: x.bgp_state.clone(),
                    established: x.established,
                    since: x.since.clone(),
                })
                .collect(),
            bird_reachable: s.bird_reachable,
            bird_message: s.bird_message,
            bird_configured_unix_ms: s.bird_configured.map(unix_ms).unwrap_or(0),
            bird_config: self.bird_config.display().to_string(),
        }
    }
}

#[tonic::async_trait]
impl Routed for RoutedApi {
    async fn status(
        &self,
        _: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::RoutedStatus>, Status> {
        Ok(Response::new(self.status()))
    }

    async fn reload(
        &self,
        _: Request<v1::ReloadRequest>,
    ) -> Result<Response<v1::ReloadReply>, Status> {
        Ok(Response::new(self.config.reload().into()))
    }

    async fn set_maintenance(
        &self,
        req: Request<v1::SetRoutedMaintenanceRequest>,
    ) -> Result<Response<v1::RoutedStatus>, Status> {
        let req = req.into_inner();
        let wanted = req.maintenance.then(|| req.reason.trim().to_owned());
        let node = self.config.current().config.node.name.clone();
        maintenance::store(&self.state_dir, wanted.as_deref()).map_err(|e| {
            Status::internal(format!(
                "cannot record maintenance in {}: {e}; nothing changed",
                maintenance::path(&self.state_dir).display()
            ))
        })?;
        if *self.maintenance.borrow() != wanted {
            match &wanted {
                Some(why) => {
                    tracing::info!(node = %node, reason = %why, "maintenance on: withdrawing every VIP from the routers{}", if why.is_empty() { String::new() } else { format!(" ({why})") })
                }
                None => tracing::info!(node = %node, "maintenance off: announcing the VIPs again"),
            }
            self.maintenance.send_replace(wanted.clone());
        }
        // Answer once BIRD has the configuration that reflects it (or the
        // wait is over: Status then says why BIRD did not take it).
        let mut rx = self.snapshot.clone();
        let _ = tokio::time::timeout(
            MAINTENANCE_WAIT,
            rx.wait_for(|s| s.maintenance == wanted && s.applied == s.written && s.written > 0),
        )
        .await;
        Ok(Response::new(self.status()))
    }
}
