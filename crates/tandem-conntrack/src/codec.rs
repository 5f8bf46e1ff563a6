//! Entries to ctnetlink attributes and back through netlink-packet-netfilter's
//! typed model: the reference implementation that the raw codec (raw.rs,
//! used at run time) is checked against byte for byte. Pure: no sockets, so
//! every attribute layout is unit-tested byte by byte.
//!
//! The typed attributes of netlink-packet-netfilter 0.4 cover the tuples,
//! status, timeout, mark and TCP protocol info. Everything else Tandem needs
//! is built or read here as raw nested attributes (`DefaultNla`): CTA_NAT_SRC
//! and CTA_NAT_DST (the only way the kernel sets up NAT on an entry created
//! over netlink), CTA_ZONE, CTA_ID, CTA_COUNTERS_* and the ICMP tuple parts.

use std::net::IpAddr;

use netlink_packet_core::{DefaultNla, Emitable, NLA_F_NESTED, Nla, NlaBuffer, NlasIterator};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, IPTuple, ProtoInfo, ProtoInfoTCP, ProtoTuple, Protocol, Status, TCPFlags,
    Tuple as NlTuple,
};

use crate::entry::{Counters, Entry, Record, TcpInfo, Tuple, proto, status, tcp};
use crate::raw::{CreateOptions, DecodeError};

// enum ctattr_type
const CTA_NAT_SRC: u16 = 6;
const CTA_COUNTERS_ORIG: u16 = 9;
const CTA_COUNTERS_REPLY: u16 = 10;
const CTA_ID: u16 = 12;
const CTA_NAT_DST: u16 = 13;
const CTA_ZONE: u16 = 18;
// enum ctattr_protonat / ctattr_nat
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
// enum ctattr_l4proto (ICMP parts of a tuple)
const CTA_PROTO_ICMP_ID: u16 = 4;
const CTA_PROTO_ICMP_TYPE: u16 = 5;
const CTA_PROTO_ICMP_CODE: u16 = 6;
const CTA_PROTO_ICMPV6_ID: u16 = 7;
const CTA_PROTO_ICMPV6_TYPE: u16 = 8;
const CTA_PROTO_ICMPV6_CODE: u16 = 9;

/// Status bits the kernel refuses to see change with EBUSY
/// (nf_ct_change_status_common): an entry created over netlink is already
/// CONFIRMED when its status is applied, and is never EXPECTED or DYING.
const STATUS_FORCED_ON: u32 = status::CONFIRMED;
const STATUS_FORCED_OFF: u32 = status::EXPECTED | status::DYING;

pub(crate) fn tuple_attrs(t: &Tuple) -> Vec<NlTuple> {
    let ip = NlTuple::Ip(vec![
        IPTuple::SourceAddress(t.src),
        IPTuple::DestinationAddress(t.dst),
    ]);
    let mut l4 = vec![ProtoTuple::Protocol(Protocol::from(t.protocol))];
    if t.has_ports() || t.protocol == proto::GRE {
        l4.push(ProtoTuple::SourcePort(t.src_port));
        l4.push(ProtoTuple::DestinationPort(t.dst_port));
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
        l4.push(ProtoTuple::Other(DefaultNla::new(
            id,
            t.src_port.to_be_bytes().to_vec(),
        )));
        l4.push(ProtoTuple::Other(DefaultNla::new(ty, vec![t.icmp_type()])));
        l4.push(ProtoTuple::Other(DefaultNla::new(
            code,
            vec![(t.dst_port & 0xff) as u8],
        )));
    }
    vec![ip, NlTuple::Proto(l4)]
}

fn nest_value(children: &[DefaultNla]) -> Vec<u8> {
    let mut value = vec![0; children.buffer_len()];
    children.emit(&mut value);
    value
}

fn nested(kind: u16, children: &[DefaultNla]) -> DefaultNla {
    DefaultNla::new(kind | NLA_F_NESTED, nest_value(children))
}

