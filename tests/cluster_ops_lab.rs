//! A two-node Tandem cluster with every daemon running, configured by
//! writing files directly (as `cluster create` would leave them, lb1
//! priority 150 and lb2 100): a client,
//! nodes `lb1` and `lb2` (lb1 started first, so master), two backends.
//! Each node runs lb-forwarder, conntrack-syncd, cfg-syncd, clustermanager
//! and vrrpd on its own config and runtime dirs, and a real OpenSSH sshd on
//! its cluster address, which trusts the other node's cluster key; each
//! node pins the other's host key. Both nodes share this machine's
//! filesystem, so the peer's directories are passed with
//! `--peer-config-dir` / `--peer-runtime-dir`.
//!
//! Networks: lan 10.0.0.0/24 (client .50, VIP .100), back 10.1.0.0/24
//! (backends .11 .12, floating SNAT .100), cluster link 192.168.100.0/24
//! on eth2 (VRRP at 100 ms, conntrack sync, SSH on port 2222).

use std::fs;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;
use tandem_lab::{Lab, LabChild, Netns};
use tandem_proto::v1;

pub const VIP: &str = "10.0.0.100";
pub const SSH_PORT: u16 = 2222;

pub fn cluster_addr(node: &str) -> String {
    format!("192.168.100.{}", &node[2..])
}

/// A farm on the VIP; `port` keeps farms apart. Backends answer on 8080.
pub fn farm(name: &str, port: u16) -> String {
    format!(
        "name = \"{name}\"\nvip = \"{VIP}\"\nport = {port}\nscheduler = \"rr\"\nsnat_address = \"10.1.0.100\"\n\
         [health_check]\nkind = \"none\"\n\
         [[backends]]\naddress = \"10.1.0.11\"\nport = 8080\n[[backends]]\naddress = \"10.1.0.12\"\nport = 8080\n"
    )
}

pub struct OpsNode {
    pub name: String,
    pub ns: Netns,
    pub config_dir: PathBuf,
    pub runtime_dir: PathBuf,
    pub logs: PathBuf,
    pub daemons: Vec<(&'static str, LabChild)>,
    pub sshd: Option<LabChild>,
    sshd_dir: PathBuf,
}

impl OpsNode {
    pub fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.config_dir.join(rel)).unwrap_or_default()
    }

    /// One daemon's log.
    pub fn daemon_log(&self, daemon: &str) -> String {
        fs::read_to_string(self.logs.join(format!("{daemon}.log"))).unwrap_or_default()
    }

    /// Every daemon log of this node, for assertion messages.
    pub fn log(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = fs::read_dir(&self.logs) {
            let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
            paths.sort();
            for p in paths {
                out.push_str(&format!("--- {} {}\n", self.name, p.display()));
                out.push_str(&fs::read_to_string(&p).unwrap_or_default());
            }
        }
        out
    }

    /// Runs tandemctl against this node's daemons.
    pub fn tandemctl(&self, args: &[&str]) -> Output {
        Command::new(crate::bin("tandemctl"))
            .arg("--runtime-dir")
            .arg(&self.runtime_dir)
            .arg("--config-dir")
            .arg(&self.config_dir)
            .args(args)
            .env_remove("TANDEM_RUNTIME_DIR")
            .env_remove("TANDEM_CONFIG_DIR")
            .output()
            .expect("run tandemctl")
    }
}

pub struct OpsLab {
    pub lab: Lab,
    pub client: Netns,
    pub nodes: Vec<OpsNode>,
    pub backends: Vec<Netns>,
    _tmp: tempfile::TempDir,
}

impl OpsLab {
    /// Namespaces, configuration, keys and sshds; no Tandem daemon yet.
    pub fn new() -> OpsLab {
        OpsLab::with_failback("none")
    }

