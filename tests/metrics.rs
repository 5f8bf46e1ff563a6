//! The opt-in Prometheus endpoint: the real daemons in network namespaces
//! with `metrics_listen` set, scraped over HTTP on the namespace's loopback.
//! Controls: no listener while `metrics_listen` is absent, and the values
//! follow what the daemons really do (a lone vrrpd is master; a backend
//! nothing listens on is failing and gets no packets).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tandem_e2e::forwarder_lab::FwdLab;
use tandem_e2e::vrrp_lab::{ClusterOptions, VrrpLab};
use tandem_lab::{Lab, Netns};
use tandem_proto::v1;

const BASE: u16 = 9100;

/// One scrape: (Content-Type, body), or the connect error.
fn scrape(ns: &Netns, port: u16) -> std::io::Result<(String, String)> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n")?;
        let mut raw = String::new();
        s.read_to_string(&mut raw)?;
        Ok(raw)
    })
    .expect("namespace thread")
    .map(|raw| {
        let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let ctype = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-type: ")
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        (ctype, body.to_owned())
    })
}

/// Scrapes until `cond` holds on the body (the daemon may still be
/// binding, or the state still converging); panics with the last body.
fn scrape_until(ns: &Netns, port: u16, what: &str, cond: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let last = scrape(ns, port);
        if let Ok((_, body)) = &last
            && cond(body)
        {
            return body.clone();
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what} on port {port}; last scrape: {last:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The value of the sample `series` (name with its labels, as printed).
fn value(body: &str, series: &str) -> Option<f64> {
    body.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.split(' ').next())
            .and_then(|v| v.parse().ok())
    })
}

fn expect(body: &str, series: &str) -> f64 {
    value(body, series).unwrap_or_else(|| panic!("no {series} in\n{body}"))
}

