//! Walks a configuration directory into a [`Manifest`], without following
//! any link (`nofollow.rs`), within the replication caps, hashing only the
//! files whose stat changed since the last scan.
//!
//! What it will not replicate is returned as [`Refusal`]s, one sentence
//! each naming the file: over the per-file size cap, beyond the file-count
//! cap, a symbolic link, a special file, an unusable name. A refused path is
//! left alone on the peer (neither sent nor deleted): nothing else stops
//! replicating because of it.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;

use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::sys::stat::{FileStat, fstatat};
use tandem_config::{Config, DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_FILES};

use crate::manifest::{Entry, Manifest, Sha, is_replicated, may_contain_replicated};
use crate::nofollow::{self, Kind};

/// The replication caps (`[sync] max_file_bytes`, `max_files`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    pub max_file_bytes: u64,
    pub max_files: usize,
}

impl Default for Caps {
    fn default() -> Self {
        Caps {
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            max_files: DEFAULT_MAX_FILES as usize,
        }
    }
}

impl Caps {
    /// The caps of a configuration (the defaults on a standalone node).
    pub fn of(config: &Config) -> Caps {
        config
            .cluster
            .as_ref()
            .map(|c| Caps {
                max_file_bytes: c.sync.max_file_bytes,
                max_files: c.sync.max_files as usize,
            })
            .unwrap_or_default()
    }
}

/// Why a file is not replicated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    TooBig { size: u64, cap: u64 },
    OverCount { cap: usize },
    Link,
    NotRegular(&'static str),
    BadName,
    Unreadable(String),
}

/// A file this node does not replicate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub path: Arc<str>,
    pub why: Why,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.path;
        match &self.why {
            Why::TooBig { size, cap } => write!(
                f,
                "{p}: {size} bytes, over the {cap}-byte cap ([sync] max_file_bytes); not replicated, the peer keeps its copy"
            ),
            Why::OverCount { cap } => write!(
                f,
                "{p}: beyond the {cap}-file cap ([sync] max_files); not replicated, the peer keeps its copy"
            ),
            Why::Link => write!(
                f,
                "{p}: a symbolic link; not replicated (links are never followed)"
            ),
            Why::NotRegular(k) => write!(f, "{p}: a {k}; not replicated (only regular files are)"),
            Why::BadName => write!(
                f,
                "{p}: the name is not UTF-8 or holds a control character; not replicated"
            ),
            Why::Unreadable(e) => write!(f, "{p}: cannot be read ({e}); not replicated"),
        }
    }
}

/// One scan: the manifest and what was refused.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    pub manifest: Arc<Manifest>,
    pub refused: Vec<Refusal>,
}

impl Scan {
    /// The refused paths: left as the peer has them.
    pub fn frozen(&self) -> HashSet<Arc<str>> {
        self.refused.iter().map(|r| r.path.clone()).collect()
    }
}

/// Quick-check key of a file: unchanged stat means unchanged content (as
/// rsync assumes), so a rescan hashes only what was touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

impl Stamp {
    fn of(st: &FileStat) -> Stamp {
        Stamp {
            ino: st.st_ino,
            size: st.st_size as u64,
            mtime_ns: st.st_mtime.saturating_mul(1_000_000_000) + st.st_mtime_nsec,
            ctime_ns: st.st_ctime.saturating_mul(1_000_000_000) + st.st_ctime_nsec,
        }
    }
}

/// What a scan keeps of a file's stat (a `FileStat` is 144 bytes; at
/// 100,000 files the difference is 10 MB).
#[derive(Debug, Clone, Copy)]
struct Stat {
    stamp: Stamp,
    mode: u32,
    uid: u32,
    gid: u32,
}

impl Stat {
    fn of(st: &FileStat) -> Stat {
        Stat {
            stamp: Stamp::of(st),
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
        }
    }
}

/// A stamp younger than this is re-hashed at every scan: a write within
/// the same timestamp tick would not change it. File timestamps come from
/// the kernel's coarse clock, which advances every jiffy (at most 10 ms),
/// and ctime (part of the stamp) cannot be set back by anyone.
const RACY_NS: i64 = 200_000_000;

/// Scan order under the file-count cap: the configuration proper first.
fn rank(path: &str) -> u8 {
    if path == "cluster.toml" || path == "keys/sync.key" {
        0
    } else if path.starts_with("farms/") {
        1
    } else {
        2
    }
}

