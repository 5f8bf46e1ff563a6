//! Role orchestration. The pure part ([`Orchestrator`]) takes vrrpd's state
//! changes and the resync progress and answers what to tell the other
//! daemons; [`run`] is the thin shell that follows vrrpd's WatchState and
//! performs those actions.
//!
//! - MASTER → conntrack-syncd SENDER and cfg-syncd PUSH; any other state →
//!   RECEIVER and RECEIVE.
//! - Failback gating: a node that is the preferred master (`failback` = its
//!   name) and finds the peer master when it comes back is held in vrrpd
//!   maintenance until its configuration (same manifest hash as the master,
//!   nothing pending) and its conntrack table (bulk resync complete) are in
//!   sync; then maintenance is released and vrrpd preempts.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tandem_proto::v1::{self, SyncDirection, SyncRole, VrrpState, vrrpd_client::VrrpdClient};

use crate::state::Shared;

/// What the orchestrator asks the shell to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    SetConntrackRole(SyncRole),
    SetCfgDirection(SyncDirection),
    /// Hold (true) or release (false) this node in vrrpd maintenance.
    SetMaintenance(bool),
    /// Ask conntrack-syncd for a bulk resync from the peer (the gate then
    /// waits for one completed after this request).
    ResyncConntrack,
    /// One line for the operator and one ClusterEvent.
    Decision {
        kind: &'static str,
        message: String,
    },
}

/// Failback gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Would hold the node if it found the peer master.
    Armed,
    /// Holding vrrpd in maintenance until resync completes.
    Holding,
    /// Released; re-armed once the node becomes master or leaves the
    /// election (fault, restart).
    Released,
}

/// Resync progress as the shell measured it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    pub config_synced: bool,
    pub conntrack_synced: bool,
    /// The peer's clustermanager answers.
    pub peer_reachable: bool,
}

#[derive(Debug)]
pub struct Orchestrator {
    node: String,
    /// `failback` names this node.
    preferred: bool,
    state: VrrpState,
    /// vrrpd reports a master that is not this node.
    peer_is_master: bool,
    gate: Gate,
    /// Consecutive progress reports with the peer unreachable while holding.
    peer_lost_reports: u32,
}

/// Reports with the peer unreachable after which a held node is released:
/// holding a node out of the election while its master may be gone would
/// leave the cluster without a master.
pub const PEER_LOST_RELEASE: u32 = 3;

impl Orchestrator {
    pub fn new(node: &str, preferred: bool) -> Orchestrator {
        Orchestrator {
            node: node.to_owned(),
            preferred,
            state: VrrpState::Unspecified,
            peer_is_master: false,
            gate: Gate::Armed,
            peer_lost_reports: 0,
        }
    }

    pub fn gate(&self) -> Gate {
        self.gate
    }

    /// The configuration changed: is this node still the preferred master?
    pub fn set_preferred(&mut self, preferred: bool) -> Vec<Action> {
        if self.preferred == preferred {
            return vec![];
        }
        self.preferred = preferred;
        if !preferred && self.gate == Gate::Holding {
            self.gate = Gate::Released;
            return vec![
                Action::Decision {
                    kind: "failback",
                    message: format!(
                        "failback no longer prefers {}: releasing it from maintenance",
                        self.node
                    ),
                },
                Action::SetMaintenance(false),
            ];
        }
        vec![]
    }

    /// vrrpd's WatchState stream (re)started: whatever state comes next is
    /// a return of this node.
    pub fn vrrpd_restarted(&mut self) {
        if self.gate == Gate::Released {
            self.gate = Gate::Armed;
        }
        self.state = VrrpState::Unspecified;
    }

