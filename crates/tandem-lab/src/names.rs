//! Lab ids, and sweeping the leftovers of labs whose process died.
//!
//! A lab id is `tl` + the owner's pid in base 36, zero-padded to five digits
//! (pid_max is at most 2^22 = 4194304 < 36^5), + a per-process sequence in
//! base 36: `tl002kq0`, `tl002kq1`, ... The fixed width makes the pid
//! readable back from any namespace name `<id>-<short>` without a separator,
//! so a later lab can tell whether the owner of a leftover is still alive.
//! The pid keeps parallel test processes (nextest) apart, the sequence
//! parallel test threads (cargo test).

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::LabError;
use crate::cmd::ip;

pub(crate) const PREFIX: &str = "tl";
const PID_DIGITS: usize = 5;

static SEQUENCE: AtomicU32 = AtomicU32::new(0);

/// Ids of the labs alive in this process. A namespace carrying our own pid
/// but an id not listed here was left by an earlier process that had the
/// same pid (pids are recycled), and is swept like any other leftover.
static LIVE: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

fn live() -> MutexGuard<'static, BTreeSet<String>> {
    LIVE.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) fn base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(char::from(DIGITS[(n % 36) as usize]));
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.iter().rev().collect()
}

/// A fresh id for a lab of this process, registered as live.
pub(crate) fn new_lab_id() -> String {
    let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    let id = format!(
        "{PREFIX}{:0>width$}{}",
        base36(u64::from(std::process::id())),
        base36(u64::from(seq)),
        width = PID_DIGITS
    );
    live().insert(id.clone());
    id
}

pub(crate) fn forget_lab_id(id: &str) {
    live().remove(id);
}

/// The owner pid and lab id of a namespace name `<id>-<short>`, if it is one
/// of ours. Anything that does not match exactly is left alone.
pub(crate) fn parse_namespace(name: &str) -> Option<(u32, &str)> {
    let rest = name.strip_prefix(PREFIX)?;
    let (tail, short) = rest.split_once('-')?;
    let base36_digits = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
    };
    if short.is_empty() || tail.len() <= PID_DIGITS || !base36_digits(tail) {
        return None;
    }
    let pid = u32::from_str_radix(&tail[..PID_DIGITS], 36).ok()?;
    Some((pid, &name[..PREFIX.len() + tail.len()]))
}

/// Deletes the namespaces of labs whose process is gone: a test killed with
/// SIGKILL (or a nextest timeout) never ran its drops. Only namespace names
/// with our exact format are considered; processes are never touched.
pub(crate) fn sweep_dead_labs() {
    // Read /run/netns directly: `ip netns list` opens every namespace to
    // print its id, and fails outright when another test deletes one at that
    // moment, which would skip the whole sweep.
    let entries = match std::fs::read_dir("/run/netns") {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            eprintln!("tandem-lab: cannot list /run/netns to sweep leftovers: {e}");
            return;
        }
    };
    let names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    let own_pid = std::process::id();
    for name in &names {
        let name = name.as_str();
        let Some((pid, id)) = parse_namespace(name) else {
            continue;
        };
        // `ip netns add` creates the file first and mounts the namespace on
        // it afterwards: a file that is not yet an nsfs mount is being
        // created right now, and unlinking it would make that add fail.
        let path = format!("/run/netns/{name}");
        let mounted = nix::sys::statfs::statfs(path.as_str())
            .is_ok_and(|st| st.filesystem_type() == nix::sys::statfs::NSFS_MAGIC);
        if !mounted {
            continue;
        }
        let dead = if pid == own_pid {
            !live().contains(id)
        } else {
            !Path::new(&format!("/proc/{pid}")).exists()
        };
        if dead {
            // Another lab may be sweeping the same leftover right now: losing
            // that race is fine.
            match ip(&["netns", "del", name]) {
                Ok(_) => {
                    eprintln!("tandem-lab: removed namespace {name} left by dead process {pid}")
                }
                Err(e) => eprintln!("tandem-lab: sweeping {name}: {e}"),
            }
        }
    }
}

/// Interface names are limited by the kernel's IFNAMSIZ (16 bytes with the
/// terminating NUL).
pub(crate) fn check_ifname(what: &'static str, name: &str) -> Result<(), LabError> {
    let reason = if name.is_empty() {
        "it is empty"
    } else if name.len() > 15 {
        "interface names are 15 bytes at most (IFNAMSIZ)"
    } else if name.contains(['/', ':']) || name.chars().any(char::is_whitespace) {
        "it contains `/`, `:` or whitespace"
    } else {
        return Ok(());
    };
    Err(LabError::InvalidName {
        what,
        name: name.to_owned(),
        reason,
    })
}

/// Namespace names become files under /run/netns.
pub(crate) fn check_short(name: &str) -> Result<(), LabError> {
    let reason = if name.is_empty() {
        "it is empty"
    } else if name.len() > 32 {
        "keep it short (32 bytes at most)"
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        "use letters, digits, `-`, `_` and `.` only"
    } else {
        return Ok(());
    };
    Err(LabError::InvalidName {
        what: "namespace",
        name: name.to_owned(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base36_round_trips() {
        for n in [0u64, 1, 35, 36, 4_194_304, 60_466_175] {
            assert_eq!(u64::from_str_radix(&base36(n), 36).unwrap(), n);
        }
        assert_eq!(base36(60_466_175), "zzzzz");
    }

    #[test]
    fn namespace_names_give_back_pid_and_id() {
        assert_eq!(
            parse_namespace("tl02kq0x1-a"),
            Some((0x2 * 36 * 36 * 36 + 20 * 36 * 36 + 26 * 36, "tl02kq0x1"))
        );
        // 'x' is a base-36 digit: the fixed width keeps the pid unambiguous.
        assert_eq!(
            parse_namespace("tl00xx5x-sw"),
            Some((33 * 36 * 36 + 33 * 36 + 5, "tl00xx5x"))
        );
        assert_eq!(
            parse_namespace("tlzzzzz0-old-1"),
            Some((60_466_175, "tlzzzzz0"))
        );
    }

    #[test]
    fn foreign_names_are_not_ours() {
        for name in [
            "tl",
            "tl00001",
            "tl000010",
            "tl000010-",
            "tlab-c",
            "tl0000A1-a",
            "xtl000010-a",
            "tl00001-a",
        ] {
            assert_eq!(parse_namespace(name), None, "{name}");
        }
    }

    #[test]
    fn a_new_id_parses_back_to_our_pid() {
        let id = new_lab_id();
        let name = format!("{id}-a");
        assert_eq!(
            parse_namespace(&name),
            Some((std::process::id(), id.as_str()))
        );
        forget_lab_id(&id);
    }
}
