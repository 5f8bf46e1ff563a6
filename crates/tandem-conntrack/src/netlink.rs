//! Socket options shared by the request socket and the event socket, and
//! (for the tests) the typed framing of netlink-packet-core.

use std::io;
use std::os::fd::AsRawFd;

#[cfg(test)]
use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload};
#[cfg(test)]
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterProtoFamily, conntrack::ConntrackMessage,
};

/// Serialises one ctnetlink request through the typed model (the tests'
/// reference for the raw codec).
#[cfg(test)]
pub(crate) fn encode(
    family: NetfilterProtoFamily,
    msg: ConntrackMessage,
    flags: u16,
    seq: u32,
) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut packet = NetlinkMessage::new(
        header,
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(family, 0, 0),
            msg,
        )),
    );
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    buf
}

/// The messages of one received datagram, in order (typed; tests only).
#[cfg(test)]
pub(crate) fn decode(mut data: &[u8]) -> Result<Vec<NetlinkMessage<NetfilterMessage>>, String> {
    let mut out = Vec::new();
    while data.len() >= 16 {
        let msg =
            NetlinkMessage::<NetfilterMessage>::deserialize(data).map_err(|e| e.to_string())?;
        let len = msg.header.length as usize;
        if len < 16 {
            return Err(format!("netlink message length {len}"));
        }
        out.push(msg);
        // NLMSG_ALIGN
        let step = (len + 3) & !3;
        data = data.get(step..).unwrap_or_default();
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) fn family_of(tuple: &crate::Tuple) -> NetfilterProtoFamily {
    if tuple.is_ipv6() {
        NetfilterProtoFamily::IPv6
    } else {
        NetfilterProtoFamily::IPv4
    }
}

/// Sets the socket's receive buffer to `bytes`: SO_RCVBUFFORCE first (it
/// ignores net.core.rmem_max but needs CAP_NET_ADMIN), else SO_RCVBUF
/// (capped by rmem_max). Returns what the kernel granted (it reports twice
/// the requested size, its bookkeeping overhead included).
pub(crate) fn set_receive_buffer(fd: &impl AsRawFd, bytes: usize) -> io::Result<usize> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: a valid fd and a pointer to a c_int that outlives the call.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&raw const value).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            break;
        }
        if opt == libc::SO_RCVBUF {
            return Err(io::Error::last_os_error());
        }
    }
    let mut granted: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid fd; out-pointers to a c_int and its length.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&raw mut granted).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(usize::try_from(granted).unwrap_or(0))
}

/// Waits up to `timeout_ms` for `fd` to be readable; false on timeout.
pub(crate) fn wait_readable(fd: &impl AsRawFd, timeout_ms: i32) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if rc >= 0 {
            return Ok(rc > 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}
