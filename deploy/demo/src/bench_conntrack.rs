//! conntrack-syncd against conntrackd, in the same lab and the same run
//! (issue #5, item 6): the two-node cluster of tests/conntrack_lab.rs
//! (client, lb1 master and lb2 backup running vrrpd and lb-forwarder, three
//! backends, cluster link 192.168.100.0/24 on eth2), with one sync daemon
//! at a time on UDP port 3780 of the cluster link:
//!
//! - conntrack-syncd, inject mode (entries go into the backup's kernel
//!   table as they arrive; the default),
//! - conntrack-syncd, cache mode (committed when the node becomes master),
//! - conntrackd 1.4 FTFW with its external cache, committed with
//!   `conntrackd -c` right after the VIP moved (as a keepalived notify
//!   script does),
//! - conntrackd FTFW with `DisableExternalCache on` (inject).
//!
//! For each: replication lag (client's connect() returning → entry present
//! on the backup), new connections per second replicated and lost, CPU of
//! the sync daemons during that load, the commit cost of the cache modes,
//! and 100 long-lived connections across the master's death
//! (nf_conntrack_tcp_loose = 0 on the backup). Prints tables.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use comfy_table::{Table, presets};
use tandem_conntrack::{Conntrack, Tuple};
use tandem_e2e::conntrack_lab::{ClusterLab, SYNC_PORT, VIP, echo};

use tandem_proto::v1;

/// Length of the as-fast-as-possible connection run.
const RATE_RUN: Duration = Duration::from_secs(2);
/// Client threads opening connections during the rate run.
const RATE_THREADS: usize = 2;
/// Connections whose replication lag is measured, one after the other.
const LAG_SAMPLES: usize = 300;
/// Long-lived connections across the failover.
const FAILOVER_CONNS: usize = 100;
/// After the kill, connection `i` sends its first probe at `i` × this: the
/// first echo is then seen with this resolution rather than at the TCP
/// retransmission timer's steps.
const PROBE_STAGGER: Duration = Duration::from_millis(10);
/// USER_HZ: the unit of utime/stime in /proc/<pid>/stat on Linux.
const CLOCK_TICKS: f64 = 100.0;

#[path = "bench_conntrack_load.rs"]
mod load;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Peer {
    SyncdInject,
    SyncdCache,
    ConntrackdCache,
    ConntrackdInject,
    /// No sync daemon at all (the datapath's own figure).
    NoSync,
    /// No sync daemon, but a minimal reader of the master's conntrack
    /// events (read and decoded a millisecond's worth at a time, as
    /// conntrack-syncd does; nothing kept, nothing sent): the floor that
    /// any replication driven by ctnetlink events pays on the master.
    EventSink,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::SyncdInject => "conntrack-syncd inject",
            Peer::SyncdCache => "conntrack-syncd cache",
            Peer::ConntrackdCache => "conntrackd FTFW ext. cache",
            Peer::ConntrackdInject => "conntrackd FTFW inject",
            Peer::NoSync => "no sync daemon",
            Peer::EventSink => "event reader only (floor)",
        }
    }

    fn daemon(self) -> &'static str {
        match self {
            Peer::SyncdInject | Peer::SyncdCache => "conntrack-syncd",
            Peer::ConntrackdCache | Peer::ConntrackdInject => "conntrackd",
            Peer::NoSync => "none",
            Peer::EventSink => "events-sink",
        }
    }

    fn is_tandem(self) -> bool {
        matches!(self, Peer::SyncdInject | Peer::SyncdCache)
    }
}

/// A conntrack-syncd gRPC client kept open (a fresh connection per call
/// would add milliseconds to every lag poll).
struct Rpc {
    rt: tokio::runtime::Runtime,
    ch: tonic::transport::Channel,
}

impl Rpc {
    fn new(runtime_dir: &Path) -> Rpc {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let ch = rt
            .block_on(tandem_runtime::connect(runtime_dir, "conntrack-syncd"))
            .expect("connect to conntrack-syncd");
        Rpc { rt, ch }
    }

    fn client(&self) -> v1::conntrack_sync_client::ConntrackSyncClient<tonic::transport::Channel> {
        v1::conntrack_sync_client::ConntrackSyncClient::new(self.ch.clone())
    }

    fn status(&self) -> v1::ConntrackSyncStatus {
        self.rt
            .block_on(self.client().status(v1::StatusRequest {}))
            .expect("conntrack-syncd status")
            .into_inner()
    }

    fn commit(&self) -> v1::CommitReply {
        self.rt
            .block_on(self.client().commit(v1::CommitRequest {}))
            .expect("conntrack-syncd commit")
            .into_inner()
    }
}

/// One lab with one kind of sync daemon running.
struct Bench {
    peer: Peer,
    lab: ClusterLab,
    dir: tempfile::TempDir,
    /// The backup's conntrack-syncd API (Tandem peers).
    backup_rpc: Option<Rpc>,
    /// ctnetlink in the backup's namespace, for the lag polls.
    backup_ct: Conntrack,
}

fn conntrackd_dir(dir: &Path, node: &str) -> PathBuf {
    dir.join(format!("conntrackd-{node}"))
}

