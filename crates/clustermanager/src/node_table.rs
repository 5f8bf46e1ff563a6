//! The node table's rules, pure: the daemons' Status in, a role, a colour
//! and a message out. Green operational, yellow degraded (serving, but
//! something needs the operator: replication lagging, a foreign VRRP
//! speaker, configuration set aside or refused), orange maintenance, grey
//! unreachable (the peer only), red failure with which daemon and why.

use std::sync::Arc;
use std::time::Duration;

use tandem_proto::v1::{self, NodeHealth, NodeRole, VrrpState};

use crate::local::{LocalStatuses, Probe};
use crate::peer::PeerError;
use crate::peer::peer_of;
use crate::state::Shared;

/// This node's role, from vrrpd's state.
pub fn role_of(state: VrrpState) -> NodeRole {
    match state {
        VrrpState::Master => NodeRole::Master,
        VrrpState::Backup | VrrpState::Initialize | VrrpState::Fault => NodeRole::Backup,
        VrrpState::Maintenance => NodeRole::Maintenance,
        VrrpState::Standalone => NodeRole::Standalone,
        VrrpState::Unspecified => NodeRole::Unspecified,
    }
}

/// The local row's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub role: NodeRole,
    pub health: NodeHealth,
    pub message: String,
}

/// Extra facts the daemons' Status does not carry.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// The peer's clustermanager answered lately.
    pub peer_reachable: bool,
    /// The peer's name, for messages.
    pub peer_name: String,
    /// Why clustermanager itself holds vrrpd in maintenance (failback
    /// gating), if it does.
    pub held_back: Option<String>,
    /// No cluster.toml: nothing to replicate, no peer to reach.
    pub standalone: bool,
    /// Now, for the age of what the daemons report.
    pub now_unix_ms: i64,
}

/// A foreign VRRP speaker heard within this long is shown as a warning.
pub const FOREIGN_SPEAKER_SHOWN_MS: i64 = 5 * 60 * 1000;
/// At most this many refused files are named in the message.
const REFUSED_NAMED: usize = 3;

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

/// conntrack-syncd's replication health: (failure, warning), at most one.
fn conntrack_health(
    c: &v1::ConntrackSyncStatus,
    ctx: &Context,
) -> (Option<String>, Option<String>) {
    use v1::SyncHealth;
    let (health, message) = match c.health() {
        // A conntrack-syncd that does not judge itself: the peer's silence
        // is the failure it would report.
        SyncHealth::Unspecified
            if matches!(c.role(), v1::SyncRole::Sender | v1::SyncRole::Receiver)
                && !c.peer_alive =>
        {
            (
                SyncHealth::Failed,
                format!("peer {} silent: connections are not replicated", c.peer),
            )
        }
        SyncHealth::Unspecified | SyncHealth::Ok => return (None, None),
        h => (
            h,
            if c.health_message.is_empty() {
                "replication is not working".to_owned()
            } else {
                c.health_message.clone()
            },
        ),
    };
    let text = format!("conntrack-syncd: {message}");
    match health {
        // The peer is gone altogether: its row is grey and says so; this
        // node serves, unprotected.
        SyncHealth::Failed if ctx.peer_reachable || ctx.peer_name.is_empty() => (Some(text), None),
        _ => (None, Some(text)),
    }
}

