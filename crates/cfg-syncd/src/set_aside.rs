//! Local changes kept aside before the peer's tree replaced them:
//! `<state-dir>/set-aside/<UTC timestamp>/<path>`, listed in
//! `CfgSyncStatus.set_aside` until the operator acknowledges them
//! (`tandemctl cluster ack`). Acknowledging writes an `.acknowledged`
//! marker in the directory; the files stay.
//!
//! A directory is first filled as `<timestamp>.partial` (before the batch's
//! commit) and renamed to its final name by the commit's roll-forward, so a
//! batch that never committed leaves no set-aside behind, and one that did
//! always leaves its set-aside complete.

use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use nix::fcntl::readlinkat;
use tandem_proto::v1;

use crate::nofollow;

pub const DIR: &str = "set-aside";
pub const ACKNOWLEDGED: &str = ".acknowledged";
const PARTIAL: &str = ".partial";
/// Paths listed per directory in Status (all are in the directory).
pub const SHOWN_PATHS: usize = 100;

/// `YYYYMMDDTHHMMSSZ` for a Unix time (UTC, proleptic Gregorian).
pub fn utc_stamp(unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    // Howard Hinnant's days_from_civil, inverted.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// One set-aside directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub directory: PathBuf,
    pub unix_ms: i64,
    /// Relative paths, sorted.
    pub paths: Vec<String>,
}

impl From<&Record> for v1::SetAside {
    fn from(r: &Record) -> Self {
        let mut paths: Vec<String> = r.paths.iter().take(SHOWN_PATHS).cloned().collect();
        if r.paths.len() > SHOWN_PATHS {
            paths.push(format!(
                "... and {} more files in the directory",
                r.paths.len() - SHOWN_PATHS
            ));
        }
        v1::SetAside {
            directory: r.directory.display().to_string(),
            unix_ms: r.unix_ms,
            paths,
        }
    }
}

/// The set-aside directories of this node, and which are still listed.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    listed: Vec<Record>,
}

/// A set-aside directory being filled before a commit.
#[derive(Debug)]
pub struct Pending {
    pub name: String,
    dir: PathBuf,
    pub paths: Vec<String>,
}

impl Store {
    /// Reads `<state_dir>/set-aside`: every complete directory without the
    /// acknowledgement marker is listed.
    pub fn load(state_dir: &Path) -> Store {
        let root = state_dir.join(DIR);
        let mut listed = Vec::new();
        if let Ok(entries) = fs::read_dir(&root) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
                if !is_dir || name.ends_with(PARTIAL) || e.path().join(ACKNOWLEDGED).exists() {
                    continue;
                }
                listed.push(read_record(&e.path()));
            }
        }
        listed.sort_by(|a, b| a.directory.cmp(&b.directory));
        Store { root, listed }
    }

    pub fn listed(&self) -> &[Record] {
        &self.listed
    }

    /// Starts a set-aside directory named after `now`.
    pub fn begin(&self, now: SystemTime) -> io::Result<Pending> {
        let secs = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let stamp = utc_stamp(secs);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.root)?;
        for n in 1.. {
            let name = if n == 1 {
                stamp.clone()
            } else {
                format!("{stamp}-{n}")
            };
            let dir = self.root.join(format!("{name}{PARTIAL}"));
            if self.root.join(&name).exists() {
                continue;
            }
            match fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => {
                    return Ok(Pending {
                        name,
                        dir,
                        paths: Vec::new(),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        unreachable!("an unbounded range ends only by returning")
    }

    /// Renames `<name>.partial` to `<name>` and lists it. Idempotent (a
    /// replayed journal finalizes again).
    pub fn finalize(&mut self, name: &str) -> io::Result<Option<Record>> {
        let partial = self.root.join(format!("{name}{PARTIAL}"));
        let done = self.root.join(name);
        if partial.is_dir() {
            fs::rename(&partial, &done)?;
            fs::File::open(&self.root)?.sync_all()?;
        }
        if !done.is_dir() {
            return Ok(None);
        }
        if let Some(r) = self.listed.iter().find(|r| r.directory == done) {
            return Ok(Some(r.clone()));
        }
        let r = read_record(&done);
        self.listed.push(r.clone());
        self.listed.sort_by(|a, b| a.directory.cmp(&b.directory));
        Ok(Some(r))
    }

    /// Removes `<name>.partial` (its batch was refused or never committed).
    pub fn discard(&self, name: &str) {
        let _ = fs::remove_dir_all(self.root.join(format!("{name}{PARTIAL}")));
    }

    /// Removes every `.partial` directory not named in `keep` (at start:
    /// what no journal will finalize).
    pub fn discard_partials(&self, keep: &[String]) {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(base) = name.strip_suffix(PARTIAL)
                && !keep.iter().any(|k| k == base)
            {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }

    /// Acknowledges the listed directories named in `dirs` (all when empty):
    /// they leave the list; their files stay.
    pub fn acknowledge(&mut self, dirs: &[String]) -> io::Result<Vec<Record>> {
        let mut acked = Vec::new();
        let mut kept = Vec::new();
        for r in std::mem::take(&mut self.listed) {
            let named = dirs.is_empty()
                || dirs.iter().any(|d| {
                    Path::new(d) == r.directory
                        || r.directory.file_name().is_some_and(|n| n == d.as_str())
                });
            if !named {
                kept.push(r);
                continue;
            }
            let marker = r.directory.join(ACKNOWLEDGED);
            let written = fs::File::create(&marker)
                .and_then(|mut f| {
                    writeln!(
                        f,
                        "acknowledged at {}",
                        tandem_runtime::unix_ms(SystemTime::now())
                    )?;
                    f.sync_all()
                })
                .and_then(|()| fs::File::open(&r.directory)?.sync_all());
            match written {
                Ok(()) => acked.push(r),
                Err(e) => {
                    kept.push(r);
                    self.listed = kept;
                    return Err(e);
                }
            }
        }
        self.listed = kept;
        Ok(acked)
    }
}

impl Pending {
    /// Copies live file `rel` (under `root`) into the set-aside directory,
    /// without following links: a link is kept as a link (its target is
    /// not read).
    pub fn keep<Fd: AsFd>(&mut self, root: Fd, rel: &str) -> io::Result<()> {
        let dst = self.dir.join(rel);
        if let Some(parent) = dst.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)?;
        }
        match nofollow::open_file_beneath(&root, rel) {
            Ok((mut src, _)) => {
                let mut out = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&dst)?;
                let mut buf = vec![0u8; nofollow::READ_CHUNK];
                loop {
                    let n = src.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    out.write_all(&buf[..n])?;
                }
                out.sync_all()?;
            }
            Err(e) if nofollow::is_link_error(&e) => {
                let (parent, name) = nofollow::split(rel);
                let dir = nofollow::open_dir_beneath(&root, parent)?;
                let target = readlinkat(&dir, name).map_err(io::Error::from)?;
                std::os::unix::fs::symlink(target, &dst)?;
            }
            Err(e) => return Err(e),
        }
        self.paths.push(rel.to_owned());
        Ok(())
    }
}