struct Candidate {
    path: String,
    st: Stat,
}

/// Walks a configuration directory into a manifest.
#[derive(Debug, Default)]
pub struct Scanner {
    cache: HashMap<Arc<str>, (Stamp, Sha, u64)>,
    generation: u64,
    buf: Vec<u8>,
}

impl Scanner {
    pub fn scan(&mut self, root: &Path, caps: Caps) -> io::Result<Scan> {
        self.generation += 1;
        let now_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        let root_fd = nofollow::open_root(root)?;
        let mut refused = Vec::new();
        let mut candidates = Vec::new();
        let mut dirs = vec![String::new()];
        while let Some(rel_dir) = dirs.pop() {
            let dfd = match nofollow::open_dir_beneath(&root_fd, &rel_dir) {
                Ok(fd) => fd,
                // Gone, or turned into a file or a link since it was listed:
                // the next scan sees it as it is then.
                Err(e)
                    if e.kind() == io::ErrorKind::NotFound
                        || e.raw_os_error() == Some(Errno::ENOTDIR as i32)
                        || nofollow::is_link_error(&e) =>
                {
                    continue;
                }
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("{}/{rel_dir}: {e}", root.display()),
                    ));
                }
            };
            // One descriptor to list, its duplicate to stat names in it:
            // both are the directory that was opened, whatever is renamed.
            let stat_fd = dfd.try_clone()?;
            let mut dir = Dir::from_fd(dfd).map_err(io::Error::from)?;
            for item in dir.iter() {
                let item = item.map_err(io::Error::from)?;
                let raw = item.file_name().to_bytes();
                if raw == b"." || raw == b".." {
                    continue;
                }
                let in_tree = !rel_dir.is_empty();
                let Ok(name) = std::str::from_utf8(raw) else {
                    if in_tree && may_contain_replicated(&rel_dir) {
                        let lossy = String::from_utf8_lossy(raw);
                        refused.push(Refusal {
                            path: Arc::from(format!("{rel_dir}/{lossy}")),
                            why: Why::BadName,
                        });
                    }
                    continue;
                };
                let rel = if in_tree {
                    format!("{rel_dir}/{name}")
                } else {
                    name.to_owned()
                };
                let st = match fstatat(stat_fd.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
                    Ok(st) => st,
                    Err(Errno::ENOENT) => continue,
                    Err(e) => {
                        return Err(io::Error::new(
                            io::Error::from(e).kind(),
                            format!("{rel}: {e}"),
                        ));
                    }
                };
                match nofollow::kind(&st) {
                    Kind::Dir => {
                        if may_contain_replicated(&rel) {
                            dirs.push(rel);
                        } else if bad_name_in_tree(&rel) {
                            refused.push(Refusal {
                                path: Arc::from(rel),
                                why: Why::BadName,
                            });
                        }
                    }
                    Kind::File => {
                        if is_replicated(&rel) {
                            candidates.push(Candidate {
                                path: rel,
                                st: Stat::of(&st),
                            });
                        } else if bad_name_in_tree(&rel) {
                            refused.push(Refusal {
                                path: Arc::from(rel),
                                why: Why::BadName,
                            });
                        }
                    }
                    Kind::Link => {
                        if is_replicated(&rel) || may_contain_replicated(&rel) {
                            refused.push(Refusal {
                                path: Arc::from(rel),
                                why: Why::Link,
                            });
                        }
                    }
                    Kind::Other => {
                        if is_replicated(&rel) {
                            refused.push(Refusal {
                                path: Arc::from(rel),
                                why: Why::NotRegular(Kind::Other.word()),
                            });
                        }
                    }
                }
            }
        }

        candidates.sort_by(|a, b| (rank(&a.path), &a.path).cmp(&(rank(&b.path), &b.path)));
        if candidates.len() > caps.max_files {
            for c in candidates.drain(caps.max_files..) {
                refused.push(Refusal {
                    path: Arc::from(c.path),
                    why: Why::OverCount {
                        cap: caps.max_files,
                    },
                });
            }
        }

        let mut entries = Vec::with_capacity(candidates.len());
        for c in candidates {
            let size = c.st.stamp.size;
            let path: Arc<str> = match self.cache.get_key_value(c.path.as_str()) {
                Some((k, _)) => k.clone(),
                None => Arc::from(c.path),
            };
            if size > caps.max_file_bytes {
                refused.push(Refusal {
                    path,
                    why: Why::TooBig {
                        size,
                        cap: caps.max_file_bytes,
                    },
                });
                continue;
            }
            let stamp = c.st.stamp;
            let settled = now_ns - stamp.mtime_ns.max(stamp.ctime_ns) > RACY_NS;
            let cached = match self.cache.get(&path) {
                Some((s, sha, _)) if *s == stamp && settled => Some(*sha),
                _ => None,
            };
            let (sha, st, size) = match cached {
                Some(sha) => (sha, c.st, size),
                None => match self.hash(&root_fd, &path, caps.max_file_bytes) {
                    Ok(Hashing::Done(sha, st, size)) => (sha, Stat::of(&st), size),
                    Ok(Hashing::Gone) => continue,
                    Ok(Hashing::Refused(why)) => {
                        refused.push(Refusal { path, why });
                        continue;
                    }
                    Err(e) => return Err(e),
                },
            };
            self.cache
                .insert(path.clone(), (st.stamp, sha, self.generation));
            entries.push(Entry {
                path,
                sha,
                size,
                mode: st.mode,
                uid: st.uid,
                gid: st.gid,
            });
        }
        let manifest = Manifest::from_entries(entries);
        let generation = self.generation;
        self.cache.retain(|_, v| v.2 == generation);
        refused.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(Scan {
            manifest: Arc::new(manifest),
            refused,
        })
    }

    /// Records the content of a file cfg-syncd itself just placed (its
    /// SHA-256 was verified on the descriptor it was placed from), so the
    /// next scan does not read it again. `st` is its stat after placement.
    pub fn note(&mut self, path: Arc<str>, st: &FileStat, sha: Sha) {
        // Kept through the next scan (which expects this generation or the
        // next), like an entry that scan found itself.
        self.cache
            .insert(path, (Stamp::of(st), sha, self.generation + 1));
    }

    /// Hashes one file through a descriptor opened without following links;
    /// its stat is taken from the same descriptor.
    fn hash<Fd: AsFd>(&mut self, root: Fd, path: &str, cap: u64) -> io::Result<Hashing> {
        let (mut file, st) = match nofollow::open_file_beneath(&root, path) {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Hashing::Gone),
            Err(e) if nofollow::is_link_error(&e) => return Ok(Hashing::Refused(Why::Link)),
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                return Ok(Hashing::Refused(Why::NotRegular(Kind::Other.word())));
            }
            Err(e) => return Ok(Hashing::Refused(Why::Unreadable(e.to_string()))),
        };
        let h = match nofollow::hash_file(&mut file, cap, &mut self.buf) {
            Ok(h) => h,
            Err(e) => return Ok(Hashing::Refused(Why::Unreadable(e.to_string()))),
        };
        if h.over {
            return Ok(Hashing::Refused(Why::TooBig { size: h.size, cap }));
        }
        Ok(Hashing::Done(h.sha, st, h.size))
    }
}

