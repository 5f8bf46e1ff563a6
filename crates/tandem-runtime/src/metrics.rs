//! The opt-in Prometheus endpoint every daemon shares.
//!
//! `metrics_listen` in node.toml names one address; the five daemons of a
//! node cannot share one port, so each listens on that address with the
//! port plus a fixed offset ([`port_offset`]): vrrpd +0, lb-forwarder +1,
//! conntrack-syncd +2, cfg-syncd +3, clustermanager +4. Absent, nothing
//! listens. The endpoint follows reloads: a changed address moves the
//! listener, a removed one closes it.
//!
//! Series are read at scrape time from the state each daemon already keeps
//! for its Status RPC (a [`Collector`]), so the hot paths carry no metric
//! code and the numbers cannot drift from what `tandemctl status` shows.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::{ConfigCell, Shutdown};

pub use prometheus_client;

/// The content type of OpenMetrics text exposition 1.0.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The port offset of each daemon from `metrics_listen`'s port.
pub fn port_offset(daemon: &str) -> Option<u16> {
    Some(match daemon {
        "vrrpd" => 0,
        "lb-forwarder" => 1,
        "conntrack-syncd" => 2,
        "cfg-syncd" => 3,
        "clustermanager" => 4,
        _ => return None,
    })
}

/// Where `daemon` listens when node.toml says `metrics_listen = listen`.
/// Port 0 stays 0 (an ephemeral port each, logged): for tests only.
pub fn listen_address(daemon: &str, listen: SocketAddr) -> Result<SocketAddr, String> {
    let offset =
        port_offset(daemon).ok_or_else(|| format!("{daemon} has no metrics port offset"))?;
    if listen.port() == 0 {
        return Ok(listen);
    }
    let port = listen.port().checked_add(offset).ok_or_else(|| {
        format!(
            "metrics_listen port {} + {offset} for {daemon} is above 65535",
            listen.port()
        )
    })?;
    Ok(SocketAddr::new(listen.ip(), port))
}

/// A registry with the `tandem_` prefix and `tandem_build_info{daemon,version}`.
pub fn registry(daemon: &'static str) -> Registry {
    let mut registry = Registry::with_prefix("tandem");
    registry.register(
        "build",
        "Which daemon and version serve these metrics",
        Info::new(vec![
            ("daemon", daemon),
            ("version", env!("CARGO_PKG_VERSION")),
        ]),
    );
    registry
}

/// OpenMetrics text of `registry` (what /metrics returns), followed by the
/// unprefixed `process_*` series of this process.
pub fn encode(registry: &Registry) -> Result<String, fmt::Error> {
    use prometheus_client::encoding::text;
    let mut out = String::new();
    text::encode_registry(&mut out, registry)?;
    let mut process = Registry::default();
    process.register_collector(Box::new(crate::process::ProcessCollector));
    text::encode_registry(&mut out, &process)?;
    text::encode_eof(&mut out)?;
    Ok(out)
}

/// What /metrics serves: a registry, or something that must read state
/// asynchronously (kernel counters) before encoding one.
pub trait Scrape: Send + Sync + 'static {
    fn scrape(&self) -> Pin<Box<dyn Future<Output = Result<String, fmt::Error>> + Send + '_>>;
}

impl Scrape for Registry {
    fn scrape(&self) -> Pin<Box<dyn Future<Output = Result<String, fmt::Error>> + Send + '_>> {
        Box::pin(async move { encode(self) })
    }
}

/// Serves `scrape` on /metrics at the address node.toml's `metrics_listen`
/// gives this daemon, for as long as the daemon runs, following reloads.
/// A port that cannot be bound is logged and the daemon carries on: metrics
/// are not worth a failover.
pub fn spawn(
    daemon: &'static str,
    config: &Arc<ConfigCell>,
    scrape: Arc<dyn Scrape>,
    mut shutdown: Shutdown,
) -> tokio::task::JoinHandle<()> {
    let mut configs = config.subscribe();
    tokio::spawn(async move {
        loop {
            let wanted = configs.borrow_and_update().config.node.metrics_listen;
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let server = match wanted.map(|l| listen_address(daemon, l)) {
                None => None,
                Some(Err(e)) => {
                    tracing::error!("metrics endpoint not started: {e}");
                    None
                }
                Some(Ok(addr)) => match TcpListener::bind(addr).await {
                    Ok(listener) => {
                        let local = listener.local_addr().unwrap_or(addr);
                        tracing::info!(listen = %local, "serving Prometheus metrics on http://{local}/metrics");
                        let app = Router::new()
                            .route("/metrics", get(metrics))
                            .with_state(scrape.clone());
                        let serve = axum::serve(listener, app).with_graceful_shutdown(async {
                            let _ = stop_rx.await;
                        });
                        Some(tokio::spawn(async move {
                            if let Err(e) = serve.await {
                                tracing::error!(listen = %local, "metrics endpoint failed: {e}");
                            }
                        }))
                    }
                    Err(e) => {
                        tracing::error!(listen = %addr, "metrics endpoint not started: binding {addr}: {e}");
                        None
                    }
                },
            };
            // Wait for the address to change (or shutdown), then close this
            // listener. An endpoint that could not start is tried again at
            // every reload (the operator freed the port, then reloaded).
            let stop = loop {
                tokio::select! {
                    r = configs.changed() => {
                        if r.is_err() {
                            break true;
                        }
                        if configs.borrow().config.node.metrics_listen != wanted {
                            tracing::info!("metrics_listen changed; moving the metrics endpoint");
                            break false;
                        }
                        if server.is_none() && wanted.is_some() {
                            break false;
                        }
                    }
                    () = shutdown.wait() => break true,
                }
            };
            let _ = stop_tx.send(());
            if let Some(server) = server {
                let _ = server.await;
            }
            if stop {
                return;
            }
        }
    })
}

