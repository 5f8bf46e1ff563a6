//! Where replicated records land: the kernel's conntrack table as they
//! arrive (inject mode, the default), or an external cache committed into
//! the kernel on request (cache mode). See docs/conntrack-syncd.md for why
//! inject is the default.
//!
//! Both nodes send the flows they forward and apply the peer's, so each
//! entry here is either this node's own (its traffic made or last changed
//! it) or a copy of the peer's (last written from a peer record). The
//! difference decides what a change may do to the other side:
//!
//! - A copy that expires here is not news for the peer (its flow may be
//!   alive there): its destroy event is not sent.
//! - The master deletes an entry on the backup's word only if it is a copy
//!   (the backup's flow, forwarded during a VRRP flap); a backup deletes on
//!   the master's word whatever it is.
//! - A complete bulk from the master makes a backup's farm flows equal to
//!   the master's, from what the kernel holds (not from this daemon's
//!   memory): entries the master lacks are deleted, entries whose NAT
//!   differs are replaced — except this node's own flows, which it
//!   forwards and replicates in turn.

use std::time::{Duration, Instant};

use foldhash::{HashMap, HashMapExt as _, HashSet, HashSetExt as _};
use tandem_conntrack::{
    Conntrack, ConntrackError, CreateOptions, Entry, Event, Filter, Request, TcpInfo, Tuple,
};

use crate::sync::Record;

/// TCP states (enum tcp_conntrack).
const TCP_SYN_SENT: u8 = 1;
const TCP_ESTABLISHED: u8 = 3;
const TCP_TIME_WAIT: u8 = 7;
const TCP_CLOSE: u8 = 8;
/// IPS_SEEN_REPLY.
const SEEN_REPLY: u32 = 1 << 1;
const PROTO_TCP: u8 = 6;
const LIBERAL: CreateOptions = CreateOptions { be_liberal: true };

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

/// Whether writing `record` over the kernel's `entry` (same NAT) would
/// change nothing that matters, so a bulk need not write it: a TCP entry in
/// the same state that already has every flag the record sets (an update
/// only sets flags), the same mark and the reply seen, with at least the
/// record's timeout (a minute's slack). A closing or closed flow (TIME_WAIT,
/// CLOSE) needs no write either: nothing of it is worth a failover, and a
/// new SYN of its tuple starts a new entry anyway. Other protocols are
/// always written (their timeout is all they have).
fn already_applied(entry: &Entry, record: &Entry) -> bool {
    const KEPT: u32 =
        tandem_conntrack::entry::status::SEEN_REPLY | tandem_conntrack::entry::status::ASSURED;
    let (Some(have), Some(want)) = (entry.tcp, record.tcp) else {
        return false;
    };
    if entry.original.protocol != PROTO_TCP || have.state != want.state || entry.mark != record.mark
    {
        return false;
    }
    if matches!(want.state, TCP_TIME_WAIT | TCP_CLOSE) {
        return true;
    }
    have.flags_original & want.flags_original == want.flags_original
        && have.flags_reply & want.flags_reply == want.flags_reply
        && entry.status & record.status & KEPT == record.status & KEPT
        && entry.timeout_s.saturating_add(60) >= record.timeout_s
}

/// What the last batch of peer records did.
#[derive(Debug, Default)]
pub struct Applied {
    /// The kernel refused these (one line each in the log, rate-limited).
    pub errors: Vec<ConntrackError>,
    /// Entries replaced because their NAT differed from the peer's.
    pub replaced: u64,
}

/// A bulk resync from the peer in progress.
struct Resync {
    /// Complete and exact: the farm entries the kernel held when it began
    /// (tuple → reply tuple and zone); what the bulk does not refresh goes.
    before: Option<HashMap<Tuple, Entry>>,
    /// Tuples the peer sent since it began.
    seen: HashSet<Tuple>,
    /// Records of the bulk that found their entry already as they would
    /// make it (not written).
    unchanged: u64,
    started: Instant,
}

/// How a resync from the peer ended.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ResyncOutcome {
    pub stale_removed: u64,
    pub unchanged: u64,
    pub took: Duration,
}