/// Judges this node from its daemons' Status. Red wins over orange, orange
/// over yellow, yellow over green; every failure and warning found is in
/// the message.
pub fn judge(st: &LocalStatuses, ctx: &Context) -> Verdict {
    let mut failures: Vec<String> = [
        probe_failure("vrrpd", &st.vrrpd),
        probe_failure("lb-forwarder", &st.forwarder),
        probe_failure("conntrack-syncd", &st.conntrack),
        probe_failure("cfg-syncd", &st.cfgsync),
    ]
    .into_iter()
    .flatten()
    .collect();
    let mut warnings: Vec<String> = Vec::new();
    let vrrp = st.vrrpd.running();
    let fwd = st.forwarder.running();
    let ct = st.conntrack.running();
    let cfg = st.cfgsync.running();
    failures.extend(
        [
            reload_error("vrrpd", vrrp.and_then(|s| s.daemon.as_ref())),
            reload_error("lb-forwarder", fwd.and_then(|s| s.daemon.as_ref())),
            reload_error("conntrack-syncd", ct.and_then(|s| s.daemon.as_ref())),
            reload_error("cfg-syncd", cfg.and_then(|s| s.daemon.as_ref())),
        ]
        .into_iter()
        .flatten(),
    );
    if let Some(v) = vrrp {
        if v.state() == VrrpState::Fault {
            failures.push(format!("vrrpd: fault: {}", v.reason));
        }
        for f in &v.foreign_speakers {
            let age_ms = ctx.now_unix_ms.saturating_sub(f.last_seen_unix_ms);
            if f.last_seen_unix_ms > 0 && age_ms > FOREIGN_SPEAKER_SHOWN_MS {
                continue;
            }
            warnings.push(format!(
                "foreign VRRP speaker {} on VRID {} (priority {}, {} advert(s), last {} s ago): not a cluster node, its adverts are dropped",
                f.address,
                f.virtual_router_id,
                f.priority,
                f.adverts,
                age_ms.max(0) / 1000
            ));
        }
    }
    if let Some(f) = fwd
        && f.farms > 0
        && !f.datapath_loaded
    {
        failures.push("lb-forwarder: the datapath is not loaded".into());
    }
    // A standalone node replicates nothing: conntrack-syncd has no peer by
    // design, which is neither an error nor a warning.
    if let Some(c) = ct
        && !ctx.standalone
    {
        if !c.last_error.is_empty() {
            failures.push(format!("conntrack-syncd: {}", c.last_error));
        } else {
            let (failure, warning) = conntrack_health(c, ctx);
            failures.extend(failure);
            warnings.extend(warning);
        }
    }
    let mut notes = Vec::new();
    if let Some(c) = cfg {
        // A standalone node has no peer to replicate to: an error left
        // from before `cluster destroy` (a push the former peer refused,
        // its direction now NONE) says nothing about this node.
        if !c.last_error.is_empty() && !ctx.standalone {
            // A master whose pushes fail only because the peer is gone is
            // not broken itself: the peer's row is grey and says so;
            // cfg-syncd catches up when it returns.
            if !ctx.peer_reachable && !c.peer_connected && c.direction() == v1::SyncDirection::Push
            {
                notes.push(format!(
                    "configuration changes wait for {} (cfg-syncd: {})",
                    ctx.peer_name, c.last_error
                ));
            } else {
                failures.push(format!("cfg-syncd: {}", c.last_error));
            }
        }
        cfgsync_warnings(c, &mut warnings);
    }
    let role = vrrp.map_or(NodeRole::Unspecified, |v| role_of(v.state()));
    if !failures.is_empty() {
        failures.extend(warnings);
        return Verdict {
            role,
            health: NodeHealth::Failure,
            message: failures.join("; "),
        };
    }
    if role == NodeRole::Maintenance {
        let why = ctx.held_back.clone().unwrap_or_else(|| {
            vrrp.map(|v| v.reason.clone())
                .filter(|r| !r.is_empty())
                .unwrap_or_else(|| "maintenance".into())
        });
        let mut parts = vec![why];
        parts.extend(warnings);
        return Verdict {
            role,
            health: NodeHealth::Maintenance,
            message: parts.join("; "),
        };
    }
    if !ctx.standalone
        && role != NodeRole::Standalone
        && !ctx.peer_reachable
        && !ctx.peer_name.is_empty()
    {
        notes.push(format!("peer {} unreachable", ctx.peer_name));
    }
    if !warnings.is_empty() {
        warnings.extend(notes);
        return Verdict {
            role,
            health: NodeHealth::Degraded,
            message: warnings.join("; "),
        };
    }
    let message = if notes.is_empty() {
        "operational".to_owned()
    } else {
        format!("operational; {}", notes.join("; "))
    };
    Verdict {
        role,
        health: NodeHealth::Operational,
        message,
    }
}

/// The colour word an operator reads for a health.
pub fn colour(h: NodeHealth) -> &'static str {
    match h {
        NodeHealth::Operational => "green",
        NodeHealth::Maintenance => "orange",
        NodeHealth::Unreachable => "grey",
        NodeHealth::Failure => "red",
        NodeHealth::Degraded => "yellow",
        NodeHealth::Unspecified => "unknown",
    }
}

