//! The receiving side: a batch staged by SFTP in
//! `<config_dir>/.tandem-sync/<batch>/` lands in the live tree entirely or
//! not at all.
//!
//! 1. **Check** (nothing live changes): every staged file is opened without
//!    following links, must be a regular file with its announced SHA-256,
//!    gets its owner then its mode (chown clears set-id bits, so the mode
//!    comes last) through that descriptor, and is moved into the private
//!    `<batch>.ready/` directory; the configuration the batch would produce
//!    is validated; renamed and re-moded files must be what the master
//!    believes they are; no directory on the way is a link.
//! 2. **Set aside** the local changes the batch replaces or removes (files
//!    that differ from this node's baseline), into
//!    `<state-dir>/set-aside/<timestamp>.partial/`.
//! 3. **Commit**: the journal (`journal.rs`) is written and renamed into
//!    place — the one atomic switch. Everything after it is replayed at
//!    start if cfg-syncd dies: the batch is never half applied.
//! 4. **Roll forward**: deletions, moves, placements, owner/mode changes;
//!    the directories are synced; the set-aside directory gets its final
//!    name; the baseline records the batch.
//! 5. The caller reloads the daemons (once, and only when content changed),
//!    then [`finish`] removes the journal and the staging.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs;
use std::io::{self, Write as _};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use nix::errno::Errno;
use nix::fcntl::{OFlag, renameat};
use nix::sys::stat::{FileStat, Mode, fchmod, mkdirat};
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, unlinkat};
use tandem_config::{CLUSTER_FILE, Config, FARMS_DIR, NODE_FILE};
use tandem_proto::v1;

use crate::baseline::{Baseline, Change};
use crate::fault::Faults;
use crate::journal::{self, Journal, Op};
use crate::manifest::{STAGING_DIR, Sha, is_replicated};
use crate::nofollow::{self, Kind};
use crate::scan::{Caps, Scan, Scanner};
use crate::set_aside::{self, Pending, Record};

/// Operations a batch may hold at most (a sanity bound on what a peer can
/// make this node hold in memory; the caps bound real batches far below).
pub const MAX_BATCH_OPS: usize = 3_000_000;
/// Up to this many staged files, each is fsync'd; above, one syncfs(2).
const FSYNC_EACH_UP_TO: usize = 64;
/// No staged file is read beyond this, whatever the configuration says
/// (the largest `[sync] max_file_bytes` allowed).
const HARD_FILE_CAP: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The request itself is wrong (a path that is not replicated, a
    /// staged file that is missing, a link, or differs from its hash).
    #[error("batch {batch} refused: {why}")]
    BadRequest { batch: String, why: String },
    /// The configuration the batch would produce is invalid: nothing applied.
    #[error("batch {batch} refused, the configuration would be invalid: {}", .errors.join("; "))]
    Invalid { batch: String, errors: Vec<String> },
    /// A file's mode cannot be carried on this node (set-id bits without
    /// the privilege to set them): nothing applied.
    #[error("batch {batch} refused: {}", .errors.join("; "))]
    Unsupported { batch: String, errors: Vec<String> },
    /// The tree is not the one the batch was computed against.
    #[error(
        "batch {batch} is stale: this node's tree changed since the master read it (manifest {live}, the batch expects {base})"
    )]
    Stale {
        batch: String,
        live: String,
        base: String,
    },
    #[error("batch {batch}: {what}: {source}")]
    Io {
        batch: String,
        what: String,
        source: io::Error,
    },
}

fn bad(batch: &str, why: impl Into<String>) -> ApplyError {
    ApplyError::BadRequest {
        batch: batch.to_owned(),
        why: why.into(),
    }
}

fn io_err(batch: &str, what: impl Into<String>) -> impl FnOnce(io::Error) -> ApplyError {
    let batch = batch.to_owned();
    let what = what.into();
    move |source| ApplyError::Io {
        batch,
        what,
        source,
    }
}

/// One file of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub path: Arc<str>,
    /// Content staged at `<batch>/<path>`; otherwise the live file already
    /// has it and only owner and mode change.
    pub staged: bool,
    pub sha: Sha,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// A batch as the master sent it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    pub name: String,
    pub from_node: String,
    /// The receiver's manifest hash the batch was computed against (empty:
    /// not checked).
    pub base: String,
    pub writes: Vec<Write>,
    /// (from, to): live content that moves.
    pub renames: Vec<(Arc<str>, Arc<str>)>,
    pub deletes: Vec<Arc<str>>,
}

impl Batch {
    pub fn ops(&self) -> usize {
        self.writes.len() + self.renames.len() + self.deletes.len()
    }
}

/// Gathers the chunks of an Apply stream into a [`Batch`].
#[derive(Debug, Default)]
pub struct BatchReader {
    batch: Option<Batch>,
    committed: bool,
}

impl BatchReader {
    pub fn push(&mut self, c: v1::ApplyRequest) -> Result<(), ApplyError> {
        let b = self.batch.get_or_insert_with(|| Batch {
            name: c.batch.clone(),
            from_node: c.from_node.clone(),
            base: c.base_manifest_hash.clone(),
            ..Default::default()
        });
        if self.committed {
            return Err(bad(&b.name, "a chunk after the commit"));
        }
        if c.batch != b.name || c.from_node != b.from_node {
            return Err(bad(&b.name, "chunks of different batches in one stream"));
        }
        if b.ops() + c.writes.len() + c.renames.len() + c.deletes.len() > MAX_BATCH_OPS {
            return Err(bad(
                &b.name,
                format!("more than {MAX_BATCH_OPS} operations"),
            ));
        }
        for w in c.writes {
            let sha = Sha::from_hex(&w.sha256)
                .ok_or_else(|| bad(&b.name, format!("{}: sha256 is not 64 hex digits", w.path)))?;
            if w.mode > 0o7777 {
                return Err(bad(
                    &b.name,
                    format!("{}: mode {:o} is not a permission mode", w.path, w.mode),
                ));
            }
            b.writes.push(Write {
                path: Arc::from(w.path),
                staged: w.staged,
                sha,
                size: w.size,
                mode: w.mode,
                uid: w.uid,
                gid: w.gid,
            });
        }
        b.renames.extend(
            c.renames
                .into_iter()
                .map(|r| (Arc::from(r.from), Arc::from(r.to))),
        );
        b.deletes.extend(c.deletes.into_iter().map(Arc::from));
        self.committed = c.commit;
        Ok(())
    }

    /// The batch, if the stream ended with its commit.
    pub fn finish(self) -> Result<Batch, ApplyError> {
        match (self.batch, self.committed) {
            (Some(b), true) => Ok(b),
            (Some(b), false) => Err(bad(
                &b.name,
                "the stream ended before the commit: nothing applied",
            )),
            (None, _) => Err(bad("(none)", "an empty Apply stream")),
        }
    }
}

/// The chunks of an Apply stream for a batch, built as they are read (the
/// stream owns the batch: one chunk at a time exists as protobuf).
pub fn into_chunks(b: Batch) -> impl Iterator<Item = v1::ApplyRequest> + Send + 'static {
    let Batch {
        name,
        from_node,
        base,
        writes,
        renames,
        deletes,
    } = b;
    let mut writes = writes.into_iter().peekable();
    let mut renames = renames.into_iter().peekable();
    let mut deletes = deletes.into_iter().peekable();
    let mut base = Some(base);
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        let mut c = v1::ApplyRequest {
            batch: name.clone(),
            from_node: from_node.clone(),
            base_manifest_hash: base.take().unwrap_or_default(),
            ..Default::default()
        };
        let mut n = 0usize;
        let mut bytes = 0usize;
        while !crate::manifest::chunk_budget(n, bytes) {
            if let Some(w) = writes.next() {
                bytes += w.path.len();
                c.writes.push(v1::FileWrite {
                    path: w.path.to_string(),
                    staged: w.staged,
                    sha256: w.sha.hex(),
                    size: w.size,
                    mode: w.mode,
                    uid: w.uid,
                    gid: w.gid,
                });
            } else if let Some((from, to)) = renames.next() {
                bytes += from.len() + to.len();
                c.renames.push(v1::FileRename {
                    from: from.to_string(),
                    to: to.to_string(),
                });
            } else if let Some(d) = deletes.next() {
                bytes += d.len();
                c.deletes.push(d.to_string());
            } else {
                break;
            }
            n += 1;
        }
        if writes.peek().is_none() && renames.peek().is_none() && deletes.peek().is_none() {
            c.commit = true;
            done = true;
        }
        Some(c)
    })
}

