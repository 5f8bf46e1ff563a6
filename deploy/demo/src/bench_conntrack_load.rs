//! The load parts of the conntrack benchmark: capacity (entries created
//! straight in the master's table over ctnetlink at a set rate, so the
//! load generator is not the limit) and the cost on the datapath (new
//! connections per second through the VIP with and without a sync daemon).

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use tandem_conntrack::{Conntrack, CreateOptions, Entry, TcpInfo, Tuple};
use tandem_e2e::chaos_lab::nft_packets;
use tandem_e2e::conntrack_lab::VIP;

use crate::{Bench, Peer, cpu_seconds};

/// Every this many entries one is a probe: long-lived, looked for on the
/// backup at the end (zero loss = every probe arrived).
const PROBE_EVERY: u64 = 100;
/// Every this many entries one is timed: polled on the backup until it
/// appears (the lag).
const LAG_EVERY: u64 = 1000;
/// Entries that are not probes live this long (the kernel expires them,
/// on the master and, replicated, on the backup): the table stays within
/// nf_conntrack_max at any rate tried.
const SHORT_TIMEOUT_S: u32 = 1;
const PROBE_TIMEOUT_S: u32 = 600;

/// Entry `i` of a capacity run: a flow from a client address of
/// 172.16.0.0/16 to the VIP's port 80, DNATed to a backend (no SNAT, so no
/// two entries share a reply tuple), ESTABLISHED.
fn entry(i: u64) -> Entry {
    let host = (i / 50_000) as u32;
    let src = Ipv4Addr::from(0xac10_0000 + host);
    let port = 10_000 + (i % 50_000) as u16;
    let backend = Ipv4Addr::new(10, 1, 0, 11 + (i % 3) as u8);
    let original = Tuple {
        src: IpAddr::V4(src),
        dst: VIP.parse().expect("VIP"),
        protocol: 6,
        src_port: port,
        dst_port: 80,
    };
    Entry {
        original,
        reply: Tuple {
            src: IpAddr::V4(backend),
            dst: IpAddr::V4(src),
            protocol: 6,
            src_port: 8080,
            dst_port: port,
        },
        // CONFIRMED | SEEN_REPLY | ASSURED
        status: 0x0e,
        timeout_s: if i.is_multiple_of(PROBE_EVERY) {
            PROBE_TIMEOUT_S
        } else {
            SHORT_TIMEOUT_S
        },
        mark: 0,
        zone: 0,
        tcp: Some(TcpInfo {
            state: 3,
            wscale_original: 7,
            wscale_reply: 7,
            flags_original: 0,
            flags_reply: 0,
        }),
    }
}

#[derive(Debug, Default, Clone)]
pub struct CapacityRun {
    pub offered: u64,
    pub secs: f64,
    pub created: u64,
    pub create_errors: u64,
    pub probes: u64,
    pub probes_held: u64,
    pub cpu_master_us: f64,
    pub cpu_backup_us: f64,
    pub lag_p50_ms: Option<f64>,
    pub lag_p99_ms: Option<f64>,
    pub lag_missed: usize,
    /// Sync datagrams the backup received (an nft counter).
    pub datagrams: u64,
    /// conntrack-syncd's own figures (Status of the master).
    pub records_per_datagram: Option<f64>,
    pub retransmit_pct: Option<f64>,
    pub daemon_lag_p50_ms: Option<f64>,
    pub daemon_lag_p99_ms: Option<f64>,
}

impl CapacityRun {
    pub fn achieved(&self) -> f64 {
        self.created as f64 / self.secs.max(1e-9)
    }

    pub fn lossless(&self) -> bool {
        self.probes > 0 && self.probes_held == self.probes && self.create_errors == 0
    }
}

/// Raises the calling thread's scheduling priority (niceness is per
/// thread on Linux): the load generator and the lag poller stand for the
/// kernel's own work and the clock, which other processes on a shared
/// machine must not delay.
fn favour_this_thread() {
    // SAFETY: setpriority on the calling thread (its tid).
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, -15);
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Option<f64> {
    let i = ((sorted.len() as f64 * p).ceil() as usize).checked_sub(1)?;
    sorted.get(i).map(|d| d.as_secs_f64() * 1000.0)
}

