//! The namespace lab for Tandem's tests: network namespaces, veth pairs and
//! bridges with unique names, processes and threads inside them, and teardown
//! on drop — also after a panic.
//!
//! The lab never creates or changes anything in the host's network
//! namespace: veths are created directly inside lab namespaces
//! (`ip -n A link add X type veth peer name Y netns B`) and bridges live in a
//! lab-owned "switch" namespace. Deleting the lab's namespaces therefore
//! removes every veth and bridge it made.
//!
//! Names: a lab's id is `tl` + base36(pid) + base36(sequence), so labs in
//! parallel threads (cargo test) and processes (nextest) never collide, and
//! a later lab can tell from the pid whether a leftover's owner is dead.

use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Every lab namespace starts with this, then the owner's pid in base 36.
const PREFIX: &str = "tl";
static SEQUENCE: AtomicU32 = AtomicU32::new(0);

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("running `{command}`: {source}")]
    Spawn { command: String, source: io::Error },
    #[error("entering namespace {ns}: {source}")]
    Setns { ns: String, source: nix::Error },
    #[error("the thread running in namespace {ns} panicked: {message}")]
    Panicked { ns: String, message: String },
    #[error("{what} not ready after {timeout:?}: {last}")]
    Timeout {
        what: String,
        timeout: Duration,
        last: String,
    },
    #[error("binary `{name}` not found at {path}; build it first: cargo build --workspace")]
    MissingBinary { name: String, path: PathBuf },
    #[error("name `{0}` is too long for an interface (15 bytes at most)")]
    NameTooLong(String),
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

/// Runs a command to completion; a non-zero exit is an error carrying stderr.
fn run(program: &str, args: &[&str]) -> Result<Output, LabError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| LabError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(LabError::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out)
}

fn ip(args: &[&str]) -> Result<Output, LabError> {
    run("ip", args)
}

/// A network namespace of a lab. A cheap handle: the [`Lab`] owns the
/// namespace and deletes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Netns {
    name: String,
}

/// A bridge inside the lab's switch namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bridge {
    name: String,
}

impl Bridge {
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Netns {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `program args` inside the namespace to completion.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output, LabError> {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend_from_slice(args);
        ip(&full)
    }

    pub fn add_address(&self, ifname: &str, cidr: &str) -> Result<(), LabError> {
        let mut args = vec!["-n", &self.name, "addr", "add", cidr, "dev", ifname];
        // IPv6 addresses are usable at once, without duplicate address detection.
        if cidr.contains(':') {
            args.push("nodad");
        }
        ip(&args).map(drop)
    }

    pub fn set_link(&self, ifname: &str, up: bool) -> Result<(), LabError> {
        ip(&[
            "-n",
            &self.name,
            "link",
            "set",
            ifname,
            if up { "up" } else { "down" },
        ])
        .map(drop)
    }

    /// Runs `f` on a fresh thread that has entered the namespace, and waits
    /// for it. Sockets `f` opens belong to the namespace (a netlink or IP
    /// socket belongs to the namespace of the thread that opened it) and keep
    /// working after `f` returns. A panic in `f` becomes [`LabError::Panicked`].
    pub fn run<F, T>(&self, f: F) -> Result<T, LabError>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            let handle = scope.spawn(move || -> Result<T, LabError> {
                let file = File::open(&path).map_err(|e| LabError::Setns {
                    ns: path.clone(),
                    source: nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EINVAL)),
                })?;
                setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| LabError::Setns {
                    ns: path.clone(),
                    source,
                })?;
                Ok(f())
            });
            match handle.join() {
                Ok(r) => r,
                Err(panic) => Err(LabError::Panicked {
                    ns: self.name.clone(),
                    message: panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                        .unwrap_or_default(),
                }),
            }
        })
    }

    /// Polls a TCP connect from inside the namespace until it succeeds.
    pub fn wait_tcp(&self, addr: SocketAddr, timeout: Duration) -> Result<(), LabError> {
        self.run(move || {
            let deadline = Instant::now() + timeout;
            loop {
                match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                    Ok(_) => return Ok(()),
                    Err(e) if Instant::now() >= deadline => {
                        return Err(LabError::Timeout {
                            what: format!("TCP {addr}"),
                            timeout,
                            last: e.to_string(),
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        })?
    }
}

/// A process a lab started inside one of its namespaces.
#[derive(Debug)]
pub struct LabChild {
    child: Option<Child>,
    pid: Pid,
    registry: Arc<Mutex<Vec<Pid>>>,
}

impl LabChild {
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Sends `signal` to this process (by PID).
    pub fn kill(&mut self, signal: Signal) -> Result<(), LabError> {
        kill(self.pid, signal).map_err(|e| LabError::Command {
            command: format!("kill -{signal} {}", self.pid),
            status: e.to_string(),
            stderr: String::new(),
        })
    }

    pub fn try_wait(&mut self) -> io::Result<Option<std::process::ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => c.try_wait(),
            None => Ok(None),
        }
    }

    /// Waits for the process to exit, up to `timeout`; None if still running.
    pub fn wait_timeout(
        &mut self,
        timeout: Duration,
    ) -> io::Result<Option<std::process::ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                self.forget();
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The process's captured output, after it exits (it must have been
    /// spawned with piped stdout/stderr to capture anything).
    pub fn wait_with_output(mut self) -> io::Result<Output> {
        self.forget();
        match self.child.take() {
            Some(c) => c.wait_with_output(),
            None => Err(io::Error::other("already reaped")),
        }
    }

    fn forget(&self) {
        if let Ok(mut pids) = self.registry.lock() {
            pids.retain(|p| *p != self.pid);
        }
    }
}

impl Drop for LabChild {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop(self.pid, &mut || matches!(child.try_wait(), Ok(Some(_))));
            let _ = child.wait();
        }
        self.forget();
    }
}

