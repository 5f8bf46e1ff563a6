//! Loading real directories: which files count, parse errors with their
//! exact position, every error at once, and the shipped examples.

mod common;

use std::fs;
use std::path::PathBuf;

use common::{CLUSTER, WEB, dir, errors, one_error, web_with, write};
use tandem_config::{
    BackendState, Config, ConfigError, Failback, Forwarding, HealthCheckKind, PortRange, Protocol,
    Scheduler,
};

#[test]
fn the_base_fixture_is_valid() {
    let d = dir(&[]);
    let c = Config::load(d.path()).expect("valid");
    assert_eq!(c.node.name, "lb1");
    let cluster = c.cluster.expect("clustered");
    assert_eq!(cluster.failback, Failback::None);
    assert_eq!(cluster.vrrp.version, 3);
    assert_eq!(cluster.vrrp.advert_interval_ms, 100);
    assert_eq!(cluster.vrrp.garp_repeat, 3);
    assert_eq!(cluster.vrrp.garp_lower_prio_repeat, 3);
    assert_eq!(cluster.vrrp.garp_lower_prio_delay_ms, 1000);
    assert_eq!(cluster.vrrp.garp_refresh_s, 0);
    assert_eq!(cluster.vrrp.preempt_delay_s, 5);
    assert!(cluster.vrrp.members_only);
    assert_eq!(cluster.vrrp.floating_ip_lifetime_s, None);
    assert_eq!(cluster.vrrp.rt_priority, 10);
    assert_eq!(cluster.hash_seed, 0x7a6e_6465);
    assert_eq!(cluster.sync.conntrack_port, 3780);
    assert_eq!(cluster.sync.conntrack_queue_limit, 131_072);
    assert_eq!(cluster.sync.conntrack_lag_threshold_ms, 1000);
    assert_eq!(cluster.nodes[1].priority, 100);
    assert_eq!(cluster.floating_ips[1].address.to_string(), "10.1.0.100/24");
    assert_eq!(c.farms.len(), 1);
    let web = &c.farms[0];
    assert_eq!(web.port, PortRange::single(80));
    assert_eq!(web.protocol, Protocol::Tcp);
    assert_eq!(web.scheduler, Scheduler::Rr);
    assert_eq!(web.forwarding, Forwarding::Nat);
    assert_eq!(web.health_check.kind, HealthCheckKind::Tcp);
    assert_eq!(web.backends[0].weight, 1);
    assert_eq!(web.backends[0].state, BackendState::Up);
}

#[test]
fn the_shipped_examples_are_valid() {
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/examples");
    let c = Config::load(&examples).unwrap_or_else(|e| panic!("deploy/examples invalid:\n{e}"));
    assert_eq!(c.node.name, "lb1");
    assert_eq!(c.node.cluster_interface.as_deref(), Some("eth1"));
    assert_eq!(c.node.metrics_listen, None);

    let cluster = c.cluster.as_ref().expect("clustered");
    assert_eq!(cluster.virtual_router_id, 173);
    assert_eq!(cluster.vrrp.advert_interval_ms, 100);
    assert_eq!(cluster.tracked_interfaces, ["eth0", "eth2"]);
    let fips: Vec<String> = cluster
        .floating_ips
        .iter()
        .map(|f| format!("{} {}", f.address, f.interface))
        .collect();
    assert_eq!(fips, ["10.0.0.100/24 eth0", "10.1.0.100/24 eth2"]);

    let names: Vec<&str> = c.farms.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["dns", "ftp-passive", "web"]);
    let [dns, ftp, web] = &c.farms[..] else {
        unreachable!()
    };
    assert_eq!(
        (dns.protocol, dns.scheduler),
        (Protocol::Udp, Scheduler::Sh)
    );
    assert_eq!(dns.health_check.kind, HealthCheckKind::None);
    assert_eq!(dns.backends.len(), 2);
    assert_eq!(
        ftp.port,
        PortRange {
            first: 30000,
            last: 30100
        }
    );
    assert_eq!(ftp.health_check.kind, HealthCheckKind::Command);
    assert_eq!(web.scheduler, Scheduler::Wrr);
    assert_eq!(web.health_check.kind, HealthCheckKind::Http);
    assert_eq!(web.health_check.http_path(), "/health");
    let backends: Vec<String> = web
        .backends
        .iter()
        .map(|b| format!("{}:{}", b.address, b.target_port(80)))
        .collect();
    assert_eq!(
        backends,
        ["10.1.0.11:8080", "10.1.0.12:8080", "10.1.0.13:8080"]
    );
}

