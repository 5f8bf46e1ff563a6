//! routed — an active-active node's announcements. Tandem does not speak
//! BGP itself: it generates BIRD's configuration (sessions to the upstream
//! routers, BFD, the farms' VIPs as routes) and drives BIRD over its
//! control socket, withdrawing the VIPs on maintenance, when a farm has no
//! healthy backend, and when the local datapath is not ready. A node that
//! dies is dropped by the routers themselves, within BFD's detection time.
//!
//! - [`bird_conf`]: BIRD's configuration, a pure function of the cluster.
//! - [`control`]: BIRD's control-socket protocol (codec and client).
//! - [`decide`]: what to announce and why, pure.
//! - [`forwarder`]: the datapath's view from lb-forwarder.
//! - [`maintenance`]: maintenance kept across restarts.
//! - [`engine`]: the loop that ties them together.

pub mod bird_conf;
pub mod control;
pub mod decide;
pub mod engine;
pub mod forwarder;
pub mod maintenance;
