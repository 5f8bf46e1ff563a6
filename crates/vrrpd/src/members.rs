//! Who may speak for this virtual router: only the cluster's two nodes.
//!
//! An advert for our VRID from any other source is dropped, counted and
//! reported as a foreign speaker (a neighbouring keepalived pair on the
//! same VRID, a misconfigured host, a spoofer) — never acted upon. This is
//! a filter, not authentication: VRRPv3 has none, and a host on the
//! cluster link can forge any source. Keep that link dedicated.
//!
//! IPv4 adverts come from the node's cluster address, as cluster.toml
//! lists it. IPv6 adverts come from the sender's *link-local* address
//! (RFC 5798 §5.1.2.1), which cluster.toml does not list: a link-local
//! source is accepted once it is verified to belong to the peer — its
//! neighbour entry has the same MAC as the peer's configured address
//! (both resolved by neighbour discovery on the cluster interface). The
//! verification is done by the shell; this module keeps the verdicts.
//!
//! Pure: addresses and time in, verdicts out.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

/// How long a link-local address proven not to be the peer's stays
/// refused before it is checked again.
const REJECT_FOR: Duration = Duration::from_secs(30);
/// How long a failed verification (entries unresolved) waits before the
/// next attempt.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// What to do with an advert from a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Our own advert, looped back: ignore.
    Own,
    /// A cluster node: hand it to the state machine.
    Member,
    /// Not a cluster node: drop, count, report.
    Foreign,
    /// An IPv6 link-local source not verified yet: drop; the shell verifies
    /// it when `verify` is true (no verification of it in flight).
    Unverified { verify: bool },
}

#[derive(Debug, Clone)]
pub struct Members {
    /// Our own sources (cluster address, IPv6 link-local).
    own: Vec<IpAddr>,
    /// The cluster.toml node addresses.
    nodes: Vec<IpAddr>,
    /// false: every source is accepted (RFC 5798 behaviour).
    enforce: bool,
    /// The peer's link-local address, verified.
    peer_link_local: Option<Ipv6Addr>,
    /// Link-local addresses that are not the peer's, until when.
    rejected: HashMap<Ipv6Addr, Instant>,
    /// Verifications in flight or failed, and when a new one may start.
    attempts: HashMap<Ipv6Addr, Option<Instant>>,
}

fn is_link_local(a: Ipv6Addr) -> bool {
    a.segments()[0] & 0xffc0 == 0xfe80
}

impl Members {
    pub fn new(own: Vec<IpAddr>, nodes: Vec<IpAddr>, enforce: bool) -> Members {
        Members {
            own,
            nodes,
            enforce,
            peer_link_local: None,
            rejected: HashMap::new(),
            attempts: HashMap::new(),
        }
    }

    /// The peer's verified link-local address, if any.
    pub fn peer_link_local(&self) -> Option<Ipv6Addr> {
        self.peer_link_local
    }

    pub fn classify(&mut self, now: Instant, src: IpAddr) -> Verdict {
        if self.own.contains(&src) {
            return Verdict::Own;
        }
        if !self.enforce || self.nodes.contains(&src) {
            return Verdict::Member;
        }
        let IpAddr::V6(ll) = src else {
            return Verdict::Foreign;
        };
        if !is_link_local(ll) {
            return Verdict::Foreign;
        }
        if self.peer_link_local == Some(ll) {
            return Verdict::Member;
        }
        if let Some(until) = self.rejected.get(&ll) {
            if now < *until {
                return Verdict::Foreign;
            }
            self.rejected.remove(&ll);
        }
        let verify = match self.attempts.get(&ll) {
            // In flight.
            Some(None) => false,
            Some(Some(retry)) => now >= *retry,
            None => true,
        };
        if verify {
            // Bounded: a flood of spoofed sources must not grow this map.
            if self.attempts.len() >= 64 {
                self.attempts.retain(|_, v| v.is_none());
            }
            self.attempts.insert(ll, None);
        }
        Verdict::Unverified { verify }
    }

