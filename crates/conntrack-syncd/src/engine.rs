//! The I/O shell around the sync protocol: kernel conntrack events and the
//! UDP socket on the cluster link in, the [`SyncPeer`]'s actions out. One
//! task owns everything, so no lock is held anywhere.
//!
//! Each turn of the loop takes everything already waiting (up to a batch
//! of events and of datagrams), hands it to the protocol, then carries out
//! what it asks: peer records are applied in one batch of ctnetlink
//! requests, and datagrams are sent after that (so an acknowledgement
//! never leaves before the records it covers are in the kernel). A burst
//! thus fills datagrams and system calls; a lone event waits for nothing.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use futures::FutureExt as _;
use tandem_config::{Config, Farm, Forwarding, Protocol};
use tandem_conntrack::{
    Event, EventGroup, EventSocket, EventStream, Filter, KernelFilter, Service,
};
use tandem_proto::v1::{self, SyncRole};
use tandem_runtime::{ConfigCell, Shutdown};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};

use crate::kernel::{Mode, Replica};
use crate::priority::Priority;
use crate::sync::{
    Action, Health, HealthLevel, LogEvent, PeerState, Record, ResyncState, SyncConfig, SyncKey,
    SyncPeer, wire,
};

/// How often the sender sends its non-TCP flows again: the kernel reports
/// no event when a UDP flow's timeout is merely refreshed by traffic, so
/// without this the backup's copy would expire under a live flow.
const REFRESH_INTERVAL: Duration = Duration::from_secs(20);
/// Send and receive buffers of the sync socket (forced past the sysctl
/// limits with CAP_NET_ADMIN): the receive side holds a whole congestion
/// window of datagrams several times over.
const SOCKET_BUFFER: usize = 8 << 20;
/// Status (and /metrics) lag the engine by at most this much while events
/// stream in: building it on every event would cost about as much as
/// handling the event.
const STATUS_INTERVAL: Duration = Duration::from_millis(20);
/// Most kernel events taken in one turn of the loop, and most datagrams
/// (about 30 records each): a turn stays short, so acknowledgements and
/// alives keep flowing while a burst is worked off.
const EVENT_BATCH: usize = 1024;
/// After a turn that took some kernel events but not a full batch, the
/// loop waits this long before the next: the events of a steady stream of
/// new connections are then read, packed and sent a few dozen at a time
/// rather than one wake-up each (a wake-up costs more than the event). A
/// change waits at most this much longer; a full batch does not wait.
const EVENT_LINGER: Duration = Duration::from_millis(1);
const DATAGRAM_BATCH: usize = 64;
/// The kernel event socket's receive buffer (kernel memory, forced past
/// rmem_max): about 100,000 events, a burst the daemon may fall behind by
/// for a moment (a table dump) before the kernel drops events.
const EVENT_BUFFER: usize = 64 << 20;
/// A repeated warning (refused records, kernel errors) is logged at most
/// this often, with the number suppressed.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Mechanisms that can be switched off, for the tests that prove them:
/// each fault test runs once as shipped and once with its mechanism off,
/// and the second run must fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mechanisms {
    /// A new peer epoch is adopted only from a datagram that echoes ours.
    pub epoch_handshake: bool,
    /// Both nodes send the flows they forward; the master applies the
    /// backup's.
    pub both_ways: bool,
    /// A complete bulk deletes what it lacks; a record whose NAT differs
    /// from the kernel's entry replaces it.
    pub exact_resync: bool,
    /// Records of flows outside this node's farms are dropped.
    pub farm_filter: bool,
}

impl Default for Mechanisms {
    fn default() -> Self {
        Mechanisms {
            epoch_handshake: true,
            both_ways: true,
            exact_resync: true,
            farm_filter: true,
        }
    }
}

/// Requests from the gRPC API.
pub enum Command {
    Resync(oneshot::Sender<()>),
    Flush(oneshot::Sender<usize>),
    Commit(oneshot::Sender<(u64, Duration)>),
    SetRole(SyncRole, oneshot::Sender<()>),
}

/// What the engine publishes for Status.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub status: v1::ConntrackSyncStatus,
    /// The protocol's own view (every counter), for the metrics.
    pub sync: Option<crate::sync::Status>,
    /// The shell's counters, for the metrics.
    pub shell: ShellCounters,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShellCounters {
    /// Peer records of flows outside this node's farms, dropped.
    pub foreign_records_dropped: u64,
    /// Entries replaced because their NAT differed from the peer's.
    pub replaced: u64,
    /// Entries a complete bulk from the master did not hold, deleted.
    pub stale_removed: u64,
    /// Copies of the peer's flows that expired here (not sent back).
    pub copies_expired: u64,
    /// Own flows this node forwards and replicates.
    pub own_flows: u64,
    /// Kernel events lost (receive buffer overruns).
    pub event_overruns: u64,
    /// The largest datagram used (from the cluster link's path MTU).
    pub max_datagram: u64,
    /// Whether the daemon runs favoured now (it fell behind), and how often
    /// it was ([`crate::priority`]).
    pub favoured: bool,
    pub times_favoured: u64,
}

