//! Where replicated records land: the kernel's conntrack table as they
//! arrive (inject mode, the default), or an external cache committed into
//! the kernel on request (cache mode). See docs/conntrack-syncd.md for why
//! inject is the default.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use tandem_conntrack::{Conntrack, ConntrackError, CreateOptions, Entry, TcpInfo, Tuple};

use crate::sync::Record;

/// TCP states (enum tcp_conntrack).
const TCP_SYN_SENT: u8 = 1;
const TCP_ESTABLISHED: u8 = 3;
/// IPS_SEEN_REPLY.
const SEEN_REPLY: u32 = 1 << 1;
const PROTO_TCP: u8 = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Inject,
    Cache,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Inject => "inject",
            Mode::Cache => "cache",
        }
    }
}

/// A TCP entry created from an update that did not carry the TCP state
/// (its earlier records were lost or coalesced away) gets one: be-liberal
/// needs the protocol info, and window tracking must not judge a flow it
/// never saw start.
fn with_tcp_info(mut entry: Entry) -> Entry {
    if entry.original.protocol == PROTO_TCP && entry.tcp.is_none() {
        entry.tcp = Some(TcpInfo {
            state: if entry.status & SEEN_REPLY != 0 {
                TCP_ESTABLISHED
            } else {
                TCP_SYN_SENT
            },
            wscale_original: 14,
            wscale_reply: 14,
            flags_original: 0,
            flags_reply: 0,
        });
    }
    entry
}

/// The replicated entries this node holds for its peer.
pub struct Replica {
    ct: Conntrack,
    mode: Mode,
    /// Inject mode: tuples of the entries put into the kernel (and their zone).
    injected: HashMap<Tuple, u16>,
    /// Cache mode: the latest state of each replicated entry.
    cache: HashMap<Tuple, Entry>,
    /// During a bulk resync from the peer: what it has sent so far.
    resync_seen: Option<HashSet<Tuple>>,
    pub apply_errors: u64,
}

