//! Throughput through a VIP for the datapaths in the same lab, measured
//! at the same moment: Tandem (lb-forwarder's nftables table) with a
//! round-robin farm, a persistent farm (`persistence_timeout_s`: every new
//! connection of a client looked up and recorded in the persistence map)
//! and a Maglev (`mh`) farm, each on its own VIP; a hand-written minimal
//! nftables DNAT rule — the ceiling — on another, and HAProxy in TCP mode
//! on a fifth; same client, same three backends. All five are driven at
//! once in each round, so the background load of the machine weighs on
//! every side of a ratio alike. Then the time to apply a change to a farm
//! of 1,000 backends. Prints tables.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use comfy_table::{Table, presets};
use lb_forwarder::ruleset::{self, Inputs};
use tandem_e2e::forwarder_lab::{FwdLab, LabOptions, extra_source};
use tandem_lab::LabError;

const RUN: Duration = Duration::from_secs(2);
const THREADS: usize = 2;

/// A round-robin farm `name` on `vip`:80 over the three backends, with
/// `extra` top-level lines.
fn farm(name: &str, vip: &str, extra: &str) -> String {
    format!(
        "name = \"{name}\"\nvip = \"{vip}\"\nport = 80\nscheduler = \"rr\"\nsnat_address = \"10.1.0.100\"\n{extra}\n\
         [health_check]\nkind = \"none\"\n\
         [[backends]]\naddress = \"10.1.0.11\"\nport = 8080\n\
         [[backends]]\naddress = \"10.1.0.12\"\nport = 8080\n\
         [[backends]]\naddress = \"10.1.0.13\"\nport = 8080\n"
    )
}

/// The datapaths: name, VIP.
const DATAPATHS: [(&str, &str); 5] = [
    ("Tandem rr (lb-forwarder nftables)", "10.0.0.100"),
    ("Tandem rr + persistence 300 s", "10.0.0.103"),
    ("Tandem mh (Maglev)", "10.0.0.104"),
    ("minimal nftables DNAT (ceiling)", "10.0.0.101"),
    ("HAProxy 2.6 TCP mode", "10.0.0.102"),
];
const CEIL: usize = 3;

const CEILING: &str = "table ip bench {
  chain pre {
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr 10.0.0.101 tcp dport 80 dnat to numgen inc mod 3 map { 0 : 10.1.0.11 . 8080, 1 : 10.1.0.12 . 8080, 2 : 10.1.0.13 . 8080 }
  }
  chain post {
    type nat hook postrouting priority srcnat; policy accept;
    ct original ip daddr 10.0.0.101 ct status dnat snat to 10.1.0.100
  }
}
";

const HAPROXY: &str = "global
  maxconn 8000
  nbthread 2
defaults
  mode tcp
  timeout connect 2s
  timeout client 30s
  timeout server 30s
frontend vip
  bind 10.0.0.102:80
  default_backend web
backend web
  balance roundrobin
  source 10.1.0.100
  server b1 10.1.0.11:8080
  server b2 10.1.0.12:8080
  server b3 10.1.0.13:8080
";

fn connect(src: SocketAddr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    // Close with RST: no TIME_WAIT, so ports and conntrack entries recycle.
    s.set_linger(Some(Duration::ZERO))?;
    s.bind(&src.into())?;
    s.connect_timeout(&dst.into(), Duration::from_secs(1))?;
    Ok(s.into())
}

type Counting = Vec<JoinHandle<Result<u64, LabError>>>;

/// Starts measuring new connections per second to `vip`: connect, read the
/// backend's name, reset; from client addresses `first_source`.. of the
/// lab's extra sources, so no datapath meets another's conntrack entries.
fn new_connections(lab: &FwdLab, vip: &str, first_source: usize) -> Counting {
    let dst: SocketAddr = format!("{vip}:80").parse().expect("addr");
    (0..THREADS)
        .map(|t| {
            let src: SocketAddr = format!("{}:0", extra_source(first_source + t))
                .parse()
                .expect("addr");
            lab.client
                .spawn_thread(move || {
                    let deadline = Instant::now() + RUN;
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        if let Ok(s) = connect(src, dst) {
                            let mut line = String::new();
                            if BufReader::new(s).read_line(&mut line).is_ok() && !line.is_empty() {
                                n += 1;
                            }
                        }
                    }
                    n
                })
                .expect("client thread")
        })
        .collect()
}

