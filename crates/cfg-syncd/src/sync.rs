//! The push engine (master side): on every change of the replicated trees,
//! compare with what the peer acknowledged, stage only what differs over
//! SFTP and ask the peer's cfg-syncd to apply the batch. A lost peer is
//! retried with exponential backoff and caught up in full when it returns.
//! When this node does not push, the engine still rescans on changes so
//! that Status (manifest hash, refused files) stays current without Status
//! ever scanning itself.
//!
//! The decisions are pure ([`Backoff`], [`LinkLog`], [`RefusedLog`],
//! `manifest::diff`, `manifest::expected_after`); [`Engine::run`] is the
//! I/O shell around them.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tandem_proto::v1::{self, SyncDirection};
use tandem_runtime::{ConfigCell, Shutdown};
use tokio::sync::{Notify, mpsc, watch};

use crate::apply::{Batch, Write};
use crate::baseline::Baseline;
use crate::fault::Faults;
use crate::manifest::{Entry, Manifest, Plan, diff, expected_after};
use crate::scan::{Caps, Refusal, Scan, Scanner};
use crate::set_aside;
use crate::transport::{PeerSession, PeerSpec, TransportError, staging_path};
use crate::watcher::Change;

pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Refused files listed in Status (the log names the first ones too).
pub const SHOWN_REFUSALS: usize = 100;
/// A node that does not push rescans at most this often.
const REFRESH_EVERY: Duration = Duration::from_millis(200);

/// Exponential backoff between connection attempts: 100 ms, doubling, at
/// most 5 s; reset by a success.
#[derive(Debug, Clone, Default)]
pub struct Backoff {
    current: Option<Duration>,
}

impl Backoff {
    /// The delay before the next attempt, after a failure.
    pub fn failure(&mut self) -> Duration {
        let next = match self.current {
            None => BACKOFF_MIN,
            Some(d) => (d * 2).min(BACKOFF_MAX),
        };
        self.current = Some(next);
        next
    }

    pub fn success(&mut self) {
        self.current = None;
    }
}

/// The link as an operator sees it. One log line per change of this, never
/// one per retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    Up,
    /// Unreachable or failing, with the error's text.
    Down(String),
    /// The peer's host key does not match the pin: retrying will not help.
    HostKeyRefused(String),
}

#[derive(Debug, Default)]
pub struct LinkLog {
    last: Option<Link>,
}

impl LinkLog {
    /// Whether `now` is news (its kind differs from the last one logged).
    pub fn changed(&mut self, now: Link) -> bool {
        let same = matches!(
            (&self.last, &now),
            (Some(Link::Up), Link::Up)
                | (Some(Link::Down(_)), Link::Down(_))
                | (Some(Link::HostKeyRefused(_)), Link::HostKeyRefused(_))
        );
        self.last = Some(now);
        !same
    }
}

/// The refused files as last logged: a new line only when the set of
/// (file, reason) changes, not when a refused file's size does.
#[derive(Debug, Default)]
pub struct RefusedLog {
    last: Vec<(Arc<str>, std::mem::Discriminant<crate::scan::Why>)>,
}

impl RefusedLog {
    /// The lines to log for `now`, if it differs from the last set.
    pub fn changed(&mut self, now: &[Refusal]) -> Option<Vec<String>> {
        let key: Vec<_> = now
            .iter()
            .map(|r| (r.path.clone(), std::mem::discriminant(&r.why)))
            .collect();
        if key == self.last {
            return None;
        }
        self.last = key;
        Some(now.iter().map(ToString::to_string).collect())
    }
}

/// The Status lines for a list of refusals: at most [`SHOWN_REFUSALS`] and
/// a count of the rest.
pub fn refused_lines(refused: &[Refusal]) -> Vec<String> {
    let mut out: Vec<String> = refused
        .iter()
        .take(SHOWN_REFUSALS)
        .map(ToString::to_string)
        .collect();
    if refused.len() > SHOWN_REFUSALS {
        out.push(format!(
            "... and {} more files not replicated (see the log)",
            refused.len() - SHOWN_REFUSALS
        ));
    }
    out
}

