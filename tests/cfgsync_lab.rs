//! A two-node cfg-syncd lab: `lb1` (master, pushes) and `lb2` (backup,
//! receives) in their own network namespaces joined by a veth; a real
//! OpenSSH sshd listens in lb2's namespace on the cluster address; each node
//! runs the real cfg-syncd binary on its own config and runtime dirs.
//! Both nodes share this machine's filesystem, so the master is told the
//! backup's directories with `--peer-config-dir` / `--peer-runtime-dir`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tandem_lab::{Lab, LabChild, Netns};
use tandem_proto::v1::{
    self, cfg_sync_client::CfgSyncClient, lb_forwarder_client::LbForwarderClient,
};

pub const SSH_PORT: u16 = 2222;
pub const MASTER_ADDR: &str = "10.0.0.1";
pub const BACKUP_ADDR: &str = "10.0.0.2";

/// A valid farm file; `port` keeps farms from colliding.
pub fn farm(name: &str, port: u16) -> String {
    format!(
        "name = \"{name}\"\nvip = \"10.0.0.100\"\nport = {port}\nprotocol = \"tcp\"\n\
         snat_address = \"10.1.0.100\"\n\n[[backends]]\naddress = \"10.1.0.11\"\n\n\
         [[backends]]\naddress = \"10.1.0.12\"\n"
    )
}

pub struct SyncNode {
    pub name: String,
    pub ns: Netns,
    pub config: PathBuf,
    pub runtime: PathBuf,
    pub daemon: Option<LabChild>,
    /// Extra environment of this node's cfg-syncd (the fault switches of
    /// the tests' controls, debug builds only).
    pub env: Vec<(String, String)>,
    /// lb-forwarder on this node, when a test runs it: a real daemon whose
    /// configuration must follow every applied batch.
    pub forwarder: Option<LabChild>,
    /// A command cfg-syncd is started through (which execs it: same pid),
    /// e.g. `setpriv --bounding-set -fsetid --`.
    pub wrapper: Vec<String>,
    log: PathBuf,
}

impl SyncNode {
    pub fn path(&self, rel: &str) -> PathBuf {
        self.config.join(rel)
    }

    /// Writes a file in this node's config dir (parents created).
    pub fn write(&self, rel: &str, text: &str) {
        let p = self.path(rel);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(&p, text).expect("write");
    }

    pub fn read(&self, rel: &str) -> Option<String> {
        fs::read_to_string(self.path(rel)).ok()
    }

    /// The daemon's log so far (for assertion messages).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// This node's `--state-dir`.
    pub fn state_dir(&self) -> PathBuf {
        crate::state_dir_beside(&self.runtime)
    }

    /// The pid of this node's cfg-syncd.
    pub fn pid(&self) -> Option<i32> {
        self.daemon.as_ref().map(|d| d.pid().as_raw())
    }
}

pub struct CfgSyncLab {
    pub lab: Lab,
    pub master: SyncNode,
    pub backup: SyncNode,
    pub sshd: Option<LabChild>,
    pub ssh_dir: PathBuf,
    _tmp: tempfile::TempDir,
}

/// `[host]:port type base64` for a public key line `type base64 comment`.
pub fn known_hosts_line(pubkey: &str) -> String {
    let mut f = pubkey.split_whitespace();
    let (alg, b64) = (f.next().expect("type"), f.next().expect("key"));
    format!("[{BACKUP_ADDR}]:{SSH_PORT} {alg} {b64}\n")
}

impl CfgSyncLab {
    /// The namespaces, keys, configs and the backup's sshd; no cfg-syncd yet.
    pub fn with_sshd() -> CfgSyncLab {
        CfgSyncLab::with_sshd_in(&std::env::temp_dir())
    }

