//! Throughput of the client on the real kernel: entries created per second
//! (one request per call, and batched), dump time, deletes per second,
//! for 10,000 NATed TCP entries in a lab namespace. Prints the figures
//! (run with `--no-capture`; docs/conntrack.md has the measured ones) and
//! checks every entry made it.

mod common;

use std::time::Instant;

use common::{nat_tcp, open};
use tandem_conntrack::{CreateOptions, Entry};
use tandem_lab::Lab;

const N: usize = 10_000;

fn entries() -> Vec<Entry> {
    (0..N)
        .map(|i| {
            // Distinct client ports too: the SNAT keeps the port, and two
            // entries with the same reply tuple cannot coexist (EEXIST).
            let client = format!("10.2.{}.{}", i / 250, i % 250 + 1);
            let port = 20000 + i as u16;
            nat_tcp(
                &client,
                port,
                "10.0.0.100",
                80,
                "10.1.0.11",
                8080,
                "10.1.0.100",
            )
        })
        .collect()
}

#[test]
fn ten_thousand_entries_create_dump_and_delete() {
    let lab = Lab::new().unwrap();
    let ns = lab.netns("bench").unwrap();
    let mut ct = open(&ns);
    let all = entries();
    let opts = CreateOptions { be_liberal: true };

    let t = Instant::now();
    for e in &all {
        ct.create(e, opts).unwrap();
    }
    let create = t.elapsed();

    let t = Instant::now();
    let dump = ct.dump().unwrap();
    let dump_time = t.elapsed();
    assert_eq!(dump.len(), N);
    let mut got: Vec<_> = dump.iter().map(|r| r.entry.original).collect();
    let mut want: Vec<_> = all.iter().map(|e| e.original).collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    assert!(dump.iter().all(|r| r.entry.reply.dst == all[0].reply.dst));

    let t = Instant::now();
    let out = ns.exec("conntrack", &["-L"]).unwrap();
    let tool_time = t.elapsed();
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), N);

    let t = Instant::now();
    for e in &all {
        ct.delete(&e.original).unwrap();
    }
    let delete = t.elapsed();
    assert!(ct.dump().unwrap().is_empty());

    let t = Instant::now();
    let results = ct.create_many(&all, opts);
    let batched = t.elapsed();
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(ct.dump().unwrap().len(), N);

    let rate = |d: std::time::Duration| N as f64 / d.as_secs_f64();
    println!(
        "{N} NATed TCP entries: create {:.0}/s ({:.1} µs each), create_many {:.0}/s ({:.1} µs each), \
         dump {:.1} ms, `conntrack -L` {:.1} ms, delete {:.0}/s",
        rate(create),
        create.as_secs_f64() * 1e6 / N as f64,
        rate(batched),
        batched.as_secs_f64() * 1e6 / N as f64,
        dump_time.as_secs_f64() * 1e3,
        tool_time.as_secs_f64() * 1e3,
        rate(delete),
    );
}
