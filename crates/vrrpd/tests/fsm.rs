//! Scripted scenarios for the RFC 5798 state machine: events and a fake
//! clock in, actions out.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use vrrpd::fsm::{Action, Advert, Announce, Ignored, RouterConfig, State, VirtualRouter};

const A: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 168, 100, 1));
const B: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 168, 100, 2));

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn router(priority: u8, interval_cs: u16, preempt: bool, addr: IpAddr) -> VirtualRouter {
    VirtualRouter::new(RouterConfig::new(priority, interval_cs, preempt, addr))
}

fn router_with(config: RouterConfig) -> VirtualRouter {
    VirtualRouter::new(config)
}

fn adverts(actions: &[Action]) -> Vec<u8> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::SendAdvert { priority } => Some(*priority),
            _ => None,
        })
        .collect()
}

fn announces(actions: &[Action]) -> Vec<Announce> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Announce(why) => Some(*why),
            _ => None,
        })
        .collect()
}

/// A router that became master at `t0 + 4 s` (priority 100, 1 s adverts).
fn master_at(t0: Instant, priority: u8, config: Option<RouterConfig>) -> VirtualRouter {
    let mut r = match config {
        Some(c) => router_with(c),
        None => router(priority, 100, true, A),
    };
    r.startup(t0, "start");
    r.on_timer(t0 + ms(4000));
    assert_eq!(r.state(), State::Master);
    r
}

fn advert(sender: IpAddr, priority: u8, interval_cs: u16) -> Advert {
    Advert {
        sender,
        priority,
        advert_interval_cs: interval_cs,
    }
}

fn transitions(actions: &[Action]) -> Vec<(State, State)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Transition { from, to, .. } => Some((*from, *to)),
            _ => None,
        })
        .collect()
}

#[test]
fn timers_follow_rfc_5798_section_6_1() {
    // Priority 100 at 1 s: Skew_Time = 156 * 100 / 256 cs = 609.375 ms.
    let r = router(100, 100, true, A);
    assert_eq!(r.skew_time(), Duration::from_micros(609_375));
    assert_eq!(r.master_down_interval(), Duration::from_micros(3_609_375));
    // At 10 ms, the smallest interval: 30 ms + 6.09375 ms.
    let r = router(100, 1, true, A);
    assert_eq!(r.master_down_interval(), Duration::from_micros(36_093));
    // Higher priority, shorter skew: the best backup moves first.
    assert!(router(200, 100, true, A).skew_time() < router(100, 100, true, A).skew_time());
}

#[test]
fn backup_becomes_master_after_master_down_interval() {
    let t0 = Instant::now();
    let mut r = router(100, 100, true, A);
    let out = r.startup(t0, "start");
    assert_eq!(transitions(&out), vec![(State::Initialize, State::Backup)]);
    assert_eq!(r.deadline(), Some(t0 + Duration::from_micros(3_609_375)));

    assert!(r.on_timer(t0 + ms(3609)).is_empty(), "not yet");
    let out = r.on_timer(t0 + ms(3610));
    // Addresses and the first announcement before the first advert.
    assert_eq!(out[0], Action::TakeAddresses);
    assert_eq!(out[1], Action::Announce(Announce::Takeover));
    assert_eq!(out[2], Action::SendAdvert { priority: 100 });
    assert_eq!(transitions(&out), vec![(State::Backup, State::Master)]);
    assert_eq!(r.master(), Some(A));
}

#[test]
fn adverts_from_the_master_keep_a_backup_backup() {
    let t0 = Instant::now();
    let mut r = router(100, 100, true, A);
    r.startup(t0, "start");
    for i in 1..=10 {
        let now = t0 + ms(1000 * i);
        assert_eq!(r.on_advert(now, advert(B, 150, 100)), Ok(vec![]));
        assert!(r.on_timer(now + ms(3000)).is_empty());
    }
    assert_eq!(r.state(), State::Backup);
    assert_eq!(r.master(), Some(B));
}

#[test]
fn backup_learns_the_masters_interval() {
    let t0 = Instant::now();
    let mut r = router(100, 100, true, A);
    r.startup(t0, "start");
    r.on_advert(t0, advert(B, 150, 5)).unwrap();
    // 3 * 50 ms + 156 * 5 / 256 cs.
    assert_eq!(
        r.deadline(),
        Some(t0 + ms(150) + Duration::from_micros(30_468))
    );
}