    /// The result of verifying `ll`: `Some(true)` it is the peer's,
    /// `Some(false)` it is not, `None` undecided (entries unresolved).
    pub fn verified(&mut self, now: Instant, ll: Ipv6Addr, result: Option<bool>) {
        match result {
            Some(true) => {
                self.attempts.remove(&ll);
                self.peer_link_local = Some(ll);
            }
            Some(false) => {
                self.attempts.remove(&ll);
                if self.rejected.len() >= 64 {
                    self.rejected.retain(|_, until| now < *until);
                }
                self.rejected.insert(ll, now + REJECT_FOR);
            }
            None => {
                self.attempts.insert(ll, Some(now + RETRY_AFTER));
            }
        }
    }
}

/// One source of foreign adverts, as Status reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignSpeaker {
    pub address: IpAddr,
    pub vrid: u8,
    pub priority: u8,
    pub adverts: u64,
    pub last_seen_unix_ms: i64,
}

/// The foreign speakers heard, at most `cap` of them (the least recently
/// heard one makes room for a new one).
#[derive(Debug, Clone)]
pub struct ForeignSpeakers {
    cap: usize,
    speakers: Vec<ForeignSpeaker>,
}

impl ForeignSpeakers {
    pub fn new(cap: usize) -> ForeignSpeakers {
        ForeignSpeakers {
            cap,
            speakers: Vec::new(),
        }
    }

    /// Records one advert; true if the source is new.
    pub fn record(&mut self, address: IpAddr, vrid: u8, priority: u8, unix_ms: i64) -> bool {
        if let Some(s) = self.speakers.iter_mut().find(|s| s.address == address) {
            s.vrid = vrid;
            s.priority = priority;
            s.adverts += 1;
            s.last_seen_unix_ms = unix_ms;
            return false;
        }
        if self.speakers.len() >= self.cap
            && let Some(oldest) = self
                .speakers
                .iter()
                .enumerate()
                .min_by_key(|(_, s)| s.last_seen_unix_ms)
                .map(|(i, _)| i)
        {
            self.speakers.swap_remove(oldest);
        }
        self.speakers.push(ForeignSpeaker {
            address,
            vrid,
            priority,
            adverts: 1,
            last_seen_unix_ms: unix_ms,
        });
        true
    }

    /// Most recently heard first.
    pub fn list(&self) -> Vec<ForeignSpeaker> {
        let mut v = self.speakers.clone();
        v.sort_by_key(|s| std::cmp::Reverse(s.last_seen_unix_ms));
        v
    }
}

/// Rate limit for the log lines of dropped packets: the first drop of a
/// kind from a source is logged at once; after that at most one line per
/// `every`, saying how many more were dropped meanwhile.
#[derive(Debug, Clone)]
pub struct DropLog {
    every: Duration,
    cap: usize,
    last: HashMap<(Option<IpAddr>, &'static str), (Instant, u64)>,
}

impl DropLog {
    pub fn new(every: Duration, cap: usize) -> DropLog {
        DropLog {
            every,
            cap,
            last: HashMap::new(),
        }
    }

    /// A packet of `kind` from `src` was dropped. `Some(n)`: log it now,
    /// `n` more having been dropped since the last line; `None`: stay quiet.
    pub fn note(&mut self, now: Instant, src: Option<IpAddr>, kind: &'static str) -> Option<u64> {
        let key = (src, kind);
        match self.last.get_mut(&key) {
            Some((at, suppressed)) => {
                if now.saturating_duration_since(*at) >= self.every {
                    let n = *suppressed;
                    *at = now;
                    *suppressed = 0;
                    Some(n)
                } else {
                    *suppressed += 1;
                    None
                }
            }
            None => {
                if self.last.len() >= self.cap {
                    let every = self.every;
                    self.last
                        .retain(|_, (at, _)| now.saturating_duration_since(*at) < every);
                }
                if self.last.len() >= self.cap {
                    // Still full of active sources: stay quiet rather than grow.
                    return None;
                }
                self.last.insert(key, (now, 0));
                Some(0)
            }
        }
    }
}
