//! Scripted scenarios for the RFC 5798 state machine: events and a fake
//! clock in, actions out.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use vrrpd::fsm::{Action, Advert, Ignored, RouterConfig, State, VirtualRouter};

const A: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 168, 100, 1));
const B: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 168, 100, 2));

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn router(priority: u8, interval_cs: u16, preempt: bool, addr: IpAddr) -> VirtualRouter {
    VirtualRouter::new(RouterConfig {
        priority,
        advert_interval_cs: interval_cs,
        preempt,
        primary_address: addr,
    })
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
    assert_eq!(out[0], Action::SendAdvert { priority: 100 });
    assert_eq!(out[1], Action::TakeAddresses);
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
        matches!(&out[2], Action::Transition { reason, .. } if reason == "master 192.168.100.2 left (priority 0 advertisement)"),
        "{out:?}"
    );
}

#[test]
fn master_advertises_every_interval() {
    let t0 = Instant::now();
    let mut r = router(255, 100, true, A);
    let out = r.startup(t0, "address owner");
    assert_eq!(transitions(&out), vec![(State::Initialize, State::Master)]);
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
    assert_eq!(out[0], Action::ReleaseAddresses);
    assert_eq!(transitions(&out), vec![(State::Master, State::Backup)]);

    // Equal priority: the higher primary address wins (§6.4.3).
    let mut r = new_master(100);
    let out = r.on_advert(t0 + ms(4100), advert(B, 100, 100)).unwrap();
    assert_eq!(transitions(&out), vec![(State::Master, State::Backup)]);

    let mut b = router(100, 100, true, B);
    b.startup(t0, "start");
    b.on_timer(t0 + ms(4000));
    assert_eq!(
        b.on_advert(t0 + ms(4100), advert(A, 100, 100)),
        Err(Ignored::Outranked)
    );
    assert_eq!(b.state(), State::Master);

    // Lower priority: discarded.
    let mut r = new_master(100);
    assert_eq!(
        r.on_advert(t0 + ms(4100), advert(B, 99, 100)),
        Err(Ignored::Outranked)
    );
}

#[test]
fn master_answers_a_priority_zero_advert_at_once() {
    let t0 = Instant::now();
    let mut r = router(255, 100, true, A);
    r.startup(t0, "start");
    let out = r.on_advert(t0 + ms(300), advert(B, 0, 100)).unwrap();
    assert_eq!(out, vec![Action::SendAdvert { priority: 255 }]);
    assert_eq!(r.deadline(), Some(t0 + ms(1300)));
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
fn shutdown_as_master_sends_priority_zero_and_releases_the_addresses() {
    let t0 = Instant::now();
    let mut r = router(255, 100, true, A);
    r.startup(t0, "start");
    let out = r.shutdown("SIGTERM");
    assert_eq!(out[0], Action::SendAdvert { priority: 0 });
    assert_eq!(out[1], Action::ReleaseAddresses);
    assert_eq!(transitions(&out), vec![(State::Master, State::Initialize)]);
    assert_eq!(r.deadline(), None);
    // A backup leaves silently.
    let mut r = router(100, 100, true, A);
    r.startup(t0, "start");
    let out = r.shutdown("SIGTERM");
    assert_eq!(transitions(&out), vec![(State::Backup, State::Initialize)]);
    assert!(!out.contains(&Action::SendAdvert { priority: 0 }));
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
fn maintenance_hands_over_at_once_and_blocks_mastership_until_disabled() {
    let t0 = Instant::now();
    let mut r = router(100, 100, true, A);
    r.startup(t0, "start");
    r.on_timer(t0 + ms(4000));
    assert_eq!(r.state(), State::Master);
    let out = r.set_maintenance(t0 + ms(4100), true, "operator");
    assert_eq!(out[0], Action::SendAdvert { priority: 0 });
    assert_eq!(out[1], Action::ReleaseAddresses);
    assert_eq!(transitions(&out), vec![(State::Master, State::Maintenance)]);
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