/// Alive and not a zombie: an exited child still answers `kill(pid, 0)`
/// until its parent reaps it.
fn alive(pid: Pid) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses: "pid (comm) S ...".
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// SIGTERM, up to 2 s to exit, then SIGKILL.
fn stop(pid: Pid, exited: &mut dyn FnMut() -> bool) {
    if exited() {
        return;
    }
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if exited() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = kill(pid, Signal::SIGKILL);
}

/// A lab: owns its namespaces (and so their veths and bridges) and the
/// processes it spawned. Dropping it kills the processes and deletes the
/// namespaces.
#[derive(Debug)]
pub struct Lab {
    id: String,
    namespaces: Mutex<Vec<String>>,
    switch: Mutex<Option<Netns>>,
    veths: AtomicU32,
    children: Arc<Mutex<Vec<Pid>>>,
}

impl Lab {
    pub fn new() -> Result<Lab, LabError> {
        sweep_dead_labs();
        let pid = u64::from(std::process::id());
        let seq = u64::from(SEQUENCE.fetch_add(1, Ordering::Relaxed));
        Ok(Lab {
            id: format!("{PREFIX}{}x{}", base36(pid), base36(seq)),
            namespaces: Mutex::new(Vec::new()),
            switch: Mutex::new(None),
            veths: AtomicU32::new(0),
            children: Arc::new(Mutex::new(Vec::new())),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// A new namespace `<id>-<short>` with loopback up.
    pub fn netns(&self, short: &str) -> Result<Netns, LabError> {
        let name = format!("{}-{short}", self.id);
        ip(&["netns", "add", &name])?;
        // Registered before anything else can fail, so drop deletes it.
        if let Ok(mut list) = self.namespaces.lock() {
            list.push(name.clone());
        }
        let ns = Netns { name };
        ns.set_link("lo", true)?;
        Ok(ns)
    }

    fn switch(&self) -> Result<Netns, LabError> {
        let mut guard = self.switch.lock().map_err(|_| LabError::Panicked {
            ns: self.id.clone(),
            message: "switch lock poisoned".into(),
        })?;
        if let Some(sw) = guard.as_ref() {
            return Ok(sw.clone());
        }
        let sw = self.netns("sw")?;
        *guard = Some(sw.clone());
        Ok(sw)
    }

    /// A bridge in the lab's switch namespace, up, with multicast snooping
    /// off so VRRP's multicast reaches every port.
    pub fn bridge(&self, short: &str) -> Result<Bridge, LabError> {
        if short.len() > 15 {
            return Err(LabError::NameTooLong(short.to_owned()));
        }
        let sw = self.switch()?;
        ip(&[
            "-n",
            sw.name(),
            "link",
            "add",
            short,
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        sw.set_link(short, true)?;
        Ok(Bridge {
            name: short.to_owned(),
        })
    }

    fn next_port_name(&self) -> String {
        format!("p{}", self.veths.fetch_add(1, Ordering::Relaxed))
    }

    /// A veth from `ifname` in `ns` (with `cidrs`, up) to a port of `bridge`.
    pub fn attach(
        &self,
        ns: &Netns,
        ifname: &str,
        bridge: &Bridge,
        cidrs: &[&str],
    ) -> Result<(), LabError> {
        if ifname.len() > 15 {
            return Err(LabError::NameTooLong(ifname.to_owned()));
        }
        let sw = self.switch()?;
        let port = self.next_port_name();
        ip(&[
            "-n",
            ns.name(),
            "link",
            "add",
            ifname,
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            sw.name(),
        ])?;
        ip(&[
            "-n",
            sw.name(),
            "link",
            "set",
            &port,
            "master",
            bridge.name(),
        ])?;
        sw.set_link(&port, true)?;
        for cidr in cidrs {
            ns.add_address(ifname, cidr)?;
        }
        ns.set_link(ifname, true)
    }

    /// A direct veth pair between two namespaces.
    pub fn link(
        &self,
        a: &Netns,
        a_if: &str,
        a_cidrs: &[&str],
        b: &Netns,
        b_if: &str,
        b_cidrs: &[&str],
    ) -> Result<(), LabError> {
        for n in [a_if, b_if] {
            if n.len() > 15 {
                return Err(LabError::NameTooLong(n.to_owned()));
            }
        }
        ip(&[
            "-n",
            a.name(),
            "link",
            "add",
            a_if,
            "type",
            "veth",
            "peer",
            "name",
            b_if,
            "netns",
            b.name(),
        ])?;
        for cidr in a_cidrs {
            a.add_address(a_if, cidr)?;
        }
        for cidr in b_cidrs {
            b.add_address(b_if, cidr)?;
        }
        a.set_link(a_if, true)?;
        b.set_link(b_if, true)
    }

    /// Starts `cmd` inside `ns` through `ip netns exec` (which also mounts
    /// the namespace's own /sys), keeping the command's arguments,
    /// environment, working directory and stdio. The lab kills it on drop.
    pub fn spawn(&self, ns: &Netns, cmd: &mut Command) -> Result<LabChild, LabError> {
        let mut wrapped = Command::new("ip");
        wrapped
            .args(["netns", "exec", ns.name()])
            .arg(cmd.get_program())
            .args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => wrapped.env(k, v),
                None => wrapped.env_remove(k),
            };
        }
        if let Some(dir) = cmd.get_current_dir() {
            wrapped.current_dir(dir);
        }
        // Command does not expose its stdio settings: default to inherit
        // stdin null and let callers pipe through `spawn_piped` if needed.
        wrapped.stdin(Stdio::null());
        let command = format!("{:?}", cmd);
        let child = wrapped
            .spawn()
            .map_err(|source| LabError::Spawn { command, source })?;
        let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(0));
        if let Ok(mut list) = self.children.lock() {
            list.push(pid);
        }
        Ok(LabChild {
            child: Some(child),
            pid,
            registry: self.children.clone(),
        })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let pids: Vec<Pid> = self.children.lock().map(|l| l.clone()).unwrap_or_default();
        for pid in pids {
            // Not our child handle any more (its LabChild is alive elsewhere):
            // stop it by PID; the LabChild reaps it later.
            stop(pid, &mut || !alive(pid));
        }
        let names: Vec<String> = self
            .namespaces
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default();
        for name in names.iter().rev() {
            if let Err(e) = ip(&["netns", "del", name]) {
                eprintln!("tandem-lab: deleting namespace {name}: {e}");
            }
        }
    }
}

/// Deletes namespaces of earlier labs whose process no longer exists (a test
/// killed with SIGKILL never ran its drops).
fn sweep_dead_labs() {
    let Ok(out) = ip(&["netns", "list"]) else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(pid) = owner_pid(name) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

/// The pid encoded in a lab namespace name `tl<pid36>x<seq36>-<short>`.
fn owner_pid(name: &str) -> Option<u64> {
    let rest = name.strip_prefix(PREFIX)?;
    let (pid36, _) = rest.split_once('x')?;
    let (_, short) = rest.split_once('-')?;
    if short.is_empty() {
        return None;
    }
    u64::from_str_radix(pid36, 36).ok()
}

/// Polls until a Unix stream connection to `path` succeeds.
pub fn wait_for_unix_socket(path: &Path, timeout: Duration) -> Result<(), LabError> {
    let deadline = Instant::now() + timeout;
    loop {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(LabError::Timeout {
                    what: format!("socket {}", path.display()),
                    timeout,
                    last: e.to_string(),
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Where a workspace binary is: beside the test executable's `deps/` folder
/// (target/debug), or `CARGO_BIN_EXE_<name>` when cargo provides it.
pub fn workspace_bin(name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(format!("CARGO_BIN_EXE_{name}")) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}

/// [`workspace_bin`], or an error saying how to build it.
pub fn require_workspace_bin(name: &str) -> Result<PathBuf, LabError> {
    let path = workspace_bin(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(LabError::MissingBinary {
            name: name.to_owned(),
            path,
        })
    }
}
