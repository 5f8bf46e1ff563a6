//! Preflight of the VRRP virtual router id: this node listens on the
//! cluster interface for VRRP adverts (IP protocol 112, the 224.0.0.18 /
//! ff02::12 group) for more than three advert intervals, and a VRID another
//! router already advertises there is refused, naming the source. Two
//! routers on one VRID fight over the role: a neighbouring keepalived pair
//! on its sample VRID 51 would demote our master.
//!
//! The header is read leniently on purpose ([`parse`]): any well-formed
//! VRRPv2/v3 advertisement counts, whatever its authentication or
//! checksum, because a router vrrpd would drop still holds the VRID.

use std::collections::BTreeMap;
use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use socket2::{Domain, InterfaceIndexOrAddress, Protocol, Socket, Type};

/// IP protocol number of VRRP (RFC 5798 §5.1.1.4).
const IP_PROTOCOL: u8 = 112;
const IPV4_GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 18);
const IPV6_GROUP: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x12);

/// How long preflight listens: a little more than three advert intervals
/// of the new cluster (and of keepalived's default), so a router that
/// advertises at 1 s is heard at least three times.
pub fn listen_time(advert_interval_ms: u32) -> Duration {
    Duration::from_millis(u64::from(advert_interval_ms.max(1000)) * 33 / 10)
}

/// One VRRP advertisement, as far as preflight cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heard {
    pub source: IpAddr,
    /// 2 or 3.
    pub version: u8,
    pub vrid: u8,
    pub priority: u8,
}

/// Reads the VRRP header of `payload` (RFC 5798 §5.1, RFC 3768 §5.1: the
/// version and type nibbles, the VRID, the priority); None when it is not
/// an advertisement.
pub fn parse(source: IpAddr, payload: &[u8]) -> Option<Heard> {
    let (&first, rest) = payload.split_first()?;
    let (&vrid, rest) = rest.split_first()?;
    let &priority = rest.first()?;
    let version = first >> 4;
    if !(version == 2 || version == 3) || first & 0x0f != 1 || vrid == 0 {
        return None;
    }
    Some(Heard {
        source,
        version,
        vrid,
        priority,
    })
}

/// The source and VRRP payload of an IPv4 datagram read on a raw socket
/// (which hands over the IP header).
pub fn parse_ipv4(datagram: &[u8]) -> Option<(IpAddr, &[u8])> {
    let ihl = usize::from(*datagram.first()? & 0x0f) * 4;
    if datagram.first()? >> 4 != 4 || ihl < 20 || datagram.len() < ihl {
        return None;
    }
    if *datagram.get(9)? != IP_PROTOCOL {
        return None;
    }
    let src = Ipv4Addr::new(datagram[12], datagram[13], datagram[14], datagram[15]);
    Some((IpAddr::V4(src), &datagram[ihl..]))
}

/// Every VRRP speaker heard, by (source, VRID): adverts counted, the last
/// one kept.
pub type Speakers = BTreeMap<(IpAddr, u8), (Heard, u32)>;

/// Listens on `ifname` (index `ifindex`) for `duration`. Blocking: run it
/// on a blocking thread. IPv6 when `family_v6`.
pub fn listen(
    ifname: &str,
    ifindex: u32,
    family_v6: bool,
    duration: Duration,
) -> io::Result<Speakers> {
    let domain = if family_v6 {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let sock = Socket::new(
        domain,
        Type::RAW,
        Some(Protocol::from(i32::from(IP_PROTOCOL))),
    )?;
    sock.bind_device(Some(ifname.as_bytes()))?;
    if family_v6 {
        sock.join_multicast_v6(&IPV6_GROUP, ifindex)?;
    } else {
        sock.join_multicast_v4_n(&IPV4_GROUP, &InterfaceIndexOrAddress::Index(ifindex))?;
    }
    let mut heard = Speakers::new();
    let deadline = Instant::now() + duration;
    let mut buf = [MaybeUninit::<u8>::uninit(); 2048];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(heard);
        }
        sock.set_read_timeout(Some(left))?;
        let (len, from) = match sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(heard);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        // SAFETY: recv_from initialised the first `len` bytes.
        let data: &[u8] =
            unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), len.min(buf.len())) };
        let packet = if family_v6 {
            from.as_socket().map(|a| (a.ip(), data))
        } else {
            parse_ipv4(data)
        };
        if let Some(h) = packet.and_then(|(src, payload)| parse(src, payload)) {
            let e = heard.entry((h.source, h.vrid)).or_insert((h, 0));
            e.0 = h;
            e.1 += 1;
        }
    }
}

