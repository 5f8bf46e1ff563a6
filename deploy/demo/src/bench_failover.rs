//! Failover time of vrrpd and keepalived, side by side, in the same lab and
//! the same run: two nodes and a client on one bridge; the client probes the
//! floating IP every 2 ms over UDP; the master crashes (link down, then
//! SIGKILL); failover = last answer from the old master to first answer from
//! the new one. Several runs per (interval, speaker); prints a table.
//!
//! With `--stress`, no node fails: CPU hogs keep every core busy and the
//! table counts the role changes they cause (false takeovers), the worst
//! client outage and the worst gap between adverts on the wire.

mod stress;

use std::time::Duration;

use comfy_table::{Table, presets};
use tandem_e2e::vrrp_lab::{ClusterOptions, Speaker, VrrpLab};

fn one_run(opts: &ClusterOptions, speaker: Speaker) -> Option<Duration> {
    let mut lab = VrrpLab::new(opts);
    lab.start_as("lb1", speaker);
    lab.start_as("lb2", speaker);
    let settle = Duration::from_secs(20);
    lab.wait_stable(settle, Duration::from_millis(500), "one VIP holder", |l| {
        l.vip_holders().len() == 1
    });
    let master = lab.vip_holders().remove(0);
    let backup = if master == "lb1" { "lb2" } else { "lb1" }.to_owned();
    let m = master.clone();
    lab.wait_until(settle, "the VIP to answer", |l| {
        l.vip_answer().as_deref() == Some(m.as_str())
    });
    let probe = lab.start_probe(Duration::from_millis(2));
    // Crash at a random phase of the advert schedule: a fixed delay after
    // the election would crash every run at nearly the same time since the
    // last advert and bias the figure (by up to one interval) differently
    // for each speaker.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let jitter = Duration::from_millis(u64::from(nanos) % u64::from(opts.advert_interval_ms));
    std::thread::sleep(Duration::from_millis(500) + jitter);
    let crash = probe.elapsed();
    lab.crash(&master);
    let b = backup.clone();
    lab.wait_until(settle, "the backup to answer", |l| {
        l.vip_answer().as_deref() == Some(b.as_str())
    });
    std::thread::sleep(Duration::from_millis(200));
    let log = probe.finish();
    if let Some((before, after)) = log.around(crash, &master, &backup) {
        eprintln!(
            "  last old answer {before:?} before the crash, first new answer {after:?} after it"
        );
    }
    log.failover(&master, &backup)
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn main() {
    // Usage: tandem-bench-failover [RUNS] [INTERVAL_MS ...] (default 5; 1000 50)
    //        tandem-bench-failover --stress [SECONDS] [INTERVAL_MS ...] (default 60; 100 50 10)
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--stress") {
        stress::main(&args[1..]);
        return;
    }
    let runs: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(5);
    let mut intervals: Vec<u32> = args.iter().skip(1).filter_map(|a| a.parse().ok()).collect();
    if intervals.is_empty() {
        intervals = vec![1000, 50];
    }
    let mut table = Table::new();
    table.load_style(presets::UTF8_FULL_CONDENSED);
    table.set_header([
        "advert interval",
        "speaker",
        "runs",
        "median ms",
        "min ms",
        "max ms",
        "RFC Master_Down_Interval ms",
    ]);
    for interval in intervals {
        let opts = ClusterOptions {
            advert_interval_ms: interval,
            ..ClusterOptions::default()
        };
        // Priority 100: Master_Down_Interval = 3 * interval + (256-100)/256 * interval.
        let mdi = f64::from(interval) * (3.0 + 156.0 / 256.0);
        for speaker in [Speaker::Vrrpd, Speaker::Keepalived] {
            let mut times: Vec<Duration> = (0..runs)
                .filter_map(|i| {
                    let t = one_run(&opts, speaker);
                    eprintln!("{interval} ms {speaker:?} run {}: {:?}", i + 1, t);
                    t
                })
                .collect();
            times.sort();
            let name = match speaker {
                Speaker::Vrrpd => "vrrpd",
                Speaker::Keepalived => "keepalived 2.2.7",
            };
            if times.is_empty() {
                table.add_row([
                    format!("{interval} ms"),
                    name.into(),
                    "0".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    format!("{mdi:.1}"),
                ]);
                continue;
            }
            table.add_row([
                format!("{interval} ms"),
                name.into(),
                times.len().to_string(),
                ms(times[times.len() / 2]),
                ms(times[0]),
                ms(times[times.len() - 1]),
                format!("{mdi:.1}"),
            ]);
        }
    }
    println!(
        "Failover after a master crash (link down + SIGKILL), client probing the VIP every 2 ms:"
    );
    println!("{table}");
}
