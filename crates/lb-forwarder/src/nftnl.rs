//! Reading Tandem's counter objects straight from nf_tables over netlink
//! (NETLINK_NETFILTER, subsystem NFNL_SUBSYS_NFTABLES): one dump request,
//! no `nft` process. Metrics scrapes, rates and `farm stats` read counters
//! often; spawning `nft -j list counters` each time cost a process per
//! read.
//!
//! The codec is pure ([`dump_request`], [`parse_dump`]); [`read_counters`]
//! is the thin socket around it. Message layout (linux/netfilter/nf_tables.h,
//! linux/netfilter/nfnetlink.h): a netlink header, a 4-byte `nfgenmsg`
//! (family, version, resource id), then attributes. A counter object is
//! NFT_MSG_NEWOBJ with NFTA_OBJ_TABLE, NFTA_OBJ_NAME, NFTA_OBJ_TYPE
//! (NFT_OBJECT_COUNTER) and NFTA_OBJ_DATA nesting NFTA_COUNTER_BYTES and
//! NFTA_COUNTER_PACKETS, numbers in network byte order.

use std::collections::HashMap;
use std::io;

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};

use crate::ruleset::{Count, DSR_TABLE, TABLE};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWOBJ: u16 = 18;
const NFT_MSG_GETOBJ: u16 = 19;
const NFTA_OBJ_TABLE: u16 = 1;
const NFTA_OBJ_NAME: u16 = 2;
const NFTA_OBJ_TYPE: u16 = 3;
const NFTA_OBJ_DATA: u16 = 4;
const NFT_OBJECT_COUNTER: u32 = 1;
const NFTA_COUNTER_BYTES: u16 = 1;
const NFTA_COUNTER_PACKETS: u16 = 2;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
/// The dump was interrupted by a ruleset change: read again.
const NLM_F_DUMP_INTR: u16 = 0x10;
/// Attribute type bits that are flags, not the type.
const NLA_TYPE_MASK: u16 = 0x3fff;

#[derive(Debug, thiserror::Error)]
pub enum NftnlError {
    #[error("netlink socket: {0}")]
    Io(#[from] io::Error),
    #[error("nf_tables refused the counter dump: errno {0}")]
    Refused(i32),
    #[error("malformed nf_tables message: {0}")]
    Malformed(&'static str),
    #[error("the ruleset kept changing during the counter dump")]
    Interrupted,
}

/// One parsed counter object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterObject {
    pub table: String,
    pub name: String,
    pub count: Count,
}

/// What one received datagram said.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DumpPart {
    pub counters: Vec<CounterObject>,
    /// NLMSG_DONE was seen: the dump is complete.
    pub done: bool,
    /// The kernel marked the dump interrupted.
    pub interrupted: bool,
}

/// The request: dump every counter object of every family and table.
pub fn dump_request(seq: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(32);
    let ty = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETOBJ;
    b.extend_from_slice(&0u32.to_ne_bytes()); // length, set below
    b.extend_from_slice(&ty.to_ne_bytes());
    b.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    b.extend_from_slice(&seq.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    // nfgenmsg: NFPROTO_UNSPEC (every family), NFNETLINK_V0, resource 0.
    b.extend_from_slice(&[0, 0, 0, 0]);
    // NFTA_OBJ_TYPE = counter: the kernel filters the dump by type.
    b.extend_from_slice(&8u16.to_ne_bytes());
    b.extend_from_slice(&NFTA_OBJ_TYPE.to_ne_bytes());
    b.extend_from_slice(&NFT_OBJECT_COUNTER.to_be_bytes());
    let len = u32::try_from(b.len()).unwrap_or(u32::MAX);
    b[..4].copy_from_slice(&len.to_ne_bytes());
    b
}

fn u16_at(b: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(i..i + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], i: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(i..i + 4)?.try_into().ok()?))
}

/// Attributes of a buffer: (type without flags, payload).
fn attributes(mut b: &[u8]) -> Result<Vec<(u16, &[u8])>, NftnlError> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = usize::from(u16_at(b, 0).ok_or(NftnlError::Malformed("attribute header"))?);
        let ty = u16_at(b, 2).ok_or(NftnlError::Malformed("attribute header"))? & NLA_TYPE_MASK;
        if len < 4 || len > b.len() {
            return Err(NftnlError::Malformed("attribute length"));
        }
        out.push((ty, &b[4..len]));
        let step = (len + 3) & !3;
        b = b.get(step..).unwrap_or_default();
    }
    Ok(out)
}

fn string(p: &[u8]) -> String {
    let end = p.iter().position(|c| *c == 0).unwrap_or(p.len());
    String::from_utf8_lossy(&p[..end]).into_owned()
}

