//! Throughput through the VIP for the datapaths in the same lab and run:
//! Tandem (lb-forwarder's nftables table) with a round-robin farm, a
//! persistent farm (`persistence_timeout_s`, every connection of a client
//! looked up and refreshed in the persistence map) and a Maglev (`mh`)
//! farm; a hand-written minimal nftables DNAT rule — the ceiling — and
//! HAProxy in TCP mode; same client, same three backends. Then the time to
//! apply a change to a farm of 1,000 backends. Prints tables.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use comfy_table::{Table, presets};
use lb_forwarder::ruleset::{self, Inputs};
use tandem_e2e::forwarder_lab::{FwdLab, LabOptions, VIP, extra_source};

const RUN: Duration = Duration::from_secs(2);
const THREADS: usize = 2;

const FARM: &str = r#"
name = "web"
vip = "10.0.0.100"
port = 80
scheduler = "rr"
snat_address = "10.1.0.100"
[health_check]
kind = "none"
[[backends]]
address = "10.1.0.11"
port = 8080
[[backends]]
address = "10.1.0.12"
port = 8080
[[backends]]
address = "10.1.0.13"
port = 8080
"#;

/// The same farm, persistent: each client keeps its backend for 300 s.
fn persistent_farm() -> String {
    FARM.replace(
        "snat_address = \"10.1.0.100\"\n",
        "snat_address = \"10.1.0.100\"\npersistence_timeout_s = 300\n",
    )
}

/// The same farm with Maglev hashing of the source address and port (so
/// the two client threads spread over the backends).
fn mh_farm() -> String {
    FARM.replace(
        "scheduler = \"rr\"",
        "scheduler = \"mh\"\nhash_source_port = true",
    )
}

const CEILING: &str = "table ip bench {
  chain pre {
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr 10.0.0.100 tcp dport 80 dnat to numgen inc mod 3 map { 0 : 10.1.0.11 . 8080, 1 : 10.1.0.12 . 8080, 2 : 10.1.0.13 . 8080 }
  }
  chain post {
    type nat hook postrouting priority srcnat; policy accept;
    ip daddr 10.1.0.0/24 tcp dport 8080 ct status dnat snat to 10.1.0.100
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
  bind 10.0.0.100:80
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

/// New connections per second: connect, read the backend's name, reset.
/// Each datapath uses its own client addresses (`first_source`.. of the
/// lab's extra sources), so no run meets the conntrack entries an earlier
/// one left behind.
fn new_connections(lab: &FwdLab, first_source: usize) -> f64 {
    let dst: SocketAddr = format!("{VIP}:80").parse().expect("addr");
    let handles: Vec<_> = (0..THREADS)
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
        .collect();
    let total: u64 = handles
        .into_iter()
        .map(|h| h.join().ok().and_then(Result::ok).unwrap_or(0))
        .sum();
    total as f64 / RUN.as_secs_f64()
}

/// Requests per second on established connections: a line out, its echo back.
fn requests(lab: &FwdLab) -> f64 {
    let dst: SocketAddr = format!("{VIP}:80").parse().expect("addr");
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let src: SocketAddr = format!("10.0.0.{}:0", 56 + t).parse().expect("addr");
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
        .collect();
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
        FARM,
        LabOptions {
            extra_sources: 16,
            ..LabOptions::default()
        },
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let haproxy_cfg = tmp.path().join("haproxy.cfg");
    std::fs::write(&haproxy_cfg, HAPROXY).expect("haproxy.cfg");
    let ceiling = tmp.path().join("ceiling.nft");
    std::fs::write(&ceiling, CEILING).expect("ceiling.nft");
    let ceiling = ceiling.to_string_lossy().into_owned();

    let mut results: Vec<(&str, Vec<f64>, Vec<f64>)> = vec![
        ("Tandem rr (lb-forwarder nftables)", vec![], vec![]),
        ("Tandem rr + persistence 300 s", vec![], vec![]),
        ("Tandem mh (Maglev)", vec![], vec![]),
        ("minimal nftables DNAT (ceiling)", vec![], vec![]),
        ("HAProxy 2.6 TCP mode", vec![], vec![]),
    ];
    const CEIL: usize = 3;
    let farms = [FARM.to_owned(), persistent_farm(), mh_farm()];
    // The order alternates (Tandem's three, ceiling, HAProxy; then the
    // reverse), so each Tandem farm and the ceiling are measured close
    // together; each ratio is taken within a round, and the table shows the
    // median of those ratios. Background load on the machine then shifts
    // both sides of a ratio alike. Each datapath uses its own client
    // addresses, so no run meets the conntrack entries an earlier one left.
    for round in 0..rounds {
        let order: [usize; 5] = if round % 2 == 0 {
            [0, 1, 2, 3, 4]
        } else {
            [4, 3, 2, 1, 0]
        };
        for which in order {
            let (conns, reqs) = match which {
                // Tandem: lb-forwarder owns the datapath.
                0..=2 => {
                    std::fs::write(lab.config.join("farms/web.toml"), &farms[which])
                        .expect("farm file");
                    if let Some(mut f) = lab.fwd.take() {
                        let _ = f.kill(nix::sys::signal::Signal::SIGTERM);
                        let _ = f.wait_timeout(Duration::from_secs(5));
                    }
                    lab.start();
                    let m = (new_connections(&lab, 2 * which), requests(&lab));
                    if let Some(mut f) = lab.fwd.take() {
                        let _ = f.kill(nix::sys::signal::Signal::SIGTERM);
                        let _ = f.wait_timeout(Duration::from_secs(5));
                    }
                    lab.lb
                        .exec("nft", &["delete", "table", "inet", "tandem"])
                        .expect("remove tandem table");
                    m
                }
                // The ceiling: one hand-written rule.
                CEIL => {
                    lab.lb.exec("nft", &["-f", &ceiling]).expect("ceiling rule");
                    let m = (new_connections(&lab, 6), requests(&lab));
                    lab.lb
                        .exec("nft", &["delete", "table", "ip", "bench"])
                        .expect("remove ceiling");
                    m
                }
                // HAProxy on the VIP, same backends, same SNAT source.
                _ => {
                    let mut cmd = Command::new("haproxy");
                    cmd.arg("-db").arg("-f").arg(&haproxy_cfg);
                    let mut haproxy = lab.lab.spawn(&lab.lb, &mut cmd).expect("haproxy");
                    lab.client
                        .wait_tcp(
                            format!("{VIP}:80").parse().expect("addr"),
                            Duration::from_secs(5),
                        )
                        .expect("haproxy up");
                    let m = (new_connections(&lab, 8), requests(&lab));
                    let _ = haproxy.kill(nix::sys::signal::Signal::SIGTERM);
                    let _ = haproxy.wait_timeout(Duration::from_secs(5));
                    m
                }
            };
            results[which].1.push(conns);
            results[which].2.push(reqs);
        }
        eprintln!("round {} done", round + 1);
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
        "Throughput through the VIP, median of {rounds} rounds of {} s (ratios: median of the per-round ratios), {THREADS} client threads, 3 backends (thread per connection):",
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
