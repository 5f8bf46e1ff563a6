//! A two-node VRRP lab: nodes `lb1` and `lb2` and a client on one bridge,
//! each node running the real vrrpd inside its own network namespace, and a
//! "who am I" TCP responder on every node so the client can tell which node
//! holds the floating IP.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tandem_lab::{Bridge, Lab, LabChild, Netns};
use tandem_proto::v1;

pub const VIP: &str = "10.0.0.100";
pub const VIP6: &str = "fd00::100";
pub const WHOAMI_PORT: u16 = 7000;

/// What to put in cluster.toml for a lab.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub advert_interval_ms: u32,
    pub failback: String,
    pub tracked: bool,
    pub version: u8,
    /// Adverts to the peer's address instead of 224.0.0.18.
    pub unicast: bool,
    /// Run VRRP over IPv6 (cluster addresses fd00::1/2, VIP fd00::100/64).
    pub ipv6: bool,
    /// Extra lines of the `[vrrp]` table.
    pub vrrp_extra: String,
    /// Run the responders on the nodes and the client's probe threads at
    /// real-time priority, so that CPU hogs (a stress benchmark) delay
    /// neither: what the probe then sees is the VRRP speakers' doing.
    pub realtime_probe: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            advert_interval_ms: 100,
            failback: "none".into(),
            tracked: false,
            version: 3,
            unicast: false,
            ipv6: false,
            vrrp_extra: String::new(),
            realtime_probe: false,
        }
    }
}

/// Which VRRP implementation a node runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaker {
    Vrrpd,
    Keepalived,
}

pub struct VrrpNode {
    pub name: String,
    pub speaker: Speaker,
    pub ns: Netns,
    pub config_dir: PathBuf,
    pub runtime_dir: PathBuf,
    pub vrrpd: Option<LabChild>,
}

pub struct VrrpLab {
    pub lab: Lab,
    pub realtime_probe: bool,
    pub lan: Bridge,
    pub client: Netns,
    pub nodes: Vec<VrrpNode>,
    _tmp: tempfile::TempDir,
}

impl VrrpLab {
    pub fn new(opts: &ClusterOptions) -> VrrpLab {
        let lab = Lab::new().expect("lab");
        let lan = lab.bridge("lan").expect("bridge lan");
        let back = lab.bridge("back").expect("bridge back");
        let client = lab.netns("cl").expect("client netns");
        lab.attach(&client, "eth0", &lan, &["10.0.0.50/24", "fd00::50/64"])
            .expect("client eth0");
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut nodes = Vec::new();
        for i in 1..=2u8 {
            let name = format!("lb{i}");
            let ns = lab.netns(&name).expect("node netns");
            lab.attach(
                &ns,
                "eth0",
                &lan,
                &[&format!("10.0.0.{i}/24"), &format!("fd00::{i}/64")],
            )
            .expect("eth0");
            lab.attach(&ns, "eth1", &back, &[&format!("10.1.0.{i}/24")])
                .expect("eth1");
            let config_dir = tmp.path().join(&name).join("etc");
            let runtime_dir = tmp.path().join(&name).join("run");
            crate::write_file(
                &config_dir.join("node.toml"),
                &format!(
                    "name = \"{name}\"\ncluster_interface = \"eth0\"\ncluster_address = \"{}\"\n",
                    node_addr(opts, i)
                ),
            );
            let tracked = if opts.tracked { "[\"eth1\"]" } else { "[]" };
            crate::write_file(
                &config_dir.join("cluster.toml"),
                &format!(
                    "virtual_router_id = 51\nfailback = \"{}\"\ntracked_interfaces = {tracked}\n\n\
                     [vrrp]\nversion = {}\nadvert_interval_ms = {}\ngarp_repeat = 2\nunicast = {}\n{}\n\n\
                     [[nodes]]\nname = \"lb1\"\naddress = \"{}\"\n\n\
                     [[nodes]]\nname = \"lb2\"\naddress = \"{}\"\n\n\
                     [[floating_ips]]\naddress = \"{}\"\ninterface = \"eth0\"\n",
                    opts.failback,
                    opts.version,
                    opts.advert_interval_ms,
                    opts.unicast,
                    opts.vrrp_extra,
                    node_addr(opts, 1),
                    node_addr(opts, 2),
                    if opts.ipv6 {
                        format!("{VIP6}/64")
                    } else {
                        format!("{VIP}/24")
                    },
                ),
            );
            whoami(&ns, &name, opts.realtime_probe);
            crate::write_file(
                &config_dir.join("keepalived.conf"),
                &keepalived_conf(&name, opts, if opts.tracked { Some("eth1") } else { None }),
            );
            nodes.push(VrrpNode {
                name,
                speaker: Speaker::Vrrpd,
                ns,
                config_dir,
                runtime_dir,
                vrrpd: None,
            });
        }
        VrrpLab {
            lab,
            realtime_probe: opts.realtime_probe,
            lan,
            client,
            nodes,
            _tmp: tmp,
        }
    }

