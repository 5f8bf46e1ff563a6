//! The gRPC face of lb-forwarder: farms with backend states, counters and
//! rates read back from the kernel, the connection table, operator
//! overrides, reload, and the health and rotation streams.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lb_forwarder::conns;
use lb_forwarder::datapath::{BackendEvent, Datapath, DatapathState};
use lb_forwarder::health::{self, BackendHealth as Checked, HealthEvent};
use lb_forwarder::nft;
use lb_forwarder::rates::{CounterNames, Rates, Sampler};
use lb_forwarder::ruleset::{self, BackendKey, Count};
use lb_forwarder::sched::Load;
use tandem_config::{BackendState, Farm, OnBackendFailure};
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
    /// The counters sampled once a second, for rates.
    pub sampler: Arc<Sampler>,
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

fn counters(c: Count) -> Option<v1::Counters> {
    Some(v1::Counters {
        packets: c.packets,
        bytes: c.bytes,
    })
}

fn wire_rates(r: Rates) -> Option<v1::Rates> {
    Some(v1::Rates {
        cps: r.cps,
        in_pps: r.in_pps,
        out_pps: r.out_pps,
        in_bps: r.in_bps,
        out_bps: r.out_bps,
    })
}

fn names(key: &BackendKey) -> CounterNames {
    CounterNames {
        conn: ruleset::backend_conn_counter(key),
        inbound: ruleset::backend_in_counter(key),
        outbound: ruleset::backend_out_counter(key),
    }
}

/// Kernel facts read once per request: counters and connections per mark.
struct Kernel {
    counters: HashMap<String, Count>,
    loads: HashMap<u32, Load>,
}

impl Kernel {
    fn get(&self, name: &str) -> Count {
        self.counters.get(name).copied().unwrap_or_default()
    }

    /// (in, out, new connections) of one backend.
    fn traffic(&self, key: &BackendKey) -> (Count, Count, u64) {
        (
            self.get(&ruleset::backend_in_counter(key)),
            self.get(&ruleset::backend_out_counter(key)),
            self.get(&ruleset::backend_conn_counter(key)).packets,
        )
    }

    fn load(&self, key: &BackendKey) -> Load {
        self.loads.get(&key.mark()).copied().unwrap_or_default()
    }
}

async fn kernel() -> Kernel {
    let records = conns::dump_async().await.unwrap_or_default();
    Kernel {
        counters: nft::read_counters().await.unwrap_or_default(),
        loads: conns::loads_by_mark(&records),
    }
}

