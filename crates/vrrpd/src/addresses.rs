//! Floating IPs: added and removed with rtnetlink, announced with gratuitous
//! ARP (IPv4) or unsolicited neighbour advertisements (IPv6) so switches and
//! neighbours move their entries to this node at once.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, CacheInfo,
};
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};
use rtnetlink::Handle;
use socket2::{Domain, Protocol, SockAddr, SockAddrStorage, Socket, Type};

/// One floating IP as vrrpd manages it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FloatingIp {
    pub address: IpAddr,
    pub prefix_len: u8,
    pub interface: String,
}

impl std::fmt::Display for FloatingIp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} dev {}",
            self.address, self.prefix_len, self.interface
        )
    }
}

impl FloatingIp {
    /// `10.0.0.100/24`, as log lines name it.
    pub fn cidr(&self) -> String {
        format!("{}/{}", self.address, self.prefix_len)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    #[error("interface {0} does not exist")]
    NoInterface(String),
    #[error("interface {interface}: {source}")]
    Netlink {
        interface: String,
        source: rtnetlink::Error,
    },
    #[error("announcing {ip} on {interface}: {source}")]
    Announce {
        ip: IpAddr,
        interface: String,
        source: io::Error,
    },
}

/// What we know of an interface: index and MAC (for ARP / NA).
#[derive(Debug, Clone, Copy)]
pub struct Link {
    pub index: u32,
    pub mac: [u8; 6],
}

/// rtnetlink in this daemon's network namespace.
#[derive(Clone)]
pub struct Addresses {
    handle: Handle,
}

impl Addresses {
    pub fn new() -> io::Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(conn);
        Ok(Addresses { handle })
    }

