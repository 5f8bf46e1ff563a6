//! Active-active figures, in the lab of `tests/scaleout_lab.rs` (a BIRD
//! router with kernel ECMP and the L4 hash, three Tandem nodes each with
//! lb-forwarder, routed and BIRD, DSR backends):
//!
//! - how new connections split over the nodes;
//! - a node crash (cables pulled, daemons and BIRD SIGKILLed): when the
//!   router stopped using it (BFD detection), when the last long-lived flow
//!   it carried was moving again through another node, and how many of 100
//!   long-lived flows survived;
//! - CPU of a node's daemons (lb-forwarder, routed, BIRD) per second and
//!   per connection carried, when one node carries everything (what the
//!   pair's master does) and when three share the load; and the machine's
//!   kernel CPU per connection in both phases (machine-wide: the datapath's
//!   softirq work cannot be told apart per namespace on one machine, and
//!   any other load on the machine is included).
//!
//! Usage: tandem-bench-scaleout [RUNS] (default 3)

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use comfy_table::{Table, presets};
use tandem_e2e::scaleout_lab::*;

const FLOWS: usize = 100;
/// How long each CPU phase makes connections, one after the other.
const PHASE: Duration = Duration::from_secs(8);

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // The command name may hold spaces: fields start after its ')'.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3, utime 14, stime 15 (1-based in proc(5)).
    let utime: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
    let stime: u64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    utime + stime
}

/// The machine's system + irq + softirq time, in clock ticks.
fn kernel_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or_default();
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq
    f.get(2).copied().unwrap_or(0) + f.get(5).copied().unwrap_or(0) + f.get(6).copied().unwrap_or(0)
}

fn tick_ms() -> f64 {
    // SAFETY: sysconf reads a constant of the running system.
    let hz = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) };
    1000.0 / if hz > 0 { hz as f64 } else { 100.0 }
}

fn node_ticks(lab: &ScaleLab, i: usize) -> u64 {
    let n = &lab.nodes[i];
    [&n.forwarder, &n.routed, &n.bird]
        .into_iter()
        .flatten()
        .map(|c| cpu_ticks(c.pid().as_raw()))
        .sum()
}

struct CpuPhase {
    /// Connections made in the phase.
    connections: usize,
    /// Connections each node carried.
    carried: Vec<usize>,
    /// Ticks each node's daemons used.
    node_ticks: Vec<u64>,
    kernel_ticks: u64,
    elapsed: Duration,
}

fn cpu_phase(lab: &ScaleLab) -> CpuPhase {
    for i in 0..3 {
        lab.flush_flows(i);
    }
    let before: Vec<u64> = (0..3).map(|i| node_ticks(lab, i)).collect();
    let k0 = kernel_ticks();
    let t0 = Instant::now();
    let (done, failed) = lab
        .client
        .run(|| {
            let (mut done, mut failed) = (0usize, 0usize);
            while t0.elapsed() < PHASE {
                match request(Duration::from_secs(3)) {
                    Ok(_) => done += 1,
                    Err(_) => failed += 1,
                }
            }
            (done, failed)
        })
        .expect("client ns");
    let elapsed = t0.elapsed();
    let kernel = kernel_ticks() - k0;
    if failed > 0 {
        eprintln!("  {failed} of {} connections failed", done + failed);
    }
    CpuPhase {
        connections: done + failed,
        carried: (0..3).map(|i| lab.flows_seen(i).len()).collect(),
        node_ticks: (0..3).map(|i| node_ticks(lab, i) - before[i]).collect(),
        kernel_ticks: kernel,
        elapsed,
    }
}

struct Run {
    split: Vec<usize>,
    converged: Option<Duration>,
    last_moved: Option<Duration>,
    on_crashed: usize,
    survived: usize,
    one: CpuPhase,
    three: CpuPhase,
}