/// Everything the engine needs, derived from the configuration.
struct Setup {
    local: SocketAddr,
    peer: SocketAddr,
    key: SyncKey,
    filter: Filter,
    queue_limit: usize,
    lag_threshold: Duration,
}

/// Why replication does not run.
enum NotRunning {
    /// No cluster.toml: nothing to replicate to, and nothing wrong.
    Standalone,
    /// An active-active cluster: DSR only, no connection state to replicate.
    ActiveActive,
    Misconfigured(anyhow::Error),
}

/// Which flows belong to Tandem: the NAT farms' VIPs, never the cluster
/// link's own addresses. (DSR farms keep no state on the balancer.)
pub fn filter_of(config: &Config) -> Filter {
    let services = config
        .farms
        .iter()
        .filter(|f| f.forwarding == Forwarding::Nat)
        .flat_map(services_of);
    let excluded: Vec<IpAddr> = config
        .cluster
        .iter()
        .flat_map(|c| c.nodes.iter().map(|n| n.address))
        .chain(config.node.cluster_address)
        .collect();
    Filter::new(services, excluded)
}

fn services_of(farm: &Farm) -> Vec<Service> {
    let protocols: &[u8] = match farm.protocol {
        Protocol::Tcp => &[6],
        Protocol::Udp => &[17],
        Protocol::Both => &[6, 17],
    };
    protocols
        .iter()
        .map(|p| Service {
            vip: farm.vip,
            protocol: *p,
            ports: farm.port.first..=farm.port.last,
        })
        .collect()
}

/// The part of `filter` the kernel applies before copying an event: the
/// VIPs, and never this daemon's own writes.
fn kernel_filter(filter: &Filter, own_portid: u32) -> KernelFilter {
    KernelFilter {
        destinations: filter.services().iter().map(|s| s.vip).collect(),
        ignore_portid: own_portid,
    }
}

fn setup(config: &Config, config_dir: &Path) -> Result<Setup, NotRunning> {
    let Some(cluster) = config.cluster.as_ref() else {
        return Err(NotRunning::Standalone);
    };
    if !cluster.mode.is_active_passive() {
        return Err(NotRunning::ActiveActive);
    }
    let bad = |e: anyhow::Error| NotRunning::Misconfigured(e);
    let peer = cluster
        .nodes
        .iter()
        .find(|n| n.name != config.node.name)
        .context("cluster.toml names no other node")
        .map_err(bad)?;
    let port = cluster.sync.conntrack_port;
    let local_ip = config
        .node
        .cluster_address
        .unwrap_or(if peer.address.is_ipv4() {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        } else {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        });
    let key_path = cluster
        .sync
        .key_path(config_dir)
        .context(
            "cluster.toml [sync] key_file is not set: conntrack replication needs the cluster's shared key",
        )
        .map_err(bad)?;
    let bytes = std::fs::read(&key_path)
        .with_context(|| format!("reading the sync key {}", key_path.display()))
        .map_err(bad)?;
    let key = SyncKey::new(bytes.trim_ascii())
        .with_context(|| format!("the sync key {}", key_path.display()))
        .map_err(bad)?;
    Ok(Setup {
        local: SocketAddr::new(local_ip, port),
        peer: SocketAddr::new(peer.address, port),
        key,
        filter: filter_of(config),
        queue_limit: cluster.sync.conntrack_queue_limit as usize,
        lag_threshold: Duration::from_millis(u64::from(cluster.sync.conntrack_lag_threshold_ms)),
    })
}

pub struct Engine {
    pub config: Arc<ConfigCell>,
    pub config_dir: std::path::PathBuf,
    pub mode: Mode,
    pub mechanisms: Mechanisms,
    pub commands: mpsc::Receiver<Command>,
    pub snapshot: watch::Sender<Snapshot>,
    /// The role from vrrpd (clustermanager's SetRole overrides it).
    pub vrrp_role: watch::Receiver<SyncRole>,
    pub shutdown: Shutdown,
    /// The niceness while replication is behind (`--nice`).
    pub priority: Priority,
}

