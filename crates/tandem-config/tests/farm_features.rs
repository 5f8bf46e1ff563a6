//! The farm features of IPVS and keepalived — schedulers, persistence,
//! thresholds, the sorry server, timeouts, one-packet scheduling, firewall
//! marks — and the node's `[hooks]`: what loads, and every refusal at its
//! line and column.

mod common;

use common::{NODE, WEB, dir, errors, one_error};
use tandem_config::{Config, OnBackendFailure, Scheduler};

/// The base web farm with `extra` inserted after its `snat_address` line
/// (top-level keys) — line 5 onwards.
fn web_plus(extra: &str) -> String {
    WEB.replacen(
        "snat_address = \"10.1.0.100\"\n",
        &format!("snat_address = \"10.1.0.100\"\n{extra}"),
        1,
    )
}

const UDP: &str = r#"name = "dns"
vip = "10.0.0.100"
port = 53
protocol = "udp"
snat_address = "10.1.0.100"
[health_check]
kind = "none"
[[backends]]
address = "10.1.0.11"
"#;

#[test]
fn every_feature_together_loads() {
    let web = web_plus(
        "scheduler = \"wlc\"\npersistence_timeout_s = 300\npersistence_netmask = \"255.255.255.0\"\non_backend_failure = \"reset\"\n",
    ) + "upper_threshold = 100\nlower_threshold = 50\n\n[sorry_server]\naddress = \"10.1.0.99\"\nport = 8080\n\n[timeouts]\ntcp_s = 900\ntcp_fin_s = 30\n";
    let dns = UDP.replace(
        "protocol = \"udp\"\n",
        "protocol = \"udp\"\none_packet = true\nscheduler = \"mh\"\nhash_source_port = true\n",
    ) + "[timeouts]\nudp_s = 5\n";
    let marked = "name = \"marked\"\nvip = \"10.0.0.100\"\nport = \"80-443\"\nfwmark = 7\nscheduler = \"dh\"\nsnat_address = \"10.1.0.100\"\n[[backends]]\naddress = \"10.1.0.21\"\n";
    let d = dir(&[
        ("farms/web.toml", &web),
        ("farms/dns.toml", &dns),
        ("farms/marked.toml", marked),
    ]);
    let c = Config::load(d.path()).expect("valid");
    let web = c.farms.iter().find(|f| f.name == "web").expect("web");
    assert_eq!(web.scheduler, Scheduler::Wlc);
    assert_eq!(web.persistence_timeout_s, Some(300));
    assert_eq!(web.persistence_prefix(), 24);
    assert_eq!(web.on_backend_failure, OnBackendFailure::Reset);
    assert_eq!(web.backends[1].upper_threshold, Some(100));
    assert_eq!(web.backends[1].lower_threshold, Some(50));
    assert_eq!(
        web.sorry_server.as_ref().map(|s| s.address.to_string()),
        Some("10.1.0.99".into())
    );
    assert_eq!(
        (web.timeouts.tcp_s, web.timeouts.tcp_fin_s),
        (Some(900), Some(30))
    );
    let dns = c.farms.iter().find(|f| f.name == "dns").expect("dns");
    assert!(dns.one_packet && dns.hash_source_port);
    let marked = c.farms.iter().find(|f| f.name == "marked").expect("marked");
    assert_eq!(marked.fwmark, Some(7));
    // What `farm save` writes reads back the same.
    let text = toml::to_string(web).expect("serialize");
    assert!(
        text.contains("persistence_netmask = \"255.255.255.0\""),
        "{text}"
    );
    let back: tandem_config::Farm = toml::from_str(&text).expect("parse back");
    assert_eq!(&back, web);
}

#[test]
fn every_ipvs_scheduler_name_is_known() {
    for s in [
        "rr", "wrr", "lc", "wlc", "sed", "nq", "sh", "dh", "mh", "fo", "ovf",
    ] {
        let d = dir(&[(
            "farms/web.toml",
            &web_plus(&format!("scheduler = \"{s}\"\n")),
        )]);
        let c = Config::load(d.path()).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(c.farms[0].scheduler.as_str(), s);
    }
    let e = one_error(&[("farms/web.toml", &web_plus("scheduler = \"lblc\"\n"))]);
    assert!(
        e.starts_with("farms/web.toml:5:13: unknown variant `lblc`"),
        "{e}"
    );
}

