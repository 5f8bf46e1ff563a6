//! conntrack-syncd's Prometheus series, read at scrape time from the
//! engine's snapshot: the Status RPC's fields plus the sync protocol's own
//! counters.

use tandem_proto::v1::SyncRole;
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
        // The replication backlog: what the peer has not acknowledged yet
        // and what waits for the next datagram. With no clock shared with
        // the peer, this is the lag measure available.
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
            "conntrack_sync_evicted_unacked",
            "Unacknowledged datagrams pushed out of the full window",
            c.evicted_unacked,
        )?;
        s.counters(
            "conntrack_sync_rejected",
            "Datagrams dropped, by reason",
            [
                ("authentication", c.rejected_authentication),
                ("version", c.rejected_version),
                ("malformed", c.rejected_malformed),
                ("stale", c.rejected_stale),
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
