//! The active-active cluster (`mode = "active-active"`, 3-8 nodes) as
//! clustermanager sees it: who the leader is, the node table's rules for a
//! node that announces its VIPs through routed and BIRD (pure), and the
//! other nodes' links.
//!
//! **The leader** is the first node of cluster.toml's `[[nodes]]` (the one
//! that ran `cluster create`). Configuration changes are made there (the
//! others refuse them, naming it), its cfg-syncd pushes the replicated
//! files to every other node, and it runs `cluster add-node` and
//! `remove-node`. There is no election: which node leads is part of the
//! replicated configuration, so every node agrees, also during a
//! partition; a leader that is gone for good is removed from
//! `[[nodes]]` (`remove-node` on it, or by editing cluster.toml on the next
//! node), and the next node leads.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tandem_config::{ClusterConfig, ClusterMode, ClusterNode, Config};
use tandem_proto::v1::{self, NodeHealth, NodeRole};

use crate::local::{LocalStatuses, Probe};
use crate::node_table::Verdict;
use crate::peer::PeerLink;

/// Whether `c` is a node of an active-active cluster.
pub fn is_active(c: &Config) -> bool {
    c.cluster
        .as_ref()
        .is_some_and(|cl| cl.mode == ClusterMode::ActiveActive)
}

/// The leader: the first of `[[nodes]]`.
pub fn leader(c: &ClusterConfig) -> Option<&ClusterNode> {
    c.nodes.first()
}

/// Whether this node leads its active-active cluster.
pub fn leads(c: &Config) -> bool {
    c.cluster
        .as_ref()
        .filter(|cl| cl.mode == ClusterMode::ActiveActive)
        .and_then(leader)
        .is_some_and(|l| l.name == c.node.name)
}

/// Every node but this one, in cluster.toml's order: (name, address).
pub fn others(c: &Config) -> Vec<(String, IpAddr)> {
    c.cluster
        .iter()
        .flat_map(|cl| cl.nodes.iter())
        .filter(|n| n.name != c.node.name)
        .map(|n| (n.name.clone(), n.address))
        .collect()
}

/// The mode word of ClusterManagerStatus: "standalone", "active-passive"
/// or "active-active".
pub fn mode_word(c: &Config) -> &'static str {
    c.cluster
        .as_ref()
        .map_or("standalone", |cl| cl.mode.as_str())
}

/// The other nodes' clustermanagers, each over its own SSH link (the
/// pair's one peer is `Shared::peer`).
pub struct Members {
    config_dir: PathBuf,
    peer_runtime_dir: PathBuf,
    links: Mutex<HashMap<String, Arc<PeerLink>>>,
}

impl Members {
    pub fn new(config_dir: PathBuf, peer_runtime_dir: PathBuf) -> Members {
        Members {
            config_dir,
            peer_runtime_dir,
            links: Mutex::new(HashMap::new()),
        }
    }

    /// The link to node `name` (made on first use, then kept).
    pub fn link(&self, name: &str) -> Arc<PeerLink> {
        let mut links = self
            .links
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        links
            .entry(name.to_owned())
            .or_insert_with(|| {
                Arc::new(PeerLink::for_node(
                    self.config_dir.clone(),
                    self.peer_runtime_dir.clone(),
                    name,
                ))
            })
            .clone()
    }

    /// Closes the links of nodes that are no longer in cluster.toml.
    pub async fn prune(&self, c: &Config) {
        let keep: Vec<String> = others(c).into_iter().map(|(n, _)| n).collect();
        let gone: Vec<Arc<PeerLink>> = {
            let mut links = self
                .links
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let names: Vec<String> = links
                .keys()
                .filter(|k| !keep.contains(k))
                .cloned()
                .collect();
            names.iter().filter_map(|n| links.remove(n)).collect()
        };
        for l in gone {
            l.close().await;
        }
    }

    pub async fn close(&self) {
        let all: Vec<Arc<PeerLink>> = {
            let mut links = self
                .links
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            links.drain().map(|(_, l)| l).collect()
        };
        for l in all {
            l.close().await;
        }
    }
}

