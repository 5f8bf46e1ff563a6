//! The gRPC face of cfg-syncd: status and control for clustermanager and
//! tandemctl, and the Apply/GetManifest pair the peer's cfg-syncd calls
//! through the SSH tunnel. Status never scans and never waits for a scan
//! or an apply: it answers from what the engine last published.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tandem_proto::v1::{self, SyncDirection, cfg_sync_server::CfgSync};
use tonic::{Request, Response, Status, Streaming};

use crate::apply::{self, ApplyError, BatchReader, Env, Local};
use crate::sync::Shared;

pub struct CfgSyncApi {
    pub shared: Arc<Shared>,
}

impl CfgSyncApi {
    fn status_now(&self) -> v1::CfgSyncStatus {
        status_of(&self.shared)
    }
}

pub fn status_of(s: &Shared) -> v1::CfgSyncStatus {
    let c = s.counters();
    let set_aside = s
        .set_aside
        .lock()
        .map(|st| st.listed().iter().map(v1::SetAside::from).collect())
        .unwrap_or_default();
    let mut status = v1::CfgSyncStatus {
        daemon: Some(s.config.daemon_info()),
        peer: s.peer().map(|p| p.addr.to_string()).unwrap_or_default(),
        paused: *s.paused.borrow(),
        last_sync_unix_ms: c.last_sync.map(tandem_runtime::unix_ms).unwrap_or(0),
        pending_changes: u32::try_from(c.pending).unwrap_or(u32::MAX),
        last_error: c.last_error,
        manifest_hash: c.manifest_hash,
        peer_connected: c.peer_connected,
        batches_applied: c.batches_applied,
        files_transferred: c.files_transferred,
        set_aside,
        refused: c.refused,
        batch_in_flight: c.batch_in_flight,
        last_batch: c.last_batch,
        ..Default::default()
    };
    status.set_direction(*s.direction.borrow());
    status
}

/// Asks every running local daemon to reload (cfg-syncd itself through its
/// own configuration cell, unless `include_self` is false). A daemon that
/// is not running is skipped. cfg-syncd reloads first and the others are
/// connected to before any is asked: the caller removes the batch's
/// journal right after the last answer, so a kill in between (which would
/// replay the reload at start) has the narrowest window.
pub async fn reload_local_daemons(shared: &Shared, include_self: bool) -> Vec<String> {
    use tandem_proto::v1::{
        cluster_manager_client::ClusterManagerClient, conntrack_sync_client::ConntrackSyncClient,
        lb_forwarder_client::LbForwarderClient, vrrpd_client::VrrpdClient,
    };
    let mut reloaded = Vec::new();
    let mut running = Vec::new();
    for daemon in tandem_proto::DAEMONS.iter().filter(|d| **d != "cfg-syncd") {
        match tandem_runtime::connect(&shared.runtime_dir, daemon).await {
            Ok(ch) => running.push((*daemon, ch)),
            Err(tandem_runtime::RuntimeError::NotRunning { .. }) => {}
            Err(e) => tracing::warn!(daemon, error = %e, "cannot ask {daemon} to reload: {e}"),
        }
    }
    if include_self {
        match shared.config.reload() {
            tandem_runtime::ReloadOutcome::Applied { .. } => reloaded.push("cfg-syncd".to_owned()),
            // ConfigCell::reload logged every error.
            tandem_runtime::ReloadOutcome::Refused { .. } => {}
        }
    }
    for (daemon, ch) in running {
        let req = v1::ReloadRequest {};
        let call = async {
            match daemon {
                "vrrpd" => VrrpdClient::new(ch).reload(req).await,
                "lb-forwarder" => LbForwarderClient::new(ch).reload(req).await,
                "conntrack-syncd" => ConntrackSyncClient::new(ch).reload(req).await,
                _ => ClusterManagerClient::new(ch).reload(req).await,
            }
        };
        let reply = match tokio::time::timeout(Duration::from_secs(10), call).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(e)) => Err(e.message().to_owned()),
            Err(_) => Err("no answer within 10 s".to_owned()),
        };
        match reply {
            Ok(r) if r.applied => reloaded.push(daemon.to_owned()),
            Ok(r) => {
                tracing::error!(daemon, errors = ?r.errors, "{daemon} refused the new configuration: {}", r.errors.join("; "))
            }
            Err(e) => tracing::warn!(daemon, error = %e, "reload of {daemon} failed: {e}"),
        }
    }
    reloaded
}

