//! The pair under faults: a client, nodes `lb1` and `lb2` running the real
//! vrrpd, lb-forwarder and conntrack-syncd, two backends, and live traffic
//! (a new request every few ms plus long-lived connections), with the
//! probes the fault tests need: who the client's and the backends'
//! neighbour entries name, how many farm packets each node forwards, who
//! holds the floating IPs, and the daemons' logs.
//!
//! Networks: lan 10.0.0.0/24 (client .50, VIP .100 on eth0), back
//! 10.1.0.0/24 (backends .11 .12, floating SNAT source .100 on eth1),
//! cluster link 192.168.100.0/24 on eth2 (VRRP, conntrack sync). The farm
//! `web` (TCP 80 → backends :8080) greets with the backend's name and
//! echoes lines.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tandem_lab::{Bridge, Lab, LabChild, Netns};
use tandem_proto::v1;

pub const VIP: &str = "10.0.0.100";
pub const SNAT: &str = "10.1.0.100";
pub const SPOOFER: &str = "192.168.100.9";

/// What cluster.toml says; the defaults are the lab's usual pair.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    pub vrid: u8,
    pub advert_interval_ms: u32,
    /// lb1's and lb2's priorities.
    pub priorities: (u8, u8),
    pub failback: String,
    /// Extra lines of the `[vrrp]` table (the switches a control flips).
    pub vrrp_extra: String,
    /// Run conntrack-syncd on both nodes.
    pub sync: bool,
    /// garp_repeat and garp_interval_ms.
    pub garp: (u8, u32),
    /// Extra lines of the `[sync]` table.
    pub sync_extra: String,
}

impl Default for ChaosOptions {
    fn default() -> Self {
        ChaosOptions {
            vrid: 42,
            advert_interval_ms: 100,
            priorities: (150, 100),
            failback: "none".into(),
            vrrp_extra: String::new(),
            sync: true,
            garp: (3, 50),
            sync_extra: String::new(),
        }
    }
}

impl ChaosOptions {
    /// Master_Down_Interval of lb2 (the backup's view).
    pub fn master_down_interval(&self, priority: u8) -> Duration {
        let i = u64::from(self.advert_interval_ms) * 1000;
        Duration::from_micros(3 * i + (256 - u64::from(priority)) * i / 256)
    }
}

