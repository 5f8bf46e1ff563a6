//! lb-forwarder: farms, schedulers, health checks and the nftables datapath.
//! Pure cores (the ruleset generation, the schedulers, the health state
//! machine, the netlink codec) with thin I/O shells around them.

pub mod conns;
pub mod datapath;
pub mod health;
pub mod metrics;
pub mod nft;
pub mod nftnl;
pub mod rates;
pub mod ruleset;
pub mod sched;
