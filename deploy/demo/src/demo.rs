//! Tandem's main job, in network namespaces on this machine: two standalone
//! Tandem nodes (all five daemons and an OpenSSH sshd each), two backends
//! and a client; `tandemctl cluster create` joins them; the client holds
//! long-lived connections and sends a stream of new requests through the
//! VIP; the master crashes; and the demo prints what an operator wants to
//! see. Everything it creates is removed when it ends (also on Ctrl-C: the
//! lab's names carry this process's pid, and the next lab sweeps leftovers).

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use comfy_table::{Table, presets};
use nix::sys::signal::Signal;
use tandem_e2e::cluster_lab::{ClusterLifecycleLab, ROOT_PASSWORD, VIP, text};
use tandem_e2e::conntrack_lab::echo;

/// `tandemctl cluster nodes` as the operator sees it on `node`.
fn nodes(lab: &ClusterLifecycleLab, node: &str) -> String {
    let out = lab.tandemctl(node, &["cluster", "nodes"], "");
    format!("{}{}", text(&out.stdout), text(&out.stderr))
}

/// One request: when it started (since the demo's start), whether it was
/// answered, how long it took.
type Request = (Duration, bool, Duration);

/// New requests through the VIP, one after another, until told to stop:
/// connect, read the backend's greeting, one line echoed, close.
struct Traffic {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Result<Vec<Request>, tandem_lab::LabError>>,
}

fn start_traffic(lab: &ClusterLifecycleLab, started: Instant) -> Traffic {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let handle = lab
        .client
        .spawn_thread(move || {
            let dst: SocketAddr = format!("{VIP}:80").parse().expect("dst");
            let mut log = Vec::new();
            let mut i = 0usize;
            while !s.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                let ok = (|| {
                    let stream = TcpStream::connect_timeout(&dst, Duration::from_secs(3)).ok()?;
                    stream.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
                    let mut greeting = String::new();
                    std::io::BufRead::read_line(
                        &mut std::io::BufReader::new(stream.try_clone().ok()?),
                        &mut greeting,
                    )
                    .ok()?;
                    echo(&stream, &format!("request {i}"))
                })()
                .is_some();
                log.push((t0.duration_since(started), ok, t0.elapsed()));
                i += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            log
        })
        .expect("client thread");
    Traffic { stop, handle }
}

/// `n` connections to the VIP from the client, each greeted by its backend.
fn connect_many(lab: &ClusterLifecycleLab, n: usize) -> Vec<TcpStream> {
    lab.client
        .run(move || {
            let dst: SocketAddr = format!("{VIP}:80").parse().expect("dst");
            (0..n)
                .map(|_| {
                    let s = TcpStream::connect_timeout(&dst, Duration::from_secs(2))?;
                    s.set_read_timeout(Some(Duration::from_secs(3)))?;
                    s.set_nodelay(true)?;
                    let mut name = String::new();
                    std::io::BufRead::read_line(
                        &mut std::io::BufReader::new(s.try_clone()?),
                        &mut name,
                    )?;
                    Ok(s)
                })
                .collect::<std::io::Result<Vec<_>>>()
        })
        .expect("client thread")
        .expect("connections to the VIP")
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
    t0.elapsed()
}