/// A listener running on a blocking thread, and for how long it listens.
pub struct Listening {
    pub handle: tokio::task::JoinHandle<io::Result<Speakers>>,
    pub ifname: String,
    pub duration: Duration,
}

/// Starts listening on the interface that holds the plan's local address
/// (or the node's configured cluster interface); None when this node has
/// no such interface (preflight refuses that anyway).
pub async fn start_listening(plan: &super::Plan, configured: Option<&str>) -> Option<Listening> {
    let ifname = match super::facts::run_local("ip", &["-o", "addr", "show"]).await {
        Ok(text) => super::facts::parse_ip_addr(&text)
            .into_iter()
            .find(|(_, n)| n.addr == plan.local_ip)
            .map(|(i, _)| i),
        Err(_) => None,
    }
    .or_else(|| configured.map(str::to_owned))?;
    let ifindex = nix::net::if_::if_nametoindex(ifname.as_str()).ok()?;
    let duration = listen_time(tandem_config::VrrpSettings::default().advert_interval_ms);
    let v6 = plan.local_ip.is_ipv6();
    let name = ifname.clone();
    let handle = tokio::task::spawn_blocking(move || listen(&name, ifindex, v6, duration));
    Some(Listening {
        handle,
        ifname,
        duration,
    })
}

/// Judges the VRID against what was heard: Err with the sentence to show
/// when another router advertises it. `peer` is the other node's cluster
/// address (a peer still in another cluster is named as such).
pub fn judge(
    vrid: u8,
    chosen: bool,
    heard: &Speakers,
    peer: IpAddr,
    listened: Duration,
) -> Result<(), String> {
    let users: Vec<String> = heard
        .values()
        .filter(|(h, _)| h.vrid == vrid)
        .map(|(h, n)| {
            let who = if h.source == peer {
                format!("{} (the peer itself: it is still in a cluster)", h.source)
            } else {
                h.source.to_string()
            };
            format!(
                "{who} advertises it (VRRPv{}, priority {}, {n} advert(s) in {:.1} s)",
                h.version,
                h.priority,
                listened.as_secs_f64()
            )
        })
        .collect();
    if users.is_empty() {
        return Ok(());
    }
    Err(format!(
        "virtual router id {vrid}{} is in use on the cluster link: {}; choose another with --vrid (free: {})",
        if chosen { "" } else { " (the default)" },
        users.join("; "),
        free_vrid(vrid, heard)
    ))
}

/// The first VRID after `from` that nobody advertises (never 51).
pub fn free_vrid(from: u8, heard: &Speakers) -> u8 {
    let used = |v: u8| v == 51 || heard.values().any(|(h, _)| h.vrid == v);
    (1..=255u16)
        .map(|i| ((u16::from(from) - 1 + i) % 255 + 1) as u8)
        .find(|v| !used(*v))
        .unwrap_or(from)
}

