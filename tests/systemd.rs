//! A cluster of two nodes under a real systemd, from `dpkg -i` to `cluster
//! destroy`, driven only through `systemctl` and `tandemctl` inside the
//! containers (tests/systemd_lab.rs), with client traffic through the VIP.
//!
//! It boots two Debian containers and takes a few minutes, so it is not
//! part of `cargo nextest run --workspace`; run it with
//!
//! ```sh
//! deploy/test-systemd.sh        # builds the .deb, then runs this test
//! ```
//!
//! (as root, with systemd-container and debootstrap installed; the first run
//! builds the cached base system).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use tandem_e2e::systemd_lab::{
    API, BIRD_UNIT, Container, NODES, ROUTED, RUNNING, SNAT, Seen, SystemdLab, Traffic, UNITS, VIP,
    VipWatch, WEB, line_matches, quoted_journal_lines,
};

/// Microseconds since the epoch, as the journal's `__REALTIME_TIMESTAMP`
/// (the containers share this machine's clock).
fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn out_text(o: &std::process::Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        text(&o.stdout),
        text(&o.stderr)
    )
}

fn step(started: Instant, what: &str) {
    eprintln!(
        "[systemd test {:>6.1} s] {what}",
        started.elapsed().as_secs_f64()
    );
}

/// Checks that must not stop the story: every one is run, the test fails at
/// the end with all of them.
#[derive(Default)]
struct Checks(Vec<String>);

impl Checks {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            let what = what();
            eprintln!("CHECK FAILED: {what}");
            self.0.push(what);
        }
    }
}

fn nodes_json(c: &Container) -> Vec<Value> {
    let out = c.tandemctl(&["cluster", "nodes", "--json"], None);
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

fn row(table: &[Value], node: &str) -> Option<Value> {
    table.iter().find(|r| r["node"] == node).cloned()
}

/// Role and status of `node` in `seen_from`'s node table.
fn role(lab: &SystemdLab, seen_from: &str, node: &str) -> Option<(String, String)> {
    let r = row(&nodes_json(lab.node(seen_from)), node)?;
    Some((
        r["role"].as_str()?.to_owned(),
        r["status"].as_str()?.to_owned(),
    ))
}

fn is(lab: &SystemdLab, seen_from: &str, node: &str, want: (&str, &str)) -> bool {
    role(lab, seen_from, node).is_some_and(|(r, s)| r == want.0 && s == want.1)
}

/// Every Tandem unit of a node is active.
fn all_active(c: &Container) -> bool {
    UNITS
        .iter()
        .all(|u| c.property(&format!("{u}.service"), "ActiveState") == "active")
}

/// Every Tandem unit of a node is inactive.
fn all_inactive(c: &Container) -> bool {
    UNITS
        .iter()
        .all(|u| c.property(&format!("{u}.service"), "ActiveState") == "inactive")
}

/// `systemctl stop tandem.target`, then waits for the daemons: the target's
/// own stop job ends at once (it is ordered after its units, so it stops
/// before them), and a start issued meanwhile would cancel the daemons'
/// pending stop jobs.
fn stop_target(lab: &SystemdLab, name: &str) {
    let out = lab.node(name).systemctl(&["stop", "tandem.target"]);
    assert!(out.status.success(), "{name}: {}", out_text(&out));
    lab.wait_for(
        &format!("{name}'s daemons stopped"),
        Duration::from_secs(40),
        |l| all_inactive(l.node(name)),
    );
}

/// `tandemctl status` says every daemon of the node serves.
fn serving(c: &Container) -> bool {
    c.tandemctl(&["status"], None).status.success()
}

fn main_pids(c: &Container) -> BTreeMap<&'static str, String> {
    UNITS
        .iter()
        .map(|u| (*u, c.property(&format!("{u}.service"), "MainPID")))
        .collect()
}

/// The moment (monotonic µs) each unit became active in the current boot.
fn active_since(c: &Container) -> BTreeMap<&'static str, u64> {
    UNITS
        .iter()
        .map(|u| {
            let v = c.property(&format!("{u}.service"), "ActiveEnterTimestampMonotonic");
            (*u, v.parse().unwrap_or(0))
        })
        .collect()
}

fn summary(what: &str, sw: &Switch) -> String {
    let s = &sw.seen;
    format!(
        "{what}: VIP on the new node after {} ms, on neither for {} ms; new connections ok {} failed {}; echoes ok {} on {} long-lived connections, {} broken",
        sw.moved.as_millis(),
        sw.gap.as_millis(),
        s.new_ok,
        s.new_failed.len(),
        s.echo_ok,
        s.long_lived,
        s.echo_failed.len()
    )
}

/// What a switch of the VIP looked like from the client and from the
/// nodes' interfaces.
struct Switch {
    seen: Seen,
    /// From the action to the VIP on the new node (sampled every ms).
    moved: Duration,
    /// The longest time no node held the VIP.
    gap: Duration,
}

