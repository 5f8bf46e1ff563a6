//! The schedulers' pure cores against their definitions: Maglev's table and
//! its removal property, the load-aware schedulers' next picks, and the
//! thresholds' hysteresis.

use lb_forwarder::sched::{
    Candidate, Load, Thresholds, greedy, hash64, maglev, maglev_size, maglev_with_absent,
    overloaded,
};
use tandem_config::Scheduler;

fn backends(n: usize) -> Vec<(String, u64)> {
    (1..=n).map(|i| (format!("10.1.0.{i}/8080"), 1)).collect()
}

/// Slots (of those not owned by `removed`) whose backend differs between
/// the two tables, `after` indexing `names_after`.
fn moved_others(
    before: &[usize],
    names_before: &[(String, u64)],
    after: &[usize],
    names_after: &[(String, u64)],
    removed: &str,
) -> (usize, usize) {
    let mut others = 0;
    let mut moved = 0;
    for (b, a) in before.iter().zip(after) {
        let was = &names_before[*b].0;
        if was == removed {
            continue;
        }
        others += 1;
        if *was != names_after[*a].0 {
            moved += 1;
        }
    }
    (moved, others)
}

#[test]
fn the_hash_is_fixed_across_releases() {
    // Every node, in every release, must build the same table: these
    // values are part of the contract.
    assert_eq!(
        hash64(0x7a6e_6465, 1, "10.1.0.11/8080"),
        0x84e7_6d19_f3df_6ddd
    );
    assert_eq!(
        hash64(0x7a6e_6465, 2, "10.1.0.11/8080"),
        0x984d_a35b_8f29_e95d
    );
    assert_ne!(hash64(1, 1, "a"), hash64(2, 1, "a"), "the seed matters");
}

#[test]
fn maglev_tables_are_balanced_and_the_same_for_the_same_seed() {
    let b = backends(5);
    let m = maglev_size(5);
    assert_eq!(m, 503, "a prime ≥ 100 × backends");
    let t = maglev(&b, m, 0x7a6e_6465);
    assert_eq!(t.len(), 503);
    let mut per = [0usize; 5];
    for s in &t {
        per[*s] += 1;
    }
    // Maglev fills in turns: every backend gets ⌊M/N⌋ or ⌈M/N⌉ slots.
    assert!(per.iter().all(|n| (100..=101).contains(n)), "{per:?}");
    assert_eq!(t, maglev(&b, m, 0x7a6e_6465), "deterministic");
    assert_ne!(t, maglev(&b, m, 1), "seeded");
}

#[test]
fn removing_one_of_five_backends_moves_only_its_slots_and_at_most_one_percent_of_the_others() {
    let b = backends(5);
    let m = maglev_size(5);
    for seed in [0x7a6e_6465u32, 1, 2, 3, 0xdead_beef] {
        let before = maglev(&b, m, seed);
        for gone in 0..5 {
            let available: Vec<bool> = (0..5).map(|i| i != gone).collect();
            let after = maglev_with_absent(&b, &available, m, seed);
            let (moved, others) = moved_others(&before, &b, &after, &b, &b[gone].0);
            assert!(
                moved * 100 <= others,
                "seed {seed:#x}, removing backend {gone}: {moved} of {others} other slots moved"
            );
            assert!(after.iter().all(|s| *s != gone), "its slots went elsewhere");
            // Its slots are shared out, not given to one neighbour.
            let mut got = [0usize; 5];
            for (x, y) in before.iter().zip(&after) {
                if *x == gone {
                    got[*y] += 1;
                }
            }
            assert!(
                got.iter().enumerate().all(|(i, n)| i == gone || *n >= 10),
                "{got:?}"
            );
        }
    }
    // Two absent: the same table whichever left first (a set, not a history).
    let two = maglev_with_absent(&b, &[true, false, true, false, true], m, 9);
    assert!(two.iter().all(|s| *s != 1 && *s != 3));
}

/// The controls: rebuilding the table without the backend (what plain
/// Maglev does) moves a few per cent of the others' slots, and plain modulo
/// hashing (slot i to backend i mod N) moves most of them.
#[test]
fn control_rebuilding_or_modulo_hashing_moves_the_others() {
    let b = backends(5);
    let m = maglev_size(5);
    let mut worst = 0.0f64;
    for seed in [0x7a6e_6465u32, 1, 2, 3, 0xdead_beef] {
        let before = maglev(&b, m, seed);
        for gone in 0..5 {
            let rest: Vec<(String, u64)> = b
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != gone)
                .map(|(_, x)| x.clone())
                .collect();
            let after = maglev(&rest, m, seed);
            let (moved, others) = moved_others(&before, &b, &after, &rest, &b[gone].0);
            worst = worst.max(moved as f64 / others as f64);
        }
    }
    assert!(
        worst > 0.01,
        "a rebuild would fail the ≤ 1 % property: {worst}"
    );
    let before: Vec<usize> = (0..503).map(|i| i % 5).collect();
    let rest: Vec<(String, u64)> = b[1..].to_vec();
    let after: Vec<usize> = (0..503).map(|i| i % 4).collect();
    let (moved, others) = moved_others(&before, &b, &after, &rest, &b[0].0);
    assert!(moved * 2 > others, "{moved} of {others}");
}

