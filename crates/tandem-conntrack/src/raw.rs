//! ctnetlink messages read and written straight from and to bytes, for the
//! paths that run per entry: events, dumps, and batches of requests. The
//! typed model of netlink-packet-netfilter (in `codec`) allocates a vector
//! per nested attribute; at 100,000 events a second that is most of the
//! cost, and a dump of 100,000 entries held in that form takes hundreds of
//! megabytes. Here an entry is decoded in one pass over its attributes into
//! the crate's `Record`, and a request is written into one buffer.
//!
//! The bytes are the same as the typed path's (the tests compare them), so
//! everything documented in docs/conntrack.md about the attributes holds.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::entry::{Counters, Entry, Record, TcpInfo, Tuple, proto, status, tcp};

// Netlink.
const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(1 << 15 | 1 << 14);
// nfnetlink: subsystem ctnetlink (1) << 8 | message.
const IPCTNL_MSG_CT_NEW: u16 = 1 << 8;
const IPCTNL_MSG_CT_GET: u16 = 1 << 8 | 1;
const IPCTNL_MSG_CT_DELETE: u16 = 1 << 8 | 2;
const NFGENMSG_LEN: usize = 4;

// enum ctattr_type
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_PROTOINFO: u16 = 4;
const CTA_NAT_SRC: u16 = 6;
const CTA_TIMEOUT: u16 = 7;
const CTA_MARK: u16 = 8;
const CTA_COUNTERS_ORIG: u16 = 9;
const CTA_COUNTERS_REPLY: u16 = 10;
const CTA_ID: u16 = 12;
const CTA_NAT_DST: u16 = 13;
const CTA_ZONE: u16 = 18;
// enum ctattr_tuple, ctattr_ip, ctattr_l4proto
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTO_ICMP_ID: u16 = 4;
const CTA_PROTO_ICMP_TYPE: u16 = 5;
const CTA_PROTO_ICMP_CODE: u16 = 6;
const CTA_PROTO_ICMPV6_ID: u16 = 7;
const CTA_PROTO_ICMPV6_TYPE: u16 = 8;
const CTA_PROTO_ICMPV6_CODE: u16 = 9;
// enum ctattr_protoinfo, ctattr_protoinfo_tcp
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_STATE: u16 = 1;
const CTA_PROTOINFO_TCP_WSCALE_ORIGINAL: u16 = 2;
const CTA_PROTOINFO_TCP_WSCALE_REPLY: u16 = 3;
const CTA_PROTOINFO_TCP_FLAGS_ORIGINAL: u16 = 4;
const CTA_PROTOINFO_TCP_FLAGS_REPLY: u16 = 5;
// enum ctattr_nat, ctattr_protonat
const CTA_NAT_V4_MINIP: u16 = 1;
const CTA_NAT_V4_MAXIP: u16 = 2;
const CTA_NAT_PROTO: u16 = 3;
const CTA_NAT_V6_MINIP: u16 = 4;
const CTA_NAT_V6_MAXIP: u16 = 5;
const CTA_PROTONAT_PORT_MIN: u16 = 1;
const CTA_PROTONAT_PORT_MAX: u16 = 2;
// enum ctattr_counters
const CTA_COUNTERS_PACKETS: u16 = 1;
const CTA_COUNTERS_BYTES: u16 = 2;
const CTA_COUNTERS32_PACKETS: u16 = 3;
const CTA_COUNTERS32_BYTES: u16 = 4;

/// Status bits the kernel refuses to see change (see codec.rs).
const STATUS_FORCED_ON: u32 = status::CONFIRMED;
const STATUS_FORCED_OFF: u32 = status::EXPECTED | status::DYING;

/// How to create an entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CreateOptions {
    /// Sets IP_CT_TCP_FLAG_BE_LIBERAL in both directions of a TCP entry, so
    /// the kernel does not drop packets whose sequence numbers lie outside
    /// the window it never saw being negotiated.
    pub be_liberal: bool,
}

/// Why a ctnetlink message could not be read as an entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("no {0}")]
    Missing(&'static str),
    #[error("{what} has {len} bytes")]
    Length { what: &'static str, len: usize },
    #[error("{0}")]
    Netlink(String),
}

const fn align(n: usize) -> usize {
    (n + 3) & !3
}

// ---- reading ----

/// One netlink message of a received datagram.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Message<'a> {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    pub portid: u32,
    /// What follows the netlink header.
    pub payload: &'a [u8],
}