/// Logs a batch's local changes kept aside, naming the files.
pub fn warn_set_aside(r: &crate::set_aside::Record, batch: &str, from: &str) {
    let shown: Vec<&str> = r.paths.iter().take(20).map(String::as_str).collect();
    let more = r.paths.len().saturating_sub(shown.len());
    tracing::warn!(
        directory = %r.directory.display(),
        files = r.paths.len(),
        batch,
        peer = from,
        "kept {} local changes that the configuration from {from} replaced or removed, in {}: {}{}; the files stay there; `tandemctl cluster ack` clears this warning",
        r.paths.len(),
        r.directory.display(),
        shown.join(", "),
        if more > 0 { format!(" and {more} more") } else { String::new() }
    );
}

/// Runs a batch on a blocking thread (after any batch a previous failure
/// left journaled), reloads the daemons once if content changed, and
/// removes the journal. Owns everything it needs: it is not cancelled when
/// the master's connection drops.
async fn run_apply(shared: Arc<Shared>, batch: apply::Batch) -> Result<v1::ApplyReply, Status> {
    let _one = shared.apply_lock.clone().lock_owned().await;
    let _flag = InFlight::set(shared.clone());
    let scanner = shared.scanner.clone().lock_owned().await;
    let env = Env {
        root: shared.config_dir.clone(),
        state_dir: shared.state_dir.clone(),
        faults: shared.faults,
    };
    let caps = shared.caps();
    let baseline = shared.baseline.clone();
    let set_aside = shared.set_aside.clone();
    let env2 = env.clone();
    let from = batch.from_node.clone();
    let joined = tokio::task::spawn_blocking(move || {
        let mut scanner = scanner;
        let mut base = match baseline.lock() {
            Ok(b) => b,
            Err(p) => p.into_inner(),
        };
        let mut local = Local {
            scanner: &mut scanner,
            baseline: &mut base,
            set_aside: &set_aside,
        };
        let earlier = apply::recover(&env2, &mut local, caps);
        let r = apply::apply(&env2, &mut local, batch, caps);
        (earlier, r)
    })
    .await;
    let (earlier, r) = match joined {
        Ok(x) => x,
        Err(e) => return Err(Status::internal(format!("apply task failed: {e}"))),
    };
    for rec in earlier {
        finish_recovered(&shared, rec.applied).await;
    }
    match r {
        Ok(applied) => {
            shared.publish_scan(&applied.scan);
            // A batch whose operations did not all succeed stays journaled
            // and is not loaded half done.
            let reloaded = if applied.reload && applied.incomplete.is_empty() {
                reload_local_daemons(&shared, true).await
            } else {
                vec![]
            };
            if applied.incomplete.is_empty() {
                apply::finish(&env.root, &applied.batch);
            }
            tracing::info!(
                peer = %applied.from_node,
                batch = %applied.batch,
                written = applied.written,
                renamed = applied.renamed,
                deleted = applied.deleted,
                mode_only = applied.attrs,
                check_ms = applied.check_ms,
                land_ms = applied.land_ms,
                reloaded = ?reloaded,
                "applied batch {} from {}: {} files written, {} renamed, {} deleted, {} mode/owner only, checked in {} ms, landed in {} ms; {}",
                applied.batch,
                applied.from_node,
                applied.written,
                applied.renamed,
                applied.deleted,
                applied.attrs,
                applied.check_ms,
                applied.land_ms,
                if applied.reload {
                    format!("daemons reloaded: {}", reloaded.join(", "))
                } else {
                    "no daemon reloaded (only modes and owners changed)".to_owned()
                }
            );
            if let Some(r) = &applied.set_aside {
                warn_set_aside(r, &applied.batch, &applied.from_node);
            }
            if !applied.incomplete.is_empty() {
                tracing::error!(
                    batch = %applied.batch,
                    "batch {} is committed but {} operations failed ({}); its journal stays and is replayed before the next batch or at start",
                    applied.batch,
                    applied.incomplete.len(),
                    applied.incomplete.join("; ")
                );
            }
            shared.with_counters(|c| {
                c.last_sync = Some(std::time::SystemTime::now());
                c.batches_applied += 1;
                c.files_transferred += applied.written as u64;
                c.last_batch = applied.batch.clone();
                c.last_error = if applied.incomplete.is_empty() {
                    String::new()
                } else {
                    format!(
                        "batch {} incomplete: {}",
                        applied.batch,
                        applied.incomplete.join("; ")
                    )
                };
            });
            Ok(v1::ApplyReply {
                applied: true,
                errors: vec![],
                manifest_hash: applied.scan.manifest.hash(),
                reloaded,
                set_aside_directory: applied
                    .set_aside
                    .as_ref()
                    .map(|r| r.directory.display().to_string())
                    .unwrap_or_default(),
                stale: false,
            })
        }
        Err(ApplyError::Invalid { batch, errors }) => {
            tracing::error!(peer = %from, batch = %batch, "refused batch {batch} from {from}: the configuration would be invalid; nothing applied: {}", errors.join("; "));
            for e in &errors {
                tracing::error!(batch = %batch, "{e}");
            }
            shared.with_counters(|c| {
                c.last_error = format!("refused batch {batch}: {}", errors.join("; "));
                c.errors += 1;
            });
            Ok(v1::ApplyReply {
                applied: false,
                errors,
                ..Default::default()
            })
        }
        Err(ApplyError::Unsupported { batch, errors }) => {
            tracing::error!(peer = %from, batch = %batch, "refused batch {batch} from {from}, nothing applied: {}", errors.join("; "));
            shared.with_counters(|c| {
                c.last_error = format!("refused batch {batch}: {}", errors.join("; "));
                c.errors += 1;
            });
            Ok(v1::ApplyReply {
                applied: false,
                errors,
                ..Default::default()
            })
        }
        Err(e @ ApplyError::Stale { .. }) => {
            tracing::info!("{e}; the master plans again");
            Ok(v1::ApplyReply {
                applied: false,
                stale: true,
                ..Default::default()
            })
        }
        Err(e @ ApplyError::BadRequest { .. }) => {
            tracing::error!("{e}");
            shared.with_counters(|c| {
                c.last_error = e.to_string();
                c.errors += 1;
            });
            Err(Status::invalid_argument(e.to_string()))
        }
        Err(e @ ApplyError::Io { .. }) => {
            tracing::error!("{e}");
            shared.with_counters(|c| {
                c.last_error = e.to_string();
                c.errors += 1;
            });
            Err(Status::internal(e.to_string()))
        }
    }
}