fn be_u64(p: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(p.get(..8)?.try_into().ok()?))
}

/// Parses one received datagram of the dump (one or more messages).
pub fn parse_dump(mut data: &[u8]) -> Result<DumpPart, NftnlError> {
    let mut part = DumpPart::default();
    while data.len() >= 16 {
        let len = u32_at(data, 0).ok_or(NftnlError::Malformed("message header"))? as usize;
        let ty = u16_at(data, 4).ok_or(NftnlError::Malformed("message header"))?;
        let flags = u16_at(data, 6).ok_or(NftnlError::Malformed("message header"))?;
        if len < 16 || len > data.len() {
            return Err(NftnlError::Malformed("message length"));
        }
        let body = &data[16..len];
        if flags & NLM_F_DUMP_INTR != 0 {
            part.interrupted = true;
        }
        match ty {
            NLMSG_DONE => part.done = true,
            NLMSG_ERROR => {
                let code = i32::from_ne_bytes(
                    body.get(..4)
                        .and_then(|c| c.try_into().ok())
                        .ok_or(NftnlError::Malformed("error message"))?,
                );
                if code != 0 {
                    return Err(NftnlError::Refused(-code));
                }
            }
            t if t == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWOBJ => {
                // Skip the 4-byte nfgenmsg.
                let attrs = attributes(body.get(4..).unwrap_or_default())?;
                let mut table = None;
                let mut name = None;
                let mut kind = None;
                let mut count = None;
                for (a, p) in attrs {
                    match a {
                        NFTA_OBJ_TABLE => table = Some(string(p)),
                        NFTA_OBJ_NAME => name = Some(string(p)),
                        NFTA_OBJ_TYPE => {
                            kind = p
                                .get(..4)
                                .and_then(|x| x.try_into().ok())
                                .map(u32::from_be_bytes);
                        }
                        NFTA_OBJ_DATA => {
                            let mut c = Count::default();
                            for (k, v) in attributes(p)? {
                                match k {
                                    NFTA_COUNTER_BYTES => c.bytes = be_u64(v).unwrap_or(0),
                                    NFTA_COUNTER_PACKETS => c.packets = be_u64(v).unwrap_or(0),
                                    _ => {}
                                }
                            }
                            count = Some(c);
                        }
                        _ => {}
                    }
                }
                if let (Some(table), Some(name), Some(NFT_OBJECT_COUNTER), Some(count)) =
                    (table, name, kind, count)
                {
                    part.counters.push(CounterObject { table, name, count });
                }
            }
            _ => {}
        }
        let step = (len + 3) & !3;
        data = data.get(step..).unwrap_or_default();
    }
    Ok(part)
}

/// The counter objects of Tandem's tables, by name; empty when the tables
/// are absent. Blocking (answered at once by the kernel): call it from a
/// blocking thread. Reads in the network namespace of the calling thread.
pub fn read_counters() -> Result<HashMap<String, Count>, NftnlError> {
    let mut socket = Socket::new(NETLINK_NETFILTER)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut buf = vec![0u8; 256 << 10];
    // A ruleset applied during the dump interrupts it: read again.
    for seq in 1..=5u32 {
        socket.send(&dump_request(seq), 0)?;
        let mut counters = HashMap::new();
        let mut interrupted = false;
        loop {
            let n = match socket.recv(&mut &mut buf[..], 0) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            let part = parse_dump(&buf[..n])?;
            interrupted |= part.interrupted;
            for c in part.counters {
                if c.table == TABLE || c.table == DSR_TABLE {
                    counters.insert(c.name, c.count);
                }
            }
            if part.done {
                break;
            }
        }
        if !interrupted {
            return Ok(counters);
        }
    }
    Err(NftnlError::Interrupted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_asks_for_a_dump_of_counter_objects() {
        let r = dump_request(7);
        assert_eq!(r.len(), 28);
        assert_eq!(u32_at(&r, 0), Some(28));
        assert_eq!(
            u16_at(&r, 4),
            Some(0x0a13),
            "NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETOBJ"
        );
        assert_eq!(u16_at(&r, 6), Some(0x0301), "NLM_F_REQUEST | NLM_F_DUMP");
        assert_eq!(u32_at(&r, 8), Some(7));
        assert_eq!(&r[16..20], &[0, 0, 0, 0]);
        assert_eq!(
            &r[20..24],
            &[8, 0, 3, 0],
            "an 8-byte NFTA_OBJ_TYPE attribute"
        );
        assert_eq!(&r[24..28], &[0, 0, 0, 1], "NFT_OBJECT_COUNTER, big-endian");
    }
}
