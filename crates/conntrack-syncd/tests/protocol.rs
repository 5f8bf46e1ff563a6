//! Scenarios for the sync state machine: a fake clock, events in, actions
//! out. The small ones script (time, event) → expected actions; the large
//! ones wire two `SyncPeer`s through a simulated link that drops, reorders
//! and duplicates datagrams, and check that the backup's table ends equal to
//! the master's, every tuple's changes arriving in order.

mod common;

use common::Rng;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use conntrack_syncd::sync::{
    Action, Datagram, DeadReason, HealthLevel, LogEvent, Message, PeerState, Record, RejectReason,
    ResyncCause, ResyncState, StaleKind, SyncConfig, SyncKey, SyncPeer,
};
use tandem_conntrack::{Entry, TcpInfo, Tuple};

const KEY: &[u8] = b"tandem-conntrack-sync-test-key-1";
const EPOCH_A: u64 = 0xA1;
const EPOCH_B: u64 = 0xB1;

fn key() -> SyncKey {
    SyncKey::new(KEY).unwrap()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Connection `i`: IPv4 for even, IPv6 for odd numbers; TCP with NAT.
fn entry(i: u32, version: u32) -> Entry {
    let (client, vip, backend, floating): (IpAddr, IpAddr, IpAddr, IpAddr) = if i.is_multiple_of(2)
    {
        (
            Ipv4Addr::new(198, 51, 100, (i % 200) as u8 + 1).into(),
            Ipv4Addr::new(192, 0, 2, 10).into(),
            Ipv4Addr::new(10, 1, 0, 5).into(),
            Ipv4Addr::new(10, 1, 0, 100).into(),
        )
    } else {
        (
            Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i as u16).into(),
            Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 10).into(),
            Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 5).into(),
            Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 100).into(),
        )
    };
    let port = 10_000 + i as u16;
    Entry {
        original: Tuple {
            src: client,
            dst: vip,
            protocol: 6,
            src_port: port,
            dst_port: 80,
        },
        reply: Tuple {
            src: backend,
            dst: floating,
            protocol: 6,
            src_port: 8080,
            dst_port: port,
        },
        status: 0x1be,
        // The version makes every update distinguishable.
        timeout_s: 1000 + version,
        mark: version,
        zone: 0,
        tcp: Some(TcpInfo {
            state: 3,
            wscale_original: 7,
            wscale_reply: 7,
            flags_original: 0x08,
            flags_reply: 0x08,
        }),
    }
}

fn config() -> SyncConfig {
    SyncConfig::default()
}

/// The daemon's settings with a flush delay, for the batching scenarios.
fn delayed() -> SyncConfig {
    SyncConfig {
        flush_delay: ms(2),
        ..config()
    }
}

// ---------------------------------------------------------------------------
// Scripted scenarios: one SyncPeer, datagrams decoded to check what it sends.

fn decode(a: &Action) -> Option<Datagram> {
    match a {
        Action::Send(b) => Some(Datagram::decode(b, &key()).unwrap()),
        _ => None,
    }
}

fn sent(actions: &[Action]) -> Vec<Datagram> {
    actions.iter().filter_map(decode).collect()
}

fn sender_with(config: SyncConfig, t0: Instant) -> SyncPeer {
    let mut p = SyncPeer::new(config, key(), EPOCH_A, t0).unwrap();
    p.set_tx_enabled(true);
    p
}

fn sender(t0: Instant) -> SyncPeer {
    sender_with(config(), t0)
}

/// A datagram as the peer B would send it, acking A's stream up to
/// `ack_next` (which also proves it was made after A started).
fn from_b(seq: u64, ack_next: Option<u64>, message: Message) -> Vec<u8> {
    Datagram {
        epoch: EPOCH_B,
        seq,
        ack: ack_next.map(|next| conntrack_syncd::sync::AckInfo {
            epoch: EPOCH_A,
            next,
        }),
        message,
    }
    .encode(&key())
    .unwrap()
}

/// Feeds a datagram and runs what is due at the same instant, as the
/// daemon does after each batch of input.
fn receive(p: &mut SyncPeer, bytes: &[u8], t: Instant) -> Vec<Action> {
    let mut out = p.datagram_received(bytes, t);
    out.extend(p.tick(t));
    out
}

#[test]
fn a_new_peer_says_alive_at_once() {
    let t0 = Instant::now();
    let mut a = sender(t0);
    assert_eq!(a.next_deadline(), t0);
    let out = sent(&a.tick(t0));
    assert_eq!(
        out,
        vec![Datagram {
            epoch: EPOCH_A,
            seq: 1,
            ack: None,
            message: Message::Alive
        }]
    );
    // Then nothing until the alive interval.
    assert!(a.tick(t0 + ms(199)).is_empty());
    assert_eq!(sent(&a.tick(t0 + ms(200)))[0].message, Message::Alive);
}

#[test]
fn a_single_event_waits_the_flush_delay_then_leaves_alone() {
    let t0 = Instant::now();
    let mut a = sender_with(delayed(), t0);
    a.tick(t0);
    let e = entry(0, 0);
    assert!(
        a.local_event(Record::New(e.clone()), t0 + ms(10))
            .is_empty()
    );
    assert_eq!(a.next_deadline(), t0 + ms(12));
    assert!(a.tick(t0 + ms(11)).is_empty());
    let out = sent(&a.tick(t0 + ms(12)));
    assert_eq!(
        out,
        vec![Datagram {
            epoch: EPOCH_A,
            seq: 1,
            ack: None,
            message: Message::Data(vec![Record::New(e)])
        }]
    );
    assert_eq!(a.status(t0).tx_next_seq, 2);
    assert_eq!(a.status(t0).tx_unacked, 1);
}

#[test]
fn without_a_flush_delay_a_lone_event_leaves_at_the_next_tick() {
    let t0 = Instant::now();
    let mut a = sender(t0);
    a.tick(t0);
    a.local_event(Record::New(entry(0, 0)), t0 + ms(10));
    assert_eq!(a.next_deadline(), t0 + ms(10));
    let out = sent(&a.tick(t0 + ms(10)));
    assert_eq!(out.len(), 1);
    assert_eq!(
        out[0].message,
        Message::Data(vec![Record::New(entry(0, 0))])
    );
}

#[test]
fn updates_within_the_flush_delay_share_a_datagram_and_coalesce_per_tuple() {
    let t0 = Instant::now();
    let mut a = sender_with(delayed(), t0);
    a.tick(t0);
    let t = t0 + ms(10);
    assert!(a.local_event(Record::New(entry(0, 0)), t).is_empty());
    assert!(a.local_event(Record::Update(entry(0, 1)), t).is_empty());
    assert!(a.local_event(Record::New(entry(1, 0)), t).is_empty());
    assert!(a.local_event(Record::Update(entry(2, 0)), t).is_empty());
    assert!(
        a.local_event(Record::Destroy(entry(2, 0).original), t)
            .is_empty()
    );
    // Destroyed, then created again: two steps, the NAT may differ.
    assert!(a.local_event(Record::New(entry(2, 5)), t).is_empty());
    let out = sent(&a.tick(t + ms(2)));
    assert_eq!(out.len(), 1);
    assert_eq!(
        out[0].message,
        Message::Data(vec![
            // New then Update: still a creation, with the newest state.
            Record::New(entry(0, 1)),
            Record::New(entry(1, 0)),
            Record::Destroy(entry(2, 0).original),
            Record::New(entry(2, 5)),
        ])
    );
    assert_eq!(a.status(t).counters.records_coalesced, 2);
}

