//! vrrpd in a namespace lab: two nodes and a client on one bridge, real
//! daemons, real VRRP, the floating IP probed from the client.

use std::time::Duration;

use tandem_e2e::vrrp_lab::{ClusterOptions, Speaker, VrrpLab, set_maintenance, watch_states};
use tandem_proto::v1::VrrpState;

const SETTLE: Duration = Duration::from_secs(10);

/// Both nodes up, one master, the VIP answering from it.
fn elected(opts: &ClusterOptions) -> (VrrpLab, String) {
    let mut lab = VrrpLab::new(opts);
    lab.start("lb1");
    lab.start("lb2");
    let master = lab.wait_elected(SETTLE);
    let m = master.clone();
    lab.wait_until(SETTLE, "the VIP to answer from the master", |l| {
        l.vip_answer().as_deref() == Some(m.as_str())
    });
    (lab, master)
}

fn other(name: &str) -> &'static str {
    if name == "lb1" { "lb2" } else { "lb1" }
}

#[test]
fn backup_takes_over_when_master_is_killed() {
    let (mut lab, master) = elected(&ClusterOptions::default());
    let backup = other(&master);
    lab.crash(&master);
    let took = lab.wait_until(SETTLE, "the backup to become master", |l| {
        l.state(backup) == Some(VrrpState::Master)
    });
    // Master_Down_Interval at 100 ms is ~361 ms; allow scheduling slack.
    assert!(took < Duration::from_secs(2), "took over in {took:?}");
    // Within 1 s of the takeover: only the gratuitous ARP moves the
    // client's ARP entry that fast (it would stay on the dead MAC for ~30 s).
    lab.wait_until(
        Duration::from_secs(1),
        "the VIP to answer from the new master",
        |l| l.vip_answer().as_deref() == Some(backup),
    );
    let s = lab.status(backup).expect("status");
    assert!(
        s.reason.contains("no advertisement"),
        "reason names the silence: {}",
        s.reason
    );
}

#[test]
fn a_healed_split_brain_leaves_exactly_one_master_within_three_intervals() {
    let (lab, _) = elected(&ClusterOptions::default());
    lab.cut_heartbeat("lb1", true);
    lab.wait_until(SETTLE, "both nodes to become master", |l| {
        l.masters().len() == 2
    });
    lab.cut_heartbeat("lb1", false);
    let healed = lab.wait_until(SETTLE, "one master again", |l| l.masters().len() == 1);
    // Three advertisement intervals (3 x 100 ms), as the RFC's tie-break
    // allows: the lower-address master yields at the first advert it hears.
    // The measure includes a status poll of both daemons (every 10 ms).
    eprintln!("split brain healed in {healed:?}");
    assert!(healed <= Duration::from_millis(300), "healed in {healed:?}");
    // Equal priority: the higher address keeps the role (RFC 5798 §6.4.3).
    assert_eq!(lab.masters(), vec!["lb2".to_owned()]);
}

