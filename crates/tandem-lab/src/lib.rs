//! The namespace lab for Tandem's tests: network namespaces, veth pairs and
//! bridges with unique names, threads and processes inside them, and
//! teardown on drop — also after a panic.
//!
//! ```no_run
//! # fn main() -> Result<(), tandem_lab::LabError> {
//! use tandem_lab::Lab;
//! let lab = Lab::new()?;
//! let lan = lab.bridge("lan")?;
//! let a = lab.netns("a")?;
//! let b = lab.netns("b")?;
//! lab.attach(&a, "eth0", &lan, &["10.0.0.1/24"])?;
//! lab.attach(&b, "eth0", &lan, &["10.0.0.2/24"])?;
//! a.exec("ping", &["-c1", "-W1", "10.0.0.2"])?;
//! # Ok(()) }
//! ```
//!
//! The lab never creates or changes anything in the host's network
//! namespace, so a test can neither disturb the machine nor collide with
//! another test: veths are created directly inside lab namespaces
//! (`ip -n A link add X type veth peer name Y netns B`), and bridges live in
//! a lab-owned "switch" namespace rather than in the host. Deleting the
//! lab's namespaces therefore removes every veth and bridge it made.
//!
//! Naming (see `names.rs`): namespaces are `<lab id>-<short>`, the lab id
//! carrying the owner's pid so that a later lab sweeps leftovers of a
//! process that died without dropping its lab. Interface names inside a
//! namespace are the caller's (at most 15 bytes: IFNAMSIZ); they need no
//! prefix because every namespace is the lab's own.

mod child;
mod cmd;
mod error;
mod names;
mod netns;

use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

pub use child::LabChild;
pub use error::LabError;
pub use netns::Netns;

use child::SharedChild;
use cmd::{describe, ip};
use names::{check_ifname, check_short};

/// Short name of the switch namespace. The leading underscore keeps it
/// apart from the names tests choose.
const SWITCH: &str = "_sw";

/// How long [`Lab::attach`] and [`Lab::link`] wait for a new veth to be
/// usable; generous, for a loaded 2-core machine running tests in parallel.
const LINK_UP_TIMEOUT: Duration = Duration::from_secs(10);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A bridge inside the lab's switch namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Bridge {
    switch: Netns,
    name: String,
}

impl Bridge {
    /// The bridge's interface name inside the switch namespace.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The switch namespace holding the bridge.
    pub fn switch(&self) -> &Netns {
        &self.switch
    }
}

/// The switch end of an [`Lab::attach`]ed veth: a port of the bridge.
/// Setting it down is pulling the cable, without touching the node's side.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Port {
    switch: Netns,
    name: String,
}

impl Port {
    /// The port's interface name inside the switch namespace.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn set_link(&self, up: bool) -> Result<(), LabError> {
        self.switch.set_link(&self.name, up)
    }
}

/// A lab: owns its namespaces (and so their veths and bridges) and the
/// processes it spawned. Dropping it stops the processes (SIGTERM, 2 s
/// grace, SIGKILL, by PID, reaped) and then deletes the namespaces. Drop
/// never panics; failures are reported on stderr.
///
/// `Lab` is `Sync`: share it by reference between a test's threads.
#[derive(Debug)]
pub struct Lab {
    id: String,
    /// In creation order; deleted in reverse.
    namespaces: Mutex<Vec<Netns>>,
    switch: Mutex<Option<Netns>>,
    /// (namespace, interface) -> the bridge port at the other end.
    ports: Mutex<Vec<(Netns, String, Port)>>,
    next_port: AtomicU32,
    children: Mutex<Vec<SharedChild>>,
}

impl Lab {
    /// A new, empty lab with a unique id. First deletes namespaces left by
    /// labs of processes that are gone.
    pub fn new() -> Result<Lab, LabError> {
        let id = names::new_lab_id();
        names::sweep_dead_labs();
        Ok(Lab {
            id,
            namespaces: Mutex::new(Vec::new()),
            switch: Mutex::new(None),
            ports: Mutex::new(Vec::new()),
            next_port: AtomicU32::new(0),
            children: Mutex::new(Vec::new()),
        })
    }