    pub fn node(&mut self, name: &str) -> &mut VrrpNode {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .expect("node")
    }

    /// Starts vrrpd on a node.
    pub fn start(&mut self, name: &str) {
        self.start_as(name, Speaker::Vrrpd);
    }

    /// Starts vrrpd or keepalived (same VRID, version, interval, VIP) on a node.
    pub fn start_as(&mut self, name: &str, speaker: Speaker) {
        let lab = &self.lab;
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.name == name)
            .expect("node");
        node.speaker = speaker;
        let mut cmd = match speaker {
            Speaker::Vrrpd => {
                let mut cmd = Command::new(crate::bin("vrrpd"));
                cmd.arg("--config-dir")
                    .arg(&node.config_dir)
                    .arg("--runtime-dir")
                    .arg(&node.runtime_dir)
                    .arg("--state-dir")
                    .arg(crate::state_dir_beside(&node.runtime_dir))
                    .env("RUST_LOG", "info")
                    .env_remove("JOURNAL_STREAM");
                cmd
            }
            Speaker::Keepalived => {
                std::fs::create_dir_all(&node.runtime_dir).expect("runtime dir");
                let mut cmd = Command::new("keepalived");
                // Foreground, log to the console, VRRP only, private pid files.
                cmd.args(["--dont-fork", "--log-console", "--vrrp", "--use-file"])
                    .arg(node.config_dir.join("keepalived.conf"))
                    .arg("--pid")
                    .arg(node.runtime_dir.join("keepalived.pid"))
                    .arg("--vrrp_pid")
                    .arg(node.runtime_dir.join("keepalived-vrrp.pid"));
                cmd
            }
        };
        node.vrrpd = Some(lab.spawn(&node.ns, &mut cmd).expect("spawn VRRP speaker"));
        if speaker == Speaker::Vrrpd {
            tandem_lab::wait_for_unix_socket(
                &node.runtime_dir.join("vrrpd.sock"),
                Duration::from_secs(10),
            )
            .expect("vrrpd serving");
        }
    }

    /// Whether a node holds the VIP on eth0 (works for any speaker).
    pub fn holds_vip(&self, name: &str) -> bool {
        let node = self.nodes.iter().find(|n| n.name == name).expect("node");
        node.ns
            .exec("ip", &["-o", "addr", "show", "dev", "eth0"])
            .map(|o| String::from_utf8_lossy(&o.stdout).contains(&format!(" {VIP}/")))
            .unwrap_or(false)
    }

    /// Whether a node holds the IPv6 VIP on eth0.
    pub fn holds_vip6(&self, name: &str) -> bool {
        let node = self.nodes.iter().find(|n| n.name == name).expect("node");
        node.ns
            .exec("ip", &["-o", "-6", "addr", "show", "dev", "eth0"])
            .map(|o| String::from_utf8_lossy(&o.stdout).contains(&format!(" {VIP6}/")))
            .unwrap_or(false)
    }

    /// The client pings the IPv6 VIP once (1 s timeout): true if it answered.
    pub fn ping6_vip(&self) -> bool {
        self.client
            .exec("ping", &["-6", "-c", "1", "-W", "1", VIP6])
            .is_ok()
    }

    /// Nodes holding the VIP.
    pub fn vip_holders(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| self.holds_vip(&n.name))
            .map(|n| n.name.clone())
            .collect()
    }

    /// Probes the VIP from the client every `every` with a UDP datagram; each
    /// node answers with its name. Stop with [`Probe::finish`].
    pub fn start_probe(&self, every: Duration) -> Probe {
        let sock = self
            .client
            .run(|| UdpSocket::bind("0.0.0.0:0"))
            .expect("client thread")
            .expect("probe socket");
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .expect("timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let dest: SocketAddr = format!("{VIP}:{WHOAMI_PORT}").parse().expect("addr");
        let rt = self.realtime_probe;
        let sender = {
            let sock = sock.try_clone().expect("clone socket");
            let stop = stop.clone();
            std::thread::spawn(move || {
                if rt {
                    set_realtime();
                }
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // Unreachable moments (no ARP answer) are expected mid-failover.
                    let _ = sock.send_to(&sent.to_be_bytes(), dest);
                    sent += 1;
                    std::thread::sleep(every);
                }
                sent
            })
        };
        let receiver = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                if rt {
                    set_realtime();
                }
                let mut answers = Vec::new();
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(n) = sock.recv(&mut buf) {
                        answers.push((
                            start.elapsed(),
                            String::from_utf8_lossy(&buf[..n]).into_owned(),
                        ));
                    }
                }
                answers
            })
        };
        Probe {
            start,
            stop,
            sender,
            receiver,
        }
    }

    /// kill -9 of a node's vrrpd: no goodbye advert, addresses stay behind.
    pub fn kill9(&mut self, name: &str) {
        let node = self.node(name);
        if let Some(mut child) = node.vrrpd.take() {
            child
                .kill(nix::sys::signal::Signal::SIGKILL)
                .expect("kill -9");
            let _ = child.wait_timeout(Duration::from_secs(5));
        }
    }

    pub fn status(&self, name: &str) -> Option<v1::VrrpStatus> {
        let node = self.nodes.iter().find(|n| n.name == name).expect("node");
        vrrpd_status(&node.runtime_dir)
    }

    pub fn state(&self, name: &str) -> Option<v1::VrrpState> {
        self.status(name).map(|s| s.state())
    }

    /// Waits until `cond` holds, polling every 10 ms; panics with `what`.
    pub fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        mut cond: impl FnMut(&Self) -> bool,
    ) -> Duration {
        let start = Instant::now();
        loop {
            if cond(self) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}; lb1 {:?}, lb2 {:?}",
                self.state("lb1"),
                self.state("lb2")
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until `cond` has held without a break for `stable`.
    pub fn wait_stable(
        &self,
        timeout: Duration,
        stable: Duration,
        what: &str,
        mut cond: impl FnMut(&Self) -> bool,
    ) {
        let start = Instant::now();
        let mut since: Option<Instant> = None;
        loop {
            if cond(self) {
                let s = *since.get_or_insert_with(Instant::now);
                if s.elapsed() >= stable {
                    return;
                }
            } else {
                since = None;
            }
            assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what} to hold for {stable:?}; VIP held by {:?}",
                self.vip_holders()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The machine dies: its link goes down first (nothing it says gets out
    /// any more), then its VRRP speaker is killed with SIGKILL.
    pub fn crash(&mut self, name: &str) {
        self.node(name)
            .ns
            .set_link("eth0", false)
            .expect("link down");
        self.kill9(name);
    }

    /// The machine comes back: link up; the caller restarts its speaker.
    pub fn revive(&mut self, name: &str) {
        self.node(name).ns.set_link("eth0", true).expect("link up");
    }

    /// Waits until one node is master and the other backup; returns the master.
    pub fn wait_elected(&self, timeout: Duration) -> String {
        self.wait_until(timeout, "one master and one backup", |l| {
            l.masters().len() == 1
                && l.nodes.iter().all(|n| {
                    matches!(
                        l.state(&n.name),
                        Some(v1::VrrpState::Master | v1::VrrpState::Backup)
                    )
                })
        });
        self.masters().remove(0)
    }

    pub fn masters(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| self.state(&n.name) == Some(v1::VrrpState::Master))
            .map(|n| n.name.clone())
            .collect()
    }

    /// Who answers on the VIP, seen from the client ("lb1", "lb2", or None).
    pub fn vip_answer(&self) -> Option<String> {
        let addr: SocketAddr = format!("{VIP}:{WHOAMI_PORT}").parse().expect("addr");
        self.client
            .run(move || {
                let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
                s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
                let mut name = String::new();
                s.read_to_string(&mut name).ok()?;
                Some(name)
            })
            .expect("client thread")
    }

    /// A keepalived in a namespace of its own on the lab's link, speaking
    /// for VRID 51 at priority 254 from an address that is not a cluster
    /// node (10.0.0.9, or over IPv6 from its link-local address).
    pub fn start_foreign_speaker(&self, opts: &ClusterOptions) -> LabChild {
        let ns = self.lab.netns("spoof").expect("spoofer netns");
        self.lab
            .attach(&ns, "eth0", &self.lan, &["10.0.0.9/24", "fd00::9/64"])
            .expect("spoofer eth0");
        let dir = self._tmp.path().join("spoof");
        std::fs::create_dir_all(&dir).expect("spoofer dir");
        let vip = if opts.ipv6 {
            "fd00::200/64"
        } else {
            "10.0.0.200/24"
        };
        let conf = format!(
            "global_defs {{\n  router_id spoofer\n  vrrp_version 3\n}}\n\
             vrrp_instance SPOOF {{\n  state MASTER\n  interface eth0\n  virtual_router_id 51\n  priority 254\n  \
             advert_int {}\n  virtual_ipaddress {{\n    {vip} dev eth0\n  }}\n}}\n",
            f64::from(opts.advert_interval_ms) / 1000.0
        );
        std::fs::write(dir.join("keepalived.conf"), conf).expect("spoofer conf");
        let mut cmd = Command::new("keepalived");
        cmd.args(["--dont-fork", "--log-console", "--vrrp", "--use-file"])
            .arg(dir.join("keepalived.conf"))
            .arg("--pid")
            .arg(dir.join("keepalived.pid"))
            .arg("--vrrp_pid")
            .arg(dir.join("keepalived-vrrp.pid"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        self.lab.spawn(&ns, &mut cmd).expect("spawn keepalived")
    }

    /// Drops VRRP (IP protocol 112) in and out of a node: the heartbeat link is cut.
    pub fn cut_heartbeat(&self, name: &str, cut: bool) {
        let node = self.nodes.iter().find(|n| n.name == name).expect("node");
        if cut {
            node.ns
                .exec(
                    "nft",
                    &["add table inet tandemtest ; add chain inet tandemtest in { type filter hook input priority 0 ; } ; add chain inet tandemtest out { type filter hook output priority 0 ; } ; add rule inet tandemtest in ip protocol 112 drop ; add rule inet tandemtest out ip protocol 112 drop"],
                )
                .expect("nft cut");
        } else {
            node.ns
                .exec("nft", &["delete table inet tandemtest"])
                .expect("nft heal");
        }
    }
}

fn node_addr(opts: &ClusterOptions, i: u8) -> String {
    if opts.ipv6 {
        format!("fd00::{i}")
    } else {
        format!("10.0.0.{i}")
    }
}

/// A running probe of the VIP.
pub struct Probe {
    pub start: Instant,
    stop: Arc<AtomicBool>,
    sender: std::thread::JoinHandle<u64>,
    receiver: std::thread::JoinHandle<Vec<(Duration, String)>>,
}

/// What a probe saw: every answer, with the time since the probe started.
#[derive(Debug, Clone)]
pub struct ProbeLog {
    pub sent: u64,
    pub answers: Vec<(Duration, String)>,
}

impl Probe {
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    pub fn finish(self) -> ProbeLog {
        self.stop.store(true, Ordering::Relaxed);
        ProbeLog {
            sent: self.sender.join().unwrap_or(0),
            answers: self.receiver.join().unwrap_or_default(),
        }
    }
}

impl ProbeLog {
    /// Failover time as the operator sees it: from the last answer of `from`
    /// to the first answer of `to` after it.
    pub fn failover(&self, from: &str, to: &str) -> Option<Duration> {
        let last_old = self.answers.iter().rev().find(|(_, n)| n == from)?.0;
        let first_new = self
            .answers
            .iter()
            .find(|(t, n)| n == to && *t > last_old)?
            .0;
        Some(first_new - last_old)
    }

    /// Seen from the moment of a crash at `crash` (time since the probe
    /// started): how long before it `from` last answered, and how long after
    /// it `to` first answered (service restored).
    pub fn around(&self, crash: Duration, from: &str, to: &str) -> Option<(Duration, Duration)> {
        let last_old = self
            .answers
            .iter()
            .rev()
            .find(|(t, n)| n == from && *t <= crash)?
            .0;
        let first_new = self.answers.iter().find(|(t, n)| n == to && *t > crash)?.0;
        Some((crash - last_old, first_new - crash))
    }

    pub fn answered(&self) -> usize {
        self.answers.len()
    }
}

/// keepalived's configuration equivalent to the lab's cluster.toml.
fn keepalived_conf(name: &str, opts: &ClusterOptions, tracked: Option<&str>) -> String {
    let interval = f64::from(opts.advert_interval_ms) / 1000.0;
    // As vrrpd maps failback: nobody preempts with "none"; the preferred
    // node preempts with a higher priority otherwise.
    let preempt = if opts.failback == "none" {
        "nopreempt"
    } else {
        ""
    };
    let priority = if opts.failback == name { 101 } else { 100 };
    let track = tracked
        .map(|t| format!("track_interface {{\n    {t}\n  }}"))
        .unwrap_or_default();
    format!(
        "global_defs {{\n  router_id {name}\n  vrrp_version {}\n  vrrp_garp_master_repeat 2\n}}\n\
         vrrp_instance VI_51 {{\n  state BACKUP\n  interface eth0\n  virtual_router_id 51\n  priority {priority}\n  \
         advert_int {interval}\n  {preempt}\n  {track}\n  virtual_ipaddress {{\n    {VIP}/24 dev eth0\n  }}\n}}\n",
        opts.version
    )
}

/// Threads inside `ns` answering TCP connections and UDP datagrams on port
/// 7000 with the node's name, for the life of the test process.
/// SCHED_FIFO 20 for the calling thread (the lab runs as root); a
/// failure leaves it at normal priority.
pub fn set_realtime() {
    let param = libc::sched_param { sched_priority: 20 };
    // SAFETY: pid 0 is the calling thread; `param` is valid.
    let _ = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
}

fn whoami(ns: &Netns, name: &str, realtime: bool) {
    let udp = ns
        .run(|| UdpSocket::bind(("0.0.0.0", WHOAMI_PORT)))
        .expect("ns thread")
        .expect("bind udp whoami");
    let reply = name.to_owned();
    std::thread::spawn(move || {
        if realtime {
            set_realtime();
        }
        let mut buf = [0u8; 64];
        while let Ok((_, peer)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(reply.as_bytes(), peer);
        }
    });
    let listener = ns
        .run(|| TcpListener::bind(("0.0.0.0", WHOAMI_PORT)))
        .expect("ns thread")
        .expect("bind whoami");
    let name = name.to_owned();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let _ = conn.write_all(name.as_bytes());
        }
    });
}