#[test]
fn without_failback_a_returning_node_does_not_preempt() {
    let (mut lab, master) = elected(&ClusterOptions::default());
    let backup = other(&master).to_owned();
    lab.crash(&master);
    lab.wait_until(SETTLE, "takeover", |l| {
        l.state(&backup) == Some(VrrpState::Master)
    });
    lab.revive(&master);
    lab.start(&master);
    lab.wait_until(SETTLE, "the returning node to settle as backup", |l| {
        l.state(&master) == Some(VrrpState::Backup)
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        lab.masters(),
        vec![backup],
        "no preemption with failback = none"
    );
}

#[test]
fn with_failback_the_preferred_node_takes_the_role_back() {
    let opts = ClusterOptions {
        failback: "lb1".into(),
        ..ClusterOptions::default()
    };
    let (mut lab, master) = elected(&opts);
    assert_eq!(master, "lb1", "the preferred node wins the first election");
    lab.crash("lb1");
    lab.wait_until(SETTLE, "lb2 takes over", |l| {
        l.state("lb2") == Some(VrrpState::Master)
    });
    lab.revive("lb1");
    lab.start("lb1");
    lab.wait_until(SETTLE, "lb1 preempts", |l| {
        l.masters() == vec!["lb1".to_owned()]
    });
    lab.wait_until(SETTLE, "the VIP answers from lb1", |l| {
        l.vip_answer().as_deref() == Some("lb1")
    });
}

#[test]
fn a_tracked_interface_going_down_moves_the_vip() {
    let opts = ClusterOptions {
        tracked: true,
        ..ClusterOptions::default()
    };
    let (lab, master) = elected(&opts);
    let backup = other(&master);
    lab.nodes
        .iter()
        .find(|n| n.name == master)
        .expect("node")
        .ns
        .set_link("eth1", false)
        .expect("eth1 down");
    lab.wait_until(SETTLE, "the master to go to fault", |l| {
        l.state(&master) == Some(VrrpState::Fault)
    });
    lab.wait_until(SETTLE, "the backup to take over", |l| {
        l.state(backup) == Some(VrrpState::Master)
    });
    lab.wait_until(SETTLE, "the VIP to answer from the backup", |l| {
        l.vip_answer().as_deref() == Some(backup)
    });
    let s = lab.status(&master).expect("status");
    assert!(
        s.reason.contains("eth1"),
        "reason names the interface: {}",
        s.reason
    );
    lab.nodes
        .iter()
        .find(|n| n.name == master)
        .expect("node")
        .ns
        .set_link("eth1", true)
        .expect("eth1 up");
    lab.wait_until(SETTLE, "the faulted node to return as backup", |l| {
        l.state(&master) == Some(VrrpState::Backup)
    });
}

#[test]
fn maintenance_hands_the_master_role_over_at_once() {
    let opts = ClusterOptions {
        advert_interval_ms: 1000,
        ..ClusterOptions::default()
    };
    let (lab, master) = elected(&opts);
    let backup = other(&master);
    let dir = lab
        .nodes
        .iter()
        .find(|n| n.name == master)
        .expect("node")
        .runtime_dir
        .clone();
    let s = set_maintenance(&dir, true);
    assert_eq!(s.state(), VrrpState::Maintenance);
    // With 1 s adverts Master_Down_Interval is ~3.6 s; the priority-0 advert
    // makes the backup take over after Skew_Time (~0.6 s) instead.
    let took = lab.wait_until(SETTLE, "the backup to take over", |l| {
        l.state(backup) == Some(VrrpState::Master)
    });
    assert!(took < Duration::from_millis(1500), "handover took {took:?}");
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        lab.state(&master),
        Some(VrrpState::Maintenance),
        "stays out of the election"
    );
    let s = set_maintenance(&dir, false);
    assert_eq!(s.state(), VrrpState::Backup);
}

/// RFC 5798 interop with a real keepalived (Debian's), in both arrangements:
/// one master, failover when either side dies, agreement after recovery.
#[test]
fn vrrpd_and_keepalived_interoperate_in_both_arrangements() {
    for (one, two) in [
        (Speaker::Vrrpd, Speaker::Keepalived),
        (Speaker::Keepalived, Speaker::Vrrpd),
    ] {
        let mut lab = VrrpLab::new(&ClusterOptions::default());
        lab.start_as("lb1", one);
        lab.start_as("lb2", two);
        let stable = Duration::from_secs(1);
        lab.wait_stable(SETTLE, stable, "exactly one VIP holder", |l| {
            l.vip_holders().len() == 1
        });
        let master = lab.vip_holders().remove(0);
        let backup = other(&master);
        let b = backup.to_owned();
        let m = master.clone();
        lab.wait_until(SETTLE, "the VIP to answer from the master", |l| {
            l.vip_answer().as_deref() == Some(m.as_str())
        });

        lab.crash(&master);
        lab.wait_until(SETTLE, "the backup to take the VIP", |l| l.holds_vip(&b));
        lab.wait_until(SETTLE, "the VIP to answer from the backup", |l| {
            l.vip_answer().as_deref() == Some(b.as_str())
        });

        let speaker = lab.node(&master).speaker;
        lab.revive(&master);
        // A machine coming back after a crash still has the VIP configured
        // from before (kill -9 ran no cleanup); the speakers sort it out.
        lab.start_as(&master, speaker);
        lab.wait_stable(SETTLE, stable, "agreement after recovery", |l| {
            l.vip_holders().len() == 1
        });
        let holder = lab.vip_holders().remove(0);
        lab.wait_until(SETTLE, "the VIP to answer from its holder", |l| {
            l.vip_answer().as_deref() == Some(holder.as_str())
        });
        eprintln!("{one:?} + {two:?}: first master {master}, after recovery {holder}");
    }
}

#[test]
fn unicast_peers_elect_and_fail_over_without_multicast() {
    let opts = ClusterOptions {
        unicast: true,
        ..ClusterOptions::default()
    };
    let (mut lab, master) = elected(&opts);
    let backup = other(&master);
    // Adverts go to the peer, not the group: the backup hears them.
    let heard = lab
        .status(backup)
        .expect("status")
        .counters
        .expect("counters")
        .adverts_received;
    assert!(heard > 0, "the backup heard the master's unicast adverts");
    lab.crash(&master);
    lab.wait_until(SETTLE, "the backup to answer on the VIP", |l| {
        l.vip_answer().as_deref() == Some(backup)
    });
}

