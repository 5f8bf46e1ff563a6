//! node.toml `[hooks]` with the real vrrpd, clustermanager and lb-forwarder
//! in namespace labs: hooks run off the failover path, one at a time, in
//! the order of the events, with the event in their environment, killed
//! after their timeout, every exit logged.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tandem_e2e::forwarder_lab::{FwdLab, LabOptions};
use tandem_e2e::vrrp_lab::{ClusterOptions, VrrpLab, set_maintenance};
use tandem_lab::{Lab, LabChild, Netns};
use tandem_proto::v1::{self, VrrpState};

/// A hook that records its start (event, sequence, time in ms, arguments
/// and a few variables), sleeps, then records its end, in `log`.
fn hook(dir: &Path, name: &str, sleep_s: f64, log: &Path) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\n\
             echo \"start $TANDEM_EVENT $TANDEM_SEQUENCE $(date +%s%3N) args=$* old=$TANDEM_OLD_STATE farm=$TANDEM_FARM backend=$TANDEM_BACKEND rotation=$TANDEM_IN_ROTATION state=$TANDEM_BACKEND_STATE\" >> {log}\n\
             sleep {sleep_s}\n\
             echo \"end $TANDEM_EVENT $TANDEM_SEQUENCE $(date +%s%3N)\" >> {log}\n",
            log = log.display()
        ),
    )
    .expect("hook");
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    path
}

/// One line of a hook log.
#[derive(Debug, Clone)]
struct Entry {
    start: bool,
    event: String,
    sequence: u64,
    at_ms: u64,
    rest: String,
}

fn entries(log: &Path) -> Vec<Entry> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.splitn(5, ' ');
            Some(Entry {
                start: f.next()? == "start",
                event: f.next()?.to_owned(),
                sequence: f.next()?.parse().ok()?,
                at_ms: f.next()?.parse().ok()?,
                rest: f.next().unwrap_or_default().to_owned(),
            })
        })
        .collect()
}

/// clustermanager on a node's directories, in its namespace, its output
/// in `log`.
fn clustermanager(lab: &Lab, ns: &Netns, config: &Path, runtime: &Path, log: &Path) -> LabChild {
    let out = std::fs::File::create(log).expect("log file");
    let mut cmd = Command::new(tandem_e2e::bin("clustermanager"));
    cmd.arg("--config-dir")
        .arg(config)
        .arg("--runtime-dir")
        .arg(runtime)
        .arg("--state-dir")
        .arg(tandem_e2e::state_dir_beside(runtime))
        .args(["--peer-start-command", ""])
        .env("RUST_LOG", "info")
        .env_remove("JOURNAL_STREAM")
        .stdout(Stdio::null())
        .stderr(out);
    let child = lab.spawn(ns, &mut cmd).expect("spawn clustermanager");
    tandem_lab::wait_for_unix_socket(
        &runtime.join("clustermanager.sock"),
        Duration::from_secs(10),
    )
    .expect("clustermanager serving");
    child
}

fn add_hooks(config: &Path, hooks: &str) {
    let node = config.join("node.toml");
    let text = std::fs::read_to_string(&node).expect("node.toml");
    std::fs::write(&node, format!("{text}\n[hooks]\n{hooks}")).expect("node.toml");
}

fn wait_until(what: &str, limit: Duration, cond: impl Fn() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

fn other(name: &str) -> &'static str {
    if name == "lb1" { "lb2" } else { "lb1" }
}

/// Crashes the master of a fresh pair with clustermanager on both nodes
/// (with `hooks` in their node.toml when given) while the client probes the
/// VIP; the time from the crash to the backup's first answer, and the lab.
fn failover(hooks: Option<&str>) -> (Duration, VrrpLab, tempfile::TempDir) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut lab = VrrpLab::new(&ClusterOptions::default());
    if let Some(h) = hooks {
        for n in ["lb1", "lb2"] {
            add_hooks(&lab.node(n).config_dir.clone(), h);
        }
    }
    lab.start("lb1");
    lab.start("lb2");
    let master = lab.wait_elected(Duration::from_secs(10));
    let backup = other(&master);
    for n in ["lb1", "lb2"] {
        let node = lab.node(n);
        let (ns, config, runtime) = (
            node.ns.clone(),
            node.config_dir.clone(),
            node.runtime_dir.clone(),
        );
        let cm = clustermanager(
            &lab.lab,
            &ns,
            &config,
            &runtime,
            &tmp.path().join(format!("{n}.log")),
        );
        std::mem::forget(cm); // stopped by the lab, by PID, on drop
    }
    // Settle: the master's own hook (if any) has started.
    std::thread::sleep(Duration::from_millis(500));
    let probe = lab.start_probe(Duration::from_millis(5));
    std::thread::sleep(Duration::from_millis(300));
    let crash = probe.elapsed();
    lab.crash(&master);
    lab.wait_until(Duration::from_secs(10), "the backup to answer", |l| {
        l.vip_answer().as_deref() == Some(backup)
    });
    let log = probe.finish();
    let (_, after) = log.around(crash, &master, backup).expect("a failover");
    (after, lab, tmp)
}

