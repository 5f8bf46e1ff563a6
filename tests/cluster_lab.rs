//! Two full Tandem nodes for the cluster lifecycle: `lb1` and `lb2`, each in
//! its own network namespace with eth0 (clients, 10.0.0.0/24), eth1
//! (backends, 10.1.0.0/24) and eth2 (the cluster link, 192.168.100.0/24),
//! all five daemons, and its own real OpenSSH sshd on its cluster address
//! (port 22 of its namespace). Two backends answer TCP on :8080 with their
//! name; a client namespace reaches the farm `web` on 10.0.0.100:80.
//!
//! Both nodes start standalone: lb1 serves `web` with the VIP 10.0.0.100 and
//! the SNAT source 10.1.0.100 as plain addresses (what an operator of a
//! standalone balancer configures), lb2 has its own farm and files, which
//! cluster creation erases.
//!
//! The root password. Cluster creation logs in to the peer as root with a
//! password, so each sshd accepts one: `UsePAM no` makes sshd check
//! /etc/shadow itself, and each sshd runs in a private mount namespace (the
//! lab's, plus `unshare --mount --propagation private`) where a lab-written
//! shadow file holding only root's entry, with the hash of
//! [`ROOT_PASSWORD`], is bind-mounted over /etc/shadow. The machine's root
//! password and its /etc/shadow are never touched.
//!
//! Both nodes share this machine's filesystem, so each clustermanager is
//! told the other's directories (`--peer-config-dir`, `--peer-runtime-dir`,
//! `--peer-bin-dir`), the lab's authorized_keys files and host keys, and a
//! no-op start command (the peer's daemons already run).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tandem_lab::{Lab, LabChild, Netns};
use tandem_proto::v1;

pub const ROOT_PASSWORD: &str = "lab-root-password";
pub const VIP: &str = "10.0.0.100";
pub const SNAT: &str = "10.1.0.100";

/// The daemons of a node, in start order.
pub const NODE_DAEMONS: [&str; 5] = [
    "lb-forwarder",
    "vrrpd",
    "conntrack-syncd",
    "cfg-syncd",
    "clustermanager",
];

pub const WEB: &str = "name = \"web\"\nvip = \"10.0.0.100\"\nport = 80\nsnat_address = \"10.1.0.100\"\n\
[health_check]\nkind = \"none\"\n\
[[backends]]\naddress = \"10.1.0.11\"\nport = 8080\n[[backends]]\naddress = \"10.1.0.12\"\nport = 8080\n";
/// lb2's own farm before it joins (erased by creation).
pub const OLD: &str = "name = \"old\"\nvip = \"10.0.0.200\"\nport = 8000\nsnat_address = \"10.1.0.200\"\n\
[health_check]\nkind = \"none\"\n[[backends]]\naddress = \"10.1.0.11\"\nport = 8080\n";

pub struct LabNode {
    pub name: String,
    pub ns: Netns,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub runtime: PathBuf,
    /// The cluster link address.
    pub addr: String,
    pub daemons: Vec<(&'static str, LabChild)>,
    pub sshd: Option<LabChild>,
}

impl LabNode {
    pub fn path(&self, rel: &str) -> PathBuf {
        self.config.join(rel)
    }

    pub fn read(&self, rel: &str) -> Option<String> {
        fs::read_to_string(self.path(rel)).ok()
    }

    pub fn write(&self, rel: &str, text: &str) {
        let p = self.path(rel);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(&p, text).expect("write");
    }

    /// The authorized_keys this node's sshd reads: Tandem's own,
    /// `<config>/ssh/authorized_keys` (as the package's sshd drop-in
    /// points sshd at /etc/tandem/ssh/authorized_keys). Absent until the
    /// cluster is created.
    pub fn authorized_keys(&self) -> PathBuf {
        self.config.join("ssh/authorized_keys")
    }

    pub fn log(&self, daemon: &str) -> String {
        fs::read_to_string(self.dir.join(format!("{daemon}.log"))).unwrap_or_default()
    }

    /// Every daemon's log, for assertion messages.
    pub fn logs(&self) -> String {
        NODE_DAEMONS
            .iter()
            .map(|d| format!("--- {} {d}\n{}", self.name, self.log(d)))
            .collect()
    }

