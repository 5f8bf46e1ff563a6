//! The sync protocol's state machine, [`SyncPeer`]: events and the current
//! time in, [`Action`]s out; no sockets, no clocks. The reliability scheme
//! is conntrackd's FTFW (sequence numbers, cumulative acks, negative acks,
//! a bounded retransmit window, alive messages, bulk resync), with batching,
//! coalescing and authentication added. `docs/conntrack-sync-protocol.md`
//! explains the choices.
//!
//! Each node runs one `SyncPeer` for its one peer. It is symmetric: the tx
//! stream carries this node's local conntrack events (the shell feeds them
//! only while this node is the sender), the rx stream the peer's.

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tandem_conntrack::Entry;

use super::outbox::Outbox;
use super::wire::{
    AckInfo, DATA_PREFIX_LEN, Datagram, DecodeError, MAX_RECORD_LEN, Message, OVERHEAD, RANGE_LEN,
    Record, RejectReason, SeqRange, SyncKey,
};

/// Most missing ranges one Ack reports; the rest are asked for once these
/// are filled. 64 ranges = 770 bytes, well inside a datagram.
pub const MAX_NACK_RANGES: usize = 64;
/// The first sequence number of every epoch.
pub const FIRST_SEQ: u64 = 1;
/// The retransmit timeout doubles at most this many times (50 ms → 1.6 s).
const MAX_BACKOFF: u32 = 5;

/// Tunables. The defaults suit a dedicated or lightly loaded cluster link
/// with a sub-millisecond round trip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncConfig {
    /// Largest datagram sent (header, payload and tag), bytes.
    pub max_datagram: usize,
    /// How long a record may wait for others to share its datagram.
    pub flush_delay: Duration,
    /// How long a received datagram may wait for its acknowledgement.
    pub ack_delay: Duration,
    /// Acknowledge at once after this many reliable datagrams.
    pub ack_every: u32,
    /// A new gap is reported at once, but at most once per this interval:
    /// a burst arriving out of order costs one negative ack, not one each.
    pub nack_holdoff: Duration,
    /// Retransmit what stays unacknowledged this long; also the interval at
    /// which a receiver repeats an unanswered negative ack.
    pub ack_timeout: Duration,
    /// A datagram asked for again within this time is not sent again (a
    /// negative ack repeated by reordering must not double the traffic).
    pub retransmit_gap: Duration,
    /// Most datagrams retransmitted per timeout round.
    pub retransmit_burst: usize,
    /// Datagrams kept for retransmission (and the receiver's reorder
    /// buffer). What the peer lacks beyond it is sent again by bulk resync.
    pub window: usize,
    /// An idle sender says Alive this often.
    pub alive_interval: Duration,
    /// The peer is dead after this many alive intervals without a datagram.
    pub dead_after: u32,
    /// An unanswered resync request is repeated this often.
    pub resync_retry: Duration,
    /// A gap still open after this many ack timeouts of negative acks is
    /// given up on: the receiver asks for a bulk resync.
    pub max_nack_rounds: u32,
    /// A rejected-datagram log event is emitted at most this often per reason.
    pub log_interval: Duration,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            max_datagram: super::wire::DEFAULT_MAX_DATAGRAM,
            flush_delay: Duration::from_millis(2),
            ack_delay: Duration::from_millis(5),
            ack_every: 16,
            nack_holdoff: Duration::from_millis(1),
            ack_timeout: Duration::from_millis(50),
            retransmit_gap: Duration::from_millis(10),
            retransmit_burst: 64,
            window: 8192,
            alive_interval: Duration::from_millis(200),
            dead_after: 5,
            resync_retry: Duration::from_secs(1),
            max_nack_rounds: 20,
            log_interval: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("max_datagram {got} bytes is outside {min}-{max}")]
    MaxDatagram { got: usize, min: usize, max: usize },
    #[error("the retransmit window must hold at least one datagram")]
    Window,
    #[error("dead_after must be at least 1 alive interval")]
    DeadAfter,
    #[error("alive_interval must be longer than 0")]
    AliveInterval,
}

