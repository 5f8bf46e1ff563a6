//! What a node announces: every withdrawal reason, and lb-forwarder's
//! grace, with time as an argument.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use routed::decide::{Datapath, FarmView, ForwarderView, Liveness, announced, decide};

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn farm(name: &str, vip: &str, healthy: bool) -> FarmView {
    FarmView {
        name: name.into(),
        vip: ip(vip),
        dsr: true,
        healthy,
    }
}

fn configured() -> Vec<(String, IpAddr)> {
    vec![
        ("web".into(), ip("10.0.0.100")),
        ("tls".into(), ip("10.0.0.100")),
        ("api".into(), ip("10.0.0.101")),
    ]
}

#[test]
fn healthy_farms_are_announced() {
    let dp = Datapath::Ready(vec![
        farm("web", "10.0.0.100", true),
        farm("tls", "10.0.0.100", true),
        farm("api", "10.0.0.101", true),
    ]);
    let d = decide(&configured(), &dp, None);
    assert_eq!(d.len(), 2);
    assert_eq!(d[0].farms, ["tls", "web"]);
    assert!(d.iter().all(|d| d.announce && d.reason.is_empty()));
    assert_eq!(announced(&d).len(), 2);
}

#[test]
fn a_vip_is_withdrawn_when_none_of_its_farms_has_a_healthy_backend() {
    let dp = Datapath::Ready(vec![
        farm("web", "10.0.0.100", false),
        farm("tls", "10.0.0.100", true),
        farm("api", "10.0.0.101", false),
    ]);
    let d = decide(&configured(), &dp, None);
    assert!(d[0].announce, "tls still serves on 10.0.0.100");
    assert!(!d[1].announce);
    assert_eq!(d[1].reason, "farm api has no healthy backend");

    let dp = Datapath::Ready(vec![
        farm("web", "10.0.0.100", false),
        farm("tls", "10.0.0.100", false),
    ]);
    let d = decide(&configured(), &dp, None);
    assert_eq!(
        d[0].reason,
        "no farm on it has a healthy backend (web, tls)"
    );
    assert_eq!(d[1].reason, "not in the datapath yet (farm api)");
}

#[test]
fn maintenance_and_an_unready_datapath_withdraw_everything() {
    let dp = Datapath::Ready(vec![farm("web", "10.0.0.100", true)]);
    let d = decide(&configured(), &dp, Some("kernel upgrade"));
    assert!(
        d.iter()
            .all(|d| !d.announce && d.reason == "maintenance: kernel upgrade")
    );
    let d = decide(&configured(), &dp, Some(""));
    assert_eq!(d[0].reason, "maintenance");

    let d = decide(&configured(), &Datapath::NotReady("x".into()), None);
    assert!(d.iter().all(|d| d.reason == "datapath not ready: x"));
}

#[test]
fn nat_farms_are_never_announced() {
    let mut nat = farm("web", "10.0.0.100", true);
    nat.dsr = false;
    let d = decide(&[], &Datapath::Ready(vec![nat]), None);
    assert!(d.is_empty());
}

#[test]
fn an_unanswered_forwarder_is_trusted_for_the_grace_only() {
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let mut l = Liveness::new(ms(3000));
    assert!(matches!(l.datapath(t0), Datapath::NotReady(m) if m == "lb-forwarder not asked yet"));
    l.failed(t0, "not running".into());
    assert!(
        matches!(l.datapath(t0), Datapath::NotReady(m) if m.contains("has not answered yet: not running"))
    );

    let view = ForwarderView {
        loaded: true,
        farms: vec![farm("web", "10.0.0.100", true)],
    };
    l.answered(t0 + ms(100), view.clone());
    assert!(matches!(l.datapath(t0 + ms(100)), Datapath::Ready(_)));
    // It stops answering: still ready within the grace of its last answer.
    l.failed(t0 + ms(300), "connection refused".into());
    assert!(matches!(l.datapath(t0 + ms(3000)), Datapath::Ready(_)));
    assert!(
        matches!(l.datapath(t0 + ms(3101)), Datapath::NotReady(m) if m == "lb-forwarder does not answer: connection refused")
    );
    // Back: ready at once.
    l.answered(t0 + ms(4000), view);
    assert!(matches!(l.datapath(t0 + ms(4000)), Datapath::Ready(_)));

    // Answering but with its table not loaded: not ready.
    l.answered(
        t0 + ms(5000),
        ForwarderView {
            loaded: false,
            farms: vec![],
        },
    );
    assert!(matches!(l.datapath(t0 + ms(5000)), Datapath::NotReady(m) if m.contains("not loaded")));
}
