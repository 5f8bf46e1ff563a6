//! An active-active cluster formed and changed with `tandemctl`: four
//! standalone Tandem nodes (every daemon, its own real OpenSSH sshd), a
//! router running BIRD with kernel ECMP, three DSR backends and a client.
//!
//! ```text
//!   client 10.9.0.2 ── 10.9.0.1 router 10.2.0.1 ──[up]── lb1..lb4 10.2.0.11-14 (eth0, sshd :22)
//!                               10.1.0.1 ──[back]── lb1..lb4 10.1.0.21-24 (eth1)
//!                                                   b1..b3   10.1.0.11-13 (VIP on lo)
//! ```
//!
//! The router peers with all four addresses from the start; a node's
//! session comes up once the node is in the cluster and its BIRD runs.
//!
//! **One filesystem, four nodes.** Every node's processes (its daemons and
//! its sshd, so also whatever the leader runs there over SSH) run in a
//! private mount namespace where the node's own directory is bind-mounted
//! on one common path, [`ClusterLab::common`]: each node sees its
//! configuration at `<common>/etc`, its sockets at `<common>/run`, its sshd
//! files at `<common>/sshd`, as every real node sees /etc/tandem and
//! /run/tandem. The test reads each node's files at their real place
//! (`<tmp>/lbN`). The root password works as in the pair's lab: each sshd
//! reads a lab-written shadow file bind-mounted over /etc/shadow in its
//! private mount namespace.
//!
//! **BIRD.** clustermanager runs a start command on each node once it is
//! in the cluster (`systemctl start tandem.target` in production, where
//! BIRD's unit starts once routed has written its configuration). Here it
//! is [`START_COMMAND`]: BIRD started in the background with a pid file,
//! the file routed wrote. The lab stops those BIRDs by their pid files.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tandem_lab::{Lab, LabChild, Netns};
use tandem_proto::v1;

pub use crate::scaleout_lab::{CLIENT, CLUSTER_AS, ROUTER_AS, VIP, request};

pub const ROOT_PASSWORD: &str = "lab-root-password";
/// The cluster's shared hash seed (given to `cluster create`).
pub const SEED: u32 = 0x5eed_0001;
/// The daemons of a node, in start order (every node runs them all, as
/// tandem.target starts them; each idles where the mode is not its own).
pub const NODE_DAEMONS: [&str; 6] = [
    "lb-forwarder",
    "vrrpd",
    "conntrack-syncd",
    "routed",
    "cfg-syncd",
    "clustermanager",
];

/// The farm the leader serves before the cluster exists.
fn farm_toml() -> String {
    let mut f = format!(
        "name = \"web\"\nvip = \"{VIP}\"\nport = 80\nforwarding = \"dsr\"\nscheduler = \"rr\"\n\n\
         [health_check]\ninterval_ms = 300\ntimeout_ms = 200\nrise = 1\nfall = 2\n"
    );
    for i in 1..=3 {
        f.push_str(&format!("\n[[backends]]\naddress = \"10.1.0.1{i}\"\n"));
    }
    f
}

/// A joining node's own farm before it joins (erased when it joins).
pub const OLD: &str = "name = \"old\"\nvip = \"10.0.0.200\"\nport = 8000\nforwarding = \"dsr\"\n\
[health_check]\nkind = \"none\"\n[[backends]]\naddress = \"10.1.0.11\"\n";

/// Counts, on each node, the flows it carried.
const PROBE: &str = "table ip probe {\n\
  set flows { type ipv4_addr . inet_service; flags dynamic; size 65535; }\n\
  chain pre {\n    type filter hook prerouting priority -350; policy accept;\n\
    ip daddr 10.0.0.100 tcp dport 80 add @flows { ip saddr . tcp sport }\n  }\n}\n";

pub struct Node {
    pub name: String,
    pub ns: Netns,
    /// The node's directory, at its real place (the common path inside
    /// the node's mount namespace).
    pub dir: PathBuf,
    pub addr: String,
    pub daemons: Vec<(&'static str, LabChild)>,
    pub sshd: Option<LabChild>,
}

impl Node {
    pub fn config(&self) -> PathBuf {
        self.dir.join("etc")
    }

    pub fn runtime(&self) -> PathBuf {
        self.dir.join("run")
    }

    pub fn read(&self, rel: &str) -> Option<String> {
        fs::read_to_string(self.config().join(rel)).ok()
    }

