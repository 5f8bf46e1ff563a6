//! The VRRP socket: raw IP protocol 112 on the cluster interface, multicast
//! (224.0.0.18 / ff02::12) or unicast to the peer. Sends what the codec
//! encodes; hands received messages to the codec with the addresses and the
//! TTL / hop limit the RFC checks need.

use std::io::{self, IoSliceMut};
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;

use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrIn6, recvmsg, setsockopt, sockopt};
use socket2::{Domain, InterfaceIndexOrAddress, Protocol, SockAddr, Socket, Type};
use tokio::io::unix::AsyncFd;

use crate::packet::{self, Advertisement, DecodeError, IP_PROTOCOL, IPV4_GROUP, IPV6_GROUP, TTL};

/// A VRRP packet as received: its source (when the IP header could tell)
/// and the decoded advert, or why it was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    pub src: Option<IpAddr>,
    pub advert: Result<Advertisement, DecodeError>,
}

pub struct VrrpSocket {
    fd: AsyncFd<Socket>,
    /// Where adverts go: the group, or the peer in unicast mode.
    destination: IpAddr,
    /// The source the checksum is computed over (our primary address).
    source: IpAddr,
    ifindex: u32,
    buf: Vec<u8>,
}

impl VrrpSocket {
    /// Opens the socket on `ifname` (index `ifindex`). `source` is this
    /// node's address on the interface (for IPv6: its link-local address, as
    /// RFC 5798 §5.1.2.1 requires); `unicast_peer` replaces the multicast
    /// group for networks without multicast.
    pub fn open(
        ifname: &str,
        ifindex: u32,
        source: IpAddr,
        unicast_peer: Option<IpAddr>,
    ) -> io::Result<Self> {
        let sock = match source {
            IpAddr::V4(src) => open_v4(ifname, ifindex, src, unicast_peer.is_none())?,
            IpAddr::V6(_) => open_v6(ifname, ifindex, unicast_peer.is_none())?,
        };
        sock.set_nonblocking(true)?;
        let destination = unicast_peer.unwrap_or(match source {
            IpAddr::V4(_) => IpAddr::V4(IPV4_GROUP),
            IpAddr::V6(_) => IpAddr::V6(IPV6_GROUP),
        });
        // SAFETY: socket2's Socket owns its descriptor and always returns
        // the same one; it stays open until the AsyncFd drops it.
        let fd = unsafe { AsyncFd::register(sock) }.map_err(|e| io::Error::other(e.to_string()))?;
        Ok(VrrpSocket {
            fd,
            destination,
            source,
            ifindex,
            buf: vec![0; 2048],
        })
    }

    pub fn source(&self) -> IpAddr {
        self.source
    }

    pub fn destination(&self) -> IpAddr {
        self.destination
    }

