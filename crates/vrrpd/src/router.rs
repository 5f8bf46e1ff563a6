//! The thin shell around the state machine: turns socket reads, timers,
//! link events, maintenance requests and reloads into events, and carries
//! out the actions — adverts, floating IPs, announcements — at once.
//!
//! It runs on a thread of its own ([`spawn`]) with its own single-threaded
//! runtime, at real-time priority: the VRRP socket, the timers, the
//! floating IPs' netlink and the ARP/NA sockets all live there, and nothing
//! else (gRPC, metrics) can delay them. The gRPC face talks to it through
//! [`Shared`].
//!
//! Ordering: a received advert wins over a timer that expired in the same
//! wake-up. The loop polls the socket first, and before acting on an
//! expired timer it drains every advert already queued, so a backup that
//! was delayed (a stall, a loaded machine) hears the master it missed
//! before it decides the master is gone.

use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_proto::v1;
use tandem_runtime::{ConfigCell, Shutdown, unix_ms};
use tokio::sync::{broadcast, mpsc, watch};

use crate::addresses::{Addresses, Announcer, FloatingIp, Link};
use crate::fsm::{self, Action, Advert, Announce, RouterConfig, State, VirtualRouter};
use crate::guard::Guard;
use crate::links::{self, LinkStates};
use crate::members::{DropLog, ForeignSpeaker, ForeignSpeakers, Members, Verdict};
use crate::network::{Inbound, VrrpSocket};
use crate::packet::Advertisement;
use crate::setup::{self, VrrpSetup};

/// A diagnostic switch for the lab's control test: act on an expired timer
/// before an advert received in the same wake-up (the ordering this shell
/// exists to avoid). Never set it in production.
pub const FAULT_TIMER_FIRST_ENV: &str = "TANDEM_VRRPD_FAULT_TIMER_FIRST";

/// At most this many foreign speakers are remembered (and reported).
const FOREIGN_SPEAKERS: usize = 16;
/// A repeated drop of the same kind from the same source is logged at
/// most this often.
const DROP_LOG_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub adverts_sent: u64,
    pub adverts_received: u64,
    pub packets_dropped: u64,
    pub became_master: u64,
    pub became_backup: u64,
    pub priority_zero_sent: u64,
    pub priority_zero_received: u64,
    pub foreign_adverts_dropped: u64,
}

/// What the gRPC face reports.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub state: v1::VrrpState,
    pub reason: String,
    pub setup: Option<VrrpSetup>,
    pub master: Option<IpAddr>,
    pub tracked: LinkStates,
    pub counters: Counters,
    pub foreign_speakers: Vec<ForeignSpeaker>,
    /// A master handing over (still holding the floating IPs).
    pub handing_over: bool,
    /// How long a handover may take, for callers waiting on one.
    pub handover_timeout: Duration,
}

/// Maintenance as requested: the operator's (persisted) and
/// clustermanager's hold (not persisted). Either keeps the node out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Maintenance {
    pub operator: bool,
    pub hold: bool,
}

impl Maintenance {
    pub fn on(self) -> bool {
        self.operator || self.hold
    }
}

/// State shared between the router thread and the gRPC face.
pub struct Shared {
    pub snapshot: watch::Sender<Snapshot>,
    pub changes: broadcast::Sender<v1::VrrpStateChange>,
    /// Maintenance as requested; the router follows.
    pub maintenance: watch::Sender<Maintenance>,
    /// True once the router has ended (after a master's handover): state
    /// watchers are served until then, so they see the last transition.
    pub router_done: watch::Sender<bool>,
}

impl Shared {
    pub fn new() -> Arc<Self> {
        Shared::with_maintenance(Maintenance::default())
    }

    /// Starting with maintenance as persisted.
    pub fn with_maintenance(m: Maintenance) -> Arc<Self> {
        Arc::new(Shared {
            snapshot: watch::channel(Snapshot {
                state: v1::VrrpState::Initialize,
                reason: "starting".into(),
                setup: None,
                master: None,
                tracked: LinkStates::new(),
                counters: Counters::default(),
                foreign_speakers: Vec::new(),
                handing_over: false,
                handover_timeout: Duration::from_secs(1),
            })
            .0,
            changes: broadcast::channel(64).0,
            maintenance: watch::channel(m).0,
            router_done: watch::channel(false).0,
        })
    }

    fn publish(
        &self,
        old: v1::VrrpState,
        new: v1::VrrpState,
        reason: &str,
        master: Option<IpAddr>,
    ) {
        let _ = self.changes.send(v1::VrrpStateChange {
            old_state: old.into(),
            new_state: new.into(),
            reason: reason.to_owned(),
            unix_ms: unix_ms(std::time::SystemTime::now()),
            master_address: master.map(|m| m.to_string()).unwrap_or_default(),
        });
    }

