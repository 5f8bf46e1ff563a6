//! The kernel's conntrack events (NFNLGRP_CONNTRACK_NEW / UPDATE / DESTROY).
//!
//! [`EventSocket`] is the blocking form (a thread calls
//! [`EventSocket::recv_timeout`]); [`EventStream`] wraps it for tokio with
//! `AsyncFd` over the non-blocking socket, so no thread is spent waiting.
//! Both decode the same way and report a full receive buffer (ENOBUFS) as
//! [`Event::Overrun`].

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_sys::{Socket, protocols::NETLINK_NETFILTER};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use crate::entry::{Event, Record};
use crate::error::ConntrackError;
use crate::netlink;
use crate::raw;

/// Default receive buffer: 16 MiB holds roughly 50,000 events (~300 bytes
/// each), a burst the listener can fall behind by before the kernel drops.
pub const DEFAULT_RECEIVE_BUFFER: usize = 16 << 20;

/// Event groups (enum nfnetlink_groups).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventGroup {
    New = 1,
    Update = 2,
    Destroy = 3,
}

impl EventGroup {
    pub const ALL: [EventGroup; 3] = [EventGroup::New, EventGroup::Update, EventGroup::Destroy];
}

/// A ctnetlink socket subscribed to conntrack events, in the network
/// namespace of the thread that opened it.
#[derive(Debug)]
pub struct EventSocket {
    socket: Socket,
    buf: Vec<u8>,
    queue: VecDeque<Event>,
    receive_buffer: usize,
    undecodable: u64,
}

impl AsRawFd for EventSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

impl EventSocket {
    /// Subscribes to `groups` with a [`DEFAULT_RECEIVE_BUFFER`].
    pub fn open(groups: &[EventGroup]) -> Result<EventSocket, ConntrackError> {
        EventSocket::with_receive_buffer(groups, DEFAULT_RECEIVE_BUFFER)
    }

    /// Subscribes to `groups` with a receive buffer of `bytes` (forced past
    /// net.core.rmem_max when the process has CAP_NET_ADMIN).
    pub fn with_receive_buffer(
        groups: &[EventGroup],
        bytes: usize,
    ) -> Result<EventSocket, ConntrackError> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(ConntrackError::Open)?;
        socket.bind_auto().map_err(ConntrackError::Open)?;
        for g in groups {
            socket
                .add_membership(*g as u32)
                .map_err(ConntrackError::Open)?;
        }
        let receive_buffer =
            netlink::set_receive_buffer(&socket, bytes).map_err(ConntrackError::Open)?;
        socket
            .set_non_blocking(true)
            .map_err(ConntrackError::Open)?;
        Ok(EventSocket {
            socket,
            // One event is one datagram of a few hundred bytes.
            buf: vec![0; 64 << 10],
            queue: VecDeque::new(),
            receive_buffer,
            undecodable: 0,
        })
    }

    /// The receive buffer the kernel granted, in bytes (its own accounting,
    /// about twice what was asked).
    pub fn receive_buffer(&self) -> usize {
        self.receive_buffer
    }

    /// Lets the kernel drop the events `filter` rejects before they reach
    /// this socket (replacing any filter set before).
    pub fn set_kernel_filter(&self, filter: &crate::KernelFilter) -> Result<(), ConntrackError> {
        filter.attach(self).map_err(|source| ConntrackError::Io {
            what: "attaching the event filter",
            source,
        })
    }

    /// Messages that could not be decoded as events and were skipped.
    pub fn undecodable(&self) -> u64 {
        self.undecodable
    }

    /// The next event if one is ready, without blocking.
    pub fn try_next(&mut self) -> Result<Option<Event>, ConntrackError> {
        loop {
            if let Some(ev) = self.queue.pop_front() {
                return Ok(Some(ev));
            }
            match self.socket.recv(&mut &mut self.buf[..], 0) {
                Ok(n) => self.decode(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    return Ok(Some(Event::Overrun));
                }
                Err(source) => {
                    return Err(ConntrackError::Io {
                        what: "receiving events",
                        source,
                    });
                }
            }
        }
    }

    /// Waits up to `timeout` for the next event.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<Event>, ConntrackError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(ev) = self.try_next()? {
                return Ok(Some(ev));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
            netlink::wait_readable(self, ms).map_err(|source| ConntrackError::Io {
                what: "waiting for events",
                source,
            })?;
        }
    }

    fn decode(&mut self, n: usize) {
        for msg in raw::messages(&self.buf[..n]) {
            let msg = match msg {
                Ok(m) => m,
                Err(reason) => {
                    self.undecodable += 1;
                    tracing::warn!("conntrack event datagram skipped: {reason}");
                    return;
                }
            };
            if !msg.is_entry() {
                continue;
            }
            let kind: fn(Record) -> Event = if msg.is_delete() {
                Event::Destroy
            } else if msg.flags & (NLM_F_CREATE | NLM_F_EXCL) != 0 {
                // A NEW message is a new entry when the kernel marks it
                // NLM_F_CREATE|NLM_F_EXCL, an update otherwise.
                Event::New
            } else {
                Event::Update
            };
            match raw::decode_entry(msg.payload) {
                Ok(mut record) => {
                    record.portid = msg.portid;
                    self.queue.push_back(kind(record));
                }
                Err(e) => {
                    self.undecodable += 1;
                    tracing::warn!("conntrack event skipped: {e}");
                }
            }
        }
    }
}

/// [`EventSocket`] for tokio.
#[derive(Debug)]
pub struct EventStream {
    fd: AsyncFd<EventSocket>,
}

impl EventStream {
    /// Registers the socket with the current tokio runtime (which must have
    /// I/O enabled).
    pub fn new(socket: EventSocket) -> Result<EventStream, ConntrackError> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(ConntrackError::Runtime(io::Error::other(
                "not called from inside a tokio runtime",
            )));
        }
        // SAFETY: the fd is the netlink socket that `EventSocket` owns: it
        // stays open, and `as_raw_fd` returns it, for as long as the
        // `AsyncFd` owns the `EventSocket`.
        let fd = unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }
            .map_err(|e| ConntrackError::Runtime(e.into_parts().1))?;
        Ok(EventStream { fd })
    }

    /// The next event. Cancel-safe: an event is removed from the queue
    /// only when it is returned.
    pub async fn next(&mut self) -> Result<Event, ConntrackError> {
        loop {
            if let Some(ev) = self.fd.get_mut().try_next()? {
                return Ok(ev);
            }
            let mut guard = self
                .fd
                .readable_mut()
                .await
                .map_err(|source| ConntrackError::Io {
                    what: "waiting for events",
                    source,
                })?;
            // Drained above: readiness is stale until the kernel queues more.
            match guard.get_inner_mut().try_next()? {
                Some(ev) => return Ok(ev),
                None => guard.clear_ready(),
            }
        }
    }

    pub fn get_ref(&self) -> &EventSocket {
        self.fd.get_ref()
    }
}