    /// As [`CfgSyncLab::with_sshd`], with both nodes' directories under
    /// `parent` (e.g. a tmpfs for a test moving gigabytes).
    pub fn with_sshd_in(parent: &Path) -> CfgSyncLab {
        let lab = Lab::new().expect("lab");
        let tmp = tempfile::tempdir_in(parent).expect("tempdir");
        let m_ns = lab.netns("lb1").expect("netns lb1");
        let b_ns = lab.netns("lb2").expect("netns lb2");
        lab.link(
            &m_ns,
            "eth0",
            &[&format!("{MASTER_ADDR}/24")],
            &b_ns,
            "eth0",
            &[&format!("{BACKUP_ADDR}/24")],
        )
        .expect("veth lb1-lb2");
        let node = |name: &str, ns: Netns, addr: &str| {
            let root = tmp.path().join(name);
            let n = SyncNode {
                name: name.into(),
                ns,
                config: root.join("etc"),
                runtime: root.join("run"),
                daemon: None,
                env: Vec::new(),
                forwarder: None,
                wrapper: Vec::new(),
                log: root.join("cfg-syncd.log"),
            };
            n.write(
                "node.toml",
                &format!("name = \"{name}\"\ncluster_interface = \"eth0\"\ncluster_address = \"{addr}\"\n"),
            );
            n.write(
                "cluster.toml",
                &format!(
                    "virtual_router_id = 51\n\n[[nodes]]\nname = \"lb1\"\naddress = \"{MASTER_ADDR}\"\n\n\
                     [[nodes]]\nname = \"lb2\"\naddress = \"{BACKUP_ADDR}\"\n\n\
                     [[floating_ips]]\naddress = \"10.0.0.100/24\"\ninterface = \"eth0\"\n\n\
                     [[floating_ips]]\naddress = \"10.1.0.100/24\"\ninterface = \"eth1\"\n\n\
                     [sync]\nssh_port = {SSH_PORT}\n"
                ),
            );
            n
        };
        let master = node("lb1", m_ns, MASTER_ADDR);
        let backup = node("lb2", b_ns, BACKUP_ADDR);

        // Keys: the master's identity (authorized on the backup's sshd) and
        // the backup's host key (pinned in the master's ssh/known_hosts).
        let ssh_dir = tmp.path().join("sshd");
        fs::create_dir_all(&ssh_dir).expect("sshd dir");
        fs::create_dir_all(master.path("ssh")).expect("ssh dir");
        let client_pub = crate::keygen(&master.path("ssh/id_ed25519"), "lb1-cfgsync");
        let host_pub = crate::keygen(&ssh_dir.join("host_ed25519"), "lb2-host");
        fs::write(ssh_dir.join("authorized_keys"), &client_pub).expect("authorized_keys");
        master.write("ssh/known_hosts", &known_hosts_line(&host_pub));
        crate::write_file(
            &ssh_dir.join("sshd_config"),
            &crate::sshd_config(
                BACKUP_ADDR,
                SSH_PORT,
                &ssh_dir,
                &ssh_dir.join("authorized_keys"),
                crate::RootLogin::KeyOnly,
            ),
        );
        fs::create_dir_all("/run/sshd").expect("/run/sshd (sshd's privilege separation dir)");
        let mut lab = CfgSyncLab {
            lab,
            master,
            backup,
            sshd: None,
            ssh_dir,
            _tmp: tmp,
        };
        lab.start_sshd();
        lab
    }

    /// A lab with both cfg-syncd running (master push, backup receive).
    pub fn running() -> CfgSyncLab {
        let mut l = CfgSyncLab::with_sshd();
        l.start_backup();
        l.start_master();
        l
    }