#[test]
fn persistence_settings_are_checked() {
    let e = one_error(&[(
        "farms/web.toml",
        &web_plus("persistence_netmask = \"/24\"\n"),
    )]);
    assert_eq!(
        e,
        "farms/web.toml:5:23: farm `web`: persistence_netmask needs persistence_timeout_s"
    );
    let e = one_error(&[(
        "farms/web.toml",
        &web_plus("persistence_timeout_s = 300\npersistence_netmask = \"255.0.255.0\"\n"),
    )]);
    assert!(
        e.starts_with("farms/web.toml:6:23: netmask `255.0.255.0` is not contiguous"),
        "{e}"
    );
    let e = one_error(&[(
        "farms/web.toml",
        &web_plus("persistence_timeout_s = 300\npersistence_netmask = \"/33\"\n"),
    )]);
    assert_eq!(
        e,
        "farms/web.toml:6:23: farm `web`: persistence_netmask `/33` is longer than an address of the vip's family (/32)"
    );
    let e = one_error(&[("farms/web.toml", &web_plus("persistence_timeout_s = 0\n"))]);
    assert_eq!(
        e,
        "farms/web.toml:5:25: farm `web`: persistence_timeout_s 0 is out of range (1-2592000)"
    );
}

#[test]
fn thresholds_need_an_upper_above_the_lower() {
    let e = one_error(&[("farms/web.toml", &format!("{WEB}lower_threshold = 5\n"))]);
    assert_eq!(
        e,
        "farms/web.toml:17:19: farm `web`: backend 10.1.0.12:8080: lower_threshold needs upper_threshold"
    );
    let e = one_error(&[(
        "farms/web.toml",
        &format!("{WEB}upper_threshold = 5\nlower_threshold = 5\n"),
    )]);
    assert_eq!(
        e,
        "farms/web.toml:18:19: farm `web`: backend 10.1.0.12:8080: lower_threshold (5) must be below upper_threshold (5)"
    );
}

#[test]
fn a_sorry_server_is_of_the_vips_family_and_not_a_backend() {
    let e = one_error(&[(
        "farms/web.toml",
        &format!("{WEB}\n[sorry_server]\naddress = \"fd00::1\"\n"),
    )]);
    assert_eq!(
        e,
        "farms/web.toml:19:11: farm `web`: sorry server fd00::1 and vip 10.0.0.100 are of different families"
    );
    let e = one_error(&[(
        "farms/web.toml",
        &format!("{WEB}\n[sorry_server]\naddress = \"10.1.0.12\"\nport = 8080\n"),
    )]);
    assert_eq!(
        e,
        "farms/web.toml:19:11: farm `web`: the sorry server 10.1.0.12 is also a backend; it answers only when no backend can"
    );
}

#[test]
fn timeouts_follow_the_farms_protocol() {
    let e = one_error(&[(
        "farms/dns.toml",
        &format!("{UDP}\n[timeouts]\ntcp_s = 60\n"),
    )]);
    assert_eq!(
        e,
        "farms/dns.toml:12:9: farm `dns`: tcp_s is a TCP timeout but the farm is udp-only"
    );
    let e = one_error(&[("farms/web.toml", &format!("{WEB}\n[timeouts]\nudp_s = 5\n"))]);
    assert_eq!(
        e,
        "farms/web.toml:19:9: farm `web`: udp_s is a UDP timeout but the farm is tcp-only"
    );
    let d = dir(&[("farms/web.toml", &format!("{WEB}\n[timeouts]\ntcp_s = 0\n"))]);
    assert_eq!(
        errors(d.path()),
        ["farms/web.toml:19:9: farm `web`: tcp_s 0 is out of range (1-2592000)"]
    );
}

#[test]
fn one_packet_scheduling_is_for_udp_farms_only() {
    let e = one_error(&[("farms/web.toml", &web_plus("one_packet = true\n"))]);
    assert_eq!(
        e,
        "farms/web.toml:5:14: farm `web`: one-packet scheduling is for udp farms (protocol = \"udp\")"
    );
    let e = one_error(&[(
        "farms/dns.toml",
        &UDP.replace(
            "protocol = \"udp\"\n",
            "protocol = \"udp\"\none_packet = true\npersistence_timeout_s = 60\n",
        ),
    )]);
    assert!(e.contains("contradict each other"), "{e}");
}

#[test]
fn hash_source_port_belongs_to_sh_and_mh() {
    let e = one_error(&[("farms/web.toml", &web_plus("hash_source_port = true\n"))]);
    assert_eq!(
        e,
        "farms/web.toml:5:20: farm `web`: hash_source_port applies to the sh and mh schedulers only"
    );
}