/// The batch for `plan`, given what was actually staged (`sent`). A renamed
/// file also gets its mode and owner, which may differ.
pub fn build_batch(
    name: &str,
    from_node: &str,
    base: &str,
    plan: &Plan,
    sent: Vec<Entry>,
) -> Batch {
    let write = |e: &Entry, staged: bool| Write {
        path: e.path.clone(),
        staged,
        sha: e.sha,
        size: e.size,
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
    };
    let mut writes: Vec<Write> = sent.iter().map(|e| write(e, true)).collect();
    drop(sent);
    writes.extend(plan.attrs.iter().map(|e| write(e, false)));
    writes.extend(plan.renames.iter().map(|(_, e)| write(e, false)));
    Batch {
        name: name.to_owned(),
        from_node: from_node.to_owned(),
        base: base.to_owned(),
        writes,
        renames: plan
            .renames
            .iter()
            .map(|(from, to)| (from.clone(), to.path.clone()))
            .collect(),
        deletes: plan.deletes.clone(),
    }
}

/// The state both the engine and the gRPC face see.
pub struct Shared {
    pub config: Arc<ConfigCell>,
    pub config_dir: PathBuf,
    pub state_dir: PathBuf,
    pub runtime_dir: PathBuf,
    pub peer_config_dir: PathBuf,
    pub peer_runtime_dir: PathBuf,
    /// Set by SetDirection or `--direction`; wins over vrrpd's role.
    pub explicit: Mutex<Option<SyncDirection>>,
    /// Derived from the local vrrpd's state, when it runs.
    pub from_vrrpd: Mutex<Option<SyncDirection>>,
    pub direction: watch::Sender<SyncDirection>,
    pub paused: watch::Sender<bool>,
    pub sync_now: Notify,
    pub status: Mutex<Counters>,
    /// One Apply at a time on the receiving side.
    pub apply_lock: Arc<tokio::sync::Mutex<()>>,
    /// One scan at a time, on a blocking thread; never held by Status.
    pub scanner: Arc<tokio::sync::Mutex<Scanner>>,
    /// What this node last synced with its peer (`baseline.rs`).
    pub baseline: Arc<Mutex<Option<Baseline>>>,
    pub set_aside: Arc<Mutex<set_aside::Store>>,
    pub faults: Faults,
    refused_log: Mutex<RefusedLog>,
}

#[derive(Debug, Default, Clone)]
pub struct Counters {
    pub peer_connected: bool,
    pub last_sync: Option<SystemTime>,
    pub pending: usize,
    pub last_error: String,
    pub batches_applied: u64,
    pub files_transferred: u64,
    /// Failed rounds and refused batches (for the metrics).
    pub errors: u64,
    /// Of the last scan of this node's tree.
    pub manifest_hash: String,
    pub refused: Vec<String>,
    pub refused_total: usize,
    pub batch_in_flight: bool,
    pub last_batch: String,
}

pub struct SharedInit {
    pub config: Arc<ConfigCell>,
    pub config_dir: PathBuf,
    pub state_dir: PathBuf,
    pub runtime_dir: PathBuf,
    pub peer_config_dir: PathBuf,
    pub peer_runtime_dir: PathBuf,
    pub explicit: Option<SyncDirection>,
    pub scanner: Scanner,
    pub baseline: Option<Baseline>,
    pub set_aside: set_aside::Store,
    pub faults: Faults,
}

impl Shared {
    pub fn new(i: SharedInit) -> Shared {
        Shared {
            config: i.config,
            config_dir: i.config_dir,
            state_dir: i.state_dir,
            runtime_dir: i.runtime_dir,
            peer_config_dir: i.peer_config_dir,
            peer_runtime_dir: i.peer_runtime_dir,
            explicit: Mutex::new(i.explicit),
            from_vrrpd: Mutex::new(None),
            direction: watch::channel(SyncDirection::None).0,
            paused: watch::channel(false).0,
            sync_now: Notify::new(),
            status: Mutex::default(),
            apply_lock: Arc::default(),
            scanner: Arc::new(tokio::sync::Mutex::new(i.scanner)),
            baseline: Arc::new(Mutex::new(i.baseline)),
            set_aside: Arc::new(Mutex::new(i.set_aside)),
            faults: i.faults,
            refused_log: Mutex::default(),
        }
    }