/// conntrackd.conf for node `i` (1 or 2) of the lab: FTFW over UDP on the
/// cluster link, its own socket, lock and log in `dir`; only TCP and UDP,
/// none of the nodes' own addresses (so neither VRRP nor the sync traffic
/// itself) — what conntrackd's filter can express of Tandem's "the farms'
/// flows only" (its Address filter matches the original and reply source,
/// not the VIP).
fn conntrackd_conf(dir: &Path, i: u8, inject: bool) -> String {
    let peer = 3 - i;
    let d = dir.display();
    let external = if inject { "on" } else { "off" };
    format!(
        "Sync {{
    Mode FTFW {{
        DisableExternalCache {external}
    }}
    UDP {{
        IPv4_address 192.168.100.{i}
        IPv4_Destination_Address 192.168.100.{peer}
        Port {SYNC_PORT}
        Interface eth2
        SndSocketBuffer 1249280
        RcvSocketBuffer 1249280
        Checksum on
    }}
}}
General {{
    HashSize 32768
    HashLimit 262144
    LogFile {d}/conntrackd.log
    Syslog off
    LockFile {d}/conntrackd.lock
    UNIX {{
        Path {d}/conntrackd.ctl
    }}
    NetlinkBufferSize 2097152
    NetlinkBufferSizeMaxGrowth 8388608
    NetlinkOverrunResync on
    Filter From Userspace {{
        Protocol Accept {{
            TCP
            UDP
        }}
        Address Ignore {{
            IPv4_address 127.0.0.1
            IPv4_address 192.168.100.0/24
            IPv4_address 10.0.0.1
            IPv4_address 10.0.0.2
            IPv4_address 10.1.0.1
            IPv4_address 10.1.0.2
        }}
    }}
}}
"
    )
}

/// Starts a daemon in a node's namespace with its log in `logs`, and keeps
/// it with the node's daemons (so `kill_node` kills it too).
fn start(lab: &mut ClusterLab, logs: &Path, node: &str, daemon: &'static str, extra: &[&str]) {
    let log = File::create(logs.join(format!("{node}-{daemon}.log"))).expect("log file");
    let n = lab.nodes.iter_mut().find(|n| n.name == node).expect("node");
    let (mut cmd, socket) = if daemon == "events-sink" {
        let mut cmd = Command::new(std::env::current_exe().expect("this program's path"));
        cmd.arg(EVENTS_SINK);
        (cmd, None)
    } else if daemon == "conntrackd" {
        let dir = conntrackd_dir(logs, node);
        let mut cmd = Command::new("conntrackd");
        cmd.arg("-C").arg(dir.join("conntrackd.conf"));
        (cmd, Some(dir.join("conntrackd.ctl")))
    } else {
        let mut cmd = Command::new(tandem_e2e::bin(daemon));
        cmd.arg("--config-dir")
            .arg(&n.config_dir)
            .arg("--runtime-dir")
            .arg(&n.runtime_dir)
            .arg("--state-dir")
            .arg(tandem_e2e::state_dir_beside(&n.runtime_dir))
            .env("RUST_LOG", "info")
            .env_remove("JOURNAL_STREAM");
        (cmd, Some(n.runtime_dir.join(format!("{daemon}.sock"))))
    };
    cmd.args(extra);
    if daemon == "conntrack-syncd" {
        // TANDEM_BENCH_SYNCD_ARGS: extra arguments, e.g. "--nice -10", to
        // measure a setting against the shipped default.
        let more = std::env::var("TANDEM_BENCH_SYNCD_ARGS").unwrap_or_default();
        cmd.args(more.split_whitespace());
    }
    cmd.stdout(Stdio::null()).stderr(log);
    let child = lab.lab.spawn(&n.ns, &mut cmd).expect("spawn daemon");
    match socket {
        Some(socket) => tandem_lab::wait_for_unix_socket(&socket, Duration::from_secs(10))
            .expect("daemon serving"),
        // No socket to wait for (the events sink): subscribed before the
        // traffic starts (Bench::new waits further).
        None => std::thread::sleep(Duration::from_millis(200)),
    }
    if daemon == "conntrackd" && std::env::var_os("TANDEM_BENCH_CONNTRACKD_NICE").is_some() {
        // conntrackd makes itself real-time (SCHED_RR 99) at start, and its
        // configuration offers no other choice; this puts it where
        // conntrack-syncd runs (the normal scheduler, niceness -10), so that
        // it does not starve the load generator.
        demote_to_nice(child.pid().as_raw(), -10);
    }
    n.daemons.push((daemon, child));
}

/// Moves a process (one thread) from a real-time scheduler to the normal
/// one at `nice`.
fn demote_to_nice(pid: i32, nice: i32) {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain syscalls on a PID this bench started; `param` outlives
    // the call.
    let (sched, prio) = unsafe {
        (
            libc::sched_setscheduler(pid, libc::SCHED_OTHER, &raw const param),
            libc::setpriority(libc::PRIO_PROCESS, pid as libc::id_t, nice),
        )
    };
    assert!(
        sched == 0 && prio == 0,
        "moving PID {pid} to the normal scheduler at nice {nice}: {}",
        std::io::Error::last_os_error()
    );
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after ')'.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    ticks as f64 / CLOCK_TICKS
}

/// A new connection to the VIP from `src`, closed with RST when dropped (no
/// TIME_WAIT, so the client's ports recycle).
fn connect(src: IpAddr, reset_on_close: bool) -> std::io::Result<TcpStream> {
    let dst: SocketAddr = SocketAddr::new(VIP.parse().expect("VIP"), 80);
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    if reset_on_close {
        s.set_linger(Some(Duration::ZERO))?;
    }
    s.bind(&SocketAddr::new(src, 0).into())?;
    s.connect_timeout(&dst.into(), Duration::from_secs(2))?;
    let s: TcpStream = s.into();
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    Ok(s)
}