    pub async fn link(&self, name: &str) -> Result<Link, AddressError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        let msg = match links.try_next().await {
            Ok(Some(m)) => m,
            Ok(None) => return Err(AddressError::NoInterface(name.to_owned())),
            // ENODEV comes back as an error, not an empty dump.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
                return Err(AddressError::NoInterface(name.to_owned()));
            }
            Err(source) => {
                return Err(AddressError::Netlink {
                    interface: name.to_owned(),
                    source,
                });
            }
        };
        let mut mac = [0u8; 6];
        for attr in &msg.attributes {
            if let LinkAttribute::Address(bytes) = attr
                && bytes.len() == 6
            {
                mac.copy_from_slice(bytes);
            }
        }
        Ok(Link {
            index: msg.header.index,
            mac,
        })
    }

    /// The interface's IPv6 link-local address: the source of VRRPv3 over
    /// IPv6 (RFC 5798 §5.1.2.1).
    pub async fn link_local_v6(
        &self,
        link: &Link,
        name: &str,
    ) -> Result<Option<Ipv6Addr>, AddressError> {
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(link.index)
            .execute();
        while let Some(msg) = addrs
            .try_next()
            .await
            .map_err(|source| AddressError::Netlink {
                interface: name.to_owned(),
                source,
            })?
        {
            for attr in &msg.attributes {
                if let AddressAttribute::Address(IpAddr::V6(a)) = attr
                    && a.segments()[0] & 0xffc0 == 0xfe80
                {
                    return Ok(Some(*a));
                }
            }
        }
        Ok(None)
    }

    /// Adds the address (idempotent: NLM_F_REPLACE), without duplicate
    /// address detection for IPv6 so it is usable at once. With a
    /// `lifetime`, the kernel removes the address by itself once that much
    /// time passed since the last add or [`Addresses::refresh`].
    pub async fn add(
        &self,
        ip: &FloatingIp,
        lifetime: Option<std::time::Duration>,
    ) -> Result<Link, AddressError> {
        let link = self.link(&ip.interface).await?;
        self.add_on(ip, &link, lifetime).await?;
        Ok(link)
    }

    /// Re-adds the address on a link already looked up, restarting its
    /// lifetime (NLM_F_REPLACE with IFA_CACHEINFO updates the existing
    /// address in place, or adds it again if it expired).
    pub async fn refresh(
        &self,
        ip: &FloatingIp,
        link: &Link,
        lifetime: std::time::Duration,
    ) -> Result<(), AddressError> {
        self.add_on(ip, link, Some(lifetime)).await
    }

    async fn add_on(
        &self,
        ip: &FloatingIp,
        link: &Link,
        lifetime: Option<std::time::Duration>,
    ) -> Result<(), AddressError> {
        let mut req = self
            .handle
            .address()
            .add(link.index, ip.address, ip.prefix_len)
            .replace();
        let msg = req.message_mut();
        if ip.address.is_ipv6() {
            msg.header.flags |= AddressHeaderFlags::Nodad;
            msg.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        if let Some(l) = lifetime {
            let secs = u32::try_from(l.as_secs().max(1)).unwrap_or(u32::MAX);
            let mut info = CacheInfo::default();
            info.ifa_valid = secs;
            info.ifa_preferred = secs;
            msg.attributes.push(AddressAttribute::CacheInfo(info));
        }
        req.execute().await.map_err(|source| AddressError::Netlink {
            interface: ip.interface.clone(),
            source,
        })
    }

    /// The link-layer address the neighbour table holds for `addr` on
    /// interface `ifindex`, if the entry is resolved.
    pub async fn neighbour_mac(
        &self,
        ifindex: u32,
        addr: IpAddr,
        ifname: &str,
    ) -> Result<Option<[u8; 6]>, AddressError> {
        let family = if addr.is_ipv6() {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        let mut dump = self
            .handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute();
        while let Some(msg) = dump
            .try_next()
            .await
            .map_err(|source| AddressError::Netlink {
                interface: ifname.to_owned(),
                source,
            })?
        {
            if msg.header.ifindex != ifindex
                || !matches!(
                    msg.header.state,
                    NeighbourState::Reachable
                        | NeighbourState::Stale
                        | NeighbourState::Delay
                        | NeighbourState::Probe
                        | NeighbourState::Permanent
                )
            {
                continue;
            }
            let mut dest = None;
            let mut mac = None;
            for attr in &msg.attributes {
                match attr {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                        dest = Some(IpAddr::V6(*a));
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                        dest = Some(IpAddr::V4(*a));
                    }
                    NeighbourAttribute::LinkLayerAddress(b) => {
                        mac = <[u8; 6]>::try_from(b.as_slice()).ok();
                    }
                    _ => {}
                }
            }
            if dest == Some(addr) && mac.is_some() {
                return Ok(mac);
            }
        }
        Ok(None)
    }

    /// Removes the address if present. Returns whether it was there.
    pub async fn remove(&self, ip: &FloatingIp) -> Result<bool, AddressError> {
        let link = match self.link(&ip.interface).await {
            Ok(l) => l,
            // No interface, no address to remove.
            Err(AddressError::NoInterface(_)) => return Ok(false),
            Err(e) => return Err(e),
        };
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(link.index)
            .set_address_filter(ip.address)
            .set_prefix_length_filter(ip.prefix_len)
            .execute();
        let mut removed = false;
        while let Some(msg) = addrs
            .try_next()
            .await
            .map_err(|source| AddressError::Netlink {
                interface: ip.interface.clone(),
                source,
            })?
        {
            self.handle
                .address()
                .del(msg)
                .execute()
                .await
                .map_err(|source| AddressError::Netlink {
                    interface: ip.interface.clone(),
                    source,
                })?;
            removed = true;
        }
        Ok(removed)
    }
}

/// Sends gratuitous ARP (an ARP request for our own address, RFC 5227 §3
/// "ARP Announcement") and unsolicited neighbour advertisements (RFC 4861
/// §7.2.6, Override set). The sockets are opened once per VRRP instance:
/// closing an AF_PACKET socket waits for an RCU grace period (measured 9-16
/// ms here), which per announcement would delay the next floating IP's.
pub struct Announcer {
    arp: Socket,
    /// None where IPv6 is disabled.
    icmp6: Option<Socket>,
}