impl SyncConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let min = OVERHEAD + DATA_PREFIX_LEN + MAX_RECORD_LEN;
        let max = OVERHEAD + usize::from(u16::MAX);
        if !(min..=max).contains(&self.max_datagram) {
            return Err(ConfigError::MaxDatagram {
                got: self.max_datagram,
                min,
                max,
            });
        }
        if self.window == 0 {
            return Err(ConfigError::Window);
        }
        if self.dead_after == 0 {
            return Err(ConfigError::DeadAfter);
        }
        if self.alive_interval.is_zero() {
            return Err(ConfigError::AliveInterval);
        }
        Ok(())
    }

    fn payload_budget(&self) -> usize {
        self.max_datagram - OVERHEAD - DATA_PREFIX_LEN
    }

    fn dead_interval(&self) -> Duration {
        self.alive_interval * self.dead_after
    }
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this datagram to the peer.
    Send(Vec<u8>),
    /// Make the kernel (or the external cache) reflect this record: New and
    /// Update create or update the entry, Destroy deletes it.
    Apply(Record),
    /// The peer asked for a bulk resync: dump the local table (filtered as
    /// for events) and hand it to [`SyncPeer::bulk_dump`].
    DumpLocalTable,
    /// The peer is heard (first time, or again after being dead).
    PeerAlive {
        epoch: u64,
    },
    PeerDead {
        reason: DeadReason,
    },
    /// A bulk resync from the peer starts: the records applied until
    /// `ResyncComplete` are its whole table. An entry replicated earlier
    /// and not refreshed by then was destroyed while updates were lost: the
    /// shell may delete such entries at `ResyncComplete`.
    ResyncStarted,
    /// The peer's bulk resync is complete (`records` applied).
    ResyncComplete {
        records: u64,
    },
    /// Something an operator wants in the journal.
    Log(LogEvent),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadReason {
    /// Nothing heard since this node started.
    NeverHeard { waited: Duration },
    /// Nothing heard for this long.
    Silent { for_: Duration },
}

impl std::fmt::Display for DeadReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeadReason::NeverHeard { waited } => {
                write!(f, "not heard at all in {} ms", waited.as_millis())
            }
            DeadReason::Silent { for_ } => write!(f, "silent for {} ms", for_.as_millis()),
        }
    }
}

/// Why a bulk resync was asked for or started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResyncCause {
    /// A peer epoch never seen before: the peer (re)started, or this node did.
    NewPeerEpoch,
    Operator,
    /// The peer asked.
    PeerRequest,
    /// The peer lacks datagrams that have left the retransmit window.
    BeyondWindow,
    /// A gap stayed open after repeated negative acks.
    GapNotFilled,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEvent {
    /// Datagrams refused (`suppressed` more of that reason since the last
    /// event of this kind).
    Rejected {
        reason: RejectReason,
        error: DecodeError,
        suppressed: u64,
    },
    /// The peer restarted (a new epoch).
    PeerRestarted {
        old_epoch: u64,
        new_epoch: u64,
    },
    /// This node asked the peer for its whole table.
    ResyncRequested {
        cause: ResyncCause,
    },
    /// This node is sending its whole table to the peer.
    BulkSending {
        cause: ResyncCause,
    },
    BulkSent {
        records: u32,
    },
    /// A bulk resync skipped sequence numbers that never arrived.
    GapSkipped {
        first: u64,
        count: u64,
    },
    /// The peer acknowledged only up to `acked`, but the window now starts at
    /// `oldest_kept`: what lies between cannot be retransmitted.
    BeyondWindow {
        acked: u64,
        oldest_kept: u64,
    },
    /// The peer acknowledged a sequence number this node never sent.
    AckBeyondSent {
        ack: u64,
        next_seq: u64,
    },
    /// The peer's BulkEnd announced a count other than the records received.
    BulkCountMismatch {
        announced: u32,
        received: u64,
    },
    /// A datagram could not be encoded (a bug, reported instead of a panic).
    EncodeFailed {
        message: &'static str,
        error: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerState {
    /// Not heard yet, and not yet given up on.
    Unknown,
    Alive,
    Dead,
}

/// The rx side's view of bulk resync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResyncState {
    /// Never asked, never received.
    Idle,
    /// Asked; no BulkBegin yet.
    Requested,
    InProgress,
    Complete,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    pub datagrams_sent: u64,
    pub datagrams_received: u64,
    pub rejected_authentication: u64,
    pub rejected_version: u64,
    pub rejected_malformed: u64,
    /// Datagrams of a previous peer epoch (delayed in the network) or
    /// carrying this node's own epoch (a loop): authentic, but ignored.
    pub rejected_stale: u64,
    /// Reliable datagrams too far ahead for the reorder buffer.
    pub dropped_beyond_window: u64,
    pub records_sent: u64,
    pub records_received: u64,
    /// Records folded into a queued record of the same tuple.
    pub records_coalesced: u64,
    /// Local events given while this node is not the sender.
    pub local_events_ignored: u64,
    /// Gaps seen in the peer's stream (each datagram that opened one).
    pub gaps: u64,
    /// Sequence numbers never received, skipped by a bulk resync.
    pub lost: u64,
    pub duplicates: u64,
    pub retransmissions: u64,
    /// Unacknowledged datagrams pushed out of the full window.
    pub evicted_unacked: u64,
    pub acks_sent: u64,
    /// Acks that reported missing datagrams.
    pub nacks_sent: u64,
    pub peer_restarts: u64,
    /// Bulk resyncs asked of the peer.
    pub resyncs_requested: u64,
    /// Bulk resyncs sent to the peer.
    pub resyncs_sent: u64,
    /// Bulk resyncs received completely.
    pub resyncs_completed: u64,
}

/// A snapshot for the Status RPC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub epoch: u64,
    pub peer_epoch: Option<u64>,
    pub peer: PeerState,
    pub tx_enabled: bool,
    /// Next sequence number this node will send.
    pub tx_next_seq: u64,
    /// Everything below this the peer acknowledged.
    pub tx_acked: u64,
    /// Datagrams held for retransmission.
    pub tx_unacked: usize,
    /// Records queued for the next datagram.
    pub tx_queued: usize,
    /// Next sequence number expected from the peer.
    pub rx_next_seq: u64,
    /// Out-of-order datagrams held until the gap before them fills.
    pub rx_buffered: usize,
    pub resync: ResyncState,
    pub last_resync: Option<Instant>,
    pub counters: Counters,
}