#[test]
fn events_that_arrive_together_are_packed_into_full_datagrams() {
    let t0 = Instant::now();
    let mut a = sender_with(delayed(), t0);
    a.tick(t0);
    // 28 IPv4 TCP entries fill 1400 bytes: a full datagram leaves at the
    // next tick without waiting; the 29th waits for company.
    for i in 0..29 {
        assert!(a.local_event(Record::New(entry(i * 2, 0)), t0).is_empty());
    }
    let out = sent(&a.tick(t0));
    assert_eq!(out.len(), 1);
    let Message::Data(records) = &out[0].message else {
        panic!("{out:?}")
    };
    assert_eq!(records.len(), 28);
    assert_eq!(a.status(t0).tx_queued, 1);
    // Without a flush delay, a burst of 5,000 leaves as 179 datagrams.
    let mut b = sender(t0);
    b.tick(t0);
    for i in 0..5000 {
        b.local_event(Record::New(entry(i * 2, 0)), t0);
    }
    let mut datagrams = 0;
    let mut records = 0;
    let mut t = t0;
    // The window opens as acks come back; here, everything is acked at once.
    for round in 0..50 {
        let out = sent(&b.tick(t));
        for d in &out {
            if let Message::Data(r) = &d.message {
                datagrams += 1;
                records += r.len();
            }
        }
        if b.status(t).tx_queued == 0 {
            break;
        }
        t += ms(1);
        let next = b.status(t).tx_next_seq;
        b.datagram_received(&from_b(round + 1, Some(next), Message::Alive), t);
    }
    assert_eq!(records, 5000);
    assert_eq!(datagrams, 5000_usize.div_ceil(28));
}

/// A steady stream (5,000 changes a second, one every 200 µs, each tick
/// after one) on a link that acknowledges at once: partial datagrams leave
/// at most once per pack delay (2 ms), so about 10 changes share each, and
/// none waits longer than the pack delay. A lone change on an idle sender
/// still leaves at once.
#[test]
fn a_steady_stream_is_packed_by_the_pack_delay_and_a_lone_change_is_not_held() {
    let t0 = Instant::now();
    let mut a = sender(t0);
    a.tick(t0);
    let (mut datagrams, mut records, mut acks) = (0usize, 0usize, 0u64);
    let mut worst_wait = Duration::ZERO;
    let mut queued_at = std::collections::VecDeque::new();
    let mut t = t0;
    for i in 0..5000u32 {
        t = t0 + Duration::from_micros(200 * u64::from(i));
        a.local_event(Record::New(entry(i * 2, 0)), t);
        queued_at.push_back(t);
        for d in sent(&a.tick(t)) {
            if let Message::Data(r) = &d.message {
                datagrams += 1;
                records += r.len();
                for _ in 0..r.len() {
                    let q = queued_at.pop_front().expect("queued");
                    worst_wait = worst_wait.max(t - q);
                }
            }
        }
        // The peer acknowledges everything sent so far, at once.
        acks += 1;
        let next = a.status(t).tx_next_seq;
        a.datagram_received(&from_b(acks, Some(next), Message::Alive), t);
    }
    let per = records as f64 / datagrams as f64;
    eprintln!("{records} records in {datagrams} datagrams, worst wait {worst_wait:?}");
    assert!(per >= 9.5, "{records} records in {datagrams} datagrams");
    assert!(worst_wait <= ms(2), "a change waited {worst_wait:?}");
    // The tail leaves within the pack delay; idle again, a lone change
    // leaves at the next tick.
    a.tick(t + ms(3));
    let next = a.status(t + ms(3)).tx_next_seq;
    a.datagram_received(&from_b(acks + 1, Some(next), Message::Alive), t + ms(3));
    let later = t + ms(10);
    a.local_event(Record::New(entry(20_000, 0)), later);
    let out = sent(&a.tick(later));
    assert_eq!(
        out.iter()
            .filter(|d| matches!(&d.message, Message::Data(r) if r.len() == 1))
            .count(),
        1,
        "{out:?}"
    );
}

#[test]
fn local_events_are_ignored_unless_sending_is_enabled() {
    let t0 = Instant::now();
    let mut a = SyncPeer::new(config(), key(), EPOCH_A, t0).unwrap();
    a.tick(t0);
    assert!(a.local_event(Record::New(entry(0, 0)), t0).is_empty());
    assert!(a.tick(t0 + ms(50)).is_empty());
    assert_eq!(a.status(t0).counters.local_events_ignored, 1);
}

#[test]
fn a_lost_datagram_is_asked_for_and_sent_again() {
    let t0 = Instant::now();
    let mut a = sender(t0);
    a.tick(t0);
    // B appears, acking A's epoch: A takes it and asks B for its table.
    let out = a.datagram_received(&from_b(1, Some(1), Message::Alive), t0 + ms(1));
    assert!(out.contains(&Action::PeerAlive { epoch: EPOCH_B }));
    assert_eq!(
        sent(&out)
            .iter()
            .map(|d| d.message.clone())
            .collect::<Vec<_>>(),
        vec![Message::ResyncRequest { id: 1 }]
    );
    a.local_event(Record::New(entry(3, 0)), t0 + ms(5));
    let first = sent(&a.tick(t0 + ms(5)));
    assert_eq!(first[0].seq, 1);
    // Datagram 1 is not acknowledged yet: the next change waits up to the
    // pack delay (2 ms) for company before it leaves alone.
    a.local_event(Record::New(entry(4, 0)), t0 + ms(8));
    assert!(a.tick(t0 + ms(9)).is_empty());
    let second = a.tick(t0 + ms(10));
    assert_eq!(sent(&second)[0].seq, 2);
    // B got 1, lost 2: it acks 2 and reports 2 missing.
    let nack = from_b(
        1,
        Some(2),
        Message::Ack {
            missing: vec![conntrack_syncd::sync::SeqRange { first: 2, count: 1 }],
        },
    );
    let out = a.datagram_received(&nack, t0 + ms(11));
    assert_eq!(out, second, "datagram 2, byte for byte");
    // The same NACK again within the retransmit gap (reordering): not resent.
    assert!(a.datagram_received(&nack, t0 + ms(12)).is_empty());
    let st = a.status(t0 + ms(12));
    assert_eq!(st.counters.retransmissions, 1);
    assert_eq!(st.tx_acked, 2);
    assert_eq!(st.tx_unacked, 1);
    // The loss halved the congestion window.
    assert_eq!(st.counters.window_cuts, 1);
    assert_eq!(st.cwnd, config().initial_cwnd / 2);
    // No answer: two round trips later (datagram 1 took 6 ms) an Alive
    // probes for a lost ack or tail: it says how far the stream goes.
    assert_eq!(a.next_deadline(), t0 + ms(23));
    assert!(a.tick(t0 + ms(22)).is_empty());
    let probe = sent(&a.tick(t0 + ms(23)));
    assert_eq!(probe.len(), 1);
    assert_eq!((probe[0].seq, &probe[0].message), (3, &Message::Alive));
    // Still nothing: resent after the retransmit timeout (50 ms after the
    // NACK resend), with another Alive; the window is not cut twice for
    // the same data.
    assert!(a.tick(t0 + ms(60)).is_empty());
    let out = a.tick(t0 + ms(61));
    assert_eq!(out[0], second[0]);
    assert_eq!(sent(&out[1..])[0].message, Message::Alive);
    assert_eq!(a.status(t0 + ms(61)).cwnd, config().initial_cwnd / 2);
}