impl Message<'_> {
    pub fn is_error(&self) -> bool {
        self.kind == NLMSG_ERROR
    }

    pub fn is_done(&self) -> bool {
        self.kind == NLMSG_DONE
    }

    /// An entry message (new, or delete for destroy events) of ctnetlink.
    pub fn is_entry(&self) -> bool {
        matches!(self.kind, IPCTNL_MSG_CT_NEW | IPCTNL_MSG_CT_DELETE)
    }

    pub fn is_delete(&self) -> bool {
        self.kind == IPCTNL_MSG_CT_DELETE
    }

    /// NLMSG_ERROR: the error code (0: an acknowledgement).
    pub fn error_code(&self) -> Option<i32> {
        let b = self.payload.get(..4)?;
        Some(i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// The messages of one datagram, in order; stops at the first malformed.
pub(crate) fn messages(mut data: &[u8]) -> impl Iterator<Item = Result<Message<'_>, String>> {
    std::iter::from_fn(move || {
        if data.len() < NLMSG_HDRLEN {
            return None;
        }
        let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        if len < NLMSG_HDRLEN || len > data.len() {
            data = &[];
            return Some(Err(format!("netlink message length {len}")));
        }
        let m = Message {
            kind: u16::from_ne_bytes([data[4], data[5]]),
            flags: u16::from_ne_bytes([data[6], data[7]]),
            seq: u32::from_ne_bytes([data[8], data[9], data[10], data[11]]),
            portid: u32::from_ne_bytes([data[12], data[13], data[14], data[15]]),
            payload: &data[NLMSG_HDRLEN..len],
        };
        data = data.get(align(len)..).unwrap_or_default();
        Some(Ok(m))
    })
}

/// (kind without flags, value) of each attribute in `buf`.
fn attrs(buf: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8]), DecodeError>> {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at + 4 > buf.len() {
            return None;
        }
        let len = usize::from(u16::from_ne_bytes([buf[at], buf[at + 1]]));
        let kind = u16::from_ne_bytes([buf[at + 2], buf[at + 3]]) & NLA_TYPE_MASK;
        if len < 4 || at + len > buf.len() {
            at = buf.len();
            return Some(Err(DecodeError::Netlink(format!(
                "attribute {kind} of length {len} overruns its message"
            ))));
        }
        let value = &buf[at + 4..at + len];
        at += align(len);
        Some(Ok((kind, value)))
    })
}

fn be16(v: &[u8], what: &'static str) -> Result<u16, DecodeError> {
    <[u8; 2]>::try_from(v)
        .map(u16::from_be_bytes)
        .map_err(|_| DecodeError::Length { what, len: v.len() })
}

fn be32(v: &[u8], what: &'static str) -> Result<u32, DecodeError> {
    <[u8; 4]>::try_from(v)
        .map(u32::from_be_bytes)
        .map_err(|_| DecodeError::Length { what, len: v.len() })
}

fn be64(v: &[u8], what: &'static str) -> Result<u64, DecodeError> {
    <[u8; 8]>::try_from(v)
        .map(u64::from_be_bytes)
        .map_err(|_| DecodeError::Length { what, len: v.len() })
}

fn u8_of(v: &[u8], what: &'static str) -> Result<u8, DecodeError> {
    match v {
        [b] => Ok(*b),
        _ => Err(DecodeError::Length { what, len: v.len() }),
    }
}

fn addr(v: &[u8], what: &'static str) -> Result<IpAddr, DecodeError> {
    match v.len() {
        4 => Ok(IpAddr::V4(Ipv4Addr::new(v[0], v[1], v[2], v[3]))),
        16 => {
            let mut a = [0; 16];
            a.copy_from_slice(v);
            Ok(IpAddr::V6(Ipv6Addr::from(a)))
        }
        len => Err(DecodeError::Length { what, len }),
    }
}

