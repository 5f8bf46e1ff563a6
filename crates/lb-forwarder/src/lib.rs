//! lb-forwarder: farms, schedulers, health checks and the nftables datapath.
//! Pure cores (the ruleset generation, the health state machine) with thin
//! I/O shells around them.

pub mod datapath;
pub mod health;
pub mod metrics;
pub mod nft;
pub mod ruleset;
