//! The conntrack entry as Tandem sees it: what the kernel reports and what
//! must be sent to the peer to recreate the entry there, NAT included.

use std::fmt;
use std::net::IpAddr;

/// One direction of a connection: addresses, layer-4 protocol and ports
/// (ports are 0 for protocols without them; for ICMP, `src_port` carries the
/// id and `dst_port` is `type << 8 | code`, which is how the kernel's own
/// tuple overlays them).
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

/// IP protocol numbers the crate treats specially.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const DCCP: u8 = 33;
    pub const GRE: u8 = 47;
    pub const ICMPV6: u8 = 58;
    pub const SCTP: u8 = 132;
    pub const UDPLITE: u8 = 136;
}

/// IPS_* status bits (include/uapi/linux/netfilter/nf_conntrack_common.h).
pub mod status {
    pub const EXPECTED: u32 = 1 << 0;
    pub const SEEN_REPLY: u32 = 1 << 1;
    pub const ASSURED: u32 = 1 << 2;
    pub const CONFIRMED: u32 = 1 << 3;
    pub const SRC_NAT: u32 = 1 << 4;
    pub const DST_NAT: u32 = 1 << 5;
    pub const SEQ_ADJUST: u32 = 1 << 6;
    pub const SRC_NAT_DONE: u32 = 1 << 7;
    pub const DST_NAT_DONE: u32 = 1 << 8;
    pub const DYING: u32 = 1 << 9;
    pub const FIXED_TIMEOUT: u32 = 1 << 10;
    pub const NAT_MASK: u32 = SRC_NAT | DST_NAT;
    pub const NAT_DONE_MASK: u32 = SRC_NAT_DONE | DST_NAT_DONE;
}

/// enum tcp_conntrack values and IP_CT_TCP_FLAG_* bits.
pub mod tcp {
    pub const SYN_SENT: u8 = 1;
    pub const SYN_RECV: u8 = 2;
    pub const ESTABLISHED: u8 = 3;
    pub const FIN_WAIT: u8 = 4;
    pub const CLOSE_WAIT: u8 = 5;
    pub const LAST_ACK: u8 = 6;
    pub const TIME_WAIT: u8 = 7;
    pub const CLOSE: u8 = 8;
    pub const FLAG_WINDOW_SCALE: u8 = 0x01;
    pub const FLAG_SACK_PERM: u8 = 0x02;
    pub const FLAG_CLOSE_INIT: u8 = 0x04;
    pub const FLAG_BE_LIBERAL: u8 = 0x08;
}

impl Tuple {
    /// The same flow seen from the other end: addresses and ports swapped.
    /// For ICMP the id stays and the type becomes its reply (echo request
    /// 8 <-> echo reply 0, ICMPv6 128 <-> 129), as the kernel inverts it.
    pub fn inverted(&self) -> Tuple {
        match self.protocol {
            proto::ICMP | proto::ICMPV6 => {
                let (ty, code) = (self.icmp_type(), (self.dst_port & 0xff) as u8);
                let inv_ty = match (self.protocol, ty) {
                    (proto::ICMP, 8) => 0,
                    (proto::ICMP, 0) => 8,
                    (proto::ICMP, 13) => 14,
                    (proto::ICMP, 14) => 13,
                    (proto::ICMPV6, 128) => 129,
                    (proto::ICMPV6, 129) => 128,
                    (_, t) => t,
                };
                Tuple {
                    src: self.dst,
                    dst: self.src,
                    protocol: self.protocol,
                    src_port: self.src_port,
                    dst_port: (u16::from(inv_ty) << 8) | u16::from(code),
                }
            }
            _ => Tuple {
                src: self.dst,
                dst: self.src,
                protocol: self.protocol,
                src_port: self.dst_port,
                dst_port: self.src_port,
            },
        }
    }

    /// Whether the protocol has ports in its tuple (and so in its NAT).
    pub fn has_ports(&self) -> bool {
        matches!(
            self.protocol,
            proto::TCP | proto::UDP | proto::DCCP | proto::SCTP | proto::UDPLITE
        )
    }

    pub fn is_icmp(&self) -> bool {
        matches!(self.protocol, proto::ICMP | proto::ICMPV6)
    }

    /// ICMP type, for ICMP tuples (see the struct's doc).
    pub fn icmp_type(&self) -> u8 {
        (self.dst_port >> 8) as u8
    }

    pub fn is_ipv6(&self) -> bool {
        self.src.is_ipv6()
    }
}

