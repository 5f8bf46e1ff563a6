//! The push engine (master side): on every change of the replicated trees,
//! compare with what the peer acknowledged, stage only what differs over
//! SFTP and ask the peer's cfg-syncd to apply the batch. A lost peer is
//! retried with exponential backoff and caught up in full when it returns.
//!
//! The decisions are pure ([`Backoff`], [`LinkLog`], [`build_request`],
//! [`expected_after`]); [`Engine::run`] is the I/O shell around them.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use tandem_proto::v1::{self, SyncDirection};
use tandem_runtime::{ConfigCell, Shutdown};
use tokio::sync::{Notify, mpsc, watch};

use crate::manifest::{Entry, Manifest, Plan, STAGING_DIR, Scanner, diff};
use crate::transport::{PeerSession, PeerSpec, TransportError};
use crate::watcher::Change;

pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

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

/// The Apply request for `plan`, given what was actually staged (`sent`).
/// A renamed file also gets its mode and owner, which may differ.
pub fn build_request(
    batch: &str,
    from_node: &str,
    plan: &Plan,
    sent: &[Entry],
) -> v1::ApplyRequest {
    let write = |e: &Entry, staged: bool| v1::FileWrite {
        path: e.path.clone(),
        staged,
        sha256: e.sha256.clone(),
        size: e.size,
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
    };
    let mut writes: Vec<v1::FileWrite> = sent.iter().map(|e| write(e, true)).collect();
    writes.extend(plan.attrs.iter().map(|e| write(e, false)));
    writes.extend(plan.renames.iter().map(|(_, e)| write(e, false)));
    v1::ApplyRequest {
        batch: batch.to_owned(),
        writes,
        renames: plan
            .renames
            .iter()
            .map(|(from, to)| v1::FileRename {
                from: from.clone(),
                to: to.path.clone(),
            })
            .collect(),
        deletes: plan.deletes.clone(),
        from_node: from_node.to_owned(),
    }
}

/// The peer's manifest once it applied `plan` from `before`, with the
/// entries as sent (a file that vanished before it could be read was not
/// sent, so it is not there).
pub fn expected_after(before: &Manifest, plan: &Plan, sent: &[Entry]) -> Manifest {
    let mut m = before.clone();
    for (from, to) in &plan.renames {
        m.entries.remove(from);
        m.entries.insert(to.path.clone(), to.clone());
    }
    for e in plan.attrs.iter().chain(sent) {
        m.entries.insert(e.path.clone(), e.clone());
    }
    for d in &plan.deletes {
        m.entries.remove(d);
    }
    m
}

/// The state both the engine and the gRPC face see.
pub struct Shared {
    pub config: Arc<ConfigCell>,
    pub config_dir: PathBuf,
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
    pub apply_lock: tokio::sync::Mutex<()>,
    pub scanner: Mutex<Scanner>,
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
}

impl Shared {
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
                "sync direction changed ({source})"
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

    /// This node's manifest now (hashes only what changed since last time).
    pub fn local_manifest(&self) -> std::io::Result<Manifest> {
        let mut scanner = self
            .scanner
            .lock()
            .map_err(|_| std::io::Error::other("scanner lock poisoned"))?;
        scanner.scan(&self.config_dir)
    }

    /// The peers named by the configuration in force: the other node of a
    /// pair, every other node of an active-active cluster (the leader pushes
    /// to all of them). Empty on a standalone node.
    pub fn peers(&self) -> Vec<PeerSpec> {
        let loaded = self.config.current();
        let Some(cluster) = loaded.config.cluster.as_ref() else {
            return Vec::new();
        };
        cluster
            .nodes
            .iter()
            .filter(|n| n.name != loaded.config.node.name)
            .map(|node| PeerSpec {
                name: node.name.clone(),
                addr: std::net::SocketAddr::new(node.address, cluster.sync.ssh_port),
                user: "root".into(),
                identity: self.config_dir.join("ssh/id_ed25519"),
                known_hosts: self.config_dir.join("ssh/known_hosts"),
                peer_config_dir: self.peer_config_dir.clone(),
                peer_runtime_dir: self.peer_runtime_dir.clone(),
            })
            .collect()
    }
}

