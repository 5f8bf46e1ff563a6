//! An active-active cluster.toml (`mode = "active-active"`): N nodes, their
//! upstream BGP peers, DSR farms only — and a pair that stays as it was.

mod common;

use common::{CLUSTER, errors, write};
use tandem_config::{ClusterMode, Config};

const NODE: &str =
    "name = \"lb1\"\ncluster_interface = \"eth2\"\ncluster_address = \"192.168.100.1\"\n";

const AA: &str = r#"mode = "active-active"
hash_seed = 0x5eed

[[nodes]]
name = "lb1"
address = "192.168.100.1"

[[nodes]]
name = "lb2"
address = "192.168.100.2"

[[nodes]]
name = "lb3"
address = "192.168.100.3"

[bgp]
local_as = 65010

[[bgp.peers]]
name = "tor1"
address = "10.2.0.1"
remote_as = 65000
"#;

const DSR: &str = r#"name = "web"
vip = "10.0.0.100"
port = 80
forwarding = "dsr"

[[backends]]
address = "10.1.0.11"
"#;

fn aa_errors(cluster: &str, farm: &str) -> Vec<String> {
    let d = write(&[
        ("node.toml", NODE),
        ("cluster.toml", cluster),
        ("farms/web.toml", farm),
    ]);
    errors(d.path())
}

#[test]
fn an_active_active_cluster_loads_with_its_defaults() {
    let d = write(&[
        ("node.toml", NODE),
        ("cluster.toml", AA),
        ("farms/web.toml", DSR),
    ]);
    let c = Config::load(d.path())
        .expect("valid")
        .cluster
        .expect("clustered");
    assert_eq!(c.mode, ClusterMode::ActiveActive);
    assert_eq!(c.nodes.len(), 3);
    let bgp = c.bgp.expect("bgp");
    assert_eq!((bgp.local_as, bgp.hold_time_s), (65010, 9));
    assert_eq!((bgp.bfd.interval_ms, bgp.bfd.multiplier), (100, 3));
    assert_eq!(bgp.bfd.detection_ms(), 300);
    assert!(bgp.peers[0].bfd && bgp.peers[0].serves("lb3"));
    assert_eq!(
        c.nodes[2].bgp_router_id(),
        Some("192.168.100.3".parse().expect("ip"))
    );
    assert_eq!(c.virtual_router_id, 0);
    assert!(c.floating_ips.is_empty());
}

#[test]
fn the_pair_is_unchanged_and_refuses_the_active_active_keys() {
    // The pair's file as before: valid, and written back without a mode.
    let d = common::dir(&[]);
    let c = Config::load(d.path())
        .expect("valid")
        .cluster
        .expect("clustered");
    assert_eq!(c.mode, ClusterMode::ActivePassive);
    let text = toml::to_string(&c).expect("serialize");
    assert!(!text.contains("mode") && !text.contains("bgp"), "{text}");

    let with_bgp = format!("{CLUSTER}\n[bgp]\nlocal_as = 65010\npeers = []\n");
    let d = common::dir(&[("cluster.toml", &with_bgp)]);
    assert_eq!(
        errors(d.path()),
        [
            "cluster.toml:23:1: cluster: [bgp] is for active-active clusters (mode = \"active-active\"); a pair moves floating IPs with VRRP instead"
        ]
    );
}

#[test]
fn node_count_is_three_to_eight() {
    let two = AA.replace(
        "[[nodes]]\nname = \"lb3\"\naddress = \"192.168.100.3\"\n\n",
        "",
    );
    assert_eq!(
        aa_errors(&two, DSR),
        [
            "cluster.toml:4:1: cluster: an active-active cluster has 3-8 nodes, this one lists 2 (two nodes are a pair: mode = \"active-passive\")"
        ]
    );
    let mut nine = AA.to_owned();
    for i in 4..=9 {
        nine.push_str(&format!(
            "\n[[nodes]]\nname = \"lb{i}\"\naddress = \"192.168.100.{i}\"\n"
        ));
    }
    assert_eq!(aa_errors(&nine, DSR).len(), 1);
}

