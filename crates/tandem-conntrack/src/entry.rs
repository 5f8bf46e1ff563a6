//! The conntrack entry as Tandem sees it: what the kernel reports and what
//! must be sent to the peer to recreate the entry there, NAT included.

use std::net::IpAddr;

/// One direction of a connection: addresses, layer-4 protocol and ports
/// (ports are 0 for protocols without them; for ICMP, `src_port` carries the id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tuple {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol number: 6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6.
    pub protocol: u8,
    pub src_port: u16,
    pub dst_port: u16,
}

/// TCP protocol state (CTA_PROTOINFO_TCP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TcpInfo {
    /// enum tcp_conntrack (3 = ESTABLISHED).
    pub state: u8,
    pub wscale_original: u8,
    pub wscale_reply: u8,
    /// IP_CT_TCP_FLAG_* of each direction (0x08 = be liberal).
    pub flags_original: u8,
    pub flags_reply: u8,
}

/// A connection-tracking entry. The original tuple is its identity; NAT is
/// implied by the reply tuple differing from the inverted original one
/// (status bits IPS_SRC_NAT / IPS_DST_NAT say which).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Entry {
    pub original: Tuple,
    pub reply: Tuple,
    /// IPS_* status bits.
    pub status: u32,
    /// Seconds left before the kernel expires the entry.
    pub timeout_s: u32,
    pub mark: u32,
    pub zone: u16,
    pub tcp: Option<TcpInfo>,
}

impl Entry {
    pub fn key(&self) -> &Tuple {
        &self.original
    }
}

/// A change reported by the kernel's conntrack event groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    New(Entry),
    Update(Entry),
    /// The entry left the table; only its original tuple is needed.
    Destroy(Tuple),
}