/// This node's row: its daemons' Status asked and judged now.
pub async fn local_verdict(shared: &Shared) -> (Verdict, LocalStatuses) {
    let loaded = shared.config.current();
    if crate::active::is_active(&loaded.config) {
        let st = crate::local::statuses(&shared.runtime_dir, true).await;
        let mut unreachable = Vec::new();
        for (name, _) in crate::active::others(&loaded.config) {
            if !shared.members.link(&name).seems_reachable().await {
                unreachable.push(name);
            }
        }
        let v = crate::active::judge(&st, &crate::active::Context { unreachable });
        return (v, st);
    }
    let st = crate::local::statuses(&shared.runtime_dir, false).await;
    let ctx = Context {
        peer_reachable: shared.peer.seems_reachable().await,
        peer_name: peer_of(&loaded.config).map(|p| p.0).unwrap_or_default(),
        held_back: shared.with_orchestrator(|o| o.held_back()),
        standalone: loaded.config.cluster.is_none(),
        now_unix_ms: tandem_runtime::unix_ms(std::time::SystemTime::now()),
    };
    let mut v = judge(&st, &ctx);
    if loaded.config.cluster.is_none() {
        v.role = NodeRole::Standalone;
    }
    (v, st)
}

/// How often this node's health (and the peer's reachability) is checked
/// for WatchEvents.
const HEALTH_EVERY: Duration = Duration::from_secs(1);

/// Publishes one event, and logs one line, whenever this node's verdict or
/// the peer's reachability changes. Asking the peer also keeps the SSH
/// session warm, so the node table answers at once.
pub async fn watch_health(shared: Arc<Shared>, mut shutdown: tandem_runtime::Shutdown) {
    let mut last: Option<(NodeHealth, String)> = None;
    let mut peer_last: Option<Result<(), String>> = None;
    let mut members_last = std::collections::HashMap::new();
    let mut tick = tokio::time::interval(HEALTH_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.wait() => return,
        }
        if crate::active::is_active(&shared.config.current().config) {
            watch_members(&shared, &mut members_last).await;
        } else {
            members_last.clear();
            watch_peer(&shared, &mut peer_last).await;
        }
        let (v, _) = local_verdict(&shared).await;
        let now = (v.health, v.message.clone());
        if last.as_ref() != Some(&now) {
            let msg = format!(
                "{} {}: {}",
                colour(v.health),
                health_word(v.health),
                v.message
            );
            // One line per change of colour or message, never per check.
            match v.health {
                NodeHealth::Failure => {
                    tracing::error!(node = %shared.node_name(), "node health {msg}")
                }
                NodeHealth::Degraded => {
                    tracing::warn!(node = %shared.node_name(), "node health {msg}")
                }
                _ => tracing::info!(node = %shared.node_name(), "node health {msg}"),
            }
            shared.event("health", msg);
            last = Some(now);
        }
    }
}

/// Asks the pair's peer (keeping its session warm); one event per change
/// of its reachability.
async fn watch_peer(shared: &Shared, last: &mut Option<Result<(), String>>) {
    let peer = match shared.peer.status(&shared.config).await {
        Ok(_) => Ok(()),
        Err(PeerError::Standalone) => Ok(()),
        Err(e) => Err(e.to_string()),
    };
    if last.as_ref().map(Result::is_ok) != Some(peer.is_ok()) {
        let msg = match &peer {
            Ok(()) => "the peer's clustermanager answers".to_owned(),
            Err(e) => e.clone(),
        };
        if last.is_some() || peer.is_err() {
            shared.event("peer", msg);
        }
    }
    *last = Some(peer);
}

/// Asks every other node of an active-active cluster at once (keeping
/// their sessions warm); one log line and one event per change of a
/// node's reachability.
async fn watch_members(shared: &Shared, last: &mut std::collections::HashMap<String, bool>) {
    let others = crate::active::others(&shared.config.current().config);
    let asks = others.iter().map(|(name, _)| {
        let link = shared.members.link(name);
        async move { (name.clone(), link.status(&shared.config).await) }
    });
    let answers = futures::future::join_all(asks).await;
    last.retain(|n, _| others.iter().any(|(o, _)| o == n));
    for (name, r) in answers {
        let ok = r.is_ok();
        let before = last.insert(name.clone(), ok);
        if before == Some(ok) || (before.is_none() && ok) {
            continue;
        }
        let msg = match r {
            Ok(_) => format!("node {name}'s clustermanager answers again"),
            Err(e) => format!("node {name} unreachable: {e}"),
        };
        if ok {
            tracing::info!(node = %name, "{msg}");
        } else {
            tracing::warn!(node = %name, "{msg}");
        }
        shared.event("peer", msg);
    }
}