/// Starts measuring requests per second on established connections to
/// `vip`: a line out, its echo back.
fn requests(lab: &FwdLab, vip: &str, first_source: usize) -> Counting {
    let dst: SocketAddr = format!("{vip}:80").parse().expect("addr");
    (0..THREADS)
        .map(|t| {
            let src: SocketAddr = format!("{}:0", extra_source(first_source + t))
                .parse()
                .expect("addr");
            lab.client
                .spawn_thread(move || {
                    let Ok(mut s) = connect(src, dst) else {
                        return 0;
                    };
                    let _ = s.set_nodelay(true);
                    let Ok(r) = s.try_clone() else { return 0 };
                    let mut r = BufReader::new(r);
                    let mut line = String::new();
                    let _ = r.read_line(&mut line);
                    let deadline = Instant::now() + RUN;
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        line.clear();
                        if s.write_all(b"ping\n").is_err()
                            || r.read_line(&mut line).is_err()
                            || line.is_empty()
                        {
                            break;
                        }
                        n += 1;
                    }
                    n
                })
                .expect("client thread")
        })
        .collect()
}

/// Per second, once the threads are done.
fn rate(handles: Counting) -> f64 {
    let total: u64 = handles
        .into_iter()
        .map(|h| h.join().ok().and_then(Result::ok).unwrap_or(0))
        .sum();
    total as f64 / RUN.as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(3);
    let mut lab = FwdLab::with(
        &farm("web", "10.0.0.100", ""),
        LabOptions {
            extra_sources: 24,
            ..LabOptions::default()
        },
    );
    for a in ["10.0.0.101", "10.0.0.102", "10.0.0.103", "10.0.0.104"] {
        lab.lb
            .add_address("eth0", &format!("{a}/24"))
            .expect("VIP address");
    }
    // Tandem's three farms in one lb-forwarder.
    std::fs::write(
        lab.config.join("farms/sticky.toml"),
        farm("sticky", "10.0.0.103", "persistence_timeout_s = 300"),
    )
    .expect("farm file");
    std::fs::write(
        lab.config.join("farms/maglev.toml"),
        farm("maglev", "10.0.0.104", "hash_source_port = true")
            .replace("scheduler = \"rr\"", "scheduler = \"mh\""),
    )
    .expect("farm file");
    let reply = lab.rpc(async |mut c| {
        c.reload(tandem_proto::v1::ReloadRequest {})
            .await
            .expect("reload")
            .into_inner()
    });
    assert!(reply.applied, "{:?}", reply.errors);
    lab.wait_for(Duration::from_secs(10), "three farms", |s| {
        s.farms == 3 && s.datapath_loaded
    });
    let tmp = tempfile::tempdir().expect("tempdir");
    let haproxy_cfg = tmp.path().join("haproxy.cfg");
    std::fs::write(&haproxy_cfg, HAPROXY).expect("haproxy.cfg");
    let ceiling = tmp.path().join("ceiling.nft");
    std::fs::write(&ceiling, CEILING).expect("ceiling.nft");
    lab.lb
        .exec("nft", &["-f", &ceiling.to_string_lossy()])
        .expect("ceiling rule");
    let mut cmd = Command::new("haproxy");
    cmd.arg("-db").arg("-f").arg(&haproxy_cfg);
    let mut haproxy = lab.lab.spawn(&lab.lb, &mut cmd).expect("haproxy");
    lab.client
        .wait_tcp(
            "10.0.0.102:80".parse().expect("addr"),
            Duration::from_secs(5),
        )
        .expect("haproxy up");

    let mut results: Vec<(&str, Vec<f64>, Vec<f64>)> = DATAPATHS
        .iter()
        .map(|(name, _)| (*name, Vec::new(), Vec::new()))
        .collect();
    // Every datapath at once, new connections then requests; each ratio is
    // taken within a round and the table shows the median of those ratios.
    for round in 0..rounds {
        let conns: Vec<Counting> = DATAPATHS
            .iter()
            .enumerate()
            .map(|(i, (_, vip))| new_connections(&lab, vip, 2 * i))
            .collect();
        for (i, h) in conns.into_iter().enumerate() {
            results[i].1.push(rate(h));
        }
        let reqs: Vec<Counting> = DATAPATHS
            .iter()
            .enumerate()
            .map(|(i, (_, vip))| requests(&lab, vip, 12 + 2 * i))
            .collect();
        for (i, h) in reqs.into_iter().enumerate() {
            results[i].2.push(rate(h));
        }
        eprintln!("round {} done", round + 1);
    }
    let _ = haproxy.kill(nix::sys::signal::Signal::SIGTERM);
    let _ = haproxy.wait_timeout(Duration::from_secs(5));
    // The apply timings below own the table: lb-forwarder stops first.
    if let Some(mut f) = lab.fwd.take() {
        let _ = f.kill(nix::sys::signal::Signal::SIGTERM);
        let _ = f.wait_timeout(Duration::from_secs(5));
    }

    let ratio = |mine: &[f64], ceiling: &[f64]| {
        median(mine.iter().zip(ceiling).map(|(m, c)| m / c).collect())
    };
    let mut t = Table::new();
    t.load_style(presets::UTF8_FULL_CONDENSED);
    t.set_header([
        "datapath (same lab, same run)",
        "new connections/s",
        "vs ceiling",
        "requests/s",
        "vs ceiling",
    ]);
    for (name, conns, reqs) in &results {
        t.add_row([
            (*name).to_owned(),
            format!("{:.0}", median(conns.clone())),
            format!("{:.2}", ratio(conns, &results[CEIL].1)),
            format!("{:.0}", median(reqs.clone())),
            format!("{:.2}", ratio(reqs, &results[CEIL].2)),
        ]);
    }
    println!(
        "Throughput through each VIP, median of {rounds} rounds of {} s, the five datapaths driven at once (ratios: median of the per-round ratios), {THREADS} client threads each, 3 backends (thread per connection):",
        RUN.as_secs()
    );
    println!("{t}");

    // Applying a change to a farm of 1,000 backends: render + nft, in the
    // balancer's namespace, with a backend leaving each time.
    let mut big = String::from(
        "name = \"big\"\nvip = \"10.0.0.100\"\nport = 8443\nscheduler = \"wrr\"\nsnat_address = \"10.1.0.100\"\n[health_check]\nkind = \"none\"\n",
    );
    for i in 0..1000u32 {
        big.push_str(&format!(
            "[[backends]]\naddress = \"10.2.{}.{}\"\nport = 8080\n",
            i / 250,
            i % 250 + 1
        ));
    }
    let farm: tandem_config::Farm = toml::from_str(&big).expect("big farm");
    // As lb-forwarder does: a change of rotation (a backend failing its
    // check) rewrites only the farm chain; a configuration change replaces
    // the table, reading the counters first to carry them over.
    let (fast, edit, full) = lab
        .lb
        .run(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("rt");
            rt.block_on(async {
                let (mut fast, mut edit, mut full) = (Vec::new(), Vec::new(), Vec::new());
                let farms = std::slice::from_ref(&farm);
                let mut applied = ruleset::render_parts(farms, &Inputs::default());
                lb_forwarder::nft::apply(&applied.full(&HashMap::new()))
                    .await
                    .expect("apply the big farm");
                for i in 0..7usize {
                    let mut inputs = Inputs::default();
                    inputs
                        .failing
                        .insert(ruleset::BackendKey::of(&farm, &farm.backends[i]));
                    let started = Instant::now();
                    let parts = ruleset::render_parts(farms, &inputs);
                    lb_forwarder::nft::apply(&parts.update_from(&applied))
                        .await
                        .expect("fast update");
                    fast.push(started.elapsed().as_secs_f64() * 1000.0);
                    applied = parts;

                    // The farm file edited: backend i replaced by a new one.
                    let mut edited = farm.clone();
                    edited.backends[i].address = format!("10.3.0.{}", i + 1).parse().expect("addr");
                    let started = Instant::now();
                    let parts = ruleset::render_parts(std::slice::from_ref(&edited), &inputs);
                    assert!(parts.structure.updatable_from(&applied.structure));
                    lb_forwarder::nft::apply(&parts.update_from(&applied))
                        .await
                        .expect("in-place update");
                    edit.push(started.elapsed().as_secs_f64() * 1000.0);

                    // The farm moved to another port: the table is replaced.
                    let mut moved = edited.clone();
                    moved.port.first = 9000 + i as u16;
                    moved.port.last = moved.port.first;
                    let started = Instant::now();
                    let counters = lb_forwarder::nft::read_counters().await.unwrap_or_default();
                    let parts = ruleset::render_parts(std::slice::from_ref(&moved), &inputs);
                    lb_forwarder::nft::apply(&parts.full(&counters))
                        .await
                        .expect("full replace");
                    full.push(started.elapsed().as_secs_f64() * 1000.0);
                    // Back to the original farm for the next round.
                    let parts = ruleset::render_parts(farms, &Inputs::default());
                    lb_forwarder::nft::apply(&parts.full(&HashMap::new()))
                        .await
                        .expect("reset");
                    applied = parts;
                }
                (fast, edit, full)
            })
        })
        .expect("lb thread");
    let mut t = Table::new();
    t.load_style(presets::UTF8_FULL_CONDENSED);
    t.set_header([
        "apply a change to a farm of 1,000 backends",
        "median ms",
        "min ms",
        "max ms",
    ]);
    for (what, mut times) in [
        ("a backend leaves the rotation (farm chain rewritten)", fast),
        (
            "farm file edited: a backend replaced (updated in place)",
            edit,
        ),
        (
            "farm moved to another port (table replaced, counters carried)",
            full,
        ),
    ] {
        times.sort_by(f64::total_cmp);
        t.add_row([
            what.to_owned(),
            format!("{:.1}", times[times.len() / 2]),
            format!("{:.1}", times[0]),
            format!("{:.1}", times[times.len() - 1]),
        ]);
    }
    println!("{t}");
}