#[test]
fn the_receiver_delivers_in_order_and_negative_acks_a_gap_at_once() {
    let t0 = Instant::now();
    let mut b = SyncPeer::new(config(), key(), EPOCH_B, t0).unwrap();
    b.tick(t0);
    let d = |seq: u64, i: u32| {
        Datagram {
            epoch: EPOCH_A,
            seq,
            ack: Some(conntrack_syncd::sync::AckInfo {
                epoch: EPOCH_B,
                next: 0,
            }),
            message: Message::Data(vec![Record::New(entry(i, 0))]),
        }
        .encode(&key())
        .unwrap()
    };
    // A is first heard with datagram 5: B joins there, asks for a resync.
    let out = receive(&mut b, &d(5, 5), t0 + ms(1));
    assert_eq!(out[0], Action::PeerAlive { epoch: EPOCH_A });
    assert!(out.contains(&Action::Apply(Record::New(entry(5, 0)))));
    assert_eq!(b.status(t0).resync, ResyncState::Requested);
    // 7 before 6: held, and 6 is asked for at once.
    let out = receive(&mut b, &d(7, 7), t0 + ms(2));
    assert!(!out.iter().any(|a| matches!(a, Action::Apply(_))));
    let acks = sent(&out);
    assert_eq!(acks.len(), 1);
    assert_eq!(acks[0].ack.unwrap().next, 6);
    assert_eq!(
        acks[0].message,
        Message::Ack {
            missing: vec![conntrack_syncd::sync::SeqRange { first: 6, count: 1 }]
        }
    );
    // 6 arrives: 6 and 7 are applied in order.
    let out = receive(&mut b, &d(6, 6), t0 + ms(3));
    let applied: Vec<_> = out
        .iter()
        .filter(|a| matches!(a, Action::Apply(_)))
        .cloned()
        .collect();
    assert_eq!(
        applied,
        vec![
            Action::Apply(Record::New(entry(6, 0))),
            Action::Apply(Record::New(entry(7, 0)))
        ]
    );
    // A duplicate is counted and not applied again.
    let out = receive(&mut b, &d(6, 6), t0 + ms(4));
    assert!(!out.iter().any(|a| matches!(a, Action::Apply(_))));
    assert_eq!(b.status(t0).counters.duplicates, 1);
    assert_eq!(b.status(t0).rx_next_seq, 8);
    // An Alive saying A's next is 10: 8 and 9 were lost at the tail.
    let alive = Datagram {
        epoch: EPOCH_A,
        seq: 10,
        ack: None,
        message: Message::Alive,
    }
    .encode(&key())
    .unwrap();
    let out = sent(&receive(&mut b, &alive, t0 + ms(5)));
    assert_eq!(
        out.last().unwrap().message,
        Message::Ack {
            missing: vec![conntrack_syncd::sync::SeqRange { first: 8, count: 2 }]
        }
    );
}

#[test]
fn garbage_wrong_version_and_wrong_key_are_counted_by_reason_and_logged_sparingly() {
    let t0 = Instant::now();
    let mut b = SyncPeer::new(config(), key(), EPOCH_B, t0).unwrap();
    let good = Datagram {
        epoch: EPOCH_A,
        seq: 1,
        ack: Some(conntrack_syncd::sync::AckInfo {
            epoch: EPOCH_B,
            next: 0,
        }),
        message: Message::Alive,
    };
    let forged = good
        .encode(&SyncKey::new(b"another-cluster-key-of-32-bytes!").unwrap())
        .unwrap();
    let mut v1 = good.encode(&key()).unwrap();
    v1[2] = 1;
    let mut logs = 0;
    for i in 0..100 {
        let t = t0 + ms(i);
        for bytes in [&forged[..], &v1[..], b"GET / HTTP/1.1\r\n"] {
            let out = b.datagram_received(bytes, t);
            logs += out.len();
            assert!(
                out.iter()
                    .all(|a| matches!(a, Action::Log(LogEvent::Rejected { .. })))
            );
        }
    }
    let c = b.status(t0).counters;
    assert_eq!(
        (
            c.rejected_authentication,
            c.rejected_version,
            c.rejected_malformed
        ),
        (100, 100, 100)
    );
    assert_eq!(c.datagrams_received, 0);
    // One log event per reason per log interval (10 s), not 300.
    assert_eq!(logs, 3);
    assert_eq!(b.status(t0).peer, PeerState::Unknown);
    // The right key is accepted.
    let out = b.datagram_received(&good.encode(&key()).unwrap(), t0 + ms(200));
    assert!(out.contains(&Action::PeerAlive { epoch: EPOCH_A }));
    let _ = RejectReason::Authentication;
}

// ---------------------------------------------------------------------------
// The epoch handshake.

#[test]
fn a_new_epoch_is_taken_only_from_a_datagram_that_echoes_ours() {
    let t0 = Instant::now();
    let mut a = sender(t0);
    a.tick(t0);
    // B's datagram does not name A's epoch: it may be a recording made
    // before A started. Refused, counted, and answered with a challenge.
    let out = a.datagram_received(&from_b(1, None, Message::Alive), t0 + ms(1));
    assert!(!out.iter().any(|x| matches!(x, Action::PeerAlive { .. })));
    let challenge = sent(&out);
    assert_eq!(challenge.len(), 1);
    assert_eq!(
        challenge[0].ack,
        Some(conntrack_syncd::sync::AckInfo {
            epoch: EPOCH_B,
            next: 0
        })
    );
    assert!(out.iter().any(|x| matches!(
        x,
        Action::Log(LogEvent::Stale {
            kind: StaleKind::Unverified,
            ..
        })
    )));
    let st = a.status(t0 + ms(1));
    assert_eq!(st.counters.rejected_stale, 1);
    assert_eq!(st.peer_epoch, None);
    assert_eq!(st.peer, PeerState::Unknown);
    // Challenges are rate-limited: a flood costs a few.
    for i in 0..100u64 {
        a.datagram_received(
            &from_b(1, None, Message::Alive),
            t0 + ms(1) + Duration::from_micros(i * 100),
        );
    }
    assert!(a.status(t0).counters.challenges_sent <= 2);
    // B answers the challenge: its datagram names A's epoch, B is taken.
    let out = a.datagram_received(&from_b(1, Some(0), Message::Alive), t0 + ms(20));
    assert!(out.contains(&Action::PeerAlive { epoch: EPOCH_B }));
    assert_eq!(a.status(t0).peer_epoch, Some(EPOCH_B));
}

#[test]
fn datagrams_reflected_back_at_their_sender_are_refused() {
    let t0 = Instant::now();
    let mut a = sender(t0);
    let mine = a.tick(t0);
    a.local_event(Record::New(entry(1, 0)), t0);
    let data = a.tick(t0);
    for action in mine.iter().chain(&data) {
        let Action::Send(bytes) = action else {
            continue;
        };
        let out = a.datagram_received(bytes, t0 + ms(1));
        assert!(
            out.iter()
                .all(|x| matches!(x, Action::Log(LogEvent::Stale { .. }))),
            "{out:?}"
        );
    }
    let st = a.status(t0 + ms(1));
    assert_eq!(st.counters.rejected_stale, 2);
    assert_eq!(st.counters.challenges_sent, 0);
    assert_eq!(st.peer, PeerState::Unknown);
}