#[test]
fn a_type_error_points_at_the_value() {
    let e = one_error(&[(
        "farms/web.toml",
        &web_with("port = 80\n", "port = \"eighty\"\n"),
    )]);
    assert_eq!(
        e,
        "farms/web.toml:3:8: `eighty` is not a port (1-65535) or a range \"lo-hi\""
    );
    let e = one_error(&[("farms/web.toml", &web_with("port = 80\n", "port = 80.5\n"))]);
    assert_eq!(
        e,
        "farms/web.toml:3:8: invalid type: floating point `80.5`, expected a port (1-65535) or a range \"lo-hi\""
    );
    let e = one_error(&[(
        "node.toml",
        "name = \"lb1\"\nmetrics_listen = \"localhost\"\n",
    )]);
    assert_eq!(e, "node.toml:2:18: invalid socket address syntax");
}

#[test]
fn an_unknown_key_is_an_error_not_a_silent_default() {
    let e = one_error(&[(
        "farms/web.toml",
        &web_with("port = 8080\n", "prot = 8080\n"),
    )]);
    assert!(
        e.starts_with(
            "farms/web.toml:12:1: unknown field `prot`, expected one of `address`, `port`"
        ),
        "{e}"
    );
    let e = one_error(&[("farms/web.toml", &format!("{WEB}colour = \"blue\"\n"))]);
    assert!(
        e.starts_with("farms/web.toml:17:1: unknown field `colour`"),
        "{e}"
    );
}

#[test]
fn a_syntax_error_points_at_the_line_and_column() {
    let e = one_error(&[(
        "node.toml",
        "name = \"lb1\"\ncluster_interface = = \"eth1\"\n",
    )]);
    assert!(e.starts_with("node.toml:2:21: "), "{e}");
    assert!(
        !e.contains('\n'),
        "the message is one line, without toml's snippet: {e}"
    );
    // A key given twice is a syntax error in TOML, shown at the second one.
    let e = one_error(&[("farms/web.toml", &format!("{WEB}[health_check]\n"))]);
    assert_eq!(e, "farms/web.toml:17:2: duplicate key");
}

#[test]
fn a_missing_required_key_points_at_its_table() {
    let e = one_error(&[("farms/web.toml", &web_with("address = \"10.1.0.12\"\n", ""))]);
    assert_eq!(e, "farms/web.toml:14:1: missing field `address`");
    let e = one_error(&[("farms/web.toml", &web_with("vip = \"10.0.0.100\"\n", ""))]);
    assert_eq!(e, "farms/web.toml:1:1: missing field `vip`");
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
    assert_eq!(
        errors(d.path()),
        [
            "cluster.toml:1:21: cluster: virtual_router_id must be 1-255",
            "farms/bad.toml:2:7: invalid type: integer `1`, expected IP address",
            "farms/web.toml:8:14: farm `web`: timeout_ms (3000) must be less than interval_ms (2000)",
            "farms/web.toml:14:1: farm `web`: backend 10.1.0.11:8080 appears twice",
        ]
    );
}

#[test]
fn a_missing_node_file_says_what_is_needed() {
    let d = tempfile::tempdir().expect("tempdir");
    let errs = Config::load(d.path()).expect_err("invalid");
    assert_eq!(errs.len(), 1);
    let e = &errs.0[0];
    assert_eq!(e.file, d.path().join("node.toml"));
    assert_eq!((e.line, e.column), (None, None));
    assert!(
        e.message
            .starts_with("missing: every node needs node.toml (at least `name = \"...\"`)"),
        "{e}"
    );
}

