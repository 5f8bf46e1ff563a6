//! What a node announces, as pure functions: the datapath's view (from
//! lb-forwarder), maintenance and the time in; for every VIP, announced or
//! withdrawn and why, out.
//!
//! A VIP is announced when all of these hold:
//! - the node is not in maintenance;
//! - the local datapath is ready: lb-forwarder answers and reports its
//!   nftables table loaded (an unanswered poll is forgiven for a grace
//!   period, long enough for a restart; the kernel rules keep serving);
//! - lb-forwarder serves at least one direct-server-return farm on the VIP
//!   with a backend in rotation whose health check passed. A VIP carrying
//!   several farms (ports) stays announced while any of them can serve:
//!   withdrawing it would take the healthy ones down with the broken one.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// One farm as the datapath serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FarmView {
    pub name: String,
    pub vip: IpAddr,
    /// Direct server return (the only forwarding an active-active node
    /// announces).
    pub dsr: bool,
    /// At least one backend is in rotation and passed its health check.
    pub healthy: bool,
}

/// What lb-forwarder said at one poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwarderView {
    /// Its nftables table matches its configuration.
    pub loaded: bool,
    pub farms: Vec<FarmView>,
}

/// Whether the local datapath can serve, and what it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datapath {
    Ready(Vec<FarmView>),
    NotReady(String),
}

/// lb-forwarder's answers over time: a missed poll is forgiven for `grace`
/// after the last answer (its kernel rules outlive it), not before the
/// first answer.
#[derive(Debug, Clone)]
pub struct Liveness {
    grace: Duration,
    last: Option<(Instant, ForwarderView)>,
    failing_since: Option<Instant>,
    error: String,
}

impl Liveness {
    pub fn new(grace: Duration) -> Liveness {
        Liveness {
            grace,
            last: None,
            failing_since: None,
            error: String::new(),
        }
    }

    pub fn answered(&mut self, now: Instant, view: ForwarderView) {
        self.last = Some((now, view));
        self.failing_since = None;
        self.error.clear();
    }

    pub fn failed(&mut self, now: Instant, error: String) {
        self.failing_since.get_or_insert(now);
        self.error = error;
    }

    pub fn datapath(&self, now: Instant) -> Datapath {
        let Some((at, view)) = &self.last else {
            return Datapath::NotReady(if self.error.is_empty() {
                "lb-forwarder not asked yet".to_owned()
            } else {
                format!("lb-forwarder has not answered yet: {}", self.error)
            });
        };
        if let Some(since) = self.failing_since {
            // Measured from the last answer: a poll that failed long after
            // it still leaves the whole grace to an answer.
            if now.saturating_duration_since(*at) > self.grace && since >= *at {
                return Datapath::NotReady(format!("lb-forwarder does not answer: {}", self.error));
            }
        }
        if view.loaded {
            Datapath::Ready(view.farms.clone())
        } else {
            Datapath::NotReady("lb-forwarder has not loaded its nftables table".to_owned())
        }
    }
}

/// One VIP's fate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub vip: IpAddr,
    pub farms: Vec<String>,
    pub announce: bool,
    /// Why not (empty when announced).
    pub reason: String,
}

/// Every VIP of `configured` (the DSR farms of this node's configuration,
/// name and VIP) and of the datapath, in address order.
pub fn decide(
    configured: &[(String, IpAddr)],
    datapath: &Datapath,
    maintenance: Option<&str>,
) -> Vec<Decision> {
    let mut vips: BTreeMap<IpAddr, BTreeSet<String>> = BTreeMap::new();
    for (name, vip) in configured {
        vips.entry(*vip).or_default().insert(name.clone());
    }
    if let Datapath::Ready(farms) = datapath {
        for f in farms.iter().filter(|f| f.dsr) {
            vips.entry(f.vip).or_default().insert(f.name.clone());
        }
    }
    vips.into_iter()
        .map(|(vip, farms)| {
            let farms: Vec<String> = farms.into_iter().collect();
            let reason = match (maintenance, datapath) {
                (Some(""), _) => "maintenance".to_owned(),
                (Some(why), _) => format!("maintenance: {why}"),
                (None, Datapath::NotReady(why)) => format!("datapath not ready: {why}"),
                (None, Datapath::Ready(served)) => {
                    let here: Vec<&FarmView> =
                        served.iter().filter(|f| f.dsr && f.vip == vip).collect();
                    if here.is_empty() {
                        format!("not in the datapath yet (farm {})", farms.join(", "))
                    } else if here.iter().any(|f| f.healthy) {
                        String::new()
                    } else {
                        let names: Vec<&str> = here.iter().map(|f| f.name.as_str()).collect();
                        if names.len() == 1 {
                            format!("farm {} has no healthy backend", names[0])
                        } else {
                            format!("no farm on it has a healthy backend ({})", names.join(", "))
                        }
                    }
                }
            };
            Decision {
                vip,
                farms,
                announce: reason.is_empty(),
                reason,
            }
        })
        .collect()
}

/// The VIPs announced in `decisions`.
pub fn announced(decisions: &[Decision]) -> BTreeSet<IpAddr> {
    decisions
        .iter()
        .filter(|d| d.announce)
        .map(|d| d.vip)
        .collect()
}
