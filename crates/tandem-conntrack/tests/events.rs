//! Conntrack events and counters from real traffic between two lab
//! namespaces, and the overrun signal when the listener falls behind.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::{nat_tcp, nat_tcp_many, open};
use tandem_conntrack::entry::{proto, tcp};
use tandem_conntrack::{
    CreateOptions, Entry, Event, EventGroup, EventSocket, EventStream, Record, Tuple,
};
use tandem_lab::{Lab, Netns};

const CLIENT: &str = "10.9.0.1";
const SERVER: &str = "10.9.0.2";
const PORT: u16 = 9000;
const PAYLOAD: usize = 100_000;

/// A client and a server namespace on a veth. The server namespace tracks
/// connections (a `ct state` rule makes the kernel hook conntrack there),
/// counts bytes (nf_conntrack_acct=1) and expires closed connections after
/// a second instead of two minutes.
fn lab() -> (Lab, Netns, Netns) {
    let lab = Lab::new().unwrap();
    let cl = lab.netns("cl").unwrap();
    let srv = lab.netns("srv").unwrap();
    lab.link(
        &cl,
        "eth0",
        &[&format!("{CLIENT}/24")],
        &srv,
        "eth0",
        &[&format!("{SERVER}/24")],
    )
    .unwrap();
    srv.exec(
        "nft",
        &["add table inet t; add chain inet t in { type filter hook input priority 0; }; add rule inet t in ct state new counter"],
    )
    .unwrap();
    for (k, v) in [
        ("net.netfilter.nf_conntrack_acct", "1"),
        ("net.netfilter.nf_conntrack_tcp_timeout_time_wait", "1"),
        ("net.netfilter.nf_conntrack_tcp_timeout_close", "1"),
    ] {
        srv.sysctl(k, v).unwrap();
    }
    (lab, cl, srv)
}

/// One connection: PAYLOAD bytes to the server, "ok" back, then both
/// sides close. Returns the client's source port.
fn transfer(cl: &Netns, srv: &Netns) -> u16 {
    let listener = srv
        .run(|| TcpListener::bind((SERVER, PORT)))
        .unwrap()
        .unwrap();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut got = vec![0; PAYLOAD];
        conn.read_exact(&mut got).unwrap();
        conn.write_all(b"ok").unwrap();
        conn.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        conn.read_to_end(&mut rest).unwrap();
    });
    let mut s = cl
        .run(|| TcpStream::connect((SERVER, PORT)))
        .unwrap()
        .unwrap();
    let port = s.local_addr().unwrap().port();
    s.write_all(&vec![b'x'; PAYLOAD]).unwrap();
    let mut ok = [0; 2];
    s.read_exact(&mut ok).unwrap();
    assert_eq!(&ok, b"ok");
    s.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    server.join().unwrap();
    port
}

fn flow(port: u16) -> Tuple {
    common::tuple(CLIENT, port, SERVER, PORT, proto::TCP)
}

