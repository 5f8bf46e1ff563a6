//! Planned handovers under live traffic, vrrpd and keepalived in the same
//! lab and the same run. A pair of nodes with lb-forwarder and
//! conntrack-syncd (the chaos lab: client, two backends, the farm `web`),
//! a new request every 5 ms and 50 long-lived connections echoing a line
//! every 50 ms. Each kind of handover moves the master role back and forth
//! N times each way:
//!
//! - vrrpd `maintenance`: SetMaintenance on the master (what
//!   `tandemctl node maintenance enable` asks), then off again;
//! - vrrpd `stop`: SIGTERM of the master's vrrpd (`systemctl stop vrrpd`),
//!   then vrrpd started again;
//! - vrrpd `failback` (failback = lb1): maintenance on lb1 moves the role
//!   to lb2, disabling it lets lb1 take it back;
//! - keepalived `graceful stop`: SIGTERM of the master's keepalived (a
//!   priority-0 advert), then keepalived started again. conntrack-syncd's
//!   direction follows who holds the VIP, as a notify script would switch
//!   conntrackd.
//!
//! Per direction: failed requests, broken long-lived connections, and the
//! client-visible gap (the longest time without a request completing,
//! from 100 ms before the handover to 1 s after) — median and max — next
//! to the same measure in the 1.1 s before each handover (the quiet gap:
//! what a loaded machine shows when nothing moves).

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use comfy_table::{Table, presets};
use tandem_e2e::chaos_lab::{ChaosLab, ChaosOptions, SNAT, VIP};
use tandem_proto::v1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Maintenance,
    Stop,
    Failback,
    KeepalivedStop,
}

impl Kind {
    fn speaker(self) -> &'static str {
        match self {
            Kind::KeepalivedStop => "keepalived 2.2.7",
            _ => "vrrpd",
        }
    }
}

/// One handover: which way, and when (since the traffic started).
struct Handover {
    label: &'static str,
    from: &'static str,
    to: &'static str,
    at: Duration,
}

fn keepalived_conf(name: &str) -> String {
    format!(
        "global_defs {{\n  router_id {name}\n  vrrp_version 3\n  vrrp_garp_master_repeat 3\n  vrrp_garp_interval 0.05\n}}\n\
         vrrp_instance VI_42 {{\n  state BACKUP\n  interface eth2\n  virtual_router_id 42\n  priority 100\n  \
         advert_int 0.1\n  nopreempt\n  virtual_ipaddress {{\n    {VIP}/24 dev eth0\n    {SNAT}/24 dev eth1\n  }}\n}}\n"
    )
}