fn valid_batch_name(b: &str) -> bool {
    !b.is_empty()
        && b.len() <= 96
        && b.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
}

/// Where things are, and the test switches.
#[derive(Debug, Clone)]
pub struct Env {
    pub root: PathBuf,
    pub state_dir: PathBuf,
    pub faults: Faults,
}

/// The receiving node's own state an apply reads and updates.
pub struct Local<'a> {
    pub scanner: &'a mut Scanner,
    pub baseline: &'a mut Option<Baseline>,
    pub set_aside: &'a Mutex<set_aside::Store>,
}

/// What a batch did.
#[derive(Debug)]
pub struct Applied {
    pub batch: String,
    pub from_node: String,
    pub written: usize,
    pub renamed: usize,
    pub deleted: usize,
    pub attrs: usize,
    /// Content changed: the daemons reload (once).
    pub reload: bool,
    pub set_aside: Option<Record>,
    /// The tree after the batch.
    pub scan: Scan,
    /// Problems met after the commit (the batch stays journaled and is
    /// replayed before the next one).
    pub incomplete: Vec<String>,
    /// Time spent checking (step 1-3) and landing (step 4) the batch.
    pub check_ms: u64,
    pub land_ms: u64,
}

/// Applies `batch` all or nothing (see the module documentation).
/// Blocking: run it off the async runtime. The batch is consumed: at
/// 100,000 files it is 12 MB that need not live while the files land.
pub fn apply(
    env: &Env,
    local: &mut Local<'_>,
    batch: Batch,
    caps: Caps,
) -> Result<Applied, ApplyError> {
    let name = batch.name.clone();
    let name = name.as_str();
    check_shape(&batch)?;
    let root = nofollow::open_root(&env.root)
        .map_err(io_err(name, "opening the configuration directory"))?;
    let staging = ensure_staging(&root).map_err(io_err(name, format!("opening {STAGING_DIR}")))?;
    // What an interrupted master left is of no use now (a master pushes
    // one batch at a time); journals are not touched.
    clean_staging_except(&env.root, Some(name));
    let written = batch.writes.iter().filter(|w| w.staged).count();
    let renamed = batch.renames.len();
    let deleted = batch.deletes.len();
    let attrs = batch
        .writes
        .iter()
        .filter(|w| !w.staged)
        .count()
        .saturating_sub(renamed);
    let mut pending = None;
    let started = std::time::Instant::now();
    let r = prepare(env, local, &root, &staging, &batch, caps, &mut pending);
    drop(batch);
    let (journal, live_caps, after) = match r {
        Ok(x) => x,
        Err(e) => {
            if let (Some(p), Ok(store)) = (&pending, local.set_aside.lock()) {
                store.discard(&p.name);
            }
            remove_batch_staging(&env.root, name);
            return Err(e);
        }
    };
    if !env.faults.nonatomic
        && let Err(e) = commit(&staging, &journal)
    {
        if let (Some(p), Ok(store)) = (&pending, local.set_aside.lock()) {
            store.discard(&p.name);
        }
        remove_batch_staging(&env.root, name);
        return Err(io_err(name, "writing the commit journal")(e));
    }
    let set_aside_paths = pending.map(|p| p.paths).unwrap_or_default();
    let checked = started.elapsed();
    let mut applied = roll_forward(
        env,
        local,
        &root,
        &staging,
        &journal,
        live_caps,
        Some(after),
    );
    applied.check_ms = checked.as_millis() as u64;
    applied.land_ms = (started.elapsed() - checked).as_millis() as u64;
    if applied.set_aside.is_none() && !set_aside_paths.is_empty() {
        applied.incomplete.push(format!(
            "{} set-aside files could not be kept",
            set_aside_paths.len()
        ));
    }
    applied.written = written;
    applied.renamed = renamed;
    applied.deleted = deleted;
    applied.attrs = attrs;
    if env.faults.nonatomic {
        remove_batch_staging(&env.root, name);
    }
    Ok(applied)
}

/// The request's own consistency: names, paths, no path twice.
fn check_shape(b: &Batch) -> Result<(), ApplyError> {
    let name = b.name.as_str();
    if !valid_batch_name(name) {
        return Err(bad(name, format!("invalid batch name {name:?}")));
    }
    let mut seen: HashSet<&str> = HashSet::new();
    let paths = b
        .writes
        .iter()
        .map(|w| &w.path)
        .chain(b.deletes.iter())
        .chain(b.renames.iter().map(|r| &r.0));
    for p in paths {
        // The backup decides for itself what may land: node.toml, ssh/ and
        // the rest of the exclude list are refused whoever asks.
        if !is_replicated(p) {
            return Err(bad(name, format!("{p} is not a replicated path")));
        }
        if !seen.insert(p) {
            return Err(bad(name, format!("{p} appears twice")));
        }
    }
    for (_, to) in &b.renames {
        if !b.writes.iter().any(|w| w.path == *to && !w.staged) {
            return Err(bad(
                name,
                format!("rename target {to} has no mode and owner"),
            ));
        }
    }
    Ok(())
}

/// The staging directory, a real directory (a link there is removed).
fn ensure_staging(root: &OwnedFd) -> io::Result<OwnedFd> {
    if let Some(st) = nofollow::stat_at(root, STAGING_DIR)?
        && nofollow::kind(&st) != Kind::Dir
    {
        tracing::warn!(
            "{STAGING_DIR} in the configuration directory is a {}; replaced by a directory",
            nofollow::kind(&st).word()
        );
        unlinkat(root, STAGING_DIR, UnlinkatFlags::NoRemoveDir).map_err(io::Error::from)?;
    }
    match mkdirat(root, STAGING_DIR, Mode::from_bits_truncate(0o700)) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(e) => return Err(e.into()),
    }
    nofollow::open_dir_beneath(root, STAGING_DIR)
}

