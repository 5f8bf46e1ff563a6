//! Codec tests for the conntrack sync wire format: the byte vectors of
//! `tests/vectors/` (written field by field by an independent encoder,
//! `make-vectors.py`, tag from Python's hmac) decoded and re-encoded byte for
//! byte, every malformed case rejected by name, and random bytes, bit flips
//! and re-signed mutations never panicking.

mod common;

use common::Rng;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use conntrack_syncd::sync::wire::{
    AckInfo, DEFAULT_MAX_DATAGRAM, Datagram, DecodeError, EncodeError, HEADER_LEN, KeyError,
    MAX_RECORD_LEN, Message, Record, RejectReason, SeqRange, SyncKey, TAG_LEN, VERSION,
};
use tandem_conntrack::{Entry, TcpInfo, Tuple};

const KEY: &[u8] = b"tandem-conntrack-sync-test-key-1";
const A: u64 = 0x1111_2222_3333_4444;
const B: u64 = 0xAAAA_BBBB_CCCC_DDDD;

fn key() -> SyncKey {
    SyncKey::new(KEY).unwrap()
}

/// The bytes of an annotated hex vector (`#` starts a comment).
fn vector(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/vectors/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let hex: String = text
        .lines()
        .map(|l| l.split('#').next().unwrap())
        .flat_map(|l| l.split_whitespace())
        .collect();
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

/// Recomputes the tag after a test changed signed bytes, so the change
/// reaches the field checks behind authentication.
fn resign(mut bytes: Vec<u8>) -> Vec<u8> {
    let len = bytes.len();
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, KEY);
    let tag = ring::hmac::sign(&k, &bytes[..len - TAG_LEN]);
    bytes[len - TAG_LEN..].copy_from_slice(&tag.as_ref()[..TAG_LEN]);
    bytes
}

fn v4(a: [u8; 4]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(a))
}

fn v6(s: &str) -> IpAddr {
    IpAddr::V6(s.parse::<Ipv6Addr>().unwrap())
}

fn tuple(protocol: u8, src_port: u16, dst_port: u16, src: IpAddr, dst: IpAddr) -> Tuple {
    Tuple {
        src,
        dst,
        protocol,
        src_port,
        dst_port,
    }
}

fn nat_entry() -> Entry {
    Entry {
        original: tuple(6, 51000, 80, v4([198, 51, 100, 7]), v4([192, 0, 2, 10])),
        reply: tuple(6, 8080, 40000, v4([10, 1, 0, 5]), v4([10, 1, 0, 100])),
        status: 0x1be,
        timeout_s: 432_000,
        mark: 0x2a,
        zone: 0,
        tcp: Some(TcpInfo {
            state: 3,
            wscale_original: 7,
            wscale_reply: 7,
            flags_original: 0x08,
            flags_reply: 0x08,
        }),
    }
}