/// The word shown next to the colour.
pub fn health_word(h: NodeHealth) -> &'static str {
    match h {
        NodeHealth::Operational => "operational",
        NodeHealth::Maintenance => "maintenance",
        NodeHealth::Unreachable => "unreachable",
        NodeHealth::Failure => "failure",
        NodeHealth::Degraded => "degraded",
        NodeHealth::Unspecified => "unknown",
    }
}

/// What cfg-syncd's Status warns of, for a node table row: configuration
/// set aside at a partition's heal, files it refuses to replicate.
pub(crate) fn cfgsync_warnings(c: &v1::CfgSyncStatus, warnings: &mut Vec<String>) {
    for a in &c.set_aside {
        warnings.push(format!(
            "configuration changed here during a partition was set aside when it healed: {} file(s) ({}) kept in {}; review them, then `tandemctl cluster ack`",
            a.paths.len(),
            a.paths.join(", "),
            a.directory
        ));
    }
    if !c.refused.is_empty() {
        let named: Vec<&str> = c
            .refused
            .iter()
            .take(REFUSED_NAMED)
            .map(String::as_str)
            .collect();
        let more = c.refused.len().saturating_sub(REFUSED_NAMED);
        warnings.push(format!(
            "cfg-syncd does not replicate {} file(s): {}{}",
            c.refused.len(),
            named.join("; "),
            if more > 0 {
                format!("; and {more} more")
            } else {
                String::new()
            }
        ));
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

    fn healthy(state: VrrpState) -> LocalStatuses {
        let mut vrrp = v1::VrrpStatus {
            daemon: info("vrrpd"),
            ..Default::default()
        };
        vrrp.set_state(state);
        let mut cfg = v1::CfgSyncStatus {
            daemon: info("cfg-syncd"),
            peer_connected: true,
            ..Default::default()
        };
        cfg.set_direction(v1::SyncDirection::Push);
        LocalStatuses {
            vrrpd: Probe::Running(vrrp),
            forwarder: Probe::Running(v1::LbForwarderStatus {
                daemon: info("lb-forwarder"),
                farms: 2,
                datapath_loaded: true,
                ..Default::default()
            }),
            conntrack: Probe::Running({
                let mut c = v1::ConntrackSyncStatus {
                    daemon: info("conntrack-syncd"),
                    peer: "192.168.100.2:3780".into(),
                    peer_alive: true,
                    ..Default::default()
                };
                c.set_role(if state == VrrpState::Master {
                    v1::SyncRole::Sender
                } else {
                    v1::SyncRole::Receiver
                });
                c.set_health(v1::SyncHealth::Ok);
                c
            }),
            cfgsync: Probe::Running(cfg),
            routed: Probe::NotRunning,
        }
    }

    fn reachable() -> Context {
        Context {
            peer_reachable: true,
            peer_name: "lb2".into(),
            held_back: None,
            standalone: false,
            now_unix_ms: 1_000_000_000,
        }
    }

    #[test]
    fn all_daemons_well_is_green_with_the_vrrp_role() {
        let v = judge(&healthy(VrrpState::Master), &reachable());
        assert_eq!(
            v,
            Verdict {
                role: NodeRole::Master,
                health: NodeHealth::Operational,
                message: "operational".into()
            }
        );
        assert_eq!(
            judge(&healthy(VrrpState::Backup), &reachable()).role,
            NodeRole::Backup
        );
    }

    #[test]
    fn a_stopped_daemon_is_red_and_named() {
        let mut st = healthy(VrrpState::Master);
        st.conntrack = Probe::NotRunning;
        let v = judge(&st, &reachable());
        assert_eq!(v.health, NodeHealth::Failure);
        assert_eq!(v.message, "conntrack-syncd is not running");
        assert_eq!(v.role, NodeRole::Master);
        st.vrrpd = Probe::Failed("no answer within 2 s".into());
        let v = judge(&st, &reachable());
        assert_eq!(v.role, NodeRole::Unspecified);
        assert!(
            v.message.starts_with("vrrpd does not answer"),
            "{}",
            v.message
        );
    }

    #[test]
    fn daemon_errors_are_red_with_the_reason() {
        let mut st = healthy(VrrpState::Backup);
        if let Probe::Running(c) = &mut st.conntrack {
            c.last_error = "no key".into();
        }
        let v = judge(&st, &reachable());
        assert_eq!(v.health, NodeHealth::Failure);
        assert_eq!(v.message, "conntrack-syncd: no key");
        let mut st = healthy(VrrpState::Master);
        if let Probe::Running(f) = &mut st.forwarder {
            f.daemon.as_mut().unwrap().last_reload_error = "farms/web.toml:3:8: bad".into();
        }
        let v = judge(&st, &reachable());
        assert!(
            v.message
                .contains("lb-forwarder: last reload refused: farms/web.toml:3:8")
        );
    }

    #[test]
    fn maintenance_is_orange_unless_something_failed() {
        let v = judge(&healthy(VrrpState::Maintenance), &reachable());
        assert_eq!(v.health, NodeHealth::Maintenance);
        assert_eq!(v.role, NodeRole::Maintenance);
        let mut st = healthy(VrrpState::Maintenance);
        st.cfgsync = Probe::NotRunning;
        assert_eq!(judge(&st, &reachable()).health, NodeHealth::Failure);
    }

    #[test]
    fn a_push_failing_only_because_the_peer_is_gone_is_not_a_local_failure() {
        let mut st = healthy(VrrpState::Master);
        if let Probe::Running(c) = &mut st.cfgsync {
            c.last_error = "peer lb2 (10.0.0.2:22): connecting: timed out".into();
            c.peer_connected = false;
        }
        let gone = Context {
            peer_reachable: false,
            ..reachable()
        };
        let v = judge(&st, &gone);
        assert_eq!(v.health, NodeHealth::Operational, "{}", v.message);
        assert!(v.message.contains("peer lb2 unreachable"), "{}", v.message);
        // The same error while the peer answers is a real failure.
        assert_eq!(judge(&st, &reachable()).health, NodeHealth::Failure);
    }

    #[test]
    fn a_tracked_interface_fault_is_red() {
        let mut st = healthy(VrrpState::Fault);
        if let Probe::Running(v) = &mut st.vrrpd {
            v.reason = "tracked interface eth2 down".into();
        }
        let v = judge(&st, &reachable());
        assert_eq!(v.health, NodeHealth::Failure);
        assert_eq!(v.message, "vrrpd: fault: tracked interface eth2 down");
    }

    fn conntrack(st: &mut LocalStatuses) -> &mut v1::ConntrackSyncStatus {
        match &mut st.conntrack {
            Probe::Running(c) => c,
            _ => unreachable!(),
        }
    }

    #[test]
    fn a_standalone_node_is_green_despite_a_push_error_left_from_before_destroy() {
        let mut st = healthy(VrrpState::Standalone);
        if let Probe::Running(c) = &mut st.cfgsync {
            c.last_error = "peer lb2: The system is not in a state required for the operation's execution: lb2 does not receive configuration (sync direction SYNC_DIRECTION_NONE)".into();
            c.set_direction(v1::SyncDirection::None);
        }
        let standalone = Context {
            peer_reachable: false,
            peer_name: String::new(),
            standalone: true,
            ..reachable()
        };
        let v = judge(&st, &standalone);
        assert_eq!(v.health, NodeHealth::Operational, "{}", v.message);
        // The control: clustered, the same error is a failure.
        let v = judge(&st, &reachable());
        assert_eq!(v.health, NodeHealth::Failure, "{}", v.message);
    }

    #[test]
    fn a_standalone_node_is_green_although_conntrack_syncd_has_no_peer() {
        let mut st = healthy(VrrpState::Standalone);
        let c = conntrack(&mut st);
        c.last_error = "this node is standalone (no cluster.toml): there is no peer".into();
        c.set_role(v1::SyncRole::Standalone);
        c.set_health(v1::SyncHealth::Unspecified);
        c.peer_alive = false;
        let standalone = Context {
            peer_reachable: false,
            peer_name: String::new(),
            standalone: true,
            ..reachable()
        };
        let v = judge(&st, &standalone);
        assert_eq!(
            (v.role, v.health, v.message.as_str()),
            (NodeRole::Standalone, NodeHealth::Operational, "operational")
        );
        // A daemon that is not running is still a failure.
        st.conntrack = Probe::NotRunning;
        assert_eq!(judge(&st, &standalone).health, NodeHealth::Failure);
    }

    #[test]
    fn replication_health_turns_the_node_yellow_or_red_with_its_message() {
        let mut st = healthy(VrrpState::Master);
        let c = conntrack(&mut st);
        c.set_health(v1::SyncHealth::Degraded);
        c.health_message = "lag 1.8 s for 6 s".into();
        let v = judge(&st, &reachable());
        assert_eq!(v.health, NodeHealth::Degraded);
        assert_eq!(v.message, "conntrack-syncd: lag 1.8 s for 6 s");
        let c = conntrack(&mut st);
        c.set_health(v1::SyncHealth::Failed);
        c.health_message = "peer 192.168.100.2:3780 silent for 4.2 s".into();
        let v = judge(&st, &reachable());
        assert_eq!(v.health, NodeHealth::Failure);
        assert_eq!(
            v.message,
            "conntrack-syncd: peer 192.168.100.2:3780 silent for 4.2 s"
        );
        // The peer gone altogether (grey in its row): this node still
        // serves, unprotected: yellow.
        let gone = Context {
            peer_reachable: false,
            ..reachable()
        };
        let v = judge(&st, &gone);
        assert_eq!(v.health, NodeHealth::Degraded, "{}", v.message);
        assert!(
            v.message.contains("silent for 4.2 s") && v.message.contains("peer lb2 unreachable")
        );
        // A conntrack-syncd that does not report health: a silent peer is
        // judged the same.
        let c = conntrack(&mut st);
        c.set_health(v1::SyncHealth::Unspecified);
        c.peer_alive = false;
        let v = judge(&st, &reachable());
        assert_eq!(v.health, NodeHealth::Failure);
        assert_eq!(
            v.message,
            "conntrack-syncd: peer 192.168.100.2:3780 silent: connections are not replicated"
        );
        conntrack(&mut st).peer_alive = true;
        assert_eq!(judge(&st, &reachable()).health, NodeHealth::Operational);
    }

    #[test]
    fn a_foreign_vrrp_speaker_is_a_warning_naming_its_source_while_recent() {
        let mut st = healthy(VrrpState::Master);
        let now = reachable().now_unix_ms;
        if let Probe::Running(v) = &mut st.vrrpd {
            v.foreign_speakers.push(v1::ForeignSpeaker {
                address: "192.168.100.9".into(),
                virtual_router_id: 71,
                priority: 254,
                adverts: 12,
                last_seen_unix_ms: now - 2_500,
            });
        }
        let v = judge(&st, &reachable());
        assert_eq!(v.health, NodeHealth::Degraded);
        assert_eq!(
            v.message,
            "foreign VRRP speaker 192.168.100.9 on VRID 71 (priority 254, 12 advert(s), last 2 s ago): not a cluster node, its adverts are dropped"
        );
        let later = Context {
            now_unix_ms: now + FOREIGN_SPEAKER_SHOWN_MS,
            ..reachable()
        };
        assert_eq!(judge(&st, &later).health, NodeHealth::Operational);
    }

    #[test]
    fn set_aside_and_refused_configuration_are_warnings_until_dealt_with() {
        let mut st = healthy(VrrpState::Backup);
        if let Probe::Running(c) = &mut st.cfgsync {
            c.set_aside.push(v1::SetAside {
                directory: "/var/lib/tandem/set-aside/20261207T013640Z".into(),
                unix_ms: 1,
                paths: vec!["farms/api.toml".into()],
            });
            c.refused = (1..=5)
                .map(|i| format!("checks/big{i}.bin is over the 4 MiB cap"))
                .collect();
        }
        let v = judge(&st, &reachable());
        assert_eq!(v.health, NodeHealth::Degraded);
        assert!(
            v.message.starts_with("configuration changed here during a partition was set aside when it healed: 1 file(s) (farms/api.toml) kept in /var/lib/tandem/set-aside/20261207T013640Z; review them, then `tandemctl cluster ack`; cfg-syncd does not replicate 5 file(s): checks/big1.bin is over the 4 MiB cap;"),
            "{}",
            v.message
        );
        assert!(v.message.ends_with("; and 2 more"), "{}", v.message);
        // In maintenance the node stays orange, the warnings said.
        if let Probe::Running(v) = &mut st.vrrpd {
            v.set_state(VrrpState::Maintenance);
        }
        let v = judge(&st, &reachable());
        assert_eq!(v.health, NodeHealth::Maintenance);
        assert!(v.message.contains("set aside"), "{}", v.message);
    }
}
