//! The gRPC face of lb-forwarder.

use std::sync::Arc;

use tandem_proto::v1::{self, lb_forwarder_server::LbForwarder};
use tandem_runtime::ConfigCell;
use tonic::{Request, Response, Status};

pub struct LbForwarderApi {
    pub config: Arc<ConfigCell>,
}

#[tonic::async_trait]
impl LbForwarder for LbForwarderApi {
    async fn status(
        &self,
        _: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::LbForwarderStatus>, Status> {
        let loaded = self.config.current();
        let farms = &loaded.config.farms;
        Ok(Response::new(v1::LbForwarderStatus {
            daemon: Some(self.config.daemon_info()),
            farms: count(farms.len()),
            backends: count(farms.iter().map(|f| f.backends.len()).sum()),
            // No health checks and no datapath in this build: nothing is
            // known healthy and no table is loaded.
            backends_healthy: 0,
            datapath_loaded: false,
            datapath_loaded_unix_ms: 0,
        }))
    }

    async fn reload(
        &self,
        _: Request<v1::ReloadRequest>,
    ) -> Result<Response<v1::ReloadReply>, Status> {
        Ok(Response::new(self.config.reload().into()))
    }
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