#[test]
fn a_replayed_resync_request_costs_at_most_one_bulk_per_retry_interval() {
    let t0 = Instant::now();
    let mut a = sender_with(
        SyncConfig {
            pack_delay: Duration::ZERO,
            ..config()
        },
        t0,
    );
    a.tick(t0);
    a.datagram_received(&from_b(1, Some(1), Message::Alive), t0);
    let request = from_b(1, Some(1), Message::ResyncRequest { id: 1 });
    let dumps = |out: &[Action]| out.iter().filter(|x| **x == Action::DumpLocalTable).count();
    let out = a.datagram_received(&request, t0 + ms(1));
    assert_eq!(dumps(&out), 1);
    a.bulk_dump(vec![entry(1, 0)], true, t0 + ms(1));
    a.tick(t0 + ms(1));
    let next = a.status(t0).tx_next_seq;
    a.datagram_received(&from_b(1, Some(next), Message::Alive), t0 + ms(2));
    // The same request, replayed 100 times over 3 s: one more bulk per
    // second at most (a real repeat after a lost bulk is served).
    let mut bulks = 0;
    for i in 0..100u64 {
        let t = t0 + ms(10 + 30 * i);
        let out = a.datagram_received(&request, t);
        if dumps(&out) > 0 {
            bulks += 1;
            a.bulk_dump(vec![entry(1, 0)], true, t);
            a.tick(t);
            let next = a.status(t).tx_next_seq;
            a.datagram_received(&from_b(1, Some(next), Message::Alive), t);
        }
    }
    assert!((2..=3).contains(&bulks), "{bulks}");
    // An older request never; a new one at once.
    assert_eq!(
        dumps(&a.datagram_received(
            &from_b(1, Some(1), Message::ResyncRequest { id: 0 }),
            t0 + ms(4000)
        )),
        0
    );
    assert_eq!(
        dumps(&a.datagram_received(
            &from_b(1, Some(1), Message::ResyncRequest { id: 2 }),
            t0 + ms(4001)
        )),
        1
    );
}

// ---------------------------------------------------------------------------
// Two peers through a simulated link.

#[derive(Debug, Clone, Copy)]
enum Loss {
    None,
    /// Drop every k-th datagram (both directions counted together).
    EveryKth(u64),
    /// Drop this percentage, seeded.
    Percent(u64),
    /// Drop everything (the link is cut).
    All,
}

struct Link {
    rng: Rng,
    loss: Loss,
    /// Percentage of datagrams duplicated.
    duplicate: u64,
    /// Extra random delay (0..jitter), which reorders datagrams.
    jitter: Duration,
    latency: Duration,
    count: u64,
    serial: u64,
    dropped: u64,
    /// (deliver at, sequence for a stable order, to node, bytes)
    queue: BTreeMap<(Instant, u64), (usize, Vec<u8>)>,
}

impl Link {
    fn send(&mut self, now: Instant, to: usize, bytes: Vec<u8>) {
        self.count += 1;
        let drop = match self.loss {
            Loss::None => false,
            Loss::EveryKth(k) => self.count.is_multiple_of(k),
            Loss::Percent(p) => self.rng.chance(p),
            Loss::All => true,
        };
        if drop {
            self.dropped += 1;
            return;
        }
        let copies = if self.rng.chance(self.duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let jitter = if self.jitter.is_zero() {
                Duration::ZERO
            } else {
                Duration::from_micros(self.rng.below(self.jitter.as_micros() as u64))
            };
            // Same delivery time: sending order (no jitter, no reordering).
            self.serial += 1;
            self.queue.insert(
                (now + self.latency + jitter, self.serial),
                (to, bytes.clone()),
            );
        }
    }
}

struct Node {
    peer: SyncPeer,
    /// This node's own kernel table (what it replicates when sender).
    local: BTreeMap<Tuple, Entry>,
    /// The peer's flows as applied here.
    replica: BTreeMap<Tuple, Entry>,
    /// Every state a tuple took here, in order (None = destroyed).
    applied: HashMap<Tuple, Vec<Option<Entry>>>,
    /// Every state a tuple took at the source, in order.
    generated: HashMap<Tuple, Vec<Option<Entry>>>,
    /// Tuples refreshed by the bulk resync in progress.
    bulk: Option<BTreeSet<Tuple>>,
    actions: Vec<(Instant, Action)>,
    answer_dumps: bool,
    /// The master sends its whole table in a bulk; the other node only
    /// its own flows (none here).
    master: bool,
    /// Records this node applies per second at most (None: at once). It
    /// takes datagrams in order from a backlog, as a slow daemon reads its
    /// socket.
    apply_rate: Option<u64>,
    backlog: VecDeque<Vec<u8>>,
    busy_until: Instant,
}

impl Node {
    fn new(epoch: u64, key: SyncKey, config: SyncConfig, t0: Instant) -> Node {
        let mut peer = SyncPeer::new(config, key, epoch, t0).unwrap();
        peer.set_tx_enabled(true);
        Node {
            peer,
            local: BTreeMap::new(),
            replica: BTreeMap::new(),
            applied: HashMap::new(),
            generated: HashMap::new(),
            bulk: None,
            actions: Vec::new(),
            answer_dumps: true,
            master: false,
            apply_rate: None,
            backlog: VecDeque::new(),
            busy_until: t0,
        }
    }

    /// Status at the simulation's time.
    fn status_at(&self, now: Instant) -> conntrack_syncd::sync::Status {
        self.peer.status(now)
    }

    fn logs(&self) -> Vec<&LogEvent> {
        self.actions
            .iter()
            .filter_map(|(_, a)| match a {
                Action::Log(l) => Some(l),
                _ => None,
            })
            .collect()
    }

    fn count(&self, f: impl Fn(&Action) -> bool) -> usize {
        self.actions.iter().filter(|(_, a)| f(a)).count()
    }
}

struct Sim {
    t0: Instant,
    now: Instant,
    nodes: [Node; 2],
    link: Link,
}

impl Sim {
    fn new(loss: Loss, seed: u64, config: SyncConfig) -> Sim {
        let t0 = Instant::now();
        let mut sim = Sim {
            t0,
            now: t0,
            nodes: [
                Node::new(EPOCH_A, key(), config.clone(), t0),
                Node::new(EPOCH_B, key(), config, t0),
            ],
            link: Link {
                rng: Rng(seed),
                loss,
                duplicate: 0,
                jitter: Duration::ZERO,
                latency: Duration::from_micros(200),
                count: 0,
                serial: 0,
                dropped: 0,
                queue: BTreeMap::new(),
            },
        };
        sim.nodes[0].master = true;
        sim
    }

    fn handle(&mut self, i: usize, actions: Vec<Action>) {
        let mut work: VecDeque<Action> = actions.into();
        while let Some(a) = work.pop_front() {
            let node = &mut self.nodes[i];
            node.actions.push((self.now, a.clone()));
            match a {
                Action::Send(b) => self.link.send(self.now, 1 - i, b),
                Action::Apply(r) => {
                    let key = *r.key();
                    match r {
                        Record::New(e) | Record::Update(e) => {
                            node.replica.insert(key, e.clone());
                            node.applied.entry(key).or_default().push(Some(e));
                        }
                        Record::Destroy(_) => {
                            node.replica.remove(&key);
                            node.applied.entry(key).or_default().push(None);
                        }
                    }
                    if let Some(bulk) = &mut node.bulk {
                        bulk.insert(key);
                    }
                }
                Action::DumpLocalTable => {
                    if node.answer_dumps {
                        let dump = if node.master {
                            node.local.values().cloned().collect()
                        } else {
                            Vec::new()
                        };
                        work.extend(node.peer.bulk_dump(dump, node.master, self.now));
                    }
                }
                Action::ResyncStarted { .. } => node.bulk = Some(BTreeSet::new()),
                Action::ResyncComplete { complete, .. } => {
                    // What the shell does after the master's whole table:
                    // entries the bulk did not refresh were destroyed while
                    // updates were lost.
                    let bulk = node.bulk.take();
                    if let Some(bulk) = bulk.filter(|_| complete && !node.master) {
                        let stale: Vec<Tuple> = node
                            .replica
                            .keys()
                            .filter(|t| !bulk.contains(t))
                            .copied()
                            .collect();
                        for t in stale {
                            node.replica.remove(&t);
                            node.applied.entry(t).or_default().push(None);
                        }
                    }
                }
                Action::PeerAlive { .. } | Action::PeerDead { .. } | Action::Log(_) => {}
            }
        }
    }