    pub fn holds(&self, ifname: &str, ip: &str) -> bool {
        self.ns
            .addresses(ifname)
            .map(|a| a.iter().any(|a| a.split('/').next() == Some(ip)))
            .unwrap_or(false)
    }
}

pub struct ClusterLifecycleLab {
    pub lab: Lab,
    pub client: Netns,
    pub lb1: LabNode,
    pub lb2: LabNode,
    pub backends: Vec<Netns>,
    /// The cluster link, for a third router on it.
    link: tandem_lab::Bridge,
    /// A neighbouring keepalived router on the cluster link, when started.
    pub keepalived: Option<(Netns, LabChild)>,
    /// What each clustermanager runs on the peer once its configuration is
    /// in place (`--peer-start-command`; the daemons already run: `true`).
    peer_start_command: String,
    _tmp: tempfile::TempDir,
}

/// A shadow file with root's entry only, its password `password`.
fn shadow(password: &str) -> String {
    let out = Command::new("openssl")
        .args(["passwd", "-6", "-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin
                .take()
                .expect("stdin")
                .write_all(password.as_bytes())?;
            c.wait_with_output()
        })
        .expect("openssl passwd");
    assert!(out.status.success(), "openssl passwd failed");
    let hash = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    format!("root:{hash}:20000:0:99999:7:::\n")
}

impl ClusterLifecycleLab {
    /// Both nodes standalone, every daemon and both sshds running.
    pub fn new() -> ClusterLifecycleLab {
        ClusterLifecycleLab::with_peer_start_command("true")
    }

    /// As `new`, each clustermanager running `command` on the peer at the
    /// end of a creation (e.g. one that fails, to see it rolled back).
    pub fn with_peer_start_command(command: &str) -> ClusterLifecycleLab {
        let lab = Lab::new().expect("lab");
        let tmp = tempfile::tempdir().expect("tempdir");
        let lan = lab.bridge("lan").expect("lan");
        let back = lab.bridge("back").expect("back");
        let link = lab.bridge("link").expect("link");
        let client = lab.netns("cl").expect("client");
        lab.attach(&client, "eth0", &lan, &["10.0.0.50/24"])
            .expect("client eth0");
        let mut backends = Vec::new();
        for i in 1..=2 {
            let ns = lab.netns(&format!("b{i}")).expect("backend");
            lab.attach(&ns, "eth0", &back, &[&format!("10.1.0.1{i}/24")])
                .expect("backend eth0");
            crate::echo_backend(&ns, &format!("b{i}"), 8080);
            backends.push(ns);
        }
        fs::create_dir_all("/run/sshd").expect("/run/sshd (sshd's privilege separation dir)");
        let shadow_text = shadow(ROOT_PASSWORD);
        let mut nodes = Vec::new();
        for i in 1..=2u8 {
            let name = format!("lb{i}");
            let ns = crate::balancer_netns(&lab, &name, i, &lan, &back, &link);
            let dir = tmp.path().join(&name);
            let node = LabNode {
                name: name.clone(),
                ns,
                config: dir.join("etc"),
                runtime: dir.join("run"),
                addr: format!("192.168.100.{i}"),
                dir,
                daemons: Vec::new(),
                sshd: None,
            };
            fs::create_dir_all(&node.runtime).expect("runtime dir");
            node.write(
                "node.toml",
                &format!("# {name}, standalone\nname = \"{name}\"\n"),
            );
            // sshd: its host key, the shadow; it reads authorized keys from
            // Tandem's file only (none yet).
            let sshd_dir = node.dir.join("sshd");
            fs::create_dir_all(&sshd_dir).expect("sshd dir");
            crate::keygen(&sshd_dir.join("host_ed25519"), &format!("{name}-host"));
            fs::write(sshd_dir.join("shadow"), &shadow_text).expect("shadow");
            fs::set_permissions(sshd_dir.join("shadow"), fs::Permissions::from_mode(0o600))
                .expect("chmod shadow");
            crate::write_file(
                &sshd_dir.join("sshd_config"),
                &crate::sshd_config(
                    &node.addr,
                    22,
                    &sshd_dir,
                    &node.authorized_keys(),
                    crate::RootLogin::Password,
                ),
            );
            nodes.push(node);
        }
        let lb2 = nodes.pop().expect("lb2");
        let lb1 = nodes.pop().expect("lb1");
        // lb1 serves `web` standalone, its VIP and SNAT source configured
        // as plain addresses.
        lb1.write("farms/web.toml", WEB);
        lb1.ns
            .add_address("eth0", &format!("{VIP}/24"))
            .expect("vip");
        lb1.ns
            .add_address("eth1", &format!("{SNAT}/24"))
            .expect("snat");
        // lb2's previous life, to be erased (and kept in backups/).
        lb2.write("farms/old.toml", OLD);
        lb2.write("checks/old-check.sh", "#!/bin/sh\nexit 0\n");
        lb2.write("notes.txt", "node-local, never replicated\n");

        let mut l = ClusterLifecycleLab {
            lab,
            client,
            lb1,
            lb2,
            backends,
            link,
            keepalived: None,
            peer_start_command: command.to_owned(),
            _tmp: tmp,
        };
        l.start_sshd("lb1");
        l.start_sshd("lb2");
        for node in ["lb1", "lb2"] {
            for d in NODE_DAEMONS {
                l.start_daemon(node, d);
            }
        }
        l
    }

