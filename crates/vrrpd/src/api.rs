//! The gRPC face of vrrpd: state from the router's snapshot, maintenance
//! requests to the router, state changes as a stream.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tandem_proto::v1::{self, VrrpState, vrrpd_server::Vrrpd};
use tandem_runtime::{ConfigCell, Shutdown};
use tokio_stream::wrappers::BroadcastStream;
use tonic::{Request, Response, Status};

use crate::router::Shared;

/// What tonic's generated trait expects of a server-streaming RPC.
type BoxStream<T> =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send + 'static>>;

/// How long SetMaintenance waits to see the router in the requested state.
const MAINTENANCE_WAIT: Duration = Duration::from_secs(3);

pub struct VrrpdApi {
    pub config: Arc<ConfigCell>,
    pub shared: Arc<Shared>,
    pub shutdown: Shutdown,
}

impl VrrpdApi {
    fn status(&self) -> v1::VrrpStatus {
        let snap = self.shared.snapshot.borrow().clone();
        let mut status = v1::VrrpStatus {
            daemon: Some(self.config.daemon_info()),
            reason: snap.reason,
            master_address: snap.master.map(|m| m.to_string()).unwrap_or_default(),
            maintenance: *self.shared.maintenance.borrow(),
            tracked_interfaces: snap
                .tracked
                .iter()
                .map(|(name, up)| v1::TrackedInterface {
                    name: name.clone(),
                    up: *up,
                })
                .collect(),
            counters: Some(v1::VrrpCounters {
                adverts_sent: snap.counters.adverts_sent,
                adverts_received: snap.counters.adverts_received,
                packets_dropped: snap.counters.packets_dropped,
                became_master: snap.counters.became_master,
                became_backup: snap.counters.became_backup,
                priority_zero_sent: snap.counters.priority_zero_sent,
                priority_zero_received: snap.counters.priority_zero_received,
                ..Default::default()
            }),
            ..Default::default()
        };
        status.set_state(snap.state);
        if let Some(setup) = &snap.setup {
            status.virtual_router_id = u32::from(setup.vrid);
            status.priority = u32::from(setup.priority);
            status.effective_priority =
                if matches!(snap.state, VrrpState::Maintenance | VrrpState::Fault) {
                    0
                } else {
                    u32::from(setup.priority)
                };
            status.advert_interval_ms = u32::from(setup.advert_interval_cs) * 10;
            status.floating_ips = setup.floating_ips.iter().map(ToString::to_string).collect();
        }
        status
    }
}

#[tonic::async_trait]
impl Vrrpd for VrrpdApi {
    async fn status(
        &self,
        _: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::VrrpStatus>, Status> {
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
        req: Request<v1::SetMaintenanceRequest>,
    ) -> Result<Response<v1::VrrpStatus>, Status> {
        let on = req.into_inner().enabled;
        tracing::info!(
            "maintenance {} requested over gRPC",
            if on { "on" } else { "off" }
        );
        self.shared.maintenance.send_replace(on);
        // Answer once the router has acted, so the caller knows the handover
        // (a priority-0 advert) has been sent.
        let mut snap = self.shared.snapshot.subscribe();
        let _ = tokio::time::timeout(
            MAINTENANCE_WAIT,
            snap.wait_for(|s| (s.state == VrrpState::Maintenance) == on || s.setup.is_none()),
        )
        .await;
        Ok(Response::new(self.status()))
    }

    async fn watch_state(
        &self,
        _: Request<v1::WatchStateRequest>,
    ) -> Result<Response<BoxStream<v1::VrrpStateChange>>, Status> {
        let changes = BroadcastStream::new(self.shared.changes.subscribe());
        let snap = self.shared.snapshot.borrow().clone();
        let current = v1::VrrpStateChange {
            old_state: snap.state.into(),
            new_state: snap.state.into(),
            reason: snap.reason,
            unix_ms: tandem_runtime::unix_ms(std::time::SystemTime::now()),
            master_address: snap.master.map(|m| m.to_string()).unwrap_or_default(),
        };
        let mut shutdown = self.shutdown.clone();
        let stream = futures::stream::once(async move { Ok(current) })
            .chain(changes.filter_map(|c| async move {
                match c {
                    Ok(c) => Some(Ok(c)),
                    // A slow watcher missed changes: tell it, it can re-read Status.
                    Err(e) => Some(Err(Status::data_loss(format!("state changes lost: {e}")))),
                }
            }))
            .take_until(async move { shutdown.wait().await });
        Ok(Response::new(Box::pin(stream)))
    }
}