fn main() {
    println!("Tandem demo: two Tandem nodes in network namespaces on this machine.");
    println!(
        "  client 10.0.0.50 --- LAN --- lb1 / lb2 --- back --- backends b1, b2 (10.1.0.11-12:8080)"
    );
    println!(
        "  cluster link 192.168.100.0/24 (lb1 .1, lb2 .2); each node runs vrrpd, lb-forwarder,"
    );
    println!("  conntrack-syncd, cfg-syncd, clustermanager and an OpenSSH sshd.");
    println!(
        "  lb1 serves farm `web` (TCP {VIP}:80, SNAT 10.1.0.100) standalone; lb2 has its own config.\n"
    );
    let mut lab = ClusterLifecycleLab::new();
    println!("lab {}: both nodes up, standalone.\n", lab.lab.id());

    println!(
        "$ tandemctl cluster create --local-ip 192.168.100.1 --remote-ip 192.168.100.2 --host-key {} --yes --password-stdin   (on lb1; the fingerprint checked on lb2)",
        lab.host_key_fingerprint("lb2")
    );
    let out = lab.create(ROOT_PASSWORD);
    print!("{}", text(&out.stdout));
    if !out.status.success() {
        eprintln!("{}", text(&out.stderr));
        panic!("cluster create failed");
    }
    wait_for("lb2 to be backup", Duration::from_secs(15), || {
        lab.vrrp_state("lb2") == tandem_proto::v1::VrrpState::Backup
            && lab.conntrack_status("lb2").peer_alive
    });
    println!(
        "\n$ tandemctl cluster edit --check-interval 100   (on lb1: VRRP adverts every 100 ms, replicated to lb2)"
    );
    let out = lab.tandemctl("lb1", &["cluster", "edit", "--check-interval", "100"], "");
    print!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "cluster edit failed");
    wait_for("both nodes green", Duration::from_secs(20), || {
        let table = nodes(&lab, "lb1");
        lab.vrrp_state("lb2") == tandem_proto::v1::VrrpState::Backup
            && table.matches("green operational").count() == 2
            && !table.contains("unreachable")
    });
    println!(
        "\n$ tandemctl cluster nodes   (on lb1)\n{}",
        nodes(&lab, "lb1")
    );

    const LONG_LIVED: usize = 100;
    let mut conns = connect_many(&lab, LONG_LIVED);
    for (i, s) in conns.iter_mut().enumerate() {
        echo(s, &format!("hello {i}")).expect("long-lived connection");
    }
    let started = Instant::now();
    let traffic = start_traffic(&lab, started);
    std::thread::sleep(Duration::from_secs(1));
    println!(
        "{LONG_LIVED} long-lived connections open through the VIP, and a client sending a new request every 5 ms."
    );

    println!("\nCrashing the master lb1: kill -9 of every daemon and sshd, all its links down ...");
    for (_, d) in &mut lab.lb1.daemons {
        let _ = d.kill(Signal::SIGKILL);
    }
    if let Some(sshd) = &mut lab.lb1.sshd {
        let _ = sshd.kill(Signal::SIGKILL);
    }
    for ifname in ["eth0", "eth1", "eth2"] {
        lab.lb1.ns.set_link(ifname, false).expect("link down");
    }
    // From here on lb1 neither forwards nor advertises.
    let crash = started.elapsed();
    let takeover = wait_for("lb2 to take the VIP", Duration::from_secs(10), || {
        lab.lb2.holds("eth0", VIP)
    });
    std::thread::sleep(Duration::from_secs(2));
    traffic.stop.store(true, Ordering::Relaxed);
    let log = traffic
        .handle
        .join()
        .expect("traffic thread")
        .expect("traffic");

    let survived = conns
        .iter_mut()
        .enumerate()
        .filter(|(i, s)| echo(s, &format!("after the crash {i}")).is_some())
        .count();
    let failed = log.iter().filter(|(_, ok, _)| !ok).count();
    let first_after = log
        .iter()
        .filter(|(at, ok, _)| *ok && *at >= crash)
        .map(|(at, _, took)| *at + *took - crash)
        .min();
    let slowest = log
        .iter()
        .filter(|(_, ok, _)| *ok)
        .map(|(_, _, took)| *took)
        .max()
        .unwrap_or_default();

    println!("\nWhat happened:");
    let mut t = Table::new();
    t.load_style(presets::UTF8_FULL_CONDENSED);
    t.add_row([
        "failover: crash to VIP on lb2".to_owned(),
        format!("{} ms", takeover.as_millis()),
    ]);
    t.add_row([
        "crash to the first new request completed (a SYN lost in the takeover is resent after 1 s)"
            .to_owned(),
        first_after.map_or("-".into(), |d| format!("{} ms", d.as_millis())),
    ]);
    t.add_row([
        "long-lived connections that continued (bytes intact)".to_owned(),
        format!("{survived} of {LONG_LIVED}"),
    ]);
    t.add_row([
        "new requests sent / failed (one opened in the last instant before the crash can fail: its state had not reached lb2)".to_owned(),
        format!("{} / {failed}", log.len()),
    ]);
    t.add_row([
        "slowest request (waited out the takeover)".to_owned(),
        format!("{} ms", slowest.as_millis()),
    ]);
    println!("{t}");
    // The node table needs a few seconds to call the dead peer unreachable.
    std::thread::sleep(Duration::from_secs(3));
    println!(
        "\n$ tandemctl cluster nodes   (on lb2)\n{}",
        nodes(&lab, "lb2")
    );
    drop(conns);
    drop(lab);
    println!("Lab torn down: namespaces, veths, bridges, sshds and daemons removed.");
}