    pub fn node(&self, name: &str) -> &LabNode {
        if name == "lb1" { &self.lb1 } else { &self.lb2 }
    }

    fn node_mut(&mut self, name: &str) -> &mut LabNode {
        if name == "lb1" {
            &mut self.lb1
        } else {
            &mut self.lb2
        }
    }

    fn other(&self, name: &str) -> &LabNode {
        if name == "lb1" { &self.lb2 } else { &self.lb1 }
    }

    pub fn start_sshd(&mut self, name: &str) {
        let node = self.node(name);
        let sshd_dir = node.dir.join("sshd");
        let log = fs::File::create(node.dir.join("sshd.log")).expect("sshd log");
        // `unshare` keeps the shadow bind mount in a private mount namespace
        // (the lab's own is a slave of the host's already).
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(format!(
                "mount --bind {dir}/shadow /etc/shadow && exec /usr/sbin/sshd -D -e -f {dir}/sshd_config",
                dir = sshd_dir.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = self.lab.spawn(&node.ns, &mut cmd).expect("spawn sshd");
        let addr = format!("{}:22", node.addr).parse().expect("addr");
        self.other(name)
            .ns
            .wait_tcp(addr, Duration::from_secs(10))
            .expect("sshd listening");
        self.node_mut(name).sshd = Some(child);
    }

    /// A neighbouring keepalived router on the cluster link (192.168.100.9,
    /// Debian's keepalived, VRRPv2 as keepalived defaults to, simple
    /// password authentication), master at once, advertising `vrid` every
    /// second with priority 254.
    pub fn start_keepalived(&mut self, vrid: u8) {
        let ns = self.lab.netns("ka").expect("keepalived namespace");
        self.lab
            .attach(&ns, "eth0", &self.link, &["192.168.100.9/24"])
            .expect("keepalived eth0");
        let dir = self._tmp.path().join("keepalived");
        crate::write_file(
            &dir.join("keepalived.conf"),
            &format!(
                "global_defs {{\n  router_id neighbour\n}}\n\
                 vrrp_instance NEIGHBOUR {{\n  state MASTER\n  interface eth0\n  virtual_router_id {vrid}\n  \
                 priority 254\n  advert_int 1\n  authentication {{\n    auth_type PASS\n    auth_pass secret\n  }}\n  \
                 virtual_ipaddress {{\n    192.168.100.99/24 dev eth0\n  }}\n}}\n"
            ),
        );
        let log = fs::File::create(dir.join("keepalived.log")).expect("log");
        let mut cmd = Command::new("keepalived");
        cmd.args(["--dont-fork", "--log-console", "--vrrp", "--use-file"])
            .arg(dir.join("keepalived.conf"))
            .arg("--pid")
            .arg(dir.join("keepalived.pid"))
            .arg("--vrrp_pid")
            .arg(dir.join("keepalived-vrrp.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = self.lab.spawn(&ns, &mut cmd).expect("spawn keepalived");
        // Master at once: it holds its address within a moment.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ns
            .addresses("eth0")
            .map(|a| a.iter().any(|a| a.starts_with("192.168.100.99/")))
            .unwrap_or(false)
        {
            assert!(
                Instant::now() < deadline,
                "keepalived did not become master"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        self.keepalived = Some((ns, child));
    }

    pub fn stop_keepalived(&mut self) {
        if let Some((_, mut child)) = self.keepalived.take() {
            let _ = child.stop(Duration::from_secs(5));
        }
    }

    /// The SHA-256 fingerprint of a node's sshd host key, as an operator
    /// reads it on that node (`ssh-keygen -lf`).
    pub fn host_key_fingerprint(&self, name: &str) -> String {
        fingerprint_of(&self.node(name).dir.join("sshd/host_ed25519.pub"))
    }

    /// Replaces a node's sshd by an impostor on the same address: another
    /// host key, the same root password, its own log (`sshd-impostor.log`,
    /// every authentication attempt logged). Returns the impostor's
    /// fingerprint.
    pub fn start_impostor_sshd(&mut self, name: &str) -> String {
        self.stop_sshd(name);
        let node = self.node(name);
        let dir = node.dir.join("sshd-impostor");
        fs::create_dir_all(&dir).expect("impostor dir");
        crate::keygen(&dir.join("host_ed25519"), &format!("{name}-impostor"));
        crate::write_file(
            &dir.join("sshd_config"),
            &crate::sshd_config(
                &node.addr,
                22,
                &dir,
                &node.authorized_keys(),
                crate::RootLogin::Password,
            ),
        );
        let log = fs::File::create(node.dir.join("sshd-impostor.log")).expect("log");
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(format!(
                "mount --bind {shadow} /etc/shadow && exec /usr/sbin/sshd -D -e -f {dir}/sshd_config",
                shadow = node.dir.join("sshd/shadow").display(),
                dir = dir.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = self
            .lab
            .spawn(&node.ns, &mut cmd)
            .expect("spawn impostor sshd");
        let addr = format!("{}:22", node.addr).parse().expect("addr");
        self.other(name)
            .ns
            .wait_tcp(addr, Duration::from_secs(10))
            .expect("impostor sshd listening");
        self.node_mut(name).sshd = Some(child);
        fingerprint_of(&dir.join("host_ed25519.pub"))
    }

    /// What an sshd of a node logged (`sshd.log`, or the impostor's).
    pub fn sshd_log(&self, name: &str, impostor: bool) -> String {
        let file = if impostor {
            "sshd-impostor.log"
        } else {
            "sshd.log"
        };
        fs::read_to_string(self.node(name).dir.join(file)).unwrap_or_default()
    }

    pub fn stop_sshd(&mut self, name: &str) {
        if let Some(mut s) = self.node_mut(name).sshd.take() {
            let _ = s.stop(Duration::from_secs(5));
        }
    }

    fn start_daemon(&mut self, name: &str, daemon: &'static str) {
        let (node, peer) = (self.node(name), self.other(name));
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join(format!("{daemon}.log")))
            .expect("log file");
        let mut cmd = if daemon == "clustermanager" {
            // As under a systemd unit that forbids locking memory: no
            // CAP_IPC_LOCK, RLIMIT_MEMLOCK 0 (mlock fails with EPERM).
            let mut c = Command::new("setpriv");
            c.args(["--bounding-set", "-ipc_lock", "prlimit", "--memlock=0:0"])
                .arg(crate::bin(daemon));
            c
        } else {
            Command::new(crate::bin(daemon))
        };
        cmd.arg("--config-dir")
            .arg(&node.config)
            .arg("--runtime-dir")
            .arg(&node.runtime)
            .arg("--state-dir")
            .arg(crate::state_dir_beside(&node.runtime))
            .env("RUST_LOG", "info,clustermanager=debug")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if daemon == "cfg-syncd" || daemon == "clustermanager" {
            cmd.arg("--peer-config-dir")
                .arg(&peer.config)
                .arg("--peer-runtime-dir")
                .arg(&peer.runtime);
        }
        if daemon == "clustermanager" {
            let bin_dir = crate::bin("clustermanager")
                .parent()
                .expect("bin dir")
                .to_owned();
            // The authorized_keys files are the defaults
            // (<config-dir>/ssh/authorized_keys on both nodes).
            cmd.arg("--peer-bin-dir")
                .arg(bin_dir)
                .arg("--sshd-config")
                .arg(node.dir.join("sshd/sshd_config"))
                .arg("--peer-sshd-config")
                .arg(peer.dir.join("sshd/sshd_config"))
                .arg("--host-key-pub")
                .arg(node.dir.join("sshd/host_ed25519.pub"))
                .arg("--peer-start-command")
                .arg(&self.peer_start_command);
        }
        let child = self.lab.spawn(&node.ns, &mut cmd).expect("spawn daemon");
        let sock = node.runtime.join(format!("{daemon}.sock"));
        if let Err(e) = tandem_lab::wait_for_unix_socket(&sock, Duration::from_secs(10)) {
            panic!("{name} {daemon} not serving: {e}\n{}", node.log(daemon));
        }
        self.node_mut(name).daemons.push((daemon, child));
    }

    /// `tandemctl ARGS` against a node's daemons, `stdin` fed to it.
    /// Runs without a controlling terminal (`setsid`), as a script would:
    /// whatever tandemctl would ask on the terminal, it cannot.
    pub fn tandemctl(&self, name: &str, args: &[&str], stdin: &str) -> Output {
        use std::io::Write;
        let node = self.node(name);
        let mut child = Command::new("setsid")
            .arg("--wait")
            .arg(crate::bin("tandemctl"))
            .arg("--runtime-dir")
            .arg(&node.runtime)
            .arg("--config-dir")
            .arg(&node.config)
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

    /// `tandemctl ARGS` on a terminal of its own (`script` gives it a pty):
    /// `typed` is what the operator types; the output is everything the
    /// terminal showed.
    pub fn tandemctl_on_terminal(&self, name: &str, args: &[&str], typed: &str) -> Output {
        use std::io::Write;
        let node = self.node(name);
        let quote = |s: &str| format!("'{}'", s.replace('\'', "'\\''"));
        let mut line = vec![
            quote(&crate::bin("tandemctl").display().to_string()),
            "--runtime-dir".into(),
            quote(&node.runtime.display().to_string()),
            "--config-dir".into(),
            quote(&node.config.display().to_string()),
        ];
        line.extend(args.iter().map(|a| quote(a)));
        let mut child = Command::new("script")
            .args(["--quiet", "--return", "--command"])
            .arg(line.join(" "))
            .arg("/dev/null")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn script (util-linux)");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(typed.as_bytes())
            .expect("write stdin");
        child.wait_with_output().expect("script")
    }

    /// `tandemctl cluster create` on lb1 toward lb2, `--yes --password-stdin`
    /// and `--host-key` with lb2's real host key (what an operator checked
    /// on lb2).
    pub fn create(&self, password: &str) -> Output {
        self.create_with(password, &["--host-key", &self.host_key_fingerprint("lb2")])
    }

    /// `tandemctl cluster create --yes --password-stdin` on lb1 toward lb2,
    /// with `extra` arguments.
    pub fn create_with(&self, password: &str, extra: &[&str]) -> Output {
        let mut args = vec![
            "cluster",
            "create",
            "--local-ip",
            &self.lb1.addr,
            "--remote-ip",
            &self.lb2.addr,
            "--yes",
            "--password-stdin",
        ];
        args.extend_from_slice(extra);
        self.tandemctl("lb1", &args, &format!("{password}\n"))
    }

    fn rpc<T>(
        &self,
        name: &str,
        daemon: &str,
        f: impl AsyncFnOnce(tonic::transport::Channel) -> T,
    ) -> T {
        crate::rpc(&self.node(name).runtime, daemon, f)
    }

    /// CreateCluster without confirmation (preflight only), lb2's real host
    /// key confirmed: every message.
    pub fn preflight_only(&self, password: &str) -> Vec<v1::CreateClusterProgress> {
        self.create_rpc(password, &self.host_key_fingerprint("lb2"), false)
    }

    /// CreateCluster on lb1 toward lb2 with `host_key` as the confirmed
    /// fingerprint: every message of the stream.
    pub fn create_rpc(
        &self,
        password: &str,
        host_key: &str,
        confirmed: bool,
    ) -> Vec<v1::CreateClusterProgress> {
        self.create_rpc_vrid(password, host_key, confirmed, 0)
    }

    /// As `create_rpc`, with a virtual router id (0: the default).
    pub fn create_rpc_vrid(
        &self,
        password: &str,
        host_key: &str,
        confirmed: bool,
        vrid: u32,
    ) -> Vec<v1::CreateClusterProgress> {
        let req = v1::CreateClusterRequest {
            local_ip: self.lb1.addr.clone(),
            remote_ip: self.lb2.addr.clone(),
            remote_root_password: password.into(),
            confirmed,
            virtual_router_id: vrid,
            host_key: host_key.into(),
        };
        self.rpc("lb1", "clustermanager", async move |ch| {
            let mut s = v1::cluster_manager_client::ClusterManagerClient::new(ch)
                .create_cluster(req)
                .await
                .expect("CreateCluster")
                .into_inner();
            let mut out = Vec::new();
            while let Some(p) = s.message().await.expect("stream") {
                out.push(p);
            }
            out
        })
    }

    pub fn vrrp_state(&self, name: &str) -> v1::VrrpState {
        crate::vrrp_state(&self.node(name).runtime)
    }

    pub fn cfgsync_status(&self, name: &str) -> v1::CfgSyncStatus {
        self.rpc(name, "cfg-syncd", async |ch| {
            v1::cfg_sync_client::CfgSyncClient::new(ch)
                .status(v1::StatusRequest {})
                .await
                .expect("cfg-syncd status")
                .into_inner()
        })
    }

    pub fn conntrack_status(&self, name: &str) -> v1::ConntrackSyncStatus {
        crate::conntrack_status(&self.node(name).runtime)
    }

    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        f: impl Fn(&ClusterLifecycleLab) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        while !f(self) {
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}\n{}\n{}",
                self.lb1.logs(),
                self.lb2.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One request from the client to the farm: the backend's name.
    pub fn ask_vip(&self) -> Option<String> {
        self.client
            .run(|| {
                use std::io::BufRead;
                let s = std::net::TcpStream::connect_timeout(
                    &format!("{VIP}:80").parse().expect("addr"),
                    Duration::from_secs(2),
                )
                .ok()?;
                s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
                let mut line = String::new();
                std::io::BufReader::new(s).read_line(&mut line).ok()?;
                Some(line.trim().to_owned()).filter(|l| !l.is_empty())
            })
            .expect("client thread")
    }

    /// Every file of both nodes' config dirs and authorized_keys, with
    /// content and mode: "nothing changed" is this staying equal.
    pub fn snapshot(&self) -> BTreeMap<String, (Vec<u8>, u32)> {
        let mut out = BTreeMap::new();
        for n in [&self.lb1, &self.lb2] {
            for (k, v) in tree(&n.config) {
                out.insert(format!("{}:{k}", n.name), v);
            }
            let ak = fs::read(n.authorized_keys()).unwrap_or_default();
            out.insert(format!("{}:authorized_keys", n.name), (ak, 0));
        }
        out
    }
}

impl Default for ClusterLifecycleLab {
    fn default() -> Self {
        ClusterLifecycleLab::new()
    }
}

/// Every regular file under `dir` (relative path → content, mode).
pub fn tree(dir: &Path) -> BTreeMap<String, (Vec<u8>, u32)> {
    crate::file_tree(dir, |_| true)
}

/// Differences between two snapshots, for assertion messages.
pub fn diff(
    a: &BTreeMap<String, (Vec<u8>, u32)>,
    b: &BTreeMap<String, (Vec<u8>, u32)>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            None => out.push(format!("{k} removed")),
            Some(w) if w != v => out.push(format!("{k} changed")),
            _ => {}
        }
    }
    for k in b.keys() {
        if !a.contains_key(k) {
            out.push(format!("{k} added"));
        }
    }
    out
}

/// `SHA256:...` of an OpenSSH public key file, from `ssh-keygen -lf`.
pub fn fingerprint_of(public_key: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .arg("-lf")
        .arg(public_key)
        .output()
        .expect("ssh-keygen -lf");
    assert!(
        out.status.success(),
        "ssh-keygen -lf {}",
        public_key.display()
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .find(|w| w.starts_with("SHA256:"))
        .expect("a SHA256 fingerprint")
        .to_owned()
}

pub fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}