/// One peer's link: its session, what it acknowledged, its retries.
#[derive(Default)]
struct PeerLink {
    session: Option<PeerSession>,
    /// What the peer holds, as acknowledged; None: ask it.
    remote: Option<Manifest>,
    /// This peer still has to be made equal to this node.
    dirty: bool,
    backoff: Backoff,
    retry_at: Option<Instant>,
    link: LinkLog,
    last_refusal: String,
    connected: bool,
    /// Why its last round failed (empty: it did not).
    error: String,
}

impl PeerLink {
    fn due(&self, now: Instant) -> bool {
        self.dirty && self.retry_at.is_none_or(|t| now >= t)
    }

    /// Everything must be compared again (a full sync, a new direction).
    fn forget(&mut self) {
        self.dirty = true;
        self.remote = None;
    }

    fn set_link(&mut self, peer: &PeerSpec, now: Link, log: bool) {
        self.connected = now == Link::Up;
        if self.link.changed(now.clone()) && log {
            match now {
                Link::Up => tracing::info!(peer = %peer, "connected to the peer"),
                Link::Down(why) => {
                    tracing::warn!(peer = %peer, "peer lost, retrying with backoff up to {} s: {why}", BACKOFF_MAX.as_secs())
                }
                Link::HostKeyRefused(why) => tracing::error!(peer = %peer, "{why}"),
            }
        }
    }
}