fn tuple(buf: &[u8], what: &'static str) -> Result<Tuple, DecodeError> {
    let (mut src, mut dst, mut protocol) = (None, None, None);
    let (mut src_port, mut dst_port) = (0u16, 0u16);
    let (mut icmp_type, mut icmp_code) = (0u8, 0u8);
    for a in attrs(buf) {
        match a? {
            (CTA_TUPLE_IP, ip) => {
                for a in attrs(ip) {
                    match a? {
                        (CTA_IP_V4_SRC | CTA_IP_V6_SRC, v) => src = Some(addr(v, what)?),
                        (CTA_IP_V4_DST | CTA_IP_V6_DST, v) => dst = Some(addr(v, what)?),
                        _ => {}
                    }
                }
            }
            (CTA_TUPLE_PROTO, l4) => {
                for a in attrs(l4) {
                    match a? {
                        (CTA_PROTO_NUM, v) => protocol = Some(u8_of(v, "CTA_PROTO_NUM")?),
                        (CTA_PROTO_SRC_PORT, v) => src_port = be16(v, "CTA_PROTO_SRC_PORT")?,
                        (CTA_PROTO_DST_PORT, v) => dst_port = be16(v, "CTA_PROTO_DST_PORT")?,
                        (CTA_PROTO_ICMP_ID | CTA_PROTO_ICMPV6_ID, v) => {
                            src_port = be16(v, "CTA_PROTO_ICMP_ID")?
                        }
                        (CTA_PROTO_ICMP_TYPE | CTA_PROTO_ICMPV6_TYPE, v) => {
                            icmp_type = u8_of(v, "CTA_PROTO_ICMP_TYPE")?
                        }
                        (CTA_PROTO_ICMP_CODE | CTA_PROTO_ICMPV6_CODE, v) => {
                            icmp_code = u8_of(v, "CTA_PROTO_ICMP_CODE")?
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let protocol = protocol.ok_or(DecodeError::Missing(what))?;
    if protocol == proto::ICMP || protocol == proto::ICMPV6 {
        dst_port = (u16::from(icmp_type) << 8) | u16::from(icmp_code);
    }
    Ok(Tuple {
        src: src.ok_or(DecodeError::Missing(what))?,
        dst: dst.ok_or(DecodeError::Missing(what))?,
        protocol,
        src_port,
        dst_port,
    })
}

fn counters(buf: &[u8]) -> Result<(u64, u64), DecodeError> {
    let (mut packets, mut bytes) = (0, 0);
    for a in attrs(buf) {
        match a? {
            (CTA_COUNTERS_PACKETS, v) => packets = be64(v, "CTA_COUNTERS_PACKETS")?,
            (CTA_COUNTERS_BYTES, v) => bytes = be64(v, "CTA_COUNTERS_BYTES")?,
            (CTA_COUNTERS32_PACKETS, v) => packets = u64::from(be32(v, "CTA_COUNTERS32_PACKETS")?),
            (CTA_COUNTERS32_BYTES, v) => bytes = u64::from(be32(v, "CTA_COUNTERS32_BYTES")?),
            _ => {}
        }
    }
    Ok((packets, bytes))
}

fn tcp_info(buf: &[u8]) -> Result<Option<TcpInfo>, DecodeError> {
    let mut info: Option<TcpInfo> = None;
    for a in attrs(buf) {
        let (CTA_PROTOINFO_TCP, fields) = a? else {
            continue;
        };
        let t = info.get_or_insert(TcpInfo {
            state: 0,
            wscale_original: 0,
            wscale_reply: 0,
            flags_original: 0,
            flags_reply: 0,
        });
        for f in attrs(fields) {
            match f? {
                (CTA_PROTOINFO_TCP_STATE, v) => t.state = u8_of(v, "CTA_PROTOINFO_TCP_STATE")?,
                (CTA_PROTOINFO_TCP_WSCALE_ORIGINAL, v) => {
                    t.wscale_original = u8_of(v, "CTA_PROTOINFO_TCP_WSCALE_ORIGINAL")?
                }
                (CTA_PROTOINFO_TCP_WSCALE_REPLY, v) => {
                    t.wscale_reply = u8_of(v, "CTA_PROTOINFO_TCP_WSCALE_REPLY")?
                }
                // nf_ct_tcp_flags: (flags, mask).
                (CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, v) => {
                    t.flags_original = *v.first().ok_or(DecodeError::Length {
                        what: "CTA_PROTOINFO_TCP_FLAGS_ORIGINAL",
                        len: 0,
                    })?
                }
                (CTA_PROTOINFO_TCP_FLAGS_REPLY, v) => {
                    t.flags_reply = *v.first().ok_or(DecodeError::Length {
                        what: "CTA_PROTOINFO_TCP_FLAGS_REPLY",
                        len: 0,
                    })?
                }
                _ => {}
            }
        }
    }
    Ok(info)
}

/// The entry of a ctnetlink message (its payload: nfgenmsg, attributes).
pub(crate) fn decode_entry(payload: &[u8]) -> Result<Record, DecodeError> {
    let body = payload.get(NFGENMSG_LEN..).ok_or(DecodeError::Length {
        what: "nfgenmsg",
        len: payload.len(),
    })?;
    let (mut original, mut reply) = (None, None);
    let (mut status_bits, mut timeout_s, mut mark, mut zone, mut id) = (0, 0, 0, 0, 0);
    let mut tcp = None;
    let (mut c_orig, mut c_reply) = (None, None);
    for a in attrs(body) {
        match a? {
            (CTA_TUPLE_ORIG, v) => original = Some(tuple(v, "CTA_TUPLE_ORIG")?),
            (CTA_TUPLE_REPLY, v) => reply = Some(tuple(v, "CTA_TUPLE_REPLY")?),
            (CTA_STATUS, v) => status_bits = be32(v, "CTA_STATUS")?,
            (CTA_TIMEOUT, v) => timeout_s = be32(v, "CTA_TIMEOUT")?,
            (CTA_MARK, v) => mark = be32(v, "CTA_MARK")?,
            (CTA_PROTOINFO, v) => tcp = tcp_info(v)?,
            (CTA_ID, v) => id = be32(v, "CTA_ID")?,
            (CTA_ZONE, v) => zone = be16(v, "CTA_ZONE")?,
            (CTA_COUNTERS_ORIG, v) => c_orig = Some(counters(v)?),
            (CTA_COUNTERS_REPLY, v) => c_reply = Some(counters(v)?),
            _ => {}
        }
    }
    let counters = Counters::from_directions(c_orig, c_reply);
    Ok(Record {
        entry: Entry {
            original: original.ok_or(DecodeError::Missing("CTA_TUPLE_ORIG"))?,
            reply: reply.ok_or(DecodeError::Missing("CTA_TUPLE_REPLY"))?,
            status: status_bits,
            timeout_s,
            mark,
            zone,
            tcp,
        },
        id,
        counters,
        portid: 0,
    })
}

// ---- writing ----

/// A netlink message being written into a buffer.
pub(crate) struct Writer<'a> {
    buf: &'a mut Vec<u8>,
    start: usize,
}

impl Writer<'_> {
    fn attr(&mut self, kind: u16, value: &[u8]) {
        let len = 4 + value.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.buf.resize(self.buf.len() + align(len) - len, 0);
    }

    /// Starts a nested attribute; `end` closes it.
    fn begin(&mut self, kind: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&[0, 0]);
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        at
    }

    fn end(&mut self, at: usize) {
        let len = self.buf.len() - at;
        self.buf[at..at + 2].copy_from_slice(&(len as u16).to_ne_bytes());
    }

    fn tuple(&mut self, kind: u16, t: &Tuple) {
        let outer = self.begin(kind | NLA_F_NESTED);
        let ip = self.begin(CTA_TUPLE_IP | NLA_F_NESTED);
        match (t.src, t.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                self.attr(CTA_IP_V4_SRC, &s.octets());
                self.attr(CTA_IP_V4_DST, &d.octets());
            }
            (s, d) => {
                self.attr(CTA_IP_V6_SRC, &v6(s).octets());
                self.attr(CTA_IP_V6_DST, &v6(d).octets());
            }
        }
        self.end(ip);
        let l4 = self.begin(CTA_TUPLE_PROTO | NLA_F_NESTED);
        self.attr(CTA_PROTO_NUM, &[t.protocol]);
        if t.has_ports() || t.protocol == proto::GRE {
            self.attr(CTA_PROTO_SRC_PORT, &t.src_port.to_be_bytes());
            self.attr(CTA_PROTO_DST_PORT, &t.dst_port.to_be_bytes());
        } else if t.is_icmp() {
            let (id, ty, code) = if t.protocol == proto::ICMP {
                (CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMP_CODE)
            } else {
                (
                    CTA_PROTO_ICMPV6_ID,
                    CTA_PROTO_ICMPV6_TYPE,
                    CTA_PROTO_ICMPV6_CODE,
                )
            };
            self.attr(id, &t.src_port.to_be_bytes());
            self.attr(ty, &[t.icmp_type()]);
            self.attr(code, &[(t.dst_port & 0xff) as u8]);
        }
        self.end(l4);
        self.end(outer);
    }

    fn zone(&mut self, zone: u16) {
        if zone != 0 {
            self.attr(CTA_ZONE, &zone.to_be_bytes());
        }
    }

    fn nat(&mut self, kind: u16, a: IpAddr, port: Option<u16>) {
        // As the typed path writes it: the outer nest without NLA_F_NESTED
        // (the kernel parses CTA_NAT_* with nla_parse_nested_deprecated).
        let outer = self.begin(kind);
        match a {
            IpAddr::V4(a) => {
                self.attr(CTA_NAT_V4_MINIP, &a.octets());
                self.attr(CTA_NAT_V4_MAXIP, &a.octets());
            }
            IpAddr::V6(a) => {
                self.attr(CTA_NAT_V6_MINIP, &a.octets());
                self.attr(CTA_NAT_V6_MAXIP, &a.octets());
            }
        }
        if let Some(port) = port {
            let p = self.begin(CTA_NAT_PROTO | NLA_F_NESTED);
            self.attr(CTA_PROTONAT_PORT_MIN, &port.to_be_bytes());
            self.attr(CTA_PROTONAT_PORT_MAX, &port.to_be_bytes());
            self.end(p);
        }
        self.end(outer);
    }

    fn common(&mut self, e: &Entry, tcp_override: Option<TcpInfo>) {
        self.attr(CTA_TIMEOUT, &e.timeout_s.to_be_bytes());
        let st = (e.status | STATUS_FORCED_ON) & !STATUS_FORCED_OFF;
        self.attr(CTA_STATUS, &st.to_be_bytes());
        self.attr(CTA_MARK, &e.mark.to_be_bytes());
        if let Some(info) = tcp_override {
            let pi = self.begin(CTA_PROTOINFO | NLA_F_NESTED);
            let t = self.begin(CTA_PROTOINFO_TCP | NLA_F_NESTED);
            self.attr(CTA_PROTOINFO_TCP_STATE, &[info.state]);
            self.attr(CTA_PROTOINFO_TCP_WSCALE_ORIGINAL, &[info.wscale_original]);
            self.attr(CTA_PROTOINFO_TCP_WSCALE_REPLY, &[info.wscale_reply]);
            // (flags, mask): only set bits, never clear one.
            self.attr(
                CTA_PROTOINFO_TCP_FLAGS_ORIGINAL,
                &[info.flags_original, info.flags_original],
            );
            self.attr(
                CTA_PROTOINFO_TCP_FLAGS_REPLY,
                &[info.flags_reply, info.flags_reply],
            );
            self.end(t);
            self.end(pi);
        }
    }

    fn finish(self) {
        let len = (self.buf.len() - self.start) as u32;
        self.buf[self.start..self.start + 4].copy_from_slice(&len.to_ne_bytes());
    }
}

fn v6(a: IpAddr) -> Ipv6Addr {
    match a {
        IpAddr::V6(a) => a,
        IpAddr::V4(a) => a.to_ipv6_mapped(),
    }
}

fn family(t: &Tuple) -> u8 {
    if t.is_ipv6() {
        libc::AF_INET6 as u8
    } else {
        libc::AF_INET as u8
    }
}

fn begin_message<'a>(
    buf: &'a mut Vec<u8>,
    kind: u16,
    flags: u16,
    seq: u32,
    family: u8,
) -> Writer<'a> {
    let start = buf.len();
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: family, version 0, res_id 0.
    buf.extend_from_slice(&[family, 0, 0, 0]);
    Writer { buf, start }
}