impl Engine {
    /// Runs until shutdown. A configuration that does not allow replication
    /// (standalone, no key) is reported in Status and waited out: a reload
    /// that fixes it starts replication.
    pub async fn run(mut self) {
        let mut configs = self.config.subscribe();
        let mut said: Option<String> = None;
        loop {
            let loaded = configs.borrow_and_update().clone();
            let result = match setup(&loaded.config, &self.config_dir) {
                Ok(s) => self
                    .replicate(s, &mut configs)
                    .await
                    .map_err(NotRunning::Misconfigured),
                Err(e) => Err(e),
            };
            match result {
                Ok(Stop::Shutdown) => return,
                Ok(Stop::Reconfigure) => {
                    said = None;
                    continue;
                }
                Err(idle @ (NotRunning::Standalone | NotRunning::ActiveActive)) => {
                    // A node without a peer is healthy: nothing to say
                    // beyond one line.
                    let why = if matches!(idle, NotRunning::ActiveActive) {
                        "this node is in an active-active cluster (DSR only, no connection state): there is no peer to replicate to"
                    } else {
                        "this node is standalone (no cluster.toml): there is no peer to replicate to"
                    };
                    if said.as_deref() != Some(why) {
                        tracing::info!("conntrack replication is off: {why}");
                        said = Some(why.to_owned());
                    }
                    self.snapshot.send_modify(|s| {
                        s.status = v1::ConntrackSyncStatus::default();
                        s.status.set_role(SyncRole::Standalone);
                        s.status.set_health(v1::SyncHealth::Ok);
                        s.status.mode = self.mode.as_str().to_owned();
                        s.sync = None;
                    });
                }
                Err(NotRunning::Misconfigured(e)) => {
                    let why = format!("{e:#}");
                    if said.as_deref() != Some(why.as_str()) {
                        tracing::error!("conntrack replication is not running: {why}");
                        said = Some(why.clone());
                    }
                    self.snapshot.send_modify(|s| {
                        s.status = v1::ConntrackSyncStatus::default();
                        s.status.last_error = why.clone();
                        s.status.set_role(SyncRole::Standalone);
                        s.status.set_health(v1::SyncHealth::Failed);
                        s.status.health_message = format!("replication is not running: {why}");
                        s.status.mode = self.mode.as_str().to_owned();
                        s.sync = None;
                    });
                }
            }
            // Wait for a configuration change, answering the API meanwhile.
            loop {
                tokio::select! {
                    r = configs.changed() => { if r.is_err() { return; } break; }
                    Some(cmd) = self.commands.recv() => refuse(cmd),
                    () = self.shutdown.wait() => return,
                }
            }
        }
    }