#[derive(Debug)]
struct Sent {
    bytes: Vec<u8>,
    last_sent: Instant,
    /// When a negative ack last caused a resend.
    nacked_at: Option<Instant>,
    /// The peer holds it (a negative ack listed later datagrams as missing
    /// but not this one): no timeout resends it.
    held: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TxBulk {
    Idle,
    /// DumpLocalTable emitted; waiting for `bulk_dump`.
    AwaitingDump {
        since: Instant,
    },
}

#[derive(Debug, Default)]
struct RejectLog {
    last: Option<Instant>,
    suppressed: u64,
}

/// The sync protocol with one peer.
#[derive(Debug)]
pub struct SyncPeer {
    config: SyncConfig,
    key: SyncKey,
    epoch: u64,
    tx_enabled: bool,
    started: Instant,
    counters: Counters,

    // tx stream
    next_seq: u64,
    /// Sent reliable datagrams not yet acknowledged; `window[i]` has
    /// sequence number `next_seq - window.len() + i`.
    window: VecDeque<Sent>,
    peer_acked: u64,
    /// Timeout rounds since the peer's ack last advanced: each doubles the
    /// retransmit timeout, so a link that carries nothing back is not
    /// flooded with retransmissions.
    backoff: u32,
    outbox: Outbox,
    flush_at: Option<Instant>,
    tx_bulk: TxBulk,
    /// Sequence number of the last BulkBegin sent.
    last_bulk_begin: Option<u64>,
    last_send: Option<Instant>,

    // rx stream
    peer_epoch: Option<u64>,
    previous_peer_epoch: Option<u64>,
    rx_next: u64,
    rx_buffer: BTreeMap<u64, Message>,
    /// One past the highest sequence number the peer is known to have sent.
    peer_next: u64,
    ack_due: Option<Instant>,
    last_nack: Option<Instant>,
    rx_unacked: u32,
    /// The oldest missing sequence number and since when it is missing.
    gap_since: Option<(u64, Instant)>,
    resync: ResyncState,
    resync_asked_at: Option<Instant>,
    bulk_records: u64,
    last_resync: Option<Instant>,

    // liveness
    peer_state: PeerState,
    last_heard: Option<Instant>,

