//! The I/O shell around [`decide`](crate::decide) and
//! [`bird_conf`](crate::bird_conf): polls lb-forwarder, decides, writes
//! BIRD's configuration when it changes and tells BIRD to take it
//! (`configure`), reads the BGP sessions' states, and publishes all of it
//! for Status. One log line per change of a VIP, a session or BIRD's
//! reachability.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tandem_config::{ClusterMode, Config, Forwarding};
use tandem_runtime::{Loaded, Shutdown};
use tokio::sync::watch;

use crate::bird_conf;
use crate::control::{self, Control};
use crate::decide::{self, Datapath, Decision, Liveness};
use crate::forwarder::Forwarder;

/// How often lb-forwarder is polled: a farm losing its last backend is
/// withdrawn within this (plus BIRD's and the routers' reaction).
pub const POLL: Duration = Duration::from_millis(200);
/// How often BIRD's sessions are read (and an unreachable BIRD retried).
const SESSIONS_EVERY: Duration = Duration::from_secs(1);
/// A configuration BIRD refused is offered again at most this often.
const RETRY_EVERY: Duration = Duration::from_secs(2);

/// A VIP's decision and since when it has held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipState {
    pub decision: Decision,
    pub since: SystemTime,
}

/// One BGP session as BIRD reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub peer: String,
    pub address: String,
    pub state: String,
    pub bgp_state: String,
    pub established: bool,
    pub since: String,
}

/// Everything Status shows.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub mode: String,
    pub maintenance: Option<String>,
    pub datapath_ready: bool,
    pub datapath_message: String,
    pub vips: Vec<VipState>,
    pub sessions: Vec<Session>,
    pub bird_reachable: bool,
    pub bird_message: String,
    pub bird_configured: Option<SystemTime>,
    /// Bumped every time a new configuration is written.
    pub written: u64,
    /// The `written` number BIRD has taken.
    pub applied: u64,
}

pub struct Engine {
    pub bird_config: PathBuf,
    pub control: Control,
    pub forwarder: Forwarder,
    pub liveness: Liveness,
    pub config: watch::Receiver<Arc<Loaded>>,
    pub maintenance: watch::Receiver<Option<String>>,
    pub snapshot: watch::Sender<Snapshot>,
    /// The text last written, and whether BIRD has taken it.
    written: Option<String>,
    pending: bool,
    last_attempt: Option<Instant>,
    last_sessions: Option<Instant>,
    vips: HashMap<IpAddr, VipState>,
    idle_logged: Option<String>,
    render_error: Option<String>,
    /// BIRD has answered at least once.
    bird_seen: bool,
}

/// The DSR farms of `config`, by name and VIP.
fn configured(config: &Config) -> Vec<(String, IpAddr)> {
    config
        .farms
        .iter()
        .filter(|f| f.forwarding == Forwarding::Dsr)
        .map(|f| (f.name.clone(), f.vip))
        .collect()
}