    async fn replicate(
        &mut self,
        first: Setup,
        configs: &mut watch::Receiver<Arc<tandem_runtime::Loaded>>,
    ) -> anyhow::Result<Stop> {
        let Setup {
            local,
            peer,
            key,
            mut filter,
            queue_limit,
            lag_threshold,
        } = first;
        let socket =
            sync_socket(local).with_context(|| format!("binding the sync socket to {local}"))?;
        let replica =
            Replica::open(self.mode, self.mechanisms.exact_resync).context("opening ctnetlink")?;
        let events = EventSocket::with_receive_buffer(&EventGroup::ALL, EVENT_BUFFER)
            .context("subscribing to conntrack events")?;
        if let Err(e) = events.set_kernel_filter(&kernel_filter(&filter, replica.portid())) {
            // Not fatal: user space filters the same events, at some cost.
            tracing::warn!("conntrack events are filtered in user space only: {e}");
        }
        let events = EventStream::new(events).context("subscribing to conntrack events")?;
        let max_datagram = path_mtu(peer).map_or(wire::DEFAULT_MAX_DATAGRAM, |mtu| {
            let ip_udp = if peer.is_ipv4() { 28 } else { 48 };
            mtu.saturating_sub(ip_udp).clamp(
                wire::DEFAULT_MAX_DATAGRAM,
                wire::OVERHEAD + usize::from(u16::MAX),
            )
        });
        // Random and never zero (0 in an ack means "no epoch"): fresh at
        // every start, which the epoch handshake relies on.
        let epoch = rand::random::<u64>() | 1;
        let settings = SyncConfig {
            max_datagram,
            queue_limit,
            lag_threshold,
            epoch_handshake: self.mechanisms.epoch_handshake,
            ..SyncConfig::default()
        };
        let mut sync = SyncPeer::new(settings, key, epoch, Instant::now())
            .context("sync protocol settings")?;
        sync.set_tx_enabled(self.mechanisms.both_ways);
        tracing::info!(
            %local,
            %peer,
            mode = self.mode.as_str(),
            max_datagram,
            epoch = format!("{epoch:016x}"),
            "conntrack replication started on {local} with peer {peer} ({} mode, datagrams up to {max_datagram} bytes)",
            self.mode.as_str()
        );
        let mut shell = Shell {
            socket,
            peer,
            replica,
            events,
            sync,
            mechanisms: self.mechanisms,
            role: SyncRole::Unspecified,
            filter: filter.clone(),
            actions: VecDeque::new(),
            sends: Vec::new(),
            buf: vec![0u8; 65536],
            last_error: String::new(),
            last_resync: None,
            counters: ShellCounters {
                max_datagram: max_datagram as u64,
                ..ShellCounters::default()
            },
            warnings: Warnings::default(),
            health: HealthLevel::Ok,
        };

        let mut override_role: Option<SyncRole> = None;
        let mut refresh = tokio::time::interval(REFRESH_INTERVAL);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Status is published at most every STATUS_INTERVAL while events
        // stream in (a skipped one is made up when the interval ends), and
        // at once after a role change or a command.
        let mut published: Option<Instant> = None;
        let mut publish_now = true;
        let mut publish_due: Option<tokio::time::Instant> = None;
        loop {
            // The role: clustermanager's if it set one, else vrrpd's.
            let wanted = override_role.unwrap_or(*self.vrrp_role.borrow_and_update());
            if wanted != shell.role {
                publish_now = true;
                shell.set_role(wanted, Instant::now());
            }
            let deadline = shell.sync.next_deadline();
            let deadline = tokio::time::Instant::from_std(
                self.priority
                    .deadline()
                    .map_or(deadline, |t| t.min(deadline)),
            );
            let mut first_event = None;
            let mut refresh_due = false;
            tokio::select! {
                ev = shell.events.next() => first_event = Some(ev),
                r = shell.socket.readable() => {
                    if let Err(e) = r {
                        tracing::debug!("sync socket: {e}");
                    }
                }
                () = async {
                    if let Some(at) = publish_due {
                        tokio::time::sleep_until(at).await;
                    }
                }, if publish_due.is_some() => publish_now = true,
                () = tokio::time::sleep_until(deadline) => {}
                _ = refresh.tick() => refresh_due = true,
                r = self.vrrp_role.changed() => {
                    if r.is_err() { return Ok(Stop::Shutdown); }
                }
                Some(cmd) = self.commands.recv() => {
                    publish_now = true;
                    let now = Instant::now();
                    match cmd {
                        Command::Resync(done) => {
                            let out = shell.sync.resync_requested_by_operator(now);
                            shell.actions.extend(out);
                            let _ = done.send(());
                        }
                        Command::Flush(done) => {
                            let n = shell.replica.flush();
                            tracing::info!(entries = n, %peer, "{n} replicated entries flushed by the operator");
                            let _ = done.send(n);
                        }
                        Command::Commit(done) => {
                            let (n, took) = shell.replica.commit();
                            tracing::info!(entries = n, took_us = took.as_micros() as u64, "{n} cached entries committed to the kernel in {} µs", took.as_micros());
                            let _ = done.send((n, took));
                        }
                        Command::SetRole(r, done) => {
                            override_role = (r != SyncRole::Unspecified).then_some(r);
                            let _ = done.send(());
                        }
                    }
                }
                r = configs.changed() => {
                    if r.is_err() { return Ok(Stop::Shutdown); }
                    let loaded = configs.borrow_and_update().clone();
                    match setup(&loaded.config, &self.config_dir) {
                        Ok(s) if s.local == local && s.peer == peer
                            && s.queue_limit == queue_limit && s.lag_threshold == lag_threshold => {
                            // Farms changed: only the filters follow.
                            filter = s.filter;
                            shell.filter = filter.clone();
                            if let Err(e) = shell.events.get_ref().set_kernel_filter(&kernel_filter(&filter, shell.replica.portid())) {
                                tracing::warn!("conntrack events are filtered in user space only: {e}");
                            }
                            tracing::info!(%peer, services = filter.services().len(), "farms changed: replicating the flows of {} services", filter.services().len());
                        }
                        _ => {
                            tracing::info!(%peer, "cluster settings changed: restarting conntrack replication");
                            return Ok(Stop::Reconfigure);
                        }
                    }
                }
                () = self.shutdown.wait() => return Ok(Stop::Shutdown),
            }
            let now = Instant::now();
            // Behind: a full batch was waiting, or the peer acknowledges
            // late (this node starved, or the peer).
            let (full, events) = shell.take_input(first_event, now).await;
            let behind = full || shell.sync.is_behind();
            if let Some(nice) = self.priority.turn(behind, now) {
                self.set_niceness(nice, &peer);
                shell.counters.favoured = self.priority.is_favoured();
                shell.counters.times_favoured = self.priority.raised;
            }
            if refresh_due {
                shell.refresh_datagram_flows(now);
            }
            shell.carry_out(now).await;
            if publish_now || published.is_none_or(|t| now.duration_since(t) >= STATUS_INTERVAL) {
                self.publish(&mut shell, now);
                published = Some(now);
                publish_now = false;
                publish_due = None;
            } else if publish_due.is_none() {
                publish_due =
                    published.map(|t| tokio::time::Instant::from_std(t + STATUS_INTERVAL));
            }
            if events > 0 && !behind {
                tokio::time::sleep(EVENT_LINGER).await;
            }
        }
    }

    fn set_niceness(&mut self, nice: i32, peer: &SocketAddr) {
        let favoured = self.priority.is_favoured();
        match crate::priority::set(nice) {
            Ok(()) if favoured && self.priority.raised == 1 => tracing::info!(
                %peer,
                nice,
                "replication fell behind: running at niceness {nice} until it catches up (logged once; conntrack_sync_times_favoured counts)"
            ),
            Ok(()) => tracing::debug!(%peer, nice, favoured, "niceness {nice}"),
            Err(e) if self.priority.raised == 1 => tracing::warn!(
                %peer,
                nice,
                "replication fell behind, and the niceness could not be set to {nice}: {e} (needs CAP_SYS_NICE; logged once)"
            ),
            Err(e) => tracing::debug!(%peer, nice, "niceness {nice} not set: {e}"),
        }
    }

