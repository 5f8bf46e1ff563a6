//! Tandem's main job, in network namespaces on this machine: a two-node
//! cluster (vrrpd, lb-forwarder and conntrack-syncd on each node), three
//! backends behind a farm, a client with long-lived connections and a
//! stream of new requests through the VIP, a crash of the master, and what
//! an operator wants to see. Everything it creates is removed when it ends
//! (also on Ctrl-C: the lab's names carry this process's pid, and the next
//! lab sweeps leftovers).

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use comfy_table::{Table, presets};
use tandem_e2e::conntrack_lab::{ClusterLab, VIP, echo};
use tandem_proto::v1;

const LONG_LIVED: usize = 100;

fn nodes_table(lab: &ClusterLab, dead: Option<&str>) -> Table {
    let mut t = Table::new();
    t.load_style(presets::UTF8_FULL_CONDENSED);
    t.set_header([
        "NODE",
        "ROLE",
        "CLUSTER ADDRESS",
        "HOLDS VIP",
        "CONNTRACK SYNC",
        "FLOWS IN ITS TABLE",
        "MESSAGE",
    ]);
    for (i, node) in ["lb1", "lb2"].iter().enumerate() {
        let addr = format!("192.168.100.{}", i + 1);
        if dead == Some(*node) {
            t.add_row([
                (*node).to_owned(),
                "unreachable".into(),
                addr,
                "-".into(),
                "-".into(),
                "-".into(),
                "crashed: daemons killed, links down".into(),
            ]);
            continue;
        }
        let role = lab
            .vrrp_state(node)
            .as_str_name()
            .trim_start_matches("VRRP_STATE_")
            .to_lowercase();
        let sync = lab.conntrack_status(node);
        let sync_text = format!(
            "{}, {} sent / {} received",
            match sync.role() {
                v1::SyncRole::Sender => "sender",
                v1::SyncRole::Receiver => "receiver",
                _ => "idle",
            },
            sync.records_sent,
            sync.records_received
        );
        t.add_row([
            (*node).to_owned(),
            role,
            addr,
            if lab.holds_vip(node) { VIP } else { "-" }.to_owned(),
            sync_text,
            lab.vip_entries(node).to_string(),
            if sync.last_error.is_empty() {
                "operational".to_owned()
            } else {
                sync.last_error
            },
        ]);
    }
    t
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

fn start_traffic(lab: &ClusterLab, started: Instant) -> Traffic {
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
                    let src: SocketAddr = format!("10.0.0.{}:0", 50 + i % 8).parse().ok()?;
                    let sock =
                        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                            .ok()?;
                    sock.bind(&src.into()).ok()?;
                    sock.connect_timeout(&dst.into(), Duration::from_secs(3))
                        .ok()?;
                    let stream: TcpStream = sock.into();
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

fn main() {
    println!("Tandem demo: a two-node cluster in network namespaces on this machine.");
    println!(
        "  client 10.0.0.50-57 --- LAN --- lb1 / lb2 (VIP {VIP}) --- back --- backends b1-b3 (10.1.0.11-13)"
    );
    println!("  cluster link 192.168.100.0/24: VRRPv3 every 100 ms and conntrack replication");
    println!(
        "  farm `web`: TCP {VIP}:80 -> backends :8080, round robin, SNAT to the floating 10.1.0.100\n"
    );
    let mut lab = ClusterLab::new();
    lab.node("lb2")
        .ns
        .sysctl("net.netfilter.nf_conntrack_tcp_loose", "0")
        .expect("tcp_loose");
    println!(
        "lab {}: starting lb-forwarder, conntrack-syncd and vrrpd on both nodes ...",
        lab.lab.id()
    );
    lab.start_cluster(true);

    let mut conns = lab.connect_many(LONG_LIVED);
    for (i, (_, s)) in conns.iter_mut().enumerate() {
        echo(s, &format!("hello {i}")).expect("long-lived connection");
    }
    let started = Instant::now();
    let traffic = start_traffic(&lab, started);
    lab.wait_for(
        "the backup to hold every flow",
        Duration::from_secs(5),
        |l| l.vip_entries("lb2") >= LONG_LIVED,
    );
    std::thread::sleep(Duration::from_secs(1));
    println!(
        "\n{LONG_LIVED} long-lived connections open through the VIP, and a client sending a new request every 5 ms."
    );
    println!("\nNodes before the crash:\n{}", nodes_table(&lab, None));

    println!("\nCrashing the master lb1: kill -9 of every daemon, all its links down ...");
    lab.kill_node("lb1");
    // From here on lb1 neither forwards nor advertises.
    let crash = started.elapsed();
    let t0 = Instant::now();
    lab.wait_for("lb2 to take the VIP", Duration::from_secs(10), |l| {
        l.holds_vip("lb2")
    });
    let takeover = t0.elapsed();
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
        .filter(|(i, (_, s))| echo(s, &format!("after the crash {i}")).is_some())
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
        "new requests sent / failed".to_owned(),
        format!("{} / {failed}", log.len()),
    ]);
    t.add_row([
        "slowest request (waited out the takeover)".to_owned(),
        format!("{} ms", slowest.as_millis()),
    ]);
    println!("{t}");
    println!(
        "\nNodes after the crash:\n{}",
        nodes_table(&lab, Some("lb1"))
    );
    drop(conns);
    drop(lab);
    println!("\nLab torn down: namespaces, veths, bridges and processes removed.");
}
