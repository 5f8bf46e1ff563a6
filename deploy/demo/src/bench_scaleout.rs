//! Active-active figures, in the lab of `tests/scaleout_lab.rs` (a BIRD
//! router with kernel ECMP and the L4 hash, three Tandem nodes each with
//! lb-forwarder, routed and BIRD, DSR backends):
//!
//! - how new connections split over the nodes;
//! - a node crash (cables pulled, daemons and BIRD SIGKILLed): when the
//!   router stopped using it (BFD detection), when the last long-lived flow
//!   it carried was moving again through another node, and how many of 100
//!   long-lived flows survived;
//! - CPU of a node's daemons (lb-forwarder, routed, BIRD) per connection,
//!   when one node carries everything (what the pair's master does) and
//!   when three share the load; and the machine's kernel CPU per
//!   connection in both phases (machine-wide: it includes any other load).
//!
//! Usage: tandem-bench-scaleout [RUNS] (default 3)

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use comfy_table::{Table, presets};
use tandem_e2e::scaleout_lab::*;

const FLOWS: usize = 100;
const CONNECTIONS: usize = 1000;

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
    let failed = lab
        .client
        .run(|| {
            (0..CONNECTIONS)
                .filter(|_| request(Duration::from_secs(3)).is_err())
                .count()
        })
        .expect("client ns");
    let elapsed = t0.elapsed();
    let kernel = kernel_ticks() - k0;
    if failed > 0 {
        eprintln!("  {failed} of {CONNECTIONS} connections failed");
    }
    CpuPhase {
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

    // One node carries everything (the pair's master), then three share.
    lab.set_maintenance(1, true);
    lab.set_maintenance(2, true);
    lab.wait_next_hops(&["10.2.0.11"], Duration::from_secs(10));
    let one = cpu_phase(&lab);
    lab.set_maintenance(1, false);
    lab.set_maintenance(2, false);
    lab.wait_all_announced();
    let three = cpu_phase(&lab);

    // The crash.
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
        "node daemons CPU (ms per 1000 conn.)",
        "node daemons CPU (ms per s)",
        "machine kernel CPU (ms per 1000 conn.)",
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
            let per_conn: f64 = carried
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
                format!("{per_conn:.1}"),
                format!("{:.1}", per_node_ms / p.elapsed.as_secs_f64().max(0.001)),
                format!(
                    "{:.1}",
                    p.kernel_ticks as f64 * tick * 1000.0 / CONNECTIONS as f64
                ),
            ]);
        }
    }
    println!(
        "Active-active, node crash (BFD {BFD_INTERVAL_MS} ms x {BFD_MULTIPLIER}; {FLOWS} long-lived DSR flows)"
    );
    println!("{conv}");
    println!(
        "CPU per connection: {CONNECTIONS} new connections, one node carrying them all vs three"
    );
    println!("{cpu}");
}
