//! lb-forwarder with real traffic in a namespace lab: a client, a balancer
//! node holding the VIP (10.0.0.100) and the floating SNAT source
//! (10.1.0.100), three backends answering with their name.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use tandem_e2e::forwarder_lab::FwdLab;
use tandem_proto::v1;

fn echo(stream: &mut TcpStream, text: &str) -> String {
    writeln!(stream, "{text}").expect("write");
    let mut line = String::new();
    let mut r = BufReader::new(stream.try_clone().expect("clone"));
    r.read_line(&mut line).expect("echo");
    line.trim().to_owned()
}

const FARM: &str = r#"
name = "web"
vip = "10.0.0.100"
port = 80
scheduler = "SCHED"
snat_address = "10.1.0.100"
[health_check]
kind = "none"
[[backends]]
address = "10.1.0.11"
port = 8080
weight = 3
[[backends]]
address = "10.1.0.12"
port = 8080
weight = 2
[[backends]]
address = "10.1.0.13"
port = 8080
weight = 1
"#;

fn counts(m: &HashMap<String, usize>) -> [usize; 3] {
    ["b1", "b2", "b3"].map(|b| m.get(b).copied().unwrap_or(0))
}

#[test]
fn round_robin_spreads_evenly() {
    let lab = FwdLab::new(&FARM.replace("SCHED", "rr"));
    assert_eq!(counts(&lab.spread(30)), [10, 10, 10]);
}

#[test]
fn weighted_round_robin_spreads_by_weight_and_counters_follow() {
    let lab = FwdLab::new(&FARM.replace("SCHED", "wrr"));
    assert_eq!(counts(&lab.spread(30)), [15, 10, 5]);
    let farm = lab.farm();
    let conns: Vec<u64> = farm
        .backends
        .iter()
        .map(|b| b.counters.expect("counters").packets)
        .collect();
    assert!(
        conns.iter().all(|p| *p > 0),
        "every backend's packets counted: {conns:?}"
    );
    let total = farm.counters.expect("farm counters").packets;
    assert_eq!(
        total,
        conns.iter().sum::<u64>(),
        "the farm counts what its backends count"
    );
}

#[test]
fn source_hash_keeps_each_source_on_its_backend() {
    let lab = FwdLab::new(&FARM.replace("SCHED", "sh"));
    let mut owners = HashMap::new();
    for i in 50..58 {
        let src = format!("10.0.0.{i}");
        let first = lab.connect_from(&src).0;
        for _ in 0..4 {
            assert_eq!(lab.connect_from(&src).0, first, "{src} moved");
        }
        owners.insert(src, first);
    }
    let distinct: std::collections::HashSet<_> = owners.values().collect();
    assert!(
        distinct.len() >= 2,
        "8 sources spread over backends: {owners:?}"
    );
}

#[test]
fn least_connections_prefers_the_idle_backends() {
    let lab = FwdLab::new(
        &FARM
            .replace("SCHED", "lc")
            .replace("weight = 3", "weight = 1")
            .replace("weight = 2", "weight = 1"),
    );
    lab.set_state("10.1.0.12", v1::BackendAdminState::Maintenance);
    lab.set_state("10.1.0.13", v1::BackendAdminState::Maintenance);
    let held: Vec<TcpStream> = (0..12)
        .map(|_| {
            let (name, s) = lab.connect_from("10.0.0.50");
            assert_eq!(name, "b1");
            s
        })
        .collect();
    lab.set_state("10.1.0.12", v1::BackendAdminState::Up);
    lab.set_state("10.1.0.13", v1::BackendAdminState::Up);
    // Loads are read from conntrack once a second.
    std::thread::sleep(Duration::from_millis(2500));
    let [b1, b2, b3] = counts(&lab.spread(20));
    assert!(
        b1 <= 2 && b2 >= 7 && b3 >= 7,
        "busy b1 got {b1}, idle b2 {b2}, b3 {b3}"
    );
    drop(held);
}

#[test]
fn restarting_lb_forwarder_does_not_break_established_connections() {
    let mut lab = FwdLab::new(&FARM.replace("SCHED", "rr"));
    let (_, mut conn) = lab.connect_from("10.0.0.50");
    assert_eq!(echo(&mut conn, "before"), "before");
    let mut fwd = lab.fwd.take().expect("running");
    fwd.kill(Signal::SIGKILL).expect("kill -9");
    let _ = fwd.wait_timeout(Duration::from_secs(5));
    assert_eq!(
        echo(&mut conn, "while down"),
        "while down",
        "the kernel keeps serving"
    );
    assert!(
        !lab.connect_from("10.0.0.50").0.is_empty(),
        "new connections too"
    );
    lab.start();
    assert_eq!(echo(&mut conn, "after restart"), "after restart");
}

