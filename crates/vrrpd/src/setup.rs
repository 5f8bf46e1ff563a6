//! From Tandem's configuration to what the VRRP instance runs with: which
//! interface, which addresses, which priority and whether to preempt.

use std::net::IpAddr;
use std::time::Duration;

use tandem_config::{Config, Failback};

use crate::addresses::FloatingIp;
use crate::packet::Version;

/// Everything the router needs from configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VrrpSetup {
    pub version: Version,
    pub vrid: u8,
    /// The cluster interface, where adverts are sent and heard.
    pub interface: String,
    /// This node's address on it (for IPv6 the link-local address is used
    /// on the wire instead, as RFC 5798 §5.1.2.1 requires).
    pub address: IpAddr,
    pub unicast_peer: Option<IpAddr>,
    pub priority: u8,
    pub preempt: bool,
    pub advert_interval_cs: u16,
    pub floating_ips: Vec<FloatingIp>,
    pub tracked_interfaces: Vec<String>,
    pub garp_repeat: u32,
    pub garp_interval: Duration,
    /// Heal announcements (0 = off) and their rate limit.
    pub garp_lower_prio_repeat: u32,
    pub garp_lower_prio_delay: Duration,
    pub garp_refresh: Option<Duration>,
    pub preempt_delay: Duration,
    /// The cluster's node addresses: the only accepted sources of adverts
    /// when `members_only` (IPv6: their link-local addresses, verified).
    pub members: Vec<IpAddr>,
    pub members_only: bool,
    /// None: permanent floating IPs; Some(s): added with this lifetime and
    /// refreshed while vrrpd runs.
    pub address_lifetime: Option<Duration>,
    /// SCHED_FIFO priority of the advert thread; 0 = normal scheduling.
    pub rt_priority: u8,
    /// None: automatic; zero: release at once.
    pub handover_timeout: Option<Duration>,
}

impl VrrpSetup {
    /// True when a change can be applied without reopening the socket.
    pub fn same_socket(&self, other: &VrrpSetup) -> bool {
        self.version == other.version
            && self.vrid == other.vrid
            && self.interface == other.interface
            && self.address == other.address
            && self.unicast_peer == other.unicast_peer
            && self.tracked_interfaces == other.tracked_interfaces
    }

    /// The peer's configured address (the other `[[nodes]]` entry).
    pub fn peer(&self) -> Option<IpAddr> {
        self.members.iter().copied().find(|a| *a != self.address)
    }

    /// Master_Down_Interval for this node's own priority and interval.
    pub fn master_down_interval(&self) -> Duration {
        let interval_us = u64::from(self.advert_interval_cs) * 10_000;
        let skew_us = (256 - u64::from(self.priority)) * interval_us / 256;
        Duration::from_micros(3 * interval_us + skew_us)
    }

    /// The virtual addresses carried in adverts: those of the VRRP family.
    pub fn advertised(&self) -> Vec<IpAddr> {
        self.floating_ips
            .iter()
            .map(|f| f.address)
            .filter(|a| a.is_ipv6() == self.address.is_ipv6())
            .collect()
    }
}

/// `Ok(None)` on a standalone node (no cluster.toml).
///
/// Failback maps onto RFC 5798 preemption: with `failback = "none"` nobody
/// preempts, so a master keeps the role until it fails. With a preferred
/// node, that node preempts and advertises a priority above its peer's, so a
/// returning preferred master takes the role back (clustermanager gates when).
pub fn from_config(config: &Config) -> Result<Option<VrrpSetup>, String> {
    let Some(cluster) = &config.cluster else {
        return Ok(None);
    };
    let node = &config.node;
    let me = cluster
        .nodes
        .iter()
        .find(|n| n.name == node.name)
        .ok_or_else(|| format!("node `{}` is not one of the cluster's nodes", node.name))?;
    let peer = cluster.nodes.iter().find(|n| n.name != node.name);
    let interface = node
        .cluster_interface
        .clone()
        .ok_or("node.toml has no cluster_interface")?;
    let (priority, preempt) = match &cluster.failback {
        Failback::None => (me.priority, false),
        Failback::Node(preferred) if *preferred == me.name => {
            let above_peer = peer.map_or(me.priority, |p| p.priority.saturating_add(1));
            (me.priority.max(above_peer).min(254), true)
        }
        Failback::Node(_) => (me.priority, false),
    };
    let version = match cluster.vrrp.version {
        2 => Version::V2,
        _ => Version::V3,
    };
    let advert_interval_cs = u16::try_from(cluster.vrrp.advert_interval_ms / 10)
        .map_err(|_| "advert_interval_ms is too large".to_owned())?;
    let mut setup = VrrpSetup {
        version,
        vrid: cluster.virtual_router_id,
        interface,
        address: me.address,
        unicast_peer: if cluster.vrrp.unicast {
            peer.map(|p| p.address)
        } else {
            None
        },
        priority,
        preempt,
        advert_interval_cs,
        floating_ips: cluster
            .floating_ips
            .iter()
            .map(|f| FloatingIp {
                address: f.address.addr,
                prefix_len: f.address.prefix_len,
                interface: f.interface.clone(),
            })
            .collect(),
        tracked_interfaces: cluster.tracked_interfaces.clone(),
        garp_repeat: u32::from(cluster.vrrp.garp_repeat),
        garp_interval: Duration::from_millis(u64::from(cluster.vrrp.garp_interval_ms)),
        garp_lower_prio_repeat: u32::from(cluster.vrrp.garp_lower_prio_repeat),
        garp_lower_prio_delay: Duration::from_millis(u64::from(
            cluster.vrrp.garp_lower_prio_delay_ms,
        )),
        garp_refresh: (cluster.vrrp.garp_refresh_s > 0)
            .then(|| Duration::from_secs(u64::from(cluster.vrrp.garp_refresh_s))),
        preempt_delay: Duration::from_secs(u64::from(cluster.vrrp.preempt_delay_s)),
        members: cluster.nodes.iter().map(|n| n.address).collect(),
        members_only: cluster.vrrp.members_only,
        address_lifetime: None,
        rt_priority: cluster.vrrp.rt_priority,
        handover_timeout: cluster
            .vrrp
            .handover_timeout_ms
            .map(|t| Duration::from_millis(u64::from(t))),
    };
    setup.address_lifetime = match cluster.vrrp.floating_ip_lifetime_s {
        Some(0) => None,
        Some(s) => Some(Duration::from_secs(u64::from(s))),
        None => Some(auto_lifetime(setup.master_down_interval())),
    };
    if setup.advertised().is_empty() {
        return Err(format!(
            "no floating IP of the cluster address's family ({}) to advertise",
            me.address
        ));
    }
    Ok(Some(setup))
}

/// The floating IPs' lifetime when the configuration does not set one.
///
/// The kernel expires an address with `valid_lft` L between L and L + 0.25 s
/// after it was last refreshed (IPv4's check_lifetime and IPv6's
/// addrconf_verify run on whole seconds, with a quarter-second slack;
/// measured here: 1.0-1.2 s for L = 1). A vrrpd that dies must not leave
/// its addresses behind for much longer than the peer needs to take over,
/// Master_Down_Interval: whole seconds, L + 0.25 s <= MDI + 1 s, at least 1.
pub fn auto_lifetime(master_down_interval: Duration) -> Duration {
    let budget_ms = master_down_interval.as_millis() + 750;
    let secs = u64::try_from(budget_ms / 1000).unwrap_or(u64::MAX).max(1);
    Duration::from_secs(secs)
}