/// Facts beyond the daemons' Status.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// Other nodes whose clustermanager does not answer (their rows are
    /// grey and say why).
    pub unreachable: Vec<String>,
}

fn probe_failure<T>(daemon: &str, p: &Probe<T>) -> Option<String> {
    match p {
        Probe::Running(_) => None,
        Probe::NotRunning => Some(format!("{daemon} is not running")),
        Probe::Failed(why) => Some(format!("{daemon} does not answer: {why}")),
    }
}

fn reload_error(daemon: &str, info: Option<&v1::DaemonInfo>) -> Option<String> {
    info.filter(|i| !i.last_reload_error.is_empty())
        .map(|i| format!("{daemon}: last reload refused: {}", i.last_reload_error))
}

/// Judges an active-active node from lb-forwarder's, routed's and
/// cfg-syncd's Status (vrrpd and conntrack-syncd have no work there).
///
/// - red: a daemon is not running or refused its configuration, the
///   datapath is not ready, BIRD does not answer or refused its
///   configuration, or a BGP session is not established;
/// - orange: maintenance (routed withdraws every VIP);
/// - yellow: a VIP is withdrawn although the node is in service (its farms
///   have no healthy backend), configuration set aside or refused;
/// - green: every VIP announced, every session established.
pub fn judge(st: &LocalStatuses, ctx: &Context) -> Verdict {
    let mut failures: Vec<String> = [
        probe_failure("lb-forwarder", &st.forwarder),
        probe_failure("routed", &st.routed),
        probe_failure("cfg-syncd", &st.cfgsync),
    ]
    .into_iter()
    .flatten()
    .collect();
    let fwd = st.forwarder.running();
    let routed = st.routed.running();
    let cfg = st.cfgsync.running();
    failures.extend(
        [
            reload_error("lb-forwarder", fwd.and_then(|s| s.daemon.as_ref())),
            reload_error("routed", routed.and_then(|s| s.daemon.as_ref())),
            reload_error("cfg-syncd", cfg.and_then(|s| s.daemon.as_ref())),
        ]
        .into_iter()
        .flatten(),
    );
    let mut warnings = Vec::new();
    let mut notes = Vec::new();
    if let Some(f) = fwd
        && f.farms > 0
        && !f.datapath_loaded
    {
        failures.push("lb-forwarder: the datapath is not loaded".into());
    }
    let mut maintenance = None;
    if let Some(r) = routed {
        if r.mode != "active-active" {
            failures.push(format!(
                "routed does not run the active-active cluster yet (it sees {})",
                if r.mode.is_empty() {
                    "nothing"
                } else {
                    &r.mode
                }
            ));
        } else {
            if !r.datapath_ready {
                failures.push(format!("datapath not ready: {}", r.datapath_message));
            }
            if !r.bird_reachable {
                failures.push(if r.bird_message.is_empty() {
                    "BIRD does not answer".to_owned()
                } else {
                    r.bird_message.clone()
                });
            } else if !r.bird_message.is_empty() {
                failures.push(r.bird_message.clone());
            }
            for s in r.sessions.iter().filter(|s| !s.established) {
                failures.push(format!(
                    "BGP session to {} ({}) is down: {}",
                    s.peer,
                    s.address,
                    if s.bgp_state.is_empty() {
                        &s.state
                    } else {
                        &s.bgp_state
                    }
                ));
            }
            if r.maintenance {
                maintenance = Some(if r.maintenance_reason.is_empty() {
                    "maintenance: every VIP withdrawn from the routers".to_owned()
                } else {
                    format!(
                        "maintenance ({}): every VIP withdrawn from the routers",
                        r.maintenance_reason
                    )
                });
            } else {
                for v in r.vips.iter().filter(|v| !v.announced) {
                    warnings.push(format!("VIP {} withdrawn: {}", v.vip, v.reason));
                }
            }
        }
    }
    if let Some(c) = cfg {
        if !c.last_error.is_empty() {
            // The leader's pushes failing because a node is away: that
            // node's row is grey and says so; it catches up on return.
            if !ctx.unreachable.is_empty() && c.direction() == v1::SyncDirection::Push {
                notes.push(format!(
                    "configuration changes wait for {} (cfg-syncd: {})",
                    ctx.unreachable.join(", "),
                    c.last_error
                ));
            } else {
                failures.push(format!("cfg-syncd: {}", c.last_error));
            }
        }
        crate::node_table::cfgsync_warnings(c, &mut warnings);
    }
    let role = if maintenance.is_some() {
        NodeRole::Maintenance
    } else {
        NodeRole::Active
    };
    if !failures.is_empty() {
        failures.extend(maintenance);
        failures.extend(warnings);
        return Verdict {
            role,
            health: NodeHealth::Failure,
            message: failures.join("; "),
        };
    }
    if let Some(m) = maintenance {
        let mut parts = vec![m];
        parts.extend(warnings);
        return Verdict {
            role,
            health: NodeHealth::Maintenance,
            message: parts.join("; "),
        };
    }
    if !warnings.is_empty() {
        warnings.extend(notes);
        return Verdict {
            role,
            health: NodeHealth::Degraded,
            message: warnings.join("; "),
        };
    }
    let announced = routed.map_or(0, |r| r.vips.len());
    let sessions = routed.map_or(0, |r| r.sessions.len());
    let mut message = format!(
        "operational: {} announced, {} established",
        plural(announced, "VIP"),
        plural(sessions, "BGP session")
    );
    if !notes.is_empty() {
        message.push_str("; ");
        message.push_str(&notes.join("; "));
    }
    Verdict {
        role,
        health: NodeHealth::Operational,
        message,
    }
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str) -> Option<v1::DaemonInfo> {
        Some(v1::DaemonInfo {
            daemon: name.into(),
            node_name: "lb1".into(),
            ..Default::default()
        })
    }

    fn serving() -> LocalStatuses {
        LocalStatuses {
            vrrpd: Probe::NotRunning,
            conntrack: Probe::NotRunning,
            forwarder: Probe::Running(v1::LbForwarderStatus {
                daemon: info("lb-forwarder"),
                farms: 1,
                datapath_loaded: true,
                ..Default::default()
            }),
            cfgsync: Probe::Running(v1::CfgSyncStatus {
                daemon: info("cfg-syncd"),
                ..Default::default()
            }),
            routed: Probe::Running(v1::RoutedStatus {
                daemon: info("routed"),
                mode: "active-active".into(),
                datapath_ready: true,
                bird_reachable: true,
                vips: vec![v1::VipAnnouncement {
                    vip: "10.0.0.100".into(),
                    announced: true,
                    farms: vec!["web".into()],
                    ..Default::default()
                }],
                sessions: vec![v1::BgpSession {
                    peer: "tor1".into(),
                    address: "10.2.0.1".into(),
                    state: "up".into(),
                    bgp_state: "Established".into(),
                    established: true,
                    since: String::new(),
                }],
                ..Default::default()
            }),
        }
    }

    fn routed(st: &mut LocalStatuses) -> &mut v1::RoutedStatus {
        match &mut st.routed {
            Probe::Running(r) => r,
            _ => unreachable!(),
        }
    }

    #[test]
    fn announced_and_established_is_green_and_active_without_vrrpd() {
        let v = judge(&serving(), &Context::default());
        assert_eq!(
            v,
            Verdict {
                role: NodeRole::Active,
                health: NodeHealth::Operational,
                message: "operational: 1 VIP announced, 1 BGP session established".into()
            }
        );
    }

    #[test]
    fn maintenance_is_orange_with_its_reason() {
        let mut st = serving();
        let r = routed(&mut st);
        r.maintenance = true;
        r.maintenance_reason = "kernel upgrade".into();
        r.vips[0].announced = false;
        r.vips[0].reason = "maintenance: kernel upgrade".into();
        let v = judge(&st, &Context::default());
        assert_eq!(v.role, NodeRole::Maintenance);
        assert_eq!(v.health, NodeHealth::Maintenance);
        assert_eq!(
            v.message,
            "maintenance (kernel upgrade): every VIP withdrawn from the routers"
        );
    }

    #[test]
    fn a_session_down_or_an_unready_datapath_is_red_and_named() {
        let mut st = serving();
        let r = routed(&mut st);
        r.sessions[0].established = false;
        r.sessions[0].bgp_state = "Active Socket: Connection refused".into();
        let v = judge(&st, &Context::default());
        assert_eq!(v.health, NodeHealth::Failure);
        assert_eq!(
            v.message,
            "BGP session to tor1 (10.2.0.1) is down: Active Socket: Connection refused"
        );
        let mut st = serving();
        let r = routed(&mut st);
        r.datapath_ready = false;
        r.datapath_message = "lb-forwarder does not answer: connection refused".into();
        let v = judge(&st, &Context::default());
        assert_eq!(v.health, NodeHealth::Failure);
        assert_eq!(
            v.message,
            "datapath not ready: lb-forwarder does not answer: connection refused"
        );
        let mut st = serving();
        st.routed = Probe::NotRunning;
        let v = judge(&st, &Context::default());
        assert_eq!(
            (v.health, v.message.as_str()),
            (NodeHealth::Failure, "routed is not running")
        );
        let mut st = serving();
        let r = routed(&mut st);
        r.bird_reachable = false;
        r.bird_message = "BIRD does not answer: connecting to /run/tandem/bird.ctl".into();
        assert_eq!(
            judge(&st, &Context::default()).message,
            "BIRD does not answer: connecting to /run/tandem/bird.ctl"
        );
    }

    #[test]
    fn a_vip_withdrawn_in_service_is_yellow() {
        let mut st = serving();
        let r = routed(&mut st);
        r.vips[0].announced = false;
        r.vips[0].reason = "farm web has no healthy backend".into();
        let v = judge(&st, &Context::default());
        assert_eq!(v.health, NodeHealth::Degraded);
        assert_eq!(
            v.message,
            "VIP 10.0.0.100 withdrawn: farm web has no healthy backend"
        );
    }

    #[test]
    fn the_leader_waiting_for_an_away_node_is_not_red() {
        let mut st = serving();
        if let Probe::Running(c) = &mut st.cfgsync {
            c.last_error = "peer lb3 (10.2.0.13:22): connecting: timed out".into();
            c.set_direction(v1::SyncDirection::Push);
        }
        let away = Context {
            unreachable: vec!["lb3".into()],
        };
        let v = judge(&st, &away);
        assert_eq!(v.health, NodeHealth::Operational, "{}", v.message);
        assert!(
            v.message.contains("configuration changes wait for lb3"),
            "{}",
            v.message
        );
        assert_eq!(judge(&st, &Context::default()).health, NodeHealth::Failure);
    }

    #[test]
    fn the_leader_is_the_first_node() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("node.toml"),
            "name = \"lb2\"\ncluster_interface = \"eth0\"\ncluster_address = \"10.2.0.12\"\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("cluster.toml"),
            "mode = \"active-active\"\n\
             [[nodes]]\nname = \"lb1\"\naddress = \"10.2.0.11\"\n\
             [[nodes]]\nname = \"lb2\"\naddress = \"10.2.0.12\"\n\
             [[nodes]]\nname = \"lb3\"\naddress = \"10.2.0.13\"\n\
             [bgp]\nlocal_as = 65010\n[[bgp.peers]]\nname = \"tor1\"\naddress = \"10.2.0.1\"\nremote_as = 65000\n",
        )
        .unwrap();
        let c = Config::load(dir.path()).unwrap();
        assert!(is_active(&c));
        assert!(!leads(&c));
        assert_eq!(leader(c.cluster.as_ref().unwrap()).unwrap().name, "lb1");
        let names: Vec<String> = others(&c).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["lb1", "lb3"]);
        assert_eq!(mode_word(&c), "active-active");
    }
}
