//! An active-active lab: a router running BIRD with kernel ECMP
//! (`fib_multipath_hash_policy=1`: the L4 hash), three Tandem nodes each
//! running lb-forwarder, routed and its own BIRD, three DSR backends and a
//! client behind the router.
//!
//! ```text
//!   client 10.9.0.2 ── 10.9.0.1 router 10.2.0.1 ──[up]── lb1..lb3 10.2.0.11-13
//!                               10.1.0.1 ──[back]── lb1..lb3 10.1.0.21-23
//!                                                   b1..b3   10.1.0.11-13 (VIP on lo)
//! ```
//!
//! The router learns the VIP 10.0.0.100/32 from every node over BGP (with
//! BFD) and installs one multipath route; each node hands a packet to a
//! backend by hash (nftables `dup`), and the backend answers the client
//! directly through the router's back leg.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tandem_lab::{Lab, LabChild, Netns, Port};
use tandem_proto::v1::{self, lb_forwarder_client::LbForwarderClient, routed_client::RoutedClient};

pub const VIP: &str = "10.0.0.100";
pub const CLIENT: &str = "10.9.0.2";
pub const ROUTER_AS: u32 = 65000;
pub const CLUSTER_AS: u32 = 65010;
/// BFD timers of the lab (the product's defaults): a silent node is
/// declared dead after 3 × 100 ms.
pub const BFD_INTERVAL_MS: u64 = 100;
pub const BFD_MULTIPLIER: u64 = 3;
pub const BFD_DETECTION: Duration = Duration::from_millis(BFD_INTERVAL_MS * BFD_MULTIPLIER);
/// The BGP hold time (the product's default): what detects a dead node
/// when BFD is off.
pub const HOLD_TIME_S: u64 = 9;
/// The farms' scheduler. Under direct server return every scheduler hashes
/// with the cluster's seed (`rr`: source address and port); the Maglev
/// scheduler is the same word away (`mh`).
pub const SCHEDULER: &str = "rr";
/// The shared seed.
pub const SEED: u32 = 0x5eed_0001;

/// What a lab is built with.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// BFD on the BGP sessions (nodes and router); off: only the hold time
    /// detects a dead node.
    pub bfd: bool,
    /// Every node hashes with the same seed; off: each its own, as
    /// nftables' `jhash` without a seed does.
    pub shared_seed: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            bfd: true,
            shared_seed: true,
        }
    }
}

/// One Tandem node's directories and processes.
pub struct Node {
    pub name: String,
    pub ns: Netns,
    pub uplink: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub runtime: PathBuf,
    pub forwarder: Option<LabChild>,
    pub routed: Option<LabChild>,
    pub bird: Option<LabChild>,
}

impl Node {
    pub fn log(&self, what: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{what}.log"))).unwrap_or_default()
    }
}

pub struct ScaleLab {
    pub lab: Lab,
    pub router: Netns,
    pub client: Netns,
    pub nodes: Vec<Node>,
    pub backends: Vec<Netns>,
    pub router_bird: Option<LabChild>,
    pub options: Options,
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
}

fn log_file(dir: &Path, what: &str) -> Stdio {
    let f = File::options()
        .create(true)
        .append(true)
        .open(dir.join(format!("{what}.log")))
        .expect("log file");
    Stdio::from(f)
}

fn router_bird_conf(options: Options) -> String {
    let bfd = if options.bfd { "on" } else { "off" };
    let mut c = format!(
        "router id 10.2.0.1;\nlog stderr all;\n\
         protocol device {{ scan time 10; }}\n\
         protocol kernel {{ ipv4 {{ import none; export all; }}; merge paths on; }}\n\
         protocol bfd {{ interface \"*\" {{ min rx interval {BFD_INTERVAL_MS} ms; min tx interval {BFD_INTERVAL_MS} ms; multiplier {BFD_MULTIPLIER}; }}; }}\n\
         template bgp node {{ local as {ROUTER_AS}; hold time {HOLD_TIME_S}; keepalive time {}; \
         connect delay time 1; connect retry time 2; error wait time 1, 5; bfd {bfd}; \
         ipv4 {{ import all; export none; }}; }}\n",
        HOLD_TIME_S / 3
    );
    for i in 1..=3 {
        c.push_str(&format!(
            "protocol bgp lb{i} from node {{ neighbor 10.2.0.1{i} as {CLUSTER_AS}; }}\n"
        ));
    }
    c
}

