//! Tandem under a real systemd: two Debian bookworm containers, `lb1` and
//! `lb2`, booted by `systemd-nspawn` with systemd as PID 1, each joined to a
//! lab network namespace (eth0 on the clients' LAN 10.0.0.0/24, eth1 on the
//! backends' network 10.1.0.0/24, eth2 on the cluster link
//! 192.168.100.0/24), each with its own sshd and a lab-only root password,
//! and Tandem installed from the .deb with `dpkg -i`. Two backends answer
//! TCP on :8080 with their name; a client namespace reaches the farms
//! through the VIP 10.0.0.100. The test then drives the nodes through
//! `systemctl` and `tandemctl` run inside the containers.
//!
//! The base system is made once with `debootstrap --variant=minbase`
//! (systemd, dbus, openssh-server, nftables, conntrack, iproute2, procps) from
//! the Debian mirror of this machine's apt sources and cached in
//! `/var/cache/tandem-test/bookworm-<key>`; each container is an overlay
//! mount over it, so a run starts from a pristine node in seconds and a
//! container restart keeps its own changes (a reboot). Delete the cache
//! directory to rebuild it.
//!
//! Nothing touches the host: containers never register with a machine
//! manager (`--register=no --keep-unit`; this machine's PID 1 is not
//! systemd), their network is the lab's namespaces only, and the host's
//! systemd, if any, is never asked anything. Everything is undone on drop,
//! also after a panic: containers are powered off (then killed, by PID),
//! overlays unmounted, directories removed, namespaces deleted. A run
//! killed outright (SIGKILL) leaves its directory under
//! `/var/tmp/tandem-systemd-lab/<pid>-…`: the next run removes it, and
//! stops the container it names if that is still alive.
//!
//! Found on the way (this host): nspawn drops CAP_NET_ADMIN unless it creates
//! the network itself, so it is given back (`--capability=`, as a real
//! node's root has it), with CAP_IPC_LOCK (vrrpd's mlockall); nspawn
//! without a machine manager puts its container in `payload/` under its own
//! cgroup, so two containers started from one process would share their
//! units' cgroups (one node's `systemctl stop` then removes the other's,
//! whose next start fails with `status=219/CGROUP`): each nspawn starts in a
//! cgroup of its own, removed with the container; and the containers run
//! cgroup v2 (`SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1`), as a Debian bookworm
//! machine does, on this host whose own cgroups are v1 (hybrid), where
//! `systemctl kill` without `--kill-who=main` fails with "Input/output
//! error".

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tandem_lab::{Lab, Netns};

pub use crate::cluster_lab::ROOT_PASSWORD;

pub const CACHE_DIR: &str = "/var/cache/tandem-test";
const RUN_DIR: &str = "/var/tmp/tandem-systemd-lab";
const SUITE: &str = "bookworm";
/// What each node needs besides `--variant=minbase`: systemd as PID 1 and
/// its bus, sshd with SFTP (cfg-syncd, cluster create), the .deb's
/// dependencies (nftables, conntrack), `ip` (clustermanager's preflight)
/// and `ps` for whoever reads a failure.
const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "openssh-sftp-server",
    "nftables",
    "conntrack",
    "iproute2",
    "procps",
];
/// Changes with the preparation of the base below: a new value, a new cache.
const RECIPE: u32 = 1;

pub const VIP: &str = "10.0.0.100";
pub const SNAT: &str = "10.1.0.100";
pub const NODES: [&str; 2] = ["lb1", "lb2"];
/// The five units of a node, in start order.
pub const UNITS: [&str; 5] = [
    "lb-forwarder",
    "conntrack-syncd",
    "vrrpd",
    "cfg-syncd",
    "clustermanager",
];

/// The package's other units: routed runs on every node and, on a node that
/// is not active-active, writes no BIRD configuration, so tandem-bird's
/// condition keeps BIRD stopped.
pub const ROUTED: &str = "routed";
pub const BIRD_UNIT: &str = "tandem-bird";
/// Every Tandem daemon a node of this cluster runs.
pub const RUNNING: [&str; 6] = [
    "lb-forwarder",
    "conntrack-syncd",
    "vrrpd",
    "cfg-syncd",
    "clustermanager",
    ROUTED,
];

/// The farm the future master serves before the cluster exists.
pub const WEB: &str = "name = \"web\"\nvip = \"10.0.0.100\"\nport = 80\nsnat_address = \"10.1.0.100\"\n\
[health_check]\nkind = \"tcp\"\ninterval_ms = 1000\ntimeout_ms = 500\n\
[[backends]]\naddress = \"10.1.0.11\"\nport = 8080\n[[backends]]\naddress = \"10.1.0.12\"\nport = 8080\n";
/// The farm added to the running cluster.
pub const API: &str = "name = \"api\"\nvip = \"10.0.0.100\"\nport = 8081\nsnat_address = \"10.1.0.100\"\n\
[health_check]\nkind = \"none\"\n\
[[backends]]\naddress = \"10.1.0.11\"\nport = 8080\n[[backends]]\naddress = \"10.1.0.12\"\nport = 8080\n";