    /// A local conntrack change on node `i`.
    fn local(&mut self, i: usize, record: Record) {
        let node = &mut self.nodes[i];
        let key = *record.key();
        match &record {
            Record::New(e) | Record::Update(e) => {
                node.local.insert(key, e.clone());
                node.generated.entry(key).or_default().push(Some(e.clone()));
            }
            Record::Destroy(_) => {
                node.local.remove(&key);
                node.generated.entry(key).or_default().push(None);
            }
        }
        let out = node.peer.local_event(record, self.now);
        self.handle(i, out);
        let out = self.nodes[i].peer.tick(self.now);
        self.handle(i, out);
    }

    /// Runs timers and deliveries up to `until`.
    fn run_until(&mut self, until: Instant) {
        loop {
            let next_link = self.link.queue.keys().next().map(|k| k.0);
            let next_timer = self.nodes[0]
                .peer
                .next_deadline()
                .min(self.nodes[1].peer.next_deadline());
            let next_backlog = self
                .nodes
                .iter()
                .filter(|n| !n.backlog.is_empty())
                .map(|n| n.busy_until)
                .min();
            let next = [next_link, next_backlog]
                .into_iter()
                .flatten()
                .fold(next_timer, Instant::min);
            if next > until {
                break;
            }
            self.now = self.now.max(next);
            while let Some(entry) = self.link.queue.first_entry() {
                if entry.key().0 > self.now {
                    break;
                }
                let (to, bytes) = entry.remove();
                if self.nodes[to].apply_rate.is_some() {
                    self.nodes[to].backlog.push_back(bytes);
                    continue;
                }
                let out = self.nodes[to].peer.datagram_received(&bytes, self.now);
                self.handle(to, out);
            }
            for i in 0..2 {
                while let Some(rate) = self.nodes[i].apply_rate
                    && self.nodes[i].busy_until <= self.now
                    && let Some(bytes) = self.nodes[i].backlog.pop_front()
                {
                    let out = self.nodes[i].peer.datagram_received(&bytes, self.now);
                    // Duplicates cost nothing: only records applied do.
                    let records =
                        out.iter().filter(|a| matches!(a, Action::Apply(_))).count() as u64;
                    self.handle(i, out);
                    let busy = Duration::from_micros(records * 1_000_000 / rate);
                    self.nodes[i].busy_until = self.now + busy;
                }
            }
            for i in 0..2 {
                // As the daemon: tick until nothing is due (what a tick
                // asks for, a bulk say, may queue more to send now).
                for _ in 0..3 {
                    if self.nodes[i].peer.next_deadline() > self.now {
                        break;
                    }
                    let out = self.nodes[i].peer.tick(self.now);
                    self.handle(i, out);
                }
                // A deadline stuck in the past would spin the shell.
                assert!(self.nodes[i].peer.next_deadline() > self.now);
            }
        }
        self.now = self.now.max(until);
    }

    fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        self.run_until(until);
    }

    /// `events` random changes on node 0 over `span`, on `tuples` connections.
    fn traffic(&mut self, rng: &mut Rng, events: u32, tuples: u32, span: Duration) {
        let start = self.now;
        let mut version = 0;
        for n in 0..events {
            let t = start + span * n / events;
            self.run_until(t);
            let i = rng.below(u64::from(tuples)) as u32;
            version += 1;
            let e = entry(i, version);
            let record = match (self.nodes[0].local.contains_key(e.key()), rng.below(10)) {
                (false, _) => Record::New(e),
                (true, 0) => Record::Destroy(*e.key()),
                (true, _) => Record::Update(e),
            };
            self.local(0, record);
        }
    }

    /// The backup holds exactly the master's table, and every tuple's
    /// changes arrived in order: what was applied is a subsequence of what
    /// was generated (coalescing may skip intermediate states), ending in
    /// the same state.
    fn assert_converged(&self) {
        let (a, b) = (&self.nodes[0], &self.nodes[1]);
        assert_eq!(b.replica.len(), a.local.len());
        assert!(b.replica == a.local, "backup table differs from master's");
        for (tuple, generated) in &a.generated {
            let mut applied = b.applied.get(tuple).cloned().unwrap_or_default();
            // A bulk resync may apply again the state a tuple already has.
            applied.dedup();
            let mut it = generated.iter();
            for state in &applied {
                assert!(
                    it.any(|g| g == state),
                    "{tuple:?}: applied out of order or never generated: {applied:?} vs {generated:?}"
                );
            }
            let last_generated = generated.last().cloned().flatten();
            let last_applied = applied.last().cloned().flatten();
            assert_eq!(last_applied, last_generated, "{tuple:?}: final state");
        }
    }
}

fn lossy_convergence(
    config: SyncConfig,
    loss: Loss,
    duplicate: u64,
    jitter: Duration,
    seed: u64,
) -> Sim {
    let mut sim = Sim::new(loss, seed, config);
    sim.link.duplicate = duplicate;
    sim.link.jitter = jitter;
    sim.run_for(ms(100));
    let mut rng = Rng(seed ^ 0xfeed);
    sim.traffic(&mut rng, 5_000, 400, Duration::from_secs(2));
    sim.run_for(Duration::from_secs(3));
    let (a, b) = (
        sim.nodes[0].status_at(sim.now),
        sim.nodes[1].status_at(sim.now),
    );
    sim.assert_converged();
    assert_eq!(a.tx_unacked, 0, "everything acknowledged");
    assert_eq!(b.rx_next_seq, a.tx_next_seq);
    assert_eq!(b.resync, ResyncState::Complete);
    // Retransmission alone repaired the losses: the only bulk resync is
    // the one at start.
    assert_eq!(b.counters.resyncs_completed, 1, "{b:?}");
    assert_eq!(a.counters.resyncs_sent, 1, "{a:?}");
    sim
}

#[test]
fn peers_converge_over_a_clean_link_with_batching() {
    let sim = lossy_convergence(delayed(), Loss::None, 0, Duration::ZERO, 1);
    let a = sim.nodes[0].status_at(sim.now).counters;
    assert_eq!(a.retransmissions, 0);
    // 5,000 changes in 2 s at 2 ms flush delay: batched, not one per change.
    assert!(a.datagrams_sent < 1_800, "{a:?}");
    assert!(a.records_sent < 5_000, "coalescing saved records: {a:?}");
    assert_eq!(a.window_cuts, 0);
}

/// A third of the datagrams lost, both ways, at random (a fixed pattern
/// such as "every third" locks onto the periodic alives and retries and
/// drops the same request every second, which no real link does).
#[test]
fn peers_converge_when_a_third_of_the_datagrams_is_dropped() {
    let sim = lossy_convergence(config(), Loss::Percent(33), 0, Duration::ZERO, 2);
    let a = sim.nodes[0].status_at(sim.now).counters;
    assert!(a.retransmissions > 20, "{a:?}");
    assert!(sim.nodes[1].status_at(sim.now).counters.gaps > 10);
}

#[test]
fn peers_converge_with_10_percent_loss_reordering_and_duplicates() {
    for seed in [3, 4, 5] {
        let sim = lossy_convergence(config(), Loss::Percent(10), 10, ms(3), seed);
        let b = sim.nodes[1].status_at(sim.now).counters;
        assert!(b.duplicates > 0, "{b:?}");
        assert!(b.gaps > 0, "{b:?}");
        assert!(sim.link.dropped > 50);
    }
}