fn cluster_toml(options: Options, node: usize) -> String {
    let seed = if options.shared_seed {
        SEED
    } else {
        SEED + u32::try_from(node).expect("node") * 0x1111
    };
    let mut c = format!("mode = \"active-active\"\nhash_seed = {seed}\n");
    for i in 1..=3 {
        c.push_str(&format!(
            "\n[[nodes]]\nname = \"lb{i}\"\naddress = \"10.2.0.1{i}\"\n"
        ));
    }
    c.push_str(&format!(
        "\n[bgp]\nlocal_as = {CLUSTER_AS}\nhold_time_s = {HOLD_TIME_S}\n\n[bgp.bfd]\ninterval_ms = {BFD_INTERVAL_MS}\nmultiplier = {BFD_MULTIPLIER}\n\n\
         [[bgp.peers]]\nname = \"router\"\naddress = \"10.2.0.1\"\nremote_as = {ROUTER_AS}\nbfd = {}\n",
        options.bfd
    ));
    c
}

fn farm_toml() -> String {
    let mut f = format!(
        "name = \"web\"\nvip = \"{VIP}\"\nport = 80\nforwarding = \"dsr\"\nscheduler = \"{SCHEDULER}\"\n\n\
         [health_check]\ninterval_ms = 300\ntimeout_ms = 200\nrise = 1\nfall = 2\n"
    );
    for i in 1..=3 {
        f.push_str(&format!("\n[[backends]]\naddress = \"10.1.0.1{i}\"\n"));
    }
    f
}

/// Where a probe table counts, on each node, the flows it carried.
const PROBE: &str = "table ip probe {\n\
  set flows { type ipv4_addr . inet_service; flags dynamic; size 65535; }\n\
  chain pre {\n    type filter hook prerouting priority -350; policy accept;\n\
    ip daddr 10.0.0.100 tcp dport 80 add @flows { ip saddr . tcp sport }\n  }\n}\n";

impl ScaleLab {
    pub fn new(options: Options) -> ScaleLab {
        let lab = Lab::new().expect("lab");
        let up = lab.bridge("up").expect("up");
        let back = lab.bridge("back").expect("back");

        let router = lab.netns("rt").expect("router");
        let client = lab.netns("cl").expect("client");
        lab.link(
            &router,
            "cl0",
            &["10.9.0.1/24"],
            &client,
            "eth0",
            &[&format!("{CLIENT}/24")],
        )
        .expect("client link");
        client
            .ip(&["route", "add", "default", "via", "10.9.0.1"])
            .expect("client route");
        // A router hashes a flow's 5-tuple, so its retransmissions take the
        // same path. Over veths the router reuses the hash the client's
        // socket stamped on the packet, which TCP re-draws at every
        // retransmission timeout (txrehash): a lost packet would re-roll
        // its path and hide a dead node. Off, as a real router behaves.
        client.sysctl("net.core.txrehash", "0").expect("txrehash");
        lab.attach(&router, "up0", &up, &["10.2.0.1/24"])
            .expect("router up");
        lab.attach(&router, "back0", &back, &["10.1.0.1/24"])
            .expect("router back");
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.fib_multipath_hash_policy", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            ("net.ipv4.conf.back0.rp_filter", "0"),
        ] {
            router.sysctl(k, v).expect("router sysctl");
        }

        let mut backends = Vec::new();
        for i in 1..=3 {
            let ns = lab.netns(&format!("b{i}")).expect("backend");
            lab.attach(&ns, "eth0", &back, &[&format!("10.1.0.1{i}/24")])
                .expect("backend eth0");
            ns.add_address("lo", &format!("{VIP}/32"))
                .expect("VIP on lo");
            ns.ip(&["route", "add", "default", "via", "10.1.0.1"])
                .expect("backend route");
            for (k, v) in [
                ("net.ipv4.conf.all.arp_ignore", "1"),
                ("net.ipv4.conf.all.arp_announce", "2"),
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.eth0.rp_filter", "0"),
            ] {
                ns.sysctl(k, v).expect("backend sysctl");
            }
            crate::echo_backend(&ns, &format!("b{i}"), 80);
            backends.push(ns);
        }

        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_owned();
        let router_dir = dir.join("router");
        std::fs::create_dir_all(&router_dir).expect("router dir");
        std::fs::write(router_dir.join("bird.conf"), router_bird_conf(options))
            .expect("router bird.conf");

