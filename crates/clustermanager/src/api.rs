//! The gRPC face of clustermanager.

use std::sync::Arc;

use tandem_proto::v1::{self, NodeRole, cluster_manager_server::ClusterManager};
use tandem_runtime::ConfigCell;
use tonic::{Request, Response, Status};

pub struct ClusterManagerApi {
    pub config: Arc<ConfigCell>,
}

#[tonic::async_trait]
impl ClusterManager for ClusterManagerApi {
    async fn status(
        &self,
        _: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::ClusterManagerStatus>, Status> {
        let loaded = self.config.current();
        let mut status = v1::ClusterManagerStatus {
            daemon: Some(self.config.daemon_info()),
            clustered: loaded.config.cluster.is_some(),
            ..Default::default()
        };
        if loaded.config.cluster.is_none() {
            status.set_role(NodeRole::Standalone);
            status.message = "standalone node (no cluster.toml)".into();
        } else {
            // Role orchestration is not part of this build: the role is
            // unknown rather than guessed.
            status.set_role(NodeRole::Unspecified);
            status.message = "clustered; role orchestration is not running in this build".into();
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
