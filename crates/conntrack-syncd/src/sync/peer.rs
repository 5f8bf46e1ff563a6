//! The sync protocol's state machine, [`SyncPeer`]: events and the current
//! time in, [`Action`]s out; no sockets, no clocks. The reliability scheme
//! is conntrackd's FTFW (sequence numbers, cumulative acks, negative acks,
//! alive messages, bulk resync), with batching, per-flow coalescing,
//! authentication, an epoch handshake and flow control added.
//! `docs/conntrack-sync-protocol.md` explains the choices.
//!
//! Each node runs one `SyncPeer` for its one peer. It is symmetric: the tx
//! stream carries this node's local conntrack events (both nodes send the
//! flows they forward), the rx stream the peer's.

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tandem_conntrack::Entry;

use super::lag::{Health, HealthLevel, LagHistogram, LagStats, human};
use super::outbox::{Item, Outbox};
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
/// Peer epochs remembered as retired (never adopted again).
const RETIRED_EPOCHS: usize = 64;
/// A node answers unverified epochs with a challenge at most this often.
const CHALLENGE_INTERVAL: Duration = Duration::from_millis(20);

/// Tunables. The defaults are the daemon's, for a dedicated or lightly
/// loaded cluster link with a sub-millisecond round trip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncConfig {
    /// Largest datagram sent (header, payload and tag), bytes.
    pub max_datagram: usize,
    /// How long a record may wait for others to share its datagram. 0: a
    /// record leaves at the next `tick`, with whatever else is queued by
    /// then (the shell ticks after each batch of events, so a burst is
    /// packed and a lone event does not wait).
    pub flush_delay: Duration,
    /// How long a partial datagram waits for company while the sender is
    /// busy — earlier data unacknowledged (Nagle's algorithm), or a data
    /// datagram sent less than this ago: idle, a change leaves at once;
    /// busy, changes that arrive within this time share a datagram.
    pub pack_delay: Duration,
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
    /// Most datagrams in flight (sent, not acknowledged), the ceiling of the
    /// congestion window; also the receiver's reorder buffer. Both nodes
    /// must use the same value.
    pub window: usize,
    /// The congestion window at start and after the peer restarts.
    pub initial_cwnd: usize,
    /// The congestion window never shrinks below this.
    pub min_cwnd: usize,
    /// Most records queued for sending. Changes of one flow fold into one
    /// record, so this bounds the flows with unsent changes; beyond it the
    /// queue is dropped and one bulk resync follows (a peer silent or far
    /// behind for long). Bulk resync records do not count.
    pub queue_limit: usize,
    /// An idle sender says Alive this often.
    pub alive_interval: Duration,
    /// The peer is dead after this many alive intervals without a datagram.
    pub dead_after: u32,
    /// An unanswered resync request is repeated this often; a bulk is sent
    /// again at most this often.
    pub resync_retry: Duration,
    /// A gap still open after this many ack timeouts of negative acks is
    /// given up on: the receiver asks for a bulk resync.
    pub max_nack_rounds: u32,
    /// A rejected-datagram log event is emitted at most this often per reason.
    pub log_interval: Duration,
    /// Replication lag above this, for longer than `degraded_after`, makes
    /// the health Degraded.
    pub lag_threshold: Duration,
    /// How long a problem must last before the health says so.
    pub degraded_after: Duration,
    /// A new peer epoch is adopted only from a datagram that echoes this
    /// node's own epoch (proof that it was made after this node started).
    /// Off: any new epoch is taken (the earlier protocol; a test control).
    pub epoch_handshake: bool,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            max_datagram: super::wire::DEFAULT_MAX_DATAGRAM,
            flush_delay: Duration::ZERO,
            pack_delay: Duration::from_millis(2),
            ack_delay: Duration::ZERO,
            ack_every: 16,
            nack_holdoff: Duration::from_millis(1),
            ack_timeout: Duration::from_millis(50),
            retransmit_gap: Duration::from_millis(10),
            retransmit_burst: 64,
            window: 2048,
            initial_cwnd: 256,
            min_cwnd: 32,
            queue_limit: 131_072,
            alive_interval: Duration::from_millis(200),
            dead_after: 10,
            resync_retry: Duration::from_secs(1),
            max_nack_rounds: 20,
            log_interval: Duration::from_secs(10),
            lag_threshold: Duration::from_secs(1),
            degraded_after: Duration::from_secs(3),
            epoch_handshake: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("max_datagram {got} bytes is outside {min}-{max}")]
    MaxDatagram { got: usize, min: usize, max: usize },
    #[error("the window must hold at least min_cwnd datagrams, and min_cwnd be at least 1")]
    Window,
    #[error("dead_after must be at least 1 alive interval")]
    DeadAfter,
    #[error("alive_interval must be longer than 0")]
    AliveInterval,
    #[error("queue_limit must be at least 1 record")]
    QueueLimit,
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
        if self.min_cwnd == 0 || self.window < self.min_cwnd {
            return Err(ConfigError::Window);
        }
        if self.dead_after == 0 {
            return Err(ConfigError::DeadAfter);
        }
        if self.alive_interval.is_zero() {
            return Err(ConfigError::AliveInterval);
        }
        if self.queue_limit == 0 {
            return Err(ConfigError::QueueLimit);
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
    /// `ResyncComplete` are its table. `complete`: the whole of it (the
    /// master's), so an entry this node holds and the bulk did not refresh
    /// is gone on the peer: the shell deletes such entries at
    /// `ResyncComplete`. Otherwise only the flows the peer forwards itself.
    ResyncStarted {
        complete: bool,
    },
    /// The peer's bulk resync is complete (`records` applied).
    ResyncComplete {
        records: u64,
        complete: bool,
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
    /// A gap stayed open after repeated negative acks.
    GapNotFilled,
    /// The send queue hit its limit and was dropped.
    QueueOverflow,
    /// The shell pushes its table (role change, lost kernel events).
    Local,
}

/// Why a datagram carrying a valid tag was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StaleKind {
    /// It carries this node's own epoch: reflected back at it.
    Reflected,
    /// An epoch of the peer already superseded.
    Retired,
    /// A new epoch that does not echo this node's own: it may have been
    /// recorded before this node started (a replay), so it is not adopted
    /// until the peer answers a challenge.
    Unverified,
}

