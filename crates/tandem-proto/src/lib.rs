//! gRPC contracts of Tandem's daemons, package `tandem.v1`.
//!
//! One service per daemon (`proto/tandem/v1/*.proto`); every service has a
//! `Status` RPC whose reply starts with [`v1::DaemonInfo`], and a `Reload`.

pub mod v1 {
    #![allow(clippy::doc_lazy_continuation, clippy::large_enum_variant)]
    tonic::include_proto!("tandem.v1");
}

/// The daemons, by the binary name that is also their socket's stem
/// (`<runtime-dir>/<name>.sock`). The order is the one `tandemctl status` prints.
/// Every node runs them all; each idles where the cluster's mode is not
/// its own (vrrpd and conntrack-syncd serve the active-passive pair, routed
/// the active-active cluster): see [`needed_in`].
pub const DAEMONS: &[&str] = &[
    "clustermanager",
    "vrrpd",
    "lb-forwarder",
    "conntrack-syncd",
    "cfg-syncd",
    "routed",
];

/// Whether `daemon` has work on a node whose clustermanager reports `mode`
/// ("standalone", "active-passive", "active-active"; empty: unknown, every
/// daemon counts). A daemon without work may be stopped or disabled.
pub fn needed_in(daemon: &str, mode: &str) -> bool {
    match daemon {
        "routed" => mode.is_empty() || mode == "active-active",
        "vrrpd" | "conntrack-syncd" => mode != "active-active",
        _ => true,
    }
}