/// Status of the vrrpd serving in `runtime_dir`, or None if it does not answer.
pub fn vrrpd_status(runtime_dir: &Path) -> Option<v1::VrrpStatus> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    rt.block_on(async {
        let ch = tandem_runtime::connect(runtime_dir, "vrrpd").await.ok()?;
        let reply = tokio::time::timeout(
            Duration::from_secs(2),
            v1::vrrpd_client::VrrpdClient::new(ch).status(v1::StatusRequest {}),
        )
        .await
        .ok()?
        .ok()?;
        Some(reply.into_inner())
    })
}

/// Opens vrrpd's WatchState stream; returns the first `n` changes received
/// within `timeout`, collected on a background thread while the caller acts.
pub fn watch_states(
    runtime_dir: &Path,
    n: usize,
    timeout: Duration,
) -> std::thread::JoinHandle<Vec<v1::VrrpStateChange>> {
    let dir = runtime_dir.to_owned();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let ch = tandem_runtime::connect(&dir, "vrrpd")
                .await
                .expect("connect vrrpd");
            let mut stream = v1::vrrpd_client::VrrpdClient::new(ch)
                .watch_state(v1::WatchStateRequest {})
                .await
                .expect("WatchState")
                .into_inner();
            let _ = ready_tx.send(());
            let mut got = Vec::new();
            let _ = tokio::time::timeout(timeout, async {
                while got.len() < n {
                    match stream.message().await {
                        Ok(Some(change)) => got.push(change),
                        _ => break,
                    }
                }
            })
            .await;
            got
        })
    });
    let _ = ready_rx.recv_timeout(Duration::from_secs(5));
    handle
}

pub fn set_maintenance(runtime_dir: &Path, on: bool) -> v1::VrrpStatus {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let ch = tandem_runtime::connect(runtime_dir, "vrrpd")
            .await
            .expect("connect vrrpd");
        v1::vrrpd_client::VrrpdClient::new(ch)
            .set_maintenance(v1::SetMaintenanceRequest {
                enabled: on,
                transient: false,
            })
            .await
            .expect("SetMaintenance")
            .into_inner()
    })
}
