//! The kernel's connection-tracking table as lb-forwarder reads it, over
//! ctnetlink (tandem-conntrack): connection counts per backend for the
//! load-aware schedulers and thresholds, the connection table of
//! `tandemctl conn list`, the persistence entries a backup derives from
//! replicated connections, and removing a failed backend's connections.
//!
//! The readings are pure functions of a dump ([`loads_by_mark`],
//! [`persistence_seeds`], [`connection_rows`]); [`dump`] and
//! [`delete_marked`] are the thin I/O.

use std::collections::HashMap;
use std::net::IpAddr;

use tandem_conntrack::entry::{proto, tcp};
use tandem_conntrack::{Conntrack, ConntrackError, Record};

use crate::sched::Load;

/// Every entry of the table (blocking; the kernel answers at once). Runs in
/// the network namespace of the calling thread.
pub fn dump() -> Result<Vec<Record>, ConntrackError> {
    Conntrack::open()?.dump()
}

/// The dump on a blocking thread.
pub async fn dump_async() -> Result<Vec<Record>, String> {
    match tokio::task::spawn_blocking(dump).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(format!("the conntrack reader stopped: {e}")),
    }
}

/// How a connection counts: active (TCP being opened or ESTABLISHED, and
/// every other protocol's flow), inactive (TCP closing: FIN_WAIT,
/// CLOSE_WAIT, LAST_ACK), or not at all (TIME_WAIT, CLOSE: closed).
///
/// IPVS counts a connection being opened as inactive until it is
/// established; here the schedule is decided ahead from these counts, each
/// pick counted as one more active connection, so a connection the
/// previous schedule already sent somewhere must count as active, or the
/// next schedule would give its backend one more.
pub fn classify(r: &Record) -> Option<bool> {
    if r.entry.original.protocol != proto::TCP {
        return Some(true);
    }
    match r.entry.tcp.map(|t| t.state) {
        Some(tcp::SYN_SENT | tcp::SYN_RECV | tcp::ESTABLISHED) => Some(true),
        Some(tcp::TIME_WAIT | tcp::CLOSE) => None,
        Some(_) => Some(false),
        // A dump always carries the TCP state; without it, count it open.
        None => Some(true),
    }
}

/// Connections per conntrack mark (mark 0, untouched by Tandem, left out).
pub fn loads_by_mark(records: &[Record]) -> HashMap<u32, Load> {
    let mut out: HashMap<u32, Load> = HashMap::new();
    for r in records {
        if r.entry.mark == 0 {
            continue;
        }
        match classify(r) {
            Some(true) => out.entry(r.entry.mark).or_default().active += 1,
            Some(false) => out.entry(r.entry.mark).or_default().inactive += 1,
            None => {}
        }
    }
    out
}

/// `addr` with all but its first `prefix` bits cleared.
pub fn masked(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let m = u32::MAX
                .checked_shl(32 - u32::from(prefix.min(32)))
                .unwrap_or(0);
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = u128::MAX
                .checked_shl(128 - u32::from(prefix.min(128)))
                .unwrap_or(0);
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

/// What a node derives for one persistent farm from the connections in its
/// table: each client (masked by the farm's netmask) → the backend (mark)
/// of its most recently active open connection (the one with the most time
/// left). Only marks in `members` (the farm's backends) count.
pub fn persistence_seeds(records: &[Record], members: &[u32], prefix: u8) -> Vec<(IpAddr, u32)> {
    let mut best: HashMap<IpAddr, (u32, u32)> = HashMap::new();
    for r in records {
        let e = &r.entry;
        if !members.contains(&e.mark) || classify(r).is_none() {
            continue;
        }
        let client = masked(e.original.src, prefix);
        let slot = best.entry(client).or_insert((e.mark, e.timeout_s));
        if e.timeout_s > slot.1 {
            *slot = (e.mark, e.timeout_s);
        }
    }
    let mut out: Vec<(IpAddr, u32)> = best.into_iter().map(|(c, (m, _))| (c, m)).collect();
    out.sort();
    out
}

/// One row of `tandemctl conn list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionRow {
    pub protocol: u8,
    /// TCP state name, or "" for other protocols.
    pub state: &'static str,
    pub expires_s: u32,
    pub client: (IpAddr, u16),
    /// Where the client sent it: the VIP and port.
    pub virtual_: (IpAddr, u16),
    /// Where it went: the backend's address and port.
    pub backend: (IpAddr, u16),
    pub mark: u32,
    pub zone: u16,
}

/// The kernel's name of a TCP state.
pub fn tcp_state_name(state: u8) -> &'static str {
    match state {
        tcp::SYN_SENT => "SYN_SENT",
        tcp::SYN_RECV => "SYN_RECV",
        tcp::ESTABLISHED => "ESTABLISHED",
        tcp::FIN_WAIT => "FIN_WAIT",
        tcp::CLOSE_WAIT => "CLOSE_WAIT",
        tcp::LAST_ACK => "LAST_ACK",
        tcp::TIME_WAIT => "TIME_WAIT",
        tcp::CLOSE => "CLOSE",
        _ => "NONE",
    }
}

/// The entries whose mark is one of `marks` (Tandem's backends), as rows.
pub fn connection_rows(records: &[Record], marks: &dyn Fn(u32) -> bool) -> Vec<ConnectionRow> {
    let mut rows: Vec<ConnectionRow> = records
        .iter()
        .filter(|r| r.entry.mark != 0 && marks(r.entry.mark))
        .map(|r| {
            let e = &r.entry;
            ConnectionRow {
                protocol: e.original.protocol,
                state: match (e.original.protocol, e.tcp) {
                    (proto::TCP, Some(t)) => tcp_state_name(t.state),
                    _ => "",
                },
                expires_s: e.timeout_s,
                client: (e.original.src, e.original.src_port),
                virtual_: (e.original.dst, e.original.dst_port),
                backend: (e.reply.src, e.reply.src_port),
                mark: e.mark,
                zone: e.zone,
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        (a.mark, a.client, a.virtual_, a.zone).cmp(&(b.mark, b.client, b.virtual_, b.zone))
    });
    rows
}

/// Removes every entry carrying `mark` (a failed backend's connections):
/// their next packet finds no entry, is scheduled anew and answered with a
/// reset by the backend it reaches. Returns how many were removed.
/// Blocking.
pub fn delete_marked(mark: u32) -> Result<usize, ConntrackError> {
    let mut ct = Conntrack::open()?;
    let mut removed = 0;
    for r in ct.dump()? {
        if r.entry.mark != mark {
            continue;
        }
        match ct.delete_in_zone(&r.entry.original, r.entry.zone) {
            Ok(()) => removed += 1,
            // Gone in between: what we wanted.
            Err(ConntrackError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}