fn protocol_name(p: u8) -> Option<&'static str> {
    Some(match p {
        proto::ICMP => "icmp",
        proto::TCP => "tcp",
        proto::UDP => "udp",
        proto::DCCP => "dccp",
        proto::GRE => "gre",
        proto::ICMPV6 => "icmpv6",
        proto::SCTP => "sctp",
        proto::UDPLITE => "udplite",
        _ => return None,
    })
}

struct Endpoint(IpAddr, Option<u16>);

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.0, self.1) {
            (IpAddr::V6(a), Some(p)) => write!(f, "[{a}]:{p}"),
            (a, Some(p)) => write!(f, "{a}:{p}"),
            (a, None) => write!(f, "{a}"),
        }
    }
}

/// `tcp 10.0.0.50:40000 -> 10.0.0.100:80`, `icmp 10.0.0.50 -> 10.0.0.1 id 7 type 8`.
impl fmt::Display for Tuple {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match protocol_name(self.protocol) {
            Some(name) => write!(f, "{name} ")?,
            None => write!(f, "proto {} ", self.protocol)?,
        }
        let ports = self.has_ports();
        write!(
            f,
            "{} -> {}",
            Endpoint(self.src, ports.then_some(self.src_port)),
            Endpoint(self.dst, ports.then_some(self.dst_port))
        )?;
        if self.is_icmp() {
            write!(f, " id {} type {}", self.src_port, self.icmp_type())?;
        }
        Ok(())
    }
}

impl Entry {
    pub fn key(&self) -> &Tuple {
        &self.original
    }

    /// Destination NAT: where the original destination was rewritten to
    /// (the reply's source), if it was.
    pub fn dnat_target(&self) -> Option<(IpAddr, u16)> {
        let expected = self.original.inverted();
        let moved = self.reply.src != expected.src
            || (self.original.has_ports() && self.reply.src_port != expected.src_port);
        moved.then_some((self.reply.src, self.reply.src_port))
    }

    /// Source NAT: what the original source was rewritten to (the reply's
    /// destination), if it was.
    pub fn snat_source(&self) -> Option<(IpAddr, u16)> {
        let expected = self.original.inverted();
        let moved = self.reply.dst != expected.dst
            || (self.original.has_ports() && self.reply.dst_port != expected.dst_port);
        moved.then_some((self.reply.dst, self.reply.dst_port))
    }
}

/// Packet and byte counters of an entry, per direction
/// (CTA_COUNTERS_ORIG / CTA_COUNTERS_REPLY). The kernel keeps them only when
/// `net.netfilter.nf_conntrack_acct = 1` in the namespace when the entry was
/// created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Counters {
    pub packets_original: u64,
    pub bytes_original: u64,
    pub packets_reply: u64,
    pub bytes_reply: u64,
}

impl Counters {
    /// The counters of an entry from its two directions' (packets, bytes),
    /// as ctnetlink reports them (CTA_COUNTERS_ORIG / _REPLY); None when
    /// neither was reported (accounting off).
    pub(crate) fn from_directions(
        original: Option<(u64, u64)>,
        reply: Option<(u64, u64)>,
    ) -> Option<Counters> {
        if original.is_none() && reply.is_none() {
            return None;
        }
        let (packets_original, bytes_original) = original.unwrap_or_default();
        let (packets_reply, bytes_reply) = reply.unwrap_or_default();
        Some(Counters {
            packets_original,
            bytes_original,
            packets_reply,
            bytes_reply,
        })
    }
}

/// An entry as the kernel reports it: the [`Entry`] plus what only the
/// kernel knows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Record {
    pub entry: Entry,
    /// CTA_ID: the kernel's id of this entry (stable for its lifetime; a new
    /// entry with the same tuple gets a different id).
    pub id: u32,
    pub counters: Option<Counters>,
    /// Events only: the netlink port id of the socket whose request made
    /// the change (see [`crate::Conntrack::portid`]), 0 when the kernel
    /// made it itself (a packet, a timeout). 0 in dumps and gets.
    pub portid: u32,
}

/// A change reported by the kernel's conntrack event groups.
///
/// What each carries is what the kernel puts in the event (see
/// docs/conntrack.md): `New` and `Update` carry both tuples, status,
/// timeout and mark, and the TCP info only when it changed (otherwise
/// `entry.tcp` is `None`); `Destroy` carries both tuples, status, mark, the
/// TCP state (without window scales and flags), the counters when
/// accounting is on, and `timeout_s = 0`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    New(Record),
    Update(Record),
    Destroy(Record),
    /// The kernel dropped events because the socket's receive buffer was
    /// full (ENOBUFS): what was lost is unknown, so the listener must resync
    /// by dumping the table. The stream keeps working afterwards.
    Overrun,
}
