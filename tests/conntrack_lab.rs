//! A two-node cluster lab for connection survival: a client, nodes `lb1`
//! (preferred master) and `lb2` running the real vrrpd, lb-forwarder and
//! (optionally) conntrack-syncd, and three backends. The VIP 10.0.0.100 and
//! the floating SNAT source 10.1.0.100 move with the master; VRRP and the
//! sync traffic use the cluster link 192.168.100.0/24.
//!
//! Farms: `web` (TCP 80 → backends :8080, round robin) and `dns` (UDP 53 →
//! backends :5353, round robin). Backends answer a TCP connection with their
//! name and echo lines; a UDP datagram with `<name> <payload>`.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tandem_lab::{Lab, LabChild, Netns};
use tandem_proto::v1;

pub const VIP: &str = "10.0.0.100";
pub const SYNC_PORT: u16 = 3780;

pub struct Node {
    pub name: String,
    pub ns: Netns,
    pub config_dir: PathBuf,
    pub runtime_dir: PathBuf,
    pub daemons: Vec<(&'static str, LabChild)>,
}

pub struct ClusterLab {
    pub lab: Lab,
    pub client: Netns,
    pub nodes: Vec<Node>,
    pub backends: Vec<Netns>,
    _tmp: tempfile::TempDir,
}

const WEB: &str = "name = \"web\"\nvip = \"10.0.0.100\"\nport = 80\nscheduler = \"rr\"\nsnat_address = \"10.1.0.100\"\n[health_check]\nkind = \"none\"\n\
[[backends]]\naddress = \"10.1.0.11\"\nport = 8080\n[[backends]]\naddress = \"10.1.0.12\"\nport = 8080\n[[backends]]\naddress = \"10.1.0.13\"\nport = 8080\n";
const DNS: &str = "name = \"dns\"\nvip = \"10.0.0.100\"\nport = 53\nprotocol = \"udp\"\nscheduler = \"rr\"\nsnat_address = \"10.1.0.100\"\n[health_check]\nkind = \"none\"\n\
[[backends]]\naddress = \"10.1.0.11\"\nport = 5353\n[[backends]]\naddress = \"10.1.0.12\"\nport = 5353\n[[backends]]\naddress = \"10.1.0.13\"\nport = 5353\n";

fn udp_backend(ns: &Netns, name: &str) {
    let sock = ns
        .run(|| UdpSocket::bind("0.0.0.0:5353"))
        .expect("ns")
        .expect("bind");
    let name = name.to_owned();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let mut reply = format!("{name} ").into_bytes();
            reply.extend_from_slice(&buf[..n]);
            let _ = sock.send_to(&reply, from);
        }
    });
}