#[test]
fn maglev_weights_give_proportional_shares() {
    let b = vec![("a".to_owned(), 3), ("b".to_owned(), 1)];
    let t = maglev(&b, 401, 7);
    let a = t.iter().filter(|s| **s == 0).count();
    assert!((299..=302).contains(&a), "3:1 of 401: {a}");
}

fn cand(weight: u64, active: u64, room: Option<u64>) -> Candidate {
    Candidate {
        weight,
        load: Load {
            active,
            inactive: 0,
        },
        room,
    }
}

/// Final connections per backend after `n` picks.
fn after(s: Scheduler, c: &[Candidate], n: usize) -> (Vec<u64>, bool) {
    let (picks, done) = greedy(s, c, n);
    let mut out: Vec<u64> = c.iter().map(|x| x.load.active).collect();
    for p in picks {
        out[p] += 1;
    }
    (out, done)
}

#[test]
fn wlc_equalises_connections_per_weight() {
    // Weights 1:2:3, loads 30, 0, 0; 300 new connections. wlc evens out
    // active / weight: the total 330 ends as 55:110:165.
    let (end, done) = after(
        Scheduler::Wlc,
        &[cand(1, 30, None), cand(2, 0, None), cand(3, 0, None)],
        300,
    );
    assert_eq!(end, [55, 110, 165]);
    assert!(!done);
}

#[test]
fn sed_counts_the_connection_about_to_arrive() {
    // With weights 1 and 10, sed sends the first connections to the
    // heavier backend even while it already has some: (a+1)/w.
    let (picks, _) = greedy(Scheduler::Sed, &[cand(1, 0, None), cand(10, 0, None)], 11);
    assert_eq!(picks.iter().filter(|p| **p == 0).count(), 1, "{picks:?}");
    // wlc, by contrast, starts with the idle light one (0/1 = 0/10, first).
    let (picks, _) = greedy(Scheduler::Wlc, &[cand(1, 0, None), cand(10, 0, None)], 1);
    assert_eq!(picks, [0]);
}

#[test]
fn nq_takes_an_idle_backend_first() {
    let (picks, _) = greedy(
        Scheduler::Nq,
        &[cand(10, 5, None), cand(1, 0, None), cand(10, 0, None)],
        3,
    );
    assert_eq!(picks[..2], [1, 2], "both idle ones first, in order");
}

#[test]
fn ovf_fills_the_heaviest_to_its_weight_then_overflows_and_then_stops() {
    let (picks, done) = greedy(
        Scheduler::Ovf,
        &[cand(2, 0, None), cand(5, 0, None), cand(3, 1, None)],
        100,
    );
    assert_eq!(picks, [1, 1, 1, 1, 1, 2, 2, 0, 0]);
    assert!(done, "every backend full: no more slots");
}

#[test]
fn fo_sends_everything_to_the_heaviest() {
    let (picks, done) = greedy(Scheduler::Fo, &[cand(2, 0, None), cand(5, 0, None)], 10);
    assert!(picks.iter().all(|p| *p == 1));
    assert!(!done);
}

#[test]
fn a_threshold_stops_a_backend_and_a_full_farm_ends_the_schedule() {
    let (end, done) = after(
        Scheduler::Rr,
        &[cand(1, 0, Some(3)), cand(1, 0, Some(5))],
        100,
    );
    assert_eq!(end, [3, 5]);
    assert!(done);
    let (end, done) = after(Scheduler::Rr, &[cand(1, 0, Some(3)), cand(1, 0, None)], 10);
    assert_eq!(end, [3, 7]);
    assert!(!done);
}

#[test]
fn thresholds_have_hysteresis() {
    let t = Thresholds {
        upper: 10,
        lower: Some(4),
    };
    assert!(!overloaded(false, 9, t));
    assert!(overloaded(false, 10, t));
    assert!(overloaded(true, 5, t), "stays overloaded above the lower");
    assert!(!overloaded(true, 4, t), "readmitted at the lower");
    // Without -y: below three quarters of -x, as IPVS.
    let t = Thresholds {
        upper: 8,
        lower: None,
    };
    assert!(overloaded(true, 6, t));
    assert!(!overloaded(true, 5, t));
}