    pub fn start_sshd(&mut self) {
        let mut cmd = Command::new("/usr/sbin/sshd");
        cmd.args(["-D", "-e", "-f"])
            .arg(self.ssh_dir.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.sshd = Some(
            self.lab
                .spawn(&self.backup.ns, &mut cmd)
                .expect("spawn sshd"),
        );
        let addr = format!("{BACKUP_ADDR}:{SSH_PORT}").parse().expect("addr");
        self.master
            .ns
            .wait_tcp(addr, Duration::from_secs(10))
            .expect("sshd listening");
    }

    /// Stops the backup's sshd and the per-connection sshd processes it
    /// forked (found by parent pid: they are ours), so existing sessions die
    /// too, as when the machine goes away.
    pub fn stop_sshd(&mut self) {
        let Some(mut sshd) = self.sshd.take() else {
            return;
        };
        // Freeze the listener so it forks no new session, then kill its
        // sessions until none is left (one may be forking a child while we
        // look), and the listener last: killed first, its sessions would be
        // reparented out of reach and keep the master's connection alive.
        let root = sshd.pid().as_raw();
        let _ = kill(Pid::from_raw(root), Signal::SIGSTOP);
        for _ in 0..50 {
            let children = descendants(root);
            if children.is_empty() {
                break;
            }
            for pid in children {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = sshd.kill(Signal::SIGKILL);
        let _ = sshd.wait_timeout(Duration::from_secs(5));
    }

    fn spawn_cfgsyncd(&self, node: &SyncNode, direction: &str) -> LabChild {
        let peer = if node.name == self.master.name {
            &self.backup
        } else {
            &self.master
        };
        fs::create_dir_all(&node.runtime).expect("runtime dir");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .expect("log file");
        let mut cmd = match node.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(crate::bin("cfg-syncd"));
                c
            }
            None => Command::new(crate::bin("cfg-syncd")),
        };
        cmd.arg("--config-dir")
            .arg(&node.config)
            .arg("--runtime-dir")
            .arg(&node.runtime)
            .arg("--state-dir")
            .arg(crate::state_dir_beside(&node.runtime))
            .arg("--direction")
            .arg(direction)
            .arg("--peer-config-dir")
            .arg(&peer.config)
            .arg("--peer-runtime-dir")
            .arg(&peer.runtime)
            .env("RUST_LOG", "info")
            .env_remove("JOURNAL_STREAM")
            .envs(node.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = self.lab.spawn(&node.ns, &mut cmd).expect("spawn cfg-syncd");
        tandem_lab::wait_for_unix_socket(
            &node.runtime.join("cfg-syncd.sock"),
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("{} cfg-syncd not serving: {e}\n{}", node.name, node.log()));
        child
    }

    pub fn start_master(&mut self) {
        let c = self.spawn_cfgsyncd(&self.master, "push");
        self.master.daemon = Some(c);
    }

    pub fn start_backup(&mut self) {
        let c = self.spawn_cfgsyncd(&self.backup, "receive");
        self.backup.daemon = Some(c);
    }

    /// SIGKILL, no chance to clean anything up.
    pub fn kill_master(&mut self) {
        if let Some(mut d) = self.master.daemon.take() {
            d.kill(Signal::SIGKILL).expect("SIGKILL cfg-syncd");
            let _ = d.wait_timeout(Duration::from_secs(5));
        }
    }

    /// SIGKILL of the backup's cfg-syncd.
    pub fn kill_backup(&mut self) {
        if let Some(mut d) = self.backup.daemon.take() {
            d.kill(Signal::SIGKILL).expect("SIGKILL cfg-syncd");
            let _ = d.wait_timeout(Duration::from_secs(5));
        }
    }

    /// Starts lb-forwarder on the backup (its namespace, its directories)
    /// and waits for its datapath: the daemon cfg-syncd reloads after each
    /// applied batch.
    pub fn start_backup_forwarder(&mut self) {
        let node = &self.backup;
        fs::create_dir_all(&node.runtime).expect("runtime dir");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.runtime.with_file_name("lb-forwarder.log"))
            .expect("log file");
        let mut cmd = Command::new(crate::bin("lb-forwarder"));
        cmd.arg("--config-dir")
            .arg(&node.config)
            .arg("--runtime-dir")
            .arg(&node.runtime)
            .arg("--state-dir")
            .arg(node.state_dir())
            .env("RUST_LOG", "info")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = self
            .lab
            .spawn(&node.ns, &mut cmd)
            .expect("spawn lb-forwarder");
        tandem_lab::wait_for_unix_socket(
            &node.runtime.join("lb-forwarder.sock"),
            Duration::from_secs(10),
        )
        .expect("lb-forwarder serving");
        self.backup.forwarder = Some(child);
        self.wait_for("the backup's datapath", Duration::from_secs(10), || {
            self.forwarder_status().datapath_loaded
        });
    }

    pub fn forwarder_status(&self) -> v1::LbForwarderStatus {
        crate::rpc(&self.backup.runtime, "lb-forwarder", async |ch| {
            LbForwarderClient::new(ch)
                .status(v1::StatusRequest {})
                .await
                .expect("lb-forwarder status")
                .into_inner()
        })
    }

    /// The farms lb-forwarder runs on the backup: name -> first port.
    pub fn forwarder_farms(&self) -> BTreeMap<String, u32> {
        crate::rpc(&self.backup.runtime, "lb-forwarder", async |ch| {
            LbForwarderClient::new(ch)
                .list_farms(v1::ListFarmsRequest {})
                .await
                .expect("lb-forwarder farms")
                .into_inner()
        })
        .farms
        .into_iter()
        .map(|f| (f.name, f.port_first))
        .collect()
    }

    /// SetDirection on a node's cfg-syncd (what clustermanager does when
    /// the VRRP role changes).
    pub fn set_direction(&self, node: &SyncNode, d: v1::SyncDirection) -> v1::CfgSyncStatus {
        rpc(&node.runtime, |mut c| async move {
            c.set_direction(v1::SetDirectionRequest {
                direction: d.into(),
            })
            .await
        })
    }

    /// Both replicated trees, compared the way an operator would: every file
    /// except node-local ones, with content and permission bits.
    pub fn converged(&self) -> bool {
        replicated_tree(&self.master.config) == replicated_tree(&self.backup.config)
    }

    /// Waits for identical trees; panics with both logs if they never are.
    pub fn wait_converged(&self, timeout: Duration) -> Duration {
        let start = Instant::now();
        while !self.converged() {
            if start.elapsed() > timeout {
                let m = replicated_tree(&self.master.config);
                let b = replicated_tree(&self.backup.config);
                let only_m: Vec<_> = m
                    .keys()
                    .filter(|k| b.get(*k) != m.get(*k))
                    .take(5)
                    .collect();
                let only_b: Vec<_> = b.keys().filter(|k| !m.contains_key(*k)).take(5).collect();
                panic!(
                    "trees not equal after {timeout:?} (master {} files, backup {}; differing e.g. {only_m:?}, extra on backup {only_b:?})\n--- master log\n{}\n--- backup log\n{}",
                    m.len(),
                    b.len(),
                    self.master.log(),
                    self.backup.log()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        start.elapsed()
    }

    pub fn status(&self, node: &SyncNode) -> v1::CfgSyncStatus {
        rpc(&node.runtime, |mut c| async move {
            c.status(v1::StatusRequest {}).await
        })
    }

    /// Status, or None while the node's cfg-syncd does not answer.
    pub fn try_status(&self, node: &SyncNode) -> Option<v1::CfgSyncStatus> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let ch = tandem_runtime::connect(&node.runtime, "cfg-syncd")
                .await
                .ok()?;
            tokio::time::timeout(
                Duration::from_secs(5),
                CfgSyncClient::new(ch).status(v1::StatusRequest {}),
            )
            .await
            .ok()?
            .ok()
            .map(tonic::Response::into_inner)
        })
    }

    pub fn pause(&self) -> v1::CfgSyncStatus {
        rpc(&self.master.runtime, |mut c| async move {
            c.pause(v1::PauseRequest {}).await
        })
    }

    pub fn resume(&self) -> v1::CfgSyncStatus {
        rpc(&self.master.runtime, |mut c| async move {
            c.resume(v1::ResumeRequest {}).await
        })
    }

    pub fn sync_now(&self) -> v1::CfgSyncStatus {
        rpc(&self.master.runtime, |mut c| async move {
            c.sync_now(v1::SyncNowRequest {}).await
        })
    }

    /// Polls `cond` every 5 ms until it holds; returns how long it took.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut() -> bool,
    ) -> Duration {
        let start = Instant::now();
        while !cond() {
            assert!(
                start.elapsed() < timeout,
                "timed out after {timeout:?} waiting for {what}\n--- master log\n{}\n--- backup log\n{}",
                self.master.log(),
                self.backup.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        start.elapsed()
    }

    /// The `-e` argument of rsync/ssh over the same link and keys.
    pub fn ssh_command(&self) -> String {
        format!(
            "ssh -p {SSH_PORT} -i {} -o UserKnownHostsFile={} -o StrictHostKeyChecking=yes -o BatchMode=yes",
            self.master.path("ssh/id_ed25519").display(),
            self.master.path("ssh/known_hosts").display()
        )
    }
}

/// One gRPC call to a node's cfg-syncd.
pub fn rpc<F, Fut, T>(runtime: &Path, call: F) -> T
where
    F: FnOnce(CfgSyncClient<tonic::transport::Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let ch = tandem_runtime::connect(runtime, "cfg-syncd")
            .await
            .expect("connect cfg-syncd");
        tokio::time::timeout(Duration::from_secs(10), call(CfgSyncClient::new(ch)))
            .await
            .expect("cfg-syncd answers within 10 s")
            .expect("cfg-syncd RPC")
            .into_inner()
    })
}

