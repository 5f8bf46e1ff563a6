//! Fixtures for Tandem's end-to-end tests: a node made of the real daemon
//! binaries, with its own config and runtime directories.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

pub const DAEMONS: &[&str] = &[
    "clustermanager",
    "vrrpd",
    "lb-forwarder",
    "conntrack-syncd",
    "cfg-syncd",
];

/// The shipped example configuration (`deploy/examples`).
pub fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples")
}

/// Path of a workspace binary, or a panic that says how to build it.
pub fn bin(name: &str) -> PathBuf {
    match tandem_lab::require_workspace_bin(name) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

/// The `--state-dir` of a lab node: a `state` directory beside its runtime
/// directory, so state a daemon keeps across restarts (maintenance, set-aside
/// configuration) stays inside the test's own temporary tree.
pub fn state_dir_beside(runtime: &Path) -> PathBuf {
    runtime
        .parent()
        .map_or_else(|| PathBuf::from("state"), |p| p.join("state"))
}

/// Copies a directory tree (the config examples) into `to`.
pub fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("create config dir");
    for entry in fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("dir entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).expect("copy file");
        }
    }
}

/// A node's directories (a copy of the examples as its config, an empty
/// runtime dir for sockets) and the network namespace its daemons run in.
/// The daemons never run in the host's namespace: the example configuration
/// names interfaces (eth0, eth1) that a host may really have. Removed on drop.
pub struct NodeDirs {
    pub config: PathBuf,
    pub runtime: PathBuf,
    pub ns: tandem_lab::Netns,
    _lab: tandem_lab::Lab,
    _tmp: tempfile::TempDir,
}

impl NodeDirs {
    pub fn from_examples() -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = tmp.path().join("etc");
        let runtime = tmp.path().join("run");
        copy_tree(&examples_dir(), &config);
        let lab = tandem_lab::Lab::new().expect("lab");
        let ns = lab.netns("node").expect("node namespace");
        NodeDirs {
            config,
            runtime,
            ns,
            _lab: lab,
            _tmp: tmp,
        }
    }

    pub fn socket(&self, daemon: &str) -> PathBuf {
        self.runtime.join(format!("{daemon}.sock"))
    }

    /// A daemon started on these directories, inside the node's namespace
    /// (`ip netns exec` execs the daemon: same pid); stdout/stderr captured.
    pub fn start(&self, daemon: &str) -> DaemonProcess {
        let child = Command::new("ip")
            .args(["netns", "exec", self.ns.name()])
            .arg(bin(daemon))
            .arg("--config-dir")
            .arg(&self.config)
            .arg("--runtime-dir")
            .arg(&self.runtime)
            .arg("--state-dir")
            .arg(state_dir_beside(&self.runtime))
            .env("RUST_LOG", "info")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {daemon}: {e}"));
        DaemonProcess {
            name: daemon.to_owned(),
            child: Some(child),
        }
    }

    /// Starts a daemon and waits until its socket answers.
    pub fn start_serving(&self, daemon: &str) -> DaemonProcess {
        let mut p = self.start(daemon);
        p.wait_serving(&self.socket(daemon));
        p
    }

    /// Runs `tandemctl` against this node.
    pub fn tandemctl(&self, args: &[&str]) -> Output {
        Command::new(bin("tandemctl"))
            .arg("--runtime-dir")
            .arg(&self.runtime)
            .args(args)
            .output()
            .expect("running tandemctl")
    }
}

/// A daemon process this test started; stopped by PID on drop.
pub struct DaemonProcess {
    pub name: String,
    child: Option<Child>,
}

impl DaemonProcess {
    pub fn pid(&self) -> Pid {
        let id = self.child.as_ref().map(Child::id).unwrap_or(0);
        Pid::from_raw(i32::try_from(id).expect("pid fits i32"))
    }

    pub fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).expect("signal daemon");
    }

    /// Waits until a Unix stream connect to `socket` succeeds; panics with the
    /// daemon's output if it exits first or time runs out.
    pub fn wait_serving(&mut self, socket: &Path) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                let out = self.take_output();
                panic!("{} exited before serving:\n{out}", self.name);
            }
            assert!(
                Instant::now() < deadline,
                "{} did not serve {} within 10 s",
                self.name,
                socket.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to exit (up to `timeout`); returns its status
    /// code and everything it printed.
    pub fn wait_exit(&mut self, timeout: Duration) -> (Option<i32>, String) {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                let code = status.code();
                return (code, self.take_output());
            }
            assert!(
                Instant::now() < deadline,
                "{} still running after {timeout:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn take_output(&mut self) -> String {
        let Some(child) = self.child.take() else {
            return String::new();
        };
        let out = child.wait_with_output().expect("collect output");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(None) = child.try_wait() {
                let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(0));
                let _ = kill(pid, Signal::SIGKILL);
            }
            let _ = child.wait();
        }
    }
}

