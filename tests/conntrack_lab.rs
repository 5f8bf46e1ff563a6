//! A two-node cluster lab for connection survival: a client, nodes `lb1`
//! (preferred master) and `lb2` running the real vrrpd, lb-forwarder and
//! (optionally) conntrack-syncd, and three backends. The VIP 10.0.0.100 and
//! the floating SNAT source 10.1.0.100 move with the master; VRRP and the
//! sync traffic use the cluster link 192.168.100.0/24.
//!
//! Farms: `web` (TCP 80 → backends :8080, round robin) and `dns` (UDP 53 →
//! backends :5353, round robin). Backends answer a TCP connection with their
//! name and echo lines; a UDP datagram with `<name> <payload>`.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
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
    /// Where `start_logged` puts each daemon's log.
    pub logs: PathBuf,
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
        let logs = tmp.path().join("logs");
        std::fs::create_dir_all(&logs).expect("log dir");
        ClusterLab {
            lab,
            client,
            nodes,
            backends,
            logs,
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

    /// Starts a daemon with its output appended to `logs/<node>-<daemon>.log`
    /// (kept across restarts), and waits for its socket.
    pub fn start_logged(&mut self, node: &str, daemon: &'static str, extra: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(node, daemon))
            .expect("log file");
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
            .env_remove("JOURNAL_STREAM")
            .stdout(Stdio::null())
            .stderr(log);
        let child = lab.spawn(&n.ns, &mut cmd).expect("spawn daemon");
        tandem_lab::wait_for_unix_socket(
            &n.runtime_dir.join(format!("{daemon}.sock")),
            Duration::from_secs(10),
        )
        .expect("daemon serving");
        n.daemons.push((daemon, child));
    }

    pub fn log_path(&self, node: &str, daemon: &str) -> PathBuf {
        self.logs.join(format!("{node}-{daemon}.log"))
    }

    /// What a daemon started with `start_logged` has written so far.
    pub fn log(&self, node: &str, daemon: &str) -> String {
        std::fs::read_to_string(self.log_path(node, daemon)).unwrap_or_default()
    }

    /// Sends `signal` to one daemon of a node (SIGSTOP, SIGCONT...).
    pub fn signal(&mut self, node: &str, daemon: &str, signal: Signal) {
        let n = self
            .nodes
            .iter_mut()
            .find(|n| n.name == node)
            .expect("node");
        let (_, child) = n
            .daemons
            .iter_mut()
            .find(|(d, _)| *d == daemon)
            .expect("daemon running");
        child.kill(signal).expect("signal daemon");
    }

    /// Kills one daemon of a node (SIGKILL: a crash) and forgets it.
    pub fn crash(&mut self, node: &str, daemon: &str) {
        let n = self
            .nodes
            .iter_mut()
            .find(|n| n.name == node)
            .expect("node");
        let i = n
            .daemons
            .iter()
            .position(|(d, _)| *d == daemon)
            .expect("daemon running");
        let (_, mut child) = n.daemons.remove(i);
        let _ = child.kill(Signal::SIGKILL);
        let _ = child.wait_timeout(Duration::from_secs(5));
    }

    /// The PID of a daemon of a node.
    pub fn pid(&self, node: &str, daemon: &str) -> i32 {
        self.node(node)
            .daemons
            .iter()
            .find(|(d, _)| *d == daemon)
            .map(|(_, c)| c.pid().as_raw())
            .expect("daemon running")
    }

    /// The MAC address of a node's interface.
    pub fn mac(&self, node: &str, ifname: &str) -> String {
        let out = self
            .node(node)
            .ns
            .ip(&["-o", "link", "show", "dev", ifname])
            .expect("ip link");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .expect("a MAC address")
            .to_owned()
    }

    /// Points the client's neighbour entry for the VIP and the backends'
    /// for the floating SNAT address at `node`, as their ARP caches do for
    /// a while after that node announced them (a gratuitous ARP), whoever
    /// is master now.
    pub fn pin_neighbours_to(&self, node: &str) {
        let (lan, back) = (self.mac(node, "eth0"), self.mac(node, "eth1"));
        self.client
            .ip(&[
                "neigh",
                "replace",
                VIP,
                "lladdr",
                &lan,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ])
            .expect("client neighbour");
        for b in &self.backends {
            b.ip(&[
                "neigh",
                "replace",
                "10.1.0.100",
                "lladdr",
                &back,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ])
            .expect("backend neighbour");
        }
    }

    /// Original tuples of the flows to the VIP in a node's kernel table.
    pub fn vip_tuples(&self, node: &str) -> HashSet<tandem_conntrack::Tuple> {
        let vip: IpAddr = VIP.parse().expect("VIP");
        self.node(node)
            .ns
            .run(move || {
                let mut ct = tandem_conntrack::Conntrack::open().expect("ctnetlink");
                ct.dump()
                    .expect("dump")
                    .into_iter()
                    .map(|r| r.entry.original)
                    .filter(|t| t.dst == vip)
                    .collect()
            })
            .expect("node netns")
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

    /// TCP connections to the VIP from these exact source addresses and
    /// ports (port 0: any), each with the name of the backend that answered.
    pub fn connect_from(&self, sources: &[SocketAddr]) -> Vec<(String, TcpStream)> {
        let sources = sources.to_vec();
        let dst: SocketAddr = format!("{VIP}:80").parse().expect("dst");
        self.client
            .run(move || {
                sources
                    .iter()
                    .map(|src| {
                        let s = socket2::Socket::new(
                            socket2::Domain::IPV4,
                            socket2::Type::STREAM,
                            None,
                        )?;
                        s.set_reuse_address(true)?;
                        s.bind(&(*src).into())?;
                        greet(s, &dst)
                    })
                    .collect::<std::io::Result<Vec<_>>>()
            })
            .expect("client thread")
            .expect("connections to the VIP")
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
                        greet(s, &dst)
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

/// New TCP flows through the VIP as fast as a SYN flood makes them:
/// `flows` SYNs from the client's 8 addresses (one source port each),
/// paced evenly over `over`, from a raw socket in the client's namespace.
/// The client drops its own resets (the SYN-ACKs find no socket), so each
/// flow stays half-open (SYN_RECV, 60 s) on the balancer. Returns the
/// (source address, port) of every flow sent.
/// Connects a socket to `dst` and reads the backend's greeting (its
/// name). A loaded machine may drop a SYN (resent after 1 s, 3 s) or be
/// slow to answer: the connection and the greeting get generous
/// timeouts; later reads, which decide whether a connection survived a
/// failover, get 3 s.
fn greet(s: socket2::Socket, dst: &SocketAddr) -> std::io::Result<(String, TcpStream)> {
    s.connect_timeout(&(*dst).into(), Duration::from_secs(8))?;
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_nodelay(true)?;
    let mut name = String::new();
    BufReader::new(s.try_clone()?).read_line(&mut name)?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    Ok((name.trim().to_owned(), s))
}

pub fn syn_burst(client: &Netns, flows: usize, over: Duration) -> Vec<(IpAddr, u16)> {
    client
        .exec(
            "nft",
            &["add table inet burst; add chain inet burst out { type filter hook output priority 0; }; add rule inet burst out tcp flags & rst == rst drop"],
        )
        .expect("drop the client's resets");
    client
        .run(move || {
            let raw = socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::RAW,
                Some(socket2::Protocol::from(libc_ipproto_raw())),
            )?;
            let vip: std::net::Ipv4Addr = VIP.parse().expect("VIP");
            let dst = socket2::SockAddr::from(SocketAddr::new(IpAddr::V4(vip), 0));
            let start = Instant::now();
            let mut sent = Vec::with_capacity(flows);
            for n in 0..flows {
                let src = std::net::Ipv4Addr::new(10, 0, 0, 50 + (n % 8) as u8);
                let port = 1024 + (n / 8) as u16;
                let packet = syn_packet(src, port, vip, 80, n as u32);
                raw.send_to(&packet, &dst)?;
                sent.push((IpAddr::V4(src), port));
                // Even pacing, checked every 64 packets.
                if n % 64 == 63 {
                    let due = over.mul_f64((n + 1) as f64 / flows as f64);
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
            }
            Ok::<_, std::io::Error>(sent)
        })
        .expect("client netns")
        .expect("SYN burst")
}

/// IPPROTO_RAW: the socket sends whole IP packets (IP_HDRINCL implied).
fn libc_ipproto_raw() -> i32 {
    255
}

/// An IPv4 TCP SYN, checksums included.
fn syn_packet(
    src: std::net::Ipv4Addr,
    sport: u16,
    dst: std::net::Ipv4Addr,
    dport: u16,
    seq: u32,
) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[6] = 0x40; // don't fragment
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let ip_sum = checksum(&p[..20], 0);
    p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    let tcp = &mut p[20..];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.wrapping_mul(2_654_435_761).to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo: u32 = 0;
    for w in src.octets().chunks(2).chain(dst.octets().chunks(2)) {
        pseudo += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    pseudo += 6 + 20;
    let sum = checksum(tcp, pseudo);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    p
}

/// The Internet checksum (RFC 1071) of `data`, starting from `sum`.
fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for w in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Closes connections with a reset (SO_LINGER 0): the client keeps no
/// TIME_WAIT, so its ports can be used again at once, and the balancers'
/// entries go to CLOSE (10 s) and expire.
pub fn reset(conns: Vec<(String, TcpStream)>) {
    for (_, s) in conns {
        let s = socket2::Socket::from(s);
        let _ = s.set_linger(Some(Duration::ZERO));
        drop(s);
    }
}

/// How many of `conns` still carry bytes both ways: each sends a line with
/// 1,000 bytes and must read it back intact (all at once, so that broken
/// ones cost one read timeout in all, not one each).
pub fn survivors(conns: &mut [(String, TcpStream)], tag: &str) -> usize {
    std::thread::scope(|scope| {
        let checks: Vec<_> = conns
            .iter()
            .enumerate()
            .map(|(i, (_, s))| {
                scope.spawn(move || echo(s, &format!("{tag} {i} {}", "x".repeat(1000))).is_some())
            })
            .collect();
        checks
            .into_iter()
            .map(|c| c.join())
            .filter(|r| matches!(r, Ok(true)))
            .count()
    })
}

/// Peak resident memory of a process (VmHWM), in kB.
pub fn peak_rss_kb(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The UDP payloads of the IPv4 packets in a pcap file (tcpdump -w) whose
/// source is `from` (Ethernet link type).
pub fn pcap_udp_payloads(path: &Path, from: IpAddr) -> Vec<Vec<u8>> {
    let data = std::fs::read(path).unwrap_or_default();
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= data.len() {
        let incl =
            u32::from_le_bytes([data[at + 8], data[at + 9], data[at + 10], data[at + 11]]) as usize;
        let pkt = &data[(at + 16).min(data.len())..(at + 16 + incl).min(data.len())];
        at += 16 + incl;
        // Ethernet, IPv4 (no options checked beyond IHL), UDP.
        if pkt.len() < 14 + 20 + 8 || pkt[12..14] != [0x08, 0x00] || pkt[14 + 9] != 17 {
            continue;
        }
        let ihl = usize::from(pkt[14] & 0x0f) * 4;
        let src = IpAddr::from([pkt[26], pkt[27], pkt[28], pkt[29]]);
        if src != from || pkt.len() < 14 + ihl + 8 {
            continue;
        }
        out.push(pkt[14 + ihl + 8..].to_vec());
    }
    out
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