pub struct ChaosNode {
    pub name: String,
    pub ns: Netns,
    pub config_dir: PathBuf,
    pub runtime_dir: PathBuf,
    pub state_dir: PathBuf,
    pub logs: PathBuf,
    pub daemons: Vec<(&'static str, LabChild)>,
    /// MACs of eth0 (clients' side) and eth1 (backends' side).
    pub macs: (String, String),
}

impl ChaosNode {
    pub fn log(&self, daemon: &str) -> String {
        fs::read_to_string(self.logs.join(format!("{daemon}.log"))).unwrap_or_default()
    }
}

pub struct ChaosLab {
    pub lab: Lab,
    pub opts: ChaosOptions,
    pub link: Bridge,
    pub client: Netns,
    pub nodes: Vec<ChaosNode>,
    pub backends: Vec<Netns>,
    pub tmp: tempfile::TempDir,
}

const WEB: &str = "name = \"web\"\nvip = \"10.0.0.100\"\nport = 80\nscheduler = \"rr\"\nsnat_address = \"10.1.0.100\"\n[health_check]\nkind = \"none\"\n\
[[backends]]\naddress = \"10.1.0.11\"\nport = 8080\n[[backends]]\naddress = \"10.1.0.12\"\nport = 8080\n";

impl ChaosLab {
    pub fn new(opts: ChaosOptions) -> ChaosLab {
        let lab = Lab::new().expect("lab");
        let lan = lab.bridge("lan").expect("lan");
        let back = lab.bridge("back").expect("back");
        let link = lab.bridge("link").expect("link");
        let client = lab.netns("cl").expect("client");
        lab.attach(&client, "eth0", &lan, &["10.0.0.50/24"])
            .expect("client");
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut nodes = Vec::new();
        for i in 1..=2u8 {
            let name = format!("lb{i}");
            let ns = crate::balancer_netns(&lab, &name, i, &lan, &back, &link);
            let root = tmp.path().join(&name);
            let config_dir = root.join("etc");
            let runtime_dir = root.join("run");
            crate::write_file(
                &config_dir.join("node.toml"),
                &format!(
                    "name = \"{name}\"\ncluster_interface = \"eth2\"\ncluster_address = \"192.168.100.{i}\"\n"
                ),
            );
            crate::write_file(
                &config_dir.join("cluster.toml"),
                &format!(
                    "virtual_router_id = {vrid}\nfailback = \"{failback}\"\nhash_seed = 0x1234\n\n\
                     [vrrp]\nadvert_interval_ms = {iv}\ngarp_repeat = {gr}\ngarp_interval_ms = {gi}\n{extra}\n\n\
                     [[nodes]]\nname = \"lb1\"\naddress = \"192.168.100.1\"\npriority = {p1}\n\n\
                     [[nodes]]\nname = \"lb2\"\naddress = \"192.168.100.2\"\npriority = {p2}\n\n\
                     [[floating_ips]]\naddress = \"{VIP}/24\"\ninterface = \"eth0\"\n\n\
                     [[floating_ips]]\naddress = \"{SNAT}/24\"\ninterface = \"eth1\"\n\n\
                     [sync]\nkey_file = \"keys/sync.key\"\n{sync_extra}\n",
                    vrid = opts.vrid,
                    failback = opts.failback,
                    iv = opts.advert_interval_ms,
                    gr = opts.garp.0,
                    gi = opts.garp.1,
                    extra = opts.vrrp_extra,
                    sync_extra = opts.sync_extra,
                    p1 = opts.priorities.0,
                    p2 = opts.priorities.1,
                ),
            );
            // The key lies inside the configuration directory (cluster.toml
            // is replicated: its key_file must be relative).
            crate::write_file(
                &config_dir.join("keys/sync.key"),
                "lab-shared-sync-key-0123456789abcdef\n",
            );
            crate::write_file(&config_dir.join("farms/web.toml"), WEB);
            let macs = (mac_of(&ns, "eth0"), mac_of(&ns, "eth1"));
            nodes.push(ChaosNode {
                macs,
                name,
                ns,
                state_dir: crate::state_dir_beside(&runtime_dir),
                logs: root.join("logs"),
                config_dir,
                runtime_dir,
                daemons: Vec::new(),
            });
        }
        let mut backends = Vec::new();
        for i in 1..=2 {
            let ns = lab.netns(&format!("b{i}")).expect("backend");
            lab.attach(&ns, "eth0", &back, &[&format!("10.1.0.1{i}/24")])
                .expect("backend eth0");
            crate::echo_backend(&ns, &format!("b{i}"), 8080);
            backends.push(ns);
        }
        ChaosLab {
            lab,
            opts,
            link,
            client,
            nodes,
            backends,
            tmp,
        }
    }

    pub fn node(&self, name: &str) -> &ChaosNode {
        self.nodes.iter().find(|n| n.name == name).expect("node")
    }

    fn node_mut(&mut self, name: &str) -> &mut ChaosNode {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .expect("node")
    }

    /// Starts a daemon on a node (its output appended to
    /// `<node>/logs/<daemon>.log`), with extra environment, and waits for
    /// its socket.
    pub fn start_with_env(&mut self, node: &str, daemon: &'static str, env: &[(&str, &str)]) {
        let lab = &self.lab;
        let n = self
            .nodes
            .iter_mut()
            .find(|n| n.name == node)
            .expect("node");
        fs::create_dir_all(&n.logs).expect("logs dir");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(n.logs.join(format!("{daemon}.log")))
            .expect("log file");
        let _ = fs::remove_file(n.runtime_dir.join(format!("{daemon}.sock")));
        let mut cmd = Command::new(crate::bin(daemon));
        cmd.arg("--config-dir")
            .arg(&n.config_dir)
            .arg("--runtime-dir")
            .arg(&n.runtime_dir)
            .arg("--state-dir")
            .arg(&n.state_dir)
            .env("RUST_LOG", "info")
            .env_remove("JOURNAL_STREAM")
            .stdout(Stdio::from(log.try_clone().expect("log fd")))
            .stderr(Stdio::from(log));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = lab.spawn(&n.ns, &mut cmd).expect("spawn daemon");
        if let Err(e) = tandem_lab::wait_for_unix_socket(
            &n.runtime_dir.join(format!("{daemon}.sock")),
            Duration::from_secs(10),
        ) {
            panic!(
                "{daemon} on {node} not serving: {e:?}; its log:\n{}",
                fs::read_to_string(n.logs.join(format!("{daemon}.log"))).unwrap_or_default()
            );
        }
        n.daemons.retain(|(d, _)| *d != daemon);
        n.daemons.push((daemon, child));
    }

