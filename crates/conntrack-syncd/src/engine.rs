//! The I/O shell around the sync protocol: kernel conntrack events and the
//! UDP socket on the cluster link in, the [`SyncPeer`]'s actions out. One
//! task owns everything, so no lock is held anywhere.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use futures::FutureExt as _;
use tandem_config::{Config, Farm, Forwarding, Protocol};
use tandem_conntrack::{Event, EventGroup, EventSocket, EventStream, Filter, Service};
use tandem_proto::v1::{self, SyncRole};
use tandem_runtime::{ConfigCell, Shutdown};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};

use crate::kernel::{Mode, Replica};
use crate::sync::{
    Action, LogEvent, PeerState, Record, ResyncState, SyncConfig, SyncKey, SyncPeer,
};

/// How often the sender sends its non-TCP flows again: the kernel reports
/// no event when a UDP flow's timeout is merely refreshed by traffic, so
/// without this the backup's copy would expire under a live flow.
const REFRESH_INTERVAL: Duration = Duration::from_secs(20);
/// Send and receive buffers of the sync socket.
const SOCKET_BUFFER: usize = 8 << 20;
/// Status (and /metrics) lag the engine by at most this much while events
/// stream in: building it on every event would cost about as much as
/// handling the event.
const STATUS_INTERVAL: Duration = Duration::from_millis(20);
/// Most kernel events handed to the protocol in one turn of the loop.
const EVENT_BATCH: usize = 256;

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
}