#[test]
fn a_restarted_backup_gets_the_whole_table_by_bulk_resync() {
    let mut sim = Sim::new(Loss::None, 6, config());
    sim.run_for(ms(100));
    for i in 0..100 {
        sim.local(0, Record::New(entry(i, 0)));
    }
    sim.run_for(ms(100));
    sim.assert_converged();
    // B restarts: new epoch, empty table.
    sim.nodes[1] = Node::new(0xB2, key(), config(), sim.now);
    sim.run_for(ms(300));
    let b = &sim.nodes[1];
    assert_eq!(b.replica, sim.nodes[0].local);
    assert!(b.actions.iter().any(|(_, a)| *a
        == Action::ResyncComplete {
            records: 100,
            complete: true
        }));
    assert!(sim.nodes[0].logs().contains(&&LogEvent::PeerRestarted {
        old_epoch: EPOCH_B,
        new_epoch: 0xB2
    }));
    assert_eq!(sim.nodes[0].status_at(sim.now).counters.peer_restarts, 1);
    assert_eq!(b.status_at(sim.now).resync, ResyncState::Complete);
    assert!(b.status_at(sim.now).last_resync.is_some());
}

#[test]
fn a_restarted_master_resends_its_table_and_the_backup_drops_what_died_meanwhile() {
    let mut sim = Sim::new(Loss::None, 7, config());
    sim.run_for(ms(100));
    for i in 0..50 {
        sim.local(0, Record::New(entry(i, 0)));
    }
    sim.run_for(ms(100));
    sim.assert_converged();
    // The daemon restarts; the kernel table outlives it, but 10 flows end
    // while it is down (their Destroy events are never seen).
    let local = sim.nodes[0].local.clone();
    let mut a = Node::new(0xA2, key(), config(), sim.now);
    a.master = true;
    a.local = local;
    for i in 0..10 {
        a.local.remove(entry(i, 0).key());
    }
    sim.nodes[0] = a;
    sim.run_for(ms(300));
    let b = &sim.nodes[1];
    assert_eq!(b.replica, sim.nodes[0].local);
    assert_eq!(b.replica.len(), 40);
    assert!(b.logs().contains(&&LogEvent::ResyncRequested {
        cause: ResyncCause::NewPeerEpoch
    }));
}

#[test]
fn a_bulk_that_is_not_the_whole_table_deletes_nothing() {
    let mut sim = Sim::new(Loss::None, 17, config());
    sim.run_for(ms(100));
    for i in 0..20 {
        sim.local(0, Record::New(entry(i, 0)));
    }
    sim.run_for(ms(100));
    sim.assert_converged();
    // The master asks the backup for its table (the flows the backup
    // forwards: none). The master's copies of the backup's flows are
    // untouched, and so is everything else.
    let out = sim.nodes[0].peer.resync_requested_by_operator(sim.now);
    sim.handle(0, out);
    sim.run_for(ms(100));
    let a = &sim.nodes[0];
    assert!(a.actions.iter().any(|(_, x)| *x
        == Action::ResyncComplete {
            records: 0,
            complete: false
        }));
    sim.assert_converged();
}

#[test]
fn datagrams_of_a_previous_epoch_are_ignored() {
    let mut sim = Sim::new(Loss::None, 8, config());
    sim.run_for(ms(100));
    sim.local(0, Record::New(entry(1, 0)));
    // Capture one datagram of epoch A1 as it leaves.
    let old: Vec<u8> = sim.nodes[0]
        .actions
        .iter()
        .rev()
        .find_map(|(_, a)| match a {
            Action::Send(b) => Some(b.clone()),
            _ => None,
        })
        .unwrap();
    sim.run_for(ms(100));
    let mut a = Node::new(0xA2, key(), config(), sim.now);
    a.master = true;
    sim.nodes[0] = a;
    sim.run_for(ms(100));
    let restarts = sim.nodes[1].status_at(sim.now).counters.peer_restarts;
    let stale = sim.nodes[1].status_at(sim.now).counters.rejected_stale;
    // The old datagram arrives late: ignored, no flapping back to epoch A1.
    let out = sim.nodes[1].peer.datagram_received(&old, sim.now);
    assert!(
        out.iter()
            .all(|x| matches!(x, Action::Log(LogEvent::Stale { .. }))),
        "{out:?}"
    );
    let b = sim.nodes[1].status_at(sim.now);
    assert_eq!(b.counters.rejected_stale, stale + 1);
    assert_eq!(b.counters.peer_restarts, restarts);
    assert_eq!(b.peer_epoch, Some(0xA2));
}

/// The attack from the field: the master restarted once (epoch A1 → A2);
/// later the backup's daemon restarts and, once it follows A2, hears a
/// datagram of A1 recorded long before. With the handshake it refuses it
/// (A1 never echoed the backup's new epoch) and replication goes on; the
/// control (handshake off, the earlier protocol) takes A1 for a restart,
/// then refuses every real datagram of A2 as stale: deaf.
fn replay_after_restarts(handshake: bool) -> Sim {
    let config = SyncConfig {
        epoch_handshake: handshake,
        ..config()
    };
    let mut sim = Sim::new(Loss::None, 18, config.clone());
    sim.run_for(ms(100));
    for i in 0..20 {
        sim.local(0, Record::New(entry(i, 0)));
    }
    sim.run_for(ms(100));
    let recorded: Vec<Vec<u8>> = sim.nodes[0]
        .actions
        .iter()
        .filter_map(|(_, a)| match a {
            Action::Send(b) => Some(b.clone()),
            _ => None,
        })
        .collect();
    // The master's daemon restarts (A2), then the backup's (B2).
    let local = sim.nodes[0].local.clone();
    let mut a = Node::new(0xA2, key(), config.clone(), sim.now);
    a.master = true;
    a.local = local;
    sim.nodes[0] = a;
    sim.run_for(ms(300));
    sim.nodes[1] = Node::new(0xB2, key(), config.clone(), sim.now);
    sim.run_for(ms(300));
    assert_eq!(sim.nodes[1].status_at(sim.now).peer_epoch, Some(0xA2));
    // Every recorded datagram of A1, replayed at the backup.
    for bytes in &recorded {
        let out = sim.nodes[1].peer.datagram_received(bytes, sim.now);
        sim.handle(1, out);
    }
    // The master carries on.
    for i in 20..40 {
        sim.local(0, Record::New(entry(i, 0)));
    }
    sim.run_for(Duration::from_secs(2));
    sim
}

#[test]
fn a_replayed_datagram_of_an_old_epoch_cannot_deafen_a_restarted_receiver() {
    let sim = replay_after_restarts(true);
    sim.assert_converged();
    let b = sim.nodes[1].status_at(sim.now);
    assert_eq!(b.peer_epoch, Some(0xA2));
    assert_eq!(b.peer, PeerState::Alive);
    assert!(b.counters.rejected_stale >= 1, "{b:?}");
    assert_eq!(b.health.level, HealthLevel::Ok, "{:?}", b.health);
    assert_eq!(
        sim.nodes[0].status_at(sim.now).health.level,
        HealthLevel::Ok
    );
}

#[test]
fn control_without_the_handshake_the_replay_deafens_the_receiver() {
    let sim = replay_after_restarts(false);
    let b = sim.nodes[1].status_at(sim.now);
    assert_eq!(b.peer_epoch, Some(EPOCH_A), "the replay's epoch was taken");
    assert!(sim.nodes[1].replica.len() < sim.nodes[0].local.len());
    assert_eq!(b.peer, PeerState::Dead, "every real datagram refused");
    assert_eq!(b.health.level, HealthLevel::Failed);
    // The master sees its changes unacknowledged.
    let a = sim.nodes[0].status_at(sim.now);
    assert!(a.lag_now > Duration::from_secs(1), "{a:?}");
}

