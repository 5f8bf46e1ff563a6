//! The gRPC face of clustermanager.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tandem_proto::v1::{self, NodeHealth, NodeRole, cluster_manager_server::ClusterManager};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::BroadcastStream;
use tonic::{Request, Response, Status};

use crate::local;
use crate::node_table::{self, Verdict};
use crate::peer::PeerError;
use crate::peer::peer_of;
use crate::replicate::{self, Change};
use crate::state::Shared;

pub struct ClusterManagerApi {
    pub shared: Arc<Shared>,
    /// Where things are on both nodes, for cluster create and destroy.
    pub create: crate::create::CreateContext,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl ClusterManagerApi {
    async fn local_verdict(&self) -> (Verdict, local::LocalStatuses) {
        node_table::local_verdict(&self.shared).await
    }

    /// Refuses a configuration change unless this node is the master (or
    /// standalone); the error names the master.
    async fn require_master(&self) -> Result<bool, Status> {
        let loaded = self.shared.config.current();
        let Some((peer, peer_addr)) = peer_of(&loaded.config) else {
            return Ok(false);
        };
        let state = local::vrrpd_status(&self.shared.runtime_dir).await;
        let what = match &state {
            local::Probe::Running(s) if s.state() == v1::VrrpState::Master => return Ok(true),
            local::Probe::Running(s) => match node_table::role_of(s.state()) {
                NodeRole::Maintenance => "in maintenance".to_owned(),
                NodeRole::Standalone => return Ok(false),
                _ => "the backup".to_owned(),
            },
            local::Probe::NotRunning => "of unknown role (vrrpd is not running)".to_owned(),
            local::Probe::Failed(why) => format!("of unknown role (vrrpd: {why})"),
        };
        Err(Status::failed_precondition(format!(
            "this node is {what}; make changes on the master {peer} ({peer_addr})"
        )))
    }

    /// Validates, writes and reloads one change (one file or several) here.
    /// Validation errors come back as the reply's errors (nothing written).
    async fn apply_here(&self, changes: &[Change]) -> Result<v1::ApplyChangeReply, Status> {
        replicate::check_batch(changes).map_err(Status::invalid_argument)?;
        let what = describe(changes);
        let dir = self.shared.config_dir.clone();
        let c = changes.to_vec();
        let outcome = tokio::task::spawn_blocking(move || {
            replicate::validate(&dir, &c)?;
            replicate::write_all(&dir, &c).map_err(|e| vec![format!("writing: {e}")])
        })
        .await
        .map_err(|e| Status::internal(format!("apply task failed: {e}")))?;
        if let Err(errors) = outcome {
            tracing::error!(file = %what, "change of {what} refused, nothing written: {}", errors.join("; "));
            return Ok(v1::ApplyChangeReply {
                applied: false,
                errors,
                ..Default::default()
            });
        }
        let reloaded = local::reload_all(&self.shared.runtime_dir, &self.shared.config).await;
        tracing::info!(file = %what, reloaded = ?reloaded.reloaded, "configuration change of {what} written; local daemons reloaded");
        for e in &reloaded.errors {
            tracing::error!(file = %what, "after the change of {what}: {e}");
        }
        Ok(v1::ApplyChangeReply {
            applied: true,
            errors: reloaded.errors,
            replicated: false,
            reloaded: reloaded.reloaded,
            ..Default::default()
        })
    }

    /// ApplyChange's body (also used by EditCluster): applied here, then
    /// replicated to the peer. A peer that cannot be reached (a partition,
    /// the peer down) leaves the change applied and pending: cfg-syncd
    /// carries the files when the peer returns.
    async fn apply_change_inner(
        &self,
        changes: Vec<Change>,
    ) -> Result<v1::ApplyChangeReply, Status> {
        let clustered = self.require_master().await?;
        let _one = self.shared.change_lock.lock().await;
        let mut reply = self.apply_here(&changes).await?;
        if !reply.applied || !clustered {
            return Ok(reply);
        }
        let what = describe(&changes);
        let sequence = self.shared.sequence();
        let msg = to_message(&changes, sequence, self.shared.node_name());
        let peer = self
            .shared
            .peer
            .call_now(&self.shared.config, |mut c| async move {
                c.replicate_change(msg).await
            })
            .await;
        match peer {
            Ok(r) if r.applied => {
                reply.replicated = true;
                tracing::info!(file = %what, sequence, "change of {what} replicated; the peer reloaded {:?}", r.reloaded);
                self.shared
                    .event("change", format!("{what} applied and replicated"));
            }
            Ok(r) => {
                reply.replication_error =
                    format!("the peer refused the change: {}", r.errors.join("; "));
            }
            Err(e @ PeerError::Refused { .. }) => {
                reply.replication_error = format!("the peer refused the change: {e}");
            }
            Err(e) => {
                reply.replication_pending = true;
                reply.replication_error = e.to_string();
            }
        }
        if reply.replication_pending {
            tracing::warn!(file = %what, sequence, "change of {what} applied here; it will be replicated when the peer returns: {}", reply.replication_error);
            self.shared.event(
                "change",
                format!(
                    "{what} applied here; it will be replicated when the peer returns ({})",
                    reply.replication_error
                ),
            );
        } else if !reply.replication_error.is_empty() {
            tracing::warn!(file = %what, sequence, "change of {what} applied here, not replicated: {}", reply.replication_error);
            self.shared.event(
                "change",
                format!(
                    "{what} applied here, not replicated: {}",
                    reply.replication_error
                ),
            );
        }
        Ok(reply)
    }

    /// This node's Status, and its daemons' Status it was judged from.
    async fn own_status(&self) -> (v1::ClusterManagerStatus, local::LocalStatuses) {
        let loaded = self.shared.config.current();
        let (v, st) = self.local_verdict().await;
        let control = self
            .shared
            .control_api
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let status = v1::ClusterManagerStatus {
            daemon: Some(self.shared.config.daemon_info()),
            role: v.role.into(),
            health: v.health.into(),
            message: v.message,
            clustered: loaded.config.cluster.is_some(),
            manifest_hash: st
                .cfgsync
                .running()
                .map(|c| c.manifest_hash.clone())
                .unwrap_or_default(),
            address: loaded
                .config
                .node
                .cluster_address
                .map(|a| a.to_string())
                .unwrap_or_default(),
            control_listen: control
                .as_ref()
                .map(|c| c.listen.to_string())
                .unwrap_or_default(),
            control_fingerprint: control.map(|c| c.fingerprint).unwrap_or_default(),
        };
        (status, st)
    }

    async fn node_table(&self) -> v1::NodeTable {
        let loaded = self.shared.config.current();
        let (v, _) = self.local_verdict().await;
        let own_addr = loaded
            .config
            .node
            .cluster_address
            .map(|a| a.to_string())
            .unwrap_or_default();
        let mut nodes = vec![v1::NodeEntry {
            name: loaded.config.node.name.clone(),
            local: true,
            role: v.role.into(),
            address: own_addr,
            hostname: loaded.config.node.name.clone(),
            health: v.health.into(),
            message: v.message,
            last_seen_unix_ms: 0,
        }];
        if let Some((name, addr)) = peer_of(&loaded.config) {
            let mut row = v1::NodeEntry {
                name: name.clone(),
                local: false,
                address: addr.to_string(),
                hostname: name,
                ..Default::default()
            };
            match self.shared.peer.status_now(&self.shared.config).await {
                Ok(s) => {
                    row.role = s.role;
                    row.health = s.health;
                    row.message = s.message;
                    if let Some(d) = s.daemon {
                        row.hostname = d.node_name;
                    }
                }
                Err(e) => {
                    // The last role heard, and when: better than nothing
                    // for an operator deciding what the peer is doing.
                    let (role, seen) = self.shared.peer.last_seen().unwrap_or_default();
                    row.role = role.into();
                    row.last_seen_unix_ms = seen;
                    row.set_health(NodeHealth::Unreachable);
                    row.message = e.to_string();
                }
            }
            nodes.push(row);
        }
        v1::NodeTable { nodes }
    }
}

#[tonic::async_trait]
impl ClusterManager for ClusterManagerApi {
    async fn status(
        &self,
        _: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::ClusterManagerStatus>, Status> {
        Ok(Response::new(self.own_status().await.0))
    }

    async fn reload(
        &self,
        _: Request<v1::ReloadRequest>,
    ) -> Result<Response<v1::ReloadReply>, Status> {
        Ok(Response::new(self.shared.config.reload().into()))
    }

    async fn daemon_statuses(
        &self,
        _: Request<v1::DaemonStatusesRequest>,
    ) -> Result<Response<v1::DaemonStatusesReply>, Status> {
        let (own, st) = self.own_status().await;
        Ok(Response::new(crate::control_api::daemon_statuses(
            &self.shared.runtime_dir,
            own,
            st,
        )))
    }

    async fn list_farms(
        &self,
        _: Request<v1::ListFarmsRequest>,
    ) -> Result<Response<v1::ListFarmsReply>, Status> {
        crate::control_api::list_farms(&self.shared.runtime_dir)
            .await
            .map(Response::new)
    }

    async fn read_config(
        &self,
        _: Request<v1::ReadConfigRequest>,
    ) -> Result<Response<v1::ReadConfigReply>, Status> {
        crate::control_api::read_config(&self.shared.config_dir)
            .await
            .map(Response::new)
    }

    async fn create_cluster(
        &self,
        req: Request<v1::CreateClusterRequest>,
    ) -> Result<Response<BoxStream<v1::CreateClusterProgress>>, Status> {
        let req = req.into_inner();
        let ctx = self.create.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        // The creation runs to its end even if the operator's CLI goes away:
        // stopping half-way would leave the peer half-joined.
        tokio::spawn(async move { crate::create::create_cluster(&ctx, req, tx).await });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn peer_host_key(
        &self,
        req: Request<v1::PeerHostKeyRequest>,
    ) -> Result<Response<v1::PeerHostKeyReply>, Status> {
        let req = req.into_inner();
        let ip: std::net::IpAddr = req.remote_ip.parse().map_err(|_| {
            Status::invalid_argument(format!("`{}` is not an IP address", req.remote_ip))
        })?;
        let addr = std::net::SocketAddr::new(ip, self.create.ssh_port);
        let key = tandem_ssh::peer_host_key(addr)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let reply = v1::PeerHostKeyReply {
            address: addr.to_string(),
            algorithm: key.algorithm().to_string(),
            fingerprint: tandem_ssh::sha256(&key),
            public_key: key.to_openssh().unwrap_or_default(),
        };
        tracing::info!(peer = %addr, "cluster create: {addr} presents the host key {} {} (to be confirmed by the operator)", reply.algorithm, reply.fingerprint);
        Ok(Response::new(reply))
    }

    async fn show_cluster(
        &self,
        _: Request<v1::ShowClusterRequest>,
    ) -> Result<Response<v1::ClusterInfo>, Status> {
        Ok(Response::new(cluster_info(&self.shared)))
    }

    async fn list_nodes(
        &self,
        _: Request<v1::ListNodesRequest>,
    ) -> Result<Response<v1::NodeTable>, Status> {
        Ok(Response::new(self.node_table().await))
    }

    async fn edit_cluster(
        &self,
        req: Request<v1::EditClusterRequest>,
    ) -> Result<Response<v1::ClusterInfo>, Status> {
        let req = req.into_inner();
        let path = self.shared.config_dir.join(tandem_config::CLUSTER_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            Status::failed_precondition(format!(
                "this node is standalone ({}: {e}); create a cluster first",
                path.display()
            ))
        })?;
        let new =
            crate::edit::edit_cluster_toml(&text, &req).map_err(Status::failed_precondition)?;
        let reply = self
            .apply_change_inner(vec![Change {
                path: tandem_config::CLUSTER_FILE.into(),
                content: Some(new.into_bytes()),
            }])
            .await?;
        if !reply.applied {
            return Err(Status::invalid_argument(format!(
                "the edited cluster.toml would be invalid, nothing changed: {}",
                reply.errors.join("; ")
            )));
        }
        // Pending replication (the peer unreachable) is not a failure: the
        // edit is in force here and reaches the peer when it returns.
        if !reply.errors.is_empty()
            || (!reply.replication_error.is_empty() && !reply.replication_pending)
        {
            let mut problems = reply.errors.clone();
            if !reply.replication_error.is_empty() {
                problems.push(reply.replication_error.clone());
            }
            // Written here: the operator must still hear what went wrong.
            return Err(Status::aborted(format!(
                "cluster.toml changed on this node, but: {}",
                problems.join("; ")
            )));
        }
        let mut info = cluster_info(&self.shared);
        info.replication_pending = reply.replication_pending;
        info.replication_error = reply.replication_error;
        Ok(Response::new(info))
    }

    async fn destroy_cluster(
        &self,
        req: Request<v1::DestroyClusterRequest>,
    ) -> Result<Response<v1::DestroyClusterReply>, Status> {
        let _one = self.shared.change_lock.lock().await;
        crate::destroy::destroy_cluster(&self.create, req.into_inner())
            .await
            .map(Response::new)
            .map_err(|e| Status::failed_precondition(format!("{e:#}")))
    }

    async fn set_node_maintenance(
        &self,
        req: Request<v1::SetNodeMaintenanceRequest>,
    ) -> Result<Response<v1::NodeTable>, Status> {
        let req = req.into_inner();
        let loaded = self.shared.config.current();
        let me = loaded.config.node.name.clone();
        let word = if req.enabled { "enabled" } else { "disabled" };
        if loaded.config.cluster.is_none() {
            return Err(Status::failed_precondition(format!(
                "{me} is standalone (no cluster.toml): there is no peer to hand the traffic to, so there is no maintenance to {}; a standalone node serves until it is stopped",
                if req.enabled { "enter" } else { "leave" }
            )));
        }
        if req.node.is_empty() || req.node == me {
            let s = local::set_maintenance(&self.shared.runtime_dir, req.enabled)
                .await
                .map_err(Status::unavailable)?;
            let msg = format!(
                "maintenance {word} on {me} by the operator (vrrpd now {})",
                crate::orchestrate::state_word(s.state())
            );
            tracing::info!("{msg}");
            self.shared.event("maintenance", msg);
        } else if peer_of(&loaded.config).is_some_and(|p| p.0 == req.node) {
            let fwd = v1::SetNodeMaintenanceRequest {
                node: String::new(),
                enabled: req.enabled,
            };
            tracing::info!(peer = %req.node, "forwarding maintenance {word} to the peer");
            self.shared
                .peer
                .call(&self.shared.config, |mut c| async move {
                    c.set_node_maintenance(fwd).await
                })
                .await
                .map_err(|e| match e {
                    PeerError::Refused { .. } => Status::failed_precondition(e.to_string()),
                    _ => Status::unavailable(e.to_string()),
                })?;
        } else {
            return Err(Status::invalid_argument(format!(
                "no node `{}` in this cluster (nodes: {})",
                req.node,
                std::iter::once(me)
                    .chain(peer_of(&loaded.config).map(|p| p.0))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(Response::new(self.node_table().await))
    }

    async fn apply_change(
        &self,
        req: Request<v1::ConfigChange>,
    ) -> Result<Response<v1::ApplyChangeReply>, Status> {
        let changes = changes_of(req.into_inner());
        replicate::check_batch(&changes).map_err(Status::invalid_argument)?;
        Ok(Response::new(self.apply_change_inner(changes).await?))
    }

    async fn replicate_change(
        &self,
        req: Request<v1::ConfigChange>,
    ) -> Result<Response<v1::ApplyChangeReply>, Status> {
        let req = req.into_inner();
        // A master never takes a change from its peer (split brain: the
        // operator's change on this side wins until one side steps down).
        if let local::Probe::Running(s) = local::vrrpd_status(&self.shared.runtime_dir).await
            && s.state() == v1::VrrpState::Master
        {
            tracing::warn!(from = %req.from_node, file = %req.path, "refused a replicated change: this node is master");
            return Err(Status::failed_precondition(format!(
                "{} is master and does not take changes from its peer",
                self.shared.node_name()
            )));
        }
        let _one = self.shared.change_lock.lock().await;
        {
            let mut last = self
                .shared
                .peer_sequence
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if req.sequence <= *last {
                tracing::warn!(from = %req.from_node, file = %req.path, sequence = req.sequence, last = *last, "refused a stale replicated change");
                return Err(Status::failed_precondition(format!(
                    "stale change: sequence {} is not after {}",
                    req.sequence, *last
                )));
            }
            *last = req.sequence;
        }
        let (from, sequence) = (req.from_node.clone(), req.sequence);
        let changes = changes_of(req);
        let what = describe(&changes);
        let reply = self.apply_here(&changes).await?;
        if reply.applied {
            tracing::info!(from = %from, file = %what, sequence, "applied a change of {what} replicated by the master {from}");
        }
        Ok(Response::new(reply))
    }

    async fn preflight(
        &self,
        _: Request<v1::PreflightRequest>,
    ) -> Result<Response<v1::PreflightReply>, Status> {
        crate::create::facts::local_facts(&self.shared.config_dir)
            .await
            .map(Response::new)
            .map_err(|e| Status::internal(format!("{e:#}")))
    }

    async fn watch_events(
        &self,
        _: Request<v1::WatchEventsRequest>,
    ) -> Result<Response<BoxStream<v1::ClusterEvent>>, Status> {
        let stream = BroadcastStream::new(self.shared.events.subscribe())
            .map(|e| e.map_err(|e| Status::data_loss(format!("events lost: {e}"))));
        Ok(Response::new(Box::pin(stream)))
    }
}

fn cluster_info(shared: &Shared) -> v1::ClusterInfo {
    let loaded = shared.config.current();
    let Some(c) = &loaded.config.cluster else {
        return v1::ClusterInfo::default();
    };
    v1::ClusterInfo {
        clustered: true,
        virtual_router_id: u32::from(c.virtual_router_id),
        interface: loaded
            .config
            .node
            .cluster_interface
            .clone()
            .unwrap_or_default(),
        failback: c.failback.to_string(),
        check_interval_ms: c.vrrp.advert_interval_ms,
        tracked_interfaces: c.tracked_interfaces.clone(),
        floating_ips: c
            .floating_ips
            .iter()
            .map(|f| v1::FloatingIpInfo {
                address: format!("{}/{}", f.address.addr, f.address.prefix_len),
                interface: f.interface.clone(),
            })
            .collect(),
        ..Default::default()
    }
}

/// The files of a change request.
fn changes_of(req: v1::ConfigChange) -> Vec<Change> {
    if req.files.is_empty() {
        return vec![Change {
            path: req.path,
            content: req.content,
        }];
    }
    req.files
        .into_iter()
        .map(|f| Change {
            path: f.path,
            content: f.content,
        })
        .collect()
}

/// The message replicating `changes` to the peer.
fn to_message(changes: &[Change], sequence: u64, from_node: String) -> v1::ConfigChange {
    match changes {
        [one] => v1::ConfigChange {
            path: one.path.clone(),
            content: one.content.clone(),
            sequence,
            from_node,
            files: Vec::new(),
        },
        many => v1::ConfigChange {
            sequence,
            from_node,
            files: many
                .iter()
                .map(|c| v1::FileChange {
                    path: c.path.clone(),
                    content: c.content.clone(),
                })
                .collect(),
            ..Default::default()
        },
    }
}

/// How logs and events name a change: its file, or its files.
fn describe(changes: &[Change]) -> String {
    match changes {
        [one] => one.path.clone(),
        many => format!(
            "{} files ({})",
            many.len(),
            many.iter()
                .map(|c| c.path.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}