fn count32(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn farm_state(
    farm: &Farm,
    dp: &DatapathState,
    k: &Kernel,
    checks: &HashMap<BackendKey, Checked>,
    sampler: &Sampler,
) -> v1::FarmState {
    let plan = dp.plans.iter().find(|p| p.farm == farm.name);
    let mut totals = (Count::default(), Count::default(), 0u64);
    let mut rates = Rates::default();
    let backends: Vec<v1::BackendState> = farm
        .backends
        .iter()
        .map(|b| {
            let key = BackendKey::of(farm, b);
            let state = dp.overrides.get(&key).copied().unwrap_or(b.state);
            let (cin, cout, conns) = k.traffic(&key);
            totals = (totals.0 + cin, totals.1 + cout, totals.2 + conns);
            let r = sampler.rates(&names(&key));
            rates = rates + r;
            let load = k.load(&key);
            let mut s = v1::BackendState {
                address: b.address.to_string(),
                port: u32::from(farm.check_port(b)),
                weight: u32::from(b.weight),
                counters: counters(cin + cout),
                active_connections: count32(load.active),
                inactive_connections: count32(load.inactive),
                upper_threshold: b.upper_threshold.unwrap_or(0),
                lower_threshold: b.lower_threshold.unwrap_or(0),
                overloaded: dp.overloaded.contains(&key),
                in_rotation: plan.is_some_and(|p| p.rotation.iter().any(|(r, _)| *r == key)),
                in_counters: counters(cin),
                out_counters: counters(cout),
                connections: conns,
                rates: wire_rates(r),
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
    let sorry_server = BackendKey::sorry(farm).map(|key| {
        let (cin, cout, conns) = k.traffic(&key);
        totals = (totals.0 + cin, totals.1 + cout, totals.2 + conns);
        let r = sampler.rates(&names(&key));
        rates = rates + r;
        v1::SorryServer {
            in_counters: counters(cin),
            out_counters: counters(cout),
            rates: wire_rates(r),
            address: key.address.to_string(),
            port: u32::from(key.port.unwrap_or(0)),
            active: plan.is_some_and(|p| p.sorry.as_ref() == Some(&key)),
            counters: counters(cin + cout),
            active_connections: count32(k.load(&key).active),
            connections: conns,
        }
    });
    let t = &farm.timeouts;
    v1::FarmState {
        name: farm.name.clone(),
        vip: farm.vip.to_string(),
        port_first: u32::from(farm.port.first),
        port_last: u32::from(farm.port.last),
        protocol: farm.protocol.as_str().replace("tcp+udp", "both"),
        scheduler: farm.scheduler.as_str().to_owned(),
        forwarding: format!("{:?}", farm.forwarding).to_lowercase(),
        snat_address: farm.snat_address.map(|a| a.to_string()).unwrap_or_default(),
        counters: counters(totals.0 + totals.1),
        all_backends_down: plan.is_none_or(|p| p.rotation.is_empty()),
        persistence_timeout_s: farm.persistence_timeout_s.unwrap_or(0),
        persistence_netmask: farm
            .persistence_netmask
            .map(|m| m.to_string())
            .unwrap_or_default(),
        hash_source_port: farm.hash_source_port,
        one_packet: farm.one_packet,
        fwmark: farm.fwmark.unwrap_or(0),
        on_backend_failure: match farm.on_backend_failure {
            OnBackendFailure::Quiesce => "quiesce",
            OnBackendFailure::Reset => "reset",
        }
        .to_owned(),
        sorry_server,
        timeouts: Some(v1::Timeouts {
            tcp_s: t.tcp_s.unwrap_or(0),
            tcp_fin_s: t.tcp_fin_s.unwrap_or(0),
            udp_s: t.udp_s.unwrap_or(0),
        }),
        rates: wire_rates(rates),
        in_counters: counters(totals.0),
        out_counters: counters(totals.1),
        connections: totals.2,
        schedule_finite: plan.is_some_and(|p| p.finite),
        backends,
    }
}

fn endpoint_parts(a: std::net::IpAddr, p: u16) -> (String, u32) {
    (a.to_string(), u32::from(p))
}

fn protocol_name(p: u8) -> String {
    match p {
        6 => "tcp".into(),
        17 => "udp".into(),
        1 => "icmp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        other => other.to_string(),
    }
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
            .map(|f| farm_state(f, &dp, &k, &checks, &self.sampler))
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
            &self.sampler,
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
        tracing::info!(
            farm = %farm.name,
            backend = %address,
            state = lb_forwarder::datapath::state_word(state),
            "farm {}: backend {address} set to {} by the operator",
            farm.name,
            lb_forwarder::datapath::state_word(state)
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
            &self.sampler,
        )))
    }

    async fn list_connections(
        &self,
        req: Request<v1::ListConnectionsRequest>,
    ) -> Result<Response<v1::ListConnectionsReply>, Status> {
        let only = req.into_inner().farm;
        let loaded = self.config.current();
        let farms = &loaded.config.farms;
        if !only.is_empty() && !farms.iter().any(|f| f.name == only) {
            return Err(Status::not_found(format!("no farm `{only}`")));
        }
        // Mark → (farm, is the sorry server).
        let mut owners: HashMap<u32, (String, bool)> = HashMap::new();
        for f in farms.iter().filter(|f| only.is_empty() || f.name == only) {
            for b in &f.backends {
                owners.insert(BackendKey::of(f, b).mark(), (f.name.clone(), false));
            }
            if let Some(k) = BackendKey::sorry(f) {
                owners.insert(k.mark(), (f.name.clone(), true));
            }
        }
        let records = conns::dump_async()
            .await
            .map_err(|e| Status::unavailable(format!("reading the connection table: {e}")))?;
        let rows = conns::connection_rows(&records, &|m| owners.contains_key(&m));
        let connections = rows
            .into_iter()
            .map(|r| {
                let (farm, sorry) = owners.get(&r.mark).cloned().unwrap_or_default();
                let (client_address, client_port) = endpoint_parts(r.client.0, r.client.1);
                let (virtual_address, virtual_port) = endpoint_parts(r.virtual_.0, r.virtual_.1);
                let (backend_address, backend_port) = endpoint_parts(r.backend.0, r.backend.1);
                v1::Connection {
                    farm,
                    protocol: protocol_name(r.protocol),
                    state: r.state.to_owned(),
                    expires_s: r.expires_s,
                    client_address,
                    client_port,
                    virtual_address,
                    virtual_port,
                    backend_address,
                    backend_port,
                    sorry_server: sorry,
                    zone: u32::from(r.zone),
                }
            })
            .collect();
        Ok(Response::new(v1::ListConnectionsReply { connections }))
    }

    async fn watch_backends(
        &self,
        _: Request<v1::WatchBackendsRequest>,
    ) -> Result<Response<BoxStream<v1::BackendChange>>, Status> {
        let mut shutdown = self.shutdown.clone();
        let stream = BroadcastStream::new(self.datapath.events.subscribe())
            .map(|e| match e {
                Ok(e) => Ok(backend_change(e)),
                Err(e) => Err(Status::data_loss(format!(
                    "backend changes lost: {e}; read ListFarms again"
                ))),
            })
            .take_until(async move { shutdown.wait().await });
        Ok(Response::new(Box::pin(stream)))
    }
}

fn backend_change(e: BackendEvent) -> v1::BackendChange {
    let mut c = v1::BackendChange {
        farm: e.key.farm.clone(),
        address: e.key.address.to_string(),
        port: u32::from(e.key.port.unwrap_or(0)),
        sorry_server: e.sorry,
        in_rotation: e.in_rotation,
        failing: e.failing,
        overloaded: e.overloaded,
        reason: e.reason,
        unix_ms: unix_ms(e.at),
        ..Default::default()
    };
    c.set_admin_state(admin(e.state));
    c
}
