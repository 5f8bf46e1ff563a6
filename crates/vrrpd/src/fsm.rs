//! The VRRP state machine of RFC 5798 §6.4, as a pure function of events and
//! time: no sockets, no clocks. The I/O shell feeds it received adverts,
//! timer expiries and operator or interface events, and carries out the
//! [`Action`]s it returns, in order. Tandem adds two states to the RFC's
//! three: `Fault` (a tracked interface is down) and `Maintenance` (the
//! operator asked this node to step aside); in both the router never becomes
//! master.
//!
//! Beyond the RFC, for a pair that carries live traffic:
//!
//! - **Announcements belong to the state machine.** Becoming master adds the
//!   floating IPs and announces them (gratuitous ARP / unsolicited NA)
//!   *before* the first advert, so a master stepping down on hearing that
//!   advert releases only after clients were told. The repeats of the burst
//!   are timers here, so releasing the addresses cancels every pending one.
//! - **Heal.** A master that hears an advert it outranks (another master:
//!   a split brain or a flap is ending) or a priority-0 advert re-announces
//!   its addresses (keepalived's `garp_lower_prio_repeat`, rate-limited by
//!   `garp_lower_prio_delay`) and advertises at once; a master that yields
//!   sends one last advert with its own priority first (keepalived's
//!   `higher_prio_send_advert`), so the winner learns that clients may
//!   still point at the loser.
//! - **Make before break.** A master asked to leave (maintenance, stop)
//!   advertises priority 0 but keeps its addresses and stays master until
//!   it hears the peer advertise as master, or until a bounded timeout.
//! - **Preempt delay.** For `preempt_delay` after the instance starts, a
//!   preempting backup behaves as if preemption were off, so a restarted
//!   preferred node rejoins as backup (clustermanager's failback gate then
//!   decides when it takes the role back).

use std::net::IpAddr;
use std::time::{Duration, Instant};

/// The priority of the address owner (RFC 5798 §5.2.4): it is master at once.
pub const OWNER_PRIORITY: u8 = 255;

/// The shortest wait for a peer to take over from a leaving master.
const MIN_HANDOVER_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Initialize,
    Backup,
    Master,
    Fault,
    Maintenance,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Initialize => "initialize",
            State::Backup => "backup",
            State::Master => "master",
            State::Fault => "fault",
            State::Maintenance => "maintenance",
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Gratuitous ARP / unsolicited NA settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnounceConfig {
    /// Announcements per floating IP on becoming master (at least 1).
    pub repeat: u32,
    /// Pause between two announcements of a burst.
    pub interval: Duration,
    /// Announcements per floating IP when a master hears an advert it
    /// outranks; 0 turns the heal announcement off.
    pub heal_repeat: u32,
    /// At most one heal burst (and early advert) per this much time.
    pub heal_delay: Duration,
    /// While master, one announcement every this often; None: never.
    pub refresh: Option<Duration>,
}

impl Default for AnnounceConfig {
    fn default() -> Self {
        AnnounceConfig {
            repeat: 3,
            interval: Duration::from_millis(100),
            heal_repeat: 3,
            heal_delay: Duration::from_secs(1),
            refresh: None,
        }
    }
}

/// What the router is configured with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouterConfig {
    /// 1-254, or 255 for the address owner.
    pub priority: u8,
    /// Advertisement_Interval, in centiseconds (RFC 5798 §5.2.7).
    pub advert_interval_cs: u16,
    /// Preempt_Mode: a higher-priority backup takes over from a lower-priority
    /// master (§6.1). Tandem's `failback`: on for the preferred node.
    pub preempt: bool,
    /// This router's primary address on the VRRP interface, the tie-break
    /// between equal priorities (§6.4.3).
    pub primary_address: IpAddr,
    pub announce: AnnounceConfig,
    /// After the instance starts, how long a preempting backup leaves a
    /// lower-priority master in place (keepalived's `preempt_delay`).
    pub preempt_delay: Duration,
    /// How long a leaving master waits for the peer to take over; None:
    /// four advert intervals, at least 1 s; zero: it releases at once
    /// (RFC 5798's and keepalived's behaviour).
    pub handover_timeout: Option<Duration>,
}