impl ClusterLab {
    pub fn new() -> ClusterLab {
        let lab = Lab::new().expect("lab");
        let lan = lab.bridge("lan").expect("lan");
        let back = lab.bridge("back").expect("back");
        let link = lab.bridge("link").expect("link");
        let client = lab.netns("cl").expect("client");
        let sources: Vec<String> = (50..58).map(|i| format!("10.0.0.{i}/24")).collect();
        let sources: Vec<&str> = sources.iter().map(String::as_str).collect();
        lab.attach(&client, "eth0", &lan, &sources).expect("client");
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut nodes = Vec::new();
        for i in 1..=2u8 {
            let name = format!("lb{i}");
            let ns = crate::balancer_netns(&lab, &name, i, &lan, &back, &link);
            let config_dir = tmp.path().join(&name).join("etc");
            let runtime_dir = tmp.path().join(&name).join("run");
            crate::write_file(
                &config_dir.join("node.toml"),
                &format!(
                    "name = \"{name}\"\ncluster_interface = \"eth2\"\ncluster_address = \"192.168.100.{i}\"\n"
                ),
            );
            crate::write_file(
                &config_dir.join("cluster.toml"),
                &format!(
                    "virtual_router_id = 61\nfailback = \"none\"\nhash_seed = 0x1234\n\n\
                     [vrrp]\nadvert_interval_ms = 100\ngarp_repeat = 3\ngarp_interval_ms = 50\n\n\
                     [[nodes]]\nname = \"lb1\"\naddress = \"192.168.100.1\"\npriority = 150\n\n\
                     [[nodes]]\nname = \"lb2\"\naddress = \"192.168.100.2\"\npriority = 100\n\n\
                     [[floating_ips]]\naddress = \"{VIP}/24\"\ninterface = \"eth0\"\n\n\
                     [[floating_ips]]\naddress = \"10.1.0.100/24\"\ninterface = \"eth1\"\n\n\
                     [sync]\nconntrack_port = {SYNC_PORT}\nkey_file = \"keys/sync.key\"\n"
                ),
            );
            // The key lives inside the configuration directory (a key_file
            // outside it is refused).
            crate::write_file(
                &config_dir.join("keys/sync.key"),
                "lab-shared-sync-key-0123456789abcdef\n",
            );
            crate::write_file(&config_dir.join("farms/web.toml"), WEB);
            crate::write_file(&config_dir.join("farms/dns.toml"), DNS);
            nodes.push(Node {
                name,
                ns,
                config_dir,
                runtime_dir,
                daemons: Vec::new(),
            });
        }
        let mut backends = Vec::new();
        for i in 1..=3 {
            let ns = lab.netns(&format!("b{i}")).expect("backend");
            lab.attach(&ns, "eth0", &back, &[&format!("10.1.0.1{i}/24")])
                .expect("backend eth0");
            crate::echo_backend(&ns, &format!("b{i}"), 8080);
            udp_backend(&ns, &format!("b{i}"));
            backends.push(ns);
        }
        ClusterLab {
            lab,
            client,
            nodes,
            backends,
            _tmp: tmp,
        }
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes.iter().find(|n| n.name == name).expect("node")
    }

    /// Starts a daemon on a node and waits for its socket.
    pub fn start(&mut self, node: &str, daemon: &'static str, extra: &[&str]) {
        let lab = &self.lab;
        let n = self
            .nodes
            .iter_mut()
            .find(|n| n.name == node)
            .expect("node");
        let mut cmd = Command::new(crate::bin(daemon));
        cmd.arg("--config-dir")
            .arg(&n.config_dir)
            .arg("--runtime-dir")
            .arg(&n.runtime_dir)
            .arg("--state-dir")
            .arg(crate::state_dir_beside(&n.runtime_dir))
            .args(extra)
            .env("RUST_LOG", "info")
            .env_remove("JOURNAL_STREAM");
        let child = lab.spawn(&n.ns, &mut cmd).expect("spawn daemon");
        tandem_lab::wait_for_unix_socket(
            &n.runtime_dir.join(format!("{daemon}.sock")),
            Duration::from_secs(10),
        )
        .expect("daemon serving");
        n.daemons.push((daemon, child));
    }

    /// Starts vrrpd, lb-forwarder and, with `sync`, conntrack-syncd on both
    /// nodes, lb1 first so it becomes master; returns when lb1 holds the VIP
    /// and both datapaths are loaded.
    pub fn start_cluster(&mut self, sync: bool) {
        for node in ["lb1", "lb2"] {
            self.start(node, "lb-forwarder", &[]);
            if sync {
                self.start(node, "conntrack-syncd", &[]);
            }
        }
        self.start("lb1", "vrrpd", &[]);
        self.wait_for("lb1 to become master", Duration::from_secs(10), |l| {
            l.holds_vip("lb1")
        });
        self.start("lb2", "vrrpd", &[]);
        self.wait_for("lb2 to become backup", Duration::from_secs(10), |l| {
            l.vrrp_state("lb2") == v1::VrrpState::Backup
        });
        if sync {
            self.wait_for(
                "the sync peers to see each other",
                Duration::from_secs(10),
                |l| {
                    let (a, b) = (l.conntrack_status("lb1"), l.conntrack_status("lb2"));
                    a.peer_alive
                        && b.peer_alive
                        && a.role() == v1::SyncRole::Sender
                        && b.role() == v1::SyncRole::Receiver
                },
            );
        }
    }

