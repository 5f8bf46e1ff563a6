//! What is replicated, and the manifest that proves two trees equal.
//!
//! Pure apart from [`Scanner::scan`], which walks a directory: the
//! include/exclude rules, the manifest (path, SHA-256, size, mode), its hash
//! and the diff of two manifests into a [`Plan`] are plain data in, data out.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use ring::digest;

/// The staging directory inside a configuration directory (a dotfile, so
/// the exclude rules never let it travel or count in a manifest).
pub const STAGING_DIR: &str = ".tandem-sync";

/// Replicated: exactly these files and trees (relative to the configuration
/// directory). Everything else stays on its node.
pub const INCLUDED_FILES: &[&str] = &["cluster.toml", "keys/sync.key"];
pub const INCLUDED_TREES: &[&str] = &["farms", "checks", "certs", "notifications", "routes"];
/// Never replicated, even inside an included tree: these win over the
/// include list. Dotfiles and `*.tmp` (editors' and our own temporary
/// files, the staging directory) are excluded everywhere.
pub const EXCLUDED: &[&str] = &["node.toml", "ssh", "backups", STAGING_DIR];

/// Whether `rel` (a path relative to the configuration directory, `/`
/// separated) is replicated.
pub fn is_replicated(rel: &str) -> bool {
    if rel.is_empty() || rel.starts_with('/') {
        return false;
    }
    let parts: Vec<&str> = rel.split('/').collect();
    if parts.iter().any(|p| {
        p.is_empty() || *p == "." || *p == ".." || p.starts_with('.') || p.ends_with(".tmp")
    }) {
        return false;
    }
    if EXCLUDED.contains(&parts[0]) {
        return false;
    }
    INCLUDED_FILES.contains(&rel) || (parts.len() > 1 && INCLUDED_TREES.contains(&parts[0]))
}

/// Whether a directory (relative) can contain replicated files: the scanner
/// and the watcher do not descend anywhere else.
pub fn may_contain_replicated(rel_dir: &str) -> bool {
    if rel_dir.is_empty() {
        return true;
    }
    let first = rel_dir.split('/').next().unwrap_or_default();
    if rel_dir
        .split('/')
        .any(|p| p.starts_with('.') || p.ends_with(".tmp"))
    {
        return false;
    }
    INCLUDED_TREES.contains(&first) || (first == "keys" && rel_dir == "keys")
}

/// `rel` as a `/`-separated string, or None if it is not a plain relative
/// path (no `..`, no root, valid UTF-8).
pub fn rel_string(rel: &Path) -> Option<String> {
    let mut parts = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(p) => parts.push(p.to_str()?),
            _ => return None,
        }
    }
    Some(parts.join("/"))
}

/// One replicated file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: String,
    /// Lower-case hex SHA-256 of the content.
    pub sha256: String,
    pub size: u64,
    /// Permission bits (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Every replicated file of a tree, by path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    pub entries: BTreeMap<String, Entry>,
}

impl Manifest {
    /// SHA-256 over every (path, hash, size, mode) in path order: equal on
    /// both nodes means identical trees. Owners are not part of it (a uid
    /// can differ between machines for the same user).
    pub fn hash(&self) -> String {
        let mut ctx = digest::Context::new(&digest::SHA256);
        for e in self.entries.values() {
            ctx.update(e.path.as_bytes());
            ctx.update(&[0]);
            ctx.update(e.sha256.as_bytes());
            ctx.update(format!("\0{}\0{:o}\n", e.size, e.mode).as_bytes());
        }
        hex(ctx.finish().as_ref())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(digest::digest(&digest::SHA256, data).as_ref())
}

/// What must happen on the peer to make its tree equal to ours.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Content to send (new or changed files).
    pub uploads: Vec<Entry>,
    /// Same content already there: only mode/owner change.
    pub attrs: Vec<Entry>,
    /// (from, to): the peer already has this content under `from`, which we
    /// no longer have; it moves instead of crossing the link again.
    pub renames: Vec<(String, Entry)>,
    /// Paths the peer has and we do not.
    pub deletes: Vec<String>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.uploads.is_empty()
            && self.attrs.is_empty()
            && self.renames.is_empty()
            && self.deletes.is_empty()
    }

    /// Number of file operations (for `pending_changes`).
    pub fn len(&self) -> usize {
        self.uploads.len() + self.attrs.len() + self.renames.len() + self.deletes.len()
    }

    pub fn upload_bytes(&self) -> u64 {
        self.uploads.iter().map(|e| e.size).sum()
    }
}

