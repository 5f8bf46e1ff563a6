//! A handle on one of the lab's network namespaces, and the two ways of
//! acting inside it: a thread that has entered it, or a process that enters
//! it between fork and exec.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns, unshare};

use crate::LabError;
use crate::cmd::{describe, ip, output};

/// A network namespace of a [`Lab`](crate::Lab). A cheap handle: cloning it
/// copies a name; the lab owns the namespace and deletes it on drop, after
/// which the handle's operations fail.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Netns {
    name: Arc<str>,
}

impl Netns {
    pub(crate) fn new(name: &str) -> Netns {
        Netns { name: name.into() }
    }

    /// The namespace's name as `ip netns` shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`, the file that keeps the namespace alive.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    fn open(&self) -> Result<File, LabError> {
        let path = self.path();
        File::open(&path).map_err(|source| LabError::Io {
            what: format!("opening network namespace {}", path.display()),
            source,
        })
    }

    /// Makes the calling thread a member of this namespace.
    fn enter_thread(&self) -> Result<(), LabError> {
        let file = self.open()?;
        setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| LabError::Setns {
            ns: self.name.to_string(),
            source,
        })
    }

    /// Arranges for `cmd` to enter this namespace between fork and exec,
    /// the way `ip netns exec` does (see [`Lab::spawn`](crate::Lab::spawn)).
    ///
    /// The namespace file is opened now and moved into the hook, so a
    /// `Command` spawned twice enters the same namespace both times.
    pub(crate) fn enter_on_exec(&self, cmd: &mut Command) -> Result<(), LabError> {
        let file = self.open()?;
        let sysfs_source =
            CString::new(self.name.as_bytes()).map_err(|_| LabError::InvalidName {
                what: "namespace",
                name: self.name.to_string(),
                reason: "it contains a NUL byte",
            })?;
        // SAFETY: the hook runs in the forked child before exec and only
        // makes system calls (no allocation, no locks), which is what
        // `pre_exec` requires.
        unsafe {
            cmd.pre_exec(move || enter_in_child(&file, &sysfs_source));
        }
        Ok(())
    }

    /// Runs `program args` inside the namespace to completion. A non-zero
    /// exit is a [`LabError::Command`] naming the namespace, the command
    /// line and its stderr.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output, LabError> {
        let mut cmd = Command::new(program);
        cmd.args(args);
        let what = format!("{} (in netns {})", describe(&cmd), self.name);
        self.enter_on_exec(&mut cmd)?;
        output(&mut cmd, what)
    }

    /// `ip -n <ns> ARGS...`
    pub fn ip(&self, args: &[&str]) -> Result<Output, LabError> {
        let mut full = vec!["-n", &self.name];
        full.extend_from_slice(args);
        ip(&full)
    }

    pub fn add_address(&self, ifname: &str, cidr: &str) -> Result<(), LabError> {
        let mut args = vec!["addr", "add", cidr, "dev", ifname];
        // IPv6 addresses usable at once, without duplicate address detection.
        if cidr.contains(':') {
            args.push("nodad");
        }
        self.ip(&args).map(drop)
    }

    pub fn remove_address(&self, ifname: &str, cidr: &str) -> Result<(), LabError> {
        self.ip(&["addr", "del", cidr, "dev", ifname]).map(drop)
    }

    /// The addresses on `ifname`, as `10.0.0.1/24` / `fd00::1/64`.
    pub fn addresses(&self, ifname: &str) -> Result<Vec<String>, LabError> {
        // Read over netlink from a thread inside the namespace (getifaddrs),
        // not by starting `ip`: tests and benchmarks poll this while they
        // measure, and a fork and exec every few milliseconds would take
        // the CPU they measure.
        let name = ifname.to_owned();
        let found = self.run(move || -> Result<Option<Vec<String>>, nix::Error> {
            let mut exists = false;
            let mut out = Vec::new();
            for a in nix::ifaddrs::getifaddrs()? {
                if a.interface_name != name {
                    continue;
                }
                exists = true;
                let (Some(addr), Some(mask)) = (a.address, a.netmask) else {
                    continue;
                };
                if let (Some(ip), Some(m)) = (addr.as_sockaddr_in(), mask.as_sockaddr_in()) {
                    out.push(format!("{}/{}", ip.ip(), m.ip().to_bits().count_ones()));
                } else if let (Some(ip), Some(m)) = (addr.as_sockaddr_in6(), mask.as_sockaddr_in6())
                {
                    out.push(format!("{}/{}", ip.ip(), m.ip().to_bits().count_ones()));
                }
            }
            Ok(exists.then_some(out))
        })?;
        match found {
            Ok(Some(addresses)) => Ok(addresses),
            Ok(None) => Err(LabError::Io {
                what: format!("reading the addresses of {ifname} in netns {}", self.name),
                source: io::Error::new(io::ErrorKind::NotFound, "no such interface"),
            }),
            Err(e) => Err(LabError::Io {
                what: format!("reading the addresses of {ifname} in netns {}", self.name),
                source: io::Error::from(e),
            }),
        }
    }

    pub fn set_link(&self, ifname: &str, up: bool) -> Result<(), LabError> {
        self.ip(&["link", "set", "dev", ifname, if up { "up" } else { "down" }])
            .map(drop)
    }

    /// Waits until `ifname` is operationally up. The kernel finishes
    /// bringing a link up asynchronously (linkwatch attaches its queueing
    /// discipline after carrier comes on); a packet sent before that — an
    /// ARP reply, say — is dropped, and the first exchange then costs a 1 s
    /// ARP retransmission. A veth is up only once both its ends are.
    pub fn wait_link_up(&self, ifname: &str, timeout: Duration) -> Result<(), LabError> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.ip(&["-o", "link", "show", "dev", ifname])?;
            let text = String::from_utf8_lossy(&out.stdout);
            let mut words = text.split_whitespace();
            let state = words
                .find(|w| *w == "state")
                .and_then(|_| words.next())
                .unwrap_or("(unknown)");
            if state == "UP" {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(LabError::Timeout {
                    what: format!("link {ifname} in netns {}", self.name),
                    timeout,
                    last: format!("state {state}"),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sets a sysctl of this namespace, e.g. `net.netfilter.nf_conntrack_tcp_loose`.
    /// `key` uses dots, or slashes when a component (an interface name such as
    /// `eth0.10`) contains a dot.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), LabError> {
        let path = sysctl_path(key);
        let what = format!("setting {key} = {value} in netns {}", self.name);
        self.run(|| std::fs::write(&path, value))?
            .map_err(|source| LabError::Io { what, source })
    }

    /// Reads a sysctl of this namespace, trimmed.
    pub fn read_sysctl(&self, key: &str) -> Result<String, LabError> {
        let path = sysctl_path(key);
        let what = format!("reading {key} in netns {}", self.name);
        self.run(|| std::fs::read_to_string(&path))?
            .map(|v| v.trim().to_owned())
            .map_err(|source| LabError::Io { what, source })
    }

    /// Runs `f` on a fresh thread that has entered the namespace, and waits
    /// for it. Sockets `f` opens belong to the namespace (an IP or netlink
    /// socket belongs to the namespace of the thread that created it) and
    /// keep working there after `f` returns, from any thread: open a
    /// listener here and serve it from an ordinary thread.
    ///
    /// A panic in `f` becomes [`LabError::Panicked`] (the panic message is
    /// still printed by the panic hook) rather than being resumed, so the
    /// caller's `expect` names the namespace.
    ///
    /// The thread is discarded afterwards: the caller's own thread never
    /// changes namespace.
    pub fn run<F, T>(&self, f: F) -> Result<T, LabError>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        std::thread::scope(|scope| {
            let handle = std::thread::Builder::new()
                .name(format!("netns {}", self.name))
                .spawn_scoped(scope, || -> Result<T, LabError> {
                    self.enter_thread()?;
                    Ok(f())
                })
                .map_err(|source| LabError::Io {
                    what: format!("starting a thread for netns {}", self.name),
                    source,
                })?;
            handle.join().unwrap_or_else(|panic| {
                Err(LabError::Panicked {
                    ns: self.name.to_string(),
                    message: panic_message(panic.as_ref()),
                })
            })
        })
    }

    /// Starts `f` on a thread that has entered the namespace, without
    /// waiting: for servers and other long-running work. Joining gives `f`'s
    /// result, or the error entering the namespace; a panic surfaces as the
    /// join's `Err`, as with any thread.
    pub fn spawn_thread<F, T>(&self, f: F) -> Result<JoinHandle<Result<T, LabError>>, LabError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let ns = self.clone();
        std::thread::Builder::new()
            .name(format!("netns {}", self.name))
            .spawn(move || {
                ns.enter_thread()?;
                Ok(f())
            })
            .map_err(|source| LabError::Io {
                what: format!("starting a thread for netns {}", self.name),
                source,
            })
    }

    /// Polls a TCP connect to `addr` from inside the namespace until it
    /// succeeds or `timeout` passes.
    pub fn wait_tcp(&self, addr: SocketAddr, timeout: Duration) -> Result<(), LabError> {
        let ns = self.name.to_string();
        self.run(move || {
            let deadline = Instant::now() + timeout;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let attempt = left.clamp(Duration::from_millis(1), Duration::from_millis(200));
                match TcpStream::connect_timeout(&addr, attempt) {
                    Ok(_) => return Ok(()),
                    Err(e) if Instant::now() >= deadline => {
                        return Err(LabError::Timeout {
                            what: format!("TCP {addr} from netns {ns}"),
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

fn sysctl_path(key: &str) -> PathBuf {
    let rel = if key.contains('/') {
        key.trim_start_matches('/').to_owned()
    } else {
        key.replace('.', "/")
    };
    PathBuf::from("/proc/sys").join(rel)
}

pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "(non-string panic payload)".to_owned())
}

/// What `ip netns exec` does, in the forked child: join the network
/// namespace, then give the process its own mount namespace with a fresh
/// /sys, so /sys/class/net lists the namespace's interfaces rather than the
/// host's. (/etc/netns/<name> bind mounts are not replicated: the lab does
/// not use them.)
///
/// Only system calls here: between fork and exec in a multi-threaded parent,
/// allocating or locking could deadlock.
fn enter_in_child(netns: &File, sysfs_source: &CString) -> io::Result<()> {
    setns(netns, CloneFlags::CLONE_NEWNET)?;
    unshare(CloneFlags::CLONE_NEWNS)?;
    // Keep our mount changes from propagating back to the host.
    // SAFETY: constant NUL-terminated strings; null data is allowed.
    let rc = unsafe {
        libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_SLAVE | libc::MS_REC,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut flags: libc::c_ulong = 0;
    // SAFETY: constant NUL-terminated path.
    if unsafe { libc::umount2(c"/sys".as_ptr(), libc::MNT_DETACH) } != 0 {
        // Could not unmount the old /sys: overlay it instead, read-only if
        // it was (a read-only sysfs cannot be shadowed by a writable one).
        // SAFETY: `st` is a plain C struct the call fills in.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: constant path, valid out-pointer.
        if unsafe { libc::statvfs(c"/sys".as_ptr(), &mut st) } == 0
            && st.f_flag & libc::ST_RDONLY != 0
        {
            flags = libc::MS_RDONLY;
        }
    }
    // SAFETY: NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            sysfs_source.as_ptr(),
            c"/sys".as_ptr(),
            c"sysfs".as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