    reject_logs: [RejectLog; 3],
}

impl SyncPeer {
    /// `epoch` must be random (the shell draws it at start): it is how the
    /// peer tells this run from the previous one.
    pub fn new(
        config: SyncConfig,
        key: SyncKey,
        epoch: u64,
        now: Instant,
    ) -> Result<SyncPeer, ConfigError> {
        config.validate()?;
        Ok(SyncPeer {
            config,
            key,
            epoch,
            tx_enabled: false,
            started: now,
            counters: Counters::default(),
            next_seq: FIRST_SEQ,
            window: VecDeque::new(),
            peer_acked: 0,
            backoff: 0,
            outbox: Outbox::default(),
            flush_at: None,
            tx_bulk: TxBulk::Idle,
            last_bulk_begin: None,
            last_send: None,
            peer_epoch: None,
            previous_peer_epoch: None,
            rx_next: FIRST_SEQ,
            rx_buffer: BTreeMap::new(),
            peer_next: FIRST_SEQ,
            ack_due: None,
            last_nack: None,
            rx_unacked: 0,
            gap_since: None,
            resync: ResyncState::Idle,
            resync_asked_at: None,
            bulk_records: 0,
            last_resync: None,
            peer_state: PeerState::Unknown,
            last_heard: None,
            reject_logs: Default::default(),
        })
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether this node is the sender: its local events are replicated and
    /// a resync request is answered with its table. A node that is not the
    /// sender answers a resync request with an empty bulk (its table holds
    /// the peer's replicated flows, which must not be sent back).
    pub fn set_tx_enabled(&mut self, enabled: bool) {
        self.tx_enabled = enabled;
    }

    pub fn tx_enabled(&self) -> bool {
        self.tx_enabled
    }

    pub fn status(&self) -> Status {
        Status {
            epoch: self.epoch,
            peer_epoch: self.peer_epoch,
            peer: self.peer_state,
            tx_enabled: self.tx_enabled,
            tx_next_seq: self.next_seq,
            tx_acked: self.peer_acked,
            tx_unacked: self.window.len(),
            tx_queued: self.outbox.len(),
            rx_next_seq: self.rx_next,
            rx_buffered: self.rx_buffer.len(),
            resync: self.resync,
            last_resync: self.last_resync,
            counters: self.counters.clone(),
        }
    }

    /// When [`SyncPeer::tick`] must be called next.
    pub fn next_deadline(&self) -> Instant {
        let mut d = self.alive_due();
        let mut min = |t: Option<Instant>| {
            if let Some(t) = t {
                d = d.min(t);
            }
        };
        min(self.flush_at);
        min(self.ack_due);
        min(self.retransmit_due());
        min(self.resync_retry_due());
        min(self.dead_due());
        d
    }

    /// A local conntrack event (only replicated while this node is the sender).
    pub fn local_event(&mut self, record: Record, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if !self.tx_enabled {
            self.counters.local_events_ignored += 1;
            return out;
        }
        if self.outbox.push(record) {
            self.counters.records_coalesced += 1;
        }
        // A full datagram leaves at once; a partial one waits for company
        // at most `flush_delay`.
        while self.outbox.bytes() >= self.config.payload_budget() {
            self.send_data(now, &mut out);
        }
        if self.outbox.is_empty() {
            self.flush_at = None;
        } else if self.flush_at.is_none() {
            self.flush_at = Some(now + self.config.flush_delay);
        }
        self.due(now, &mut out);
        out
    }

    /// Timers: call at [`SyncPeer::next_deadline`] (earlier calls are harmless).
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        self.due(now, &mut out);
        out
    }

    /// The operator wants the peer's whole table again.
    pub fn resync_requested_by_operator(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        self.request_resync(ResyncCause::Operator, now, &mut out);
        self.due(now, &mut out);
        out
    }

    /// The shell's answer to [`Action::DumpLocalTable`]; may also be called
    /// unprompted to push the table to the peer. Queued events go first, so
    /// the peer sees them before the (newer) dump.
    pub fn bulk_dump(&mut self, entries: Vec<Entry>, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        self.tx_bulk = TxBulk::Idle;
        while !self.outbox.is_empty() {
            self.send_data(now, &mut out);
        }
        self.flush_at = None;
        let Ok(records) = u32::try_from(entries.len()) else {
            // 4 billion entries exceed any conntrack table; refuse rather than lie.
            out.push(Action::Log(LogEvent::EncodeFailed {
                message: "bulk-end",
                error: format!("{} entries exceed the 32-bit record count", entries.len()),
            }));
            return out;
        };
        let begin = self.next_seq;
        self.send_reliable(Message::BulkBegin, now, &mut out);
        self.last_bulk_begin = Some(begin);
        let mut bulk = Outbox::default();
        for e in entries {
            bulk.push(Record::New(e));
        }
        while !bulk.is_empty() {
            let batch = bulk.take(self.config.payload_budget());
            self.counters.records_sent += batch.len() as u64;
            self.send_reliable(Message::Data(batch), now, &mut out);
        }
        self.send_reliable(Message::BulkEnd { records }, now, &mut out);
        self.counters.resyncs_sent += 1;
        out.push(Action::Log(LogEvent::BulkSent { records }));
        self.due(now, &mut out);
        out
    }