/// `rate` new entries a second for `secs` on the master, in a fresh lab.
pub fn capacity_run(peer: Peer, rate: u64, secs: u64) -> CapacityRun {
    let bench = Bench::new(peer);
    let lab = &bench.lab;
    lab.node("lb2")
        .ns
        .exec(
            "nft",
            &["add table inet bench; add chain inet bench in { type filter hook input priority 0; }; add rule inet bench in ip saddr 192.168.100.1 udp dport 3780 counter"],
        )
        .expect("datagram counter");
    let before = bench.sync_status("lb1");
    let (pm, pb) = (bench.pid("lb1"), bench.pid("lb2"));
    let (cm0, cb0) = (cpu_seconds(pm), cpu_seconds(pb));

    // The lag poller, in the backup's namespace.
    let (to_poller, timed) = mpsc::channel::<(Tuple, Instant)>();
    let done = Arc::new(AtomicBool::new(false));
    let poller_done = done.clone();
    let poller = lab
        .node("lb2")
        .ns
        .spawn_thread(move || {
            favour_this_thread();
            let mut ct = Conntrack::open().expect("ctnetlink in the backup");
            let mut pending: std::collections::VecDeque<(Tuple, Instant)> =
                std::collections::VecDeque::new();
            let (mut lags, mut missed) = (Vec::new(), 0usize);
            loop {
                while let Ok(p) = timed.try_recv() {
                    pending.push_back(p);
                }
                // Entries reach the backup in order: look for the oldest
                // one only, and for the next ones once it is there (a
                // poller that asked for every pending entry each round
                // would take the CPU it measures the lack of).
                while let Some((t, t0)) = pending.front() {
                    if matches!(ct.get(t), Ok(Some(_))) {
                        lags.push(t0.elapsed());
                    } else if t0.elapsed() > Duration::from_secs(5) {
                        missed += 1;
                    } else {
                        break;
                    }
                    pending.pop_front();
                }
                if poller_done.load(Ordering::Relaxed) && pending.is_empty() {
                    return (lags, missed);
                }
                std::thread::sleep(Duration::from_micros(500));
            }
        })
        .expect("poller thread");

    // The generator, in the master's namespace.
    let generator = lab
        .node("lb1")
        .ns
        .spawn_thread(move || {
            favour_this_thread();
            let mut ct = Conntrack::open().expect("ctnetlink in the master");
            let start = Instant::now();
            let span = Duration::from_secs(secs);
            let (mut n, mut errors) = (0u64, 0u64);
            while start.elapsed() < span {
                let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
                if n >= due {
                    std::thread::sleep(Duration::from_micros(200));
                    continue;
                }
                let k = (due - n).min(256);
                let entries: Vec<Entry> = (n..n + k).map(entry).collect();
                for (i, r) in (n..n + k).zip(ct.create_many(&entries, CreateOptions::default())) {
                    if r.is_err() {
                        errors += 1;
                    } else if i.is_multiple_of(LAG_EVERY) {
                        let _ = to_poller.send((entry(i).original, Instant::now()));
                    }
                }
                n += k;
            }
            (n, errors, start.elapsed())
        })
        .expect("generator thread");
    let (created, create_errors, took) =
        generator.join().expect("generator").expect("master netns");
    // Let the backup catch up, then count the probes it holds.
    let probes: HashSet<Tuple> = (0..created)
        .step_by(PROBE_EVERY as usize)
        .map(|i| entry(i).original)
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut held = 0;
    let mut last_change = Instant::now();
    while Instant::now() < deadline {
        let on_backup = lab.vip_tuples("lb2");
        let now_held = probes.iter().filter(|t| on_backup.contains(t)).count() as u64;
        if now_held != held {
            held = now_held;
            last_change = Instant::now();
        }
        if held == probes.len() as u64 || last_change.elapsed() > Duration::from_secs(3) {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    done.store(true, Ordering::Relaxed);
    let (mut lags, lag_missed) = poller.join().expect("poller").expect("backup netns");
    lags.sort();
    let (cm, cb) = (cpu_seconds(pm) - cm0, cpu_seconds(pb) - cb0);
    let datagrams = nft_packets(
        &lab.node("lb2").ns,
        &["list", "table", "inet", "bench"],
        false,
    );
    let mut run = CapacityRun {
        offered: rate,
        secs: took.as_secs_f64(),
        created,
        create_errors,
        probes: probes.len() as u64,
        probes_held: held,
        cpu_master_us: cm * 1e6 / created.max(1) as f64,
        cpu_backup_us: cb * 1e6 / created.max(1) as f64,
        lag_p50_ms: percentile(&lags, 0.5),
        lag_p99_ms: percentile(&lags, 0.99),
        lag_missed,
        datagrams,
        ..CapacityRun::default()
    };
    if let (Some(b), Some(a)) = (before, bench.sync_status("lb1")) {
        let records = a.records_sent - b.records_sent;
        let data = a.data_datagrams_sent - b.data_datagrams_sent;
        let sent = a.datagrams_sent - b.datagrams_sent;
        run.records_per_datagram = Some(records as f64 / data.max(1) as f64);
        run.retransmit_pct =
            Some(100.0 * (a.retransmissions - b.retransmissions) as f64 / sent.max(1) as f64);
        run.daemon_lag_p50_ms = Some(a.lag_p50_ms);
        run.daemon_lag_p99_ms = Some(a.lag_p99_ms);
    }
    if std::env::var_os("TANDEM_BENCH_KEEP_LOGS").is_some() {
        eprintln!(
            "  master {:?}\n  backup {:?}",
            bench.sync_status("lb1"),
            bench.sync_status("lb2")
        );
        eprintln!("  logs kept in {}", bench.dir.keep().display());
    }
    eprintln!(
        "  {} at {rate}/s: {created} created in {:.1} s ({:.0}/s), probes {held}/{}, lag p50 {:?} p99 {:?} ms, CPU µs/entry {:.1} / {:.1}",
        peer.name(),
        run.secs,
        run.achieved(),
        run.probes,
        run.lag_p50_ms,
        run.lag_p99_ms,
        run.cpu_master_us,
        run.cpu_backup_us
    );
    run
}

/// New TCP connections a second through the VIP (each reads the backend's
/// greeting, then is reset), from `threads` client threads for `secs`.
pub fn connection_rate(peer: Peer, threads: usize, secs: u64, split: bool) -> (f64, f64, f64) {
    let bench = Bench::new(peer);
    let lab = &bench.lab;
    let _cores = split.then(|| SplitCores::new(&bench));
    let pids: Vec<i32> = if peer == Peer::NoSync {
        Vec::new()
    } else if peer == Peer::EventSink {
        vec![bench.pid("lb1")]
    } else {
        vec![bench.pid("lb1"), bench.pid("lb2")]
    };
    let cpu0: Vec<f64> = pids.iter().map(|p| cpu_seconds(*p)).collect();
    let stop = Instant::now() + Duration::from_secs(secs);
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            lab.client
                .spawn_thread(move || {
                    let dst = SocketAddr::new(VIP.parse().expect("VIP"), 80);
                    let mut n = 0u64;
                    let mut i = t;
                    while Instant::now() < stop {
                        i += threads;
                        let src = SocketAddr::new(IpAddr::from([10, 0, 0, 50 + (i % 8) as u8]), 0);
                        let Ok(s) = socket2::Socket::new(
                            socket2::Domain::IPV4,
                            socket2::Type::STREAM,
                            None,
                        ) else {
                            continue;
                        };
                        let _ = s.set_linger(Some(Duration::ZERO));
                        if s.bind(&src.into()).is_err()
                            || s.connect_timeout(&dst.into(), Duration::from_secs(1))
                                .is_err()
                        {
                            continue;
                        }
                        let s: std::net::TcpStream = s.into();
                        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                        let mut line = String::new();
                        if BufReader::new(&s).read_line(&mut line).is_ok() && !line.is_empty() {
                            n += 1;
                        }
                    }
                    n
                })
                .expect("client thread")
        })
        .collect();
    let total: u64 = workers
        .into_iter()
        .map(|w| w.join().ok().and_then(Result::ok).unwrap_or(0))
        .sum();
    let rate = total as f64 / secs as f64;
    let cpu: Vec<f64> = pids
        .iter()
        .zip(&cpu0)
        .map(|(p, c0)| (cpu_seconds(*p) - c0) * 1e6 / total.max(1) as f64)
        .collect();
    eprintln!(
        "  {}: {rate:.0} new connections/s, sync CPU µs per connection {:?}",
        peer.name(),
        cpu
    );
    (
        rate,
        cpu.first().copied().unwrap_or(0.0),
        cpu.get(1).copied().unwrap_or(0.0),
    )
}