    pub fn start(&mut self, node: &str, daemon: &'static str) {
        self.start_with_env(node, daemon, &[]);
    }

    /// lb-forwarder (and conntrack-syncd) on both nodes, then vrrpd on lb1
    /// (master) and lb2 (backup); returns once lb1 holds the VIP, lb2 is
    /// backup and, with sync, the sync peers see each other.
    pub fn start_cluster(&mut self) {
        self.start_cluster_with_env(&[]);
    }

    pub fn start_cluster_with_env(&mut self, vrrpd_env: &[(&str, &str)]) {
        for node in ["lb1", "lb2"] {
            self.start(node, "lb-forwarder");
            if self.opts.sync {
                self.start(node, "conntrack-syncd");
            }
        }
        self.start_with_env("lb1", "vrrpd", vrrpd_env);
        self.wait_for("lb1 to become master", Duration::from_secs(10), |l| {
            l.holds_vip("lb1")
        });
        self.start_with_env("lb2", "vrrpd", vrrpd_env);
        self.wait_for("lb2 to become backup", Duration::from_secs(10), |l| {
            l.state("lb2") == Some(v1::VrrpState::Backup)
        });
        if self.opts.sync {
            self.wait_for(
                "the sync peers to see each other",
                Duration::from_secs(10),
                |l| {
                    let (Some(a), Some(b)) = (l.conntrack("lb1"), l.conntrack("lb2")) else {
                        return false;
                    };
                    a.peer_alive && b.peer_alive
                },
            );
        }
        // The datapath answers through the VIP.
        self.wait_for("the farm to answer", Duration::from_secs(10), |l| {
            l.request().is_ok()
        });
    }

    /// Sends `signal` to a node's daemon. After SIGKILL the daemon is gone
    /// (reaped), as after a crash.
    pub fn signal(&mut self, node: &str, daemon: &str, signal: Signal) {
        let n = self.node_mut(node);
        let i = n
            .daemons
            .iter()
            .position(|(d, _)| *d == daemon)
            .expect("daemon running");
        n.daemons[i].1.kill(signal).expect("signal daemon");
        if signal == Signal::SIGKILL {
            let (_, mut child) = n.daemons.remove(i);
            let _ = child.wait_timeout(Duration::from_secs(5));
        }
    }

    /// Stops a daemon as systemd would (SIGTERM, waits up to `grace`).
    pub fn stop(&mut self, node: &str, daemon: &str, grace: Duration) -> Duration {
        let n = self.node_mut(node);
        let i = n
            .daemons
            .iter()
            .position(|(d, _)| *d == daemon)
            .expect("daemon running");
        let (_, mut child) = n.daemons.remove(i);
        let t = Instant::now();
        child.stop(grace).expect("stop daemon");
        t.elapsed()
    }

    pub fn pid(&self, node: &str, daemon: &str) -> nix::unistd::Pid {
        self.node(node)
            .daemons
            .iter()
            .find(|(d, _)| *d == daemon)
            .expect("daemon running")
            .1
            .pid()
    }

    pub fn vrrp(&self, node: &str) -> Option<v1::VrrpStatus> {
        crate::vrrp_lab::vrrpd_status(&self.node(node).runtime_dir)
    }

    pub fn state(&self, node: &str) -> Option<v1::VrrpState> {
        self.vrrp(node).map(|s| s.state())
    }