/// Every pid whose ancestry leads to `root` (read from /proc).
fn descendants(root: i32) -> Vec<i32> {
    let mut parent_of = Vec::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            // The ppid is the second field after the parenthesised command.
            let Some(after) = stat.rsplit_once(')').map(|x| x.1) else {
                continue;
            };
            if let Some(ppid) = after
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<i32>().ok())
            {
                parent_of.push((pid, ppid));
            }
        }
    }
    let mut out = vec![];
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (pid, ppid) in &parent_of {
            if *ppid == p && !out.contains(pid) {
                out.push(*pid);
                frontier.push(*pid);
            }
        }
    }
    out
}

/// What an operator would compare: the replicated files under `dir` as
/// docs/cfg-syncd.md lists them, with content and permission bits. Written
/// independently of cfg-syncd's code.
pub fn replicated_tree(dir: &Path) -> BTreeMap<String, (Vec<u8>, u32)> {
    crate::file_tree(dir, |r| {
        let name = r
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let top = r
            .components()
            .next()
            .map(|c| c.as_os_str().to_string_lossy().into_owned());
        // The documented lists: cluster.toml, keys/sync.key and the
        // farms, checks, certs, notifications and routes trees.
        let path = r.display().to_string();
        let included = path == "cluster.toml"
            || path == "keys/sync.key"
            || path == "keys"
            || matches!(
                top.as_deref(),
                Some("farms" | "checks" | "certs" | "notifications" | "routes")
            );
        !name.starts_with('.') && !name.ends_with(".tmp") && included
    })
}