    /// One vrrpd state (the first one of a stream, or a change).
    pub fn on_state(&mut self, state: VrrpState, peer_is_master: bool) -> Vec<Action> {
        let mut out = Vec::new();
        let changed = state != self.state;
        self.state = state;
        self.peer_is_master = peer_is_master;
        if changed {
            let (role, dir) = match state {
                VrrpState::Master => (SyncRole::Sender, SyncDirection::Push),
                VrrpState::Standalone => (SyncRole::Standalone, SyncDirection::None),
                _ => (SyncRole::Receiver, SyncDirection::Receive),
            };
            out.push(Action::Decision {
                kind: "role",
                message: format!(
                    "{} is {}: conntrack-syncd {}, cfg-syncd {}",
                    self.node,
                    state_word(state),
                    role.as_str_name()
                        .trim_start_matches("SYNC_ROLE_")
                        .to_lowercase(),
                    dir.as_str_name()
                        .trim_start_matches("SYNC_DIRECTION_")
                        .to_lowercase()
                ),
            });
            out.push(Action::SetConntrackRole(role));
            out.push(Action::SetCfgDirection(dir));
        }
        match state {
            VrrpState::Master | VrrpState::Fault | VrrpState::Initialize
                if self.gate == Gate::Released =>
            {
                self.gate = Gate::Armed;
            }
            VrrpState::Backup if self.preferred && peer_is_master && self.gate == Gate::Armed => {
                self.gate = Gate::Holding;
                self.peer_lost_reports = 0;
                out.push(Action::Decision {
                    kind: "failback",
                    message: format!(
                        "{} is the preferred master and the peer is master: holding it in maintenance until its configuration and conntrack resync are complete",
                        self.node
                    ),
                });
                out.push(Action::SetMaintenance(true));
                out.push(Action::ResyncConntrack);
            }
            _ => {}
        }
        out
    }

    /// Resync progress while holding: release when both are in sync, or
    /// when the peer has been unreachable for a while.
    pub fn on_progress(&mut self, p: Progress) -> Vec<Action> {
        if self.gate != Gate::Holding {
            return vec![];
        }
        if !p.peer_reachable {
            self.peer_lost_reports += 1;
            if self.peer_lost_reports >= PEER_LOST_RELEASE {
                self.gate = Gate::Released;
                return vec![
                    Action::Decision {
                        kind: "failback",
                        message: format!(
                            "the peer is unreachable while {} is held back: releasing maintenance so it can take over",
                            self.node
                        ),
                    },
                    Action::SetMaintenance(false),
                ];
            }
            return vec![];
        }
        self.peer_lost_reports = 0;
        if p.config_synced && p.conntrack_synced {
            self.gate = Gate::Released;
            return vec![
                Action::Decision {
                    kind: "failback",
                    message: format!(
                        "{} has the master's configuration and connection state: releasing maintenance, it takes the master role back",
                        self.node
                    ),
                },
                Action::SetMaintenance(false),
            ];
        }
        vec![]
    }

    /// Why the node is held back, for the node table.
    pub fn held_back(&self) -> Option<String> {
        (self.gate == Gate::Holding).then(|| {
            "failback: held in maintenance until configuration and conntrack resync are complete"
                .to_owned()
        })
    }
}

pub fn state_word(s: VrrpState) -> String {
    s.as_str_name()
        .trim_start_matches("VRRP_STATE_")
        .to_lowercase()
}

/// How often resync progress is measured while a node is held back, and
/// the orchestration RPCs retried after a failure.
const TICK: Duration = Duration::from_millis(500);

/// Follows the local vrrpd until shutdown, reconnecting every 200 ms.
pub async fn run(shared: Arc<Shared>, mut shutdown: tandem_runtime::Shutdown) {
    let mut waiting_logged = false;
    loop {
        let stream = match tandem_runtime::connect(&shared.runtime_dir, "vrrpd").await {
            Ok(ch) => VrrpdClient::new(ch)
                .watch_state(v1::WatchStateRequest {})
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| s.message().to_owned()),
            Err(e) => Err(e.to_string()),
        };
        match stream {
            Ok(mut stream) => {
                waiting_logged = false;
                tracing::info!("following vrrpd's state");
                shared.with_orchestrator(|o| o.vrrpd_restarted());
                let mut pending: Vec<Action> = Vec::new();
                let mut last_progress: Option<Progress> = None;
                let mut tick = tokio::time::interval(TICK);
                loop {
                    tokio::select! {
                        item = stream.next() => match item {
                            Some(Ok(change)) => {
                                let mut peer_master = peer_is_master(&shared, &change.master_address);
                                if !peer_master && change.new_state() == VrrpState::Backup && shared.preferred() {
                                    // Out of maintenance vrrpd may not have
                                    // heard the master yet: ask the peer.
                                    peer_master = matches!(
                                        shared.peer.status(&shared.config).await,
                                        Ok(s) if s.role() == v1::NodeRole::Master
                                    );
                                }
                                let actions = shared.with_orchestrator(|o| o.on_state(change.new_state(), peer_master));
                                pending = perform(&shared, merge(pending, actions)).await;
                            }
                            Some(Err(s)) => {
                                tracing::warn!("vrrpd's state stream failed: {}", s.message());
                                break;
                            }
                            None => break,
                        },
                        _ = tick.tick() => {
                            let preferred = shared.preferred();
                            let mut actions = shared.with_orchestrator(|o| o.set_preferred(preferred));
                            if shared.with_orchestrator(|o| o.gate()) == Gate::Holding {
                                let p = measure(&shared).await;
                                if last_progress != Some(p) {
                                    tracing::info!(
                                        config_synced = p.config_synced,
                                        conntrack_synced = p.conntrack_synced,
                                        peer_reachable = p.peer_reachable,
                                        "failback gate: waiting for the resync"
                                    );
                                    last_progress = Some(p);
                                }
                                actions.extend(shared.with_orchestrator(|o| o.on_progress(p)));
                            }
                            pending = perform(&shared, merge(pending, actions)).await;
                        }
                        () = shutdown.wait() => return,
                    }
                }
                tracing::warn!("lost vrrpd's state stream; reconnecting");
            }
            Err(why) => {
                if !waiting_logged {
                    tracing::warn!("waiting for vrrpd to follow its state: {why}");
                    waiting_logged = true;
                }
            }
        }
        // Short: until clustermanager follows vrrpd, a returning preferred
        // master is not gated.
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
            () = shutdown.wait() => return,
        }
    }
}

