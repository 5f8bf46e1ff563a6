//! Tandem's main job, in network namespaces on this machine: two nodes and a
//! client on one LAN, the real vrrpd on each node, live traffic to the
//! floating IP, a crash of the master, and what an operator wants to see.
//! Everything it creates is removed when it ends (also on Ctrl-C: the lab's
//! names carry this process's pid, and the next lab sweeps leftovers).

use std::time::Duration;

use comfy_table::{Table, presets};
use tandem_e2e::vrrp_lab::{ClusterOptions, VIP, VrrpLab};
use tandem_proto::v1::VrrpState;

const SETTLE: Duration = Duration::from_secs(15);

fn nodes_table(lab: &VrrpLab) -> Table {
    let mut t = Table::new();
    t.load_style(presets::UTF8_FULL_CONDENSED);
    t.set_header([
        "NODE",
        "ROLE",
        "ADDRESS",
        "PRIORITY",
        "HOLDS VIP",
        "ADVERTS SENT/RECEIVED",
        "WHY",
    ]);
    for (i, node) in lab.nodes.iter().enumerate() {
        let addr = format!("10.0.0.{}", i + 1);
        let holds = if lab.holds_vip(&node.name) { VIP } else { "-" };
        match lab.status(&node.name) {
            Some(s) => {
                let c = s.counters.unwrap_or_default();
                let role = s
                    .state()
                    .as_str_name()
                    .trim_start_matches("VRRP_STATE_")
                    .to_lowercase();
                t.add_row([
                    node.name.clone(),
                    role,
                    addr,
                    s.priority.to_string(),
                    holds.to_owned(),
                    format!("{}/{}", c.adverts_sent, c.adverts_received),
                    s.reason,
                ]);
            }
            None => {
                t.add_row([
                    node.name.clone(),
                    "unreachable".into(),
                    addr,
                    "-".into(),
                    holds.to_owned(),
                    "-".into(),
                    "crashed".into(),
                ]);
            }
        }
    }
    t
}

fn main() {
    let opts = ClusterOptions::default();
    println!("Tandem demo: two nodes (lb1 10.0.0.1, lb2 10.0.0.2) and a client (10.0.0.50)");
    println!(
        "on one bridge, in network namespaces; floating IP {VIP}/24; VRRPv3 every {} ms.\n",
        opts.advert_interval_ms
    );
    let mut lab = VrrpLab::new(&opts);
    println!("lab {}: starting vrrpd on both nodes", lab.lab.id());
    lab.start("lb1");
    lab.start("lb2");
    let master = lab.wait_elected(SETTLE);
    let backup = if master == "lb1" { "lb2" } else { "lb1" }.to_owned();
    let m = master.clone();
    lab.wait_until(SETTLE, "the VIP to answer", |l| {
        l.vip_answer().as_deref() == Some(m.as_str())
    });
    println!("\nNodes before the crash:\n{}", nodes_table(&lab));

    println!(
        "\nThe client sends a UDP probe to {VIP} every 2 ms; each node answers with its name."
    );
    let probe = lab.start_probe(Duration::from_millis(2));
    std::thread::sleep(Duration::from_secs(1));
    println!("Crashing the master {master}: link down, then kill -9 of its vrrpd ...");
    let crashed_at = probe.elapsed();
    lab.crash(&master);
    let b = backup.clone();
    lab.wait_until(SETTLE, "the backup to answer on the VIP", |l| {
        l.vip_answer().as_deref() == Some(b.as_str())
    });
    std::thread::sleep(Duration::from_millis(500));
    let log = probe.finish();

    let lost = log.sent.saturating_sub(log.answered() as u64);
    match log.failover(&master, &backup) {
        Some(d) => println!(
            "\nFailover: last answer from {master} to first answer from {backup}: {} ms (VRRP Master_Down_Interval at {} ms adverts: ~{} ms)",
            d.as_millis(),
            opts.advert_interval_ms,
            opts.advert_interval_ms * 3 + opts.advert_interval_ms * 156 / 256
        ),
        None => println!("\nFailover: could not be measured from the probe"),
    }
    println!(
        "Probes: {} sent, {} answered, {lost} unanswered (all during the takeover); crash at +{} ms",
        log.sent,
        log.answered(),
        crashed_at.as_millis()
    );
    println!("\nNodes after the crash:\n{}", nodes_table(&lab));

    println!("\n{master} comes back (failback = none: it must not take the role back) ...");
    lab.revive(&master);
    lab.start(&master);
    let m = master.clone();
    lab.wait_until(SETTLE, "the returning node to settle", |l| {
        l.state(&m) == Some(VrrpState::Backup)
    });
    std::thread::sleep(Duration::from_secs(1));
    println!("\nNodes after recovery:\n{}", nodes_table(&lab));
    println!("\nStill to come in this demo: farms through lb-forwarder's nftables datapath,");
    println!("connections surviving through conntrack-syncd, and `tandemctl cluster create`.");
    drop(lab);
    println!("Lab torn down: namespaces, veths, bridges and processes removed.");
}
