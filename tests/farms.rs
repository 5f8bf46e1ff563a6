//! The farm features IPVS and keepalived users expect, through the VIP of a
//! namespace lab with the real lb-forwarder and kernel: persistence, every
//! scheduler against its definition, connection thresholds, the sorry
//! server, the connection table, timeouts, one-packet scheduling, firewall
//! marks and port ranges. Each behaviour has its control: the same scenario
//! with the feature off, shown to fail the same assertion.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use tandem_e2e::forwarder_lab::{FwdLab, LabOptions, VIP, extra_source};
use tandem_proto::v1;

const SOURCES: [&str; 8] = [
    "10.0.0.50",
    "10.0.0.51",
    "10.0.0.52",
    "10.0.0.53",
    "10.0.0.54",
    "10.0.0.55",
    "10.0.0.56",
    "10.0.0.57",
];

/// A farm `web` on VIP:80 over b1..bN:8080 with the given weights, no
/// health check, `extra` top-level lines after the scheduler, and
/// `per_backend` lines appended to backend i (1-based).
fn farm(scheduler: &str, weights: &[u32], extra: &str, per_backend: &[(usize, &str)]) -> String {
    let mut f = format!(
        "name = \"web\"\nvip = \"10.0.0.100\"\nport = 80\nscheduler = \"{scheduler}\"\nsnat_address = \"10.1.0.100\"\n{extra}\n"
    );
    let mut backends = String::new();
    for (i, w) in weights.iter().enumerate() {
        backends.push_str(&format!(
            "[[backends]]\naddress = \"10.1.0.1{}\"\nport = 8080\nweight = {w}\n",
            i + 1
        ));
        for (n, line) in per_backend {
            if *n == i + 1 {
                backends.push_str(line);
                backends.push('\n');
            }
        }
    }
    // `extra` may open tables ([timeouts], [sorry_server]): the health
    // check and the backends, being tables too, follow them.
    f.push_str("[health_check]\nkind = \"none\"\n");
    f.push_str(&backends);
    f
}

fn tally<'a>(names: impl IntoIterator<Item = &'a String>) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for n in names {
        *m.entry(n.clone()).or_insert(0) += 1;
    }
    m
}

fn of(m: &HashMap<String, usize>, b: &str) -> usize {
    m.get(b).copied().unwrap_or(0)
}

/// `n` connections from the eight client addresses in turn, kept open.
fn hold(lab: &FwdLab, n: usize) -> Vec<(String, TcpStream)> {
    (0..n)
        .map(|i| lab.connect_from(SOURCES[i % SOURCES.len()]))
        .collect()
}