/// CTA_NAT_SRC / CTA_NAT_DST for one rewritten endpoint, as
/// nfnetlink_parse_nat expects: a single-address range and, for protocols
/// with ports, a single-port range (pinning the port: without it the kernel
/// may pick another one when the original is in use).
fn nat_attr(kind: u16, addr: IpAddr, port: Option<u16>) -> ConntrackAttribute {
    let mut children = match addr {
        IpAddr::V4(a) => vec![
            DefaultNla::new(CTA_NAT_V4_MINIP, a.octets().to_vec()),
            DefaultNla::new(CTA_NAT_V4_MAXIP, a.octets().to_vec()),
        ],
        IpAddr::V6(a) => vec![
            DefaultNla::new(CTA_NAT_V6_MINIP, a.octets().to_vec()),
            DefaultNla::new(CTA_NAT_V6_MAXIP, a.octets().to_vec()),
        ],
    };
    if let Some(port) = port {
        children.push(nested(
            CTA_NAT_PROTO,
            &[
                DefaultNla::new(CTA_PROTONAT_PORT_MIN, port.to_be_bytes().to_vec()),
                DefaultNla::new(CTA_PROTONAT_PORT_MAX, port.to_be_bytes().to_vec()),
            ],
        ));
    }
    ConntrackAttribute::Other(nested(kind, &children))
}

fn zone_attr(zone: u16) -> Option<ConntrackAttribute> {
    (zone != 0)
        .then(|| ConntrackAttribute::Other(DefaultNla::new(CTA_ZONE, zone.to_be_bytes().to_vec())))
}

fn tcp_flags(flags: u8) -> TCPFlags {
    // The mask is the set of bits to change: only set bits, never clear one
    // (a later update must not undo the be-liberal flag set at creation).
    // `TCPFlags` is non-exhaustive, so it is built by parsing its two bytes.
    match TCPFlags::parse(&[flags, flags]) {
        Ok(f) => f,
        Err(_) => unreachable!("two bytes are a complete nf_ct_tcp_flags"),
    }
}

fn protoinfo_attr(info: &TcpInfo) -> ConntrackAttribute {
    ConntrackAttribute::CtaProtoInfo(vec![ProtoInfo::TCP(vec![
        ProtoInfoTCP::State(info.state),
        ProtoInfoTCP::OriginalWindowScale(info.wscale_original),
        ProtoInfoTCP::ReplyWindowScale(info.wscale_reply),
        ProtoInfoTCP::OriginalFlags(tcp_flags(info.flags_original)),
        ProtoInfoTCP::ReplyFlags(tcp_flags(info.flags_reply)),
    ])])
}

fn status_to_send(s: u32) -> ConntrackAttribute {
    ConntrackAttribute::CtaStatus(Status::from_bits_retain(
        (s | STATUS_FORCED_ON) & !STATUS_FORCED_OFF,
    ))
}

/// The attributes of a create request (IPCTNL_MSG_CT_NEW with
/// NLM_F_CREATE|NLM_F_EXCL).
///
/// The reply tuple sent is the inverted original, and NAT is expressed as
/// CTA_NAT_DST / CTA_NAT_SRC ranges: the kernel (ctnetlink_setup_nat ->
/// nf_nat_setup_info) then computes the NATed reply tuple itself and sets
/// IPS_SRC_NAT / IPS_DST_NAT, the bits its NAT hooks test before rewriting
/// a packet. Sending the NATed reply tuple without them would give an entry
/// that matches replies but never rewrites them. conntrackd does the same.
pub fn create_attrs(entry: &Entry, opts: CreateOptions) -> Vec<ConntrackAttribute> {
    let o = &entry.original;
    let mut attrs = vec![
        ConntrackAttribute::CtaTupleOrig(tuple_attrs(o)),
        ConntrackAttribute::CtaTupleReply(tuple_attrs(&o.inverted())),
    ];
    attrs.extend(zone_attr(entry.zone));
    let ports = o.has_ports();
    if let Some((addr, port)) = entry.dnat_target() {
        attrs.push(nat_attr(CTA_NAT_DST, addr, ports.then_some(port)));
    }
    if let Some((addr, port)) = entry.snat_source() {
        attrs.push(nat_attr(CTA_NAT_SRC, addr, ports.then_some(port)));
    }
    attrs.push(ConntrackAttribute::CtaTimeout(entry.timeout_s));
    attrs.push(status_to_send(entry.status));
    attrs.push(ConntrackAttribute::CtaMark(entry.mark));
    if let Some(mut info) = entry.tcp.filter(|_| o.protocol == proto::TCP) {
        if opts.be_liberal {
            info.flags_original |= tcp::FLAG_BE_LIBERAL;
            info.flags_reply |= tcp::FLAG_BE_LIBERAL;
        }
        attrs.push(protoinfo_attr(&info));
    }
    attrs
}