#[test]
fn priority_zero_from_the_master_means_takeover_after_skew_time() {
    let t0 = Instant::now();
    let mut r = router(100, 100, true, A);
    r.startup(t0, "start");
    r.on_advert(t0, advert(B, 150, 100)).unwrap();
    r.on_advert(t0 + ms(10), advert(B, 0, 100)).unwrap();
    assert_eq!(r.deadline(), Some(t0 + ms(10) + r.skew_time()));
    let out = r.on_timer(t0 + ms(10) + r.skew_time());
    assert_eq!(transitions(&out), vec![(State::Backup, State::Master)]);
    assert!(
        matches!(&out[3], Action::Transition { reason, .. } if reason == "master 192.168.100.2 left (priority 0 advertisement)"),
        "{out:?}"
    );
}

#[test]
fn master_advertises_every_interval() {
    let t0 = Instant::now();
    let mut r = router(255, 100, true, A);
    let out = r.startup(t0, "address owner");
    assert_eq!(transitions(&out), vec![(State::Initialize, State::Master)]);
    // The takeover burst (3 announcements, 100 ms apart) ends first.
    assert_eq!(announces(&r.on_timer(t0 + ms(100))), vec![Announce::Repeat]);
    assert_eq!(announces(&r.on_timer(t0 + ms(200))), vec![Announce::Repeat]);
    for i in 1..=5 {
        let out = r.on_timer(t0 + ms(1000 * i));
        assert_eq!(out, vec![Action::SendAdvert { priority: 255 }]);
        assert_eq!(r.deadline(), Some(t0 + ms(1000 * (i + 1))));
    }
}

#[test]
fn master_yields_to_a_higher_priority_and_to_a_higher_address_on_a_tie() {
    let t0 = Instant::now();
    let new_master = |priority| {
        let mut r = router(priority, 100, true, A);
        r.startup(t0, "start");
        r.on_timer(t0 + ms(4000));
        assert_eq!(r.state(), State::Master);
        r
    };
    let mut r = new_master(100);
    let out = r.on_advert(t0 + ms(4100), advert(B, 101, 100)).unwrap();
    // keepalived's higher_prio_send_advert: one last advert of its own
    // (lower) priority tells the winner clients may still point here.
    assert_eq!(out[0], Action::SendAdvert { priority: 100 });
    assert_eq!(out[1], Action::ReleaseAddresses);
    assert_eq!(transitions(&out), vec![(State::Master, State::Backup)]);

    // Equal priority: the higher primary address wins (§6.4.3).
    let mut r = new_master(100);
    let out = r.on_advert(t0 + ms(4100), advert(B, 100, 100)).unwrap();
    assert_eq!(transitions(&out), vec![(State::Master, State::Backup)]);

    let mut b = router(100, 100, true, B);
    b.startup(t0, "start");
    b.on_timer(t0 + ms(4000));
    // The winner of the tie stays master (and heals: another master was active).
    let out = b.on_advert(t0 + ms(4100), advert(A, 100, 100)).unwrap();
    assert_eq!(transitions(&out), vec![]);
    assert_eq!(b.state(), State::Master);

    // Lower priority: stays master.
    let mut r = new_master(100);
    let out = r.on_advert(t0 + ms(4100), advert(B, 99, 100)).unwrap();
    assert_eq!(transitions(&out), vec![]);
    assert_eq!(r.state(), State::Master);
}

#[test]
fn master_answers_a_priority_zero_advert_at_once() {
    let t0 = Instant::now();
    let mut r = router(255, 100, true, A);
    r.startup(t0, "start");
    let out = r.on_advert(t0 + ms(300), advert(B, 0, 100)).unwrap();
    assert_eq!(adverts(&out), vec![255]);
    assert_eq!(
        announces(&out),
        vec![Announce::Heal {
            sender: B,
            priority: 0
        }],
        "another master left: clients may point at it"
    );
    assert_eq!(
        r.deadline(),
        Some(t0 + ms(400)),
        "the heal burst's next repeat"
    );
}