enum Hashing {
    Done(Sha, FileStat, u64),
    Gone,
    Refused(Why),
}

/// A name in a replicated tree that would be replicated but for a control
/// character in it.
fn bad_name_in_tree(rel: &str) -> bool {
    rel.chars().any(char::is_control) && is_replicated(&rel.replace(char::is_control, "_"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    fn write(root: &Path, rel: &str, data: &[u8]) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, data).unwrap();
    }

    #[test]
    fn scanner_sees_only_replicated_files_and_rehashes_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        for (p, c) in [
            ("node.toml", "name = \"a\""),
            ("cluster.toml", "c"),
            ("farms/web.toml", "w1"),
            ("farms/.web.toml.swp", "x"),
            ("ssh/id_ed25519", "secret"),
            ("keys/sync.key", "k"),
            (".tandem-sync/b/farms/web.toml", "partial"),
        ] {
            write(root, p, c.as_bytes());
        }
        let mut s = Scanner::default();
        let m = s.scan(root, Caps::default()).unwrap();
        let paths: Vec<_> = m.manifest.entries.keys().map(|p| &**p).collect();
        assert_eq!(paths, ["cluster.toml", "farms/web.toml", "keys/sync.key"]);
        assert!(m.refused.is_empty(), "{:?}", m.refused);
        assert_eq!(m.manifest.entries["farms/web.toml"].sha, Sha::of(b"w1"));
        fs::write(root.join("farms/web.toml"), "w2-longer").unwrap();
        let m2 = s.scan(root, Caps::default()).unwrap();
        assert_eq!(
            m2.manifest.entries["farms/web.toml"].sha,
            Sha::of(b"w2-longer")
        );
        assert_ne!(m.manifest.hash(), m2.manifest.hash());
    }

    #[test]
    fn links_and_special_files_are_refused_by_name_and_never_read() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("etc");
        let outside = tmp.path().join("outside");
        write(&outside, "shadow", b"root:secret");
        write(&root, "farms/web.toml", b"w");
        fs::create_dir_all(root.join("checks")).unwrap();
        symlink(outside.join("shadow"), root.join("checks/passwd.sh")).unwrap();
        symlink(&outside, root.join("certs")).unwrap();
        symlink(&outside, root.join("farms/sub")).unwrap();
        nix::unistd::mkfifo(&root.join("checks/pipe"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        // Node-local links stay silent.
        symlink(&outside, root.join("backups")).unwrap();
        let mut s = Scanner::default();
        let scan = s.scan(&root, Caps::default()).unwrap();
        let paths: Vec<_> = scan.manifest.entries.keys().map(|p| &**p).collect();
        assert_eq!(paths, ["farms/web.toml"]);
        let refused: Vec<String> = scan.refused.iter().map(ToString::to_string).collect();
        assert_eq!(
            refused,
            [
                "certs: a symbolic link; not replicated (links are never followed)",
                "checks/passwd.sh: a symbolic link; not replicated (links are never followed)",
                "checks/pipe: a special file; not replicated (only regular files are)",
                "farms/sub: a symbolic link; not replicated (links are never followed)",
            ]
        );
    }

    #[test]
    fn the_size_cap_refuses_the_file_by_name_and_keeps_the_rest() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        write(root, "farms/web.toml", b"w");
        write(root, "checks/big.bin", &vec![0u8; 5000]);
        let caps = Caps {
            max_file_bytes: 4096,
            max_files: 10,
        };
        let scan = Scanner::default().scan(root, caps).unwrap();
        assert_eq!(scan.manifest.len(), 1);
        assert_eq!(
            scan.refused[0].to_string(),
            "checks/big.bin: 5000 bytes, over the 4096-byte cap ([sync] max_file_bytes); not replicated, the peer keeps its copy"
        );
        assert!(scan.frozen().contains("checks/big.bin"));
    }

    #[test]
    fn the_count_cap_keeps_the_configuration_proper_first() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        write(root, "cluster.toml", b"c");
        for i in 0..5 {
            write(root, &format!("certs/c{i}.pem"), b"x");
        }
        write(root, "farms/web.toml", b"w");
        write(root, "keys/sync.key", b"k");
        let caps = Caps {
            max_file_bytes: 4096,
            max_files: 5,
        };
        let scan = Scanner::default().scan(root, caps).unwrap();
        let paths: Vec<_> = scan.manifest.entries.keys().map(|p| &**p).collect();
        assert_eq!(
            paths,
            [
                "certs/c0.pem",
                "certs/c1.pem",
                "cluster.toml",
                "farms/web.toml",
                "keys/sync.key"
            ]
        );
        let refused: Vec<_> = scan.refused.iter().map(|r| &*r.path).collect();
        assert_eq!(refused, ["certs/c2.pem", "certs/c3.pem", "certs/c4.pem"]);
        assert_eq!(
            scan.refused[0].to_string(),
            "certs/c2.pem: beyond the 5-file cap ([sync] max_files); not replicated, the peer keeps its copy"
        );
    }

    #[test]
    fn a_name_with_a_newline_is_refused_not_silently_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "checks/a\nb.sh", b"x");
        let scan = Scanner::default()
            .scan(tmp.path(), Caps::default())
            .unwrap();
        assert!(scan.manifest.is_empty());
        assert_eq!(scan.refused.len(), 1);
        assert_eq!(scan.refused[0].why, Why::BadName);
    }
}