    /// Recomputes the direction in force; logs and publishes a change.
    pub fn update_direction(&self) {
        let explicit = self.explicit.lock().ok().and_then(|d| *d);
        let vrrp = self.from_vrrpd.lock().ok().and_then(|d| *d);
        let now = explicit.or(vrrp).unwrap_or(SyncDirection::None);
        let before = *self.direction.borrow();
        if before != now {
            let source = if explicit.is_some() {
                "set explicitly"
            } else if vrrp.is_some() {
                "following the local vrrpd"
            } else {
                "no vrrpd and no direction set"
            };
            tracing::info!(
                from = before.as_str_name(),
                to = now.as_str_name(),
                "sync direction changed from {} to {} ({source})",
                before.as_str_name(),
                now.as_str_name()
            );
            self.direction.send_replace(now);
        }
    }

    pub fn counters(&self) -> Counters {
        self.status.lock().map(|c| c.clone()).unwrap_or_default()
    }

    pub fn with_counters(&self, f: impl FnOnce(&mut Counters)) {
        if let Ok(mut c) = self.status.lock() {
            f(&mut c);
        }
    }

    pub fn caps(&self) -> Caps {
        Caps::of(&self.config.current().config)
    }

    /// Scans this node's tree on a blocking thread (one scan at a time) and
    /// publishes the result.
    pub async fn scan(&self) -> std::io::Result<Scan> {
        let mut scanner = self.scanner.clone().lock_owned().await;
        let root = self.config_dir.clone();
        let caps = self.caps();
        let scan = tokio::task::spawn_blocking(move || scanner.scan(&root, caps))
            .await
            .map_err(|e| std::io::Error::other(format!("scan task: {e}")))??;
        self.publish_scan(&scan);
        Ok(scan)
    }

    /// Status shows the scan; the log names refused files once per change.
    pub fn publish_scan(&self, scan: &Scan) {
        let hash = scan.manifest.hash();
        let lines = refused_lines(&scan.refused);
        let total = scan.refused.len();
        self.with_counters(|c| {
            c.manifest_hash = hash;
            c.refused = lines;
            c.refused_total = total;
        });
        let news = self
            .refused_log
            .lock()
            .ok()
            .and_then(|mut l| l.changed(&scan.refused));
        if let Some(texts) = news {
            if texts.is_empty() {
                tracing::info!("every replicated file is replicated again (none refused)");
            } else {
                let shown: Vec<&str> = texts.iter().take(10).map(String::as_str).collect();
                let more = texts.len().saturating_sub(shown.len());
                let files: Vec<&str> = scan.refused.iter().take(10).map(|r| &*r.path).collect();
                tracing::warn!(
                    refused = texts.len(),
                    files = ?files,
                    "not replicating {} files: {}{}",
                    texts.len(),
                    shown.join("; "),
                    if more > 0 { format!("; and {more} more") } else { String::new() }
                );
            }
        }
    }

    /// The peer named by the configuration in force: the other node of
    /// cluster.toml's [[nodes]]. None on a standalone node.
    pub fn peer(&self) -> Option<PeerSpec> {
        let loaded = self.config.current();
        let cluster = loaded.config.cluster.as_ref()?;
        let node = cluster
            .nodes
            .iter()
            .find(|n| n.name != loaded.config.node.name)?;
        Some(PeerSpec {
            name: node.name.clone(),
            addr: std::net::SocketAddr::new(node.address, cluster.sync.ssh_port),
            user: "root".into(),
            identity: self.config_dir.join("ssh/id_ed25519"),
            known_hosts: self.config_dir.join("ssh/known_hosts"),
            peer_config_dir: self.peer_config_dir.clone(),
            peer_runtime_dir: self.peer_runtime_dir.clone(),
        })
    }

    /// Records that the peer now holds `m` (pushing side): the baseline a
    /// later set-aside compares with.
    async fn record_synced(&self, m: Arc<Manifest>) {
        let baseline = self.baseline.clone();
        let state = self.state_dir.clone();
        let r = tokio::task::spawn_blocking(move || {
            let mut b = baseline
                .lock()
                .map_err(|_| std::io::Error::other("baseline lock poisoned"))?;
            Ok::<_, std::io::Error>(match b.as_mut() {
                Some(b) => b.sync_to(&m).map(|_| ()),
                None => {
                    let (n, written) = Baseline::create(&state, &m);
                    *b = Some(n);
                    written
                }
            })
        })
        .await;
        match r {
            Ok(Ok(written)) => crate::baseline::report_write(written, &self.state_dir),
            Ok(Err(e)) => tracing::warn!(error = %e, "recording the synced tree: {e}"),
            Err(e) => tracing::warn!(error = %e, "baseline task failed: {e}"),
        }
    }
}