/// Step 1 and 2: everything checked, staged files ready, local changes
/// kept; returns the journal to commit.
#[allow(clippy::too_many_arguments)]
fn prepare(
    env: &Env,
    local: &mut Local<'_>,
    root: &OwnedFd,
    staging: &OwnedFd,
    batch: &Batch,
    caps: Caps,
    pending: &mut Option<Pending>,
) -> Result<(Journal, Caps, Scan), ApplyError> {
    let name = batch.name.as_str();
    let live = local
        .scanner
        .scan(&env.root, caps)
        .map_err(io_err(name, "scanning the live tree"))?;
    if !batch.base.is_empty() {
        let hash = live.manifest.hash();
        if hash != batch.base {
            return Err(ApplyError::Stale {
                batch: name.to_owned(),
                live: hash,
                base: batch.base.clone(),
            });
        }
    }
    let staged: Vec<(u32, &Write)> = batch
        .writes
        .iter()
        .filter(|w| w.staged)
        .enumerate()
        .map(|(i, w)| (i as u32, w))
        .collect();
    let ready_name = format!("{name}.ready");
    let mut ready_paths: BTreeMap<Arc<str>, PathBuf> = BTreeMap::new();
    if !staged.is_empty() {
        let batch_dir = nofollow::open_dir_beneath(staging, name)
            .map_err(|e| bad(name, format!("staging directory {STAGING_DIR}/{name}: {e}")))?;
        mkdirat(
            staging,
            ready_name.as_str(),
            Mode::from_bits_truncate(0o700),
        )
        .map_err(|e| io_err(name, format!("creating {STAGING_DIR}/{ready_name}"))(e.into()))?;
        let ready = nofollow::open_dir_beneath(staging, &ready_name)
            .map_err(io_err(name, format!("opening {STAGING_DIR}/{ready_name}")))?;
        let each = staged.len() <= FSYNC_EACH_UP_TO;
        let mut buf = Vec::new();
        let mut dirs = DirCache::default();
        for (n, w) in &staged {
            env.faults.pause();
            check_staged(
                env, &batch_dir, &mut dirs, &ready, *n, w, each, &mut buf, name,
            )?;
            if validated(&w.path) {
                ready_paths.insert(
                    w.path.clone(),
                    env.root
                        .join(STAGING_DIR)
                        .join(&ready_name)
                        .join(n.to_string()),
                );
            }
        }
        if !each {
            nix::unistd::syncfs(&ready).map_err(|e| io_err(name, "syncfs")(e.into()))?;
        }
    }

    let config = validate(&env.root, batch, &ready_paths)?;
    let after_caps = Caps::of(&config);
    for (_, w) in &staged {
        if w.size > after_caps.max_file_bytes {
            return Err(bad(
                name,
                format!(
                    "{}: {} bytes, over the {}-byte cap ([sync] max_file_bytes)",
                    w.path, w.size, after_caps.max_file_bytes
                ),
            ));
        }
    }
    if batch.writes.len() > after_caps.max_files {
        return Err(bad(
            name,
            format!(
                "{} files, over the {}-file cap ([sync] max_files)",
                batch.writes.len(),
                after_caps.max_files
            ),
        ));
    }

    for w in batch
        .writes
        .iter()
        .filter(|w| !w.staged && w.mode & 0o6000 != 0 && !env.faults.mode_before_owner)
    {
        probe_mode(staging, name, w)?;
    }

    // Moves and owner/mode changes act on live files: they must hold what
    // the master believes (otherwise it fetches this node's manifest again).
    let renamed_to: HashMap<&str, &Write> = batch
        .writes
        .iter()
        .filter(|w| !w.staged)
        .map(|w| (&*w.path, w))
        .collect();
    for (from, to) in &batch.renames {
        let want = renamed_to.get(&**to).map(|w| w.sha);
        if live.manifest.get(from).map(|e| e.sha) != want {
            return Err(bad(
                name,
                format!("{from} is not here with the content to move to {to}"),
            ));
        }
    }
    let targets_of_renames: HashSet<&str> = batch.renames.iter().map(|r| &*r.1).collect();
    for w in batch.writes.iter().filter(|w| !w.staged) {
        if !targets_of_renames.contains(&*w.path)
            && live.manifest.get(&w.path).map(|e| e.sha) != Some(w.sha)
        {
            return Err(bad(
                name,
                format!("{} is not here with the announced content", w.path),
            ));
        }
    }

    // No directory on the way to a new file may be a link (or a file the
    // batch does not delete).
    let deleted: HashSet<&str> = batch.deletes.iter().map(|d| &**d).collect();
    let mut dirs_ok: HashSet<String> = HashSet::new();
    for p in staged
        .iter()
        .map(|(_, w)| &*w.path)
        .chain(batch.renames.iter().map(|r| &*r.1))
    {
        check_parents(root, p, &deleted, &mut dirs_ok).map_err(|why| bad(name, why))?;
    }

    // Local changes the batch replaces or removes.
    let targets = staged
        .iter()
        .map(|(_, w)| (w.path.clone(), Some(w.sha)))
        .chain(
            batch
                .renames
                .iter()
                .map(|(_, to)| (to.clone(), renamed_to.get(&**to).map(|w| w.sha))),
        )
        .chain(batch.deletes.iter().map(|d| (d.clone(), None)));
    let mut keep = Vec::new();
    if let Some(base) = local.baseline.as_ref() {
        for (path, new) in targets {
            match live.manifest.get(&path) {
                Some(e) => {
                    if new != Some(e.sha) && base.get(&path) != Some(e.sha) {
                        keep.push(path);
                    }
                }
                None => {
                    let (parent, file) = nofollow::split(&path);
                    let here = nofollow::open_dir_beneath(root, parent)
                        .ok()
                        .and_then(|d| nofollow::stat_at(&d, file).ok().flatten());
                    if here.is_some_and(|st| nofollow::kind(&st) != Kind::Dir) {
                        keep.push(path);
                    }
                }
            }
        }
    }
    if !keep.is_empty() && !env.faults.no_set_aside {
        let store = local
            .set_aside
            .lock()
            .map_err(|_| bad(name, "set-aside store lock poisoned"))?;
        let mut p = store
            .begin(SystemTime::now())
            .map_err(io_err(name, "creating the set-aside directory"))?;
        drop(store);
        for path in &keep {
            let r = p.keep(root, path);
            if let Err(e) = r {
                *pending = Some(p);
                return Err(io_err(name, format!("setting aside {path}"))(e));
            }
        }
        *pending = Some(p);
    }

    let mut ops = Vec::with_capacity(batch.ops() + batch.renames.len());
    ops.extend(batch.deletes.iter().map(|d| Op::Delete { path: d.clone() }));
    for (from, to) in &batch.renames {
        if let Some(w) = renamed_to.get(&**to) {
            ops.push(Op::Move {
                sha: w.sha,
                from: from.clone(),
                to: to.clone(),
            });
        }
    }
    ops.extend(staged.iter().map(|(n, w)| Op::Place {
        ready: *n,
        sha: w.sha,
        path: w.path.clone(),
    }));
    ops.extend(
        batch
            .writes
            .iter()
            .filter(|w| !w.staged)
            .map(|w| Op::Attrs {
                mode: w.mode,
                uid: w.uid,
                gid: w.gid,
                path: w.path.clone(),
            }),
    );
    let journal = Journal {
        batch: name.to_owned(),
        from_node: batch.from_node.clone(),
        set_aside: pending.as_ref().map(|p| p.name.clone()),
        reload: !staged.is_empty() || !batch.renames.is_empty() || !batch.deletes.is_empty(),
        ops,
    };
    // The tree after the batch, as verified here: what the reply's manifest
    // hash and the baseline are computed from.
    let before = Arc::try_unwrap(live.manifest).unwrap_or_else(|m| (*m).clone());
    let removed: HashSet<&str> = batch
        .renames
        .iter()
        .map(|(from, _)| &**from)
        .chain(batch.deletes.iter().map(|d| &**d))
        .collect();
    let added = batch
        .writes
        .iter()
        .map(|w| crate::manifest::Entry {
            path: w.path.clone(),
            sha: w.sha,
            size: w.size,
            mode: w.mode & 0o7777,
            uid: w.uid,
            gid: w.gid,
        })
        .collect();
    let after = before.rebuilt(&removed, added);
    let after = Scan {
        manifest: Arc::new(after),
        refused: live.refused,
    };
    Ok((journal, after_caps, after))
}