impl RouterConfig {
    /// A router with the default announcements and no preempt delay.
    pub fn new(priority: u8, advert_interval_cs: u16, preempt: bool, primary: IpAddr) -> Self {
        RouterConfig {
            priority,
            advert_interval_cs,
            preempt,
            primary_address: primary,
            announce: AnnounceConfig::default(),
            preempt_delay: Duration::ZERO,
            handover_timeout: None,
        }
    }
}

/// An advertisement as the state machine needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Advert {
    /// IP source of the advert: the sender's primary address.
    pub sender: IpAddr,
    pub priority: u8,
    pub advert_interval_cs: u16,
}

/// Why the floating IPs are announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announce {
    /// The first announcement after becoming master.
    Takeover,
    /// A later announcement of a burst.
    Repeat,
    /// Another master was heard: clients may still point at it.
    Heal { sender: IpAddr, priority: u8 },
    /// The periodic refresh (`garp_refresh_s`).
    Refresh,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send an advertisement with this priority (0 = "I am leaving").
    SendAdvert { priority: u8 },
    /// Add the floating IPs.
    TakeAddresses,
    /// Announce every floating IP once (gratuitous ARP / unsolicited NA).
    Announce(Announce),
    /// Remove the floating IPs (every pending announcement is cancelled).
    ReleaseAddresses,
    /// A master began handing over: priority 0 sent, addresses kept until
    /// the peer advertises as master or `timeout` passes.
    HandoverStarted { reason: String, timeout: Duration },
    /// Maintenance was disabled during a handover: the router stays master.
    HandoverCancelled { reason: String },
    /// The state changed; one log line for the operator.
    Transition {
        from: State,
        to: State,
        reason: String,
    },
}

/// Why a received advert was not acted upon (counted, not logged per packet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    /// Lower priority while preempting, or we win the tie: discarded (§6.4.2, §6.4.3).
    Outranked,
    /// Received in a state that does not listen (Initialize, Fault).
    NotListening,
}

/// A master on its way out: it keeps the addresses until the peer has
/// taken over.
#[derive(Debug, Clone)]
struct Leaving {
    /// Maintenance or Initialize (stopping).
    to: State,
    reason: String,
    deadline: Instant,
}

/// The rest of an announcement burst.
#[derive(Debug, Clone, Copy)]
struct Burst {
    remaining: u32,
    next: Instant,
}

#[derive(Debug, Clone)]
pub struct VirtualRouter {
    config: RouterConfig,
    state: State,
    /// Master_Adver_Interval: the interval the current master advertises (§6.1).
    master_adver_interval_cs: u16,
    /// Adver_Timer in Master, Master_Down_Timer in Backup; nothing otherwise.
    adver_deadline: Option<Instant>,
    /// The master as last heard (Backup) or ourselves (Master).
    master: Option<IpAddr>,
    /// Operator maintenance requested; outlives interface faults.
    maintenance: bool,
    /// Some tracked interface is down.
    faulted: bool,
    /// The master said goodbye (priority 0); we take over after Skew_Time.
    master_left: bool,
    /// Announcements still to send.
    burst: Option<Burst>,
    /// The next periodic announcement.
    refresh_at: Option<Instant>,
    /// The last heal (announcement burst or early advert): the rate limit.
    last_heal: Option<Instant>,
    leaving: Option<Leaving>,
    /// Until then a preempting backup does not preempt.
    preempt_hold_until: Option<Instant>,
}

fn cs(n: u32) -> Duration {
    Duration::from_millis(u64::from(n) * 10)
}

fn earliest(times: impl IntoIterator<Item = Option<Instant>>) -> Option<Instant> {
    times.into_iter().flatten().min()
}

