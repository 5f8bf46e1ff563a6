//! The conntrack sync wire format, version 2, and nothing else: one UDP
//! datagram on the cluster link = a 40-byte header, a payload, and a 16-byte
//! HMAC-SHA256 tag. No sockets, no state. The layout is documented, with the
//! reasons for it, in `docs/conntrack-sync-protocol.md`.
//!
//! ```text
//!  0      2   3    4     5      6        8              16            24             32           40
//!  | magic | v | type | flags | rsvd | payload len | sender epoch | sequence | ack epoch | ack next | payload… | tag (16) |
//! ```
//!
//! All integers are big-endian.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ring::hmac;
use tandem_conntrack::{Entry, TcpInfo, Tuple};

/// "TC": Tandem Conntrack.
pub const MAGIC: [u8; 2] = *b"TC";
pub const VERSION: u8 = 2;
pub const HEADER_LEN: usize = 40;
/// HMAC-SHA256 truncated to 128 bits (as RFC 4868 does for IPsec): forging
/// one datagram still takes 2^128 work, and it saves 16 bytes per datagram.
pub const TAG_LEN: usize = 16;
/// What a datagram costs beyond its payload.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;
/// The default datagram size: fits a 1500-byte MTU under IPv6 + UDP headers
/// (48 bytes) with room for a VLAN tag or a tunnel, so nothing is fragmented.
pub const DEFAULT_MAX_DATAGRAM: usize = 1400;
/// Shortest key accepted: 128 bits, the strength of the truncated tag.
pub const MIN_KEY_LEN: usize = 16;

/// Flag bit: the ack fields (ack epoch, ack next) are valid.
pub const FLAG_ACK: u8 = 0x01;
/// BulkBegin flag bit: the bulk is the sender's whole table of farm flows,
/// so the receiver may delete what the bulk lacks.
pub const BULK_COMPLETE: u8 = 0x01;

const TYPE_DATA: u8 = 1;
const TYPE_ACK: u8 = 2;
const TYPE_ALIVE: u8 = 3;
const TYPE_RESYNC_REQUEST: u8 = 4;
const TYPE_BULK_BEGIN: u8 = 5;
const TYPE_BULK_END: u8 = 6;

const KIND_NEW: u8 = 1;
const KIND_UPDATE: u8 = 2;
const KIND_DESTROY: u8 = 3;

// Record layout bits: which addresses are IPv6, and whether TCP state follows.
const L_ORIG_SRC_V6: u8 = 0x01;
const L_ORIG_DST_V6: u8 = 0x02;
const L_REPLY_SRC_V6: u8 = 0x04;
const L_REPLY_DST_V6: u8 = 0x08;
const L_TCP: u8 = 0x10;
const L_TUPLE_BITS: u8 = L_ORIG_SRC_V6 | L_ORIG_DST_V6;
const L_ENTRY_BITS: u8 = L_TUPLE_BITS | L_REPLY_SRC_V6 | L_REPLY_DST_V6 | L_TCP;

/// Bytes of a data payload before its records (the record count).
pub const DATA_PREFIX_LEN: usize = 2;
/// Bytes of one missing range in an Ack (first u64, count u32).
pub const RANGE_LEN: usize = 12;
/// The longest record: an IPv6 entry with TCP state.
pub const MAX_RECORD_LEN: usize = 2 + 2 * (5 + 32) + 14 + 5;

/// The cluster's shared key. Its bytes are never printed.
#[derive(Clone)]
pub struct SyncKey(hmac::Key);

impl SyncKey {
    pub fn new(bytes: &[u8]) -> Result<SyncKey, KeyError> {
        if bytes.len() < MIN_KEY_LEN {
            return Err(KeyError::TooShort(bytes.len()));
        }
        Ok(SyncKey(hmac::Key::new(hmac::HMAC_SHA256, bytes)))
    }

    fn tag(&self, data: &[u8]) -> [u8; TAG_LEN] {
        let full = hmac::sign(&self.0, data);
        let mut out = [0; TAG_LEN];
        out.copy_from_slice(&full.as_ref()[..TAG_LEN]);
        out
    }
}