#[test]
fn preemption_on_takes_over_from_a_lower_priority_master() {
    let t0 = Instant::now();
    let mut r = router(150, 100, true, A);
    r.startup(t0, "start");
    let mut now = t0;
    let mut became_master = None;
    for _ in 0..10 {
        now += ms(1000);
        assert_eq!(
            r.on_advert(now, advert(B, 100, 100)),
            Err(Ignored::Outranked)
        );
        if transitions(&r.on_timer(now)).contains(&(State::Backup, State::Master)) {
            became_master = Some(now);
            break;
        }
    }
    // Ignored adverts do not reset Master_Down_Timer: takeover at ~3.2 s.
    let at = became_master.expect("took over") - t0;
    assert!(
        at >= r.master_down_interval() && at < r.master_down_interval() + ms(1000),
        "{at:?}"
    );
}

#[test]
fn preemption_off_keeps_a_lower_priority_master() {
    let t0 = Instant::now();
    let mut r = router(150, 100, false, A);
    r.startup(t0, "start");
    for i in 1..=10 {
        let now = t0 + ms(1000 * i);
        assert_eq!(r.on_advert(now, advert(B, 100, 100)), Ok(vec![]));
        assert!(r.on_timer(now).is_empty());
    }
    assert_eq!(r.state(), State::Backup);
}

#[test]
fn shutdown_as_master_hands_over_before_releasing() {
    let t0 = Instant::now();
    let mut r = master_at(t0, 100, None);
    let out = r.shutdown(t0 + ms(4100), "SIGTERM");
    assert_eq!(out[0], Action::SendAdvert { priority: 0 });
    assert!(matches!(&out[1], Action::HandoverStarted { timeout, .. } if *timeout == ms(4000)));
    assert!(
        !out.contains(&Action::ReleaseAddresses),
        "keeps the addresses"
    );
    assert_eq!(
        r.state(),
        State::Master,
        "still master for the orchestrator"
    );
    assert!(r.is_leaving());
    // The peer advertises as master: now release and leave.
    let out = r.on_advert(t0 + ms(4800), advert(B, 100, 100)).unwrap();
    assert_eq!(out[0], Action::ReleaseAddresses);
    assert_eq!(transitions(&out), vec![(State::Master, State::Initialize)]);
    assert!(adverts(&out).is_empty(), "priority 0 was already said");
    // A backup leaves silently.
    let mut r = router(100, 100, true, A);
    r.startup(t0, "start");
    let out = r.shutdown(t0, "SIGTERM");
    assert_eq!(transitions(&out), vec![(State::Backup, State::Initialize)]);
    assert!(adverts(&out).is_empty());
}

#[test]
fn a_leaving_master_repeats_priority_zero_until_the_peer_takes_over() {
    let t0 = Instant::now();
    let mut r = master_at(t0, 100, None);
    r.set_maintenance(t0 + ms(4100), true, "maintenance enabled by the operator");
    // The takeover burst ended long ago; the next advert is priority 0 again.
    let out = r.on_timer(t0 + ms(5100));
    assert_eq!(adverts(&out), vec![0]);
    // The peer leaving too (priority 0) is not a taker.
    assert_eq!(r.on_advert(t0 + ms(5200), advert(B, 0, 100)), Ok(vec![]));
    assert_eq!(r.state(), State::Master);
    let out = r.on_advert(t0 + ms(5300), advert(B, 100, 100)).unwrap();
    assert_eq!(out[0], Action::ReleaseAddresses);
    assert!(
        matches!(&out[1], Action::Transition { from: State::Master, to: State::Maintenance, reason } if reason == "maintenance enabled by the operator; 192.168.100.2 took over"),
        "{out:?}"
    );
    assert_eq!(r.master(), Some(B));
}

