//! conntrack-syncd's Prometheus series, read at scrape time from the
//! engine's snapshot: the Status RPC's fields plus the sync protocol's own
//! counters.

use tandem_proto::v1::{self, SyncRole};
use tandem_runtime::metrics::prometheus_client::registry::Registry;
use tandem_runtime::metrics::{self, FnCollector, Series};
use tokio::sync::watch;

use crate::engine::{Snapshot, role_name};
use crate::sync::{PeerState, ResyncState};

const ROLES: [SyncRole; 4] = [
    SyncRole::Unspecified,
    SyncRole::Standalone,
    SyncRole::Sender,
    SyncRole::Receiver,
];

/// The registry /metrics serves.
pub fn registry(snapshot: watch::Receiver<Snapshot>) -> Registry {
    let mut registry = metrics::registry("conntrack-syncd");
    registry.register_collector(Box::new(FnCollector(move |s: &mut Series<'_>| {
        let snap = snapshot.borrow().clone();
        let st = &snap.status;
        s.gauges(
            "conntrack_sync_role",
            "1 for this node's replication role (sender on the master, receiver on the backup)",
            ROLES.iter().map(|&r| {
                let v = if st.role() == r { 1.0 } else { 0.0 };
                ([("role", role_name(r))], v)
            }),
        )?;
        s.gauge(
            "conntrack_sync_running",
            "1 while replication runs (0: standalone, no key, or a socket/ctnetlink error)",
            u8::from(snap.sync.is_some()),
        )?;
        s.gauge(
            "conntrack_sync_entries_injected",
            "Replicated entries this node put into its kernel table",
            st.entries_injected as f64,
        )?;
        s.gauge(
            "conntrack_sync_entries_cached",
            "Replicated entries held in the cache (cache mode, until commit)",
            st.entries_cached as f64,
        )?;
        s.counter(
            "conntrack_sync_apply_errors",
            "Replicated records the kernel refused",
            st.apply_errors,
        )?;
        s.gauges(
            "conntrack_sync_health",
            "1 for this node's replication health: ok (green), degraded (yellow: lag or a resync over its threshold), failed (red: the peer silent or refusing)",
            [
                ("ok", v1::SyncHealth::Ok),
                ("degraded", v1::SyncHealth::Degraded),
                ("failed", v1::SyncHealth::Failed),
            ]
            .map(|(name, h)| ([("health", name)], if st.health() == h { 1.0 } else { 0.0 })),
        )?;
        s.counter(
            "conntrack_sync_foreign_records_dropped",
            "Peer records of flows outside this node's farms, dropped",
            snap.shell.foreign_records_dropped,
        )?;
        s.counter(
            "conntrack_sync_entries_replaced",
            "Entries replaced (delete + create) because their NAT differed from the peer's",
            snap.shell.replaced,
        )?;
        s.counter(
            "conntrack_sync_stale_entries_removed",
            "Entries a complete resync from the master did not hold, deleted",
            snap.shell.stale_removed,
        )?;
        s.counter(
            "conntrack_sync_event_overruns",
            "Times kernel events were lost (event socket receive buffer full)",
            snap.shell.event_overruns,
        )?;
        s.gauge(
            "conntrack_sync_favoured",
            "1 while the daemon runs at the favoured niceness (--nice) because it fell behind",
            u8::from(snap.shell.favoured),
        )?;
        s.counter(
            "conntrack_sync_times_favoured",
            "Times the daemon fell behind and was favoured (--nice)",
            snap.shell.times_favoured,
        )?;
        s.gauge(
            "conntrack_sync_own_flows",
            "Flows this node forwards and replicates to the peer (known since the daemon started)",
            snap.shell.own_flows as f64,
        )?;
        s.gauge(
            "conntrack_sync_last_resync_timestamp_seconds",
            "When the last bulk resync from the peer completed (0: never)",
            st.last_resync_unix_ms as f64 / 1000.0,
        )?;
        let Some(sync) = &snap.sync else {
            return Ok(());
        };
        s.gauge(
            "conntrack_sync_peer_alive",
            "1 while the peer is heard (its datagrams or keepalives arrive)",
            u8::from(sync.peer == PeerState::Alive),
        )?;
        s.gauge(
            "conntrack_sync_resync_in_progress",
            "1 while a bulk resync from the peer is asked for or arriving",
            u8::from(matches!(
                sync.resync,
                ResyncState::Requested | ResyncState::InProgress
            )),
        )?;
        let lag = &sync.lag_histogram;
        s.histogram(
            "conntrack_sync_lag_seconds",
            "Replication lag per record: kernel event on this node to the peer's acknowledgement (sent once applied)",
            lag.sum_s,
            lag.count,
            &lag.buckets,
        )?;
        s.gauge(
            "conntrack_sync_lag_now_seconds",
            "Age of the oldest change not yet acknowledged by the peer (0: none pending)",
            sync.lag_now.as_secs_f64(),
        )?;
        s.gauge(
            "conntrack_sync_congestion_window",
            "Datagrams this node may have in flight to the peer (grows with acknowledgements, halves on a loss)",
            sync.cwnd as f64,
        )?;
        s.gauge(
            "conntrack_sync_unacked_datagrams",
            "Datagrams sent and not yet acknowledged by the peer",
            sync.tx_unacked as f64,
        )?;
        s.gauge(
            "conntrack_sync_queued_records",
            "Records waiting for the next datagram",
            sync.tx_queued as f64,
        )?;
        s.gauge(
            "conntrack_sync_reorder_buffered_datagrams",
            "Peer datagrams held until a gap before them fills",
            sync.rx_buffered as f64,
        )?;
        let c = &sync.counters;
        s.counter(
            "conntrack_sync_records_sent",
            "Conntrack records (new/update/destroy) sent to the peer",
            c.records_sent,
        )?;
        s.counter(
            "conntrack_sync_records_received",
            "Conntrack records received from the peer",
            c.records_received,
        )?;
        s.counter(
            "conntrack_sync_datagrams_sent",
            "Sync datagrams sent",
            c.datagrams_sent,
        )?;
        s.counter(
            "conntrack_sync_datagrams_received",
            "Sync datagrams received",
            c.datagrams_received,
        )?;
        s.counter(
            "conntrack_sync_gaps",
            "Gaps seen in the peer's sequence (each repaired by retransmission or resync)",
            c.gaps,
        )?;
        s.counter(
            "conntrack_sync_lost",
            "Peer sequence numbers never received (skipped by a bulk resync)",
            c.lost,
        )?;
        s.counter(
            "conntrack_sync_retransmissions",
            "Datagrams sent again after a nack or timeout",
            c.retransmissions,
        )?;
        s.counter(
            "conntrack_sync_window_cuts",
            "Times the congestion window was cut after a loss",
            c.window_cuts,
        )?;
        s.counter(
            "conntrack_sync_records_coalesced",
            "Changes folded into a queued record of the same flow",
            c.records_coalesced,
        )?;
        s.counter(
            "conntrack_sync_data_datagrams_sent",
            "Data datagrams sent (first transmissions; records_sent over this is records per datagram)",
            c.data_datagrams_sent,
        )?;
        s.counter(
            "conntrack_sync_queue_overflows",
            "Times the send queue reached conntrack_queue_limit and was dropped (a bulk resync followed)",
            c.queue_overflows,
        )?;
        s.counters(
            "conntrack_sync_rejected",
            "Datagrams dropped, by reason",
            [
                ("authentication", c.rejected_authentication),
                ("version", c.rejected_version),
                ("malformed", c.rejected_malformed),
                ("stale_epoch", c.rejected_stale),
                ("beyond_window", c.dropped_beyond_window),
            ]
            .map(|(reason, n)| ([("reason", reason)], n)),
        )?;
        s.counter(
            "conntrack_sync_resyncs_requested",
            "Bulk resyncs asked of the peer",
            c.resyncs_requested,
        )?;
        s.counter(
            "conntrack_sync_resyncs_completed",
            "Bulk resyncs received completely",
            c.resyncs_completed,
        )?;
        s.counter(
            "conntrack_sync_peer_restarts",
            "Peer restarts seen (a new epoch)",
            c.peer_restarts,
        )
    })));
    registry
}