/// The push loop: one link per peer (the pair's one peer, or every other
/// node of an active-active cluster), each made equal to this node on its
/// own schedule, so one unreachable peer never holds the others back.
pub struct Engine {
    shared: Arc<Shared>,
    changes: mpsc::UnboundedReceiver<Change>,
    links: std::collections::BTreeMap<String, PeerLink>,
    /// Changed paths not yet in a round that reached every peer.
    pending: BTreeSet<String>,
    /// A change arrived while no peer was configured.
    dirty: bool,
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
            links: std::collections::BTreeMap::new(),
            pending: BTreeSet::new(),
            dirty: true,
            batch_seq: 0,
        }
    }

    fn mark_all(&mut self, forget: bool) {
        self.dirty = true;
        for l in self.links.values_mut() {
            if forget {
                l.forget();
            } else {
                l.dirty = true;
            }
        }
    }

    pub async fn run(mut self, mut watcher: crate::watcher::Watcher, mut shutdown: Shutdown) {
        let mut direction = self.shared.direction.subscribe();
        let mut paused = self.shared.paused.subscribe();
        let shared = self.shared.clone();
        loop {
            let pushing = *direction.borrow() == SyncDirection::Push && !*paused.borrow();
            if !pushing {
                // Not the pusher any more (or paused long): let the links go.
                let peers = self.shared.peers();
                for (name, l) in &mut self.links {
                    if let Some(s) = l.session.take() {
                        s.close().await;
                        if let Some(p) = peers.iter().find(|p| p.name == *name) {
                            l.set_link(p, Link::Down("not pushing".into()), false);
                        }
                        l.connected = false;
                    }
                }
                self.publish_links();
            }
            let now = Instant::now();
            let due = self.dirty || self.links.values().any(|l| l.due(now));
            if pushing && due {
                self.round().await;
                continue;
            }
            let retry = self
                .links
                .values()
                .filter(|l| l.dirty)
                .filter_map(|l| l.retry_at)
                .min();
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
                        self.mark_all(false);
                        self.pending.extend(p);
                        self.publish_pending();
                    }
                    Some(Change::Rescan(why)) => {
                        tracing::warn!("file watch: {why}; rescanning the whole tree");
                        self.mark_all(false);
                    }
                    None => break,
                },
                () = shared.sync_now.notified() => {
                    // A full sync: ask the peers what they have, whatever we believe.
                    self.mark_all(true);
                    for l in self.links.values_mut() {
                        l.retry_at = None;
                    }
                }
                r = direction.changed() => {
                    if r.is_err() { break; }
                    self.mark_all(true);
                }
                r = paused.changed() => {
                    if r.is_err() { break; }
                }
                () = async {
                    match retry {
                        Some(t) => tokio::time::sleep_until(t.into()).await,
                        None => std::future::pending().await,
                    }
                } => {}
                () = shutdown.wait() => break,
            }
        }
        for l in self.links.values_mut() {
            if let Some(s) = l.session.take() {
                s.close().await;
            }
        }
    }

    fn publish_pending(&self) {
        let n = self.pending.len();
        self.shared.with_counters(|c| c.pending = n);
    }

    /// The links' state in Status: connected when every peer is, and the
    /// failing peers' errors.
    fn publish_links(&self) {
        let connected = !self.links.is_empty() && self.links.values().all(|l| l.connected);
        let errors: Vec<String> = self
            .links
            .values()
            .filter(|l| !l.error.is_empty())
            .map(|l| l.error.clone())
            .collect();
        self.shared.with_counters(|c| {
            c.peer_connected = connected;
            c.last_error = errors.join("; ");
        });
    }

    /// One attempt to make every due peer equal to this node.
    async fn round(&mut self) {
        let peers = self.shared.peers();
        // Peers no longer in cluster.toml (a node removed) are let go.
        let gone: Vec<String> = self
            .links
            .keys()
            .filter(|k| !peers.iter().any(|p| p.name == **k))
            .cloned()
            .collect();
        for name in gone {
            if let Some(mut l) = self.links.remove(&name)
                && let Some(s) = l.session.take()
            {
                s.close().await;
            }
        }
        for p in &peers {
            if !self.links.contains_key(&p.name) {
                self.links.insert(
                    p.name.clone(),
                    PeerLink {
                        dirty: true,
                        ..PeerLink::default()
                    },
                );
            }
        }
        self.dirty = false;
        if peers.is_empty() {
            // Standalone: nothing to push to until cluster.toml names a peer.
            self.publish_links();
            return;
        }
        // Whatever changes from here on is caught by the next round.
        let covered = std::mem::take(&mut self.pending);
        let mut all_reached = true;
        let now = Instant::now();
        for peer in &peers {
            let Some(mut link) = self.links.remove(&peer.name) else {
                continue;
            };
            if link.due(now) {
                link.dirty = false;
                match self.push(peer, &mut link).await {
                    Ok(()) => {
                        link.backoff.success();
                        link.retry_at = None;
                    }
                    Err(RoundError::Local(why)) => {
                        tracing::error!(peer = %peer, "{why}");
                        link.error = why;
                        self.shared.with_counters(|c| c.errors += 1);
                        link.dirty = true;
                        link.retry_at = Some(Instant::now() + link.backoff.failure());
                    }
                    Err(RoundError::Transport(e)) => {
                        let text = e.to_string();
                        let state = if e.is_host_key() {
                            Link::HostKeyRefused(text.clone())
                        } else {
                            Link::Down(text.clone())
                        };
                        link.set_link(peer, state, true);
                        link.error = text;
                        self.shared.with_counters(|c| c.errors += 1);
                        if let Some(s) = link.session.take() {
                            s.close().await;
                        }
                        link.remote = None;
                        link.dirty = true;
                        link.retry_at = Some(Instant::now() + link.backoff.failure());
                    }
                }
            }
            all_reached &= !link.dirty && link.error.is_empty();
            self.links.insert(peer.name.clone(), link);
        }
        if !all_reached {
            // Not every peer has these paths yet.
            self.pending.extend(covered);
        }
        self.publish_links();
        self.publish_pending();
    }

    async fn push(&mut self, peer: &PeerSpec, link: &mut PeerLink) -> Result<(), RoundError> {
        if link
            .session
            .as_ref()
            .is_some_and(|s| s.is_closed() || s.peer.addr != peer.addr)
        {
            link.session = None;
        }
        if link.session.is_none() {
            let s = PeerSession::connect(peer)
                .await
                .map_err(RoundError::Transport)?;
            link.session = Some(s);
            link.remote = None;
            link.set_link(peer, Link::Up, true);
        }
        let Some(session) = link.session.as_ref() else {
            return Ok(());
        };
        let local = match tokio::task::block_in_place(|| self.shared.local_manifest()) {
            Ok(m) => m,
            Err(e) => {
                return Err(RoundError::Local(format!(
                    "scanning {}: {e}",
                    self.shared.config_dir.display()
                )));
            }
        };
        let remote = match link.remote.take() {
            Some(r) => r,
            None => session.manifest().await.map_err(RoundError::Transport)?,
        };
        let plan = diff(&local, &remote);
        if plan.is_empty() {
            link.remote = Some(remote);
            link.error.clear();
            self.finish_sync(0, None);
            return Ok(());
        }
        self.shared
            .with_counters(|c| c.pending = c.pending.max(plan.len()));
        self.batch_seq += 1;
        let node = self.shared.config.current().config.node.name.clone();
        let batch = format!(
            "{node}-{}-{}",
            tandem_runtime::unix_ms(SystemTime::now()),
            self.batch_seq
        );
        let staging = peer
            .peer_config_dir
            .join(STAGING_DIR)
            .join(&batch)
            .display()
            .to_string();
        let started = Instant::now();
        let sent = session
            .stage(&self.shared.config_dir, &staging, &plan.uploads)
            .await
            .map_err(RoundError::Transport)?;
        let req = build_request(&batch, &node, &plan, &sent);
        let reply = session.apply(req).await.map_err(RoundError::Transport)?;
        if !reply.applied {
            let why = format!(
                "peer {peer} refused batch {batch}, nothing applied: {}",
                reply.errors.join("; ")
            );
            if why.split_once(": ").map(|x| x.1) != link.last_refusal.split_once(": ").map(|x| x.1)
            {
                tracing::error!(peer = %peer, "{why}");
            }
            link.last_refusal = why.clone();
            link.error = why;
            self.shared.with_counters(|c| {
                c.errors += 1;
                c.pending = plan.len();
            });
            // The peer still holds what it held; wait for the next change.
            link.remote = Some(remote);
            return Ok(());
        }
        link.last_refusal.clear();
        link.error.clear();
        let expected = expected_after(&remote, &plan, &sent);
        if expected.hash() != reply.manifest_hash {
            // Someone else touched the peer's tree, or a file changed under
            // us: ask the peer again next round.
            tracing::debug!(peer = %peer, "peer manifest differs from the expected one; refetching");
            link.dirty = true;
        } else {
            link.remote = Some(expected);
        }
        let bytes = plan.upload_bytes();
        tracing::info!(
            peer = %peer,
            batch = %batch,
            sent = sent.len(),
            bytes,
            renamed = plan.renames.len(),
            deleted = plan.deletes.len(),
            mode_only = plan.attrs.len(),
            ms = started.elapsed().as_millis() as u64,
            "peer {peer} applied the batch"
        );
        if !reply.reloaded.is_empty() {
            tracing::debug!(peer = %peer, daemons = ?reply.reloaded, "peer daemons reloaded");
        }
        self.finish_sync(sent.len() as u64, Some(()));
        Ok(())
    }

    fn finish_sync(&mut self, files: u64, batch: Option<()>) {
        self.shared.with_counters(|c| {
            c.last_sync = Some(SystemTime::now());
            c.files_transferred += files;
            if batch.is_some() {
                c.batches_applied += 1;
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

    use crate::manifest::tests::{entry as e, manifest as m};

    #[test]
    fn the_acknowledged_manifest_equals_the_local_one_after_a_batch() {
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
        let plan = diff(&local, &remote);
        let sent = plan.uploads.clone();
        let req = build_request("b", "lb1", &plan, &sent);
        assert_eq!(req.renames.len(), 1);
        assert_eq!(req.deletes, ["farms/x.toml"]);
        assert_eq!(req.writes.iter().filter(|w| w.staged).count(), 2);
        // The renamed file carries its (new) mode.
        assert!(
            req.writes
                .iter()
                .any(|w| !w.staged && w.path == "farms/new.toml" && w.mode == 0o600)
        );
        assert_eq!(expected_after(&remote, &plan, &sent), local);
    }
}
