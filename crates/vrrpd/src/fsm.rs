//! The VRRP state machine of RFC 5798 §6.4, as a pure function of events and
//! time: no sockets, no clocks. The I/O shell feeds it received adverts,
//! timer expiries and operator or interface events, and carries out the
//! [`Action`]s it returns. Tandem adds two states to the RFC's three: `Fault`
//! (a tracked interface is down) and `Maintenance` (the operator asked this
//! node to step aside); in both the router never becomes master.

use std::net::IpAddr;
use std::time::{Duration, Instant};

/// The priority of the address owner (RFC 5798 §5.2.4): it is master at once.
pub const OWNER_PRIORITY: u8 = 255;

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
}

/// An advertisement as the state machine needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Advert {
    /// IP source of the advert: the sender's primary address.
    pub sender: IpAddr,
    pub priority: u8,
    pub advert_interval_cs: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send an advertisement with this priority (0 = "I am leaving").
    SendAdvert { priority: u8 },
    /// Add the floating IPs, then announce them (gratuitous ARP / NA).
    TakeAddresses,
    /// Remove the floating IPs.
    ReleaseAddresses,
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

#[derive(Debug, Clone)]
pub struct VirtualRouter {
    config: RouterConfig,
    state: State,
    /// Master_Adver_Interval: the interval the current master advertises (§6.1).
    master_adver_interval_cs: u16,
    /// Adver_Timer in Master, Master_Down_Timer in Backup; nothing otherwise.
    deadline: Option<Instant>,
    /// The master as last heard (Backup) or ourselves (Master).
    master: Option<IpAddr>,
    /// Operator maintenance requested; outlives interface faults.
    maintenance: bool,
    /// Some tracked interface is down.
    faulted: bool,
    /// The master said goodbye (priority 0); we take over after Skew_Time.
    master_left: bool,
}

fn cs(n: u32) -> Duration {
    Duration::from_millis(u64::from(n) * 10)
}

