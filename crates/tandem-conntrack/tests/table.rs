//! Create, read, update and delete of conntrack entries on the real kernel,
//! in a lab namespace, cross-checked with `conntrack -L`.

mod common;

use common::{conntrack_list, nat_tcp, nat_tcp_many, open, tuple};
use tandem_conntrack::entry::{proto, status, tcp};
use tandem_conntrack::{ConntrackError, CreateOptions, Entry, Record};
use tandem_lab::Lab;

const LIBERAL: CreateOptions = CreateOptions { be_liberal: true };

fn find<'a>(dump: &'a [Record], e: &Entry) -> Option<&'a Record> {
    dump.iter().find(|r| r.entry.original == e.original)
}

/// What must survive the trip into the kernel: tuples (the reply NATed by
/// the kernel itself), NAT bits, mark, TCP state.
fn assert_same(got: &Entry, want: &Entry) {
    assert_eq!(got.original, want.original);
    assert_eq!(
        got.reply, want.reply,
        "reply tuple (NAT) of {}",
        want.original
    );
    let nat_bits = status::NAT_MASK | status::NAT_DONE_MASK;
    let want_nat = match (want.dnat_target(), want.snat_source()) {
        (Some(_), Some(_)) => nat_bits,
        (Some(_), None) => status::DST_NAT | status::DST_NAT_DONE | status::SRC_NAT_DONE,
        (None, Some(_)) => status::SRC_NAT | status::SRC_NAT_DONE | status::DST_NAT_DONE,
        (None, None) => status::NAT_DONE_MASK,
    };
    assert_eq!(
        got.status & nat_bits,
        want_nat,
        "NAT status bits of {}",
        want.original
    );
    for bit in [status::CONFIRMED, status::SEEN_REPLY, status::ASSURED] {
        assert_eq!(
            got.status & bit,
            want.status & bit | status::CONFIRMED & bit
        );
    }
    assert_eq!(got.mark, want.mark);
    assert!(got.timeout_s <= want.timeout_s && got.timeout_s + 5 >= want.timeout_s);
    match (got.tcp, want.tcp) {
        (Some(g), Some(w)) => {
            assert_eq!(g.state, w.state);
            assert_eq!(
                g.flags_original & tcp::FLAG_BE_LIBERAL,
                tcp::FLAG_BE_LIBERAL
            );
            assert_eq!(g.flags_reply & tcp::FLAG_BE_LIBERAL, tcp::FLAG_BE_LIBERAL);
            assert_eq!(g.wscale_original, w.wscale_original);
            assert_eq!(g.wscale_reply, w.wscale_reply);
        }
        (None, None) => {}
        other => panic!("TCP info differs: {other:?}"),
    }
}

#[test]
fn nated_tcp_entry_round_trips_through_the_kernel() {
    let lab = Lab::new().unwrap();
    let ns = lab.netns("ct").unwrap();
    let mut ct = open(&ns);
    let e = nat_tcp(
        "10.0.0.50",
        40000,
        "10.0.0.100",
        80,
        "10.1.0.11",
        8080,
        "10.1.0.100",
    );
    // Control: the table does not have it yet.
    assert_eq!(ct.get(&e.original).unwrap(), None);
    ct.create(&e, LIBERAL).expect("create");

    let got = ct.get(&e.original).unwrap().expect("get after create");
    assert_same(&got.entry, &e);
    assert_ne!(got.id, 0, "the kernel gives every entry an id");
    let dump = ct.dump().unwrap();
    assert_eq!(dump.len(), 1);
    assert_same(&find(&dump, &e).expect("in dump").entry, &e);

    // The Debian tool sees the same entry.
    let lines = conntrack_list(&ns, "ipv4");
    assert_eq!(lines.len(), 1, "{lines:?}");
    let l = &lines[0];
    assert_eq!(l.proto, "tcp");
    assert_eq!(l.state.as_deref(), Some("ESTABLISHED"));
    assert_eq!(l.original_tuple(proto::TCP), e.original);
    assert_eq!(l.reply_tuple(proto::TCP), e.reply);
    assert_eq!(l.mark, Some(7));
    assert!(l.flags.iter().any(|f| f == "ASSURED"), "{l:?}");

    // Update: timeout and mark change, NAT stays.
    let mut changed = e.clone();
    changed.timeout_s = 120;
    changed.mark = 42;
    ct.update(&changed).expect("update");
    let got = ct.get(&e.original).unwrap().expect("get after update");
    assert_eq!(got.entry.mark, 42);
    assert!(
        (115..=120).contains(&got.entry.timeout_s),
        "{}",
        got.entry.timeout_s
    );
    assert_eq!(got.entry.reply, e.reply);
    assert_eq!(conntrack_list(&ns, "ipv4")[0].mark, Some(42));

    // Create twice: EEXIST, as its own variant.
    match ct.create(&e, LIBERAL) {
        Err(ConntrackError::Exists { tuple }) => assert_eq!(tuple, e.original),
        other => panic!("second create: {other:?}"),
    }

    ct.delete(&e.original).expect("delete");
    assert_eq!(ct.get(&e.original).unwrap(), None);
    assert!(ct.dump().unwrap().is_empty());
    assert!(conntrack_list(&ns, "ipv4").is_empty());
    match ct.delete(&e.original) {
        Err(ConntrackError::NotFound { tuple, .. }) => assert_eq!(tuple, e.original),
        other => panic!("second delete: {other:?}"),
    }
    match ct.update(&changed) {
        Err(e @ ConntrackError::NotFound { .. }) => {
            assert!(e.to_string().contains("10.0.0.50:40000"), "{e}")
        }
        other => panic!("update of a deleted entry: {other:?}"),
    }
}