        let mut nodes = Vec::new();
        for i in 1..=3usize {
            let name = format!("lb{i}");
            let ns = lab.netns(&name).expect("node");
            lab.attach(&ns, "eth0", &up, &[&format!("10.2.0.1{i}/24")])
                .expect("node eth0");
            lab.attach(&ns, "eth1", &back, &[&format!("10.1.0.2{i}/24")])
                .expect("node eth1");
            ns.sysctl("net.ipv4.ip_forward", "1").expect("forwarding");
            let node_dir = dir.join(&name);
            let config = node_dir.join("etc");
            let runtime = node_dir.join("run");
            crate::write_file(
                &config.join("node.toml"),
                &format!(
                    "name = \"{name}\"\ncluster_interface = \"eth0\"\ncluster_address = \"10.2.0.1{i}\"\n"
                ),
            );
            crate::write_file(&config.join("cluster.toml"), &cluster_toml(options, i));
            crate::write_file(&config.join("farms/web.toml"), &farm_toml());
            nodes.push(Node {
                name,
                ns,
                uplink: "eth0".into(),
                dir: node_dir,
                config,
                runtime,
                forwarder: None,
                routed: None,
                bird: None,
            });
        }
        let mut l = ScaleLab {
            lab,
            router,
            client,
            nodes,
            backends,
            router_bird: None,
            options,
            dir,
            _tmp: tmp,
        };
        for n in &l.nodes {
            nft(&n.ns, PROBE);
        }
        l.router_bird = Some(l.spawn_bird(&l.router.clone(), &router_dir));
        for i in 0..3 {
            l.start_node(i);
        }
        l
    }

    fn spawn_bird(&self, ns: &Netns, dir: &Path) -> LabChild {
        let mut cmd = Command::new("bird");
        cmd.arg("-f")
            .arg("-c")
            .arg(dir.join("bird.conf"))
            .arg("-s")
            .arg(dir.join("bird.ctl"))
            .stdin(Stdio::null())
            .stdout(log_file(dir, "bird"))
            .stderr(log_file(dir, "bird"));
        self.lab
            .spawn(ns, &mut cmd)
            .expect("spawn bird (apt-get install bird2)")
    }

    fn daemon(&self, i: usize, daemon: &str, extra: &[&str]) -> LabChild {
        let n = &self.nodes[i];
        let mut cmd = Command::new(crate::bin(daemon));
        cmd.arg("--config-dir")
            .arg(&n.config)
            .arg("--runtime-dir")
            .arg(&n.runtime)
            .arg("--state-dir")
            .arg(crate::state_dir_beside(&n.runtime))
            .args(extra)
            .env("RUST_LOG", "info")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(log_file(&n.dir, daemon))
            .stderr(log_file(&n.dir, daemon));
        let child = self
            .lab
            .spawn(&n.ns, &mut cmd)
            .unwrap_or_else(|e| panic!("spawn {daemon}: {e}"));
        tandem_lab::wait_for_unix_socket(
            &n.runtime.join(format!("{daemon}.sock")),
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("{daemon} of {}: {e}\n{}", n.name, n.log(daemon)));
        child
    }

    pub fn start_forwarder(&mut self, i: usize) {
        let c = self.daemon(i, "lb-forwarder", &[]);
        self.nodes[i].forwarder = Some(c);
    }

    /// lb-forwarder, routed (which writes BIRD's file first), then BIRD —
    /// the order of the units.
    pub fn start_node(&mut self, i: usize) {
        self.start_forwarder(i);
        let routed = self.daemon(i, "routed", &["--forwarder-grace-ms", "1000"]);
        self.nodes[i].routed = Some(routed);
        let run = self.nodes[i].runtime.clone();
        assert!(run.join("bird.conf").is_file(), "routed wrote no bird.conf");
        let ns = self.nodes[i].ns.clone();
        let bird = self.spawn_bird_in(&ns, &run, &self.nodes[i].dir.clone());
        self.nodes[i].bird = Some(bird);
    }

    fn spawn_bird_in(&self, ns: &Netns, run: &Path, logs: &Path) -> LabChild {
        let mut cmd = Command::new("bird");
        cmd.arg("-f")
            .arg("-c")
            .arg(run.join("bird.conf"))
            .arg("-s")
            .arg(run.join("bird.ctl"))
            .stdin(Stdio::null())
            .stdout(log_file(logs, "bird"))
            .stderr(log_file(logs, "bird"));
        self.lab
            .spawn(ns, &mut cmd)
            .expect("spawn bird (apt-get install bird2)")
    }

    /// The next hops of the router's route to the VIP (node addresses).
    pub fn next_hops(&self) -> BTreeSet<String> {
        let out = self
            .router
            .ip(&["route", "show", &format!("{VIP}/32")])
            .expect("ip route");
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[0] == "via")
            .map(|w| w[1].to_owned())
            .collect()
    }

    /// Waits until the router's next hops for the VIP are `want`; returns
    /// how long that took.
    pub fn wait_next_hops(&self, want: &[&str], timeout: Duration) -> Duration {
        let want: BTreeSet<String> = want.iter().map(|s| (*s).to_owned()).collect();
        let start = Instant::now();
        loop {
            let now = self.next_hops();
            if now == want {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < timeout,
                "router's next hops for {VIP}: {now:?}, wanted {want:?} within {timeout:?}\n{}",
                self.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Every node announced: the router spreads over all three.
    pub fn wait_all_announced(&self) {
        self.wait_next_hops(
            &["10.2.0.11", "10.2.0.12", "10.2.0.13"],
            Duration::from_secs(30),
        );
    }

    pub fn node_addr(i: usize) -> String {
        format!("10.2.0.1{}", i + 1)
    }

    pub fn diagnostics(&self) -> String {
        let mut s = String::new();
        if let Ok(o) = self.router.exec(
            "birdc",
            &[
                "-s",
                &self.dir.join("router/bird.ctl").display().to_string(),
                "show",
                "protocols",
            ],
        ) {
            s.push_str(&String::from_utf8_lossy(&o.stdout));
        }
        for n in &self.nodes {
            let routed = n.log("routed");
            let tail: Vec<&str> = routed.lines().rev().take(15).collect();
            s.push_str(&format!(
                "--- {} routed (last lines, newest first):\n{}\n",
                n.name,
                tail.join("\n")
            ));
        }
        s
    }

    /// The bridge ports of node `i` (its cables).
    pub fn ports(&self, i: usize) -> Vec<Port> {
        let n = &self.nodes[i];
        ["eth0", "eth1"]
            .iter()
            .map(|ifname| self.lab.port(&n.ns, ifname).expect("port"))
            .collect()
    }

    /// A crash: the node's cables pulled, then its daemons and BIRD
    /// SIGKILLed (no goodbye of any kind reaches the router).
    pub fn crash(&mut self, i: usize) -> Instant {
        let t0 = Instant::now();
        for p in self.ports(i) {
            p.set_link(false).expect("cable out");
        }
        let n = &mut self.nodes[i];
        for c in [&mut n.bird, &mut n.routed, &mut n.forwarder]
            .into_iter()
            .flatten()
        {
            let _ = c.kill(Signal::SIGKILL);
        }
        for c in [&mut n.bird, &mut n.routed, &mut n.forwarder]
            .into_iter()
            .flatten()
        {
            let _ = c.wait_timeout(Duration::from_secs(5));
        }
        n.bird = None;
        n.routed = None;
        n.forwarder = None;
        t0
    }

    /// The crashed node comes back: cables in, units started again.
    pub fn restore(&mut self, i: usize) {
        for p in self.ports(i) {
            p.set_link(true).expect("cable in");
        }
        let ns = self.nodes[i].ns.clone();
        for ifname in ["eth0", "eth1"] {
            ns.wait_link_up(ifname, Duration::from_secs(10))
                .expect("link up");
        }
        // Its BIRD socket file is stale after a kill.
        let _ = std::fs::remove_file(self.nodes[i].runtime.join("bird.ctl"));
        self.start_node(i);
    }

    /// The flows (client port) node `i` has seen since its probe was last
    /// flushed.
    pub fn flows_seen(&self, i: usize) -> BTreeSet<u16> {
        let out = self.nodes[i]
            .ns
            .exec("nft", &["-j", "list", "set", "ip", "probe", "flows"])
            .expect("nft list set");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nft json");
        let mut ports = BTreeSet::new();
        for item in v["nftables"].as_array().into_iter().flatten() {
            for e in item["set"]["elem"].as_array().into_iter().flatten() {
                let concat = if e["elem"].is_object() {
                    &e["elem"]["val"]["concat"]
                } else {
                    &e["concat"]
                };
                if let Some(p) = concat.get(1).and_then(serde_json::Value::as_u64) {
                    ports.insert(u16::try_from(p).expect("port"));
                }
            }
        }
        ports
    }

    pub fn flush_flows(&self, i: usize) {
        nft(&self.nodes[i].ns, "flush set ip probe flows\n");
    }

    pub fn routed<T>(
        &self,
        i: usize,
        f: impl AsyncFnOnce(RoutedClient<tonic::transport::Channel>) -> T,
    ) -> T {
        crate::rpc(&self.nodes[i].runtime, "routed", async |ch| {
            f(RoutedClient::new(ch)).await
        })
    }

    pub fn routed_status(&self, i: usize) -> v1::RoutedStatus {
        self.routed(i, async |mut c| {
            c.status(v1::StatusRequest {})
                .await
                .expect("routed status")
                .into_inner()
        })
    }

    /// Waits until routed's Status on node `i` satisfies `cond`.
    pub fn wait_routed(
        &self,
        i: usize,
        timeout: Duration,
        cond: impl Fn(&v1::RoutedStatus) -> bool,
    ) -> v1::RoutedStatus {
        let start = Instant::now();
        loop {
            let s = self.routed_status(i);
            if cond(&s) {
                return s;
            }
            assert!(
                start.elapsed() < timeout,
                "routed of {}: {s:?}",
                self.nodes[i].name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops node `i`'s datapath: lb-forwarder killed and its tables
    /// deleted (routed too when `with_routed`, so that nothing withdraws
    /// the node and its BIRD keeps announcing).
    pub fn stop_datapath(&mut self, i: usize, with_routed: bool) {
        let n = &mut self.nodes[i];
        let mut victims = vec![&mut n.forwarder];
        if with_routed {
            victims.push(&mut n.routed);
        }
        for c in victims {
            if let Some(mut child) = c.take() {
                let _ = child.kill(Signal::SIGKILL);
                let _ = child.wait_timeout(Duration::from_secs(5));
            }
        }
        n.ns.exec("nft", &["delete", "table", "ip", "tandem_dsr"])
            .expect("delete the DSR table");
    }

    pub fn set_maintenance(&self, i: usize, on: bool) -> v1::RoutedStatus {
        self.routed(i, async |mut c| {
            c.set_maintenance(v1::SetRoutedMaintenanceRequest {
                maintenance: on,
                reason: if on {
                    "lab maintenance".into()
                } else {
                    String::new()
                },
            })
            .await
            .expect("SetMaintenance")
            .into_inner()
        })
    }

    pub fn set_backends(&self, i: usize, state: v1::BackendAdminState) {
        crate::rpc(&self.nodes[i].runtime, "lb-forwarder", async |ch| {
            let mut c = LbForwarderClient::new(ch);
            for b in 1..=3 {
                c.set_backend_state(v1::SetBackendStateRequest {
                    farm: "web".into(),
                    address: format!("10.1.0.1{b}"),
                    port: 80,
                    state: state.into(),
                })
                .await
                .expect("SetBackendState");
            }
        });
    }
}

fn nft(ns: &Netns, script: &str) {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), script).expect("write nft script");
    ns.exec("nft", &["-f", &file.path().display().to_string()])
        .expect("nft");
}

/// One request: connect to the VIP, read the backend's greeting, echo a
/// line, close. The backend's name.
pub fn request(timeout: Duration) -> Result<String, String> {
    let dst: SocketAddr = format!("{VIP}:80").parse().expect("dst");
    let s = TcpStream::connect_timeout(&dst, timeout).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let _ = s.set_nodelay(true);
    let mut r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
    let mut name = String::new();
    r.read_line(&mut name)
        .map_err(|e| format!("greeting: {e}"))?;
    (&s).write_all(b"ping\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut echo = String::new();
    r.read_line(&mut echo).map_err(|e| format!("echo: {e}"))?;
    if echo != "ping\n" {
        return Err(format!("echo {echo:?}"));
    }
    Ok(name.trim().to_owned())
}

/// New requests, one after the other, from the client until stopped.
pub struct RequestLoop {
    stop: Arc<AtomicBool>,
    pub ok: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
    handle: Option<JoinHandle<Result<Vec<String>, tandem_lab::LabError>>>,
}

impl RequestLoop {
    pub fn start(client: &Netns, pause: Duration) -> RequestLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let (s, o, f) = (stop.clone(), ok.clone(), failed.clone());
        let handle = client
            .spawn_thread(move || {
                let mut errors = Vec::new();
                while !s.load(Ordering::Relaxed) {
                    match request(Duration::from_secs(3)) {
                        Ok(_) => o.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            errors.push(e);
                            f.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    std::thread::sleep(pause);
                }
                errors
            })
            .expect("request thread");
        RequestLoop {
            stop,
            ok,
            failed,
            handle: Some(handle),
        }
    }

    /// Stops; (succeeded, failed, the errors).
    pub fn finish(mut self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let errors = self
            .handle
            .take()
            .expect("running")
            .join()
            .expect("request thread")
            .expect("client ns");
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            errors,
        )
    }
}

impl Drop for RequestLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Long-lived connections, each exchanging a numbered line every
/// `period` and checking the echo byte for byte, until stopped.
pub struct LongFlows {
    stop: Arc<AtomicBool>,
    /// Each flow's client port.
    pub ports: Vec<u16>,
    handles: Vec<JoinHandle<FlowResult>>,
}

/// How one long-lived connection fared.
#[derive(Debug, Clone)]
pub struct FlowResult {
    pub port: u16,
    pub backend: String,
    pub exchanges: u64,
    pub bytes: u64,
    /// The first error; None while every echo matched.
    pub error: Option<String>,
    /// When each exchange completed.
    pub times: Vec<Instant>,
}

impl FlowResult {
    /// The first exchange completed after `t`.
    pub fn first_after(&self, t: Instant) -> Option<Instant> {
        self.times.iter().copied().find(|x| *x > t)
    }
}

impl LongFlows {
    pub fn start(client: &Netns, n: usize, period: Duration) -> LongFlows {
        let stop = Arc::new(AtomicBool::new(false));
        let mut ports = Vec::new();
        let mut handles = Vec::new();
        for i in 0..n {
            let s = client
                .run(|| {
                    let dst: SocketAddr = format!("{VIP}:80").parse().expect("dst");
                    TcpStream::connect_timeout(&dst, Duration::from_secs(3))
                })
                .expect("client ns")
                .expect("long-lived connection");
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .expect("timeout");
            let _ = s.set_nodelay(true);
            let port = s.local_addr().expect("local").port();
            let mut r = BufReader::new(s.try_clone().expect("clone"));
            let mut backend = String::new();
            r.read_line(&mut backend).expect("greeting");
            ports.push(port);
            let stop = stop.clone();
            handles.push(std::thread::spawn(move || {
                let mut res = FlowResult {
                    port,
                    backend: backend.trim().to_owned(),
                    exchanges: 0,
                    bytes: 0,
                    error: None,
                    times: Vec::new(),
                };
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    seq += 1;
                    let line = format!("flow {i} seq {seq} {}\n", "x".repeat(48));
                    if let Err(e) = (&s).write_all(line.as_bytes()) {
                        res.error = Some(format!("write: {e}"));
                        break;
                    }
                    let mut echo = String::new();
                    match r.read_line(&mut echo) {
                        Ok(0) => {
                            res.error = Some("closed by the far end".into());
                            break;
                        }
                        Ok(_) if echo == line => {
                            res.times.push(Instant::now());
                            res.exchanges += 1;
                            res.bytes += line.len() as u64;
                        }
                        Ok(_) => {
                            res.error = Some(format!("echo differs: {echo:?}"));
                            break;
                        }
                        Err(e) => {
                            res.error = Some(format!("read after {seq} exchanges: {e}"));
                            break;
                        }
                    }
                    std::thread::sleep(period);
                }
                res
            }));
        }
        LongFlows {
            stop,
            ports,
            handles,
        }
    }

    pub fn finish(self) -> Vec<FlowResult> {
        self.stop.store(true, Ordering::Relaxed);
        self.handles
            .into_iter()
            .map(|h| h.join().expect("flow thread"))
            .collect()
    }
}

/// `n` connections in a row; how many each node carried (by its probe).
pub fn spread(lab: &ScaleLab, n: usize) -> (BTreeMap<String, usize>, Vec<String>) {
    for i in 0..3 {
        lab.flush_flows(i);
    }
    let errors = lab
        .client
        .run(move || {
            (0..n)
                .filter_map(|_| request(Duration::from_secs(3)).err())
                .collect::<Vec<_>>()
        })
        .expect("client ns");
    let per_node = (0..3)
        .map(|i| (lab.nodes[i].name.clone(), lab.flows_seen(i).len()))
        .collect();
    (per_node, errors)
}