    pub fn write(&self, rel: &str, text: &str) {
        crate::write_file(&self.config().join(rel), text);
    }

    pub fn log(&self, what: &str) -> String {
        fs::read_to_string(self.dir.join(format!("{what}.log"))).unwrap_or_default()
    }

    /// The last lines of every daemon's log, for assertion messages.
    pub fn logs(&self) -> String {
        NODE_DAEMONS
            .iter()
            .chain(["bird"].iter())
            .map(|d| {
                let log = self.log(d);
                let tail: Vec<&str> = log.lines().rev().take(12).collect();
                format!(
                    "--- {} {d} (last lines, newest first)\n{}\n",
                    self.name,
                    tail.join("\n")
                )
            })
            .collect()
    }
}

pub struct ClusterLab {
    pub lab: Lab,
    pub router: Netns,
    pub client: Netns,
    pub nodes: Vec<Node>,
    pub backends: Vec<Netns>,
    router_bird: Option<LabChild>,
    /// Where every node sees its own directory.
    pub common: PathBuf,
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
}

/// A shadow file with root's entry only, its password `password`.
fn shadow(password: &str) -> String {
    use std::io::Write;
    let mut c = Command::new("openssl")
        .args(["passwd", "-6", "-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("openssl");
    c.stdin
        .take()
        .expect("stdin")
        .write_all(password.as_bytes())
        .expect("write");
    let out = c.wait_with_output().expect("openssl passwd");
    assert!(out.status.success(), "openssl passwd failed");
    let hash = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    format!("root:{hash}:20000:0:99999:7:::\n")
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn log_file(dir: &Path, what: &str) -> Stdio {
    let f = fs::File::options()
        .create(true)
        .append(true)
        .open(dir.join(format!("{what}.log")))
        .expect("log file");
    Stdio::from(f)
}

fn nft(ns: &Netns, script: &str) {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    fs::write(file.path(), script).expect("write nft script");
    let out = ns
        .exec("nft", &["-f", &file.path().display().to_string()])
        .expect("nft");
    assert!(
        out.status.success(),
        "nft: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn router_bird_conf(nodes: usize) -> String {
    let mut c = format!(
        "router id 10.2.0.1;\nlog stderr all;\n\
         protocol device {{ scan time 10; }}\n\
         protocol kernel {{ ipv4 {{ import none; export all; }}; merge paths on; }}\n\
         protocol bfd {{ interface \"*\" {{ min rx interval 100 ms; min tx interval 100 ms; multiplier 3; }}; }}\n\
         template bgp node {{ local as {ROUTER_AS}; hold time 9; keepalive time 3; \
         connect delay time 1; connect retry time 2; error wait time 1, 5; bfd on; \
         ipv4 {{ import all; export none; }}; }}\n"
    );
    for i in 1..=nodes {
        c.push_str(&format!(
            "protocol bgp lb{i} from node {{ neighbor 10.2.0.1{i} as {CLUSTER_AS}; }}\n"
        ));
    }
    c
}

impl ClusterLab {
    /// Four standalone nodes, every daemon and sshd running; lb1 serves
    /// the DSR farm `web`, lb2-lb4 have a farm of their own.
    pub fn new() -> ClusterLab {
        const NODES: usize = 4;
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
        // As in the phase-1 lab: a retransmission keeps its path.
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
        let common = dir.join("node");
        fs::create_dir_all(&common).expect("common dir");
        let router_dir = dir.join("router");
        crate::write_file(&router_dir.join("bird.conf"), &router_bird_conf(NODES));
        fs::create_dir_all("/run/sshd").expect("/run/sshd (sshd's privilege separation dir)");
        let shadow_text = shadow(ROOT_PASSWORD);

        let mut nodes = Vec::new();
        for i in 1..=NODES {
            let name = format!("lb{i}");
            let ns = lab.netns(&name).expect("node");
            let addr = format!("10.2.0.1{i}");
            lab.attach(&ns, "eth0", &up, &[&format!("{addr}/24")])
                .expect("node eth0");
            lab.attach(&ns, "eth1", &back, &[&format!("10.1.0.2{i}/24")])
                .expect("node eth1");
            ns.sysctl("net.ipv4.ip_forward", "1").expect("forwarding");
            nft(&ns, PROBE);
            let node = Node {
                name: name.clone(),
                ns,
                dir: dir.join(&name),
                addr,
                daemons: Vec::new(),
                sshd: None,
            };
            fs::create_dir_all(node.runtime()).expect("runtime dir");
            node.write(
                "node.toml",
                &format!("# {name}, standalone\nname = \"{name}\"\n"),
            );
            if i == 1 {
                node.write("farms/web.toml", &farm_toml());
            } else {
                node.write("farms/old.toml", OLD);
            }
            // sshd: its host key and the shadow, as the node sees them at
            // the common path; root's keys from Tandem's file only.
            let sshd_dir = node.dir.join("sshd");
            crate::keygen(&sshd_dir.join("host_ed25519"), &format!("{name}-host"));
            fs::write(sshd_dir.join("shadow"), &shadow_text).expect("shadow");
            fs::set_permissions(sshd_dir.join("shadow"), fs::Permissions::from_mode(0o600))
                .expect("chmod shadow");
            crate::write_file(
                &sshd_dir.join("sshd_config"),
                &crate::sshd_config(
                    &node.addr,
                    22,
                    &common.join("sshd"),
                    &common.join("etc/ssh/authorized_keys"),
                    crate::RootLogin::Password,
                ),
            );
            nodes.push(node);
        }
        let mut l = ClusterLab {
            lab,
            router,
            client,
            nodes,
            backends,
            router_bird: None,
            common,
            dir,
            _tmp: tmp,
        };
        let mut cmd = Command::new("bird");
        cmd.arg("-f")
            .arg("-c")
            .arg(router_dir.join("bird.conf"))
            .arg("-s")
            .arg(router_dir.join("bird.ctl"))
            .stdin(Stdio::null())
            .stdout(log_file(&router_dir, "bird"))
            .stderr(log_file(&router_dir, "bird"));
        l.router_bird = Some(
            l.lab
                .spawn(&l.router, &mut cmd)
                .expect("spawn bird (apt-get install bird2)"),
        );
        for i in 0..NODES {
            l.start_sshd(i);
            for d in NODE_DAEMONS {
                l.start_daemon(i, d);
            }
        }
        l
    }

    /// `program args` run as node `i`: in its netns and in a private mount
    /// namespace where its directory is the common path (and, for sshd,
    /// the lab's shadow file is /etc/shadow).
    fn as_node(&self, i: usize, program: &Path, args: &[String], shadow: bool) -> Command {
        let n = &self.nodes[i];
        let mut script = format!(
            "mount --bind {} {} && ",
            quote(&n.dir.display().to_string()),
            quote(&self.common.display().to_string())
        );
        if shadow {
            script.push_str(&format!(
                "mount --bind {} /etc/shadow && ",
                quote(&self.common.join("sshd/shadow").display().to_string())
            ));
        }
        script.push_str("exec ");
        script.push_str(&quote(&program.display().to_string()));
        for a in args {
            script.push(' ');
            script.push_str(&quote(a));
        }
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(script);
        cmd
    }

    pub fn start_sshd(&mut self, i: usize) {
        let conf = self.common.join("sshd/sshd_config").display().to_string();
        let mut cmd = self.as_node(
            i,
            Path::new("/usr/sbin/sshd"),
            &["-D".into(), "-e".into(), "-f".into(), conf],
            true,
        );
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(&self.nodes[i].dir, "sshd"));
        let child = self
            .lab
            .spawn(&self.nodes[i].ns, &mut cmd)
            .expect("spawn sshd");
        let addr = format!("{}:22", self.nodes[i].addr).parse().expect("addr");
        self.router
            .wait_tcp(addr, Duration::from_secs(10))
            .expect("sshd listening");
        self.nodes[i].sshd = Some(child);
    }

    fn start_daemon(&mut self, i: usize, daemon: &'static str) {
        let c = |p: &str| self.common.join(p).display().to_string();
        let mut args = vec![
            "--config-dir".to_owned(),
            c("etc"),
            "--runtime-dir".into(),
            c("run"),
            "--state-dir".into(),
            c("state"),
        ];
        if daemon == "cfg-syncd" || daemon == "clustermanager" {
            args.extend([
                "--peer-config-dir".into(),
                c("etc"),
                "--peer-runtime-dir".into(),
                c("run"),
            ]);
        }
        if daemon == "routed" {
            args.extend(["--forwarder-grace-ms".into(), "1000".into()]);
        }
        if daemon == "clustermanager" {
            let bin_dir = crate::bin("clustermanager")
                .parent()
                .expect("bin dir")
                .display()
                .to_string();
            args.extend([
                "--peer-bin-dir".into(),
                bin_dir,
                "--sshd-config".into(),
                c("sshd/sshd_config"),
                "--peer-sshd-config".into(),
                c("sshd/sshd_config"),
                "--host-key-pub".into(),
                c("sshd/host_ed25519.pub"),
                "--start-command".into(),
                self.start_command(),
                "--peer-start-command".into(),
                self.start_command(),
            ]);
        }
        let n = &self.nodes[i];
        let mut cmd = self.as_node(i, &crate::bin(daemon), &args, false);
        cmd.env("RUST_LOG", "info")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(log_file(&n.dir, daemon))
            .stderr(log_file(&n.dir, daemon));
        let child = self
            .lab
            .spawn(&n.ns, &mut cmd)
            .unwrap_or_else(|e| panic!("spawn {daemon}: {e}"));
        let sock = n.runtime().join(format!("{daemon}.sock"));
        if let Err(e) = tandem_lab::wait_for_unix_socket(&sock, Duration::from_secs(15)) {
            panic!("{} {daemon} not serving: {e}\n{}", n.name, n.log(daemon));
        }
        self.nodes[i].daemons.push((daemon, child));
    }

    /// What clustermanager runs on a node once it is in the cluster: BIRD
    /// on the file routed wrote, in the background, with a pid file (the
    /// lab's stand-in for `systemctl start tandem.target`).
    pub fn start_command(&self) -> String {
        let c = |p: &str| quote(&self.common.join(p).display().to_string());
        format!(
            "test -f {conf} && (setsid bird -f -c {conf} -s {ctl} -P {pid} </dev/null >>{log} 2>&1 &)",
            conf = c("run/bird.conf"),
            ctl = c("run/bird.ctl"),
            pid = c("run/bird.pid"),
            log = c("bird.log"),
        )
    }

    pub fn index(&self, name: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    pub fn host_key_fingerprint(&self, i: usize) -> String {
        crate::cluster_lab::fingerprint_of(&self.nodes[i].dir.join("sshd/host_ed25519.pub"))
    }

    /// `tandemctl ARGS` on node `i` (without a terminal), `stdin` fed;
    /// killed after 180 s (exit status 124).
    pub fn tandemctl(&self, i: usize, args: &[&str], stdin: &str) -> Output {
        use std::io::Write;
        let n = &self.nodes[i];
        // Never hangs the test: a stuck call is killed, and the test says so.
        let mut child = Command::new("setsid")
            .arg("--wait")
            .args(["timeout", "180"])
            .arg(crate::bin("tandemctl"))
            .arg("--runtime-dir")
            .arg(n.runtime())
            .arg("--config-dir")
            .arg(n.config())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tandemctl");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("write stdin");
        child.wait_with_output().expect("tandemctl")
    }

    /// `tandemctl cluster nodes --json` on node `i`: name → (status, message).
    pub fn node_table(&self, i: usize) -> BTreeMap<String, (String, String)> {
        let out = self.tandemctl(i, &["cluster", "nodes", "--json"], "");
        assert!(
            out.status.success(),
            "cluster nodes: {}",
            crate::cluster_lab::text(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        v.as_array()
            .expect("rows")
            .iter()
            .map(|r| {
                (
                    r["node"].as_str().unwrap_or_default().to_owned(),
                    (
                        r["status"].as_str().unwrap_or_default().to_owned(),
                        r["message"].as_str().unwrap_or_default().to_owned(),
                    ),
                )
            })
            .collect()
    }

    /// Waits until node `i`'s table has exactly these rows with these
    /// colours.
    pub fn wait_table(&self, i: usize, want: &[(&str, &str)], timeout: Duration) {
        let want: BTreeMap<String, String> = want
            .iter()
            .map(|(n, c)| ((*n).to_owned(), (*c).to_owned()))
            .collect();
        let start = Instant::now();
        loop {
            let t = self.node_table(i);
            let colours: BTreeMap<String, String> =
                t.iter().map(|(n, (c, _))| (n.clone(), c.clone())).collect();
            if colours == want {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "{}'s node table {t:#?}, wanted {want:?} within {timeout:?}\n{}",
                self.nodes[i].name,
                self.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The next hops of the router's route to the VIP.
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

    /// Waits until the router's next hops for the VIP are these nodes'.
    pub fn wait_next_hops(&self, names: &[&str], timeout: Duration) {
        let want: BTreeSet<String> = names
            .iter()
            .map(|n| self.nodes[self.index(n)].addr.clone())
            .collect();
        let start = Instant::now();
        let mut steady_since: Option<Instant> = None;
        loop {
            let now = self.next_hops();
            if now == want {
                // The router rewrites a multipath route by deleting and
                // adding it: an answer seen once may be half of that.
                if steady_since.is_none() {
                    steady_since = Some(Instant::now());
                }
                if steady_since.is_some_and(|t| t.elapsed() >= Duration::from_millis(300)) {
                    return;
                }
            } else {
                steady_since = None;
            }
            assert!(
                start.elapsed() < timeout,
                "router's next hops for {VIP}: {now:?}, wanted {want:?} within {timeout:?}\n{}",
                self.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The flows (client ports) node `i` has carried since the last flush.
    pub fn flows_seen(&self, i: usize) -> usize {
        let out = self.nodes[i]
            .ns
            .exec("nft", &["-j", "list", "set", "ip", "probe", "flows"])
            .expect("nft list set");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nft json");
        v["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|item| item["set"]["elem"].as_array().map_or(0, Vec::len))
            .sum()
    }

    /// `n` requests in a row from the client through the VIP: the flows
    /// each node carried, and the failures.
    pub fn traffic(&self, n: usize) -> (BTreeMap<String, usize>, Vec<String>) {
        for node in &self.nodes {
            nft(&node.ns, "flush set ip probe flows\n");
        }
        let errors = self
            .client
            .run(move || {
                (0..n)
                    .filter_map(|_| request(Duration::from_secs(3)).err())
                    .collect::<Vec<_>>()
            })
            .expect("client ns");
        let per_node = (0..self.nodes.len())
            .map(|i| (self.nodes[i].name.clone(), self.flows_seen(i)))
            .collect();
        (per_node, errors)
    }

    pub fn routed_status(&self, i: usize) -> v1::RoutedStatus {
        crate::rpc(&self.nodes[i].runtime(), "routed", async |ch| {
            v1::routed_client::RoutedClient::new(ch)
                .status(v1::StatusRequest {})
                .await
                .expect("routed status")
                .into_inner()
        })
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
            s.push_str(&n.logs());
        }
        s
    }

    /// Whether node `i` has a BIRD running (the one its start command
    /// started, by its pid file).
    pub fn bird_running(&self, i: usize) -> bool {
        bird_pid(&self.nodes[i]).is_some()
    }
}

/// The pid of node `n`'s BIRD, if its pid file names a live BIRD.
fn bird_pid(n: &Node) -> Option<i32> {
    let pid: i32 = fs::read_to_string(n.runtime().join("bird.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmdline = String::from_utf8_lossy(&cmdline);
    (cmdline.contains("bird") && !cmdline.contains("birdc")).then_some(pid)
}

impl Drop for ClusterLab {
    fn drop(&mut self) {
        // The BIRDs the start commands started (not the lab's children).
        for n in &self.nodes {
            if let Some(pid) = bird_pid(n) {
                let pid = nix::unistd::Pid::from_raw(pid);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
                let deadline = Instant::now() + Duration::from_secs(3);
                while bird_pid(n).is_some() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                if bird_pid(n).is_some() {
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                }
            }
        }
    }
}

impl Default for ClusterLab {
    fn default() -> Self {
        ClusterLab::new()
    }
}

impl ClusterLab {
    /// Waits until node `i`'s file `rel` holds `want`.
    pub fn wait_file(&self, i: usize, rel: &str, want: &str, timeout: Duration) {
        let n = &self.nodes[i];
        self.wait_until(
            timeout,
            &format!("{}'s {rel} equal to the leader's", n.name),
            || n.read(rel).as_deref() == Some(want),
        );
    }

    /// Polls `cond` every 100 ms until it holds; panics with `what` and the
    /// diagnostics after `timeout`.
    pub fn wait_until(&self, timeout: Duration, what: &str, cond: impl Fn() -> bool) {
        let start = Instant::now();
        while !cond() {
            assert!(
                start.elapsed() < timeout,
                "not within {timeout:?}: {what}\n{}",
                self.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