/// The entries this node holds for its peer, and what it knows of its own.
pub struct Replica {
    ct: Conntrack,
    mode: Mode,
    /// Copies of the peer's flows this node wrote into its kernel (tuple →
    /// zone), not changed by local traffic since.
    copies: HashMap<Tuple, u16>,
    /// This node's own flows: local traffic made or changed them since this
    /// daemon started (or its table went to the peer as master), and no
    /// peer record has overwritten them since.
    own: HashSet<Tuple>,
    /// The own flows without TCP state (UDP...): their timeout is refreshed
    /// by traffic without an event, so they are sent again now and then.
    own_datagram: HashSet<Tuple>,
    /// Cache mode: the latest state of each replicated entry.
    cache: HashMap<Tuple, Entry>,
    resync: Option<Resync>,
    /// Delete what a complete bulk lacks and replace what differs
    /// (switched off only as a test control).
    exact: bool,
    pub apply_errors: u64,
    pub replaced: u64,
    /// Records of a complete bulk that found their entry already as they
    /// would make it, so were not written.
    pub unchanged: u64,
    pub stale_removed: u64,
    /// Destroy events not sent to the peer: copies of its flows, or entries
    /// this node does not own, that expired here.
    pub copies_expired: u64,
}

impl Replica {
    pub fn open(mode: Mode, exact: bool) -> Result<Replica, ConntrackError> {
        Ok(Replica {
            ct: Conntrack::open()?,
            mode,
            copies: HashMap::new(),
            own: HashSet::new(),
            own_datagram: HashSet::new(),
            cache: HashMap::new(),
            resync: None,
            exact,
            apply_errors: 0,
            replaced: 0,
            unchanged: 0,
            stale_removed: 0,
            copies_expired: 0,
        })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The netlink port id of this node's writes (their events are its own).
    pub fn portid(&self) -> u32 {
        self.ct.portid()
    }

    /// Copies of the peer's flows held in the kernel.
    pub fn injected(&self) -> usize {
        self.copies.len()
    }

    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    pub fn own(&self) -> usize {
        self.own.len()
    }

    /// The local table, for a bulk resync or a refresh.
    pub fn dump(&mut self) -> Result<Vec<tandem_conntrack::Record>, ConntrackError> {
        self.ct.dump()
    }

    /// What to send the peer for a local kernel event (already known to be
    /// a farm flow and not this daemon's own write), or nothing.
    pub fn local_event(&mut self, event: Event) -> Option<Record> {
        match event {
            Event::New(r) => {
                self.own_flow(r.entry.original);
                Some(Record::New(r.entry))
            }
            Event::Update(r) => {
                self.own_flow(r.entry.original);
                Some(Record::Update(r.entry))
            }
            Event::Destroy(r) => {
                // Only the end of one of this node's own flows is news for
                // the peer. A copy of the peer's flow that expires here is
                // not (the flow may be alive there); nor is an entry this
                // daemon never knew. (Judged by ownership, not by the
                // copies: a copy's destroy event may be read after the
                // copy was written again, and must not make the new one
                // look like this node's own.)
                let t = r.entry.original;
                self.own_datagram.remove(&t);
                let own = self.own.remove(&t);
                if self.copies.remove(&t).is_some() || !own {
                    self.copies_expired += 1;
                    return None;
                }
                Some(Record::Destroy(t))
            }
            Event::Overrun => None,
        }
    }

    /// Local traffic made or changed this flow: it is this node's own.
    pub fn own_flow(&mut self, t: Tuple) {
        self.copies.remove(&t);
        self.own.insert(t);
        if t.protocol != PROTO_TCP {
            self.own_datagram.insert(t);
        }
    }

    /// The own flows to send again (their timeouts), read from the kernel
    /// in one batch; flows gone meanwhile are forgotten.
    pub fn own_datagram_flows(&mut self) -> Vec<Entry> {
        let tuples: Vec<Tuple> = self.own_datagram.iter().copied().collect();
        let requests: Vec<Request<'_>> = tuples.iter().map(|t| Request::Get(t, 0)).collect();
        let mut out = Vec::new();
        for (t, r) in tuples.iter().zip(self.ct.execute(&requests)) {
            match r {
                Ok(Some(record)) => out.push(record.entry),
                Ok(None) => {
                    self.own_datagram.remove(t);
                }
                Err(_) => self.apply_errors += 1,
            }
        }
        out
    }

    /// Whether this node sends `entry` as one of the flows it forwards
    /// (a non-master's bulk holds only those).
    pub fn is_own(&self, t: &Tuple) -> bool {
        self.own.contains(t)
    }

    /// Whether this node holds `t` as a copy of the peer's flow.
    pub fn is_copy(&self, t: &Tuple) -> bool {
        self.copies.contains_key(t)
    }

    /// Applies the peer's records, batched: one system call per round of
    /// requests, not per record. `master`: this node is the master, whose
    /// own flows the backup's records do not delete or re-map.
    pub fn apply(&mut self, records: Vec<Record>, master: bool) -> Applied {
        if let Some(r) = &mut self.resync {
            r.seen.extend(records.iter().map(|r| *r.key()));
        }
        match self.mode {
            Mode::Cache => {
                for record in records {
                    self.apply_cached(record);
                }
                Applied::default()
            }
            Mode::Inject => self.apply_injected(fold(records), master),
        }
    }

    fn apply_cached(&mut self, record: Record) {
        match record {
            Record::New(e) | Record::Update(e) => {
                let merged = match self.cache.get(e.key()) {
                    // An update that did not change the TCP state carries none.
                    Some(old) if e.tcp.is_none() => Entry { tcp: old.tcp, ..e },
                    _ => e,
                };
                self.cache.insert(merged.original, merged);
            }
            Record::Destroy(t) => {
                self.cache.remove(&t);
                if let Some(zone) = self.copies.remove(&t) {
                    // Committed earlier: the kernel holds it now.
                    match self.ct.delete_in_zone(&t, zone) {
                        Ok(()) | Err(ConntrackError::NotFound { .. }) => {}
                        Err(_) => self.apply_errors += 1,
                    }
                }
            }
        }
    }

    fn apply_injected(&mut self, records: Vec<Record>, master: bool) -> Applied {
        let mut out = Applied::default();
        // Round 1: what each record asks for.
        let mut round1: Vec<Op> = Vec::with_capacity(records.len());
        for record in records {
            match record {
                Record::New(e) => {
                    let known = self
                        .resync
                        .as_ref()
                        .and_then(|r| r.before.as_ref())
                        .and_then(|b| b.get(&e.original))
                        .map(|old| (old.reply == e.reply, already_applied(old, &e), old.zone));
                    match known {
                        // The snapshot of a bulk says what is there: no
                        // create attempt needed, and no write at all when
                        // the entry is already what the record would make it.
                        Some((true, true, zone)) => {
                            self.written(e.original, zone);
                            self.unchanged += 1;
                            if let Some(r) = &mut self.resync {
                                r.unchanged += 1;
                            }
                        }
                        Some((true, false, _)) => round1.push(Op::Update(e)),
                        Some((false, _, zone)) => round1.push(Op::Replace(e, zone)),
                        None => round1.push(Op::Create(e)),
                    }
                }
                Record::Update(e) => round1.push(Op::Update(e)),
                Record::Destroy(t) => {
                    if master && !self.copies.contains_key(&t) {
                        // The backup's word about a flow this node owns (or
                        // one it no longer knows): its own entry stays and
                        // expires by itself.
                        continue;
                    }
                    let zone = self.copies.get(&t).copied().unwrap_or(0);
                    round1.push(Op::Delete(t, zone));
                }
            }
        }
        let mut next = self.run(round1, master, &mut out);
        // Follow-ups (an existing entry to compare, a vanished one to
        // create), at most two more rounds.
        for _ in 0..2 {
            if next.is_empty() {
                break;
            }
            next = self.run(next, master, &mut out);
        }
        for op in next {
            out.errors.push(ConntrackError::Invalid {
                op: tandem_conntrack::Op::Create,
                tuple: op.tuple(),
                reason: "the entry kept changing while it was being replicated",
            });
        }
        self.apply_errors += out.errors.len() as u64;
        out
    }

    /// One round of requests; returns the follow-ups.
    fn run(&mut self, ops: Vec<Op>, master: bool, out: &mut Applied) -> Vec<Op> {
        // What a create sends: the entry with TCP info made up if it has
        // none (an update never gets made-up state).
        let created: Vec<Option<Entry>> = ops
            .iter()
            .map(|op| match op {
                Op::Create(e) | Op::Replace(e, _) => Some(with_tcp_info(e.clone())),
                _ => None,
            })
            .collect();
        let mut requests = Vec::with_capacity(ops.len() + 8);
        // The op each request belongs to.
        let mut owner = Vec::with_capacity(ops.len() + 8);
        for (i, (op, created)) in ops.iter().zip(&created).enumerate() {
            match (op, created) {
                (Op::Create(_), Some(c)) => requests.push(Request::Create(c, LIBERAL)),
                (Op::Update(e), _) => requests.push(Request::Update(e)),
                (Op::Delete(t, zone), _) => requests.push(Request::Delete(t, *zone)),
                (Op::Compare(e), _) => requests.push(Request::Get(&e.original, e.zone)),
                (Op::Replace(e, zone), Some(c)) => {
                    requests.push(Request::Delete(&e.original, *zone));
                    owner.push(i);
                    requests.push(Request::Create(c, LIBERAL));
                }
                (Op::Create(_) | Op::Replace(..), None) => continue,
            }
            owner.push(i);
        }
        let results = self.ct.execute(&requests);
        let mut follow = Vec::new();
        // Replace = delete then create: judged by the create.
        let mut it = owner.into_iter().zip(results).peekable();
        while let Some((i, result)) = it.next() {
            if matches!(ops[i], Op::Replace(..)) && it.peek().is_some_and(|(j, _)| *j == i) {
                continue;
            }
            let op = &ops[i];
            let t = op.tuple();
            match (op, result) {
                (Op::Create(e), Ok(_)) | (Op::Update(e), Ok(_)) => self.written(t, e.zone),
                (Op::Replace(e, _), Ok(_)) => {
                    self.written(t, e.zone);
                    out.replaced += 1;
                    self.replaced += 1;
                }
                (Op::Delete(..), Ok(_) | Err(ConntrackError::NotFound { .. })) => {
                    self.copies.remove(&t);
                    self.own.remove(&t);
                    self.own_datagram.remove(&t);
                }
                // Already there (an older flow of the same tuple, or a
                // packet of this one was first): compare its NAT.
                (Op::Create(e), Err(ConntrackError::Exists { .. })) => {
                    follow.push(Op::Compare(e.clone()))
                }
                (Op::Update(e), Err(ConntrackError::NotFound { .. })) => {
                    follow.push(Op::Create(e.clone()))
                }
                // This node's own entry whose status the kernel will not
                // rewrite (it was master a moment ago): it holds the
                // mapping already.
                (Op::Update(_), Err(e)) if e.errno() == Some(nix::errno::Errno::EBUSY) => {}
                (Op::Compare(e), Ok(None)) => follow.push(Op::Create(e.clone())),
                (Op::Compare(e), Ok(Some(existing))) => {
                    if existing.entry.reply == e.reply || !self.exact {
                        // The same mapping (or no replacing: a test control).
                        follow.push(Op::Update(e.clone()));
                    } else if master && !self.copies.contains_key(&t) {
                        // The master's own flow keeps its mapping.
                    } else {
                        follow.push(Op::Replace(e.clone(), existing.entry.zone));
                    }
                }
                (Op::Replace(e, _), Err(ConntrackError::Exists { .. })) => {
                    // The reply tuple is taken by another entry: give up on
                    // this one rather than loop.
                    out.errors
                        .push(ConntrackError::Exists { tuple: e.original });
                }
                (_, Err(e)) => out.errors.push(e),
            }
        }
        follow
    }

    /// A peer record made this entry what it is: it is a copy now.
    fn written(&mut self, t: Tuple, zone: u16) {
        self.own.remove(&t);
        self.own_datagram.remove(&t);
        self.copies.insert(t, zone);
    }

    /// A bulk from the peer begins. `exact`: it is complete and this node
    /// is not the master, so the kernel's farm entries (per `filter`) are
    /// noted to delete, at its end, those the bulk lacks.
    pub fn resync_started(&mut self, exact: bool, filter: &Filter) -> Result<(), ConntrackError> {
        let before = if exact && self.exact && self.mode == Mode::Inject {
            let dump = self.ct.dump()?;
            Some(
                dump.into_iter()
                    .filter(|r| filter.matches(&r.entry))
                    .map(|r| (r.entry.original, r.entry))
                    .collect(),
            )
        } else {
            None
        };
        self.resync = Some(Resync {
            before,
            seen: HashSet::new(),
            unchanged: 0,
            started: Instant::now(),
        });
        Ok(())
    }

    /// The peer's bulk has arrived. After a complete one, the farm entries
    /// it did not refresh are gone on the master: deleted (this node's own
    /// flows excepted). Cache mode: the cache is trimmed the same way.
    pub fn resync_complete(&mut self, complete: bool) -> ResyncOutcome {
        let Some(resync) = self.resync.take() else {
            return ResyncOutcome::default();
        };
        let mut outcome = ResyncOutcome {
            stale_removed: 0,
            unchanged: resync.unchanged,
            took: resync.started.elapsed(),
        };
        match (self.mode, resync.before) {
            (Mode::Inject, Some(before)) => {
                let stale: Vec<(Tuple, u16)> = before
                    .into_iter()
                    .filter(|(t, _)| !resync.seen.contains(t) && !self.own.contains(t))
                    .map(|(t, e)| (t, e.zone))
                    .collect();
                let requests: Vec<Request<'_>> =
                    stale.iter().map(|(t, z)| Request::Delete(t, *z)).collect();
                let results = self.ct.execute(&requests);
                for ((t, _), r) in stale.iter().zip(results) {
                    match r {
                        Ok(_) => outcome.stale_removed += 1,
                        Err(ConntrackError::NotFound { .. }) => {}
                        Err(_) => self.apply_errors += 1,
                    }
                    self.copies.remove(t);
                }
            }
            (Mode::Cache, _) if complete && self.exact => {
                let stale: Vec<Tuple> = self
                    .cache
                    .keys()
                    .filter(|t| !resync.seen.contains(t))
                    .copied()
                    .collect();
                for t in stale {
                    self.cache.remove(&t);
                    outcome.stale_removed += 1;
                }
            }
            _ => {}
        }
        self.stale_removed += outcome.stale_removed;
        outcome
    }

    /// Cache mode: puts every cached entry into the kernel. Returns how many
    /// went in and how long it took; the cache is emptied (they are now
    /// kernel entries, tracked as copies).
    pub fn commit(&mut self) -> (u64, Duration) {
        let started = Instant::now();
        let entries: Vec<Entry> = self.cache.drain().map(|(_, e)| with_tcp_info(e)).collect();
        // Many creates per system call; an entry already there (a packet
        // of the flow made it meanwhile) is updated instead.
        let results = self.ct.create_many(&entries, LIBERAL);
        let mut committed = 0;
        for (e, r) in entries.iter().zip(results) {
            let r = match r {
                Err(ConntrackError::Exists { .. }) => self.ct.update(e),
                other => other,
            };
            match r {
                Ok(()) => {
                    committed += 1;
                    self.copies.insert(e.original, e.zone);
                }
                Err(err) => {
                    self.apply_errors += 1;
                    tracing::warn!(tuple = %e.original, "committing a cached entry failed: {err}");
                }
            }
        }
        (committed, started.elapsed())
    }

    /// Forgets every replicated entry: deleted from the kernel (inject mode)
    /// or dropped from the cache. Returns how many.
    pub fn flush(&mut self) -> usize {
        let n = self.copies.len() + self.cache.len();
        let copies: Vec<(Tuple, u16)> = self.copies.drain().collect();
        let requests: Vec<Request<'_>> =
            copies.iter().map(|(t, z)| Request::Delete(t, *z)).collect();
        for (r, (t, _)) in self.ct.execute(&requests).into_iter().zip(&copies) {
            match r {
                Ok(_) | Err(ConntrackError::NotFound { .. }) => {}
                Err(e) => {
                    self.apply_errors += 1;
                    tracing::warn!(tuple = %t, "flushing a replicated entry failed: {e}");
                }
            }
        }
        self.cache.clear();
        n
    }

    /// This node became the master: the copies it holds are its flows now.
    pub fn adopt(&mut self) {
        for (t, _) in std::mem::take(&mut self.copies) {
            self.own_flow(t);
        }
    }
}

/// One request (or two) for one tuple.
#[derive(Debug, Clone)]
enum Op {
    Create(Entry),
    Update(Entry),
    Delete(Tuple, u16),
    /// Read the existing entry: same NAT → update, other NAT → replace.
    Compare(Entry),
    /// Delete the entry (in this zone), then create this one.
    Replace(Entry, u16),
}

impl Op {
    fn tuple(&self) -> Tuple {
        match self {
            Op::Create(e) | Op::Update(e) | Op::Compare(e) | Op::Replace(e, _) => e.original,
            Op::Delete(t, _) => *t,
        }
    }
}

/// One record per tuple, at the tuple's first place in the batch: requests
/// of one round may run in any order against each other's follow-ups, so a
/// tuple must not appear twice. The last state wins; a creation stays one
/// (New then Update is a New, Destroy then New is a New whose create will
/// find, and replace, an entry with another NAT).
fn fold(records: Vec<Record>) -> Vec<Record> {
    let mut at: HashMap<Tuple, usize> = HashMap::with_capacity(records.len());
    let mut out: Vec<Record> = Vec::with_capacity(records.len());
    for r in records {
        match at.get(r.key()) {
            Some(&i) => {
                let merged = match (&out[i], r) {
                    (Record::New(_), Record::Update(e)) => Record::New(e),
                    (_, r) => r,
                };
                out[i] = merged;
            }
            None => {
                at.insert(*r.key(), out.len());
                out.push(r);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(port: u16, backend: u8) -> Entry {
        let original = Tuple {
            src: "10.0.0.50".parse().unwrap(),
            dst: "10.0.0.100".parse().unwrap(),
            protocol: 6,
            src_port: port,
            dst_port: 80,
        };
        Entry {
            original,
            reply: Tuple {
                src: format!("10.1.0.{backend}").parse().unwrap(),
                dst: "10.1.0.100".parse().unwrap(),
                protocol: 6,
                src_port: 8080,
                dst_port: port,
            },
            status: 0,
            timeout_s: 10,
            mark: 0,
            zone: 0,
            tcp: None,
        }
    }

    #[test]
    fn a_batch_keeps_one_record_per_tuple_with_the_last_state() {
        let (a, b) = (entry(1, 11), entry(2, 12));
        let folded = fold(vec![
            Record::New(a.clone()),
            Record::Update(b.clone()),
            Record::Update(entry(1, 13)),
            Record::Destroy(b.original),
            Record::New(entry(2, 14)),
        ]);
        assert_eq!(
            folded,
            vec![Record::New(entry(1, 13)), Record::New(entry(2, 14))]
        );
        let folded = fold(vec![Record::New(a.clone()), Record::Destroy(a.original)]);
        assert_eq!(folded, vec![Record::Destroy(a.original)]);
    }

    fn tcp(entry: Entry, state: u8, flags: u8, status: u32, timeout_s: u32) -> Entry {
        Entry {
            tcp: Some(TcpInfo {
                state,
                wscale_original: 7,
                wscale_reply: 7,
                flags_original: flags,
                flags_reply: flags,
            }),
            status,
            timeout_s,
            ..entry
        }
    }

    #[test]
    fn a_bulk_record_is_written_only_when_it_would_change_the_entry() {
        use tandem_conntrack::entry::{status, tcp as t};
        let seen = status::SEEN_REPLY | status::ASSURED;
        let liberal = t::FLAG_BE_LIBERAL | t::FLAG_SACK_PERM;
        // A copy written earlier, and the master's same entry: nothing to do.
        let copy = tcp(entry(1, 11), TCP_ESTABLISHED, liberal, seen, 431_990);
        let record = tcp(entry(1, 11), TCP_ESTABLISHED, liberal, seen, 432_000);
        assert!(already_applied(&copy, &record));
        // This node's own entry lacks the be-liberal flag the master's copy
        // has: written (its window tracking would judge the flow it no
        // longer sees).
        let own = tcp(
            entry(1, 11),
            TCP_ESTABLISHED,
            t::FLAG_SACK_PERM,
            seen,
            432_000,
        );
        assert!(!already_applied(&own, &record));
        // Another state, a mark, the reply not seen yet, or a timeout the
        // record would lengthen by more than a minute: written.
        let syn = tcp(entry(1, 11), 1, liberal, 0, 120);
        assert!(!already_applied(&syn, &record));
        let marked = Entry {
            mark: 7,
            ..copy.clone()
        };
        assert!(!already_applied(&marked, &record));
        let unseen = tcp(entry(1, 11), TCP_ESTABLISHED, liberal, 0, 431_990);
        assert!(!already_applied(&unseen, &record));
        let expiring = tcp(entry(1, 11), TCP_ESTABLISHED, liberal, seen, 300);
        assert!(!already_applied(&expiring, &record));
        // A closing flow in the same state needs nothing, flags or not.
        let tw_own = tcp(entry(2, 11), TCP_TIME_WAIT, 0, seen, 100);
        let tw_record = tcp(entry(2, 11), TCP_TIME_WAIT, liberal, seen, 120);
        assert!(already_applied(&tw_own, &tw_record));
        // Without TCP state (UDP, or an update that carried none): written.
        assert!(!already_applied(&entry(3, 11), &entry(3, 11)));
    }
}