fn expected(name: &str) -> Datagram {
    match name {
        "data-ipv4.hex" => Datagram {
            epoch: A,
            seq: 7,
            ack: Some(AckInfo { epoch: B, next: 3 }),
            message: Message::Data(vec![
                Record::New(nat_entry()),
                Record::Update(Entry {
                    original: tuple(17, 5353, 53, v4([198, 51, 100, 8]), v4([192, 0, 2, 11])),
                    reply: tuple(17, 53, 5353, v4([10, 1, 0, 6]), v4([198, 51, 100, 8])),
                    status: 0x1ae,
                    timeout_s: 30,
                    mark: 0,
                    zone: 0,
                    tcp: None,
                }),
                Record::Destroy(tuple(
                    6,
                    51001,
                    80,
                    v4([198, 51, 100, 7]),
                    v4([192, 0, 2, 10]),
                )),
            ]),
        },
        "data-ipv6.hex" => Datagram {
            epoch: A,
            seq: 8,
            ack: None,
            message: Message::Data(vec![
                Record::New(Entry {
                    original: tuple(6, 443, 8443, v6("2001:db8::7"), v6("2001:db8:1::10")),
                    reply: tuple(6, 8443, 443, v6("2001:db8:2::5"), v6("2001:db8::7")),
                    status: 0x1ae,
                    timeout_s: 120,
                    mark: 1,
                    zone: 3,
                    tcp: Some(TcpInfo {
                        state: 3,
                        wscale_original: 9,
                        wscale_reply: 10,
                        flags_original: 0x0a,
                        flags_reply: 0x08,
                    }),
                }),
                Record::Destroy(tuple(17, 9999, 53, v6("2001:db8::8"), v6("2001:db8:1::11"))),
            ]),
        },
        "ack.hex" => Datagram {
            epoch: B,
            seq: 4,
            ack: Some(AckInfo { epoch: A, next: 5 }),
            message: Message::Ack {
                missing: vec![
                    SeqRange { first: 5, count: 2 },
                    SeqRange {
                        first: 10,
                        count: 1,
                    },
                ],
            },
        },
        "alive.hex" => Datagram {
            epoch: A,
            seq: 9,
            ack: None,
            message: Message::Alive,
        },
        "challenge.hex" => Datagram {
            epoch: B,
            seq: 4,
            ack: Some(AckInfo { epoch: A, next: 0 }),
            message: Message::Alive,
        },
        "resync-request.hex" => Datagram {
            epoch: B,
            seq: 4,
            ack: Some(AckInfo { epoch: A, next: 9 }),
            message: Message::ResyncRequest { id: 3 },
        },
        "bulk-begin.hex" => Datagram {
            epoch: A,
            seq: 9,
            ack: Some(AckInfo { epoch: B, next: 4 }),
            message: Message::BulkBegin { complete: true },
        },
        "bulk-end.hex" => Datagram {
            epoch: A,
            seq: 12,
            ack: Some(AckInfo { epoch: B, next: 4 }),
            message: Message::BulkEnd { records: 42 },
        },
        other => panic!("no expectation for {other}"),
    }
}

const VECTORS: [&str; 8] = [
    "data-ipv4.hex",
    "data-ipv6.hex",
    "ack.hex",
    "alive.hex",
    "challenge.hex",
    "resync-request.hex",
    "bulk-begin.hex",
    "bulk-end.hex",
];

#[test]
fn every_vector_decodes_to_its_message_and_reencodes_byte_for_byte() {
    for name in VECTORS {
        let bytes = vector(name);
        let want = expected(name);
        assert_eq!(Datagram::decode(&bytes, &key()), Ok(want.clone()), "{name}");
        assert_eq!(want.encode(&key()).unwrap(), bytes, "{name}");
    }
}

#[test]
fn every_message_type_has_a_vector() {
    let kinds: std::collections::BTreeSet<&str> =
        VECTORS.iter().map(|n| expected(n).message.name()).collect();
    assert_eq!(kinds.len(), 6, "{kinds:?}");
}

#[test]
fn record_lengths_match_their_encoding() {
    for name in ["data-ipv4.hex", "data-ipv6.hex"] {
        let bytes = vector(name);
        let Message::Data(records) = expected(name).message else {
            unreachable!()
        };
        let sum: usize = records.iter().map(Record::encoded_len).sum();
        assert_eq!(HEADER_LEN + 2 + sum + TAG_LEN, bytes.len(), "{name}");
    }
    // The largest record the packer must budget for: IPv6 with TCP state.
    let mut e = nat_entry();
    e.original.src = v6("2001:db8::1");
    e.original.dst = v6("2001:db8::2");
    e.reply.src = v6("2001:db8::3");
    e.reply.dst = v6("2001:db8::4");
    assert_eq!(Record::New(e).encoded_len(), MAX_RECORD_LEN);
}

#[test]
fn a_1400_byte_datagram_carries_28_ipv4_tcp_entries() {
    let per = Record::New(nat_entry()).encoded_len();
    assert_eq!(per, 47);
    let fit = (DEFAULT_MAX_DATAGRAM - HEADER_LEN - TAG_LEN - 2) / per;
    assert_eq!(fit, 28);
    let d = Datagram {
        epoch: A,
        seq: 1,
        ack: None,
        message: Message::Data(vec![Record::New(nat_entry()); fit]),
    };
    assert!(d.encode(&key()).unwrap().len() <= DEFAULT_MAX_DATAGRAM);
}

