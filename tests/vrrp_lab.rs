//! A two-node VRRP lab: nodes `lb1` and `lb2` and a client on one bridge,
//! each node running the real vrrpd inside its own network namespace, and a
//! "who am I" TCP responder on every node so the client can tell which node
//! holds the floating IP.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tandem_lab::{Bridge, Lab, LabChild, Netns};
use tandem_proto::v1;

pub const VIP: &str = "10.0.0.100";
pub const WHOAMI_PORT: u16 = 7000;

/// What to put in cluster.toml for a lab.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub advert_interval_ms: u32,
    pub failback: String,
    pub tracked: bool,
    pub version: u8,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            advert_interval_ms: 100,
            failback: "none".into(),
            tracked: false,
            version: 3,
        }
    }
}

pub struct VrrpNode {
    pub name: String,
    pub ns: Netns,
    pub config_dir: PathBuf,
    pub runtime_dir: PathBuf,
    pub vrrpd: Option<LabChild>,
}

pub struct VrrpLab {
    pub lab: Lab,
    pub lan: Bridge,
    pub client: Netns,
    pub nodes: Vec<VrrpNode>,
    _tmp: tempfile::TempDir,
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, text).expect("write config");
}

impl VrrpLab {
    pub fn new(opts: &ClusterOptions) -> VrrpLab {
        let lab = Lab::new().expect("lab");
        let lan = lab.bridge("lan").expect("bridge lan");
        let back = lab.bridge("back").expect("bridge back");
        let client = lab.netns("cl").expect("client netns");
        lab.attach(&client, "eth0", &lan, &["10.0.0.50/24"])
            .expect("client eth0");
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut nodes = Vec::new();
        for i in 1..=2u8 {
            let name = format!("lb{i}");
            let ns = lab.netns(&name).expect("node netns");
            lab.attach(&ns, "eth0", &lan, &[&format!("10.0.0.{i}/24")])
                .expect("eth0");
            lab.attach(&ns, "eth1", &back, &[&format!("10.1.0.{i}/24")])
                .expect("eth1");
            let config_dir = tmp.path().join(&name).join("etc");
            let runtime_dir = tmp.path().join(&name).join("run");
            write(
                &config_dir.join("node.toml"),
                &format!(
                    "name = \"{name}\"\ncluster_interface = \"eth0\"\ncluster_address = \"10.0.0.{i}\"\n"
                ),
            );
            let tracked = if opts.tracked { "[\"eth1\"]" } else { "[]" };
            write(
                &config_dir.join("cluster.toml"),
                &format!(
                    "virtual_router_id = 51\nfailback = \"{}\"\ntracked_interfaces = {tracked}\n\n\
                     [vrrp]\nversion = {}\nadvert_interval_ms = {}\ngarp_repeat = 2\n\n\
                     [[nodes]]\nname = \"lb1\"\naddress = \"10.0.0.1\"\n\n\
                     [[nodes]]\nname = \"lb2\"\naddress = \"10.0.0.2\"\n\n\
                     [[floating_ips]]\naddress = \"{VIP}/24\"\ninterface = \"eth0\"\n",
                    opts.failback, opts.version, opts.advert_interval_ms
                ),
            );
            whoami(&ns, &name);
            nodes.push(VrrpNode {
                name,
                ns,
                config_dir,
                runtime_dir,
                vrrpd: None,
            });
        }
        VrrpLab {
            lab,
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

    pub fn start(&mut self, name: &str) {
        let bin = crate::bin("vrrpd");
        let lab = &self.lab;
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.name == name)
            .expect("node");
        let mut cmd = Command::new(bin);
        cmd.arg("--config-dir")
            .arg(&node.config_dir)
            .arg("--runtime-dir")
            .arg(&node.runtime_dir)
            .env("RUST_LOG", "info")
            .env_remove("JOURNAL_STREAM");
        node.vrrpd = Some(lab.spawn(&node.ns, &mut cmd).expect("spawn vrrpd"));
        tandem_lab::wait_for_unix_socket(
            &node.runtime_dir.join("vrrpd.sock"),
            Duration::from_secs(10),
        )
        .expect("vrrpd serving");
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

/// A thread inside `ns` answering every TCP connection on port 7000 with
/// the node's name, for the life of the test process.
fn whoami(ns: &Netns, name: &str) {
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
            .set_maintenance(v1::SetMaintenanceRequest { enabled: on })
            .await
            .expect("SetMaintenance")
            .into_inner()
    })
}
