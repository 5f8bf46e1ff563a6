//! The gRPC face of vrrpd: state from the router's snapshot, maintenance
//! requests to the router, state changes as a stream.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tandem_proto::v1::{self, VrrpState, vrrpd_server::Vrrpd};
use tandem_runtime::ConfigCell;
use tokio_stream::wrappers::BroadcastStream;
use tonic::{Request, Response, Status};

use vrrpd::maintenance::MaintenanceFile;
use vrrpd::router::Shared;

/// What tonic's generated trait expects of a server-streaming RPC.
type BoxStream<T> =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send + 'static>>;

/// How long SetMaintenance waits, beyond a handover's own timeout, to see
/// the router in the requested state.
const MAINTENANCE_WAIT: Duration = Duration::from_secs(2);

pub struct VrrpdApi {
    pub config: Arc<ConfigCell>,
    pub shared: Arc<Shared>,
    pub maintenance_file: MaintenanceFile,
}

impl VrrpdApi {
    fn status(&self) -> v1::VrrpStatus {
        let snap = self.shared.snapshot.borrow().clone();
        let mut status = v1::VrrpStatus {
            daemon: Some(self.config.daemon_info()),
            reason: snap.reason,
            master_address: snap.master.map(|m| m.to_string()).unwrap_or_default(),
            maintenance: self.shared.maintenance.borrow().on(),
            maintenance_hold: self.shared.maintenance.borrow().hold,
            handing_over: snap.handing_over,
            foreign_speakers: snap
                .foreign_speakers
                .iter()
                .map(|f| v1::ForeignSpeaker {
                    address: f.address.to_string(),
                    virtual_router_id: u32::from(f.vrid),
                    priority: u32::from(f.priority),
                    adverts: f.adverts,
                    last_seen_unix_ms: f.last_seen_unix_ms,
                })
                .collect(),
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
                foreign_adverts_dropped: snap.counters.foreign_adverts_dropped,
            }),
            ..Default::default()
        };
        status.set_state(snap.state);
        if let Some(setup) = &snap.setup {
            status.virtual_router_id = u32::from(setup.vrid);
            status.priority = u32::from(setup.priority);
            status.effective_priority = if snap.handing_over
                || matches!(snap.state, VrrpState::Maintenance | VrrpState::Fault)
            {
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
        let req = req.into_inner();
        let (on, transient) = (req.enabled, req.transient);
        let who = if transient {
            "clustermanager's hold"
        } else {
            "operator maintenance"
        };
        tracing::info!(
            "{who} {} requested over gRPC",
            if on { "on" } else { "off" }
        );
        if !transient {
            // Durable first: if it cannot be kept, nothing changes.
            let now = tandem_runtime::unix_ms(std::time::SystemTime::now());
            self.maintenance_file.store(on, now).map_err(|e| {
                tracing::error!(
                    "maintenance {} refused: cannot write {}: {e}",
                    if on { "on" } else { "off" },
                    self.maintenance_file.path().display()
                );
                Status::internal(format!(
                    "cannot keep maintenance in {}: {e}; nothing changed",
                    self.maintenance_file.path().display()
                ))
            })?;
        }
        self.shared.maintenance.send_modify(|m| {
            if transient {
                m.hold = on;
            } else {
                m.operator = on;
            }
        });
        let effective = self.shared.maintenance.borrow().on();
        // Answer once the router has acted: entering maintenance, once a
        // master has handed over (the peer advertises as master) or its
        // handover timed out.
        let mut snap = self.shared.snapshot.subscribe();
        let wait = snap.borrow().handover_timeout + MAINTENANCE_WAIT;
        let _ = tokio::time::timeout(
            wait,
            snap.wait_for(|s| {
                s.setup.is_none()
                    || s.state == VrrpState::Fault
                    || (s.state == VrrpState::Maintenance) == effective
            }),
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
        // Served until the router has ended rather than until shutdown
        // begins: a stopping master hands over first, and conntrack-syncd
        // and clustermanager must see it leave the master role. The short
        // pause lets the last change already queued reach the watcher.
        let mut done = self.shared.router_done.subscribe();
        let stream = futures::stream::once(async move { Ok(current) })
            .chain(changes.filter_map(|c| async move {
                match c {
                    Ok(c) => Some(Ok(c)),
                    // A slow watcher missed changes: tell it, it can re-read Status.
                    Err(e) => Some(Err(Status::data_loss(format!("state changes lost: {e}")))),
                }
            }))
            .take_until(async move {
                let _ = done.wait_for(|d| *d).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            });
        Ok(Response::new(Box::pin(stream)))
    }
}