impl fmt::Debug for SyncKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SyncKey(<redacted>)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error(
        "the conntrack sync key is {0} bytes long; it needs at least {MIN_KEY_LEN} (e.g. `head -c 32 /dev/urandom`)"
    )]
    TooShort(usize),
}

/// One change to one conntrack entry, as replicated.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Record {
    New(Entry),
    Update(Entry),
    /// The entry left the table; its original tuple names it.
    Destroy(Tuple),
}

impl Record {
    /// The entry's identity: its original tuple.
    pub fn key(&self) -> &Tuple {
        match self {
            Record::New(e) | Record::Update(e) => e.key(),
            Record::Destroy(t) => t,
        }
    }

    /// Bytes this record takes in a Data payload.
    pub fn encoded_len(&self) -> usize {
        fn tuple_len(t: &Tuple) -> usize {
            5 + addr_len(t.src) + addr_len(t.dst)
        }
        match self {
            Record::New(e) | Record::Update(e) => {
                2 + tuple_len(&e.original)
                    + tuple_len(&e.reply)
                    + 14
                    + if e.tcp.is_some() { 5 } else { 0 }
            }
            Record::Destroy(t) => 2 + tuple_len(t),
        }
    }
}

/// A range of missing sequence numbers, reported in an Ack (a NACK).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SeqRange {
    pub first: u64,
    /// At least 1.
    pub count: u32,
}

impl SeqRange {
    /// One past the last sequence number of the range.
    pub fn end(&self) -> u64 {
        self.first.saturating_add(u64::from(self.count))
    }
}

/// What a datagram says, beyond the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A batch of records (reliable: consumes a sequence number).
    Data(Vec<Record>),
    /// Acknowledgement: the header's ack fields carry the cumulative ack;
    /// `missing` lists what is lost above it (negative acknowledgement).
    Ack { missing: Vec<SeqRange> },
    /// "Still here"; the header's sequence is the sender's next sequence, so
    /// a receiver sees a lost tail of data.
    Alive,
    /// "Send me your table." `id` counts this node's requests in its epoch
    /// (a repeat of an unanswered one keeps its id), so a replayed request
    /// is told from a new one.
    ResyncRequest { id: u32 },
    /// Start of a bulk resync (reliable). Everything the receiver lacks
    /// before it is superseded by the bulk: it may skip its gaps.
    /// `complete`: the bulk is the sender's whole table (the master's),
    /// not only the flows it forwards itself.
    BulkBegin { complete: bool },
    /// End of a bulk resync (reliable), with the number of records sent in
    /// Data datagrams since the BulkBegin.
    BulkEnd { records: u32 },
}

impl Message {
    /// Reliable messages consume a sequence number, are retransmitted until
    /// acknowledged and are delivered in order. The others carry the
    /// sender's next sequence number in the header.
    pub fn is_reliable(&self) -> bool {
        matches!(
            self,
            Message::Data(_) | Message::BulkBegin { .. } | Message::BulkEnd { .. }
        )
    }

    pub fn name(&self) -> &'static str {
        match self {
            Message::Data(_) => "data",
            Message::Ack { .. } => "ack",
            Message::Alive => "alive",
            Message::ResyncRequest { .. } => "resync-request",
            Message::BulkBegin { .. } => "bulk-begin",
            Message::BulkEnd { .. } => "bulk-end",
        }
    }

    fn type_code(&self) -> u8 {
        match self {
            Message::Data(_) => TYPE_DATA,
            Message::Ack { .. } => TYPE_ACK,
            Message::Alive => TYPE_ALIVE,
            Message::ResyncRequest { .. } => TYPE_RESYNC_REQUEST,
            Message::BulkBegin { .. } => TYPE_BULK_BEGIN,
            Message::BulkEnd { .. } => TYPE_BULK_END,
        }
    }
}

/// The cumulative acknowledgement every datagram may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AckInfo {
    /// The epoch of the stream acknowledged (the receiver's own epoch, as
    /// the acknowledging node last heard it). Echoing it proves that the
    /// datagram was made after its receiver started (the epoch handshake).
    pub epoch: u64,
    /// Every sequence number below this one was received. 0: a challenge,
    /// "I heard this epoch but have not joined its stream".
    pub next: u64,
}