#[test]
fn ipv6_and_udp_entries_round_trip() {
    let lab = Lab::new().unwrap();
    let ns = lab.netns("ct").unwrap();
    let mut ct = open(&ns);
    let v6 = nat_tcp(
        "fd00::50",
        40001,
        "fd00::100",
        443,
        "fd01::11",
        8443,
        "fd01::100",
    );
    let udp4 = Entry {
        original: tuple("10.0.0.50", 5353, "10.0.0.100", 53, proto::UDP),
        reply: tuple("10.1.0.12", 5300, "10.1.0.100", 5353, proto::UDP),
        status: status::SEEN_REPLY | status::ASSURED,
        timeout_s: 180,
        mark: 3,
        zone: 0,
        tcp: None,
    };
    // UDP over IPv6, DNAT only.
    let udp6 = Entry {
        original: tuple("fd00::51", 6000, "fd00::100", 53, proto::UDP),
        reply: tuple("fd01::12", 53, "fd00::51", 6000, proto::UDP),
        status: status::SEEN_REPLY,
        timeout_s: 30,
        mark: 0,
        zone: 0,
        tcp: None,
    };
    for e in [&v6, &udp4, &udp6] {
        ct.create(e, LIBERAL)
            .unwrap_or_else(|err| panic!("create {}: {err}", e.original));
    }
    let dump = ct.dump().unwrap();
    assert_eq!(dump.len(), 3, "the dump holds both families: {dump:?}");
    for e in [&v6, &udp4, &udp6] {
        assert_same(&find(&dump, e).expect("in dump").entry, e);
        assert_same(&ct.get(&e.original).unwrap().expect("get").entry, e);
    }

    let lines6 = conntrack_list(&ns, "ipv6");
    assert_eq!(lines6.len(), 2, "{lines6:?}");
    let tcp6 = lines6
        .iter()
        .find(|l| l.proto == "tcp")
        .expect("tcp v6 line");
    assert_eq!(tcp6.original_tuple(proto::TCP), v6.original);
    assert_eq!(tcp6.reply_tuple(proto::TCP), v6.reply);
    let u6 = lines6
        .iter()
        .find(|l| l.proto == "udp")
        .expect("udp v6 line");
    assert_eq!(u6.reply_tuple(proto::UDP), udp6.reply);
    let lines4 = conntrack_list(&ns, "ipv4");
    assert_eq!(lines4.len(), 1);
    assert_eq!(lines4[0].reply_tuple(proto::UDP), udp4.reply);
    assert_eq!(lines4[0].mark, Some(3));

    let mut longer = udp6.clone();
    longer.timeout_s = 900;
    ct.update(&longer).unwrap();
    let t = ct.get(&udp6.original).unwrap().unwrap().entry.timeout_s;
    assert!((895..=900).contains(&t), "{t}");

    for e in [&v6, &udp4, &udp6] {
        ct.delete(&e.original).unwrap();
    }
    assert!(ct.dump().unwrap().is_empty());
}