/// One staged file: opened without following links, a regular file with
/// the announced content, owner then mode set through the descriptor, moved
/// into `ready/<n>`, and that move checked to have moved this very file.
#[allow(clippy::too_many_arguments)]
fn check_staged(
    env: &Env,
    batch_dir: &OwnedFd,
    dirs: &mut DirCache,
    ready: &OwnedFd,
    n: u32,
    w: &Write,
    fsync: bool,
    buf: &mut Vec<u8>,
    name: &str,
) -> Result<(), ApplyError> {
    let path = &*w.path;
    let opened = if env.faults.follow_links {
        nix::fcntl::openat(
            batch_dir,
            path,
            OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(io::Error::from)
        .and_then(|fd| Ok((fs::File::from(fd.try_clone()?), nix::sys::stat::fstat(&fd)?)))
    } else {
        nofollow::open_file_beneath(batch_dir, path)
    };
    let (mut file, st) = opened.map_err(|e| {
        if nofollow::is_link_error(&e) {
            bad(
                name,
                format!("staged {path} is (or passes through) a symbolic link: refused, links are never followed"),
            )
        } else {
            bad(name, format!("staged {path}: {e}"))
        }
    })?;
    let h = nofollow::hash_file(&mut file, HARD_FILE_CAP, buf)
        .map_err(|e| bad(name, format!("reading staged {path}: {e}")))?;
    if h.over || h.sha != w.sha || h.size != w.size {
        return Err(bad(
            name,
            format!("staged {path} does not match its announced hash"),
        ));
    }
    if fsync {
        file.sync_all()
            .map_err(io_err(name, format!("fsync of staged {path}")))?;
    }
    let set = set_owner_and_mode(&file, w.uid, w.gid, w.mode, env.faults.mode_before_owner);
    if env.faults.mode_before_owner {
        // The control runs without the fix: no check either.
        set.map_err(io_err(
            name,
            format!("setting owner and mode of staged {path}"),
        ))?;
    } else {
        check_mode(&file, path, w.mode, set, name)?;
    }
    let (parent, file_name) = nofollow::split(path);
    let pdir = dirs
        .open(batch_dir, parent)
        .map_err(|e| bad(name, format!("staged directory of {path}: {e}")))?;
    renameat(pdir, file_name, ready, n.to_string().as_str())
        .map_err(|e| io_err(name, format!("moving staged {path} aside"))(e.into()))?;
    let moved = nofollow::stat_at(ready, &n.to_string())
        .map_err(io_err(name, format!("checking staged {path}")))?;
    if !moved.is_some_and(|m| m.st_dev == st.st_dev && m.st_ino == st.st_ino) {
        return Err(bad(
            name,
            format!("staged {path} was replaced while it was being checked: refused"),
        ));
    }
    Ok(())
}

/// Checks that `file` got `mode` (set-id bits included). chmod(2) drops
/// the set-group-ID bit without an error when the process lacks
/// CAP_FSETID, and systemd's `RestrictSUIDSGID=` makes it fail: either way
/// the bits cannot be carried here, and the batch is refused naming the
/// file (it would otherwise be sent again and again).
fn check_mode(
    file: &fs::File,
    path: &str,
    mode: u32,
    set: io::Result<()>,
    batch: &str,
) -> Result<(), ApplyError> {
    let want = mode & 0o7777;
    let unsupported = |got: String| ApplyError::Unsupported {
        batch: batch.to_owned(),
        errors: vec![format!(
            "{path}: mode {want:o} cannot be set on this node ({got}); set-id bits need \
             cfg-syncd to run as root with CAP_FSETID and without systemd's RestrictSUIDSGID=; \
             nothing applied"
        )],
    };
    match set {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied && want & 0o6000 != 0 => {
            return Err(unsupported(e.to_string()));
        }
        Err(e) => {
            return Err(io_err(batch, format!("setting owner and mode of {path}"))(
                e,
            ));
        }
    }
    let got = nix::sys::stat::fstat(file)
        .map_err(|e| io_err(batch, format!("checking the mode of {path}"))(e.into()))?
        .st_mode
        & 0o7777;
    if got != want {
        return Err(unsupported(format!("it became {got:o}")));
    }
    Ok(())
}

/// A mode with set-id bits for a live file (a mode-only change) is tried
/// first on a scratch file with the same owner, before the commit.
fn probe_mode(staging: &OwnedFd, batch: &str, w: &Write) -> Result<(), ApplyError> {
    let probe = format!("{batch}.probe");
    let _ = unlinkat(staging, probe.as_str(), UnlinkatFlags::NoRemoveDir);
    let fd = nofollow::open_beneath(
        staging,
        &probe,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
    )
    .map_err(io_err(batch, "creating the mode probe"))?;
    let file = fs::File::from(fd);
    let set = set_owner_and_mode(&file, w.uid, w.gid, w.mode, false);
    let r = check_mode(&file, &w.path, w.mode, set, batch);
    let _ = unlinkat(staging, probe.as_str(), UnlinkatFlags::NoRemoveDir);
    r
}

/// Owner first, then mode: chown(2) clears the set-user-ID and (for a
/// group-executable file) set-group-ID bits, even for root, so a mode set
/// before it would lose them and never match the master's again.
pub fn set_owner_and_mode<Fd: AsFd>(
    fd: Fd,
    uid: u32,
    gid: u32,
    mode: u32,
    mode_first: bool,
) -> io::Result<()> {
    let mode = Mode::from_bits_truncate(mode & 0o7777);
    let own = |fd: &Fd| fchown(fd, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)));
    if mode_first {
        fchmod(&fd, mode)?;
        own(&fd)?;
    } else {
        own(&fd)?;
        fchmod(&fd, mode)?;
    }
    Ok(())
}

/// Every existing directory on the way to `path` is a real directory (or a
/// file this batch deletes first).
fn check_parents(
    root: &OwnedFd,
    path: &str,
    deleted: &HashSet<&str>,
    ok: &mut HashSet<String>,
) -> Result<(), String> {
    let (parent, _) = nofollow::split(path);
    let mut walked = String::new();
    for part in parent.split('/').filter(|p| !p.is_empty()) {
        let up = walked.clone();
        if !walked.is_empty() {
            walked.push('/');
        }
        walked.push_str(part);
        if ok.contains(&walked) {
            continue;
        }
        let dir = match nofollow::open_dir_beneath(root, &up) {
            Ok(d) => d,
            // A component above is missing (or deleted by the batch): the
            // rest is created.
            Err(_) => return Ok(()),
        };
        match nofollow::stat_at(&dir, part).map_err(|e| format!("{walked}: {e}"))? {
            None => return Ok(()),
            Some(st) => match nofollow::kind(&st) {
                Kind::Dir => {
                    ok.insert(walked.clone());
                }
                Kind::File if deleted.contains(walked.as_str()) => return Ok(()),
                k => {
                    return Err(format!(
                        "{walked} is a {} on this node, where the master has a directory; links are never followed: replace it with a directory",
                        k.word()
                    ));
                }
            },
        }
    }
    Ok(())
}

/// Step 3: the journal, written whole and fsync'd, then renamed into place.
fn commit(staging: &OwnedFd, j: &Journal) -> io::Result<()> {
    let tmp = format!("{}.journal.tmp", j.batch);
    let fd = nofollow::open_beneath(
        staging,
        &tmp,
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC | OFlag::O_EXCL,
    )
    .or_else(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            let _ = unlinkat(staging, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
            nofollow::open_beneath(
                staging,
                &tmp,
                OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
            )
        } else {
            Err(e)
        }
    })?;
    let mut f = fs::File::from(fd);
    journal::encode(j, &mut f)?;
    f.flush()?;
    f.sync_all()?;
    renameat(
        staging,
        tmp.as_str(),
        staging,
        journal_name(&j.batch).as_str(),
    )?;
    // Committed: from here on the batch is rolled forward, whatever fails.
    if let Err(e) = nix::unistd::fsync(staging) {
        tracing::warn!(batch = %j.batch, "fsync of {STAGING_DIR} after the commit of batch {} failed: {e}", j.batch);
    }
    Ok(())
}

fn journal_name(batch: &str) -> String {
    format!("{batch}.journal")
}