/// A create request (see `codec::create_attrs` for what it says and why).
pub(crate) fn create(buf: &mut Vec<u8>, e: &Entry, opts: CreateOptions, flags: u16, seq: u32) {
    let o = &e.original;
    let mut w = begin_message(buf, IPCTNL_MSG_CT_NEW, flags, seq, family(o));
    w.tuple(CTA_TUPLE_ORIG, o);
    w.tuple(CTA_TUPLE_REPLY, &o.inverted());
    w.zone(e.zone);
    let ports = o.has_ports();
    if let Some((a, p)) = e.dnat_target() {
        w.nat(CTA_NAT_DST, a, ports.then_some(p));
    }
    if let Some((a, p)) = e.snat_source() {
        w.nat(CTA_NAT_SRC, a, ports.then_some(p));
    }
    let info = e.tcp.filter(|_| o.protocol == proto::TCP).map(|mut i| {
        if opts.be_liberal {
            i.flags_original |= tcp::FLAG_BE_LIBERAL;
            i.flags_reply |= tcp::FLAG_BE_LIBERAL;
        }
        i
    });
    w.common(e, info);
    w.finish();
}

/// An update request: timeout, status, mark and TCP info of an existing entry.
pub(crate) fn update(buf: &mut Vec<u8>, e: &Entry, flags: u16, seq: u32) {
    let mut w = begin_message(buf, IPCTNL_MSG_CT_NEW, flags, seq, family(&e.original));
    w.tuple(CTA_TUPLE_ORIG, &e.original);
    w.zone(e.zone);
    let info = e.tcp.filter(|_| e.original.protocol == proto::TCP);
    w.common(e, info);
    w.finish();
}

