use std::fmt;
use std::io;

use nix::errno::Errno;

use crate::entry::Tuple;

/// The operation that failed, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Create,
    Update,
    Delete,
    Get,
    Dump,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Create => "create",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Get => "read",
            Op::Dump => "dump",
        })
    }
}

/// What went wrong talking to the kernel's conntrack table. Every variant
/// about one entry names its original tuple.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConntrackError {
    #[error("opening a ctnetlink socket: {0}")]
    Open(#[source] io::Error),
    /// Create of an entry whose original tuple is already in the table
    /// (EEXIST): use `update` for it.
    #[error("conntrack entry {tuple} already exists")]
    Exists { tuple: Tuple },
    /// Update, delete of an entry that is not in the table (ENOENT).
    #[error("cannot {op} conntrack entry {tuple}: not in the table")]
    NotFound { op: Op, tuple: Tuple },
    /// Any other errno the kernel answered with.
    #[error("the kernel refused to {op} conntrack entry {tuple}: {errno}")]
    Refused { op: Op, tuple: Tuple, errno: Errno },
    #[error("the kernel refused to dump the conntrack table: {errno}")]
    DumpRefused { errno: Errno },
    /// The entry cannot be expressed to the kernel (checked before sending).
    #[error("cannot {op} conntrack entry {tuple}: {reason}")]
    Invalid {
        op: Op,
        tuple: Tuple,
        reason: &'static str,
    },
    #[error("ctnetlink {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("malformed ctnetlink message while {what}: {reason}")]
    Decode { what: &'static str, reason: String },
    #[error("the conntrack event stream needs a tokio runtime with I/O enabled: {0}")]
    Runtime(#[source] io::Error),
}

impl ConntrackError {
    /// The kernel's errno, when the kernel answered with one.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            ConntrackError::Exists { .. } => Some(Errno::EEXIST),
            ConntrackError::NotFound { .. } => Some(Errno::ENOENT),
            ConntrackError::Refused { errno, .. } | ConntrackError::DumpRefused { errno } => {
                Some(*errno)
            }
            _ => None,
        }
    }
}