async fn metrics(State(scrape): State<Arc<dyn Scrape>>) -> Response {
    match scrape.scrape().await {
        Ok(body) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response(),
        Err(e) => {
            tracing::warn!("encoding metrics failed: {e}");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding metrics failed\n",
            )
                .into_response()
        }
    }
}

/// A [`Collector`] from a closure that writes the series at scrape time
/// (from a watch channel or a snapshot the daemon already keeps).
pub struct FnCollector<F>(pub F);

impl<F> fmt::Debug for FnCollector<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FnCollector")
    }
}

impl<F> Collector for FnCollector<F>
where
    F: Fn(&mut Series<'_>) -> fmt::Result + Send + Sync + 'static,
{
    fn encode(&self, encoder: DescriptorEncoder) -> fmt::Result {
        (self.0)(&mut Series(encoder))
    }
}

/// Writes series inside a collector: one call per metric family. Names
/// are given without the `tandem_` prefix; counters get `_total` appended.
pub struct Series<'a>(DescriptorEncoder<'a>);

impl Series<'_> {
    pub fn gauge(&mut self, name: &str, help: &str, value: impl Into<f64>) -> fmt::Result {
        let g = ConstGauge::new(value.into());
        let m = self
            .0
            .encode_descriptor(name, help, None, g.metric_type())?;
        g.encode(m)
    }

    pub fn counter(&mut self, name: &str, help: &str, value: u64) -> fmt::Result {
        let c = ConstCounter::new(value);
        let m = self
            .0
            .encode_descriptor(name, help, None, c.metric_type())?;
        c.encode(m)
    }

    /// A histogram: `buckets` are (upper bound, samples in that bucket
    /// alone; the encoder accumulates), the last one +Inf.
    pub fn histogram(
        &mut self,
        name: &str,
        help: &str,
        sum: f64,
        count: u64,
        buckets: &[(f64, u64)],
    ) -> fmt::Result {
        let mut m = self.0.encode_descriptor(
            name,
            help,
            None,
            prometheus_client::metrics::MetricType::Histogram,
        )?;
        m.encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, buckets, None)
    }

    /// A gauge with labels; writes nothing when `samples` is empty.
    pub fn gauges<L: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (L, f64)>,
    ) -> fmt::Result {
        let ty = ConstGauge::new(0.0).metric_type();
        let mut samples = samples.into_iter().peekable();
        if samples.peek().is_none() {
            return Ok(());
        }
        let mut m = self.0.encode_descriptor(name, help, None, ty)?;
        for (labels, value) in samples {
            ConstGauge::new(value).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }

    /// A counter with labels; writes nothing when `samples` is empty.
    pub fn counters<L: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (L, u64)>,
    ) -> fmt::Result {
        let ty = ConstCounter::new(0u64).metric_type();
        let mut samples = samples.into_iter().peekable();
        if samples.peek().is_none() {
            return Ok(());
        }
        let mut m = self.0.encode_descriptor(name, help, None, ty)?;
        for (labels, value) in samples {
            ConstCounter::new(value).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Seconds since the Unix epoch, for `*_timestamp_seconds` gauges.
pub fn unix_seconds(t: std::time::SystemTime) -> f64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_distinct_and_checked() {
        let base: SocketAddr = "127.0.0.1:9500".parse().unwrap();
        let ports: Vec<u16> = [
            "vrrpd",
            "lb-forwarder",
            "conntrack-syncd",
            "cfg-syncd",
            "clustermanager",
        ]
        .iter()
        .map(|d| listen_address(d, base).unwrap().port())
        .collect();
        assert_eq!(ports, [9500, 9501, 9502, 9503, 9504]);
        let top: SocketAddr = "127.0.0.1:65535".parse().unwrap();
        assert!(listen_address("cfg-syncd", top).is_err());
        assert!(listen_address("unknown", base).is_err());
    }

    #[test]
    fn series_encode_as_openmetrics() {
        let mut registry = registry("vrrpd");
        registry.register_collector(Box::new(FnCollector(|s: &mut Series<'_>| {
            s.gauge("vrrp_priority", "Priority", 100u8)?;
            s.counter("vrrp_adverts_sent", "Adverts sent", 7)?;
            s.gauges(
                "vrrp_state",
                "State",
                [([("state", "master")], 1.0), ([("state", "backup")], 0.0)],
            )?;
            s.histogram(
                "lag_seconds",
                "Lag",
                0.3,
                3,
                &[(0.1, 2), (1.0, 1), (f64::INFINITY, 0)],
            )?;
            s.counters("none", "Nothing", Vec::<([(&str, &str); 1], u64)>::new())
        })));
        let text = encode(&registry).unwrap();
        for line in [
            "tandem_build_info{daemon=\"vrrpd\",version=\"",
            "# TYPE tandem_vrrp_priority gauge\n",
            "tandem_vrrp_priority 100.0\n",
            "# TYPE tandem_vrrp_adverts_sent counter\n",
            "tandem_vrrp_adverts_sent_total 7\n",
            "tandem_vrrp_state{state=\"master\"} 1.0\n",
            "tandem_vrrp_state{state=\"backup\"} 0.0\n",
            "# TYPE tandem_lag_seconds histogram\n",
            "tandem_lag_seconds_bucket{le=\"0.1\"} 2\n",
            "tandem_lag_seconds_bucket{le=\"+Inf\"} 3\n",
            "tandem_lag_seconds_count 3\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(!text.contains("none"), "{text}");
        for line in [
            "# TYPE process_cpu_seconds counter\n",
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_open_fds ",
            "process_start_time_seconds ",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
