//! The gRPC face of cfg-syncd: status and control for clustermanager and
//! tandemctl, and the Apply/GetManifest pair the peer's cfg-syncd calls
//! through the SSH tunnel.

use std::sync::Arc;
use std::time::Duration;

use tandem_proto::v1::{self, SyncDirection, cfg_sync_server::CfgSync};
use tonic::{Request, Response, Status};

use crate::apply::{self, ApplyError};
use crate::sync::Shared;

pub struct CfgSyncApi {
    pub shared: Arc<Shared>,
}

impl CfgSyncApi {
    fn status_now(&self) -> v1::CfgSyncStatus {
        let s = &self.shared;
        let c = s.counters();
        let manifest_hash = match tokio::task::block_in_place(|| s.local_manifest()) {
            Ok(m) => m.hash(),
            Err(e) => {
                tracing::warn!(error = %e, "scanning the configuration directory for Status");
                String::new()
            }
        };
        let mut status = v1::CfgSyncStatus {
            daemon: Some(s.config.daemon_info()),
            peer: s
                .peers()
                .iter()
                .map(|p| p.addr.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            paused: *s.paused.borrow(),
            last_sync_unix_ms: c.last_sync.map(tandem_runtime::unix_ms).unwrap_or(0),
            pending_changes: u32::try_from(c.pending).unwrap_or(u32::MAX),
            last_error: c.last_error,
            manifest_hash,
            peer_connected: c.peer_connected,
            batches_applied: c.batches_applied,
            files_transferred: c.files_transferred,
            ..Default::default()
        };
        status.set_direction(*s.direction.borrow());
        status
    }
}

/// Asks every running local daemon to reload (cfg-syncd itself through its
/// own configuration cell). A daemon that is not running is skipped.
async fn reload_local_daemons(shared: &Shared) -> Vec<String> {
    use tandem_proto::v1::{
        cluster_manager_client::ClusterManagerClient, conntrack_sync_client::ConntrackSyncClient,
        lb_forwarder_client::LbForwarderClient, routed_client::RoutedClient,
        vrrpd_client::VrrpdClient,
    };
    let mut reloaded = Vec::new();
    for daemon in tandem_proto::DAEMONS {
        let reply = if *daemon == "cfg-syncd" {
            Ok(v1::ReloadReply::from(shared.config.reload()))
        } else {
            let ch = match tandem_runtime::connect(&shared.runtime_dir, daemon).await {
                Ok(ch) => ch,
                Err(tandem_runtime::RuntimeError::NotRunning { .. }) => continue,
                Err(e) => {
                    tracing::warn!(daemon, error = %e, "cannot ask for a reload");
                    continue;
                }
            };
            let req = v1::ReloadRequest {};
            let call = async {
                match *daemon {
                    "vrrpd" => VrrpdClient::new(ch).reload(req).await,
                    "lb-forwarder" => LbForwarderClient::new(ch).reload(req).await,
                    "conntrack-syncd" => ConntrackSyncClient::new(ch).reload(req).await,
                    "routed" => RoutedClient::new(ch).reload(req).await,
                    _ => ClusterManagerClient::new(ch).reload(req).await,
                }
            };
            match tokio::time::timeout(Duration::from_secs(10), call).await {
                Ok(Ok(r)) => Ok(r.into_inner()),
                Ok(Err(e)) => Err(e.message().to_owned()),
                Err(_) => Err("no answer within 10 s".to_owned()),
            }
        };
        match reply {
            Ok(r) if r.applied => reloaded.push((*daemon).to_owned()),
            Ok(r) => {
                tracing::error!(daemon, errors = ?r.errors, "daemon refused the new configuration")
            }
            Err(e) => tracing::warn!(daemon, error = %e, "reload failed"),
        }
    }
    reloaded
}

#[tonic::async_trait]
impl CfgSync for CfgSyncApi {
    async fn status(
        &self,
        _: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::CfgSyncStatus>, Status> {
        Ok(Response::new(self.status_now()))
    }

    async fn reload(
        &self,
        _: Request<v1::ReloadRequest>,
    ) -> Result<Response<v1::ReloadReply>, Status> {
        Ok(Response::new(self.shared.config.reload().into()))
    }

    async fn set_direction(
        &self,
        req: Request<v1::SetDirectionRequest>,
    ) -> Result<Response<v1::CfgSyncStatus>, Status> {
        let d = req.into_inner().direction();
        if d == SyncDirection::Unspecified {
            return Err(Status::invalid_argument(
                "direction must be NONE, PUSH or RECEIVE",
            ));
        }
        if let Ok(mut e) = self.shared.explicit.lock() {
            *e = Some(d);
        }
        self.shared.update_direction();
        Ok(Response::new(self.status_now()))
    }

    async fn sync_now(
        &self,
        _: Request<v1::SyncNowRequest>,
    ) -> Result<Response<v1::CfgSyncStatus>, Status> {
        if *self.shared.direction.borrow() != SyncDirection::Push {
            return Err(Status::failed_precondition(
                "this node does not push (direction is not PUSH); run SyncNow on the master",
            ));
        }
        tracing::info!("full sync requested");
        self.shared.sync_now.notify_one();
        Ok(Response::new(self.status_now()))
    }

    async fn pause(
        &self,
        _: Request<v1::PauseRequest>,
    ) -> Result<Response<v1::CfgSyncStatus>, Status> {
        if !self.shared.paused.send_replace(true) {
            tracing::info!("replication paused; changes accumulate until Resume");
        }
        Ok(Response::new(self.status_now()))
    }

    async fn resume(
        &self,
        _: Request<v1::ResumeRequest>,
    ) -> Result<Response<v1::CfgSyncStatus>, Status> {
        if self.shared.paused.send_replace(false) {
            tracing::info!("replication resumed");
        }
        Ok(Response::new(self.status_now()))
    }

    async fn get_manifest(
        &self,
        _: Request<v1::GetManifestRequest>,
    ) -> Result<Response<v1::Manifest>, Status> {
        let m = tokio::task::block_in_place(|| self.shared.local_manifest()).map_err(|e| {
            Status::internal(format!(
                "scanning {}: {e}",
                self.shared.config_dir.display()
            ))
        })?;
        Ok(Response::new((&m).into()))
    }

    async fn apply(
        &self,
        req: Request<v1::ApplyRequest>,
    ) -> Result<Response<v1::ApplyReply>, Status> {
        let req = req.into_inner();
        let direction = *self.shared.direction.borrow();
        if direction != SyncDirection::Receive {
            // A master (or a node told not to sync) never takes a peer's tree.
            tracing::warn!(from = %req.from_node, batch = %req.batch, "refused a batch: this node's sync direction is {}", direction.as_str_name());
            return Err(Status::failed_precondition(format!(
                "{} does not receive configuration (sync direction {})",
                self.shared.config.current().config.node.name,
                direction.as_str_name()
            )));
        }
        let _one = self.shared.apply_lock.lock().await;
        let dir = self.shared.config_dir.clone();
        let r = {
            let req = req.clone();
            tokio::task::spawn_blocking(move || apply::apply(&dir, &req))
                .await
                .map_err(|e| Status::internal(format!("apply task failed: {e}")))?
        };
        match r {
            Ok(applied) => {
                tracing::info!(
                    from = %req.from_node,
                    batch = %req.batch,
                    written = applied.written,
                    renamed = applied.renamed,
                    deleted = applied.deleted,
                    "applied a configuration batch from the master"
                );
                let reloaded = reload_local_daemons(&self.shared).await;
                let manifest_hash = tokio::task::block_in_place(|| self.shared.local_manifest())
                    .map(|m| m.hash())
                    .map_err(|e| Status::internal(format!("scanning after apply: {e}")))?;
                self.shared.with_counters(|c| {
                    c.last_sync = Some(std::time::SystemTime::now());
                    c.batches_applied += 1;
                    c.files_transferred += applied.written as u64;
                    c.last_error.clear();
                });
                Ok(Response::new(v1::ApplyReply {
                    applied: true,
                    errors: vec![],
                    manifest_hash,
                    reloaded,
                }))
            }
            Err(ApplyError::Invalid { batch, errors }) => {
                tracing::error!(from = %req.from_node, batch = %batch, "refused a configuration batch: the result would be invalid; nothing applied");
                for e in &errors {
                    tracing::error!("{e}");
                }
                self.shared.with_counters(|c| {
                    c.last_error = format!("refused batch {batch}: {}", errors.join("; "));
                    c.errors += 1;
                });
                Ok(Response::new(v1::ApplyReply {
                    applied: false,
                    errors,
                    manifest_hash: String::new(),
                    reloaded: vec![],
                }))
            }
            Err(e @ ApplyError::BadRequest { .. }) => {
                tracing::error!(from = %req.from_node, "{e}");
                Err(Status::invalid_argument(e.to_string()))
            }
            Err(e @ ApplyError::Io { .. }) => {
                tracing::error!(from = %req.from_node, "{e}");
                Err(Status::internal(e.to_string()))
            }
        }
    }
}