fn start_keepalived(lab: &mut ChaosLab, node: &str) {
    let n = lab.nodes.iter().find(|n| n.name == node).expect("node");
    let dir = n.config_dir.join("keepalived");
    std::fs::create_dir_all(&dir).expect("keepalived dir");
    std::fs::write(dir.join("keepalived.conf"), keepalived_conf(node)).expect("conf");
    let mut cmd = Command::new("keepalived");
    cmd.args(["--dont-fork", "--log-console", "--vrrp", "--use-file"])
        .arg(dir.join("keepalived.conf"))
        .arg("--pid")
        .arg(dir.join("keepalived.pid"))
        .arg("--vrrp_pid")
        .arg(dir.join("keepalived-vrrp.pid"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = lab.lab.spawn(&n.ns, &mut cmd).expect("spawn keepalived");
    let n = lab.nodes.iter_mut().find(|n| n.name == node).expect("node");
    n.daemons.retain(|(d, _)| *d != "keepalived");
    n.daemons.push(("keepalived", child));
}

/// What a keepalived notify script does for conntrackd: the node holding
/// the VIP sends its flows, the other keeps them. Polled every 5 ms.
fn follow_vip_for_conntrack(lab: &ChaosLab) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let nodes: Vec<_> = lab
        .nodes
        .iter()
        .map(|n| (n.ns.clone(), n.runtime_dir.clone()))
        .collect();
    let s = stop.clone();
    let h = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let mut last: Vec<Option<bool>> = vec![None; nodes.len()];
        while !s.load(Ordering::SeqCst) {
            for (i, (ns, dir)) in nodes.iter().enumerate() {
                let holds = ns
                    .addresses("eth0")
                    .map(|a| a.iter().any(|a| a.starts_with(&format!("{VIP}/"))))
                    .unwrap_or(false);
                if last[i] != Some(holds) {
                    let role = if holds {
                        v1::SyncRole::Sender
                    } else {
                        v1::SyncRole::Receiver
                    };
                    let ok = rt.block_on(async {
                        let Ok(ch) = tandem_runtime::connect(dir, "conntrack-syncd").await else {
                            return false;
                        };
                        v1::conntrack_sync_client::ConntrackSyncClient::new(ch)
                            .set_role(v1::SetSyncRoleRequest { role: role.into() })
                            .await
                            .is_ok()
                    });
                    if ok {
                        last[i] = Some(holds);
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    (stop, h)
}

fn master(lab: &ChaosLab) -> &'static str {
    if lab.holds_vip("lb1") { "lb1" } else { "lb2" }
}

fn other(n: &str) -> &'static str {
    if n == "lb1" { "lb2" } else { "lb1" }
}

fn settle(lab: &ChaosLab, to: &str) {
    lab.wait_for(
        "the new master to hold the VIP alone",
        Duration::from_secs(20),
        |l| l.holds_vip(to) && !l.holds_vip(other(to)),
    );
    std::thread::sleep(Duration::from_millis(1000));
}

fn run(kind: Kind, each_way: usize) -> (Vec<Handover>, tandem_e2e::chaos_lab::TrafficReport) {
    let mut lab = ChaosLab::new(ChaosOptions {
        priorities: (100, 100),
        failback: if kind == Kind::Failback {
            "lb1"
        } else {
            "none"
        }
        .into(),
        // The failback rows measure the handover itself, not the delay
        // clustermanager's gate would add.
        vrrp_extra: "preempt_delay_s = 0".into(),
        ..ChaosOptions::default()
    });
    let mut follower = None;
    if kind == Kind::KeepalivedStop {
        for node in ["lb1", "lb2"] {
            lab.start(node, "lb-forwarder");
            lab.start(node, "conntrack-syncd");
        }
        follower = Some(follow_vip_for_conntrack(&lab));
        start_keepalived(&mut lab, "lb1");
        lab.wait_for("lb1 to hold the VIP", Duration::from_secs(20), |l| {
            l.holds_vip("lb1")
        });
        start_keepalived(&mut lab, "lb2");
        lab.wait_for("the farm to answer", Duration::from_secs(20), |l| {
            l.request().is_ok()
        });
    } else {
        lab.start_cluster();
    }
    std::thread::sleep(Duration::from_secs(1));
    let traffic = lab.traffic(Duration::from_millis(5), 50);
    std::thread::sleep(Duration::from_secs(1));
    let mut done = Vec::new();
    for i in 0..2 * each_way {
        let from = master(&lab);
        let to = other(from);
        let at = traffic.elapsed();
        match kind {
            Kind::Maintenance => {
                let dir = lab.node(from).runtime_dir.clone();
                tandem_e2e::vrrp_lab::set_maintenance(&dir, true);
                settle(&lab, to);
                tandem_e2e::vrrp_lab::set_maintenance(&dir, false);
                done.push(Handover {
                    label: "maintenance enable",
                    from,
                    to,
                    at,
                });
            }
            Kind::Stop => {
                lab.stop(from, "vrrpd", Duration::from_secs(10));
                settle(&lab, to);
                lab.start(from, "vrrpd");
                done.push(Handover {
                    label: "SIGTERM of vrrpd",
                    from,
                    to,
                    at,
                });
            }
            Kind::Failback => {
                let lb1 = lab.node("lb1").runtime_dir.clone();
                let on = from == "lb1";
                tandem_e2e::vrrp_lab::set_maintenance(&lb1, on);
                settle(&lab, to);
                done.push(Handover {
                    label: if on { "maintenance enable" } else { "failback" },
                    from,
                    to,
                    at,
                });
            }
            Kind::KeepalivedStop => {
                lab.stop(from, "keepalived", Duration::from_secs(10));
                settle(&lab, to);
                start_keepalived(&mut lab, from);
                done.push(Handover {
                    label: "graceful stop (SIGTERM)",
                    from,
                    to,
                    at,
                });
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        eprintln!("  {:?} {}/{}: {from} -> {to}", kind, i + 1, 2 * each_way);
    }
    let report = traffic.finish();
    if let Some((stop, h)) = follower {
        stop.store(true, Ordering::SeqCst);
        let _ = h.join();
    }
    (done, report)
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn main() {
    // Usage: tandem-bench-handover [HANDOVERS_EACH_WAY] [KIND ...]
    //   KIND: maintenance, stop, failback, keepalived (default: all; 20 each way)
    let args: Vec<String> = std::env::args().skip(1).collect();
    let each_way: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(20);
    let mut kinds: Vec<Kind> = args
        .iter()
        .skip(1)
        .filter_map(|a| match a.as_str() {
            "maintenance" => Some(Kind::Maintenance),
            "stop" => Some(Kind::Stop),
            "failback" => Some(Kind::Failback),
            "keepalived" => Some(Kind::KeepalivedStop),
            _ => None,
        })
        .collect();
    if kinds.is_empty() {
        kinds = vec![
            Kind::Maintenance,
            Kind::Stop,
            Kind::Failback,
            Kind::KeepalivedStop,
        ];
    }
    let mut table = Table::new();
    table.load_style(presets::UTF8_FULL_CONDENSED);
    table.set_header([
        "speaker",
        "handover",
        "direction",
        "handovers",
        "failed requests",
        "broken long-lived",
        "gap median ms",
        "gap max ms",
        "quiet gap median ms",
    ]);
    let started = Instant::now();
    for kind in kinds {
        eprintln!("{kind:?}: {each_way} handovers each way");
        let (handovers, report) = run(kind, each_way);
        let mut groups: Vec<(&str, &str, &str)> =
            handovers.iter().map(|h| (h.label, h.from, h.to)).collect();
        groups.sort();
        groups.dedup();
        for (label, from, to) in groups {
            let hs: Vec<&Handover> = handovers
                .iter()
                .filter(|h| h.label == label && h.from == from && h.to == to)
                .collect();
            let window = |h: &Handover| {
                (
                    h.at.saturating_sub(Duration::from_millis(100)),
                    h.at + Duration::from_secs(1),
                )
            };
            let failed = report
                .failed()
                .iter()
                .filter(|r| {
                    hs.iter().any(|h| {
                        let (a, b) = window(h);
                        r.started >= a && r.started <= b
                    })
                })
                .count();
            let broken = report
                .broken
                .iter()
                .filter(|b| {
                    hs.iter().any(|h| {
                        let (a, c) = window(h);
                        b.at >= a && b.at <= c
                    })
                })
                .count();
            let mut gaps: Vec<Duration> = hs
                .iter()
                .map(|h| {
                    let (a, b) = window(h);
                    report.max_gap(a, b)
                })
                .collect();
            gaps.sort();
            // The same measure in the 1.1 s just before each handover: what
            // the client sees on this machine when nothing moves.
            let mut quiet: Vec<Duration> = hs
                .iter()
                .map(|h| report.max_gap(h.at.saturating_sub(Duration::from_millis(1100)), h.at))
                .collect();
            quiet.sort();
            table.add_row([
                kind.speaker().to_owned(),
                label.to_owned(),
                format!("{from} -> {to}"),
                hs.len().to_string(),
                failed.to_string(),
                broken.to_string(),
                gaps.get(gaps.len() / 2).map_or("-".into(), |g| ms(*g)),
                gaps.last().map_or("-".into(), |g| ms(*g)),
                quiet.get(quiet.len() / 2).map_or("-".into(), |g| ms(*g)),
            ]);
        }
        eprintln!(
            "  whole run: {} (long-lived connections still open at the end: {})",
            report.summary(),
            report.long_lived - report.broken.len()
        );
    }
    println!(
        "Planned handovers under a new request every 5 ms and 50 long-lived connections (100 ms adverts), {:.0} s:",
        started.elapsed().as_secs_f64()
    );
    println!("{table}");
}
