//! cfg-syncd's Prometheus series, read at scrape time from the counters
//! the Status RPC reports and the direction/pause watches.

use std::sync::Arc;

use tandem_proto::v1::SyncDirection;
use tandem_runtime::metrics::prometheus_client::registry::Registry;
use tandem_runtime::metrics::{self, FnCollector, Series};

use crate::sync::Shared;

const DIRECTIONS: [(SyncDirection, &str); 3] = [
    (SyncDirection::None, "none"),
    (SyncDirection::Push, "push"),
    (SyncDirection::Receive, "receive"),
];

/// The registry /metrics serves.
pub fn registry(shared: Arc<Shared>) -> Registry {
    let mut registry = metrics::registry("cfg-syncd");
    registry.register_collector(Box::new(FnCollector(move |s: &mut Series<'_>| {
        let c = shared.counters();
        let direction = *shared.direction.borrow();
        s.gauges(
            "cfg_sync_direction",
            "1 for the direction in force (push on the master, receive on the backup)",
            DIRECTIONS
                .iter()
                .map(|&(d, name)| ([("direction", name)], f64::from(u8::from(direction == d)))),
        )?;
        s.gauge(
            "cfg_sync_paused",
            "1 while replication is paused by the operator",
            u8::from(*shared.paused.borrow()),
        )?;
        s.gauge(
            "cfg_sync_peer_connected",
            "1 while the SSH session to the peer is up",
            u8::from(c.peer_connected),
        )?;
        s.gauge(
            "cfg_sync_last_success_timestamp_seconds",
            "When the two trees were last made equal (pushed or received; 0: never)",
            c.last_sync.map_or(0.0, metrics::unix_seconds),
        )?;
        s.gauge(
            "cfg_sync_pending_changes",
            "Changed paths not yet on the peer",
            c.pending as f64,
        )?;
        s.counter(
            "cfg_sync_errors",
            "Failed sync rounds and refused batches",
            c.errors,
        )?;
        s.gauge(
            "cfg_sync_error",
            "1 while the last sync attempt failed (the error is in tandemctl status)",
            u8::from(!c.last_error.is_empty()),
        )?;
        s.counter(
            "cfg_sync_files_transferred",
            "Files written to the peer (push) or from it (receive)",
            c.files_transferred,
        )?;
        s.counter(
            "cfg_sync_batches_applied",
            "Batches applied (by the peer when pushing, here when receiving)",
            c.batches_applied,
        )
    })));
    registry
}
