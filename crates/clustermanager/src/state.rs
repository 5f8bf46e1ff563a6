//! What clustermanager's tasks and RPCs share.

use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tandem_config::Failback;
use tandem_proto::v1;
use tandem_runtime::ConfigCell;
use tokio::sync::broadcast;

use crate::orchestrate::Orchestrator;
use crate::peer::PeerLink;

pub struct Shared {
    pub config: Arc<ConfigCell>,
    pub config_dir: PathBuf,
    pub runtime_dir: PathBuf,
    pub peer: PeerLink,
    pub events: broadcast::Sender<v1::ClusterEvent>,
    /// One configuration change at a time (ApplyChange, ReplicateChange,
    /// EditCluster).
    pub change_lock: tokio::sync::Mutex<()>,
    /// The sequence of the next change this node replicates. Starts at the
    /// start time in microseconds, so a restarted master still counts up.
    pub next_sequence: AtomicU64,
    /// The highest sequence this node accepted from its peer.
    pub peer_sequence: Mutex<u64>,
    /// When the failback gate last began holding this node (Unix ms).
    pub hold_started_ms: AtomicI64,
    /// The control API, while it is served (control_api.rs).
    pub control_api: Mutex<Option<crate::control_api::Served>>,
    orchestrator: Mutex<Orchestrator>,
}

impl Shared {
    pub fn new(
        config: Arc<ConfigCell>,
        config_dir: PathBuf,
        runtime_dir: PathBuf,
        peer: PeerLink,
    ) -> Shared {
        let (node, preferred) = {
            let loaded = config.current();
            let node = loaded.config.node.name.clone();
            let preferred = is_preferred(&loaded.config);
            (node, preferred)
        };
        let start_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
            .unwrap_or(1);
        Shared {
            config,
            config_dir,
            runtime_dir,
            peer,
            events: broadcast::channel(256).0,
            change_lock: tokio::sync::Mutex::new(()),
            next_sequence: AtomicU64::new(start_us),
            peer_sequence: Mutex::new(0),
            hold_started_ms: AtomicI64::new(0),
            control_api: Mutex::new(None),
            orchestrator: Mutex::new(Orchestrator::new(&node, preferred)),
        }
    }

    pub fn with_orchestrator<T>(&self, f: impl FnOnce(&mut Orchestrator) -> T) -> T {
        // A poisoned lock only means a panic elsewhere; the state is still
        // the best we have.
        let mut o = self
            .orchestrator
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut o)
    }

    /// `failback` names this node (in the configuration in force).
    pub fn preferred(&self) -> bool {
        is_preferred(&self.config.current().config)
    }

    pub fn sequence(&self) -> u64 {
        self.next_sequence.fetch_add(1, Ordering::SeqCst)
    }

    pub fn node_name(&self) -> String {
        self.config.current().config.node.name.clone()
    }

    /// Publishes a ClusterEvent to WatchEvents subscribers.
    pub fn event(&self, kind: &str, message: String) {
        let _ = self.events.send(v1::ClusterEvent {
            unix_ms: tandem_runtime::unix_ms(std::time::SystemTime::now()),
            node: self.node_name(),
            kind: kind.to_owned(),
            message,
        });
    }
}

fn is_preferred(c: &tandem_config::Config) -> bool {
    c.cluster
        .as_ref()
        .is_some_and(|cl| matches!(&cl.failback, Failback::Node(n) if *n == c.node.name))
}