/// One line out, the same line back, or why not.
fn echo_checked(mut s: &TcpStream, text: &str) -> Result<(), String> {
    // One write, one segment (nodelay): a reset then shows on the read.
    s.write_all(format!("{text}\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| format!("read: {e}"))?;
    match line.trim_end() {
        l if l == text => Ok(()),
        "" => Err("closed by the peer".into()),
        _ => Err(format!("wrong bytes back: {:.40}", line.trim_end())),
    }
}

fn client_source(i: usize) -> IpAddr {
    IpAddr::from([10, 0, 0, 50 + (i % 8) as u8])
}

fn original_tuple(s: &TcpStream) -> Option<Tuple> {
    let local = s.local_addr().ok()?;
    Some(Tuple {
        src: local.ip(),
        dst: VIP.parse().ok()?,
        protocol: 6,
        src_port: local.port(),
        dst_port: 80,
    })
}

#[derive(Default)]
struct Figures {
    lag: Vec<Duration>,
    lag_missed: usize,
    offered: usize,
    /// Distinct (source address, port): a port the client reused while the
    /// flow's entry was still in CLOSE is one entry, not two.
    distinct: usize,
    rate_run: Duration,
    on_master: usize,
    on_backup: usize,
    drain: Duration,
    /// Percent of one core over the run and the catch-up.
    cpu_master: f64,
    cpu_backup: f64,
    /// CPU time per distinct flow, µs.
    cpu_master_per_flow: f64,
    cpu_backup_per_flow: f64,
    /// Entries committed and the daemon's own figure for the time taken.
    commit: Option<(u64, Duration)>,
    /// conntrackd: the `conntrackd -c` client's run, start to exit.
    commit_wall: Option<Duration>,
    replicated_before_kill: bool,
    survived: usize,
    vip_moved: Option<Duration>,
    first_echo: Option<Duration>,
    failover_commit: Option<(u64, Duration)>,
    failover_commit_wall: Option<Duration>,
}

impl Bench {
    fn new(peer: Peer) -> Bench {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut lab = ClusterLab::new();
        // Without this the backup silently adopts TCP flows mid-stream and
        // the survival figure could not fail.
        lab.node("lb2")
            .ns
            .sysctl("net.netfilter.nf_conntrack_tcp_loose", "0")
            .expect("tcp_loose");
        for (i, node) in [(1u8, "lb1"), (2, "lb2")] {
            start(&mut lab, dir.path(), node, "lb-forwarder", &[]);
            match peer {
                Peer::SyncdInject => start(&mut lab, dir.path(), node, "conntrack-syncd", &[]),
                Peer::SyncdCache => start(
                    &mut lab,
                    dir.path(),
                    node,
                    "conntrack-syncd",
                    &["--mode", "cache"],
                ),
                Peer::ConntrackdCache | Peer::ConntrackdInject => {
                    let cdir = conntrackd_dir(dir.path(), node);
                    std::fs::create_dir_all(&cdir).expect("conntrackd dir");
                    std::fs::write(
                        cdir.join("conntrackd.conf"),
                        conntrackd_conf(&cdir, i, peer == Peer::ConntrackdInject),
                    )
                    .expect("conntrackd.conf");
                    start(&mut lab, dir.path(), node, "conntrackd", &[]);
                }
                Peer::NoSync => {}
                Peer::EventSink => {
                    if node == "lb1" {
                        start(&mut lab, dir.path(), node, "events-sink", &[]);
                    }
                }
            }
        }
        start(&mut lab, dir.path(), "lb1", "vrrpd", &[]);
        lab.wait_for("lb1 to become master", Duration::from_secs(10), |l| {
            l.holds_vip("lb1")
        });
        start(&mut lab, dir.path(), "lb2", "vrrpd", &[]);
        lab.wait_for("lb2 to become backup", Duration::from_secs(10), |l| {
            l.vrrp_state("lb2") == v1::VrrpState::Backup
        });
        let backup_rpc = peer.is_tandem().then(|| {
            lab.wait_for(
                "the sync peers to see each other",
                Duration::from_secs(10),
                |l| {
                    let (a, b) = (l.conntrack_status("lb1"), l.conntrack_status("lb2"));
                    a.peer_alive
                        && b.peer_alive
                        && a.role() == v1::SyncRole::Sender
                        && b.role() == v1::SyncRole::Receiver
                },
            );
            Rpc::new(&lab.node("lb2").runtime_dir)
        });
        let backup_ct = lab
            .node("lb2")
            .ns
            .run(Conntrack::open)
            .expect("backup netns")
            .expect("ctnetlink in the backup");
        for i in 60..68 {
            lab.client
                .add_address("eth0", &format!("10.0.0.{i}/24"))
                .expect("client address");
        }
        // Let VRRP settle (lb2 hears lb1's adverts) before traffic starts.
        std::thread::sleep(Duration::from_millis(500));
        Bench {
            peer,
            lab,
            dir,
            backup_rpc,
            backup_ct,
        }
    }

    /// conntrack-syncd's Status on a node (None for the other daemons).
    fn sync_status(&self, node: &str) -> Option<v1::ConntrackSyncStatus> {
        self.peer
            .is_tandem()
            .then(|| self.lab.conntrack_status(node))
    }

    fn pid(&self, node: &str) -> i32 {
        self.lab
            .node(node)
            .daemons
            .iter()
            .find(|(d, _)| *d == self.peer.daemon())
            .map(|(_, c)| c.pid().as_raw())
            .expect("sync daemon running")
    }

    /// conntrackd's client command on a node (`-C` its config).
    fn conntrackd(&self, node: &str, args: &[&str]) -> String {
        let conf = conntrackd_dir(self.dir.path(), node).join("conntrackd.conf");
        let conf = conf.to_string_lossy().into_owned();
        let mut all = vec!["-C", conf.as_str()];
        all.extend_from_slice(args);
        let out = self
            .lab
            .node(node)
            .ns
            .exec("conntrackd", &all)
            .expect("conntrackd client");
        if !out.status.success() {
            eprintln!(
                "  conntrackd {} on {node} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Entries of flows to the VIP the backup holds, wherever its sync
    /// daemon keeps them.
    fn backup_count(&self) -> usize {
        match self.peer {
            Peer::SyncdInject | Peer::ConntrackdInject | Peer::NoSync | Peer::EventSink => {
                self.lab.vip_entries("lb2")
            }
            Peer::SyncdCache => self
                .backup_rpc
                .as_ref()
                .map_or(0, |r| r.status().entries_cached as usize),
            Peer::ConntrackdCache => self
                .conntrackd("lb2", &["-e"])
                .lines()
                .filter(|l| l.contains("dst=10.0.0.100 "))
                .count(),
        }
    }

    /// Whether the backup holds the entry of this connection.
    fn backup_has(&mut self, t: &Tuple, cached_before: usize) -> bool {
        match self.peer {
            Peer::SyncdInject | Peer::ConntrackdInject | Peer::NoSync | Peer::EventSink => {
                matches!(self.backup_ct.get(t), Ok(Some(_)))
            }
            // The cache is not listed by the API: one more entry than
            // before this (only) new connection.
            Peer::SyncdCache => self.backup_count() > cached_before,
            Peer::ConntrackdCache => {
                let needle = format!("src={} dst={VIP} sport={} ", t.src, t.src_port);
                self.conntrackd("lb2", &["-e"]).contains(&needle)
            }
        }
    }

    /// Whether the backup holds every one of these flows (`cached_before`:
    /// the cache's size before they were opened, for conntrack-syncd's cache
    /// whose content the API does not list).
    fn backup_has_all(&mut self, tuples: &[Tuple], cached_before: usize) -> bool {
        match self.peer {
            Peer::SyncdInject | Peer::ConntrackdInject | Peer::NoSync | Peer::EventSink => tuples
                .iter()
                .all(|t| matches!(self.backup_ct.get(t), Ok(Some(_)))),
            Peer::SyncdCache => self.backup_count() >= cached_before + tuples.len(),
            Peer::ConntrackdCache => {
                let cache = self.conntrackd("lb2", &["-e"]);
                tuples.iter().all(|t| {
                    cache.contains(&format!("src={} dst={VIP} sport={} ", t.src, t.src_port))
                })
            }
        }
    }

    /// Replication lag, one connection at a time: from connect() returning
    /// on the client to the entry being present on the backup. The
    /// connections stay open (so no entry leaves the tables meanwhile).
    fn lag(&mut self, fig: &mut Figures) -> Vec<TcpStream> {
        let (to_poller, from_client) = mpsc::channel::<(Tuple, Instant)>();
        let (ack, acked) = mpsc::channel::<()>();
        let client = self
            .lab
            .client
            .spawn_thread(move || {
                let mut kept = Vec::new();
                for i in 0..LAG_SAMPLES {
                    let Ok(s) = connect(client_source(i), true) else {
                        continue;
                    };
                    let t0 = Instant::now();
                    let Some(t) = original_tuple(&s) else {
                        continue;
                    };
                    kept.push(s);
                    if to_poller.send((t, t0)).is_err() || acked.recv().is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                kept
            })
            .expect("client thread");
        let mut count = self.backup_count();
        while let Ok((t, t0)) = from_client.recv() {
            let deadline = t0 + Duration::from_secs(2);
            loop {
                if self.backup_has(&t, count) {
                    fig.lag.push(t0.elapsed());
                    break;
                }
                if Instant::now() > deadline {
                    fig.lag_missed += 1;
                    break;
                }
                std::thread::sleep(Duration::from_micros(50));
            }
            if self.peer == Peer::SyncdCache {
                count = self.backup_count();
            }
            if ack.send(()).is_err() {
                break;
            }
        }
        drop(ack);
        client.join().expect("client thread").expect("client netns")
    }

    /// New connections as fast as the client opens them (each reads the
    /// backend's greeting, then is reset), then the entries on master and
    /// backup once the backup stops gaining any; CPU of both sync daemons
    /// over that whole time.
    fn rate(&mut self, fig: &mut Figures) {
        let master0 = self.lab.vip_entries("lb1");
        let backup0 = self.backup_count();
        let (pm, pb) = (self.pid("lb1"), self.pid("lb2"));
        let (cm0, cb0) = (cpu_seconds(pm), cpu_seconds(pb));
        let started = Instant::now();
        let threads: Vec<_> = (0..RATE_THREADS)
            .map(|t| {
                self.lab
                    .client
                    .spawn_thread(move || {
                        let deadline = Instant::now() + RATE_RUN;
                        let mut n = 0usize;
                        let mut flows = HashSet::new();
                        let mut i = t;
                        while Instant::now() < deadline {
                            i += RATE_THREADS;
                            let Ok(s) = connect(client_source(i), true) else {
                                continue;
                            };
                            if let Ok(local) = s.local_addr() {
                                flows.insert(local);
                            }
                            let mut line = String::new();
                            if BufReader::new(&s).read_line(&mut line).is_ok() && !line.is_empty() {
                                n += 1;
                            }
                        }
                        (n, flows)
                    })
                    .expect("client thread")
            })
            .collect();
        let mut flows = HashSet::new();
        for h in threads {
            if let Some((n, f)) = h.join().ok().and_then(Result::ok) {
                fig.offered += n;
                flows.extend(f);
            }
        }
        fig.distinct = flows.len();
        fig.rate_run = started.elapsed();
        fig.on_master = self.lab.vip_entries("lb1").saturating_sub(master0);
        // Wait until the backup has them all, or stops gaining for 1 s.
        let mut last = self.backup_count();
        let mut last_change = Instant::now();
        while last < backup0 + fig.on_master && last_change.elapsed() < Duration::from_secs(1) {
            std::thread::sleep(Duration::from_millis(100));
            let n = self.backup_count();
            if n != last {
                last = n;
                last_change = Instant::now();
            }
        }
        fig.on_backup = last.saturating_sub(backup0);
        fig.drain = started.elapsed();
        let wall = fig.drain.as_secs_f64();
        let (dm, db) = (cpu_seconds(pm) - cm0, cpu_seconds(pb) - cb0);
        fig.cpu_master = dm / wall * 100.0;
        fig.cpu_backup = db / wall * 100.0;
        let flows = fig.distinct.max(1) as f64;
        fig.cpu_master_per_flow = dm * 1e6 / flows;
        fig.cpu_backup_per_flow = db * 1e6 / flows;
    }

    /// The cache modes: commit what the backup holds now (mostly the rate
    /// run's entries), for the cost per entry, then start the failover with
    /// an empty cache.
    fn commit(&mut self, fig: &mut Figures) {
        match self.peer {
            Peer::SyncdCache => {
                if let Some(rpc) = &self.backup_rpc {
                    let r = rpc.commit();
                    fig.commit = Some((r.entries_committed, Duration::from_micros(r.duration_us)));
                }
            }
            Peer::ConntrackdCache => {
                let t = Instant::now();
                self.conntrackd("lb2", &["-c"]);
                fig.commit_wall = Some(t.elapsed());
                fig.commit = self.conntrackd_logged_commit("lb2");
                self.conntrackd("lb2", &["-f", "external"]);
            }
            Peer::SyncdInject | Peer::ConntrackdInject | Peer::NoSync | Peer::EventSink => {}
        }
    }

    /// 100 long-lived connections; the master dies; how many continue with
    /// their bytes intact on the backup, and when the first echo came back.
    fn failover(&mut self, fig: &mut Figures) {
        let before = self.backup_count();
        // From addresses no other phase used: a port the client reuses
        // while the backup still holds the earlier flow's entry (CLOSE,
        // 10 s) is another matter than the failover itself.
        let mut conns: Vec<TcpStream> = self
            .lab
            .client
            .run(|| {
                (0..FAILOVER_CONNS)
                    .map(|i| {
                        let s = connect(IpAddr::from([10, 0, 0, 60 + (i % 8) as u8]), false)?;
                        let mut name = String::new();
                        BufReader::new(&s).read_line(&mut name)?;
                        Ok(s)
                    })
                    .collect::<std::io::Result<Vec<_>>>()
            })
            .expect("client netns")
            .expect("connections to the VIP");
        let tuples: Vec<Tuple> = conns.iter().filter_map(original_tuple).collect();
        for (i, s) in conns.iter_mut().enumerate() {
            assert!(
                echo(s, &format!("before {i}")).is_some(),
                "connection {i} before failover"
            );
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.backup_has_all(&tuples, before) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        fig.replicated_before_kill = self.backup_has_all(&tuples, before);

        let killed = Instant::now();
        self.lab.kill_node("lb1");
        let probes: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                std::thread::spawn(move || {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(8)));
                    std::thread::sleep(PROBE_STAGGER * i as u32);
                    let sent = killed.elapsed();
                    let outcome = echo_checked(&s, &format!("probe {i}"))
                        .map(|()| killed.elapsed())
                        .and_then(|first| {
                            echo_checked(&s, &format!("after {i} {}", "x".repeat(1000)))
                                .map(|()| first)
                        });
                    (i, sent, outcome)
                })
            })
            .collect();
        // Meanwhile: when the VIP reaches the backup (and, for conntrackd's
        // external cache, commit it then, as a keepalived notify script does).
        let deadline = killed + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.lab.holds_vip("lb2") {
                fig.vip_moved = Some(killed.elapsed());
                if self.peer == Peer::ConntrackdCache {
                    let t = Instant::now();
                    self.conntrackd("lb2", &["-c"]);
                    fig.failover_commit_wall = Some(t.elapsed());
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        for p in probes {
            let Ok((i, sent, outcome)) = p.join() else {
                continue;
            };
            match outcome {
                Ok(first) => {
                    fig.survived += 1;
                    fig.first_echo = Some(fig.first_echo.map_or(first, |e| e.min(first)));
                }
                Err(e) => eprintln!(
                    "  connection {i} (first probe {} ms after the kill) broke: {e}",
                    sent.as_millis()
                ),
            }
        }
        fig.failover_commit = match self.peer {
            Peer::SyncdCache => self.logged_commit(),
            Peer::ConntrackdCache => self.conntrackd_logged_commit("lb2"),
            Peer::SyncdInject | Peer::ConntrackdInject | Peer::NoSync | Peer::EventSink => None,
        };
    }

    /// conntrackd's own account of its last commit: "Committed N new
    /// entries" and "commit has taken S seconds" in its log.
    fn conntrackd_logged_commit(&self, node: &str) -> Option<(u64, Duration)> {
        let log =
            std::fs::read_to_string(conntrackd_dir(self.dir.path(), node).join("conntrackd.log"))
                .ok()?;
        let after = |marker: &str| -> Option<&str> {
            let line = log.lines().rev().find(|l| l.contains(marker))?;
            line.split(marker).nth(1)?.split_whitespace().next()
        };
        let n = after("Committed ")?.parse().ok()?;
        let secs: f64 = after("commit has taken ")?.parse().ok()?;
        Some((n, Duration::from_secs_f64(secs)))
    }

    /// conntrack-syncd's own log line of the commit it did on becoming
    /// master: "committed the cached entries on becoming master entries=N took_us=T".
    fn logged_commit(&self) -> Option<(u64, Duration)> {
        let log = std::fs::read_to_string(self.dir.path().join("lb2-conntrack-syncd.log")).ok()?;
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("committed the cached entries on becoming master"))?;
        let field = |name: &str| -> Option<u64> {
            let rest = line.split(&format!("{name}=")).nth(1)?;
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        };
        Some((field("entries")?, Duration::from_micros(field("took_us")?)))
    }
}

fn run(peer: Peer) -> Figures {
    eprintln!("== {}", peer.name());
    let mut bench = Bench::new(peer);

    let mut fig = Figures::default();
    let lag_conns = bench.lag(&mut fig);
    eprintln!(
        "  lag: {} samples, {} missed",
        fig.lag.len(),
        fig.lag_missed
    );
    bench.rate(&mut fig);
    eprintln!(
        "  rate: {} connections in {:?}, master +{}, backup +{}",
        fig.offered, fig.rate_run, fig.on_master, fig.on_backup
    );
    drop(lag_conns);
    bench.commit(&mut fig);
    bench.failover(&mut fig);
    eprintln!(
        "  failover: {}/{} survived, VIP moved {:?}, first echo {:?}",
        fig.survived, FAILOVER_CONNS, fig.vip_moved, fig.first_echo
    );
    if std::env::var_os("TANDEM_BENCH_KEEP_LOGS").is_some() {
        // The daemons' logs and conntrackd's configs outlive the run.
        eprintln!("  logs kept in {}", bench.dir.keep().display());
    }
    fig
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

fn opt_ms(d: Option<Duration>) -> String {
    d.map_or_else(
        || "-".into(),
        |d| format!("{:.0}", d.as_secs_f64() * 1000.0),
    )
}

fn per_entry(c: Option<(u64, Duration)>) -> String {
    match c {
        Some((n, d)) if n > 0 => format!(
            "{n} in {:.1} ms = {:.1} µs/entry",
            d.as_secs_f64() * 1000.0,
            d.as_secs_f64() * 1e6 / n as f64
        ),
        Some((_, d)) => format!("0 in {:.1} ms", d.as_secs_f64() * 1000.0),
        None => "-".into(),
    }
}

fn with_wall(text: String, wall: Option<Duration>) -> String {
    match wall {
        Some(w) => format!(
            "{text} ({:.1} ms with the conntrackd -c process)",
            w.as_secs_f64() * 1000.0
        ),
        None => text,
    }
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_style(presets::UTF8_FULL_CONDENSED);
    t.set_header(header.iter().copied());
    t
}

/// Rates tried by the capacity part, new entries per second, lowest first:
/// a daemon's capacity is the highest it replicates with zero loss.
const CAPACITY_RATES: [u64; 8] = [
    10_000, 25_000, 50_000, 75_000, 100_000, 125_000, 150_000, 200_000,
];

fn capacity(peers: &[Peer], secs: u64) {
    let mut rows = Vec::new();
    let mut best: Vec<(Peer, u64, f64)> = Vec::new();
    for &peer in peers {
        eprintln!("== capacity: {}", peer.name());
        let mut top = (0u64, 0.0f64);
        let rates: Vec<u64> = std::env::var("TANDEM_BENCH_RATES")
            .ok()
            .map(|v| v.split(',').filter_map(|r| r.trim().parse().ok()).collect())
            .unwrap_or_else(|| CAPACITY_RATES.to_vec());
        for rate in rates {
            let run = load::capacity_run(peer, rate, secs);
            let lossless = run.lossless();
            if lossless {
                top = (rate, run.achieved());
            }
            rows.push((peer, run));
            if !lossless {
                break;
            }
        }
        best.push((peer, top.0, top.1));
    }
    let mut t = table(&[
        "sync daemon",
        "offered /s",
        "created /s",
        "entries",
        "probes on backup",
        "zero loss",
        "CPU µs/entry master / backup",
        "lag p50 / p99 ms (probes polled)",
        "daemon's lag p50 / p99 ms",
        "datagrams",
        "changes per datagram",
        "records per datagram (daemon's count)",
        "retransmitted",
    ]);
    for (peer, r) in &rows {
        let opt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
        t.add_row([
            peer.name().to_owned(),
            r.offered.to_string(),
            format!("{:.0}", r.achieved()),
            r.created.to_string(),
            format!("{}/{}", r.probes_held, r.probes),
            if r.lossless() { "yes" } else { "no" }.to_owned(),
            format!("{:.1} / {:.1}", r.cpu_master_us, r.cpu_backup_us),
            if r.lag_missed > 0 {
                format!(
                    "{} / {} ({} not seen in 5 s)",
                    opt(r.lag_p50_ms),
                    opt(r.lag_p99_ms),
                    r.lag_missed
                )
            } else {
                format!("{} / {}", opt(r.lag_p50_ms), opt(r.lag_p99_ms))
            },
            match (r.daemon_lag_p50_ms, r.daemon_lag_p99_ms) {
                (Some(a), Some(b)) => format!("{a:.1} / {b:.1}"),
                _ => "-".to_owned(),
            },
            r.datagrams.to_string(),
            // Each entry makes a new and a destroy (it expires after 1 s).
            format!("{:.1}", 2.0 * r.created as f64 / r.datagrams.max(1) as f64),
            opt(r.records_per_datagram),
            r.retransmit_pct
                .map_or_else(|| "-".to_owned(), |p| format!("{p:.2} %")),
        ]);
    }
    println!(
        "Capacity: entries created in the master's table over ctnetlink at a set rate for {secs} s (every {}th kept 600 s and looked for on the backup, the others expire after 1 s); zero loss = every kept entry reached the backup:",
        100
    );
    println!("{t}");
    let mut s = table(&[
        "sync daemon",
        "highest zero-loss rate tried",
        "created /s at it",
    ]);
    for (peer, rate, achieved) in &best {
        s.add_row([
            peer.name().to_owned(),
            rate.to_string(),
            format!("{achieved:.0}"),
        ]);
    }
    println!("{s}");
}

fn burst(peers: &[Peer]) {
    let (flows, over) = (50_000, Duration::from_secs(10));
    let mut t = table(&[
        "sync daemon",
        "SYNs",
        "flows on master",
        "held by backup 2 s after",
        "peak RSS master / backup MB",
        "CPU µs per flow master / backup",
        "datagrams",
        "records per datagram",
        "retransmitted",
        "lag p50 / p99 ms",
        "\"peer dead\" lines",
    ]);
    for &peer in peers {
        eprintln!("== burst: {}", peer.name());
        let r = load::burst_run(peer, flows, over);
        t.add_row([
            peer.name().to_owned(),
            r.flows.to_string(),
            r.on_master.to_string(),
            format!(
                "{} ({:.2} %)",
                r.held,
                100.0 * r.held as f64 / r.on_master.max(1) as f64
            ),
            format!(
                "{:.1} / {:.1}",
                r.rss_master_kb as f64 / 1024.0,
                r.rss_backup_kb as f64 / 1024.0
            ),
            format!("{:.1} / {:.1}", r.cpu_master_us, r.cpu_backup_us),
            r.datagrams.to_string(),
            r.records_per_datagram.map_or_else(
                || {
                    format!(
                        "{:.1} (changes)",
                        2.0 * r.on_master as f64 / r.datagrams.max(1) as f64
                    )
                },
                |v| format!("{v:.1}"),
            ),
            r.retransmit_pct
                .map_or_else(|| "-".to_owned(), |p| format!("{p:.2} %")),
            match (r.lag_p50_ms, r.lag_p99_ms) {
                (Some(a), Some(b)) => format!("{a:.1} / {b:.1}"),
                _ => "-".to_owned(),
            },
            r.peer_dead_lines.to_string(),
        ]);
    }
    println!(
        "Burst: {flows} new flows through the VIP in {} s (a SYN each, half-open), the backup's table compared with the master's 2 s after:",
        over.as_secs()
    );
    println!("{t}");
}

/// New connections/s, and the sync daemons' CPU µs per connection on the
/// master and the backup.
type RateRun = (f64, f64, f64);

/// `split`: the backup's daemons on CPU 1, everything else (client,
/// backends, the master and its sync daemon) on CPU 0 — as if the backup
/// were the second machine it is in production, whose work takes nothing
/// from the master's datapath. Otherwise every process shares both cores.
fn datapath(peers: &[Peer], secs: u64, rounds: u64, split: bool) {
    let threads = 4;
    let mut configs = vec![Peer::NoSync, Peer::EventSink];
    configs.extend(
        peers
            .iter()
            .filter(|p| !matches!(p, Peer::NoSync | Peer::EventSink)),
    );
    // Interleaved rounds, so a load change on the machine falls on all.
    let mut figures: Vec<(Peer, Vec<RateRun>)> = configs.iter().map(|p| (*p, Vec::new())).collect();
    for round in 0..rounds {
        for (peer, runs) in figures.iter_mut() {
            eprintln!("== datapath cost, round {}: {}", round + 1, peer.name());
            runs.push(load::connection_rate(*peer, threads, secs, split));
        }
    }
    let mean = |runs: &[RateRun], f: fn(&RateRun) -> f64| {
        runs.iter().map(f).sum::<f64>() / runs.len().max(1) as f64
    };
    let base = figures.first().map_or(0.0, |(_, runs)| mean(runs, |r| r.0));
    let mut t = table(&[
        "configuration",
        "new conn/s, each round",
        "mean",
        "change vs no sync",
        "sync CPU µs per connection master / backup",
    ]);
    for (peer, runs) in &figures {
        let m = mean(runs, |r| r.0);
        t.add_row([
            peer.name().to_owned(),
            runs.iter()
                .map(|r| format!("{:.0}", r.0))
                .collect::<Vec<_>>()
                .join(" / "),
            format!("{m:.0}"),
            if *peer == Peer::NoSync {
                "-".to_owned()
            } else {
                format!("{:+.1} %", 100.0 * (m - base) / base.max(1e-9))
            },
            match peer {
                Peer::NoSync => "-".to_owned(),
                Peer::EventSink => format!("{:.0} / -", mean(runs, |r| r.1)),
                _ => format!("{:.0} / {:.0}", mean(runs, |r| r.1), mean(runs, |r| r.2)),
            },
        ]);
    }
    let cores = if split {
        "the backup's daemons on CPU 1, the client, backends, master and its daemon on CPU 0"
    } else {
        "every process on both cores"
    };
    println!(
        "Cost on the datapath: new TCP connections per second through the VIP ({threads} client threads for {secs} s, each reads the greeting and resets; {cores}), with and without a sync daemon, same run:"
    );
    println!("{t}");
}

/// The argument that makes this program the events sink (see
/// [`Peer::EventSink`]), started by the bench itself in the master's
/// namespace.
const EVENTS_SINK: &str = "__events-sink";

/// Reads and decodes conntrack events until killed, the way conntrack-syncd
/// does: it wakes for an event, takes every event then waiting, and lets
/// the next ones gather for a millisecond.
fn events_sink() -> ! {
    use tandem_conntrack::{EventGroup, EventSocket};
    let mut events = EventSocket::with_receive_buffer(&EventGroup::ALL, 64 << 20)
        .expect("subscribing to conntrack events");
    let fail = |e: tandem_conntrack::ConntrackError| -> ! {
        eprintln!("events sink: {e}");
        std::process::exit(1)
    };
    loop {
        match events.recv_timeout(Duration::from_secs(1)) {
            Ok(Some(_)) => loop {
                match events.try_next() {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => fail(e),
                }
            },
            Ok(None) => continue,
            Err(e) => fail(e),
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some(EVENTS_SINK) {
        events_sink();
    }
    // Usage: tandem-bench-conntrack [PART ...] [PEER ...]
    //   PART among capacity, burst, datapath, datapath-split, classic
    //   (default: all but datapath-split);
    //   PEER among syncd-inject, syncd-cache, conntrackd-cache,
    //   conntrackd-inject (default: all for classic; the inject modes for
    //   capacity and datapath). TANDEM_BENCH_CAPACITY_S (default 30) and
    //   TANDEM_BENCH_DATAPATH_S (default 10) set the run lengths.
    let wanted: Vec<String> = std::env::args().skip(1).collect();
    let part = |p: &str| {
        let parts = ["capacity", "burst", "datapath", "datapath-split", "classic"];
        (p != "datapath-split" && !wanted.iter().any(|w| parts.contains(&w.as_str())))
            || wanted.iter().any(|w| w == p)
    };
    let all = [
        ("syncd-inject", Peer::SyncdInject),
        ("syncd-cache", Peer::SyncdCache),
        ("conntrackd-cache", Peer::ConntrackdCache),
        ("conntrackd-inject", Peer::ConntrackdInject),
    ];
    let named: Vec<Peer> = all
        .iter()
        .filter(|(n, _)| wanted.iter().any(|w| w == n))
        .map(|(_, p)| *p)
        .collect();
    let peers: Vec<Peer> = if named.is_empty() {
        all.iter().map(|(_, p)| *p).collect()
    } else {
        named.clone()
    };
    let inject: Vec<Peer> = if named.is_empty() {
        vec![Peer::SyncdInject, Peer::ConntrackdInject]
    } else {
        named
            .iter()
            .copied()
            .filter(|p| matches!(p, Peer::SyncdInject | Peer::ConntrackdInject))
            .collect()
    };
    if Command::new("conntrackd").arg("-v").output().is_err()
        && peers.iter().any(|p| !p.is_tandem())
    {
        eprintln!("needs conntrackd: apt-get install conntrackd");
        std::process::exit(1);
    }
    // Run lengths and rounds from the environment; 0 or junk: the default.
    let secs = |var: &str, default: u64| {
        std::env::var(var)
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n: &u64| n > 0)
            .unwrap_or(default)
    };
    let rounds = secs("TANDEM_BENCH_ROUNDS", 2);
    if part("capacity") {
        capacity(&inject, secs("TANDEM_BENCH_CAPACITY_S", 30));
    }
    if part("burst") {
        burst(&inject);
    }
    if part("datapath") {
        datapath(&inject, secs("TANDEM_BENCH_DATAPATH_S", 10), rounds, false);
    }
    if part("datapath-split") {
        datapath(&inject, secs("TANDEM_BENCH_DATAPATH_S", 10), rounds, true);
    }
    if !part("classic") {
        return;
    }
    let results: Vec<(Peer, Figures)> = peers.iter().map(|&p| (p, run(p))).collect();

    let mut rate = table(&[
        "sync daemon",
        "connections opened",
        "conn/s offered",
        "distinct flows",
        "new entries on master",
        "reached the backup",
        "lost",
        "master CPU % of a core",
        "backup CPU % of a core",
        "CPU µs per flow master / backup",
    ]);
    let mut lag = table(&[
        "sync daemon",
        "samples",
        "p50 ms",
        "p99 ms",
        "max ms",
        "not seen within 2 s",
        "backup polled with",
    ]);
    let mut fo = table(&[
        "sync daemon",
        "survived",
        "all replicated before the kill",
        "VIP seen on backup ms after kill",
        "first echo ms after kill",
        "commit at failover",
    ]);
    let mut commit = table(&["sync daemon", "commit of the rate run's entries"]);
    for (peer, f) in &results {
        let mut l = f.lag.clone();
        l.sort();
        let pct = |p: f64| {
            l.get(((l.len() as f64 * p).ceil() as usize).saturating_sub(1))
                .map_or_else(|| "-".into(), |d| ms(*d))
        };
        rate.add_row([
            peer.name().to_owned(),
            f.offered.to_string(),
            format!("{:.0}", f.offered as f64 / f.rate_run.as_secs_f64()),
            f.distinct.to_string(),
            f.on_master.to_string(),
            f.on_backup.to_string(),
            f.on_master.saturating_sub(f.on_backup).to_string(),
            format!("{:.1}", f.cpu_master),
            format!("{:.1}", f.cpu_backup),
            format!(
                "{:.0} / {:.0}",
                f.cpu_master_per_flow, f.cpu_backup_per_flow
            ),
        ]);
        lag.add_row([
            peer.name().to_owned(),
            l.len().to_string(),
            pct(0.5),
            pct(0.99),
            l.last().map_or_else(|| "-".into(), |d| ms(*d)),
            f.lag_missed.to_string(),
            match peer {
                Peer::SyncdInject | Peer::ConntrackdInject | Peer::NoSync | Peer::EventSink => {
                    "ctnetlink get (kernel table)"
                }
                Peer::SyncdCache => "Status.entries_cached (gRPC)",
                Peer::ConntrackdCache => "conntrackd -e (process per poll)",
            }
            .to_owned(),
        ]);
        fo.add_row([
            peer.name().to_owned(),
            format!("{}/{FAILOVER_CONNS}", f.survived),
            if f.replicated_before_kill {
                "yes"
            } else {
                "no"
            }
            .to_owned(),
            opt_ms(f.vip_moved),
            opt_ms(f.first_echo),
            with_wall(per_entry(f.failover_commit), f.failover_commit_wall),
        ]);
        if matches!(peer, Peer::SyncdCache | Peer::ConntrackdCache) {
            commit.add_row([
                peer.name().to_owned(),
                with_wall(per_entry(f.commit), f.commit_wall),
            ]);
        }
    }
    println!(
        "Replication of new TCP connections ({RATE_THREADS} client threads, as fast as they go for {} s, each reset after the greeting); CPU over the run and the backup's catch-up:",
        RATE_RUN.as_secs()
    );
    println!("{rate}");
    println!(
        "Replication lag: client's connect() returned -> entry present on the backup ({LAG_SAMPLES} connections, one at a time):"
    );
    println!("{lag}");
    println!(
        "Failover: {FAILOVER_CONNS} established connections, lb1 killed (SIGKILL + links down), nf_conntrack_tcp_loose=0 on lb2; probes staggered by {} ms:",
        PROBE_STAGGER.as_millis()
    );
    println!("{fo}");
    println!("Commit cost of the cache modes:");
    println!("{commit}");
}