#[test]
fn a_handover_nobody_takes_ends_after_its_timeout() {
    let t0 = Instant::now();
    let mut r = master_at(t0, 100, None);
    r.set_maintenance(t0 + ms(4100), true, "maintenance enabled by the operator");
    let timeout = r.handover_timeout();
    assert_eq!(timeout, ms(4000), "four 1 s intervals");
    let mut now = t0 + ms(4100);
    while now < t0 + ms(4100) + timeout - ms(1) {
        now += ms(100);
        let out = r.on_timer(now.min(t0 + ms(4099) + timeout));
        assert!(!out.contains(&Action::ReleaseAddresses), "at {now:?}");
    }
    let out = r.on_timer(t0 + ms(4100) + timeout);
    assert_eq!(out, {
        let mut v = vec![Action::ReleaseAddresses];
        v.push(Action::Transition {
            from: State::Master,
            to: State::Maintenance,
            reason: "maintenance enabled by the operator; no peer took over within 4000 ms, floating IPs released".into(),
        });
        v
    });
    // At 10 ms adverts the wait is at least a second.
    assert_eq!(router(100, 1, false, A).handover_timeout(), ms(1000));
}

#[test]
fn a_zero_handover_timeout_releases_at_once() {
    let t0 = Instant::now();
    let mut c = RouterConfig::new(100, 100, true, A);
    c.handover_timeout = Some(Duration::ZERO);
    let mut r = master_at(t0, 100, Some(c));
    let out = r.set_maintenance(t0 + ms(4100), true, "operator");
    assert_eq!(out[0], Action::SendAdvert { priority: 0 });
    assert_eq!(out[1], Action::ReleaseAddresses);
    assert_eq!(transitions(&out), vec![(State::Master, State::Maintenance)]);
}

#[test]
fn disabling_maintenance_during_a_handover_keeps_the_master_role() {
    let t0 = Instant::now();
    let mut r = master_at(t0, 100, None);
    r.set_maintenance(t0 + ms(4100), true, "operator");
    let out = r.set_maintenance(t0 + ms(4200), false, "operator changed their mind");
    assert_eq!(adverts(&out), vec![100], "asserts itself at once");
    assert!(matches!(&out[1], Action::HandoverCancelled { .. }));
    assert!(!r.is_leaving());
    assert_eq!(adverts(&r.on_timer(t0 + ms(5200))), vec![100]);
}

#[test]
fn a_fault_during_a_handover_releases_at_once() {
    let t0 = Instant::now();
    let mut r = master_at(t0, 100, None);
    r.set_maintenance(t0 + ms(4100), true, "operator");
    let out = r.set_fault(t0 + ms(4200), true, "tracked interface eth0 down");
    assert!(out.contains(&Action::ReleaseAddresses));
    assert_eq!(transitions(&out), vec![(State::Master, State::Fault)]);
}

#[test]
fn stopping_during_a_maintenance_handover_keeps_waiting_for_the_peer() {
    let t0 = Instant::now();
    let mut r = master_at(t0, 100, None);
    r.set_maintenance(t0 + ms(4100), true, "operator");
    assert!(r.shutdown(t0 + ms(4200), "SIGTERM").is_empty());
    let out = r.on_advert(t0 + ms(4700), advert(B, 100, 100)).unwrap();
    assert_eq!(transitions(&out), vec![(State::Master, State::Initialize)]);
}

#[test]
fn a_backup_takes_over_once_from_repeated_priority_zero() {
    let t0 = Instant::now();
    let mut r = router(100, 100, true, A);
    r.startup(t0, "start");
    r.on_advert(t0, advert(B, 150, 100)).unwrap();
    r.on_advert(t0 + ms(10), advert(B, 0, 100)).unwrap();
    let take = t0 + ms(10) + r.skew_time();
    // The leaving master's next priority 0 does not push the takeover out.
    r.on_advert(t0 + ms(500), advert(B, 0, 100)).unwrap();
    assert_eq!(r.deadline(), Some(take));
}

