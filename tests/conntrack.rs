//! conntrack-syncd in a two-node cluster with real traffic: established
//! connections survive the master's death when their conntrack entries were
//! replicated, and break without it.

use std::time::Duration;

use tandem_e2e::conntrack_lab::{ClusterLab, echo, udp_ask};

/// 100 long-lived TCP connections through the VIP, the master dies, and
/// every one continues on the backup with its byte stream intact; UDP flows
/// keep their backend.
#[test]
fn established_connections_survive_the_masters_death() {
    let mut lab = ClusterLab::new();
    lab.node("lb2")
        .ns
        .sysctl("net.netfilter.nf_conntrack_tcp_loose", "0")
        .expect("tcp_loose");
    lab.start_cluster(true);
    let mut conns = lab.connect_many(100);
    for (i, (_, s)) in conns.iter_mut().enumerate() {
        assert!(
            echo(s, &format!("before {i}")).is_some(),
            "connection {i} before failover"
        );
    }
    let udp = lab.udp_flows(20);
    let udp_owners: Vec<String> = udp
        .iter()
        .enumerate()
        .map(|(i, s)| udp_ask(s, &format!("u{i}")).expect("udp before"))
        .collect();
    // Replication is asynchronous: the backup holds every flow shortly after.
    lab.wait_for(
        "the backup to hold every flow",
        Duration::from_secs(5),
        |l| l.vip_entries("lb2") >= 120,
    );

    lab.kill_node("lb1");
    lab.wait_for("lb2 to take over", Duration::from_secs(5), |l| {
        l.holds_vip("lb2")
    });

    let survived = conns
        .iter_mut()
        .enumerate()
        .filter(|(i, (_, s))| echo(s, &format!("after {i} {}", "x".repeat(1000))).is_some())
        .count();
    assert_eq!(survived, 100, "connections that continued on the backup");
    for (i, (s, owner)) in udp.iter().zip(&udp_owners).enumerate() {
        assert_eq!(
            udp_ask(s, &format!("after{i}")).as_deref(),
            Some(owner.as_str()),
            "UDP flow {i} kept its backend"
        );
    }
    // lb2 is now the master: it sends, and the flows it held are its own.
    let st = lab.conntrack_status("lb2");
    assert_eq!(st.role(), tandem_proto::v1::SyncRole::Sender, "{st:?}");
    assert!(st.records_received >= 120, "{st:?}");
    assert_eq!(st.apply_errors, 0, "{st:?}");
}

/// The control: the same without conntrack-syncd (and with the kernel's
/// loose pickup off on the backup, which would otherwise silently adopt
/// some flows mid-stream) breaks the connections.
#[test]
fn without_replication_connections_break_at_failover() {
    let mut lab = ClusterLab::new();
    lab.node("lb2")
        .ns
        .sysctl("net.netfilter.nf_conntrack_tcp_loose", "0")
        .expect("tcp_loose");
    lab.start_cluster(false);
    let mut conns = lab.connect_many(100);
    for (i, (_, s)) in conns.iter_mut().enumerate() {
        assert!(echo(s, &format!("before {i}")).is_some());
    }
    assert_eq!(lab.vip_entries("lb2"), 0, "nothing replicated");
    lab.kill_node("lb1");
    lab.wait_for("lb2 to take over", Duration::from_secs(5), |l| {
        l.holds_vip("lb2")
    });
    // All at once: lb2 holds back the packets of connections it has no
    // entry for (`orphan_grace_ms`, 1 s) before its stack resets them, and
    // one after the other that would take minutes.
    let survived = tandem_e2e::conntrack_lab::survivors(&mut conns, "after");
    assert_eq!(
        survived, 0,
        "without replicated state no connection continues"
    );
}

/// With 10% of the sync datagrams dropped on the way (an nftables
/// `numgen random` rule on the backup), every entry still arrives.
#[test]
fn every_entry_arrives_despite_ten_percent_loss() {
    let mut lab = ClusterLab::new();
    lab.node("lb2")
        .ns
        .exec(
            "nft",
            &[&format!(
                "add table inet loss; add chain inet loss in {{ type filter hook input priority -300; }}; add rule inet loss in udp dport {} numgen random mod 10 == 0 counter drop",
                tandem_e2e::conntrack_lab::SYNC_PORT
            )],
        )
        .expect("loss rule");
    lab.start_cluster(true);
    let mut conns = Vec::new();
    for _ in 0..4 {
        conns.extend(lab.connect_many(100));
    }
    lab.wait_for(
        "the backup to hold every flow despite the loss",
        Duration::from_secs(15),
        |l| l.vip_entries("lb2") >= 400 && l.vip_entries("lb2") == l.vip_entries("lb1"),
    );
    let rules = lab
        .node("lb2")
        .ns
        .exec("nft", &["list", "table", "inet", "loss"])
        .expect("list");
    let text = String::from_utf8_lossy(&rules.stdout);
    assert!(
        !text.contains("counter packets 0 "),
        "the loss rule dropped datagrams: {text}"
    );
    // Status follows the engine within 20 ms.
    lab.wait_for("lb2's Status to count them", Duration::from_secs(1), |l| {
        l.conntrack_status("lb2").entries_injected >= 400
    });
    let master = lab.conntrack_status("lb1");
    assert!(
        master.retransmissions > 0,
        "lost datagrams were sent again: {master:?}"
    );
}