/// One datagram, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    /// Random, chosen at start: a new value means the sender restarted
    /// (adopted only from a datagram that echoes the receiver's own epoch).
    pub epoch: u64,
    /// For a reliable message its own sequence number; otherwise the
    /// sender's next sequence number.
    pub seq: u64,
    pub ack: Option<AckInfo>,
    pub message: Message,
}

/// Why a datagram was refused, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// The tag does not match: wrong key, or forged or corrupted in flight.
    Authentication,
    /// Another protocol version.
    Version,
    /// Not a datagram of this protocol, truncated, or a field out of range.
    Malformed,
}

impl RejectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Authentication => "authentication",
            RejectReason::Version => "version",
            RejectReason::Malformed => "malformed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("datagram too short: {len} bytes, need at least {need}")]
    Truncated { len: usize, need: usize },
    #[error("bad magic {0:#06x}: not a Tandem conntrack sync datagram")]
    Magic(u16),
    #[error("protocol version {0}, this node speaks version {VERSION}")]
    Version(u8),
    #[error(
        "payload length field says {declared} bytes, the datagram holds {available} between header and tag"
    )]
    PayloadLength { declared: usize, available: usize },
    #[error("authentication tag does not match (wrong cluster key, or forged)")]
    Authentication,
    #[error("unknown message type {0}")]
    MessageType(u8),
    #[error("unknown flags {0:#04x}")]
    Flags(u8),
    #[error("reserved byte is {0:#04x}, must be 0")]
    Reserved(u8),
    #[error("unknown bulk-begin flags {0:#04x}")]
    BulkFlags(u8),
    #[error("ack fields are set but the ack flag is not")]
    AckFieldsWithoutFlag,
    #[error("an ack message without the ack flag")]
    AckWithoutFlag,
    #[error("data message with no record")]
    NoRecord,
    #[error("record {index}: unknown kind {kind}")]
    RecordKind { index: usize, kind: u8 },
    #[error("record {index}: unknown layout bits {layout:#04x}")]
    RecordLayout { index: usize, layout: u8 },
    #[error("record {index}: truncated")]
    RecordTruncated { index: usize },
    #[error("{extra} bytes after the last record or range")]
    TrailingBytes { extra: usize },
    #[error("missing range {index} is empty")]
    EmptyRange { index: usize },
    #[error("missing range {index} overlaps or precedes the one before it")]
    RangeOrder { index: usize },
    #[error("missing range {index} lies below the cumulative ack {ack}")]
    RangeBelowAck { index: usize, ack: u64 },
    #[error("missing range {index} runs past the largest sequence number")]
    RangeOverflow { index: usize },
    #[error("{message} message carries a {len}-byte payload, must be {expected}")]
    PayloadSize {
        message: &'static str,
        len: usize,
        expected: usize,
    },
}