/// Scripted make-before-break across two routers: the leaving master
/// releases only after the taker has added and announced the addresses.
#[test]
fn a_planned_handover_announces_on_the_taker_before_the_leaver_releases() {
    let t0 = Instant::now();
    let mut a = master_at(t0, 100, None); // A: master
    let mut b = router(100, 100, false, B);
    b.startup(t0 + ms(4000), "start");
    b.on_advert(t0 + ms(4000), advert(A, 100, 100)).unwrap();
    let mut log: Vec<(char, Action)> = Vec::new();
    let now = t0 + ms(4100);
    let out = a.set_maintenance(now, true, "operator");
    log.extend(out.iter().cloned().map(|x| ('A', x)));
    for p in adverts(&out) {
        b.on_advert(now, advert(A, p, 100)).unwrap();
    }
    let at = b.deadline().expect("takeover timer");
    assert_eq!(at, now + b.skew_time());
    let out = b.on_timer(at);
    log.extend(out.iter().cloned().map(|x| ('B', x)));
    for p in adverts(&out) {
        let out = a.on_advert(at, advert(B, p, 100)).unwrap();
        log.extend(out.into_iter().map(|x| ('A', x)));
    }
    let pos = |who: char, what: &Action| log.iter().position(|(w, x)| *w == who && x == what);
    let announced = pos('B', &Action::Announce(Announce::Takeover)).expect("B announced");
    let released = pos('A', &Action::ReleaseAddresses).expect("A released");
    assert!(announced < released, "{log:?}");
    assert_eq!(a.state(), State::Maintenance);
    assert_eq!(b.state(), State::Master);
}

#[test]
fn a_tracked_interface_fault_gives_up_mastership_until_it_heals() {
    let t0 = Instant::now();
    let mut r = router(255, 100, true, A);
    r.startup(t0, "start");
    let out = r.set_fault(t0 + ms(100), true, "tracked interface eth0 down");
    assert_eq!(out[0], Action::SendAdvert { priority: 0 });
    assert_eq!(out[1], Action::ReleaseAddresses);
    assert_eq!(transitions(&out), vec![(State::Master, State::Fault)]);
    assert_eq!(
        r.on_advert(t0 + ms(200), advert(B, 100, 100)),
        Err(Ignored::NotListening)
    );
    assert!(r.on_timer(t0 + ms(60_000)).is_empty(), "no timer in fault");
    let out = r.set_fault(t0 + ms(300), false, "tracked interface eth0 up");
    assert_eq!(
        transitions(&out),
        vec![(State::Fault, State::Master)],
        "owner returns to master"
    );
}

#[test]
fn maintenance_hands_over_and_blocks_mastership_until_disabled() {
    let t0 = Instant::now();
    let mut r = master_at(t0, 100, None);
    let out = r.set_maintenance(t0 + ms(4100), true, "operator");
    assert_eq!(out[0], Action::SendAdvert { priority: 0 });
    assert_eq!(
        transitions(&out),
        vec![],
        "master until the peer takes over"
    );
    r.on_advert(t0 + ms(4700), advert(B, 100, 100)).unwrap();
    assert_eq!(r.state(), State::Maintenance);
    // No master heard for a long time: still no takeover.
    assert!(r.on_timer(t0 + ms(60_000)).is_empty());
    assert_eq!(
        r.on_advert(t0 + ms(60_100), advert(B, 100, 100)),
        Ok(vec![])
    );
    assert_eq!(
        r.master(),
        Some(B),
        "tracks who is master while in maintenance"
    );
    let out = r.set_maintenance(t0 + ms(60_200), false, "operator");
    assert_eq!(transitions(&out), vec![(State::Maintenance, State::Backup)]);
    assert!(r.deadline().is_some());
    // A backup entering maintenance just steps aside.
    let mut r = router(100, 100, true, A);
    r.startup(t0, "start");
    let out = r.set_maintenance(t0, true, "operator");
    assert_eq!(transitions(&out), vec![(State::Backup, State::Maintenance)]);
    assert!(adverts(&out).is_empty());
}

#[test]
fn the_takeover_burst_repeats_then_stops() {
    let t0 = Instant::now();
    let mut c = RouterConfig::new(100, 100, true, A);
    c.announce.repeat = 3;
    c.announce.interval = ms(50);
    let mut r = master_at(t0, 100, Some(c));
    let base = t0 + ms(4000);
    assert_eq!(r.deadline(), Some(base + ms(50)));
    assert_eq!(
        announces(&r.on_timer(base + ms(50))),
        vec![Announce::Repeat]
    );
    assert_eq!(
        announces(&r.on_timer(base + ms(100))),
        vec![Announce::Repeat]
    );
    assert!(
        announces(&r.on_timer(base + ms(150))).is_empty(),
        "3 in all"
    );
    assert_eq!(
        r.deadline(),
        Some(base + ms(1000)),
        "only the advert timer left"
    );
}

