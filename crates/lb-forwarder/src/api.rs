//! The gRPC face of lb-forwarder: farms with backend states and counters
//! read back from the kernel, operator overrides, reload.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lb_forwarder::datapath::{Datapath, DatapathState};
use lb_forwarder::health::{self, BackendHealth as Checked, HealthEvent};
use lb_forwarder::nft;
use lb_forwarder::ruleset::{self, BackendKey, Count};
use tandem_config::{BackendState, Farm};
use tandem_proto::v1::{self, BackendAdminState, BackendHealth, lb_forwarder_server::LbForwarder};
use tandem_runtime::{ConfigCell, Shutdown, unix_ms};
use tokio::sync::{broadcast, watch};
use tokio_stream::wrappers::BroadcastStream;
use tonic::{Request, Response, Status};

pub struct LbForwarderApi {
    pub config: Arc<ConfigCell>,
    pub datapath: Arc<Datapath>,
    /// The health checks' view of every probed backend.
    pub health: watch::Receiver<HashMap<BackendKey, Checked>>,
    /// A receiver kept to resubscribe each WatchHealth caller.
    pub events: broadcast::Receiver<HealthEvent>,
    pub shutdown: Shutdown,
}

/// What tonic's generated trait expects of a server-streaming RPC.
type BoxStream<T> =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send + 'static>>;

fn wire_health(h: health::Health) -> BackendHealth {
    match h {
        health::Health::Unknown => BackendHealth::Unknown,
        health::Health::Healthy => BackendHealth::Healthy,
        health::Health::Failing => BackendHealth::Failing,
    }
}

fn admin(s: BackendState) -> BackendAdminState {
    match s {
        BackendState::Up => BackendAdminState::Up,
        BackendState::Down => BackendAdminState::Down,
        BackendState::Drain => BackendAdminState::Drain,
        BackendState::Maintenance => BackendAdminState::Maintenance,
    }
}

/// The state as the operator typed it (`tandemctl backend set … drain`).
fn state_name(s: BackendState) -> &'static str {
    match s {
        BackendState::Up => "up",
        BackendState::Down => "down",
        BackendState::Drain => "drain",
        BackendState::Maintenance => "maintenance",
    }
}

fn counters(c: Option<&Count>) -> Option<v1::Counters> {
    let c = c.copied().unwrap_or_default();
    Some(v1::Counters {
        packets: c.packets,
        bytes: c.bytes,
    })
}

/// Kernel facts read once per request: counters and connections per mark.
struct Kernel {
    counters: HashMap<String, Count>,
    connections: HashMap<u32, u64>,
}

async fn kernel() -> Kernel {
    Kernel {
        counters: nft::read_counters().await.unwrap_or_default(),
        connections: nft::connections_by_mark().await.unwrap_or_default(),
    }
}

fn farm_state(
    farm: &Farm,
    dp: &DatapathState,
    k: &Kernel,
    checks: &HashMap<BackendKey, Checked>,
) -> v1::FarmState {
    let plan = dp.plans.iter().find(|p| p.farm == farm.name);
    let backends: Vec<v1::BackendState> = farm
        .backends
        .iter()
        .map(|b| {
            let key = BackendKey::of(farm, b);
            let state = dp.overrides.get(&key).copied().unwrap_or(b.state);
            let mut s = v1::BackendState {
                address: b.address.to_string(),
                port: u32::from(farm.check_port(b)),
                weight: u32::from(b.weight),
                counters: counters(k.counters.get(&ruleset::backend_counter(&key))),
                active_connections: u32::try_from(
                    k.connections.get(&key.mark()).copied().unwrap_or(0),
                )
                .unwrap_or(u32::MAX),
                ..Default::default()
            };
            s.set_admin_state(admin(state));
            match checks.get(&key) {
                Some(c) => {
                    s.set_health(wire_health(c.health));
                    s.last_check = c.reason.clone();
                }
                // Not probed: down or in maintenance.
                None => s.set_health(BackendHealth::Unknown),
            }
            s
        })
        .collect();
    let mut f = v1::FarmState {
        name: farm.name.clone(),
        vip: farm.vip.to_string(),
        port_first: u32::from(farm.port.first),
        port_last: u32::from(farm.port.last),
        protocol: farm.protocol.as_str().replace("tcp+udp", "both"),
        scheduler: format!("{:?}", farm.scheduler).to_lowercase(),
        forwarding: format!("{:?}", farm.forwarding).to_lowercase(),
        snat_address: farm.snat_address.map(|a| a.to_string()).unwrap_or_default(),
        counters: {
            let total = farm.backends.iter().fold(Count::default(), |t, b| {
                let c = k
                    .counters
                    .get(&ruleset::backend_counter(&BackendKey::of(farm, b)))
                    .copied()
                    .unwrap_or_default();
                Count {
                    packets: t.packets + c.packets,
                    bytes: t.bytes + c.bytes,
                }
            });
            counters(Some(&total))
        },
        all_backends_down: plan.is_none_or(|p| p.rotation.is_empty()),
        backends,
    };
    if f.backends.is_empty() {
        f.all_backends_down = true;
    }
    f
}