fn log(msg: &str) {
    eprintln!("[systemd lab] {msg}");
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// FNV-1a: a hash that stays the same from one Rust release to the next.
fn fnv(data: &str) -> u64 {
    data.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The Debian mirror of this machine's apt sources (deb822 `.sources` or
/// one-line `sources.list`) that carries the suite; Debian's own otherwise.
pub fn mirror() -> String {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    for file in files {
        let Ok(body) = fs::read_to_string(&file) else {
            continue;
        };
        let name = file.to_string_lossy();
        if name.ends_with(".sources") {
            for stanza in body.split("\n\n") {
                let field = |key: &str| {
                    stanza.lines().find_map(|l| {
                        l.strip_prefix(key)
                            .and_then(|r| r.strip_prefix(':'))
                            .map(str::trim)
                    })
                };
                let (Some(uris), Some(suites)) = (field("URIs"), field("Suites")) else {
                    continue;
                };
                let debs = field("Types").is_none_or(|t| t.split_whitespace().any(|t| t == "deb"));
                if debs
                    && suites.split_whitespace().any(|s| s == SUITE)
                    && let Some(uri) = uris.split_whitespace().next()
                {
                    return uri.to_owned();
                }
            }
        } else if name.ends_with(".list") {
            for line in body.lines() {
                let words: Vec<&str> = line
                    .split_whitespace()
                    .filter(|w| !w.starts_with('['))
                    .collect();
                if words.len() >= 3 && words[0] == "deb" && words[2] == SUITE {
                    return words[1].to_owned();
                }
            }
        }
    }
    "http://deb.debian.org/debian".to_owned()
}

/// The cached base root file system, built on first use (a few minutes):
/// debootstrap, then what every node shares. Concurrent test processes
/// wait for one build.
pub fn base_rootfs() -> PathBuf {
    let mirror = mirror();
    let key = fnv(&format!("{SUITE} {mirror} {} {RECIPE}", PACKAGES.join(",")));
    let dir = PathBuf::from(CACHE_DIR).join(format!("{SUITE}-{key:016x}"));
    let done = dir.join(".tandem-base-complete");
    if done.exists() {
        return dir;
    }
    fs::create_dir_all(CACHE_DIR).expect("cache dir");
    let lock = fs::File::create(Path::new(CACHE_DIR).join(".lock")).expect("cache lock");
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("locking the cache");
    if done.exists() {
        return dir;
    }
    let debootstrap = ["/usr/sbin/debootstrap", "/sbin/debootstrap"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .expect("debootstrap is missing: apt-get install debootstrap");
    let partial = dir.with_extension("partial");
    let _ = fs::remove_dir_all(&partial);
    log(&format!(
        "building the base system {} from {mirror} (once; cached)",
        dir.display()
    ));
    let started = Instant::now();
    let out = Command::new(debootstrap)
        .arg("--variant=minbase")
        .arg(format!("--include={}", PACKAGES.join(",")))
        .arg(SUITE)
        .arg(&partial)
        .arg(&mirror)
        .stdin(Stdio::null())
        .output()
        .expect("running debootstrap");
    assert!(
        out.status.success(),
        "debootstrap failed: {}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    // Each node gets its own host keys, machine id and hostname.
    for entry in fs::read_dir(partial.join("etc/ssh"))
        .expect("etc/ssh")
        .flatten()
    {
        if entry.file_name().to_string_lossy().starts_with("ssh_host_") {
            fs::remove_file(entry.path()).expect("removing a host key");
        }
    }
    fs::write(partial.join("etc/machine-id"), "").expect("machine-id");
    let _ = fs::remove_file(partial.join("var/lib/dbus/machine-id"));
    let _ = fs::remove_file(partial.join("etc/hostname"));
    // A persistent journal: a node's log outlives its reboot, as on disk.
    fs::create_dir_all(partial.join("var/log/journal")).expect("journal dir");
    fs::write(partial.join(".tandem-base-complete"), "").expect("marker");
    fs::rename(&partial, &dir).expect("publishing the base");
    log(&format!(
        "base system ready in {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    dir
}

/// The .deb to install: `TANDEM_DEB`, or the newest
/// `target/debian/tandem_*.deb`. It must be newer than every source file
/// packed into it, or the test would prove an older build.
pub fn deb_package() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let deb = match std::env::var_os("TANDEM_DEB") {
        Some(p) => PathBuf::from(p),
        None => {
            let target = tandem_lab::workspace_bin("tandemctl")
                .parent()
                .and_then(Path::parent)
                .map(Path::to_path_buf)
                .expect("target dir");
            let newest = fs::read_dir(target.join("debian"))
                .ok()
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    let n = p.file_name().unwrap_or_default().to_string_lossy();
                    n.starts_with("tandem_") && n.ends_with(".deb")
                })
                .max_by_key(|p| fs::metadata(p).and_then(|m| m.modified()).ok());
            newest.unwrap_or_else(|| {
                panic!(
                    "no .deb in {}/debian: run deploy/build-deb.sh first (deploy/test-systemd.sh does both)",
                    target.display()
                )
            })
        }
    };
    let built = fs::metadata(&deb)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}", deb.display()));
    let mut stale = Vec::new();
    for dir in ["crates", "systemd", "deploy/deb", "deploy/sshd", "proto"] {
        newer_files(&repo.join(dir), built, &mut stale);
    }
    assert!(
        stale.is_empty(),
        "{} is older than {} (and more): run deploy/build-deb.sh again",
        deb.display(),
        stale[0].display()
    );
    deb
}

fn newer_files(dir: &Path, than: std::time::SystemTime, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let Ok(md) = e.metadata() else { continue };
        if md.is_dir() {
            if !path.ends_with("tests") && !path.ends_with("benches") {
                newer_files(&path, than, out);
            }
        } else if md.modified().is_ok_and(|m| m > than) {
            out.push(path);
        }
    }
}

/// `openssl passwd -6` of `password`: a shadow hash.
fn password_hash(password: &str) -> String {
    let mut child = Command::new("openssl")
        .args(["passwd", "-6", "-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("openssl (apt-get install openssl)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(password.as_bytes())
        .expect("password to openssl");
    let out = child.wait_with_output().expect("openssl passwd");
    assert!(out.status.success(), "openssl passwd failed");
    text(&out.stdout).trim().to_owned()
}

/// The container's PID 1 among nspawn's children: the one that is PID 1 in
/// a PID namespace of its own (nspawn's short-lived helper child is not).
fn container_init(nspawn: u32) -> Option<u32> {
    children_of(nspawn).into_iter().find(|pid| {
        fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .is_some_and(|ids| {
                    let ids: Vec<&str> = ids.split_whitespace().collect();
                    ids.len() > 1 && ids.last() == Some(&"1")
                })
        })
    })
}

/// Every process whose parent is `parent`.
fn children_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let ppid = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .and_then(|v| v.trim().parse::<u32>().ok());
        if ppid == Some(parent) {
            out.push(pid);
        }
    }
    out
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
}