#[test]
fn an_invalid_farm_file_keeps_the_running_datapath() {
    let mut lab = FwdLab::new(&FARM.replace("SCHED", "rr"));
    std::fs::write(
        lab.config.join("farms/web.toml"),
        FARM.replace("SCHED", "fastest"),
    )
    .expect("break it");
    lab.fwd
        .as_mut()
        .expect("running")
        .kill(Signal::SIGHUP)
        .expect("SIGHUP");
    std::thread::sleep(Duration::from_millis(300));
    let status = lab.status();
    let err = status.daemon.expect("daemon").last_reload_error;
    assert!(
        err.contains("farms/web.toml:5:13"),
        "the refusal names file, line and column: {err}"
    );
    assert_eq!(
        counts(&lab.spread(3)),
        [1, 1, 1],
        "the previous datapath still serves"
    );
}

fn tandemctl(lab: &FwdLab, args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    let mut cmd = Command::new(tandem_e2e::bin("tandemctl"));
    cmd.arg("--runtime-dir")
        .arg(&lab.runtime)
        .arg("--config-dir")
        .arg(&lab.config)
        .args(args);
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("tandemctl");
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("write stdin");
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("tandemctl output");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn tandemctl_lists_sets_saves_restores_and_clears_farms() {
    let lab = FwdLab::new(&FARM.replace("SCHED", "rr"));
    lab.spread(6);
    let (code, out, err) = tandemctl(&lab, &["farm", "stats", "--json"], None);
    assert_eq!(code, 0, "{err}");
    let farms: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(farms[0]["name"], "web");
    assert_eq!(farms[0]["listen"], "10.0.0.100:80/tcp");
    assert!(farms[0]["packets"].as_u64().is_some_and(|p| p > 0), "{out}");

    let (code, _, err) = tandemctl(
        &lab,
        &["backend", "set", "web", "10.1.0.12:8080", "maintenance"],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = tandemctl(&lab, &["farm", "list"], None);
    assert!(
        out.lines()
            .any(|l| l.contains("10.1.0.12:8080") && l.contains("maintenance")),
        "{out}"
    );
    assert_eq!(
        counts(&lab.spread(4))[1],
        0,
        "no new connection to a backend in maintenance"
    );
    let (code, _, err) = tandemctl(&lab, &["backend", "set", "web", "10.9.9.9", "up"], None);
    assert_eq!(code, 1);
    assert!(err.contains("has no backend 10.9.9.9"), "{err}");

    let (code, saved, err) = tandemctl(&lab, &["farm", "save"], None);
    assert_eq!(code, 0, "{err}");
    assert!(
        saved.contains("[[farms]]") && saved.contains("name = \"web\""),
        "{saved}"
    );
    // Restore a changed document: b1 only.
    let only_b1 = saved
        .replace("10.1.0.12", "10.1.0.11")
        .replace("10.1.0.13", "10.1.0.11");
    let (code, _, err) = tandemctl(&lab, &["farm", "restore"], Some(&only_b1));
    assert_eq!(code, 1, "duplicate backends are refused");
    assert!(
        err.contains("appears twice") && err.contains("nothing was changed"),
        "{err}"
    );
    let two = saved.replace("scheduler = \"rr\"", "scheduler = \"wrr\"");
    let (code, _, err) = tandemctl(&lab, &["farm", "restore"], Some(&two));
    assert_eq!(code, 0, "{err}");
    lab.wait_for(Duration::from_secs(5), "the restored farm", |s| {
        s.daemon.as_ref().is_some_and(|d| d.config_generation >= 2)
    });

    let (code, _, err) = tandemctl(&lab, &["farm", "clear"], None);
    assert_eq!(code, 1, "clear wants --yes");
    assert!(err.contains("--yes"), "{err}");
    let (code, _, err) = tandemctl(&lab, &["farm", "clear", "--yes"], None);
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = tandemctl(&lab, &["farm", "list", "--json"], None);
    assert_eq!(out.trim(), "[]");
}

fn health_of(lab: &FwdLab, addr: &str) -> v1::BackendHealth {
    lab.farm()
        .backends
        .iter()
        .find(|b| b.address == addr)
        .expect("backend")
        .health()
}

#[test]
fn a_failing_backend_leaves_the_rotation_within_fall_intervals_and_comes_back() {
    let farm = FARM.replace("SCHED", "rr").replace(
        "[health_check]\nkind = \"none\"",
        "[health_check]\nkind = \"tcp\"\ninterval_ms = 200\ntimeout_ms = 100\nrise = 2\nfall = 2",
    );
    let lab = FwdLab::new(&farm);
    let wait = |what: &str, limit: Duration, cond: &dyn Fn() -> bool| {
        let start = std::time::Instant::now();
        while !cond() {
            assert!(
                start.elapsed() < limit,
                "timed out after {limit:?} waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        start.elapsed()
    };
    wait("all backends healthy", Duration::from_secs(5), &|| {
        lab.farm()
            .backends
            .iter()
            .all(|b| b.health() == v1::BackendHealth::Healthy)
    });
    // Watch the health stream while b2 drops off the network.
    let runtime = lab.runtime.clone();
    let watcher = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async {
            let ch = tandem_runtime::connect(&runtime, "lb-forwarder")
                .await
                .expect("connect");
            let mut stream = v1::lb_forwarder_client::LbForwarderClient::new(ch)
                .watch_health(v1::WatchHealthRequest {})
                .await
                .expect("WatchHealth")
                .into_inner();
            tokio::time::timeout(Duration::from_secs(5), stream.message())
                .await
                .ok()
                .and_then(|m| m.ok().flatten())
        })
    });
    std::thread::sleep(Duration::from_millis(200));
    lab.backends[1]
        .set_link("eth0", false)
        .expect("b2 unreachable");
    // fall (2) x interval (200 ms), plus the probe's timeout and slack.
    let took = wait("b2 to be failing", Duration::from_secs(3), &|| {
        health_of(&lab, "10.1.0.12") == v1::BackendHealth::Failing
    });
    assert!(took < Duration::from_millis(1200), "b2 left after {took:?}");
    let event = watcher
        .join()
        .expect("watcher")
        .expect("a health change on the stream");
    assert_eq!(
        (
            event.farm.as_str(),
            event.address.as_str(),
            event.new_health()
        ),
        ("web", "10.1.0.12", v1::BackendHealth::Failing)
    );
    assert!(event.reason.contains("timeout"), "{}", event.reason);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        counts(&lab.spread(6))[1],
        0,
        "no new connection to the failing backend"
    );

    lab.backends[1].set_link("eth0", true).expect("b2 back");
    wait("b2 to be healthy again", Duration::from_secs(3), &|| {
        health_of(&lab, "10.1.0.12") == v1::BackendHealth::Healthy
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        counts(&lab.spread(6)),
        [2, 2, 2],
        "b2 is back in the rotation"
    );
}

/// Direct server return: the balancer forwards the client's packets to a
/// backend unchanged, and the replies go from the backend straight to the
/// client — none crosses the balancer.
#[test]
fn direct_server_return_replies_bypass_the_balancer() {
    let lab = FwdLab::new_dsr(
        &FARM
            .replace("SCHED", "sh")
            .replace("snat_address = \"10.1.0.100\"", "forwarding = \"dsr\"")
            .replace("port = 8080\n", ""),
    );
    // Count, on the balancer, every packet that comes from the VIP.
    lab.lb
        .exec(
            "nft",
            &[
                "add table ip probe; add chain ip probe c { type filter hook prerouting priority -400; }; add rule ip probe c ip saddr 10.0.0.100 counter",
            ],
        )
        .expect("probe");
    let mut owners = HashMap::new();
    for i in 50..58 {
        let src = format!("10.0.0.{i}");
        let (first, mut stream) = lab.connect_from(&src);
        assert_eq!(echo(&mut stream, "hello"), "hello", "{src}: echo");
        for _ in 0..2 {
            assert_eq!(lab.connect_from(&src).0, first, "{src} moved");
        }
        owners.insert(src, first);
    }
    let distinct: std::collections::HashSet<_> = owners.values().collect();
    assert!(distinct.len() >= 2, "sources spread: {owners:?}");
    let probe = lab
        .lb
        .exec("nft", &["list", "table", "ip", "probe"])
        .expect("probe");
    let listing = String::from_utf8_lossy(&probe.stdout);
    assert!(
        listing.contains("counter packets 0 bytes 0"),
        "no reply crossed the balancer: {listing}"
    );
    // The client's packets were counted, per backend.
    let farm = lab.farm();
    assert_eq!(farm.forwarding, "dsr");
    let total = farm.counters.expect("farm counters").packets;
    assert!(total > 0, "the balancer counted the client's packets");
}