/// A master hook that sleeps 30 s runs on the new master while it takes
/// over: the failover is as fast as without any hook (vrrpd moves the VIP
/// itself; the hook only follows), and the hook is still running when the
/// VIP already answers.
#[test]
fn a_hook_sleeping_30_s_does_not_change_the_failover_time() {
    let (without, lab_a, _t) = failover(None);
    drop(lab_a);
    let tmp = tempfile::tempdir().expect("tempdir");
    let log = tmp.path().join("hooks.log");
    let slow = hook(tmp.path(), "master-hook", 30.0, &log);
    let (with, lab, _t2) = failover(Some(&format!(
        "master = \"{}\"\ntimeout_ms = 60000\n",
        slow.display()
    )));
    eprintln!("failover without hooks {without:?}, with a 30 s master hook {with:?}");
    // Master_Down_Interval at 100 ms adverts is ~361 ms.
    assert!(
        with < Duration::from_millis(1500),
        "with the hook: {with:?}"
    );
    assert!(
        with < without + Duration::from_millis(500),
        "with the hook {with:?}, without {without:?}"
    );
    // The new master's hook started and is still sleeping.
    let new_master = lab.masters();
    assert_eq!(new_master.len(), 1);
    let e = entries(&log);
    assert!(
        e.iter().any(|x| x.start && x.event == "master"),
        "the master hook ran: {e:?}"
    );
    let started = e.iter().filter(|x| x.start && x.event == "master").count();
    let ended = e.iter().filter(|x| !x.start && x.event == "master").count();
    assert!(ended < started, "a master hook is still running: {e:?}");
}

/// One node, hooks of 1 s for master, maintenance and backup: the events
/// that arrive while the first hook runs (maintenance on, then off) wait
/// and run after it, in order, one at a time.
#[test]
fn events_arriving_while_a_hook_runs_are_delivered_in_order_after_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let log = tmp.path().join("hooks.log");
    let h = hook(tmp.path(), "h", 1.0, &log);
    let mut lab = VrrpLab::new(&ClusterOptions::default());
    let (ns, config, runtime) = {
        let n = lab.node("lb1");
        (n.ns.clone(), n.config_dir.clone(), n.runtime_dir.clone())
    };
    add_hooks(
        &config,
        &format!(
            "master = \"{0}\"\nbackup = \"{0}\"\nmaintenance = \"{0}\"\ntimeout_ms = 10000\n",
            h.display()
        ),
    );
    lab.start("lb1");
    lab.wait_until(Duration::from_secs(10), "lb1 master", |l| {
        l.state("lb1") == Some(VrrpState::Master)
    });
    let _cm = clustermanager(&lab.lab, &ns, &config, &runtime, &tmp.path().join("cm.log"));
    wait_until("the master hook", Duration::from_secs(5), || {
        entries(&log).iter().any(|e| e.start)
    });
    // While it sleeps: maintenance on, then off (backup, then master again).
    set_maintenance(&runtime, true);
    std::thread::sleep(Duration::from_millis(100));
    set_maintenance(&runtime, false);
    wait_until("four hooks", Duration::from_secs(15), || {
        entries(&log).iter().filter(|e| !e.start).count() >= 4
    });
    let e = entries(&log);
    let events: Vec<(bool, &str, u64)> = e
        .iter()
        .map(|x| (x.start, x.event.as_str(), x.sequence))
        .collect();
    assert_eq!(
        events[..8],
        [
            (true, "master", 1),
            (false, "master", 1),
            (true, "maintenance", 2),
            (false, "maintenance", 2),
            (true, "backup", 3),
            (false, "backup", 3),
            (true, "master", 4),
            (false, "master", 4),
        ],
        "{e:?}"
    );
    // One at a time: each starts after the previous one ended.
    for pair in e.windows(2) {
        assert!(pair[1].at_ms >= pair[0].at_ms, "{e:?}");
    }
    // keepalived-style arguments and the old state in the environment.
    assert!(
        e[2].rest
            .starts_with("args=INSTANCE VI_51 MAINTENANCE 100 old=master"),
        "{}",
        e[2].rest
    );
    let cm_log = std::fs::read_to_string(tmp.path().join("cm.log")).expect("log");
    assert!(
        cm_log.contains(&format!("hook {} for maintenance exited 0 in", h.display())),
        "{cm_log}"
    );
}