impl VirtualRouter {
    pub fn new(config: RouterConfig) -> Self {
        VirtualRouter {
            master_adver_interval_cs: config.advert_interval_cs,
            config,
            state: State::Initialize,
            deadline: None,
            master: None,
            maintenance: false,
            faulted: false,
            master_left: false,
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
        self.deadline
    }

    /// The priority currently advertised.
    pub fn effective_priority(&self) -> u8 {
        self.config.priority
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

    fn advert_interval(&self) -> Duration {
        cs(u32::from(self.config.advert_interval_cs))
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
            self.deadline = Some(now + self.master_down_interval());
            self.master = None;
            self.enter(State::Backup, reason, &mut out);
        }
        out
    }

    /// Shutdown (§6.4.2, §6.4.3): a master says goodbye with priority 0 so
    /// the backup takes over after Skew_Time instead of Master_Down_Interval.
    pub fn shutdown(&mut self, reason: &str) -> Vec<Action> {
        let mut out = Vec::new();
        self.step_down(State::Initialize, reason, &mut out);
        out
    }

    /// A timer expired. Calls before the deadline do nothing.
    pub fn on_timer(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        match self.deadline {
            Some(d) if now >= d => {}
            _ => return out,
        }
        match self.state {
            State::Backup => {
                let reason = match (self.master, self.master_left) {
                    (Some(m), true) => format!("master {m} left (priority 0 advertisement)"),
                    (Some(m), false) => format!(
                        "no advertisement from master {m} for {:?}",
                        self.master_down_interval()
                    ),
                    (None, _) => format!("no master heard for {:?}", self.master_down_interval()),
                };
                self.become_master(now, &reason, &mut out);
            }
            State::Master => {
                out.push(Action::SendAdvert {
                    priority: self.config.priority,
                });
                self.deadline = Some(now + self.advert_interval());
            }
            _ => self.deadline = None,
        }
        out
    }

    /// A valid advertisement for our VRID arrived (the codec and the shell
    /// have already checked TTL, version, VRID, checksum).
    pub fn on_advert(&mut self, now: Instant, adv: Advert) -> Result<Vec<Action>, Ignored> {
        let mut out = Vec::new();
        match self.state {
            State::Backup | State::Maintenance => {
                if adv.priority == 0 {
                    // §6.4.2: the master is leaving; take over after Skew_Time.
                    if self.state == State::Backup {
                        self.deadline = Some(now + self.skew_time());
                    }
                    self.master = Some(adv.sender);
                    self.master_left = true;
                    return Ok(out);
                }
                if !self.config.preempt
                    || adv.priority >= self.config.priority
                    || self.state == State::Maintenance
                {
                    self.master_adver_interval_cs = adv.advert_interval_cs;
                    self.master = Some(adv.sender);
                    self.master_left = false;
                    if self.state == State::Backup {
                        self.deadline = Some(now + self.master_down_interval());
                    }
                    Ok(out)
                } else {
                    // Preempting a lower-priority master: let Master_Down_Timer run out.
                    Err(Ignored::Outranked)
                }
            }
            State::Master => {
                if adv.priority == 0 {
                    // §6.4.3: another router left; assert ourselves at once.
                    out.push(Action::SendAdvert {
                        priority: self.config.priority,
                    });
                    self.deadline = Some(now + self.advert_interval());
                    return Ok(out);
                }
                let ours = self.config.priority;
                let higher = adv.priority > ours
                    || (adv.priority == ours && adv.sender > self.config.primary_address);
                if higher {
                    self.master_adver_interval_cs = adv.advert_interval_cs;
                    self.master = Some(adv.sender);
                    self.deadline = Some(now + self.master_down_interval());
                    out.push(Action::ReleaseAddresses);
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
                    Ok(out)
                } else {
                    Err(Ignored::Outranked)
                }
            }
            State::Initialize | State::Fault => Err(Ignored::NotListening),
        }
    }

    /// A tracked interface went down (`up == false`) or every tracked
    /// interface is up again (`up == true`).
    pub fn set_fault(&mut self, now: Instant, faulted: bool, reason: &str) -> Vec<Action> {
        if faulted == self.faulted {
            return Vec::new();
        }
        self.faulted = faulted;
        if faulted {
            let mut out = Vec::new();
            self.step_down(State::Fault, reason, &mut out);
            out
        } else if self.state == State::Fault {
            self.startup(now, reason)
        } else {
            Vec::new()
        }
    }

    /// Operator maintenance: a master hands over at once (priority 0) and the
    /// router stays out of the election until maintenance ends.
    pub fn set_maintenance(&mut self, now: Instant, on: bool, reason: &str) -> Vec<Action> {
        if on == self.maintenance {
            return Vec::new();
        }
        self.maintenance = on;
        if on {
            if self.state == State::Fault {
                return Vec::new();
            }
            let mut out = Vec::new();
            self.step_down(State::Maintenance, reason, &mut out);
            out
        } else if self.state == State::Maintenance {
            self.startup(now, reason)
        } else {
            Vec::new()
        }
    }

    /// A reload changed priority, interval or preemption: applied in place,
    /// without an election. A master advertises the new values at its next
    /// advert; a backup's timers pick them up at the next advert it hears.
    pub fn reconfigure(&mut self, config: RouterConfig) {
        if self.state != State::Backup {
            self.master_adver_interval_cs = config.advert_interval_cs;
        }
        self.config = config;
    }

    pub fn in_maintenance(&self) -> bool {
        self.maintenance
    }

    fn become_master(&mut self, now: Instant, reason: &str, out: &mut Vec<Action>) {
        out.push(Action::SendAdvert {
            priority: self.config.priority,
        });
        out.push(Action::TakeAddresses);
        self.deadline = Some(now + self.advert_interval());
        self.master = Some(self.config.primary_address);
        self.master_left = false;
        self.enter(State::Master, reason, out);
    }

    fn step_down(&mut self, to: State, reason: &str, out: &mut Vec<Action>) {
        if self.state == State::Master {
            out.push(Action::SendAdvert { priority: 0 });
            out.push(Action::ReleaseAddresses);
            self.master = None;
        }
        self.deadline = None;
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