/// Dumps the table now and then until `until` holds: a dump also reaps
/// expired entries, which produces their destroy events without waiting
/// for the kernel's periodic garbage collection.
fn poke_until(srv: &Netns, timeout: Duration, mut until: impl FnMut() -> bool) -> bool {
    let mut ct = open(srv);
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if until() {
            return true;
        }
        ct.dump().unwrap();
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn real_traffic_produces_new_update_and_destroy_events() {
    let (_lab, cl, srv) = lab();
    let socket = srv
        .run(|| EventSocket::open(&EventGroup::ALL))
        .unwrap()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut stream = rt.block_on(async { EventStream::new(socket) }).unwrap();

    let port = transfer(&cl, &srv);
    let key = flow(port);

    let mut seen: Vec<Event> = Vec::new();
    let done = poke_until(&srv, Duration::from_secs(15), || {
        rt.block_on(async {
            while let Ok(Ok(ev)) =
                tokio::time::timeout(Duration::from_millis(50), stream.next()).await
            {
                seen.push(ev);
            }
        });
        seen.iter()
            .any(|e| matches!(e, Event::Destroy(r) if r.entry.original == key))
    });
    let ours: Vec<&Event> = seen
        .iter()
        .filter(|e| match e {
            Event::New(r) | Event::Update(r) | Event::Destroy(r) => r.entry.original == key,
            Event::Overrun => true,
        })
        .collect();
    assert!(done, "no destroy event for {key}; saw {ours:#?}");
    let Event::New(first) = ours[0] else {
        panic!("the first event is not New: {ours:#?}")
    };
    assert_eq!(first.entry.tcp.map(|t| t.state), Some(tcp::SYN_SENT));
    let states: Vec<u8> = ours
        .iter()
        .filter_map(|e| match e {
            Event::Update(r) => r.entry.tcp.map(|t| t.state),
            _ => None,
        })
        .collect();
    assert!(states.contains(&tcp::ESTABLISHED), "updates: {states:?}");
    assert!(states.contains(&tcp::TIME_WAIT), "updates: {states:?}");
    assert!(matches!(ours.last(), Some(Event::Destroy(_))));
    assert_eq!(
        ours.iter().filter(|e| matches!(e, Event::New(_))).count(),
        1
    );
    assert!(!ours.iter().any(|e| matches!(e, Event::Overrun)));
}

#[test]
fn counters_of_a_real_transfer_appear_in_dump_and_destroy_event() {
    let (_lab, cl, srv) = lab();
    let mut events = srv
        .run(|| EventSocket::open(&[EventGroup::Destroy]))
        .unwrap()
        .unwrap();
    // A connection left open, to read its counters in a dump.
    let listener = srv
        .run(|| TcpListener::bind((SERVER, PORT)))
        .unwrap()
        .unwrap();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut got = vec![0; PAYLOAD];
        conn.read_exact(&mut got).unwrap();
        conn.write_all(b"ok").unwrap();
        let mut rest = Vec::new();
        conn.read_to_end(&mut rest).unwrap();
    });
    let mut s = cl
        .run(|| TcpStream::connect((SERVER, PORT)))
        .unwrap()
        .unwrap();
    let key = flow(s.local_addr().unwrap().port());
    s.write_all(&vec![b'x'; PAYLOAD]).unwrap();
    let mut ok = [0; 2];
    s.read_exact(&mut ok).unwrap();

    let mut ct = open(&srv);
    let dumped: Record = ct
        .dump()
        .unwrap()
        .into_iter()
        .find(|r| r.entry.original == key)
        .expect("the open connection is in the dump");
    let c = dumped.counters.expect("counters with nf_conntrack_acct=1");
    // Payload plus headers; at least the payload, at most twice it.
    assert!(
        (PAYLOAD as u64..2 * PAYLOAD as u64).contains(&c.bytes_original),
        "{c:?}"
    );
    assert!(c.packets_original >= 3 && c.packets_reply >= 2, "{c:?}");
    assert!(
        c.bytes_reply < 10_000,
        "only acks and \"ok\" came back: {c:?}"
    );

    drop(s);
    server.join().unwrap();
    let mut destroyed = None;
    poke_until(&srv, Duration::from_secs(15), || {
        while let Some(ev) = events.recv_timeout(Duration::from_millis(50)).unwrap() {
            if let Event::Destroy(r) = ev
                && r.entry.original == key
            {
                destroyed = Some(r);
            }
        }
        destroyed.is_some()
    });
    let r = destroyed.expect("destroy event");
    assert_eq!(r.id, dumped.id, "the same entry");
    let end = r.counters.expect("counters in the destroy event");
    assert!(end.bytes_original >= c.bytes_original, "{end:?} vs {c:?}");
    assert!(
        end.packets_original > c.packets_original,
        "the FIN came after"
    );
    assert!(
        end.bytes_original < c.bytes_original + 1000,
        "{end:?} vs {c:?}"
    );
}