/// Under client traffic and with the VIP watched: `act`, then waits for `to`
/// to hold the VIP, and 3.5 s more (a SYN lost in the switch is resent after
/// 1 s, then 3 s).
fn switch(lab: &mut SystemdLab, to: &str, act: impl FnOnce(&mut SystemdLab)) -> Switch {
    let traffic = Traffic::start(lab);
    let watch = VipWatch::start(lab);
    std::thread::sleep(Duration::from_millis(200));
    let at = watch.now();
    act(lab);
    lab.wait_for(
        &format!("{to} to hold the VIP"),
        Duration::from_secs(10),
        |l| l.holds_vip(to),
    );
    std::thread::sleep(Duration::from_millis(3500));
    let seen = traffic.stop();
    let h = watch.finish();
    let node = NODES.iter().position(|n| *n == to).expect("node");
    let moved = h
        .gained_after(node, at)
        .map_or(Duration::MAX, |t| t.saturating_sub(at));
    Switch {
        seen,
        moved,
        gap: h.longest_gap(),
    }
}

/// The containers' base system: built by debootstrap on first use, then
/// found in the cache at once; every node gets its own identity.
#[test]
#[ignore = "builds the containers' Debian base system (minutes, once): run deploy/test-systemd.sh"]
fn the_base_system_is_built_once_and_cached() {
    let started = Instant::now();
    let base = tandem_e2e::systemd_lab::base_rootfs();
    eprintln!(
        "base system {} ready in {:.1} s",
        base.display(),
        started.elapsed().as_secs_f64()
    );
    let again = Instant::now();
    assert_eq!(tandem_e2e::systemd_lab::base_rootfs(), base);
    assert!(
        again.elapsed() < Duration::from_secs(1),
        "the second call is the cache"
    );
    for bin in [
        "lib/systemd/systemd",
        "usr/sbin/sshd",
        "usr/sbin/nft",
        "usr/sbin/conntrack",
        "bin/ip",
    ] {
        assert!(base.join(bin).exists(), "{bin} in the base");
    }
    // Identity is per node: no host keys, no machine id, no hostname.
    let host_keys = std::fs::read_dir(base.join("etc/ssh"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("ssh_host_"))
        .count();
    assert_eq!(host_keys, 0);
    assert_eq!(
        std::fs::read_to_string(base.join("etc/machine-id")).unwrap(),
        ""
    );
    assert!(!base.join("etc/hostname").exists());
}

#[test]
#[ignore = "boots two Debian containers under systemd (minutes): run deploy/test-systemd.sh"]
fn a_cluster_of_two_real_systemd_nodes_from_install_to_destroy() {
    let t = Instant::now();
    let mut lab = SystemdLab::new();
    let mut checks = Checks::default();
    step(t, "containers booted");

    // ---- dpkg -i: nothing starts on an unconfigured node.
    for n in NODES {
        let c = lab.node(n);
        let out = c.exec(&["dpkg", "-i", "/root/tandem.deb"], None);
        assert!(out.status.success(), "{n}: dpkg -i: {}", out_text(&out));
        assert!(
            text(&out.stdout).contains("/etc/tandem/node.toml does not exist yet"),
            "{n}: {}",
            out_text(&out)
        );
        assert_eq!(
            c.property("tandem.target", "UnitFileState"),
            "enabled",
            "{n}"
        );
        for u in RUNNING.iter().chain(&[BIRD_UNIT]) {
            assert_eq!(
                c.property(&format!("{u}.service"), "UnitFileState"),
                "enabled",
                "{n} {u}"
            );
            assert_eq!(
                c.property(&format!("{u}.service"), "ActiveState"),
                "inactive",
                "{n} {u}: nothing starts before node.toml exists"
            );
        }
        // sshd took the package's drop-in: root's keys include the cluster's.
        let sshd =
            c.sh("sshd -T -C user=root,host=peer,addr=192.168.100.9 | grep ^authorizedkeysfile");
        assert!(
            sshd.contains("/etc/tandem/ssh/authorized_keys"),
            "{n}: {sshd}"
        );
    }
    step(t, "the .deb is installed on both nodes");

    // ---- Configure and start: ten units active.
    for n in NODES {
        let c = lab.node(n);
        c.write("etc/tandem/node.toml", &format!("# {n}\nname = \"{n}\"\n"));
        let out = c.systemctl(&["start", "tandem.target"]);
        assert!(out.status.success(), "{n}: {}", out_text(&out));
    }
    lab.wait_for(
        "all ten units active and serving",
        Duration::from_secs(60),
        |l| {
            NODES
                .iter()
                .all(|n| all_active(l.node(n)) && serving(l.node(n)))
        },
    );
    step(t, "systemctl start tandem.target: ten units active");
    // routed idles on a node that is not active-active: it writes no BIRD
    // configuration, so BIRD's unit is skipped by its condition.
    for n in NODES {
        let c = lab.node(n);
        checks.check(
            c.property(&format!("{ROUTED}.service"), "ActiveState") == "active",
            || format!("{n}: routed.service is not active"),
        );
        let bird = (
            c.property(&format!("{BIRD_UNIT}.service"), "ActiveState"),
            c.property(&format!("{BIRD_UNIT}.service"), "ConditionResult"),
        );
        checks.check(bird.0 == "inactive" && bird.1 == "no", || {
            format!("{n}: tandem-bird.service (state, condition) = {bird:?}")
        });
    }

    // systemd's own rating of each unit, under the systemd that runs it.
    for u in RUNNING.iter().chain(&[BIRD_UNIT]) {
        let out = lab.lb1.exec(
            &[
                "systemd-analyze",
                "security",
                "--no-pager",
                &format!("{u}.service"),
            ],
            None,
        );
        let all = text(&out.stdout);
        let level = all
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .and_then(|l| l.rsplit(": ").next())
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok());
        eprintln!("systemd-analyze security {u}.service (running): {level:?}");
        checks.check(level.is_some_and(|l| l <= 3.0), || {
            format!("{u}.service exposure {level:?} > 3.0")
        });
    }

    // ---- lb1 serves `web` standalone: its VIP and SNAT source are plain
    // addresses, as on a standalone balancer.
    lab.lb1.write("root/web.toml", WEB);
    let out = lab.lb1.tandemctl(&["farm", "add", "/root/web.toml"], None);
    assert!(out.status.success(), "farm add web: {}", out_text(&out));
    let ns = &lab.lb1.ns;
    ns.add_address("eth0", &format!("{VIP}/24")).expect("vip");
    ns.add_address("eth1", &format!("{SNAT}/24")).expect("snat");
    lab.wait_for(
        "web to answer through the VIP",
        Duration::from_secs(20),
        |l| l.ask(80).is_some(),
    );
    step(t, "lb1 serves farm web standalone");

    // ---- Control: the unit as it was (no AF_NETLINK) fails create at
    // preflight and changes nothing, so this test can see a unit that is
    // too tight.
    let control_started = now_us();
    lab.lb1.write(
        "etc/systemd/system/clustermanager.service.d/control.conf",
        "[Service]\nRestrictAddressFamilies=\nRestrictAddressFamilies=AF_UNIX AF_INET AF_INET6\n",
    );
    lab.lb1
        .sh("systemctl daemon-reload && systemctl restart clustermanager");
    lab.wait_for("clustermanager back", Duration::from_secs(20), |l| {
        serving(&l.lb1)
    });
    // The peer's host key, as the operator reads it on lb2's console.
    let host_key = lab
        .lb2
        .sh("ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub | cut -d' ' -f2");
    let host_key = host_key.trim();
    assert!(
        host_key.starts_with("SHA256:"),
        "lb2's host key: {host_key}"
    );
    let create = [
        "cluster",
        "create",
        "--local-ip",
        "192.168.100.1",
        "--remote-ip",
        "192.168.100.2",
        "--host-key",
        host_key,
        "--yes",
        "--password-stdin",
    ];
    let password = format!("{}\n", tandem_e2e::systemd_lab::ROOT_PASSWORD);
    let out = lab.lb1.tandemctl(&create, Some(&password));
    assert!(
        !out.status.success(),
        "control: create must fail: {}",
        out_text(&out)
    );
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        said.contains("Address family not supported")
            || said.contains("Cannot open netlink socket"),
        "control: the preflight names the netlink failure: {said}"
    );
    for n in NODES {
        assert!(!lab.node(n).exists("etc/tandem/cluster.toml"), "{n}");
        assert!(!lab.node(n).exists("etc/tandem/ssh/authorized_keys"), "{n}");
    }
    lab.lb1.sh(
        "rm -r /etc/systemd/system/clustermanager.service.d && systemctl daemon-reload && systemctl restart clustermanager",
    );
    lab.wait_for("clustermanager back", Duration::from_secs(20), |l| {
        serving(&l.lb1)
    });
    // The sandbox check at the end leaves the controls' lines out.
    let mut controls = vec![("lb1", control_started, now_us())];
    step(
        t,
        "control: without AF_NETLINK, cluster create fails at preflight, nothing written",
    );

    // ---- tandemctl cluster create.
    let out = lab.lb1.tandemctl(&create, Some(&password));
    assert!(
        out.status.success(),
        "cluster create: {}\n{}",
        out_text(&out),
        lab.journals()
    );
    assert!(
        text(&out.stdout).contains("cluster created: lb1 is master, lb2 is backup"),
        "{}",
        out_text(&out)
    );
    lab.wait_for(
        "lb1 master and lb2 backup, both green",
        Duration::from_secs(30),
        |l| is(l, "lb1", "lb1", ("master", "green")) && is(l, "lb1", "lb2", ("backup", "green")),
    );
    let key = lab
        .lb1
        .read("etc/tandem/ssh/id_ed25519.pub")
        .expect("cluster key");
    for n in NODES {
        let c = lab.node(n);
        let ak = c.read("etc/tandem/ssh/authorized_keys").unwrap_or_default();
        assert!(
            ak.contains(key.trim()),
            "{n}: the cluster key is authorized: {ak}"
        );
        assert!(
            !c.exists("root/.ssh/authorized_keys"),
            "{n}: nothing written in /root/.ssh"
        );
        assert!(all_active(c), "{n}");
    }
    assert!(lab.holds_vip("lb1") && !lab.holds_vip("lb2"));
    step(t, "cluster created: lb1 master, lb2 backup");

    // Fast adverts (100 ms): a crash is noticed in about 0.4 s.
    let out = lab
        .lb1
        .tandemctl(&["cluster", "edit", "--check-interval", "100"], None);
    assert!(out.status.success(), "cluster edit: {}", out_text(&out));
    lab.wait_for("the check interval on lb2", Duration::from_secs(20), |l| {
        l.lb2
            .read("etc/tandem/cluster.toml")
            .is_some_and(|c| c.contains("100"))
    });

    // ---- A farm added on the master reaches the backup.
    lab.lb1.write("root/api.toml", API);
    let out = lab.lb1.tandemctl(&["farm", "add", "/root/api.toml"], None);
    assert!(out.status.success(), "farm add api: {}", out_text(&out));
    lab.wait_for("farm api on lb2", Duration::from_secs(20), |l| {
        l.lb2.read("etc/tandem/farms/api.toml").as_deref() == Some(API)
    });
    lab.wait_for(
        "api to answer through the VIP",
        Duration::from_secs(20),
        |l| l.ask(8081).is_some(),
    );
    step(
        t,
        "farm api added on the master, replicated to the backup, served",
    );

    // ---- systemctl reload: every daemon validates and applies again,
    // nothing restarts.
    let before = main_pids(&lab.lb1);
    let out = lab.lb1.systemctl(&["reload", "tandem.target"]);
    checks.check(out.status.success(), || {
        format!("systemctl reload tandem.target: {}", out_text(&out))
    });
    let reloaded = |c: &Container, unit: &str| {
        c.journal(&[unit])
            .matches("SIGHUP received, reloading configuration")
            .count()
    };
    lab.wait_for("every daemon reloaded", Duration::from_secs(20), |l| {
        UNITS.iter().all(|u| reloaded(&l.lb1, u) >= 1)
    });
    assert_eq!(main_pids(&lab.lb1), before, "a reload restarts nothing");
    step(
        t,
        "systemctl reload tandem.target: five daemons reloaded, none restarted",
    );

    // ---- Failover 1: lb1's daemons killed (systemctl kill), links down.
    let sw = switch(&mut lab, "lb2", |lab| {
        let mut kill = vec!["kill", "--kill-who=main", "--signal=SIGKILL"];
        let units: Vec<String> = UNITS.iter().map(|u| format!("{u}.service")).collect();
        kill.extend(units.iter().map(String::as_str));
        let out = lab.lb1.systemctl(&kill);
        assert!(out.status.success(), "systemctl kill: {}", out_text(&out));
        lab.cables("lb1", false);
    });
    eprintln!("{}", summary("crash of lb1's daemons", &sw));
    let seen = &sw.seen;
    assert!(
        seen.echo_failed.is_empty(),
        "long-lived connections broke: {:?}",
        seen.echo_failed
    );
    // A connection opened in the last instant before the crash may not have
    // reached lb2's table (the demo says so too): counted, at most two.
    checks.check(seen.new_failed.len() <= 2, || {
        format!("new connections failed at the crash: {:?}", seen.new_failed)
    });
    checks.check(sw.moved < Duration::from_secs(2), || {
        format!("failover took {:?} with 100 ms adverts", sw.moved)
    });
    // systemd brought every killed daemon back (Restart=on-failure).
    lab.wait_for(
        "lb1's daemons restarted by systemd",
        Duration::from_secs(20),
        |l| {
            all_active(&l.lb1)
                && UNITS.iter().all(|u| {
                    l.lb1
                        .property(&format!("{u}.service"), "NRestarts")
                        .parse::<u32>()
                        .is_ok_and(|n| n >= 1)
                })
        },
    );
    step(
        t,
        "failover: lb1's daemons killed, lb2 took over; systemd restarted them",
    );

    // lb1 comes back: stopped while isolated, cables in, started: it must
    // join as backup without taking the role (no second failover).
    stop_target(&lab, "lb1");
    lab.cables("lb1", true);
    let watch = VipWatch::start(&lab);
    lab.lb1.sh("systemctl start tandem.target");
    lab.wait_for("lb1 back as a green backup", Duration::from_secs(30), |l| {
        is(l, "lb2", "lb1", ("backup", "green")) && is(l, "lb2", "lb2", ("master", "green"))
    });
    std::thread::sleep(Duration::from_secs(2));
    let h = watch.finish();
    checks.check(h.gained(0).is_none() && h.longest_gap().is_zero(), || {
        format!(
            "lb1's return moved the VIP: lb1 gained it at {:?}, gap {:?}",
            h.gained(0),
            h.longest_gap()
        )
    });
    step(t, "lb1 rejoined as backup, lb2 kept the role");

    // ---- Failover 2: the whole master container (lb2) is powered off.
    let mut poweroff = Duration::ZERO;
    let sw = switch(&mut lab, "lb1", |lab| poweroff = lab.lb2.poweroff());
    eprintln!(
        "{} (the container was down after {} ms)",
        summary("lb2 powered off", &sw),
        poweroff.as_millis()
    );
    assert!(
        sw.seen.echo_failed.is_empty(),
        "long-lived connections broke: {:?}",
        sw.seen.echo_failed
    );
    checks.check(sw.seen.new_failed.is_empty(), || {
        format!(
            "new connections failed at lb2's poweroff: {:?}",
            sw.seen.new_failed
        )
    });
    step(t, "failover: lb2 powered off, lb1 took over");

    // ---- Boot order: lb2 reboots and comes back as backup of the running
    // master, with no second failover.
    let watch = VipWatch::start(&lab);
    let booted = Instant::now();
    lab.lb2.boot();
    lab.wait_for("lb2 back as a green backup", Duration::from_secs(60), |l| {
        is(l, "lb1", "lb2", ("backup", "green")) && is(l, "lb1", "lb1", ("master", "green"))
    });
    eprintln!(
        "lb2 rebooted and green backup in {} ms",
        booted.elapsed().as_millis()
    );
    std::thread::sleep(Duration::from_secs(2));
    let h = watch.finish();
    checks.check(h.gained(1).is_none() && h.longest_gap().is_zero(), || {
        format!(
            "lb2's reboot moved the VIP: lb2 gained it at {:?}, gap {:?}",
            h.gained(1),
            h.longest_gap()
        )
    });
    // Started at boot in the units' order, each once its predecessor was
    // ready (Type=notify): datapath and conntrack replica, then vrrpd, then
    // cfg-syncd, then clustermanager.
    let since = active_since(&lab.lb2);
    let before = |a: &str, b: &str| since[a] > 0 && since[a] <= since[b];
    checks.check(
        before("lb-forwarder", "vrrpd")
            && before("conntrack-syncd", "vrrpd")
            && before("vrrpd", "cfg-syncd")
            && before("cfg-syncd", "clustermanager"),
        || format!("boot order on lb2: {since:?}"),
    );
    // It stopped in the reverse order at the poweroff (the previous boot).
    let stopped = stop_times(&lab.lb2);
    let earlier = |a: &str, b: &str| {
        stopped
            .get(a)
            .zip(stopped.get(b))
            .is_some_and(|(x, y)| x <= y)
    };
    checks.check(
        earlier("clustermanager", "cfg-syncd")
            && earlier("cfg-syncd", "vrrpd")
            && earlier("vrrpd", "lb-forwarder")
            && earlier("vrrpd", "conntrack-syncd"),
        || format!("stop order of lb2's poweroff: {stopped:?}"),
    );
    step(
        t,
        "lb2 rebooted: started in order, backup, no second failover",
    );

    // ---- systemctl stop tandem.target on the master (lb1): a planned
    // handover, make before break.
    let sw = switch(&mut lab, "lb2", |lab| stop_target(lab, "lb1"));
    eprintln!("{}", summary("systemctl stop tandem.target on lb1", &sw));
    checks.check(
        sw.seen.echo_failed.is_empty() && sw.seen.new_failed.is_empty(),
        || {
            format!(
                "planned handover lost requests: new {:?}, long-lived {:?}",
                sw.seen.new_failed, sw.seen.echo_failed
            )
        },
    );
    checks.check(sw.gap.is_zero(), || {
        format!(
            "planned handover is not make-before-break: neither node held the VIP for {} ms",
            sw.gap.as_millis()
        )
    });
    let out = lab.lb1.systemctl(&["start", "tandem.target"]);
    assert!(out.status.success(), "{}", out_text(&out));
    lab.wait_for("lb1 back as a green backup", Duration::from_secs(30), |l| {
        is(l, "lb2", "lb1", ("backup", "green")) && is(l, "lb2", "lb2", ("master", "green"))
    });
    step(t, "planned handover: systemctl stop tandem.target on lb1");

    // ---- node maintenance enable|disable on the master (lb2).
    let sw = switch(&mut lab, "lb1", |lab| {
        let out = lab.lb2.tandemctl(&["node", "maintenance", "enable"], None);
        assert!(out.status.success(), "{}", out_text(&out));
    });
    eprintln!("{}", summary("maintenance of lb2", &sw));
    checks.check(
        sw.seen.echo_failed.is_empty() && sw.seen.new_failed.is_empty(),
        || {
            format!(
                "maintenance lost requests: new {:?}, long-lived {:?}",
                sw.seen.new_failed, sw.seen.echo_failed
            )
        },
    );
    lab.wait_for("lb2 orange in maintenance", Duration::from_secs(20), |l| {
        is(l, "lb1", "lb2", ("maintenance", "orange"))
    });
    let out = lab.lb2.tandemctl(&["node", "maintenance", "disable"], None);
    assert!(out.status.success(), "{}", out_text(&out));
    lab.wait_for("lb2 a green backup again", Duration::from_secs(20), |l| {
        is(l, "lb1", "lb2", ("backup", "green")) && is(l, "lb1", "lb1", ("master", "green"))
    });
    step(t, "node maintenance enable|disable on lb2");

    // ---- Control: the same switch with conntrack-syncd stopped on both
    // nodes breaks the long-lived connections (tcp_loose=0: nothing picks
    // them up again), so the failovers above kept them through replication.
    for n in NODES {
        lab.node(n).sh("systemctl stop conntrack-syncd");
    }
    let sw = switch(&mut lab, "lb2", |lab| {
        let out = lab.lb1.tandemctl(&["node", "maintenance", "enable"], None);
        assert!(out.status.success(), "{}", out_text(&out));
    });
    eprintln!(
        "{}",
        summary("control: maintenance of lb1 without conntrack-syncd", &sw)
    );
    assert!(
        !sw.seen.echo_failed.is_empty(),
        "control: without replication the long-lived connections should break (echoes ok {})",
        sw.seen.echo_ok
    );
    let out = lab.lb1.tandemctl(&["node", "maintenance", "disable"], None);
    assert!(out.status.success(), "{}", out_text(&out));
    for n in NODES {
        lab.node(n).sh("systemctl start conntrack-syncd");
    }
    lab.wait_for(
        "lb1 a green backup, lb2 master",
        Duration::from_secs(30),
        |l| is(l, "lb2", "lb1", ("backup", "green")) && is(l, "lb2", "lb2", ("master", "green")),
    );
    // lb1 master again, for what follows.
    for verb in ["enable", "disable"] {
        let out = lab.lb2.tandemctl(&["node", "maintenance", verb], None);
        assert!(out.status.success(), "{}", out_text(&out));
    }
    lab.wait_for(
        "lb1 master, lb2 a green backup",
        Duration::from_secs(30),
        |l| {
            l.holds_vip("lb1")
                && is(l, "lb1", "lb2", ("backup", "green"))
                && is(l, "lb1", "lb1", ("master", "green"))
        },
    );
    step(
        t,
        "control: without conntrack-syncd the same switch breaks the long-lived connections",
    );

    // ---- The watchdog restarts a hung daemon (SIGSTOP), on the backup.
    let unit = "cfg-syncd.service";
    let hung = lab.lb2.property(unit, "MainPID");
    let stopped_at = Instant::now();
    lab.lb2.sh(&format!(
        "systemctl kill --kill-who=main --signal=SIGSTOP {unit}"
    ));
    lab.wait_for(
        "the watchdog to restart cfg-syncd",
        Duration::from_secs(60),
        |l| {
            let pid = l.lb2.property(unit, "MainPID");
            pid != hung && pid != "0" && l.lb2.property(unit, "ActiveState") == "active"
        },
    );
    let restarted = stopped_at.elapsed();
    let journal = lab.lb2.journal(&[unit]);
    assert!(
        journal.contains("Watchdog timeout"),
        "systemd says why: {journal}"
    );
    eprintln!(
        "watchdog: cfg-syncd SIGSTOPped, restarted after {} ms",
        restarted.as_millis()
    );
    // Control: without WatchdogSec the same hang lasts.
    lab.lb2.write(
        "etc/systemd/system/cfg-syncd.service.d/control.conf",
        "[Service]\nWatchdogSec=0\n",
    );
    lab.lb2
        .sh("systemctl daemon-reload && systemctl restart cfg-syncd");
    let hung = lab.lb2.property(unit, "MainPID");
    lab.lb2.sh(&format!(
        "systemctl kill --kill-who=main --signal=SIGSTOP {unit}"
    ));
    std::thread::sleep(restarted + Duration::from_secs(5));
    assert_eq!(
        lab.lb2.property(unit, "MainPID"),
        hung,
        "control: without the watchdog a hung cfg-syncd stays"
    );
    lab.lb2.sh(&format!(
        "systemctl kill --kill-who=main --signal=SIGCONT {unit} && rm -r /etc/systemd/system/cfg-syncd.service.d && systemctl daemon-reload && systemctl restart cfg-syncd"
    ));
    lab.wait_for("cfg-syncd back", Duration::from_secs(20), |l| {
        serving(&l.lb2)
    });
    step(
        t,
        "watchdog: a SIGSTOPped cfg-syncd is restarted; control without WatchdogSec stays hung",
    );

    // ---- Control for the sandbox check at the end: a unit that refuses
    // the mlock of its SSH key buffers (LimitMEMLOCK=0, no CAP_IPC_LOCK)
    // makes clustermanager say, at debug level, `mlock: Operation not
    // permitted`, which that check looks for.
    let before_control = lab.lb2.cursor();
    let control_started = now_us();
    lab.lb2.write(
        "etc/systemd/system/clustermanager.service.d/control.conf",
        "[Service]\nLimitMEMLOCK=0\nEnvironment=RUST_LOG=debug\n",
    );
    lab.lb2
        .sh("systemctl daemon-reload && systemctl restart clustermanager");
    lab.wait_for("the mlock refusal", Duration::from_secs(30), |l| {
        l.lb2
            .journal_after(&["clustermanager"], Some(&before_control))
            .contains("Operation not permitted")
    });
    lab.lb2.sh(
        "rm -r /etc/systemd/system/clustermanager.service.d && systemctl daemon-reload && systemctl restart clustermanager",
    );
    lab.wait_for("clustermanager back", Duration::from_secs(20), |l| {
        serving(&l.lb2)
    });
    controls.push(("lb2", control_started, now_us()));
    step(
        t,
        "control: clustermanager without LimitMEMLOCK logs mlock: Operation not permitted",
    );

    // ---- cluster destroy on the master: both standalone, lb1 keeps the VIP.
    let sw = switch(&mut lab, "lb1", |lab| {
        let out = lab.lb1.tandemctl(&["cluster", "destroy", "--yes"], None);
        assert!(out.status.success(), "cluster destroy: {}", out_text(&out));
    });
    eprintln!("{}", summary("cluster destroy on lb1", &sw));
    let seen = &sw.seen;
    assert!(
        lab.holds_vip("lb1"),
        "lb1 keeps the VIP: {}",
        lab.journals()
    );
    assert!(!lab.holds_vip("lb2"));
    checks.check(
        seen.echo_failed.is_empty() && seen.new_failed.is_empty(),
        || {
            format!(
                "destroy lost requests: new {:?}, long-lived {:?}",
                seen.new_failed, seen.echo_failed
            )
        },
    );
    for n in NODES {
        let c = lab.node(n);
        checks.check(!c.exists("etc/tandem/cluster.toml"), || {
            format!("{n}: cluster.toml left")
        });
        let ak = c.read("etc/tandem/ssh/authorized_keys").unwrap_or_default();
        checks.check(!ak.contains(key.trim()), || {
            format!("{n}: the cluster key is still authorized")
        });
    }
    lab.wait_for(
        "web still served by lb1 alone",
        Duration::from_secs(10),
        |l| l.ask(80).is_some(),
    );
    step(
        t,
        "cluster destroy: both standalone, lb1 kept the VIP and served on",
    );

    // ---- The journal, kept for whoever reads a failure or updates the
    // lines docs/troubleshooting.md quotes.
    let saved = tandem_lab::workspace_bin("tandemctl").with_file_name("systemd-test-journal");
    let _ = std::fs::remove_dir_all(&saved);
    for n in NODES {
        lab.node(n).save_journals(&saved);
    }
    eprintln!("journals of this run: {}", saved.display());
    journal_checks(&lab, &controls, &mut checks);
    step(t, "journal checked");

    assert!(
        checks.0.is_empty(),
        "{} check(s) failed:\n- {}",
        checks.0.len(),
        checks.0.join("\n- ")
    );
}