    /// Sets the reported state outside an election (standalone, errors).
    fn set_idle(&self, state: v1::VrrpState, reason: &str) {
        let mut old = None;
        self.snapshot.send_modify(|s| {
            if s.state != state {
                old = Some(s.state);
            }
            s.state = state;
            s.reason = reason.to_owned();
            s.master = None;
            s.handing_over = false;
        });
        if let Some(old) = old {
            self.publish(old, state, reason, None);
        }
    }
}

pub fn wire_state(s: State) -> v1::VrrpState {
    match s {
        State::Initialize => v1::VrrpState::Initialize,
        State::Backup => v1::VrrpState::Backup,
        State::Master => v1::VrrpState::Master,
        State::Fault => v1::VrrpState::Fault,
        State::Maintenance => v1::VrrpState::Maintenance,
    }
}

/// Starts the router on its own thread (named `vrrp-router`) with its own
/// runtime, at the configured real-time priority. The thread ends after
/// shutdown, once a master has handed over.
pub fn spawn(
    config: Arc<ConfigCell>,
    shared: Arc<Shared>,
    shutdown: Shutdown,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("vrrp-router".into())
        .spawn(move || {
            let priority = rt_priority(&config);
            log_realtime(&crate::realtime::apply(priority, true));
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("VRRP not started: cannot build the router's runtime: {e}");
                    shared.set_idle(v1::VrrpState::Initialize, &format!("not started: {e}"));
                    shared.router_done.send_replace(true);
                    return;
                }
            };
            rt.block_on(supervise(config, shared.clone(), shutdown, priority));
            shared.router_done.send_replace(true);
        })
}

fn rt_priority(config: &ConfigCell) -> u8 {
    config
        .current()
        .config
        .cluster
        .as_ref()
        .map_or(0, |c| c.vrrp.rt_priority)
}

fn log_realtime(outcome: &crate::realtime::Outcome) {
    let line = outcome.describe();
    if outcome.refused() {
        tracing::warn!(rt_priority = outcome.priority, "{line}");
    } else {
        tracing::info!(rt_priority = outcome.priority, "{line}");
    }
}

/// Why the router loop ended.
enum Exit {
    Shutdown,
    /// The socket-level configuration changed: start over.
    Reconfigure,
}

/// Runs VRRP for as long as the daemon runs: standalone while there is no
/// cluster.toml, restarting the instance when its socket-level configuration
/// changes, retrying every second when the interface is not usable.
pub async fn supervise(
    config: Arc<ConfigCell>,
    shared: Arc<Shared>,
    mut shutdown: Shutdown,
    mut priority: u8,
) {
    let mut configs = config.subscribe();
    let mut guard: Option<Guard> = None;
    let exit_guard = |g: &mut Option<Guard>| {
        if let Some(g) = g.take() {
            g.bye();
        }
    };
    loop {
        let loaded = configs.borrow_and_update().clone();
        let wanted = loaded
            .config
            .cluster
            .as_ref()
            .map_or(priority, |c| c.vrrp.rt_priority);
        if wanted != priority {
            priority = wanted;
            log_realtime(&crate::realtime::apply(priority, false));
        }
        let exit = match setup::from_config(&loaded.config) {
            Ok(None) => {
                shared.set_idle(v1::VrrpState::Standalone, "not clustered: no cluster.toml");
                None
            }
            Err(e) => {
                tracing::error!("VRRP not started: {e}");
                shared.set_idle(v1::VrrpState::Initialize, &format!("not started: {e}"));
                None
            }
            Ok(Some(s)) => {
                // The guard removes the floating IPs if vrrpd dies; off
                // with permanent addresses (floating_ip_lifetime_s = 0).
                if s.address_lifetime.is_some() && guard.is_none() {
                    match Guard::spawn() {
                        Ok(g) => guard = Some(g),
                        Err(e) => tracing::error!(
                            "cannot start the floating-IP guard ({e}): if vrrpd dies, only the addresses' lifetime removes them"
                        ),
                    }
                } else if s.address_lifetime.is_none() {
                    exit_guard(&mut guard);
                }
                match run(&s, &shared, &mut configs, &mut shutdown, &mut guard).await {
                    Ok(exit) => Some(exit),
                    Err(e) => {
                        tracing::error!(interface = %s.interface, vrid = s.vrid, "VRRP instance failed on {} (VRID {}): {e:#}; retrying in 1 s", s.interface, s.vrid);
                        shared.set_idle(v1::VrrpState::Initialize, &format!("{e:#}"));
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                            () = shutdown.wait() => {
                                exit_guard(&mut guard);
                                return;
                            }
                        }
                        continue;
                    }
                }
            }
        };
        match exit {
            Some(Exit::Shutdown) => {
                exit_guard(&mut guard);
                return;
            }
            Some(Exit::Reconfigure) => continue,
            None => {
                exit_guard(&mut guard);
                tokio::select! {
                    r = configs.changed() => if r.is_err() { return },
                    () = shutdown.wait() => return,
                }
            }
        }
    }
}

