//! conntrack-syncd's library: the pure sync protocol (wire format and state
//! machine) and the daemon's I/O shell around it.

pub mod engine;
pub mod kernel;
pub mod metrics;
pub mod priority;
pub mod role;
pub mod sync;