#[test]
fn a_wrong_key_is_an_authentication_error() {
    let other = SyncKey::new(b"another-cluster-key-of-32-bytes!").unwrap();
    for name in VECTORS {
        let err = Datagram::decode(&vector(name), &other).unwrap_err();
        assert_eq!(err, DecodeError::Authentication, "{name}");
        assert_eq!(err.reason(), RejectReason::Authentication);
    }
}

#[test]
fn short_keys_are_refused() {
    assert_eq!(SyncKey::new(b"short").unwrap_err(), KeyError::TooShort(5));
    assert!(SyncKey::new(&[0; 16]).is_ok());
    // The key never reaches a log line.
    assert_eq!(format!("{:?}", key()), "SyncKey(<redacted>)");
}

#[test]
fn framing_errors_are_named_before_authentication() {
    let good = vector("alive.hex");
    // Every prefix is truncated or has the wrong length.
    for len in 0..good.len() {
        let err = Datagram::decode(&good[..len], &key()).unwrap_err();
        assert!(
            matches!(
                err,
                DecodeError::Truncated { .. } | DecodeError::PayloadLength { .. }
            ),
            "{len}: {err:?}"
        );
        assert_eq!(err.reason(), RejectReason::Malformed);
    }
    let mut b = good.clone();
    b[0] = b'X';
    assert_eq!(
        Datagram::decode(&b, &key()),
        Err(DecodeError::Magic(0x5843))
    );
    let mut b = good.clone();
    b[2] = 1;
    let err = Datagram::decode(&b, &key()).unwrap_err();
    assert_eq!(err, DecodeError::Version(1));
    assert_eq!(err.reason(), RejectReason::Version);
    let mut b = good.clone();
    b.push(0);
    assert_eq!(
        Datagram::decode(&b, &key()),
        Err(DecodeError::PayloadLength {
            declared: 0,
            available: 1
        })
    );
    let mut b = good.clone();
    let last = b.len() - 1;
    b[last] ^= 1;
    assert_eq!(
        Datagram::decode(&b, &key()),
        Err(DecodeError::Authentication)
    );
}

