//! routed's Prometheus series (node.toml `metrics_listen`, port + 5), read
//! at scrape time from the snapshot Status reports.

use tandem_runtime::metrics::prometheus_client::registry::Registry;
use tandem_runtime::metrics::{self, FnCollector, Series};
use tokio::sync::watch;

use crate::engine::Snapshot;

/// The registry /metrics serves.
pub fn registry(snapshot: watch::Receiver<Snapshot>) -> Registry {
    let mut registry = metrics::registry("routed");
    registry.register_collector(Box::new(FnCollector(move |s: &mut Series<'_>| {
        let snap = snapshot.borrow().clone();
        s.gauge(
            "routed_active",
            "1 when this node is in an active-active cluster (routed has work)",
            u8::from(snap.mode == "active-active"),
        )?;
        s.gauge(
            "routed_maintenance",
            "1 while the node is in maintenance (every VIP withdrawn)",
            u8::from(snap.maintenance.is_some()),
        )?;
        s.gauge(
            "routed_datapath_ready",
            "1 while lb-forwarder answers and its nftables table is loaded",
            u8::from(snap.datapath_ready),
        )?;
        s.gauge(
            "routed_vips_announced",
            "VIPs announced to the routers",
            snap.vips.iter().filter(|v| v.decision.announce).count() as f64,
        )?;
        s.gauge(
            "routed_vips_withdrawn",
            "VIPs of the farms not announced (maintenance, no healthy backend, datapath not ready)",
            snap.vips.iter().filter(|v| !v.decision.announce).count() as f64,
        )?;
        s.gauges(
            "routed_bgp_session_established",
            "1 per BGP session that is established, 0 per one that is not",
            snap.sessions.iter().map(|x| {
                (
                    [("peer", x.peer.clone())],
                    f64::from(u8::from(x.established)),
                )
            }),
        )?;
        s.gauge(
            "routed_bird_reachable",
            "1 while BIRD answers on its control socket",
            u8::from(snap.bird_reachable),
        )
    })));
    registry
}
