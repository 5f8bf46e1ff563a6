//! The active-active side of clustermanager's RPCs: command replication to
//! every other node, the node table of N nodes, maintenance through routed.

use futures::future::join_all;
use tandem_config::Config;
use tandem_proto::v1::{self, NodeHealth, NodeRole};
use tonic::Status;

use crate::active;
use crate::api::ClusterManagerApi;
use crate::local;
use crate::peer::PeerError;

impl ClusterManagerApi {
    /// Replicates an applied change to every other node at once; records in
    /// `reply` whether all took it, which could not be reached (the change
    /// is then pending for them: cfg-syncd carries the files when they
    /// return) and which refused it.
    pub(crate) async fn replicate_to_members(
        &self,
        what: &str,
        sequence: u64,
        msg: v1::ConfigChange,
        reply: &mut v1::ApplyChangeReply,
    ) {
        let loaded = self.shared.config.current();
        let others = active::others(&loaded.config);
        let calls = others.iter().map(|(name, _)| {
            let link = self.shared.members.link(name);
            let msg = msg.clone();
            let config = &self.shared.config;
            async move {
                let r = link
                    .call_now(config, |mut c| async move { c.replicate_change(msg).await })
                    .await;
                (name.clone(), r)
            }
        });
        let mut done = Vec::new();
        let mut away = Vec::new();
        let mut refused = Vec::new();
        for (name, r) in join_all(calls).await {
            match r {
                Ok(r) if r.applied => done.push(name),
                Ok(r) => refused.push(format!("{name} refused it: {}", r.errors.join("; "))),
                Err(e @ PeerError::Refused { .. }) => refused.push(format!("{name}: {e}")),
                Err(e) => away.push(format!("{name}: {e}")),
            }
        }
        reply.replicated = away.is_empty() && refused.is_empty();
        reply.replication_pending = !away.is_empty() && refused.is_empty();
        reply.replication_error = refused
            .iter()
            .chain(away.iter())
            .cloned()
            .collect::<Vec<_>>()
            .join("; ");
        let node = loaded.config.node.name.clone();
        if reply.replicated {
            tracing::info!(file = %what, sequence, node = %node, "change of {what} replicated to {}", done.join(", "));
            self.shared.event(
                "change",
                format!("{what} applied and replicated to {}", done.join(", ")),
            );
        } else if reply.replication_pending {
            tracing::warn!(file = %what, sequence, node = %node, "change of {what} applied here and on [{}]; it will be replicated to the others when they return: {}", done.join(", "), reply.replication_error);
            self.shared.event(
                "change",
                format!(
                    "{what} applied here; it will be replicated when they return ({})",
                    reply.replication_error
                ),
            );
        } else {
            tracing::warn!(file = %what, sequence, node = %node, "change of {what} applied here, not replicated everywhere: {}", reply.replication_error);
            self.shared.event(
                "change",
                format!(
                    "{what} applied here, not replicated everywhere: {}",
                    reply.replication_error
                ),
            );
        }
    }

    /// Every node of the cluster, in cluster.toml's order: this one judged
    /// here, the others as their clustermanager judges itself (grey when it
    /// cannot be asked).
    pub(crate) async fn members_table(&self) -> v1::NodeTable {
        let loaded = self.shared.config.current();
        let me = loaded.config.node.name.clone();
        let Some(cluster) = loaded.config.cluster.as_ref() else {
            return v1::NodeTable::default();
        };
        let asks = cluster.nodes.iter().filter(|n| n.name != me).map(|n| {
            let link = self.shared.members.link(&n.name);
            let config = &self.shared.config;
            let name = n.name.clone();
            async move { (name, link.status_now(config).await) }
        });
        let (local, remote) = tokio::join!(node_table_local(self), join_all(asks));
        let mut remote: std::collections::HashMap<String, _> = remote.into_iter().collect();
        let nodes = cluster
            .nodes
            .iter()
            .map(|n| {
                if n.name == me {
                    return v1::NodeEntry {
                        name: me.clone(),
                        local: true,
                        role: local.role.into(),
                        address: n.address.to_string(),
                        hostname: me.clone(),
                        health: local.health.into(),
                        message: local.message.clone(),
                        ..Default::default()
                    };
                }
                let mut row = v1::NodeEntry {
                    name: n.name.clone(),
                    local: false,
                    address: n.address.to_string(),
                    hostname: n.name.clone(),
                    ..Default::default()
                };
                match remote.remove(&n.name) {
                    Some(Ok(s)) => {
                        row.role = s.role;
                        row.health = s.health;
                        row.message = s.message;
                        if let Some(d) = s.daemon {
                            row.hostname = d.node_name;
                        }
                    }
                    Some(Err(e)) => {
                        row.set_role(NodeRole::Unspecified);
                        row.set_health(NodeHealth::Unreachable);
                        row.message = e.to_string();
                    }
                    None => {
                        row.set_health(NodeHealth::Unreachable);
                    }
                }
                row
            })
            .collect();
        v1::NodeTable { nodes }
    }

    /// `node maintenance` in an active-active cluster: routed's
    /// SetMaintenance here, or forwarded to the node named.
    pub(crate) async fn members_maintenance(
        &self,
        me: &str,
        config: &Config,
        req: v1::SetNodeMaintenanceRequest,
    ) -> Result<(), Status> {
        let word = if req.enabled { "enabled" } else { "disabled" };
        if req.node.is_empty() || req.node == me {
            let s = local::set_routed_maintenance(
                &self.shared.runtime_dir,
                req.enabled,
                req.reason.trim(),
            )
            .await
            .map_err(Status::unavailable)?;
            let announced = s.vips.iter().filter(|v| v.announced).count();
            let reason = if req.reason.trim().is_empty() {
                String::new()
            } else {
                format!(" ({})", req.reason.trim())
            };
            let msg = if req.enabled {
                format!(
                    "maintenance enabled on {me} by the operator{reason}: its VIPs are withdrawn from the routers ({announced} still announced)"
                )
            } else {
                format!(
                    "maintenance disabled on {me} by the operator: its VIPs are announced again ({announced} announced)"
                )
            };
            tracing::info!(node = %me, "{msg}");
            self.shared.event("maintenance", msg);
            return Ok(());
        }
        if !active::others(config).iter().any(|(n, _)| *n == req.node) {
            let names: Vec<String> = config
                .cluster
                .iter()
                .flat_map(|c| c.nodes.iter().map(|n| n.name.clone()))
                .collect();
            return Err(Status::invalid_argument(format!(
                "no node `{}` in this cluster (nodes: {})",
                req.node,
                names.join(", ")
            )));
        }
        let fwd = v1::SetNodeMaintenanceRequest {
            node: String::new(),
            enabled: req.enabled,
            reason: req.reason.clone(),
        };
        tracing::info!(node = %req.node, "forwarding maintenance {word} to {}", req.node);
        self.shared
            .members
            .link(&req.node)
            .call(&self.shared.config, |mut c| async move {
                c.set_node_maintenance(fwd).await
            })
            .await
            .map_err(|e| match e {
                PeerError::Refused { .. } => Status::failed_precondition(e.to_string()),
                _ => Status::unavailable(e.to_string()),
            })?;
        Ok(())
    }
}

async fn node_table_local(api: &ClusterManagerApi) -> crate::node_table::Verdict {
    crate::node_table::local_verdict(&api.shared).await.0
}