/// `batch_in_flight` in Status while a batch is applied here, however the
/// apply ends.
struct InFlight(Arc<Shared>);

impl InFlight {
    fn set(shared: Arc<Shared>) -> InFlight {
        shared.with_counters(|c| c.batch_in_flight = true);
        InFlight(shared)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.with_counters(|c| c.batch_in_flight = false);
    }
}

/// A committed batch rolled forward after a restart (or before the next
/// batch): the daemons reload once (cfg-syncd itself loaded its
/// configuration after the replay at start), then its journal goes.
pub async fn finish_recovered(shared: &Shared, applied: apply::Applied) {
    shared.publish_scan(&applied.scan);
    if !applied.incomplete.is_empty() {
        tracing::error!(
            batch = %applied.batch,
            "batch {} from {}, committed before cfg-syncd stopped, is still incomplete: {}",
            applied.batch,
            applied.from_node,
            applied.incomplete.join("; ")
        );
        return;
    }
    let reloaded = if applied.reload {
        reload_local_daemons(shared, false).await
    } else {
        vec![]
    };
    apply::finish(&shared.config_dir, &applied.batch);
    tracing::info!(
        peer = %applied.from_node,
        batch = %applied.batch,
        reloaded = ?reloaded,
        "completed batch {} from {}, committed before cfg-syncd stopped; daemons reloaded: {}",
        applied.batch,
        applied.from_node,
        if reloaded.is_empty() { "none".to_owned() } else { reloaded.join(", ") }
    );
    if let Some(r) = &applied.set_aside {
        warn_set_aside(r, &applied.batch, &applied.from_node);
    }
    shared.with_counters(|c| {
        c.batches_applied += 1;
        c.last_batch = applied.batch.clone();
        c.last_sync = Some(std::time::SystemTime::now());
    });
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

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
    ) -> Result<Response<BoxStream<v1::Manifest>>, Status> {
        let scan = self.shared.scan().await.map_err(|e| {
            Status::internal(format!(
                "scanning {}: {e}",
                self.shared.config_dir.display()
            ))
        })?;
        // Chunks are built as the stream is read: one or two at a time in
        // memory, whatever the size of the tree.
        let manifest = scan.manifest;
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::spawn(async move {
            for chunk in manifest.chunks() {
                if tx.send(Ok(chunk)).await.is_err() {
                    return;
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn apply(
        &self,
        req: Request<Streaming<v1::ApplyRequest>>,
    ) -> Result<Response<v1::ApplyReply>, Status> {
        let direction = *self.shared.direction.borrow();
        if direction != SyncDirection::Receive {
            // A master (or a node told not to sync) never takes a peer's tree.
            tracing::warn!(
                "refused a batch from the peer: this node's sync direction is {}, not RECEIVE",
                direction.as_str_name()
            );
            return Err(Status::failed_precondition(format!(
                "{} does not receive configuration (sync direction {})",
                self.shared.config.current().config.node.name,
                direction.as_str_name()
            )));
        }
        let mut stream = req.into_inner();
        let mut reader = BatchReader::default();
        while let Some(chunk) = stream.message().await? {
            reader
                .push(chunk)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let batch = reader.finish().map_err(|e| {
            tracing::warn!("{e}");
            Status::invalid_argument(e.to_string())
        })?;
        let work = run_apply(self.shared.clone(), batch);
        let reply = if self.shared.faults.nonatomic {
            // The control: the apply dies with the master's connection.
            work.await?
        } else {
            // A batch whose commit arrived is applied and the daemons
            // reloaded even if the master goes away meanwhile.
            tokio::spawn(work)
                .await
                .map_err(|e| Status::internal(format!("apply task failed: {e}")))??
        };
        Ok(Response::new(reply))
    }

    async fn acknowledge_set_aside(
        &self,
        req: Request<v1::AcknowledgeSetAsideRequest>,
    ) -> Result<Response<v1::AcknowledgeSetAsideReply>, Status> {
        let dirs = req.into_inner().directories;
        let mut store = self
            .shared
            .set_aside
            .lock()
            .map_err(|_| Status::internal("set-aside store lock poisoned"))?;
        let unknown: Vec<&String> = dirs
            .iter()
            .filter(|d| {
                !store.listed().iter().any(|r| {
                    std::path::Path::new(d.as_str()) == r.directory
                        || r.directory.file_name().is_some_and(|n| n == d.as_str())
                })
            })
            .collect();
        if !unknown.is_empty() {
            let listed: Vec<String> = store
                .listed()
                .iter()
                .map(|r| r.directory.display().to_string())
                .collect();
            return Err(Status::not_found(format!(
                "not a listed set-aside directory: {} (listed: {})",
                unknown
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                if listed.is_empty() {
                    "none".to_owned()
                } else {
                    listed.join(", ")
                }
            )));
        }
        let acked = store
            .acknowledge(&dirs)
            .map_err(|e| Status::internal(format!("writing the acknowledgement: {e}")))?;
        for r in &acked {
            tracing::info!(
                directory = %r.directory.display(),
                files = r.paths.len(),
                "set-aside files in {} acknowledged by the operator ({} files, kept on disk)",
                r.directory.display(),
                r.paths.len()
            );
        }
        Ok(Response::new(v1::AcknowledgeSetAsideReply {
            acknowledged: acked.iter().map(v1::SetAside::from).collect(),
        }))
    }
}