/// The checks every daemon binary passes: `--help` documents the shared
/// arguments, `--version` prints the version, and a missing configuration
/// is a clear error naming node.toml, not a panic.
pub fn assert_daemon_cli(bin: &Path, daemon: &str) {
    let out = Command::new(bin)
        .arg("--help")
        .output()
        .expect("run --help");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{daemon} --help failed");
    for arg in [
        "--config-dir",
        "--runtime-dir",
        "/etc/tandem",
        "/run/tandem",
    ] {
        assert!(help.contains(arg), "{daemon} --help lacks {arg}:\n{help}");
    }

    let out = Command::new(bin)
        .arg("--version")
        .output()
        .expect("run --version");
    let version = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        version.trim(),
        format!("{daemon} {}", env!("CARGO_PKG_VERSION"))
    );

    let tmp = tempfile::tempdir().expect("tempdir");
    let out = Command::new(bin)
        .arg("--config-dir")
        .arg(tmp.path().join("missing"))
        .arg("--runtime-dir")
        .arg(tmp.path().join("run"))
        .arg("--state-dir")
        .arg(tmp.path().join("state"))
        .env_remove("JOURNAL_STREAM")
        .output()
        .expect("run with a missing config dir");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{daemon} must fail:\n{err}");
    assert!(
        err.contains("node.toml"),
        "{daemon} names the missing file:\n{err}"
    );
    assert!(!err.contains("panicked"), "{daemon} panicked:\n{err}");
}
/// Writes `text` to `path`, creating the parent directories.
pub fn write_file(path: &Path, text: &str) {
    fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    fs::write(path, text).expect("write");
}

/// A new ed25519 key pair at `path` (and `path.pub`), parent directories
/// created; returns the public key line.
pub fn keygen(path: &Path, comment: &str) -> String {
    fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .output()
        .expect("ssh-keygen (apt-get install openssh-client)");
    assert!(
        out.status.success(),
        "ssh-keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    fs::read_to_string(path.with_extension("pub")).expect("public key")
}

/// How a lab's sshd lets root in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootLogin {
    /// Keys only (`PermitRootLogin prohibit-password`).
    KeyOnly,
    /// Keys and the password (the cluster-creation labs).
    Password,
}

/// An sshd_config for a lab sshd listening on `addr:port`, its host key
/// `<dir>/host_ed25519`, its pid file in `dir`, root's keys in
/// `authorized_keys`; no PAM, SFTP and stream-local forwarding on.
pub fn sshd_config(
    addr: &str,
    port: u16,
    dir: &Path,
    authorized_keys: &Path,
    login: RootLogin,
) -> String {
    let (permit, password, log) = match login {
        RootLogin::KeyOnly => ("prohibit-password", "no", "ERROR"),
        RootLogin::Password => ("yes", "yes", "VERBOSE"),
    };
    format!(
        "Port {port}\nListenAddress {addr}\nHostKey {dir}/host_ed25519\n\
         AuthorizedKeysFile {keys}\nPidFile {dir}/sshd.pid\nUsePAM no\n\
         StrictModes no\nPermitRootLogin {permit}\nPasswordAuthentication {password}\n\
         KbdInteractiveAuthentication no\nAllowStreamLocalForwarding yes\nLogLevel {log}\n\
         MaxStartups 100\nSubsystem sftp /usr/lib/openssh/sftp-server\n",
        dir = dir.display(),
        keys = authorized_keys.display()
    )
}

/// A balancer node `name` (number `i`) of a two-node lab: eth0 on the
/// clients' LAN (10.0.0.i/24), eth1 on the backends' network (10.1.0.i/24),
/// eth2 on the cluster link (192.168.100.i/24), IPv4 forwarding on.
pub fn balancer_netns(
    lab: &tandem_lab::Lab,
    name: &str,
    i: u8,
    lan: &tandem_lab::Bridge,
    back: &tandem_lab::Bridge,
    link: &tandem_lab::Bridge,
) -> tandem_lab::Netns {
    let ns = lab.netns(name).expect("node");
    lab.attach(&ns, "eth0", lan, &[&format!("10.0.0.{i}/24")])
        .expect("eth0");
    lab.attach(&ns, "eth1", back, &[&format!("10.1.0.{i}/24")])
        .expect("eth1");
    lab.attach(&ns, "eth2", link, &[&format!("192.168.100.{i}/24")])
        .expect("eth2");
    ns.sysctl("net.ipv4.ip_forward", "1").expect("forwarding");
    ns
}

