//! The gRPC face of conntrack-syncd.

use std::sync::Arc;

use tandem_proto::v1::{self, SyncRole, conntrack_sync_server::ConntrackSync};
use tandem_runtime::ConfigCell;
use tonic::{Request, Response, Status};

pub struct ConntrackSyncApi {
    pub config: Arc<ConfigCell>,
}

#[tonic::async_trait]
impl ConntrackSync for ConntrackSyncApi {
    async fn status(
        &self,
        _: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::ConntrackSyncStatus>, Status> {
        let loaded = self.config.current();
        let mut status = v1::ConntrackSyncStatus {
            daemon: Some(self.config.daemon_info()),
            ..Default::default()
        };
        match &loaded.config.cluster {
            None => status.set_role(SyncRole::Standalone),
            Some(cluster) => {
                // Until clustermanager assigns a direction, none is taken.
                status.set_role(SyncRole::Unspecified);
                if let Some(peer) = cluster
                    .nodes
                    .iter()
                    .find(|n| n.name != loaded.config.node.name)
                {
                    status.peer =
                        std::net::SocketAddr::new(peer.address, cluster.sync.conntrack_port)
                            .to_string();
                }
            }
        }
        Ok(Response::new(status))
    }

    async fn reload(
        &self,
        _: Request<v1::ReloadRequest>,
    ) -> Result<Response<v1::ReloadReply>, Status> {
        Ok(Response::new(self.config.reload().into()))
    }
}