impl DecodeError {
    pub fn reason(&self) -> RejectReason {
        match self {
            DecodeError::Authentication => RejectReason::Authentication,
            DecodeError::Version(_) => RejectReason::Version,
            _ => RejectReason::Malformed,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("payload of {0} bytes does not fit the 16-bit length field")]
    PayloadTooLarge(usize),
    #[error("{0} records do not fit the 16-bit record count")]
    TooManyRecords(usize),
    #[error("a data message needs at least one record")]
    NoRecord,
    #[error("{0} missing ranges do not fit the 16-bit range count")]
    TooManyRanges(usize),
    #[error("an ack message needs the cumulative ack")]
    AckWithoutInfo,
}

impl Datagram {
    pub fn encode(&self, key: &SyncKey) -> Result<Vec<u8>, EncodeError> {
        let mut buf = Vec::with_capacity(DEFAULT_MAX_DATAGRAM);
        buf.extend_from_slice(&MAGIC);
        buf.push(VERSION);
        buf.push(self.message.type_code());
        buf.push(if self.ack.is_some() { FLAG_ACK } else { 0 });
        buf.push(0);
        buf.extend_from_slice(&[0, 0]); // payload length, filled below
        buf.extend_from_slice(&self.epoch.to_be_bytes());
        buf.extend_from_slice(&self.seq.to_be_bytes());
        let ack = self.ack.unwrap_or(AckInfo { epoch: 0, next: 0 });
        buf.extend_from_slice(&ack.epoch.to_be_bytes());
        buf.extend_from_slice(&ack.next.to_be_bytes());
        match &self.message {
            Message::Data(records) => {
                if records.is_empty() {
                    return Err(EncodeError::NoRecord);
                }
                let n = u16::try_from(records.len())
                    .map_err(|_| EncodeError::TooManyRecords(records.len()))?;
                buf.extend_from_slice(&n.to_be_bytes());
                for r in records {
                    encode_record(r, &mut buf);
                }
            }
            Message::Ack { missing } => {
                if self.ack.is_none() {
                    return Err(EncodeError::AckWithoutInfo);
                }
                let n = u16::try_from(missing.len())
                    .map_err(|_| EncodeError::TooManyRanges(missing.len()))?;
                buf.extend_from_slice(&n.to_be_bytes());
                for r in missing {
                    buf.extend_from_slice(&r.first.to_be_bytes());
                    buf.extend_from_slice(&r.count.to_be_bytes());
                }
            }
            Message::Alive => {}
            Message::ResyncRequest { id } => buf.extend_from_slice(&id.to_be_bytes()),
            Message::BulkBegin { complete } => buf.push(if *complete { BULK_COMPLETE } else { 0 }),
            Message::BulkEnd { records } => buf.extend_from_slice(&records.to_be_bytes()),
        }
        let payload = buf.len() - HEADER_LEN;
        let len = u16::try_from(payload).map_err(|_| EncodeError::PayloadTooLarge(payload))?;
        buf[6..8].copy_from_slice(&len.to_be_bytes());
        let tag = key.tag(&buf);
        buf.extend_from_slice(&tag);
        Ok(buf)
    }

    /// Decodes and authenticates one datagram. Framing (magic, version,
    /// length) is checked first so that another protocol or version is
    /// told apart from a wrong key; nothing else is read before the tag
    /// is verified.
    pub fn decode(buf: &[u8], key: &SyncKey) -> Result<Datagram, DecodeError> {
        if buf.len() < HEADER_LEN + TAG_LEN {
            return Err(DecodeError::Truncated {
                len: buf.len(),
                need: HEADER_LEN + TAG_LEN,
            });
        }
        if buf[0..2] != MAGIC {
            return Err(DecodeError::Magic(u16::from_be_bytes([buf[0], buf[1]])));
        }
        if buf[2] != VERSION {
            return Err(DecodeError::Version(buf[2]));
        }
        let declared = usize::from(u16::from_be_bytes([buf[6], buf[7]]));
        let available = buf.len() - HEADER_LEN - TAG_LEN;
        if declared != available {
            return Err(DecodeError::PayloadLength {
                declared,
                available,
            });
        }
        let (signed, tag) = buf.split_at(HEADER_LEN + declared);
        if !constant_time_eq(&key.tag(signed), tag) {
            return Err(DecodeError::Authentication);
        }
        let flags = buf[4];
        if flags & !FLAG_ACK != 0 {
            return Err(DecodeError::Flags(flags));
        }
        if buf[5] != 0 {
            return Err(DecodeError::Reserved(buf[5]));
        }
        let epoch = be_u64(&buf[8..16]);
        let seq = be_u64(&buf[16..24]);
        let ack = if flags & FLAG_ACK != 0 {
            Some(AckInfo {
                epoch: be_u64(&buf[24..32]),
                next: be_u64(&buf[32..40]),
            })
        } else {
            if buf[24..40].iter().any(|b| *b != 0) {
                return Err(DecodeError::AckFieldsWithoutFlag);
            }
            None
        };
        let payload = &signed[HEADER_LEN..];
        let message = match buf[3] {
            TYPE_DATA => Message::Data(decode_records(payload)?),
            TYPE_ACK => {
                let Some(info) = ack else {
                    return Err(DecodeError::AckWithoutFlag);
                };
                Message::Ack {
                    missing: decode_ranges(payload, info.next)?,
                }
            }
            TYPE_ALIVE => {
                expect_len("alive", payload, 0)?;
                Message::Alive
            }
            TYPE_RESYNC_REQUEST => {
                expect_len("resync-request", payload, 4)?;
                Message::ResyncRequest {
                    id: u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]),
                }
            }
            TYPE_BULK_BEGIN => {
                expect_len("bulk-begin", payload, 1)?;
                if payload[0] & !BULK_COMPLETE != 0 {
                    return Err(DecodeError::BulkFlags(payload[0]));
                }
                Message::BulkBegin {
                    complete: payload[0] & BULK_COMPLETE != 0,
                }
            }
            TYPE_BULK_END => {
                expect_len("bulk-end", payload, 4)?;
                Message::BulkEnd {
                    records: u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]),
                }
            }
            t => return Err(DecodeError::MessageType(t)),
        };
        Ok(Datagram {
            epoch,
            seq,
            ack,
            message,
        })
    }
}