#[test]
fn field_errors_behind_a_valid_tag_are_named() {
    let data = vector("data-ipv4.hex");
    let alive = vector("alive.hex");
    let ack = vector("ack.hex");
    let set = |v: &[u8], at: usize, val: u8| {
        let mut b = v.to_vec();
        b[at] = val;
        resign(b)
    };
    let cases: Vec<(Vec<u8>, DecodeError)> = vec![
        (set(&alive, 3, 9), DecodeError::MessageType(9)),
        (set(&alive, 4, 0x80), DecodeError::Flags(0x80)),
        (set(&alive, 5, 1), DecodeError::Reserved(1)),
        (set(&alive, 39, 1), DecodeError::AckFieldsWithoutFlag),
        (
            {
                let mut b = ack.clone();
                b[4] = 0;
                b[24..40].fill(0);
                resign(b)
            },
            DecodeError::AckWithoutFlag,
        ),
        (set(&data, HEADER_LEN + 1, 0), DecodeError::NoRecord),
        (
            set(&data, HEADER_LEN + 2, 7),
            DecodeError::RecordKind { index: 0, kind: 7 },
        ),
        (
            set(&data, HEADER_LEN + 3, 0x20),
            DecodeError::RecordLayout {
                index: 0,
                layout: 0x20,
            },
        ),
        // The last record claims an IPv6 source: it no longer fits.
        (
            set(&data, HEADER_LEN + 2 + 47 + 42 + 1, 0x01),
            DecodeError::RecordTruncated { index: 2 },
        ),
        // Destroy records carry no reply tuple and no TCP state.
        (
            set(&data, HEADER_LEN + 2 + 47 + 42 + 1, 0x10),
            DecodeError::RecordLayout {
                index: 2,
                layout: 0x10,
            },
        ),
        // Count says 2: the third record is left over.
        (
            set(&data, HEADER_LEN + 1, 2),
            DecodeError::TrailingBytes { extra: 15 },
        ),
        (
            set(&data, HEADER_LEN + 1, 4),
            DecodeError::RecordTruncated { index: 3 },
        ),
        // First range empty; second range overlapping the first; a range below the ack.
        (
            set(&ack, HEADER_LEN + 2 + 11, 0),
            DecodeError::EmptyRange { index: 0 },
        ),
        (
            set(&ack, HEADER_LEN + 2 + 12 + 7, 6),
            DecodeError::RangeOrder { index: 1 },
        ),
        (
            set(&ack, HEADER_LEN + 2 + 7, 4),
            DecodeError::RangeBelowAck { index: 0, ack: 5 },
        ),
        (
            set(&ack, HEADER_LEN + 1, 3),
            DecodeError::PayloadSize {
                message: "ack",
                len: 26,
                expected: 38,
            },
        ),
    ];
    for (i, (bytes, want)) in cases.into_iter().enumerate() {
        let got = Datagram::decode(&bytes, &key());
        assert_eq!(got, Err(want.clone()), "case {i}");
        assert_eq!(want.reason(), RejectReason::Malformed);
        // Every error reads as a sentence.
        assert!(!want.to_string().is_empty());
    }
    // A payload where none belongs, and one of the wrong size.
    let mut b = vector("alive.hex");
    let tag_at = b.len() - TAG_LEN;
    b.insert(tag_at, 0);
    b[7] = 1;
    assert_eq!(
        Datagram::decode(&resign(b), &key()),
        Err(DecodeError::PayloadSize {
            message: "alive",
            len: 1,
            expected: 0
        })
    );
    let mut b = vector("resync-request.hex");
    let tag_at = b.len() - TAG_LEN;
    b.remove(tag_at - 1);
    b[7] = 3;
    assert_eq!(
        Datagram::decode(&resign(b), &key()),
        Err(DecodeError::PayloadSize {
            message: "resync-request",
            len: 3,
            expected: 4
        })
    );
    // Bulk-begin flags other than "complete".
    let b = vector("bulk-begin.hex");
    let at = b.len() - TAG_LEN - 1;
    assert_eq!(
        Datagram::decode(&set(&b, at, 0x03), &key()),
        Err(DecodeError::BulkFlags(0x03))
    );
    assert_eq!(
        Datagram::decode(&set(&b, at, 0), &key()).map(|d| d.message),
        Ok(Message::BulkBegin { complete: false })
    );
}

#[test]
fn encoding_refuses_what_the_format_cannot_say() {
    let d = |message| Datagram {
        epoch: A,
        seq: 1,
        ack: None,
        message,
    };
    assert_eq!(
        d(Message::Data(vec![])).encode(&key()),
        Err(EncodeError::NoRecord)
    );
    assert_eq!(
        d(Message::Ack { missing: vec![] }).encode(&key()),
        Err(EncodeError::AckWithoutInfo)
    );
    let big = vec![Record::New(nat_entry()); 2000];
    assert_eq!(
        d(Message::Data(big)).encode(&key()),
        Err(EncodeError::PayloadTooLarge(2 + 2000 * 47))
    );
}

#[test]
fn random_bytes_are_rejected_without_panic() {
    let mut rng = Rng(1);
    for _ in 0..20_000 {
        let len = rng.below(200) as usize;
        let mut b: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        // Half of them with a valid magic and version, to get past framing.
        if len >= 3 && rng.below(2) == 0 {
            b[..3].copy_from_slice(&[b'T', b'C', VERSION]);
        }
        assert!(Datagram::decode(&b, &key()).is_err());
    }
}

#[test]
fn every_single_bit_flip_of_every_vector_is_rejected() {
    for name in VECTORS {
        let good = vector(name);
        for bit in 0..good.len() * 8 {
            let mut b = good.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(Datagram::decode(&b, &key()).is_err(), "{name} bit {bit}");
        }
    }
}