/// The push loop (and the rescans of a node that does not push).
pub struct Engine {
    shared: Arc<Shared>,
    changes: mpsc::UnboundedReceiver<Change>,
    session: Option<PeerSession>,
    /// What the peer holds, as acknowledged; None: ask it.
    remote: Option<Manifest>,
    /// The manifest the baseline was last synced to (its hash).
    recorded: String,
    dirty: bool,
    pending: BTreeSet<String>,
    backoff: Backoff,
    retry_at: Option<Instant>,
    refresh_after: Instant,
    link: LinkLog,
    last_refusal: String,
    batch_seq: u64,
}

enum RoundError {
    Transport(TransportError),
    Local(String),
}

impl Engine {
    pub fn new(shared: Arc<Shared>, changes: mpsc::UnboundedReceiver<Change>) -> Engine {
        Engine {
            shared,
            changes,
            session: None,
            remote: None,
            recorded: String::new(),
            dirty: true,
            pending: BTreeSet::new(),
            backoff: Backoff::default(),
            retry_at: None,
            refresh_after: Instant::now(),
            link: LinkLog::default(),
            last_refusal: String::new(),
            batch_seq: 0,
        }
    }

    pub async fn run(mut self, mut watcher: crate::watcher::Watcher, mut shutdown: Shutdown) {
        let mut direction = self.shared.direction.subscribe();
        let mut paused = self.shared.paused.subscribe();
        let shared = self.shared.clone();
        loop {
            let pushing = *direction.borrow() == SyncDirection::Push && !*paused.borrow();
            if !pushing && self.session.is_some() {
                // Not the master any more (or paused long): let the link go.
                if let Some(s) = self.session.take() {
                    s.close().await;
                }
                self.set_link(Link::Down("not pushing".into()), false);
            }
            let due = self.retry_at.is_none_or(|t| Instant::now() >= t);
            if pushing && self.dirty && due {
                self.round().await;
                continue;
            }
            let refresh = !pushing && self.dirty;
            if refresh && Instant::now() >= self.refresh_after {
                self.dirty = false;
                self.refresh_after = Instant::now() + REFRESH_EVERY;
                if let Err(e) = self.shared.scan().await {
                    tracing::warn!(error = %e, "scanning {}: {e}", self.shared.config_dir.display());
                }
                continue;
            }
            let wake = match (pushing, refresh) {
                (true, _) => self.retry_at,
                (false, true) => Some(self.refresh_after),
                (false, false) => None,
            };
            tokio::select! {
                c = self.changes.recv() => match c {
                    Some(Change::Paths(p)) => {
                        // A replicated tree created after start gets its own watch
                        // (the configuration directory itself is not watched recursively).
                        for tree in p.iter().filter(|p| !p.contains('/')) {
                            if crate::watcher::watched_trees().any(|t| t == tree) {
                                watcher.add_tree(tree);
                            }
                        }
                        self.dirty = true;
                        if pushing || self.pending.len() < 1_000_000 {
                            self.pending.extend(p);
                        }
                        if pushing {
                            self.publish_pending();
                        }
                    }
                    Some(Change::Rescan(why)) => {
                        tracing::warn!("file watch: {why}; rescanning the whole tree");
                        self.dirty = true;
                    }
                    None => break,
                },
                () = shared.sync_now.notified() => {
                    // A full sync: ask the peer what it has, whatever we believe.
                    self.dirty = true;
                    self.remote = None;
                    self.retry_at = None;
                }
                r = direction.changed() => {
                    if r.is_err() { break; }
                    self.dirty = true;
                    self.remote = None;
                    self.pending.clear();
                    self.publish_pending();
                }
                r = paused.changed() => {
                    if r.is_err() { break; }
                    self.dirty = true;
                }
                () = async {
                    match wake {
                        Some(t) => tokio::time::sleep_until(t.into()).await,
                        None => std::future::pending().await,
                    }
                } => {}
                () = shutdown.wait() => break,
            }
        }
        if let Some(s) = self.session.take() {
            s.close().await;
        }
    }

