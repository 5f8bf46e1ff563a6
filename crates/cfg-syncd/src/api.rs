//! The gRPC face of cfg-syncd.

use std::sync::Arc;

use tandem_proto::v1::{self, SyncDirection, cfg_sync_server::CfgSync};
use tandem_runtime::ConfigCell;
use tonic::{Request, Response, Status};

pub struct CfgSyncApi {
    pub config: Arc<ConfigCell>,
}

#[tonic::async_trait]
impl CfgSync for CfgSyncApi {
    async fn status(
        &self,
        _: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::CfgSyncStatus>, Status> {
        let loaded = self.config.current();
        let mut status = v1::CfgSyncStatus {
            daemon: Some(self.config.daemon_info()),
            ..Default::default()
        };
        // Until clustermanager assigns a direction, nothing is pushed.
        status.set_direction(SyncDirection::None);
        if let Some(cluster) = &loaded.config.cluster
            && let Some(peer) = cluster
                .nodes
                .iter()
                .find(|n| n.name != loaded.config.node.name)
        {
            status.peer =
                std::net::SocketAddr::new(peer.address, cluster.sync.ssh_port).to_string();
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