    fn publish(&self, shell: &mut Shell, now: Instant) {
        let st = shell.sync.status(now);
        let health = shell.health(&st.health);
        let c = &st.counters;
        let ms = |d: Option<Duration>| d.map_or(0.0, |d| d.as_secs_f64() * 1000.0);
        shell.counters.own_flows = shell.replica.own() as u64;
        shell.counters.copies_expired = shell.replica.copies_expired;
        shell.counters.replaced = shell.replica.replaced;
        shell.counters.stale_removed = shell.replica.stale_removed;
        // The API adds the daemon's own info when it answers.
        let mut status = v1::ConntrackSyncStatus {
            peer: shell.peer.to_string(),
            peer_alive: st.peer == PeerState::Alive,
            tx_sequence: st.tx_next_seq,
            rx_sequence: st.rx_next_seq,
            entries_cached: shell.replica.cached() as u64,
            entries_injected: shell.replica.injected() as u64,
            datagrams_lost: c.lost,
            retransmissions: c.retransmissions,
            datagrams_rejected: c.rejected_authentication
                + c.rejected_version
                + c.rejected_malformed
                + c.rejected_stale,
            last_resync_unix_ms: shell.last_resync.map_or(0, tandem_runtime::unix_ms),
            resync_complete: !matches!(st.resync, ResyncState::Requested | ResyncState::InProgress),
            last_error: shell.last_error.clone(),
            mode: shell.replica.mode().as_str().to_owned(),
            epoch: st.epoch,
            peer_epoch: st.peer_epoch.unwrap_or(0),
            records_sent: c.records_sent,
            records_received: c.records_received,
            resyncs_completed: c.resyncs_completed,
            apply_errors: shell.replica.apply_errors,
            health_message: health.message.clone(),
            lag_p50_ms: ms(st.lag_p50),
            lag_p99_ms: ms(st.lag_p99),
            stale_epoch_rejected: c.rejected_stale,
            foreign_records_dropped: shell.counters.foreign_records_dropped,
            datagrams_sent: c.datagrams_sent,
            datagrams_received: c.datagrams_received,
            data_datagrams_sent: c.data_datagrams_sent,
            records_coalesced: c.records_coalesced,
            own_flows: shell.counters.own_flows,
            entries_replaced: shell.counters.replaced,
            stale_entries_removed: shell.counters.stale_removed,
            congestion_window: u32::try_from(st.cwnd).unwrap_or(u32::MAX),
            queued_records: st.tx_queued as u64,
            ..Default::default()
        };
        status.set_role(shell.role);
        status.set_health(match health.level {
            HealthLevel::Ok => v1::SyncHealth::Ok,
            HealthLevel::Degraded => v1::SyncHealth::Degraded,
            HealthLevel::Failed => v1::SyncHealth::Failed,
        });
        let counters = shell.counters.clone();
        self.snapshot.send_modify(|s| {
            s.status = status;
            s.sync = Some(st);
            s.shell = counters;
        });
    }
}

/// The running replication: sockets, the protocol, the replica.
struct Shell {
    socket: UdpSocket,
    peer: SocketAddr,
    replica: Replica,
    events: EventStream,
    sync: SyncPeer,
    mechanisms: Mechanisms,
    role: SyncRole,
    filter: Filter,
    actions: VecDeque<Action>,
    sends: Vec<Vec<u8>>,
    buf: Vec<u8>,
    last_error: String,
    last_resync: Option<SystemTime>,
    counters: ShellCounters,
    warnings: Warnings,
    /// The health last logged.
    health: HealthLevel,
}

impl Shell {
    fn master(&self) -> bool {
        self.role == SyncRole::Sender
    }

    fn set_role(&mut self, wanted: SyncRole, now: Instant) {
        let sending = wanted == SyncRole::Sender;
        let peer = self.peer;
        tracing::info!(
            role = role_name(wanted),
            %peer,
            "sync direction: {}",
            if sending {
                "this node is the master: its whole table is the reference for the peer"
            } else {
                "this node keeps the peer's flows (and sends the flows it forwards itself)"
            }
        );
        if sending && self.role != SyncRole::Sender {
            if self.replica.mode() == Mode::Cache {
                let (n, took) = self.replica.commit();
                tracing::info!(
                    entries = n,
                    took_us = took.as_micros() as u64,
                    "committed the {n} cached entries on becoming master in {} µs",
                    took.as_micros()
                );
            }
            self.replica.adopt();
            // Flows that began before this node became the master produced
            // no event it could send: its table goes to the peer, complete.
            let out = self.sync.push_table(now);
            self.actions.extend(out);
        }
        if !self.mechanisms.both_ways {
            self.sync.set_tx_enabled(sending);
        }
        self.role = wanted;
    }