    fn publish_pending(&self) {
        let n = self.pending.len();
        self.shared.with_counters(|c| c.pending = n);
    }

    fn set_link(&mut self, now: Link, log: bool) {
        let connected = now == Link::Up;
        self.shared.with_counters(|c| c.peer_connected = connected);
        let peer = self
            .shared
            .peer()
            .map(|p| p.to_string())
            .unwrap_or_default();
        if self.link.changed(now.clone()) && log {
            match now {
                Link::Up => tracing::info!(peer = %peer, "connected to the peer {peer}"),
                Link::Down(why) => {
                    tracing::warn!(peer = %peer, "peer {peer} lost, retrying with backoff up to {} s: {why}", BACKOFF_MAX.as_secs())
                }
                Link::HostKeyRefused(why) => tracing::error!(peer = %peer, "{why}"),
            }
        }
    }

    /// One attempt to make the peer equal to this node.
    async fn round(&mut self) {
        let Some(peer) = self.shared.peer() else {
            // Standalone: nothing to push to until cluster.toml names a peer;
            // Status still shows this node's tree.
            self.dirty = false;
            if let Err(e) = self.shared.scan().await {
                tracing::warn!(error = %e, "scanning {}: {e}", self.shared.config_dir.display());
            }
            return;
        };
        self.dirty = false;
        let r = self.push(&peer).await;
        self.shared.with_counters(|c| c.batch_in_flight = false);
        match r {
            Ok(()) => {
                self.backoff.success();
                self.retry_at = None;
            }
            Err(RoundError::Local(why)) => {
                tracing::error!(peer = %peer, "{why}");
                self.shared.with_counters(|c| {
                    c.last_error = why;
                    c.errors += 1;
                });
                self.dirty = true;
                self.retry_at = Some(Instant::now() + self.backoff.failure());
            }
            Err(RoundError::Transport(e)) => {
                let text = e.to_string();
                let link = if e.is_host_key() {
                    Link::HostKeyRefused(text.clone())
                } else {
                    Link::Down(text.clone())
                };
                self.set_link(link, true);
                self.shared.with_counters(|c| {
                    c.last_error = text;
                    c.errors += 1;
                });
                if let Some(s) = self.session.take() {
                    s.close().await;
                }
                self.remote = None;
                self.dirty = true;
                self.retry_at = Some(Instant::now() + self.backoff.failure());
            }
        }
    }

