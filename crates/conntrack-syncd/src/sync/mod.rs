//! The conntrack sync protocol, pure: the wire format ([`wire`]) and the
//! state machine of one peer ([`peer`]). No sockets, no clocks: the daemon's
//! shell feeds events and the time in and carries the actions out.

pub mod lag;
mod outbox;
pub mod peer;
pub mod wire;

pub use lag::{Health, HealthLevel, LAG_BUCKETS_S, LagHistogram, LagStats};
pub use peer::{
    Action, ConfigError, Counters, DeadReason, LogEvent, PeerState, ResyncCause, ResyncState,
    StaleKind, Status, SyncConfig, SyncPeer,
};
pub use wire::{
    AckInfo, Datagram, DecodeError, EncodeError, KeyError, Message, Record, RejectReason, SeqRange,
    SyncKey,
};