    /// Takes the events and datagrams waiting, and hands them to the
    /// protocol. Whether this node is behind — a batch was full (more was
    /// waiting than one turn takes), or the peer sent a full datagram (it
    /// has a backlog, paced by this node's acknowledgements) — and how many
    /// kernel events it took.
    async fn take_input(
        &mut self,
        first: Option<Result<Event, tandem_conntrack::ConntrackError>>,
        now: Instant,
    ) -> (bool, usize) {
        let mut n = 0;
        if let Some(ev) = first {
            self.on_event(ev, now).await;
            n += 1;
        }
        while n < EVENT_BATCH {
            match self.events.next().now_or_never() {
                Some(ev) => self.on_event(ev, now).await,
                None => break,
            }
            n += 1;
        }
        let mut behind = n >= EVENT_BATCH;
        let mut datagrams = 0;
        loop {
            if datagrams == DATAGRAM_BATCH {
                behind = true;
                break;
            }
            datagrams += 1;
            match self.socket.try_recv_from(&mut self.buf) {
                Ok((len, from)) if from.ip() == self.peer.ip() => {
                    // The peer sends a datagram packed (nearly) full only
                    // when more is queued behind it: it has a backlog, which
                    // this node's acknowledgements pace.
                    behind |= len as u64 * 4 >= self.counters.max_datagram * 3;
                    let out = self.sync.datagram_received(&self.buf[..len], now);
                    self.actions.extend(out);
                }
                Ok((_, from)) => {
                    if self.warnings.due(Warning::Stranger, now) {
                        let suppressed = self.warnings.suppressed(Warning::Stranger);
                        tracing::warn!(%from, peer = %self.peer, suppressed, "sync datagram from {from}, which is not the peer {}, dropped", self.peer);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!("sync socket: {e}");
                    break;
                }
            }
        }
        (behind, n)
    }

    async fn on_event(
        &mut self,
        ev: Result<Event, tandem_conntrack::ConntrackError>,
        now: Instant,
    ) {
        let ev = match ev {
            Ok(Event::Overrun) => {
                self.counters.event_overruns += 1;
                if self.warnings.due(Warning::Overrun, now) {
                    let suppressed = self.warnings.suppressed(Warning::Overrun);
                    tracing::warn!(peer = %self.peer, suppressed, "conntrack events were lost (receive buffer overrun); sending the table to the peer again");
                }
                let out = self.sync.push_table(now);
                self.actions.extend(out);
                return;
            }
            Ok(ev) => ev,
            Err(e) => {
                self.last_error = format!("conntrack events: {e}");
                if self.warnings.due(Warning::Kernel, now) {
                    tracing::error!("{}", self.last_error);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                return;
            }
        };
        let (Event::New(r) | Event::Update(r) | Event::Destroy(r)) = &ev else {
            return;
        };
        // This daemon's own write (the kernel filter drops those already,
        // when it could be attached).
        if r.portid != 0 && r.portid == self.replica.portid() {
            return;
        }
        if !self.filter.matches(&r.entry) {
            return;
        }
        if let Some(record) = self.replica.local_event(ev) {
            let out = self.sync.local_event(record, now);
            self.actions.extend(out);
        }
    }

    /// The kernel reports no event when a UDP flow's timeout is refreshed:
    /// the flows this node owns are sent again now and then, with the
    /// timeout the kernel holds now (read in one batch, no dump).
    fn refresh_datagram_flows(&mut self, now: Instant) {
        for entry in self.replica.own_datagram_flows() {
            if self.filter.matches(&entry) {
                let out = self.sync.local_event(Record::Update(entry), now);
                self.actions.extend(out);
            }
        }
    }

    /// Carries out the protocol's actions (and those they lead to) until
    /// it has nothing more to do now, then sends the datagrams.
    async fn carry_out(&mut self, now: Instant) {
        let mut applies: Vec<Record> = Vec::new();
        loop {
            if self.sync.next_deadline() <= now {
                let out = self.sync.tick(now);
                self.actions.extend(out);
            }
            if self.actions.is_empty() {
                break;
            }
            while let Some(action) = self.actions.pop_front() {
                match action {
                    Action::Send(bytes) => self.sends.push(bytes),
                    Action::Apply(record) => {
                        if self.accept(&record, now) {
                            applies.push(record);
                        }
                    }
                    Action::ResyncStarted { complete } => {
                        self.apply(&mut applies, now);
                        let exact = complete && !self.master();
                        tracing::info!(peer = %self.peer, complete, "bulk resync from the peer {} started ({})", self.peer, if exact { "its whole table: what it lacks goes" } else if complete { "its whole table, taken as updates: this node is the master" } else { "the flows it forwards" });
                        if let Err(e) = self.replica.resync_started(exact, &self.filter) {
                            self.last_error =
                                format!("dumping the conntrack table for the resync: {e}");
                            tracing::error!("{}", self.last_error);
                        }
                    }
                    Action::ResyncComplete { records, complete } => {
                        self.apply(&mut applies, now);
                        let outcome = self.replica.resync_complete(complete);
                        self.last_resync = Some(SystemTime::now());
                        tracing::info!(
                            peer = %self.peer,
                            records,
                            stale_removed = outcome.stale_removed,
                            unchanged = outcome.unchanged,
                            took_ms = outcome.took.as_millis() as u64,
                            "bulk resync from the peer {} complete: {records} records in {} ms, {} entries the peer no longer has removed",
                            self.peer,
                            outcome.took.as_millis(),
                            outcome.stale_removed
                        );
                    }
                    Action::DumpLocalTable => {
                        self.apply(&mut applies, now);
                        let (entries, complete) = self.table_for_peer();
                        let out = self.sync.bulk_dump(entries, complete, now);
                        self.actions.extend(out);
                    }
                    Action::PeerAlive { epoch } => {
                        tracing::info!(peer = %self.peer, epoch = format!("{epoch:016x}"), "sync peer {} alive (epoch {epoch:016x})", self.peer);
                    }
                    Action::PeerDead { reason } => {
                        tracing::warn!(peer = %self.peer, "sync peer {} dead: {reason}", self.peer);
                    }
                    Action::Log(ev) => log_event(&self.peer, ev),
                }
            }
            self.apply(&mut applies, now);
        }
        self.send_all().await;
    }

    /// Whether a peer record may be applied here.
    fn accept(&mut self, record: &Record, now: Instant) -> bool {
        if !self.mechanisms.both_ways && self.master() {
            // The earlier protocol (a test control): a master kept its own
            // flows and ignored the peer's.
            return false;
        }
        let ours = match record {
            Record::New(e) | Record::Update(e) => self.filter.matches(e),
            Record::Destroy(t) => self.filter.matches_tuples(t, None),
        };
        if ours || !self.mechanisms.farm_filter {
            return true;
        }
        self.counters.foreign_records_dropped += 1;
        if self.warnings.due(Warning::Foreign, now) {
            let suppressed = self.warnings.suppressed(Warning::Foreign);
            tracing::warn!(
                peer = %self.peer,
                tuple = %record.key(),
                suppressed,
                "replicated record of {} dropped: not a flow of a farm this node serves",
                record.key()
            );
        }
        false
    }

    fn apply(&mut self, applies: &mut Vec<Record>, now: Instant) {
        if applies.is_empty() {
            return;
        }
        let master = self.master();
        let applied = self.replica.apply(std::mem::take(applies), master);
        if let Some(e) = applied.errors.first() {
            self.last_error = e.to_string();
            if self.warnings.due(Warning::Apply, now) {
                let suppressed =
                    self.warnings.suppressed(Warning::Apply) + applied.errors.len() as u64 - 1;
                tracing::warn!(peer = %self.peer, suppressed, "replicated entry not applied: {e}");
            } else {
                self.warnings
                    .suppress(Warning::Apply, applied.errors.len() as u64 - 1);
            }
        }
    }

    /// What this node sends in a bulk: the master its whole farm table
    /// (complete), another node the flows it forwards itself.
    fn table_for_peer(&mut self) -> (Vec<tandem_conntrack::Entry>, bool) {
        let master = self.master();
        match self.replica.dump() {
            Ok(records) => {
                let entries: Vec<tandem_conntrack::Entry> = records
                    .into_iter()
                    .map(|r| r.entry)
                    .filter(|e| {
                        self.filter.matches(e) && (master || self.replica.is_own(&e.original))
                    })
                    .collect();
                if master {
                    // The master's table is its own, also what started
                    // before this daemon (no event told of it).
                    for e in &entries {
                        if !self.replica.is_copy(&e.original) {
                            self.replica.own_flow(e.original);
                        }
                    }
                }
                (entries, master)
            }
            Err(e) => {
                self.last_error = format!("dumping the conntrack table: {e}");
                tracing::error!("{}", self.last_error);
                // Empty and partial: the peer deletes nothing on it.
                (Vec::new(), false)
            }
        }
    }

    async fn send_all(&mut self) {
        for bytes in std::mem::take(&mut self.sends) {
            loop {
                match self.socket.try_send_to(&bytes, self.peer) {
                    Ok(_) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if self.socket.writable().await.is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(peer = %self.peer, "sync send: {e}");
                        break;
                    }
                }
            }
        }
    }

    /// The health to publish, logged once per change of level.
    fn health(&mut self, protocol: &Health) -> Health {
        let mut health = protocol.clone();
        // The protocol says "peer"; the operator wants to know which.
        if let Some(rest) = health.message.strip_prefix("peer ") {
            health.message = format!("peer {} {rest}", self.peer);
        }
        if health.level != self.health {
            let peer = self.peer;
            match health.level {
                HealthLevel::Ok => {
                    tracing::info!(%peer, health = "ok", "conntrack replication with {peer} is healthy again")
                }
                HealthLevel::Degraded => {
                    tracing::warn!(%peer, health = "degraded", "conntrack replication with {peer} degraded: {}", health.message)
                }
                HealthLevel::Failed => {
                    tracing::error!(%peer, health = "failed", "conntrack replication with {peer} failed: {}", health.message)
                }
            }
            self.health = health.level;
        }
        health
    }
}

/// Warnings that can repeat, each logged at most once per WARN_INTERVAL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Warning {
    Stranger,
    Overrun,
    Kernel,
    Apply,
    Foreign,
}