/// Mutations re-signed with the right key reach every field check: none
/// may panic, and whatever still decodes must re-encode to the same bytes
/// (one message, one encoding: nothing the decoder accepts is ambiguous).
#[test]
fn resigned_mutations_never_panic_and_what_decodes_is_canonical() {
    let mut rng = Rng(7);
    let mut accepted = 0;
    for round in 0..20_000 {
        let mut b = vector(VECTORS[round % VECTORS.len()]);
        let body = b.len() - TAG_LEN;
        for _ in 0..1 + rng.below(3) {
            match rng.below(4) {
                0 => {
                    let i = rng.below(body as u64) as usize;
                    b[i] ^= 1 << rng.below(8);
                }
                1 => {
                    let i = HEADER_LEN + rng.below((body - HEADER_LEN + 1) as u64) as usize;
                    b.insert(i.min(b.len() - TAG_LEN), rng.next() as u8);
                }
                2 if b.len() - TAG_LEN > HEADER_LEN => {
                    let i =
                        HEADER_LEN + rng.below((b.len() - TAG_LEN - HEADER_LEN) as u64) as usize;
                    b.remove(i);
                }
                _ => {
                    let i = rng.below(body as u64) as usize;
                    b[i] = rng.next() as u8;
                }
            }
        }
        // Keep the length field honest half of the time, so the payload
        // parsers see the mutation.
        if rng.below(2) == 0 {
            let len = (b.len() - HEADER_LEN - TAG_LEN) as u16;
            b[6..8].copy_from_slice(&len.to_be_bytes());
        }
        let b = resign(b);
        if let Ok(d) = Datagram::decode(&b, &key()) {
            accepted += 1;
            assert_eq!(d.encode(&key()).unwrap(), b, "round {round}");
        }
    }
    // The test must exercise both outcomes to mean anything.
    assert!(accepted > 300, "only {accepted} mutations decoded");
}

fn random_addr(rng: &mut Rng) -> IpAddr {
    if rng.below(2) == 0 {
        IpAddr::V4(Ipv4Addr::from(rng.next() as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(
            (u128::from(rng.next()) << 64) | u128::from(rng.next()),
        ))
    }
}

fn random_tuple(rng: &mut Rng) -> Tuple {
    tuple(
        rng.next() as u8,
        rng.next() as u16,
        rng.next() as u16,
        random_addr(rng),
        random_addr(rng),
    )
}

#[test]
fn random_records_round_trip_including_mixed_families() {
    let mut rng = Rng(3);
    for _ in 0..2_000 {
        let mut records = Vec::new();
        let mut budget = 1342;
        loop {
            let r = match rng.below(3) {
                2 => Record::Destroy(random_tuple(&mut rng)),
                k => {
                    let e = Entry {
                        original: random_tuple(&mut rng),
                        reply: random_tuple(&mut rng),
                        status: rng.next() as u32,
                        timeout_s: rng.next() as u32,
                        mark: rng.next() as u32,
                        zone: rng.next() as u16,
                        tcp: (rng.below(2) == 0).then(|| TcpInfo {
                            state: rng.next() as u8,
                            wscale_original: rng.next() as u8,
                            wscale_reply: rng.next() as u8,
                            flags_original: rng.next() as u8,
                            flags_reply: rng.next() as u8,
                        }),
                    };
                    if k == 0 {
                        Record::New(e)
                    } else {
                        Record::Update(e)
                    }
                }
            };
            if r.encoded_len() > budget {
                break;
            }
            budget -= r.encoded_len();
            records.push(r);
        }
        let d = Datagram {
            epoch: rng.next(),
            seq: rng.next(),
            ack: (rng.below(2) == 0).then(|| AckInfo {
                epoch: rng.next(),
                next: rng.next(),
            }),
            message: Message::Data(records),
        };
        let bytes = d.encode(&key()).unwrap();
        assert!(bytes.len() <= DEFAULT_MAX_DATAGRAM);
        assert_eq!(Datagram::decode(&bytes, &key()), Ok(d));
    }
}