impl Announcer {
    pub fn new() -> io::Result<Self> {
        let arp = Socket::new(
            Domain::PACKET,
            Type::DGRAM,
            Some(Protocol::from(i32::from(ETH_P_ARP.to_be()))),
        )?;
        let icmp6 = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))
            .and_then(|s| {
                // RFC 4861 §7.1.2: hop limit 255 or receivers drop it.
                s.set_multicast_hops_v6(255)?;
                Ok(s)
            })
            .ok();
        Ok(Announcer { arp, icmp6 })
    }

    /// One announcement of `ip` out of `link`.
    pub fn announce(&self, ip: &FloatingIp, link: &Link) -> Result<(), AddressError> {
        let result = match ip.address {
            IpAddr::V4(a) => self.gratuitous_arp(link, a),
            IpAddr::V6(a) => self.unsolicited_na(link, a),
        };
        result.map_err(|source| AddressError::Announce {
            ip: ip.address,
            interface: ip.interface.clone(),
            source,
        })
    }

    fn gratuitous_arp(&self, link: &Link, ip: Ipv4Addr) -> io::Result<()> {
        let mut storage = SockAddrStorage::zeroed();
        // SAFETY: sockaddr_ll fits in sockaddr_storage; we fill every field
        // the kernel reads for an AF_PACKET SOCK_DGRAM send.
        let addr = unsafe {
            let ll = storage.view_as::<libc::sockaddr_ll>();
            ll.sll_family = libc::AF_PACKET as u16;
            ll.sll_protocol = ETH_P_ARP.to_be();
            ll.sll_ifindex = i32::try_from(link.index).unwrap_or(0);
            ll.sll_halen = 6;
            ll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
            SockAddr::new(
                storage,
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        self.arp.send_to(&arp_announcement(link.mac, ip), &addr)?;
        Ok(())
    }

    fn unsolicited_na(&self, link: &Link, ip: Ipv6Addr) -> io::Result<()> {
        let sock = self
            .icmp6
            .as_ref()
            .ok_or_else(|| io::Error::other("IPv6 is not available"))?;
        // The scope id picks the interface for the link-local multicast group.
        let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
        sock.send_to(
            &neighbour_advertisement(link.mac, ip),
            &SockAddr::from(std::net::SocketAddrV6::new(all_nodes, 0, 0, link.index)),
        )?;
        Ok(())
    }
}

const ETH_P_ARP: u16 = 0x0806;

/// The 28-byte ARP announcement: sender and target protocol address both
/// `ip`, target hardware address zero.
pub fn arp_announcement(mac: [u8; 6], ip: Ipv4Addr) -> [u8; 28] {
    let mut p = [0u8; 28];
    p[0..2].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    p[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    p[4] = 6;
    p[5] = 4;
    p[6..8].copy_from_slice(&1u16.to_be_bytes()); // request
    p[8..14].copy_from_slice(&mac);
    p[14..18].copy_from_slice(&ip.octets());
    p[24..28].copy_from_slice(&ip.octets());
    p
}

/// An unsolicited neighbour advertisement for `ip` (ICMPv6 type 136,
/// Override flag, target link-layer address option).
pub fn neighbour_advertisement(mac: [u8; 6], ip: Ipv6Addr) -> [u8; 32] {
    let mut p = [0u8; 32];
    p[0] = 136;
    // Checksum (p[2..4]) is filled in by the kernel for ICMPv6 raw sockets.
    p[4] = 0x20; // Override
    p[8..24].copy_from_slice(&ip.octets());
    p[24] = 2; // target link-layer address
    p[25] = 1; // length in units of 8 bytes
    p[26..32].copy_from_slice(&mac);
    p
}
