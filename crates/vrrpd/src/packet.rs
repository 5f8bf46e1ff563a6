//! The VRRP wire format, and nothing else: VRRPv3 (RFC 5798 §5) over IPv4 and
//! IPv6, and VRRPv2 (RFC 3768 §5), keepalived's default. No sockets, no state.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// IP protocol number of VRRP (RFC 5798 §5.1.1.4).
pub const IP_PROTOCOL: u8 = 112;
/// Where adverts go (RFC 5798 §5.1.1.2, §5.1.2.2).
pub const IPV4_GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 18);
pub const IPV6_GROUP: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x12);
/// Adverts are sent with, and only accepted with, TTL / hop limit 255, which
/// proves they were not forwarded (RFC 5798 §5.1.1.3, §7.1).
pub const TTL: u8 = 255;

const HEADER_LEN: usize = 8;
/// VRRPv2 carries 8 bytes of (obsolete) authentication data after the addresses.
const V2_AUTH_LEN: usize = 8;
const TYPE_ADVERTISEMENT: u8 = 1;
/// The 12-bit Max Adver Int field of VRRPv3, in centiseconds.
pub const MAX_ADVERT_INTERVAL_CS: u16 = 0x0fff;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    V2,
    V3,
}

/// One advertisement, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advertisement {
    pub version: Version,
    pub vrid: u8,
    pub priority: u8,
    /// VRRPv3: Max Adver Int (centiseconds). VRRPv2: Adver Int, which is in
    /// whole seconds on the wire, converted to centiseconds here.
    pub advert_interval_cs: u16,
    /// The virtual addresses, all of the family of the carrying IP packet.
    pub addresses: Vec<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("packet too short: {len} bytes, need at least {need}")]
    Truncated { len: usize, need: usize },
    #[error(
        "packet length {len} does not match its address count {count} (expected {expected} bytes)"
    )]
    LengthMismatch {
        len: usize,
        count: u8,
        expected: usize,
    },
    #[error("unsupported VRRP version {0}")]
    Version(u8),
    #[error("unknown VRRP type {0} (only 1, advertisement, exists)")]
    Type(u8),
    #[error("virtual router id 0 is not valid")]
    ZeroVrid,
    #[error("advertisement carries no address")]
    NoAddress,
    #[error("advertisement interval 0 is not valid")]
    ZeroInterval,
    #[error("bad checksum: packet says {found:#06x}, computed {computed:#06x}")]
    Checksum { found: u16, computed: u16 },
    #[error("VRRPv2 authentication type {0} is not supported (only 0, none)")]
    Authentication(u8),
    #[error("VRRPv2 over IPv6 does not exist")]
    V2OverIpv6,
    #[error("IP source and destination are of different families")]
    MixedFamilies,
    #[error("TTL / hop limit {0}, must be 255: the packet was forwarded")]
    Ttl(u8),
    #[error("not an IPv4 packet (version {0})")]
    IpVersion(u8),
    #[error("IP protocol {0} is not VRRP (112)")]
    IpProtocol(u8),
    #[error("bad IPv4 header length {0}")]
    IpHeaderLength(usize),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("{0} addresses do not fit the 8-bit address count")]
    TooManyAddresses(usize),
    #[error("an advertisement needs at least one address")]
    NoAddress,
    #[error("address {0} is not of the family of the IP header")]
    AddressFamily(IpAddr),
    #[error(
        "advertisement interval {0} cs does not fit the field (v3: 1-4095 cs; v2: whole seconds 1-255)"
    )]
    Interval(u16),
    #[error("VRRPv2 over IPv6 does not exist")]
    V2OverIpv6,
}