#[test]
fn releasing_the_addresses_cancels_every_pending_announcement() {
    let t0 = Instant::now();
    let mut c = RouterConfig::new(100, 100, true, A);
    c.announce.repeat = 20;
    c.announce.interval = ms(100);
    c.announce.refresh = Some(ms(500));
    let mut r = master_at(t0, 100, Some(c.clone()));
    // A higher-priority master appears 150 ms into the burst.
    let out = r.on_advert(t0 + ms(4150), advert(B, 200, 100)).unwrap();
    assert!(out.contains(&Action::ReleaseAddresses));
    let mut now = t0 + ms(4150);
    // Until Master_Down_Interval (3.6 s) without B's adverts would elect it again.
    while now < t0 + ms(7700) {
        now += ms(10);
        let out = r.on_timer(now);
        assert!(
            announces(&out).is_empty(),
            "announced after release: {out:?}"
        );
    }
    // The same after a fault and after a completed handover.
    let mut r = master_at(t0, 100, Some(c.clone()));
    r.set_fault(t0 + ms(4150), true, "eth0 down");
    assert!(announces(&r.on_timer(t0 + ms(5000))).is_empty());
    let mut r = master_at(t0, 100, Some(c));
    r.set_maintenance(t0 + ms(4150), true, "operator");
    r.on_advert(t0 + ms(4300), advert(B, 100, 100)).unwrap();
    assert!(announces(&r.on_timer(t0 + ms(5000))).is_empty());
}

#[test]
fn a_master_hearing_a_master_it_outranks_re_announces_once_per_delay() {
    let t0 = Instant::now();
    let mut c = RouterConfig::new(150, 100, true, A);
    c.announce.heal_repeat = 3;
    c.announce.heal_delay = ms(1000);
    c.announce.interval = ms(100);
    let mut r = master_at(t0, 150, Some(c.clone()));
    let heal = Announce::Heal {
        sender: B,
        priority: 100,
    };
    let now = t0 + ms(5000);
    let out = r.on_advert(now, advert(B, 100, 100)).unwrap();
    assert_eq!(
        adverts(&out),
        vec![150],
        "advertises at once: the loser yields now"
    );
    assert_eq!(announces(&out), vec![heal]);
    assert_eq!(
        announces(&r.on_timer(now + ms(100))),
        vec![Announce::Repeat]
    );
    assert_eq!(
        announces(&r.on_timer(now + ms(200))),
        vec![Announce::Repeat]
    );
    assert!(announces(&r.on_timer(now + ms(300))).is_empty(), "3 in all");
    // Rate-limited: another lower advert within the delay changes nothing.
    assert_eq!(
        r.on_advert(now + ms(500), advert(B, 100, 100)),
        Err(Ignored::Outranked)
    );
    let out = r.on_advert(now + ms(1000), advert(B, 100, 100)).unwrap();
    assert_eq!(announces(&out), vec![heal], "after the delay, again");
    // Turned off (garp_lower_prio_repeat = 0): the early advert, no announcement.
    c.announce.heal_repeat = 0;
    let mut r = master_at(t0, 150, Some(c));
    let out = r.on_advert(now, advert(B, 100, 100)).unwrap();
    assert_eq!(adverts(&out), vec![150]);
    assert!(announces(&out).is_empty());
}

#[test]
fn garp_refresh_announces_periodically_while_master() {
    let t0 = Instant::now();
    let mut c = RouterConfig::new(100, 100, true, A);
    c.announce.repeat = 1;
    c.announce.refresh = Some(ms(2500));
    let mut r = master_at(t0, 100, Some(c));
    let base = t0 + ms(4000);
    assert_eq!(
        announces(&r.on_timer(base + ms(2500))),
        vec![Announce::Refresh]
    );
    assert!(announces(&r.on_timer(base + ms(3000))).is_empty());
    assert_eq!(
        announces(&r.on_timer(base + ms(5000))),
        vec![Announce::Refresh]
    );
    // Off by default.
    let mut r = master_at(t0, 100, None);
    let mut now = t0 + ms(4000);
    let mut n = 0;
    while now < t0 + ms(60_000) {
        now += ms(100);
        n += announces(&r.on_timer(now)).len();
    }
    assert_eq!(n, 2, "only the takeover burst's repeats");
}

