//! The kernel's connection-tracking table over ctnetlink (NETLINK_NETFILTER):
//! dump, event subscription, create, update and delete of entries, used by
//! conntrack-syncd (replication) and lb-forwarder (per-backend counters).

pub mod entry;

pub use entry::{Entry, Event, TcpInfo, Tuple};
