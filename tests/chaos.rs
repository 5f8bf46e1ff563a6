//! The pair under faults, on the real kernel with live traffic: split
//! brain, foreign speakers, planned handovers, a dead or stalled vrrpd.
//! Each test has its control: the same scenario with the mechanism
//! switched off, asserting that the fault then shows.

use std::time::{Duration, Instant};

use tandem_e2e::chaos_lab::{ChaosLab, ChaosOptions, SPOOFER, VIP};
use tandem_proto::v1::VrrpState;

const SETTLE: Duration = Duration::from_secs(10);

/// What a healed split brain left: how long until the client's and the
/// backends' neighbour entries all named the winner (None: not within
/// `within`), and the farm packets each node forwarded in the second that
/// starts 1 s after the heal.
struct Healed {
    moved_after: Option<Duration>,
    neighbours: Vec<String>,
    loser_forwarded: u64,
    winner_forwarded: u64,
}

/// Cuts only the cluster link under traffic (both nodes become master,
/// lb2's takeover moves every neighbour entry to it), then heals it: lb1
/// (priority 150) wins, lb2 steps down.
fn split_brain_then_heal(vrrp_extra: &str, within: Duration) -> Healed {
    let mut lab = ChaosLab::new(ChaosOptions {
        vrrp_extra: vrrp_extra.into(),
        ..ChaosOptions::default()
    });
    lab.start_cluster();
    lab.install_counters();
    let traffic = lab.traffic(Duration::from_millis(20), 10);
    lab.cut_cluster_link("lb1", true);
    lab.wait_for("both nodes master", SETTLE, |l| {
        l.state("lb1") == Some(VrrpState::Master) && l.state("lb2") == Some(VrrpState::Master)
    });
    // lb2's takeover announced the addresses: everyone now talks to lb2.
    lab.wait_for("the neighbour entries to name lb2", SETTLE, |l| {
        l.neighbours().iter().all(|n| n == "lb2")
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        lab.forwarded("lb2") > 0,
        "lb2 carries the traffic during the split"
    );

    lab.cut_cluster_link("lb1", false);
    let healed = Instant::now();
    let mut moved_after = None;
    while healed.elapsed() < within {
        if lab.neighbours().iter().all(|n| n == "lb1") {
            moved_after = Some(healed.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    lab.wait_for("lb2 to step down", SETTLE, |l| {
        l.state("lb2") == Some(VrrpState::Backup)
    });
    let one_second = healed + Duration::from_secs(1);
    std::thread::sleep(one_second.saturating_duration_since(Instant::now()));
    let (l0, w0) = (lab.forwarded("lb2"), lab.forwarded("lb1"));
    std::thread::sleep(Duration::from_secs(1));
    let (l1, w1) = (lab.forwarded("lb2"), lab.forwarded("lb1"));
    let neighbours = lab.neighbours();
    let report = traffic.finish();
    eprintln!("split brain: {}", report.summary());
    Healed {
        moved_after,
        neighbours,
        loser_forwarded: l1 - l0,
        winner_forwarded: w1 - w0,
    }
}

/// The winner of a healed split brain re-announces its addresses as soon
/// as it hears the loser: within one advert interval plus the GARP burst
/// every neighbour entry names it, and a second after the heal the loser
/// forwards nothing.
#[test]
fn a_healed_split_brain_pulls_the_traffic_back_to_the_winner() {
    // One 100 ms advert interval, the burst (3 at 50 ms), and polling slack.
    let bound = Duration::from_millis(100 + 2 * 50 + 100);
    let h = split_brain_then_heal("", Duration::from_secs(3));
    let moved = h
        .moved_after
        .expect("the neighbour entries moved to the winner");
    eprintln!("neighbour entries named the winner {moved:?} after the heal");
    assert!(moved <= bound, "moved after {moved:?} (bound {bound:?})");
    assert_eq!(h.neighbours, ["lb1", "lb1", "lb1"]);
    assert_eq!(h.loser_forwarded, 0, "the loser forwards no farm packet");
    assert!(h.winner_forwarded > 0, "the winner carries the traffic");
}

/// Control: with the heal announcement off (`garp_lower_prio_repeat = 0`),
/// the entries stay on the loser, which keeps forwarding.
#[test]
fn control_without_heal_announcements_the_traffic_stays_on_the_loser() {
    let h = split_brain_then_heal("garp_lower_prio_repeat = 0", Duration::from_secs(2));
    assert_eq!(h.moved_after, None, "nothing moved the entries back");
    assert!(
        h.neighbours.iter().any(|n| n == "lb2"),
        "{:?}",
        h.neighbours
    );
    assert!(h.loser_forwarded > 0, "the loser still forwards");
}

/// What a foreign speaker (a keepalived on the cluster link, same VRID,
/// priority 254, not a cluster node) did to the pair during `run` of
/// traffic.
struct Spoofed {
    role_changes: ((u64, u64), (u64, u64)),
    states: (Option<VrrpState>, Option<VrrpState>),
    failed: usize,
    lb1: tandem_proto::v1::VrrpStatus,
    log: String,
}

fn foreign_speaker(vrrp_extra: &str, version: u8, unicast_to: Option<&str>) -> Spoofed {
    let iv = if version == 2 { 1000 } else { 100 };
    let mut lab = ChaosLab::new(ChaosOptions {
        vrrp_extra: format!("version = {version}\n{vrrp_extra}"),
        advert_interval_ms: iv,
        sync: false,
        ..ChaosOptions::default()
    });
    lab.start_cluster();
    let before = (lab.role_changes("lb1"), lab.role_changes("lb2"));
    let traffic = lab.traffic(Duration::from_millis(20), 0);
    let spoofer = lab.start_foreign_speaker(version, unicast_to);
    // Long enough for several adverts and for a backup to time out.
    std::thread::sleep(Duration::from_millis(u64::from(iv) * 5).max(Duration::from_secs(3)));
    let report = traffic.finish();
    // Before the spoofer says goodbye (priority 0).
    let lb1 = lab.vrrp("lb1").expect("lb1 status");
    let states = (lab.state("lb1"), lab.state("lb2"));
    drop(spoofer);
    eprintln!("foreign speaker: {}", report.summary());
    let after = (lab.role_changes("lb1"), lab.role_changes("lb2"));
    Spoofed {
        role_changes: (
            (after.0.0 - before.0.0, after.0.1 - before.0.1),
            (after.1.0 - before.1.0, after.1.1 - before.1.1),
        ),
        states,
        failed: report.failed().len(),
        lb1,
        log: lab.node("lb1").log("vrrpd"),
    }
}

fn assert_ignored(s: &Spoofed) {
    assert_eq!(s.role_changes, ((0, 0), (0, 0)), "no role change");
    assert_eq!(s.states, (Some(VrrpState::Master), Some(VrrpState::Backup)));
    assert_eq!(s.failed, 0, "no failed request");
    let c = s.lb1.counters.expect("counters");
    assert!(c.foreign_adverts_dropped > 0, "{c:?}");
    let f = &s.lb1.foreign_speakers;
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].address, SPOOFER);
    assert_eq!(f[0].priority, 254);
    assert_eq!(f[0].virtual_router_id, 42);
    let lines: Vec<&str> = s
        .log
        .lines()
        .filter(|l| l.contains("foreign VRRP speaker"))
        .collect();
    assert_eq!(lines.len(), 1, "logged once (rate-limited): {lines:?}");
    assert!(
        lines[0].contains(&format!(
            "foreign VRRP speaker {SPOOFER} advertises VRID 42 (priority 254)"
        )),
        "{}",
        lines[0]
    );
}

/// Adverts for our VRID from an address that is not in cluster.toml are
/// dropped and reported: no role change, no failed request.
#[test]
fn a_foreign_speaker_on_our_vrid_cannot_take_the_role() {
    assert_ignored(&foreign_speaker("", 3, None));
}

/// The same with VRRPv2 (1 s adverts) and with unicast adverts sent to the
/// master's address.
#[test]
fn a_foreign_speaker_is_dropped_with_vrrpv2_and_unicast_too() {
    assert_ignored(&foreign_speaker("", 2, None));
    assert_ignored(&foreign_speaker("unicast = true", 3, Some("192.168.100.1")));
}

/// Control: with `members_only = false` (RFC 5798's behaviour) the same
/// foreign speaker demotes the master.
#[test]
fn control_without_the_members_filter_a_foreign_speaker_takes_the_role() {
    let s = foreign_speaker("members_only = false", 3, None);
    assert!(
        s.role_changes.0.1 > 0,
        "lb1 stepped down: {:?}",
        s.role_changes
    );
    assert_ne!(s.states.0, Some(VrrpState::Master));
}

/// The three planned handovers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handover {
    /// `node maintenance enable` on the master (vrrpd SetMaintenance).
    Maintenance,
    /// `systemctl stop vrrpd` on the master (SIGTERM).
    Stop,
    /// The preferred node (failback = lb1) taking the role back.
    Failback,
}

/// What a planned handover under traffic left.
struct HandedOver {
    report: tandem_e2e::chaos_lab::TrafficReport,
    /// The longest time no node held the VIP (sampled every few ms).
    vipless: Duration,
    /// When the handover began, since the traffic started.
    at: Duration,
}

/// Samples who holds the VIP until stopped; returns the longest stretch
/// with nobody. The node handing over is looked at first, then the one
/// taking over: the taker adds before the leaver removes, so a sample can
/// only find nobody if the VIP really was on no node.
fn watch_vip(
    lab: &ChaosLab,
    from: &str,
    to: &str,
) -> (
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<Duration>,
) {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let nodes = [lab.node(from).ns.clone(), lab.node(to).ns.clone()];
    let s = stop.clone();
    let h = std::thread::spawn(move || {
        let mut longest = Duration::ZERO;
        let mut since: Option<Instant> = None;
        while !s.load(std::sync::atomic::Ordering::SeqCst) {
            let held = nodes.iter().any(|ns| {
                ns.addresses("eth0")
                    .map(|a| a.iter().any(|a| a.starts_with(&format!("{VIP}/"))))
                    .unwrap_or(false)
            });
            match (held, since) {
                (false, None) => since = Some(Instant::now()),
                (true, Some(t)) => {
                    longest = longest.max(t.elapsed());
                    since = None;
                }
                _ => {}
            }
        }
        if let Some(t) = since {
            longest = longest.max(t.elapsed());
        }
        longest
    });
    (stop, h)
}

fn handover(kind: Handover, vrrp_extra: &str) -> HandedOver {
    let mut lab = ChaosLab::new(ChaosOptions {
        failback: if kind == Handover::Failback {
            "lb1"
        } else {
            "none"
        }
        .into(),
        priorities: (100, 100),
        vrrp_extra: vrrp_extra.into(),
        ..ChaosOptions::default()
    });
    lab.start_cluster();
    let lb1 = lab.node("lb1").runtime_dir.clone();
    if kind == Handover::Failback {
        // lb1 steps aside first; its return is the handover under test.
        tandem_e2e::vrrp_lab::set_maintenance(&lb1, true);
        lab.wait_for("lb2 master", SETTLE, |l| {
            l.state("lb2") == Some(VrrpState::Master) && !l.holds_vip("lb1")
        });
    }
    std::thread::sleep(Duration::from_millis(500));
    let traffic = lab.traffic(Duration::from_millis(5), 50);
    std::thread::sleep(Duration::from_millis(500));
    let (from, to) = if kind == Handover::Failback {
        ("lb2", "lb1")
    } else {
        ("lb1", "lb2")
    };
    let (stop, watcher) = watch_vip(&lab, from, to);
    let at = traffic.elapsed();
    match kind {
        Handover::Maintenance => {
            let s = tandem_e2e::vrrp_lab::set_maintenance(&lb1, true);
            assert_eq!(s.state(), VrrpState::Maintenance, "{s:?}");
        }
        Handover::Stop => {
            let took = lab.stop("lb1", "vrrpd", Duration::from_secs(10));
            eprintln!("vrrpd stopped in {took:?}");
        }
        Handover::Failback => {
            tandem_e2e::vrrp_lab::set_maintenance(&lb1, false);
        }
    }
    lab.wait_for("the new master to hold the VIP alone", SETTLE, |l| {
        l.holds_vip(to) && !l.holds_vip(from)
    });
    std::thread::sleep(Duration::from_millis(1500));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let vipless = watcher.join().expect("watcher");
    let report = traffic.finish();
    eprintln!(
        "{kind:?}: {}; VIP on no node for at most {vipless:?}; client gap {:?}",
        report.summary(),
        report.max_gap(
            at.saturating_sub(Duration::from_millis(200)),
            at + Duration::from_secs(1)
        )
    );
    HandedOver {
        report,
        vipless,
        at,
    }
}

/// What vrrpd guarantees: the VIP is held by some node at every instant
/// (the taker adds and announces before the leaver releases), and the
/// long-lived connections all continue.
fn assert_make_before_break(h: &HandedOver) {
    assert_eq!(
        h.vipless,
        Duration::ZERO,
        "make before break: the VIP was always held"
    );
    assert_eq!(h.report.long_lived, 50, "{}", h.report.summary());
    assert!(h.report.broken.is_empty(), "{}", h.report.summary());
    let _ = h.at;
}

/// And no request fails. A connection opened on the leaving master in the
/// last milliseconds before the taker announces reaches the taker before
/// (or after, once it is sender) its conntrack entry does: this needs
/// conntrack-syncd to apply the peer's entries also while sender (both-ways
/// replication).
fn assert_lossless(h: &HandedOver) {
    assert_make_before_break(h);
    assert_eq!(h.report.failed().len(), 0, "{}", h.report.summary());
}

/// `node maintenance enable` on the master: the peer holds the VIPs and
/// has announced them before the master releases.
#[test]
fn maintenance_hands_over_make_before_break_under_traffic() {
    assert_make_before_break(&handover(Handover::Maintenance, ""));
}

/// SIGTERM of the master's vrrpd (`systemctl stop vrrpd`): the same.
#[test]
fn stopping_the_masters_vrrpd_hands_over_make_before_break_under_traffic() {
    assert_make_before_break(&handover(Handover::Stop, ""));
}

/// The preferred node taking the role back (failback): the same.
#[test]
fn failback_hands_over_make_before_break_under_traffic() {
    assert_make_before_break(&handover(Handover::Failback, ""));
}

/// The three handovers lose no request at all (make-before-break, and
/// conntrack-syncd replicating both ways the flows opened on the leaving
/// master in its last milliseconds).
#[test]
fn planned_handovers_lose_no_request_with_both_ways_replication() {
    for kind in [Handover::Maintenance, Handover::Stop, Handover::Failback] {
        assert_lossless(&handover(kind, ""));
    }
}

/// What became of a connection whose first packet after a handover
/// reached the new master before its replicated entry: the echo (or the
/// error) the client got, and how many packets lb2 held back.
struct LateEntry {
    echo: Result<String, String>,
    held: u64,
}

/// lb2's conntrack-syncd is down while the client opens a connection on
/// lb1 and the role moves to lb2 (maintenance on lb1); the client's next
/// line reaches lb2, which has no entry for it yet (lb2 runs with
/// `nf_conntrack_tcp_loose=0`, so the kernel judges the packet invalid
/// rather than scheduling it anew); then conntrack-syncd starts on lb2 and
/// brings the entry from lb1. The window that a planned handover opens for
/// a few milliseconds, held open here for a second.
fn late_entry(sync_extra: &str) -> LateEntry {
    use std::io::{BufRead, BufReader, Write};
    let mut lab = ChaosLab::new(ChaosOptions {
        sync_extra: sync_extra.into(),
        ..ChaosOptions::default()
    });
    lab.start_cluster();
    lab.node("lb2")
        .ns
        .sysctl("net.netfilter.nf_conntrack_tcp_loose", "0")
        .expect("tcp_loose");
    lab.stop("lb2", "conntrack-syncd", Duration::from_secs(5));
    let stream = lab
        .client
        .run(|| {
            let s = std::net::TcpStream::connect_timeout(
                &format!("{VIP}:80").parse().expect("VIP"),
                Duration::from_secs(2),
            )?;
            s.set_read_timeout(Some(Duration::from_secs(8)))?;
            Ok::<_, std::io::Error>(s)
        })
        .expect("client thread")
        .expect("connect through lb1");
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut greeting = String::new();
    reader.read_line(&mut greeting).expect("greeting");
    tandem_e2e::vrrp_lab::set_maintenance(&lab.node("lb1").runtime_dir, true);
    let lb2_mac = lab.mac("lb2", "eth0");
    lab.wait_for(
        "lb2 to hold the VIP and the client to know it",
        SETTLE,
        |l| {
            l.vip_holders() == ["lb2"]
                && ChaosLab::neighbour(&l.client, VIP).as_deref() == Some(lb2_mac.as_str())
        },
    );
    (&stream).write_all(b"ping\n").expect("write");
    std::thread::sleep(Duration::from_millis(300));
    lab.start("lb2", "conntrack-syncd");
    let mut echo = String::new();
    let echo = match reader.read_line(&mut echo) {
        Ok(0) => Err("connection closed".to_owned()),
        Ok(_) => Ok(echo.trim().to_owned()),
        Err(e) => Err(e.to_string()),
    };
    // Without the grace there is no such counter: nothing held.
    let held = tandem_e2e::chaos_lab::nft_packets(
        &lab.node("lb2").ns,
        &["list", "counter", "inet", "tandem", "orphans_held"],
        true,
    );
    eprintln!("echo {echo:?}; lb2 held {held} packets");
    LateEntry { echo, held }
}

/// The packet is held back, its retransmission finds the entry that
/// replication brought: the connection continues.
#[test]
fn a_packet_ahead_of_its_replicated_entry_is_held_until_the_entry_arrives() {
    let r = late_entry("orphan_grace_ms = 5000");
    assert_eq!(r.echo, Ok("ping".to_owned()));
    assert!(r.held >= 1, "lb2 held {} packets", r.held);
}

/// Control: with `orphan_grace_ms = 0` the kernel answers the packet at
/// once (a reset from the VIP's local stack): the connection is lost
/// although its entry arrives a moment later.
#[test]
fn control_without_the_orphan_grace_an_early_packet_resets_the_connection() {
    let r = late_entry("orphan_grace_ms = 0");
    assert!(r.echo.is_err(), "{:?}", r.echo);
    assert_eq!(r.held, 0);
}

/// Control: with `handover_timeout_ms = 0` the master releases at once
/// (RFC 5798's behaviour): the VIP is on no node until the peer's
/// Skew_Time has passed.
#[test]
fn control_releasing_at_once_leaves_the_vip_on_no_node() {
    let h = handover(Handover::Maintenance, "handover_timeout_ms = 0");
    assert!(
        h.vipless >= Duration::from_millis(20),
        "VIP on no node for {:?}",
        h.vipless
    );
}

/// SIGKILL of the master's vrrpd (the node and its links stay up): after
/// how long the VIPs are on exactly one node (the backup), if within
/// `within`. lb1 is master at priority 150, lb2 backup at 100. The time is
/// taken from the daemons' own log lines (the guard's removal, the
/// backup's takeover), which a loaded machine does not delay the way it
/// delays this test's polling; the polling only confirms the end state.
fn kill_masters_vrrpd(lab: &mut ChaosLab, within: Duration) -> Option<Duration> {
    use tandem_e2e::chaos_lab::{SNAT, logged_at, unix_now};
    let killed = Instant::now();
    let killed_at = unix_now();
    lab.signal("lb1", "vrrpd", nix::sys::signal::Signal::SIGKILL);
    while killed.elapsed() < within {
        let one = lab.vip_holders() == ["lb2"]
            && lab.holds("lb2", "eth1", SNAT)
            && !lab.holds("lb1", "eth1", SNAT);
        if one {
            let removed = logged_at(&lab.node("lb1").log("vrrpd"), "(vrrpd is gone)");
            let took_over = lab
                .node("lb2")
                .log("vrrpd")
                .lines()
                .filter(|l| l.contains("VRRP state backup -> master"))
                .filter_map(|l| logged_at(l, "backup -> master"))
                .find(|t| *t >= killed_at);
            let polled = killed.elapsed();
            return Some(match (removed, took_over) {
                (Some(r), Some(t)) => Duration::from_secs_f64((r.max(t) - killed_at).max(0.0)),
                _ => polled,
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

fn killed_lab(vrrp_extra: &str, failback: &str) -> ChaosLab {
    let mut lab = ChaosLab::new(ChaosOptions {
        vrrp_extra: vrrp_extra.into(),
        failback: failback.into(),
        sync: false,
        ..ChaosOptions::default()
    });
    lab.start_cluster();
    lab
}

/// A dead vrrpd leaves no second master: its floating IPs carry a kernel
/// lifetime that only a living vrrpd refreshes, so they are gone (and on
/// the backup) within Master_Down_Interval + 1 s of the kill.
#[test]
fn a_killed_vrrpd_leaves_the_vips_on_exactly_one_node() {
    let mut lab = killed_lab("", "none");
    let bound = lab.opts.master_down_interval(100) + Duration::from_secs(1);
    let took = kill_masters_vrrpd(&mut lab, Duration::from_secs(5))
        .expect("the VIPs ended up on exactly one node");
    eprintln!("VIPs on the backup alone {took:?} after the kill (bound {bound:?})");
    assert!(took <= bound, "{took:?} > {bound:?}");
    // And the service answers from the backup.
    lab.wait_for("the farm to answer", SETTLE, |l| l.request().is_ok());
}

/// Control: with permanent floating IPs (`floating_ip_lifetime_s = 0`),
/// the dead vrrpd's addresses stay: two nodes hold the VIPs.
#[test]
fn control_with_permanent_addresses_a_killed_vrrpd_leaves_a_second_master() {
    let mut lab = killed_lab("floating_ip_lifetime_s = 0", "none");
    assert_eq!(kill_masters_vrrpd(&mut lab, Duration::from_secs(3)), None);
    assert_eq!(lab.vip_holders(), ["lb1", "lb2"]);
}

/// After the kill, vrrpd restarts on the old master: it rejoins as backup
/// and takes nothing back. Returns lb2's became_master count before and
/// after, and both states 3 s after the restart.
fn restart_after_kill(lab: &mut ChaosLab) -> ((u64, u64), (Option<VrrpState>, Option<VrrpState>)) {
    assert!(kill_masters_vrrpd(lab, Duration::from_secs(5)).is_some());
    lab.wait_for("lb2 master", SETTLE, |l| {
        l.state("lb2") == Some(VrrpState::Master)
    });
    let before = lab.role_changes("lb2").0;
    lab.start("lb1", "vrrpd");
    std::thread::sleep(Duration::from_secs(3));
    let after = lab.role_changes("lb2").0;
    ((before, after), (lab.state("lb1"), lab.state("lb2")))
}

/// A restarted vrrpd whose peer is master rejoins as backup, without a
/// second failover — also when it is the preferred node (failback): its
/// preempt delay leaves the decision to clustermanager's failback gate.
#[test]
fn a_restarted_vrrpd_rejoins_as_backup_without_a_second_failover() {
    for failback in ["none", "lb1"] {
        let mut lab = killed_lab("", failback);
        let ((before, after), states) = restart_after_kill(&mut lab);
        assert_eq!(before, after, "failback {failback}: lb2 stayed master");
        assert_eq!(
            states,
            (Some(VrrpState::Backup), Some(VrrpState::Master)),
            "failback {failback}"
        );
        assert_eq!(lab.vip_holders(), ["lb2"]);
    }
}

/// Control: the preferred node without a preempt delay takes the role back
/// at once after its restart (the second failover).
#[test]
fn control_without_preempt_delay_a_restarted_preferred_node_preempts() {
    let mut lab = killed_lab("preempt_delay_s = 0", "lb1");
    let (_, states) = restart_after_kill(&mut lab);
    assert_eq!(
        states.0,
        Some(VrrpState::Master),
        "lb1 preempted: {states:?}"
    );
}

/// A vrrpd that hangs (SIGSTOP) rather than dies keeps its guard's pipe
/// open: its addresses' kernel lifetime removes them. Returns how long
/// after the stop the VIPs were on exactly one node, if within `within`,
/// then lets the hung vrrpd resume.
fn hang_masters_vrrpd(vrrp_extra: &str, within: Duration) -> (Option<Duration>, Vec<String>) {
    use tandem_e2e::chaos_lab::SNAT;
    let mut lab = killed_lab(vrrp_extra, "none");
    let stopped = Instant::now();
    lab.signal("lb1", "vrrpd", nix::sys::signal::Signal::SIGSTOP);
    let mut one = None;
    while stopped.elapsed() < within {
        if lab.vip_holders() == ["lb2"] && !lab.holds("lb1", "eth1", SNAT) {
            one = Some(stopped.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let holders = lab.vip_holders();
    lab.signal("lb1", "vrrpd", nix::sys::signal::Signal::SIGCONT);
    // Resumed, the preferred-by-priority lb1 wins the role back cleanly.
    lab.wait_for("one master again", SETTLE, |l| l.vip_holders().len() == 1);
    (one, holders)
}

/// A hung vrrpd: its floating IPs expire with their lifetime (1 s at
/// 100 ms adverts), so the backup that took over is the only holder soon
/// after.
#[test]
fn a_hung_vrrpd_loses_its_vips_with_their_lifetime() {
    let (one, _) = hang_masters_vrrpd("", Duration::from_secs(4));
    let took = one.expect("the VIPs ended up on exactly one node");
    eprintln!("VIPs on the backup alone {took:?} after vrrpd hung");
    // The lifetime (1 s) and the kernel's quarter-second check, plus slack.
    assert!(took <= Duration::from_millis(2000), "{took:?}");
}

/// Control: with permanent addresses the hung master keeps them: two holders.
#[test]
fn control_with_permanent_addresses_a_hung_vrrpd_keeps_its_vips() {
    let (one, holders) = hang_masters_vrrpd("floating_ip_lifetime_s = 0", Duration::from_secs(3));
    assert_eq!(one, None);
    assert_eq!(holders, ["lb1", "lb2"]);
}

/// The backup's vrrpd stalls (SIGSTOP) for longer than
/// Master_Down_Interval while the master keeps advertising, then resumes:
/// its timer has expired, but the master's adverts are already queued on
/// its socket. Returns the backup's takeovers meanwhile.
fn stall_the_backup(env: &[(&str, &str)]) -> u64 {
    let mut lab = ChaosLab::new(ChaosOptions {
        sync: false,
        ..ChaosOptions::default()
    });
    lab.start_cluster_with_env(env);
    let before = lab.role_changes("lb2").0;
    for _ in 0..5 {
        lab.signal("lb2", "vrrpd", nix::sys::signal::Signal::SIGSTOP);
        // Master_Down_Interval is 361 ms.
        std::thread::sleep(Duration::from_millis(800));
        lab.signal("lb2", "vrrpd", nix::sys::signal::Signal::SIGCONT);
        std::thread::sleep(Duration::from_millis(400));
    }
    lab.wait_for("lb2 backup", SETTLE, |l| {
        l.state("lb2") == Some(VrrpState::Backup)
    });
    lab.role_changes("lb2").0 - before
}

/// An advert already received is handled before a timer that expired in
/// the same wake-up: a stalled backup does not take over falsely.
#[test]
fn a_stalled_backup_hears_the_queued_adverts_before_its_timer() {
    assert_eq!(stall_the_backup(&[]), 0, "no false takeover");
}

/// Control: acting on the expired timer first (a fault injected through
/// `TANDEM_VRRPD_FAULT_TIMER_FIRST`), every stall is a false takeover.
#[test]
fn control_timer_first_a_stalled_backup_takes_over_falsely() {
    let n = stall_the_backup(&[("TANDEM_VRRPD_FAULT_TIMER_FIRST", "1")]);
    assert!(n >= 3, "false takeovers: {n}");
}

/// What a short flap left: the master's vrrpd paused 600 ms (the backup
/// took over and announced, 20 times 100 ms apart), then resumed.
struct Flapped {
    /// Announcements of the VIP by the backup the client saw, up to its
    /// release, and in the 2 s after it.
    announced_before: u64,
    announced_after: u64,
    /// Who the neighbour entries named 1 s after the resume.
    neighbours: Vec<String>,
    /// Farm packets the backup forwarded in the second after that.
    backup_forwarded: u64,
}

fn flap(vrrp_extra: &str) -> Flapped {
    let mut lab = ChaosLab::new(ChaosOptions {
        vrrp_extra: vrrp_extra.into(),
        garp: (20, 100),
        ..ChaosOptions::default()
    });
    lab.start_cluster();
    lab.install_counters();
    lab.count_announcements_from("lb2");
    // Else whether the backup's few announcements move the entries during
    // the flap depends on when they were last updated (neigh locktime).
    lab.accept_every_announcement();
    let traffic = lab.traffic(Duration::from_millis(20), 10);
    std::thread::sleep(Duration::from_millis(500));
    lab.signal("lb1", "vrrpd", nix::sys::signal::Signal::SIGSTOP);
    std::thread::sleep(Duration::from_millis(600));
    lab.signal("lb1", "vrrpd", nix::sys::signal::Signal::SIGCONT);
    let resumed = Instant::now();
    lab.wait_for("lb2 to step down", SETTLE, |l| {
        l.state("lb2") == Some(VrrpState::Backup)
    });
    let announced_before = lab.announcements_seen();
    let during = lab.neighbours();
    std::thread::sleep(Duration::from_secs(1).saturating_sub(resumed.elapsed()));
    let neighbours = lab.neighbours();
    let f0 = lab.forwarded("lb2");
    std::thread::sleep(Duration::from_secs(1));
    let backup_forwarded = lab.forwarded("lb2") - f0;
    let announced_after = lab.announcements_seen() - announced_before;
    let report = traffic.finish();
    eprintln!(
        "flap: {}; entries during the flap {during:?}, after {neighbours:?}",
        report.summary()
    );
    if std::env::var_os("CHAOS_LOGS").is_some() {
        for n in ["lb1", "lb2"] {
            for d in ["vrrpd", "conntrack-syncd"] {
                eprintln!("--- {n} {d}\n{}", lab.node(n).log(d));
            }
        }
    }
    Flapped {
        announced_before,
        announced_after,
        neighbours,
        backup_forwarded,
    }
}

/// A short flap: the master resumes, hears the backup that took over
/// meanwhile and re-announces, so the traffic comes back to it; and the
/// backup's announcement burst stops the moment it releases the VIP.
/// (Where the entries point during the flap is not asserted: both nodes
/// hold the VIP for a moment and both kernels' own ARP traffic moves the
/// client's entry; the heal's control is the split-brain one.)
#[test]
fn a_short_flap_brings_the_traffic_back_and_stops_the_backups_announcements() {
    let f = flap("");
    assert!(
        f.announced_before > 0,
        "the client saw the backup's announcements"
    );
    assert_eq!(f.announced_after, 0, "no announcement after the release");
    assert_eq!(f.neighbours, ["lb1", "lb1", "lb1"]);
    assert_eq!(f.backup_forwarded, 0, "the backup forwards nothing");
}

/// `systemctl stop vrrpd` on the master, vrrpd started again, then the same
/// on the new master: the role goes there and back. vrrpd serves its state
/// stream until the handover is done, so the stopping node's
/// conntrack-syncd sees it leave the master role and keeps the peer's flows
/// up to date; the long-lived connections survive both moves.
#[test]
fn stopping_vrrpd_there_and_back_keeps_every_long_lived_connection() {
    let mut lab = ChaosLab::new(ChaosOptions {
        priorities: (100, 100),
        ..ChaosOptions::default()
    });
    lab.start_cluster();
    let traffic = lab.traffic(Duration::from_millis(20), 20);
    for (from, to) in [("lb1", "lb2"), ("lb2", "lb1")] {
        lab.stop(from, "vrrpd", Duration::from_secs(10));
        lab.wait_for("the peer to hold the VIP alone", SETTLE, |l| {
            l.holds_vip(to) && !l.holds_vip(from)
        });
        lab.wait_for(
            "the stopped node's conntrack-syncd to receive",
            SETTLE,
            |l| l.conntrack(from).map(|c| c.role()) == Some(tandem_proto::v1::SyncRole::Receiver),
        );
        lab.start(from, "vrrpd");
        std::thread::sleep(Duration::from_secs(1));
    }
    std::thread::sleep(Duration::from_secs(1));
    let report = traffic.finish();
    eprintln!("there and back: {}", report.summary());
    assert_eq!(report.long_lived, 20, "{}", report.summary());
    assert!(report.broken.is_empty(), "{}", report.summary());
}