    /// As `new`, with `failback` ("none" or a node name) in cluster.toml.
    pub fn with_failback(failback: &str) -> OpsLab {
        let lab = Lab::new().expect("lab");
        let lan = lab.bridge("lan").expect("lan");
        let back = lab.bridge("back").expect("back");
        let link = lab.bridge("link").expect("link");
        let client = lab.netns("cl").expect("client");
        lab.attach(&client, "eth0", &lan, &["10.0.0.50/24"])
            .expect("client");
        let tmp = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all("/run/sshd").expect("/run/sshd (sshd's privilege separation dir)");

        let mut nodes = Vec::new();
        for i in 1..=2u8 {
            let name = format!("lb{i}");
            let ns = crate::balancer_netns(&lab, &name, i, &lan, &back, &link);
            // Without replicated state the backup must not pick flows up
            // mid-stream by itself: a lost sync then shows as broken flows.
            ns.sysctl("net.netfilter.nf_conntrack_tcp_loose", "0")
                .expect("tcp_loose");
            let root = tmp.path().join(&name);
            let config_dir = root.join("etc");
            crate::write_file(
                &config_dir.join("node.toml"),
                &format!(
                    "name = \"{name}\"\ncluster_interface = \"eth2\"\ncluster_address = \"192.168.100.{i}\"\n"
                ),
            );
            crate::write_file(
                &config_dir.join("cluster.toml"),
                &format!(
                    "virtual_router_id = 71\nfailback = \"{failback}\"\nhash_seed = 0x1234\n\n\
                     [vrrp]\nadvert_interval_ms = 100\ngarp_repeat = 3\ngarp_interval_ms = 50\n\n\
                     [[nodes]]\nname = \"lb1\"\naddress = \"192.168.100.1\"\npriority = 150\n\n\
                     [[nodes]]\nname = \"lb2\"\naddress = \"192.168.100.2\"\npriority = 100\n\n\
                     [[floating_ips]]\naddress = \"{VIP}/24\"\ninterface = \"eth0\"\n\n\
                     [[floating_ips]]\naddress = \"10.1.0.100/24\"\ninterface = \"eth1\"\n\n\
                     [sync]\nssh_port = {SSH_PORT}\nkey_file = \"keys/sync.key\"\n"
                ),
            );
            crate::write_file(
                &config_dir.join("keys/sync.key"),
                "lab-shared-sync-key-0123456789abcdef\n",
            );
            crate::write_file(&config_dir.join("farms/web.toml"), &farm("web", 80));
            nodes.push(OpsNode {
                name,
                ns,
                runtime_dir: root.join("run"),
                logs: root.join("logs"),
                sshd_dir: root.join("sshd"),
                config_dir,
                daemons: Vec::new(),
                sshd: None,
            });
        }
        // Keys: each node's cluster identity is authorized on the other's
        // sshd; each node pins the other's host key.
        let client_pubs: Vec<String> = nodes
            .iter()
            .map(|n| {
                crate::keygen(
                    &n.config_dir.join("ssh/id_ed25519"),
                    &format!("{}-cluster", n.name),
                )
            })
            .collect();
        let host_pubs: Vec<String> = nodes
            .iter()
            .map(|n| {
                crate::keygen(
                    &n.sshd_dir.join("host_ed25519"),
                    &format!("{}-host", n.name),
                )
            })
            .collect();
        for (i, n) in nodes.iter().enumerate() {
            let other = 1 - i;
            let mut f = host_pubs[other].split_whitespace();
            let (alg, b64) = (f.next().expect("type"), f.next().expect("key"));
            crate::write_file(
                &n.config_dir.join("ssh/known_hosts"),
                &format!(
                    "[{}]:{SSH_PORT} {alg} {b64}\n",
                    cluster_addr(&nodes[other].name)
                ),
            );
            // Tandem's own authorized_keys, as `cluster create` writes it.
            crate::write_file(
                &n.config_dir.join("ssh/authorized_keys"),
                &client_pubs[other],
            );
            crate::write_file(
                &n.sshd_dir.join("sshd_config"),
                &crate::sshd_config(
                    &cluster_addr(&n.name),
                    SSH_PORT,
                    &n.sshd_dir,
                    &n.config_dir.join("ssh/authorized_keys"),
                    crate::RootLogin::KeyOnly,
                ),
            );
        }
        let mut backends = Vec::new();
        for i in 1..=2 {
            let ns = lab.netns(&format!("b{i}")).expect("backend");
            lab.attach(&ns, "eth0", &back, &[&format!("10.1.0.1{i}/24")])
                .expect("backend eth0");
            crate::echo_backend(&ns, &format!("b{i}"), 8080);
            backends.push(ns);
        }
        let mut l = OpsLab {
            lab,
            client,
            nodes,
            backends,
            _tmp: tmp,
        };
        for node in ["lb1", "lb2"] {
            l.start_sshd(node);
        }
        l
    }