/// The plan that turns `remote` into `local`. Unchanged content never
/// travels: equal hashes are skipped (or only re-moded), and a file that
/// disappeared on the peer's side of the diff while the same content
/// appeared under a new name becomes a rename.
pub fn diff(local: &Manifest, remote: &Manifest) -> Plan {
    let mut plan = Plan::default();
    // Content the peer holds under a path we no longer have: rename sources.
    let mut gone: HashMap<&str, Vec<&str>> = HashMap::new();
    for (path, r) in &remote.entries {
        if !local.entries.contains_key(path) {
            gone.entry(r.sha256.as_str())
                .or_default()
                .push(path.as_str());
        }
    }
    let mut renamed_from = Vec::new();
    for (path, l) in &local.entries {
        match remote.entries.get(path) {
            Some(r) if r.sha256 == l.sha256 && r.size == l.size => {
                if r.mode != l.mode || r.uid != l.uid || r.gid != l.gid {
                    plan.attrs.push(l.clone());
                }
            }
            Some(_) => plan.uploads.push(l.clone()),
            None => match gone.get_mut(l.sha256.as_str()).and_then(Vec::pop) {
                Some(from) => {
                    renamed_from.push(from.to_owned());
                    plan.renames.push((from.to_owned(), l.clone()));
                }
                None => plan.uploads.push(l.clone()),
            },
        }
    }
    for path in remote.entries.keys() {
        if !local.entries.contains_key(path) && !renamed_from.contains(path) {
            plan.deletes.push(path.clone());
        }
    }
    plan
}

/// Quick-check key of a file: unchanged stat means unchanged content (as
/// rsync assumes), so a rescan hashes only what was touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

/// Stamps younger than this are re-hashed on every scan.
const RACY_NS: i128 = 2_000_000_000;

/// Walks a configuration directory into a [`Manifest`], hashing only the
/// files whose stat changed since the last scan.
#[derive(Debug, Default)]
pub struct Scanner {
    cache: HashMap<String, (Stamp, String)>,
}

impl Scanner {
    pub fn scan(&mut self, root: &Path) -> io::Result<Manifest> {
        let now_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        let mut manifest = Manifest::default();
        let mut seen = HashMap::new();
        let mut dirs = vec![PathBuf::new()];
        while let Some(rel_dir) = dirs.pop() {
            let dir = root.join(&rel_dir);
            let read = match fs::read_dir(&dir) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
            };
            for item in read {
                let item = item?;
                let rel = rel_dir.join(item.file_name());
                let Some(rel_s) = rel_string(&rel) else {
                    continue;
                };
                // Symlinks are not followed: a link is node-local by nature.
                let ft = item.file_type()?;
                if ft.is_dir() {
                    if may_contain_replicated(&rel_s) {
                        dirs.push(rel);
                    }
                    continue;
                }
                if !ft.is_file() || !is_replicated(&rel_s) {
                    continue;
                }
                let md = match fs::symlink_metadata(root.join(&rel)) {
                    Ok(m) => m,
                    // Deleted between readdir and stat: simply not there.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                };
                let stamp = Stamp {
                    ino: md.ino(),
                    size: md.size(),
                    mtime_ns: i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec()),
                    ctime_ns: i128::from(md.ctime()) * 1_000_000_000 + i128::from(md.ctime_nsec()),
                };
                // A file modified in the last seconds may change again within
                // the same timestamp tick (and reuse a freed inode, with the
                // same size): only older stamps are trusted ("racy clean").
                let settled = now_ns - stamp.mtime_ns.max(stamp.ctime_ns) > RACY_NS;
                let sha = match self.cache.get(&rel_s) {
                    Some((s, sha)) if *s == stamp && settled => sha.clone(),
                    _ => match fs::read(root.join(&rel)) {
                        Ok(data) => sha256_hex(&data),
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(e),
                    },
                };
                seen.insert(rel_s.clone(), (stamp, sha.clone()));
                manifest.entries.insert(
                    rel_s.clone(),
                    Entry {
                        path: rel_s,
                        sha256: sha,
                        size: md.size(),
                        mode: md.mode() & 0o7777,
                        uid: md.uid(),
                        gid: md.gid(),
                    },
                );
            }
        }
        self.cache = seen;
        Ok(manifest)
    }
}

impl From<&Entry> for tandem_proto::v1::ManifestEntry {
    fn from(e: &Entry) -> Self {
        tandem_proto::v1::ManifestEntry {
            path: e.path.clone(),
            sha256: e.sha256.clone(),
            size: e.size,
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
        }
    }
}

impl From<&Manifest> for tandem_proto::v1::Manifest {
    fn from(m: &Manifest) -> Self {
        tandem_proto::v1::Manifest {
            entries: m.entries.values().map(Into::into).collect(),
            hash: m.hash(),
        }
    }
}