    /// The lab's id, the prefix of all its namespace names.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The namespaces created so far, the switch included.
    pub fn namespaces(&self) -> Vec<Netns> {
        lock(&self.namespaces).clone()
    }

    /// A new namespace `<id>-<short>` with loopback up. Sysctls are the
    /// new namespace's defaults (IPv4 settings such as `ip_forward` are
    /// inherited from the host, as the kernel does), except that IPv6
    /// duplicate address detection is off so addresses work at once.
    pub fn netns(&self, short: &str) -> Result<Netns, LabError> {
        check_short(short)?;
        self.add_netns(short)
    }

    fn add_netns(&self, short: &str) -> Result<Netns, LabError> {
        let ns = Netns::new(&format!("{}-{short}", self.id));
        ip(&["netns", "add", ns.name()])?;
        // Registered before anything else can fail, so drop deletes it.
        lock(&self.namespaces).push(ns.clone());
        ns.set_link("lo", true)?;
        for key in [
            "net.ipv6.conf.all.accept_dad",
            "net.ipv6.conf.default.accept_dad",
        ] {
            match ns.sysctl(key, "0") {
                // A kernel without IPv6 has no such file: nothing to turn off.
                Err(LabError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound => {}
                other => other?,
            }
        }
        Ok(ns)
    }

    /// The lab's switch namespace, where its bridges live (created on first
    /// use). Tests may act on the switch, e.g. drop packets with nftables
    /// on a bridge.
    pub fn switch(&self) -> Result<Netns, LabError> {
        let mut guard = lock(&self.switch);
        if let Some(sw) = guard.as_ref() {
            return Ok(sw.clone());
        }
        let sw = self.add_netns(SWITCH)?;
        // A pure layer-2 device: no IPv6 link-local addresses, router or
        // listener reports from the bridges and ports themselves. Bridging
        // of IPv6 frames is unaffected.
        for key in [
            "net.ipv6.conf.all.disable_ipv6",
            "net.ipv6.conf.default.disable_ipv6",
        ] {
            match sw.sysctl(key, "1") {
                Err(LabError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound => {}
                other => other?,
            }
        }
        *guard = Some(sw.clone());
        Ok(sw)
    }

    /// A bridge named `short` in the switch namespace, up, with multicast
    /// snooping off: VRRP adverts (224.0.0.18, ff02::12) must reach every
    /// port whether or not anyone sent an IGMP/MLD report. STP stays off, so
    /// ports forward as soon as they are up.
    pub fn bridge(&self, short: &str) -> Result<Bridge, LabError> {
        check_ifname("bridge", short)?;
        let switch = self.switch()?;
        // Always `name X` / `dev X`: bare, `ip` would read a name such as
        // `br` as an abbreviated keyword (`broadcast`).
        switch.ip(&[
            "link",
            "add",
            "name",
            short,
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        switch.set_link(short, true)?;
        Ok(Bridge {
            switch,
            name: short.to_owned(),
        })
    }

    /// Connects `ns` to `bridge` with a veth: `ifname` inside `ns`, with
    /// `cidrs` assigned and up; the other end a port of the bridge in the
    /// switch namespace (named `p<n>`, unique in the lab; see [`Lab::port`]).
    /// Returns once both ends are operationally up.
    pub fn attach(
        &self,
        ns: &Netns,
        ifname: &str,
        bridge: &Bridge,
        cidrs: &[&str],
    ) -> Result<(), LabError> {
        check_ifname("interface", ifname)?;
        let switch = self.switch()?;
        let port = Port {
            switch: switch.clone(),
            name: format!("p{}", self.next_port.fetch_add(1, Ordering::Relaxed)),
        };
        ns.ip(&[
            "link",
            "add",
            "name",
            ifname,
            "type",
            "veth",
            "peer",
            "name",
            &port.name,
            "netns",
            switch.name(),
        ])?;
        lock(&self.ports).push((ns.clone(), ifname.to_owned(), port.clone()));
        switch.ip(&[
            "link",
            "set",
            "dev",
            &port.name,
            "master",
            bridge.name(),
            "up",
        ])?;
        for cidr in cidrs {
            ns.add_address(ifname, cidr)?;
        }
        ns.set_link(ifname, true)?;
        ns.wait_link_up(ifname, LINK_UP_TIMEOUT)?;
        switch.wait_link_up(&port.name, LINK_UP_TIMEOUT)
    }

    /// The bridge port at the other end of `ifname` in `ns`.
    pub fn port(&self, ns: &Netns, ifname: &str) -> Result<Port, LabError> {
        lock(&self.ports)
            .iter()
            .find(|(n, i, _)| n == ns && i == ifname)
            .map(|(_, _, p)| p.clone())
            .ok_or_else(|| LabError::NotAttached {
                ns: ns.name().to_owned(),
                ifname: ifname.to_owned(),
            })
    }

    /// A direct veth pair: `a_if` in `a` with `a_cidrs`, `b_if` in `b` with
    /// `b_cidrs`, both up; returns once they are operationally up.
    pub fn link(
        &self,
        a: &Netns,
        a_if: &str,
        a_cidrs: &[&str],
        b: &Netns,
        b_if: &str,
        b_cidrs: &[&str],
    ) -> Result<(), LabError> {
        check_ifname("interface", a_if)?;
        check_ifname("interface", b_if)?;
        a.ip(&[
            "link",
            "add",
            "name",
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
        b.set_link(b_if, true)?;
        a.wait_link_up(a_if, LINK_UP_TIMEOUT)?;
        b.wait_link_up(b_if, LINK_UP_TIMEOUT)
    }

    /// Starts `cmd` inside `ns`; the lab stops it when dropped.
    ///
    /// The namespace is entered between fork and exec (a `pre_exec` hook on
    /// `cmd` itself doing what `ip netns exec` does: `setns` into the
    /// network namespace, then a private mount namespace with the
    /// namespace's own /sys). So everything set on `cmd` is kept —
    /// arguments, environment, working directory, stdio, uid — and the PID
    /// is the program's own, not a wrapper's. `cmd` keeps the hook (and an
    /// open handle on the namespace) until it is dropped.
    ///
    /// Only the process itself is tracked: processes it forks are its own
    /// business (the lab kills by PID, never by name or group).
    pub fn spawn(&self, ns: &Netns, cmd: &mut Command) -> Result<LabChild, LabError> {
        let what = format!("{} (in netns {})", describe(cmd), ns.name());
        ns.enter_on_exec(cmd)?;
        let child = cmd.spawn().map_err(|source| LabError::Spawn {
            command: what.clone(),
            source,
        })?;
        let (handle, shared) = LabChild::new(child, what);
        let mut children = lock(&self.children);
        // Forget the processes already stopped and reaped by their handles.
        children.retain(|c| {
            c.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
        });
        children.push(shared);
        Ok(handle)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Processes first: a daemon killed after its namespace is gone would
        // log confusing errors about vanished interfaces.
        let children = std::mem::take(&mut *lock(&self.children));
        child::stop_all(&children, child::GRACE);
        let namespaces = std::mem::take(&mut *lock(&self.namespaces));
        for ns in namespaces.iter().rev() {
            if let Err(e) = ip(&["netns", "del", ns.name()]) {
                eprintln!("tandem-lab: lab {}: deleting namespace: {e}", self.id);
            }
        }
        names::forget_lab_id(&self.id);
    }
}

/// Polls until a Unix stream connection to `path` succeeds (a daemon's
/// gRPC socket is ready), or `timeout` passes.
pub fn wait_for_unix_socket(path: &Path, timeout: Duration) -> Result<(), LabError> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => {
                let _ = s.shutdown(Shutdown::Both);
                return Ok(());
            }
            Err(e) if Instant::now() >= deadline => {
                return Err(LabError::Timeout {
                    what: format!("Unix socket {}", path.display()),
                    timeout,
                    last: e.to_string(),
                });
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Where the workspace binary `name` is: `CARGO_BIN_EXE_<name>` when set
/// (nextest sets it at run time), else beside the running test executable's
/// `deps/` directory, i.e. `target/<profile>/<name>`. The path may not
/// exist; see [`require_workspace_bin`].
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