    /// (became_master, became_backup) of a node's vrrpd.
    pub fn role_changes(&self, node: &str) -> (u64, u64) {
        self.vrrp(node)
            .and_then(|s| s.counters)
            .map_or((0, 0), |c| (c.became_master, c.became_backup))
    }

    pub fn conntrack(&self, node: &str) -> Option<v1::ConntrackSyncStatus> {
        let dir = self.node(node).runtime_dir.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        rt.block_on(async move {
            let ch = tandem_runtime::connect(&dir, "conntrack-syncd")
                .await
                .ok()?;
            tokio::time::timeout(
                Duration::from_secs(2),
                v1::conntrack_sync_client::ConntrackSyncClient::new(ch)
                    .status(v1::StatusRequest {}),
            )
            .await
            .ok()?
            .ok()
            .map(tonic::Response::into_inner)
        })
    }

    pub fn holds(&self, node: &str, ifname: &str, ip: &str) -> bool {
        self.node(node)
            .ns
            .addresses(ifname)
            .map(|a| a.iter().any(|a| a.starts_with(&format!("{ip}/"))))
            .unwrap_or(false)
    }

    pub fn holds_vip(&self, node: &str) -> bool {
        self.holds(node, "eth0", VIP)
    }

    /// The nodes holding the VIP.
    pub fn vip_holders(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| self.holds_vip(&n.name))
            .map(|n| n.name.clone())
            .collect()
    }

    /// A node's MAC on eth0 or eth1.
    pub fn mac(&self, node: &str, ifname: &str) -> String {
        let n = self.node(node);
        if ifname == "eth1" {
            n.macs.1.clone()
        } else {
            n.macs.0.clone()
        }
    }

    /// The MAC `ns`'s neighbour entry for `ip` names, if any.
    pub fn neighbour(ns: &Netns, ip: &str) -> Option<String> {
        let out = ns.ip(&["neigh", "show", ip]).ok()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut w = text.split_whitespace();
        w.find(|x| *x == "lladdr")
            .and_then(|_| w.next())
            .map(str::to_owned)
    }

    /// Which node the client's entry for the VIP and both backends' entries
    /// for the SNAT source name ("lb1", "lb2", or "?").
    pub fn neighbours(&self) -> Vec<String> {
        let name_of = |mac: Option<String>, ifname: &str| {
            let mac = mac.unwrap_or_default();
            self.nodes
                .iter()
                .find(|n| self.mac(&n.name, ifname) == mac)
                .map_or_else(|| "?".to_owned(), |n| n.name.clone())
        };
        let mut out = vec![name_of(Self::neighbour(&self.client, VIP), "eth0")];
        for b in &self.backends {
            out.push(name_of(Self::neighbour(b, SNAT), "eth1"));
        }
        out
    }

    /// Makes the client's and the backends' neighbour tables take every
    /// announcement: Linux ignores one for an entry updated less than
    /// `locktime` (1 s) before, which makes a short flap's effect a matter
    /// of timing.
    pub fn accept_every_announcement(&self) {
        for ns in std::iter::once(&self.client).chain(&self.backends) {
            ns.sysctl("net/ipv4/neigh/eth0/locktime", "0")
                .expect("locktime");
        }
    }

    /// Cuts (or restores) only the cluster link of a node: its port on the
    /// link bridge goes down; the node's LAN and backend links stay up.
    pub fn cut_cluster_link(&self, node: &str, cut: bool) {
        self.lab
            .port(&self.node(node).ns, "eth2")
            .expect("eth2 port")
            .set_link(!cut)
            .expect("port state");
    }

    /// nftables counters of farm packets each node forwards to the backends.
    pub fn install_counters(&self) {
        for n in &self.nodes {
            n.ns.exec(
                "nft",
                &["add table inet chaos ; add chain inet chaos farm { type filter hook forward priority -300 ; } ; add rule inet chaos farm ip daddr 10.1.0.0/24 tcp dport 8080 counter"],
            )
            .expect("nft counters");
        }
    }

    /// Farm packets a node has forwarded to the backends so far.
    pub fn forwarded(&self, node: &str) -> u64 {
        nft_packets(
            &self.node(node).ns,
            &["list", "chain", "inet", "chaos", "farm"],
            false,
        )
    }