impl Advertisement {
    /// The VRRP message (no IP header), checksummed for the given IP source
    /// and destination: VRRPv3 sums the IP pseudo-header too (RFC 5798
    /// §5.2.8); VRRPv2 sums the message only (RFC 3768 §5.3.8).
    pub fn encode(&self, src: IpAddr, dst: IpAddr) -> Result<Vec<u8>, EncodeError> {
        let v6 = dst.is_ipv6();
        if src.is_ipv6() != v6 {
            return Err(EncodeError::AddressFamily(src));
        }
        if self.addresses.is_empty() {
            return Err(EncodeError::NoAddress);
        }
        let count = u8::try_from(self.addresses.len())
            .map_err(|_| EncodeError::TooManyAddresses(self.addresses.len()))?;
        if let Some(a) = self.addresses.iter().find(|a| a.is_ipv6() != v6) {
            return Err(EncodeError::AddressFamily(*a));
        }
        let cs = self.advert_interval_cs;
        let mut buf = Vec::with_capacity(HEADER_LEN + self.addresses.len() * 16 + V2_AUTH_LEN);
        match self.version {
            Version::V3 => {
                if cs == 0 || cs > MAX_ADVERT_INTERVAL_CS {
                    return Err(EncodeError::Interval(cs));
                }
                buf.extend_from_slice(&[
                    (3 << 4) | TYPE_ADVERTISEMENT,
                    self.vrid,
                    self.priority,
                    count,
                ]);
                buf.extend_from_slice(&cs.to_be_bytes());
            }
            Version::V2 => {
                if v6 {
                    return Err(EncodeError::V2OverIpv6);
                }
                let secs = cs / 100;
                if !cs.is_multiple_of(100) || secs == 0 || secs > 255 {
                    return Err(EncodeError::Interval(cs));
                }
                // Auth type 0 (none), then Adver Int in seconds.
                buf.extend_from_slice(&[
                    (2 << 4) | TYPE_ADVERTISEMENT,
                    self.vrid,
                    self.priority,
                    count,
                    0,
                    secs as u8,
                ]);
            }
        }
        buf.extend_from_slice(&[0, 0]);
        for a in &self.addresses {
            match a {
                IpAddr::V4(a) => buf.extend_from_slice(&a.octets()),
                IpAddr::V6(a) => buf.extend_from_slice(&a.octets()),
            }
        }
        if self.version == Version::V2 {
            buf.extend_from_slice(&[0; V2_AUTH_LEN]);
        }
        let sum = checksum(self.version, src, dst, &buf);
        buf[6..8].copy_from_slice(&sum.to_be_bytes());
        Ok(buf)
    }

    /// Decodes a VRRP message carried from `src` to `dst`, checking every
    /// field RFC 5798 §7.1 asks a receiver to check that the message alone
    /// can tell (TTL is the caller's, from the IP header).
    pub fn decode(buf: &[u8], src: IpAddr, dst: IpAddr) -> Result<Advertisement, DecodeError> {
        if src.is_ipv6() != dst.is_ipv6() {
            return Err(DecodeError::MixedFamilies);
        }
        if buf.len() < HEADER_LEN {
            return Err(DecodeError::Truncated {
                len: buf.len(),
                need: HEADER_LEN,
            });
        }
        let version = match buf[0] >> 4 {
            2 => Version::V2,
            3 => Version::V3,
            v => return Err(DecodeError::Version(v)),
        };
        if buf[0] & 0x0f != TYPE_ADVERTISEMENT {
            return Err(DecodeError::Type(buf[0] & 0x0f));
        }
        let (vrid, priority, count) = (buf[1], buf[2], buf[3]);
        if vrid == 0 {
            return Err(DecodeError::ZeroVrid);
        }
        if count == 0 {
            return Err(DecodeError::NoAddress);
        }
        let v6 = dst.is_ipv6();
        if v6 && version == Version::V2 {
            return Err(DecodeError::V2OverIpv6);
        }
        let alen = if v6 { 16 } else { 4 };
        let trailer = if version == Version::V2 {
            V2_AUTH_LEN
        } else {
            0
        };
        let expected = HEADER_LEN + usize::from(count) * alen + trailer;
        if buf.len() != expected {
            return Err(DecodeError::LengthMismatch {
                len: buf.len(),
                count,
                expected,
            });
        }
        let advert_interval_cs = match version {
            // The top 4 bits are reserved: ignored on reception (§5.2.6).
            Version::V3 => u16::from_be_bytes([buf[4], buf[5]]) & MAX_ADVERT_INTERVAL_CS,
            Version::V2 => {
                if buf[4] != 0 {
                    return Err(DecodeError::Authentication(buf[4]));
                }
                u16::from(buf[5]) * 100
            }
        };
        if advert_interval_cs == 0 {
            return Err(DecodeError::ZeroInterval);
        }
        let found = u16::from_be_bytes([buf[6], buf[7]]);
        let mut zeroed = buf.to_vec();
        zeroed[6] = 0;
        zeroed[7] = 0;
        let computed = checksum(version, src, dst, &zeroed);
        if found != computed {
            return Err(DecodeError::Checksum { found, computed });
        }
        let addresses = buf[HEADER_LEN..HEADER_LEN + usize::from(count) * alen]
            .chunks_exact(alen)
            .map(|c| match <[u8; 16]>::try_from(c) {
                Ok(b) => IpAddr::V6(Ipv6Addr::from(b)),
                Err(_) => IpAddr::V4(Ipv4Addr::new(c[0], c[1], c[2], c[3])),
            })
            .collect();
        Ok(Advertisement {
            version,
            vrid,
            priority,
            advert_interval_cs,
            addresses,
        })
    }
}