fn one_run() -> Run {
    let mut lab = ScaleLab::new(Options::default());
    lab.wait_all_announced();
    let (per_node, errors) = spread(&lab, 600);
    if !errors.is_empty() {
        eprintln!(
            "  {} of 600 connections failed: {:?}",
            errors.len(),
            errors.first()
        );
    }
    let split: Vec<usize> = per_node.values().copied().collect();

    // Thousands of connections a second leave thousands of client ports in
    // TIME_WAIT; searching past them would slow the phase that comes
    // second. Reuse them, as a busy client would.
    lab.client
        .sysctl("net.ipv4.tcp_tw_reuse", "1")
        .expect("tw_reuse");
    lab.client
        .sysctl("net.ipv4.ip_local_port_range", "1024 65000")
        .expect("port range");
    // Three nodes share, then one carries everything (the pair's master).
    let three = cpu_phase(&lab);
    lab.set_maintenance(1, true);
    lab.set_maintenance(2, true);
    lab.wait_next_hops(&["10.2.0.11"], Duration::from_secs(10));
    let one = cpu_phase(&lab);
    lab.set_maintenance(1, false);
    lab.set_maintenance(2, false);
    lab.wait_all_announced();

    // The crash.
    lab.flush_flows(0);
    let flows = LongFlows::start(&lab.client, FLOWS, Duration::from_millis(20));
    std::thread::sleep(Duration::from_secs(1));
    let ports: BTreeSet<u16> = flows.ports.iter().copied().collect();
    let on_crashed: BTreeSet<u16> = lab.flows_seen(0).intersection(&ports).copied().collect();
    let t0 = lab.crash(0);
    let mut converged = None;
    while t0.elapsed() < Duration::from_secs(HOLD_TIME_S + 3) {
        if !lab.next_hops().contains("10.2.0.11") {
            converged = Some(t0.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_secs(4));
    let results = flows.finish();
    let survived = results.iter().filter(|f| f.error.is_none()).count();
    let last_moved = results
        .iter()
        .filter(|f| on_crashed.contains(&f.port))
        .map(|f| f.first_after(t0).map(|t| t - t0))
        .collect::<Option<Vec<Duration>>>()
        .and_then(|v| v.into_iter().max());
    Run {
        split,
        converged,
        last_moved,
        on_crashed: on_crashed.len(),
        survived,
        one,
        three,
    }
}

fn ms(d: Option<Duration>) -> String {
    d.map_or_else(
        || "-".to_owned(),
        |d| format!("{:.0}", d.as_secs_f64() * 1000.0),
    )
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(3);
    let tick = tick_ms();
    let mut conv = Table::new();
    conv.load_style(presets::UTF8_FULL);
    conv.set_header([
        "run",
        "BFD detection (ms)",
        "router dropped the node (ms)",
        "last flow moving again (ms)",
        "flows on the crashed node",
        "flows survived",
        "split lb1/lb2/lb3 of 600 (%)",
    ]);
    let mut cpu = Table::new();
    cpu.load_style(presets::UTF8_FULL);
    cpu.set_header([
        "run",
        "nodes carrying",
        "connections per node",
        "connections per s",
        "node daemons CPU (ms per s)",
        "node daemons CPU (µs per connection carried)",
        "machine kernel CPU (µs per connection)",
    ]);
    for run in 1..=runs {
        eprintln!("run {run}/{runs}");
        let r = one_run();
        let total: usize = r.split.iter().sum::<usize>().max(1);
        conv.add_row([
            run.to_string(),
            BFD_DETECTION.as_millis().to_string(),
            ms(r.converged),
            ms(r.last_moved),
            r.on_crashed.to_string(),
            format!("{}/{FLOWS}", r.survived),
            r.split
                .iter()
                .map(|c| format!("{:.0}", *c as f64 * 100.0 / total as f64))
                .collect::<Vec<_>>()
                .join("/"),
        ]);
        for (label, p, nodes) in [
            ("1 (the pair's master)", &r.one, 1usize),
            ("3", &r.three, 3),
        ] {
            let carried: Vec<usize> = p.carried.iter().take(nodes).copied().collect();
            let ticks: u64 = p.node_ticks.iter().take(nodes).sum();
            let per_node_ms = ticks as f64 * tick / nodes as f64;
            // Each node's own cost per connection it carried, averaged.
            let per_conn_us: f64 = carried
                .iter()
                .zip(&p.node_ticks)
                .map(|(c, t)| *t as f64 * tick * 1000.0 / (*c).max(1) as f64)
                .sum::<f64>()
                / nodes as f64;
            cpu.add_row([
                run.to_string(),
                label.to_owned(),
                carried
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("/"),
                format!(
                    "{:.0}",
                    p.connections as f64 / p.elapsed.as_secs_f64().max(0.001)
                ),
                format!("{:.1}", per_node_ms / p.elapsed.as_secs_f64().max(0.001)),
                format!("{per_conn_us:.1}"),
                format!(
                    "{:.0}",
                    p.kernel_ticks as f64 * tick * 1000.0 / p.connections.max(1) as f64
                ),
            ]);
        }
    }
    println!(
        "Active-active, node crash (BFD {BFD_INTERVAL_MS} ms x {BFD_MULTIPLIER}; {FLOWS} long-lived DSR flows)"
    );
    println!("{conv}");
    println!(
        "CPU: new connections one after the other for {} s, one node carrying them all vs three \
         (node daemons = lb-forwarder + routed + BIRD; machine kernel = system + irq + softirq of \
         the whole machine: every namespace, and any other load on it)",
        PHASE.as_secs()
    );
    println!("{cpu}");
}