/// The regular files under `dir` (relative path → content, permission
/// bits), walking only into the entries `include` accepts (relative path).
pub fn file_tree(
    dir: &Path,
    include: impl Fn(&Path) -> bool,
) -> std::collections::BTreeMap<String, (Vec<u8>, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let Ok(entries) = fs::read_dir(dir.join(&rel)) else {
            continue;
        };
        for e in entries.flatten() {
            let r = rel.join(e.file_name());
            if !include(&r) {
                continue;
            }
            let Ok(md) = fs::symlink_metadata(e.path()) else {
                continue;
            };
            if md.is_dir() {
                stack.push(r);
            } else if let Ok(data) = fs::read(e.path()) {
                out.insert(
                    r.display().to_string(),
                    (data, md.permissions().mode() & 0o7777),
                );
            }
        }
    }
    out
}

/// A TCP backend in `ns` on `port`: it greets each connection with its
/// name and a newline, then echoes every line until the client closes (one
/// write per line, no Nagle: request/response tests and benchmarks must not
/// wait for delayed ACKs).
pub fn echo_backend(ns: &tandem_lab::Netns, name: &str, port: u16) {
    use std::io::{BufRead, BufReader, Write};
    let listener = ns
        .run(move || std::net::TcpListener::bind(("0.0.0.0", port)))
        .expect("ns")
        .expect("bind");
    let name = name.to_owned();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let name = name.clone();
            std::thread::spawn(move || {
                let _ = conn.set_nodelay(true);
                let Ok(mut w) = conn.try_clone() else { return };
                if w.write_all(format!("{name}\n").as_bytes()).is_err() {
                    return;
                }
                for line in BufReader::new(conn).lines() {
                    let Ok(line) = line else { return };
                    if w.write_all(format!("{line}\n").as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// A UDP backend in `ns` on `port`: answers every datagram with its name.
pub fn udp_backend(ns: &tandem_lab::Netns, name: &str, port: u16) {
    let socket = ns
        .run(move || std::net::UdpSocket::bind(("0.0.0.0", port)))
        .expect("ns")
        .expect("bind");
    let name = name.to_owned();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((_, from)) = socket.recv_from(&mut buf) {
            if socket.send_to(name.as_bytes(), from).is_err() {
                return;
            }
        }
    });
}

/// One call to a daemon of a node, on a runtime of its own.
pub fn rpc<T>(
    runtime_dir: &Path,
    daemon: &str,
    f: impl AsyncFnOnce(tonic::transport::Channel) -> T,
) -> T {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async move {
        let ch = tandem_runtime::connect(runtime_dir, daemon)
            .await
            .expect("connect");
        f(ch).await
    })
}

/// vrrpd's state on a node.
pub fn vrrp_state(runtime_dir: &Path) -> tandem_proto::v1::VrrpState {
    use tandem_proto::v1;
    rpc(runtime_dir, "vrrpd", async |ch| {
        v1::vrrpd_client::VrrpdClient::new(ch)
            .status(v1::StatusRequest {})
            .await
            .expect("vrrpd status")
            .into_inner()
            .state()
    })
}

/// conntrack-syncd's Status on a node.
pub fn conntrack_status(runtime_dir: &Path) -> tandem_proto::v1::ConntrackSyncStatus {
    use tandem_proto::v1;
    rpc(runtime_dir, "conntrack-syncd", async |ch| {
        v1::conntrack_sync_client::ConntrackSyncClient::new(ch)
            .status(v1::StatusRequest {})
            .await
            .expect("conntrack-syncd status")
            .into_inner()
    })
}

pub mod cfgsync_lab;
pub mod chaos_lab;
pub mod cluster_lab;
pub mod cluster_ops_lab;
pub mod conntrack_lab;
pub mod forwarder_lab;
pub mod scaleout_cluster_lab;
pub mod scaleout_lab;
pub mod systemd_lab;
pub mod vrrp_lab;
