//! The baseline: the content of every replicated file as this node last
//! synced it with its peer (received from it, or pushed to it and
//! acknowledged). A live file that differs from its baseline is a local
//! change, and before the peer's tree replaces or removes it, it is set
//! aside (`set_aside.rs`): a change made on a node that then loses the
//! election is never deleted silently.
//!
//! Kept in `<state-dir>/cfg-sync/`: `baseline` (a snapshot, one
//! `<sha256> <path>` line per file) and `baseline.log` (the changes since,
//! `+ <sha256> <path>` or `- <path>`, appended and fsync'd per batch). The
//! log is folded into a new snapshot when it outgrows it, so a batch costs
//! a few lines whatever the size of the tree. Replaying a log twice gives
//! the same state (the last operation on a path wins), so a crash between
//! writing a snapshot and truncating the log is harmless.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::manifest::{Manifest, Sha};

pub const DIR: &str = "cfg-sync";
const SNAPSHOT: &str = "baseline";
const LOG: &str = "baseline.log";
pub const HEADER: &str = "tandem cfg-syncd baseline 1";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Put(Arc<str>, Sha),
    Remove(Arc<str>),
}

static UNWRITABLE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Logs a failure to write the baseline once, until a write succeeds again
/// (a read-only state directory would otherwise warn at every batch).
pub fn report_write(r: io::Result<()>, state_dir: &Path) {
    use std::sync::atomic::Ordering;
    match r {
        Ok(()) => {
            if UNWRITABLE.swap(false, Ordering::Relaxed) {
                tracing::info!(state_dir = %state_dir.display(), "the record of the last sync is written again in {}", state_dir.join(DIR).display());
            }
        }
        Err(e) => {
            if !UNWRITABLE.swap(true, Ordering::Relaxed) {
                tracing::warn!(state_dir = %state_dir.display(), error = %e, "cannot write the record of the last sync in {}: {e}; it is kept in memory, and after a restart local changes cannot be told apart until the next sync", state_dir.join(DIR).display());
            }
        }
    }
}

/// One log line (newline included).
pub fn encode_change(c: &Change, out: &mut Vec<u8>) {
    match c {
        Change::Put(p, sha) => out.extend_from_slice(format!("+ {sha} {p}\n").as_bytes()),
        Change::Remove(p) => out.extend_from_slice(format!("- {p}\n").as_bytes()),
    }
}

/// Parses one log line (without its newline).
pub fn parse_change(line: &str) -> Option<Change> {
    if let Some(rest) = line.strip_prefix("+ ") {
        let (sha, path) = rest.split_once(' ')?;
        return Some(Change::Put(Arc::from(path), Sha::from_hex(sha)?));
    }
    line.strip_prefix("- ")
        .map(|p| Change::Remove(Arc::from(p)))
}

/// Parses one snapshot line.
fn parse_entry(line: &str) -> Option<(Arc<str>, Sha)> {
    let (sha, path) = line.split_once(' ')?;
    Some((Arc::from(path), Sha::from_hex(sha)?))
}

#[derive(Debug)]
pub struct Baseline {
    dir: PathBuf,
    entries: BTreeMap<Arc<str>, Sha>,
    log_lines: usize,
}

