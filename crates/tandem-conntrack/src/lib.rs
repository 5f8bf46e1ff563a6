//! The kernel's connection-tracking table over ctnetlink (NETLINK_NETFILTER):
//! dump, event subscription, create, update and delete of entries, used by
//! conntrack-syncd (replication) and lb-forwarder (per-backend counters).
//!
//! - [`Conntrack`]: requests (blocking, answered at once by the kernel).
//! - [`EventSocket`] / [`EventStream`]: events, blocking or on tokio.
//! - [`Filter`]: which entries belong to Tandem; [`KernelFilter`]: the
//!   part of that decision the kernel can take before an event is copied.
//!
//! Every socket lives in the network namespace of the thread that opened
//! it. See docs/conntrack.md for the attributes used and the kernel's
//! quirks this crate works around.

mod client;
#[cfg(test)]
mod codec;
pub mod entry;
mod error;
mod events;
mod filter;
mod kfilter;
mod netlink;
mod raw;

pub use client::{Conntrack, Request};
pub use entry::{Counters, Entry, Event, Record, TcpInfo, Tuple};
pub use error::{ConntrackError, Op};
pub use events::{DEFAULT_RECEIVE_BUFFER, EventGroup, EventSocket, EventStream};
pub use filter::{Filter, Service};
#[doc(hidden)]
pub use kfilter::run as run_kernel_filter;
pub use kfilter::{Insn, KernelFilter};
pub use raw::{CreateOptions, DecodeError};