#[derive(Debug, Default)]
struct Warnings {
    last: [Option<Instant>; 5],
    suppressed: [u64; 5],
}

impl Warnings {
    /// Whether to log now; counts a suppressed one otherwise.
    fn due(&mut self, w: Warning, now: Instant) -> bool {
        let i = w as usize;
        if self.last[i].is_some_and(|t| now < t + WARN_INTERVAL) {
            self.suppressed[i] += 1;
            return false;
        }
        self.last[i] = Some(now);
        true
    }

    /// The number suppressed since the last line (reset).
    fn suppressed(&mut self, w: Warning) -> u64 {
        std::mem::take(&mut self.suppressed[w as usize])
    }

    fn suppress(&mut self, w: Warning, n: u64) {
        self.suppressed[w as usize] += n;
    }
}

/// The path MTU toward the peer, as the kernel's route says (no packet is
/// sent: a connected UDP socket only looks the route up).
fn path_mtu(peer: SocketAddr) -> Option<usize> {
    let bind: SocketAddr = if peer.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = std::net::UdpSocket::bind(bind).ok()?;
    s.connect(peer).ok()?;
    let (level, name) = if peer.is_ipv4() {
        (libc::IPPROTO_IP, libc::IP_MTU)
    } else {
        (libc::IPPROTO_IPV6, libc::IPV6_MTU)
    };
    let mut mtu: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: a valid fd, out-pointers to a c_int and its length.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            level,
            name,
            (&raw mut mtu).cast(),
            &mut len,
        )
    };
    (rc == 0).then(|| usize::try_from(mtu).ok()).flatten()
}

