//! Forming and changing an active-active cluster with `tandemctl`, on real
//! nodes: every daemon, a real sshd per node, BIRD on every node and on a
//! router with kernel ECMP, traffic from a client through the VIP to DSR
//! backends. See tests/scaleout_cluster_lab.rs for the lab.

use std::time::Duration;

use tandem_e2e::cluster_lab::text;
use tandem_e2e::scaleout_cluster_lab::{ClusterLab, ROOT_PASSWORD, SEED};
use tandem_e2e::scaleout_lab::RequestLoop;

const CONVERGE: Duration = Duration::from_secs(60);

fn ok(what: &str, out: &std::process::Output, lab: &ClusterLab) -> String {
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stdout}\n{}\n{}",
        out.status,
        text(&out.stderr),
        lab.diagnostics()
    );
    stdout
}

/// Traffic through the VIP: every request answered, and every node in
/// `carriers` carried some of it (the routers spread the flows).
fn assert_traffic(lab: &ClusterLab, carriers: &[&str]) {
    let (per_node, errors) = lab.traffic(60);
    assert!(
        errors.is_empty(),
        "requests through the VIP failed: {errors:?}\n{}",
        lab.diagnostics()
    );
    for (name, n) in &per_node {
        if carriers.contains(&name.as_str()) {
            assert!(*n > 0, "{name} carried no flow: {per_node:?}");
        } else {
            assert_eq!(
                *n, 0,
                "{name} is not in the cluster but carried flows: {per_node:?}"
            );
        }
    }
}