/// Compares two tags without an early exit, so the time taken does not
/// tell an attacker how many leading bytes of a forged tag were right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn expect_len(message: &'static str, payload: &[u8], expected: usize) -> Result<(), DecodeError> {
    if payload.len() != expected {
        return Err(DecodeError::PayloadSize {
            message,
            len: payload.len(),
            expected,
        });
    }
    Ok(())
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn addr_len(a: IpAddr) -> usize {
    if a.is_ipv6() { 16 } else { 4 }
}

fn put_addr(a: IpAddr, buf: &mut Vec<u8>) {
    match a {
        IpAddr::V4(a) => buf.extend_from_slice(&a.octets()),
        IpAddr::V6(a) => buf.extend_from_slice(&a.octets()),
    }
}

fn put_tuple(t: &Tuple, buf: &mut Vec<u8>) {
    buf.push(t.protocol);
    buf.extend_from_slice(&t.src_port.to_be_bytes());
    buf.extend_from_slice(&t.dst_port.to_be_bytes());
    put_addr(t.src, buf);
    put_addr(t.dst, buf);
}

fn tuple_layout(t: &Tuple, src_bit: u8, dst_bit: u8) -> u8 {
    (if t.src.is_ipv6() { src_bit } else { 0 }) | (if t.dst.is_ipv6() { dst_bit } else { 0 })
}

fn encode_record(r: &Record, buf: &mut Vec<u8>) {
    match r {
        Record::New(e) | Record::Update(e) => {
            let kind = if matches!(r, Record::New(_)) {
                KIND_NEW
            } else {
                KIND_UPDATE
            };
            let layout = tuple_layout(&e.original, L_ORIG_SRC_V6, L_ORIG_DST_V6)
                | tuple_layout(&e.reply, L_REPLY_SRC_V6, L_REPLY_DST_V6)
                | if e.tcp.is_some() { L_TCP } else { 0 };
            buf.push(kind);
            buf.push(layout);
            put_tuple(&e.original, buf);
            put_tuple(&e.reply, buf);
            buf.extend_from_slice(&e.status.to_be_bytes());
            buf.extend_from_slice(&e.timeout_s.to_be_bytes());
            buf.extend_from_slice(&e.mark.to_be_bytes());
            buf.extend_from_slice(&e.zone.to_be_bytes());
            if let Some(t) = &e.tcp {
                buf.extend_from_slice(&[
                    t.state,
                    t.wscale_original,
                    t.wscale_reply,
                    t.flags_original,
                    t.flags_reply,
                ]);
            }
        }
        Record::Destroy(t) => {
            buf.push(KIND_DESTROY);
            buf.push(tuple_layout(t, L_ORIG_SRC_V6, L_ORIG_DST_V6));
            put_tuple(t, buf);
        }
    }
}

/// A bounds-checked reader over one record; every short read is the
/// record's truncation.
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
    index: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|end| *end <= self.buf.len())
            .ok_or(DecodeError::RecordTruncated { index: self.index })?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn addr(&mut self, v6: bool) -> Result<IpAddr, DecodeError> {
        if v6 {
            let mut a = [0; 16];
            a.copy_from_slice(self.take(16)?);
            Ok(IpAddr::V6(Ipv6Addr::from(a)))
        } else {
            let b = self.take(4)?;
            Ok(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])))
        }
    }

    fn tuple(&mut self, src_v6: bool, dst_v6: bool) -> Result<Tuple, DecodeError> {
        let protocol = self.u8()?;
        let src_port = self.u16()?;
        let dst_port = self.u16()?;
        let src = self.addr(src_v6)?;
        let dst = self.addr(dst_v6)?;
        Ok(Tuple {
            src,
            dst,
            protocol,
            src_port,
            dst_port,
        })
    }
}