/// Other routers heard on the link (not on our VRID), for the summary.
pub fn others(vrid: u8, heard: &Speakers) -> Vec<String> {
    heard
        .values()
        .filter(|(h, _)| h.vrid != vrid)
        .map(|(h, _)| format!("VRID {} from {}", h.vrid, h.source))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VRRPv2 advertisement as keepalived sends it (RFC 3768 §5.1):
    /// version 2 type 1, VRID 51, priority 100, 1 address, auth type 1
    /// (simple password, which vrrpd itself would refuse), 1 s, checksum,
    /// 10.0.0.100, then 8 bytes of password — inside its IPv4 header
    /// (TTL 255, protocol 112, 192.168.100.9 → 224.0.0.18).
    const KEEPALIVED_V2: [u8; 48] = [
        0x45, 0xc0, 0x00, 0x30, 0x00, 0x00, 0x00, 0x00, 0xff, 0x70, 0x00, 0x00, // IPv4
        192, 168, 100, 9, 224, 0, 0, 18, // src, dst
        0x21, 51, 100, 1, 1, 1, 0xaa, 0xbb, // VRRP header (checksum not checked)
        10, 0, 0, 100, // address
        b's', b'e', b'c', b'r', b'e', b't', 0, 0, // auth data
        0, 0, 0, 0, 0, 0, 0, 0, // padding left in the buffer
    ];

    #[test]
    fn a_keepalived_advert_is_heard_whatever_its_authentication() {
        let (src, payload) = parse_ipv4(&KEEPALIVED_V2).unwrap();
        assert_eq!(src, "192.168.100.9".parse::<IpAddr>().unwrap());
        let h = parse(src, payload).unwrap();
        assert_eq!((h.version, h.vrid, h.priority), (2, 51, 100));
    }

    #[test]
    fn a_vrrpv3_advert_is_heard_and_other_packets_are_not() {
        let v3 = [0x31, 159, 150, 1, 0x00, 0x64, 0, 0, 10, 0, 0, 100];
        let src: IpAddr = "fe80::1".parse().unwrap();
        let h = parse(src, &v3).unwrap();
        assert_eq!((h.version, h.vrid, h.priority), (3, 159, 150));
        // Type 2, version 1, VRID 0, too short.
        for bad in [&[0x32, 1, 1][..], &[0x11, 1, 1], &[0x31, 0, 1], &[0x31, 5]] {
            assert_eq!(parse(src, bad), None, "{bad:?}");
        }
        // Not protocol 112.
        let mut udp = KEEPALIVED_V2;
        udp[9] = 17;
        assert_eq!(parse_ipv4(&udp), None);
    }

    fn heard(list: &[(&str, u8, u8)]) -> Speakers {
        let mut s = Speakers::new();
        for (src, vrid, prio) in list {
            let h = Heard {
                source: src.parse().unwrap(),
                version: 2,
                vrid: *vrid,
                priority: *prio,
            };
            s.insert((h.source, h.vrid), (h, 4));
        }
        s
    }

    #[test]
    fn a_vrid_in_use_is_refused_naming_the_source_and_a_free_one() {
        let peer: IpAddr = "192.168.100.2".parse().unwrap();
        let s = heard(&[("192.168.100.9", 159, 254), ("192.168.100.8", 160, 100)]);
        let t = Duration::from_millis(3300);
        assert!(judge(161, true, &s, peer, t).is_ok());
        let e = judge(159, false, &s, peer, t).unwrap_err();
        assert_eq!(
            e,
            "virtual router id 159 (the default) is in use on the cluster link: 192.168.100.9 advertises it (VRRPv2, priority 254, 4 advert(s) in 3.3 s); choose another with --vrid (free: 161)"
        );
        let s = heard(&[("192.168.100.2", 7, 100)]);
        let e = judge(7, true, &s, peer, t).unwrap_err();
        assert!(e.contains("the peer itself"), "{e}");
        assert_eq!(
            others(159, &heard(&[("10.9.9.9", 51, 1)])),
            ["VRID 51 from 10.9.9.9"]
        );
        assert_eq!(
            free_vrid(50, &heard(&[("10.9.9.9", 50, 1)])),
            52,
            "never 51"
        );
        assert_eq!(free_vrid(255, &heard(&[("10.9.9.9", 255, 1)])), 1);
    }
}