#[test]
fn preempt_delay_keeps_a_restarted_preferred_node_backup() {
    let t0 = Instant::now();
    let mut c = RouterConfig::new(150, 10, true, A);
    c.preempt_delay = ms(5000);
    let mut r = router_with(c.clone());
    r.start(t0, "vrrpd started");
    let mut now = t0;
    // The lower-priority peer is master and advertises every 100 ms.
    while now < t0 + ms(4900) {
        now += ms(100);
        assert_eq!(r.on_advert(now, advert(B, 100, 10)), Ok(vec![]));
        assert!(transitions(&r.on_timer(now)).is_empty(), "held at {now:?}");
    }
    // After the delay it preempts (Master_Down_Interval later).
    let mut took = None;
    while now < t0 + ms(6000) {
        now += ms(10);
        let _ = r.on_advert(now, advert(B, 100, 10));
        if transitions(&r.on_timer(now)).contains(&(State::Backup, State::Master)) {
            took = Some(now);
            break;
        }
    }
    let took = took.expect("preempted after the delay") - t0;
    assert!(took >= ms(5000) && took < ms(5000) + ms(500), "{took:?}");
    // Ending maintenance ends the delay: the gate has decided.
    let mut r = router_with(c);
    r.start(t0, "vrrpd started");
    r.set_maintenance(t0, true, "held");
    r.set_maintenance(t0 + ms(100), false, "released");
    assert_eq!(
        r.on_advert(t0 + ms(200), advert(B, 100, 10)),
        Err(Ignored::Outranked)
    );
}

/// Two routers on one link. While `link_up`, every advert one sends reaches
/// the other at once. Returns how many routers are master at the end.
fn simulate(
    a: &mut VirtualRouter,
    b: &mut VirtualRouter,
    from: Instant,
    until: Instant,
    link_up: bool,
) -> usize {
    let step = ms(1);
    let mut now = from;
    while now < until {
        let mut outbox: Vec<(bool, Advert)> = Vec::new();
        for (is_a, r) in [(true, &mut *a), (false, &mut *b)] {
            for act in r.on_timer(now) {
                if let Action::SendAdvert { priority } = act {
                    outbox.push((
                        is_a,
                        advert(
                            r.config().primary_address,
                            priority,
                            r.config().advert_interval_cs,
                        ),
                    ));
                }
            }
        }
        while let Some((from_a, adv)) = outbox.pop() {
            if !link_up {
                continue;
            }
            let target = if from_a { &mut *b } else { &mut *a };
            if let Ok(actions) = target.on_advert(now, adv) {
                for act in actions {
                    if let Action::SendAdvert { priority } = act {
                        outbox.push((
                            !from_a,
                            advert(
                                target.config().primary_address,
                                priority,
                                target.config().advert_interval_cs,
                            ),
                        ));
                    }
                }
            }
        }
        now += step;
    }
    [a.state(), b.state()]
        .iter()
        .filter(|s| **s == State::Master)
        .count()
}

#[test]
fn a_split_brain_heals_to_exactly_one_master_within_three_intervals() {
    let t0 = Instant::now();
    let mut a = router(100, 5, false, A);
    let mut b = router(100, 5, false, B);
    a.startup(t0, "start");
    b.startup(t0 + ms(3), "start");
    assert_eq!(
        simulate(&mut a, &mut b, t0, t0 + ms(1000), true),
        1,
        "one master on a healthy link"
    );
    let t1 = t0 + ms(1000);
    assert_eq!(
        simulate(&mut a, &mut b, t1, t1 + ms(1000), false),
        2,
        "link cut: both master"
    );
    let t2 = t1 + ms(1000);
    // Heal: one advert interval later exactly one master remains (§6.4.3 tie-break).
    assert_eq!(simulate(&mut a, &mut b, t2, t2 + ms(3 * 50), true), 1);
    assert_eq!(
        b.state(),
        State::Master,
        "the higher address keeps mastership"
    );
}
