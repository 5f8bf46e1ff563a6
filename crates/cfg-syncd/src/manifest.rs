//! What is replicated, and the manifest that proves two trees equal.
//!
//! Pure: the include/exclude rules, the manifest (path, SHA-256, size,
//! mode, owner), its hash, its wire chunks and the diff of two manifests
//! into a [`Plan`] are plain data in, data out. The walk that builds a
//! manifest from a directory is in `scan.rs`.
//!
//! Entries are compact (a binary SHA-256, the path shared between the map
//! key and the entry) because a tree of 100,000 files is a supported size:
//! several manifests of it live at once in a daemon bounded to 128 MB.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Component, Path};
use std::sync::Arc;

use ring::digest;
use tandem_proto::v1;

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

/// Entries per message of a streamed manifest or batch: about 250 KB with
/// ordinary paths, far below gRPC's 4 MB limit; [`CHUNK_PATH_BYTES`] bounds
/// a message whatever the length of its paths.
pub const CHUNK_ENTRIES: usize = 2_000;
/// Bytes of paths per streamed message, whatever their number.
pub const CHUNK_PATH_BYTES: usize = 1 << 20;

/// Whether a chunk holding `entries` entries and `path_bytes` bytes of
/// paths is full.
pub fn chunk_budget(entries: usize, path_bytes: usize) -> bool {
    entries >= CHUNK_ENTRIES || path_bytes >= CHUNK_PATH_BYTES
}

/// Whether `rel` (a path relative to the configuration directory, `/`
/// separated) is replicated. A name with a control character (a newline
/// in a file name) is never replicated: the journal and the baseline are
/// line-based, and no operator means such a name.
pub fn is_replicated(rel: &str) -> bool {
    if rel.is_empty() || rel.starts_with('/') || rel.chars().any(char::is_control) {
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

/// A SHA-256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha(pub [u8; 32]);

impl Sha {
    pub fn of(data: &[u8]) -> Sha {
        let mut out = [0u8; 32];
        out.copy_from_slice(digest::digest(&digest::SHA256, data).as_ref());
        Sha(out)
    }

    pub fn from_digest(d: digest::Digest) -> Sha {
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Sha(out)
    }

    /// Lower-case hex, 64 characters.
    pub fn hex(&self) -> String {
        hex(&self.0)
    }

    /// Parses 64 hex digits (either case).
    pub fn from_hex(s: &str) -> Option<Sha> {
        let b = s.as_bytes();
        if b.len() != 64 {
            return None;
        }
        let nibble = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        };
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = (nibble(b[2 * i])? << 4) | nibble(b[2 * i + 1])?;
        }
        Some(Sha(out))
    }
}

impl fmt::Debug for Sha {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl fmt::Display for Sha {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

#[cfg(test)]
pub fn sha256_hex(data: &[u8]) -> String {
    Sha::of(data).hex()
}

/// One replicated file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: Arc<str>,
    pub sha: Sha,
    pub size: u64,
    /// Permission bits (`0o7777`, set-id bits included).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Entry {
    pub fn same_content(&self, other: &Entry) -> bool {
        self.sha == other.sha && self.size == other.size
    }

    pub fn same_attrs(&self, other: &Entry) -> bool {
        self.mode == other.mode && self.uid == other.uid && self.gid == other.gid
    }
}

/// Every replicated file of a tree, by path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    pub entries: BTreeMap<Arc<str>, Entry>,
}

impl Manifest {
    #[cfg(test)]
    pub fn insert(&mut self, e: Entry) {
        self.entries.insert(e.path.clone(), e);
    }

    /// A manifest of `entries` (a later entry for a path wins), built in one
    /// pass: a map grown one ascending key at a time leaves its nodes half
    /// empty, which at 100,000 files is 9 MB more per manifest.
    pub fn from_entries(mut entries: Vec<Entry>) -> Manifest {
        // Stable: of equal paths the later one stays last, and wins below.
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        let mut out: Vec<(Arc<str>, Entry)> = Vec::with_capacity(entries.len());
        for e in entries {
            match out.last_mut() {
                Some(last) if last.0 == e.path => last.1 = e,
                _ => out.push((e.path.clone(), e)),
            }
        }
        Manifest {
            entries: out.into_iter().collect(),
        }
    }

