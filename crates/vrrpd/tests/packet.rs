//! Codec tests: packets captured from a real keepalived (v2.2.7, Debian
//! bookworm; configs beside the captures in `tests/vectors/`), decoded and
//! re-encoded byte for byte, and every malformed case rejected by name.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use vrrpd::packet::{Advertisement, DecodeError, EncodeError, Version, parse_ipv4};

/// Frames of a classic pcap file (Ethernet link type).
fn pcap_frames(name: &str) -> Vec<Vec<u8>> {
    let path = format!("{}/tests/vectors/{name}", env!("CARGO_MANIFEST_DIR"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert_eq!(&bytes[..4], &[0xd4, 0xc3, 0xb2, 0xa1], "little-endian pcap");
    let mut frames = Vec::new();
    let mut at = 24;
    while at + 16 <= bytes.len() {
        let caplen = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()) as usize;
        frames.push(bytes[at + 16..at + 16 + caplen].to_vec());
        at += 16 + caplen;
    }
    frames
}

/// (src, dst, VRRP message) of an IPv6 frame: raw IPv6 sockets do not return
/// the header, so the codec never sees it; the test peels it here.
fn ipv6_vrrp(frame: &[u8]) -> (IpAddr, IpAddr, u8, &[u8]) {
    let ip = &frame[14..];
    assert_eq!(ip[0] >> 4, 6);
    assert_eq!(ip[6], 112, "next header VRRP");
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap());
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap());
    let len = u16::from_be_bytes([ip[4], ip[5]]) as usize;
    (src.into(), dst.into(), ip[7], &ip[40..40 + len])
}

#[test]
fn keepalived_v3_ipv4_advert_decodes_and_reencodes_byte_for_byte() {
    for frame in pcap_frames("keepalived-v3ipv4.pcap") {
        let env = parse_ipv4(&frame[14..]).expect("IPv4 envelope");
        assert_eq!(env.src, Ipv4Addr::new(10, 99, 0, 1));
        assert_eq!(env.dst, Ipv4Addr::new(224, 0, 0, 18));
        let adv =
            Advertisement::decode(env.payload, env.src.into(), env.dst.into()).expect("decode");
        assert_eq!(
            adv,
            Advertisement {
                version: Version::V3,
                vrid: 51,
                priority: 150,
                advert_interval_cs: 100,
                addresses: vec![IpAddr::V4(Ipv4Addr::new(10, 99, 0, 100))],
            }
        );
        assert_eq!(
            adv.encode(env.src.into(), env.dst.into()).unwrap(),
            env.payload
        );
    }
}

#[test]
fn keepalived_v2_ipv4_advert_decodes_and_reencodes_byte_for_byte() {
    let frames = pcap_frames("keepalived-v2ipv4.pcap");
    assert!(!frames.is_empty());
    for frame in frames {
        let env = parse_ipv4(&frame[14..]).expect("IPv4 envelope");
        let adv =
            Advertisement::decode(env.payload, env.src.into(), env.dst.into()).expect("decode");
        assert_eq!(adv.version, Version::V2);
        assert_eq!(
            (adv.vrid, adv.priority, adv.advert_interval_cs),
            (51, 150, 100)
        );
        assert_eq!(
            adv.addresses,
            vec![IpAddr::V4(Ipv4Addr::new(10, 99, 0, 100))]
        );
        assert_eq!(
            adv.encode(env.src.into(), env.dst.into()).unwrap(),
            env.payload
        );
    }
}

#[test]
fn keepalived_v3_ipv6_advert_decodes_and_reencodes_byte_for_byte() {
    for frame in pcap_frames("keepalived-v3ipv6.pcap") {
        let (src, dst, hop_limit, msg) = ipv6_vrrp(&frame);
        assert_eq!(hop_limit, 255);
        let adv = Advertisement::decode(msg, src, dst).expect("decode");
        assert_eq!(adv.version, Version::V3);
        assert_eq!(
            (adv.vrid, adv.priority, adv.advert_interval_cs),
            (51, 150, 100)
        );
        assert_eq!(adv.addresses, vec!["fd99::100".parse::<IpAddr>().unwrap()]);
        assert_eq!(adv.encode(src, dst).unwrap(), msg);
    }
}

const SRC: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 99, 0, 1));
const DST: IpAddr = IpAddr::V4(Ipv4Addr::new(224, 0, 0, 18));

/// The v3 advert keepalived sent, as bytes: 31 33 96 01 00 64 42 ad 0a 63 00 64.
const V3: [u8; 12] = [
    0x31, 0x33, 0x96, 0x01, 0x00, 0x64, 0x42, 0xad, 0x0a, 0x63, 0x00, 0x64,
];

fn decode(bytes: &[u8]) -> Result<Advertisement, DecodeError> {
    Advertisement::decode(bytes, SRC, DST)
}

/// Sets a field and fixes the checksum (RFC 1071 sum over the IPv4
/// pseudo-header of SRC -> DST and the message), so only the field is wrong.
fn with(mut b: Vec<u8>, at: usize, value: u8) -> Vec<u8> {
    b[at] = value;
    b[6] = 0;
    b[7] = 0;
    let pseudo = [0x0a63, 0x0001, 0xe000, 0x0012, 112, b.len() as u32];
    let words = b
        .chunks(2)
        .map(|c| (u32::from(c[0]) << 8) | u32::from(*c.get(1).unwrap_or(&0)));
    let mut sum: u32 = pseudo.into_iter().chain(words).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    b[6..8].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    b
}