/// The backup's daemons on CPU 1, this process (client, backends) and the
/// master's daemons on CPU 0, until dropped (this process gets its CPUs
/// back; the daemons end with their lab).
struct SplitCores {
    before: nix::sched::CpuSet,
}

impl SplitCores {
    fn new(bench: &Bench) -> SplitCores {
        let me = nix::unistd::Pid::from_raw(0);
        let before = nix::sched::sched_getaffinity(me).expect("this process's CPUs");
        let only = |cpu: usize| {
            let mut set = nix::sched::CpuSet::new();
            set.set(cpu).expect("a CPU number below the count");
            set
        };
        pin(std::process::id() as i32, &only(0));
        for (node, cpu) in [("lb1", 0), ("lb2", 1)] {
            for (_, child) in &bench.lab.node(node).daemons {
                pin(child.pid().as_raw(), &only(cpu));
            }
        }
        SplitCores { before }
    }
}

impl Drop for SplitCores {
    fn drop(&mut self) {
        pin(std::process::id() as i32, &self.before);
    }
}

/// Sets the CPU affinity of every thread of `pid`.
fn pin(pid: i32, set: &nix::sched::CpuSet) {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the process's threads");
    for tid in tasks
        .flatten()
        .filter_map(|t| t.file_name().to_str()?.parse().ok())
    {
        // A thread that ended meanwhile has nothing to pin.
        match nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), set) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => panic!("setting the CPUs of thread {tid} of process {pid}: {e}"),
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct BurstRun {
    pub flows: usize,
    pub on_master: usize,
    pub held: usize,
    pub rss_master_kb: u64,
    pub rss_backup_kb: u64,
    pub cpu_master_us: f64,
    pub cpu_backup_us: f64,
    pub datagrams: u64,
    pub records_per_datagram: Option<f64>,
    pub retransmit_pct: Option<f64>,
    pub lag_p50_ms: Option<f64>,
    pub lag_p99_ms: Option<f64>,
    pub peer_dead_lines: usize,
}