/// The link is cut while 40 rounds of changes to 20 flows happen, then
/// comes back. The window (and the congestion window in it) bounds what
/// is in flight; what waits is queued, one record per flow.
fn outage_scenario(config: SyncConfig) -> Sim {
    let mut sim = Sim::new(Loss::None, 9, config);
    sim.run_for(ms(100));
    for i in 0..20 {
        sim.local(0, Record::New(entry(i, 0)));
    }
    sim.run_for(ms(100));
    sim.link.loss = Loss::All;
    for v in 1..=40 {
        for i in 0..20 {
            sim.local(0, Record::Update(entry(i, v)));
        }
        sim.run_for(ms(5));
    }
    sim.local(0, Record::Destroy(*entry(0, 0).key()));
    sim.run_for(ms(100));
    sim.link.loss = Loss::None;
    sim.run_for(Duration::from_secs(3));
    sim.assert_converged();
    sim
}

#[test]
fn an_outage_is_repaired_by_retransmission_and_coalescing_never_by_a_table_resend() {
    // A window of 8 datagrams: 40 rounds of changes do not fit in flight.
    let sim = outage_scenario(SyncConfig {
        window: 8,
        initial_cwnd: 8,
        min_cwnd: 2,
        ..config()
    });
    let (a, b) = (
        sim.nodes[0].status_at(sim.now),
        sim.nodes[1].status_at(sim.now),
    );
    assert!(a.counters.records_coalesced >= 20 * 30, "{a:?}");
    assert_eq!(b.counters.lost, 0);
    assert_eq!(b.counters.resyncs_completed, 1, "only the one at start");
    assert_eq!(a.counters.resyncs_sent, 1);
    // The same outage with a large window: the same outcome.
    let sim = outage_scenario(config());
    let b = sim.nodes[1].status_at(sim.now);
    assert_eq!(b.counters.resyncs_completed, 1);
    assert!(sim.nodes[0].status_at(sim.now).counters.retransmissions >= 1);
}

#[test]
fn a_queue_over_its_limit_is_dropped_and_one_bulk_resync_follows() {
    let mut sim = Sim::new(
        Loss::None,
        9,
        SyncConfig {
            window: 8,
            initial_cwnd: 8,
            min_cwnd: 2,
            queue_limit: 30,
            ..config()
        },
    );
    sim.run_for(ms(100));
    for i in 0..20 {
        sim.local(0, Record::New(entry(i, 0)));
    }
    sim.run_for(ms(100));
    sim.assert_converged();
    // The link is cut while 60 new flows start: more than the queue holds.
    sim.link.loss = Loss::All;
    for i in 20..80 {
        sim.local(0, Record::New(entry(i, 0)));
        sim.run_for(ms(2));
    }
    sim.link.loss = Loss::None;
    sim.run_for(Duration::from_secs(3));
    sim.assert_converged();
    let (a, b) = (
        sim.nodes[0].status_at(sim.now),
        sim.nodes[1].status_at(sim.now),
    );
    assert!(a.counters.queue_overflows >= 1, "{a:?}");
    let logs = sim.nodes[0].logs();
    // Said once, not at every overflow.
    assert_eq!(
        logs.iter()
            .filter(|l| matches!(l, LogEvent::QueueOverflow { limit: 30, .. }))
            .count(),
        1
    );
    assert_eq!(
        logs.iter()
            .filter(|l| **l
                == &LogEvent::BulkSending {
                    cause: ResyncCause::QueueOverflow
                })
            .count(),
        1
    );
    assert_eq!(
        b.counters.resyncs_completed, 2,
        "at start, after the overflow"
    );
}

#[test]
fn the_congestion_window_grows_with_acks_and_halves_on_loss() {
    let mut sim = Sim::new(Loss::None, 19, config());
    sim.run_for(ms(100));
    let start = sim.nodes[0].status_at(sim.now).cwnd;
    for v in 0..200 {
        for i in 0..30 {
            sim.local(0, Record::Update(entry(i * 2, v)));
        }
        sim.run_for(ms(1));
    }
    sim.run_for(ms(100));
    let grown = sim.nodes[0].status_at(sim.now).cwnd;
    assert!(grown > start, "{start} -> {grown}");
    sim.link.loss = Loss::EveryKth(5);
    for v in 200..260 {
        for i in 0..30 {
            sim.local(0, Record::Update(entry(i * 2, v)));
        }
        sim.run_for(ms(1));
    }
    sim.link.loss = Loss::None;
    sim.run_for(Duration::from_secs(1));
    sim.assert_converged();
    let a = sim.nodes[0].status_at(sim.now);
    assert!(a.counters.window_cuts >= 1, "{a:?}");
    assert!(a.cwnd < grown, "{grown} -> {}", a.cwnd);
}

#[test]
fn lag_is_measured_to_the_acknowledgement_and_judged_by_the_health() {
    let config = SyncConfig {
        lag_threshold: ms(500),
        degraded_after: ms(1000),
        ..config()
    };
    let mut sim = Sim::new(Loss::None, 20, config);
    sim.link.latency = ms(3);
    sim.run_for(ms(100));
    for i in 0..50 {
        sim.local(0, Record::New(entry(i, 0)));
        sim.run_for(ms(10));
    }
    let a = sim.nodes[0].status_at(sim.now);
    // A round trip of 6 ms, acknowledged at once.
    let p50 = a.lag_p50.unwrap();
    assert!(p50 >= ms(6) && p50 < ms(8), "{p50:?}");
    assert_eq!(a.health.level, HealthLevel::Ok);
    assert!(a.lag_histogram.count >= 50);
    // The backup falls behind (100 records/s for 400 changes): the lag
    // passes the threshold, and once it stayed there degraded_after, the
    // health says so, naming it; when the backup catches up, it is ok.
    sim.nodes[1].apply_rate = Some(100);
    for i in 100..500 {
        sim.local(0, Record::New(entry(i, 0)));
    }
    sim.run_for(ms(1400));
    assert_eq!(
        sim.nodes[0].status_at(sim.now).health.level,
        HealthLevel::Ok
    );
    sim.run_for(ms(200));
    let h = sim.nodes[0].peer.status(sim.now).health;
    assert_eq!(h.level, HealthLevel::Degraded, "{h:?}");
    assert!(h.message.starts_with("replication lag "), "{h:?}");
    assert!(h.message.contains("above 500 ms"), "{h:?}");
    sim.run_for(Duration::from_secs(5));
    let a = sim.nodes[0].peer.status(sim.now);
    assert_eq!(a.health.level, HealthLevel::Ok, "{:?}", a.health);
    assert!(a.lag_p99.unwrap() > ms(1000));
    sim.assert_converged();
    // The link is cut: failed once the peer is silent for 10 alive intervals.
    sim.link.loss = Loss::All;
    sim.run_for(ms(1900));
    assert_ne!(
        sim.nodes[0].peer.status(sim.now).health.level,
        HealthLevel::Failed
    );
    sim.run_for(ms(200));
    assert_eq!(
        sim.nodes[0].peer.status(sim.now).health.level,
        HealthLevel::Failed
    );
}