#[test]
fn an_unreadable_file_gives_the_reason() {
    let d = dir(&[]);
    fs::remove_file(d.path().join("node.toml")).expect("rm");
    fs::create_dir(d.path().join("node.toml")).expect("mkdir");
    let e = errors(d.path());
    assert_eq!(e.len(), 1, "{e:#?}");
    assert!(e[0].starts_with("node.toml: cannot read: "), "{e:?}");
    assert!(e[0].contains("directory"), "{e:?}");
}

#[test]
fn a_standalone_node_needs_only_its_name() {
    let d = write(&[("node.toml", "name = \"solo\"\n")]);
    let c = Config::load(d.path()).expect("valid");
    assert!(c.cluster.is_none());
    assert!(c.farms.is_empty());
    assert!(c.node.api_keys.is_empty());
}

#[test]
fn farms_are_sorted_by_name() {
    let d = dir(&[
        (
            "farms/b.toml",
            &common::WEB
                .replace("\"web\"", "\"b\"")
                .replacen("port = 80\n", "port = 81\n", 1),
        ),
        (
            "farms/a.toml",
            &common::WEB
                .replace("\"web\"", "\"a\"")
                .replacen("port = 80\n", "port = 82\n", 1),
        ),
    ]);
    let c = Config::load(d.path()).expect("valid");
    let names: Vec<&str> = c.farms.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "web"]);
}

#[test]
fn files_that_are_not_toml_are_ignored() {
    let d = dir(&[
        ("farms/web.toml.tmp", "garbage"),
        ("farms/.web.toml.swp", "garbage"),
        ("farms/web.toml~", "garbage"),
        ("farms/.web2.toml", "garbage"),
        ("farms/README", "garbage"),
    ]);
    let c = Config::load(d.path()).expect("valid");
    assert_eq!(c.farms.len(), 1);
}

#[test]
fn a_loaded_config_serializes_back_to_itself() {
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/examples");
    let c = Config::load(&examples).expect("valid");
    let cluster = c.cluster.as_ref().expect("clustered");
    let mut files = vec![
        (
            "node.toml".to_owned(),
            toml::to_string(&c.node).expect("node"),
        ),
        (
            "cluster.toml".to_owned(),
            toml::to_string(cluster).expect("cluster"),
        ),
    ];
    for f in &c.farms {
        files.push((
            format!("farms/{}.toml", f.name),
            toml::to_string(f).expect("farm"),
        ));
    }
    let ftp = &files
        .iter()
        .find(|(n, _)| n == "farms/ftp-passive.toml")
        .expect("ftp")
        .1;
    assert!(ftp.contains("port = \"30000-30100\"\n"), "{ftp}");
    let web = &files
        .iter()
        .find(|(n, _)| n == "farms/web.toml")
        .expect("web")
        .1;
    assert!(web.contains("port = 80\n"), "{web}");
    let cl = &files[1].1;
    assert!(cl.contains("failback = \"none\"\n"), "{cl}");
    assert!(cl.contains("address = \"10.0.0.100/24\"\n"), "{cl}");

    let refs: Vec<(&str, &str)> = files
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    let d = write(&refs);
    assert_eq!(Config::load(d.path()).expect("reloads"), c);
}

#[test]
fn an_error_without_position_shows_only_the_file() {
    let e = ConfigError {
        file: "/etc/tandem/node.toml".into(),
        line: None,
        column: None,
        message: "cannot read: Permission denied (os error 13)".into(),
    };
    assert_eq!(
        e.to_string(),
        "/etc/tandem/node.toml: cannot read: Permission denied (os error 13)"
    );
    let e = ConfigError {
        line: Some(3),
        column: Some(8),
        ..e
    };
    assert_eq!(
        e.to_string(),
        "/etc/tandem/node.toml:3:8: cannot read: Permission denied (os error 13)"
    );
}
