//! The local datapath as lb-forwarder reports it: its cheap Status at
//! every poll, and its farms (which read the kernel's counters) only when
//! Status shows a change or every few seconds.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tandem_proto::v1::{
    self, BackendAdminState, BackendHealth, lb_forwarder_client::LbForwarderClient,
};

use crate::decide::{FarmView, ForwarderView};

/// Farms are read again at least this often (health turning from unknown
/// to passing does not show in Status).
const FARMS_REFRESH: Duration = Duration::from_secs(2);
/// A call that takes longer counts as unanswered.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// What Status says that would change the farms' view.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint {
    loaded: bool,
    loaded_unix_ms: i64,
    generation: u64,
    healthy: u32,
}

pub struct Forwarder {
    runtime_dir: PathBuf,
    client: Option<LbForwarderClient<tonic::transport::Channel>>,
    last: Option<(Fingerprint, Instant, ForwarderView)>,
}

/// A farm can serve: a backend in rotation whose health check passed.
pub fn farm_view(f: &v1::FarmState) -> Option<FarmView> {
    let vip = f.vip.parse().ok()?;
    let healthy = !f.all_backends_down
        && f.backends.iter().any(|b| {
            b.admin_state() == BackendAdminState::Up && b.health() == BackendHealth::Healthy
        });
    Some(FarmView {
        name: f.name.clone(),
        vip,
        dsr: f.forwarding == "dsr",
        healthy,
    })
}

impl Forwarder {
    pub fn new(runtime_dir: &Path) -> Forwarder {
        Forwarder {
            runtime_dir: runtime_dir.to_owned(),
            client: None,
            last: None,
        }
    }

    /// One poll: lb-forwarder's view, or why it did not answer.
    pub async fn poll(&mut self, now: Instant) -> Result<ForwarderView, String> {
        match tokio::time::timeout(CALL_TIMEOUT * 2, self.poll_inner(now)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                self.client = None;
                Err(e)
            }
            Err(_) => {
                self.client = None;
                Err(format!("no answer within {:?}", CALL_TIMEOUT * 2))
            }
        }
    }

    async fn poll_inner(&mut self, now: Instant) -> Result<ForwarderView, String> {
        if self.client.is_none() {
            let ch = tandem_runtime::connect(&self.runtime_dir, "lb-forwarder")
                .await
                .map_err(|e| e.to_string())?;
            self.client = Some(LbForwarderClient::new(ch));
        }
        let Some(client) = self.client.as_mut() else {
            return Err("no connection".to_owned());
        };
        let status = client
            .status(v1::StatusRequest {})
            .await
            .map_err(|e| format!("Status: {}", e.message()))?
            .into_inner();
        let fp = Fingerprint {
            loaded: status.datapath_loaded,
            loaded_unix_ms: status.datapath_loaded_unix_ms,
            generation: status.daemon.as_ref().map_or(0, |d| d.config_generation),
            healthy: status.backends_healthy,
        };
        if let Some((last_fp, at, view)) = &self.last
            && *last_fp == fp
            && now.saturating_duration_since(*at) < FARMS_REFRESH
        {
            return Ok(view.clone());
        }
        let farms = client
            .list_farms(v1::ListFarmsRequest {})
            .await
            .map_err(|e| format!("ListFarms: {}", e.message()))?
            .into_inner()
            .farms;
        let view = ForwarderView {
            loaded: fp.loaded,
            farms: farms.iter().filter_map(farm_view).collect(),
        };
        self.last = Some((fp, now, view.clone()));
        Ok(view)
    }
}