#[test]
fn the_checksum_helper_of_these_tests_agrees_with_keepalived() {
    assert_eq!(with(V3.to_vec(), 1, 0x33), V3.to_vec());
}

#[test]
fn malformed_adverts_are_rejected_by_name() {
    assert_eq!(
        decode(&V3[..7]),
        Err(DecodeError::Truncated { len: 7, need: 8 })
    );
    assert_eq!(
        decode(&with(V3.to_vec(), 0, 0x41)),
        Err(DecodeError::Version(4))
    );
    assert_eq!(
        decode(&with(V3.to_vec(), 0, 0x32)),
        Err(DecodeError::Type(2))
    );
    assert_eq!(decode(&with(V3.to_vec(), 1, 0)), Err(DecodeError::ZeroVrid));
    assert!(matches!(
        decode(&with(V3.to_vec(), 3, 2)),
        Err(DecodeError::LengthMismatch {
            count: 2,
            expected: 16,
            ..
        })
    ));
    assert_eq!(
        decode(&with(V3.to_vec(), 3, 0)),
        Err(DecodeError::NoAddress)
    );
    assert_eq!(
        decode(&with(with(V3.to_vec(), 4, 0), 5, 0)),
        Err(DecodeError::ZeroInterval)
    );
    let mut bad = V3;
    bad[7] ^= 0xff;
    assert!(matches!(
        decode(&bad),
        Err(DecodeError::Checksum {
            found: 0x4252,
            computed: 0x42ad
        })
    ));
    // The pseudo-header counts: the same bytes from another source fail.
    assert!(matches!(
        Advertisement::decode(&V3, IpAddr::V4(Ipv4Addr::new(10, 99, 0, 2)), DST),
        Err(DecodeError::Checksum { .. })
    ));
    let mut long = V3.to_vec();
    long.push(0);
    assert!(matches!(
        decode(&long),
        Err(DecodeError::LengthMismatch { len: 13, .. })
    ));
}

#[test]
fn forwarded_or_foreign_ip_packets_are_rejected() {
    let frame = &pcap_frames("keepalived-v3ipv4.pcap")[0];
    let mut ip = frame[14..].to_vec();
    ip[8] = 254;
    assert_eq!(parse_ipv4(&ip), Err(DecodeError::Ttl(254)));
    ip[8] = 255;
    ip[9] = 6;
    assert_eq!(parse_ipv4(&ip), Err(DecodeError::IpProtocol(6)));
    assert!(matches!(
        parse_ipv4(&ip[..10]),
        Err(DecodeError::Truncated { .. })
    ));
}

#[test]
fn encode_refuses_what_the_wire_cannot_carry() {
    let adv = |version, cs, addresses: Vec<IpAddr>| Advertisement {
        version,
        vrid: 1,
        priority: 100,
        advert_interval_cs: cs,
        addresses,
    };
    let v4 = vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))];
    assert_eq!(
        adv(Version::V3, 0, v4.clone()).encode(SRC, DST),
        Err(EncodeError::Interval(0))
    );
    assert_eq!(
        adv(Version::V3, 4096, v4.clone()).encode(SRC, DST),
        Err(EncodeError::Interval(4096))
    );
    assert_eq!(
        adv(Version::V2, 150, v4.clone()).encode(SRC, DST),
        Err(EncodeError::Interval(150))
    );
    assert_eq!(
        adv(Version::V3, 1, vec![]).encode(SRC, DST),
        Err(EncodeError::NoAddress)
    );
    let v6: IpAddr = "fd00::1".parse().unwrap();
    assert_eq!(
        adv(Version::V3, 1, vec![v6]).encode(SRC, DST),
        Err(EncodeError::AddressFamily(v6))
    );
    let ll: IpAddr = "fe80::1".parse().unwrap();
    let group: IpAddr = "ff02::12".parse().unwrap();
    assert_eq!(
        adv(Version::V2, 100, vec![v6]).encode(ll, group),
        Err(EncodeError::V2OverIpv6)
    );
    // 10 ms, the smallest v3 interval, round-trips.
    let fast = adv(Version::V3, 1, v4);
    let bytes = fast.encode(SRC, DST).unwrap();
    assert_eq!(Advertisement::decode(&bytes, SRC, DST).unwrap(), fast);
}

#[test]
fn no_byte_string_makes_the_decoder_panic() {
    // Every length up to 64 with a few fill patterns, and every single-byte
    // corruption of the real advert.
    for len in 0..64 {
        for fill in [0x00u8, 0x31, 0xff] {
            let _ = decode(&vec![fill; len]);
            let _ = Advertisement::decode(
                &vec![fill; len],
                "fe80::1".parse().unwrap(),
                "ff02::12".parse().unwrap(),
            );
        }
    }
    for at in 0..V3.len() {
        for v in 0..=255u8 {
            let mut b = V3;
            b[at] = v;
            let _ = decode(&b);
        }
    }
}