impl VirtualRouter {
    pub fn new(config: RouterConfig) -> Self {
        VirtualRouter {
            master_adver_interval_cs: config.advert_interval_cs,
            config,
            state: State::Initialize,
            adver_deadline: None,
            master: None,
            maintenance: false,
            faulted: false,
            master_left: false,
            burst: None,
            refresh_at: None,
            last_heal: None,
            leaving: None,
            preempt_hold_until: None,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn config(&self) -> &RouterConfig {
        &self.config
    }

    /// The master as last known: ourselves when master.
    pub fn master(&self) -> Option<IpAddr> {
        self.master
    }

    /// When the shell must call [`VirtualRouter::on_timer`] next.
    pub fn deadline(&self) -> Option<Instant> {
        earliest([
            self.adver_deadline,
            self.burst.map(|b| b.next),
            self.refresh_at,
            self.leaving.as_ref().map(|l| l.deadline),
        ])
    }

    /// True while a master hands over (it still holds the addresses).
    pub fn is_leaving(&self) -> bool {
        self.leaving.is_some()
    }

    /// The priority currently advertised.
    pub fn effective_priority(&self) -> u8 {
        match self.state {
            State::Master if self.leaving.is_none() => self.config.priority,
            State::Backup => self.config.priority,
            _ => 0,
        }
    }

    /// Skew_Time (§6.1): lower-priority backups wait longer, so the best
    /// backup takes over first.
    pub fn skew_time(&self) -> Duration {
        let p = u32::from(self.config.priority);
        // In centiseconds, kept in microseconds so a 10 ms interval keeps
        // its precision: ((256 - Priority) * Master_Adver_Interval) / 256.
        let us = (256 - p) * u32::from(self.master_adver_interval_cs) * 10_000 / 256;
        Duration::from_micros(u64::from(us))
    }

    /// Master_Down_Interval (§6.1): 3 × Master_Adver_Interval + Skew_Time.
    pub fn master_down_interval(&self) -> Duration {
        cs(3 * u32::from(self.master_adver_interval_cs)) + self.skew_time()
    }

    /// How long a leaving master waits for the peer to take over: four of
    /// its advert intervals (a backup of any priority takes over within
    /// Skew_Time < one interval of the priority-0 advert), at least 1 s.
    pub fn handover_timeout(&self) -> Duration {
        self.config
            .handover_timeout
            .unwrap_or_else(|| (self.advert_interval() * 4).max(MIN_HANDOVER_TIMEOUT))
    }

    fn advert_interval(&self) -> Duration {
        cs(u32::from(self.config.advert_interval_cs))
    }

    /// The instance starts (§6.4.1): like [`VirtualRouter::startup`], and
    /// the preempt delay begins.
    pub fn start(&mut self, now: Instant, reason: &str) -> Vec<Action> {
        if self.config.preempt && !self.config.preempt_delay.is_zero() {
            self.preempt_hold_until = Some(now + self.config.preempt_delay);
        }
        self.startup(now, reason)
    }

    /// Startup (§6.4.1), also the way back from Fault and Maintenance.
    pub fn startup(&mut self, now: Instant, reason: &str) -> Vec<Action> {
        let mut out = Vec::new();
        if self.faulted {
            self.enter(State::Fault, reason, &mut out);
            return out;
        }
        if self.maintenance {
            self.enter(State::Maintenance, reason, &mut out);
            return out;
        }
        if self.config.priority == OWNER_PRIORITY {
            self.become_master(now, reason, &mut out);
        } else {
            self.master_adver_interval_cs = self.config.advert_interval_cs;
            self.adver_deadline = Some(now + self.master_down_interval());
            self.master = None;
            self.master_left = false;
            self.enter(State::Backup, reason, &mut out);
        }
        out
    }

    /// The daemon stops. A master hands over first (make before break): it
    /// advertises priority 0 (§6.4.3) and keeps its addresses until the peer
    /// advertises as master; the shell keeps running the router until it is
    /// no longer master. Any other state leaves at once.
    pub fn shutdown(&mut self, now: Instant, reason: &str) -> Vec<Action> {
        let mut out = Vec::new();
        if let Some(l) = &mut self.leaving {
            // Already handing over (maintenance): stop once it is done.
            l.to = State::Initialize;
        } else if self.state == State::Master {
            self.begin_leaving(now, State::Initialize, reason, &mut out);
        } else {
            self.step_down(State::Initialize, reason, &mut out);
        }
        out
    }

    /// Leaves at once, whatever the state: priority 0 and the addresses
    /// released now (a configuration change restarting the instance).
    pub fn abort(&mut self, reason: &str) -> Vec<Action> {
        let mut out = Vec::new();
        self.step_down(State::Initialize, reason, &mut out);
        out
    }

    /// A timer expired. Calls before the deadline do nothing.
    pub fn on_timer(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if let Some(l) = &self.leaving
            && now >= l.deadline
        {
            let timeout = self.handover_timeout();
            let reason = format!(
                "{}; no peer took over within {} ms, floating IPs released",
                l.reason,
                timeout.as_millis()
            );
            let to = l.to;
            self.step_down(to, &reason, &mut out);
            return out;
        }
        if self.adver_deadline.is_some_and(|d| now >= d) {
            match self.state {
                State::Backup => {
                    let reason = match (self.master, self.master_left) {
                        (Some(m), true) => format!("master {m} left (priority 0 advertisement)"),
                        (Some(m), false) => format!(
                            "no advertisement from master {m} for {:?}",
                            self.master_down_interval()
                        ),
                        (None, _) => {
                            format!("no master heard for {:?}", self.master_down_interval())
                        }
                    };
                    self.become_master(now, &reason, &mut out);
                    return out;
                }
                State::Master => {
                    out.push(Action::SendAdvert {
                        priority: self.effective_priority(),
                    });
                    self.adver_deadline = Some(now + self.advert_interval());
                }
                _ => self.adver_deadline = None,
            }
        }
        if let Some(b) = self.burst
            && now >= b.next
        {
            out.push(Action::Announce(Announce::Repeat));
            self.burst = (b.remaining > 1).then(|| Burst {
                remaining: b.remaining - 1,
                next: now + self.config.announce.interval,
            });
        }
        if self.refresh_at.is_some_and(|r| now >= r) {
            out.push(Action::Announce(Announce::Refresh));
            self.refresh_at = self.config.announce.refresh.map(|r| now + r);
        }
        out
    }

    /// A valid advertisement for our VRID from the peer (the codec and the
    /// shell have already checked TTL, version, VRID, checksum and that the
    /// sender is a cluster node).
    pub fn on_advert(&mut self, now: Instant, adv: Advert) -> Result<Vec<Action>, Ignored> {
        let mut out = Vec::new();
        match self.state {
            State::Backup | State::Maintenance => {
                if adv.priority == 0 {
                    // §6.4.2: the master is leaving; take over after Skew_Time.
                    // A leaving master repeats priority 0 every interval:
                    // the first one sets the deadline.
                    if self.state == State::Backup {
                        let skew = now + self.skew_time();
                        self.adver_deadline = Some(match self.adver_deadline {
                            Some(d) if self.master_left => d.min(skew),
                            _ => skew,
                        });
                    }
                    self.master = Some(adv.sender);
                    self.master_left = true;
                    return Ok(out);
                }
                let holding = self.preempt_hold_until.is_some_and(|h| now < h);
                if !self.config.preempt
                    || holding
                    || adv.priority >= self.config.priority
                    || self.state == State::Maintenance
                {
                    self.master_adver_interval_cs = adv.advert_interval_cs;
                    self.master = Some(adv.sender);
                    self.master_left = false;
                    if self.state == State::Backup {
                        self.adver_deadline = Some(now + self.master_down_interval());
                    }
                    Ok(out)
                } else {
                    // Preempting a lower-priority master: let Master_Down_Timer run out.
                    Err(Ignored::Outranked)
                }
            }
            State::Master if self.leaving.is_some() => {
                if adv.priority == 0 {
                    // The peer is leaving too: nobody takes over; the
                    // handover timeout decides.
                    return Ok(out);
                }
                // Only a master advertises: the peer has taken over (and
                // announced the addresses before this advert).
                let Some(l) = self.leaving.clone() else {
                    return Ok(out);
                };
                self.master_adver_interval_cs = adv.advert_interval_cs;
                let reason = format!("{}; {} took over", l.reason, adv.sender);
                self.step_down(l.to, &reason, &mut out);
                self.master = Some(adv.sender);
                Ok(out)
            }
            State::Master => {
                let ours = self.config.priority;
                let higher = adv.priority > ours
                    || (adv.priority == ours && adv.sender > self.config.primary_address);
                if higher {
                    // keepalived's higher_prio_send_advert: our last advert
                    // tells the winner that clients may still point here.
                    out.push(Action::SendAdvert { priority: ours });
                    out.push(Action::ReleaseAddresses);
                    self.stop_announcing();
                    self.master_adver_interval_cs = adv.advert_interval_cs;
                    self.master = Some(adv.sender);
                    self.master_left = false;
                    self.adver_deadline = Some(now + self.master_down_interval());
                    let reason = if adv.priority > ours {
                        format!(
                            "{} advertises higher priority {} > {ours}",
                            adv.sender, adv.priority
                        )
                    } else {
                        format!(
                            "{} advertises equal priority {ours} and a higher address",
                            adv.sender
                        )
                    };
                    self.enter(State::Backup, &reason, &mut out);
                    return Ok(out);
                }
                // Another master that we outrank, or one leaving (§6.4.3:
                // priority 0 is answered at once): it may have held the
                // addresses, so clients may point at it.
                let due = self.last_heal.is_none_or(|t| {
                    now.saturating_duration_since(t) >= self.config.announce.heal_delay
                });
                // §6.4.3 answers priority 0 at once; another master's
                // advert is answered at once too (rate-limited), so it
                // yields now rather than at our next interval.
                if adv.priority == 0 || due {
                    out.push(Action::SendAdvert { priority: ours });
                    self.adver_deadline = Some(now + self.advert_interval());
                }
                if due {
                    self.last_heal = Some(now);
                    let n = self.config.announce.heal_repeat;
                    if n > 0 {
                        out.push(Action::Announce(Announce::Heal {
                            sender: adv.sender,
                            priority: adv.priority,
                        }));
                        self.schedule_burst(now, n);
                    }
                }
                if out.is_empty() {
                    Err(Ignored::Outranked)
                } else {
                    Ok(out)
                }
            }
            State::Initialize | State::Fault => Err(Ignored::NotListening),
        }
    }

    /// A tracked interface went down (`faulted == true`) or every tracked
    /// interface is up again. A fault releases at once: the node cannot
    /// serve any more.
    pub fn set_fault(&mut self, now: Instant, faulted: bool, reason: &str) -> Vec<Action> {
        if faulted == self.faulted {
            return Vec::new();
        }
        self.faulted = faulted;
        if faulted {
            let mut out = Vec::new();
            self.leaving = None;
            self.step_down(State::Fault, reason, &mut out);
            out
        } else if self.state == State::Fault {
            self.startup(now, reason)
        } else {
            Vec::new()
        }
    }

    /// Operator maintenance. A master hands over (make before break, see
    /// [`VirtualRouter::shutdown`]); the router stays out of the election
    /// until maintenance ends. Ending it also ends the preempt delay: the
    /// operator (or clustermanager's failback gate) has decided.
    pub fn set_maintenance(&mut self, now: Instant, on: bool, reason: &str) -> Vec<Action> {
        if on == self.maintenance {
            return Vec::new();
        }
        self.maintenance = on;
        let mut out = Vec::new();
        if on {
            match self.state {
                State::Fault => {}
                State::Master if self.leaving.is_some() => {}
                State::Master => self.begin_leaving(now, State::Maintenance, reason, &mut out),
                _ => self.step_down(State::Maintenance, reason, &mut out),
            }
            return out;
        }
        self.preempt_hold_until = None;
        match self.state {
            State::Maintenance => self.startup(now, reason),
            State::Master
                if self
                    .leaving
                    .as_ref()
                    .is_some_and(|l| l.to == State::Maintenance) =>
            {
                // Still master: stay, and say so at once.
                self.leaving = None;
                out.push(Action::SendAdvert {
                    priority: self.config.priority,
                });
                self.adver_deadline = Some(now + self.advert_interval());
                out.push(Action::HandoverCancelled {
                    reason: reason.to_owned(),
                });
                out
            }
            _ => out,
        }
    }

    /// A reload changed priority, interval, preemption or announcements:
    /// applied in place, without an election. A master advertises the new
    /// values at its next advert; a backup's timers pick them up at the
    /// next advert it hears.
    pub fn reconfigure(&mut self, now: Instant, config: RouterConfig) {
        if self.state != State::Backup {
            self.master_adver_interval_cs = config.advert_interval_cs;
        }
        if self.state == State::Master && config.announce.refresh != self.config.announce.refresh {
            self.refresh_at = config.announce.refresh.map(|r| now + r);
        }
        self.config = config;
    }

    pub fn in_maintenance(&self) -> bool {
        self.maintenance
    }

    fn begin_leaving(&mut self, now: Instant, to: State, reason: &str, out: &mut Vec<Action>) {
        let timeout = self.handover_timeout();
        if timeout.is_zero() {
            // Break before make: priority 0 and release now.
            self.step_down(to, reason, out);
            return;
        }
        self.leaving = Some(Leaving {
            to,
            reason: reason.to_owned(),
            deadline: now + timeout,
        });
        out.push(Action::SendAdvert { priority: 0 });
        // Priority 0 again every interval, in case one is lost.
        self.adver_deadline = Some(now + self.advert_interval());
        out.push(Action::HandoverStarted {
            reason: reason.to_owned(),
            timeout,
        });
    }

    fn become_master(&mut self, now: Instant, reason: &str, out: &mut Vec<Action>) {
        // Addresses and the first announcement before the advert: a master
        // that steps down on hearing it does so after clients were told.
        out.push(Action::TakeAddresses);
        out.push(Action::Announce(Announce::Takeover));
        self.schedule_burst(now, self.config.announce.repeat);
        self.refresh_at = self.config.announce.refresh.map(|r| now + r);
        out.push(Action::SendAdvert {
            priority: self.config.priority,
        });
        self.adver_deadline = Some(now + self.advert_interval());
        self.master = Some(self.config.primary_address);
        self.master_left = false;
        self.last_heal = None;
        self.enter(State::Master, reason, out);
    }

    /// The first announcement of `n` was just sent: schedule the other n - 1.
    fn schedule_burst(&mut self, now: Instant, n: u32) {
        self.burst = (n > 1).then(|| Burst {
            remaining: n - 1,
            next: now + self.config.announce.interval,
        });
    }

    fn stop_announcing(&mut self) {
        self.burst = None;
        self.refresh_at = None;
    }

    /// Leaves master (if master) for `to`. A master that was not handing
    /// over says goodbye with priority 0 (§6.4.3); one that was has said it
    /// every interval already.
    fn step_down(&mut self, to: State, reason: &str, out: &mut Vec<Action>) {
        if self.state == State::Master {
            if self.leaving.take().is_none() {
                out.push(Action::SendAdvert { priority: 0 });
            }
            out.push(Action::ReleaseAddresses);
            self.master = None;
        }
        self.stop_announcing();
        self.adver_deadline = None;
        self.enter(to, reason, out);
    }

    fn enter(&mut self, to: State, reason: &str, out: &mut Vec<Action>) {
        if self.state != to {
            out.push(Action::Transition {
                from: self.state,
                to,
                reason: reason.to_owned(),
            });
            self.state = to;
        }
    }
}