#[test]
fn pair_keys_are_refused_with_the_reason() {
    let e = aa_errors(
        &format!(
            "virtual_router_id = 51\n{AA}\n[[floating_ips]]\naddress = \"10.0.0.100/24\"\ninterface = \"eth0\"\n"
        ),
        DSR,
    );
    assert_eq!(
        e,
        [
            "cluster.toml:1:21: cluster: virtual_router_id is for the active-passive pair; an active-active cluster has no VRRP: remove it",
            "cluster.toml:25:1: cluster: an active-active cluster has no floating IPs: every node announces the farms' VIPs over BGP; remove [[floating_ips]]",
        ]
    );
}

#[test]
fn bgp_is_required_and_checked() {
    let no_bgp = &AA[..AA.find("[bgp]").expect("bgp")];
    assert_eq!(
        aa_errors(no_bgp, DSR),
        [
            "cluster.toml:1:1: cluster: an active-active cluster needs [bgp]: local_as and at least one [[bgp.peers]] (the routers every node announces the VIPs to)"
        ]
    );
    let bad = AA
        .replace(
            "local_as = 65010",
            "local_as = 23456\nhold_time_s = 1\n[bgp.bfd]\nmultiplier = 1",
        )
        .replace(
            "remote_as = 65000",
            "remote_as = 65000\nnodes = [\"lb1\", \"lb7\"]",
        );
    assert_eq!(
        aa_errors(&bad, DSR),
        [
            "cluster.toml:17:12: cluster: local_as 23456 is not a usable AS number (1-4294967294, not 23456)",
            "cluster.toml:18:15: cluster: hold_time_s 1 is out of range (3-65535)",
            "cluster.toml:20:14: cluster: BFD multiplier 1 is out of range (2-255): one lost packet would take a node out",
            "cluster.toml:26:17: cluster: BGP peer `tor1` names node `lb7`, which is not one of the nodes (lb1, lb2, lb3)",
            "cluster.toml:9:8: cluster: node `lb2` peers with no router ([[bgp.peers]] nodes): it could announce nothing",
            "cluster.toml:13:8: cluster: node `lb3` peers with no router ([[bgp.peers]] nodes): it could announce nothing",
        ]
    );
}

#[test]
fn peer_names_must_stay_distinct_for_bird() {
    let twin = format!(
        "{AA}\n[[bgp.peers]]\nname = \"tor-1\"\naddress = \"10.2.0.2\"\nremote_as = 65000\n\n[[bgp.peers]]\nname = \"tor_1\"\naddress = \"192.168.100.2\"\nremote_as = 65000\n"
    );
    assert_eq!(
        aa_errors(&twin, DSR),
        [
            "cluster.toml:30:8: cluster: BGP peers `tor-1` and `tor_1` differ only by '-' and '_', which the routing daemon cannot tell apart",
            "cluster.toml:31:11: cluster: BGP peer `tor_1` address 192.168.100.2 is a node's own address",
        ]
    );
}

#[test]
fn nat_farms_stay_on_a_pair() {
    let nat = DSR.replace("forwarding = \"dsr\"", "snat_address = \"10.1.0.100\"");
    assert_eq!(
        aa_errors(AA, &nat),
        [
            "farms/web.toml:1:1: farm `web`: an active-active cluster forwards with direct server return only (forwarding = \"dsr\"): a NAT flow moved by the routers to another node finds no NAT state there; keep NAT farms on an active-passive pair"
        ]
    );
    let on_router = DSR.replace("10.0.0.100", "10.2.0.1");
    assert_eq!(
        aa_errors(AA, &on_router),
        [
            "farms/web.toml:2:7: farm `web`: vip 10.2.0.1 is a node's or a BGP peer's own address; a VIP is announced by every node and must be an address of its own"
        ]
    );
}

/// The example in docs/scale-out.md is a valid configuration.
#[test]
fn the_documented_example_is_valid() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/scale-out.md"
    ))
    .expect("docs/scale-out.md");
    let start = doc
        .find("```toml\n# /etc/tandem/cluster.toml of an active-active cluster")
        .expect("the example")
        + "```toml\n".len();
    let example = &doc[start..start + doc[start..].find("```").expect("end of the example")];
    let node = "name = \"lb2\"\ncluster_interface = \"eth0\"\ncluster_address = \"10.2.0.12\"\n";
    let d = write(&[
        ("node.toml", node),
        ("cluster.toml", example),
        ("farms/web.toml", DSR),
    ]);
    let c = Config::load(d.path()).expect("the documented example loads");
    assert_eq!(c.cluster.expect("clustered").nodes.len(), 3);
}