#[tonic::async_trait]
impl LbForwarder for LbForwarderApi {
    async fn status(
        &self,
        _: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::LbForwarderStatus>, Status> {
        let loaded = self.config.current();
        let farms = &loaded.config.farms;
        let dp = self.datapath.state.borrow().clone();
        let in_rotation: usize = dp.plans.iter().map(|p| p.rotation.len()).sum();
        Ok(Response::new(v1::LbForwarderStatus {
            daemon: Some(self.config.daemon_info()),
            farms: u32::try_from(farms.len()).unwrap_or(u32::MAX),
            backends: u32::try_from(farms.iter().map(|f| f.backends.len()).sum::<usize>())
                .unwrap_or(u32::MAX),
            backends_healthy: u32::try_from(in_rotation).unwrap_or(u32::MAX),
            datapath_loaded: dp.loaded,
            datapath_loaded_unix_ms: dp.loaded_at.map(unix_ms).unwrap_or(0),
        }))
    }

    async fn reload(
        &self,
        _: Request<v1::ReloadRequest>,
    ) -> Result<Response<v1::ReloadReply>, Status> {
        Ok(Response::new(self.config.reload().into()))
    }

    async fn list_farms(
        &self,
        _: Request<v1::ListFarmsRequest>,
    ) -> Result<Response<v1::ListFarmsReply>, Status> {
        let loaded = self.config.current();
        let dp = self.datapath.state.borrow().clone();
        let k = kernel().await;
        let checks = self.health.borrow().clone();
        let farms = loaded
            .config
            .farms
            .iter()
            .map(|f| farm_state(f, &dp, &k, &checks))
            .collect();
        Ok(Response::new(v1::ListFarmsReply { farms }))
    }

    async fn get_farm(
        &self,
        req: Request<v1::GetFarmRequest>,
    ) -> Result<Response<v1::FarmState>, Status> {
        let name = req.into_inner().name;
        let loaded = self.config.current();
        let farm = loaded
            .config
            .farms
            .iter()
            .find(|f| f.name == name)
            .ok_or_else(|| Status::not_found(format!("no farm `{name}`")))?;
        let dp = self.datapath.state.borrow().clone();
        let checks = self.health.borrow().clone();
        Ok(Response::new(farm_state(
            farm,
            &dp,
            &kernel().await,
            &checks,
        )))
    }

    async fn watch_health(
        &self,
        _: Request<v1::WatchHealthRequest>,
    ) -> Result<Response<BoxStream<v1::HealthChange>>, Status> {
        let mut shutdown = self.shutdown.clone();
        let stream = BroadcastStream::new(self.events.resubscribe())
            .filter_map(|e| async move {
                match e {
                    Ok(e) => Some(Ok(v1::HealthChange {
                        farm: e.key.farm.clone(),
                        address: e.key.address.to_string(),
                        port: u32::from(e.target.port()),
                        old_health: wire_health(e.old).into(),
                        new_health: wire_health(e.new).into(),
                        reason: e.reason,
                        unix_ms: unix_ms(e.at),
                    })),
                    Err(e) => Some(Err(Status::data_loss(format!(
                        "health changes lost: {e}; read ListFarms again"
                    )))),
                }
            })
            .take_until(async move { shutdown.wait().await });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn set_backend_state(
        &self,
        req: Request<v1::SetBackendStateRequest>,
    ) -> Result<Response<v1::FarmState>, Status> {
        let req = req.into_inner();
        let loaded = self.config.current();
        let farm = loaded
            .config
            .farms
            .iter()
            .find(|f| f.name == req.farm)
            .ok_or_else(|| Status::not_found(format!("no farm `{}`", req.farm)))?;
        let address: std::net::IpAddr = req.address.parse().map_err(|_| {
            Status::invalid_argument(format!("`{}` is not an IP address", req.address))
        })?;
        let backend = farm
            .backends
            .iter()
            .find(|b| {
                b.address == address && (req.port == 0 || u32::from(farm.check_port(b)) == req.port)
            })
            .ok_or_else(|| {
                Status::not_found(format!(
                    "farm `{}` has no backend {}:{}",
                    farm.name, req.address, req.port
                ))
            })?;
        let state = match req.state() {
            BackendAdminState::Up => BackendState::Up,
            BackendAdminState::Down => BackendState::Down,
            BackendAdminState::Drain => BackendState::Drain,
            BackendAdminState::Maintenance => BackendState::Maintenance,
            BackendAdminState::Unspecified => {
                return Err(Status::invalid_argument(
                    "say which state: up, down, drain or maintenance",
                ));
            }
        };
        let key = BackendKey::of(farm, backend);
        let target = std::net::SocketAddr::new(address, farm.check_port(backend));
        tracing::info!(
            farm = %farm.name,
            backend = %target,
            state = state_name(state),
            "farm {}: backend {target} set to {} by the operator",
            farm.name,
            state_name(state)
        );
        let wanted = (state != backend.state).then_some(state);
        self.datapath.set_override(key.clone(), wanted);
        // Answer once the datapath has taken it in.
        let mut rx = self.datapath.state.subscribe();
        let _ = tokio::time::timeout(
            Duration::from_secs(3),
            rx.wait_for(|s| s.overrides.get(&key).copied() == wanted),
        )
        .await;
        let dp = self.datapath.state.borrow().clone();
        let checks = self.health.borrow().clone();
        Ok(Response::new(farm_state(
            farm,
            &dp,
            &kernel().await,
            &checks,
        )))
    }
}