    /// The whole cluster running: lb1 master, lb2 backup, both nodes green.
    pub fn running() -> OpsLab {
        OpsLab::running_with_failback("none")
    }

    /// As `running`, with `failback` in cluster.toml.
    pub fn running_with_failback(failback: &str) -> OpsLab {
        let mut l = OpsLab::with_failback(failback);
        for node in ["lb1", "lb2"] {
            l.start(node, "lb-forwarder");
            l.start(node, "conntrack-syncd");
            l.start(node, "cfg-syncd");
            l.start(node, "clustermanager");
        }
        l.start("lb1", "vrrpd");
        l.wait_for("lb1 to hold the VIP", Duration::from_secs(10), |l| {
            l.holds_vip("lb1")
        });
        l.start("lb2", "vrrpd");
        l.wait_for(
            "both nodes green, lb1 master and lb2 backup",
            Duration::from_secs(30),
            |l| {
                let t = l.nodes_json("lb1");
                row(&t, "lb1").is_some_and(|r| r["role"] == "master" && r["status"] == "green")
                    && row(&t, "lb2")
                        .is_some_and(|r| r["role"] == "backup" && r["status"] == "green")
            },
        );
        // Orchestration (sync direction, failback gating) runs once each
        // clustermanager follows its vrrpd.
        l.wait_for(
            "both clustermanagers to follow vrrpd",
            Duration::from_secs(10),
            |l| {
                ["lb1", "lb2"].iter().all(|n| {
                    l.node(n)
                        .daemon_log("clustermanager")
                        .contains("following vrrpd's state")
                })
            },
        );
        l
    }

    pub fn node(&self, name: &str) -> &OpsNode {
        self.nodes.iter().find(|n| n.name == name).expect("node")
    }

    fn node_mut(&mut self, name: &str) -> &mut OpsNode {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .expect("node")
    }

    pub fn peer(&self, name: &str) -> &OpsNode {
        self.nodes.iter().find(|n| n.name != name).expect("peer")
    }