#[test]
fn an_active_active_cluster_is_created_grown_and_shrunk_with_tandemctl() {
    let lab = ClusterLab::new();
    let (lb1, lb2, lb3, lb4) = (0, 1, 2, 3);
    // Standalone: nobody announces the VIP.
    assert!(lab.next_hops().is_empty());

    // 1. Create: lb1 (the leader), lb2, lb3; each host key given as the
    // operator read it on that node.
    let key2 = format!("{}={}", lab.nodes[lb2].addr, lab.host_key_fingerprint(lb2));
    let key3 = format!("{}={}", lab.nodes[lb3].addr, lab.host_key_fingerprint(lb3));
    let seed = SEED.to_string();
    let out = lab.tandemctl(
        lb1,
        &[
            "cluster",
            "create",
            "--local-ip",
            &lab.nodes[lb1].addr,
            "--node",
            &lab.nodes[lb2].addr,
            "--node",
            &lab.nodes[lb3].addr,
            "--local-as",
            "65010",
            "--bgp-peer",
            "router,10.2.0.1,65000",
            "--hash-seed",
            &seed,
            "--host-key",
            &key2,
            "--host-key",
            &key3,
            "--yes",
            "--password-stdin",
        ],
        &format!("{ROOT_PASSWORD}\n"),
    );
    let stdout = ok("cluster create", &out, &lab);
    eprintln!("cluster create:\n{stdout}");
    assert!(stdout.contains("cluster created"), "{stdout}");
    // One cluster.toml everywhere, the leader first; the joining nodes'
    // own farms erased, the leader's farm everywhere.
    let cluster = lab.nodes[lb1].read("cluster.toml").expect("cluster.toml");
    assert!(cluster.contains("mode = \"active-active\""), "{cluster}");
    let first = cluster.find("name = \"lb1\"").expect("lb1 listed");
    assert!(first < cluster.find("name = \"lb2\"").expect("lb2 listed"));
    for i in [lb2, lb3] {
        assert_eq!(
            lab.nodes[i].read("cluster.toml").as_deref(),
            Some(cluster.as_str())
        );
        assert_eq!(
            lab.nodes[i].read("farms/old.toml"),
            None,
            "{}'s own farm erased",
            lab.nodes[i].name
        );
        assert_eq!(
            lab.nodes[i].read("farms/web.toml"),
            lab.nodes[lb1].read("farms/web.toml")
        );
    }
    assert!(lab.nodes[lb4].read("cluster.toml").is_none());
    // The routers learn the VIP from the three; traffic spreads over them.
    lab.wait_next_hops(&["lb1", "lb2", "lb3"], CONVERGE);
    lab.wait_table(
        lb1,
        &[("lb1", "green"), ("lb2", "green"), ("lb3", "green")],
        CONVERGE,
    );
    lab.wait_table(
        lb3,
        &[("lb1", "green"), ("lb2", "green"), ("lb3", "green")],
        CONVERGE,
    );
    for i in [lb1, lb2, lb3] {
        assert!(lab.bird_running(i), "{}'s BIRD runs", lab.nodes[i].name);
    }
    assert_traffic(&lab, &["lb1", "lb2", "lb3"]);

    // 2. A configuration change is made on the leader only.
    let out = lab.tandemctl(
        lb2,
        &[
            "cluster",
            "add-node",
            &lab.nodes[lb4].addr,
            "--yes",
            "--password-stdin",
            "--host-key",
            &lab.host_key_fingerprint(lb4),
        ],
        &format!("{ROOT_PASSWORD}\n"),
    );
    assert!(
        !out.status.success(),
        "add-node on a node that does not lead"
    );
    let err = text(&out.stdout) + &text(&out.stderr);
    assert!(err.contains("not the cluster's leader"), "{err}");
    assert!(lab.nodes[lb4].read("cluster.toml").is_none());

    // 3. Trust before secrets: another key than lb4's (lb3's, as a
    // mistyped fingerprint would be) stops add-node before the password
    // is sent; lb4's sshd sees no password. Control: below, with lb4's
    // real key, lb4's sshd accepts the password.
    let out = lab.tandemctl(
        lb1,
        &[
            "cluster",
            "add-node",
            &lab.nodes[lb4].addr,
            "--host-key",
            &lab.host_key_fingerprint(lb3),
            "--yes",
            "--password-stdin",
        ],
        &format!("{ROOT_PASSWORD}\n"),
    );
    assert!(
        !out.status.success(),
        "add-node with another node's host key"
    );
    let err = text(&out.stdout) + &text(&out.stderr);
    assert!(
        err.contains(&lab.host_key_fingerprint(lb4)) && err.contains("nothing was sent to it"),
        "{err}"
    );
    assert!(
        !lab.nodes[lb4].log("sshd").contains("password"),
        "{}",
        lab.nodes[lb4].log("sshd")
    );
    assert!(lab.nodes[lb4].read("cluster.toml").is_none());

    // add-node lb4: trusted by its host key, joins, announces.
    let out = lab.tandemctl(
        lb1,
        &[
            "cluster",
            "add-node",
            &lab.nodes[lb4].addr,
            "--host-key",
            &lab.host_key_fingerprint(lb4),
            "--yes",
            "--password-stdin",
        ],
        &format!("{ROOT_PASSWORD}\n"),
    );
    let stdout = ok("cluster add-node", &out, &lab);
    eprintln!("cluster add-node:\n{stdout}");
    assert!(
        stdout.contains("lb4 joined the cluster (4 nodes)"),
        "{stdout}"
    );
    lab.wait_next_hops(&["lb1", "lb2", "lb3", "lb4"], CONVERGE);
    let cluster = lab.nodes[lb1].read("cluster.toml").expect("cluster.toml");
    assert!(cluster.contains("name = \"lb4\""), "{cluster}");
    for i in [lb2, lb3, lb4] {
        lab.wait_file(i, "cluster.toml", &cluster, CONVERGE);
    }
    assert_eq!(
        lab.nodes[lb4].read("farms/old.toml"),
        None,
        "lb4's own farm erased"
    );
    assert!(
        lab.nodes[lb4]
            .log("sshd")
            .contains("Accepted password for root"),
        "control: with lb4's real key the password is sent\n{}",
        lab.nodes[lb4].log("sshd")
    );
    let all4 = [
        ("lb1", "green"),
        ("lb2", "green"),
        ("lb3", "green"),
        ("lb4", "green"),
    ];
    lab.wait_table(lb1, &all4, CONVERGE);
    lab.wait_table(lb4, &all4, CONVERGE);
    assert_traffic(&lab, &["lb1", "lb2", "lb3", "lb4"]);
    // 4. Maintenance of lb2 from the leader: routed withdraws its VIPs,
    // its row is orange; back in service, green.
    let out = lab.tandemctl(
        lb1,
        &[
            "node",
            "maintenance",
            "enable",
            "lb2",
            "--reason",
            "kernel upgrade",
        ],
        "",
    );
    ok("node maintenance enable lb2", &out, &lab);
    lab.wait_next_hops(&["lb1", "lb3", "lb4"], CONVERGE);
    lab.wait_table(
        lb1,
        &[
            ("lb1", "green"),
            ("lb2", "orange"),
            ("lb3", "green"),
            ("lb4", "green"),
        ],
        CONVERGE,
    );
    let t = lab.node_table(lb1);
    assert!(t["lb2"].1.contains("kernel upgrade"), "{t:?}");
    let r = lab.routed_status(lb2);
    assert!(
        r.maintenance && r.vips.iter().all(|v| !v.announced),
        "{r:?}"
    );
    assert_traffic(&lab, &["lb1", "lb3", "lb4"]);
    let out = lab.tandemctl(lb1, &["node", "maintenance", "disable", "lb2"], "");
    ok("node maintenance disable lb2", &out, &lab);
    lab.wait_next_hops(&["lb1", "lb2", "lb3", "lb4"], CONVERGE);
    lab.wait_table(lb1, &all4, CONVERGE);

    // 5. remove-node lb2: drained, forgotten, standalone; new requests
    // keep being answered meanwhile.
    let requests = RequestLoop::start(&lab.client, Duration::from_millis(20));
    let out = lab.tandemctl(lb1, &["cluster", "remove-node", "lb2", "--yes"], "");
    let stdout = ok("cluster remove-node lb2", &out, &lab);
    eprintln!("cluster remove-node:\n{stdout}");
    assert!(
        stdout.contains("lb2 removed from the cluster (3 nodes: lb1, lb3, lb4)"),
        "{stdout}"
    );
    lab.wait_next_hops(&["lb1", "lb3", "lb4"], CONVERGE);
    std::thread::sleep(Duration::from_secs(1));
    let (answered, failed, errors) = requests.finish();
    eprintln!("remove-node lb2: {answered} requests answered, {failed} failed meanwhile");
    assert!(
        answered > 0 && failed == 0,
        "{failed} of {} requests failed during remove-node: {errors:?}",
        answered + failed
    );
    let cluster = lab.nodes[lb1].read("cluster.toml").expect("cluster.toml");
    assert!(!cluster.contains("name = \"lb2\""), "{cluster}");
    for i in [lb3, lb4] {
        lab.wait_file(i, "cluster.toml", &cluster, CONVERGE);
    }
    assert!(
        lab.nodes[lb2].read("cluster.toml").is_none(),
        "lb2 is standalone"
    );
    assert!(
        lab.nodes[lb2].read("ssh/id_ed25519").is_none(),
        "lb2 lost the cluster identity"
    );
    lab.wait_until(CONVERGE, "lb2's BIRD shut down", || !lab.bird_running(lb2));
    let r = lab.routed_status(lb2);
    assert_eq!(r.mode, "standalone", "{r:?}");
    let three = [("lb1", "green"), ("lb3", "green"), ("lb4", "green")];
    lab.wait_table(lb1, &three, CONVERGE);
    lab.wait_table(lb3, &three, CONVERGE);
    // The others no longer trust lb2's host key.
    for i in [lb1, lb3, lb4] {
        let known = lab.nodes[i].read("ssh/known_hosts").unwrap_or_default();
        assert!(
            !known.contains(&lab.nodes[lb2].addr),
            "{} still pins lb2: {known}",
            lab.nodes[i].name
        );
    }
    assert_traffic(&lab, &["lb1", "lb3", "lb4"]);

    // 6. destroy on the leader: every node leaves, nothing is announced.
    let out = lab.tandemctl(lb1, &["cluster", "destroy", "--yes"], "");
    let stdout = ok("cluster destroy", &out, &lab);
    eprintln!("cluster destroy:\n{stdout}");
    lab.wait_until(CONVERGE, "the router forgot the VIP", || {
        lab.next_hops().is_empty()
    });
    for i in [lb1, lb3, lb4] {
        let n = &lab.nodes[i];
        assert!(
            n.read("cluster.toml").is_none(),
            "{} still clustered",
            n.name
        );
        lab.wait_until(CONVERGE, &format!("{}'s BIRD shut down", n.name), || {
            !lab.bird_running(i)
        });
        assert_eq!(lab.routed_status(i).mode, "standalone");
    }
}