#[test]
fn a_listener_that_falls_behind_gets_an_overrun() {
    let lab = Lab::new().unwrap();
    let ns = lab.netns("ct").unwrap();
    let entries: Vec<Entry> = nat_tcp_many(10000, 3000);
    // Control: a large buffer holds the whole burst.
    let mut big = ns
        .run(|| EventSocket::open(&[EventGroup::New]))
        .unwrap()
        .unwrap();
    // A small one cannot.
    let mut small = ns
        .run(|| EventSocket::with_receive_buffer(&[EventGroup::New], 16 << 10))
        .unwrap()
        .unwrap();
    let mut ct = open(&ns);
    assert!(
        ct.create_many(&entries, CreateOptions::default())
            .iter()
            .all(Result::is_ok)
    );

    let mut news = 0;
    while let Some(ev) = big.recv_timeout(Duration::from_millis(200)).unwrap() {
        assert!(matches!(ev, Event::New(_)), "{ev:?}");
        news += 1;
    }
    assert_eq!(news, 3000);

    let mut overruns = 0;
    let mut small_news = 0;
    while let Some(ev) = small.recv_timeout(Duration::from_millis(200)).unwrap() {
        match ev {
            Event::Overrun => overruns += 1,
            Event::New(_) => small_news += 1,
            other => panic!("{other:?}"),
        }
    }
    assert!(
        overruns >= 1,
        "no overrun with {} bytes",
        small.receive_buffer()
    );
    assert!(small_news < 3000);
    // The stream keeps working after an overrun.
    ct.delete(&entries[0].original).unwrap();
    ct.create(&entries[0], CreateOptions::default()).unwrap();
    let ev = small.recv_timeout(Duration::from_secs(2)).unwrap();
    assert!(matches!(ev, Some(Event::New(r)) if r.entry.original == entries[0].original));
}

/// Events name the socket that caused them, and the kernel filter drops,
/// before they are copied to user space, the listener's own writes and the
/// flows to other destinations. The control is the same writes with no
/// filter attached: all of them arrive.
#[test]
fn the_kernel_filter_drops_own_writes_and_other_destinations() {
    let lab = Lab::new().unwrap();
    let ns = lab.netns("ct").unwrap();
    let mut own = open(&ns);
    let mut other = open(&ns);
    assert_ne!(own.portid(), other.portid());
    let to =
        |dst: &str, port: u16| nat_tcp("10.0.0.50", port, dst, 80, "10.1.0.11", 8080, "10.1.0.100");
    let writes = |own: &mut tandem_conntrack::Conntrack,
                  other: &mut tandem_conntrack::Conntrack,
                  base: u16| {
        own.create(&to("10.0.0.100", base), CreateOptions::default())
            .unwrap();
        other
            .create(&to("10.0.0.100", base + 1), CreateOptions::default())
            .unwrap();
        other
            .create(&to("10.0.0.200", base + 2), CreateOptions::default())
            .unwrap();
        other.delete(&to("10.0.0.100", base + 1).original).unwrap();
    };
    let collect = |s: &mut EventSocket| {
        let mut got = Vec::new();
        while let Some(ev) = s.recv_timeout(Duration::from_millis(300)).unwrap() {
            match ev {
                Event::New(r) | Event::Update(r) | Event::Destroy(r) => {
                    got.push((r.entry.original.src_port, r.portid))
                }
                Event::Overrun => panic!("overrun"),
            }
        }
        got
    };

    let mut unfiltered = ns
        .run(|| EventSocket::open(&EventGroup::ALL))
        .unwrap()
        .unwrap();
    writes(&mut own, &mut other, 10000);
    let all = collect(&mut unfiltered);
    assert!(all.contains(&(10000, own.portid())), "{all:?}");
    assert!(all.contains(&(10001, other.portid())), "{all:?}");
    assert!(all.contains(&(10002, other.portid())), "{all:?}");

    let mut filtered = ns
        .run(|| EventSocket::open(&EventGroup::ALL))
        .unwrap()
        .unwrap();
    filtered
        .set_kernel_filter(&tandem_conntrack::KernelFilter {
            destinations: vec!["10.0.0.100".parse().unwrap()],
            ignore_portid: own.portid(),
        })
        .unwrap();
    writes(&mut own, &mut other, 20000);
    let kept = collect(&mut filtered);
    // New and Destroy of the other socket's flow to the VIP, nothing else.
    assert_eq!(
        kept,
        vec![(20001, other.portid()), (20001, other.portid())],
        "{kept:?}"
    );
}