    /// A datagram from the peer's address.
    pub fn datagram_received(&mut self, bytes: &[u8], now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        let d = match Datagram::decode(bytes, &self.key) {
            Ok(d) => d,
            Err(e) => {
                self.reject(e, now, &mut out);
                return out;
            }
        };
        if d.epoch == self.epoch || Some(d.epoch) == self.previous_peer_epoch {
            self.counters.rejected_stale += 1;
            return out;
        }
        self.counters.datagrams_received += 1;
        self.last_heard = Some(now);
        if self.peer_state != PeerState::Alive {
            self.peer_state = PeerState::Alive;
            out.push(Action::PeerAlive { epoch: d.epoch });
        }
        if self.peer_epoch != Some(d.epoch) {
            self.new_peer_epoch(&d, now, &mut out);
        }
        if let Some(ack) = d.ack
            && ack.epoch == self.epoch
        {
            self.on_ack(ack.next, now, &mut out);
        }
        if d.message.is_reliable() {
            self.on_reliable(d.seq, d.message, now, &mut out);
        } else {
            self.note_peer_next(d.seq, now);
            let acks_us = d.ack.is_some_and(|a| a.epoch == self.epoch);
            match d.message {
                Message::Ack { missing } if acks_us => {
                    self.retransmit_missing(&missing, now, &mut out);
                }
                Message::ResyncRequest => {
                    self.serve_resync(ResyncCause::PeerRequest, now, &mut out)
                }
                _ => {}
            }
        }
        self.due(now, &mut out);
        out
    }

    // ---- rx ----

    fn new_peer_epoch(&mut self, d: &Datagram, now: Instant, out: &mut Vec<Action>) {
        if let Some(old) = self.peer_epoch {
            self.counters.peer_restarts += 1;
            self.previous_peer_epoch = Some(old);
            out.push(Action::Log(LogEvent::PeerRestarted {
                old_epoch: old,
                new_epoch: d.epoch,
            }));
        }
        self.peer_epoch = Some(d.epoch);
        // Join the peer's stream where it is now: what came before is
        // covered by the bulk resync asked for below.
        self.rx_next = d.seq;
        self.peer_next = d.seq;
        self.rx_buffer.clear();
        self.rx_unacked = 0;
        self.gap_since = None;
        self.ack_due = None;
        self.bulk_records = 0;
        self.peer_acked = 0;
        // Bulks sent to the previous incarnation are of no use to this one.
        self.last_bulk_begin = None;
        if d.message == Message::BulkBegin {
            // The peer is pushing its table already.
            self.resync = ResyncState::Requested;
        } else {
            self.request_resync(ResyncCause::NewPeerEpoch, now, out);
        }
    }

    fn note_peer_next(&mut self, next: u64, now: Instant) {
        if next > self.peer_next {
            let had_gap = self.peer_next > self.rx_next;
            self.peer_next = next;
            if next > self.rx_next && !had_gap {
                // A lost tail: the peer sent more than arrived.
                self.counters.gaps += 1;
                self.nack_soon(now);
            }
        }
    }

    fn on_reliable(&mut self, seq: u64, message: Message, now: Instant, out: &mut Vec<Action>) {
        if message == Message::BulkBegin && seq > self.rx_next {
            // The bulk supersedes everything before it: stop waiting for
            // the gap, keep what came after.
            let skipped = (self.rx_next..seq).filter(|s| !self.rx_buffer.contains_key(s));
            let count = skipped.count() as u64;
            if count > 0 {
                self.counters.lost += count;
                out.push(Action::Log(LogEvent::GapSkipped {
                    first: self.rx_next,
                    count,
                }));
            }
            self.rx_buffer = self.rx_buffer.split_off(&seq);
            self.rx_next = seq;
            self.gap_since = None;
        }
        if seq < self.rx_next || self.rx_buffer.contains_key(&seq) {
            // Our ack was lost or is late: say again what we have.
            self.counters.duplicates += 1;
            self.ack_due = Some(now);
            return;
        }
        if seq - self.rx_next >= self.config.window as u64 {
            self.counters.dropped_beyond_window += 1;
            self.note_peer_next(seq.saturating_add(1), now);
            return;
        }
        let opened_gap = seq > self.peer_next.max(self.rx_next);
        if opened_gap {
            self.counters.gaps += 1;
        }
        self.peer_next = self.peer_next.max(seq + 1);
        self.rx_buffer.insert(seq, message);
        while let Some(m) = self.rx_buffer.remove(&self.rx_next) {
            self.rx_next += 1;
            self.rx_unacked += 1;
            self.deliver(m, now, out);
        }
        if self.rx_buffer.is_empty() && self.peer_next <= self.rx_next {
            self.gap_since = None;
        }
        if opened_gap {
            self.nack_soon(now);
        } else if self.rx_unacked >= self.config.ack_every {
            self.ack_due = Some(now);
        } else if self.ack_due.is_none() {
            self.ack_due = Some(now + self.config.ack_delay);
        }
    }