#[test]
fn firewall_mark_farms_are_matched_by_mark_only() {
    let a = web_plus("fwmark = 1\n");
    let b = "name = \"b\"\nvip = \"10.0.0.100\"\nport = 80\nfwmark = 1\nsnat_address = \"10.1.0.100\"\n";
    let e = one_error(&[("farms/web.toml", &a), ("farms/b.toml", b)]);
    assert!(
        e.starts_with("farms/web.toml:5:10: farms `b` and `web` both serve firewall mark 0x1"),
        "{e}"
    );
    // A mark farm and a vip farm on the same vip and port do not collide:
    // the mark decides.
    let c = b.replace("fwmark = 1", "fwmark = 2");
    let d = dir(&[("farms/b.toml", &c)]);
    Config::load(d.path()).expect("no collision");
    let e = one_error(&[("farms/web.toml", &web_plus("fwmark = 0\n"))]);
    assert!(e.contains("fwmark must be 1-4294967295"), "{e}");
}

#[test]
fn direct_server_return_refuses_what_needs_connection_state() {
    let dsr = WEB
        .replace("snat_address = \"10.1.0.100\"\n", "forwarding = \"dsr\"\n")
        .replace("port = 8080\n", "");
    for (extra, key) in [
        (
            "scheduler = \"wlc\"\n",
            "weighted least connections (wlc) cannot be used",
        ),
        ("scheduler = \"ovf\"\n", "overflow (ovf) cannot be used"),
        (
            "persistence_timeout_s = 60\n",
            "persistence needs connection state",
        ),
        ("on_backend_failure = \"reset\"\n", "needs connection state"),
        ("fwmark = 3\n", "cannot use direct server return"),
    ] {
        let farm = dsr.replacen(
            "forwarding = \"dsr\"\n",
            &format!("forwarding = \"dsr\"\n{extra}"),
            1,
        );
        let e = one_error(&[("farms/web.toml", &farm)]);
        assert!(e.contains(key), "{extra}: {e}");
    }
    for s in ["rr", "wrr", "sh", "dh", "mh", "fo"] {
        let farm = dsr.replacen(
            "forwarding = \"dsr\"\n",
            &format!("forwarding = \"dsr\"\nscheduler = \"{s}\"\n"),
            1,
        );
        let d = dir(&[("farms/web.toml", &farm)]);
        Config::load(d.path()).unwrap_or_else(|e| panic!("{s} with dsr: {e}"));
    }
}

#[test]
fn hooks_are_absolute_paths_with_a_bounded_timeout() {
    let node = format!(
        "{NODE}\n[hooks]\nmaster = \"/etc/tandem/hooks/master\"\nnotify = \"/usr/local/bin/page\"\ntimeout_ms = 5000\n"
    );
    let d = dir(&[("node.toml", &node)]);
    let c = Config::load(d.path()).expect("valid");
    assert_eq!(
        c.node.hooks.for_event("master"),
        ["/etc/tandem/hooks/master", "/usr/local/bin/page"]
    );
    assert_eq!(c.node.hooks.for_event("backup"), ["/usr/local/bin/page"]);
    assert_eq!(c.node.hooks.timeout_ms, 5000);
    let node = format!("{NODE}\n[hooks]\nbackup = \"hooks/backup.sh\"\ntimeout_ms = 10\n");
    let d = dir(&[("node.toml", &node)]);
    assert_eq!(
        errors(d.path()),
        [
            "node.toml:6:10: hooks: backup = `hooks/backup.sh` must be an absolute path to an executable",
            "node.toml:7:14: hooks: timeout_ms 10 is out of range (100-3600000)",
        ]
    );
    let e = one_error(&[(
        "node.toml",
        &format!("{NODE}\n[hooks]\nstop = \"/bin/true\"\n"),
    )]);
    assert!(e.starts_with("node.toml:6:1: unknown field `stop`"), "{e}");
}

/// The examples of docs/configuration.md load as they are written.
#[test]
fn the_documented_examples_are_valid() {
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/configuration.md"),
    )
    .expect("docs/configuration.md");
    let blocks: Vec<&str> = doc
        .split("```toml\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .collect();
    let farm = blocks
        .iter()
        .find(|b| b.contains("scheduler = \"wlc\""))
        .expect("the farm example");
    let hooks = blocks
        .iter()
        .find(|b| b.starts_with("[hooks]"))
        .expect("the hooks example");
    let d = common::write(&[
        ("node.toml", &format!("name = \"lb1\"\n{hooks}")),
        ("farms/web.toml", farm),
    ]);
    let c = Config::load(d.path()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.farms[0].backends[0].upper_threshold, Some(100));
    assert_eq!(c.node.hooks.timeout_ms, 10_000);
}