fn signal(pid: u32, sig: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(pid), sig);
    }
}

/// Whether `path` is a mount point (in /proc/self/mounts).
fn is_mounted(path: &Path) -> bool {
    let p = path.to_string_lossy();
    fs::read_to_string("/proc/self/mounts")
        .is_ok_and(|m| m.lines().any(|l| l.split_whitespace().nth(1) == Some(&*p)))
}

fn unmount(path: &Path) {
    for _ in 0..50 {
        if !is_mounted(path) {
            return;
        }
        let _ = Command::new("umount").arg(path).output();
        if !is_mounted(path) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = Command::new("umount").arg("--lazy").arg(path).output();
    if !out.is_ok_and(|o| o.status.success()) {
        eprintln!("systemd lab: cannot unmount {}", path.display());
    }
}

/// Where a container's own cgroup goes: below this process's cgroup in the
/// unified (cgroup v2) hierarchy, which nspawn names its cgroups after
/// (`/sys/fs/cgroup` on a v2 host, `/sys/fs/cgroup/unified` on a hybrid one
/// like this), and the same path in the v1 `name=systemd` hierarchy, where
/// nspawn makes a compatible copy on a hybrid host.
fn cgroup_dirs(name: &str) -> Vec<PathBuf> {
    let Ok(own) = fs::read_to_string("/proc/self/cgroup") else {
        return Vec::new();
    };
    let Some(path) = own.lines().find_map(|l| l.strip_prefix("0::")) else {
        return Vec::new();
    };
    let rel = Path::new(path.trim_start_matches('/')).join(name);
    let unified = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .find(|d| Path::new(d).join("cgroup.controllers").exists());
    let Some(unified) = unified else {
        return Vec::new();
    };
    let mut dirs = vec![Path::new(unified).join(&rel)];
    if Path::new("/sys/fs/cgroup/systemd/cgroup.procs").exists() {
        dirs.push(Path::new("/sys/fs/cgroup/systemd").join(&rel));
    }
    dirs
}

/// Removes a cgroup and everything below it that is empty (deepest first).
fn remove_cgroup(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup(&e.path());
        }
    }
    let _ = fs::remove_dir(dir);
}

static SEQUENCE: AtomicU32 = AtomicU32::new(0);