impl From<tandem_proto::v1::Manifest> for Manifest {
    fn from(m: tandem_proto::v1::Manifest) -> Self {
        Manifest {
            entries: m
                .entries
                .into_iter()
                .map(|e| {
                    (
                        e.path.clone(),
                        Entry {
                            path: e.path,
                            sha256: e.sha256,
                            size: e.size,
                            mode: e.mode,
                            uid: e.uid,
                            gid: e.gid,
                        },
                    )
                })
                .collect(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn entry(path: &str, content: &str, mode: u32) -> Entry {
        Entry {
            path: path.into(),
            sha256: sha256_hex(content.as_bytes()),
            size: content.len() as u64,
            mode,
            uid: 0,
            gid: 0,
        }
    }

    pub(crate) fn manifest(entries: &[Entry]) -> Manifest {
        Manifest {
            entries: entries
                .iter()
                .map(|e| (e.path.clone(), e.clone()))
                .collect(),
        }
    }

    #[test]
    fn include_list_is_explicit_and_exclusions_win() {
        for yes in [
            "cluster.toml",
            "farms/web.toml",
            "checks/ftp.sh",
            "certs/a/b.pem",
            "notifications/mail.toml",
            "routes/static.toml",
            "keys/sync.key",
        ] {
            assert!(is_replicated(yes), "{yes} must be replicated");
        }
        for no in [
            "node.toml",
            "ssh/id_ed25519",
            "ssh/known_hosts",
            "backups/farms/web.toml",
            "keys/other.key",
            "farms/.web.toml.swp",
            "farms/web.toml.tmp",
            ".tandem-sync/b1/farms/web.toml",
            "farms",
            "random.toml",
            "../etc/passwd",
            "/etc/passwd",
            "farms/../node.toml",
            "farms//x",
        ] {
            assert!(!is_replicated(no), "{no} must stay local");
        }
        assert!(may_contain_replicated("farms/sub"));
        assert!(may_contain_replicated("keys"));
        assert!(!may_contain_replicated("ssh"));
        assert!(!may_contain_replicated(".tandem-sync"));
    }

    #[test]
    fn equal_trees_need_nothing_and_hash_equal() {
        let a = manifest(&[
            entry("farms/a.toml", "a", 0o644),
            entry("cluster.toml", "c", 0o644),
        ]);
        assert!(diff(&a, &a.clone()).is_empty());
        assert_eq!(a.hash(), a.clone().hash());
        let b = manifest(&[
            entry("farms/a.toml", "a", 0o600),
            entry("cluster.toml", "c", 0o644),
        ]);
        assert_ne!(a.hash(), b.hash(), "mode is part of the manifest hash");
    }

    #[test]
    fn changed_new_and_removed_files_make_uploads_and_deletes() {
        let remote = manifest(&[
            entry("farms/a.toml", "old", 0o644),
            entry("farms/gone.toml", "x", 0o644),
        ]);
        let local = manifest(&[
            entry("farms/a.toml", "new", 0o644),
            entry("farms/b.toml", "b", 0o644),
        ]);
        let plan = diff(&local, &remote);
        let up: Vec<_> = plan.uploads.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(up, ["farms/a.toml", "farms/b.toml"]);
        assert_eq!(plan.deletes, ["farms/gone.toml"]);
        assert!(plan.renames.is_empty() && plan.attrs.is_empty());
    }

    #[test]
    fn a_moved_file_is_a_rename_not_an_upload() {
        let remote = manifest(&[entry("farms/old.toml", "same", 0o644)]);
        let local = manifest(&[entry("farms/new.toml", "same", 0o640)]);
        let plan = diff(&local, &remote);
        assert!(plan.uploads.is_empty());
        assert!(plan.deletes.is_empty());
        assert_eq!(plan.renames.len(), 1);
        assert_eq!(plan.renames[0].0, "farms/old.toml");
        assert_eq!(plan.renames[0].1.path, "farms/new.toml");
        assert_eq!(plan.renames[0].1.mode, 0o640);
    }

    #[test]
    fn a_mode_change_sends_no_content() {
        let remote = manifest(&[entry("checks/a.sh", "#!/bin/sh", 0o644)]);
        let local = manifest(&[entry("checks/a.sh", "#!/bin/sh", 0o755)]);
        let plan = diff(&local, &remote);
        assert!(plan.uploads.is_empty());
        assert_eq!(plan.attrs.len(), 1);
        assert_eq!(plan.upload_bytes(), 0);
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
            fs::create_dir_all(root.join(p).parent().unwrap()).unwrap();
            fs::write(root.join(p), c).unwrap();
        }
        let mut s = Scanner::default();
        let m = s.scan(root).unwrap();
        let paths: Vec<_> = m.entries.keys().map(String::as_str).collect();
        assert_eq!(paths, ["cluster.toml", "farms/web.toml", "keys/sync.key"]);
        assert_eq!(m.entries["farms/web.toml"].sha256, sha256_hex(b"w1"));
        fs::write(root.join("farms/web.toml"), "w2-longer").unwrap();
        let m2 = s.scan(root).unwrap();
        assert_eq!(
            m2.entries["farms/web.toml"].sha256,
            sha256_hex(b"w2-longer")
        );
        assert_ne!(m.hash(), m2.hash());
    }
}