#[test]
fn a_silent_peer_is_dead_after_m_alive_intervals_and_alive_again() {
    let config = SyncConfig {
        alive_interval: ms(100),
        dead_after: 3,
        ..config()
    };
    let mut sim = Sim::new(Loss::None, 10, config);
    sim.run_for(ms(1000));
    assert_eq!(sim.nodes[1].status_at(sim.now).peer, PeerState::Alive);
    for i in 0..5 {
        sim.local(0, Record::New(entry(i, 0)));
    }
    sim.link.loss = Loss::All;
    let cut = sim.now;
    let sent_before = sim.nodes[0].status_at(sim.now).counters.datagrams_sent;
    sim.run_for(ms(2000));
    for node in &sim.nodes {
        let dead: Vec<_> = node
            .actions
            .iter()
            .filter(|(_, a)| matches!(a, Action::PeerDead { .. }))
            .collect();
        assert_eq!(dead.len(), 1, "{dead:?}");
        let (at, Action::PeerDead { reason }) = dead[0] else {
            unreachable!()
        };
        let DeadReason::Silent { for_ } = reason else {
            panic!("{reason:?}")
        };
        assert_eq!(*for_, ms(300), "3 intervals of 100 ms");
        // Datagrams already on the wire when it was cut still arrive.
        assert!(*at > cut && *at <= cut + ms(301));
        assert_eq!(node.peer.status(sim.now).health.level, HealthLevel::Failed);
        assert!(
            node.peer
                .status(sim.now)
                .health
                .message
                .starts_with("peer silent for")
        );
    }
    assert_eq!(sim.nodes[0].status_at(sim.now).peer, PeerState::Dead);
    // While the peer is dead, only alives go out (and the one data
    // datagram, retransmitted until the peer was declared dead).
    let sent = sim.nodes[0].status_at(sim.now).counters.datagrams_sent - sent_before;
    assert!(sent <= 30, "{sent} datagrams to a dead peer");
    sim.link.loss = Loss::None;
    sim.run_for(ms(500));
    for node in &sim.nodes {
        assert_eq!(node.count(|a| matches!(a, Action::PeerAlive { .. })), 2);
        assert_eq!(node.status_at(sim.now).peer, PeerState::Alive);
        assert_eq!(node.peer.status(sim.now).health.level, HealthLevel::Ok);
    }
    sim.assert_converged();
}

#[test]
fn a_peer_never_heard_is_declared_dead_once() {
    let t0 = Instant::now();
    let mut a = sender(t0);
    let mut dead = Vec::new();
    let mut t = t0;
    while t < t0 + Duration::from_secs(5) {
        dead.extend(
            a.tick(t)
                .into_iter()
                .filter(|x| matches!(x, Action::PeerDead { .. })),
        );
        t = a.next_deadline().max(t + ms(1));
    }
    assert_eq!(
        dead,
        vec![Action::PeerDead {
            reason: DeadReason::NeverHeard { waited: ms(2000) }
        }]
    );
}

#[test]
fn a_wrong_key_is_rejected_counted_and_nothing_is_applied() {
    let mut sim = Sim::new(Loss::None, 11, config());
    sim.nodes[1] = Node::new(
        EPOCH_B,
        SyncKey::new(b"another-cluster-key-of-32-bytes!").unwrap(),
        config(),
        sim.t0,
    );
    sim.run_for(ms(100));
    for i in 0..20 {
        sim.local(0, Record::New(entry(i, 0)));
    }
    sim.run_for(Duration::from_secs(2));
    let b = &sim.nodes[1];
    assert!(b.replica.is_empty());
    assert!(b.status_at(sim.now).counters.rejected_authentication >= 10);
    assert_eq!(b.status_at(sim.now).counters.datagrams_received, 0);
    assert_eq!(b.count(|a| matches!(a, Action::PeerAlive { .. })), 0);
    assert!(b.logs().iter().any(|l| matches!(
        l,
        LogEvent::Rejected {
            reason: RejectReason::Authentication,
            ..
        }
    )));
    // Both sides see the other as dead, and say why.
    assert_eq!(sim.nodes[0].status_at(sim.now).peer, PeerState::Dead);
    let health = b.peer.status(sim.now).health;
    assert_eq!(health.level, HealthLevel::Failed);
    assert!(
        health.message.contains("refused (authentication)"),
        "{health:?}"
    );
}

#[test]
fn an_operator_resync_pulls_the_masters_table_again() {
    let mut sim = Sim::new(Loss::None, 12, config());
    sim.run_for(ms(100));
    for i in 0..30 {
        sim.local(0, Record::New(entry(i, 0)));
    }
    sim.run_for(ms(100));
    // The backup's replica was damaged (say, flushed by hand).
    sim.nodes[1].replica.clear();
    let out = sim.nodes[1].peer.resync_requested_by_operator(sim.now);
    assert_eq!(
        sim.nodes[1].status_at(sim.now).resync,
        ResyncState::Requested
    );
    sim.handle(1, out);
    sim.run_for(ms(100));
    assert_eq!(sim.nodes[1].replica, sim.nodes[0].local);
    assert_eq!(
        sim.nodes[1].status_at(sim.now).counters.resyncs_completed,
        2
    );
    assert!(sim.nodes[0].logs().contains(&&LogEvent::BulkSending {
        cause: ResyncCause::PeerRequest
    }));
}

#[test]
fn an_unanswered_resync_request_is_repeated() {
    let mut sim = Sim::new(Loss::None, 13, config());
    sim.nodes[0].answer_dumps = false;
    sim.run_for(Duration::from_millis(3500));
    // B asked at start, then once per resync_retry (1 s).
    let requests = sim.nodes[0]
        .actions
        .iter()
        .filter(|(_, a)| *a == Action::DumpLocalTable)
        .count();
    assert_eq!(
        sim.nodes[1].status_at(sim.now).resync,
        ResyncState::Requested
    );
    assert!(requests >= 3, "{requests}");
    sim.nodes[0].answer_dumps = true;
    sim.run_for(Duration::from_millis(1500));
    assert_eq!(
        sim.nodes[1].status_at(sim.now).resync,
        ResyncState::Complete
    );
}

#[test]
fn a_large_bulk_survives_loss() {
    let mut sim = Sim::new(Loss::None, 14, config());
    for i in 0..20_000 {
        let e = entry(i, 0);
        sim.nodes[0].local.insert(*e.key(), e);
    }
    sim.link.loss = Loss::Percent(10);
    sim.run_for(Duration::from_secs(3));
    assert_eq!(sim.nodes[1].replica.len(), sim.nodes[0].local.len());
    assert!(sim.nodes[1].replica == sim.nodes[0].local);
    let b = sim.nodes[1].status_at(sim.now);
    assert_eq!(b.resync, ResyncState::Complete);
    assert_eq!(b.counters.records_received, 20_000);
    // Paced by the congestion window: retransmissions stay a fraction.
    let a = sim.nodes[0].status_at(sim.now).counters;
    assert!(
        a.retransmissions * 4 < a.datagrams_sent,
        "{} retransmissions of {} datagrams",
        a.retransmissions,
        a.datagrams_sent
    );
}

/// A burst of 20,000 new flows in 4 s (each a New and an Update) to a
/// backup that applies at most 8,000 records per
/// second (it acknowledges only what it has applied): the sender paces to
/// the acknowledgements, coalesces what waits, sends no table twice,
/// retransmits little, and the backup holds every flow soon after.
#[test]
fn a_burst_to_a_slow_backup_degrades_gracefully() {
    let mut sim = Sim::new(Loss::None, 22, config());
    sim.nodes[1].apply_rate = Some(8_000);
    sim.run_for(ms(100));
    let mut rng = Rng(22);
    let t0 = sim.now;
    for n in 0..20_000u32 {
        let at = t0 + Duration::from_micros(u64::from(n) * 200);
        sim.run_until(at);
        let e = entry(n, 0);
        sim.local(0, Record::New(e.clone()));
        let mut up = e.clone();
        up.mark = 1 + (rng.below(3) as u32);
        sim.local(0, Record::Update(up));
    }
    sim.run_for(Duration::from_secs(4));
    sim.assert_converged();
    let (a, b) = (
        sim.nodes[0].status_at(sim.now),
        sim.nodes[1].status_at(sim.now),
    );
    assert_eq!(b.counters.resyncs_completed, 1, "no table resent: {b:?}");
    assert!(
        a.counters.retransmissions * 10 <= a.counters.datagrams_sent,
        "{a:?}"
    );
    assert!(a.counters.records_coalesced > 10_000, "{a:?}");
    assert_eq!(a.counters.queue_overflows, 0);
}
