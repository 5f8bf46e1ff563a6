//! Packaging: the systemd units, the tmpfiles.d entry, `deploy/install.sh`
//! and tandemctl's shell completions, checked with the tools a distribution
//! checks them with (systemd-analyze, systemd-tmpfiles, systemctl --root,
//! bash) rather than by reading them back.
//!
//! Needs the workspace binaries (`cargo build --workspace --bins`) and the
//! Debian packages `systemd` (systemd-analyze, systemd-tmpfiles, systemctl)
//! and `help2man` (install.sh makes the man pages with it). Nothing here
//! touches the host: units are verified offline, tmpfiles and install.sh
//! work under a temporary root.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tandem_e2e::{DAEMONS, NodeDirs, bin};

const TARGET: &str = "tandem.target";
const BINARIES: &[&str] = &[
    "lb-forwarder",
    "vrrpd",
    "conntrack-syncd",
    "cfg-syncd",
    "clustermanager",
    "routed",
    "tandemctl",
];
/// Every Tandem daemon with a unit: the five of every node and routed
/// (active-active nodes).
const UNIT_DAEMONS: &[&str] = &[
    "clustermanager",
    "vrrpd",
    "lb-forwarder",
    "conntrack-syncd",
    "cfg-syncd",
    "routed",
];
/// BIRD, run for routed: not a Tandem binary (`/usr/sbin/bird`, bird2).
const BIRD_UNIT: &str = "tandem-bird.service";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

/// A tool the tests need, or a panic naming the Debian package to install.
fn tool(name: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is missing: apt-get install {package}"))
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The repository's units copied to a temporary directory with ExecStart
/// pointing at the workspace binaries: verify checks that the binary exists.
fn staged_units() -> (tempfile::TempDir, Vec<PathBuf>) {
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for daemon in UNIT_DAEMONS {
        let unit = format!("{daemon}.service");
        let body = fs::read_to_string(repo().join("systemd").join(&unit)).unwrap();
        let exec = format!("ExecStart=/usr/bin/{daemon} ");
        assert!(body.contains(&exec), "{unit}: no `{exec}` line");
        let body = body.replace(&exec, &format!("ExecStart={} ", bin(daemon).display()));
        fs::write(dir.path().join(&unit), body).unwrap();
        paths.push(dir.path().join(unit));
    }
    tool("bird", "bird2");
    fs::copy(
        repo().join("systemd").join(BIRD_UNIT),
        dir.path().join(BIRD_UNIT),
    )
    .unwrap();
    paths.push(dir.path().join(BIRD_UNIT));
    fs::copy(repo().join("systemd").join(TARGET), dir.path().join(TARGET)).unwrap();
    paths.push(dir.path().join(TARGET));
    (dir, paths)
}

/// `systemd-analyze verify`, strictly: systemd 252 exits 0 on an unknown
/// key or an unparsable value and only warns on stderr, so a clean unit is
/// one that exits 0 *and* says nothing. Man pages are checked by the install
/// test (`man:` links resolve only once they are installed).
fn verify(units: &[PathBuf]) -> Result<(), String> {
    let out = run(Command::new(tool("systemd-analyze", "systemd"))
        .args(["verify", "--man=no"])
        .args(units));
    let stderr = text(&out.stderr);
    if out.status.success() && stderr.trim().is_empty() {
        Ok(())
    } else {
        Err(format!("{}: {stderr}", out.status))
    }
}

#[test]
fn every_unit_passes_systemd_analyze_verify() {
    let (_dir, units) = staged_units();
    // Every unit of the repository is staged.
    let in_repo = fs::read_dir(repo().join("systemd"))
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            let name = name.to_string_lossy();
            name.ends_with(".service") || name.ends_with(".target")
        })
        .count();
    assert_eq!(units.len(), in_repo);
    assert_eq!(units.len(), UNIT_DAEMONS.len() + 2);
    if let Err(e) = verify(&units) {
        panic!("systemd-analyze verify failed: {e}");
    }
}

