//! Active-active: three Tandem nodes behind a router running BIRD with
//! kernel ECMP and the L4 multipath hash; each node runs lb-forwarder,
//! routed and its own BIRD; DSR farms hashed with the cluster's shared seed
//! (see `scaleout_lab.rs` for the topology).
//!
//! Controls: the crash test without BFD misses the convergence bound; the
//! crash test with a seed per node breaks the flows the routers move; the
//! maintenance test with the datapath stopped before the withdrawal fails
//! requests.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tandem_e2e::scaleout_lab::*;
use tandem_proto::v1::BackendAdminState;

/// What the router's reaction may take beyond BFD's detection time: BIRD
/// ending the BGP session, recomputing the route and the kernel taking it,
/// plus this test's 10 ms polling, on a loaded 2-core machine.
const SLACK: Duration = Duration::from_millis(500);

const ALL: [&str; 3] = ["10.2.0.11", "10.2.0.12", "10.2.0.13"];
const WITHOUT_LB1: [&str; 2] = ["10.2.0.12", "10.2.0.13"];

#[test]
fn new_flows_spread_over_the_three_nodes() {
    let lab = ScaleLab::new(Options::default());
    lab.wait_all_announced();
    for i in 0..3 {
        let s = lab.wait_routed(i, Duration::from_secs(5), |s| {
            s.sessions.len() == 1 && s.sessions.iter().all(|x| x.established)
        });
        assert_eq!(s.mode, "active-active");
        assert!(s.datapath_ready, "{s:?}");
        assert!(s.vips.iter().all(|v| v.announced), "{s:?}");
        assert!(s.bird_reachable && s.bird_message.is_empty(), "{s:?}");
    }
    let n = 600;
    let (per_node, errors) = spread(&lab, n);
    assert!(errors.is_empty(), "failed requests: {errors:?}");
    eprintln!("{n} new connections per node: {per_node:?}");
    let total: usize = per_node.values().sum();
    assert_eq!(
        total, n,
        "each connection crossed exactly one node: {per_node:?}"
    );
    for (node, count) in &per_node {
        let share = *count as f64 * 100.0 / n as f64;
        assert!(
            (25.0..=42.0).contains(&share),
            "node {node} carried {share:.1} % of {n} new connections: {per_node:?}"
        );
    }
}

/// The crash scenario: 100 long-lived connections and a stream of new
/// requests while lb1 crashes. Returns (time until the router dropped lb1,
/// the flows' results, lb1's flows at the crash, requests ok, failed, errors).
struct Crash {
    converged: Option<Duration>,
    flows: Vec<FlowResult>,
    on_lb1: BTreeSet<u16>,
    moved_back: BTreeSet<u16>,
    requests_ok: u64,
    requests_failed: u64,
    errors: Vec<String>,
}