#[test]
fn watch_state_streams_the_current_state_then_each_change_with_its_reason() {
    let (mut lab, master) = elected(&ClusterOptions::default());
    let backup = other(&master);
    let dir = lab
        .nodes
        .iter()
        .find(|n| n.name == backup)
        .expect("node")
        .runtime_dir
        .clone();
    let watcher = watch_states(&dir, 2, Duration::from_secs(10));
    lab.crash(&master);
    let changes = watcher.join().expect("watcher");
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert_eq!(
        changes[0].new_state(),
        VrrpState::Backup,
        "first the current state"
    );
    assert_eq!(changes[1].old_state(), VrrpState::Backup);
    assert_eq!(changes[1].new_state(), VrrpState::Master);
    assert!(
        changes[1]
            .reason
            .contains("no advertisement from master 10.0.0."),
        "{}",
        changes[1].reason
    );
}

#[test]
fn vrrp_over_ipv6_elects_and_moves_the_ipv6_vip() {
    let opts = ClusterOptions {
        ipv6: true,
        ..ClusterOptions::default()
    };
    let mut lab = VrrpLab::new(&opts);
    lab.start("lb1");
    lab.start("lb2");
    let master = lab.wait_elected(SETTLE);
    let backup = other(&master);
    // The backup heard the master over IPv6 (link-local source, ff02::12).
    let s = lab.status(backup).expect("status");
    assert!(
        s.master_address.starts_with("fe80::"),
        "master seen by its link-local address: {}",
        s.master_address
    );
    assert!(lab.holds_vip6(&master) && !lab.holds_vip6(backup));
    lab.wait_until(SETTLE, "the client to reach the IPv6 VIP", |l| {
        l.ping6_vip()
    });
    lab.crash(&master);
    lab.wait_until(SETTLE, "the backup to take the IPv6 VIP", |l| {
        l.holds_vip6(backup)
    });
    // Within 2 s: only the unsolicited neighbour advertisement moves the
    // client's cache entry that fast (unaided, it goes stale and re-probes
    // over several seconds).
    lab.wait_until(
        Duration::from_secs(2),
        "the client to reach the IPv6 VIP on the backup",
        |l| l.ping6_vip(),
    );
}

/// Over IPv6 adverts come from link-local addresses, which cluster.toml
/// does not list: the peer's is accepted once verified (same MAC as the
/// peer's configured address); a foreign speaker's is refused and
/// reported, and takes no role.
#[test]
fn ipv6_adverts_count_only_from_the_peers_verified_link_local_address() {
    let opts = ClusterOptions {
        ipv6: true,
        ..ClusterOptions::default()
    };
    let mut lab = VrrpLab::new(&opts);
    lab.start("lb1");
    lab.start("lb2");
    let master = lab.wait_elected(SETTLE);
    let backup = other(&master);
    let before: Vec<_> = ["lb1", "lb2"]
        .iter()
        .map(|n| {
            lab.status(n)
                .and_then(|s| s.counters)
                .map(|c| (c.became_master, c.became_backup))
        })
        .collect();
    let spoofer = lab.start_foreign_speaker(&opts);
    std::thread::sleep(Duration::from_secs(3));
    let after: Vec<_> = ["lb1", "lb2"]
        .iter()
        .map(|n| {
            lab.status(n)
                .and_then(|s| s.counters)
                .map(|c| (c.became_master, c.became_backup))
        })
        .collect();
    assert_eq!(before, after, "no role change");
    assert_eq!(lab.masters(), vec![master.clone()]);
    for n in [master.as_str(), backup] {
        let s = lab.status(n).expect("status");
        assert_eq!(s.foreign_speakers.len(), 1, "{n}: {:?}", s.foreign_speakers);
        let f = &s.foreign_speakers[0];
        assert!(f.address.starts_with("fe80::"), "{}", f.address);
        assert_eq!(f.priority, 254);
        assert!(s.counters.expect("counters").foreign_adverts_dropped > 0);
    }
    // The backup still follows the real master, by its link-local address.
    let s = lab.status(backup).expect("status");
    assert!(
        s.master_address.starts_with("fe80::"),
        "{}",
        s.master_address
    );
    drop(spoofer);
}