fn list(vips: &BTreeSet<IpAddr>) -> String {
    if vips.is_empty() {
        return "none".to_owned();
    }
    vips.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Writes `text` to `path` whole: a temporary file renamed over it, so BIRD
/// (re)starting at any moment reads either the old or the new file.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "bird.conf".to_owned());
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

impl Engine {
    pub fn new(
        bird_config: PathBuf,
        control: Control,
        forwarder: Forwarder,
        grace: Duration,
        config: watch::Receiver<Arc<Loaded>>,
        maintenance: watch::Receiver<Option<String>>,
        snapshot: watch::Sender<Snapshot>,
    ) -> Engine {
        Engine {
            bird_config,
            control,
            forwarder,
            liveness: Liveness::new(grace),
            config,
            maintenance,
            snapshot,
            written: None,
            pending: false,
            last_attempt: None,
            last_sessions: None,
            vips: HashMap::new(),
            idle_logged: None,
            render_error: None,
            bird_seen: false,
        }
    }

    /// Writes BIRD's first configuration, announcing nothing: BIRD may
    /// start as soon as routed is ready, and must not announce a node
    /// whose datapath nobody has checked yet.
    pub fn prime(&mut self) {
        let loaded = self.config.borrow().clone();
        let Some(cluster) = loaded
            .config
            .cluster
            .as_ref()
            .filter(|c| c.mode == ClusterMode::ActiveActive)
        else {
            return;
        };
        match bird_conf::render(cluster, &loaded.config.node.name, &BTreeSet::new()) {
            Ok(text) => self.write(text),
            Err(e) => {
                tracing::error!(node = %loaded.config.node.name, "cannot generate BIRD's configuration: {e}")
            }
        }
    }

    fn write(&mut self, text: String) {
        if self.written.as_deref() == Some(text.as_str()) {
            return;
        }
        match write_atomically(&self.bird_config, &text) {
            Ok(()) => {
                self.written = Some(text);
                self.pending = true;
                self.last_attempt = None;
                self.snapshot.send_modify(|s| s.written += 1);
            }
            Err(e) => {
                let msg = format!("cannot write {}: {e}", self.bird_config.display());
                if self.snapshot.borrow().bird_message != msg {
                    tracing::error!(path = %self.bird_config.display(), "{msg}");
                }
                self.snapshot.send_modify(|s| s.bird_message = msg);
            }
        }
    }

    pub async fn run(mut self, mut shutdown: Shutdown) {
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                changed = self.maintenance.changed() => if changed.is_err() { break },
                changed = self.config.changed() => if changed.is_err() { break },
                () = shutdown.wait() => break,
            }
            self.step().await;
        }
    }

    async fn step(&mut self) {
        let loaded = self.config.borrow_and_update().clone();
        let maintenance = self.maintenance.borrow_and_update().clone();
        let config = &loaded.config;
        let node = config.node.name.clone();
        let Some(cluster) = config
            .cluster
            .as_ref()
            .filter(|c| c.mode == ClusterMode::ActiveActive)
        else {
            let mode = config
                .cluster
                .as_ref()
                .map_or("standalone", |c| c.mode.as_str())
                .to_owned();
            if self.idle_logged.as_deref() != Some(mode.as_str()) {
                tracing::info!(node = %node, mode = %mode, "not an active-active cluster ({mode}): routed announces nothing");
                self.idle_logged = Some(mode.clone());
            }
            self.snapshot.send_modify(|s| {
                s.mode = mode;
                s.maintenance = maintenance;
                s.vips.clear();
                s.sessions.clear();
            });
            return;
        };
        self.idle_logged = None;

        let now = Instant::now();
        match self.forwarder.poll(now).await {
            Ok(view) => self.liveness.answered(now, view),
            Err(e) => self.liveness.failed(now, e),
        }
        let datapath = self.liveness.datapath(now);
        let decisions = decide::decide(&configured(config), &datapath, maintenance.as_deref());
        self.log_changes(&node, &decisions);
        let announce = decide::announced(&decisions);

        match bird_conf::render(cluster, &node, &announce) {
            Ok(text) => {
                self.render_error = None;
                self.write(text);
            }
            Err(e) => {
                let msg = e.to_string();
                if self.render_error.as_deref() != Some(msg.as_str()) {
                    tracing::error!(node = %node, "cannot generate BIRD's configuration: {msg}");
                    self.render_error = Some(msg);
                }
            }
        }
        if self.pending
            && self
                .last_attempt
                .is_none_or(|t| now.duration_since(t) >= RETRY_EVERY)
        {
            self.configure(&node, &announce, cluster).await;
        }
        if self
            .last_sessions
            .is_none_or(|t| now.duration_since(t) >= SESSIONS_EVERY)
        {
            self.last_sessions = Some(now);
            self.read_sessions(&node, cluster).await;
        }

        let vips = {
            let mut v: Vec<VipState> = self.vips.values().cloned().collect();
            v.sort_by_key(|s| s.decision.vip);
            v
        };
        self.snapshot.send_modify(|s| {
            s.mode = cluster.mode.as_str().to_owned();
            s.maintenance = maintenance;
            (s.datapath_ready, s.datapath_message) = match &datapath {
                Datapath::Ready(_) => (true, String::new()),
                Datapath::NotReady(why) => (false, why.clone()),
            };
            s.vips = vips;
        });
    }

    /// One line per VIP whose fate changed.
    fn log_changes(&mut self, node: &str, decisions: &[Decision]) {
        let now = SystemTime::now();
        let current: BTreeSet<IpAddr> = decisions.iter().map(|d| d.vip).collect();
        self.vips.retain(|vip, _| current.contains(vip));
        for d in decisions {
            let before = self.vips.get(&d.vip);
            if before.is_some_and(|b| b.decision == *d) {
                continue;
            }
            let farms = d.farms.join(", ");
            match (before.map(|b| b.decision.announce), d.announce) {
                (_, true) => {
                    tracing::info!(vip = %d.vip, farm = %farms, node = %node, "VIP {} announced to the routers (farm {farms})", d.vip)
                }
                (Some(true), false) => {
                    tracing::warn!(vip = %d.vip, farm = %farms, node = %node, reason = %d.reason, "VIP {} withdrawn from the routers: {}", d.vip, d.reason)
                }
                (_, false) => {
                    tracing::info!(vip = %d.vip, farm = %farms, node = %node, reason = %d.reason, "VIP {} not announced: {}", d.vip, d.reason)
                }
            }
            self.vips.insert(
                d.vip,
                VipState {
                    decision: d.clone(),
                    since: now,
                },
            );
        }
    }

    async fn configure(
        &mut self,
        node: &str,
        announce: &BTreeSet<IpAddr>,
        cluster: &tandem_config::ClusterConfig,
    ) {
        let started = Instant::now();
        self.last_attempt = Some(started);
        let result = self.control.request("configure").await;
        let peers: Vec<String> = bird_conf::peers_of(cluster, node)
            .iter()
            .map(|p| p.name.clone())
            .collect();
        match result {
            Ok(reply) if !reply.is_error() => {
                self.pending = false;
                self.bird_seen = true;
                tracing::info!(
                    node = %node,
                    vips = %list(announce),
                    peers = %peers.join(", "),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "BIRD reconfigured in {} ms: announcing {} to {} ({})",
                    started.elapsed().as_millis(),
                    list(announce),
                    if peers.len() == 1 { "1 peer".to_owned() } else { format!("{} peers", peers.len()) },
                    peers.join(", ")
                );
                self.snapshot.send_modify(|s| {
                    s.bird_reachable = true;
                    s.bird_message.clear();
                    s.bird_configured = Some(SystemTime::now());
                    s.applied = s.written;
                });
            }
            Ok(reply) => {
                let msg = format!(
                    "BIRD refused its configuration {}: {}",
                    self.bird_config.display(),
                    reply.message()
                );
                if self.snapshot.borrow().bird_message != msg {
                    tracing::error!(node = %node, path = %self.bird_config.display(), "{msg}");
                }
                self.snapshot.send_modify(|s| {
                    s.bird_reachable = true;
                    s.bird_message = msg;
                });
            }
            Err(e) => self.unreachable(node, &e),
        }
    }

    fn unreachable(&mut self, node: &str, e: &control::ControlError) {
        let msg = format!("BIRD does not answer: {e}");
        let first = self.snapshot.borrow().bird_message.is_empty();
        if self.snapshot.borrow().bird_reachable {
            tracing::warn!(node = %node, socket = %self.control.path().display(), "{msg}; it will take {} when it starts again", self.bird_config.display());
        } else if first && !self.bird_seen {
            // At boot BIRD starts after routed: waiting is normal.
            tracing::info!(node = %node, socket = %self.control.path().display(), "waiting for BIRD on {}", self.control.path().display());
        }
        // BIRD reads the file when it starts; a running one is told again.
        self.pending = true;
        self.snapshot.send_modify(|s| {
            s.bird_reachable = false;
            s.bird_message = msg;
        });
    }

    async fn read_sessions(&mut self, node: &str, cluster: &tandem_config::ClusterConfig) {
        let reply = match self.control.request("show protocols").await {
            Ok(r) if !r.is_error() => r,
            Ok(r) => {
                tracing::debug!(node = %node, "show protocols: {}", r.message());
                return;
            }
            Err(e) => {
                self.unreachable(node, &e);
                return;
            }
        };
        if !self.snapshot.borrow().bird_reachable {
            if self.bird_seen {
                tracing::info!(node = %node, socket = %self.control.path().display(), "BIRD answers again");
            } else {
                tracing::info!(node = %node, socket = %self.control.path().display(), "BIRD answers on {}", self.control.path().display());
            }
            self.bird_seen = true;
            // A BIRD that (re)started read the file; tell it anyway, cheaply.
            self.pending = true;
            self.last_attempt = None;
            self.snapshot.send_modify(|s| {
                s.bird_reachable = true;
                s.bird_message.clear();
            });
        }
        let rows = control::protocols(&reply);
        let before: HashMap<String, bool> = self
            .snapshot
            .borrow()
            .sessions
            .iter()
            .map(|s| (s.peer.clone(), s.established))
            .collect();
        let sessions: Vec<Session> = bird_conf::peers_of(cluster, node)
            .into_iter()
            .map(|peer| {
                let name = bird_conf::protocol_name(peer);
                let row = rows.iter().find(|r| r.name == name);
                let bgp_state = row
                    .map(|r| r.info.clone())
                    .unwrap_or_else(|| "unknown to BIRD".to_owned());
                Session {
                    peer: peer.name.clone(),
                    address: peer.address.to_string(),
                    state: row.map(|r| r.state.clone()).unwrap_or_default(),
                    established: bgp_state.starts_with("Established"),
                    bgp_state,
                    since: row.map(|r| r.since.clone()).unwrap_or_default(),
                }
            })
            .collect();
        for s in &sessions {
            match (before.get(&s.peer), s.established) {
                (Some(false) | None, true) => {
                    tracing::info!(peer = %s.peer, address = %s.address, node = %node, "BGP session to {} ({}) established", s.peer, s.address)
                }
                (Some(true), false) => {
                    tracing::warn!(peer = %s.peer, address = %s.address, node = %node, state = %s.bgp_state, "BGP session to {} ({}) lost: {}", s.peer, s.address, s.bgp_state)
                }
                _ => {}
            }
        }
        self.snapshot.send_modify(|s| s.sessions = sessions);
    }
}
