//! Loading real files: every error carries file, line and column, all errors
//! are reported at once, and nothing invalid is ever returned as a Config.

use std::fs;
use std::path::{Path, PathBuf};

use tandem_config::{Config, Failback, PortRange, Protocol, Scheduler};

const NODE: &str =
    "name = \"lb1\"\ncluster_interface = \"eth1\"\ncluster_address = \"192.168.100.1\"\n";
const CLUSTER: &str = r#"virtual_router_id = 51
failback = "none"

[vrrp]
advert_interval_ms = 100

[[nodes]]
name = "lb1"
address = "192.168.100.1"

[[nodes]]
name = "lb2"
address = "192.168.100.2"

[[floating_ips]]
address = "10.0.0.100/24"
interface = "eth0"

[[floating_ips]]
address = "10.1.0.100/24"
interface = "eth2"
"#;
const WEB: &str = r#"name = "web"
vip = "10.0.0.100"
port = 80
snat_address = "10.1.0.100"

[health_check]
interval_ms = 2000
timeout_ms = 1000

[[backends]]
address = "10.1.0.11"
port = 8080

[[backends]]
address = "10.1.0.12"
port = 8080
"#;

/// A config dir with a valid node, cluster and web farm; `files` overwrite.
fn dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tempdir");
    let mut all = vec![
        ("node.toml", NODE),
        ("cluster.toml", CLUSTER),
        ("farms/web.toml", WEB),
    ];
    all.extend_from_slice(files);
    for (name, text) in all {
        let p = d.path().join(name);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(p, text).expect("write");
    }
    d
}

/// "file:line:col: message" lines, with the temp dir stripped.
fn errors(d: &Path) -> Vec<String> {
    let errs = Config::load(d).expect_err("must be invalid");
    let prefix = format!("{}/", d.display());
    errs.iter()
        .map(|e| e.to_string().replacen(&prefix, "", 1))
        .collect()
}

fn one_error(files: &[(&str, &str)]) -> String {
    let d = dir(files);
    let e = errors(d.path());
    assert_eq!(e.len(), 1, "{e:#?}");
    e[0].clone()
}

#[test]
fn the_base_fixture_is_valid() {
    let d = dir(&[]);
    let c = Config::load(d.path()).expect("valid");
    assert_eq!(c.node.name, "lb1");
    let cluster = c.cluster.expect("clustered");
    assert_eq!(cluster.failback, Failback::None);
    assert_eq!(cluster.vrrp.version, 3);
    assert_eq!(c.farms.len(), 1);
    assert_eq!(
        c.farms[0].port,
        PortRange {
            first: 80,
            last: 80
        }
    );
    assert_eq!(c.farms[0].protocol, Protocol::Tcp);
    assert_eq!(c.farms[0].scheduler, Scheduler::Rr);
}

#[test]
fn the_shipped_examples_are_valid() {
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/examples");
    let c = Config::load(&examples).unwrap_or_else(|e| panic!("deploy/examples invalid:\n{e}"));
    let names: Vec<&str> = c.farms.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["dns", "ftp-passive", "web"]);
    assert_eq!(
        c.farms[1].port,
        PortRange {
            first: 30000,
            last: 30100
        }
    );
    assert_eq!(c.cluster.expect("clustered").floating_ips.len(), 2);
}

#[test]
fn a_type_error_points_at_the_value() {
    let e = one_error(&[(
        "farms/web.toml",
        &WEB.replacen("port = 80\n", "port = \"eighty\"\n", 1),
    )]);
    assert_eq!(
        e,
        "farms/web.toml:3:8: `eighty` is not a port (1-65535) or a range \"first-last\""
    );
}

#[test]
fn an_unknown_key_is_an_error_not_a_silent_default() {
    let e = one_error(&[("farms/web.toml", &format!("{WEB}colour = \"blue\"\n"))]);
    assert!(e.starts_with("farms/web.toml:"), "{e}");
    assert!(e.contains("unknown field `colour`"), "{e}");
}

#[test]
fn a_syntax_error_points_at_the_line() {
    let e = one_error(&[(
        "node.toml",
        "name = \"lb1\"\ncluster_interface = = \"eth1\"\n",
    )]);
    assert!(e.starts_with("node.toml:2:"), "{e}");
}

#[test]
fn a_duplicate_backend_is_named() {
    let dup = WEB.replace("10.1.0.12", "10.1.0.11");
    let e = one_error(&[("farms/web.toml", &dup)]);
    assert_eq!(
        e,
        "farms/web.toml:14:1: farm `web`: backend 10.1.0.11:8080 appears twice"
    );
}

#[test]
fn an_out_of_range_interval_is_named_with_its_range() {
    let e = one_error(&[(
        "cluster.toml",
        &CLUSTER.replace("advert_interval_ms = 100", "advert_interval_ms = 5"),
    )]);
    assert_eq!(
        e,
        "cluster.toml:5:22: cluster: advert_interval_ms 5 must be 10-40950 in steps of 10 with VRRPv3"
    );
    let e = one_error(&[(
        "farms/web.toml",
        &WEB.replace("timeout_ms = 1000", "timeout_ms = 3000"),
    )]);
    assert_eq!(
        e,
        "farms/web.toml:8:14: farm `web`: timeout_ms (3000) must be less than interval_ms (2000)"
    );
}