    async fn push(&mut self, peer: &PeerSpec) -> Result<(), RoundError> {
        if self
            .session
            .as_ref()
            .is_some_and(|s| s.is_closed() || s.peer.addr != peer.addr)
        {
            self.session = None;
        }
        if self.session.is_none() {
            let s = PeerSession::connect(peer)
                .await
                .map_err(RoundError::Transport)?;
            self.session = Some(s);
            self.remote = None;
            self.set_link(Link::Up, true);
        }
        let Some(session) = self.session.as_ref() else {
            return Ok(());
        };
        // Whatever changes from here on is caught by the next round.
        let covered = std::mem::take(&mut self.pending);
        let local = match self.shared.scan().await {
            Ok(s) => s,
            Err(e) => {
                self.pending.extend(covered);
                return Err(RoundError::Local(format!(
                    "scanning {}: {e}",
                    self.shared.config_dir.display()
                )));
            }
        };
        let remote = match self.remote.take() {
            Some(r) => r,
            None => session.manifest().await.map_err(RoundError::Transport)?,
        };
        let plan = diff(&local.manifest, &remote, &local.frozen());
        if plan.is_empty() {
            self.remote = Some(remote);
            let hash = local.manifest.hash();
            if hash != self.recorded {
                self.shared.record_synced(local.manifest.clone()).await;
                self.recorded = hash;
            }
            self.finish_sync(0, None);
            return Ok(());
        }
        // The plan holds what is needed of this node's manifest from here.
        drop(local);
        let planned = plan.len();
        self.shared.with_counters(|c| {
            c.pending = c.pending.max(plan.len());
            c.batch_in_flight = true;
        });
        self.batch_seq += 1;
        let node = self.shared.config.current().config.node.name.clone();
        let name = format!(
            "{node}-{}-{}",
            tandem_runtime::unix_ms(SystemTime::now()),
            self.batch_seq
        );
        let staging = staging_path(&peer.peer_config_dir, &name);
        let started = Instant::now();
        let root = match crate::nofollow::open_root(&self.shared.config_dir) {
            Ok(fd) => Arc::new(fd),
            Err(e) => {
                return Err(RoundError::Local(format!(
                    "opening {}: {e}",
                    self.shared.config_dir.display()
                )));
            }
        };
        let mut plan = plan;
        let sent = session
            .stage(
                root,
                &staging,
                &plan.uploads,
                self.shared.caps().max_file_bytes,
            )
            .await
            .map_err(RoundError::Transport)?;
        // What was sent replaces the plan's uploads; the peer's manifest
        // becomes the one expected after the batch (no copy of either: at
        // 100,000 files each is megabytes).
        plan.uploads = Vec::new();
        let base = remote.hash();
        let expected = expected_after(remote, &plan, &sent);
        let sent_files = sent.len();
        let bytes: u64 = sent.iter().map(|e| e.size).sum();
        let batch = build_batch(&name, &node, &base, &plan, sent);
        let reply = session.apply(batch).await.map_err(RoundError::Transport)?;
        if reply.stale {
            // The peer's tree changed since we read it: read it again and
            // plan again, now.
            tracing::info!(peer = %peer, batch = %name, "peer {peer}'s tree changed since its manifest was read; batch {name} dropped, planning again");
            self.dirty = true;
            self.pending.extend(covered);
            return Ok(());
        }
        if !reply.applied {
            let why = format!(
                "peer {peer} refused batch {name}, nothing applied: {}",
                reply.errors.join("; ")
            );
            if why.split_once(": ").map(|x| x.1) != self.last_refusal.split_once(": ").map(|x| x.1)
            {
                tracing::error!(peer = %peer, batch = %name, "{why}");
            }
            self.last_refusal = why.clone();
            self.shared.with_counters(|c| {
                c.last_error = why;
                c.errors += 1;
                c.pending = planned;
            });
            // The peer still holds what it held (read it again next time);
            // wait for the next change.
            self.remote = None;
            return Ok(());
        }
        self.last_refusal.clear();
        let expected_hash = expected.hash();
        if expected_hash != reply.manifest_hash {
            // Someone else touched the peer's tree, or a file changed under
            // us: ask the peer again next round.
            tracing::debug!(peer = %peer, "peer manifest differs from the expected one; refetching");
            self.dirty = true;
        } else {
            let m = Arc::new(expected);
            self.shared.record_synced(m.clone()).await;
            self.recorded = expected_hash;
            self.remote = Arc::try_unwrap(m).ok();
            if self.remote.is_none() {
                self.dirty = true;
            }
        }
        let ms = started.elapsed().as_millis() as u64;
        tracing::info!(
            peer = %peer,
            batch = %name,
            sent = sent_files,
            bytes,
            renamed = plan.renames.len(),
            deleted = plan.deletes.len(),
            mode_only = plan.attrs.len(),
            ms,
            "peer {peer} applied batch {name}: {} files sent ({bytes} bytes), {} renamed, {} deleted, {} mode/owner only, in {ms} ms",
            sent_files,
            plan.renames.len(),
            plan.deletes.len(),
            plan.attrs.len(),
        );
        if !reply.reloaded.is_empty() {
            tracing::debug!(peer = %peer, daemons = ?reply.reloaded, "peer daemons reloaded");
        }
        if !reply.set_aside_directory.is_empty() {
            tracing::warn!(
                peer = %peer,
                directory = %reply.set_aside_directory,
                "peer {peer} kept its local changes that batch {name} replaced in {} (listed in its status until acknowledged there with `tandemctl cluster ack`)",
                reply.set_aside_directory
            );
        }
        self.finish_sync(sent_files as u64, Some(name));
        Ok(())
    }

    fn finish_sync(&mut self, files: u64, batch: Option<String>) {
        let pending = self.pending.len();
        self.shared.with_counters(|c| {
            c.last_sync = Some(SystemTime::now());
            c.last_error.clear();
            c.pending = pending;
            c.files_transferred += files;
            if let Some(b) = batch {
                c.batches_applied += 1;
                c.last_batch = b;
            }
        });
    }
}

