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

use crate::packet::{self, DecodeError, IP_PROTOCOL, IPV4_GROUP, IPV6_GROUP, TTL};

/// A VRRP message as received, before decoding.
#[derive(Debug)]
pub struct Received<'a> {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub message: &'a [u8],
}

pub struct VrrpSocket {
    fd: AsyncFd<Socket>,
    /// Where adverts go: the group, or the peer in unicast mode.
    destination: IpAddr,
    /// The source the checksum is computed over (our primary address).
    source: IpAddr,
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
            match guard.try_io(|s| s.get_ref().send_to(message, &to)) {
                Ok(r) => return r.map(|_| ()),
                Err(_would_block) => continue,
            }
        }
    }

    /// The next VRRP message. `Err(Ok(e))`-style nesting is avoided: an I/O
    /// error is `Err(io)`, a packet the IP-level checks reject is
    /// `Ok(Err(decode))` so the caller can count it and go on.
    pub async fn recv(&mut self) -> io::Result<Result<Received<'_>, DecodeError>> {
        let v6 = self.source.is_ipv6();
        let (len, meta) = loop {
            let mut guard = self.fd.readable().await?;
            let buf = &mut self.buf;
            let res = guard.try_io(|s| {
                if v6 {
                    recv_v6(s.get_ref(), buf).map(|(n, m)| (n, Some(m)))
                } else {
                    recv_v4(s.get_ref(), buf).map(|n| (n, None))
                }
            });
            match res {
                Ok(r) => break r?,
                Err(_would_block) => continue,
            }
        };
        let data = &self.buf[..len];
        Ok(match meta {
            None => packet::parse_ipv4(data).map(|env| Received {
                src: env.src.into(),
                dst: env.dst.into(),
                message: env.payload,
            }),
            Some(m) => {
                if m.hop_limit != Some(TTL) {
                    Err(DecodeError::Ttl(m.hop_limit.unwrap_or(0)))
                } else {
                    Ok(Received {
                        src: IpAddr::V6(m.src),
                        dst: IpAddr::V6(m.dst.unwrap_or(IPV6_GROUP)),
                        message: data,
                    })
                }
            }
        })
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