#[test]
fn a_reversed_port_range_is_refused() {
    let e = one_error(&[(
        "farms/web.toml",
        &WEB.replacen("port = 80\n", "port = \"90-80\"\n", 1),
    )]);
    assert_eq!(
        e,
        "farms/web.toml:3:8: port range `90-80` ends before it starts"
    );
}

#[test]
fn the_same_farm_in_two_files_and_overlapping_listeners_are_refused() {
    let d = dir(&[(
        "farms/web2.toml",
        &WEB.replace("name = \"web\"", "name = \"web2\"").replacen(
            "port = 80\n",
            "port = \"70-90\"\n",
            1,
        ),
    )]);
    assert_eq!(
        errors(d.path()),
        [
            "farms/web2.toml:3:8: farms `web` and `web2` both listen on 10.0.0.100:80/tcp ("
                .to_owned()
                + &d.path().join("farms/web.toml").display().to_string()
                + ")"
        ]
    );
    // A different protocol on the same port does not collide.
    let d = dir(&[(
        "farms/dns.toml",
        &WEB.replace("name = \"web\"", "name = \"dns\"").replacen(
            "port = 80\n",
            "port = 80\nprotocol = \"udp\"\n",
            1,
        ),
    )]);
    assert!(Config::load(d.path()).is_ok());
    // A farm whose name is not its file's: both the misnaming and the
    // duplicate are reported.
    let d = dir(&[(
        "farms/other.toml",
        &WEB.replacen("port = 80\n", "port = 81\n", 1),
    )]);
    let e = errors(d.path());
    assert_eq!(e.len(), 2, "{e:#?}");
    assert!(
        e.iter()
            .any(|e| e
                .starts_with("farms/other.toml:1:8: farm `web` must be in a file named web.toml")),
        "{e:#?}"
    );
    assert!(
        e.iter()
            .any(|e| e.contains("farm `web` is also defined in")),
        "{e:#?}"
    );
}

#[test]
fn snat_to_a_non_floating_address_is_refused_with_the_reason() {
    let e = one_error(&[(
        "farms/web.toml",
        &WEB.replace(
            "snat_address = \"10.1.0.100\"",
            "snat_address = \"10.1.0.1\"",
        ),
    )]);
    assert!(
        e.starts_with(
            "farms/web.toml:4:16: farm `web`: snat_address 10.1.0.1 is not a floating IP"
        ),
        "{e}"
    );
    assert!(e.contains("answer the dead node"), "{e}");
}

#[test]
fn failback_to_an_unknown_node_lists_the_nodes() {
    let e = one_error(&[(
        "cluster.toml",
        &CLUSTER.replace("failback = \"none\"", "failback = \"lb3\""),
    )]);
    assert_eq!(
        e,
        "cluster.toml:2:12: cluster: failback names node `lb3`, which is not one of the nodes (lb1, lb2); use \"none\" or a node name"
    );
}

#[test]
fn every_error_is_reported_at_once() {
    let d = dir(&[
        (
            "farms/web.toml",
            &WEB.replace("10.1.0.12", "10.1.0.11")
                .replace("timeout_ms = 1000", "timeout_ms = 3000"),
        ),
        (
            "cluster.toml",
            &CLUSTER.replace("virtual_router_id = 51", "virtual_router_id = 0"),
        ),
        ("farms/bad.toml", "name = \"bad\"\nvip = 1\n"),
    ]);
    let e = errors(d.path());
    assert_eq!(e.len(), 4, "{e:#?}");
}

#[test]
fn a_missing_node_file_says_what_is_needed() {
    let d = tempfile::tempdir().expect("tempdir");
    let e = errors(d.path());
    assert_eq!(e.len(), 1);
    assert!(
        e[0].starts_with("node.toml: missing: every node needs node.toml"),
        "{e:?}"
    );
}

#[test]
fn a_standalone_node_needs_only_its_name() {
    let d = tempfile::tempdir().expect("tempdir");
    fs::write(d.path().join("node.toml"), "name = \"solo\"\n").expect("write");
    let c = Config::load(d.path()).expect("valid");
    assert!(c.cluster.is_none());
    assert!(c.farms.is_empty());
}

#[test]
fn a_clustered_node_must_be_one_of_the_nodes() {
    let e = one_error(&[("node.toml", &NODE.replace("lb1", "lb9"))]);
    assert_eq!(
        e,
        "cluster.toml:7:1: this node, `lb9` (node.toml), is not one of the cluster's nodes (lb1, lb2)"
    );
    let e = one_error(&[("node.toml", &NODE.replace("192.168.100.1", "192.168.100.7"))]);
    assert!(
        e.starts_with("node.toml:3:19: cluster_address 192.168.100.7 differs"),
        "{e}"
    );
}

#[test]
fn files_that_are_not_toml_are_ignored() {
    let d = dir(&[
        ("farms/web.toml.tmp", "garbage"),
        ("farms/.web.toml.swp", "garbage"),
    ]);
    assert!(Config::load(d.path()).is_ok());
}