fn crash_scenario(lab: &mut ScaleLab, bound: Duration, come_back: bool) -> Crash {
    lab.wait_all_announced();
    lab.flush_flows(0);
    let flows = LongFlows::start(&lab.client, 100, Duration::from_millis(50));
    std::thread::sleep(Duration::from_secs(1));
    let ports: BTreeSet<u16> = flows.ports.iter().copied().collect();
    let on_lb1: BTreeSet<u16> = lab.flows_seen(0).intersection(&ports).copied().collect();
    assert!(
        on_lb1.len() >= 10,
        "lb1 must carry a share of the 100 flows to make the crash count: {}",
        on_lb1.len()
    );
    let requests = RequestLoop::start(&lab.client, Duration::from_millis(20));
    std::thread::sleep(Duration::from_millis(500));

    let t0 = lab.crash(0);
    lab.flush_flows(0);
    // The router's next hops, polled until lb1 is gone or the bound passed
    // (then until the BGP hold time would have expired, for the figure).
    let mut converged = None;
    let limit = bound.max(Duration::from_secs(HOLD_TIME_S + 3));
    while t0.elapsed() < limit {
        let hops = lab.next_hops();
        // An empty answer is the route being rewritten (or `ip` losing a
        // race with it): not a convergence, poll again.
        if !hops.is_empty() && !hops.contains("10.2.0.11") {
            assert_eq!(hops, WITHOUT_LB1.iter().map(|s| (*s).to_owned()).collect());
            converged = Some(t0.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_secs(3));

    let mut moved_back = BTreeSet::new();
    if come_back {
        lab.restore(0);
        lab.wait_next_hops(&ALL, Duration::from_secs(30));
        std::thread::sleep(Duration::from_secs(2));
        moved_back = lab.flows_seen(0).intersection(&ports).copied().collect();
    }
    std::thread::sleep(Duration::from_millis(500));
    let (requests_ok, requests_failed, errors) = requests.finish();
    Crash {
        converged,
        flows: flows.finish(),
        on_lb1,
        moved_back,
        requests_ok,
        requests_failed,
        errors,
    }
}

#[test]
fn a_crashed_node_is_dropped_within_bfd_detection_and_its_dsr_flows_continue() {
    let mut lab = ScaleLab::new(Options::default());
    let bound = BFD_DETECTION + SLACK;
    let c = crash_scenario(&mut lab, bound, true);

    let converged = c.converged.expect("the router dropped lb1");
    eprintln!(
        "router dropped the crashed node after {} ms (BFD detection {} ms)",
        converged.as_millis(),
        BFD_DETECTION.as_millis()
    );
    assert!(
        converged <= bound,
        "the router kept the dead node {converged:?} (bound {bound:?})\n{}",
        lab.diagnostics()
    );

    let broken: Vec<&FlowResult> = c.flows.iter().filter(|f| f.error.is_some()).collect();
    let survived = c.flows.len() - broken.len();
    eprintln!(
        "long-lived flows: {survived}/100 survived ({} were on the crashed node, {} moved back when it returned); new requests: {} ok, {} failed",
        c.on_lb1.len(),
        c.moved_back.len(),
        c.requests_ok,
        c.requests_failed
    );
    assert!(survived >= 99, "broken flows: {broken:#?}");
    for f in c.flows.iter().filter(|f| c.on_lb1.contains(&f.port)) {
        assert!(f.error.is_none(), "a flow of the crashed node broke: {f:?}");
        assert!(f.exchanges > 20 && f.bytes > 20 * 60, "{f:?}");
    }
    let total = c.requests_ok + c.requests_failed;
    assert!(total >= 50, "too few requests to judge: {total}");
    assert!(
        c.requests_failed * 100 <= total,
        "{} of {total} new requests failed: {:?}",
        c.requests_failed,
        c.errors
    );
    // The node returned: the routers moved flows back to it, and those
    // still reach their backends (checked above: every flow survived).
    assert!(
        !c.moved_back.is_empty(),
        "no long-lived flow moved back to the returned node"
    );
}

/// Control: without BFD the routers only notice a dead node when the BGP
/// hold time expires — the crash test's convergence bound fails.
#[test]
fn control_without_bfd_the_router_keeps_a_dead_node_past_the_bound() {
    let mut lab = ScaleLab::new(Options {
        bfd: false,
        ..Options::default()
    });
    let bound = BFD_DETECTION + SLACK;
    let c = crash_scenario(&mut lab, bound, false);
    match c.converged {
        Some(t) => {
            eprintln!(
                "without BFD the router dropped the crashed node after {} ms (hold time {HOLD_TIME_S} s)",
                t.as_millis()
            );
            assert!(t > bound, "without BFD convergence met the bound: {t:?}");
        }
        None => eprintln!(
            "without BFD the router still used the crashed node after {HOLD_TIME_S} s + 3 s"
        ),
    }
}

/// Control: with a seed per node (what nftables' `jhash` does unseeded), a
/// flow the routers move to another node lands on another backend, which
/// resets it.
#[test]
fn control_without_a_shared_seed_moved_flows_break() {
    let mut lab = ScaleLab::new(Options {
        shared_seed: false,
        ..Options::default()
    });
    let c = crash_scenario(&mut lab, BFD_DETECTION + SLACK, false);
    let survived = c.flows.iter().filter(|f| f.error.is_none()).count();
    eprintln!(
        "without a shared seed: {survived}/100 long-lived flows survived the crash ({} were on the crashed node)",
        c.on_lb1.len()
    );
    assert!(
        survived < 99,
        "flows survived without a shared seed: {survived}"
    );
}

#[test]
fn maintenance_withdraws_the_node_first_without_failed_requests() {
    let mut lab = ScaleLab::new(Options::default());
    lab.wait_all_announced();
    let flows = LongFlows::start(&lab.client, 30, Duration::from_millis(50));
    let requests = RequestLoop::start(&lab.client, Duration::from_millis(20));
    std::thread::sleep(Duration::from_secs(1));

    let t0 = Instant::now();
    let s = lab.set_maintenance(0, true);
    assert!(
        s.maintenance && s.vips.iter().all(|v| !v.announced),
        "{s:?}"
    );
    assert_eq!(s.vips[0].reason, "maintenance: lab maintenance");
    lab.wait_next_hops(&WITHOUT_LB1, Duration::from_secs(5));
    eprintln!(
        "maintenance: the router dropped the node {} ms after the request",
        t0.elapsed().as_millis()
    );
    // Withdrawn, not stopped: the node's datapath still serves stragglers,
    // and new flows no longer reach it.
    std::thread::sleep(Duration::from_millis(500));
    lab.flush_flows(0);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        lab.flows_seen(0).is_empty(),
        "a withdrawn node still gets new flows"
    );
    // Now the operator's work may stop the node's datapath: nothing fails.
    lab.stop_datapath(0, false);
    std::thread::sleep(Duration::from_secs(4));
    lab.start_forwarder(0);

    // Kept across a restart of routed.
    if let Some(r) = lab.nodes[0].routed.as_mut() {
        r.kill(Signal::SIGTERM).expect("stop routed");
        r.wait_timeout(Duration::from_secs(10))
            .expect("routed stopped");
    }
    lab.nodes[0].routed = None;
    let routed = {
        let n = &lab.nodes[0];
        let mut cmd = std::process::Command::new(tandem_e2e::bin("routed"));
        cmd.arg("--config-dir")
            .arg(&n.config)
            .arg("--runtime-dir")
            .arg(&n.runtime)
            .arg("--state-dir")
            .arg(tandem_e2e::state_dir_beside(&n.runtime))
            .env_remove("JOURNAL_STREAM")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        lab.lab.spawn(&n.ns, &mut cmd).expect("routed")
    };
    lab.nodes[0].routed = Some(routed);
    tandem_lab::wait_for_unix_socket(
        &lab.nodes[0].runtime.join("routed.sock"),
        Duration::from_secs(10),
    )
    .expect("routed back");
    std::thread::sleep(Duration::from_secs(2));
    let s = lab.routed_status(0);
    assert!(s.maintenance, "maintenance forgotten by a restart: {s:?}");
    assert_eq!(
        lab.next_hops().len(),
        2,
        "re-announced after a restart in maintenance"
    );

    lab.set_maintenance(0, false);
    lab.wait_next_hops(&ALL, Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(1));
    let (ok, failed, errors) = requests.finish();
    let results = flows.finish();
    eprintln!("maintenance: {ok} requests ok, {failed} failed");
    assert_eq!(failed, 0, "requests failed during maintenance: {errors:?}");
    assert!(ok >= 50, "too few requests to judge: {ok}");
    for f in &results {
        assert!(
            f.error.is_none(),
            "a long-lived flow broke in maintenance: {f:?}"
        );
    }
}

/// Control: a node taken out without withdrawing first — its datapath
/// stopped while the routers still send it flows (routed gone, BIRD still
/// announcing) — fails the requests hashed to it: a retransmitted SYN has
/// the same 5-tuple, so the routers send it to the same node again.
#[test]
fn control_stopping_the_datapath_without_withdrawing_fails_requests() {
    let mut lab = ScaleLab::new(Options::default());
    lab.wait_all_announced();
    let requests = RequestLoop::start(&lab.client, Duration::from_millis(20));
    std::thread::sleep(Duration::from_millis(500));
    lab.stop_datapath(0, true);
    std::thread::sleep(Duration::from_secs(4));
    let (ok, failed, _) = requests.finish();
    eprintln!("datapath stopped while announced: {ok} requests ok, {failed} failed");
    assert!(
        failed > 0,
        "no request failed with the datapath stopped first"
    );
}

#[test]
fn a_node_withdraws_when_no_backend_is_healthy_or_its_datapath_is_not_ready() {
    let mut lab = ScaleLab::new(Options::default());
    lab.wait_all_announced();

    // The operator takes every backend out on lb1 only.
    lab.set_backends(0, BackendAdminState::Down);
    lab.wait_next_hops(&WITHOUT_LB1, Duration::from_secs(5));
    let s = lab.routed_status(0);
    assert_eq!(s.vips[0].reason, "farm web has no healthy backend", "{s:?}");
    lab.set_backends(0, BackendAdminState::Up);
    lab.wait_next_hops(&ALL, Duration::from_secs(10));

    // lb1 loses its link to the backends: its health checks fail.
    let back = lab.ports(0).remove(1);
    back.set_link(false).expect("back link down");
    lab.wait_next_hops(&WITHOUT_LB1, Duration::from_secs(10));
    back.set_link(true).expect("back link up");
    lab.wait_next_hops(&ALL, Duration::from_secs(15));

    // lb-forwarder dies: withdrawn once the grace (1 s in the lab) is over.
    if let Some(f) = lab.nodes[0].forwarder.as_mut() {
        f.kill(Signal::SIGKILL).expect("kill lb-forwarder");
        f.wait_timeout(Duration::from_secs(5)).expect("dead");
    }
    lab.nodes[0].forwarder = None;
    let t = lab.wait_next_hops(&WITHOUT_LB1, Duration::from_secs(10));
    assert!(
        t >= Duration::from_millis(500),
        "withdrawn before the grace: {t:?}"
    );
    let s = lab.routed_status(0);
    assert!(!s.datapath_ready, "{s:?}");
    assert!(s.vips[0].reason.starts_with("datapath not ready"), "{s:?}");
    lab.start_forwarder(0);
    lab.wait_next_hops(&ALL, Duration::from_secs(15));
}

/// routed is a daemon like the others (its --help, --version, a clear error
/// without node.toml), and on a pair it announces nothing and writes no
/// BIRD configuration.
#[test]
fn routed_is_idle_outside_an_active_active_cluster() {
    tandem_e2e::assert_daemon_cli(&tandem_e2e::bin("routed"), "routed");
    let node = tandem_e2e::NodeDirs::from_examples();
    let _routed = node.start_serving("routed");
    // Its first decision is taken at once; give it a poll or two.
    std::thread::sleep(Duration::from_millis(500));
    let status = tandem_e2e::rpc(&node.runtime, "routed", async |ch| {
        tandem_proto::v1::routed_client::RoutedClient::new(ch)
            .status(tandem_proto::v1::StatusRequest {})
            .await
            .expect("status")
            .into_inner()
    });
    assert_eq!(status.mode, "active-passive", "{status:?}");
    assert!(
        status.vips.is_empty() && status.sessions.is_empty(),
        "{status:?}"
    );
    assert!(
        !node.runtime.join("bird.conf").exists(),
        "a pair node got a BIRD configuration"
    );
}