/// Every file under `dir`/.tandem-sync (the backup's staging area).
pub fn staged_files(config: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![config.join(".tandem-sync")];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(e.path());
            } else {
                n += 1;
            }
        }
    }
    n
}

/// The tree of cfg-syncd's tested limits under `root`: 99,742 certificates
/// of 500 bytes in 100 directories and 256 files of 4,000,000 bytes (under
/// the default 4 MiB cap), random content. With cluster.toml and one farm:
/// 100,000 files, 1,073,871,000 bytes and more. Returns (files, bytes)
/// written.
pub fn populate_scale_tree(root: &Path) -> (usize, u64) {
    use std::io::Read;
    const SMALL: usize = 99_742;
    const BIG: usize = 256;
    const BIG_BYTES: usize = 4_000_000;
    let mut random = vec![0u8; BIG_BYTES];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut random))
        .expect("/dev/urandom");
    let mut total = 0u64;
    for d in 0..100 {
        fs::create_dir_all(root.join(format!("certs/d{d:02}"))).expect("certs dir");
    }
    for i in 0..SMALL {
        let mut data = format!("certificate {i}\n").into_bytes();
        data.resize(500, b'.');
        fs::write(
            root.join(format!("certs/d{:02}/c{i:05}.pem", i % 100)),
            &data,
        )
        .expect("certificate");
        total += data.len() as u64;
    }
    fs::create_dir_all(root.join("checks/big")).expect("checks dir");
    for i in 0..BIG {
        // Every file different: its number in its first bytes.
        random[..8].copy_from_slice(&(i as u64).to_le_bytes());
        fs::write(root.join(format!("checks/big/b{i:03}.bin")), &random).expect("big file");
        total += BIG_BYTES as u64;
    }
    (SMALL + BIG, total)
}

/// A field of /proc/<pid>/status (kB, or a count), 0 when unreadable.
pub fn proc_status(pid: i32, field: &str) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