/// Follows the local vrrpd's role (MASTER: push, anything else: receive)
/// while it runs, and notices when it appears later.
pub async fn follow_vrrpd(shared: Arc<Shared>, mut shutdown: Shutdown) {
    use futures::StreamExt;
    use tandem_proto::v1::vrrpd_client::VrrpdClient;
    let set = |d: Option<SyncDirection>| {
        if let Ok(mut v) = shared.from_vrrpd.lock() {
            *v = d;
        }
        shared.update_direction();
    };
    loop {
        if let Ok(ch) = tandem_runtime::connect(&shared.runtime_dir, "vrrpd").await
            && let Ok(stream) = VrrpdClient::new(ch)
                .watch_state(v1::WatchStateRequest {})
                .await
        {
            let mut stream = stream.into_inner();
            loop {
                tokio::select! {
                    item = stream.next() => match item {
                        Some(Ok(change)) => {
                            let d = if change.new_state() == v1::VrrpState::Master {
                                SyncDirection::Push
                            } else {
                                SyncDirection::Receive
                            };
                            set(Some(d));
                        }
                        _ => break,
                    },
                    () = shutdown.wait() => return,
                }
            }
            set(None);
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = shutdown.wait() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::tests::{entry as e, manifest as m};
    use crate::scan::Why;

    #[test]
    fn backoff_doubles_to_a_cap_and_resets() {
        let mut b = Backoff::default();
        let delays: Vec<_> = (0..10).map(|_| b.failure().as_millis()).collect();
        assert_eq!(
            delays,
            [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000, 5000]
        );
        b.success();
        assert_eq!(b.failure(), BACKOFF_MIN);
    }

    #[test]
    fn link_changes_are_logged_once_not_per_retry() {
        let mut l = LinkLog::default();
        assert!(l.changed(Link::Down("refused".into())));
        assert!(!l.changed(Link::Down("refused again".into())));
        assert!(l.changed(Link::Up));
        assert!(!l.changed(Link::Up));
        assert!(l.changed(Link::HostKeyRefused("mismatch".into())));
        assert!(!l.changed(Link::HostKeyRefused("mismatch".into())));
    }

    #[test]
    fn refused_files_are_logged_once_per_change_and_listed_bounded() {
        let r = |p: &str| Refusal {
            path: Arc::from(p),
            why: Why::Link,
        };
        let mut l = RefusedLog::default();
        assert_eq!(l.changed(&[]), None, "nothing refused at start: no line");
        assert!(l.changed(&[r("checks/a")]).is_some());
        assert_eq!(l.changed(&[r("checks/a")]), None);
        let big = |size| Refusal {
            path: Arc::from("checks/a"),
            why: Why::TooBig { size, cap: 10 },
        };
        assert!(l.changed(&[big(20)]).is_some());
        assert_eq!(
            l.changed(&[big(30)]),
            None,
            "a growing file: still one line"
        );
        assert_eq!(l.changed(&[]), Some(vec![]));
        let many: Vec<Refusal> = (0..150).map(|i| r(&format!("certs/{i}"))).collect();
        let lines = refused_lines(&many);
        assert_eq!(lines.len(), SHOWN_REFUSALS + 1);
        assert_eq!(
            lines[SHOWN_REFUSALS],
            "... and 50 more files not replicated (see the log)"
        );
    }

    #[test]
    fn a_batch_carries_renames_with_their_mode() {
        let remote = m(&[
            e("farms/a.toml", "a", 0o644),
            e("farms/old.toml", "o", 0o644),
            e("farms/x.toml", "x", 0o644),
        ]);
        let local = m(&[
            e("farms/a.toml", "a2", 0o644),
            e("farms/new.toml", "o", 0o600),
            e("checks/c.sh", "c", 0o755),
        ]);
        let plan = diff(&local, &remote, &Default::default());
        let sent = plan.uploads.clone();
        let b = build_batch("b", "lb1", "", &plan, sent.clone());
        assert_eq!(b.renames.len(), 1);
        assert_eq!(b.deletes, [Arc::from("farms/x.toml")]);
        assert_eq!(b.writes.iter().filter(|w| w.staged).count(), 2);
        // The renamed file carries its (new) mode.
        assert!(
            b.writes
                .iter()
                .any(|w| !w.staged && &*w.path == "farms/new.toml" && w.mode == 0o600)
        );
        assert_eq!(expected_after(remote, &plan, &sent), local);
    }
}