/// When each unit stopped in the previous boot (systemd's `Stopped …` entry,
/// monotonic time of that boot).
fn stop_times(c: &Container) -> BTreeMap<&'static str, u64> {
    let mut out = BTreeMap::new();
    for u in UNITS {
        let o = c.exec(
            &[
                "journalctl",
                "--no-pager",
                "-b",
                "-1",
                "-o",
                "json",
                "-u",
                &format!("{u}.service"),
            ],
            None,
        );
        for line in text(&o.stdout).lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let msg = v["MESSAGE"].as_str().unwrap_or_default();
            if msg.starts_with("Stopped ")
                && let Some(ts) = v["__MONOTONIC_TIMESTAMP"]
                    .as_str()
                    .and_then(|s| s.parse::<u64>().ok())
            {
                out.insert(u, ts);
            }
        }
    }
    out
}

/// The journal reads like the docs: every line docs/troubleshooting.md
/// quotes in its `journal` blocks was written by that daemon in this run;
/// fields have plain names; no daemon was refused something by its sandbox.
fn journal_checks(lab: &SystemdLab, controls: &[(&str, u64, u64)], checks: &mut Checks) {
    let doc = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/troubleshooting.md"),
    )
    .expect("docs/troubleshooting.md");
    let quoted = quoted_journal_lines(&doc);
    assert!(
        quoted.len() >= 10,
        "troubleshooting.md quotes the journal: {quoted:?}"
    );
    let mut lines: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for u in RUNNING {
        for n in NODES {
            lines
                .entry(u)
                .or_default()
                .extend(lab.node(n).journal(&[u]).lines().map(str::to_owned));
        }
    }
    let found = |daemon: &str, pattern: &str| {
        lines
            .get(daemon)
            .is_some_and(|ls| ls.iter().any(|l| line_matches(pattern, l)))
    };
    for (daemon, pattern) in &quoted {
        checks.check(found(daemon, pattern), || {
            let mut seen: Vec<&String> = lines.get(daemon.as_str()).map(|l| l.iter().collect()).unwrap_or_default();
            seen.sort();
            seen.dedup();
            format!(
                "troubleshooting.md quotes `{daemon}: {pattern}`, which no node's journal has; {daemon} wrote:\n    {}",
                seen.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n    ")
            )
        });
    }
    // Control: the check can fail.
    assert!(!found("vrrpd", "a line no daemon ever writes"));

    // Structured fields: plain upper-case names, the daemon as identifier.
    let entries = lab.lb1.journal_entries("lb-forwarder.service");
    let applied = entries.iter().find(|e| {
        e.get("MESSAGE")
            .is_some_and(|m| m.starts_with("datapath applied: "))
    });
    checks.check(
        applied.is_some_and(|e| {
            e.get("FARMS").is_some()
                && e.get("TOOK_MS").is_some()
                && e.get("SYSLOG_IDENTIFIER").map(String::as_str) == Some("lb-forwarder")
                && e.get("PRIORITY").map(String::as_str) == Some("6")
                && !e.keys().any(|k| k.starts_with("F_"))
        }),
        || format!("lb-forwarder's `datapath applied` entry: {applied:?}"),
    );
    if let Some(e) = applied {
        let own: BTreeMap<&String, &String> =
            e.iter().filter(|(k, _)| !k.starts_with('_')).collect();
        eprintln!("a journal entry of lb-forwarder, its own fields: {own:?}");
    }
    let vrrpd = lab.lb1.journal_entries("vrrpd.service");
    let vip_entry = vrrpd.iter().find(|e| e.contains_key("VIP"));
    checks.check(
        vip_entry.is_some_and(|e| {
            e.get("MESSAGE").is_some_and(|m| m.contains(VIP))
                && e.get("SYSLOG_IDENTIFIER").map(String::as_str) == Some("vrrpd")
        }),
        || format!("a vrrpd entry with VIP= and the VIP in its message: {vip_entry:?}"),
    );

    // Filtering on a field, as the docs show.
    for (unit, field, says) in [
        ("lb-forwarder", "FARM=web", "farm web: "),
        ("vrrpd", "VRID=159", "vrid=159"),
    ] {
        let out = lab.lb1.exec(
            &["journalctl", "--no-pager", "-o", "cat", "-u", unit, field],
            None,
        );
        let got = text(&out.stdout);
        checks.check(
            !got.trim().is_empty() && got.lines().all(|l| l.contains(says)),
            || format!("journalctl -u {unit} {field}: {got}"),
        );
    }

    // Nothing was refused by a sandbox (a capability, an address family, a
    // read-only path, a denied system call), apart from the controls.
    for u in RUNNING {
        let mut ls = Vec::new();
        for n in NODES {
            for e in lab.node(n).journal_entries(&format!("{u}.service")) {
                let at: u64 = e
                    .get("__REALTIME_TIMESTAMP")
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(0);
                let in_control = controls
                    .iter()
                    .any(|(node, from, to)| *node == n && (*from..=*to).contains(&at));
                if !in_control && let Some(m) = e.get("MESSAGE") {
                    ls.push(format!("{n}: {m}"));
                }
            }
        }
        let daemon = u;
        for l in &ls {
            let refused = [
                "Operation not permitted",
                "Permission denied",
                "Address family not supported",
                "Read-only file system",
                "Bad system call",
            ]
            .iter()
            .find(|p| l.contains(*p));
            // ProcSubset=pid hides /proc/sys and /proc/net.
            let hidden = l.contains("/proc/") && l.contains("No such file or directory");
            checks.check(refused.is_none() && !hidden, || {
                format!("{daemon} was refused: {l}")
            });
        }
    }
}