impl StaleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StaleKind::Reflected => "this node's own epoch",
            StaleKind::Retired => "an epoch the peer has left",
            StaleKind::Unverified => "an epoch not yet proven fresh",
        }
    }
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
    /// Authentic datagrams of an old, foreign or unproven epoch, refused
    /// (`suppressed` more since the last event of this kind).
    Stale {
        kind: StaleKind,
        epoch: u64,
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
    /// This node is sending its table to the peer.
    BulkSending {
        cause: ResyncCause,
    },
    BulkQueued {
        records: u32,
        complete: bool,
    },
    /// A bulk resync skipped sequence numbers that never arrived.
    GapSkipped {
        first: u64,
        count: u64,
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
    /// The send queue hit `queue_limit`: dropped, a bulk resync follows.
    QueueOverflow {
        dropped: usize,
        limit: usize,
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
    /// Data datagrams sent (first transmissions only).
    pub data_datagrams_sent: u64,
    pub rejected_authentication: u64,
    pub rejected_version: u64,
    pub rejected_malformed: u64,
    /// Authentic datagrams refused for their epoch (replayed, reflected, or
    /// of a restarted peer before the handshake).
    pub rejected_stale: u64,
    /// Reliable datagrams too far ahead for the reorder buffer.
    pub dropped_beyond_window: u64,
    pub records_sent: u64,
    pub records_received: u64,
    /// Records folded into a queued record of the same tuple.
    pub records_coalesced: u64,
    /// Local events given while this node does not send its flows.
    pub local_events_ignored: u64,
    /// Gaps seen in the peer's stream (each datagram that opened one).
    pub gaps: u64,
    /// Sequence numbers never received, skipped by a bulk resync.
    pub lost: u64,
    pub duplicates: u64,
    pub retransmissions: u64,
    /// Times the congestion window was cut (a loss seen).
    pub window_cuts: u64,
    pub acks_sent: u64,
    /// Acks that reported missing datagrams.
    pub nacks_sent: u64,
    pub challenges_sent: u64,
    pub peer_restarts: u64,
    /// Bulk resyncs asked of the peer.
    pub resyncs_requested: u64,
    /// Bulk resyncs sent to the peer.
    pub resyncs_sent: u64,
    /// Bulk resyncs received completely.
    pub resyncs_completed: u64,
    /// Times the send queue hit its limit, and the records dropped then.
    pub queue_overflows: u64,
    pub records_dropped: u64,
    /// Queued records dropped because a complete bulk superseded them.
    pub records_superseded: u64,
}

/// A snapshot for the Status RPC.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub epoch: u64,
    pub peer_epoch: Option<u64>,
    pub peer: PeerState,
    pub tx_enabled: bool,
    /// Next sequence number this node will send.
    pub tx_next_seq: u64,
    /// Everything below this the peer acknowledged.
    pub tx_acked: u64,
    /// Datagrams in flight (sent, not acknowledged).
    pub tx_unacked: usize,
    /// Records queued for sending.
    pub tx_queued: usize,
    /// The congestion window, datagrams.
    pub cwnd: usize,
    /// Next sequence number expected from the peer.
    pub rx_next_seq: u64,
    /// Out-of-order datagrams held until the gap before them fills.
    pub rx_buffered: usize,
    pub resync: ResyncState,
    pub last_resync: Option<Instant>,
    /// Lag percentiles of the last seconds (None: nothing acknowledged).
    pub lag_p50: Option<Duration>,
    pub lag_p99: Option<Duration>,
    /// Age of the oldest change not yet acknowledged (zero: none pending).
    pub lag_now: Duration,
    pub lag_histogram: LagHistogram,
    pub health: Health,
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
    /// When the oldest change it carries happened, and how many records.
    oldest: Instant,
    records: u32,
    /// Sent more than once: its acknowledgement says nothing of the round
    /// trip (Karn's rule).
    resent: bool,
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
    /// When the last data datagram left (pacing of partial datagrams).
    last_data_sent: Option<Instant>,
    /// Sent reliable datagrams not yet acknowledged; `window[i]` has
    /// sequence number `next_seq - window.len() + i`.
    window: VecDeque<Sent>,
    peer_acked: u64,
    /// Timeout rounds since the peer's ack last advanced: each doubles the
    /// retransmit timeout, so a link that carries nothing back is not
    /// flooded with retransmissions.
    backoff: u32,
    /// Congestion window (datagrams in flight), AIMD: +1 per window of
    /// acknowledged datagrams (doubling below `ssthresh`), halved on a loss.
    cwnd: f64,
    ssthresh: f64,
    /// Losses of datagrams below this were already answered by a cut.
    recovery_until: u64,
    /// Datagrams of the window the peer holds (beyond a gap): not in flight.
    held: usize,
    /// Smoothed round trip and its variation (RFC 6298), from datagrams
    /// acknowledged at their first transmission. The receiver acknowledges
    /// once it has applied them, so a busy receiver lengthens it and the
    /// retransmit timeout follows instead of firing early.
    srtt: Option<Duration>,
    rttvar: Duration,
    /// When to probe for a lost tail or a lost ack (an Alive, answered by
    /// an ack with the missing ranges), long before the retransmit timeout.
    probe_at: Option<Instant>,
    outbox: Outbox,
    tx_bulk: TxBulk,
    /// Sequence number of the last BulkBegin sent.
    last_bulk_begin: Option<u64>,
    /// When the last bulk was queued (bulks are rate-limited).
    last_bulk_at: Option<Instant>,
    /// A bulk resync is owed to the peer, and why (the queue overflowed, or
    /// the shell pushed its table too soon after the last).
    bulk_owed: Option<ResyncCause>,
    last_send: Option<Instant>,
    lag: LagStats,
    /// Since when the lag has been above the threshold.
    lag_over_since: Option<Instant>,
    /// The lag as judged for the health, and when it is judged next.
    lag_judged: Duration,
    lag_check_at: Instant,

    // rx stream
    peer_epoch: Option<u64>,
    /// Peer epochs superseded by a newer one, most recent last.
    retired: VecDeque<u64>,
    last_challenge: Option<Instant>,
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
    /// Since when a resync from the peer has been wanted and not complete.
    resync_since: Option<Instant>,
    /// The id of this node's latest resync request (repeats keep it).
    resync_request_id: u32,
    /// The id of the peer's latest request served, in its current epoch.
    served_request_id: Option<u32>,
    bulk_records: u64,
    bulk_complete: bool,
    last_resync: Option<Instant>,

    // liveness
    peer_state: PeerState,
    last_heard: Option<Instant>,
    /// The last authentic-looking datagram refused (for the health message).
    last_refused: Option<(Instant, &'static str)>,

    /// Rate limits of repeated log events: three reject reasons, stale
    /// epochs, queue overflows.
    reject_logs: [RejectLog; 5],
}

impl SyncPeer {
    /// `epoch` must be fresh (the shell draws it at random at start): it is
    /// how the peer tells this run from the previous one.
    pub fn new(
        config: SyncConfig,
        key: SyncKey,
        epoch: u64,
        now: Instant,
    ) -> Result<SyncPeer, ConfigError> {
        config.validate()?;
        let cwnd = config.initial_cwnd.clamp(config.min_cwnd, config.window) as f64;
        Ok(SyncPeer {
            key,
            epoch,
            tx_enabled: false,
            started: now,
            counters: Counters::default(),
            next_seq: FIRST_SEQ,
            last_data_sent: None,
            window: VecDeque::new(),
            peer_acked: 0,
            backoff: 0,
            cwnd,
            ssthresh: config.window as f64,
            recovery_until: 0,
            held: 0,
            srtt: None,
            rttvar: Duration::ZERO,
            probe_at: None,
            outbox: Outbox::default(),
            tx_bulk: TxBulk::Idle,
            last_bulk_begin: None,
            last_bulk_at: None,
            bulk_owed: None,
            last_send: None,
            lag: LagStats::default(),
            lag_over_since: None,
            lag_judged: Duration::ZERO,
            lag_check_at: now,
            peer_epoch: None,
            retired: VecDeque::new(),
            last_challenge: None,
            rx_next: FIRST_SEQ,
            rx_buffer: BTreeMap::new(),
            peer_next: FIRST_SEQ,
            ack_due: None,
            last_nack: None,
            rx_unacked: 0,
            gap_since: None,
            resync: ResyncState::Idle,
            resync_asked_at: None,
            resync_since: None,
            resync_request_id: 0,
            served_request_id: None,
            bulk_records: 0,
            bulk_complete: false,
            last_resync: None,
            peer_state: PeerState::Unknown,
            last_heard: None,
            last_refused: None,
            reject_logs: Default::default(),
            config,
        })
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    pub fn config(&self) -> &SyncConfig {
        &self.config
    }

    /// Whether local events are taken (replicated). The daemon sends the
    /// flows it forwards whatever its role; off, they are counted and
    /// dropped.
    pub fn set_tx_enabled(&mut self, enabled: bool) {
        self.tx_enabled = enabled;
    }

    pub fn tx_enabled(&self) -> bool {
        self.tx_enabled
    }

    pub fn peer_state(&self) -> PeerState {
        self.peer_state
    }

    pub fn status(&self, now: Instant) -> Status {
        let (lag_p50, lag_p99) = self.lag.p50_p99(now);
        Status {
            epoch: self.epoch,
            peer_epoch: self.peer_epoch,
            peer: self.peer_state,
            tx_enabled: self.tx_enabled,
            tx_next_seq: self.next_seq,
            tx_acked: self.peer_acked,
            tx_unacked: self.window.len(),
            tx_queued: self.outbox.records(),
            cwnd: self.cwnd_now(),
            rx_next_seq: self.rx_next,
            rx_buffered: self.rx_buffer.len(),
            resync: self.resync,
            last_resync: self.last_resync,
            lag_p50,
            lag_p99,
            lag_now: self.lag_now(now),
            lag_histogram: self.lag.histogram(),
            health: self.health(now),
            counters: self.counters.clone(),
        }
    }

    /// How replication is doing: Failed while the peer is not heard,
    /// Degraded while the lag (or a resync from the peer) has been over
    /// its threshold for `degraded_after`, else Ok.
    pub fn health(&self, now: Instant) -> Health {
        let refused = self
            .last_refused
            .filter(|(t, _)| now.saturating_duration_since(*t) <= self.config.dead_interval())
            .map(|(_, why)| format!("; its datagrams are refused ({why})"))
            .unwrap_or_default();
        if self.peer_state == PeerState::Dead {
            let message = match self.last_heard {
                None => format!(
                    "peer not heard since this node started {} ago{refused}",
                    human(now.saturating_duration_since(self.started))
                ),
                Some(t) => format!(
                    "peer silent for {}{refused}",
                    human(now.saturating_duration_since(t))
                ),
            };
            return Health {
                level: HealthLevel::Failed,
                message,
            };
        }
        if let Some(since) = self.lag_over_since
            && now.saturating_duration_since(since) >= self.config.degraded_after
        {
            return Health {
                level: HealthLevel::Degraded,
                message: format!(
                    "replication lag {} above {} for {}",
                    human(self.lag_judged.max(self.lag_now(now))),
                    human(self.config.lag_threshold),
                    human(now.saturating_duration_since(since))
                ),
            };
        }
        if matches!(
            self.resync,
            ResyncState::Requested | ResyncState::InProgress
        ) && let Some(asked) = self.resync_since
            && now.saturating_duration_since(asked) >= self.config.degraded_after
        {
            return Health {
                level: HealthLevel::Degraded,
                message: format!(
                    "bulk resync from the peer not complete after {}",
                    human(now.saturating_duration_since(asked))
                ),
            };
        }
        Health::ok()
    }

    /// The lag as the health judges it, every 100 ms: the age of the oldest
    /// change not acknowledged yet, or the median lag of what was
    /// acknowledged in the last `degraded_after` if that is more (changes
    /// that do get through, each a second late, are a lagging replication
    /// too).
    fn judge_lag(&mut self, now: Instant) {
        self.lag_check_at = now + Duration::from_millis(100);
        let pending = self.lag_now(now);
        let recent = self
            .lag
            .quantile_within(now, self.config.degraded_after, 0.5)
            .unwrap_or_default();
        let lag = pending.max(recent);
        self.lag_judged = lag;
        if lag > self.config.lag_threshold {
            if self.lag_over_since.is_none() {
                let over = pending.saturating_sub(self.config.lag_threshold);
                self.lag_over_since = Some(now - over);
            }
        } else {
            self.lag_over_since = None;
        }
    }

    /// Whether the stream to the peer is behind: the lag as last judged
    /// (every 100 ms) at least a tenth of the lag threshold. The shell
    /// favours the daemon's scheduling meanwhile ([`crate::priority`]).
    pub fn is_behind(&self) -> bool {
        self.lag_judged >= self.config.lag_threshold / 10
    }

    /// Age of the oldest change not yet acknowledged by the peer.
    fn lag_now(&self, now: Instant) -> Duration {
        let queued = self.outbox.oldest();
        let in_flight = self.window.iter().map(|s| s.oldest).min();
        [queued, in_flight]
            .into_iter()
            .flatten()
            .min()
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t))
    }

    fn cwnd_now(&self) -> usize {
        (self.cwnd as usize).clamp(self.config.min_cwnd, self.config.window)
    }

    /// When [`SyncPeer::tick`] must be called next.
    pub fn next_deadline(&self) -> Instant {
        let mut d = self.alive_due();
        let mut min = |t: Option<Instant>| {
            if let Some(t) = t {
                d = d.min(t);
            }
        };
        min(self.send_due());
        min(self.probe_due());
        min(self.ack_due);
        min(self.retransmit_due());
        min(self.resync_retry_due());
        min(self.dead_due());
        d
    }

    /// A local conntrack event: queued for the peer (sent at the next
    /// [`SyncPeer::tick`], as far as the congestion window allows).
    pub fn local_event(&mut self, record: Record, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if !self.tx_enabled {
            self.counters.local_events_ignored += 1;
            return out;
        }
        if self.outbox.live_records() >= self.config.queue_limit
            && !self.outbox.would_coalesce(record.key())
        {
            let dropped = self.outbox.clear();
            self.counters.queue_overflows += 1;
            self.counters.records_dropped += dropped as u64 + 1;
            self.bulk_owed = Some(ResyncCause::QueueOverflow);
            let log = &mut self.reject_logs[4];
            if log.last.is_some_and(|t| now < t + self.config.log_interval) {
                log.suppressed += dropped as u64 + 1;
            } else {
                out.push(Action::Log(LogEvent::QueueOverflow {
                    dropped: dropped + 1 + log.suppressed as usize,
                    limit: self.config.queue_limit,
                }));
                log.last = Some(now);
                log.suppressed = 0;
            }
            return out;
        }
        if self.outbox.push(record, now) {
            self.counters.records_coalesced += 1;
        }
        out
    }

    /// Timers and sending: call at [`SyncPeer::next_deadline`], and after
    /// feeding events or datagrams (earlier calls are harmless).
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        self.due(now, &mut out);
        out
    }

    /// The operator wants the peer's whole table again.
    pub fn resync_requested_by_operator(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        self.request_resync(ResyncCause::Operator, now, &mut out);
        out
    }

    /// Pushes this node's table to the peer unasked (the shell: on
    /// becoming master, after lost kernel events): emits DumpLocalTable —
    /// unless one was dumped less than `resync_retry` ago: then the table
    /// is owed, and sent once the peer keeps up (a burst that overruns the
    /// kernel's event buffer again and again costs one table, not one per
    /// overrun).
    pub fn push_table(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        let recent = self
            .last_bulk_at
            .is_some_and(|t| now < t + self.config.resync_retry);
        if recent || matches!(self.tx_bulk, TxBulk::AwaitingDump { .. }) {
            // An overflow's table, if also owed, is the same table.
            self.bulk_owed.get_or_insert(ResyncCause::Local);
        } else {
            self.start_bulk(ResyncCause::Local, now, &mut out);
        }
        out
    }

    /// The shell's answer to [`Action::DumpLocalTable`]: queues a bulk of
    /// `entries` (`complete`: this node's whole table, as the master sends
    /// it; otherwise only the flows it forwards itself). Changes queued
    /// before go first; changes after it may fold into its records.
    pub fn bulk_dump(&mut self, entries: Vec<Entry>, complete: bool, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        self.tx_bulk = TxBulk::Idle;
        let Ok(records) = u32::try_from(entries.len()) else {
            // 4 billion entries exceed any conntrack table; refuse rather than lie.
            out.push(Action::Log(LogEvent::EncodeFailed {
                message: "bulk-end",
                error: format!("{} entries exceed the 32-bit record count", entries.len()),
            }));
            return out;
        };
        self.bulk_owed = None;
        self.last_bulk_at = Some(now);
        if complete {
            // The whole table, newer than every change still queued: those
            // would only be applied to be overwritten (and a destroyed
            // flow's absence from the bulk deletes it on the peer).
            let superseded = self.outbox.clear();
            self.counters.records_superseded += superseded as u64;
        }
        self.outbox.push_marker(Item::BulkBegin { complete }, now);
        for e in entries {
            self.outbox.push_bulk(Record::New(e), now);
        }
        self.outbox.push_marker(Item::BulkEnd { records }, now);
        self.counters.resyncs_sent += 1;
        out.push(Action::Log(LogEvent::BulkQueued { records, complete }));
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
        if let Some(kind) = self.stale(&d) {
            self.refuse_stale(kind, &d, now, &mut out);
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
            let acks_us = d.ack.is_some_and(|a| a.epoch == self.epoch && a.next != 0);
            match d.message {
                Message::Ack { missing } if acks_us => {
                    self.retransmit_missing(&missing, now, &mut out);
                }
                Message::ResyncRequest { id } => self.serve_resync(id, now, &mut out),
                // An Alive may be the peer's probe for a lost ack: say
                // where this node is (cheap: one datagram per Alive).
                Message::Alive if self.ack_due.is_none() => self.ack_due = Some(now),
                _ => {}
            }
        }
        out
    }

    // ---- epochs ----

    /// Whether an authentic datagram must be refused for its epoch.
    fn stale(&self, d: &Datagram) -> Option<StaleKind> {
        if d.epoch == self.epoch {
            return Some(StaleKind::Reflected);
        }
        if Some(d.epoch) == self.peer_epoch {
            return None;
        }
        if self.retired.contains(&d.epoch) {
            return Some(StaleKind::Retired);
        }
        // A new epoch. Taken only from a datagram made after this node
        // started: one that echoes this node's own (random, fresh) epoch.
        // A datagram recorded earlier, whatever its epoch, cannot.
        if self.config.epoch_handshake && d.ack.map(|a| a.epoch) != Some(self.epoch) {
            return Some(StaleKind::Unverified);
        }
        None
    }

    fn refuse_stale(&mut self, kind: StaleKind, d: &Datagram, now: Instant, out: &mut Vec<Action>) {
        self.counters.rejected_stale += 1;
        self.last_refused = Some((now, kind.as_str()));
        if kind == StaleKind::Unverified
            && self
                .last_challenge
                .is_none_or(|t| now >= t + CHALLENGE_INTERVAL)
        {
            // The peer may simply have restarted and not heard this node
            // yet: echo its epoch, so its next datagram can prove itself.
            self.last_challenge = Some(now);
            self.counters.challenges_sent += 1;
            let ack = AckInfo {
                epoch: d.epoch,
                next: 0,
            };
            self.send_unreliable_acking(Message::Alive, Some(ack), now, out);
        }
        let log = &mut self.reject_logs[3];
        if log.last.is_some_and(|t| now < t + self.config.log_interval) {
            log.suppressed += 1;
            return;
        }
        out.push(Action::Log(LogEvent::Stale {
            kind,
            epoch: d.epoch,
            suppressed: log.suppressed,
        }));
        log.last = Some(now);
        log.suppressed = 0;
    }

    // ---- rx ----

    fn new_peer_epoch(&mut self, d: &Datagram, now: Instant, out: &mut Vec<Action>) {
        if let Some(old) = self.peer_epoch {
            self.counters.peer_restarts += 1;
            if self.retired.len() >= self.retired_capacity() {
                self.retired.pop_front();
            }
            self.retired.push_back(old);
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
        // The tx stream starts over for the new incarnation: it acks from
        // where it joined; what it missed before comes in the bulk it asks.
        self.peer_acked = 0;
        self.backoff = 0;
        self.cwnd = self
            .config
            .initial_cwnd
            .clamp(self.config.min_cwnd, self.config.window) as f64;
        self.ssthresh = self.config.window as f64;
        self.recovery_until = 0;
        self.last_bulk_begin = None;
        self.last_bulk_at = None;
        self.served_request_id = None;
        if matches!(d.message, Message::BulkBegin { .. }) {
            // The peer is pushing its table already.
            self.resync = ResyncState::Requested;
            self.resync_asked_at = Some(now);
            self.resync_since = Some(now);
        } else {
            self.request_resync(ResyncCause::NewPeerEpoch, now, out);
        }
    }

    fn retired_capacity(&self) -> usize {
        // Without the handshake, only the one previous epoch is refused
        // (the earlier protocol, kept as a test control).
        if self.config.epoch_handshake {
            RETIRED_EPOCHS
        } else {
            1
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
        if matches!(message, Message::BulkBegin { .. }) && seq > self.rx_next {
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
        // The sender paces to these acks: one is due soon after every
        // delivery, also while a gap is open (it then lists the gap again,
        // which the sender does not resend twice within retransmit_gap).
        let due = if opened_gap {
            self.nack_soon(now);
            return;
        } else if self.rx_unacked >= self.config.ack_every {
            now
        } else {
            now + self.config.ack_delay
        };
        self.ack_due = Some(self.ack_due.map_or(due, |d| d.min(due)));
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
            Message::BulkBegin { complete } => {
                if self.resync != ResyncState::Requested && self.resync != ResyncState::InProgress {
                    self.resync_asked_at = Some(now);
                    self.resync_since = Some(now);
                }
                self.resync = ResyncState::InProgress;
                self.bulk_records = 0;
                self.bulk_complete = complete;
                out.push(Action::ResyncStarted { complete });
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
                    self.resync_since = None;
                    self.last_resync = Some(now);
                    self.counters.resyncs_completed += 1;
                    out.push(Action::ResyncComplete {
                        records: self.bulk_records,
                        complete: self.bulk_complete,
                    });
                }
            }
            Message::Ack { .. } | Message::Alive | Message::ResyncRequest { .. } => {}
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
        if !matches!(
            self.resync,
            ResyncState::Requested | ResyncState::InProgress
        ) {
            self.resync_since = Some(now);
        }
        self.resync = ResyncState::Requested;
        self.resync_asked_at = Some(now);
        self.resync_request_id = self.resync_request_id.wrapping_add(1);
        self.counters.resyncs_requested += 1;
        out.push(Action::Log(LogEvent::ResyncRequested { cause }));
        let id = self.resync_request_id;
        self.send_unreliable(Message::ResyncRequest { id }, now, out);
    }

    fn resync_retry_due(&self) -> Option<Instant> {
        match (self.resync, self.resync_asked_at) {
            (ResyncState::Requested, Some(at)) => Some(at + self.config.resync_retry),
            _ => None,
        }
    }

    // ---- tx ----

    fn on_ack(&mut self, next: u64, now: Instant, out: &mut Vec<Action>) {
        if next == 0 {
            // A challenge: the peer heard this epoch, joined nothing yet.
            return;
        }
        if next > self.next_seq {
            out.push(Action::Log(LogEvent::AckBeyondSent {
                ack: next,
                next_seq: self.next_seq,
            }));
            return;
        }
        if next <= self.peer_acked {
            // An old ack, reordered or carried by a retransmission.
            return;
        }
        self.backoff = 0;
        self.peer_acked = next;
        let mut acked = 0usize;
        let mut rtt = None;
        while self.window_start() < next {
            let Some(sent) = self.window.pop_front() else {
                break;
            };
            acked += 1;
            if sent.held {
                self.held -= 1;
            }
            if sent.records > 0 {
                self.lag.record(
                    now,
                    now.saturating_duration_since(sent.oldest),
                    sent.records,
                );
            }
            rtt = (!sent.resent).then(|| now.saturating_duration_since(sent.last_sent));
        }
        if let Some(sample) = rtt {
            self.rtt_sample(sample);
        }
        self.probe_at = (!self.window.is_empty()).then(|| now + self.probe_timeout());
        // AIMD: slow start below ssthresh, then one datagram per window.
        let max = self.config.window as f64;
        for _ in 0..acked {
            if self.cwnd < self.ssthresh {
                self.cwnd += 1.0;
            } else {
                self.cwnd += 1.0 / self.cwnd.max(1.0);
            }
        }
        self.cwnd = self.cwnd.min(max);
    }

    /// RFC 6298, 2.2 and 2.3.
    fn rtt_sample(&mut self, r: Duration) {
        match self.srtt {
            None => {
                self.srtt = Some(r);
                self.rttvar = r / 2;
            }
            Some(srtt) => {
                let diff = srtt.abs_diff(r);
                self.rttvar = (self.rttvar * 3 + diff) / 4;
                self.srtt = Some((srtt * 7 + r) / 8);
            }
        }
    }

    /// How long an unacknowledged datagram waits before a probe: two round
    /// trips (tail loss probe, as in RFC 8985), 2 ms at least, at most the
    /// retransmit timeout.
    fn probe_timeout(&self) -> Duration {
        self.srtt
            .map_or(Duration::from_millis(10), |srtt| srtt * 2)
            .clamp(Duration::from_millis(2), self.config.ack_timeout)
    }

    /// Datagrams sent and neither acknowledged nor known to be held.
    fn in_flight(&self) -> usize {
        self.window.len() - self.held
    }

    /// Whether another datagram may be sent: the congestion window has
    /// room, and the peer's reorder buffer too.
    fn may_send(&self) -> bool {
        self.in_flight() < self.cwnd_now() && self.window.len() < self.config.window
    }

    fn window_start(&self) -> u64 {
        self.next_seq - self.window.len() as u64
    }

    /// A loss was seen (`first_lost` missing, or a retransmit timeout):
    /// halve the window, once per window of data (losses of datagrams sent
    /// before the cut are the same event). A timeout halves it too rather
    /// than collapsing it as TCP does: on a dedicated cluster link it means
    /// a receiver stalled for a moment (a busy CPU) far more often than a
    /// congested network, and a collapsed window would take seconds of
    /// round trips to regrow.
    fn cut_window(&mut self, first_lost: u64) {
        if first_lost < self.recovery_until {
            return;
        }
        let min = self.config.min_cwnd as f64;
        self.ssthresh = (self.cwnd / 2.0).max(min);
        self.cwnd = self.ssthresh;
        self.recovery_until = self.next_seq;
        self.counters.window_cuts += 1;
    }

    fn retransmit_missing(&mut self, missing: &[SeqRange], now: Instant, out: &mut Vec<Action>) {
        let start = self.window_start();
        let gap = self.config.retransmit_gap;
        let mut cursor = self.peer_acked.max(start);
        if let Some(first) = missing.first()
            && first.first < self.next_seq
        {
            self.cut_window(first.first);
        }
        for range in missing {
            // Between two reported gaps the peer holds everything.
            for seq in cursor..range.first.min(self.next_seq) {
                if let Some(sent) = self.window.get_mut((seq - start) as usize)
                    && !sent.held
                {
                    sent.held = true;
                    self.held += 1;
                }
            }
            let first = range.first.max(start);
            let end = range.end().min(self.next_seq);
            cursor = cursor.max(end);
            for seq in first..end {
                let Some(sent) = self.window.get_mut((seq - start) as usize) else {
                    break;
                };
                if sent.held {
                    // Missing after all (the peer lost it from its buffer).
                    sent.held = false;
                    self.held -= 1;
                }
                if sent.nacked_at.is_some_and(|t| now < t + gap) {
                    continue;
                }
                sent.nacked_at = Some(now);
                sent.last_sent = now;
                sent.resent = true;
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

    /// The retransmit timeout: the measured round trip plus four times its
    /// variation (RFC 6298), at least `ack_timeout`, doubled per round
    /// without progress.
    fn retransmit_timeout(&self) -> Duration {
        let max = self.config.ack_timeout * (1u32 << MAX_BACKOFF);
        let base = self
            .srtt
            .map_or(self.config.ack_timeout, |srtt| srtt + self.rttvar * 4)
            .clamp(self.config.ack_timeout, max);
        (base * (1u32 << self.backoff.min(MAX_BACKOFF))).min(max)
    }

    /// Nothing acknowledged for a retransmit timeout: the oldest datagram
    /// the peer may lack is sent again, with an Alive that tells how far
    /// the stream goes, so the peer's answer (a cumulative ack and the
    /// ranges it misses) says exactly what else to resend. Resending every
    /// unacknowledged datagram instead would mostly duplicate what arrived
    /// (the acks were lost) and feed a storm when the peer is slow.
    fn retransmit_timed_out(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.retransmit_due().is_none_or(|t| now < t) {
            return;
        }
        let timeout = self.retransmit_timeout();
        self.backoff = self.backoff.saturating_add(1);
        let first = self.window_start();
        self.cut_window(first);
        if let Some(sent) = self
            .window
            .iter_mut()
            .find(|s| !s.held && now >= s.last_sent + timeout)
        {
            sent.last_sent = now;
            sent.resent = true;
            self.counters.retransmissions += 1;
            self.counters.datagrams_sent += 1;
            out.push(Action::Send(sent.bytes.clone()));
        }
        // The others wait one more timeout, unless the answer asks for them.
        for sent in self.window.iter_mut().filter(|s| !s.held) {
            sent.last_sent = sent.last_sent.max(now);
        }
        self.send_unreliable(Message::Alive, now, out);
    }

    /// The peer's resync request `id`. A request is served once; its
    /// repeat (the bulk was lost) at most once per `resync_retry`; an
    /// older one (a replay) never. So a replayed request cannot make this
    /// node send its table over and over.
    fn serve_resync(&mut self, id: u32, now: Instant, out: &mut Vec<Action>) {
        if let TxBulk::AwaitingDump { since } = self.tx_bulk
            && now < since + self.config.resync_retry
        {
            return;
        }
        // A bulk still queued or in flight will arrive.
        if self.bulk_pending() {
            return;
        }
        match self.served_request_id {
            Some(last) if id < last => return,
            Some(last)
                if id == last
                    && self
                        .last_bulk_at
                        .is_some_and(|t| now < t + self.config.resync_retry) =>
            {
                return;
            }
            _ => {}
        }
        self.served_request_id = Some(id);
        self.start_bulk(ResyncCause::PeerRequest, now, out);
    }

    /// Whether a bulk is queued or not yet acknowledged.
    fn bulk_pending(&self) -> bool {
        self.outbox.markers() > 0
            || self
                .last_bulk_begin
                .is_some_and(|b| b >= self.peer_acked && b >= self.window_start())
    }

    fn start_bulk(&mut self, cause: ResyncCause, now: Instant, out: &mut Vec<Action>) {
        out.push(Action::Log(LogEvent::BulkSending { cause }));
        self.tx_bulk = TxBulk::AwaitingDump { since: now };
        out.push(Action::DumpLocalTable);
    }

    /// When a partial datagram may leave: after the flush delay; while the
    /// sender is busy — data in flight, or a data datagram sent less than
    /// the pack delay ago — not before the pack delay has passed since the
    /// oldest queued change (in flight: its ack will come sooner, and what
    /// arrives meanwhile shares the next datagram) or since the last data
    /// datagram left, whichever is sooner. A steady stream thus leaves at
    /// most one partial datagram per pack delay, packed with what arrived
    /// meanwhile; a lone change on an idle sender leaves at once; no change
    /// waits longer than the larger of the two delays.
    fn partial_due(&self) -> Option<Instant> {
        let oldest = self.outbox.oldest()?;
        let cfg = &self.config;
        let longest = oldest + cfg.flush_delay.max(cfg.pack_delay);
        let busy_until = if self.in_flight() > 0 {
            Some(oldest + cfg.pack_delay)
        } else {
            self.last_data_sent.map(|t| t + cfg.pack_delay)
        };
        let due = oldest + cfg.flush_delay;
        Some(busy_until.map_or(due, |b| due.max(b.min(longest))))
    }

    /// Whether a partial datagram may leave now.
    fn flush_due(&self, now: Instant) -> bool {
        self.partial_due().is_some_and(|t| now >= t)
    }

    /// When queued data may be sent (None: nothing queued, or the window
    /// is full and only an ack can open it).
    fn send_due(&self) -> Option<Instant> {
        if self.outbox.is_empty() || !self.may_send() {
            return None;
        }
        if self.outbox.marker_first()
            || self.outbox.leading_bytes(self.config.payload_budget())
                >= self.config.payload_budget()
        {
            return self.outbox.oldest();
        }
        self.partial_due()
    }

    /// Sends queued data while the congestion window has room.
    fn fill(&mut self, now: Instant, out: &mut Vec<Action>) {
        let budget = self.config.payload_budget();
        while self.may_send() {
            if let Some((item, since)) = self.outbox.take_marker() {
                let message = match item {
                    Item::BulkBegin { complete } => {
                        self.last_bulk_begin = Some(self.next_seq);
                        Message::BulkBegin { complete }
                    }
                    Item::BulkEnd { records } => Message::BulkEnd { records },
                    Item::Record(_) => continue,
                };
                self.send_reliable(message, since, 0, now, out);
                continue;
            }
            if self.outbox.is_empty() {
                break;
            }
            if self.outbox.leading_bytes(budget) < budget && !self.flush_due(now) {
                break;
            }
            let Some(batch) = self.outbox.take(budget) else {
                break;
            };
            let n = batch.records.len();
            self.counters.records_sent += n as u64;
            self.counters.data_datagrams_sent += 1;
            self.last_data_sent = Some(now);
            self.send_reliable(
                Message::Data(batch.records),
                batch.oldest,
                u32::try_from(n).unwrap_or(u32::MAX),
                now,
                out,
            );
        }
    }

    fn ack_info(&self) -> Option<AckInfo> {
        self.peer_epoch.map(|epoch| AckInfo {
            epoch,
            next: self.rx_next,
        })
    }

    /// `message` as the next datagram (sequence number not consumed); an
    /// encoding failure (a bug) is reported as a log action.
    fn encode(
        &self,
        message: Message,
        ack: Option<AckInfo>,
        out: &mut Vec<Action>,
    ) -> Option<Vec<u8>> {
        let name = message.name();
        let d = Datagram {
            epoch: self.epoch,
            seq: self.next_seq,
            ack,
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

    fn send_reliable(
        &mut self,
        message: Message,
        oldest: Instant,
        records: u32,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(bytes) = self.encode(message, self.ack_info(), out) else {
            return;
        };
        self.next_seq += 1;
        self.window.push_back(Sent {
            bytes: bytes.clone(),
            last_sent: now,
            nacked_at: None,
            held: false,
            oldest,
            records,
            resent: false,
        });
        self.probe_at = Some(now + self.probe_timeout());
        self.sent(bytes, now, out);
    }

    fn send_unreliable(&mut self, message: Message, now: Instant, out: &mut Vec<Action>) {
        let ack = self.ack_info();
        self.send_unreliable_acking(message, ack, now, out);
    }

    fn send_unreliable_acking(
        &mut self,
        message: Message,
        ack: Option<AckInfo>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        if let Some(bytes) = self.encode(message, ack, out) {
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

    fn probe_due(&self) -> Option<Instant> {
        if self.peer_state != PeerState::Alive || self.in_flight() == 0 {
            return None;
        }
        self.probe_at
    }

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
        if self.ack_due.is_some_and(|t| now >= t) {
            self.send_ack(now, out);
        }
        self.retransmit_timed_out(now, out);
        if self.probe_due().is_some_and(|t| now >= t) {
            // Once per silence: the answer re-arms it.
            self.probe_at = None;
            self.send_unreliable(Message::Alive, now, out);
        }
        // The table owed (after an overflow, or a push too soon after the
        // last) goes once the peer keeps up again (alive, everything sent
        // acknowledged).
        if let Some(cause) = self.bulk_owed
            && self.peer_state == PeerState::Alive
            && self.window.is_empty()
            && self.tx_bulk == TxBulk::Idle
            && !self.bulk_pending()
        {
            self.start_bulk(cause, now, out);
        }
        self.fill(now, out);
        if self.resync_retry_due().is_some_and(|t| now >= t) {
            self.resync_asked_at = Some(now);
            let id = self.resync_request_id;
            self.send_unreliable(Message::ResyncRequest { id }, now, out);
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
        if now >= self.lag_check_at {
            self.judge_lag(now);
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
        self.last_refused = Some((now, reason.as_str()));
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
