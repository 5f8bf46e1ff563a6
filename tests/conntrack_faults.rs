//! conntrack-syncd on the bad day, in the two-node lab with real traffic:
//! replayed and reflected datagrams, a lagging or silent peer, a backup
//! restarted after its flows closed on the master, flows the backup
//! forwards during a VRRP flap, records of flows a node does not serve,
//! and a burst of new flows. Each fault test has its control: the same
//! scenario with the mechanism switched off (`--without`), which fails.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tandem_e2e::conntrack_lab::{
    ClusterLab, SYNC_PORT, VIP, pcap_udp_payloads, peak_rss_kb, reset, survivors, syn_burst,
};
use tandem_lab::Netns;
use tandem_proto::v1::{self, SyncHealth, SyncRole, VrrpState};

const SYNC: &str = "conntrack-syncd";
const LB1_LINK: &str = "192.168.100.1";
const LB2_LINK: &str = "192.168.100.2";
/// How long after a 50 k-flow burst the debug build may take to hold
/// 99.9 % of the master's flows on a loaded 2-core machine (release: 2 s).
const DEBUG_BURST_CATCH_UP: Duration = Duration::from_secs(30);

/// Starts the cluster of conntrack_lab with conntrack-syncd logged, each
/// node's with its own extra arguments; returns when lb1 is master, lb2
/// backup, and the sync peers hear each other.
fn start(lab: &mut ClusterLab, lb1: &[&str], lb2: &[&str]) {
    for (node, extra) in [("lb1", lb1), ("lb2", lb2)] {
        lab.start(node, "lb-forwarder", &[]);
        lab.start_logged(node, SYNC, extra);
    }
    lab.start("lb1", "vrrpd", &[]);
    lab.wait_for("lb1 to become master", Duration::from_secs(10), |l| {
        l.holds_vip("lb1")
    });
    lab.start("lb2", "vrrpd", &[]);
    lab.wait_for("lb2 to become backup", Duration::from_secs(10), |l| {
        l.vrrp_state("lb2") == VrrpState::Backup
    });
    lab.wait_for(
        "the sync peers to hear each other",
        Duration::from_secs(10),
        |l| {
            let (a, b) = (l.conntrack_status("lb1"), l.conntrack_status("lb2"));
            a.peer_alive
                && b.peer_alive
                && a.role() == SyncRole::Sender
                && b.role() == SyncRole::Receiver
        },
    );
}

/// Restarts a node's conntrack-syncd (a crash, then a start: a new epoch)
/// and waits until both peers follow each other's current epoch again.
fn restart_sync(lab: &mut ClusterLab, node: &str, extra: &[&str]) {
    lab.crash(node, SYNC);
    lab.start_logged(node, SYNC, extra);
    lab.wait_for(
        "the restarted daemon and its peer to pair",
        Duration::from_secs(10),
        |l| {
            let (a, b) = (l.conntrack_status("lb1"), l.conntrack_status("lb2"));
            a.peer_alive && b.peer_alive && a.peer_epoch == b.epoch && b.peer_epoch == a.epoch
        },
    );
}

fn tcp_loose_off(lab: &ClusterLab, node: &str) {
    lab.node(node)
        .ns
        .sysctl("net.netfilter.nf_conntrack_tcp_loose", "0")
        .expect("tcp_loose");
}

/// Records the sync datagrams `from` sends, as the node `at` receives them.
struct Capture {
    child: tandem_lab::LabChild,
    file: std::path::PathBuf,
    from: IpAddr,
}