    /// Counts, in the client, ARP announcements of the VIP sent by `node`.
    pub fn count_announcements_from(&self, node: &str) {
        let mac = self.mac(node, "eth0");
        self.client
            .exec(
                "nft",
                &[&format!(
                    "add table arp chaos ; add chain arp chaos in {{ type filter hook input priority 0 ; }} ; add rule arp chaos in arp saddr ether {mac} arp saddr ip {VIP} counter"
                )],
            )
            .expect("nft arp counter");
    }

    pub fn announcements_seen(&self) -> u64 {
        nft_packets(
            &self.client,
            &["list", "chain", "arp", "chaos", "in"],
            false,
        )
    }

    /// Polls `f` every 10 ms until it holds; returns how long it took.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        f: impl Fn(&ChaosLab) -> bool,
    ) -> Duration {
        let start = Instant::now();
        loop {
            if f(self) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}; lb1 {:?}, lb2 {:?}, VIP on {:?}",
                self.state("lb1"),
                self.state("lb2"),
                self.vip_holders()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// One request through the VIP from the client: the backend's name.
    pub fn request(&self) -> Result<String, String> {
        self.client
            .run(|| one_request(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?
    }

    /// Live traffic from the client: a new request every `every` and
    /// `long_lived` connections echoing a line every 50 ms.
    pub fn traffic(&self, every: Duration, long_lived: usize) -> Traffic {
        Traffic::start(&self.client, every, long_lived)
    }

    /// A keepalived on the cluster link in a namespace of its own, speaking
    /// VRRP for this cluster's VRID at priority 254 from an address that is
    /// not a cluster node — a neighbouring pair configured with the same
    /// VRID, or a spoofer. `version` 2 or 3; `unicast_to` a node address.
    pub fn start_foreign_speaker(&self, version: u8, unicast_to: Option<&str>) -> LabChild {
        let ns = self.lab.netns("spoof").expect("spoofer netns");
        self.lab
            .attach(&ns, "eth0", &self.link, &[&format!("{SPOOFER}/24")])
            .expect("spoofer eth0");
        let dir = self.tmp.path().join("spoof");
        fs::create_dir_all(&dir).expect("spoofer dir");
        let interval = if version == 2 {
            1.0
        } else {
            f64::from(self.opts.advert_interval_ms) / 1000.0
        };
        let unicast = unicast_to
            .map(|to| format!("  unicast_src_ip {SPOOFER}\n  unicast_peer {{\n    {to}\n  }}\n"))
            .unwrap_or_default();
        let conf = format!(
            "global_defs {{\n  router_id spoofer\n  vrrp_version {version}\n}}\n\
             vrrp_instance SPOOF {{\n  state MASTER\n  interface eth0\n  virtual_router_id {vrid}\n  priority 254\n  \
             advert_int {interval}\n{unicast}  virtual_ipaddress {{\n    192.168.100.200/24 dev eth0\n  }}\n}}\n",
            vrid = self.opts.vrid
        );
        fs::write(dir.join("keepalived.conf"), conf).expect("spoofer conf");
        let log = fs::File::create(dir.join("keepalived.log")).expect("spoofer log");
        let mut cmd = Command::new("keepalived");
        cmd.args(["--dont-fork", "--log-console", "--vrrp", "--use-file"])
            .arg(dir.join("keepalived.conf"))
            .arg("--pid")
            .arg(dir.join("keepalived.pid"))
            .arg("--vrrp_pid")
            .arg(dir.join("keepalived-vrrp.pid"))
            .stdout(Stdio::from(log.try_clone().expect("log fd")))
            .stderr(Stdio::from(log));
        self.lab.spawn(&ns, &mut cmd).expect("spawn keepalived")
    }
}

/// The first `packets N` of what `nft <args>` lists in `ns` (a counter, or
/// a chain holding one rule with a counter); 0 when it lists none, and
/// also when the object does not exist if `may_be_absent`.
pub fn nft_packets(ns: &Netns, args: &[&str], may_be_absent: bool) -> u64 {
    let text = match ns.exec("nft", args) {
        Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned(),
        Err(_) if may_be_absent => return 0,
        Err(e) => panic!("nft {args:?}: {e}"),
    };
    let mut w = text.split_whitespace();
    w.find(|x| *x == "packets")
        .and_then(|_| w.next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn mac_of(ns: &Netns, ifname: &str) -> String {
    let out = ns
        .ip(&["-o", "link", "show", "dev", ifname])
        .expect("ip link");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut w = text.split_whitespace();
    w.find(|x| *x == "link/ether")
        .and_then(|_| w.next())
        .expect("MAC")
        .to_owned()
}

/// When a log line containing `needle` was written (the first such line),
/// in seconds since the Unix epoch, from its `2026-12-07T02:26:10.058639Z`
/// timestamp.
pub fn logged_at(log: &str, needle: &str) -> Option<f64> {
    let line = log.lines().find(|l| l.contains(needle))?;
    let ts = line.split_whitespace().next()?;
    let (date, time) = ts.trim_end_matches('Z').split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (hh, mm, ss): (f64, f64, f64) = (
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
    );
    // Days since the epoch (civil calendar, Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + hh * 3600.0 + mm * 60.0 + ss)
}

/// Now, in seconds since the Unix epoch.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One request: connect to VIP:80, read the greeting (the backend's name),
/// send a line, read its echo.
pub fn one_request(timeout: Duration) -> Result<String, String> {
    let dst: SocketAddr = format!("{VIP}:80").parse().map_err(|e| format!("{e}"))?;
    let s = TcpStream::connect_timeout(&dst, timeout).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
    let mut name = String::new();
    r.read_line(&mut name)
        .map_err(|e| format!("greeting: {e}"))?;
    if name.is_empty() {
        return Err("greeting: connection closed".into());
    }
    (&s).write_all(b"ping\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut echo = String::new();
    r.read_line(&mut echo).map_err(|e| format!("echo: {e}"))?;
    if echo.trim() != "ping" {
        return Err(format!("echo: got {echo:?}"));
    }
    Ok(name.trim().to_owned())
}

/// One request as the traffic generator saw it.
#[derive(Debug, Clone)]
pub struct Request {
    /// Since the traffic started.
    pub started: Duration,
    pub finished: Duration,
    pub result: Result<String, String>,
}

/// A long-lived connection that broke.
#[derive(Debug, Clone)]
pub struct Broken {
    pub index: usize,
    pub at: Duration,
    pub why: String,
}

pub struct Traffic {
    pub start: Instant,
    stop: Arc<AtomicBool>,
    requests: Arc<Mutex<Vec<Request>>>,
    broken: Arc<Mutex<Vec<Broken>>>,
    opened: Arc<AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<Result<(), tandem_lab::LabError>>>,
}

#[derive(Debug, Clone)]
pub struct TrafficReport {
    pub requests: Vec<Request>,
    pub long_lived: usize,
    pub broken: Vec<Broken>,
}

impl Traffic {
    fn start(client: &Netns, every: Duration, long_lived: usize) -> Traffic {
        let start = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let broken = Arc::new(Mutex::new(Vec::new()));
        let opened = Arc::new(AtomicUsize::new(0));
        let mut threads = Vec::new();
        for index in 0..long_lived {
            let (stop, broken, opened) = (stop.clone(), broken.clone(), opened.clone());
            threads.push(
                client
                    .spawn_thread(move || {
                        long_lived_connection(index, start, &stop, &broken, &opened)
                    })
                    .expect("long-lived thread"),
            );
        }
        // Wait for the long-lived connections to be open before the fault.
        let deadline = Instant::now() + Duration::from_secs(10);
        while opened.load(Ordering::SeqCst) + broken.lock().map_or(0, |b| b.len()) < long_lived
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        let (stop2, requests2) = (stop.clone(), requests.clone());
        threads.push(
            client
                .spawn_thread(move || {
                    // A new request every `every`, each on a thread of its
                    // own (inheriting the namespace), so a stuck request
                    // does not delay the next one.
                    let mut next = Instant::now();
                    let mut inflight = Vec::new();
                    while !stop2.load(Ordering::SeqCst) {
                        let requests = requests2.clone();
                        inflight.push(std::thread::spawn(move || {
                            let started = start.elapsed();
                            let result = one_request(Duration::from_secs(3));
                            let finished = start.elapsed();
                            if let Ok(mut r) = requests.lock() {
                                r.push(Request {
                                    started,
                                    finished,
                                    result,
                                });
                            }
                        }));
                        inflight.retain(|h: &std::thread::JoinHandle<()>| !h.is_finished());
                        next += every;
                        let now = Instant::now();
                        if next > now {
                            std::thread::sleep(next - now);
                        } else {
                            next = now;
                        }
                    }
                    for h in inflight {
                        let _ = h.join();
                    }
                })
                .expect("request thread"),
        );
        Traffic {
            start,
            stop,
            requests,
            broken,
            opened,
            threads,
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Requests finished so far.
    pub fn snapshot(&self) -> Vec<Request> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }

    pub fn finish(self) -> TrafficReport {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            let _ = t.join();
        }
        let mut requests = self.requests.lock().map(|r| r.clone()).unwrap_or_default();
        requests.sort_by_key(|r| r.started);
        TrafficReport {
            requests,
            long_lived: self.opened.load(Ordering::SeqCst),
            broken: self.broken.lock().map(|b| b.clone()).unwrap_or_default(),
        }
    }
}

fn long_lived_connection(
    index: usize,
    start: Instant,
    stop: &AtomicBool,
    broken: &Mutex<Vec<Broken>>,
    opened: &AtomicUsize,
) {
    let fail = |why: String| {
        if let Ok(mut b) = broken.lock() {
            b.push(Broken {
                index,
                at: start.elapsed(),
                why,
            });
        }
    };
    let dst: SocketAddr = match format!("{VIP}:80").parse() {
        Ok(d) => d,
        Err(e) => return fail(format!("{e}")),
    };
    let s = match TcpStream::connect_timeout(&dst, Duration::from_secs(3)) {
        Ok(s) => s,
        Err(e) => return fail(format!("connect: {e}")),
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let _ = s.set_nodelay(true);
    let Ok(clone) = s.try_clone() else {
        return fail("clone".into());
    };
    let mut r = BufReader::new(clone);
    let mut line = String::new();
    if r.read_line(&mut line).is_err() || line.is_empty() {
        return fail("greeting".into());
    }
    opened.fetch_add(1, Ordering::SeqCst);
    let mut i = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let msg = format!("c{index} {i}\n");
        if let Err(e) = (&s).write_all(msg.as_bytes()) {
            return fail(format!("write: {e}"));
        }
        line.clear();
        match r.read_line(&mut line) {
            Ok(_) if line == msg => {}
            Ok(_) => return fail(format!("echo {line:?} for {msg:?}")),
            Err(e) => return fail(format!("echo: {e}")),
        }
        i += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl TrafficReport {
    pub fn failed(&self) -> Vec<&Request> {
        self.requests.iter().filter(|r| r.result.is_err()).collect()
    }

    /// The longest time without a successful request completing, among
    /// completions in `[from, to]` (client-visible gap).
    pub fn max_gap(&self, from: Duration, to: Duration) -> Duration {
        let mut done: Vec<Duration> = self
            .requests
            .iter()
            .filter(|r| r.result.is_ok() && r.finished >= from && r.finished <= to)
            .map(|r| r.finished)
            .collect();
        done.sort();
        done.windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or(to.saturating_sub(from))
    }

    /// One line for assertion messages.
    pub fn summary(&self) -> String {
        let failed = self.failed();
        format!(
            "{} requests, {} failed{}; {} long-lived, {} broken{}",
            self.requests.len(),
            failed.len(),
            failed
                .first()
                .map(|r| format!(" (first at {:?}: {:?})", r.started, r.result))
                .unwrap_or_default(),
            self.long_lived,
            self.broken.len(),
            self.broken
                .first()
                .map(|b| format!(" (first at {:?}: {})", b.at, b.why))
                .unwrap_or_default()
        )
    }
}