    pub fn wait_for(&self, what: &str, timeout: Duration, f: impl Fn(&ClusterLab) -> bool) {
        let deadline = Instant::now() + timeout;
        while !f(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn holds_vip(&self, node: &str) -> bool {
        self.node(node)
            .ns
            .addresses("eth0")
            .map(|a| a.iter().any(|a| a.starts_with(VIP)))
            .unwrap_or(false)
    }

    pub fn vrrp_state(&self, node: &str) -> v1::VrrpState {
        crate::vrrp_state(&self.node(node).runtime_dir)
    }

    pub fn conntrack_status(&self, node: &str) -> v1::ConntrackSyncStatus {
        crate::conntrack_status(&self.node(node).runtime_dir)
    }

    /// The master dies: every daemon of `node` is killed (SIGKILL) and its
    /// links go down, so it neither answers nor advertises any more.
    pub fn kill_node(&mut self, node: &str) {
        let n = self
            .nodes
            .iter_mut()
            .find(|n| n.name == node)
            .expect("node");
        for (_, d) in &mut n.daemons {
            let _ = d.kill(Signal::SIGKILL);
        }
        for ifname in ["eth0", "eth1", "eth2"] {
            n.ns.set_link(ifname, false).expect("link down");
        }
    }

    /// Conntrack entries of flows to the VIP in a node's table.
    pub fn vip_entries(&self, node: &str) -> usize {
        let out = self
            .node(node)
            .ns
            .exec("conntrack", &["-L", "-d", VIP])
            .expect("conntrack -L");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("dst=10.0.0.100"))
            .count()
    }

    /// `n` TCP connections to the VIP from the client, each with the name
    /// of the backend that answered.
    pub fn connect_many(&self, n: usize) -> Vec<(String, TcpStream)> {
        let dst: SocketAddr = format!("{VIP}:80").parse().expect("dst");
        self.client
            .run(move || {
                (0..n)
                    .map(|i| {
                        let src: SocketAddr =
                            format!("10.0.0.{}:0", 50 + i % 8).parse().expect("src");
                        let s = socket2::Socket::new(
                            socket2::Domain::IPV4,
                            socket2::Type::STREAM,
                            None,
                        )?;
                        s.bind(&src.into())?;
                        s.connect_timeout(&dst.into(), Duration::from_secs(2))?;
                        let s: TcpStream = s.into();
                        s.set_read_timeout(Some(Duration::from_secs(3)))?;
                        s.set_nodelay(true)?;
                        let mut name = String::new();
                        BufReader::new(s.try_clone()?).read_line(&mut name)?;
                        Ok((name.trim().to_owned(), s))
                    })
                    .collect::<std::io::Result<Vec<_>>>()
            })
            .expect("client thread")
            .expect("connections to the VIP")
    }

    /// UDP flows from the client: `n` connected sockets to VIP:53.
    pub fn udp_flows(&self, n: usize) -> Vec<UdpSocket> {
        self.client
            .run(move || {
                (0..n)
                    .map(|i| {
                        let s = UdpSocket::bind(format!("10.0.0.{}:0", 50 + i % 8))?;
                        s.connect(format!("{VIP}:53"))?;
                        s.set_read_timeout(Some(Duration::from_millis(500)))?;
                        Ok(s)
                    })
                    .collect::<std::io::Result<Vec<_>>>()
            })
            .expect("client thread")
            .expect("udp sockets")
    }
}

impl Default for ClusterLab {
    fn default() -> Self {
        ClusterLab::new()
    }
}

/// Sends `text` on a connection and reads the echo; None if the connection
/// broke or the echo differs.
pub fn echo(stream: &TcpStream, text: &str) -> Option<String> {
    let mut w = stream;
    writeln!(w, "{text}").ok()?;
    let mut line = String::new();
    BufReader::new(stream.try_clone().ok()?)
        .read_line(&mut line)
        .ok()?;
    (line.trim() == text).then(|| line.trim().to_owned())
}

/// One UDP round trip: the name of the backend that answered, if any
/// (retried a few times: a datagram may be lost while the VIP moves).
pub fn udp_ask(sock: &UdpSocket, payload: &str) -> Option<String> {
    let mut buf = [0u8; 2048];
    for _ in 0..6 {
        if sock.send(payload.as_bytes()).is_err() {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        if let Ok(n) = sock.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let (name, echoed) = text.split_once(' ')?;
            if echoed == payload {
                return Some(name.to_owned());
            }
        }
    }
    None
}