fn decode_records(payload: &[u8]) -> Result<Vec<Record>, DecodeError> {
    if payload.len() < DATA_PREFIX_LEN {
        return Err(DecodeError::PayloadSize {
            message: "data",
            len: payload.len(),
            expected: DATA_PREFIX_LEN,
        });
    }
    let count = usize::from(u16::from_be_bytes([payload[0], payload[1]]));
    if count == 0 {
        return Err(DecodeError::NoRecord);
    }
    let mut r = Reader {
        buf: payload,
        at: DATA_PREFIX_LEN,
        index: 0,
    };
    // The count is attacker-independent here (the tag was verified) but
    // still capped by what the payload can hold.
    let mut records = Vec::with_capacity(count.min(payload.len() / 15));
    for index in 0..count {
        r.index = index;
        let kind = r.u8()?;
        let layout = r.u8()?;
        let allowed = if kind == KIND_DESTROY {
            L_TUPLE_BITS
        } else {
            L_ENTRY_BITS
        };
        if !matches!(kind, KIND_NEW | KIND_UPDATE | KIND_DESTROY) {
            return Err(DecodeError::RecordKind { index, kind });
        }
        if layout & !allowed != 0 {
            return Err(DecodeError::RecordLayout { index, layout });
        }
        let original = r.tuple(layout & L_ORIG_SRC_V6 != 0, layout & L_ORIG_DST_V6 != 0)?;
        if kind == KIND_DESTROY {
            records.push(Record::Destroy(original));
            continue;
        }
        let reply = r.tuple(layout & L_REPLY_SRC_V6 != 0, layout & L_REPLY_DST_V6 != 0)?;
        let status = r.u32()?;
        let timeout_s = r.u32()?;
        let mark = r.u32()?;
        let zone = r.u16()?;
        let tcp = if layout & L_TCP != 0 {
            let b = r.take(5)?;
            Some(TcpInfo {
                state: b[0],
                wscale_original: b[1],
                wscale_reply: b[2],
                flags_original: b[3],
                flags_reply: b[4],
            })
        } else {
            None
        };
        let entry = Entry {
            original,
            reply,
            status,
            timeout_s,
            mark,
            zone,
            tcp,
        };
        records.push(if kind == KIND_NEW {
            Record::New(entry)
        } else {
            Record::Update(entry)
        });
    }
    if r.at != payload.len() {
        return Err(DecodeError::TrailingBytes {
            extra: payload.len() - r.at,
        });
    }
    Ok(records)
}

fn decode_ranges(payload: &[u8], ack: u64) -> Result<Vec<SeqRange>, DecodeError> {
    if payload.len() < 2 {
        return Err(DecodeError::PayloadSize {
            message: "ack",
            len: payload.len(),
            expected: 2,
        });
    }
    let count = usize::from(u16::from_be_bytes([payload[0], payload[1]]));
    let expected = 2 + count * RANGE_LEN;
    if payload.len() != expected {
        return Err(DecodeError::PayloadSize {
            message: "ack",
            len: payload.len(),
            expected,
        });
    }
    let mut out: Vec<SeqRange> = Vec::with_capacity(count);
    for (index, c) in payload[2..].chunks_exact(RANGE_LEN).enumerate() {
        let range = SeqRange {
            first: be_u64(&c[0..8]),
            count: u32::from_be_bytes([c[8], c[9], c[10], c[11]]),
        };
        if range.count == 0 {
            return Err(DecodeError::EmptyRange { index });
        }
        if range.first.checked_add(u64::from(range.count)).is_none() {
            return Err(DecodeError::RangeOverflow { index });
        }
        if range.first < ack {
            return Err(DecodeError::RangeBelowAck { index, ack });
        }
        if out.last().is_some_and(|prev| range.first <= prev.end()) {
            return Err(DecodeError::RangeOrder { index });
        }
        out.push(range);
    }
    Ok(out)
}