#[test]
fn verify_rejects_a_typo_and_a_missing_binary() {
    let (dir, _) = staged_units();
    let unit = dir.path().join("vrrpd.service");
    let good = fs::read_to_string(&unit).unwrap();

    fs::write(
        &unit,
        good.replace("\nRestart=on-failure", "\nRestartt=on-failure"),
    )
    .unwrap();
    let e = verify(std::slice::from_ref(&unit)).expect_err("a misspelt key must fail");
    assert!(e.contains("Restartt"), "{e}");

    fs::write(&unit, good.replace("\nType=notify", "\nType=notfy")).unwrap();
    let e = verify(std::slice::from_ref(&unit)).expect_err("a bad value must fail");
    assert!(e.contains("notfy"), "{e}");

    let missing = bin("vrrpd").with_file_name("vrrpd-not-built");
    let exec = format!("ExecStart={} ", bin("vrrpd").display());
    fs::write(
        &unit,
        good.replace(&exec, &format!("ExecStart={} ", missing.display())),
    )
    .unwrap();
    let e = verify(std::slice::from_ref(&unit)).expect_err("a missing binary must fail");
    assert!(e.contains("vrrpd-not-built"), "{e}");

    fs::write(&unit, &good).unwrap();
    verify(std::slice::from_ref(&unit)).expect("the unmodified unit passes");
}

/// `key=value` lines of a unit (comments and sections dropped), in order.
fn directives(unit: &str) -> Vec<(String, String)> {
    let body = fs::read_to_string(repo().join("systemd").join(unit)).unwrap();
    body.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with(['#', ';', '[']))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

fn values(d: &[(String, String)], key: &str) -> Vec<String> {
    d.iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .collect()
}

fn words(d: &[(String, String)], key: &str) -> BTreeSet<String> {
    values(d, key)
        .iter()
        .flat_map(|v| v.split_whitespace().map(str::to_owned))
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// A unit's comment lines, lower-cased, as one text.
fn comments(unit: &str) -> String {
    fs::read_to_string(repo().join("systemd").join(unit))
        .unwrap()
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

/// What each daemon may do beyond a plain process: capabilities, socket
/// families, writable paths, and whether it keeps state in /var/lib/tandem.
struct Privileges {
    daemon: &'static str,
    caps: &'static [&'static str],
    families: &'static [&'static str],
    rw: &'static [&'static str],
    state: bool,
}

const PRIVILEGES: &[Privileges] = &[
    Privileges {
        daemon: "vrrpd",
        caps: &[
            "CAP_NET_ADMIN",
            "CAP_NET_RAW",
            "CAP_SYS_NICE",
            "CAP_IPC_LOCK",
        ],
        families: &["AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK", "AF_PACKET"],
        rw: &["/run/tandem"],
        state: true,
    },
    Privileges {
        daemon: "lb-forwarder",
        caps: &["CAP_NET_ADMIN"],
        families: &["AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"],
        rw: &["/run/tandem"],
        state: false,
    },
    Privileges {
        daemon: "conntrack-syncd",
        caps: &["CAP_NET_ADMIN", "CAP_SYS_NICE"],
        families: &["AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"],
        rw: &["/run/tandem"],
        state: true,
    },
    Privileges {
        daemon: "cfg-syncd",
        caps: &["CAP_DAC_READ_SEARCH", "CAP_CHOWN", "CAP_FOWNER"],
        families: &["AF_UNIX", "AF_INET", "AF_INET6"],
        rw: &["/run/tandem", "/etc/tandem"],
        state: true,
    },
    Privileges {
        daemon: "clustermanager",
        caps: &["CAP_NET_ADMIN", "CAP_NET_RAW"],
        families: &["AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"],
        rw: &["/run/tandem", "/etc/tandem"],
        state: true,
    },
    Privileges {
        daemon: "routed",
        caps: &[],
        families: &["AF_UNIX"],
        rw: &["/run/tandem", "/var/lib/tandem"],
        state: true,
    },
];