/// The attributes of an update of an existing entry (IPCTNL_MSG_CT_NEW
/// without NLM_F_CREATE): timeout, status, mark and TCP info. The kernel
/// refuses NAT attributes on an existing entry (EOPNOTSUPP), and status
/// bits SEEN_REPLY and ASSURED can only be set, never cleared.
pub fn update_attrs(entry: &Entry) -> Vec<ConntrackAttribute> {
    let mut attrs = vec![ConntrackAttribute::CtaTupleOrig(tuple_attrs(
        &entry.original,
    ))];
    attrs.extend(zone_attr(entry.zone));
    attrs.push(ConntrackAttribute::CtaTimeout(entry.timeout_s));
    attrs.push(status_to_send(entry.status));
    attrs.push(ConntrackAttribute::CtaMark(entry.mark));
    if let Some(info) = entry.tcp.filter(|_| entry.original.protocol == proto::TCP) {
        attrs.push(protoinfo_attr(&info));
    }
    attrs
}

/// The attributes naming one entry, for get and delete.
pub fn key_attrs(tuple: &Tuple, zone: u16) -> Vec<ConntrackAttribute> {
    let mut attrs = vec![ConntrackAttribute::CtaTupleOrig(tuple_attrs(tuple))];
    attrs.extend(zone_attr(zone));
    attrs
}