fn peer_is_master(shared: &Shared, master_address: &str) -> bool {
    let loaded = shared.config.current();
    let own = loaded.config.node.cluster_address.map(|a| a.to_string());
    !master_address.is_empty() && Some(master_address) != own.as_deref()
}

/// Failed actions are kept and retried at the next tick; a newer action of
/// the same kind replaces an older one.
fn merge(mut pending: Vec<Action>, new: Vec<Action>) -> Vec<Action> {
    for a in new {
        pending.retain(|p| {
            !matches!(
                (p, &a),
                (Action::SetConntrackRole(_), Action::SetConntrackRole(_))
                    | (Action::SetCfgDirection(_), Action::SetCfgDirection(_))
                    | (Action::SetMaintenance(_), Action::SetMaintenance(_))
            )
        });
        pending.push(a);
    }
    pending
}

/// Performs actions in order; returns those that failed (to retry).
async fn perform(shared: &Shared, actions: Vec<Action>) -> Vec<Action> {
    let dir = &shared.runtime_dir;
    let mut failed = Vec::new();
    for a in actions {
        let result = match &a {
            Action::Decision { kind, message } => {
                tracing::info!(kind, "{message}");
                shared.event(kind, message.clone());
                Ok(())
            }
            Action::SetConntrackRole(r) => crate::local::set_conntrack_role(dir, *r).await,
            Action::SetCfgDirection(d) => crate::local::set_cfg_direction(dir, *d).await,
            Action::SetMaintenance(on) => crate::local::set_maintenance_hold(dir, *on)
                .await
                .map(|_| ()),
            Action::ResyncConntrack => {
                shared.hold_started_ms.store(
                    tandem_runtime::unix_ms(std::time::SystemTime::now()),
                    std::sync::atomic::Ordering::SeqCst,
                );
                crate::local::resync_conntrack(dir).await
            }
        };
        if let Err(why) = result {
            tracing::warn!("{why}; retrying in {} ms", TICK.as_millis());
            failed.push(a);
        }
    }
    failed
}