/// A dump request: every entry of every family (AF_UNSPEC).
pub(crate) fn dump(buf: &mut Vec<u8>, flags: u16, seq: u32) {
    begin_message(buf, IPCTNL_MSG_CT_GET, flags, seq, libc::AF_UNSPEC as u8).finish();
}

/// A get or delete request naming one entry.
pub(crate) fn key(buf: &mut Vec<u8>, delete: bool, t: &Tuple, zone: u16, flags: u16, seq: u32) {
    let kind = if delete {
        IPCTNL_MSG_CT_DELETE
    } else {
        IPCTNL_MSG_CT_GET
    };
    let mut w = begin_message(buf, kind, flags, seq, family(t));
    w.tuple(CTA_TUPLE_ORIG, t);
    w.zone(zone);
    w.finish();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;
    use crate::netlink;
    use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST};
    use netlink_packet_netfilter::conntrack::ConntrackMessage;

    fn entries() -> Vec<Entry> {
        let t = |src: &str, sp: u16, dst: &str, dp: u16, p: u8| Tuple {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            protocol: p,
            src_port: sp,
            dst_port: dp,
        };
        let nat = Entry {
            original: t("10.0.0.50", 40000, "10.0.0.100", 80, proto::TCP),
            reply: t("10.1.0.11", 8080, "10.1.0.100", 40000, proto::TCP),
            status: status::CONFIRMED | status::SEEN_REPLY | status::ASSURED | status::NAT_MASK,
            timeout_s: 300,
            mark: 7,
            zone: 0,
            tcp: Some(TcpInfo {
                state: tcp::ESTABLISHED,
                wscale_original: 7,
                wscale_reply: 9,
                flags_original: 0x03,
                flags_reply: 0x01,
            }),
        };
        let v6 = Entry {
            original: t("fd00::50", 5000, "fd00::100", 443, proto::TCP),
            reply: t("fd01::11", 8443, "fd01::100", 5000, proto::TCP),
            zone: 3,
            tcp: None,
            ..nat.clone()
        };
        let udp = Entry {
            original: t("10.0.0.51", 5353, "10.0.0.100", 53, proto::UDP),
            reply: t("10.0.0.100", 53, "10.0.0.51", 5353, proto::UDP),
            tcp: None,
            ..nat.clone()
        };
        let icmp = Entry {
            original: t("10.0.0.52", 0x1234, "10.0.0.100", 8 << 8, proto::ICMP),
            reply: t("10.0.0.100", 0x1234, "10.0.0.52", 0, proto::ICMP),
            tcp: None,
            ..nat.clone()
        };
        let icmp6 = Entry {
            original: t("fd00::52", 7, "fd00::100", 128 << 8, proto::ICMPV6),
            reply: t("fd00::100", 7, "fd00::52", 129 << 8, proto::ICMPV6),
            tcp: None,
            ..nat.clone()
        };
        vec![nat, v6, udp, icmp, icmp6]
    }

    const CREATE: u16 = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK;

    #[test]
    fn requests_are_byte_for_byte_those_of_the_typed_path() {
        for e in entries() {
            for be_liberal in [false, true] {
                let opts = CreateOptions { be_liberal };
                let typed = netlink::encode(
                    netlink::family_of(&e.original),
                    ConntrackMessage::New(codec::create_attrs(&e, opts)),
                    CREATE,
                    42,
                );
                let mut raw = Vec::new();
                create(&mut raw, &e, opts, CREATE, 42);
                assert_eq!(raw, typed, "create {e:?}");
            }
            let typed = netlink::encode(
                netlink::family_of(&e.original),
                ConntrackMessage::New(codec::update_attrs(&e)),
                NLM_F_REQUEST | NLM_F_ACK,
                7,
            );
            let mut raw = Vec::new();
            update(&mut raw, &e, NLM_F_REQUEST | NLM_F_ACK, 7);
            assert_eq!(raw, typed, "update {e:?}");
            for (delete, msg) in [
                (
                    true,
                    ConntrackMessage::Delete(codec::key_attrs(&e.original, e.zone)),
                ),
                (
                    false,
                    ConntrackMessage::Get(codec::key_attrs(&e.original, e.zone)),
                ),
            ] {
                let typed = netlink::encode(netlink::family_of(&e.original), msg, NLM_F_REQUEST, 9);
                let mut raw = Vec::new();
                key(&mut raw, delete, &e.original, e.zone, NLM_F_REQUEST, 9);
                assert_eq!(raw, typed, "key {e:?}");
            }
        }
    }

    /// An entry as the kernel reports it (both tuples as they are, counters,
    /// id), written by the typed path, read back by both decoders.
    #[test]
    fn entries_decode_the_same_as_with_the_typed_path() {
        use netlink_packet_core::{DefaultNla, Emitable, NLA_F_NESTED as NESTED};
        use netlink_packet_netfilter::conntrack::ConntrackAttribute;
        for e in entries() {
            let mut attrs = codec::update_attrs(&e);
            attrs.insert(
                1,
                ConntrackAttribute::CtaTupleReply(codec::tuple_attrs(&e.reply)),
            );
            let counters = |kind: u16, p: u64, b: u64| {
                let children = [
                    DefaultNla::new(CTA_COUNTERS_PACKETS, p.to_be_bytes().to_vec()),
                    DefaultNla::new(CTA_COUNTERS_BYTES, b.to_be_bytes().to_vec()),
                ];
                let mut v = vec![0; children.as_slice().buffer_len()];
                children.as_slice().emit(&mut v);
                ConntrackAttribute::Other(DefaultNla::new(kind | NESTED, v))
            };
            attrs.push(counters(CTA_COUNTERS_ORIG, 3, 180));
            attrs.push(counters(CTA_COUNTERS_REPLY, 2, 120));
            attrs.push(ConntrackAttribute::Other(DefaultNla::new(
                CTA_ID,
                0xfeed_beefu32.to_be_bytes().to_vec(),
            )));
            let bytes = netlink::encode(
                netlink::family_of(&e.original),
                ConntrackMessage::New(attrs),
                0,
                1,
            );
            let typed = netlink::decode(&bytes).unwrap();
            let netlink_packet_core::NetlinkPayload::InnerMessage(m) = &typed[0].payload else {
                panic!()
            };
            let netlink_packet_netfilter::NetfilterMessageInner::Conntrack(ConntrackMessage::New(
                parsed,
            )) = &m.inner
            else {
                panic!()
            };
            let want = codec::decode_record(parsed).unwrap();
            let msg = messages(&bytes).next().unwrap().unwrap();
            assert!(msg.is_entry());
            let got = decode_entry(msg.payload).unwrap();
            assert_eq!(got, want, "{e:?}");
            assert_eq!(got.id, 0xfeed_beef);
            // The status as sent (CONFIRMED forced on), the rest as given.
            assert_eq!(got.entry.reply, e.reply);
            assert_eq!(got.entry.tcp.map(|t| t.state), e.tcp.map(|t| t.state));
        }
    }

    #[test]
    fn truncated_and_overrunning_messages_are_errors_not_panics() {
        let e = &entries()[0];
        let mut bytes = Vec::new();
        create(&mut bytes, e, CreateOptions::default(), 0, 1);
        for cut in 0..bytes.len() {
            let mut b = bytes[..cut].to_vec();
            if b.len() >= 4 {
                b[..4].copy_from_slice(&(cut as u32).to_ne_bytes());
            }
            for m in messages(&b).flatten() {
                let _ = decode_entry(m.payload);
            }
        }
        // An attribute that claims more than its message holds.
        let mut b = bytes.clone();
        b[NLMSG_HDRLEN + NFGENMSG_LEN] = 0xff;
        let m = messages(&b).next().unwrap().unwrap();
        assert!(decode_entry(m.payload).is_err());
    }
}
