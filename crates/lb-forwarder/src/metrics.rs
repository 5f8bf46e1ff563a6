//! lb-forwarder's Prometheus series: backend health from the health
//! checks' watch, rotation and apply figures from the datapath's state,
//! and packet/byte counters from the kernel's nftables counters as the
//! sampler last read them (once a second, over netlink): a scrape never
//! reads the kernel, so any number of scrapers costs the same.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tandem_runtime::ConfigCell;
use tandem_runtime::metrics::prometheus_client::registry::Registry;
use tandem_runtime::metrics::{self, FnCollector, Scrape, Series};
use tokio::sync::watch;

use crate::datapath::Datapath;
use crate::health::{BackendHealth, Health};
use crate::rates::Sampler;
use crate::ruleset::{self, BackendKey, Count};

/// The health checks' view of every probed backend.
pub type HealthView = watch::Receiver<HashMap<BackendKey, BackendHealth>>;

/// The backend label: `address:port`, or the address alone when the
/// backend keeps the client's destination port.
pub fn backend_label(key: &BackendKey) -> String {
    match (key.port, key.address) {
        (Some(p), std::net::IpAddr::V6(a)) => format!("[{a}]:{p}"),
        (Some(p), a) => format!("{a}:{p}"),
        (None, a) => a.to_string(),
    }
}

/// 1 healthy, 0 failing, -1 not known yet (or not probed: down, maintenance).
fn health_value(h: Option<Health>) -> f64 {
    match h {
        Some(Health::Healthy) => 1.0,
        Some(Health::Failing) => 0.0,
        Some(Health::Unknown) | None => -1.0,
    }
}

/// What /metrics serves: the sampler's last reading, encoded.
pub struct LbMetrics {
    registry: Registry,
}

/// Counters older than this are not served (the sampler stopped reading).
const STALE: std::time::Duration = std::time::Duration::from_secs(5);

impl LbMetrics {
    pub fn new(
        config: Arc<ConfigCell>,
        datapath: Arc<Datapath>,
        health: HealthView,
        sampler: Arc<Sampler>,
    ) -> Self {
        let mut registry = metrics::registry("lb-forwarder");
        registry.register_collector(Box::new(FnCollector(move |s: &mut Series<'_>| {
            let loaded = config.current();
            let dp = datapath.state.borrow().clone();
            let checks = health.borrow().clone();
            let kernel: Option<Arc<HashMap<String, Count>>> = sampler
                .latest()
                .filter(|x| x.at.elapsed() < STALE)
                .map(|x| x.counters);
            let farms = &loaded.config.farms;
            let backends: Vec<(String, BackendKey)> = farms
                .iter()
                .flat_map(|f| {
                    f.backends
                        .iter()
                        .map(|b| (f.name.clone(), BackendKey::of(f, b)))
                })
                .collect();
            let labels = |farm: &str, key: &BackendKey| {
                [("farm", farm.to_owned()), ("backend", backend_label(key))]
            };

            s.gauges(
                "lb_backend_health",
                "Health check verdict: 1 healthy, 0 failing, -1 unknown or not probed",
                backends.iter().map(|(farm, key)| {
                    let h = checks.get(key).map(|c| c.health);
                    (labels(farm, key), health_value(h))
                }),
            )?;
            s.gauges(
                "lb_backend_in_rotation",
                "1 while the datapath sends new connections to the backend",
                backends.iter().map(|(farm, key)| {
                    let on = dp
                        .plans
                        .iter()
                        .any(|p| p.farm == *farm && p.rotation.iter().any(|(k, _)| k == key));
                    (labels(farm, key), f64::from(u8::from(on)))
                }),
            )?;
            s.gauges(
                "lb_farm_backends_in_rotation",
                "Backends taking new connections, per farm (0: the farm is down)",
                farms.iter().map(|f| {
                    let n = dp
                        .plans
                        .iter()
                        .find(|p| p.farm == f.name)
                        .map_or(0, |p| p.rotation.len());
                    ([("farm", f.name.clone())], n as f64)
                }),
            )?;
            if let Some(kernel) = &kernel {
                let get = |name: String| kernel.get(&name).copied().unwrap_or_default();
                let count = |key: &BackendKey| {
                    get(ruleset::backend_in_counter(key)) + get(ruleset::backend_out_counter(key))
                };
                let mut farm_totals: Vec<(String, Count)> = farms
                    .iter()
                    .map(|f| (f.name.clone(), Count::default()))
                    .collect();
                for (farm, key) in &backends {
                    let c = count(key);
                    if let Some((_, t)) = farm_totals.iter_mut().find(|(n, _)| n == farm) {
                        t.packets += c.packets;
                        t.bytes += c.bytes;
                    }
                }
                s.counters(
                    "lb_backend_packets",
                    "Packets forwarded to the backend (both directions)",
                    backends
                        .iter()
                        .map(|(farm, key)| (labels(farm, key), count(key).packets)),
                )?;
                s.counters(
                    "lb_backend_bytes",
                    "Bytes forwarded to the backend (both directions)",
                    backends
                        .iter()
                        .map(|(farm, key)| (labels(farm, key), count(key).bytes)),
                )?;
                s.counters(
                    "lb_backend_connections",
                    "New connections sent to the backend",
                    backends.iter().map(|(farm, key)| {
                        (
                            labels(farm, key),
                            get(ruleset::backend_conn_counter(key)).packets,
                        )
                    }),
                )?;
                s.counters(
                    "lb_farm_packets",
                    "Packets through the farm (sum of its backends)",
                    farm_totals
                        .iter()
                        .map(|(f, c)| ([("farm", f.clone())], c.packets)),
                )?;
                s.counters(
                    "lb_farm_bytes",
                    "Bytes through the farm (sum of its backends)",
                    farm_totals
                        .iter()
                        .map(|(f, c)| ([("farm", f.clone())], c.bytes)),
                )?;
            }
            s.gauge(
                "lb_counters_readable",
                "1 when the counters were read from the kernel in the last 5 s",
                u8::from(kernel.is_some()),
            )?;
            s.counter(
                "lb_counter_reads",
                "Readings of the nftables counters (once a second, whatever the scrape rate)",
                sampler.reads(),
            )?;
            s.gauge(
                "lb_datapath_loaded",
                "1 when the kernel table matches the configuration in force",
                u8::from(dp.loaded),
            )?;
            s.counter(
                "lb_datapath_applies",
                "Rulesets applied to the kernel",
                dp.applies,
            )?;
            s.gauge(
                "lb_datapath_last_apply_seconds",
                "How long the last apply took (render + nft)",
                dp.last_apply.as_secs_f64(),
            )?;
            s.gauge(
                "lb_datapath_last_apply_timestamp_seconds",
                "When the last successful apply finished (0: never)",
                dp.loaded_at.map_or(0.0, metrics::unix_seconds),
            )?;
            s.gauge(
                "lb_datapath_error",
                "1 while the last apply failed",
                u8::from(dp.last_error.is_some()),
            )
        })));
        LbMetrics { registry }
    }
}

impl Scrape for LbMetrics {
    fn scrape(&self) -> Pin<Box<dyn Future<Output = Result<String, fmt::Error>> + Send + '_>> {
        Box::pin(async move { metrics::encode(&self.registry) })
    }
}
