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
pub const DAEMONS: &[&str] = &[
    "clustermanager",
    "vrrpd",
    "lb-forwarder",
    "conntrack-syncd",
    "cfg-syncd",
];