fn refused(ns: &Netns, port: u16) -> bool {
    matches!(scrape(ns, port), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

fn append(path: &Path, text: &str) {
    let mut s = std::fs::read_to_string(path).expect("read");
    s.push_str(text);
    std::fs::write(path, s).expect("write");
}

#[test]
fn a_lone_vrrpd_reports_master_and_its_adverts_and_a_node_without_metrics_listen_has_no_listener() {
    let mut lab = VrrpLab::new(&ClusterOptions::default());
    append(
        &lab.node("lb1").config_dir.join("node.toml"),
        &format!("metrics_listen = \"127.0.0.1:{BASE}\"\n"),
    );
    lab.start("lb1");
    lab.wait_until(Duration::from_secs(10), "lb1 master", |l| {
        l.state("lb1") == Some(v1::VrrpState::Master)
    });
    let ns = &lab.nodes[0].ns;
    let (ctype, _) = scrape(ns, BASE).expect("vrrpd serves /metrics");
    assert_eq!(
        ctype,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let body = scrape_until(ns, BASE, "adverts", |b| {
        value(b, "tandem_vrrp_adverts_sent_total").unwrap_or(0.0) >= 3.0
    });
    assert!(
        body.contains("tandem_build_info{daemon=\"vrrpd\",version=\""),
        "{body}"
    );
    assert_eq!(expect(&body, "tandem_vrrp_state{state=\"master\"}"), 1.0);
    assert_eq!(expect(&body, "tandem_vrrp_state{state=\"backup\"}"), 0.0);
    assert_eq!(expect(&body, "tandem_vrrp_master"), 1.0);
    assert_eq!(expect(&body, "tandem_vrrp_vrid"), 51.0);
    assert_eq!(expect(&body, "tandem_vrrp_became_master_total"), 1.0);
    assert_eq!(
        expect(
            &body,
            "tandem_vrrp_transitions_total{from=\"backup\",to=\"master\"}"
        ),
        1.0
    );
    // Alone on the link: nothing heard.
    assert_eq!(expect(&body, "tandem_vrrp_adverts_received_total"), 0.0);
    assert!(body.ends_with("# EOF\n"), "{body}");

    // The peer comes up without metrics_listen: no port of the range is
    // open in its namespace, although its vrrpd runs (backup to lb1).
    lab.start("lb2");
    lab.wait_until(Duration::from_secs(10), "lb2 backup", |l| {
        l.state("lb2") == Some(v1::VrrpState::Backup)
    });
    for port in BASE..BASE + 5 {
        assert!(refused(&lab.nodes[1].ns, port), "lb2 listens on {port}");
    }
    // A backup is silent: lb1 still hears nothing and stays master.
    let body = scrape(&lab.nodes[0].ns, BASE).expect("scrape").1;
    assert_eq!(expect(&body, "tandem_vrrp_master"), 1.0, "lb1 stays master");
}

const FARM: &str = r#"
name = "web"
vip = "10.0.0.100"
port = 80
scheduler = "rr"
snat_address = "10.1.0.100"
[health_check]
kind = "tcp"
interval_ms = 200
timeout_ms = 100
rise = 1
fall = 1
[[backends]]
address = "10.1.0.11"
port = 8080
[[backends]]
address = "10.1.0.12"
port = 8080
[[backends]]
address = "10.1.0.13"
port = 8081
"#;

#[test]
fn lb_forwarder_reports_backend_health_and_counters_once_metrics_listen_is_reloaded_in() {
    // 10.1.0.13 listens on 8080 only: its backend on 8081 fails its check.
    let lab = FwdLab::new(FARM);
    let port = BASE + 1;
    assert!(refused(&lab.lb, port), "no listener before metrics_listen");

    std::fs::write(
        lab.config.join("node.toml"),
        format!("name = \"lb1\"\nmetrics_listen = \"127.0.0.1:{BASE}\"\n"),
    )
    .expect("node.toml");
    let reply = lab.rpc(async |mut c| {
        c.reload(v1::ReloadRequest {})
            .await
            .expect("Reload")
            .into_inner()
    });
    assert!(reply.applied, "{:?}", reply.errors);

    let health = |b: &str| format!("tandem_lb_backend_health{{farm=\"web\",backend=\"{b}\"}}");
    let body = scrape_until(&lab.lb, port, "health verdicts", |b| {
        value(b, &health("10.1.0.11:8080")) == Some(1.0)
            && value(b, &health("10.1.0.12:8080")) == Some(1.0)
            && value(b, &health("10.1.0.13:8081")) == Some(0.0)
            && value(b, "tandem_lb_farm_backends_in_rotation{farm=\"web\"}") == Some(2.0)
    });
    assert!(
        body.contains("tandem_build_info{daemon=\"lb-forwarder\""),
        "{body}"
    );
    assert_eq!(
        expect(
            &body,
            "tandem_lb_backend_in_rotation{farm=\"web\",backend=\"10.1.0.13:8081\"}"
        ),
        0.0
    );
    assert!(
        refused(&lab.lb, BASE),
        "lb-forwarder is not on vrrpd's port"
    );

    let spread = lab.spread(6);
    assert_eq!(spread.get("b1"), Some(&3), "{spread:?}");
    assert_eq!(spread.get("b2"), Some(&3), "{spread:?}");
    // Counters are sampled once a second, not at each scrape.
    let counted =
        |b: &str| format!("tandem_lb_backend_packets_total{{farm=\"web\",backend=\"{b}\"}}");
    let body = scrape_until(&lab.lb, port, "the connections counted", |b| {
        value(b, &counted("10.1.0.11:8080")).is_some_and(|v| v > 0.0)
            && value(b, &counted("10.1.0.12:8080")).is_some_and(|v| v > 0.0)
    });
    let packets = |b: &str| {
        expect(
            &body,
            &format!("tandem_lb_backend_packets_total{{farm=\"web\",backend=\"{b}\"}}"),
        )
    };
    let (p1, p2, p3) = (
        packets("10.1.0.11:8080"),
        packets("10.1.0.12:8080"),
        packets("10.1.0.13:8081"),
    );
    assert!(p1 > 0.0 && p2 > 0.0, "{p1} {p2}");
    assert_eq!(p3, 0.0, "the failing backend got no traffic");
    assert_eq!(
        expect(&body, "tandem_lb_farm_packets_total{farm=\"web\"}"),
        p1 + p2 + p3
    );
    assert_eq!(
        expect(&body, "tandem_lb_farm_backends_in_rotation{farm=\"web\"}"),
        2.0
    );
    assert_eq!(expect(&body, "tandem_lb_datapath_loaded"), 1.0);
    assert!(expect(&body, "tandem_lb_datapath_applies_total") >= 1.0);
    assert!(expect(&body, "tandem_lb_datapath_last_apply_seconds") > 0.0);
    assert_eq!(expect(&body, "tandem_lb_counters_readable"), 1.0);

    // Removing metrics_listen closes the endpoint.
    std::fs::write(lab.config.join("node.toml"), "name = \"lb1\"\n").expect("node.toml");
    lab.rpc(async |mut c| c.reload(v1::ReloadRequest {}).await.expect("Reload"));
    let deadline = Instant::now() + Duration::from_secs(5);
    while !refused(&lab.lb, port) {
        assert!(Instant::now() < deadline, "endpoint still open");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn every_daemon_of_a_node_serves_on_its_own_port_offset() {
    let lab = Lab::new().expect("lab");
    let ns = lab.netns("node").expect("netns");
    let tmp = tempfile::tempdir().expect("tempdir");
    let (config, runtime) = (tmp.path().join("etc"), tmp.path().join("run"));
    std::fs::create_dir_all(config.join("farms")).expect("mkdir");
    std::fs::write(
        config.join("node.toml"),
        format!("name = \"lb1\"\nmetrics_listen = \"127.0.0.1:{BASE}\"\n"),
    )
    .expect("node.toml");
    let daemons = ["vrrpd", "lb-forwarder", "conntrack-syncd", "cfg-syncd"];
    let _children: Vec<_> = daemons
        .iter()
        .map(|d| {
            let mut cmd = Command::new(tandem_e2e::bin(d));
            cmd.arg("--config-dir")
                .arg(&config)
                .arg("--runtime-dir")
                .arg(&runtime)
                .arg("--state-dir")
                .arg(tandem_e2e::state_dir_beside(&runtime))
                .env("RUST_LOG", "info")
                .env_remove("JOURNAL_STREAM");
            let child = lab.spawn(&ns, &mut cmd).expect("spawn");
            tandem_lab::wait_for_unix_socket(
                &runtime.join(format!("{d}.sock")),
                Duration::from_secs(10),
            )
            .expect("serving");
            child
        })
        .collect();
    let mut bodies = Vec::new();
    for (offset, d) in (0u16..).zip(daemons) {
        let body = scrape_until(&ns, BASE + offset, d, |b| {
            b.contains(&format!("tandem_build_info{{daemon=\"{d}\""))
        });
        bodies.push(body);
    }
    // Every daemon reports its own process: CPU, memory, descriptors, start.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    for (d, body) in daemons.iter().zip(&bodies) {
        assert!(expect(body, "process_cpu_seconds_total") >= 0.0, "{d}");
        assert!(expect(body, "process_resident_memory_bytes") > 1e6, "{d}");
        assert!(expect(body, "process_open_fds") >= 3.0, "{d}");
        assert!(expect(body, "process_threads") >= 1.0, "{d}");
        let started = expect(body, "process_start_time_seconds");
        assert!(
            now - started < 600.0 && started <= now + 1.0,
            "{d}: {started}"
        );
    }
    // clustermanager's offset (+4) is free: nothing else took it.
    assert!(refused(&ns, BASE + 4));
    // Standalone (no cluster.toml): each daemon says so.
    assert_eq!(
        expect(&bodies[0], "tandem_vrrp_state{state=\"standalone\"}"),
        1.0
    );
    assert_eq!(expect(&bodies[0], "tandem_vrrp_master"), 0.0);
    assert_eq!(
        expect(
            &bodies[2],
            "tandem_conntrack_sync_role{role=\"standalone\"}"
        ),
        1.0
    );
    assert_eq!(expect(&bodies[2], "tandem_conntrack_sync_running"), 0.0);
    // One direction in force (which one follows vrrpd's standalone state).
    let directions: f64 = ["none", "push", "receive"]
        .iter()
        .map(|d| {
            expect(
                &bodies[3],
                &format!("tandem_cfg_sync_direction{{direction=\"{d}\"}}"),
            )
        })
        .sum();
    assert_eq!(directions, 1.0);
    assert_eq!(expect(&bodies[3], "tandem_cfg_sync_peer_connected"), 0.0);
    assert_eq!(
        expect(&bodies[3], "tandem_cfg_sync_last_success_timestamp_seconds"),
        0.0
    );
    assert_eq!(expect(&bodies[3], "tandem_cfg_sync_errors_total"), 0.0);
}

#[test]
fn conntrack_replication_shows_on_both_nodes_and_the_backup_hears_the_masters_adverts() {
    let mut lab = tandem_e2e::conntrack_lab::ClusterLab::new();
    for node in ["lb1", "lb2"] {
        append(
            &lab.node(node).config_dir.join("node.toml"),
            &format!("metrics_listen = \"127.0.0.1:{BASE}\"\n"),
        );
    }
    lab.start_cluster(true);
    let conns = lab.connect_many(20);
    lab.wait_for(
        "the backup to hold the flows",
        Duration::from_secs(5),
        |l| l.vip_entries("lb2") >= 20,
    );
    let sync = BASE + 2;
    let (ns1, ns2) = (&lab.node("lb1").ns, &lab.node("lb2").ns);
    let master = scrape_until(ns1, sync, "records sent", |b| {
        value(b, "tandem_conntrack_sync_records_sent_total").unwrap_or(0.0) >= 20.0
    });
    // Records count changes (a flow's New and its Updates), so wait for the
    // entries themselves.
    let backup = scrape_until(ns2, sync, "entries injected", |b| {
        value(b, "tandem_conntrack_sync_records_received_total").unwrap_or(0.0) >= 20.0
            && value(b, "tandem_conntrack_sync_entries_injected").unwrap_or(0.0) >= 20.0
    });
    assert_eq!(
        expect(&master, "tandem_conntrack_sync_role{role=\"sender\"}"),
        1.0
    );
    assert_eq!(
        expect(&backup, "tandem_conntrack_sync_role{role=\"receiver\"}"),
        1.0
    );
    for body in [&master, &backup] {
        assert_eq!(expect(body, "tandem_conntrack_sync_running"), 1.0);
        assert_eq!(expect(body, "tandem_conntrack_sync_peer_alive"), 1.0);
        assert_eq!(expect(body, "tandem_conntrack_sync_lost_total"), 0.0);
        assert_eq!(
            expect(
                body,
                "tandem_conntrack_sync_rejected_total{reason=\"authentication\"}"
            ),
            0.0
        );
    }
    assert!(expect(&backup, "tandem_conntrack_sync_entries_injected") >= 20.0);
    assert_eq!(
        expect(&master, "tandem_conntrack_sync_records_received_total"),
        0.0,
        "the backup sends no flows of its own"
    );

    let backup_vrrp = scrape_until(ns2, BASE, "adverts from the master", |b| {
        value(b, "tandem_vrrp_adverts_received_total").unwrap_or(0.0) >= 3.0
    });
    assert_eq!(expect(&backup_vrrp, "tandem_vrrp_master"), 0.0);
    assert_eq!(
        expect(&backup_vrrp, "tandem_vrrp_state{state=\"backup\"}"),
        1.0
    );
    assert_eq!(expect(&backup_vrrp, "tandem_vrrp_adverts_sent_total"), 0.0);
    drop(conns);
}

#[test]
fn a_taken_port_does_not_stop_the_daemon_and_a_reload_retries_it() {
    let lab = Lab::new().expect("lab");
    let ns = lab.netns("node").expect("netns");
    let tmp = tempfile::tempdir().expect("tempdir");
    let (config, runtime) = (tmp.path().join("etc"), tmp.path().join("run"));
    std::fs::create_dir_all(&config).expect("mkdir");
    std::fs::write(
        config.join("node.toml"),
        format!("name = \"lb1\"\nmetrics_listen = \"127.0.0.1:{BASE}\"\n"),
    )
    .expect("node.toml");
    // Someone else holds vrrpd's port.
    let squatter = ns
        .run(|| std::net::TcpListener::bind(("127.0.0.1", BASE)))
        .expect("ns")
        .expect("bind");
    let mut cmd = Command::new(tandem_e2e::bin("vrrpd"));
    cmd.arg("--config-dir")
        .arg(&config)
        .arg("--runtime-dir")
        .arg(&runtime)
        .arg("--state-dir")
        .arg(tandem_e2e::state_dir_beside(&runtime))
        .env("RUST_LOG", "info")
        .env_remove("JOURNAL_STREAM");
    let mut vrrpd = lab.spawn(&ns, &mut cmd).expect("spawn");
    tandem_lab::wait_for_unix_socket(&runtime.join("vrrpd.sock"), Duration::from_secs(10))
        .expect("vrrpd serves gRPC although its metrics port is taken");
    drop(squatter);
    assert!(refused(&ns, BASE), "nobody listens once the squatter left");
    vrrpd
        .kill(nix::sys::signal::Signal::SIGHUP)
        .expect("SIGHUP");
    let body = scrape_until(&ns, BASE, "vrrpd's endpoint after the reload", |b| {
        b.contains("tandem_build_info{daemon=\"vrrpd\"")
    });
    assert_eq!(
        expect(&body, "tandem_vrrp_state{state=\"standalone\"}"),
        1.0
    );
}