    fn deliver(&mut self, m: Message, now: Instant, out: &mut Vec<Action>) {
        match m {
            Message::Data(records) => {
                self.counters.records_received += records.len() as u64;
                if self.resync == ResyncState::InProgress {
                    self.bulk_records += records.len() as u64;
                }
                out.extend(records.into_iter().map(Action::Apply));
            }
            Message::BulkBegin => {
                self.resync = ResyncState::InProgress;
                self.bulk_records = 0;
                out.push(Action::ResyncStarted);
            }
            Message::BulkEnd { records } => {
                // A BulkEnd without its BulkBegin (joined mid-bulk) proves
                // nothing; the resync asked at join time will follow.
                if self.resync == ResyncState::InProgress {
                    if u64::from(records) != self.bulk_records {
                        out.push(Action::Log(LogEvent::BulkCountMismatch {
                            announced: records,
                            received: self.bulk_records,
                        }));
                    }
                    self.resync = ResyncState::Complete;
                    self.last_resync = Some(now);
                    self.counters.resyncs_completed += 1;
                    out.push(Action::ResyncComplete {
                        records: self.bulk_records,
                    });
                }
            }
            Message::Ack { .. } | Message::Alive | Message::ResyncRequest => {}
        }
    }

    fn nack_soon(&mut self, now: Instant) {
        let at = self
            .last_nack
            .map_or(now, |t| now.max(t + self.config.nack_holdoff));
        self.ack_due = Some(self.ack_due.map_or(at, |due| due.min(at)));
    }

    /// Missing sequence numbers between what was delivered and what the
    /// peer is known to have sent.
    fn missing(&self) -> Vec<SeqRange> {
        let mut out = Vec::new();
        let mut cursor = self.rx_next;
        let push = |first: u64, end: u64, out: &mut Vec<SeqRange>| {
            if end > first && out.len() < MAX_NACK_RANGES {
                let count = u32::try_from(end - first).unwrap_or(u32::MAX);
                out.push(SeqRange { first, count });
            }
        };
        for &seq in self.rx_buffer.keys() {
            push(cursor, seq, &mut out);
            cursor = seq + 1;
        }
        push(cursor, self.peer_next, &mut out);
        out
    }

    fn send_ack(&mut self, now: Instant, out: &mut Vec<Action>) {
        let missing = self.missing();
        self.ack_due = None;
        self.rx_unacked = 0;
        if self.peer_epoch.is_none() {
            return;
        }
        let nack = !missing.is_empty();
        debug_assert!(missing.len() * RANGE_LEN < self.config.max_datagram);
        self.send_unreliable(Message::Ack { missing }, now, out);
        self.counters.acks_sent += 1;
        if nack {
            self.last_nack = Some(now);
            self.counters.nacks_sent += 1;
            // Judged by time, not by the number of acks: a busy stream sends
            // many acks while one retransmission is on its way.
            match self.gap_since {
                Some((seq, _)) if seq == self.rx_next => {}
                _ => self.gap_since = Some((self.rx_next, now)),
            }
            let stuck_for = self.gap_since.map_or(Duration::ZERO, |(_, t)| now - t);
            if stuck_for > self.config.ack_timeout * self.config.max_nack_rounds
                && self.resync != ResyncState::Requested
            {
                self.gap_since = Some((self.rx_next, now));
                self.request_resync(ResyncCause::GapNotFilled, now, out);
            }
            // Ask again if the gap is still open one timeout later.
            self.ack_due = Some(now + self.config.ack_timeout);
        }
    }

    fn request_resync(&mut self, cause: ResyncCause, now: Instant, out: &mut Vec<Action>) {
        self.resync = ResyncState::Requested;
        self.resync_asked_at = Some(now);
        self.counters.resyncs_requested += 1;
        out.push(Action::Log(LogEvent::ResyncRequested { cause }));
        self.send_unreliable(Message::ResyncRequest, now, out);
    }

    fn resync_retry_due(&self) -> Option<Instant> {
        match (self.resync, self.resync_asked_at) {
            (ResyncState::Requested, Some(at)) => Some(at + self.config.resync_retry),
            _ => None,
        }
    }

    // ---- tx ----