struct Instance<'a> {
    setup: VrrpSetup,
    fsm: VirtualRouter,
    sock: VrrpSocket,
    addrs: Addresses,
    announcer: Announcer,
    /// The cluster interface.
    link: Link,
    shared: &'a Shared,
    members: Members,
    foreign: ForeignSpeakers,
    drops: DropLog,
    /// The floating IPs this node holds, with their links (for announcing
    /// and refreshing); empty unless master.
    held: Vec<(FloatingIp, Link)>,
    /// When the held addresses' lifetimes are refreshed next.
    next_refresh: Option<Instant>,
    /// A refresh failed and was logged; cleared by the next success.
    refresh_failing: bool,
    /// A socket read failed and was logged; cleared by the next success.
    read_failing: bool,
    verifications: mpsc::UnboundedSender<(Ipv6Addr, Option<bool>, String)>,
    /// Told which addresses are held, to remove them if vrrpd dies.
    guard: &'a mut Option<Guard>,
    /// The last advert of each link-local source being verified: handled
    /// once the source is verified, so the first advert heard from the peer
    /// still counts.
    awaiting: std::collections::HashMap<Ipv6Addr, Advertisement>,
    timer_first: bool,
}

async fn run(
    setup: &VrrpSetup,
    shared: &Shared,
    configs: &mut watch::Receiver<Arc<tandem_runtime::Loaded>>,
    shutdown: &mut Shutdown,
    guard: &mut Option<Guard>,
) -> anyhow::Result<Exit> {
    let addrs = Addresses::new()?;
    let link = addrs.link(&setup.interface).await?;
    let source = match setup.address {
        IpAddr::V4(_) => setup.address,
        IpAddr::V6(_) => IpAddr::V6(
            addrs
                .link_local_v6(&link, &setup.interface)
                .await?
                .ok_or_else(|| {
                    anyhow::anyhow!("{} has no IPv6 link-local address", setup.interface)
                })?,
        ),
    };
    let sock = VrrpSocket::open(&setup.interface, link.index, source, setup.unicast_peer)
        .map_err(|e| anyhow::anyhow!("opening the VRRP socket on {}: {e}", setup.interface))?;
    let mut tracked = links::watch_links(setup.tracked_interfaces.clone()).await?;
    let mut maintenance = shared.maintenance.subscribe();
    let (verified_tx, mut verified_rx) = mpsc::unbounded_channel();
    let timer_first = std::env::var_os(FAULT_TIMER_FIRST_ENV).is_some();
    if timer_first {
        tracing::warn!(
            "{FAULT_TIMER_FIRST_ENV} is set: expired timers are acted on before received adverts (a fault injected for tests)"
        );
    }
    let fsm = VirtualRouter::new(router_config(setup, source));
    tracing::info!(
        vrid = setup.vrid,
        interface = %setup.interface,
        source = %source,
        destination = %sock.destination(),
        priority = setup.priority,
        preempt = setup.preempt,
        advert_interval_ms = u32::from(setup.advert_interval_cs) * 10,
        members_only = setup.members_only,
        floating_ip_lifetime_s = setup.address_lifetime.map_or(0, |l| l.as_secs()),
        "VRRP instance started on {} (VRID {}): priority {}, adverts every {} ms from {source} to {}",
        setup.interface,
        setup.vrid,
        setup.priority,
        u32::from(setup.advert_interval_cs) * 10,
        sock.destination()
    );
    let mut inst = Instance {
        members: Members::new(
            vec![source, setup.address],
            setup.members.clone(),
            setup.members_only,
        ),
        fsm,
        setup: setup.clone(),
        sock,
        addrs,
        announcer: Announcer::new()
            .map_err(|e| anyhow::anyhow!("opening the ARP/NA sockets: {e}"))?,
        link,
        shared,
        foreign: ForeignSpeakers::new(FOREIGN_SPEAKERS),
        drops: DropLog::new(DROP_LOG_EVERY, 256),
        held: Vec::new(),
        next_refresh: None,
        refresh_failing: false,
        read_failing: false,
        verifications: verified_tx,
        guard,
        awaiting: std::collections::HashMap::new(),
        timer_first,
    };
    let handover_timeout = inst.fsm.handover_timeout();
    shared.snapshot.send_modify(|s| {
        s.setup = Some(setup.clone());
        s.tracked = tracked.borrow().clone();
        s.handover_timeout = handover_timeout;
    });

    // A backup holds no floating IP: clear any a crash left behind.
    inst.release_addresses().await;
    let now = Instant::now();
    let down = links::down(&tracked.borrow()).join(", ");
    let mut actions = Vec::new();
    if !down.is_empty() {
        actions.extend(
            inst.fsm
                .set_fault(now, true, &format!("tracked interface {down} down")),
        );
    }
    let m = *maintenance.borrow_and_update();
    if m.on() {
        actions.extend(
            inst.fsm
                .set_maintenance(now, true, maintenance_reason(m, true)),
        );
    }
    actions.extend(inst.fsm.start(now, "vrrpd started"));
    inst.execute(actions).await;

    let far = Duration::from_secs(3600);
    let mut stopping = false;
    loop {
        if stopping && inst.fsm.state() != State::Master {
            return Ok(Exit::Shutdown);
        }
        let deadline = inst.fsm.deadline().unwrap_or_else(|| Instant::now() + far);
        let refresh = inst.next_refresh.unwrap_or_else(|| Instant::now() + far);
        let actions = tokio::select! {
            biased;
            received = inst.sock.recv() => match received {
                Err(e) => {
                    if !inst.read_failing {
                        tracing::warn!(interface = %inst.setup.interface, vrid = inst.setup.vrid, "VRRP socket read failed on {} (VRID {}): {e}", inst.setup.interface, inst.setup.vrid);
                        inst.read_failing = true;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
                Ok(p) => {
                    inst.read_failing = false;
                    let mut actions = Vec::new();
                    if inst.timer_first && inst.fsm.deadline().is_some_and(|d| Instant::now() >= d) {
                        actions.extend(inst.fsm.on_timer(Instant::now()));
                    }
                    actions.extend(inst.on_packet(p));
                    actions
                }
            },
            () = tokio::time::sleep_until(deadline.into()) => {
                // An advert already queued wins over the timer.
                let mut actions = if inst.timer_first { Vec::new() } else { inst.drain() };
                actions.extend(inst.fsm.on_timer(Instant::now()));
                actions
            }
            () = tokio::time::sleep_until(refresh.into()) => {
                inst.refresh_lifetimes().await;
                continue;
            }
            Some((ll, result, why)) = verified_rx.recv() => inst.on_verified(ll, result, &why),
            changed = tracked.changed() => {
                if changed.is_err() {
                    anyhow::bail!("the link watch stopped");
                }
                let states = tracked.borrow_and_update().clone();
                let down = links::down(&states).join(", ");
                inst.shared.snapshot.send_modify(|s| s.tracked = states.clone());
                let reason = if down.is_empty() {
                    "every tracked interface is up".to_owned()
                } else {
                    format!("tracked interface {down} down")
                };
                inst.fsm.set_fault(Instant::now(), !down.is_empty(), &reason)
            }
            changed = maintenance.changed(), if !stopping => {
                if changed.is_err() {
                    continue;
                }
                let m = *maintenance.borrow_and_update();
                inst.fsm.set_maintenance(Instant::now(), m.on(), maintenance_reason(m, m.on()))
            }
            changed = configs.changed(), if !stopping => {
                if changed.is_err() {
                    continue;
                }
                let loaded = configs.borrow_and_update().clone();
                match setup::from_config(&loaded.config) {
                    Ok(Some(new)) if new.same_socket(&inst.setup) => {
                        inst.apply(new).await;
                        Vec::new()
                    }
                    Ok(_) | Err(_) => {
                        tracing::info!(vrid = inst.setup.vrid, "VRRP configuration of VRID {} changed; restarting the instance", inst.setup.vrid);
                        let actions = inst.fsm.abort("configuration changed");
                        inst.execute(actions).await;
                        return Ok(Exit::Reconfigure);
                    }
                }
            }
            () = shutdown.wait(), if !stopping => {
                stopping = true;
                inst.fsm.shutdown(Instant::now(), "vrrpd stopping")
            }
        };
        inst.execute(actions).await;
    }
}

fn maintenance_reason(m: Maintenance, on: bool) -> &'static str {
    match (on, m.operator) {
        (true, true) => "maintenance enabled by the operator",
        (true, false) => "held in maintenance by clustermanager (failback gate)",
        (false, _) => "maintenance disabled",
    }
}

fn router_config(setup: &VrrpSetup, source: IpAddr) -> RouterConfig {
    RouterConfig {
        priority: setup.priority,
        advert_interval_cs: setup.advert_interval_cs,
        preempt: setup.preempt,
        primary_address: source,
        announce: fsm::AnnounceConfig {
            repeat: setup.garp_repeat.max(1),
            interval: setup.garp_interval,
            heal_repeat: setup.garp_lower_prio_repeat,
            heal_delay: setup.garp_lower_prio_delay,
            refresh: setup.garp_refresh,
        },
        preempt_delay: setup.preempt_delay,
        handover_timeout: setup.handover_timeout,
    }
}

/// Verifies that `candidate` (a link-local source of adverts) is the
/// peer's: neighbour discovery resolves both it and the peer's configured
/// address on the cluster interface, and they must share a MAC. `None`
/// when the entries did not resolve within a second.
async fn verify_link_local(
    addrs: Addresses,
    ifindex: u32,
    ifname: String,
    peer: IpAddr,
    candidate: Ipv6Addr,
) -> (Option<bool>, String) {
    // A datagram to each (the discard port) makes the kernel resolve them.
    let poke = |to: std::net::SocketAddr| {
        if let Ok(s) = std::net::UdpSocket::bind((std::net::Ipv6Addr::UNSPECIFIED, 0)) {
            let _ = s.send_to(b"", to);
        }
    };
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut poked = Instant::now() - Duration::from_secs(1);
    loop {
        if poked.elapsed() >= Duration::from_millis(200) {
            poke(std::net::SocketAddr::new(peer, 9));
            poke(std::net::SocketAddr::V6(std::net::SocketAddrV6::new(
                candidate, 9, 0, ifindex,
            )));
            poked = Instant::now();
        }
        let a = addrs.neighbour_mac(ifindex, peer, &ifname).await;
        let b = addrs
            .neighbour_mac(ifindex, IpAddr::V6(candidate), &ifname)
            .await;
        match (a, b) {
            (Ok(Some(a)), Ok(Some(b))) => {
                return (
                    Some(a == b),
                    format!("{peer} is at {}, {candidate} at {}", mac(&a), mac(&b)),
                );
            }
            (Err(e), _) | (_, Err(e)) => return (None, e.to_string()),
            _ => {}
        }
        if Instant::now() >= deadline {
            return (
                None,
                format!(
                    "the neighbour entries of {peer} and {candidate} did not resolve within 1 s"
                ),
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Instance<'_> {
    fn count(&self, f: impl FnOnce(&mut Counters)) {
        self.shared.snapshot.send_modify(|s| f(&mut s.counters));
    }

    /// Every packet already queued on the socket, handled now.
    fn drain(&mut self) -> Vec<Action> {
        let mut actions = Vec::new();
        // Bounded: a flood must not starve the timer.
        for _ in 0..64 {
            match self.sock.try_recv() {
                Ok(Some(p)) => actions.extend(self.on_packet(p)),
                Ok(None) | Err(_) => break,
            }
        }
        actions
    }

    fn on_packet(&mut self, p: Inbound) -> Vec<Action> {
        let now = Instant::now();
        let vrid = self.setup.vrid;
        let adv = match p.advert {
            Ok(adv) => adv,
            Err(e) => {
                self.count(|c| c.packets_dropped += 1);
                if let Some(n) = self.drops.note(now, p.src, "invalid") {
                    let from = p
                        .src
                        .map_or_else(|| "an unknown source".to_owned(), |s| s.to_string());
                    tracing::warn!(peer = ?p.src, vrid, "dropped a VRRP packet from {from} on {} (VRID {vrid}): {e}{}", self.setup.interface, more(n));
                }
                return Vec::new();
            }
        };
        let Some(src) = p.src else {
            return Vec::new();
        };
        if adv.vrid != vrid {
            // Another virtual router on the link (a neighbouring pair):
            // not ours, counted like any other drop.
            self.count(|c| c.packets_dropped += 1);
            if let Some(n) = self.drops.note(now, Some(src), "vrid") {
                tracing::info!(peer = %src, vrid, "dropped a VRRP advert from {src} for VRID {} on {}: this cluster is VRID {vrid}{}", adv.vrid, self.setup.interface, more(n));
            }
            return Vec::new();
        }
        match self.members.classify(now, src) {
            Verdict::Own => return Vec::new(),
            Verdict::Member => {}
            Verdict::Foreign => {
                self.on_foreign(now, src, &adv);
                return Vec::new();
            }
            Verdict::Unverified { verify } => {
                self.count(|c| c.packets_dropped += 1);
                if let IpAddr::V6(ll) = src {
                    if self.awaiting.len() < 64 || self.awaiting.contains_key(&ll) {
                        self.awaiting.insert(ll, adv);
                    }
                    if verify {
                        self.start_verification(ll);
                    }
                }
                return Vec::new();
            }
        }
        self.accept(now, src, adv)
    }

    /// An advert from a cluster node: to the state machine.
    fn accept(&mut self, now: Instant, src: IpAddr, adv: Advertisement) -> Vec<Action> {
        let vrid = self.setup.vrid;
        if adv.version != self.setup.version {
            self.count(|c| c.packets_dropped += 1);
            if let Some(n) = self.drops.note(now, Some(src), "version") {
                tracing::warn!(peer = %src, vrid, "dropped a VRRP {:?} advert from {src} (VRID {vrid}): this instance runs {:?}{}", adv.version, self.setup.version, more(n));
            }
            return Vec::new();
        }
        self.count(|c| {
            c.adverts_received += 1;
            if adv.priority == 0 {
                c.priority_zero_received += 1;
            }
        });
        let advert = Advert {
            sender: src,
            priority: adv.priority,
            advert_interval_cs: adv.advert_interval_cs,
        };
        // Outranked or not listening: nothing to do (RFC 5798 §6.4.2/§6.4.3 discard).
        let actions = self.fsm.on_advert(now, advert).unwrap_or_default();
        let master = self.fsm.master();
        self.shared.snapshot.send_modify(|s| s.master = master);
        actions
    }

    fn on_foreign(&mut self, now: Instant, src: IpAddr, adv: &Advertisement) {
        let vrid = self.setup.vrid;
        let t = unix_ms(std::time::SystemTime::now());
        self.foreign.record(src, adv.vrid, adv.priority, t);
        let list = self.foreign.list();
        self.shared.snapshot.send_modify(|s| {
            s.counters.foreign_adverts_dropped += 1;
            s.foreign_speakers = list;
        });
        if let Some(n) = self.drops.note(now, Some(src), "foreign") {
            let nodes = self
                .setup
                .members
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            tracing::warn!(
                peer = %src,
                vrid,
                priority = adv.priority,
                "foreign VRRP speaker {src} advertises VRID {vrid} (priority {}) on {}: dropped, it is not a cluster node ({nodes}); another router uses this VRID on the cluster link{}",
                adv.priority,
                self.setup.interface,
                more(n)
            );
        }
    }

    fn start_verification(&self, ll: Ipv6Addr) {
        let Some(peer) = self.setup.peer() else {
            return;
        };
        let tx = self.verifications.clone();
        let addrs = self.addrs.clone();
        let ifindex = self.link.index;
        let ifname = self.setup.interface.clone();
        tokio::spawn(async move {
            let (result, why) = verify_link_local(addrs, ifindex, ifname, peer, ll).await;
            let _ = tx.send((ll, result, why));
        });
    }

    fn on_verified(&mut self, ll: Ipv6Addr, result: Option<bool>, why: &str) -> Vec<Action> {
        let vrid = self.setup.vrid;
        let peer = self.setup.peer().map(|p| p.to_string()).unwrap_or_default();
        match result {
            Some(true) => {
                tracing::info!(peer = %ll, vrid, "IPv6 adverts from {ll} accepted (VRID {vrid}): it is cluster node {peer}'s link-local address ({why})")
            }
            Some(false) => {
                tracing::warn!(peer = %ll, vrid, "IPv6 adverts from {ll} refused (VRID {vrid}): not cluster node {peer}'s link-local address ({why})")
            }
            None => {
                tracing::warn!(peer = %ll, vrid, "IPv6 adverts from {ll} not accepted yet (VRID {vrid}): cannot tell whether it is cluster node {peer}'s link-local address ({why}); retrying")
            }
        }
        let now = Instant::now();
        self.members.verified(now, ll, result);
        let waiting = self.awaiting.remove(&ll);
        match (result, waiting) {
            (Some(true), Some(adv)) => self.accept(now, IpAddr::V6(ll), adv),
            (Some(false), Some(adv)) => {
                self.on_foreign(now, IpAddr::V6(ll), &adv);
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    async fn apply(&mut self, new: VrrpSetup) {
        if self.fsm.state() == State::Master {
            for gone in self
                .setup
                .floating_ips
                .iter()
                .filter(|f| !new.floating_ips.contains(f))
            {
                self.remove(gone).await;
                self.held.retain(|(f, _)| f != gone);
            }
            let added: Vec<FloatingIp> = new
                .floating_ips
                .iter()
                .filter(|f| !self.setup.floating_ips.contains(f))
                .cloned()
                .collect();
            let lifetime = new.address_lifetime;
            let fresh = self.add_all(&added, lifetime, new.vrid).await;
            for (ip, link) in &fresh {
                self.announce_one(ip, link);
            }
            self.held.extend(fresh);
            self.tell_guard();
        }
        let source = self.sock.source();
        self.fsm
            .reconfigure(Instant::now(), router_config(&new, source));
        if new.members != self.setup.members || new.members_only != self.setup.members_only {
            self.members = Members::new(
                vec![source, new.address],
                new.members.clone(),
                new.members_only,
            );
        }
        tracing::info!(
            vrid = new.vrid,
            priority = new.priority,
            preempt = new.preempt,
            "VRRP configuration of VRID {} applied in place: priority {}, preempt {}",
            new.vrid,
            new.priority,
            new.preempt
        );
        let timeout = self.fsm.handover_timeout();
        self.shared.snapshot.send_modify(|s| {
            s.setup = Some(new.clone());
            s.handover_timeout = timeout;
        });
        self.setup = new;
        self.schedule_refresh();
    }

    async fn execute(&mut self, actions: Vec<Action>) {
        let vrid = self.setup.vrid;
        for action in actions {
            match action {
                Action::SendAdvert { priority } => self.send_advert(priority).await,
                Action::TakeAddresses => {
                    let ips = self.setup.floating_ips.clone();
                    let lifetime = self.setup.address_lifetime;
                    self.held = self.add_all(&ips, lifetime, vrid).await;
                    self.tell_guard();
                    self.schedule_refresh();
                }
                Action::Announce(why) => self.announce(why),
                Action::ReleaseAddresses => self.release_addresses().await,
                Action::HandoverStarted { reason, timeout } => {
                    tracing::info!(
                        vrid,
                        timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                        "handing the master role over (VRID {vrid}): {reason}; priority 0 sent, floating IPs kept until the peer advertises as master (at most {} ms)",
                        timeout.as_millis()
                    );
                    self.shared.snapshot.send_modify(|s| {
                        s.handing_over = true;
                        s.reason =
                            format!("handing over ({reason}): waiting for the peer to take over");
                    });
                }
                Action::HandoverCancelled { reason } => {
                    tracing::info!(
                        vrid,
                        "handover cancelled (VRID {vrid}): {reason}; staying master"
                    );
                    self.shared.snapshot.send_modify(|s| {
                        s.handing_over = false;
                        s.reason = format!("{reason}: handover cancelled, still master");
                    });
                }
                Action::Transition { from, to, reason } => {
                    tracing::info!(vrid, "VRRP state {from} -> {to} (VRID {vrid}): {reason}");
                    let master = self.fsm.master();
                    self.shared.snapshot.send_modify(|s| {
                        s.state = wire_state(to);
                        s.reason = reason.clone();
                        s.master = master;
                        s.handing_over = false;
                        match to {
                            State::Master => s.counters.became_master += 1,
                            State::Backup => s.counters.became_backup += 1,
                            _ => {}
                        }
                    });
                    self.shared
                        .publish(wire_state(from), wire_state(to), &reason, master);
                }
            }
        }
    }

    async fn send_advert(&mut self, priority: u8) {
        let adv = Advertisement {
            version: self.setup.version,
            vrid: self.setup.vrid,
            priority,
            advert_interval_cs: self.setup.advert_interval_cs,
            addresses: self.setup.advertised(),
        };
        let bytes = match adv.encode(self.sock.source(), self.sock.destination()) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(
                    vrid = self.setup.vrid,
                    "cannot encode the advert of VRID {}: {e}",
                    self.setup.vrid
                );
                return;
            }
        };
        match self.sock.send(&bytes).await {
            Ok(()) => self.count(|c| {
                c.adverts_sent += 1;
                if priority == 0 {
                    c.priority_zero_sent += 1;
                }
            }),
            Err(e) => {
                if let Some(n) = self.drops.note(Instant::now(), None, "send") {
                    tracing::warn!(interface = %self.setup.interface, vrid = self.setup.vrid, "sending the VRRP advert of VRID {} on {} failed: {e}{}", self.setup.vrid, self.setup.interface, more(n));
                }
            }
        }
    }

    /// Adds `ips` (with `lifetime`), logging each; returns those added.
    async fn add_all(
        &self,
        ips: &[FloatingIp],
        lifetime: Option<Duration>,
        vrid: u8,
    ) -> Vec<(FloatingIp, Link)> {
        let mut added = Vec::new();
        for ip in ips {
            match self.addrs.add(ip, lifetime).await {
                Ok(link) => {
                    tracing::info!(vip = %ip.cidr(), interface = %ip.interface, vrid, "floating IP {} added on {} (VRID {vrid})", ip.cidr(), ip.interface);
                    added.push((ip.clone(), link));
                }
                Err(e) => {
                    tracing::error!(vip = %ip.cidr(), interface = %ip.interface, vrid, "adding floating IP {} on {} failed (VRID {vrid}): {e}", ip.cidr(), ip.interface)
                }
            }
        }
        added
    }

    fn schedule_refresh(&mut self) {
        self.next_refresh = match (self.setup.address_lifetime, self.held.is_empty()) {
            (Some(l), false) => Some(Instant::now() + refresh_period(l)),
            _ => None,
        };
    }

    /// Restarts the held addresses' lifetimes (while vrrpd lives, they do).
    async fn refresh_lifetimes(&mut self) {
        let Some(lifetime) = self.setup.address_lifetime else {
            self.next_refresh = None;
            return;
        };
        let vrid = self.setup.vrid;
        let mut failed = None;
        for (ip, link) in &self.held {
            if let Err(e) = self.addrs.refresh(ip, link, lifetime).await {
                failed = Some(format!(
                    "floating IP {} on {}: {e}",
                    ip.cidr(),
                    ip.interface
                ));
            }
        }
        match failed {
            Some(why) if !self.refresh_failing => {
                tracing::error!(
                    vrid,
                    "refreshing the lifetime of a floating IP failed (VRID {vrid}): {why}; it expires unless a retry succeeds"
                );
                self.refresh_failing = true;
            }
            Some(_) => {}
            None if self.refresh_failing => {
                tracing::info!(vrid, "floating IP lifetimes refreshed again (VRID {vrid})");
                self.refresh_failing = false;
            }
            None => {}
        }
        self.next_refresh = Some(Instant::now() + refresh_period(lifetime));
    }

    fn announce(&mut self, why: Announce) {
        if self.held.is_empty() {
            return;
        }
        if let Announce::Heal { sender, priority } = why {
            let vrid = self.setup.vrid;
            let ips = self
                .held
                .iter()
                .map(|(ip, _)| ip.cidr())
                .collect::<Vec<_>>()
                .join(", ");
            tracing::info!(
                peer = %sender,
                vrid,
                "heard {sender} advertise priority {priority} while master (VRID {vrid}): another master was active; re-announcing {ips} ({} times, every {} ms)",
                self.setup.garp_lower_prio_repeat,
                self.setup.garp_interval.as_millis()
            );
        }
        for (ip, link) in &self.held {
            self.announce_one(ip, link);
        }
    }

    fn announce_one(&self, ip: &FloatingIp, link: &Link) {
        if let Err(e) = self.announcer.announce(ip, link) {
            tracing::warn!(vip = %ip.cidr(), interface = %ip.interface, vrid = self.setup.vrid, "announcing floating IP {} on {} failed (VRID {}): {e}", ip.cidr(), ip.interface, self.setup.vrid);
        }
    }

    async fn remove(&self, ip: &FloatingIp) {
        let vrid = self.setup.vrid;
        match self.addrs.remove(ip).await {
            Ok(true) => {
                tracing::info!(vip = %ip.cidr(), interface = %ip.interface, vrid, "floating IP {} removed from {} (VRID {vrid})", ip.cidr(), ip.interface)
            }
            Ok(false) => {}
            Err(e) => {
                tracing::error!(vip = %ip.cidr(), interface = %ip.interface, vrid, "removing floating IP {} from {} failed (VRID {vrid}): {e}", ip.cidr(), ip.interface)
            }
        }
    }

    /// The guard learns what is held (before a release: nothing).
    fn tell_guard(&mut self) {
        let ips: Vec<FloatingIp> = self.held.iter().map(|(ip, _)| ip.clone()).collect();
        if let Some(g) = self.guard.as_mut() {
            g.hold(&ips);
        }
    }

    async fn release_addresses(&mut self) {
        // First forget them: no announcement or refresh may follow.
        self.held.clear();
        self.tell_guard();
        self.next_refresh = None;
        for ip in self.setup.floating_ips.clone() {
            self.remove(&ip).await;
        }
    }
}

/// How often a lifetime is refreshed: four times per lifetime, so three
/// refreshes in a row may be late or fail before the address expires.
fn refresh_period(lifetime: Duration) -> Duration {
    (lifetime / 4).max(Duration::from_millis(100))
}

fn more(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" ({n} more dropped since the last such line)")
    }
}