#[test]
fn daemon_units_are_notify_with_watchdog_and_only_their_capabilities() {
    assert_eq!(PRIVILEGES.len(), UNIT_DAEMONS.len());
    for p in PRIVILEGES {
        let (daemon, caps, rw) = (p.daemon, p.caps, p.rw);
        let d = directives(&format!("{daemon}.service"));
        let one = |key: &str| -> String {
            let v = values(&d, key);
            assert_eq!(v.len(), 1, "{daemon}: {key} = {v:?}");
            v[0].clone()
        };
        assert_eq!(one("Type"), "notify", "{daemon}");
        assert_eq!(one("NotifyAccess"), "main", "{daemon}");
        assert_eq!(one("Restart"), "on-failure", "{daemon}");
        assert!(one("WatchdogSec").ends_with('s'), "{daemon}: WatchdogSec");
        assert_eq!(one("PartOf"), TARGET, "{daemon}");
        assert_eq!(one("ReloadPropagatedFrom"), TARGET, "{daemon}");
        assert_eq!(one("WantedBy"), TARGET, "{daemon}");
        assert_eq!(one("ConditionPathExists"), "/etc/tandem/node.toml");
        assert_eq!(one("ProtectSystem"), "strict", "{daemon}");
        assert_eq!(one("PrivateTmp"), "yes", "{daemon}");
        assert_eq!(one("NoNewPrivileges"), "yes", "{daemon}");
        assert_eq!(words(&d, "CapabilityBoundingSet"), set(caps), "{daemon}");
        assert!(values(&d, "AmbientCapabilities").is_empty(), "{daemon}");
        assert_eq!(words(&d, "ReadWritePaths"), set(rw), "{daemon}");
        assert_eq!(
            words(&d, "RestrictAddressFamilies"),
            set(p.families),
            "{daemon}"
        );
        // Each privilege is there for a named operation, said in a comment.
        let why = comments(&format!("{daemon}.service"));
        for name in caps.iter().chain(p.families).chain(rw) {
            assert!(
                why.contains(name),
                "{daemon}.service: no comment says why it has {name}"
            );
        }
        // State that outlives a restart goes to /var/lib/tandem, created by
        // systemd and writable despite ProtectSystem=strict.
        assert!(
            values(&d, "ExecStart")[0].contains("--state-dir /var/lib/tandem"),
            "{daemon}"
        );
        if p.state {
            assert_eq!(one("StateDirectory"), "tandem", "{daemon}");
            assert_eq!(one("StateDirectoryMode"), "0700", "{daemon}");
            assert!(why.contains("/var/lib/tandem"), "{daemon}: why state?");
        } else {
            assert!(values(&d, "StateDirectory").is_empty(), "{daemon}");
        }
        // Real-time scheduling only for vrrpd's advert thread.
        let realtime = if daemon == "vrrpd" { "no" } else { "yes" };
        assert_eq!(one("RestrictRealtime"), realtime, "{daemon}");
        assert_eq!(one("SyslogIdentifier"), daemon);
        // Five units share /run/tandem: each declares it, preserved, or the
        // first unit to stop would delete it (and the others' sockets).
        assert_eq!(one("RuntimeDirectory"), "tandem", "{daemon}");
        assert_eq!(one("RuntimeDirectoryMode"), "0700", "{daemon}");
        assert_eq!(one("RuntimeDirectoryPreserve"), "yes", "{daemon}");
    }

    let after = |daemon: &str| words(&directives(&format!("{daemon}.service")), "After");
    assert!(after("vrrpd").is_superset(&set(&["lb-forwarder.service", "conntrack-syncd.service"])));
    assert!(after("cfg-syncd").contains("vrrpd.service"));
    let others: Vec<String> = DAEMONS
        .iter()
        .filter(|d| **d != "clustermanager")
        .map(|d| format!("{d}.service"))
        .collect();
    let others: Vec<&str> = others.iter().map(String::as_str).collect();
    assert!(after("clustermanager").is_superset(&set(&others)));
    for daemon in ["lb-forwarder", "conntrack-syncd"] {
        let a = after(daemon);
        assert!(
            !DAEMONS.iter().any(|d| a.contains(&format!("{d}.service"))),
            "{daemon} starts first, after no other daemon: {a:?}"
        );
    }
}

/// `systemd-analyze security --offline`: the overall exposure (0 = locked
/// down, 10 = unrestricted) and whether it stays within `max`.
fn exposure(unit: &Path, max: f64) -> (f64, bool) {
    let out = run(Command::new(tool("systemd-analyze", "systemd"))
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(format!("--threshold={}", (max * 10.0).round() as u32))
        .arg(unit));
    let stdout = text(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level for {}: {stdout}", unit.display()));
    let value = line
        .rsplit(": ")
        .next()
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("unreadable exposure line: {line}"));
    (value, out.status.success())
}