/// Removes what runs of processes that are gone left behind: the container
/// a directory names is killed (its PID 1, by the PID recorded there and
/// only if that process's root is this very directory), its overlay
/// unmounted, the directory removed.
fn sweep_leftovers() {
    let Ok(entries) = fs::read_dir(RUN_DIR) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let dir = e.path();
        let root = dir.join("root");
        if let Some(leader) = fs::read_to_string(dir.join("leader.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
        {
            let its_root = fs::read_link(format!("/proc/{leader}/root")).ok();
            if alive(leader) && its_root.as_deref() == Some(root.as_path()) {
                eprintln!("systemd lab: stopping container {name} left by dead process {pid}");
                signal(leader, Signal::SIGKILL);
                let deadline = Instant::now() + Duration::from_secs(10);
                while alive(leader) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        unmount(&root);
        if let Ok(cgroups) = fs::read_to_string(dir.join("cgroups")) {
            for cg in cgroups.lines() {
                remove_cgroup(Path::new(cg));
            }
        }
        if let Err(e) = fs::remove_dir_all(&dir) {
            eprintln!("systemd lab: removing {}: {e}", dir.display());
        }
    }
}

/// A booted (or bootable) container: an overlay over the base, nspawn, and
/// its PID 1.
pub struct Container {
    pub name: String,
    pub ns: Netns,
    dir: PathBuf,
    root: PathBuf,
    machine: String,
    nspawn: Option<Child>,
    leader: Option<u32>,
    mounted: bool,
    /// The container's own cgroups (see [`cgroup_dirs`]).
    cgroups: Vec<PathBuf>,
}

impl Container {
    /// The container's directory and overlay, prepared as a fresh node:
    /// hostname, machine id, its own SSH host keys, root's lab password, an
    /// sshd that lets root in with it, and the .deb in /root.
    pub fn create(base: &Path, name: &str, ns: Netns, deb: &Path) -> Container {
        let seq = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{seq}-{name}", std::process::id());
        let dir = Path::new(RUN_DIR).join(&id);
        let root = dir.join("root");
        for d in ["upper", "work", "root"] {
            fs::create_dir_all(dir.join(d)).expect("container dirs");
        }
        let mut c = Container {
            name: name.to_owned(),
            ns,
            root: root.clone(),
            machine: format!("tandem-{id}"),
            dir: dir.clone(),
            nspawn: None,
            leader: None,
            mounted: false,
            cgroups: Vec::new(),
        };
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            base.display(),
            dir.join("upper").display(),
            dir.join("work").display()
        );
        let out = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &options])
            .arg(&root)
            .output()
            .expect("mount");
        assert!(
            out.status.success(),
            "overlay mount on {}: {}",
            root.display(),
            text(&out.stderr)
        );
        c.mounted = true;

        c.write("etc/hostname", &format!("{name}\n"));
        let mut id = [0u8; 16];
        fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut id))
            .expect("urandom");
        let machine_id: String = id.iter().map(|b| format!("{b:02x}")).collect();
        c.write("etc/machine-id", &format!("{machine_id}\n"));
        // root's lab-only password (the machine's own is never touched).
        let shadow = fs::read_to_string(root.join("etc/shadow")).expect("shadow");
        let hash = password_hash(ROOT_PASSWORD);
        let shadow: String = shadow
            .lines()
            .map(|l| match l.split_once(':') {
                Some(("root", rest)) => {
                    let rest = rest.split_once(':').map_or("", |(_, r)| r);
                    format!("root:{hash}:{rest}\n")
                }
                _ => format!("{l}\n"),
            })
            .collect();
        c.write("etc/shadow", &shadow);
        fs::set_permissions(root.join("etc/shadow"), fs::Permissions::from_mode(0o640))
            .expect("chmod shadow");
        let out = Command::new("ssh-keygen")
            .arg("-A")
            .arg("-f")
            .arg(&root)
            .output()
            .expect("ssh-keygen -A");
        assert!(out.status.success(), "ssh-keygen -A: {}", text(&out.stderr));
        // Cluster creation logs in as root with the password once (see
        // docs/cluster.md). Lab-only: a node may turn it off afterwards.
        c.write(
            "etc/ssh/sshd_config.d/00-lab.conf",
            "# The lab's nodes: root logs in with the lab password for cluster create.\n\
             PermitRootLogin yes\nPasswordAuthentication yes\n",
        );
        fs::copy(deb, root.join("root/tandem.deb")).expect("copying the .deb");
        c
    }

    /// Writes a file inside the container (as an administrator's editor
    /// would), parent directories created.
    pub fn write(&self, rel: &str, body: &str) {
        let path = self.root.join(rel);
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(&path, body).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }

    pub fn read(&self, rel: &str) -> Option<String> {
        fs::read_to_string(self.root.join(rel)).ok()
    }

    pub fn exists(&self, rel: &str) -> bool {
        self.root.join(rel).exists()
    }

    pub fn running(&mut self) -> bool {
        match self.nspawn.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Boots the container and waits until systemd reports the boot done.
    pub fn boot(&mut self) {
        self.start();
        self.wait_booted();
    }

    /// Starts nspawn and finds the container's PID 1. Call it from the
    /// thread that keeps the container: nspawn powers the container off
    /// when the thread that started it ends (so that a test process killed
    /// outright leaves no container running).
    pub fn start(&mut self) {
        assert!(!self.running(), "{} is already running", self.name);
        let console = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("console.log"))
            .expect("console log");
        // nspawn starts in a cgroup of the container's own (`sh` moves
        // itself there, then becomes nspawn: same process), or both
        // containers would share their units' cgroups.
        self.cgroups = cgroup_dirs(&self.machine);
        let list: Vec<String> = self
            .cgroups
            .iter()
            .map(|c| c.to_string_lossy().into_owned())
            .collect();
        fs::write(self.dir.join("cgroups"), list.join("\n")).expect("cgroups");
        let mut cmd = Command::new("sh");
        match self.cgroups.first() {
            Some(cg) => {
                fs::create_dir_all(cg).unwrap_or_else(|e| panic!("cgroup {}: {e}", cg.display()));
                cmd.arg("-c")
                    .arg("echo $$ > \"$1/cgroup.procs\" && shift && exec \"$@\"")
                    .arg("sh")
                    .arg(cg)
            }
            None => cmd.arg("-c").arg("exec \"$@\"").arg("sh"),
        };
        // cgroup v2 inside, as on a Debian bookworm machine.
        cmd.env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1")
            .arg("systemd-nspawn")
            .args(["--quiet", "--boot", "--register=no", "--keep-unit"])
            .arg("--capability=CAP_NET_ADMIN,CAP_IPC_LOCK")
            .arg(format!(
                "--network-namespace-path={}",
                self.ns.path().display()
            ))
            .arg(format!("--machine={}", self.machine))
            .arg("--console=read-only")
            .arg("-D")
            .arg(&self.root)
            .stdin(Stdio::null())
            .stdout(console.try_clone().expect("console"))
            .stderr(console);
        // If this thread (the test) dies without dropping the container,
        // nspawn powers it off (SIGTERM is its orderly shutdown).
        // SAFETY: prctl is async-signal-safe; nothing else runs here.
        unsafe {
            cmd.pre_exec(|| {
                if libc_prctl_pdeathsig() != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .expect("systemd-nspawn (apt-get install systemd-container)");
        let nspawn = child.id();
        self.nspawn = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        let leader = loop {
            if let Some(pid) = container_init(nspawn) {
                break pid;
            }
            assert!(
                self.running(),
                "{}: systemd-nspawn exited:\n{}",
                self.name,
                self.console()
            );
            assert!(
                Instant::now() < deadline,
                "{}: no container init",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        self.leader = Some(leader);
        fs::write(self.dir.join("leader.pid"), leader.to_string()).expect("leader.pid");
    }

    /// Waits until systemd in the container says the boot is done.
    pub fn wait_booted(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let out = self.exec(&["systemctl", "is-system-running", "--wait"], None);
            let state = text(&out.stdout).trim().to_owned();
            if state == "running" || state == "degraded" {
                if state == "degraded" {
                    let failed = self.sh("systemctl --failed --no-legend --plain");
                    log(&format!("{}: booted degraded: {failed}", self.name));
                }
                break;
            }
            assert!(
                self.running(),
                "{}: the container stopped while booting:\n{}",
                self.name,
                self.console()
            );
            assert!(
                Instant::now() < deadline,
                "{}: not booted after 180 s ({state}):\n{}",
                self.name,
                self.console()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn console(&self) -> String {
        fs::read_to_string(self.dir.join("console.log")).unwrap_or_default()
    }

    /// Powers the container off the way `machinectl poweroff` does (nspawn
    /// turns SIGTERM into SIGRTMIN+3 for systemd: an orderly shutdown, every
    /// unit stopped in order) and waits for it; kills it if it hangs.
    pub fn poweroff(&mut self) -> Duration {
        let started = Instant::now();
        let Some(mut child) = self.nspawn.take() else {
            return Duration::ZERO;
        };
        signal(child.id(), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            if Instant::now() > deadline {
                eprintln!(
                    "systemd lab: {} did not power off in 90 s: killing it",
                    self.name
                );
                if let Some(l) = self.leader {
                    signal(l, Signal::SIGKILL);
                }
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.leader = None;
        let _ = fs::remove_file(self.dir.join("leader.pid"));
        for cg in &self.cgroups {
            remove_cgroup(cg);
        }
        started.elapsed()
    }

    /// `program args` inside the container (all of its namespaces: its
    /// mounts, its systemd, its network), with a clean environment and
    /// `stdin` fed in.
    pub fn exec(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let leader = self.leader.expect("container not booted");
        let mut child = Command::new("nsenter")
            .arg(format!("--target={leader}"))
            .arg("--all")
            .args([
                "env",
                "-i",
                "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG=C.UTF-8",
                "SYSTEMD_PAGER=",
                "SYSTEMD_COLORS=0",
                "TERM=dumb",
            ])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nsenter");
        let mut input = child.stdin.take().expect("stdin");
        if let Some(s) = stdin {
            let _ = input.write_all(s.as_bytes());
        }
        drop(input);
        child.wait_with_output().expect("nsenter")
    }

    /// `sh -c script` inside the container; its stdout, or a panic with
    /// everything it said.
    pub fn sh(&self, script: &str) -> String {
        let out = self.exec(&["sh", "-c", script], None);
        if !out.status.success() {
            let journal = self.exec(
                &[
                    "journalctl",
                    "--no-pager",
                    "-n",
                    "40",
                    "-o",
                    "short-precise",
                ],
                None,
            );
            panic!(
                "{}: `{script}` failed ({}):\n{}{}\nthe journal's end:\n{}",
                self.name,
                out.status,
                text(&out.stdout),
                text(&out.stderr),
                text(&journal.stdout)
            );
        }
        text(&out.stdout)
    }

    pub fn systemctl(&self, args: &[&str]) -> Output {
        let mut full = vec!["systemctl"];
        full.extend_from_slice(args);
        self.exec(&full, None)
    }

    pub fn tandemctl(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut full = vec!["tandemctl"];
        full.extend_from_slice(args);
        self.exec(&full, stdin)
    }

    /// A unit property (`systemctl show -P`).
    pub fn property(&self, unit: &str, property: &str) -> String {
        let out = self.systemctl(&["show", "-P", property, unit]);
        text(&out.stdout).trim().to_owned()
    }

    /// The journal of `units` (MESSAGE only, every boot).
    pub fn journal(&self, units: &[&str]) -> String {
        self.journal_after(units, None)
    }

    /// The journal of `units` after `cursor` (see [`Container::cursor`]).
    pub fn journal_after(&self, units: &[&str], cursor: Option<&str>) -> String {
        let mut args = vec!["journalctl", "--no-pager", "-o", "cat"];
        let after = cursor.map(|c| format!("--after-cursor={c}"));
        if let Some(a) = &after {
            args.push(a);
        }
        for u in units {
            args.push("-u");
            args.push(u);
        }
        text(&self.exec(&args, None).stdout)
    }

    /// The journal's current end, to read only what comes after.
    pub fn cursor(&self) -> String {
        let out = self.exec(
            &[
                "journalctl",
                "--no-pager",
                "-n",
                "1",
                "-o",
                "cat",
                "--show-cursor",
            ],
            None,
        );
        text(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("-- cursor: "))
            .unwrap_or_else(|| panic!("{}: no journal cursor", self.name))
            .to_owned()
    }

    /// Writes the journal of every Tandem unit (MESSAGE only) into `dir`,
    /// one file per unit: `<node>-<unit>.log`.
    pub fn save_journals(&self, dir: &Path) {
        fs::create_dir_all(dir).expect("journal dir");
        for u in RUNNING {
            let body = self.journal(&[u]);
            fs::write(dir.join(format!("{}-{u}.log", self.name)), body).expect("journal file");
        }
    }

    /// Every journal entry of `unit`, with its fields (`-o json`).
    pub fn journal_entries(&self, unit: &str) -> Vec<BTreeMap<String, String>> {
        let out = self.exec(
            &["journalctl", "--no-pager", "-o", "json", "-u", unit],
            None,
        );
        text(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| {
                v.as_object().map(|o| {
                    o.iter()
                        .map(|(k, v)| {
                            let s = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
                            (k.clone(), s)
                        })
                        .collect()
                })
            })
            .collect()
    }
}

fn libc_prctl_pdeathsig() -> i32 {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number and touches
    // no memory.
    unsafe { nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, nix::libc::SIGTERM) }
}

impl Drop for Container {
    fn drop(&mut self) {
        // Powered off (SIGTERM to nspawn), or killed if it hangs.
        if let Some(mut child) = self.nspawn.take() {
            signal(child.id(), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(30);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if matches!(child.try_wait(), Ok(None)) {
                if let Some(l) = self.leader {
                    signal(l, Signal::SIGKILL);
                }
                let _ = child.kill();
            }
            let _ = child.wait();
        }
        for cg in &self.cgroups {
            remove_cgroup(cg);
        }
        if self.mounted {
            unmount(&self.root);
        }
        if std::env::var_os("TANDEM_KEEP_CONTAINERS").is_some() {
            eprintln!("systemd lab: kept {}", self.dir.display());
            return;
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("systemd lab: removing {}: {e}", self.dir.display());
        }
    }
}

/// The whole lab. Fields drop in order: the containers first (powered off,
/// unmounted), then the namespaces.
pub struct SystemdLab {
    pub lb1: Container,
    pub lb2: Container,
    pub client: Netns,
    pub backends: Vec<Netns>,
    pub lab: Lab,
}

impl SystemdLab {
    /// The networks, both containers booted with the .deb in /root (not
    /// installed yet).
    pub fn new() -> SystemdLab {
        for tool in ["systemd-nspawn", "nsenter", "ssh-keygen", "openssl"] {
            let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
                .any(|d| d.join(tool).is_file());
            assert!(
                found,
                "{tool} is missing (apt-get install systemd-container util-linux openssh-client openssl)"
            );
        }
        let deb = deb_package();
        let base = base_rootfs();
        fs::create_dir_all(RUN_DIR).expect("run dir");
        sweep_leftovers();

        let lab = Lab::new().expect("lab");
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
            // Replies to the clients go back through the floating SNAT source.
            crate::echo_backend(&ns, &format!("b{i}"), 8080);
            backends.push(ns);
        }
        let mut containers = Vec::new();
        for (i, name) in NODES.iter().enumerate() {
            let ns = crate::balancer_netns(&lab, name, i as u8 + 1, &lan, &back, &link);
            // Without replicated state a mid-stream packet is not picked up
            // again (DESIGN.md: loose pickup hides missing sync).
            ns.sysctl("net.netfilter.nf_conntrack_tcp_loose", "0")
                .expect("tcp_loose");
            containers.push(Container::create(&base, name, ns, &deb));
        }
        let mut lb2 = containers.pop().expect("lb2");
        let mut lb1 = containers.pop().expect("lb1");
        let started = Instant::now();
        lb1.start();
        lb2.start();
        std::thread::scope(|s| {
            s.spawn(|| lb1.wait_booted());
            s.spawn(|| lb2.wait_booted());
        });
        log(&format!(
            "lb1 and lb2 booted in {:.1} s",
            started.elapsed().as_secs_f64()
        ));
        SystemdLab {
            lb1,
            lb2,
            client,
            backends,
            lab,
        }
    }

    pub fn node(&self, name: &str) -> &Container {
        if name == "lb1" { &self.lb1 } else { &self.lb2 }
    }

    pub fn node_mut(&mut self, name: &str) -> &mut Container {
        if name == "lb1" {
            &mut self.lb1
        } else {
            &mut self.lb2
        }
    }

    pub fn holds_vip(&self, name: &str) -> bool {
        self.node(name)
            .ns
            .addresses("eth0")
            .map(|a| a.iter().any(|a| a.split('/').next() == Some(VIP)))
            .unwrap_or(false)
    }

    /// Pulls (or plugs back) every cable of a node at the switch.
    pub fn cables(&self, name: &str, up: bool) {
        let ns = &self.node(name).ns;
        for ifname in ["eth0", "eth1", "eth2"] {
            self.lab
                .port(ns, ifname)
                .and_then(|p| p.set_link(up))
                .unwrap_or_else(|e| panic!("{name} {ifname} cable: {e}"));
        }
    }

    /// One request from the client to `port` of the VIP: the backend's name.
    pub fn ask(&self, port: u16) -> Option<String> {
        self.client
            .run(move || {
                let s = TcpStream::connect_timeout(
                    &SocketAddr::new(VIP.parse().ok()?, port),
                    Duration::from_secs(2),
                )
                .ok()?;
                s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
                let mut line = String::new();
                BufReader::new(s).read_line(&mut line).ok()?;
                Some(line.trim().to_owned()).filter(|l| !l.is_empty())
            })
            .expect("client thread")
    }

    pub fn wait_for(&self, what: &str, timeout: Duration, f: impl Fn(&SystemdLab) -> bool) {
        let deadline = Instant::now() + timeout;
        while !f(self) {
            if Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what}\n{}",
                    self.journals()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Both nodes' Tandem journals, for failure messages.
    pub fn journals(&self) -> String {
        let mut out = String::new();
        for c in [&self.lb1, &self.lb2] {
            if c.leader.is_some() {
                out.push_str(&format!(
                    "----- {} journal\n{}",
                    c.name,
                    text(
                        &c.exec(
                            &[
                                "journalctl",
                                "--no-pager",
                                "-n",
                                "150",
                                "-o",
                                "short-precise",
                                "-u",
                                "lb-forwarder",
                                "-u",
                                "vrrpd",
                                "-u",
                                "conntrack-syncd",
                                "-u",
                                "cfg-syncd",
                                "-u",
                                "clustermanager",
                            ],
                            None
                        )
                        .stdout
                    )
                ));
            }
        }
        out
    }
}

impl Default for SystemdLab {
    fn default() -> Self {
        SystemdLab::new()
    }
}

/// A sampling thread: (time since the start, holds the VIP from then on).
type WatchThread = std::thread::JoinHandle<Result<Vec<Change>, tandem_lab::LabError>>;

/// Which node holds the VIP, sampled every millisecond from inside each
/// node's namespace (getifaddrs: netlink, no process per sample).
pub struct VipWatch {
    stop: Arc<AtomicBool>,
    started: Instant,
    threads: Vec<WatchThread>,
}

impl VipWatch {
    pub fn start(lab: &SystemdLab) -> VipWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let vip: std::net::Ipv4Addr = VIP.parse().expect("vip");
        let threads = NODES
            .iter()
            .map(|n| {
                let stop = stop.clone();
                lab.node(n)
                    .ns
                    .spawn_thread(move || {
                        let mut changes = Vec::new();
                        let mut last = None;
                        let mut last_sample = Duration::ZERO;
                        while !stop.load(Ordering::Relaxed) {
                            let holds = nix::ifaddrs::getifaddrs().is_ok_and(|mut a| {
                                a.any(|i| {
                                    i.address.and_then(|s| s.as_sockaddr_in().map(|s| s.ip()))
                                        == Some(vip)
                                })
                            });
                            let now = started.elapsed();
                            if last != Some(holds) {
                                let before = if last.is_some() { last_sample } else { now };
                                changes.push(Change {
                                    before,
                                    at: now,
                                    holds,
                                });
                                last = Some(holds);
                            }
                            last_sample = now;
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        changes
                    })
                    .expect("vip watch thread")
            })
            .collect();
        VipWatch {
            stop,
            started,
            threads,
        }
    }

    /// The time since the watch started, the clock of [`VipHistory`].
    pub fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Stops; the history of both nodes.
    pub fn finish(self) -> VipHistory {
        let end = self.started.elapsed();
        self.stop.store(true, Ordering::Relaxed);
        let per_node: Vec<Vec<Change>> = self
            .threads
            .into_iter()
            .map(|t| t.join().expect("watch thread").expect("watch netns"))
            .collect();
        VipHistory { per_node, end }
    }
}

/// A change a node's sampler saw: the VIP held (or not) from the sample
/// at `at` on; the sample before, at `before`, still saw the old state. The
/// change itself happened somewhere between the two.
#[derive(Debug, Clone, Copy)]
pub struct Change {
    pub before: Duration,
    pub at: Duration,
    pub holds: bool,
}

pub struct VipHistory {
    /// Per node (lb1, lb2), in time order (time since start).
    pub per_node: Vec<Vec<Change>>,
    pub end: Duration,
}

impl VipHistory {
    fn holds(&self, node: usize, at: Duration) -> bool {
        self.per_node[node]
            .iter()
            .take_while(|c| c.at <= at)
            .last()
            .is_some_and(|c| c.holds)
    }

    /// The stretches in which `node` certainly did not hold the VIP: from a
    /// sample that saw it gone to the last sample that still saw it gone.
    fn surely_without(&self, node: usize) -> Vec<(Duration, Duration)> {
        let changes = &self.per_node[node];
        changes
            .iter()
            .enumerate()
            .filter(|(_, c)| !c.holds)
            .map(|(i, c)| {
                let until = changes.get(i + 1).map_or(self.end, |next| next.before);
                (c.at, until)
            })
            .collect()
    }

    /// The longest stretch in which no node held the VIP, from the moment
    /// every node had been looked at once. Only what the samples prove
    /// counts: each node's sampler runs on its own, so a node's change is
    /// known to within the time between two of its samples, and a handover
    /// quicker than that must not look like a moment without the VIP.
    pub fn longest_gap(&self) -> Duration {
        let watched = self
            .per_node
            .iter()
            .map(|c| c.first().map_or(self.end, |c| c.at))
            .max()
            .unwrap_or(self.end);
        let mut common = vec![(watched, self.end)];
        for node in 0..self.per_node.len() {
            let without = self.surely_without(node);
            common = common
                .iter()
                .flat_map(|(a, b)| {
                    without.iter().filter_map(move |(c, d)| {
                        let (from, to) = ((*a).max(*c), (*b).min(*d));
                        (from < to).then_some((from, to))
                    })
                })
                .collect();
        }
        common
            .iter()
            .map(|(a, b)| *b - *a)
            .max()
            .unwrap_or_default()
    }

    /// When `node` first gained the VIP.
    pub fn gained(&self, node: usize) -> Option<Duration> {
        self.gained_after(node, Duration::ZERO)
    }

    /// When `node` first held the VIP at or after `after`.
    pub fn gained_after(&self, node: usize, after: Duration) -> Option<Duration> {
        if self.holds(node, after) {
            return Some(after);
        }
        self.per_node[node]
            .iter()
            .find(|c| c.holds && c.at >= after)
            .map(|c| c.at)
    }
}

/// A client looping through the VIP: a new connection every 20 ms (connect,
/// read the greeting) and long-lived connections each echoing a line every
/// 20 ms, as the cluster labs do.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    new_ok: Arc<AtomicU64>,
    echo_ok: Arc<AtomicU64>,
    fresh: std::thread::JoinHandle<Result<Vec<String>, tandem_lab::LabError>>,
    established: std::thread::JoinHandle<Result<Vec<String>, tandem_lab::LabError>>,
}

/// What the client saw: successes and every failure.
#[derive(Debug)]
pub struct Seen {
    pub new_ok: u64,
    pub echo_ok: u64,
    pub new_failed: Vec<String>,
    pub echo_failed: Vec<String>,
    pub long_lived: usize,
}

pub const LONG_LIVED: usize = 8;

impl Traffic {
    pub fn start(lab: &SystemdLab) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let new_ok = Arc::new(AtomicU64::new(0));
        let echo_ok = Arc::new(AtomicU64::new(0));
        let dst: SocketAddr = format!("{VIP}:80").parse().expect("addr");
        let fresh = {
            let (stop, ok) = (stop.clone(), new_ok.clone());
            lab.client
                .spawn_thread(move || {
                    let mut errors = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let r = (|| {
                            let s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
                            s.set_read_timeout(Some(Duration::from_secs(5)))?;
                            let mut line = String::new();
                            BufReader::new(s).read_line(&mut line)?;
                            if line.trim().is_empty() {
                                return Err(std::io::Error::other("no greeting"));
                            }
                            Ok::<_, std::io::Error>(())
                        })();
                        match r {
                            Ok(()) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => errors.push(e.to_string()),
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    errors
                })
                .expect("client thread")
        };
        let ready = Arc::new(Mutex::new(false));
        let established = {
            let (stop, ok, ready) = (stop.clone(), echo_ok.clone(), ready.clone());
            lab.client
                .spawn_thread(move || {
                    let mut errors = Vec::new();
                    let mut conns = Vec::new();
                    for k in 0..LONG_LIVED {
                        let c = TcpStream::connect_timeout(&dst, Duration::from_secs(3)).and_then(
                            |s| {
                                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                                s.set_nodelay(true)?;
                                let mut r = BufReader::new(s.try_clone()?);
                                let mut greeting = String::new();
                                r.read_line(&mut greeting)?;
                                Ok((s, r))
                            },
                        );
                        match c {
                            Ok(c) => conns.push(c),
                            Err(e) => errors.push(format!("opening connection {k}: {e}")),
                        }
                    }
                    if let Ok(mut r) = ready.lock() {
                        *r = true;
                    }
                    let mut broken = vec![false; conns.len()];
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        for (k, (c, r)) in conns.iter_mut().enumerate() {
                            if broken[k] {
                                continue;
                            }
                            i += 1;
                            let msg = format!("ping {i}");
                            let mut line = String::new();
                            let sent = writeln!(c, "{msg}");
                            let read = r.read_line(&mut line);
                            if sent.is_ok() && read.is_ok() && line.trim() == msg {
                                ok.fetch_add(1, Ordering::Relaxed);
                            } else {
                                errors.push(format!(
                                    "connection {k}, {msg}: {sent:?} {read:?} got {line:?}"
                                ));
                                broken[k] = true;
                            }
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    errors
                })
                .expect("client thread")
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready.lock().map(|r| *r).unwrap_or(true) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Long enough for the backup to hold the new flows too.
        std::thread::sleep(Duration::from_millis(1000));
        Traffic {
            stop,
            new_ok,
            echo_ok,
            fresh,
            established,
        }
    }

    pub fn counts(&self) -> (u64, u64) {
        (
            self.new_ok.load(Ordering::Relaxed),
            self.echo_ok.load(Ordering::Relaxed),
        )
    }

    pub fn stop(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        let new_failed = self.fresh.join().expect("client").expect("client netns");
        let echo_failed = self
            .established
            .join()
            .expect("client")
            .expect("client netns");
        Seen {
            new_ok: self.new_ok.load(Ordering::Relaxed),
            echo_ok: self.echo_ok.load(Ordering::Relaxed),
            new_failed,
            echo_failed,
            long_lived: LONG_LIVED,
        }
    }
}

/// The journal lines docs/troubleshooting.md quotes: the lines of its
/// ```` ```journal ```` blocks, each `<daemon>: <message>`, where `…` stands
/// for a part that differs from one run to the next.
pub fn quoted_journal_lines(doc: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in doc.lines() {
        let trimmed = line.trim();
        if !inside {
            inside = trimmed == "```journal";
            continue;
        }
        if trimmed == "```" {
            inside = false;
            continue;
        }
        if trimmed.is_empty() {
            continue;
        }
        let (daemon, message) = trimmed
            .split_once(": ")
            .unwrap_or_else(|| panic!("a journal line is `daemon: message`: {trimmed}"));
        out.push((daemon.to_owned(), message.to_owned()));
    }
    out
}

/// Whether `line` matches `pattern`, where each `…` in the pattern stands
/// for any text (possibly empty) and the rest must match exactly, the whole
/// line.
pub fn line_matches(pattern: &str, line: &str) -> bool {
    let parts: Vec<&str> = pattern.split('…').collect();
    let Some(first) = parts.first() else {
        return line.is_empty();
    };
    let Some(mut rest) = line.strip_prefix(first) else {
        return false;
    };
    if parts.len() == 1 {
        return rest.is_empty();
    }
    for (i, part) in parts.iter().enumerate().skip(1) {
        if i == parts.len() - 1 {
            return rest.ends_with(part);
        }
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_whole_lines_with_ellipses_for_what_varies() {
        assert!(line_matches(
            "datapath applied: 1 farm in … ms",
            "datapath applied: 1 farm in 4 ms"
        ));
        assert!(line_matches("a … b … c", "a 1 b 2 c"));
        assert!(line_matches("exact", "exact"));
        assert!(!line_matches("exact", "exact and more"));
        assert!(!line_matches(
            "datapath applied: … ms",
            "datapath applied: 4 s"
        ));
        assert!(line_matches("…", "anything"));
        assert!(
            !line_matches("a … b", "a b"),
            "the spaces around … are text"
        );
    }
}

#[cfg(test)]
mod vip_history_tests {
    use super::*;

    fn ms(x: f64) -> Duration {
        Duration::from_secs_f64(x / 1000.0)
    }

    fn change(before: f64, at: f64, holds: bool) -> Change {
        Change {
            before: ms(before),
            at: ms(at),
            holds,
        }
    }

    /// A handover quicker than the samplers' period shows no gap however
    /// the two samplers' clocks fall; a release before the take-over shows
    /// the time the samples prove.
    #[test]
    fn only_a_gap_the_samples_prove_counts() {
        let history = |lb1_lost: (f64, f64), lb2_gained: (f64, f64)| VipHistory {
            per_node: vec![
                vec![
                    change(0.0, 0.0, true),
                    change(lb1_lost.0, lb1_lost.1, false),
                ],
                vec![
                    change(0.2, 0.2, false),
                    change(lb2_gained.0, lb2_gained.1, true),
                ],
            ],
            end: ms(200.0),
        };
        // lb1 seen gone at 10.0 ms, lb2 seen holding at 10.5 (its sample
        // before, at 9.5, still saw nothing): both changes fall between
        // 9.5 and 10.0, in either order.
        assert_eq!(
            history((9.0, 10.0), (9.5, 10.5)).longest_gap(),
            Duration::ZERO
        );
        // lb2's sampler stalled from 5 to 15 ms: nothing proven either.
        assert_eq!(
            history((9.0, 10.0), (5.0, 15.0)).longest_gap(),
            Duration::ZERO
        );
        // Released at 9-10 ms, taken over at 79-80 ms: at least 69 ms.
        assert_eq!(history((9.0, 10.0), (79.0, 80.0)).longest_gap(), ms(69.0));
    }
}