    fn on_ack(&mut self, next: u64, now: Instant, out: &mut Vec<Action>) {
        if next > self.next_seq {
            out.push(Action::Log(LogEvent::AckBeyondSent {
                ack: next,
                next_seq: self.next_seq,
            }));
            return;
        }
        if next < self.peer_acked {
            // An old ack, reordered or carried by a retransmission.
            return;
        }
        if next > self.peer_acked {
            self.backoff = 0;
        }
        self.peer_acked = next;
        while self.window_start() < next && self.window.pop_front().is_some() {}
        let oldest_kept = self.window_start();
        if next < oldest_kept {
            // The peer lacks datagrams that left the window. A bulk resync
            // already on its way (its BulkBegin still held) will cover them.
            let bulk_in_flight = self.last_bulk_begin.is_some_and(|b| b >= oldest_kept)
                || matches!(self.tx_bulk, TxBulk::AwaitingDump { since }
                    if now < since + self.config.resync_retry);
            if !bulk_in_flight {
                out.push(Action::Log(LogEvent::BeyondWindow {
                    acked: next,
                    oldest_kept,
                }));
                self.start_bulk(ResyncCause::BeyondWindow, now, out);
            }
        }
    }

    fn window_start(&self) -> u64 {
        self.next_seq - self.window.len() as u64
    }

    fn retransmit_missing(&mut self, missing: &[SeqRange], now: Instant, out: &mut Vec<Action>) {
        let start = self.window_start();
        let gap = self.config.retransmit_gap;
        let mut cursor = self.peer_acked.max(start);
        for range in missing {
            // Between two reported gaps the peer holds everything.
            for seq in cursor..range.first.min(self.next_seq) {
                if let Some(sent) = self.window.get_mut((seq - start) as usize) {
                    sent.held = true;
                }
            }
            let first = range.first.max(start);
            let end = range.end().min(self.next_seq);
            cursor = cursor.max(end);
            for seq in first..end {
                let Some(sent) = self.window.get_mut((seq - start) as usize) else {
                    break;
                };
                if sent.nacked_at.is_some_and(|t| now < t + gap) {
                    continue;
                }
                sent.nacked_at = Some(now);
                sent.last_sent = now;
                self.counters.retransmissions += 1;
                self.counters.datagrams_sent += 1;
                out.push(Action::Send(sent.bytes.clone()));
                self.last_send = Some(now);
            }
        }
    }

    fn retransmit_due(&self) -> Option<Instant> {
        if self.peer_state != PeerState::Alive {
            // Nobody listens: keep the window for when the peer returns.
            return None;
        }
        let timeout = self.retransmit_timeout();
        self.window
            .iter()
            .filter(|s| !s.held)
            .take(self.config.retransmit_burst)
            .map(|s| s.last_sent + timeout)
            .min()
    }

    fn retransmit_timeout(&self) -> Duration {
        self.config.ack_timeout * (1u32 << self.backoff.min(MAX_BACKOFF))
    }

    fn retransmit_timed_out(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.retransmit_due().is_none_or(|t| now < t) {
            return;
        }
        let timeout = self.retransmit_timeout();
        self.backoff = self.backoff.saturating_add(1);
        let burst = self.config.retransmit_burst;
        for sent in self.window.iter_mut().filter(|s| !s.held).take(burst) {
            if now >= sent.last_sent + timeout {
                sent.last_sent = now;
                self.counters.retransmissions += 1;
                self.counters.datagrams_sent += 1;
                out.push(Action::Send(sent.bytes.clone()));
            }
        }
        self.last_send = Some(now);
    }

    fn serve_resync(&mut self, cause: ResyncCause, now: Instant, out: &mut Vec<Action>) {
        if let TxBulk::AwaitingDump { since } = self.tx_bulk
            && now < since + self.config.resync_retry
        {
            return;
        }
        // The peer's request may have crossed our BulkBegin: if that is
        // still unacknowledged and held, it will arrive.
        if self
            .last_bulk_begin
            .is_some_and(|b| b >= self.peer_acked && b >= self.window_start())
        {
            return;
        }
        self.start_bulk(cause, now, out);
    }

    fn start_bulk(&mut self, cause: ResyncCause, now: Instant, out: &mut Vec<Action>) {
        out.push(Action::Log(LogEvent::BulkSending { cause }));
        if self.tx_enabled {
            self.tx_bulk = TxBulk::AwaitingDump { since: now };
            out.push(Action::DumpLocalTable);
        } else {
            let more = self.bulk_dump(Vec::new(), now);
            out.extend(more);
        }
    }

