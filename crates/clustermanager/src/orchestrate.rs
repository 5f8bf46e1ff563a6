//! Role orchestration, pure: [`Orchestrator`] takes vrrpd's state changes
//! and the resync progress and answers what to tell the other daemons (no
//! sockets, no clocks; `conductor.rs` is the shell that follows vrrpd and
//! performs the answers). It imports nothing else of the crate.
//!
//! - MASTER → conntrack-syncd SENDER and cfg-syncd PUSH; any other state →
//!   RECEIVER and RECEIVE.
//! - Failback gating: a node that is the preferred master (`failback` = its
//!   name) and finds the peer master when it comes back is held in vrrpd
//!   maintenance until its configuration (same manifest hash as the master,
//!   nothing pending) and its conntrack table (bulk resync complete) are in
//!   sync; then maintenance is released and vrrpd preempts.

use tandem_proto::v1::{SyncDirection, SyncRole, VrrpState};

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
        if changed && state == VrrpState::Standalone {
            // Without a cluster there is nothing to replicate. cfg-syncd
            // drops a direction set while clustered (after a destroy it
            // would still push); conntrack-syncd is standalone by its own
            // configuration and refuses orders then: nothing to tell it,
            // nothing to retry.
            out.push(Action::Decision {
                kind: "role",
                message: format!(
                    "{} is standalone: nothing to replicate, cfg-syncd none",
                    self.node
                ),
            });
            out.push(Action::SetCfgDirection(SyncDirection::None));
        } else if changed {
            let (role, dir) = match state {
                VrrpState::Master => (SyncRole::Sender, SyncDirection::Push),
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

/// Failed actions are kept and retried at the next tick; a newer action of
/// the same kind replaces an older one.
pub fn merge(mut pending: Vec<Action>, new: Vec<Action>) -> Vec<Action> {
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
    fn a_standalone_node_orders_no_conntrack_role() {
        let mut o = Orchestrator::new("lb1", false);
        o.on_state(VrrpState::Master, false);
        let a = o.on_state(VrrpState::Standalone, false);
        assert!(matches!(&a[0], Action::Decision { kind: "role", .. }));
        assert_eq!(a[1..], [Action::SetCfgDirection(SyncDirection::None)]);
        assert!(!a.iter().any(|a| matches!(a, Action::SetConntrackRole(_))));
        assert!(o.on_state(VrrpState::Standalone, false).is_empty());
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
