//! vrrpd's Prometheus series, read at scrape time from the router's
//! snapshot (the same one the Status RPC reports), plus a transition
//! counter fed by the state-change broadcast.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tandem_proto::v1::VrrpState;
use tandem_runtime::Shutdown;
use tandem_runtime::metrics::prometheus_client::registry::Registry;
use tandem_runtime::metrics::{self, FnCollector, Series};
use tokio::sync::broadcast::error::RecvError;

use crate::router::Shared;

/// Every state the gauge reports, so a state that is not current reads 0
/// (alerts on `tandem_vrrp_state{state="master"} == 0` need the series).
const STATES: [VrrpState; 6] = [
    VrrpState::Standalone,
    VrrpState::Initialize,
    VrrpState::Backup,
    VrrpState::Master,
    VrrpState::Fault,
    VrrpState::Maintenance,
];

/// `master`, `backup`… as the label value.
pub fn state_label(s: VrrpState) -> &'static str {
    match s {
        VrrpState::Unspecified => "unspecified",
        VrrpState::Standalone => "standalone",
        VrrpState::Initialize => "initialize",
        VrrpState::Backup => "backup",
        VrrpState::Master => "master",
        VrrpState::Fault => "fault",
        VrrpState::Maintenance => "maintenance",
    }
}

type Transitions = Arc<Mutex<BTreeMap<(&'static str, &'static str), u64>>>;

/// The registry /metrics serves. Call before the router starts so the
/// first transitions are counted.
pub fn registry(shared: &Arc<Shared>, mut shutdown: Shutdown) -> Registry {
    let transitions: Transitions = Arc::default();
    let mut changes = shared.changes.subscribe();
    let counted = transitions.clone();
    tokio::spawn(async move {
        loop {
            let change = tokio::select! {
                c = changes.recv() => c,
                () = shutdown.wait() => return,
            };
            match change {
                Ok(c) => {
                    let key = (state_label(c.old_state()), state_label(c.new_state()));
                    if let Ok(mut t) = counted.lock() {
                        *t.entry(key).or_default() += 1;
                    }
                }
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!("metrics missed {n} VRRP state changes")
                }
                Err(RecvError::Closed) => return,
            }
        }
    });

    let snapshot = shared.snapshot.subscribe();
    let mut registry = metrics::registry("vrrpd");
    registry.register_collector(Box::new(FnCollector(move |s: &mut Series<'_>| {
        let snap = snapshot.borrow().clone();
        s.gauges(
            "vrrp_state",
            "1 for the VRRP state this node is in, 0 for the others",
            STATES.iter().map(|&st| {
                let v = if snap.state == st { 1.0 } else { 0.0 };
                ([("state", state_label(st))], v)
            }),
        )?;
        s.gauge(
            "vrrp_master",
            "1 while this node is the VRRP master (holds the floating IPs)",
            u8::from(snap.state == VrrpState::Master),
        )?;
        if let Some(setup) = &snap.setup {
            s.gauge("vrrp_vrid", "The virtual router id", setup.vrid)?;
            s.gauge(
                "vrrp_priority",
                "This node's configured VRRP priority",
                setup.priority,
            )?;
        }
        let t: Vec<_> = transitions
            .lock()
            .map(|t| t.clone().into_iter().collect())
            .unwrap_or_default();
        s.counters(
            "vrrp_transitions",
            "VRRP state changes, by old and new state",
            t.into_iter()
                .map(|((from, to), n)| ([("from", from), ("to", to)], n)),
        )?;
        let c = &snap.counters;
        s.counter(
            "vrrp_became_master",
            "Times this node became master (failovers to it)",
            c.became_master,
        )?;
        s.counter(
            "vrrp_became_backup",
            "Times this node became backup",
            c.became_backup,
        )?;
        s.counter("vrrp_adverts_sent", "VRRP adverts sent", c.adverts_sent)?;
        s.counter(
            "vrrp_adverts_received",
            "VRRP adverts received for this virtual router",
            c.adverts_received,
        )?;
        s.counter(
            "vrrp_priority_zero_sent",
            "Priority-0 adverts sent (this master stepping down)",
            c.priority_zero_sent,
        )?;
        s.counter(
            "vrrp_priority_zero_received",
            "Priority-0 adverts received (the peer master stepping down)",
            c.priority_zero_received,
        )?;
        s.counter(
            "vrrp_packets_dropped",
            "VRRP packets dropped: invalid (TTL, checksum, version, authentication), another VRID, or an IPv6 source not yet verified",
            c.packets_dropped,
        )?;
        s.counter(
            "vrrp_foreign_adverts_dropped",
            "Adverts for this VRID from a source that is not a cluster node (dropped, never acted upon)",
            c.foreign_adverts_dropped,
        )?;
        s.gauge(
            "vrrp_foreign_speakers",
            "Sources of foreign adverts for this VRID remembered (at most 16)",
            u32::try_from(snap.foreign_speakers.len()).unwrap_or(u32::MAX),
        )?;
        s.gauge(
            "vrrp_handing_over",
            "1 while this master hands over (priority 0 sent, floating IPs kept until the peer takes over)",
            u8::from(snap.handing_over),
        )?;
        s.gauges(
            "vrrp_tracked_interface_up",
            "1 while a tracked interface is up",
            snap.tracked
                .iter()
                .map(|(name, up)| ([("interface", name.clone())], f64::from(u8::from(*up)))),
        )
    })));
    registry
}