/// Everything the engine needs, derived from the configuration.
struct Setup {
    local: SocketAddr,
    peer: SocketAddr,
    key: SyncKey,
    filter: Filter,
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

fn setup(config: &Config, config_dir: &Path) -> anyhow::Result<Setup> {
    let cluster = config
        .cluster
        .as_ref()
        .filter(|c| c.mode.is_active_passive())
        .context("this node is standalone (no cluster.toml) or in an active-active cluster (DSR only, no connection state): there is no peer to replicate to")?;
    let peer = cluster
        .nodes
        .iter()
        .find(|n| n.name != config.node.name)
        .context("cluster.toml names no other node")?;
    let port = cluster.sync.conntrack_port;
    let local_ip = config
        .node
        .cluster_address
        .unwrap_or(if peer.address.is_ipv4() {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        } else {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        });
    let key_path = cluster.sync.key_path(config_dir).context(
        "cluster.toml [sync] key_file is not set: conntrack replication needs the cluster's shared key",
    )?;
    let bytes = std::fs::read(&key_path)
        .with_context(|| format!("reading the sync key {}", key_path.display()))?;
    let key = SyncKey::new(trim_ascii(&bytes))
        .with_context(|| format!("the sync key {}", key_path.display()))?;
    Ok(Setup {
        local: SocketAddr::new(local_ip, port),
        peer: SocketAddr::new(peer.address, port),
        key,
        filter: filter_of(config),
    })
}

/// A key file written by hand may end with a newline.
fn trim_ascii(b: &[u8]) -> &[u8] {
    b.trim_ascii()
}

pub struct Engine {
    pub config: Arc<ConfigCell>,
    pub config_dir: std::path::PathBuf,
    pub mode: Mode,
    pub commands: mpsc::Receiver<Command>,
    pub snapshot: watch::Sender<Snapshot>,
    /// The role from vrrpd (clustermanager's SetRole overrides it).
    pub vrrp_role: watch::Receiver<SyncRole>,
    pub shutdown: Shutdown,
}

impl Engine {
    /// Runs until shutdown. A configuration that does not allow replication
    /// (standalone, no key) is reported in Status and waited out: a reload
    /// that fixes it starts replication.
    pub async fn run(mut self) {
        let mut configs = self.config.subscribe();
        loop {
            let loaded = configs.borrow_and_update().clone();
            let result = match setup(&loaded.config, &self.config_dir) {
                Ok(s) => self.replicate(s, &mut configs).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(Stop::Shutdown) => return,
                Ok(Stop::Reconfigure) => continue,
                Err(e) => {
                    tracing::error!("conntrack replication is not running: {e:#}");
                    self.snapshot.send_modify(|s| {
                        s.status.last_error = format!("{e:#}");
                        s.status.set_role(SyncRole::Standalone);
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
        } = first;
        let socket =
            sync_socket(local).with_context(|| format!("binding the sync socket to {local}"))?;
        let mut replica = Replica::open(self.mode).context("opening ctnetlink")?;
        let events =
            EventSocket::open(&EventGroup::ALL).context("subscribing to conntrack events")?;
        let mut events = EventStream::new(events).context("subscribing to conntrack events")?;
        let epoch = rand::random::<u64>();
        // No flush delay: the shell hands over every event already queued
        // at once (see EVENT_BATCH), which batches a burst without making a
        // lone event wait.
        let settings = SyncConfig {
            flush_delay: Duration::ZERO,
            ..SyncConfig::default()
        };
        let mut sync = SyncPeer::new(settings, key, epoch, Instant::now())
            .context("sync protocol settings")?;
        tracing::info!(%local, %peer, mode = self.mode.as_str(), "conntrack replication started");

        let mut override_role: Option<SyncRole> = None;
        let mut role = SyncRole::Unspecified;
        let mut buf = vec![0u8; 65536];
        let mut refresh = tokio::time::interval(REFRESH_INTERVAL);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_error = String::new();
        let mut last_resync: Option<SystemTime> = None;
        // Status is published at most every STATUS_INTERVAL while events
        // stream in (a skipped one is made up when the interval ends), and
        // at once after a role change or a command.
        let mut published: Option<Instant> = None;
        let mut publish_now = true;
        let mut publish_due: Option<tokio::time::Instant> = None;
        let mut actions: VecDeque<Action> = VecDeque::new();
        loop {
            // The role: clustermanager's if it set one, else vrrpd's.
            let wanted = override_role.unwrap_or(*self.vrrp_role.borrow_and_update());
            if wanted != role {
                publish_now = true;
                let sending = wanted == SyncRole::Sender;
                tracing::info!(role = role_name(wanted), %peer, "sync direction: {}", if sending { "this node sends its flows" } else { "this node keeps the peer's flows" });
                if sending && role != SyncRole::Sender {
                    if replica.mode() == Mode::Cache {
                        let (n, took) = replica.commit();
                        tracing::info!(
                            entries = n,
                            took_us = took.as_micros() as u64,
                            "committed the cached entries on becoming master"
                        );
                    }
                    replica.adopt();
                }
                sync.set_tx_enabled(sending);
                if sending && role != SyncRole::Sender {
                    // Flows that began before this node became the sender
                    // produced no event it could send: send the table.
                    resend_table(
                        &mut replica,
                        &filter,
                        &mut sync,
                        &mut actions,
                        Instant::now(),
                        |_| true,
                    );
                }
                role = wanted;
            }
            let deadline = tokio::time::Instant::from_std(sync.next_deadline());
            let now = tokio::select! {
                ev = events.next() => {
                    let now = Instant::now();
                    // Take every event already queued, so that what arrived
                    // together leaves together, with no added delay.
                    let mut batch = vec![ev];
                    while batch.len() < EVENT_BATCH {
                        match events.next().now_or_never() {
                            Some(ev) => batch.push(ev),
                            None => break,
                        }
                    }
                    for ev in batch {
                    match ev {
                        Ok(Event::New(r)) if filter.matches(&r.entry) => actions.extend(sync.local_event(Record::New(r.entry), now)),
                        Ok(Event::Update(r)) if filter.matches(&r.entry) => actions.extend(sync.local_event(Record::Update(r.entry), now)),
                        Ok(Event::Destroy(r)) if filter.matches(&r.entry) => actions.extend(sync.local_event(Record::Destroy(r.entry.original), now)),
                        Ok(Event::Overrun) => {
                            tracing::warn!("conntrack events were lost (receive buffer overrun); sending the whole table again");
                            if sync.tx_enabled() {
                                resend_table(&mut replica, &filter, &mut sync, &mut actions, now, |_| true);
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            last_error = format!("conntrack events: {e}");
                            tracing::error!("{last_error}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                    }
                    now
                }
                r = socket.recv_from(&mut buf) => {
                    let now = Instant::now();
                    match r {
                        Ok((n, from)) if from.ip() == peer.ip() => actions.extend(sync.datagram_received(&buf[..n], now)),
                        Ok((_, from)) => tracing::debug!(%from, "datagram from a stranger dropped"),
                        Err(e) => tracing::debug!("sync socket: {e}"),
                    }
                    now
                }
                () = async {
                    if let Some(at) = publish_due {
                        tokio::time::sleep_until(at).await;
                    }
                }, if publish_due.is_some() => {
                    publish_now = true;
                    Instant::now()
                }
                () = tokio::time::sleep_until(deadline) => {
                    let now = Instant::now();
                    actions.extend(sync.tick(now));
                    now
                }
                _ = refresh.tick() => {
                    let now = Instant::now();
                    if sync.tx_enabled() {
                        resend_table(&mut replica, &filter, &mut sync, &mut actions, now, |e| e.original.protocol != 6);
                    }
                    now
                }
                r = self.vrrp_role.changed() => {
                    if r.is_err() { return Ok(Stop::Shutdown); }
                    Instant::now()
                }
                Some(cmd) = self.commands.recv() => {
                    let now = Instant::now();
                    publish_now = true;
                    match cmd {
                        Command::Resync(done) => {
                            actions.extend(sync.resync_requested_by_operator(now));
                            let _ = done.send(());
                        }
                        Command::Flush(done) => {
                            let n = replica.flush();
                            tracing::info!(entries = n, "replicated entries flushed by the operator");
                            let _ = done.send(n);
                        }
                        Command::Commit(done) => {
                            let (n, took) = replica.commit();
                            tracing::info!(entries = n, took_us = took.as_micros() as u64, "cached entries committed to the kernel");
                            let _ = done.send((n, took));
                        }
                        Command::SetRole(r, done) => {
                            override_role = (r != SyncRole::Unspecified).then_some(r);
                            let _ = done.send(());
                        }
                    }
                    now
                }
                r = configs.changed() => {
                    if r.is_err() { return Ok(Stop::Shutdown); }
                    let loaded = configs.borrow_and_update().clone();
                    match setup(&loaded.config, &self.config_dir) {
                        Ok(s) if s.local == local && s.peer == peer => {
                            // Farms changed: only the filter follows.
                            filter = s.filter;
                            Instant::now()
                        }
                        _ => {
                            tracing::info!("cluster settings changed: restarting conntrack replication");
                            return Ok(Stop::Reconfigure);
                        }
                    }
                }
                () = self.shutdown.wait() => return Ok(Stop::Shutdown),
            };

            // A deadline already due (a flush, an ack) is met now rather
            // than through the timer, whose 1 ms resolution would delay
            // every datagram.
            if sync.next_deadline() <= now {
                actions.extend(sync.tick(now));
            }
            // Carry out what the protocol asked, including what that yields.
            while let Some(action) = actions.pop_front() {
                match action {
                    Action::Send(bytes) => {
                        if let Err(e) = socket.send_to(&bytes, peer).await {
                            tracing::debug!(%peer, "sync send: {e}");
                        }
                    }
                    Action::Apply(record) => {
                        if role == SyncRole::Sender {
                            // A master keeps its own flows; the peer's copy
                            // of them is not applied back.
                            continue;
                        }
                        if let Err(e) = replica.apply(record) {
                            last_error = e.to_string();
                            tracing::warn!(%peer, "replicated entry not applied: {e}");
                        }
                    }
                    Action::DumpLocalTable => {
                        let entries = match replica.dump() {
                            Ok(records) => records
                                .into_iter()
                                .map(|r| r.entry)
                                .filter(|e| filter.matches(e))
                                .collect(),
                            Err(e) => {
                                last_error = format!("dumping the conntrack table: {e}");
                                tracing::error!("{last_error}");
                                Vec::new()
                            }
                        };
                        actions.extend(sync.bulk_dump(entries, now));
                    }
                    Action::PeerAlive { epoch } => {
                        tracing::info!(%peer, epoch = format!("{epoch:016x}"), "sync peer alive");
                    }
                    Action::PeerDead { reason } => {
                        tracing::warn!(%peer, "sync peer dead: {reason}");
                    }
                    Action::ResyncStarted => {
                        tracing::info!(%peer, "bulk resync from the peer started");
                        replica.resync_started();
                    }
                    Action::ResyncComplete { records } => {
                        let stale = replica.resync_complete();
                        last_resync = Some(SystemTime::now());
                        tracing::info!(%peer, records, stale_removed = stale, "bulk resync from the peer complete");
                    }
                    Action::Log(ev) => log_event(&peer, ev),
                }
            }
            if publish_now || published.is_none_or(|t| now.duration_since(t) >= STATUS_INTERVAL) {
                self.publish(&sync, &replica, role, &peer, &last_error, last_resync);
                published = Some(now);
                publish_now = false;
                publish_due = None;
            } else if publish_due.is_none() {
                publish_due =
                    published.map(|t| tokio::time::Instant::from_std(t + STATUS_INTERVAL));
            }
        }
    }

    fn publish(
        &self,
        sync: &SyncPeer,
        replica: &Replica,
        role: SyncRole,
        peer: &SocketAddr,
        last_error: &str,
        last_resync: Option<SystemTime>,
    ) {
        let st = sync.status();
        let c = &st.counters;
        // The API adds the daemon's own info when it answers.
        let mut status = v1::ConntrackSyncStatus {
            peer: peer.to_string(),
            peer_alive: st.peer == PeerState::Alive,
            tx_sequence: st.tx_next_seq,
            rx_sequence: st.rx_next_seq,
            entries_cached: replica.cached() as u64,
            entries_injected: replica.injected() as u64,
            datagrams_lost: c.lost,
            retransmissions: c.retransmissions,
            datagrams_rejected: c.rejected_authentication
                + c.rejected_version
                + c.rejected_malformed,
            last_resync_unix_ms: last_resync.map_or(0, tandem_runtime::unix_ms),
            resync_complete: !matches!(st.resync, ResyncState::Requested | ResyncState::InProgress),
            last_error: last_error.to_owned(),
            mode: replica.mode().as_str().to_owned(),
            epoch: st.epoch,
            peer_epoch: st.peer_epoch.unwrap_or(0),
            records_sent: c.records_sent,
            records_received: c.records_received,
            resyncs_completed: c.resyncs_completed,
            apply_errors: replica.apply_errors,
            ..Default::default()
        };
        status.set_role(role);
        self.snapshot.send_modify(|s| {
            s.status = status;
            s.sync = Some(st);
        });
    }
}

/// The UDP socket on the cluster link, with buffers large enough for a
/// bulk resync (thousands of datagrams handed over in one turn).
fn sync_socket(local: SocketAddr) -> std::io::Result<UdpSocket> {
    let domain = if local.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    // Best effort: the kernel caps them at wmem_max / rmem_max.
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    s.set_nonblocking(true)?;
    s.bind(&local.into())?;
    UdpSocket::from_std(s.into())
}

/// Sends the local table again as updates (after lost events, or to
/// refresh the peer's timeouts).
fn resend_table(
    replica: &mut Replica,
    filter: &Filter,
    sync: &mut SyncPeer,
    actions: &mut VecDeque<Action>,
    now: Instant,
    which: impl Fn(&tandem_conntrack::Entry) -> bool,
) {
    match replica.dump() {
        Ok(records) => {
            for r in records {
                if filter.matches(&r.entry) && which(&r.entry) {
                    actions.extend(sync.local_event(Record::Update(r.entry), now));
                }
            }
        }
        Err(e) => tracing::error!("dumping the conntrack table: {e}"),
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
            tracing::warn!(%peer, reason = reason.as_str(), suppressed, "sync datagram rejected: {error}")
        }
        LogEvent::PeerRestarted {
            old_epoch,
            new_epoch,
        } => tracing::info!(
            %peer,
            old_epoch = format!("{old_epoch:016x}"),
            new_epoch = format!("{new_epoch:016x}"),
            "sync peer restarted"
        ),
        LogEvent::ResyncRequested { cause } => {
            tracing::info!(%peer, ?cause, "asked the peer for its whole table")
        }
        LogEvent::BulkSending { cause } => {
            tracing::info!(%peer, ?cause, "sending the whole table to the peer")
        }
        LogEvent::BulkSent { records } => tracing::info!(%peer, records, "whole table sent"),
        other => tracing::warn!(%peer, "sync: {other:?}"),
    }
}