#[test]
fn a_batch_create_reports_each_entry() {
    let lab = Lab::new().unwrap();
    let ns = lab.netns("ct").unwrap();
    let mut ct = open(&ns);
    let entries: Vec<Entry> = nat_tcp_many(10000, 600);
    ct.create(&entries[300], LIBERAL).unwrap();
    let results = ct.create_many(&entries, LIBERAL);
    assert_eq!(results.len(), 600);
    for (i, r) in results.iter().enumerate() {
        match (i, r) {
            (300, Err(ConntrackError::Exists { tuple })) => {
                assert_eq!(*tuple, entries[300].original)
            }
            (300, other) => panic!("entry 300 existed already: {other:?}"),
            (_, Ok(())) => {}
            (i, Err(e)) => panic!("entry {i}: {e}"),
        }
    }
    assert_eq!(ct.dump().unwrap().len(), 600);
}

#[test]
fn an_entry_mixing_address_families_is_refused_before_sending() {
    let lab = Lab::new().unwrap();
    let ns = lab.netns("ct").unwrap();
    let mut ct = open(&ns);
    let mut e = nat_tcp(
        "10.0.0.50",
        1,
        "10.0.0.100",
        80,
        "10.1.0.11",
        8080,
        "10.1.0.100",
    );
    e.reply.src = "fd01::11".parse().unwrap();
    assert!(matches!(
        ct.create(&e, LIBERAL),
        Err(ConntrackError::Invalid { .. })
    ));
    assert!(ct.dump().unwrap().is_empty());
}

/// Only a batch's last request asks for an acknowledgement: the answers of
/// the others (their errors, a Get's entry) must still reach the right
/// request, and a request without an answer must count as done — also when
/// the last one fails.
#[test]
fn a_mixed_batch_answers_each_request() {
    use tandem_conntrack::Request;
    let lab = Lab::new().unwrap();
    let ns = lab.netns("ct").unwrap();
    let mut ct = open(&ns);
    let e: Vec<Entry> = nat_tcp_many(20000, 4);
    ct.create(&e[0], LIBERAL).unwrap();
    ct.create(&e[1], LIBERAL).unwrap();
    let absent = e[3].original;
    let mut longer = e[1].clone();
    longer.timeout_s = 3000;
    let requests = [
        Request::Get(&e[0].original, 0),
        Request::Get(&absent, 0),
        Request::Delete(&absent, 0),
        Request::Update(&longer),
        Request::Create(&e[0], LIBERAL),
        Request::Create(&e[2], LIBERAL),
        Request::Delete(&e[0].original, 0),
        Request::Delete(&absent, 0),
    ];
    let results = ct.execute(&requests);
    assert_eq!(results.len(), requests.len());
    match &results[0] {
        Ok(Some(r)) => assert_eq!(r.entry.original, e[0].original),
        other => panic!("get of a present entry: {other:?}"),
    }
    assert!(matches!(results[1], Ok(None)), "{:?}", results[1]);
    assert!(
        matches!(results[2], Err(ConntrackError::NotFound { .. })),
        "{:?}",
        results[2]
    );
    assert!(matches!(results[3], Ok(None)), "{:?}", results[3]);
    assert!(
        matches!(results[4], Err(ConntrackError::Exists { .. })),
        "{:?}",
        results[4]
    );
    assert!(matches!(results[5], Ok(None)), "{:?}", results[5]);
    assert!(matches!(results[6], Ok(None)), "{:?}", results[6]);
    assert!(
        matches!(results[7], Err(ConntrackError::NotFound { .. })),
        "{:?}",
        results[7]
    );
    // The kernel did what the answers say.
    let table = ct.dump().unwrap();
    let find = |t| table.iter().find(|r| r.entry.original == t);
    assert!(find(e[0].original).is_none());
    assert!(find(e[1].original).unwrap().entry.timeout_s > 2000);
    assert!(find(e[2].original).is_some());
    // The next batch starts clean: no answer of this one left unread.
    let again = ct.execute(&[Request::Get(&e[2].original, 0)]);
    assert!(matches!(again[0], Ok(Some(_))), "{:?}", again[0]);
}