fn node_dir(lab: &VrrpLab, name: &str) -> std::path::PathBuf {
    lab.nodes
        .iter()
        .find(|n| n.name == name)
        .expect("node")
        .runtime_dir
        .clone()
}

/// Maintenance is kept in the state directory: a vrrpd that crashes and
/// restarts (or a node that reboots) comes back in maintenance and stays
/// out of the election. Returns the state after the restart.
fn restart_in_maintenance(forget: bool) -> (Option<VrrpState>, bool) {
    let (mut lab, master) = elected(&ClusterOptions::default());
    let backup = other(&master).to_owned();
    let dir = node_dir(&lab, &master);
    let s = set_maintenance(&dir, true);
    assert_eq!(s.state(), VrrpState::Maintenance);
    let flag = tandem_e2e::state_dir_beside(&dir).join("vrrpd/maintenance");
    assert!(flag.exists(), "kept in {}", flag.display());
    lab.kill9(&master);
    if forget {
        std::fs::remove_file(&flag).expect("forget the flag");
    }
    lab.start(&master);
    std::thread::sleep(Duration::from_secs(2));
    let s = lab.status(&master).expect("status");
    let never_master =
        s.counters.expect("counters").became_master == 0 && lab.masters() == vec![backup];
    (Some(s.state()), never_master)
}

#[test]
fn maintenance_survives_a_vrrpd_restart() {
    let (state, never_master) = restart_in_maintenance(false);
    assert_eq!(state, Some(VrrpState::Maintenance));
    assert!(never_master, "the restarted node took no role");
}

/// Control: without the persisted flag the restarted vrrpd is a backup again.
#[test]
fn control_without_the_persisted_flag_a_restart_forgets_maintenance() {
    let (state, _) = restart_in_maintenance(true);
    assert_eq!(state, Some(VrrpState::Backup));
}

/// The router thread of a vrrpd process: (SCHED policy, rt priority).
fn router_thread_scheduling(pid: i32) -> (u32, u32) {
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
        let task = entry.expect("task").path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        if comm.trim() == "vrrp-router" {
            let stat = std::fs::read_to_string(task.join("stat")).expect("stat");
            // Fields after the command name's closing parenthesis; policy
            // and rt_priority are fields 41 and 40 of stat(5).
            let rest = &stat[stat.rfind(')').expect("comm end") + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            return (
                f[41 - 3].parse().expect("policy"),
                f[40 - 3].parse().expect("prio"),
            );
        }
    }
    panic!("no vrrp-router thread in process {pid}");
}

/// The advert path runs on its own thread at real-time priority
/// (SCHED_FIFO 10 by default), with the process's memory locked.
#[test]
fn the_advert_thread_runs_at_real_time_priority_with_memory_locked() {
    for (extra, policy, prio) in [("", 1, 10), ("rt_priority = 0", 0, 0)] {
        let mut lab = VrrpLab::new(&ClusterOptions {
            vrrp_extra: extra.into(),
            ..ClusterOptions::default()
        });
        lab.start("lb1");
        let pid = lab
            .node("lb1")
            .vrrpd
            .as_ref()
            .expect("vrrpd")
            .pid()
            .as_raw();
        assert_eq!(router_thread_scheduling(pid), (policy, prio), "{extra:?}");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let locked = status
            .lines()
            .find(|l| l.starts_with("VmLck:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|k| k.parse::<u64>().ok())
            .unwrap_or(0);
        assert_eq!(locked > 0, policy == 1, "{extra:?}: VmLck {locked} kB");
    }
}

/// VRRPv3 over IPv6 with unicast adverts: sent from the link-local address
/// (the checksum covers it) to the peer's configured address, verified on
/// arrival as the peer's; the pair elects and fails over.
#[test]
fn vrrp_over_ipv6_unicast_elects_and_fails_over() {
    let opts = ClusterOptions {
        ipv6: true,
        unicast: true,
        ..ClusterOptions::default()
    };
    let mut lab = VrrpLab::new(&opts);
    lab.start("lb1");
    lab.start("lb2");
    let master = lab.wait_elected(SETTLE);
    let backup = other(&master);
    let s = lab.status(backup).expect("status");
    assert!(
        s.counters.expect("counters").adverts_received > 0,
        "the backup hears the master's unicast adverts"
    );
    assert!(
        s.master_address.starts_with("fe80::"),
        "{}",
        s.master_address
    );
    lab.crash(&master);
    lab.wait_until(SETTLE, "the backup to take the IPv6 VIP", |l| {
        l.holds_vip6(backup)
    });
}