    pub fn start_sshd(&mut self, node: &str) {
        let n = self.node(node);
        let mut cmd = Command::new("/usr/sbin/sshd");
        cmd.args(["-D", "-e", "-f"])
            .arg(n.sshd_dir.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = self.lab.spawn(&n.ns, &mut cmd).expect("spawn sshd");
        let addr: SocketAddr = format!("{}:{SSH_PORT}", cluster_addr(node))
            .parse()
            .expect("addr");
        self.peer(node)
            .ns
            .wait_tcp(addr, Duration::from_secs(10))
            .expect("sshd listening");
        self.node_mut(node).sshd = Some(child);
    }

    /// Starts a daemon on a node (stderr to its log) and waits for its socket.
    pub fn start(&mut self, node: &str, daemon: &'static str) {
        let n = self.node(node);
        let peer = self.peer(node);
        fs::create_dir_all(&n.logs).expect("logs dir");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(n.logs.join(format!("{daemon}.log")))
            .expect("log file");
        let mut cmd = Command::new(crate::bin(daemon));
        cmd.arg("--config-dir")
            .arg(&n.config_dir)
            .arg("--runtime-dir")
            .arg(&n.runtime_dir)
            .arg("--state-dir")
            .arg(crate::state_dir_beside(&n.runtime_dir));
        match daemon {
            "cfg-syncd" => {
                cmd.arg("--peer-config-dir")
                    .arg(&peer.config_dir)
                    .arg("--peer-runtime-dir")
                    .arg(&peer.runtime_dir);
            }
            "clustermanager" => {
                cmd.arg("--peer-runtime-dir").arg(&peer.runtime_dir);
            }
            _ => {}
        }
        cmd.env("RUST_LOG", "info,clustermanager=debug")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = self.lab.spawn(&n.ns, &mut cmd).expect("spawn daemon");
        let socket = n.runtime_dir.join(format!("{daemon}.sock"));
        if let Err(e) = tandem_lab::wait_for_unix_socket(&socket, Duration::from_secs(10)) {
            panic!("{node} {daemon} not serving: {e}\n{}", n.log());
        }
        self.node_mut(node).daemons.push((daemon, child));
    }

    /// SIGKILL of one daemon of a node.
    pub fn kill(&mut self, node: &str, daemon: &str) {
        let n = self.node_mut(node);
        let i = n
            .daemons
            .iter()
            .position(|(d, _)| *d == daemon)
            .expect("daemon running");
        let (_, mut child) = n.daemons.remove(i);
        child.kill(Signal::SIGKILL).expect("SIGKILL");
        let _ = child.wait_timeout(Duration::from_secs(5));
    }

    pub fn wait_for(&self, what: &str, timeout: Duration, f: impl Fn(&OpsLab) -> bool) -> Duration {
        let start = Instant::now();
        while !f(self) {
            if start.elapsed() > timeout {
                panic!(
                    "timed out after {timeout:?} waiting for {what}\nlb1 nodes: {:?}\n{}\n{}",
                    self.nodes_json("lb1"),
                    self.node("lb1").log(),
                    self.node("lb2").log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        start.elapsed()
    }

    pub fn holds_vip(&self, node: &str) -> bool {
        self.node(node)
            .ns
            .addresses("eth0")
            .map(|a| a.iter().any(|a| a.starts_with(VIP)))
            .unwrap_or(false)
    }

    /// `tandemctl cluster nodes --json` on a node (empty on failure).
    pub fn nodes_json(&self, node: &str) -> Vec<Value> {
        let out = self.node(node).tandemctl(&["cluster", "nodes", "--json"]);
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    }

    /// vrrpd's Status on a node.
    pub fn vrrp(&self, node: &str) -> v1::VrrpStatus {
        crate::rpc(&self.node(node).runtime_dir, "vrrpd", async |ch| {
            v1::vrrpd_client::VrrpdClient::new(ch)
                .status(v1::StatusRequest {})
                .await
                .expect("vrrpd status")
                .into_inner()
        })
    }

    /// lb-forwarder's Status on a node.
    pub fn forwarder(&self, node: &str) -> v1::LbForwarderStatus {
        crate::rpc(&self.node(node).runtime_dir, "lb-forwarder", async |ch| {
            v1::lb_forwarder_client::LbForwarderClient::new(ch)
                .status(v1::StatusRequest {})
                .await
                .expect("lb-forwarder status")
                .into_inner()
        })
    }
}

impl Default for OpsLab {
    fn default() -> Self {
        OpsLab::new()
    }
}

/// The row of `node` in a `cluster nodes --json` table.
pub fn row<'a>(table: &'a [Value], node: &str) -> Option<&'a Value> {
    table.iter().find(|r| r["node"] == node)
}

/// Text of a command's output, for assertion messages.
pub fn text(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