fn read_record(dir: &Path) -> Record {
    let unix_ms = fs::metadata(dir)
        .and_then(|m| m.modified())
        .map(tandem_runtime::unix_ms)
        .unwrap_or(0);
    let mut paths = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let Ok(entries) = fs::read_dir(dir.join(&rel)) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            if rel.as_os_str().is_empty() && name == ACKNOWLEDGED {
                continue;
            }
            let r = rel.join(&name);
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(r),
                Ok(_) => paths.push(r.to_string_lossy().into_owned()),
                Err(_) => {}
            }
        }
    }
    paths.sort();
    Record {
        directory: dir.to_owned(),
        unix_ms,
        paths,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn utc_stamps_are_exact() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        // 2025-12-07 01:36:40 UTC.
        assert_eq!(utc_stamp(1_765_071_400), "20251207T013640Z");
        // A leap day.
        assert_eq!(utc_stamp(1_709_210_096), "20240229T123456Z");
        assert_eq!(utc_stamp(951_868_799), "20000229T235959Z");
    }

    #[test]
    fn kept_files_are_listed_until_acknowledged_and_stay_on_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let live = tmp.path().join("etc");
        let state = tmp.path().join("state");
        fs::create_dir_all(live.join("farms")).unwrap();
        fs::write(live.join("farms/web.toml"), "mine").unwrap();
        fs::write(tmp.path().join("secret"), "do not read").unwrap();
        symlink(tmp.path().join("secret"), live.join("farms/link.toml")).unwrap();
        let root = nofollow::open_root(&live).unwrap();

        let mut store = Store::load(&state);
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_765_071_400);
        let mut p = store.begin(t).unwrap();
        p.keep(&root, "farms/web.toml").unwrap();
        p.keep(&root, "farms/link.toml").unwrap();
        // Not listed before its commit.
        assert!(Store::load(&state).listed().is_empty());
        let r = store.finalize(&p.name).unwrap().unwrap();
        assert_eq!(r.directory, state.join("set-aside/20251207T013640Z"));
        assert_eq!(r.paths, ["farms/link.toml", "farms/web.toml"]);
        assert_eq!(
            fs::read_to_string(r.directory.join("farms/web.toml")).unwrap(),
            "mine"
        );
        // The link was kept as a link, its target never read.
        let kept = r.directory.join("farms/link.toml");
        assert!(
            fs::symlink_metadata(&kept)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        // Finalizing again (a replayed journal) changes nothing.
        assert_eq!(store.finalize(&p.name).unwrap().unwrap(), r);
        assert_eq!(store.listed().len(), 1);

        // A second one in the same second gets its own directory.
        let p2 = store.begin(t).unwrap();
        assert_eq!(p2.name, "20251207T013640Z-2");
        store.discard(&p2.name);

        let reloaded = Store::load(&state);
        assert_eq!(reloaded.listed().len(), 1);
        let acked = store.acknowledge(&[]).unwrap();
        assert_eq!(acked.len(), 1);
        assert!(store.listed().is_empty());
        assert!(
            Store::load(&state).listed().is_empty(),
            "acknowledged for good"
        );
        assert!(r.directory.join("farms/web.toml").exists(), "files stay");
    }

    #[test]
    fn status_lists_a_bounded_number_of_paths() {
        let r = Record {
            directory: "/var/lib/tandem/set-aside/x".into(),
            unix_ms: 1,
            paths: (0..250).map(|i| format!("checks/{i}.sh")).collect(),
        };
        let s = v1::SetAside::from(&r);
        assert_eq!(s.paths.len(), SHOWN_PATHS + 1);
        assert_eq!(
            s.paths[SHOWN_PATHS],
            "... and 150 more files in the directory"
        );
    }
}
