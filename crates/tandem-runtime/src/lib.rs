//! What every Tandem daemon shares: its command-line arguments, logging, the
//! gRPC server on a Unix socket (and the client helper that reaches it),
//! sd_notify, signals, and a configuration that reloads atomically.
//!
//! A daemon's `main` stays short:
//!
//! ```no_run
//! # use tandem_runtime::{DaemonArgs, Context};
//! # async fn serve(ctx: Context) -> anyhow::Result<()> { Ok(()) }
//! fn main() -> std::process::ExitCode {
//!     let args = DaemonArgs { config_dir: "/etc/tandem".into(), runtime_dir: "/run/tandem".into(), state_dir: "/var/lib/tandem".into() };
//!     tandem_runtime::run("vrrpd", args, serve)
//! }
//! ```

mod args;
mod config_cell;
mod lifecycle;
mod logging;
pub mod metrics;
mod process;
mod socket;

pub use args::DaemonArgs;
pub use config_cell::{ConfigCell, Loaded, ReloadOutcome};
pub use lifecycle::{Context, Shutdown, run};
pub use logging::init_logging;
pub use socket::{
    DEFAULT_RUNTIME_DIR, DEFAULT_STATE_DIR, InstanceLock, RuntimeError, bind_socket, connect,
    socket_path,
};

/// Milliseconds since the Unix epoch, for the `*_unix_ms` fields of replies.
pub fn unix_ms(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
