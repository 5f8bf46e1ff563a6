//! The thin shell around the state machine: turns socket reads, timers,
//! link events, maintenance requests and reloads into events, and carries
//! out the actions — adverts, floating IPs, announcements — at once.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_proto::v1;
use tandem_runtime::{ConfigCell, Shutdown, unix_ms};
use tokio::sync::{broadcast, watch};

use crate::addresses::{Addresses, Announcer, FloatingIp};
use crate::fsm::{Action, Advert, RouterConfig, State, VirtualRouter};
use crate::links::{self, LinkStates};
use crate::network::VrrpSocket;
use crate::packet::Advertisement;
use crate::setup::{self, VrrpSetup};

#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub adverts_sent: u64,
    pub adverts_received: u64,
    pub packets_dropped: u64,
    pub became_master: u64,
    pub became_backup: u64,
    pub priority_zero_sent: u64,
    pub priority_zero_received: u64,
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
}

/// State shared between the router task and the gRPC face.
pub struct Shared {
    pub snapshot: watch::Sender<Snapshot>,
    pub changes: broadcast::Sender<v1::VrrpStateChange>,
    /// Maintenance as the operator wants it; the router follows.
    pub maintenance: watch::Sender<bool>,
}

impl Shared {
    pub fn new() -> Arc<Self> {
        Arc::new(Shared {
            snapshot: watch::channel(Snapshot {
                state: v1::VrrpState::Initialize,
                reason: "starting".into(),
                setup: None,
                master: None,
                tracked: LinkStates::new(),
                counters: Counters::default(),
            })
            .0,
            changes: broadcast::channel(64).0,
            maintenance: watch::channel(false).0,
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

/// Why the router loop ended.
enum Exit {
    Shutdown,
    /// The socket-level configuration changed: start over.
    Reconfigure,
}

/// Runs VRRP for as long as the daemon runs: standalone while there is no
/// cluster.toml, restarting the instance when its socket-level configuration
/// changes, retrying every second when the interface is not usable.
pub async fn supervise(config: Arc<ConfigCell>, shared: Arc<Shared>, mut shutdown: Shutdown) {
    let mut configs = config.subscribe();
    loop {
        let loaded = configs.borrow_and_update().clone();
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
            Ok(Some(s)) => match run(&s, &shared, &mut configs, &mut shutdown).await {
                Ok(exit) => Some(exit),
                Err(e) => {
                    tracing::error!(interface = %s.interface, vrid = s.vrid, "VRRP instance failed: {e:#}; retrying in 1 s");
                    shared.set_idle(v1::VrrpState::Initialize, &format!("{e:#}"));
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        () = shutdown.wait() => return,
                    }
                    continue;
                }
            },
        };
        match exit {
            Some(Exit::Shutdown) => return,
            Some(Exit::Reconfigure) => continue,
            None => {
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
    announcer: Arc<Announcer>,
    shared: &'a Shared,
}

async fn run(
    setup: &VrrpSetup,
    shared: &Shared,
    configs: &mut watch::Receiver<Arc<tandem_runtime::Loaded>>,
    shutdown: &mut Shutdown,
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
    tracing::info!(
        vrid = setup.vrid,
        interface = %setup.interface,
        source = %source,
        destination = %sock.destination(),
        priority = setup.priority,
        preempt = setup.preempt,
        advert_interval_ms = u32::from(setup.advert_interval_cs) * 10,
        "VRRP instance started"
    );
    let mut inst = Instance {
        fsm: VirtualRouter::new(router_config(setup, source)),
        setup: setup.clone(),
        sock,
        addrs,
        announcer: Arc::new(
            Announcer::new().map_err(|e| anyhow::anyhow!("opening the ARP/NA sockets: {e}"))?,
        ),
        shared,
    };
    shared.snapshot.send_modify(|s| {
        s.setup = Some(setup.clone());
        s.tracked = tracked.borrow().clone();
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
    if *maintenance.borrow_and_update() {
        actions.extend(inst.fsm.set_maintenance(now, true, "maintenance enabled"));
    }
    actions.extend(inst.fsm.startup(now, "vrrpd started"));
    inst.execute(actions).await;

    let far = Duration::from_secs(3600);
    loop {
        let deadline = inst.fsm.deadline().unwrap_or_else(|| Instant::now() + far);
        let actions = tokio::select! {
            () = tokio::time::sleep_until(deadline.into()) => inst.fsm.on_timer(Instant::now()),
            received = inst.sock.recv() => {
                let advert = match received {
                    Err(e) => {
                        tracing::warn!(interface = %inst.setup.interface, "VRRP socket read failed: {e}");
                        continue;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!("dropped VRRP packet: {e}");
                        Err(e.to_string())
                    }
                    Ok(Ok(rx)) => Advertisement::decode(rx.message, rx.src, rx.dst)
                        .map(|adv| (rx.src, adv))
                        .map_err(|e| format!("from {}: {e}", rx.src)),
                };
                match advert {
                    Err(e) => {
                        tracing::debug!("dropped VRRP packet {e}");
                        inst.count(|c| c.packets_dropped += 1);
                        Vec::new()
                    }
                    Ok((src, adv)) => inst.on_advert(src, adv),
                }
            }
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
            changed = maintenance.changed() => {
                if changed.is_err() {
                    continue;
                }
                let on = *maintenance.borrow_and_update();
                let reason = if on { "maintenance enabled by the operator" } else { "maintenance disabled by the operator" };
                inst.fsm.set_maintenance(Instant::now(), on, reason)
            }
            changed = configs.changed() => {
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
                        tracing::info!(vrid = inst.setup.vrid, "VRRP configuration changed; restarting the instance");
                        let actions = inst.fsm.shutdown("configuration changed");
                        inst.execute(actions).await;
                        return Ok(Exit::Reconfigure);
                    }
                }
            }
            () = shutdown.wait() => {
                let actions = inst.fsm.shutdown("vrrpd stopping");
                inst.execute(actions).await;
                return Ok(Exit::Shutdown);
            }
        };
        inst.execute(actions).await;
    }
}

fn router_config(setup: &VrrpSetup, source: IpAddr) -> RouterConfig {
    RouterConfig {
        priority: setup.priority,
        advert_interval_cs: setup.advert_interval_cs,
        preempt: setup.preempt,
        primary_address: source,
    }
}

impl Instance<'_> {
    fn count(&self, f: impl FnOnce(&mut Counters)) {
        self.shared.snapshot.send_modify(|s| f(&mut s.counters));
    }

    fn on_advert(&mut self, src: IpAddr, adv: Advertisement) -> Vec<Action> {
        // Our own adverts (unicast loops, bridges) and other routers' VRIDs
        // are not for this instance.
        if src == self.sock.source() || adv.vrid != self.setup.vrid {
            return Vec::new();
        }
        if adv.version != self.setup.version {
            tracing::debug!(peer = %src, "dropped VRRP {:?} advert: this instance runs {:?}", adv.version, self.setup.version);
            self.count(|c| c.packets_dropped += 1);
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
        let actions = self
            .fsm
            .on_advert(Instant::now(), advert)
            .unwrap_or_default();
        let master = self.fsm.master();
        self.shared.snapshot.send_modify(|s| s.master = master);
        actions
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
            }
            let added: Vec<FloatingIp> = new
                .floating_ips
                .iter()
                .filter(|f| !self.setup.floating_ips.contains(f))
                .cloned()
                .collect();
            self.take(&added, &new).await;
        }
        self.fsm
            .reconfigure(router_config(&new, self.sock.source()));
        tracing::info!(
            vrid = new.vrid,
            priority = new.priority,
            preempt = new.preempt,
            "VRRP configuration applied in place"
        );
        self.shared
            .snapshot
            .send_modify(|s| s.setup = Some(new.clone()));
        self.setup = new;
    }

    async fn execute(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::SendAdvert { priority } => self.send_advert(priority).await,
                Action::TakeAddresses => {
                    let ips = self.setup.floating_ips.clone();
                    let setup = self.setup.clone();
                    self.take(&ips, &setup).await;
                }
                Action::ReleaseAddresses => self.release_addresses().await,
                Action::Transition { from, to, reason } => {
                    tracing::info!(
                        vrid = self.setup.vrid,
                        "VRRP state {from} -> {to}: {reason}"
                    );
                    let master = self.fsm.master();
                    self.shared.snapshot.send_modify(|s| {
                        s.state = wire_state(to);
                        s.reason = reason.clone();
                        s.master = master;
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
                tracing::error!(vrid = self.setup.vrid, "cannot encode advert: {e}");
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
                tracing::warn!(interface = %self.setup.interface, "sending VRRP advert failed: {e}")
            }
        }
    }

    /// Adds the addresses first, then announces each at once; the repeats
    /// run in the background so the loop keeps advertising.
    async fn take(&self, ips: &[FloatingIp], setup: &VrrpSetup) {
        let mut announced = Vec::new();
        for ip in ips {
            match self.addrs.add(ip).await {
                Ok(link) => {
                    tracing::info!(vip = %ip, "floating IP added");
                    announced.push((ip.clone(), link));
                }
                Err(e) => tracing::error!(vip = %ip, "adding floating IP failed: {e}"),
            }
        }
        for (ip, link) in &announced {
            if let Err(e) = self.announcer.announce(ip, link) {
                tracing::warn!(vip = %ip, "{e}");
            }
        }
        let (repeat, interval) = (setup.garp_repeat, setup.garp_interval);
        if repeat > 1 && !announced.is_empty() {
            let announcer = self.announcer.clone();
            tokio::spawn(async move {
                for _ in 1..repeat {
                    tokio::time::sleep(interval).await;
                    for (ip, link) in &announced {
                        let _ = announcer.announce(ip, link);
                    }
                }
            });
        }
    }

    async fn remove(&self, ip: &FloatingIp) {
        match self.addrs.remove(ip).await {
            Ok(true) => tracing::info!(vip = %ip, "floating IP removed"),
            Ok(false) => {}
            Err(e) => tracing::error!(vip = %ip, "removing floating IP failed: {e}"),
        }
    }

    async fn release_addresses(&self) {
        for ip in &self.setup.floating_ips {
            self.remove(ip).await;
        }
    }
}