/// The burst: `flows` SYNs through the VIP over `over` (each flow
/// half-open on the balancer: a new and an update), then 2 s; how much of
/// the master's table the backup holds then, peak memory, CPU per flow.
pub fn burst_run(peer: Peer, flows: usize, over: Duration) -> BurstRun {
    let bench = Bench::new(peer);
    let lab = &bench.lab;
    lab.node("lb2")
        .ns
        .exec(
            "nft",
            &["add table inet bench; add chain inet bench in { type filter hook input priority 0; }; add rule inet bench in ip saddr 192.168.100.1 udp dport 3780 counter"],
        )
        .expect("datagram counter");
    let before = bench.sync_status("lb1");
    let (pm, pb) = (bench.pid("lb1"), bench.pid("lb2"));
    let (cm0, cb0) = (cpu_seconds(pm), cpu_seconds(pb));
    let sent = tandem_e2e::conntrack_lab::syn_burst(&lab.client, flows, over);
    let ended = Instant::now();
    std::thread::sleep(Duration::from_secs(2).saturating_sub(ended.elapsed()));
    let master = lab.vip_tuples("lb1");
    let backup = lab.vip_tuples("lb2");
    let held = master.iter().filter(|t| backup.contains(t)).count();
    let (cm, cb) = (cpu_seconds(pm) - cm0, cpu_seconds(pb) - cb0);
    let datagrams = nft_packets(
        &lab.node("lb2").ns,
        &["list", "table", "inet", "bench"],
        false,
    );
    let mut run = BurstRun {
        flows: sent.len(),
        on_master: master.len(),
        held,
        rss_master_kb: tandem_e2e::conntrack_lab::peak_rss_kb(pm),
        rss_backup_kb: tandem_e2e::conntrack_lab::peak_rss_kb(pb),
        cpu_master_us: cm * 1e6 / sent.len().max(1) as f64,
        cpu_backup_us: cb * 1e6 / sent.len().max(1) as f64,
        datagrams,
        ..BurstRun::default()
    };
    if let (Some(b), Some(a)) = (before, bench.sync_status("lb1")) {
        let records = a.records_sent - b.records_sent;
        let data = a.data_datagrams_sent - b.data_datagrams_sent;
        let all = a.datagrams_sent - b.datagrams_sent;
        run.records_per_datagram = Some(records as f64 / data.max(1) as f64);
        run.retransmit_pct =
            Some(100.0 * (a.retransmissions - b.retransmissions) as f64 / all.max(1) as f64);
        run.lag_p50_ms = Some(a.lag_p50_ms);
        run.lag_p99_ms = Some(a.lag_p99_ms);
    }
    for node in ["lb1", "lb2"] {
        let log = std::fs::read_to_string(
            bench
                .dir
                .path()
                .join(format!("{node}-{}.log", peer.daemon())),
        )
        .unwrap_or_default();
        run.peer_dead_lines += log.lines().filter(|l| l.contains(" dead: ")).count();
    }
    eprintln!(
        "  {}: {} SYNs, master {} flows, backup holds {held} 2 s after; RSS {} / {} kB",
        peer.name(),
        run.flows,
        run.on_master,
        run.rss_master_kb,
        run.rss_backup_kb
    );
    if std::env::var_os("TANDEM_BENCH_KEEP_LOGS").is_some() {
        eprintln!("  logs kept in {}", bench.dir.keep().display());
    }
    run
}