/// Step 4: the journal's operations, each idempotent; then the set-aside
/// directory's final name, the baseline and the sync to disk. Problems are
/// collected (the journal stays and is replayed before the next batch).
fn roll_forward(
    env: &Env,
    local: &mut Local<'_>,
    root: &OwnedFd,
    staging: &OwnedFd,
    j: &Journal,
    caps: Caps,
    after: Option<Scan>,
) -> Applied {
    let mut problems = Vec::new();
    let mut touched: BTreeSet<String> = BTreeSet::new();
    let ready = nofollow::open_dir_beneath(staging, &format!("{}.ready", j.batch)).ok();
    let mut dirs = DirCache::default();
    // The tree after the batch as it really is: each landed file's owner,
    // mode and size as stat(2) reports them (its content was verified).
    let mut after = after.map(|s| {
        let m = Arc::try_unwrap(s.manifest).unwrap_or_else(|m| (*m).clone());
        (m, s.refused)
    });
    for op in &j.ops {
        env.faults.pause();
        match run_op(env, root, ready.as_ref(), op, &mut touched, &mut dirs) {
            Ok(Some((path, st))) => {
                if let Some(e) = after.as_mut().and_then(|(m, _)| m.entries.get_mut(&path)) {
                    e.mode = st.st_mode & 0o7777;
                    e.uid = st.st_uid;
                    e.gid = st.st_gid;
                    e.size = st.st_size as u64;
                    local.scanner.note(path, &st, e.sha);
                }
            }
            Ok(None) => {}
            Err(e) => problems.push(e),
        }
    }
    let after = after.map(|(m, refused)| Scan {
        manifest: Arc::new(m),
        refused,
    });
    if touched.len() <= FSYNC_EACH_UP_TO {
        for d in &touched {
            if let Ok(fd) = nofollow::open_dir_beneath(root, d) {
                let _ = nix::unistd::fsync(&fd);
            }
        }
    } else if let Err(e) = nix::unistd::syncfs(root) {
        problems.push(format!("syncfs: {e}"));
    }
    let mut set_aside = None;
    if let Some(n) = &j.set_aside {
        match local.set_aside.lock() {
            Ok(mut store) => match store.finalize(n) {
                Ok(r) => set_aside = r,
                Err(e) => problems.push(format!("finalizing set-aside directory {n}: {e}")),
            },
            Err(_) => problems.push("set-aside store lock poisoned".into()),
        }
    }
    // A replay has no record of what it placed: it scans.
    let scan = match after {
        Some(s) => s,
        None => match local.scanner.scan(&env.root, caps) {
            Ok(s) => s,
            Err(e) => {
                problems.push(format!("scanning after the batch: {e}"));
                Scan::default()
            }
        },
    };
    if problems.is_empty() {
        let changes: Vec<Change> = j
            .ops
            .iter()
            .flat_map(|op| match op {
                Op::Delete { path } => vec![Change::Remove(path.clone())],
                Op::Move { sha, from, to } => {
                    vec![Change::Remove(from.clone()), Change::Put(to.clone(), *sha)]
                }
                Op::Place { sha, path, .. } => vec![Change::Put(path.clone(), *sha)],
                Op::Attrs { .. } => vec![],
            })
            .collect();
        let r = match local.baseline.as_mut() {
            Some(b) => b.record(&changes),
            None => {
                let (b, written) = Baseline::create(&env.state_dir, &scan.manifest);
                *local.baseline = Some(b);
                written
            }
        };
        crate::baseline::report_write(r, &env.state_dir);
    }
    Applied {
        batch: j.batch.clone(),
        from_node: j.from_node.clone(),
        written: 0,
        renamed: 0,
        deleted: 0,
        attrs: 0,
        reload: j.reload,
        set_aside,
        scan,
        incomplete: problems,
        check_ms: 0,
        land_ms: 0,
    }
}

/// The directory of the previous operation, kept open: operations come
/// in path order, so most of them share it.
#[derive(Default)]
struct DirCache {
    rel: Option<String>,
    fd: Option<OwnedFd>,
}

impl DirCache {
    /// `rel` beneath `root`, created if missing, never through a link.
    fn get(&mut self, root: &OwnedFd, rel: &str) -> io::Result<&OwnedFd> {
        self.fetch(rel, || nofollow::ensure_dir(root, rel, 0o755))
    }

    /// `rel` beneath `base`, which must exist, never through a link.
    fn open(&mut self, base: &OwnedFd, rel: &str) -> io::Result<&OwnedFd> {
        self.fetch(rel, || nofollow::open_dir_beneath(base, rel))
    }

    fn fetch(
        &mut self,
        rel: &str,
        open: impl FnOnce() -> io::Result<OwnedFd>,
    ) -> io::Result<&OwnedFd> {
        if self.rel.as_deref() != Some(rel) || self.fd.is_none() {
            self.fd = None;
            self.rel = None;
            let fd = open()?;
            self.rel = Some(rel.to_owned());
            self.fd = Some(fd);
        }
        self.fd
            .as_ref()
            .ok_or_else(|| io::Error::other("directory cache empty"))
    }
}

/// Runs one operation; returns the stat of the file it left in place.
fn run_op(
    env: &Env,
    root: &OwnedFd,
    ready: Option<&OwnedFd>,
    op: &Op,
    touched: &mut BTreeSet<String>,
    dirs: &mut DirCache,
) -> Result<Option<(Arc<str>, FileStat)>, String> {
    match op {
        Op::Delete { path } => {
            let (parent, name) = nofollow::split(path);
            let dir = match nofollow::open_dir_beneath(root, parent) {
                Ok(d) => d,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(format!("deleting {path}: {e}")),
            };
            match unlinkat(&dir, name, UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => {}
                Err(e) => return Err(format!("deleting {path}: {e}")),
            }
            touched.insert(parent.to_owned());
            Ok(None)
        }
        Op::Move { from, to, .. } => {
            let (fp, fname) = nofollow::split(from);
            let (tp, tname) = nofollow::split(to);
            let fdir = match nofollow::open_dir_beneath(root, fp) {
                Ok(d) => Some(d),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(format!("moving {from} to {to}: {e}")),
            };
            let tdir = dirs
                .get(root, tp)
                .map_err(|e| format!("moving {from} to {to}: {e}"))?;
            let moved = match &fdir {
                Some(d) => renameat(d, fname, tdir, tname),
                None => Err(Errno::ENOENT),
            };
            match moved {
                Ok(()) => {}
                // Already moved (a replay).
                Err(Errno::ENOENT)
                    if nofollow::stat_at(tdir, tname)
                        .ok()
                        .flatten()
                        .is_some_and(|st| nofollow::kind(&st) == Kind::File) => {}
                Err(e) => return Err(format!("moving {from} to {to}: {e}")),
            }
            let st = nofollow::stat_at(tdir, tname).ok().flatten();
            touched.insert(fp.to_owned());
            touched.insert(tp.to_owned());
            Ok(st.map(|st| (to.clone(), st)))
        }
        Op::Place { ready: n, path, .. } => {
            let Some(ready) = ready else {
                // The ready directory is gone: every file was placed.
                return Ok(None);
            };
            let n = n.to_string();
            match nofollow::stat_at(ready, &n).map_err(|e| format!("placing {path}: {e}"))? {
                None => return Ok(None),
                Some(st) if nofollow::kind(&st) != Kind::File => {
                    return Err(format!("placing {path}: the checked file was replaced"));
                }
                Some(_) => {}
            }
            let (parent, name) = nofollow::split(path);
            let dir = dirs
                .get(root, parent)
                .map_err(|e| format!("placing {path}: {e}"))?;
            match renameat(ready, n.as_str(), dir, name) {
                Ok(()) => {}
                // An empty directory where the master has a file.
                Err(Errno::EISDIR) => {
                    unlinkat(dir, name, UnlinkatFlags::RemoveDir)
                        .and_then(|()| renameat(ready, n.as_str(), dir, name))
                        .map_err(|e| format!("placing {path}: {e}"))?;
                }
                Err(e) => return Err(format!("placing {path}: {e}")),
            }
            let st = nofollow::stat_at(dir, name).ok().flatten();
            touched.insert(parent.to_owned());
            Ok(st.map(|st| (path.clone(), st)))
        }
        Op::Attrs {
            mode,
            uid,
            gid,
            path,
        } => {
            let (file, _) = nofollow::open_file_beneath(root, path)
                .map_err(|e| format!("setting owner and mode of {path}: {e}"))?;
            set_owner_and_mode(&file, *uid, *gid, *mode, env.faults.mode_before_owner)
                .map_err(|e| format!("setting owner and mode of {path}: {e}"))?;
            let st = nix::sys::stat::fstat(&file).ok();
            Ok(st.map(|st| (path.clone(), st)))
        }
    }
}

