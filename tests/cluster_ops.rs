//! clustermanager's runtime on two full nodes (tests/cluster_ops_lab.rs):
//! the node table, `cluster edit`, command replication and its refusal on
//! the backup, `farm add`, and maintenance moving the master role without
//! a single failed client request.
//!
//! `cargo build -p lb-forwarder -p vrrpd -p conntrack-syncd -p cfg-syncd -p clustermanager -p tandemctl && cargo nextest run -p tandem-e2e --test cluster_ops`

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tandem_e2e::cluster_ops_lab::{OpsLab, VIP, farm, row, text};

#[test]
fn node_table_is_green_master_backup_then_red_for_a_dead_daemon_and_grey_for_a_lost_peer() {
    let mut lab = OpsLab::running();
    for (from, local) in [("lb1", "lb1"), ("lb2", "lb2")] {
        let t = lab.nodes_json(from);
        assert_eq!(t.len(), 2, "{t:?}");
        let me = row(&t, local).expect("local row");
        assert_eq!(me["local"], true);
        let other = row(&t, lab.peer(local).name.as_str()).expect("remote row");
        assert_eq!(other["local"], false);
        assert_eq!(
            other["address"],
            tandem_e2e::cluster_ops_lab::cluster_addr(&lab.peer(local).name)
        );
        assert_eq!(other["hostname"], lab.peer(local).name.as_str());
    }
    let t = lab.nodes_json("lb2");
    assert_eq!(row(&t, "lb1").unwrap()["role"], "master", "{t:?}");
    assert_eq!(row(&t, "lb2").unwrap()["role"], "backup", "{t:?}");

    // `tandemctl status` starts with the local node's summary.
    let out = lab.node("lb1").tandemctl(&["status"]);
    let first = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(first, "lb1: ● green operational, master", "{}", text(&out));

    // A daemon killed on the backup: the master's table shows it red, and why.
    lab.kill("lb2", "conntrack-syncd");
    lab.wait_for("lb2 red on lb1's table", Duration::from_secs(10), |l| {
        let t = l.nodes_json("lb1");
        row(&t, "lb2").is_some_and(|r| {
            r["status"] == "red"
                && r["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("conntrack-syncd is not running"))
        }) && row(&t, "lb1").is_some_and(|r| r["status"] == "green")
    });
    let out = lab.node("lb2").tandemctl(&["status"]);
    let first = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    assert!(
        first.starts_with("lb2: ● red failure, backup (conntrack-syncd is not running"),
        "{}",
        text(&out)
    );

    // The backup's cluster link goes down: its row on the master turns grey.
    lab.node("lb2")
        .ns
        .set_link("eth2", false)
        .expect("link down");
    let took = lab.wait_for("lb2 grey on lb1's table", Duration::from_secs(20), |l| {
        let t = l.nodes_json("lb1");
        row(&t, "lb2").is_some_and(|r| r["status"] == "grey" && r["health"] == "unreachable")
    });
    eprintln!(
        "peer seen unreachable {} ms after its link went down",
        took.as_millis()
    );
    let t = lab.nodes_json("lb1");
    assert!(
        row(&t, "lb2").unwrap()["message"]
            .as_str()
            .is_some_and(|m| m.contains("lb2") && m.contains("unreachable")),
        "{t:?}"
    );
    // Its role: the last one heard, with its age, not "unknown".
    assert!(
        row(&t, "lb2").unwrap()["role"]
            .as_str()
            .is_some_and(|r| r.starts_with("unreachable (was backup ") && r.ends_with(" ago)")),
        "{t:?}"
    );
}

#[test]
fn cluster_edit_on_the_master_reaches_the_backup_and_a_change_on_the_backup_is_refused() {
    let lab = OpsLab::running();
    let gen_before = lab.vrrp("lb2").daemon.unwrap().config_generation;

    // (Not --tracked here: vrrpd restarts its instance for a change of
    // tracked interfaces, and the role moves; see docs/clustermanager.md.)
    let out = lab
        .node("lb1")
        .tandemctl(&["cluster", "edit", "--check-interval", "200"]);
    assert!(out.status.success(), "{}", text(&out));
    // The explicit replication is synchronous: the backup has the file and
    // has reloaded when the command returns (no waiting for cfg-syncd).
    let backup = lab.node("lb2").read("cluster.toml");
    assert!(backup.contains("advert_interval_ms = 200"), "{backup}");
    assert!(
        lab.vrrp("lb2").daemon.unwrap().config_generation > gen_before,
        "lb2's vrrpd reloaded the edited cluster.toml"
    );
    assert_eq!(lab.vrrp("lb1").advert_interval_ms, 200);
    let show = lab.node("lb2").tandemctl(&["cluster", "show", "--json"]);
    let show: serde_json::Value = serde_json::from_slice(&show.stdout).expect("show json");
    assert_eq!(show["check_interval_ms"], 200);
    assert_eq!(show["interface"], "eth2");
    assert_eq!(show["floating_ips"][0]["address"], format!("{VIP}/24"));

    // On the backup: refused, naming the master; nothing changes anywhere.
    let before = (
        lab.node("lb1").read("cluster.toml"),
        lab.node("lb2").read("cluster.toml"),
    );
    let out = lab
        .node("lb2")
        .tandemctl(&["cluster", "edit", "--failback", "lb2"]);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("this node is the backup; make changes on the master lb1 (192.168.100.1)"),
        "{}",
        text(&out)
    );
    let out = lab.node("lb2").tandemctl(&["farm", "delete", "web"]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("master lb1"),
        "{}",
        text(&out)
    );
    assert!(lab.node("lb2").config_dir.join("farms/web.toml").exists());

    // An invalid edit on the master changes nothing on either node.
    let out = lab
        .node("lb1")
        .tandemctl(&["cluster", "edit", "--failback", "lb9"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("lb9"),
        "{}",
        text(&out)
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        before,
        (
            lab.node("lb1").read("cluster.toml"),
            lab.node("lb2").read("cluster.toml")
        )
    );
}

#[test]
fn farm_add_on_the_master_serves_at_once_and_reaches_the_backup() {
    let lab = OpsLab::running();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("api.toml");
    std::fs::write(&file, farm("api", 8081)).unwrap();

    let out = lab
        .node("lb1")
        .tandemctl(&["farm", "add", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("replicated"),
        "{}",
        text(&out)
    );
    assert_eq!(lab.node("lb2").read("farms/api.toml"), farm("api", 8081));
    assert_eq!(lab.forwarder("lb1").farms, 2);
    assert_eq!(
        lab.forwarder("lb2").farms,
        2,
        "the backup reloaded its farms"
    );

    // The master serves it through the VIP.
    let name = lab
        .client
        .run(|| {
            let s = TcpStream::connect_timeout(
                &format!("{VIP}:8081").parse().unwrap(),
                Duration::from_secs(3),
            )?;
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line)?;
            Ok::<_, std::io::Error>(line.trim().to_owned())
        })
        .expect("client")
        .expect("farm api answers through the VIP");
    assert!(name == "b1" || name == "b2", "{name}");

    // Adding it again is refused; an invalid farm changes nothing.
    let out = lab
        .node("lb1")
        .tandemctl(&["farm", "add", file.to_str().unwrap()]);
    assert!(!out.status.success(), "{}", text(&out));
    std::fs::write(&file, farm("api", 8081).replace("port = 8081", "port = 80")).unwrap();
    let out = lab
        .node("lb1")
        .tandemctl(&["farm", "edit", file.to_str().unwrap()]);
    assert!(
        !out.status.success(),
        "an overlapping farm is refused: {}",
        text(&out)
    );
    assert_eq!(lab.node("lb1").read("farms/api.toml"), farm("api", 8081));

    let out = lab.node("lb1").tandemctl(&["farm", "delete", "api"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!lab.node("lb2").config_dir.join("farms/api.toml").exists());
    assert_eq!(lab.forwarder("lb2").farms, 1);
}

/// A client looping requests through the VIP: new connections one after
/// another (connect, read the greeting) and four established connections
/// each echoing a line every 20 ms.
struct Traffic {
    stop: Arc<AtomicBool>,
    new_ok: Arc<AtomicU64>,
    echo_ok: Arc<AtomicU64>,
    fresh: std::thread::JoinHandle<Result<Vec<String>, tandem_lab::LabError>>,
    established: std::thread::JoinHandle<Result<Vec<String>, tandem_lab::LabError>>,
}

/// What the client saw: successes and every failure.
struct Seen {
    new_ok: u64,
    echo_ok: u64,
    new_failed: Vec<String>,
    echo_failed: Vec<String>,
}

impl Traffic {
    fn start(lab: &OpsLab) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let new_ok = Arc::new(AtomicU64::new(0));
        let echo_ok = Arc::new(AtomicU64::new(0));
        let dst: SocketAddr = format!("{VIP}:80").parse().unwrap();
        let fresh = {
            let (stop, ok) = (stop.clone(), new_ok.clone());
            lab.client
                .spawn_thread(move || {
                    let mut errors = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let r = (|| {
                            let s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
                            s.set_read_timeout(Some(Duration::from_secs(5)))?;
                            let mut line = String::new();
                            BufReader::new(s).read_line(&mut line)?;
                            if line.trim().is_empty() {
                                return Err(std::io::Error::other("no greeting"));
                            }
                            Ok::<_, std::io::Error>(())
                        })();
                        match r {
                            Ok(()) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => errors.push(e.to_string()),
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    errors
                })
                .expect("client thread")
        };
        let established = {
            let (stop, ok) = (stop.clone(), echo_ok.clone());
            lab.client
                .spawn_thread(move || {
                    let conns: Vec<TcpStream> = (0..4)
                        .map(|_| {
                            let s = TcpStream::connect_timeout(&dst, Duration::from_secs(3))
                                .expect("connect");
                            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                            s.set_nodelay(true).unwrap();
                            s
                        })
                        .collect();
                    let mut readers: Vec<_> = conns
                        .iter()
                        .map(|c| {
                            let mut r = BufReader::new(c.try_clone().unwrap());
                            let mut greeting = String::new();
                            r.read_line(&mut greeting).unwrap();
                            r
                        })
                        .collect();
                    let mut errors = Vec::new();
                    let mut broken = vec![false; conns.len()];
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        for (k, (c, r)) in conns.iter().zip(readers.iter_mut()).enumerate() {
                            if broken[k] {
                                continue;
                            }
                            i += 1;
                            let msg = format!("ping {i}");
                            let mut w = c;
                            let mut line = String::new();
                            let sent = writeln!(w, "{msg}");
                            let read = r.read_line(&mut line);
                            if sent.is_ok() && read.is_ok() && line.trim() == msg {
                                ok.fetch_add(1, Ordering::Relaxed);
                            } else {
                                errors.push(format!(
                                    "connection {k}, {msg}: {sent:?} {read:?} got {line:?}"
                                ));
                                broken[k] = true;
                            }
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    errors
                })
                .expect("client thread")
        };
        Traffic {
            stop,
            new_ok,
            echo_ok,
            fresh,
            established,
        }
    }

    fn counts(&self) -> (u64, u64) {
        (
            self.new_ok.load(Ordering::Relaxed),
            self.echo_ok.load(Ordering::Relaxed),
        )
    }

    fn stop(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        let new_failed = self.fresh.join().unwrap().unwrap();
        let echo_failed = self.established.join().unwrap().unwrap();
        Seen {
            new_ok: self.new_ok.load(Ordering::Relaxed),
            echo_ok: self.echo_ok.load(Ordering::Relaxed),
            new_failed,
            echo_failed,
        }
    }
}

/// Traffic flows, maintenance is enabled on lb1, the VIP moves to lb2,
/// traffic keeps flowing 3.5 s more. Returns what the client saw and how
/// long the VIP took to move.
/// Also the (new connections, echoes) counts just before the switch and
/// 3.5 s after it.
fn switch_under_traffic(lab: &OpsLab) -> (Seen, Duration, (u64, u64), (u64, u64)) {
    let traffic = Traffic::start(lab);
    std::thread::sleep(Duration::from_millis(1000));
    let before = traffic.counts();
    assert!(
        before.0 > 5 && before.1 > 5,
        "traffic flows before the switch: {before:?}"
    );
    let started = Instant::now();
    let out = lab
        .node("lb1")
        .tandemctl(&["node", "maintenance", "enable"]);
    assert!(out.status.success(), "{}", text(&out));
    lab.wait_for("lb2 to hold the VIP", Duration::from_secs(5), |l| {
        l.holds_vip("lb2")
    });
    let moved = started.elapsed();
    assert!(!lab.holds_vip("lb1"));
    // Long enough for a SYN lost in the switch to be resent (1 s, then 3 s).
    std::thread::sleep(Duration::from_millis(3500));
    let after = traffic.counts();
    let seen = traffic.stop();
    eprintln!(
        "role moved in {} ms; new connections ok {} failed {}; echoes ok {} failed {}",
        moved.as_millis(),
        seen.new_ok,
        seen.new_failed.len(),
        seen.echo_ok,
        seen.echo_failed.len()
    );
    (seen, moved, before, after)
}

#[test]
fn maintenance_on_the_master_moves_the_role_with_zero_failed_client_requests() {
    let lab = OpsLab::running();
    let (seen, _, before, after) = switch_under_traffic(&lab);
    assert!(
        after.0 > before.0 + 10,
        "new connections kept succeeding after the switch: {before:?} {after:?}"
    );
    assert!(
        seen.new_failed.is_empty(),
        "new connections failed: {:?}",
        seen.new_failed
    );
    assert!(
        seen.echo_failed.is_empty(),
        "established connections failed: {:?}",
        seen.echo_failed
    );

    let t = lab.nodes_json("lb2");
    assert_eq!(row(&t, "lb2").unwrap()["role"], "master", "{t:?}");
    let lb1 = row(&t, "lb1").unwrap();
    assert_eq!(
        (lb1["role"].as_str(), lb1["status"].as_str()),
        (Some("maintenance"), Some("orange")),
        "{t:?}"
    );

    // Disable: with failback "none" the role stays with lb2.
    let out = lab
        .node("lb1")
        .tandemctl(&["node", "maintenance", "disable"]);
    assert!(out.status.success(), "{}", text(&out));
    lab.wait_for("lb1 back as a green backup", Duration::from_secs(10), |l| {
        let t = l.nodes_json("lb1");
        row(&t, "lb1").is_some_and(|r| r["role"] == "backup" && r["status"] == "green")
            && row(&t, "lb2").is_some_and(|r| r["role"] == "master")
    });
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        lab.holds_vip("lb2") && !lab.holds_vip("lb1"),
        "failback none: the role stays on lb2"
    );

    // Maintenance of the remote node, asked on lb1, is forwarded to lb2.
    let out = lab
        .node("lb1")
        .tandemctl(&["node", "maintenance", "enable", "lb2"]);
    assert!(out.status.success(), "{}", text(&out));
    lab.wait_for("lb1 to take the role back", Duration::from_secs(5), |l| {
        l.holds_vip("lb1")
    });
    let out = lab
        .node("lb1")
        .tandemctl(&["node", "maintenance", "disable", "lb2"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = lab
        .node("lb1")
        .tandemctl(&["node", "maintenance", "enable", "lb7"]);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no node `lb7`"),
        "{}",
        text(&out)
    );
}

/// The control: the same switch without conntrack replication (both
/// conntrack-syncd stopped, tcp_loose=0 on the nodes) breaks the
/// established connections, so the test above can fail.
#[test]
fn without_conntrack_sync_the_same_switch_breaks_established_connections() {
    let mut lab = OpsLab::running();
    lab.kill("lb1", "conntrack-syncd");
    lab.kill("lb2", "conntrack-syncd");
    let (seen, ..) = switch_under_traffic(&lab);
    assert!(
        !seen.echo_failed.is_empty(),
        "without replicated state the established connections should break (echoes ok {})",
        seen.echo_ok
    );
}

/// Failback gating: lb1 is the preferred master. Out of maintenance while
/// lb2 is master, clustermanager holds it in vrrpd maintenance until its
/// configuration and conntrack resync are complete, then releases it and
/// it takes the role back.
#[test]
fn a_returning_preferred_master_is_held_until_resynced_then_takes_the_role_back() {
    let lab = OpsLab::running_with_failback("lb1");
    let out = lab
        .node("lb1")
        .tandemctl(&["node", "maintenance", "enable"]);
    assert!(out.status.success(), "{}", text(&out));
    lab.wait_for("lb2 to hold the VIP", Duration::from_secs(5), |l| {
        l.holds_vip("lb2")
    });

    let out = lab
        .node("lb1")
        .tandemctl(&["node", "maintenance", "disable"]);
    assert!(out.status.success(), "{}", text(&out));
    let took = lab.wait_for("lb1 to take the role back", Duration::from_secs(15), |l| {
        l.holds_vip("lb1")
    });
    eprintln!(
        "lb1 master again {} ms after maintenance was disabled",
        took.as_millis()
    );
    let cm = lab.node("lb1").daemon_log("clustermanager");
    let held = cm
        .find("holding it in maintenance until its configuration and conntrack resync are complete")
        .unwrap_or_else(|| panic!("lb1 was never held back:\n{}", lab.node("lb1").log()));
    let released = cm
        .find("releasing maintenance, it takes the master role back")
        .unwrap_or_else(|| panic!("lb1 was never released:\n{cm}"));
    assert!(held < released, "{cm}");
    // vrrpd entered maintenance twice: the operator's, then the gate's.
    let vrrp = lab.node("lb1").daemon_log("vrrpd");
    assert!(
        vrrp.matches("-> maintenance").count() >= 2,
        "the gate held vrrpd in maintenance:\n{vrrp}"
    );
    lab.wait_for("lb1 green master", Duration::from_secs(10), |l| {
        let t = l.nodes_json("lb2");
        row(&t, "lb1").is_some_and(|r| r["role"] == "master" && r["status"] == "green")
            && row(&t, "lb2").is_some_and(|r| r["role"] == "backup")
    });
}

/// A backend's state set on the master is a configuration change: written
/// into the farm file (comments kept), applied by the master's lb-forwarder
/// and replicated to the backup, whose lb-forwarder applies it too. On the
/// backup the same command is refused and names the master.
#[test]
fn backend_state_set_on_the_master_is_replicated_to_the_backup() {
    let lab = OpsLab::running();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("api.toml");
    std::fs::write(&file, format!("# the API farm\n{}", farm("api", 8082))).unwrap();
    let out = lab
        .node("lb1")
        .tandemctl(&["farm", "add", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));

    let out = lab
        .node("lb1")
        .tandemctl(&["backend", "set", "api", "10.1.0.12:8080", "drain"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("replicated to the peer"),
        "{}",
        text(&out)
    );
    for node in ["lb1", "lb2"] {
        let on_disk = lab.node(node).read("farms/api.toml");
        assert!(on_disk.starts_with("# the API farm\n"), "{node}: {on_disk}");
        assert!(on_disk.contains("state = \"drain\""), "{node}: {on_disk}");
    }
    // Both datapaths took it: the drained backend is out of rotation.
    lab.wait_for(
        "both lb-forwarders to drain 10.1.0.12",
        Duration::from_secs(5),
        |l| {
            ["lb1", "lb2"].iter().all(|n| {
                let out = l.node(n).tandemctl(&["farm", "list", "--json"]);
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
                v.to_string().contains("\"drain\"")
            })
        },
    );

    let out = lab
        .node("lb2")
        .tandemctl(&["backend", "set", "api", "10.1.0.12:8080", "up"]);
    assert!(!out.status.success(), "the backup refuses: {}", text(&out));
    assert!(
        text(&out).contains("lb1"),
        "names the master: {}",
        text(&out)
    );
    assert!(
        lab.node("lb2")
            .read("farms/api.toml")
            .contains("state = \"drain\"")
    );
}

/// `tandemctl status` on a node: its first line and exit status.
fn status(lab: &OpsLab, node: &str) -> (String, Option<i32>) {
    let out = lab.node(node).tandemctl(&["status"]);
    let first = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    (first, out.status.code())
}

/// A deaf peer is never green. lb2 stops hearing (and answering) the
/// conntrack sync (nft drops UDP 3780 both ways in lb2's namespace; SSH and
/// VRRP still flow): both rows turn red naming conntrack-syncd, and
/// `tandemctl status` exits 4 on both nodes. Control: before the drop and
/// after it is lifted, both are green and `tandemctl status` exits 0.
#[test]
fn a_deaf_peer_turns_both_rows_red_and_tandemctl_status_fails() {
    let lab = OpsLab::running();
    for node in ["lb1", "lb2"] {
        assert_eq!(status(&lab, node).1, Some(0), "{:?}", status(&lab, node));
    }
    let ns = &lab.node("lb2").ns;
    let rules = "table inet lab_deaf {\n\
                 chain input { type filter hook input priority -10; udp dport 3780 drop; udp sport 3780 drop; }\n\
                 chain output { type filter hook output priority -10; udp dport 3780 drop; udp sport 3780 drop; }\n}\n";
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), rules).unwrap();
    ns.exec("nft", &["-f", file.path().to_str().unwrap()])
        .expect("nft drop rules");
    let took = lab.wait_for(
        "both rows red naming conntrack-syncd",
        Duration::from_secs(30),
        |l| {
            let t = l.nodes_json("lb1");
            ["lb1", "lb2"].iter().all(|n| {
                row(&t, n).is_some_and(|r| {
                    r["status"] == "red"
                        && r["message"]
                            .as_str()
                            .is_some_and(|m| m.contains("conntrack-syncd"))
                })
            })
        },
    );
    eprintln!("red {} ms after the peer went deaf", took.as_millis());
    for node in ["lb1", "lb2"] {
        let (line, code) = status(&lab, node);
        assert_eq!(code, Some(4), "{line}");
        assert!(
            line.starts_with(&format!("{node}: ● red failure, "))
                && line.contains("conntrack-syncd"),
            "{line}"
        );
    }

    ns.exec("nft", &["delete", "table", "inet", "lab_deaf"])
        .expect("lift the drop");
    lab.wait_for("both green again", Duration::from_secs(30), |l| {
        let t = l.nodes_json("lb1");
        ["lb1", "lb2"]
            .iter()
            .all(|n| row(&t, n).is_some_and(|r| r["status"] == "green"))
    });
    for node in ["lb1", "lb2"] {
        assert_eq!(status(&lab, node).1, Some(0), "{:?}", status(&lab, node));
    }
}

/// `farm restore` and `farm clear` are configuration changes like `farm
/// add`: refused on the backup (naming the master), validated as a whole
/// on the master (an invalid document changes nothing on either node),
/// applied there and replicated to the backup, whose lb-forwarder reloads;
/// a farm file the restore leaves as it was keeps its comments.
#[test]
fn farm_restore_and_clear_go_through_the_master_and_reach_the_backup() {
    let lab = OpsLab::running();
    let dir = tempfile::tempdir().unwrap();
    let api = dir.path().join("api.toml");
    std::fs::write(&api, format!("# the API farm\n{}", farm("api", 8081))).unwrap();
    let out = lab
        .node("lb1")
        .tandemctl(&["farm", "add", api.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let saved = lab.node("lb1").tandemctl(&["farm", "save"]);
    assert!(saved.status.success(), "{}", text(&saved));
    let doc = dir.path().join("saved.toml");
    std::fs::write(&doc, &saved.stdout).unwrap();
    let extra = dir.path().join("extra.toml");
    std::fs::write(&extra, farm("extra", 8083)).unwrap();
    let out = lab
        .node("lb1")
        .tandemctl(&["farm", "add", extra.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(lab.forwarder("lb2").farms, 3);

    // On the backup: refused, naming the master; nothing changes.
    let out = lab
        .node("lb2")
        .tandemctl(&["farm", "restore", doc.to_str().unwrap()]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("make changes on the master lb1"),
        "{}",
        text(&out)
    );
    assert!(lab.node("lb2").config_dir.join("farms/extra.toml").exists());

    // An invalid document (two farms on one port) changes nothing anywhere.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        String::from_utf8_lossy(&saved.stdout).replace("port = 8081", "port = 80"),
    )
    .unwrap();
    let before = (
        lab.node("lb1").read("farms/api.toml"),
        lab.node("lb2").read("farms/api.toml"),
    );
    let out = lab
        .node("lb1")
        .tandemctl(&["farm", "restore", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("refused, nothing changed"),
        "{}",
        text(&out)
    );
    assert_eq!(
        before,
        (
            lab.node("lb1").read("farms/api.toml"),
            lab.node("lb2").read("farms/api.toml")
        )
    );

    // On the master: applied and replicated; `extra` goes, `web` and `api`
    // are as saved, api.toml untouched (its comment kept) on both nodes.
    let out = lab
        .node("lb1")
        .tandemctl(&["farm", "restore", doc.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("applied and replicated to the peer"),
        "{}",
        text(&out)
    );
    assert!(
        text(&out).contains("delete farms/extra.toml"),
        "{}",
        text(&out)
    );
    for node in ["lb1", "lb2"] {
        let n = lab.node(node);
        assert!(!n.config_dir.join("farms/extra.toml").exists(), "{node}");
        assert!(
            n.read("farms/api.toml").starts_with("# the API farm\n"),
            "{node}"
        );
        assert_eq!(lab.forwarder(node).farms, 2, "{node}");
    }

    let out = lab.node("lb1").tandemctl(&["farm", "clear", "--yes"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("applied and replicated to the peer"),
        "{}",
        text(&out)
    );
    for node in ["lb1", "lb2"] {
        let files = std::fs::read_dir(lab.node(node).config_dir.join("farms"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(files, 0, "{node} has no farm file");
        assert_eq!(lab.forwarder(node).farms, 0, "{node}");
    }
}

/// During a partition, a change on the master is applied there and said
/// to be replicated when the peer returns — exit 0, never "failed" — and it
/// is, once the link heals. (failback = lb1: lb1 stays master at the heal.)
#[test]
fn farm_add_during_a_partition_is_applied_here_and_replicated_when_the_peer_returns() {
    let lab = OpsLab::running_with_failback("lb1");
    lab.node("lb2")
        .ns
        .set_link("eth2", false)
        .expect("cut the link");
    lab.wait_for("lb2 grey on lb1's table", Duration::from_secs(20), |l| {
        let t = l.nodes_json("lb1");
        row(&t, "lb2").is_some_and(|r| r["status"] == "grey")
    });
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("api.toml");
    std::fs::write(&file, farm("api", 8081)).unwrap();
    let started = Instant::now();
    let out = lab
        .node("lb1")
        .tandemctl(&["farm", "add", file.to_str().unwrap()]);
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(
            "farms/api.toml: applied here, will be replicated when the peer returns (peer lb2"
        ),
        "{}",
        text(&out)
    );
    assert!(!text(&out).contains("fail"), "{}", text(&out));
    eprintln!(
        "farm add during the partition answered in {} ms",
        took.as_millis()
    );
    assert!(
        took < Duration::from_millis(2500),
        "it does not wait for the unreachable peer: {took:?}"
    );
    assert_eq!(lab.forwarder("lb1").farms, 2, "applied on lb1");
    assert!(!lab.node("lb2").config_dir.join("farms/api.toml").exists());

    lab.node("lb2")
        .ns
        .set_link("eth2", true)
        .expect("heal the link");
    lab.wait_for("the change on lb2", Duration::from_secs(30), |l| {
        l.node("lb2").read("farms/api.toml") == farm("api", 8081) && l.forwarder("lb2").farms == 2
    });
    assert!(lab.holds_vip("lb1"), "lb1 stayed master");
}