    fn send_data(&mut self, now: Instant, out: &mut Vec<Action>) {
        let batch = self.outbox.take(self.config.payload_budget());
        if batch.is_empty() {
            return;
        }
        self.counters.records_sent += batch.len() as u64;
        self.send_reliable(Message::Data(batch), now, out);
    }

    fn ack_info(&self) -> Option<AckInfo> {
        self.peer_epoch.map(|epoch| AckInfo {
            epoch,
            next: self.rx_next,
        })
    }

    /// `message` as the next datagram (sequence number not consumed); an
    /// encoding failure (a bug) is reported as a log action.
    fn encode(&self, message: Message, out: &mut Vec<Action>) -> Option<Vec<u8>> {
        let name = message.name();
        let d = Datagram {
            epoch: self.epoch,
            seq: self.next_seq,
            ack: self.ack_info(),
            message,
        };
        match d.encode(&self.key) {
            Ok(bytes) => Some(bytes),
            Err(e) => {
                out.push(Action::Log(LogEvent::EncodeFailed {
                    message: name,
                    error: e.to_string(),
                }));
                None
            }
        }
    }

    fn send_reliable(&mut self, message: Message, now: Instant, out: &mut Vec<Action>) {
        let Some(bytes) = self.encode(message, out) else {
            return;
        };
        self.next_seq += 1;
        if self.window.len() >= self.config.window {
            self.window.pop_front();
            self.counters.evicted_unacked += 1;
        }
        self.window.push_back(Sent {
            bytes: bytes.clone(),
            last_sent: now,
            nacked_at: None,
            held: false,
        });
        self.sent(bytes, now, out);
    }

    fn send_unreliable(&mut self, message: Message, now: Instant, out: &mut Vec<Action>) {
        if let Some(bytes) = self.encode(message, out) {
            self.sent(bytes, now, out);
        }
    }

    fn sent(&mut self, bytes: Vec<u8>, now: Instant, out: &mut Vec<Action>) {
        self.counters.datagrams_sent += 1;
        self.last_send = Some(now);
        // The cumulative ack rode along; a separate one is needed only to
        // report missing datagrams.
        if self.ack_due.is_some() && self.peer_next <= self.rx_next && self.rx_buffer.is_empty() {
            self.ack_due = None;
            self.rx_unacked = 0;
        }
        out.push(Action::Send(bytes));
    }

    // ---- timers ----

    fn alive_due(&self) -> Instant {
        self.last_send
            .map_or(self.started, |t| t + self.config.alive_interval)
    }

    fn dead_due(&self) -> Option<Instant> {
        if self.peer_state == PeerState::Dead {
            return None;
        }
        Some(self.last_heard.unwrap_or(self.started) + self.config.dead_interval())
    }

    fn due(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.flush_at.is_some_and(|t| now >= t) {
            while !self.outbox.is_empty() {
                self.send_data(now, out);
            }
            self.flush_at = None;
        }
        if self.ack_due.is_some_and(|t| now >= t) {
            self.send_ack(now, out);
        }
        self.retransmit_timed_out(now, out);
        if self.resync_retry_due().is_some_and(|t| now >= t) {
            self.resync_asked_at = Some(now);
            self.send_unreliable(Message::ResyncRequest, now, out);
        }
        if let Some(t) = self.dead_due()
            && now >= t
        {
            self.peer_state = PeerState::Dead;
            let reason = match self.last_heard {
                None => DeadReason::NeverHeard {
                    waited: now - self.started,
                },
                Some(at) => DeadReason::Silent { for_: now - at },
            };
            out.push(Action::PeerDead { reason });
        }
        if now >= self.alive_due() {
            self.send_unreliable(Message::Alive, now, out);
        }
    }

    fn reject(&mut self, e: DecodeError, now: Instant, out: &mut Vec<Action>) {
        let reason = e.reason();
        let slot = match reason {
            RejectReason::Authentication => {
                self.counters.rejected_authentication += 1;
                0
            }
            RejectReason::Version => {
                self.counters.rejected_version += 1;
                1
            }
            RejectReason::Malformed => {
                self.counters.rejected_malformed += 1;
                2
            }
        };
        let log = &mut self.reject_logs[slot];
        if log.last.is_some_and(|t| now < t + self.config.log_interval) {
            log.suppressed += 1;
            return;
        }
        out.push(Action::Log(LogEvent::Rejected {
            reason,
            error: e,
            suppressed: log.suppressed,
        }));
        log.last = Some(now);
        log.suppressed = 0;
    }
}