/// A hook that overruns its timeout is killed with its process group, the
/// kill is logged, and the next event's hook runs then; with a long
/// timeout (the control) the next event waits behind the slow hook.
fn timeout_scenario(timeout_ms: u32) -> (Option<Duration>, String) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let log = tmp.path().join("hooks.log");
    let slow = hook(tmp.path(), "slow", 30.0, &log);
    let quick = hook(tmp.path(), "quick", 0.0, &log);
    let mut lab = VrrpLab::new(&ClusterOptions::default());
    let (ns, config, runtime) = {
        let n = lab.node("lb1");
        (n.ns.clone(), n.config_dir.clone(), n.runtime_dir.clone())
    };
    add_hooks(
        &config,
        &format!(
            "master = \"{}\"\nmaintenance = \"{}\"\ntimeout_ms = {timeout_ms}\n",
            slow.display(),
            quick.display()
        ),
    );
    lab.start("lb1");
    lab.wait_until(Duration::from_secs(10), "lb1 master", |l| {
        l.state("lb1") == Some(VrrpState::Master)
    });
    let cm_log = tmp.path().join("cm.log");
    let _cm = clustermanager(&lab.lab, &ns, &config, &runtime, &cm_log);
    wait_until("the slow hook", Duration::from_secs(5), || {
        entries(&log).iter().any(|e| e.start)
    });
    let asked = Instant::now();
    set_maintenance(&runtime, true);
    let ran = (|| {
        while asked.elapsed() < Duration::from_secs(5) {
            if entries(&log)
                .iter()
                .any(|e| e.start && e.event == "maintenance")
            {
                return Some(asked.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    })();
    (ran, std::fs::read_to_string(&cm_log).unwrap_or_default())
}

#[test]
fn a_hook_past_its_timeout_is_killed_and_the_next_event_runs() {
    let (ran, log) = timeout_scenario(1000);
    let ran = ran.expect("the maintenance hook ran");
    assert!(ran < Duration::from_millis(2500), "{ran:?}");
    assert!(
        log.contains("for master timed out after 1000 ms and was killed with its process group"),
        "{log}"
    );
}

#[test]
fn control_with_a_long_timeout_the_next_event_waits_behind_the_slow_hook() {
    let (ran, _) = timeout_scenario(60_000);
    assert_eq!(ran, None, "the maintenance hook waits for the slow one");
}

/// Backend changes on a standalone node: the backend hook gets the farm,
/// the backend and its state; a hook's failure is logged with its status.
#[test]
fn a_backend_leaving_the_rotation_runs_the_backend_hook() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let log = tmp.path().join("hooks.log");
    let h = hook(tmp.path(), "backend", 0.0, &log);
    let failing = tmp.path().join("failing");
    std::fs::write(
        &failing,
        "#!/bin/sh\necho 'no pager configured' >&2\nexit 3\n",
    )
    .expect("hook");
    std::fs::set_permissions(
        &failing,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let lab = FwdLab::with(
        "name = \"web\"\nvip = \"10.0.0.100\"\nport = 80\nsnat_address = \"10.1.0.100\"\n[health_check]\nkind = \"none\"\n[[backends]]\naddress = \"10.1.0.11\"\nport = 8080\n[[backends]]\naddress = \"10.1.0.12\"\nport = 8080\n",
        LabOptions {
            node_extra: format!(
                "\n[hooks]\nbackend = \"{}\"\nnotify = \"{}\"\n",
                h.display(),
                failing.display()
            ),
            ..LabOptions::default()
        },
    );
    let cm_log = tmp.path().join("cm.log");
    let _cm = clustermanager(&lab.lab, &lab.lb, &lab.config, &lab.runtime, &cm_log);
    std::thread::sleep(Duration::from_millis(500));
    lab.set_state("10.1.0.12", v1::BackendAdminState::Down);
    wait_until("the backend hook", Duration::from_secs(5), || {
        entries(&log).iter().any(|e| !e.start)
    });
    let e = entries(&log);
    assert_eq!(e[0].event, "backend");
    assert_eq!(
        e[0].rest,
        "args=BACKEND web 10.1.0.12:8080 DOWN old= farm=web backend=10.1.0.12:8080 rotation=0 state=down"
    );
    wait_until(
        "the notify hook's failure logged",
        Duration::from_secs(5),
        || {
            std::fs::read_to_string(&cm_log).is_ok_and(|l| {
                l.contains(&format!(
                    "hook {} for backend web 10.1.0.12:8080 DOWN failed with exit status 3 after",
                    failing.display()
                )) && l.contains("no pager configured")
            })
        },
    );
}