#[test]
fn systemd_rates_every_daemon_unit_well_sandboxed() {
    const MAX: f64 = 3.0;
    let (dir, units) = staged_units();
    let mut report = Vec::new();
    for unit in units
        .iter()
        .filter(|u| u.extension().is_some_and(|e| e == "service"))
    {
        let (level, within) = exposure(unit, MAX);
        let name = unit.file_name().unwrap().to_string_lossy().into_owned();
        report.push(format!("{name}: {level}"));
        assert!(within && level <= MAX, "{name}: exposure {level} > {MAX}");
    }
    eprintln!("systemd-analyze security exposure: {}", report.join(", "));

    // Control: the same daemon without its sandbox lines is rated unsafe.
    let bare: String = fs::read_to_string(dir.path().join("vrrpd.service"))
        .unwrap()
        .lines()
        .filter(|l| {
            !l.starts_with("Protect")
                && !l.starts_with("Private")
                && !l.starts_with("Restrict")
                && !l.starts_with("CapabilityBoundingSet")
                && !l.starts_with("SystemCall")
                && !l.starts_with("NoNewPrivileges")
                && !l.starts_with("MemoryDeny")
                && !l.starts_with("LockPersonality")
                && !l.starts_with("UMask")
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let unit = dir.path().join("vrrpd.service");
    fs::write(&unit, bare).unwrap();
    let (level, within) = exposure(&unit, MAX);
    eprintln!("vrrpd.service without its sandbox: exposure {level}");
    assert!(!within && level > 8.0, "unsandboxed vrrpd rated {level}");
}

fn tmpfiles_create(conf: &Path, root: &Path) -> Output {
    run(Command::new(tool("systemd-tmpfiles", "systemd"))
        .arg("--create")
        .arg(format!("--root={}", root.display()))
        .arg(conf))
}

#[test]
fn tmpfiles_creates_the_shared_socket_directory_root_only() {
    let root = tempfile::tempdir().unwrap();
    let out = tmpfiles_create(&repo().join("systemd/tandem.conf"), root.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let md = fs::metadata(root.path().join("run/tandem")).unwrap();
    assert!(md.is_dir());
    assert_eq!(md.permissions().mode() & 0o7777, 0o700);
    assert_eq!((md.uid(), md.gid()), (0, 0));

    // Control: an entry systemd-tmpfiles cannot apply is reported.
    let bad = root.path().join("bad.conf");
    fs::write(&bad, "d /run/tandem-bad 0700 no-such-tandem-user root -\n").unwrap();
    let out = tmpfiles_create(&bad, root.path());
    assert!(!out.status.success());
    assert!(!root.path().join("run/tandem-bad").exists());
}

fn install_sh(args: &[&str]) -> Output {
    run(Command::new("bash")
        .arg(repo().join("deploy/install.sh"))
        .args(args)
        .env_remove("DESTDIR")
        .env_remove("CARGO_TARGET_DIR"))
}

/// Every non-directory under `root`, relative to it.
fn files_under(root: &Path) -> BTreeSet<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<PathBuf>) {
        for entry in fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                walk(root, &path, out);
            } else {
                out.insert(path.strip_prefix(root).unwrap().to_owned());
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(root, root, &mut out);
    out
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn install_script_installs_into_destdir_and_uninstall_keeps_etc_tandem() {
    tool("help2man", "help2man");
    tool("systemctl", "systemd");
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let root_s = root.to_str().unwrap();
    let bin_dir = bin("tandemctl").parent().unwrap().to_owned();

    let out = install_sh(&["--destdir", root_s, "--bin-dir", bin_dir.to_str().unwrap()]);
    assert!(out.status.success(), "install.sh: {}", text(&out.stderr));

    for b in BINARIES {
        let installed = root.join("usr/bin").join(b);
        assert_eq!(mode(&installed), 0o755, "{b}");
        assert_eq!(
            fs::read(&installed).unwrap(),
            fs::read(bin_dir.join(b)).unwrap(),
            "{b} is not the built binary"
        );
        let man = root.join(format!("usr/share/man/man8/{b}.8.gz"));
        assert_eq!(mode(&man), 0o644, "{b}");
        // The man page is the binary's own --help, rendered.
        let page = run(Command::new("sh")
            .arg("-c")
            .arg("gzip -dc \"$1\"")
            .arg("sh")
            .arg(&man));
        let page = text(&page.stdout);
        assert!(
            page.contains(".TH") && page.contains("\\-\\-help"),
            "{b}: {page}"
        );
    }
    for unit in UNIT_DAEMONS
        .iter()
        .map(|d| format!("{d}.service"))
        .chain([BIRD_UNIT.to_owned(), TARGET.to_owned()])
    {
        let installed = root.join("usr/lib/systemd/system").join(&unit);
        assert_eq!(
            fs::read(&installed).unwrap(),
            fs::read(repo().join("systemd").join(&unit)).unwrap(),
            "{unit}"
        );
    }
    for unit in UNIT_DAEMONS
        .iter()
        .map(|d| format!("{d}.service"))
        .chain([BIRD_UNIT.to_owned()])
    {
        // Enabled offline (systemctl --root): the target pulls them in at boot.
        let link = root.join(format!("etc/systemd/system/tandem.target.wants/{unit}"));
        assert!(
            link.symlink_metadata().is_ok(),
            "{} missing",
            link.display()
        );
    }
    assert!(
        root.join("etc/systemd/system/multi-user.target.wants/tandem.target")
            .symlink_metadata()
            .is_ok()
    );
    assert_eq!(
        fs::read(root.join("usr/lib/tmpfiles.d/tandem.conf")).unwrap(),
        fs::read(repo().join("systemd/tandem.conf")).unwrap()
    );
    let examples = root.join("usr/share/doc/tandem/examples");
    assert_eq!(
        files_under(&examples),
        files_under(&repo().join("deploy/examples")),
        "examples"
    );
    assert_eq!(mode(&examples.join("checks/ftp.sh")), 0o755);
    assert!(root.join("usr/share/doc/tandem/install.md").is_file());
    let completion = |p: &str| fs::read_to_string(root.join(p)).unwrap();
    assert!(completion("usr/share/bash-completion/completions/tandemctl").contains("_tandemctl()"));
    assert!(
        completion("usr/share/zsh/site-functions/_tandemctl").starts_with("#compdef tandemctl")
    );
    assert!(
        completion("usr/share/fish/vendor_completions.d/tandemctl.fish")
            .contains("complete -c tandemctl")
    );
    let dropin = root.join("etc/ssh/sshd_config.d/tandem.conf");
    assert_eq!(
        fs::read(&dropin).unwrap(),
        fs::read(repo().join("deploy/sshd/tandem.conf")).unwrap()
    );
    assert_eq!(mode(&dropin), 0o644);
    let etc = root.join("etc/tandem");
    assert_eq!(mode(&etc), 0o750);
    assert!(
        files_under(&etc).is_empty(),
        "install.sh writes no configuration"
    );

    // The administrator configures the node; the uninstall must keep it.
    fs::create_dir_all(etc.join("farms")).unwrap();
    fs::write(etc.join("node.toml"), "# this node\n").unwrap();
    fs::write(etc.join("farms/web.toml"), "# a farm\n").unwrap();
    let out = install_sh(&["--uninstall", "--destdir", root_s]);
    assert!(out.status.success(), "uninstall: {}", text(&out.stderr));
    let left = files_under(&root);
    assert_eq!(
        left,
        [
            PathBuf::from("etc/tandem/farms/web.toml"),
            PathBuf::from("etc/tandem/node.toml")
        ]
        .into_iter()
        .collect(),
        "uninstall must remove everything but /etc/tandem"
    );
    assert_eq!(
        fs::read_to_string(etc.join("node.toml")).unwrap(),
        "# this node\n"
    );
    assert!(!root.join("usr/share/doc/tandem").exists());
}

#[test]
fn install_script_keeps_an_edited_sshd_drop_in() {
    tool("help2man", "help2man");
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let root_s = root.to_str().unwrap();
    let bin_dir = bin("tandemctl").parent().unwrap().to_owned();
    let dropin = root.join("etc/ssh/sshd_config.d/tandem.conf");
    let edited = "# mine\nMatch User root\n\tAuthorizedKeysFile /etc/tandem/ssh/authorized_keys\n";
    fs::create_dir_all(dropin.parent().unwrap()).unwrap();
    fs::write(&dropin, edited).unwrap();
    let args = [
        "--destdir",
        root_s,
        "--bin-dir",
        bin_dir.to_str().unwrap(),
        "--no-enable",
    ];
    let out = install_sh(&args);
    assert!(out.status.success(), "install.sh: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains("keeping your /etc/ssh/sshd_config.d/tandem.conf"));
    assert_eq!(fs::read_to_string(&dropin).unwrap(), edited);
    let out = install_sh(&["--uninstall", "--destdir", root_s, "--no-enable"]);
    assert!(out.status.success(), "uninstall: {}", text(&out.stderr));
    assert_eq!(fs::read_to_string(&dropin).unwrap(), edited, "kept");
}

/// The sshd drop-in, read by the real sshd (`sshd -T`): root's keys are
/// also looked up where clustermanager writes the cluster key, other users
/// keep OpenSSH's default, and the settings after the drop-in still apply
/// to everyone (its Match block ends with the file).
#[test]
fn sshd_reads_the_cluster_key_for_root_only() {
    let sshd = tool("sshd", "openssh-server");
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("host_ed25519");
    tandem_e2e::keygen(&key, "packaging-test");
    let config = tmp.path().join("sshd_config");
    fs::write(
        &config,
        format!(
            "Include {}\nHostKey {}\nX11Forwarding yes\n",
            repo().join("deploy/sshd/tandem.conf").display(),
            key.display()
        ),
    )
    .unwrap();
    let effective = |user: &str| {
        let out = run(Command::new(&sshd)
            .arg("-T")
            .arg("-f")
            .arg(&config)
            .arg("-C")
            .arg(format!("user={user},host=peer,addr=192.168.100.2")));
        assert!(out.status.success(), "sshd -T: {}", text(&out.stderr));
        let all = text(&out.stdout);
        let get = |key: &str| {
            all.lines()
                .find_map(|l| l.strip_prefix(&format!("{key} ")))
                .unwrap_or_else(|| panic!("no {key} in sshd -T: {all}"))
                .to_owned()
        };
        (get("authorizedkeysfile"), get("x11forwarding"))
    };
    // The path clustermanager's unit gives it.
    let unit = fs::read_to_string(repo().join("systemd/clustermanager.service")).unwrap();
    let flag = |name: &str| {
        let rest = unit
            .split_once(&format!("--{name} "))
            .unwrap_or_else(|| panic!("clustermanager.service has no --{name}"))
            .1;
        rest.split_whitespace().next().unwrap().to_owned()
    };
    let keys = flag("authorized-keys");
    assert_eq!(keys, "/etc/tandem/ssh/authorized_keys");
    assert_eq!(flag("peer-authorized-keys"), keys, "both nodes alike");

    let (root_keys, x11) = effective("root");
    assert_eq!(
        root_keys,
        format!(".ssh/authorized_keys .ssh/authorized_keys2 {keys}")
    );
    assert_eq!(x11, "yes");
    // Control: another user is not affected by the drop-in.
    let (other_keys, x11) = effective("alice");
    assert_eq!(other_keys, ".ssh/authorized_keys .ssh/authorized_keys2");
    assert_eq!(x11, "yes");
}

#[test]
fn install_script_refuses_missing_binaries_and_installs_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let empty = tmp.path().join("no-binaries");
    fs::create_dir(&empty).unwrap();
    let out = install_sh(&[
        "--destdir",
        root.to_str().unwrap(),
        "--bin-dir",
        empty.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    for b in BINARIES {
        assert!(stderr.contains(b), "the error names {b}: {stderr}");
    }
    assert!(files_under(&root).is_empty(), "{:?}", files_under(&root));
}

/// What bash's programmable completion offers for `words` (the last one is
/// the word being completed), with tandemctl's generated script loaded.
fn bash_complete(script: &Path, words: &[&str]) -> Vec<String> {
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let program = format!(
        "source '{}'\nCOMP_WORDS=({})\nCOMP_CWORD={}\nCOMP_LINE=\"${{COMP_WORDS[*]}}\"\nCOMP_POINT=${{#COMP_LINE}}\n\
         _tandemctl tandemctl \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"\n\
         printf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
        script.display(),
        quoted.join(" "),
        words.len() - 1,
    );
    let out = run(Command::new("bash").arg("-c").arg(program));
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .map(str::to_owned)
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn tandemctl_completions_complete_subcommands_and_values() {
    let tandemctl = bin("tandemctl");
    let tmp = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = run(Command::new(&tandemctl).args(["completions", shell]));
        assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        for word in ["tandemctl", "farm", "backend", "completions", "runtime-dir"] {
            assert!(script.contains(word), "{shell} script lacks {word}");
        }
        fs::write(tmp.path().join(shell), script).unwrap();
    }

    let script = tmp.path().join("bash");
    assert_eq!(bash_complete(&script, &["tandemctl", "fa"]), ["farm"]);
    let farm = bash_complete(&script, &["tandemctl", "farm", ""]);
    for verb in ["list", "stats", "save", "restore", "clear"] {
        assert!(farm.contains(&verb.to_owned()), "farm <TAB>: {farm:?}");
    }
    let shells = bash_complete(&script, &["tandemctl", "completions", "f"]);
    assert_eq!(shells, ["fish"]);
    // Control: a word no subcommand starts with completes to nothing.
    assert!(bash_complete(&script, &["tandemctl", "zz"]).is_empty());

    // An unknown shell is a usage error (clap exits 2), not an empty script.
    let out = run(Command::new(&tandemctl).args(["completions", "tcsh"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
}

/// The `[package.metadata.deb]` asset sources of crates/tandemctl/Cargo.toml
/// (the `"source", "dest", "mode"` triples), read as text: the tests crate
/// has no TOML parser and the table's shape is fixed.
fn deb_assets() -> Vec<(String, String)> {
    let manifest = fs::read_to_string(repo().join("crates/tandemctl/Cargo.toml")).unwrap();
    let table = manifest
        .split_once("[package.metadata.deb]")
        .expect("crates/tandemctl/Cargo.toml has [package.metadata.deb]")
        .1;
    table
        .lines()
        .map(str::trim)
        .filter_map(|l| l.strip_prefix("[\"")?.strip_suffix("],"))
        .map(|l| {
            let parts: Vec<&str> = l.split('"').collect();
            (parts[0].to_owned(), parts[2].to_owned())
        })
        .collect()
}

#[test]
fn deb_packs_every_binary_unit_and_generated_file_and_its_scripts_parse() {
    let assets = deb_assets();
    let sources: BTreeSet<&str> = assets.iter().map(|(s, _)| s.as_str()).collect();
    for b in BINARIES {
        assert!(
            sources.contains(format!("target/release/{b}").as_str()),
            "{b}"
        );
    }
    for entry in fs::read_dir(repo().join("systemd")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        let src = format!("../../systemd/{name}");
        let dest = &assets
            .iter()
            .find(|(s, _)| *s == src)
            .unwrap_or_else(|| panic!("{name} is not packed"))
            .1;
        let expected = if name.ends_with(".conf") {
            "usr/lib/tmpfiles.d/"
        } else {
            "usr/lib/systemd/system/"
        };
        assert_eq!(dest, expected, "{name}");
    }
    for completion in ["tandemctl", "_tandemctl", "tandemctl.fish"] {
        let src = format!("target/release/tandem-deb/completions/{completion}");
        assert!(sources.contains(src.as_str()), "{completion}");
    }
    // Repository sources must exist (a glob must match at least one file).
    let crate_dir = repo().join("crates/tandemctl");
    for (src, _) in assets.iter().filter(|(s, _)| s.starts_with("../")) {
        let path = crate_dir.join(src);
        let found = match src.rsplit_once('/') {
            Some((dir, pattern)) if pattern.contains('*') => {
                let suffix = pattern.trim_start_matches('*');
                fs::read_dir(crate_dir.join(dir))
                    .unwrap_or_else(|e| panic!("{src}: {e}"))
                    .any(|e| e.unwrap().file_name().to_string_lossy().ends_with(suffix))
            }
            _ => path.is_file(),
        };
        assert!(found, "deb asset {src} matches no file");
    }
    // Nothing of /etc/tandem goes into the package: it must never be a
    // conffile dpkg owns (removal and purge keep it). The one file under
    // /etc is sshd's drop-in, a conffile.
    let etc: Vec<_> = assets
        .iter()
        .filter(|(_, d)| d.starts_with("etc"))
        .collect();
    assert_eq!(
        etc,
        [&(
            "../../deploy/sshd/tandem.conf".to_owned(),
            "etc/ssh/sshd_config.d/".to_owned()
        )],
        "{assets:?}"
    );

    let sh = tool("sh", "dash");
    for script in ["postinst", "prerm", "postrm"] {
        let path = repo().join("deploy/deb").join(script);
        assert_eq!(mode(&path) & 0o111, 0o111, "{script} is executable");
        let out = run(Command::new(&sh).arg("-n").arg(&path));
        assert!(out.status.success(), "{script}: {}", text(&out.stderr));
    }
}

/// What a daemon tells systemd: runs `daemon` on the example configuration
/// in its own network namespace with `NOTIFY_SOCKET` pointing at a socket of
/// ours (and `WATCHDOG_USEC` if given), as systemd runs a Type=notify unit;
/// collects the datagrams for `listen`, then stops it with SIGTERM and
/// collects what it says while stopping.
fn notifications(daemon: &str, watchdog_usec: Option<u64>, listen: Duration) -> Vec<String> {
    let node = NodeDirs::from_examples();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("notify");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", node.ns.name()])
        .arg(bin(daemon))
        .arg("--config-dir")
        .arg(&node.config)
        .arg("--runtime-dir")
        .arg(&node.runtime)
        .arg("--state-dir")
        .arg(tandem_e2e::state_dir_beside(&node.runtime))
        .env("NOTIFY_SOCKET", &path)
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(usec) = watchdog_usec {
        cmd.env("WATCHDOG_USEC", usec.to_string());
    }
    let mut child = cmd.spawn().unwrap();
    let pid = Pid::from_raw(i32::try_from(child.id()).unwrap());
    let mut got = Vec::new();
    let receive_until = |deadline: Instant, got: &mut Vec<String>| {
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = sock.recv(&mut buf) {
                got.extend(text(&buf[..n]).lines().map(str::to_owned));
            }
        }
    };
    receive_until(Instant::now() + listen, &mut got);
    let running = child.try_wait().unwrap().is_none();
    if running {
        kill(pid, Signal::SIGTERM).unwrap();
    }
    receive_until(Instant::now() + Duration::from_secs(1), &mut got);
    let _ = kill(pid, Signal::SIGKILL);
    let out = child.wait_with_output().unwrap();
    assert!(running, "{daemon} exited early: {}", text(&out.stderr));
    got
}

#[test]
fn every_daemon_tells_systemd_ready_watchdog_and_stopping() {
    // WatchdogSec=10s in the units: the daemons ping every 5 s. Here 300 ms,
    // so two seconds must bring several pings.
    for daemon in DAEMONS {
        let got = notifications(daemon, Some(300_000), Duration::from_secs(2));
        let count = |m: &str| got.iter().filter(|l| *l == m).count();
        assert_eq!(count("READY=1"), 1, "{daemon}: {got:?}");
        assert!(count("WATCHDOG=1") >= 4, "{daemon}: {got:?}");
        assert!(count("STOPPING=1") >= 1, "{daemon}: {got:?}");
        let ready = got.iter().position(|l| l == "READY=1").unwrap();
        assert!(
            got[ready..]
                .iter()
                .any(|l| l.starts_with("STATUS=serving on ")),
            "{daemon}: {got:?}"
        );
    }
}

#[test]
fn no_watchdog_pings_unless_systemd_asks_for_them() {
    // Control for the test above: without WATCHDOG_USEC the same daemon is
    // READY but never pings, so the pings there answer the unit's WatchdogSec.
    let got = notifications("vrrpd", None, Duration::from_secs(1));
    assert!(got.iter().any(|l| l == "READY=1"), "{got:?}");
    assert!(!got.iter().any(|l| l == "WATCHDOG=1"), "{got:?}");
}