/// What the I/O shell needs from an IPv4 datagram read on a raw socket (which
/// returns the IP header): addresses, and proof that TTL is 255.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Envelope<'a> {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub payload: &'a [u8],
}

/// Splits an IPv4 datagram into header facts and VRRP payload, enforcing
/// protocol 112 and TTL 255 (RFC 5798 §7.1).
pub fn parse_ipv4(datagram: &[u8]) -> Result<Ipv4Envelope<'_>, DecodeError> {
    if datagram.len() < 20 {
        return Err(DecodeError::Truncated {
            len: datagram.len(),
            need: 20,
        });
    }
    if datagram[0] >> 4 != 4 {
        return Err(DecodeError::IpVersion(datagram[0] >> 4));
    }
    let ihl = usize::from(datagram[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([datagram[2], datagram[3]]));
    if ihl < 20 || ihl > datagram.len() || total < ihl {
        return Err(DecodeError::IpHeaderLength(ihl));
    }
    if datagram[9] != IP_PROTOCOL {
        return Err(DecodeError::IpProtocol(datagram[9]));
    }
    if datagram[8] != TTL {
        return Err(DecodeError::Ttl(datagram[8]));
    }
    // The kernel may hand over fewer bytes than total length claims only if
    // truncated; trust the shorter of the two.
    let end = total.min(datagram.len());
    Ok(Ipv4Envelope {
        src: Ipv4Addr::new(datagram[12], datagram[13], datagram[14], datagram[15]),
        dst: Ipv4Addr::new(datagram[16], datagram[17], datagram[18], datagram[19]),
        payload: &datagram[ihl..end],
    })
}

fn checksum(version: Version, src: IpAddr, dst: IpAddr, msg: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    if version == Version::V3 {
        let len = msg.len() as u32;
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                // IPv4 pseudo-header: src, dst, zero, protocol, length.
                sum = add_words(sum, &s.octets());
                sum = add_words(sum, &d.octets());
                sum += u32::from(IP_PROTOCOL);
                sum += len;
            }
            (s, d) => {
                // IPv6 pseudo-header (RFC 2460 §8.1): src, dst, length, next header.
                sum = add_words(sum, &ip6_octets(s));
                sum = add_words(sum, &ip6_octets(d));
                sum += len >> 16;
                sum += len & 0xffff;
                sum += u32::from(IP_PROTOCOL);
            }
        }
    }
    sum = add_words(sum, msg);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ip6_octets(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V6(a) => a.octets(),
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
    }
}

fn add_words(mut sum: u32, bytes: &[u8]) -> u32 {
    let mut chunks = bytes.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}