fn decode_tuple(parts: &[NlTuple], what: &'static str) -> Result<Tuple, DecodeError> {
    let (mut src, mut dst, mut protocol) = (None, None, None);
    let (mut src_port, mut dst_port) = (0u16, 0u16);
    let (mut icmp_type, mut icmp_code) = (0u8, 0u8);
    for part in parts {
        match part {
            NlTuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => src = Some(*a),
                        IPTuple::DestinationAddress(a) => dst = Some(*a),
                        _ => {}
                    }
                }
            }
            NlTuple::Proto(l4) => {
                for p in l4 {
                    match p {
                        ProtoTuple::Protocol(n) => protocol = Some(u8::from(*n)),
                        ProtoTuple::SourcePort(p) => src_port = *p,
                        ProtoTuple::DestinationPort(p) => dst_port = *p,
                        ProtoTuple::Other(nla) => {
                            let mut value = vec![0; nla.value_len()];
                            nla.emit_value(&mut value);
                            match nla.kind() {
                                CTA_PROTO_ICMP_ID | CTA_PROTO_ICMPV6_ID => {
                                    src_port = be_u16(&value, "CTA_PROTO_ICMP_ID")?
                                }
                                CTA_PROTO_ICMP_TYPE | CTA_PROTO_ICMPV6_TYPE => {
                                    icmp_type = be_u8(&value, "CTA_PROTO_ICMP_TYPE")?
                                }
                                CTA_PROTO_ICMP_CODE | CTA_PROTO_ICMPV6_CODE => {
                                    icmp_code = be_u8(&value, "CTA_PROTO_ICMP_CODE")?
                                }
                                _ => {}
                            }
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

fn be_u8(v: &[u8], what: &'static str) -> Result<u8, DecodeError> {
    match v {
        [b] => Ok(*b),
        _ => Err(DecodeError::Length { what, len: v.len() }),
    }
}

fn be_u16(v: &[u8], what: &'static str) -> Result<u16, DecodeError> {
    <[u8; 2]>::try_from(v)
        .map(u16::from_be_bytes)
        .map_err(|_| DecodeError::Length { what, len: v.len() })
}

fn be_u32(v: &[u8], what: &'static str) -> Result<u32, DecodeError> {
    <[u8; 4]>::try_from(v)
        .map(u32::from_be_bytes)
        .map_err(|_| DecodeError::Length { what, len: v.len() })
}

fn be_u64(v: &[u8], what: &'static str) -> Result<u64, DecodeError> {
    <[u8; 8]>::try_from(v)
        .map(u64::from_be_bytes)
        .map_err(|_| DecodeError::Length { what, len: v.len() })
}

/// (packets, bytes) from a CTA_COUNTERS_* nest.
fn decode_counters(value: &[u8]) -> Result<(u64, u64), DecodeError> {
    let (mut packets, mut bytes) = (0, 0);
    for nla in NlasIterator::new(value) {
        let nla: NlaBuffer<&[u8]> = nla.map_err(|e| DecodeError::Netlink(e.to_string()))?;
        let v = nla.value();
        match nla.kind() {
            CTA_COUNTERS_PACKETS => packets = be_u64(v, "CTA_COUNTERS_PACKETS")?,
            CTA_COUNTERS_BYTES => bytes = be_u64(v, "CTA_COUNTERS_BYTES")?,
            CTA_COUNTERS32_PACKETS => packets = u64::from(be_u32(v, "CTA_COUNTERS32_PACKETS")?),
            CTA_COUNTERS32_BYTES => bytes = u64::from(be_u32(v, "CTA_COUNTERS32_BYTES")?),
            _ => {}
        }
    }
    Ok((packets, bytes))
}

/// An entry as reported by the kernel (dump, get reply or event).
pub fn decode_record(attrs: &[ConntrackAttribute]) -> Result<Record, DecodeError> {
    let (mut original, mut reply) = (None, None);
    let (mut status, mut timeout_s, mut mark, mut zone, mut id) = (0, 0, 0, 0, 0);
    let mut tcp_info: Option<TcpInfo> = None;
    let (mut counters_orig, mut counters_reply) = (None, None);
    for attr in attrs {
        match attr {
            ConntrackAttribute::CtaTupleOrig(t) => {
                original = Some(decode_tuple(t, "CTA_TUPLE_ORIG")?)
            }
            ConntrackAttribute::CtaTupleReply(t) => {
                reply = Some(decode_tuple(t, "CTA_TUPLE_REPLY")?)
            }
            ConntrackAttribute::CtaStatus(s) => status = s.bits(),
            ConntrackAttribute::CtaTimeout(t) => timeout_s = *t,
            ConntrackAttribute::CtaMark(m) => mark = *m,
            ConntrackAttribute::CtaProtoInfo(infos) => {
                for info in infos {
                    if let ProtoInfo::TCP(fields) = info {
                        let t = tcp_info.get_or_insert(TcpInfo {
                            state: 0,
                            wscale_original: 0,
                            wscale_reply: 0,
                            flags_original: 0,
                            flags_reply: 0,
                        });
                        for field in fields {
                            match field {
                                ProtoInfoTCP::State(s) => t.state = *s,
                                ProtoInfoTCP::OriginalWindowScale(w) => t.wscale_original = *w,
                                ProtoInfoTCP::ReplyWindowScale(w) => t.wscale_reply = *w,
                                ProtoInfoTCP::OriginalFlags(f) => t.flags_original = f.flags,
                                ProtoInfoTCP::ReplyFlags(f) => t.flags_reply = f.flags,
                                _ => {}
                            }
                        }
                    }
                }
            }
            ConntrackAttribute::Other(nla) => {
                let mut value = vec![0; nla.value_len()];
                nla.emit_value(&mut value);
                match nla.kind() & !NLA_F_NESTED {
                    CTA_ID => id = be_u32(&value, "CTA_ID")?,
                    CTA_ZONE => zone = be_u16(&value, "CTA_ZONE")?,
                    CTA_COUNTERS_ORIG => counters_orig = Some(decode_counters(&value)?),
                    CTA_COUNTERS_REPLY => counters_reply = Some(decode_counters(&value)?),
                    _ => {}
                }
            }
            _ => {}
        }
    }
    let counters = Counters::from_directions(counters_orig, counters_reply);
    Ok(Record {
        entry: Entry {
            original: original.ok_or(DecodeError::Missing("CTA_TUPLE_ORIG"))?,
            reply: reply.ok_or(DecodeError::Missing("CTA_TUPLE_REPLY"))?,
            status,
            timeout_s,
            mark,
            zone,
            tcp: tcp_info,
        },
        id,
        counters,
        portid: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn emit(attrs: &[ConntrackAttribute]) -> Vec<u8> {
        let mut buf = vec![0; attrs.buffer_len()];
        attrs.emit(&mut buf);
        buf
    }

    fn find(buf: &[u8], kind: u16) -> Option<Vec<u8>> {
        NlasIterator::new(buf)
            .map(|n| n.expect("nla"))
            .find(|n| n.kind() == kind)
            .map(|n| n.value().to_vec())
    }

    fn nat_entry() -> Entry {
        Entry {
            original: Tuple {
                src: "10.0.0.50".parse().unwrap(),
                dst: "10.0.0.100".parse().unwrap(),
                protocol: proto::TCP,
                src_port: 40000,
                dst_port: 80,
            },
            reply: Tuple {
                src: "10.1.0.11".parse().unwrap(),
                dst: "10.1.0.100".parse().unwrap(),
                protocol: proto::TCP,
                src_port: 8080,
                dst_port: 40000,
            },
            status: status::CONFIRMED
                | status::SEEN_REPLY
                | status::ASSURED
                | status::NAT_MASK
                | status::NAT_DONE_MASK,
            timeout_s: 300,
            mark: 7,
            zone: 0,
            tcp: Some(TcpInfo {
                state: tcp::ESTABLISHED,
                wscale_original: 7,
                wscale_reply: 7,
                flags_original: 0x03,
                flags_reply: 0x03,
            }),
        }
    }

    #[test]
    fn create_sends_the_inverted_original_as_reply_and_nat_as_ranges() {
        let buf = emit(&create_attrs(
            &nat_entry(),
            CreateOptions { be_liberal: true },
        ));
        // Reply tuple = inverted original: 10.0.0.100:80 -> 10.0.0.50:40000.
        let reply = find(&buf, 2).expect("CTA_TUPLE_REPLY");
        let ip = find(&reply, 1).expect("CTA_TUPLE_IP");
        assert_eq!(find(&ip, 1), Some(vec![10, 0, 0, 100]));
        assert_eq!(find(&ip, 2), Some(vec![10, 0, 0, 50]));
        let l4 = find(&reply, 2).expect("CTA_TUPLE_PROTO");
        assert_eq!(find(&l4, 1), Some(vec![6]));
        assert_eq!(find(&l4, 2), Some(80u16.to_be_bytes().to_vec()));
        assert_eq!(find(&l4, 3), Some(40000u16.to_be_bytes().to_vec()));
        // CTA_NAT_DST: 10.1.0.11, port 8080..8080. (Wrapped in
        // `ConntrackAttribute::Other`, the outer nest loses NLA_F_NESTED;
        // the kernel parses it with nla_parse_nested_deprecated, which does
        // not require the flag.)
        let dnat = find(&buf, CTA_NAT_DST).expect("CTA_NAT_DST");
        assert_eq!(
            dnat,
            vec![
                8, 0, 1, 0, 10, 1, 0, 11, // V4_MINIP
                8, 0, 2, 0, 10, 1, 0, 11, // V4_MAXIP
                20, 0, 3, 0x80, // PROTO (nested)
                6, 0, 1, 0, 0x1f, 0x90, 0, 0, // PORT_MIN 8080
                6, 0, 2, 0, 0x1f, 0x90, 0, 0, // PORT_MAX 8080
            ]
        );
        // CTA_NAT_SRC: 10.1.0.100, port pinned to the original 40000.
        let snat = find(&buf, CTA_NAT_SRC).expect("CTA_NAT_SRC");
        assert_eq!(&snat[..8], &[8, 0, 1, 0, 10, 1, 0, 100]);
        let pmin = find(&find(&snat, CTA_NAT_PROTO).unwrap(), 1).unwrap();
        assert_eq!(pmin, 40000u16.to_be_bytes().to_vec());
        // Status: CONFIRMED kept, NAT bits passed (the kernel ignores them).
        let st = u32::from_be_bytes(find(&buf, 3).unwrap().try_into().unwrap());
        assert_eq!(st & status::CONFIRMED, status::CONFIRMED);
        // Be-liberal in both directions, with the mask set.
        let info = find(&find(&buf, 4).unwrap(), 1).unwrap();
        assert_eq!(find(&info, 1), Some(vec![tcp::ESTABLISHED]));
        assert_eq!(find(&info, 4), Some(vec![0x0b, 0x0b]));
        assert_eq!(find(&info, 5), Some(vec![0x0b, 0x0b]));
        assert_eq!(find(&buf, 7), Some(300u32.to_be_bytes().to_vec()));
        assert_eq!(find(&buf, 8), Some(7u32.to_be_bytes().to_vec()));
    }

    #[test]
    fn an_entry_without_nat_sends_no_nat_attributes() {
        let mut e = nat_entry();
        e.reply = e.original.inverted();
        let buf = emit(&create_attrs(&e, CreateOptions::default()));
        assert_eq!(find(&buf, CTA_NAT_SRC), None);
        assert_eq!(find(&buf, CTA_NAT_DST), None);
        let info = find(&find(&buf, 4).unwrap(), 1).unwrap();
        assert_eq!(find(&info, 4), Some(vec![0x03, 0x03]));
    }

    #[test]
    fn only_snat_when_only_the_source_moved_ipv6() {
        let mut e = nat_entry();
        e.original.src = "fd00::50".parse().unwrap();
        e.original.dst = "fd00::100".parse().unwrap();
        e.reply = e.original.inverted();
        e.reply.dst = "fd01::100".parse().unwrap();
        assert_eq!(e.dnat_target(), None);
        let buf = emit(&create_attrs(&e, CreateOptions::default()));
        assert_eq!(find(&buf, CTA_NAT_DST), None);
        let snat = find(&buf, CTA_NAT_SRC).unwrap();
        let fd01: std::net::Ipv6Addr = "fd01::100".parse().unwrap();
        assert_eq!(find(&snat, CTA_NAT_V6_MINIP), Some(fd01.octets().to_vec()));
        assert_eq!(find(&snat, CTA_NAT_V6_MAXIP), Some(fd01.octets().to_vec()));
    }

    #[test]
    fn update_never_sends_nat_and_forces_confirmed() {
        let mut e = nat_entry();
        e.status = status::SEEN_REPLY | status::EXPECTED;
        let buf = emit(&update_attrs(&e));
        assert_eq!(find(&buf, CTA_NAT_SRC), None);
        assert_eq!(find(&buf, CTA_NAT_DST), None);
        assert_eq!(find(&buf, 2), None, "no reply tuple on update");
        let st = u32::from_be_bytes(find(&buf, 3).unwrap().try_into().unwrap());
        assert_eq!(st, status::SEEN_REPLY | status::CONFIRMED);
    }

    #[test]
    fn zone_is_sent_only_when_not_default() {
        let t = nat_entry().original;
        assert_eq!(find(&emit(&key_attrs(&t, 0)), CTA_ZONE), None);
        assert_eq!(find(&emit(&key_attrs(&t, 3)), CTA_ZONE), Some(vec![0, 3]));
    }

    /// What the kernel sends in a dump, reparsed through the crate's typed
    /// model, gives the entry back, with id, zone and counters.
    #[test]
    fn decode_reads_back_tuples_nat_id_and_counters() {
        let e = nat_entry();
        let counters = |kind: u16, p: u64, b: u64| {
            ConntrackAttribute::Other(nested(
                kind,
                &[
                    DefaultNla::new(CTA_COUNTERS_PACKETS, p.to_be_bytes().to_vec()),
                    DefaultNla::new(CTA_COUNTERS_BYTES, b.to_be_bytes().to_vec()),
                ],
            ))
        };
        let mut attrs = vec![
            ConntrackAttribute::CtaTupleOrig(tuple_attrs(&e.original)),
            ConntrackAttribute::CtaTupleReply(tuple_attrs(&e.reply)),
            ConntrackAttribute::CtaStatus(Status::from_bits_retain(e.status)),
            ConntrackAttribute::CtaTimeout(e.timeout_s),
            ConntrackAttribute::CtaMark(e.mark),
            protoinfo_attr(&e.tcp.unwrap()),
            ConntrackAttribute::Other(DefaultNla::new(
                CTA_ID,
                0xdead_beefu32.to_be_bytes().to_vec(),
            )),
        ];
        attrs.push(counters(CTA_COUNTERS_ORIG, 3, 180));
        attrs.push(counters(CTA_COUNTERS_REPLY, 2, 120));
        // Through bytes and the crate's parser, as a received message is.
        let buf = emit(&attrs);
        let parsed: Vec<ConntrackAttribute> = NlasIterator::new(&buf[..])
            .map(|n| {
                use netlink_packet_core::Parseable;
                ConntrackAttribute::parse(&n.unwrap()).unwrap()
            })
            .collect();
        let r = decode_record(&parsed).unwrap();
        assert_eq!(r.entry, e);
        assert_eq!(r.id, 0xdead_beef);
        assert_eq!(
            r.counters,
            Some(Counters {
                packets_original: 3,
                bytes_original: 180,
                packets_reply: 2,
                bytes_reply: 120
            })
        );
    }

    #[test]
    fn icmp_tuples_carry_id_type_and_code() {
        let t = Tuple {
            src: "10.0.0.1".parse().unwrap(),
            dst: "10.0.0.2".parse().unwrap(),
            protocol: proto::ICMP,
            src_port: 0x1234,
            dst_port: 8 << 8,
        };
        let inv = t.inverted();
        assert_eq!((inv.src_port, inv.icmp_type()), (0x1234, 0));
        let buf = emit(&[ConntrackAttribute::CtaTupleOrig(tuple_attrs(&t))]);
        let l4 = find(&find(&buf, 1).unwrap(), 2).unwrap();
        assert_eq!(find(&l4, CTA_PROTO_ICMP_ID), Some(vec![0x12, 0x34]));
        assert_eq!(find(&l4, CTA_PROTO_ICMP_TYPE), Some(vec![8]));
        assert_eq!(find(&l4, CTA_PROTO_ICMP_CODE), Some(vec![0]));
        let parsed = decode_tuple(&tuple_attrs(&t), "t").unwrap();
        assert_eq!(parsed, t);
    }

    #[test]
    fn a_record_without_tuples_is_an_error() {
        let err = decode_record(&[ConntrackAttribute::CtaMark(1)]).unwrap_err();
        assert_eq!(err, DecodeError::Missing("CTA_TUPLE_ORIG"));
        let short = [ConntrackAttribute::Other(DefaultNla::new(
            CTA_ID,
            vec![1, 2],
        ))];
        assert!(matches!(
            decode_record(&short),
            Err(DecodeError::Length {
                what: "CTA_ID",
                len: 2
            })
        ));
    }
}