/// Step 5: the journal and the batch's staging are removed (after the
/// daemons reloaded).
pub fn finish(root: &Path, batch: &str) {
    let staging = root.join(STAGING_DIR);
    let _ = fs::remove_file(staging.join(journal_name(batch)));
    if let Ok(f) = fs::File::open(&staging) {
        let _ = f.sync_all();
    }
    remove_batch_staging(root, batch);
}

fn remove_batch_staging(root: &Path, batch: &str) {
    let staging = root.join(STAGING_DIR);
    for d in [
        batch.to_owned(),
        format!("{batch}.ready"),
        format!("{batch}.view"),
        format!("{batch}.probe"),
        format!("{batch}.journal.tmp"),
    ] {
        remove_any(&staging.join(d));
    }
}

fn remove_any(path: &Path) {
    // symlink_metadata and remove_dir_all never follow a link.
    let _ = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(_) => Ok(()),
    };
}

/// Removes whatever staging is not `keep` and not a commit journal.
pub fn clean_staging_except(root: &Path, keep: Option<&str>) -> usize {
    let staging = root.join(STAGING_DIR);
    let Ok(entries) = fs::read_dir(&staging) else {
        return 0;
    };
    let mut n = 0;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".journal") {
            continue;
        }
        let base = name
            .strip_suffix(".ready")
            .or_else(|| name.strip_suffix(".view"))
            .or_else(|| name.strip_suffix(".probe"))
            .or_else(|| name.strip_suffix(".journal.tmp"))
            .unwrap_or(&name);
        if Some(base) == keep {
            continue;
        }
        remove_any(&e.path());
        n += 1;
    }
    n
}

/// A committed batch found at start (or before a batch) and rolled forward.
#[derive(Debug)]
pub struct Recovered {
    pub applied: Applied,
}

/// Rolls forward every committed batch whose journal is still there (its
/// cfg-syncd died after the commit). The caller reloads the daemons for
/// those that changed content, then calls [`finish`].
pub fn recover(env: &Env, local: &mut Local<'_>, caps: Caps) -> Vec<Recovered> {
    let staging_path = env.root.join(STAGING_DIR);
    let Ok(entries) = fs::read_dir(&staging_path) else {
        return vec![];
    };
    let mut journals: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|n| n.ends_with(".journal"))
        .collect();
    journals.sort();
    let mut out = Vec::new();
    let (Ok(root), Ok(staging)) = (
        nofollow::open_root(&env.root),
        nofollow::open_root(&staging_path),
    ) else {
        return out;
    };
    for name in journals {
        let read = nofollow::open_file_beneath(&staging, &name).and_then(|(f, _)| {
            journal::decode(io::BufReader::new(f))
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
        });
        let j = match read {
            Ok(j) => j,
            Err(e) => {
                tracing::error!(journal = %name, "commit journal {STAGING_DIR}/{name} is unreadable ({e}); removed: the batch it describes may be partly applied, and the master's next full sync repairs the tree");
                remove_any(&staging_path.join(&name));
                continue;
            }
        };
        let applied = roll_forward(env, local, &root, &staging, &j, caps, None);
        out.push(Recovered { applied });
    }
    out
}

/// Whether the configuration loader reads `rel` (cluster.toml, farms/*.toml):
/// what validation needs to see of a batch.
fn validated(rel: &str) -> bool {
    rel == CLUSTER_FILE
        || rel
            .strip_prefix(FARMS_DIR)
            .and_then(|r| r.strip_prefix('/'))
            .is_some_and(|n| !n.contains('/'))
}

/// Builds the configuration the batch would produce in a scratch view
/// (this node's node.toml, cluster.toml and farms/ after the batch, hard
/// links) and loads it with tandem-config. Errors name the live path
/// (`farms/web.toml:3:7: ...`).
fn validate(
    root: &Path,
    batch: &Batch,
    ready: &BTreeMap<Arc<str>, PathBuf>,
) -> Result<Config, ApplyError> {
    let name = batch.name.as_str();
    let mut view_files: BTreeMap<String, PathBuf> = BTreeMap::new();
    if fs::symlink_metadata(root.join(CLUSTER_FILE)).is_ok() {
        view_files.insert(CLUSTER_FILE.into(), root.join(CLUSTER_FILE));
    }
    if let Ok(entries) = fs::read_dir(root.join(FARMS_DIR)) {
        for e in entries.flatten() {
            if let Some(n) = e.file_name().to_str() {
                view_files.insert(format!("{FARMS_DIR}/{n}"), e.path());
            }
        }
    }
    for (from, to) in &batch.renames {
        if let Some(src) = view_files.remove(&**from) {
            view_files.insert(to.to_string(), src);
        } else if validated(to) {
            view_files.insert(to.to_string(), root.join(&**from));
        }
    }
    for (path, src) in ready {
        if validated(path) {
            view_files.insert(path.to_string(), src.clone());
        }
    }
    for d in &batch.deletes {
        view_files.remove(&**d);
    }
    view_files.retain(|rel, _| validated(rel));

    let view = root.join(STAGING_DIR).join(format!("{name}.view"));
    remove_any(&view);
    fs::create_dir_all(view.join(FARMS_DIR))
        .map_err(io_err(name, "creating the validation view"))?;
    let result = (|| {
        link_or_copy(&root.join(NODE_FILE), &view.join(NODE_FILE)).map_err(io_err(
            name,
            format!("preparing validation with {NODE_FILE}"),
        ))?;
        for (rel, src) in &view_files {
            link_or_copy(src, &view.join(rel))
                .map_err(io_err(name, format!("preparing validation with {rel}")))?;
        }
        Config::load(&view).map_err(|errors| ApplyError::Invalid {
            batch: name.to_owned(),
            errors: errors.relative_to(&view),
        })
    })();
    remove_any(&view);
    result
}