    pub async fn send(&self, message: &[u8]) -> io::Result<()> {
        let to = SockAddr::from(SocketAddr::new(self.destination, 0));
        loop {
            let mut guard = self.fd.writable().await?;
            let res = guard.try_io(|s| match self.source {
                IpAddr::V4(_) => s.get_ref().send_to(message, &to).map(drop),
                IpAddr::V6(src) => {
                    send_v6(s.get_ref(), message, src, self.destination, self.ifindex)
                }
            });
            match res {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    /// The next VRRP packet. An I/O error is `Err`; a packet the checks
    /// refuse is an [`Inbound`] with the reason, so the caller can count it
    /// and go on.
    pub async fn recv(&mut self) -> io::Result<Inbound> {
        loop {
            let mut guard = self.fd.readable().await?;
            let v6 = self.source.is_ipv6();
            let buf = &mut self.buf;
            match guard.try_io(|s| read_one(s.get_ref(), buf, v6)) {
                Ok(r) => {
                    let (len, meta) = r?;
                    return Ok(inbound(&self.buf[..len], meta));
                }
                Err(_would_block) => continue,
            }
        }
    }

    /// A packet already queued on the socket, without waiting: `Ok(None)`
    /// when there is none. Used to drain the socket before acting on a
    /// timer that expired in the same wake-up.
    pub fn try_recv(&mut self) -> io::Result<Option<Inbound>> {
        let v6 = self.source.is_ipv6();
        match read_one(self.fd.get_ref(), &mut self.buf, v6) {
            Ok((len, meta)) => Ok(Some(inbound(&self.buf[..len], meta))),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }
}

fn read_one(sock: &Socket, buf: &mut [u8], v6: bool) -> io::Result<(usize, Option<V6Meta>)> {
    if v6 {
        recv_v6(sock, buf).map(|(n, m)| (n, Some(m)))
    } else {
        recv_v4(sock, buf).map(|n| (n, None))
    }
}

fn inbound(data: &[u8], meta: Option<V6Meta>) -> Inbound {
    match meta {
        None => {
            // The source as the header says, even when the checks fail, so
            // a refused packet can be logged with it.
            let src = (data.len() >= 20)
                .then(|| IpAddr::V4(Ipv4Addr::new(data[12], data[13], data[14], data[15])));
            let advert = packet::parse_ipv4(data)
                .and_then(|env| Advertisement::decode(env.payload, env.src.into(), env.dst.into()));
            Inbound { src, advert }
        }
        Some(m) => {
            let src = IpAddr::V6(m.src);
            let advert = if m.hop_limit != Some(TTL) {
                Err(DecodeError::Ttl(m.hop_limit.unwrap_or(0)))
            } else {
                Advertisement::decode(data, src, IpAddr::V6(m.dst.unwrap_or(IPV6_GROUP)))
            };
            Inbound {
                src: Some(src),
                advert,
            }
        }
    }
}

fn open_v4(ifname: &str, ifindex: u32, src: Ipv4Addr, multicast: bool) -> io::Result<Socket> {
    let sock = Socket::new(
        Domain::IPV4,
        Type::RAW,
        Some(Protocol::from(i32::from(IP_PROTOCOL))),
    )?;
    sock.bind_device(Some(ifname.as_bytes()))?;
    // RFC 5798 §5.1.1.3: TTL 255, so receivers can tell a packet was not routed.
    sock.set_ttl_v4(u32::from(TTL))?;
    sock.set_multicast_ttl_v4(u32::from(TTL))?;
    sock.set_multicast_loop_v4(false)?;
    sock.set_multicast_if_v4(&src)?;
    // DSCP CS6 (network control), as keepalived sends.
    sock.set_tos_v4(0xc0)?;
    if multicast {
        sock.join_multicast_v4_n(&IPV4_GROUP, &InterfaceIndexOrAddress::Index(ifindex))?;
    }
    Ok(sock)
}

fn open_v6(ifname: &str, ifindex: u32, multicast: bool) -> io::Result<Socket> {
    let sock = Socket::new(
        Domain::IPV6,
        Type::RAW,
        Some(Protocol::from(i32::from(IP_PROTOCOL))),
    )?;
    sock.bind_device(Some(ifname.as_bytes()))?;
    sock.set_multicast_hops_v6(u32::from(TTL))?;
    sock.set_unicast_hops_v6(u32::from(TTL))?;
    sock.set_multicast_loop_v6(false)?;
    sock.set_multicast_if_v6(ifindex)?;
    // IPv6 raw sockets do not return the header: ask for the hop limit and
    // the destination address (needed for the checksum) as control messages.
    setsockopt(&sock, sockopt::Ipv6RecvHopLimit, &true).map_err(io::Error::from)?;
    setsockopt(&sock, sockopt::Ipv6RecvPacketInfo, &true).map_err(io::Error::from)?;
    if multicast {
        sock.join_multicast_v6(&IPV6_GROUP, ifindex)?;
    }
    Ok(sock)
}

fn recv_v4(sock: &Socket, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `recv` only writes initialised bytes into the buffer; viewing
    // an initialised `[u8]` as `[MaybeUninit<u8>]` is sound.
    let uninit = unsafe { &mut *(std::ptr::from_mut::<[u8]>(buf) as *mut [MaybeUninit<u8>]) };
    sock.recv(uninit)
}

/// Sends from the link-local `src` that RFC 5798 §5.1.2.1 requires (and
/// the checksum covers), also toward a unicast peer's global address, for
/// which the kernel would otherwise pick a global source.
fn send_v6(
    sock: &Socket,
    message: &[u8],
    src: Ipv6Addr,
    dst: IpAddr,
    ifindex: u32,
) -> io::Result<()> {
    let IpAddr::V6(dst) = dst else {
        return Err(io::Error::other("IPv6 socket with an IPv4 destination"));
    };
    let info = libc::in6_pktinfo {
        ipi6_addr: libc::in6_addr {
            s6_addr: src.octets(),
        },
        ipi6_ifindex: ifindex,
    };
    let to = SockaddrIn6::from(std::net::SocketAddrV6::new(dst, 0, 0, ifindex));
    let iov = [std::io::IoSlice::new(message)];
    nix::sys::socket::sendmsg(
        sock.as_raw_fd(),
        &iov,
        &[nix::sys::socket::ControlMessage::Ipv6PacketInfo(&info)],
        MsgFlags::empty(),
        Some(&to),
    )
    .map(drop)
    .map_err(io::Error::from)
}

struct V6Meta {
    src: Ipv6Addr,
    dst: Option<Ipv6Addr>,
    hop_limit: Option<u8>,
}

fn recv_v6(sock: &Socket, buf: &mut [u8]) -> io::Result<(usize, V6Meta)> {
    let mut cmsg = nix::cmsg_space!(libc::c_int, libc::in6_pktinfo);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrIn6>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::empty(),
    )
    .map_err(io::Error::from)?;
    let mut meta = V6Meta {
        src: msg.address.map(|a| a.ip()).unwrap_or(Ipv6Addr::UNSPECIFIED),
        dst: None,
        hop_limit: None,
    };
    for c in msg.cmsgs().map_err(io::Error::from)? {
        match c {
            ControlMessageOwned::Ipv6HopLimit(h) => meta.hop_limit = u8::try_from(h).ok(),
            ControlMessageOwned::Ipv6PacketInfo(info) => {
                meta.dst = Some(Ipv6Addr::from(info.ipi6_addr.s6_addr));
            }
            _ => {}
        }
    }
    Ok((msg.bytes, meta))
}