fn tandemctl(lab: &FwdLab, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(tandem_e2e::bin("tandemctl"))
        .arg("--runtime-dir")
        .arg(&lab.runtime)
        .arg("--config-dir")
        .arg(&lab.config)
        .args(args)
        .output()
        .expect("tandemctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn echo(stream: &mut TcpStream, text: &str) -> std::io::Result<String> {
    writeln!(stream, "{text}")?;
    let mut line = String::new();
    BufReader::new(stream.try_clone()?).read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(line.trim().to_owned())
}

/// Waits for `cond`, polling; panics after `limit`.
fn wait_until(what: &str, limit: Duration, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// At least one refresh of the loads (once a second) after now.
fn wait_for_a_refresh() {
    std::thread::sleep(Duration::from_millis(2200));
}

fn vip(port: u16) -> SocketAddr {
    format!("{VIP}:{port}").parse().expect("vip")
}

// ---------------------------------------------------------------- persistence

/// ipvsadm -p 3 -M 255.255.255.0: a client's new connections, and those of
/// its /24, go to one backend while it keeps coming back; after the timeout
/// it is scheduled anew.
fn persistence_scenario(persistent: bool) -> Result<(), String> {
    let extra = if persistent {
        "persistence_timeout_s = 3\npersistence_netmask = \"255.255.255.0\""
    } else {
        ""
    };
    let lab = FwdLab::with(
        &farm("rr", &[1, 1, 1], extra, &[]),
        LabOptions {
            extra_sources: 1,
            ..LabOptions::default()
        },
    );
    let first: Vec<String> = (0..50).map(|_| lab.connect_from("10.0.0.50").0).collect();
    let seen: HashSet<&String> = first.iter().collect();
    if seen.len() != 1 {
        return Err(format!(
            "50 connections of one client spread: {:?}",
            tally(&first)
        ));
    }
    let home = first[0].clone();
    // Its /24 neighbour is the same client.
    let neighbour = lab.connect_from("10.0.0.51").0;
    if neighbour != home {
        return Err(format!(
            "10.0.0.51 went to {neighbour}, 10.0.0.50 to {home}"
        ));
    }
    // Another network is scheduled (rr moves on by one), and does not
    // disturb the first client, still within its timeout.
    let other = lab.connect_from(&extra_source(0)).0;
    if other == home {
        return Err(format!("the next scheduled connection went to {home} too"));
    }
    if lab.connect_from("10.0.0.50").0 != home {
        return Err("the client moved within its timeout".into());
    }
    // After the timeout (from its last new connection) the client is
    // scheduled anew: rr's next slot, which is neither of the two above.
    std::thread::sleep(Duration::from_millis(3600));
    let after = lab.connect_from("10.0.0.50").0;
    if after == home || after == other {
        return Err(format!("after the timeout it went to {after} again"));
    }
    Ok(())
}

#[test]
fn persistence_keeps_a_client_and_its_network_on_one_backend_until_the_timeout() {
    persistence_scenario(true).unwrap_or_else(|e| panic!("{e}"));
}

/// Control: without persistence, one client's 50 connections spread.
#[test]
fn control_without_persistence_a_client_is_spread() {
    let e = persistence_scenario(false).expect_err("must fail without persistence");
    assert!(e.contains("50 connections of one client spread"), "{e}");
}

/// At failover the backup has no persistence entries of its own: it derives
/// them, once a second, from the connections conntrack-syncd replicated
/// into its table (each carries its backend's mark). Simulated on one node:
/// its entries are flushed and its VIP removed (a backup's view), and the
/// entry of a client with a live connection comes back from the table.
#[test]
fn a_node_without_the_vip_derives_persistence_from_its_connection_table() {
    let lab = FwdLab::new(&farm("rr", &[1, 1, 1], "persistence_timeout_s = 60", &[]));
    let (home, mut live) = lab.connect_from("10.0.0.50");
    let list = || {
        let out = lab
            .lb
            .exec("nft", &["list", "map", "inet", "tandem", "persist_web"])
            .expect("list map");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(list().contains("10.0.0.50 expires"), "{}", list());
    // Control first: on the node holding the VIP (a master), nothing is
    // derived — the flushed entry stays gone, and the client would be
    // scheduled anew.
    lab.lb
        .exec("nft", &["flush", "map", "inet", "tandem", "persist_web"])
        .expect("flush");
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        !list().contains("10.0.0.50"),
        "a master derives nothing: {}",
        list()
    );
    // A backup's view: no VIP. The live connection's entry is derived.
    lab.lb
        .remove_address("eth0", "10.0.0.100/24")
        .expect("remove the VIP");
    wait_until("the derived entry", Duration::from_secs(5), || {
        list().contains("10.0.0.50 expires")
    });
    // The VIP comes back (failover): the client keeps its backend, although
    // rr would send the next connection elsewhere.
    lab.lb
        .add_address("eth0", "10.0.0.100/24")
        .expect("VIP back");
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..5 {
        assert_eq!(lab.connect_from("10.0.0.50").0, home);
    }
    assert_eq!(echo(&mut live, "still here").expect("echo"), "still here");
}

// ---------------------------------------------------------------- schedulers

/// The definition of the least-connection family, independent of the
/// product's code: each new connection goes to the first backend of least
/// cost — wlc: active / weight; sed: (active + 1) / weight; nq: the first
/// idle backend, else as sed — and adds one active connection. The order
/// of the picks.
fn reference(sched: &str, mut active: Vec<u64>, weights: &[u64], n: usize) -> Vec<usize> {
    let mut picks = Vec::new();
    for _ in 0..n {
        let cost = |i: usize, a: &[u64]| -> (u64, u64) {
            match sched {
                "wlc" => (a[i], weights[i]),
                _ => (a[i] + 1, weights[i]),
            }
        };
        let idle = (0..active.len()).find(|&i| active[i] == 0);
        let pick = match (sched, idle) {
            ("nq", Some(i)) => i,
            _ => {
                let mut best = 0;
                for i in 1..active.len() {
                    let (a, b) = (cost(i, &active), cost(best, &active));
                    if a.0 * b.1 < b.0 * a.1 {
                        best = i;
                    }
                }
                best
            }
        };
        active[pick] += 1;
        picks.push(pick);
    }
    picks
}

const LOADS: [u64; 3] = [0, 3, 20];
const WEIGHTS: [u32; 3] = [1, 5, 50];

/// Loads of 0, 3 and 20 held connections on b1, b2, b3 (weights 1, 5,
/// 50), then 300 more held connections: the backend (index) each went to,
/// in order, with the held streams.
fn unequal_loads(sched: &str) -> (Vec<usize>, Vec<TcpStream>) {
    let lab = FwdLab::new(&farm(sched, &WEIGHTS, "", &[]));
    use v1::BackendAdminState::{Maintenance, Up};
    let mut held = Vec::new();
    lab.set_state("10.1.0.11", Maintenance);
    lab.set_state("10.1.0.12", Maintenance);
    held.extend(hold(&lab, 20));
    lab.set_state("10.1.0.13", Maintenance);
    lab.set_state("10.1.0.12", Up);
    held.extend(hold(&lab, 3));
    lab.set_state("10.1.0.11", Up);
    lab.set_state("10.1.0.13", Up);
    let pre = tally(held.iter().map(|(n, _)| n));
    assert_eq!((of(&pre, "b2"), of(&pre, "b3")), (3, 20), "{pre:?}");
    wait_for_a_refresh();
    let new = hold(&lab, 300);
    let order = new
        .iter()
        .map(|(n, _)| match n.as_str() {
            "b1" => 0,
            "b2" => 1,
            _ => 2,
        })
        .collect();
    held.extend(new);
    (order, held.into_iter().map(|(_, s)| s).collect())
}

fn counts(order: &[usize]) -> [usize; 3] {
    let mut c = [0; 3];
    for i in order {
        c[*i] += 1;
    }
    c
}

/// The picks match the definition: the first 40 exactly (where wlc, sed and
/// nq differ), the 300 within 2 per backend.
fn matches_definition(sched: &str, got: &[usize]) -> Result<(), String> {
    let w: Vec<u64> = WEIGHTS.iter().map(|w| u64::from(*w)).collect();
    let want = reference(sched, LOADS.to_vec(), &w, 300);
    if got[..40] != want[..40] {
        return Err(format!(
            "{sched}: first picks {:?}, its definition gives {:?}",
            &got[..40],
            &want[..40]
        ));
    }
    let (g, w) = (counts(got), counts(&want));
    if g.iter().zip(&w).any(|(a, b)| a.abs_diff(*b) > 2) {
        return Err(format!("{sched}: {g:?}, its definition gives {w:?}"));
    }
    Ok(())
}

#[test]
fn wlc_follows_its_definition_under_unequal_loads() {
    let (got, _held) = unequal_loads("wlc");
    matches_definition("wlc", &got).unwrap_or_else(|e| panic!("{e}"));
    // And not the others' (the test tells them apart).
    assert!(matches_definition("sed", &got).is_err());
}

#[test]
fn sed_follows_its_definition_under_unequal_loads() {
    let (got, _held) = unequal_loads("sed");
    matches_definition("sed", &got).unwrap_or_else(|e| panic!("{e}"));
    assert!(matches_definition("nq", &got).is_err());
}

#[test]
fn nq_follows_its_definition_under_unequal_loads() {
    let (got, _held) = unequal_loads("nq");
    matches_definition("nq", &got).unwrap_or_else(|e| panic!("{e}"));
    assert!(matches_definition("wlc", &got).is_err());
}

/// Control: round robin under the same loads fails every definition.
#[test]
fn control_round_robin_ignores_the_loads() {
    let (got, _held) = unequal_loads("rr");
    for sched in ["wlc", "sed", "nq"] {
        assert!(matches_definition(sched, &got).is_err(), "{sched}");
    }
    assert_eq!(counts(&got), [100, 100, 100]);
}

/// Every source's backend over `n` extra sources.
fn owners(lab: &FwdLab, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| lab.connect_from(&extra_source(i)).0)
        .collect()
}

fn mh_lab() -> FwdLab {
    FwdLab::with(
        &farm("mh", &[1, 1, 1, 1, 1], "", &[]),
        LabOptions {
            backends: 5,
            extra_sources: 400,
            ..LabOptions::default()
        },
    )
}

/// (clients of the gone backend that stayed on it, others moved, others).
fn movement(before: &[String], after: &[String], gone: &str) -> (usize, usize, usize) {
    let mut stayed = 0;
    let mut moved = 0;
    let mut others = 0;
    for (b, a) in before.iter().zip(after) {
        if b == gone {
            stayed += usize::from(a == gone);
        } else {
            others += 1;
            moved += usize::from(a != b);
        }
    }
    (stayed, moved, others)
}

/// Maglev: 400 clients over 5 backends; b3 leaves the rotation: only its
/// clients move, and at most 1 % of the others.
#[test]
fn mh_moves_only_the_clients_of_a_backend_that_leaves() {
    let lab = mh_lab();
    let before = owners(&lab, 400);
    let spread = tally(&before);
    assert_eq!(spread.len(), 5, "{spread:?}");
    assert!(spread.values().all(|n| *n >= 40), "{spread:?}");
    lab.set_state("10.1.0.13", v1::BackendAdminState::Down);
    let after = owners(&lab, 400);
    let (stayed, moved, others) = movement(&before, &after, "b3");
    assert_eq!(stayed, 0, "every client of b3 moved");
    assert!(
        moved * 100 <= others,
        "{moved} of {others} other clients moved"
    );
}

/// Control: removing the backend from the farm file rebuilds the Maglev
/// table (its size follows the configured backends), which moves far more
/// than 1 % of the other clients.
#[test]
fn control_rebuilding_the_table_moves_the_other_clients() {
    let lab = mh_lab();
    let before = owners(&lab, 400);
    let text = std::fs::read_to_string(lab.config.join("farms/web.toml")).expect("farm");
    let without = text.replace(
        "[[backends]]\naddress = \"10.1.0.13\"\nport = 8080\nweight = 1\n",
        "",
    );
    assert_ne!(text, without);
    std::fs::write(lab.config.join("farms/web.toml"), without).expect("write");
    let reply = lab.rpc(async |mut c| {
        c.reload(v1::ReloadRequest {})
            .await
            .expect("reload")
            .into_inner()
    });
    assert!(reply.applied, "{:?}", reply.errors);
    std::thread::sleep(Duration::from_millis(500));
    let after = owners(&lab, 400);
    let (_, moved, others) = movement(&before, &after, "b3");
    assert!(moved * 100 > others, "only {moved} of {others} moved");
}

/// Destination hash on a firewall-mark farm serving 16 addresses: every
/// connection to one destination reaches one backend, whatever its source.
fn destinations_scenario(sched: &str) -> Result<(), String> {
    let lab = FwdLab::new(&farm(sched, &[1, 1, 1], "fwmark = 16", &[]));
    for i in 101..116 {
        lab.lb
            .add_address("eth0", &format!("10.0.0.{i}/24"))
            .expect("address");
    }
    lab.lb
        .exec(
            "nft",
            &["add table ip operator; add chain ip operator marking { type filter hook prerouting priority mangle; }; add rule ip operator marking ip daddr 10.0.0.100-10.0.0.115 tcp dport 80 meta mark set 16"],
        )
        .expect("the operator's rule");
    let mut per_dst: HashMap<u8, HashSet<String>> = HashMap::new();
    for round in 0..20 {
        for d in 100..116u8 {
            let src = SOURCES[(round + usize::from(d)) % SOURCES.len()];
            let name = lab.connect_to(src, &format!("10.0.0.{d}:80")).0;
            per_dst.entry(d).or_default().insert(name);
        }
    }
    let spread: HashSet<&String> = per_dst.values().flatten().collect();
    if spread.len() < 2 {
        return Err(format!("16 destinations all on one backend: {per_dst:?}"));
    }
    if let Some((d, names)) = per_dst.iter().find(|(_, n)| n.len() > 1) {
        return Err(format!("destination 10.0.0.{d} reached {names:?}"));
    }
    Ok(())
}

#[test]
fn dh_keeps_each_destination_on_one_backend() {
    destinations_scenario("dh").unwrap_or_else(|e| panic!("{e}"));
}

/// Control: round robin on the same farm sends a destination everywhere.
#[test]
fn control_round_robin_spreads_a_destination() {
    let e = destinations_scenario("rr").expect_err("rr must fail");
    assert!(e.contains("reached"), "{e}");
}

/// Weighted failover: everything to the heaviest backend in rotation.
#[test]
fn fo_sends_every_connection_to_the_heaviest_backend_in_rotation() {
    let lab = FwdLab::new(&farm("fo", &[2, 3, 1], "", &[]));
    let first = tally(
        &(0..300)
            .map(|_| lab.connect_from("10.0.0.50").0)
            .collect::<Vec<_>>(),
    );
    assert_eq!(of(&first, "b2"), 300, "{first:?}");
    lab.set_state("10.1.0.12", v1::BackendAdminState::Down);
    let next = tally(
        &(0..30)
            .map(|_| lab.connect_from("10.0.0.50").0)
            .collect::<Vec<_>>(),
    );
    assert_eq!(of(&next, "b1"), 30, "the next heaviest: {next:?}");
}

/// Control: weighted round robin with the same weights spreads.
#[test]
fn control_wrr_spreads_where_fo_picks_one() {
    let lab = FwdLab::new(&farm("wrr", &[2, 3, 1], "", &[]));
    let t = tally(
        &(0..300)
            .map(|_| lab.connect_from("10.0.0.50").0)
            .collect::<Vec<_>>(),
    );
    assert_ne!(of(&t, "b2"), 300, "{t:?}");
    assert_eq!([of(&t, "b1"), of(&t, "b2"), of(&t, "b3")], [100, 150, 50]);
}

/// The order in which held connections reached their backends, and
/// whether one more could connect.
fn overflow_scenario(sched: &str) -> (Vec<String>, bool) {
    let lab = FwdLab::new(&farm(sched, &[150, 100, 60], "", &[]));
    let held = hold(&lab, 310);
    let order: Vec<String> = held.iter().map(|(n, _)| n.clone()).collect();
    let more = lab
        .try_connect("10.0.0.50", vip(80), Duration::from_millis(1500))
        .is_ok();
    (order, more)
}

/// Overflow: the heaviest backend until it holds as many connections as its
/// weight, then the next; with every one full, no backend.
#[test]
fn ovf_fills_backends_in_order_of_weight_then_refuses() {
    let (order, more) = overflow_scenario("ovf");
    let want: Vec<String> = std::iter::repeat_n("b1".to_owned(), 150)
        .chain(std::iter::repeat_n("b2".to_owned(), 100))
        .chain(std::iter::repeat_n("b3".to_owned(), 60))
        .collect();
    assert_eq!(order, want);
    assert!(
        !more,
        "every backend is full: the 311th connection has none"
    );
}

/// Control: weighted round robin with the same weights interleaves.
#[test]
fn control_wrr_interleaves_instead_of_filling_in_order() {
    let (order, more) = overflow_scenario("wrr");
    assert_ne!(order[..150], vec!["b1".to_owned(); 150][..]);
    assert!(more);
}

#[test]
fn round_robin_and_weighted_round_robin_over_300_connections() {
    let lab = FwdLab::new(&farm("rr", &[3, 2, 1], "", &[]));
    let t = tally(
        &(0..300)
            .map(|_| lab.connect_from("10.0.0.50").0)
            .collect::<Vec<_>>(),
    );
    assert_eq!([of(&t, "b1"), of(&t, "b2"), of(&t, "b3")], [100, 100, 100]);
    let lab = FwdLab::new(&farm("wrr", &[3, 2, 1], "", &[]));
    let t = tally(
        &(0..300)
            .map(|_| lab.connect_from("10.0.0.50").0)
            .collect::<Vec<_>>(),
    );
    assert_eq!([of(&t, "b1"), of(&t, "b2"), of(&t, "b3")], [150, 100, 50]);
}

// ---------------------------------------------------------------- thresholds

/// b1 with `-x 5 -y 2` in a round robin of three: it stops taking new
/// connections at 5 and is readmitted when down to 2.
fn thresholds_scenario(with: bool) -> Result<(), String> {
    let lines: &[(usize, &str)] = if with {
        &[(1, "upper_threshold = 5\nlower_threshold = 2")]
    } else {
        &[]
    };
    let lab = FwdLab::new(&farm("rr", &[1, 1, 1], "", lines));
    let held = hold(&lab, 30);
    let t = tally(held.iter().map(|(n, _)| n));
    if of(&t, "b1") != 5 {
        return Err(format!("b1 took {} of 30: {t:?}", of(&t, "b1")));
    }
    let (mut b1, others): (Vec<_>, Vec<_>) = held.into_iter().partition(|(n, _)| n == "b1");
    // Seen at its threshold by a refresh of the loads (once a second)...
    wait_for_a_refresh();
    // ... then down to 3: still over the lower threshold.
    b1.truncate(3);
    wait_for_a_refresh();
    let more = hold(&lab, 9);
    let t = tally(more.iter().map(|(n, _)| n));
    if of(&t, "b1") != 0 {
        return Err(format!("b1 readmitted above its lower threshold: {t:?}"));
    }
    // Down to 2: readmitted.
    b1.truncate(2);
    wait_for_a_refresh();
    let again = hold(&lab, 9);
    let t = tally(again.iter().map(|(n, _)| n));
    if of(&t, "b1") != 3 {
        return Err(format!("b1 readmitted up to its threshold again: {t:?}"));
    }
    drop((b1, others, more, again));
    Ok(())
}

#[test]
fn an_upper_threshold_stops_new_connections_and_the_lower_readmits() {
    thresholds_scenario(true).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn control_without_thresholds_a_backend_takes_its_share() {
    let e = thresholds_scenario(false).expect_err("must fail without thresholds");
    assert!(e.contains("b1 took 10 of 30"), "{e}");
}

// ---------------------------------------------------------------- sorry server

/// b1 and b2 with b3 as sorry server: it answers only while both are down,
/// and connections are never moved to it or away from it.
fn sorry_scenario(with_sorry: bool) -> Result<(), String> {
    let sorry = if with_sorry {
        "\n[sorry_server]\naddress = \"10.1.0.13\"\nport = 8080"
    } else {
        ""
    };
    let lab = FwdLab::new(&farm("rr", &[1, 1], sorry, &[]));
    use v1::BackendAdminState::{Down, Up};
    let t = tally(
        &(0..20)
            .map(|_| lab.connect_from("10.0.0.50").0)
            .collect::<Vec<_>>(),
    );
    if of(&t, "b3") != 0 {
        return Err(format!(
            "the sorry server answered while backends were up: {t:?}"
        ));
    }
    let (first, mut on_b) = lab.connect_from("10.0.0.51");
    lab.set_state("10.1.0.11", Down);
    lab.set_state("10.1.0.12", Down);
    let (name, mut on_sorry) = lab
        .try_connect("10.0.0.52", vip(80), Duration::from_millis(1500))
        .map_err(|e| format!("every backend down: {e}"))?;
    if name != "b3" {
        return Err(format!("every backend down, {name} answered"));
    }
    if echo(&mut on_b, "kept").map_err(|e| e.to_string())? != "kept" {
        return Err(format!("the connection to {first} was moved"));
    }
    lab.set_state("10.1.0.11", Up);
    let t = tally(
        &(0..10)
            .map(|_| lab.connect_from("10.0.0.50").0)
            .collect::<Vec<_>>(),
    );
    if of(&t, "b1") != 10 {
        return Err(format!("a backend is back, yet: {t:?}"));
    }
    if echo(&mut on_sorry, "still sorry").map_err(|e| e.to_string())? != "still sorry" {
        return Err("the connection to the sorry server was moved".into());
    }
    // The farm shows it, and conn list names it.
    let (_, out, _) = tandemctl(&lab, &["farm", "list", "--json"]);
    let farms: serde_json::Value = serde_json::from_str(&out).expect("json");
    if farms[0]["sorry_server"]["active"] != false
        || farms[0]["sorry_server"]["active_connections"] != 1
    {
        return Err(format!("farm list: {}", farms[0]["sorry_server"]));
    }
    Ok(())
}

#[test]
fn the_sorry_server_answers_only_while_every_backend_is_down() {
    sorry_scenario(true).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn control_without_a_sorry_server_nothing_answers() {
    let e = sorry_scenario(false).expect_err("must fail without a sorry server");
    assert!(e.starts_with("every backend down: "), "{e}");
}

// ------------------------------------------------- quiesce or reset on failure

/// A backend whose command check fails (a flag file removed) while a
/// connection to it is open: kept (quiesce, keepalived
/// inhibit_on_failure) or reset (IPVS expire_nodest_conn).
fn failure_scenario(on_failure: &str) -> Result<(), String> {
    let tmp = tempfile::tempdir().expect("tempdir");
    let flags = tmp.path();
    let script = flags.join("check");
    std::fs::write(
        &script,
        format!("#!/bin/sh\ntest -e {}/up-$1\n", flags.display()),
    )
    .expect("script");
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    for b in ["10.1.0.11", "10.1.0.12"] {
        std::fs::write(flags.join(format!("up-{b}")), "").expect("flag");
    }
    let text = farm(
        "rr",
        &[1, 1],
        &format!("on_backend_failure = \"{on_failure}\""),
        &[],
    )
    .replace(
        "[health_check]\nkind = \"none\"",
        &format!(
            "[health_check]\nkind = \"command\"\ncommand = \"{}\"\ninterval_ms = 200\ntimeout_ms = 150\nrise = 1\nfall = 1",
            script.display()
        ),
    );
    let lab = FwdLab::new(&text);
    wait_until("both healthy", Duration::from_secs(5), || {
        lab.farm()
            .backends
            .iter()
            .all(|b| b.health() == v1::BackendHealth::Healthy)
    });
    let mut on_b1 = loop {
        let (name, s) = lab.connect_from("10.0.0.50");
        if name == "b1" {
            break s;
        }
    };
    std::fs::remove_file(flags.join("up-10.1.0.11")).expect("b1 fails");
    wait_until("b1 failing", Duration::from_secs(5), || {
        lab.farm()
            .backends
            .iter()
            .any(|b| b.address == "10.1.0.11" && b.health() == v1::BackendHealth::Failing)
    });
    std::thread::sleep(Duration::from_millis(500));
    match echo(&mut on_b1, "after the failure") {
        Ok(e) if e == "after the failure" => Ok(()),
        other => Err(format!("the connection to the failed backend: {other:?}")),
    }
}

#[test]
fn a_failed_backend_keeps_its_connections_when_quiesced() {
    failure_scenario("quiesce").unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn a_failed_backend_loses_its_connections_with_reset() {
    let e = failure_scenario("reset").expect_err("reset must cut the connection");
    assert!(
        e.starts_with("the connection to the failed backend: Err"),
        "{e}"
    );
}

// ----------------------------------------------------- connection table, rates

/// `conntrack -L` in the balancer's namespace: (client port, backend
/// address) of the entries to the VIP.
fn conntrack_entries(lab: &FwdLab) -> HashSet<(u16, String, String)> {
    let out = lab.lb.exec("conntrack", &["-L"]).expect("conntrack -L");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("dst=10.0.0.100"))
        .filter_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            let get = |k: &str, nth: usize| {
                fields
                    .iter()
                    .filter_map(|f| f.strip_prefix(k))
                    .nth(nth)
                    .map(str::to_owned)
            };
            let state = if l.starts_with("tcp") {
                fields.get(3).map(|s| (*s).to_owned()).unwrap_or_default()
            } else {
                String::new()
            };
            Some((
                get("sport=", 0)?.parse().ok()?,
                format!("{}:{}", get("src=", 1)?, get("sport=", 1)?),
                state,
            ))
        })
        .collect()
}

#[test]
fn conn_list_shows_the_kernels_connections_with_farm_and_backend() {
    let lab = FwdLab::new(&farm("rr", &[1, 1, 1], "", &[]));
    let held = hold(&lab, 6);
    let (code, out, err) = tandemctl(&lab, &["conn", "list", "--json"]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).expect("json");
    let ours: HashSet<(u16, String, String)> = rows
        .iter()
        .map(|r| {
            let client = r["client"].as_str().expect("client");
            let port = client
                .rsplit(':')
                .next()
                .expect("port")
                .parse()
                .expect("port");
            (
                port,
                r["backend"].as_str().expect("backend").to_owned(),
                r["state"].as_str().expect("state").to_owned(),
            )
        })
        .collect();
    assert!(
        rows.iter()
            .all(|r| r["farm"] == "web" && r["virtual"] == "10.0.0.100:80")
    );
    assert_eq!(
        ours,
        conntrack_entries(&lab),
        "tandemctl and conntrack -L agree"
    );
    let mine: HashSet<u16> = held
        .iter()
        .map(|(_, s)| s.local_addr().expect("addr").port())
        .collect();
    let listed: HashSet<u16> = ours.iter().map(|(p, _, _)| *p).collect();
    assert!(mine.is_subset(&listed), "every held connection is listed");
    // The table form, like ipvsadm -L -n -c.
    let (_, text, _) = tandemctl(&lab, &["conn", "list"]);
    assert!(
        text.contains("PRO") && text.contains("ESTABLISHED") && text.contains("10.1.0.11:8080"),
        "{text}"
    );
    // Only one farm's, or an unknown farm named.
    let (code, _, err) = tandemctl(&lab, &["conn", "list", "--farm", "nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("no farm `nope`"), "{err}");
}

#[test]
fn rates_count_connections_packets_and_bytes_each_way() {
    let lab = FwdLab::new(&farm("rr", &[1, 1, 1], "", &[]));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (_, mut s) = lab.connect_from("10.0.0.50");
    let flag = stop.clone();
    let traffic = std::thread::spawn(move || {
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = echo(&mut s, "ping");
        }
    });
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut last = serde_json::Value::Null;
    while Instant::now() < deadline {
        lab.connect_from("10.0.0.51");
        let (code, out, err) = tandemctl(&lab, &["farm", "stats", "--rate", "--json"]);
        assert_eq!(code, 0, "{err}");
        let farms: serde_json::Value = serde_json::from_str(&out).expect("json");
        last = farms[0]["rates"].clone();
        let pos = |k: &str| last[k].as_f64().is_some_and(|v| v > 0.0);
        if ["cps", "in_pps", "out_pps", "in_bps", "out_bps"]
            .iter()
            .all(|k| pos(k))
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = traffic.join();
    for k in ["cps", "in_pps", "out_pps", "in_bps", "out_bps"] {
        assert!(last[k].as_f64().is_some_and(|v| v > 0.0), "{k}: {last}");
    }
    let (_, text, _) = tandemctl(&lab, &["farm", "stats", "--rate"]);
    assert!(text.contains("CPS") && text.contains("OUTBPS"), "{text}");
}

// --------------------------------------------------------------- timeouts

fn tcp_timeout_of_a_connection(extra: &str) -> u32 {
    let lab = FwdLab::new(&farm("rr", &[1], extra, &[]));
    let (_, s) = lab.connect_from("10.0.0.50");
    let port = s.local_addr().expect("addr").port();
    let out = lab.lb.exec("conntrack", &["-L"]).expect("conntrack -L");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.contains(&format!("sport={port} ")) && l.contains("ESTABLISHED"))
        .unwrap_or_else(|| panic!("no entry for port {port}:\n{text}"));
    line.split_whitespace()
        .nth(2)
        .and_then(|t| t.parse().ok())
        .expect("timeout")
}

#[test]
fn farm_timeouts_are_in_the_kernels_entries() {
    let t = tcp_timeout_of_a_connection("[timeouts]\ntcp_s = 42");
    assert!((1..=42).contains(&t), "established timeout {t}");
}

#[test]
fn control_without_timeouts_the_kernels_default_applies() {
    let t = tcp_timeout_of_a_connection("");
    assert!(t > 400_000, "the default 5 days: {t}");
}

// --------------------------------------------------- one-packet scheduling

/// 30 datagrams of one socket (one 5-tuple) to a udp farm on port 53.
fn datagrams(one_packet: bool) -> HashMap<String, usize> {
    let text = farm(
        "rr",
        &[1, 1, 1],
        if one_packet {
            "protocol = \"udp\"\none_packet = true"
        } else {
            "protocol = \"udp\""
        },
        &[],
    )
    .replace("port = 80\n", "port = 53\n")
    .replace("port = 8080\n", "port = 5353\n");
    let lab = FwdLab::with(
        &text,
        LabOptions {
            udp_ports: vec![5353],
            ..LabOptions::default()
        },
    );
    let names = lab
        .client
        .run(|| {
            let s = std::net::UdpSocket::bind("10.0.0.50:0")?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut out = Vec::new();
            let mut buf = [0u8; 64];
            for _ in 0..30 {
                s.send_to(b"q", vip(53))?;
                let (n, _) = s.recv_from(&mut buf)?;
                out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
            Ok::<_, std::io::Error>(out)
        })
        .expect("client thread")
        .expect("datagrams");
    tally(&names)
}

#[test]
fn one_packet_scheduling_spreads_the_datagrams_of_one_flow() {
    let t = datagrams(true);
    assert_eq!(
        [of(&t, "b1"), of(&t, "b2"), of(&t, "b3")],
        [10, 10, 10],
        "{t:?}"
    );
}

#[test]
fn control_without_one_packet_scheduling_a_flow_stays_on_one_backend() {
    let t = datagrams(false);
    assert_eq!(t.len(), 1, "{t:?}");
}

// ------------------------------------------------ firewall marks, port ranges

/// A firewall-mark farm serving ports 80 and 443, marked by the operator's
/// own rule; backends keep the client's port.
fn fwmark_scenario(operator_rule: bool) -> Result<(), String> {
    let text = farm("rr", &[1, 1], "fwmark = 1", &[]).replace("port = 8080\n", "");
    let lab = FwdLab::with(
        &text,
        LabOptions {
            tcp_ports: vec![80, 443],
            ..LabOptions::default()
        },
    );
    if operator_rule {
        lab.lb
            .exec(
                "nft",
                &["add table ip operator; add chain ip operator marking { type filter hook prerouting priority mangle; }; add rule ip operator marking ip daddr 10.0.0.100 tcp dport { 80, 443 } meta mark set 1"],
            )
            .expect("the operator's rule");
    }
    for port in [80, 443] {
        for _ in 0..4 {
            lab.try_connect("10.0.0.50", vip(port), Duration::from_millis(1500))
                .map_err(|e| format!("port {port}: {e}"))?;
        }
    }
    let farm = lab.farm();
    if farm.fwmark != 1 {
        return Err(format!("fwmark {}", farm.fwmark));
    }
    Ok(())
}

#[test]
fn a_fwmark_farm_serves_two_ports_marked_by_an_operator_rule() {
    fwmark_scenario(true).unwrap_or_else(|e| panic!("{e}"));
}

#[test]
fn control_without_the_operators_mark_nothing_is_served() {
    let e = fwmark_scenario(false).expect_err("unmarked traffic is not served");
    assert!(e.starts_with("port 80: "), "{e}");
}

#[test]
fn a_port_range_farm_keeps_each_clients_port() {
    let text = farm("rr", &[1, 1], "", &[])
        .replace("port = 80\n", "port = \"8000-8100\"\n")
        .replace("port = 8080\n", "");
    let lab = FwdLab::with(
        &text,
        LabOptions {
            tcp_ports: vec![8000, 8050, 8101],
            ..LabOptions::default()
        },
    );
    for port in [8000, 8050] {
        let (name, s) = lab.connect_to("10.0.0.50", &format!("{VIP}:{port}"));
        assert!(name.starts_with('b'), "{port}: {name}");
        drop(s);
    }
    assert!(
        lab.try_connect("10.0.0.50", vip(8101), Duration::from_millis(800))
            .is_err(),
        "8101 is outside the range"
    );
    let (_, out, _) = tandemctl(&lab, &["farm", "list", "--json"]);
    assert!(
        out.contains("\"listen\": \"10.0.0.100:8000-8100/tcp\""),
        "{out}"
    );
}

// ------------------------------------------------------------ metrics cost

/// Every `nft` lb-forwarder starts is logged by a wrapper first in its
/// PATH; 64 scrapers hammer the metrics endpoint for 10 s: at most one
/// `nft` a second (none, in fact: counters are read over netlink, once a
/// second), and the counters served are at most a second or so behind.
#[test]
fn sixty_four_concurrent_scrapers_start_no_nft_process() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let log = tmp.path().join("nft.log");
    let wrapper = tmp.path().join("nft");
    let real = ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("nft installed");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho \"$(date +%s.%N) $*\" >> {}\nexec {real} \"$@\"\n",
            log.display()
        ),
    )
    .expect("wrapper");
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let port = 19_401;
    let lab = FwdLab::with(
        &farm("rr", &[1, 1, 1], "", &[]),
        LabOptions {
            path_prefix: Some(tmp.path().to_owned()),
            node_extra: format!("metrics_listen = \"127.0.0.1:{}\"\n", port - 1),
            ..LabOptions::default()
        },
    );
    let calls = || {
        std::fs::read_to_string(&log)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    assert!(calls() >= 1, "the wrapper sees the datapath's apply");
    let scrape = |ns: &tandem_lab::Netns| {
        ns.run(move || {
            let mut s = TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
            let mut body = String::new();
            std::io::Read::read_to_string(&mut s, &mut body)?;
            Ok::<String, std::io::Error>(body)
        })
        .expect("thread")
    };
    wait_until("the endpoint", Duration::from_secs(10), || {
        scrape(&lab.lb).is_ok_and(|b| b.contains("tandem_lb_counter_reads_total"))
    });
    let before = calls();
    let start = Instant::now();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scrapes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let threads: Vec<_> = (0..64)
        .map(|_| {
            let stop = stop.clone();
            let scrapes = scrapes.clone();
            lab.lb
                .spawn_thread(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let ok = TcpStream::connect(("127.0.0.1", port)).and_then(|mut s| {
                            s.set_read_timeout(Some(Duration::from_secs(5)))?;
                            s.write_all(
                                b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                            )?;
                            let mut body = String::new();
                            std::io::Read::read_to_string(&mut s, &mut body)?;
                            Ok(body)
                        });
                        if ok.is_ok_and(|b| b.contains("# EOF")) {
                            scrapes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                })
                .expect("scraper")
        })
        .collect();
    // Traffic meanwhile: the served counters follow within about a second.
    let (_, mut s) = lab.connect_from("10.0.0.50");
    for _ in 0..50 {
        echo(&mut s, "ping").expect("echo");
    }
    let sent = Instant::now();
    let seen = loop {
        let body = scrape(&lab.lb).expect("scrape");
        let packets: f64 = body
            .lines()
            .find(|l| l.starts_with("tandem_lb_farm_packets_total{farm=\"web\"}"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        if packets >= 100.0 {
            break sent.elapsed();
        }
        assert!(
            sent.elapsed() < Duration::from_secs(5),
            "counters never followed: {body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(Duration::from_secs(10).saturating_sub(start.elapsed()));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let during = calls() - before;
    let n = scrapes.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "{n} scrapes by 64 scrapers in {elapsed:.1} s, {during} nft processes, counters followed in {seen:?}"
    );
    assert!(n >= 640, "the scrapers were served: {n}");
    assert!(
        (during as f64) <= elapsed,
        "{during} nft processes in {elapsed:.1} s"
    );
    assert!(seen < Duration::from_millis(2500), "{seen:?}");
}

// ------------------------------------------------ persistence at failover

/// Two nodes with conntrack-syncd: clients 10.0.0.51, .52, then .50 open
/// one connection each to a persistent round-robin farm (b1, b2, b3), kept
/// open; lb1 dies; on lb2, which derived its persistence entries from the
/// replicated connections, 10.0.0.50's new connections still go to b3,
/// while a plain round robin would start again at b1.
fn persistence_at_failover(sync: bool) -> Result<(), String> {
    use tandem_e2e::conntrack_lab::ClusterLab;
    let mut lab = ClusterLab::new();
    let farm = "name = \"web\"\nvip = \"10.0.0.100\"\nport = 80\nscheduler = \"rr\"\nsnat_address = \"10.1.0.100\"\npersistence_timeout_s = 300\n[health_check]\nkind = \"none\"\n\
[[backends]]\naddress = \"10.1.0.11\"\nport = 8080\n[[backends]]\naddress = \"10.1.0.12\"\nport = 8080\n[[backends]]\naddress = \"10.1.0.13\"\nport = 8080\n";
    for n in ["lb1", "lb2"] {
        std::fs::write(lab.node(n).config_dir.join("farms/web.toml"), farm).expect("farm");
    }
    lab.start_cluster(sync);
    let client = lab.client.clone();
    let connect = |src: &str| {
        client
            .run({
                let src: SocketAddr = format!("{src}:0").parse().expect("src");
                move || {
                    let s =
                        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                    s.bind(&src.into())?;
                    s.connect_timeout(&vip(80).into(), Duration::from_secs(3))?;
                    let s: TcpStream = s.into();
                    s.set_read_timeout(Some(Duration::from_secs(3)))?;
                    let mut name = String::new();
                    BufReader::new(s.try_clone()?).read_line(&mut name)?;
                    Ok::<_, std::io::Error>((name.trim().to_owned(), s))
                }
            })
            .expect("client thread")
    };
    let mut held = Vec::new();
    for src in ["10.0.0.51", "10.0.0.52", "10.0.0.50"] {
        held.push(connect(src).map_err(|e| format!("{src}: {e}"))?);
    }
    let home = held[2].0.clone();
    if home != "b3" {
        return Err(format!("10.0.0.50 went to {home}, not the third slot"));
    }
    if sync {
        lab.wait_for("the connections on lb2", Duration::from_secs(10), |l| {
            l.vip_entries("lb2") >= 3
        });
    }
    // A derivation (once a second) on lb2.
    std::thread::sleep(Duration::from_millis(2500));
    lab.kill_node("lb1");
    lab.wait_for("lb2 to take the VIP", Duration::from_secs(10), |l| {
        l.holds_vip("lb2")
    });
    for i in 0..3 {
        let (name, _) = connect("10.0.0.50").map_err(|e| format!("after failover: {e}"))?;
        if name != home {
            return Err(format!(
                "after the failover 10.0.0.50's connection {i} went to {name}, not {home}"
            ));
        }
    }
    Ok(())
}

#[test]
fn a_persistent_client_keeps_its_backend_across_a_failover() {
    persistence_at_failover(true).unwrap_or_else(|e| panic!("{e}"));
}

/// Control: without replicated connections the backup has nothing to
/// derive persistence from, and the client is scheduled anew.
#[test]
fn control_without_replication_a_persistent_client_is_rescheduled_at_failover() {
    let e = persistence_at_failover(false).expect_err("must fail without replication");
    assert!(
        e.contains("after the failover 10.0.0.50's connection 0 went to b1"),
        "{e}"
    );
}