fn link_or_copy(src: &Path, dst: &Path) -> io::Result<()> {
    match fs::hard_link(src, dst) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(e),
        Err(_) => fs::copy(src, dst).map(|_| ()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};

    const NODE: &str = "name = \"lb2\"\n";
    const FARM: &str = "name = \"web\"\nvip = \"10.0.0.100\"\nport = 80\nprotocol = \"tcp\"\nsnat_address = \"10.1.0.100\"\n\n[[backends]]\naddress = \"10.1.0.11\"\n";

    struct Node {
        _tmp: tempfile::TempDir,
        env: Env,
        scanner: Scanner,
        baseline: Option<Baseline>,
        store: Mutex<set_aside::Store>,
    }

    impl Node {
        fn new() -> Node {
            let tmp = tempfile::tempdir().unwrap();
            let root = tmp.path().join("etc");
            let state = tmp.path().join("state");
            fs::create_dir_all(&root).unwrap();
            let n = Node {
                env: Env {
                    root,
                    state_dir: state.clone(),
                    faults: Faults::default(),
                },
                _tmp: tmp,
                scanner: Scanner::default(),
                baseline: None,
                store: Mutex::new(set_aside::Store::load(&state)),
            };
            n.write("node.toml", NODE);
            n
        }

        fn root(&self) -> &Path {
            &self.env.root
        }

        fn write(&self, rel: &str, text: &str) {
            let p = self.root().join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, text).unwrap();
        }

        fn read(&self, rel: &str) -> Option<String> {
            fs::read_to_string(self.root().join(rel)).ok()
        }

        fn stage(&self, batch: &str, rel: &str, text: &str, mode: u32) -> Write {
            self.write(&format!("{STAGING_DIR}/{batch}/{rel}"), text);
            Write {
                path: Arc::from(rel),
                staged: true,
                sha: Sha::of(text.as_bytes()),
                size: text.len() as u64,
                mode,
                uid: 0,
                gid: 0,
            }
        }

        fn apply(&mut self, b: &Batch) -> Result<Applied, ApplyError> {
            let mut local = Local {
                scanner: &mut self.scanner,
                baseline: &mut self.baseline,
                set_aside: &self.store,
            };
            let r = apply(&self.env, &mut local, b.clone(), Caps::default());
            if r.is_ok() {
                finish(&self.env.root, &b.name);
            }
            r
        }
    }

    fn batch(name: &str, writes: Vec<Write>) -> Batch {
        Batch {
            name: name.into(),
            from_node: "lb1".into(),
            writes,
            ..Default::default()
        }
    }

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_valid_batch_lands_and_staging_is_removed() {
        let mut n = Node::new();
        n.write("farms/old.toml", &FARM.replace("web", "old"));
        let mut b = batch("b1", vec![n.stage("b1", "farms/web.toml", FARM, 0o640)]);
        b.deletes = vec!["farms/old.toml".into()];
        let a = n.apply(&b).unwrap();
        assert!(a.incomplete.is_empty(), "{:?}", a.incomplete);
        assert_eq!((a.written, a.deleted), (1, 1));
        assert!(a.reload);
        assert_eq!(n.read("farms/web.toml").as_deref(), Some(FARM));
        assert_eq!(mode(&n.root().join("farms/web.toml")), 0o640);
        assert!(n.read("farms/old.toml").is_none());
        let left: Vec<_> = fs::read_dir(n.root().join(STAGING_DIR)).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
        assert_eq!(
            a.scan.manifest.hash(),
            Scanner::default()
                .scan(n.root(), Caps::default())
                .unwrap()
                .manifest
                .hash()
        );
    }

    #[test]
    fn set_id_bits_survive_because_the_owner_is_set_first() {
        let mut n = Node::new();
        let b = batch(
            "b1",
            vec![
                n.stage("b1", "checks/sg.sh", "#!/bin/sh\n", 0o2755),
                n.stage("b1", "checks/su.sh", "#!/bin/sh\necho\n", 0o4755),
            ],
        );
        n.apply(&b).unwrap();
        assert_eq!(mode(&n.root().join("checks/sg.sh")), 0o2755);
        assert_eq!(mode(&n.root().join("checks/su.sh")), 0o4755);
        // A mode-only batch: no reload, the bits carried again.
        let mut w = b.writes[0].clone();
        w.staged = false;
        w.mode = 0o2750;
        let a = n.apply(&batch("b2", vec![w])).unwrap();
        assert!(!a.reload, "a mode-only batch reloads nothing");
        assert_eq!(mode(&n.root().join("checks/sg.sh")), 0o2750);

        // Control: mode then owner loses them.
        n.env.faults.mode_before_owner = true;
        let b3 = batch("b3", vec![n.stage("b3", "checks/sg2.sh", "x", 0o2755)]);
        let a = n.apply(&b3).unwrap();
        assert_eq!(mode(&n.root().join("checks/sg2.sh")), 0o0755);
        // The manifest answered to the master is the tree as it is, not as
        // the batch announced it: the difference shows.
        assert_eq!(a.scan.manifest.get("checks/sg2.sh").unwrap().mode, 0o755);
    }

    #[test]
    fn an_invalid_farm_is_refused_with_its_position_and_nothing_moves() {
        let mut n = Node::new();
        n.write("farms/web.toml", FARM);
        let broken = FARM.replace("port = 80", "port = \"eighty\"");
        let b = batch(
            "b2",
            vec![
                n.stage("b2", "farms/web.toml", &broken, 0o644),
                n.stage("b2", "checks/x.sh", "#!/bin/sh\n", 0o755),
            ],
        );
        match n.apply(&b) {
            Err(ApplyError::Invalid { errors, .. }) => {
                assert!(errors[0].starts_with("farms/web.toml:3:"), "{errors:?}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(n.read("farms/web.toml").as_deref(), Some(FARM));
        assert!(n.read("checks/x.sh").is_none());
        assert!(!n.root().join(STAGING_DIR).join("b2").exists());
        assert!(!n.root().join(STAGING_DIR).join("b2.ready").exists());
    }

    #[test]
    fn node_local_paths_and_bad_names_are_refused_whoever_asks() {
        let mut n = Node::new();
        let b = batch(
            "b3",
            vec![n.stage("b3", "node.toml", "name = \"evil\"\n", 0o644)],
        );
        assert!(matches!(n.apply(&b), Err(ApplyError::BadRequest { .. })));
        assert_eq!(n.read("node.toml").as_deref(), Some(NODE));
        assert!(matches!(
            n.apply(&batch("../../x", vec![])),
            Err(ApplyError::BadRequest { .. })
        ));
    }

    #[test]
    fn a_batch_computed_against_another_tree_is_stale_and_lands_nothing() {
        let mut n = Node::new();
        n.write("farms/web.toml", FARM);
        let root = n.root().to_owned();
        let live = n
            .scanner
            .scan(&root, Caps::default())
            .unwrap()
            .manifest
            .hash();
        let mut b = batch("b13", vec![n.stage("b13", "checks/a.sh", "a", 0o755)]);
        b.base = Sha::of(b"another tree").hex();
        assert!(matches!(n.apply(&b), Err(ApplyError::Stale { .. })));
        assert!(n.read("checks/a.sh").is_none());
        assert!(!n.root().join(STAGING_DIR).join("b13").exists());
        // Against the tree as it is: applied.
        let mut b = batch("b14", vec![n.stage("b14", "checks/a.sh", "a", 0o755)]);
        b.base = live;
        n.apply(&b).unwrap();
        assert_eq!(n.read("checks/a.sh").as_deref(), Some("a"));
    }

    #[test]
    fn a_staged_file_that_differs_from_its_hash_is_refused() {
        let mut n = Node::new();
        let mut w = n.stage("b4", "checks/a.sh", "full content", 0o644);
        w.sha = Sha::of(b"something else");
        assert!(matches!(
            n.apply(&batch("b4", vec![w])),
            Err(ApplyError::BadRequest { .. })
        ));
        assert!(n.read("checks/a.sh").is_none());
    }

    #[test]
    fn a_staged_link_is_refused_and_its_target_untouched() {
        let mut n = Node::new();
        let target = n._tmp.path().join("target");
        fs::write(&target, "root:secret\n").unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o600)).unwrap();
        fs::create_dir_all(n.root().join(STAGING_DIR).join("b5/checks")).unwrap();
        symlink(
            &target,
            n.root().join(STAGING_DIR).join("b5/checks/evil.sh"),
        )
        .unwrap();
        let w = Write {
            path: "checks/evil.sh".into(),
            staged: true,
            sha: Sha::of(b"root:secret\n"),
            size: 12,
            mode: 0o777,
            uid: 0,
            gid: 0,
        };
        match n.apply(&batch("b5", vec![w.clone()])) {
            Err(ApplyError::BadRequest { why, .. }) => {
                assert!(why.contains("symbolic link"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(mode(&target), 0o600);
        assert!(fs::symlink_metadata(n.root().join("checks/evil.sh")).is_err());

        // Control: following the link chmods its target.
        n.env.faults.follow_links = true;
        fs::create_dir_all(n.root().join(STAGING_DIR).join("b6/checks")).unwrap();
        symlink(
            &target,
            n.root().join(STAGING_DIR).join("b6/checks/evil.sh"),
        )
        .unwrap();
        let _ = n.apply(&batch("b6", vec![w]));
        assert_eq!(mode(&target), 0o777);
    }

    #[test]
    fn a_live_directory_that_is_a_link_is_never_written_through() {
        let mut n = Node::new();
        let outside = n._tmp.path().join("outside");
        fs::create_dir_all(&outside).unwrap();
        symlink(&outside, n.root().join("checks")).unwrap();
        let b = batch("b7", vec![n.stage("b7", "checks/x.sh", "x", 0o755)]);
        match n.apply(&b) {
            Err(ApplyError::BadRequest { why, .. }) => {
                assert!(why.contains("checks is a symbolic link"), "{why}")
            }
            other => panic!("{other:?}"),
        }
        assert!(fs::read_dir(&outside).unwrap().next().is_none());
    }

    #[test]
    fn renames_move_existing_content_and_check_it() {
        let mut n = Node::new();
        n.write("checks/a.sh", "probe");
        let mut b = batch(
            "b8",
            vec![Write {
                path: "checks/b.sh".into(),
                staged: false,
                sha: Sha::of(b"probe"),
                size: 5,
                mode: 0o750,
                uid: 0,
                gid: 0,
            }],
        );
        b.renames = vec![("checks/a.sh".into(), "checks/b.sh".into())];
        let a = n.apply(&b).unwrap();
        assert!(a.incomplete.is_empty(), "{:?}", a.incomplete);
        assert!(n.read("checks/a.sh").is_none());
        assert_eq!(n.read("checks/b.sh").as_deref(), Some("probe"));
        assert_eq!(mode(&n.root().join("checks/b.sh")), 0o750);
        // A rename of content that is not here is refused.
        let mut b2 = b.clone();
        b2.name = "b9".into();
        assert!(matches!(n.apply(&b2), Err(ApplyError::BadRequest { .. })));
    }

    #[test]
    fn a_committed_batch_is_completed_by_a_replay_after_a_crash() {
        let mut n = Node::new();
        n.write("farms/old.toml", &FARM.replace("web", "old"));
        let mut b = batch(
            "b10",
            vec![
                n.stage("b10", "farms/web.toml", FARM, 0o644),
                n.stage("b10", "checks/a.sh", "a", 0o755),
            ],
        );
        b.deletes = vec!["farms/old.toml".into()];
        // Steps 1-3 only, as if the process died right after the commit.
        let root = nofollow::open_root(n.root()).unwrap();
        let staging = ensure_staging(&root).unwrap();
        let mut pending = None;
        let (j, _) = {
            let mut local = Local {
                scanner: &mut n.scanner,
                baseline: &mut n.baseline,
                set_aside: &n.store,
            };
            let (j, caps, _) = prepare(
                &n.env,
                &mut local,
                &root,
                &staging,
                &b,
                Caps::default(),
                &mut pending,
            )
            .unwrap();
            (j, caps)
        };
        commit(&staging, &j).unwrap();
        // Nothing live changed yet.
        assert!(n.read("farms/web.toml").is_none());
        assert!(n.read("farms/old.toml").is_some());
        let jtext = fs::read_to_string(n.root().join(STAGING_DIR).join("b10.journal")).unwrap();
        assert!(jtext.starts_with(journal::MAGIC), "{jtext}");

        // The next start.
        let mut scanner = Scanner::default();
        let mut baseline = None;
        let store = Mutex::new(set_aside::Store::load(&n.env.state_dir));
        let mut local = Local {
            scanner: &mut scanner,
            baseline: &mut baseline,
            set_aside: &store,
        };
        let rec = recover(&n.env, &mut local, Caps::default());
        assert_eq!(rec.len(), 1);
        assert!(rec[0].applied.reload);
        assert!(
            rec[0].applied.incomplete.is_empty(),
            "{:?}",
            rec[0].applied.incomplete
        );
        finish(n.root(), "b10");
        assert_eq!(n.read("farms/web.toml").as_deref(), Some(FARM));
        assert_eq!(n.read("checks/a.sh").as_deref(), Some("a"));
        assert!(n.read("farms/old.toml").is_none());
        assert!(
            fs::read_dir(n.root().join(STAGING_DIR))
                .unwrap()
                .next()
                .is_none()
        );
        // A second replay finds nothing.
        assert!(recover(&n.env, &mut local, Caps::default()).is_empty());
        // The baseline recorded the batch.
        assert_eq!(
            baseline.unwrap().get("farms/web.toml"),
            Some(Sha::of(FARM.as_bytes()))
        );
    }

    #[test]
    fn local_changes_are_set_aside_before_they_are_replaced_or_removed() {
        let mut n = Node::new();
        n.write("farms/web.toml", FARM);
        n.write("checks/same.sh", "same");
        // Synced once: the baseline is this tree.
        let root = n.root().to_owned();
        let scan = n.scanner.scan(&root, Caps::default()).unwrap();
        n.baseline = Some(Baseline::create(&n.env.state_dir, &scan.manifest).0);
        // Local changes: an edit, a new file, and one untouched file.
        let mine = FARM.replace("port = 80", "port = 81");
        n.write("farms/web.toml", &mine);
        n.write("checks/local.sh", "mine");
        let theirs = FARM.replace("port = 80", "port = 82");
        let mut b = batch(
            "b11",
            vec![
                n.stage("b11", "farms/web.toml", &theirs, 0o644),
                n.stage("b11", "checks/same.sh", "new", 0o644),
            ],
        );
        b.deletes = vec!["checks/local.sh".into()];
        let a = n.apply(&b).unwrap();
        let r = a.set_aside.expect("set aside");
        assert_eq!(r.paths, ["checks/local.sh", "farms/web.toml"]);
        assert_eq!(
            fs::read_to_string(r.directory.join("farms/web.toml")).unwrap(),
            mine
        );
        assert_eq!(
            fs::read_to_string(r.directory.join("checks/local.sh")).unwrap(),
            "mine"
        );
        assert_eq!(mode(&r.directory.join("farms/web.toml")), 0o600);
        assert_eq!(n.read("farms/web.toml").as_deref(), Some(theirs.as_str()));
        assert_eq!(n.store.lock().unwrap().listed().len(), 1);
        // The owner of the kept copy is root, whoever owned the original.
        assert_eq!(
            fs::metadata(r.directory.join("farms/web.toml"))
                .unwrap()
                .uid(),
            0
        );

        // The next batch, with no local change: nothing set aside.
        let b2 = batch("b12", vec![n.stage("b12", "farms/web.toml", FARM, 0o644)]);
        assert!(n.apply(&b2).unwrap().set_aside.is_none());
    }

    #[test]
    fn batches_stream_in_bounded_chunks_and_read_back_whole() {
        let mut b = batch("big", vec![]);
        b.base = "h".into();
        for i in 0..5000 {
            b.writes.push(Write {
                path: Arc::from(format!("checks/f{i}.sh")),
                staged: true,
                sha: Sha::of(i.to_string().as_bytes()),
                size: 1,
                mode: 0o644,
                uid: 0,
                gid: 0,
            });
        }
        b.deletes = (0..10).map(|i| Arc::from(format!("checks/d{i}"))).collect();
        let chunks: Vec<_> = into_chunks(b.clone()).collect();
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks[0].base_manifest_hash, "h");
        assert!(chunks[1].base_manifest_hash.is_empty());
        assert!(chunks.iter().take(2).all(|c| !c.commit));
        assert!(chunks[2].commit);
        let mut r = BatchReader::default();
        for c in chunks.clone() {
            r.push(c).unwrap();
        }
        assert_eq!(r.finish().unwrap(), b);
        // A stream cut before its commit applies nothing.
        let mut r = BatchReader::default();
        r.push(chunks[0].clone()).unwrap();
        assert!(matches!(r.finish(), Err(ApplyError::BadRequest { .. })));
    }
}