impl Capture {
    fn start(lab: &ClusterLab, at: &str, from: &str, name: &str) -> Capture {
        let file = lab.logs.join(format!("{name}.pcap"));
        let mut cmd = Command::new("tcpdump");
        cmd.args([
            "-i",
            "eth2",
            "--immediate-mode",
            "-U",
            "-n",
            "-s",
            "0",
            "-w",
        ])
        .arg(&file)
        .args([&format!("udp and src host {from} and dst port {SYNC_PORT}")])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(lab.logs.join(format!("{name}.tcpdump"))).expect("log"));
        let child = lab.lab.spawn(&lab.node(at).ns, &mut cmd).expect("tcpdump");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::metadata(&file).map_or(0, |m| m.len()) < 24 {
            assert!(Instant::now() < deadline, "tcpdump did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        // Capturing starts a moment after the file header is written.
        std::thread::sleep(Duration::from_millis(300));
        Capture {
            child,
            file,
            from: from.parse().expect("address"),
        }
    }

    fn stop(mut self) -> Vec<Vec<u8>> {
        let _ = self.child.stop(Duration::from_secs(3));
        pcap_udp_payloads(&self.file, self.from)
    }
}

/// Sends datagrams to `to`'s sync port from `ns`, as `from` (another port
/// than the daemon's own: only the address is checked, as a spoofer on
/// the cluster link would manage).
fn replay(ns: &Netns, from: &str, to: &str, datagrams: &[Vec<u8>]) {
    let src: SocketAddr = format!("{from}:0").parse().expect("src");
    let dst: SocketAddr = format!("{to}:{SYNC_PORT}").parse().expect("dst");
    let datagrams = datagrams.to_vec();
    ns.run(move || {
        let s = UdpSocket::bind(src)?;
        for d in &datagrams {
            s.send_to(d, dst)?;
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok::<_, std::io::Error>(())
    })
    .expect("netns")
    .expect("replay");
}

// ---------------------------------------------------------------------------
// 1. Replay cannot deafen a receiver.

struct ReplayOutcome {
    backup: v1::ConntrackSyncStatus,
    master: v1::ConntrackSyncStatus,
    /// Of the 40 connections opened after the replay and the reflection,
    /// how many the backup held before the master died, and how many
    /// carried bytes after.
    replicated: usize,
    survived: usize,
}

/// The field's attack: the master's daemon restarted once (epoch P0 → P),
/// the backup's once after that; then every datagram recorded from P0 is
/// replayed at the backup from the master's address, and the master's own
/// current datagrams are reflected back at it. Replication must go on.
fn replay_scenario(backup_args: &[&str]) -> ReplayOutcome {
    let mut lab = ClusterLab::new();
    tcp_loose_off(&lab, "lb2");
    start(&mut lab, &[], backup_args);
    let old = Capture::start(&lab, "lb2", LB1_LINK, "epoch-p0");
    let before = lab.connect_many(20);
    lab.wait_for(
        "the backup to hold the first flows",
        Duration::from_secs(5),
        |l| l.vip_entries("lb2") >= 20,
    );
    // Alives too (one every 200 ms when idle).
    std::thread::sleep(Duration::from_millis(500));
    let recorded = old.stop();
    assert!(recorded.len() >= 3, "recorded {} datagrams", recorded.len());
    restart_sync(&mut lab, "lb1", &[]);
    let current = Capture::start(&lab, "lb2", LB1_LINK, "epoch-p");
    restart_sync(&mut lab, "lb2", backup_args);
    lab.wait_for("the backup's resync", Duration::from_secs(10), |l| {
        let s = l.conntrack_status("lb2");
        s.resync_complete && s.last_resync_unix_ms > 0
    });

    replay(&lab.node("lb1").ns, LB1_LINK, LB2_LINK, &recorded);
    let mut after = lab.connect_many(20);
    std::thread::sleep(Duration::from_millis(500));
    let reflected = current.stop();
    assert!(!reflected.is_empty());
    replay(&lab.node("lb2").ns, LB2_LINK, LB1_LINK, &reflected);
    after.extend(lab.connect_many(20));
    let tuples: Vec<tandem_conntrack::Tuple> = after
        .iter()
        .map(|(_, s)| tandem_conntrack::Tuple {
            src: s.local_addr().expect("local").ip(),
            dst: "10.0.0.100".parse().expect("vip"),
            protocol: 6,
            src_port: s.local_addr().expect("local").port(),
            dst_port: 80,
        })
        .collect();
    let held = |l: &ClusterLab| {
        let on_backup = l.vip_tuples("lb2");
        tuples.iter().filter(|t| on_backup.contains(t)).count()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while held(&lab) < tuples.len() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    // Health is judged over seconds: give a deaf backup time to show it.
    std::thread::sleep(Duration::from_millis(1500));
    let replicated = held(&lab);
    let backup = lab.conntrack_status("lb2");
    let master = lab.conntrack_status("lb1");
    drop(before);
    lab.kill_node("lb1");
    lab.wait_for("lb2 to take over", Duration::from_secs(5), |l| {
        l.holds_vip("lb2")
    });
    let survived = survivors(&mut after, "after the failover");
    ReplayOutcome {
        backup,
        master,
        replicated,
        survived,
    }
}

#[test]
fn replayed_and_reflected_datagrams_cannot_deafen_replication() {
    let o = replay_scenario(&[]);
    let (b, m) = (&o.backup, &o.master);
    assert!(b.stale_epoch_rejected >= 1, "the replay was refused: {b:?}");
    assert!(
        m.stale_epoch_rejected >= 1,
        "the reflection was refused: {m:?}"
    );
    assert!(b.peer_alive, "{b:?}");
    assert_eq!(
        b.peer_epoch, m.epoch,
        "the backup follows the master's real epoch"
    );
    assert_eq!(b.health(), SyncHealth::Ok, "{b:?}");
    assert_eq!(m.health(), SyncHealth::Ok, "{m:?}");
    assert_eq!(
        o.replicated, 40,
        "flows opened after the replay reached the backup"
    );
    assert_eq!(o.survived, 40, "and survive the master's death");
}

/// Control: the earlier protocol (no handshake) takes the replayed epoch
/// for a restart of the master and refuses every real datagram since —
/// and the health says so instead of staying green.
#[test]
fn control_without_the_epoch_handshake_a_replay_deafens_the_backup() {
    let o = replay_scenario(&["--without", "epoch-handshake"]);
    let (b, m) = (&o.backup, &o.master);
    eprintln!(
        "control: {}/40 replicated, {}/40 survived, backup health {:?}",
        o.replicated,
        o.survived,
        b.health()
    );
    assert_ne!(
        b.peer_epoch, m.epoch,
        "the backup took the replayed epoch: {b:?}"
    );
    assert!(!b.peer_alive, "{b:?}");
    assert_eq!(b.health(), SyncHealth::Failed, "{b:?}");
    assert!(o.replicated < 40, "{}", o.replicated);
    assert!(o.survived < 40, "{}", o.survived);
}

// ---------------------------------------------------------------------------
// 2. A deaf or lagging receiver is visible.

/// One scrape of conntrack-syncd's /metrics in a node's namespace.
fn scrape(ns: &Netns, port: u16) -> String {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n")?;
        let mut raw = String::new();
        s.read_to_string(&mut raw)?;
        Ok::<_, std::io::Error>(raw)
    })
    .expect("netns")
    .unwrap_or_default()
}

fn wait_health(
    lab: &ClusterLab,
    node: &str,
    want: SyncHealth,
    within: Duration,
) -> v1::ConntrackSyncStatus {
    let deadline = Instant::now() + within;
    loop {
        let s = lab.conntrack_status(node);
        if s.health() == want {
            return s;
        }
        assert!(Instant::now() < deadline, "{node} never {want:?}: {s:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_lagging_or_silent_peer_turns_the_health_yellow_then_red_and_back() {
    let mut lab = ClusterLab::new();
    for node in ["lb1", "lb2"] {
        let p = lab.node(node).config_dir.join("node.toml");
        let mut text = std::fs::read_to_string(&p).expect("node.toml");
        text.push_str("metrics_listen = \"127.0.0.1:9300\"\n");
        std::fs::write(&p, text).expect("node.toml");
    }
    start(&mut lab, &[], &[]);
    let m = lab.conntrack_status("lb1");
    assert_eq!(
        (m.health(), m.health_message.as_str()),
        (SyncHealth::Ok, "")
    );
    let _conns = lab.connect_many(10);

    // The backup loses every data datagram of the master (type 1 at byte 3
    // of the UDP payload) but hears its alives: alive, and behind.
    lab.node("lb2")
        .ns
        .exec(
            "nft",
            &[&format!(
                "add table inet lag; add chain inet lag in {{ type filter hook input priority -300; }}; add rule inet lag in ip saddr {LB1_LINK} udp dport {SYNC_PORT} @th,88,8 1 counter drop"
            )],
        )
        .expect("drop rule");
    let mut more = lab.connect_many(10);
    let m = wait_health(&lab, "lb1", SyncHealth::Degraded, Duration::from_secs(10));
    assert!(m.peer_alive, "{m:?}");
    assert!(
        m.health_message.starts_with("replication lag "),
        "{}",
        m.health_message
    );
    let metrics = scrape(&lab.node("lb1").ns, 9302);
    assert!(
        metrics.contains("tandem_conntrack_sync_health{health=\"degraded\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tandem_conntrack_sync_lag_seconds_bucket"),
        "{metrics}"
    );
    // The backup sees its resync (or gap) stuck.
    wait_health(&lab, "lb2", SyncHealth::Degraded, Duration::from_secs(10));

    lab.node("lb2")
        .ns
        .exec("nft", &["delete", "table", "inet", "lag"])
        .expect("delete rule");
    wait_health(&lab, "lb1", SyncHealth::Ok, Duration::from_secs(10));
    wait_health(&lab, "lb2", SyncHealth::Ok, Duration::from_secs(10));
    more.extend(lab.connect_many(5));
    let m = lab.conntrack_status("lb1");
    assert!(m.lag_p50_ms > 0.0 && m.lag_p99_ms >= m.lag_p50_ms, "{m:?}");

    // The backup's daemon dies: red, naming the peer.
    lab.crash("lb2", SYNC);
    let m = wait_health(&lab, "lb1", SyncHealth::Failed, Duration::from_secs(5));
    assert!(
        m.health_message
            .starts_with(&format!("peer {LB2_LINK}:{SYNC_PORT} silent for ")),
        "{}",
        m.health_message
    );
    let metrics = scrape(&lab.node("lb1").ns, 9302);
    assert!(
        metrics.contains("tandem_conntrack_sync_health{health=\"failed\"} 1"),
        "{metrics}"
    );
    lab.start_logged("lb2", SYNC, &[]);
    wait_health(&lab, "lb1", SyncHealth::Ok, Duration::from_secs(10));
    // Each change of health said once, not every turn.
    let log = lab.log("lb1", SYNC);
    let count = |s: &str| log.lines().filter(|l| l.contains(s)).count();
    assert_eq!(count("degraded:"), 1, "{log}");
    assert_eq!(count("failed:"), 1, "{log}");
    assert_eq!(count("is healthy again"), 2, "{log}");
}

#[test]
fn a_standalone_node_is_healthy_and_says_so_once() {
    let lab = tandem_lab::Lab::new().expect("lab");
    let ns = lab.netns("solo").expect("netns");
    let tmp = tempfile::tempdir().expect("tempdir");
    let (config, runtime) = (tmp.path().join("etc"), tmp.path().join("run"));
    tandem_e2e::write_file(&config.join("node.toml"), "name = \"solo\"\n");
    let log = tmp.path().join("log");
    let mut cmd = Command::new(tandem_e2e::bin(SYNC));
    cmd.arg("--config-dir")
        .arg(&config)
        .arg("--runtime-dir")
        .arg(&runtime)
        .arg("--state-dir")
        .arg(tandem_e2e::state_dir_beside(&runtime))
        .env("RUST_LOG", "info")
        .env_remove("JOURNAL_STREAM")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"));
    let _daemon = lab.spawn(&ns, &mut cmd).expect("spawn");
    tandem_lab::wait_for_unix_socket(
        &runtime.join("conntrack-syncd.sock"),
        Duration::from_secs(10),
    )
    .expect("serving");
    std::thread::sleep(Duration::from_secs(3));
    let st = tandem_e2e::conntrack_status(&runtime);
    assert_eq!(st.role(), SyncRole::Standalone);
    assert_eq!(st.health(), SyncHealth::Ok);
    assert_eq!(st.last_error, "");
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(!text.contains("ERROR") && !text.contains("WARN"), "{text}");
    assert_eq!(
        text.lines().filter(|l| l.contains("standalone")).count(),
        1,
        "{text}"
    );
}

// ---------------------------------------------------------------------------
// 3. Bursts degrade gracefully.

/// 50,000 new flows in 10 s (a SYN each, half-open: a New and an Update
/// per flow on the master), the burst. The test suite runs the
/// daemons as built for it (debug); the release figures, at rates up to
/// the lab's limit, are in deploy/bench-conntrack.sh.
#[test]
fn a_burst_of_50k_new_flows_is_replicated_without_a_storm() {
    let mut lab = ClusterLab::new();
    start(&mut lab, &[], &[]);
    let (flows, over) = (50_000, Duration::from_secs(10));
    let sent = syn_burst(&lab.client, flows, over);
    let ended = Instant::now();
    // The release build holds them all 2 s after (deploy/bench-conntrack.sh
    // burst); the debug build the suite runs, on a loaded machine, needs
    // longer: the test asserts the bound below and prints the time taken.
    std::thread::sleep(Duration::from_secs(2).saturating_sub(ended.elapsed()));
    let (master, held) = loop {
        let master = lab.vip_tuples("lb1");
        let backup = lab.vip_tuples("lb2");
        let held = master.iter().filter(|t| backup.contains(t)).count();
        if held * 1000 >= master.len() * 999 || ended.elapsed() >= DEBUG_BURST_CATCH_UP {
            break (master, held);
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let caught_up = ended.elapsed();
    let (m, b) = (lab.conntrack_status("lb1"), lab.conntrack_status("lb2"));
    let rss = (
        peak_rss_kb(lab.pid("lb1", SYNC)),
        peak_rss_kb(lab.pid("lb2", SYNC)),
    );
    let packing = m.records_sent as f64 / m.data_datagrams_sent.max(1) as f64;
    eprintln!(
        "burst: {} SYNs in {over:?}; master {} flows, backup holds {held} ({:.3} %) {caught_up:.1?} after; \
         master sent {} datagrams ({} retransmitted, {:.1} %), {packing:.1} records per datagram; \
         lag p50 {:.1} ms p99 {:.1} ms; peak RSS master {} kB, backup {} kB",
        sent.len(),
        master.len(),
        100.0 * held as f64 / master.len().max(1) as f64,
        m.datagrams_sent,
        m.retransmissions,
        100.0 * m.retransmissions as f64 / m.datagrams_sent.max(1) as f64,
        m.lag_p50_ms,
        m.lag_p99_ms,
        rss.0,
        rss.1
    );
    // SYNs an overloaded lab drops on the way (up to a fifth seen on a
    // saturated machine) are not the subject: the backup is judged against
    // what the master holds.
    assert!(
        master.len() >= flows * 60 / 100,
        "the master forwarded the burst: {}",
        master.len()
    );
    assert!(
        held * 1000 >= master.len() * 999,
        "{held} of {}",
        master.len()
    );
    assert!(m.retransmissions * 10 <= m.datagrams_sent, "{m:?}");
    assert!(rss.0 <= 64 * 1024 && rss.1 <= 64 * 1024, "{rss:?}");
    for node in ["lb1", "lb2"] {
        let log = lab.log(node, SYNC);
        assert!(!log.contains(" dead: "), "{node}: {log}");
    }
    // Behind for a while during the burst is said (degraded), but the
    // peer is never taken for silent.
    assert_ne!(m.health(), SyncHealth::Failed, "{m:?}");
    assert_ne!(b.health(), SyncHealth::Failed, "{b:?}");
}

// ---------------------------------------------------------------------------
// 6. A restarted receiver converges exactly.

/// The field's case: the backup's daemon is down while 1,000 flows close
/// on the master (reset: their entries expire there 10 s later, the
/// backup's copies stay ESTABLISHED). The master's daemon restarts too, so
/// none of the destroys it queued for the backup survives: only the
/// master's kernel table tells what is gone. The backup's daemon restarts;
/// 200 new clients then come from the same addresses and ports, and the
/// master sends them to backends of its choosing. Returns how many of the
/// 200 survive the master's death.
fn reused_ports_scenario(backup_args: &[&str]) -> (usize, v1::ConntrackSyncStatus) {
    let mut lab = ClusterLab::new();
    tcp_loose_off(&lab, "lb2");
    start(&mut lab, &[], backup_args);
    // Every packet through the master until it dies, even if a starved
    // vrrpd on a saturated machine lets the backup take the VIPs for a
    // moment (the RSTs below must close the master's entries, not the
    // backup's copies).
    lab.pin_neighbours_to("lb1");
    let first = lab.connect_many(1000);
    let sources: Vec<SocketAddr> = first
        .iter()
        .map(|(_, s)| s.local_addr().expect("local"))
        .collect();
    lab.wait_for(
        "the backup to hold 1,000 flows",
        Duration::from_secs(10),
        |l| l.vip_entries("lb2") >= 1000,
    );
    lab.crash("lb2", SYNC);
    reset(first);
    let gone: HashSet<(IpAddr, u16)> = sources.iter().map(|s| (s.ip(), s.port())).collect();
    // Reset flows expire 10 s later. A thousand RSTs at once can overflow
    // a loaded machine's backlog: an entry whose RST was lost stays
    // ESTABLISHED, and is deleted here (the master forgot it all the same).
    let forgotten = |l: &ClusterLab| {
        !l.vip_tuples("lb1")
            .iter()
            .any(|t| gone.contains(&(t.src, t.src_port)))
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while !forgotten(&lab) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    if !forgotten(&lab) {
        let left = lab.vip_entries("lb1");
        eprintln!("{left} entries whose RST was lost: deleted on the master");
        let _ = lab.node("lb1").ns.exec("conntrack", &["-D", "-d", VIP]);
    }
    lab.wait_for(
        "the master to forget the closed flows",
        Duration::from_secs(5),
        forgotten,
    );
    lab.crash("lb1", SYNC);
    lab.start_logged("lb1", SYNC, &[]);
    assert_eq!(lab.vip_entries("lb2"), 1000, "the backup still holds them");
    lab.start_logged("lb2", SYNC, backup_args);
    lab.wait_for("the backup's resync", Duration::from_secs(10), |l| {
        let s = l.conntrack_status("lb2");
        s.peer_alive && s.resync_complete && s.last_resync_unix_ms > 0
    });
    let mut reused = lab.connect_from(&sources[..200]);
    for (i, (_, s)) in reused.iter_mut().enumerate() {
        assert!(
            tandem_e2e::conntrack_lab::echo(s, &format!("before {i}")).is_some(),
            "connection {i} through the master"
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    let backup = lab.conntrack_status("lb2");
    lab.kill_node("lb1");
    lab.wait_for("lb2 to take over", Duration::from_secs(5), |l| {
        l.holds_vip("lb2")
    });
    // What lb2's gratuitous ARP does to caches that were not pinned.
    lab.pin_neighbours_to("lb2");
    (survivors(&mut reused, "after"), backup)
}

#[test]
fn a_restarted_backup_drops_what_the_master_lost_and_reused_ports_survive() {
    let (survived, backup) = reused_ports_scenario(&[]);
    assert!(backup.stale_entries_removed >= 1000, "{backup:?}");
    assert_eq!(survived, 200, "{backup:?}");
}

/// Control: without the exact resync the 1,000 stale entries stay, an
/// update cannot change their NAT, and the clients the master sent to
/// another backend are broken at failover.
#[test]
fn control_without_the_exact_resync_reused_ports_break() {
    let (survived, backup) = reused_ports_scenario(&["--without", "exact-resync"]);
    eprintln!("control: {survived}/200 reused-port connections survived");
    assert_eq!(backup.stale_entries_removed, 0, "{backup:?}");
    assert!(survived < 200, "{survived}/200");
}

// ---------------------------------------------------------------------------
// 7. Both ways.

/// A VRRP flap: the master's vrrpd paused 600 ms, the backup takes the
/// VIPs and announces them, the master resumes and takes them back. The
/// clients' and backends' neighbour caches still name the backup, which
/// forwards 50 new connections; then the backup dies and the caches move
/// to the master. Returns how many of the 50 survive.
fn flap_scenario(args: &[&str]) -> (usize, v1::ConntrackSyncStatus) {
    let mut lab = ClusterLab::new();
    tcp_loose_off(&lab, "lb1");
    start(&mut lab, args, args);
    lab.signal("lb1", "vrrpd", Signal::SIGSTOP);
    let paused = Instant::now();
    lab.wait_for("lb2 to take over", Duration::from_secs(3), |l| {
        l.holds_vip("lb2")
    });
    std::thread::sleep(Duration::from_millis(600).saturating_sub(paused.elapsed()));
    lab.signal("lb1", "vrrpd", Signal::SIGCONT);
    lab.wait_for("lb1 to be master again", Duration::from_secs(5), |l| {
        l.holds_vip("lb1") && !l.holds_vip("lb2")
    });
    lab.wait_for("both sync roles back", Duration::from_secs(5), |l| {
        l.conntrack_status("lb2").role() == SyncRole::Receiver
    });
    lab.pin_neighbours_to("lb2");
    let mut conns = lab.connect_many(50);
    for (i, (_, s)) in conns.iter_mut().enumerate() {
        assert!(tandem_e2e::conntrack_lab::echo(s, &format!("via lb2 {i}")).is_some());
    }
    let tuples: Vec<(IpAddr, u16)> = conns
        .iter()
        .map(|(_, s)| {
            let a = s.local_addr().expect("local");
            (a.ip(), a.port())
        })
        .collect();
    let on = |l: &ClusterLab, node: &str| {
        let have: HashSet<(IpAddr, u16)> = l
            .vip_tuples(node)
            .iter()
            .map(|t| (t.src, t.src_port))
            .collect();
        tuples.iter().filter(|t| have.contains(t)).count()
    };
    assert_eq!(on(&lab, "lb2"), 50, "the backup forwarded them");
    let deadline = Instant::now() + Duration::from_secs(3);
    while on(&lab, "lb1") < 50 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let backup = lab.conntrack_status("lb2");
    lab.kill_node("lb2");
    lab.pin_neighbours_to("lb1");
    (survivors(&mut conns, "after"), backup)
}

#[test]
fn flows_the_backup_forwards_after_a_flap_survive_its_death() {
    let (survived, backup) = flap_scenario(&[]);
    assert!(backup.own_flows >= 50, "{backup:?}");
    assert_eq!(survived, 50, "{backup:?}");
}

/// Control: one-way replication (the backup sends nothing, the master
/// applies nothing of the backup's): every one of them is reset.
#[test]
fn control_without_both_ways_replication_the_flap_flows_die() {
    let (survived, _) = flap_scenario(&["--without", "both-ways"]);
    eprintln!("control: {survived}/50 flap connections survived");
    assert_eq!(survived, 0);
}

// ---------------------------------------------------------------------------
// 9. Only our flows.

/// The master serves a farm the backup does not (port 8443): its flows
/// are authentic records for the backup, but not of a farm it serves.
fn foreign_scenario(backup_args: &[&str]) -> (usize, usize, v1::ConntrackSyncStatus, String) {
    let mut lab = ClusterLab::new();
    tandem_e2e::write_file(
        &lab.node("lb1").config_dir.join("farms/extra.toml"),
        "name = \"extra\"\nvip = \"10.0.0.100\"\nport = 8443\nscheduler = \"rr\"\nsnat_address = \"10.1.0.100\"\n[health_check]\nkind = \"none\"\n\
         [[backends]]\naddress = \"10.1.0.11\"\nport = 8080\n",
    );
    start(&mut lab, &[], backup_args);
    let entry = |port: u16, sport: u16| tandem_conntrack::Entry {
        original: tandem_conntrack::Tuple {
            src: "10.0.0.50".parse().expect("ip"),
            dst: "10.0.0.100".parse().expect("ip"),
            protocol: 6,
            src_port: sport,
            dst_port: port,
        },
        reply: tandem_conntrack::Tuple {
            src: "10.1.0.11".parse().expect("ip"),
            dst: "10.1.0.100".parse().expect("ip"),
            protocol: 6,
            src_port: 8080,
            dst_port: sport,
        },
        status: 0x0e,
        timeout_s: 600,
        mark: 0,
        zone: 0,
        tcp: Some(tandem_conntrack::TcpInfo {
            state: 3,
            wscale_original: 7,
            wscale_reply: 7,
            flags_original: 0,
            flags_reply: 0,
        }),
    };
    let entries: Vec<tandem_conntrack::Entry> = (0..20)
        .map(|i| entry(8443, 30000 + i))
        .chain((0..20).map(|i| entry(80, 31000 + i)))
        .collect();
    lab.node("lb1")
        .ns
        .run(move || {
            let mut ct = tandem_conntrack::Conntrack::open().expect("ctnetlink");
            for r in ct.create_many(&entries, tandem_conntrack::CreateOptions::default()) {
                r.expect("create on the master");
            }
        })
        .expect("netns");
    let count = |l: &ClusterLab, port: u16| {
        l.vip_tuples("lb2")
            .iter()
            .filter(|t| t.dst_port == port && (30000..31020).contains(&t.src_port))
            .count()
    };
    lab.wait_for(
        "the backup to hold the served flows",
        Duration::from_secs(5),
        |l| count(l, 80) == 20,
    );
    std::thread::sleep(Duration::from_millis(500));
    let backup = lab.conntrack_status("lb2");
    (
        count(&lab, 80),
        count(&lab, 8443),
        backup,
        lab.log("lb2", SYNC),
    )
}

#[test]
fn records_of_a_farm_the_backup_does_not_serve_are_counted_and_dropped() {
    let (served, foreign, backup, log) = foreign_scenario(&[]);
    assert_eq!(served, 20);
    assert_eq!(foreign, 0, "no foreign tuple in the backup's table");
    assert!(backup.foreign_records_dropped >= 20, "{backup:?}");
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("not a flow of a farm this node serves"))
            .count(),
        1,
        "said once: {log}"
    );
}

/// Control: without the receive filter the foreign flows are injected.
#[test]
fn control_without_the_farm_filter_foreign_flows_are_injected() {
    let (_, foreign, backup, _) = foreign_scenario(&["--without", "farm-filter"]);
    eprintln!("control: {foreign}/20 foreign flows injected");
    assert_eq!(foreign, 20, "{backup:?}");
    assert_eq!(backup.foreign_records_dropped, 0);
}