impl Baseline {
    /// The baseline kept in `state_dir`; None when this node never synced.
    pub fn load(state_dir: &Path) -> io::Result<Option<Baseline>> {
        let dir = state_dir.join(DIR);
        let snap = match File::open(dir.join(SNAPSHOT)) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let bad = |what: &str, n: usize| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: line {n}: {what}", dir.join(SNAPSHOT).display()),
            )
        };
        let mut lines = BufReader::new(snap).lines();
        match lines.next() {
            Some(Ok(h)) if h == HEADER => {}
            _ => return Err(bad("not a cfg-syncd baseline", 1)),
        }
        let mut sorted = Vec::new();
        for (i, line) in lines.enumerate() {
            let line = line?;
            sorted.push(parse_entry(&line).ok_or_else(|| bad("malformed", i + 2))?);
        }
        // Collected in one pass: compact nodes.
        let mut entries: BTreeMap<Arc<str>, Sha> = sorted.into_iter().collect();
        let mut log_lines = 0;
        match fs::read(dir.join(LOG)) {
            Ok(bytes) => {
                // A last line without its newline was being appended when the
                // node stopped: that batch's changes are replayed from its
                // journal, so the torn line is dropped.
                let complete = match bytes.iter().rposition(|b| *b == b'\n') {
                    Some(i) => &bytes[..=i],
                    None => &bytes[..0],
                };
                for line in String::from_utf8_lossy(complete).lines() {
                    match parse_change(line) {
                        Some(Change::Put(p, sha)) => {
                            entries.insert(p, sha);
                        }
                        Some(Change::Remove(p)) => {
                            entries.remove(&p);
                        }
                        None => return Err(bad("malformed log line", log_lines + 1)),
                    }
                    log_lines += 1;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(Some(Baseline {
            dir,
            entries,
            log_lines,
        }))
    }

    /// A new baseline holding exactly `m`'s files, and whether it could be
    /// written (it is kept in memory either way).
    pub fn create(state_dir: &Path, m: &Manifest) -> (Baseline, io::Result<()>) {
        let mut b = Baseline {
            dir: state_dir.join(DIR),
            entries: m
                .entries
                .values()
                .map(|e| (e.path.clone(), e.sha))
                .collect(),
            log_lines: 0,
        };
        let written = b.compact();
        (b, written)
    }

    pub fn get(&self, path: &str) -> Option<Sha> {
        self.entries.get(path).copied()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Records changes (one fsync'd append); folds the log into a snapshot
    /// when it has grown larger than the snapshot.
    pub fn record(&mut self, changes: &[Change]) -> io::Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        for c in changes {
            encode_change(c, &mut buf);
            match c {
                Change::Put(p, sha) => {
                    self.entries.insert(p.clone(), *sha);
                }
                Change::Remove(p) => {
                    self.entries.remove(p);
                }
            }
        }
        self.log_lines += changes.len();
        if self.log_lines > self.entries.len() + 1000 {
            return self.compact();
        }
        fs::create_dir_all(&self.dir)?;
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(LOG))?;
        f.write_all(&buf)?;
        f.sync_data()
    }

    /// Makes the baseline equal to `m` (content only), recording only the
    /// differences. Returns how many paths changed.
    pub fn sync_to(&mut self, m: &Manifest) -> io::Result<usize> {
        let mut changes = Vec::new();
        for (p, e) in &m.entries {
            if self.entries.get(p) != Some(&e.sha) {
                changes.push(Change::Put(p.clone(), e.sha));
            }
        }
        for p in self.entries.keys() {
            if !m.entries.contains_key(p) {
                changes.push(Change::Remove(p.clone()));
            }
        }
        let n = changes.len();
        self.record(&changes)?;
        Ok(n)
    }

    /// Writes a new snapshot (temporary name, fsync, rename) and empties the log.
    fn compact(&mut self) -> io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        let tmp = self.dir.join(format!("{SNAPSHOT}.tmp"));
        {
            let mut w = BufWriter::new(File::create(&tmp)?);
            writeln!(w, "{HEADER}")?;
            for (p, sha) in &self.entries {
                writeln!(w, "{sha} {p}")?;
            }
            let f = w.into_inner().map_err(|e| e.into_error())?;
            f.sync_all()?;
        }
        fs::rename(&tmp, self.dir.join(SNAPSHOT))?;
        File::open(&self.dir)?.sync_all()?;
        match fs::remove_file(self.dir.join(LOG)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        self.log_lines = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::{entry, manifest};

    #[test]
    fn log_lines_have_this_exact_text() {
        let mut out = Vec::new();
        encode_change(
            &Change::Put("farms/web.toml".into(), Sha::of(b"w")),
            &mut out,
        );
        encode_change(&Change::Remove("checks/a b.sh".into()), &mut out);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            format!(
                "+ {} farms/web.toml\n- checks/a b.sh\n",
                Sha::of(b"w").hex()
            )
        );
        let parsed: Vec<_> = text.lines().map(|l| parse_change(l).unwrap()).collect();
        assert_eq!(
            parsed,
            [
                Change::Put("farms/web.toml".into(), Sha::of(b"w")),
                Change::Remove("checks/a b.sh".into())
            ]
        );
        assert_eq!(parse_change("+ nothex farms/x"), None);
        assert_eq!(parse_change("? farms/x"), None);
    }

    #[test]
    fn the_baseline_survives_a_restart_and_a_torn_append() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path();
        assert!(Baseline::load(state).unwrap().is_none(), "never synced");
        let m = manifest(&[
            entry("farms/a.toml", "a", 0o644),
            entry("farms/b.toml", "b", 0o644),
        ]);
        let mut b = Baseline::create(state, &m).0;
        b.record(&[
            Change::Put("farms/a.toml".into(), Sha::of(b"a2")),
            Change::Remove("farms/b.toml".into()),
        ])
        .unwrap();
        // Half a line appended when the node died.
        let mut f = OpenOptions::new()
            .append(true)
            .open(state.join(DIR).join(LOG))
            .unwrap();
        f.write_all(b"+ 00").unwrap();
        let again = Baseline::load(state).unwrap().unwrap();
        assert_eq!(again.get("farms/a.toml"), Some(Sha::of(b"a2")));
        assert_eq!(again.get("farms/b.toml"), None);
        assert_eq!(again.len(), 1);
    }

    #[test]
    fn syncing_to_a_manifest_records_only_the_differences_and_compacts() {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path();
        let mut b = Baseline::create(state, &Manifest::default()).0;
        let mut m = Manifest::default();
        for i in 0..1500 {
            m.insert(entry(&format!("checks/{i}.sh"), &i.to_string(), 0o755));
        }
        assert_eq!(b.sync_to(&m).unwrap(), 1500);
        // 1500 log lines > 1500 entries + 1000? No: still a log.
        assert!(state.join(DIR).join(LOG).exists());
        assert_eq!(b.sync_to(&m).unwrap(), 0);
        let mut m2 = m.clone();
        m2.entries.clear();
        assert_eq!(b.sync_to(&m2).unwrap(), 1500);
        // 3000 lines for 0 entries: folded into the snapshot.
        assert!(!state.join(DIR).join(LOG).exists());
        assert_eq!(Baseline::load(state).unwrap().unwrap().len(), 0);
        let snap = fs::read_to_string(state.join(DIR).join(SNAPSHOT)).unwrap();
        assert_eq!(snap, format!("{HEADER}\n"));
    }
}