    /// This manifest with `removed` paths gone and `added` entries in
    /// (replacing), rebuilt in one pass.
    pub fn rebuilt(self, removed: &HashSet<&str>, added: Vec<Entry>) -> Manifest {
        let replaced: HashSet<Arc<str>> = added.iter().map(|e| e.path.clone()).collect();
        let mut all: Vec<Entry> = self
            .entries
            .into_values()
            .filter(|e| !removed.contains(&*e.path) && !replaced.contains(&e.path))
            .collect();
        all.extend(added);
        Manifest::from_entries(all)
    }

    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.get(path)
    }

    /// SHA-256 over every (path, hash, size, mode) in path order: equal on
    /// both nodes means identical trees. Owners are not part of it (a uid
    /// can differ between machines for the same user).
    pub fn hash(&self) -> String {
        let mut ctx = digest::Context::new(&digest::SHA256);
        let mut line = String::new();
        for e in self.entries.values() {
            ctx.update(e.path.as_bytes());
            ctx.update(&[0]);
            ctx.update(e.sha.hex().as_bytes());
            line.clear();
            use fmt::Write as _;
            let _ = writeln!(line, "\0{}\0{:o}", e.size, e.mode);
            ctx.update(line.as_bytes());
        }
        hex(ctx.finish().as_ref())
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The manifest as the messages of a GetManifest stream, built as they
    /// are read: chunks of at most [`CHUNK_ENTRIES`] entries, the hash on
    /// the last one (an empty manifest is one empty chunk with its hash).
    pub fn chunks(&self) -> impl Iterator<Item = v1::Manifest> + '_ {
        let mut values = self.entries.values().peekable();
        let mut done = false;
        std::iter::from_fn(move || {
            if done {
                return None;
            }
            let mut chunk = v1::Manifest::default();
            let mut bytes = 0;
            while let Some(e) = values.next() {
                bytes += e.path.len();
                chunk.entries.push(e.into());
                if chunk_budget(chunk.entries.len(), bytes) && values.peek().is_some() {
                    return Some(chunk);
                }
            }
            done = true;
            chunk.hash = self.hash();
            Some(chunk)
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("entry {path:?}: {why}")]
    Entry { path: String, why: &'static str },
    #[error("the manifest's hash {got} differs from the one announced, {announced}")]
    Hash { got: String, announced: String },
}

/// Builds a manifest from the chunks of a GetManifest stream, checking each
/// entry and, at the end, the announced hash.
#[derive(Debug, Default)]
pub struct ManifestReader {
    entries: Vec<Entry>,
    announced: Option<String>,
}

impl ManifestReader {
    pub fn push(&mut self, chunk: v1::Manifest) -> Result<(), WireError> {
        for e in chunk.entries {
            self.entries.push(Entry::try_from(e)?);
        }
        if !chunk.hash.is_empty() {
            self.announced = Some(chunk.hash);
        }
        Ok(())
    }

    pub fn finish(self) -> Result<Manifest, WireError> {
        let manifest = Manifest::from_entries(self.entries);
        let got = manifest.hash();
        match self.announced {
            Some(a) if a == got => Ok(manifest),
            a => Err(WireError::Hash {
                got,
                announced: a.unwrap_or_else(|| "none".into()),
            }),
        }
    }
}

impl From<&Entry> for v1::ManifestEntry {
    fn from(e: &Entry) -> Self {
        v1::ManifestEntry {
            path: e.path.to_string(),
            sha256: e.sha.hex(),
            size: e.size,
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
        }
    }
}

impl TryFrom<v1::ManifestEntry> for Entry {
    type Error = WireError;
    fn try_from(e: v1::ManifestEntry) -> Result<Entry, WireError> {
        let bad = |why| WireError::Entry {
            path: e.path.clone(),
            why,
        };
        if !is_replicated(&e.path) {
            return Err(bad("not a replicated path"));
        }
        let sha = Sha::from_hex(&e.sha256).ok_or_else(|| bad("sha256 is not 64 hex digits"))?;
        if e.mode > 0o7777 {
            return Err(bad("mode has bits beyond 07777"));
        }
        Ok(Entry {
            path: Arc::from(e.path),
            sha,
            size: e.size,
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
        })
    }
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
    pub renames: Vec<(Arc<str>, Entry)>,
    /// Paths the peer has and we do not.
    pub deletes: Vec<Arc<str>>,
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

    #[cfg(test)]
    pub fn upload_bytes(&self) -> u64 {
        self.uploads.iter().map(|e| e.size).sum()
    }
}

/// The plan that turns `remote` into `local`. Unchanged content never
/// travels: equal hashes are skipped (or only re-moded), and a file that
/// disappeared on the peer's side of the diff while the same content
/// appeared under a new name becomes a rename. Paths in `frozen` (files
/// this node refuses to replicate: over a cap, a symlink) are left as the
/// peer has them: neither sent nor deleted.
pub fn diff(local: &Manifest, remote: &Manifest, frozen: &HashSet<Arc<str>>) -> Plan {
    let mut plan = Plan::default();
    // Content the peer holds under a path we no longer have: rename sources.
    let mut gone: HashMap<Sha, Vec<&Arc<str>>> = HashMap::new();
    for (path, r) in &remote.entries {
        if !local.entries.contains_key(path) && !frozen.contains(path) {
            gone.entry(r.sha).or_default().push(path);
        }
    }
    let mut renamed_from: HashSet<&str> = HashSet::new();
    for (path, l) in &local.entries {
        if frozen.contains(path) {
            continue;
        }
        match remote.entries.get(path) {
            Some(r) if r.same_content(l) => {
                if !r.same_attrs(l) {
                    plan.attrs.push(l.clone());
                }
            }
            Some(_) => plan.uploads.push(l.clone()),
            None => match gone.get_mut(&l.sha).and_then(Vec::pop) {
                Some(from) if remote.entries.get(from).is_some_and(|r| r.size == l.size) => {
                    renamed_from.insert(from);
                    plan.renames.push((from.clone(), l.clone()));
                }
                _ => plan.uploads.push(l.clone()),
            },
        }
    }
    for path in remote.entries.keys() {
        if !local.entries.contains_key(path)
            && !renamed_from.contains(&**path)
            && !frozen.contains(path)
        {
            plan.deletes.push(path.clone());
        }
    }
    plan
}

/// The peer's manifest once it applied `plan`, with the entries as sent (a
/// file that vanished before it could be read was not sent, so it is not
/// there). Consumes the peer's previous manifest: at 100,000 files a copy
/// is 15 MB.
pub fn expected_after(m: Manifest, plan: &Plan, sent: &[Entry]) -> Manifest {
    let removed: HashSet<&str> = plan
        .renames
        .iter()
        .map(|(from, _)| &**from)
        .chain(plan.deletes.iter().map(|d| &**d))
        .collect();
    let added: Vec<Entry> = plan
        .renames
        .iter()
        .map(|(_, to)| to)
        .chain(&plan.attrs)
        .chain(sent)
        .cloned()
        .collect();
    m.rebuilt(&removed, added)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn entry(path: &str, content: &str, mode: u32) -> Entry {
        Entry {
            path: Arc::from(path),
            sha: Sha::of(content.as_bytes()),
            size: content.len() as u64,
            mode,
            uid: 0,
            gid: 0,
        }
    }

    pub(crate) fn manifest(entries: &[Entry]) -> Manifest {
        let mut m = Manifest::default();
        for e in entries {
            m.insert(e.clone());
        }
        m
    }

    fn none() -> HashSet<Arc<str>> {
        HashSet::new()
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
            "checks/a\nb.sh",
            "checks/tab\there",
        ] {
            assert!(!is_replicated(no), "{no:?} must stay local");
        }
        assert!(may_contain_replicated("farms/sub"));
        assert!(may_contain_replicated("keys"));
        assert!(!may_contain_replicated("ssh"));
        assert!(!may_contain_replicated(".tandem-sync"));
    }

    #[test]
    fn sha_hex_round_trips_and_rejects_garbage() {
        // SHA-256("abc"), FIPS 180-2 appendix B.1.
        let abc = Sha::of(b"abc");
        assert_eq!(
            abc.hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(Sha::from_hex(&abc.hex()), Some(abc));
        assert_eq!(Sha::from_hex(&abc.hex().to_uppercase()), Some(abc));
        assert_eq!(Sha::from_hex("ba78"), None);
        assert_eq!(Sha::from_hex(&"g".repeat(64)), None);
    }

    #[test]
    fn the_manifest_hash_is_the_documented_formula() {
        // SHA-256 over "path\0<sha hex>\0<size>\0<mode octal>\n" per entry.
        let m = manifest(&[entry("farms/a.toml", "a", 0o644)]);
        let text = format!("farms/a.toml\0{}\01\0644\n", Sha::of(b"a").hex());
        assert_eq!(m.hash(), sha256_hex(text.as_bytes()));
        assert_eq!(
            Manifest::default().hash(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn equal_trees_need_nothing_and_hash_equal() {
        let a = manifest(&[
            entry("farms/a.toml", "a", 0o644),
            entry("cluster.toml", "c", 0o644),
        ]);
        assert!(diff(&a, &a.clone(), &none()).is_empty());
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
        let plan = diff(&local, &remote, &none());
        let up: Vec<_> = plan.uploads.iter().map(|e| &*e.path).collect();
        assert_eq!(up, ["farms/a.toml", "farms/b.toml"]);
        assert_eq!(plan.deletes, [Arc::from("farms/gone.toml")]);
        assert!(plan.renames.is_empty() && plan.attrs.is_empty());
    }

    #[test]
    fn a_moved_file_is_a_rename_not_an_upload() {
        let remote = manifest(&[entry("farms/old.toml", "same", 0o644)]);
        let local = manifest(&[entry("farms/new.toml", "same", 0o640)]);
        let plan = diff(&local, &remote, &none());
        assert!(plan.uploads.is_empty());
        assert!(plan.deletes.is_empty());
        assert_eq!(plan.renames.len(), 1);
        assert_eq!(&*plan.renames[0].0, "farms/old.toml");
        assert_eq!(&*plan.renames[0].1.path, "farms/new.toml");
        assert_eq!(plan.renames[0].1.mode, 0o640);
    }

    #[test]
    fn a_mode_change_sends_no_content() {
        let remote = manifest(&[entry("checks/a.sh", "#!/bin/sh", 0o644)]);
        let local = manifest(&[entry("checks/a.sh", "#!/bin/sh", 0o2755)]);
        let plan = diff(&local, &remote, &none());
        assert!(plan.uploads.is_empty());
        assert_eq!(plan.attrs.len(), 1);
        assert_eq!(plan.attrs[0].mode, 0o2755);
        assert_eq!(plan.upload_bytes(), 0);
    }

    #[test]
    fn refused_paths_are_neither_sent_nor_deleted_nor_renamed() {
        // The master refuses farms/huge.toml (over the cap) and
        // checks/link.sh (a symlink): the peer keeps its copies.
        let remote = manifest(&[
            entry("farms/huge.toml", "old small version", 0o644),
            entry("checks/link.sh", "probe", 0o755),
        ]);
        let local = manifest(&[entry("checks/moved.sh", "probe", 0o755)]);
        let frozen: HashSet<Arc<str>> = ["farms/huge.toml", "checks/link.sh"]
            .into_iter()
            .map(Arc::from)
            .collect();
        let plan = diff(&local, &remote, &frozen);
        assert!(plan.deletes.is_empty(), "{plan:?}");
        assert!(plan.renames.is_empty(), "a frozen path is no rename source");
        assert_eq!(plan.uploads.len(), 1);
    }

    #[test]
    fn the_acknowledged_manifest_equals_the_local_one_after_a_batch() {
        let remote = manifest(&[
            entry("farms/a.toml", "a", 0o644),
            entry("farms/old.toml", "o", 0o644),
            entry("farms/x.toml", "x", 0o644),
        ]);
        let local = manifest(&[
            entry("farms/a.toml", "a2", 0o644),
            entry("farms/new.toml", "o", 0o600),
            entry("checks/c.sh", "c", 0o755),
        ]);
        let plan = diff(&local, &remote, &none());
        let sent = plan.uploads.clone();
        assert_eq!(expected_after(remote, &plan, &sent), local);
    }

    #[test]
    fn a_manifest_streams_in_bounded_chunks_and_reads_back() {
        let mut m = Manifest::default();
        for i in 0..(2 * CHUNK_ENTRIES + 7) {
            m.insert(entry(&format!("checks/f{i:06}.sh"), &i.to_string(), 0o644));
        }
        let chunks: Vec<_> = m.chunks().collect();
        assert_eq!(chunks.len(), 3);
        assert!(chunks.iter().all(|c| c.entries.len() <= CHUNK_ENTRIES));
        assert!(chunks[..2].iter().all(|c| c.hash.is_empty()));
        use prost::Message as _;
        let biggest = chunks.iter().map(|c| c.encoded_len()).max().unwrap();
        assert!(biggest < 400_000, "{biggest} bytes");
        let mut r = ManifestReader::default();
        for c in chunks {
            r.push(c).unwrap();
        }
        assert_eq!(r.finish().unwrap(), m);

        let empty: Vec<_> = Manifest::default().chunks().collect();
        assert_eq!(empty.len(), 1);
        let mut r = ManifestReader::default();
        r.push(empty[0].clone()).unwrap();
        assert_eq!(r.finish().unwrap(), Manifest::default());
    }

    #[test]
    fn a_truncated_or_tampered_manifest_stream_is_an_error() {
        let m = manifest(&[
            entry("farms/a.toml", "a", 0o644),
            entry("farms/b.toml", "b", 0o644),
        ]);
        let mut chunks: Vec<_> = m.chunks().collect();
        // Truncated: no chunk carried the hash.
        let mut r = ManifestReader::default();
        let mut first = chunks[0].clone();
        first.hash.clear();
        r.push(first).unwrap();
        assert!(matches!(r.finish(), Err(WireError::Hash { .. })));
        // An entry dropped on the way.
        chunks[0].entries.pop();
        let mut r = ManifestReader::default();
        r.push(chunks[0].clone()).unwrap();
        assert!(matches!(r.finish(), Err(WireError::Hash { .. })));
        // A path the receiver never accepts.
        let mut r = ManifestReader::default();
        let bad = v1::Manifest {
            entries: vec![v1::ManifestEntry {
                path: "node.toml".into(),
                sha256: Sha::of(b"x").hex(),
                ..Default::default()
            }],
            hash: String::new(),
        };
        assert!(matches!(r.push(bad), Err(WireError::Entry { .. })));
    }
}