impl Replica {
    pub fn open(mode: Mode) -> Result<Replica, ConntrackError> {
        Ok(Replica {
            ct: Conntrack::open()?,
            mode,
            injected: HashMap::new(),
            cache: HashMap::new(),
            resync_seen: None,
            apply_errors: 0,
        })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn injected(&self) -> usize {
        self.injected.len()
    }

    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// The local table, for a bulk resync or a refresh.
    pub fn dump(&mut self) -> Result<Vec<tandem_conntrack::Record>, ConntrackError> {
        self.ct.dump()
    }

    /// Applies one record from the peer. An error concerns that entry only:
    /// it is counted and returned for the log; the others go on.
    pub fn apply(&mut self, record: Record) -> Result<(), ConntrackError> {
        if let Some(seen) = &mut self.resync_seen {
            seen.insert(*record.key());
        }
        let result = match (self.mode, record) {
            (Mode::Cache, Record::New(e) | Record::Update(e)) => {
                let merged = match self.cache.get(e.key()) {
                    // An update that did not change the TCP state carries none.
                    Some(old) if e.tcp.is_none() => Entry { tcp: old.tcp, ..e },
                    _ => e,
                };
                self.cache.insert(merged.original, merged);
                Ok(())
            }
            (Mode::Cache, Record::Destroy(t)) => {
                self.cache.remove(&t);
                if self.injected.contains_key(&t) {
                    // Committed earlier: the kernel holds it now.
                    self.remove(&t)
                } else {
                    Ok(())
                }
            }
            (Mode::Inject, Record::New(e) | Record::Update(e)) => self.upsert(e),
            (Mode::Inject, Record::Destroy(t)) => self.remove(&t),
        };
        if result.is_err() {
            self.apply_errors += 1;
        }
        result
    }

    /// Creates the entry, or updates it when it is already there.
    fn upsert(&mut self, entry: Entry) -> Result<(), ConntrackError> {
        let zone = entry.zone;
        let tuple = entry.original;
        match self.ct.update(&entry) {
            Ok(()) => {
                self.injected.insert(tuple, zone);
                return Ok(());
            }
            Err(ConntrackError::NotFound { .. }) => {}
            // This node's own entry for the flow (it was master a moment
            // ago): the kernel will not rewrite its NAT status. It already
            // holds the mapping; keep it.
            Err(e) if e.errno() == Some(nix::errno::Errno::EBUSY) => return Ok(()),
            Err(e) => return Err(e),
        }
        let entry = with_tcp_info(entry);
        let created = match self.ct.create(&entry, CreateOptions { be_liberal: true }) {
            // Created meanwhile by a packet of the flow itself.
            Err(ConntrackError::Exists { .. }) => match self.ct.update(&entry) {
                Err(e) if e.errno() == Some(nix::errno::Errno::EBUSY) => return Ok(()),
                other => other,
            },
            other => other,
        };
        if created.is_ok() {
            self.injected.insert(tuple, zone);
        }
        created
    }

    fn remove(&mut self, tuple: &Tuple) -> Result<(), ConntrackError> {
        let zone = self.injected.remove(tuple).unwrap_or(0);
        match self.ct.delete_in_zone(tuple, zone) {
            Ok(()) | Err(ConntrackError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub fn resync_started(&mut self) {
        self.resync_seen = Some(HashSet::new());
    }

    /// The peer's whole table has arrived: a replicated entry it did not
    /// send again was destroyed while updates were lost. Returns how many
    /// such entries were removed.
    pub fn resync_complete(&mut self) -> usize {
        let Some(seen) = self.resync_seen.take() else {
            return 0;
        };
        let stale: Vec<Tuple> = match self.mode {
            Mode::Inject => self
                .injected
                .keys()
                .filter(|t| !seen.contains(t))
                .copied()
                .collect(),
            Mode::Cache => self
                .cache
                .keys()
                .filter(|t| !seen.contains(t))
                .copied()
                .collect(),
        };
        for t in &stale {
            match self.mode {
                Mode::Inject => {
                    if self.remove(t).is_err() {
                        self.apply_errors += 1;
                    }
                }
                Mode::Cache => {
                    self.cache.remove(t);
                }
            }
        }
        stale.len()
    }

    /// Cache mode: puts every cached entry into the kernel. Returns how many
    /// went in and how long it took; the cache is emptied (they are now
    /// kernel entries, tracked as injected).
    pub fn commit(&mut self) -> (u64, Duration) {
        let started = Instant::now();
        let entries: Vec<Entry> = self.cache.drain().map(|(_, e)| with_tcp_info(e)).collect();
        // Many creates per system call; an entry already there (a packet
        // of the flow made it meanwhile) is updated instead.
        let results = self
            .ct
            .create_many(&entries, CreateOptions { be_liberal: true });
        let mut committed = 0;
        for (e, r) in entries.iter().zip(results) {
            let r = match r {
                Err(ConntrackError::Exists { .. }) => self.ct.update(e),
                other => other,
            };
            match r {
                Ok(()) => {
                    committed += 1;
                    self.injected.insert(e.original, e.zone);
                }
                Err(err) => {
                    self.apply_errors += 1;
                    tracing::warn!("commit: {err}");
                }
            }
        }
        (committed, started.elapsed())
    }

    /// Forgets every replicated entry: deleted from the kernel (inject mode)
    /// or dropped from the cache. Returns how many.
    pub fn flush(&mut self) -> usize {
        let n = self.injected.len() + self.cache.len();
        let injected: Vec<(Tuple, u16)> = self.injected.drain().collect();
        for (t, zone) in injected {
            match self.ct.delete_in_zone(&t, zone) {
                Ok(()) | Err(ConntrackError::NotFound { .. }) => {}
                Err(e) => {
                    self.apply_errors += 1;
                    tracing::warn!("flush: {e}");
                }
            }
        }
        self.cache.clear();
        n
    }

    /// This node became the sender (master): the entries it holds for the
    /// peer are now its own flows.
    pub fn adopt(&mut self) {
        self.injected.clear();
    }
}