/// The UDP socket on the cluster link, with buffers that hold a whole
/// congestion window several times over (forced past net.core.rmem_max
/// and wmem_max when the process may).
fn sync_socket(local: SocketAddr) -> std::io::Result<UdpSocket> {
    let domain = if local.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    force_buffer(&s, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF);
    force_buffer(&s, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF);
    s.set_nonblocking(true)?;
    s.bind(&local.into())?;
    UdpSocket::from_std(s.into())
}

/// Best effort: the forced option needs CAP_NET_ADMIN; the plain one is
/// capped by the sysctl.
fn force_buffer(s: &socket2::Socket, forced: libc::c_int, plain: libc::c_int) {
    let value = libc::c_int::try_from(SOCKET_BUFFER).unwrap_or(libc::c_int::MAX);
    for opt in [forced, plain] {
        // SAFETY: a valid fd and a pointer to a c_int that outlives the call.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(s),
                libc::SOL_SOCKET,
                opt,
                (&raw const value).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return;
        }
    }
}

fn refuse(cmd: Command) {
    // Dropping the reply channel tells the API that replication is off.
    drop(cmd);
}

enum Stop {
    Shutdown,
    Reconfigure,
}

pub fn role_name(r: SyncRole) -> &'static str {
    match r {
        SyncRole::Sender => "sender",
        SyncRole::Receiver => "receiver",
        SyncRole::Standalone => "standalone",
        SyncRole::Unspecified => "undecided",
    }
}

fn log_event(peer: &SocketAddr, ev: LogEvent) {
    match ev {
        LogEvent::Rejected {
            reason,
            error,
            suppressed,
        } => {
            tracing::warn!(%peer, reason = reason.as_str(), suppressed, "sync datagram from {peer} rejected: {error}")
        }
        LogEvent::Stale {
            kind,
            epoch,
            suppressed,
        } => tracing::warn!(
            %peer,
            reason = "stale",
            epoch = format!("{epoch:016x}"),
            suppressed,
            "authentic sync datagram from {peer} refused: it carries {} ({epoch:016x}); a replay, or the peer restarted and has not answered the handshake yet",
            kind.as_str()
        ),
        LogEvent::PeerRestarted {
            old_epoch,
            new_epoch,
        } => tracing::info!(
            %peer,
            old_epoch = format!("{old_epoch:016x}"),
            new_epoch = format!("{new_epoch:016x}"),
            "sync peer {peer} restarted (epoch {old_epoch:016x} -> {new_epoch:016x})"
        ),
        LogEvent::ResyncRequested { cause } => {
            tracing::info!(%peer, ?cause, "asked the peer {peer} for its table ({cause:?})")
        }
        LogEvent::BulkSending { cause } => {
            tracing::info!(%peer, ?cause, "sending the table to the peer {peer} ({cause:?})")
        }
        LogEvent::BulkQueued { records, complete } => tracing::info!(
            %peer,
            records,
            complete,
            "table for the peer {peer} queued: {records} records ({})",
            if complete { "the whole table" } else { "the flows this node forwards" }
        ),
        LogEvent::QueueOverflow { dropped, limit } => tracing::warn!(
            %peer,
            dropped,
            limit,
            "sync queue for {peer} full ({limit} entries): {dropped} queued changes dropped, the table is sent again once the peer keeps up"
        ),
        LogEvent::GapSkipped { first, count } => tracing::info!(
            %peer,
            first,
            count,
            "{count} datagrams from {peer} from sequence {first} skipped: the bulk resync that follows covers them"
        ),
        other => tracing::warn!(%peer, "sync with {peer}: {other:?}"),
    }
}
