//! The request side of ctnetlink: dump, get, create, update, delete.

use std::collections::HashMap;
use std::io;

use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST};

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use nix::errno::Errno;

use crate::entry::{Entry, Record, Tuple};
use crate::error::{ConntrackError, Op};
use crate::netlink;
use crate::raw::{self, CreateOptions, DecodeError};

/// Receive buffer of the request socket: room for the acknowledgements of
/// a whole batch and for the largest dump datagram (the kernel caps those
/// at 32 KiB).
const RECEIVE_BUFFER: usize = 4 << 20;
/// Bytes read per recv: more than a dump datagram.
const RECV_CHUNK: usize = 64 << 10;
/// Requests per sendmsg in [`Conntrack::create_many`]: ~200 bytes each,
/// well under the default send buffer (net.core.wmem_default, 208 KiB).
const BATCH: usize = 256;

/// A handle on the conntrack table of the network namespace of the thread
/// that opened it (a netlink socket belongs to its creator's namespace and
/// stays there). Calls block until the kernel answers, which it does at
/// once: from async code, call them from `spawn_blocking` or a dedicated
/// thread.
#[derive(Debug)]
pub struct Conntrack {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
    portid: u32,
}

/// One request of a batch ([`Conntrack::execute`]).
#[derive(Debug, Clone, Copy)]
pub enum Request<'a> {
    /// Create the entry (NAT included); [`ConntrackError::Exists`] if its
    /// original tuple (or its reply tuple) is taken.
    Create(&'a Entry, CreateOptions),
    /// Change an existing entry's timeout, status, mark and TCP info;
    /// [`ConntrackError::NotFound`] if absent.
    Update(&'a Entry),
    /// Delete the entry of this original tuple in this zone;
    /// [`ConntrackError::NotFound`] if absent.
    Delete(&'a Tuple, u16),
    /// Read the entry of this original tuple in this zone (`None` if absent).
    Get(&'a Tuple, u16),
}

impl Request<'_> {
    fn op(&self) -> Op {
        match self {
            Request::Create(..) => Op::Create,
            Request::Update(_) => Op::Update,
            Request::Delete(..) => Op::Delete,
            Request::Get(..) => Op::Get,
        }
    }

    fn tuple(&self) -> Tuple {
        match self {
            Request::Create(e, _) | Request::Update(e) => e.original,
            Request::Delete(t, _) | Request::Get(t, _) => **t,
        }
    }

    /// What the kernel would refuse before it is sent.
    fn check(&self) -> Result<(), ConntrackError> {
        match *self {
            Request::Create(e, _) => check_entry(Op::Create, e),
            Request::Update(e) => check_entry(Op::Update, e),
            Request::Delete(..) | Request::Get(..) => Ok(()),
        }
    }

    /// Appends the request to `buf` (written directly: see raw.rs), asking
    /// for an acknowledgement if `ack` (errors are answered regardless).
    fn encode(&self, buf: &mut Vec<u8>, seq: u32, ack: bool) {
        let ack = if ack { NLM_F_ACK } else { 0 };
        match *self {
            Request::Create(e, opts) => {
                let flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL | ack;
                raw::create(buf, e, opts, flags, seq);
            }
            Request::Update(e) => raw::update(buf, e, NLM_F_REQUEST | ack, seq),
            Request::Delete(t, zone) => raw::key(buf, true, t, zone, NLM_F_REQUEST | ack, seq),
            Request::Get(t, zone) => raw::key(buf, false, t, zone, NLM_F_REQUEST | ack, seq),
        }
    }
}

/// Why one request failed, before it is given its operation and tuple.
enum Failure {
    Errno(Errno),
    Io(&'static str, io::Error),
    Decode(&'static str, String),
}

impl Failure {
    fn into_error(self, op: Op, tuple: Tuple) -> ConntrackError {
        match self {
            Failure::Errno(Errno::EEXIST) if op == Op::Create => ConntrackError::Exists { tuple },
            Failure::Errno(Errno::ENOENT) => ConntrackError::NotFound { op, tuple },
            Failure::Errno(errno) => ConntrackError::Refused { op, tuple, errno },
            Failure::Io(what, source) => ConntrackError::Io { what, source },
            Failure::Decode(what, reason) => ConntrackError::Decode { what, reason },
        }
    }
}

/// One answer of the kernel to a request of ours.
enum Reply {
    Entry(Result<Record, DecodeError>),
    Ack,
    Error(Errno),
    Done,
}

fn check_entry(op: Op, entry: &Entry) -> Result<(), ConntrackError> {
    let o = &entry.original;
    let r = &entry.reply;
    let v6 = o.is_ipv6();
    let invalid = |reason| ConntrackError::Invalid {
        op,
        tuple: *o,
        reason,
    };
    if [o.dst, r.src, r.dst].iter().any(|a| a.is_ipv6() != v6) {
        return Err(invalid("its addresses mix IPv4 and IPv6"));
    }
    if o.protocol != r.protocol {
        return Err(invalid("its tuples have different protocols"));
    }
    Ok(())
}

impl Conntrack {
    /// Opens a ctnetlink socket in the calling thread's network namespace.
    pub fn open() -> Result<Conntrack, ConntrackError> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(ConntrackError::Open)?;
        socket.bind_auto().map_err(ConntrackError::Open)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(ConntrackError::Open)?;
        // Errors then echo only the request's header, not the whole request.
        socket.set_cap_ack(true).map_err(ConntrackError::Open)?;
        netlink::set_receive_buffer(&socket, RECEIVE_BUFFER).map_err(ConntrackError::Open)?;
        let mut addr = SocketAddr::new(0, 0);
        socket
            .get_address(&mut addr)
            .map_err(ConntrackError::Open)?;
        Ok(Conntrack {
            socket,
            seq: 0,
            buf: vec![0; RECV_CHUNK],
            portid: addr.port_number(),
        })
    }

    /// This socket's netlink port id: the kernel puts it in the header of
    /// the events its requests cause ([`crate::Record::portid`]), so a
    /// listener can tell its own writes from the traffic's changes.
    pub fn portid(&self) -> u32 {
        self.portid
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn send(&self, bytes: &[u8], what: &'static str) -> Result<(), Failure> {
        self.socket
            .send(bytes, 0)
            .map(drop)
            .map_err(|e| Failure::Io(what, e))
    }

    /// Reads one datagram and returns the answers it holds to requests
    /// (sequence number, answer). Messages that are not answers (there
    /// should be none: this socket joins no group) are skipped.
    fn receive(&mut self, what: &'static str) -> Result<Vec<(u32, Reply)>, Failure> {
        let n = loop {
            match self.socket.recv(&mut &mut self.buf[..], 0) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Failure::Io(what, e)),
            }
        };
        let mut out = Vec::new();
        for msg in raw::messages(&self.buf[..n]) {
            let msg = msg.map_err(|e| Failure::Decode(what, e))?;
            let reply = if msg.is_done() {
                Reply::Done
            } else if msg.is_error() {
                match msg.error_code() {
                    Some(0) => Reply::Ack,
                    Some(code) => Reply::Error(Errno::from_raw(-code)),
                    None => return Err(Failure::Decode(what, "a short error message".into())),
                }
            } else if msg.is_entry() && !msg.is_delete() {
                Reply::Entry(raw::decode_entry(msg.payload))
            } else {
                continue;
            };
            out.push((msg.seq, reply));
        }
        Ok(out)
    }

    /// Sends one request and collects the entries answered until the final
    /// acknowledgement (or end of dump).
    fn transact(
        &mut self,
        request: impl FnOnce(&mut Vec<u8>, u32),
        what: &'static str,
    ) -> Result<Vec<Record>, Failure> {
        let seq = self.next_seq();
        let mut bytes = Vec::with_capacity(256);
        request(&mut bytes, seq);
        self.send(&bytes, what)?;
        let mut entries = Vec::new();
        loop {
            for (s, reply) in self.receive(what)? {
                if s != seq {
                    // A late answer to an earlier request that failed on
                    // our side (e.g. decoding); not ours to report.
                    continue;
                }
                match reply {
                    Reply::Entry(r) => {
                        entries.push(r.map_err(|e| Failure::Decode(what, e.to_string()))?)
                    }
                    Reply::Ack | Reply::Done => return Ok(entries),
                    Reply::Error(errno) => return Err(Failure::Errno(errno)),
                }
            }
        }
    }

    /// Every entry of the table, IPv4 and IPv6.
    pub fn dump(&mut self) -> Result<Vec<Record>, ConntrackError> {
        // AF_UNSPEC in the request: the kernel dumps every family.
        self.transact(
            |b, seq| raw::dump(b, NLM_F_REQUEST | NLM_F_DUMP, seq),
            "dumping the table",
        )
        .map_err(|f| match f {
            Failure::Errno(errno) => ConntrackError::DumpRefused { errno },
            Failure::Io(what, source) => ConntrackError::Io { what, source },
            Failure::Decode(what, reason) => ConntrackError::Decode { what, reason },
        })
    }

    /// The entry whose original tuple is `tuple` (zone 0), if any.
    pub fn get(&mut self, tuple: &Tuple) -> Result<Option<Record>, ConntrackError> {
        self.get_in_zone(tuple, 0)
    }

    pub fn get_in_zone(
        &mut self,
        tuple: &Tuple,
        zone: u16,
    ) -> Result<Option<Record>, ConntrackError> {
        let result = self.transact(
            |b, seq| raw::key(b, false, tuple, zone, NLM_F_REQUEST | NLM_F_ACK, seq),
            "reading an entry",
        );
        match result {
            Ok(mut entries) => Ok(entries.pop()),
            Err(Failure::Errno(Errno::ENOENT)) => Ok(None),
            Err(f) => Err(f.into_error(Op::Get, *tuple)),
        }
    }

    /// Creates `entry`, NAT included. Fails with [`ConntrackError::Exists`]
    /// if its original tuple is already in the table.
    pub fn create(&mut self, entry: &Entry, opts: CreateOptions) -> Result<(), ConntrackError> {
        check_entry(Op::Create, entry)?;
        let flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK;
        self.transact(
            |b, seq| raw::create(b, entry, opts, flags, seq),
            "creating an entry",
        )
        .map(drop)
        .map_err(|f| f.into_error(Op::Create, entry.original))
    }

    /// Creates many entries, several requests per system call (the kernel
    /// processes them in order and acknowledges each); one result per
    /// entry, in order.
    pub fn create_many(
        &mut self,
        entries: &[Entry],
        opts: CreateOptions,
    ) -> Vec<Result<(), ConntrackError>> {
        let requests: Vec<Request<'_>> = entries.iter().map(|e| Request::Create(e, opts)).collect();
        self.execute(&requests)
            .into_iter()
            .map(|r| r.map(drop))
            .collect()
    }

    /// Runs many requests, up to 256 per system call (the kernel processes
    /// them in order); one result per request, in order: the entry read for
    /// a [`Request::Get`] (`None` when absent), `None` for the others.
    ///
    /// Only the last request of each system call asks for an
    /// acknowledgement: the kernel answers the others only when they fail
    /// (and a Get with its entry), in order, so every answer of a batch has
    /// arrived when the last one's has, and a request with none succeeded.
    /// One read per batch instead of one per request.
    pub fn execute(
        &mut self,
        requests: &[Request<'_>],
    ) -> Vec<Result<Option<Record>, ConntrackError>> {
        let mut results: Vec<Option<Result<Option<Record>, ConntrackError>>> =
            requests.iter().map(|_| None).collect();
        for (chunk_no, chunk) in requests.chunks(BATCH).enumerate() {
            let base = chunk_no * BATCH;
            for (i, request) in chunk.iter().enumerate() {
                if let Err(e) = request.check() {
                    results[base + i] = Some(Err(e));
                }
            }
            let Some(last) = (0..chunk.len()).rev().find(|i| results[base + i].is_none()) else {
                continue;
            };
            // seq -> (request index, the entry a Get received)
            let mut pending: HashMap<u32, (usize, Option<Record>)> = HashMap::new();
            let mut bytes = Vec::with_capacity(chunk.len() * 256);
            let mut barrier = 0;
            for (i, request) in chunk.iter().enumerate() {
                if results[base + i].is_some() {
                    continue;
                }
                let seq = self.next_seq();
                request.encode(&mut bytes, seq, i == last);
                pending.insert(seq, (base + i, None));
                if i == last {
                    barrier = seq;
                }
            }
            let outcome =
                self.send(&bytes, "sending a batch of requests")
                    .and_then(|()| {
                        while pending.contains_key(&barrier) {
                            for (seq, reply) in self.receive("receiving a batch of answers")? {
                                let Some((i, got)) = pending.get_mut(&seq) else {
                                    continue;
                                };
                                let i = *i;
                                let request = &requests[i];
                                let result = match reply {
                                    Reply::Entry(Ok(r)) if seq == barrier => {
                                        // Its acknowledgement follows.
                                        *got = Some(r);
                                        continue;
                                    }
                                    Reply::Entry(Ok(r)) => Ok(Some(r)),
                                    Reply::Entry(Err(e)) => Err(ConntrackError::Decode {
                                        what: "reading an entry",
                                        reason: e.to_string(),
                                    }),
                                    Reply::Ack | Reply::Done => Ok(got.take()),
                                    Reply::Error(Errno::ENOENT)
                                        if matches!(request, Request::Get(..)) =>
                                    {
                                        Ok(None)
                                    }
                                    Reply::Error(errno) => Err(Failure::Errno(errno)
                                        .into_error(request.op(), request.tuple())),
                                };
                                pending.remove(&seq);
                                if results[i].is_none() {
                                    results[i] = Some(result);
                                }
                            }
                        }
                        // Answered in order: what was not answered succeeded
                        // (a Get always answers).
                        for (_, (i, _)) in pending.drain() {
                            results[i] = Some(match requests[i] {
                                Request::Get(..) => Err(ConntrackError::Io {
                                    what: "reading an entry",
                                    source: io::Error::other("no answer from the kernel"),
                                }),
                                _ => Ok(None),
                            });
                        }
                        Ok(())
                    });
            if let Err(f) = outcome {
                // The socket failed mid-batch: every unanswered request of
                // this chunk gets the error (the I/O error is not Clone, so
                // each gets its own rendering of it).
                let (what, text) = match f {
                    Failure::Io(what, e) => (what, e.to_string()),
                    Failure::Decode(what, e) => (what, e),
                    Failure::Errno(e) => ("running a batch of requests", e.to_string()),
                };
                for (i, _) in pending.into_values() {
                    results[i] = Some(Err(ConntrackError::Io {
                        what,
                        source: io::Error::other(text.clone()),
                    }));
                }
            }
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(ConntrackError::Io {
                        what: "running a batch of requests",
                        source: io::Error::other("no answer from the kernel"),
                    })
                })
            })
            .collect()
    }

    /// Changes an existing entry's timeout, status, mark and TCP info (NAT
    /// cannot change on an existing entry). Fails with
    /// [`ConntrackError::NotFound`] if it is not in the table.
    pub fn update(&mut self, entry: &Entry) -> Result<(), ConntrackError> {
        check_entry(Op::Update, entry)?;
        self.transact(
            |b, seq| raw::update(b, entry, NLM_F_REQUEST | NLM_F_ACK, seq),
            "updating an entry",
        )
        .map(drop)
        .map_err(|f| f.into_error(Op::Update, entry.original))
    }

    /// Deletes the entry whose original tuple is `tuple` (zone 0). Fails
    /// with [`ConntrackError::NotFound`] if it is not in the table.
    pub fn delete(&mut self, tuple: &Tuple) -> Result<(), ConntrackError> {
        self.delete_in_zone(tuple, 0)
    }

    pub fn delete_in_zone(&mut self, tuple: &Tuple, zone: u16) -> Result<(), ConntrackError> {
        self.transact(
            |b, seq| raw::key(b, true, tuple, zone, NLM_F_REQUEST | NLM_F_ACK, seq),
            "deleting an entry",
        )
        .map(drop)
        .map_err(|f| f.into_error(Op::Delete, *tuple))
    }
}
