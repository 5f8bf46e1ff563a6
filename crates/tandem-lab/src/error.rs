use std::io;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;

/// What went wrong in the lab. Every message names the command, namespace,
/// interface or process concerned, so a failing test says where to look.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LabError {
    /// A command ran and exited unsuccessfully.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    /// A command could not be started at all (missing program, or entering
    /// the namespace failed between fork and exec).
    #[error("could not start `{command}`: {source}")]
    Spawn { command: String, source: io::Error },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("entering network namespace {ns}: {source}")]
    Setns { ns: String, source: nix::Error },
    #[error("the thread running in network namespace {ns} panicked: {message}")]
    Panicked { ns: String, message: String },
    #[error("{what} not ready after {timeout:?}: {last}")]
    Timeout {
        what: String,
        timeout: Duration,
        last: String,
    },
    /// The process was already reaped: signalling its PID could hit an
    /// unrelated process that reused it, so the lab refuses.
    #[error("process {pid} (`{command}`) has already exited")]
    Exited { pid: i32, command: String },
    #[error("sending {signal} to process {pid} (`{command}`): {source}")]
    Signal {
        pid: i32,
        signal: Signal,
        command: String,
        source: nix::Error,
    },
    #[error("binary `{name}` not found at {path}; build it first: cargo build --workspace")]
    MissingBinary { name: String, path: PathBuf },
    #[error("{what} name `{name}` is invalid: {reason}")]
    InvalidName {
        what: &'static str,
        name: String,
        reason: &'static str,
    },
    #[error("interface {ifname} of namespace {ns} is not attached to a bridge of this lab")]
    NotAttached { ns: String, ifname: String },
}