/// Is this (held) node's configuration the master's, and its conntrack
/// table resynced?
async fn measure(shared: &Shared) -> Progress {
    let dir = &shared.runtime_dir;
    let (cfg, ct, peer) = tokio::join!(
        crate::local::cfgsync_status(dir),
        crate::local::conntrack_status(dir),
        shared.peer.status(&shared.config),
    );
    let peer_hash = peer.as_ref().ok().map(|p| p.manifest_hash.clone());
    tracing::debug!(
        local_hash = ?cfg.running().map(|c| c.manifest_hash.clone()),
        pending = ?cfg.running().map(|c| c.pending_changes),
        ?peer_hash,
        conntrack = ?ct.running().map(|c| (c.peer_alive, c.resync_complete, c.last_resync_unix_ms)),
        "failback gate measured"
    );
    let config_synced = match (cfg.running(), &peer_hash) {
        // Equal manifest hashes: identical replicated trees. (pending_changes
        // counts what this node would push; a held node receives.)
        (Some(c), Some(h)) => !h.is_empty() && c.manifest_hash == *h,
        _ => false,
    };
    // A bulk resync completed after the hold began (ResyncConntrack).
    let since = shared
        .hold_started_ms
        .load(std::sync::atomic::Ordering::SeqCst);
    let conntrack_synced = ct.running().is_some_and(|c| {
        c.peer_alive
            && c.resync_complete
            && c.last_resync_unix_ms > 0
            && c.last_resync_unix_ms >= since
    });
    Progress {
        config_synced,
        conntrack_synced,
        peer_reachable: peer.is_ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn maint(a: &[Action]) -> Option<bool> {
        a.iter().find_map(|a| match a {
            Action::SetMaintenance(on) => Some(*on),
            _ => None,
        })
    }

    #[test]
    fn master_sends_and_pushes_others_receive() {
        let mut o = Orchestrator::new("lb1", false);
        let a = o.on_state(VrrpState::Master, false);
        assert!(a.contains(&Action::SetConntrackRole(SyncRole::Sender)));
        assert!(a.contains(&Action::SetCfgDirection(SyncDirection::Push)));
        let a = o.on_state(VrrpState::Maintenance, true);
        assert!(a.contains(&Action::SetConntrackRole(SyncRole::Receiver)));
        assert!(a.contains(&Action::SetCfgDirection(SyncDirection::Receive)));
        // The same state again changes nothing.
        assert!(o.on_state(VrrpState::Maintenance, true).is_empty());
        assert_eq!(maint(&o.on_state(VrrpState::Backup, true)), None);
    }

    #[test]
    fn a_returning_preferred_master_is_held_until_both_resyncs_complete() {
        let mut o = Orchestrator::new("lb1", true);
        let a = o.on_state(VrrpState::Backup, true);
        assert_eq!(maint(&a), Some(true));
        assert!(a.contains(&Action::ResyncConntrack));
        assert_eq!(o.gate(), Gate::Holding);
        assert!(o.held_back().is_some());
        // vrrpd reports maintenance: still holding.
        assert_eq!(maint(&o.on_state(VrrpState::Maintenance, true)), None);
        let half = Progress {
            config_synced: true,
            conntrack_synced: false,
            peer_reachable: true,
        };
        assert!(o.on_progress(half).is_empty());
        let done = Progress {
            conntrack_synced: true,
            ..half
        };
        assert_eq!(maint(&o.on_progress(done)), Some(false));
        assert_eq!(o.gate(), Gate::Released);
        // Released, vrrpd goes backup (peer still master) before it
        // preempts: not held again.
        assert_eq!(maint(&o.on_state(VrrpState::Backup, true)), None);
        o.on_state(VrrpState::Master, false);
        assert_eq!(o.gate(), Gate::Armed);
    }

    #[test]
    fn no_gating_without_preference_or_without_a_master_peer() {
        let mut o = Orchestrator::new("lb1", false);
        assert_eq!(maint(&o.on_state(VrrpState::Backup, true)), None);
        let mut o = Orchestrator::new("lb1", true);
        assert_eq!(maint(&o.on_state(VrrpState::Backup, false)), None);
    }

    #[test]
    fn a_held_node_is_released_when_the_peer_is_lost() {
        let mut o = Orchestrator::new("lb1", true);
        o.on_state(VrrpState::Backup, true);
        let lost = Progress::default();
        for _ in 1..PEER_LOST_RELEASE {
            assert!(o.on_progress(lost).is_empty());
        }
        assert_eq!(maint(&o.on_progress(lost)), Some(false));
    }

    #[test]
    fn dropping_the_preference_releases_a_held_node() {
        let mut o = Orchestrator::new("lb1", true);
        o.on_state(VrrpState::Backup, true);
        assert_eq!(maint(&o.set_preferred(false)), Some(false));
        assert!(o.set_preferred(false).is_empty());
    }

    #[test]
    fn a_vrrpd_restart_rearms_the_gate() {
        let mut o = Orchestrator::new("lb1", true);
        o.on_state(VrrpState::Backup, true);
        o.on_progress(Progress {
            config_synced: true,
            conntrack_synced: true,
            peer_reachable: true,
        });
        assert_eq!(o.gate(), Gate::Released);
        o.vrrpd_restarted();
        assert_eq!(maint(&o.on_state(VrrpState::Backup, true)), Some(true));
    }

    #[test]
    fn merge_keeps_only_the_newest_of_a_kind() {
        let p = merge(
            vec![
                Action::SetMaintenance(true),
                Action::SetConntrackRole(SyncRole::Sender),
            ],
            vec![Action::SetMaintenance(false)],
        );
        assert_eq!(
            p,
            vec![
                Action::SetConntrackRole(SyncRole::Sender),
                Action::SetMaintenance(false)
            ]
        );
    }
}
