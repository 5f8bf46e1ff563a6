//! The lab's own guarantees: topologies that carry traffic (and stop
//! carrying it when cut), processes and threads that really run inside a
//! namespace, and nothing left behind afterwards — after a drop, after a
//! panic, after a dead process.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use tandem_lab::{Lab, LabError, Netns};

/// The named namespaces, one per line. Read from /run/netns: `ip netns
/// list` can fail midway while other tests delete namespaces, and a partial
/// listing would let "nothing left behind" pass falsely.
fn netns_list() -> String {
    match std::fs::read_dir("/run/netns") {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned() + "\n")
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => panic!("reading /run/netns: {e}"),
    }
}

fn root_links() -> String {
    let out = Command::new("ip")
        .args(["-o", "link"])
        .output()
        .expect("ip -o link");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_nothing_left(id: &str, names: &[String]) {
    let list = netns_list();
    assert!(!list.contains(id), "namespaces of lab {id} left:\n{list}");
    for name in names {
        assert!(
            !Path::new("/run/netns").join(name).exists(),
            "{name} still in /run/netns"
        );
    }
    assert!(
        !root_links().contains(id),
        "links of lab {id} in the root namespace"
    );
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Sends datagrams from `from` to `to_addr:5000`, where `to` echoes them,
/// every 100 ms until an echo comes back or `patience` runs out. Returns the
/// echo, or `None`. Retrying keeps a loaded machine from failing a positive
/// check; a negative check simply passes a short `patience`.
fn udp_exchange(from: &Netns, to: &Netns, to_addr: &str, patience: Duration) -> Option<Vec<u8>> {
    let server = to
        .run(|| UdpSocket::bind("0.0.0.0:5000"))
        .expect("enter ns")
        .expect("bind");
    server
        .set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    let dest: SocketAddr = format!("{to_addr}:5000").parse().expect("addr");
    let done = Arc::new(AtomicBool::new(false));
    let echo = std::thread::spawn({
        let done = done.clone();
        move || {
            let mut buf = [0u8; 64];
            while !done.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = server.recv_from(&mut buf) {
                    let _ = server.send_to(&buf[..n], peer);
                }
            }
        }
    });
    let got = from
        .run(move || {
            let s = UdpSocket::bind("0.0.0.0:0").expect("bind client");
            s.set_read_timeout(Some(Duration::from_millis(100)))
                .expect("timeout");
            let deadline = Instant::now() + patience;
            while Instant::now() < deadline {
                // Errors (no route, neighbour unreachable) count as no reply.
                let _ = s.send_to(b"hello", dest);
                let mut buf = [0u8; 64];
                if let Ok(n) = s.recv(&mut buf) {
                    return Some(buf[..n].to_vec());
                }
            }
            None
        })
        .expect("client thread");
    done.store(true, Ordering::Relaxed);
    echo.join().expect("echo thread");
    got
}

const PATIENT: Duration = Duration::from_secs(5);
const BRIEF: Duration = Duration::from_millis(700);

#[test]
fn two_namespaces_on_a_bridge_reach_each_other() {
    let lab = Lab::new().expect("lab");
    let lan = lab.bridge("lan").expect("bridge");
    let other = lab.bridge("other").expect("second bridge");
    let a = lab.netns("a").expect("a");
    let b = lab.netns("b").expect("b");
    let c = lab.netns("c").expect("c");
    lab.attach(&a, "eth0", &lan, &["10.77.0.1/24"])
        .expect("attach a");
    lab.attach(&b, "eth0", &lan, &["10.77.0.2/24"])
        .expect("attach b");
    // Same subnet, different bridge: must be unreachable.
    lab.attach(&c, "eth0", &other, &["10.77.0.3/24"])
        .expect("attach c");

    if have("ping") {
        let out = a
            .exec("ping", &["-c", "3", "-i", "0.2", "-W", "2", "10.77.0.2"])
            .expect("ping b");
        // ping exits 0 on at least one reply; retries absorb a loaded machine.
        assert!(String::from_utf8_lossy(&out.stdout).contains(" received"));
        let err = a
            .exec("ping", &["-c", "1", "-W", "1", "10.77.0.3"])
            .expect_err("c is on another bridge");
        assert!(
            err.to_string().contains(a.name()),
            "error names the namespace: {err}"
        );
    } else {
        eprintln!("ping is not installed: reachability proved with UDP only");
    }
    assert_eq!(
        udp_exchange(&a, &b, "10.77.0.2", PATIENT).as_deref(),
        Some(&b"hello"[..])
    );
    assert_eq!(
        udp_exchange(&a, &c, "10.77.0.3", BRIEF),
        None,
        "c is on another bridge"
    );
}

#[test]
fn pulling_a_bridge_port_cuts_the_node_off() {
    let lab = Lab::new().expect("lab");
    let lan = lab.bridge("lan").expect("bridge");
    let a = lab.netns("a").expect("a");
    let b = lab.netns("b").expect("b");
    lab.attach(&a, "eth0", &lan, &["10.82.0.1/24"])
        .expect("attach a");
    lab.attach(&b, "eth0", &lan, &["10.82.0.2/24"])
        .expect("attach b");
    assert!(
        udp_exchange(&a, &b, "10.82.0.2", PATIENT).is_some(),
        "connected"
    );

    let port = lab.port(&b, "eth0").expect("b's port");
    port.set_link(false).expect("pull the cable");
    assert_eq!(
        udp_exchange(&a, &b, "10.82.0.2", BRIEF),
        None,
        "cable pulled"
    );
    port.set_link(true).expect("plug it back");
    b.wait_link_up("eth0", PATIENT).expect("carrier back");
    assert!(
        udp_exchange(&a, &b, "10.82.0.2", PATIENT).is_some(),
        "reconnected"
    );
    assert!(matches!(
        lab.port(&a, "eth9"),
        Err(LabError::NotAttached { .. })
    ));
}

#[test]
fn tcp_server_in_one_namespace_answers_a_client_in_another() {
    let lab = Lab::new().expect("lab");
    let lan = lab.bridge("lan").expect("bridge");
    let srv = lab.netns("srv").expect("srv");
    let cli = lab.netns("cli").expect("cli");
    lab.attach(&srv, "eth0", &lan, &["10.78.0.1/24", "fd78::1/64"])
        .expect("attach srv");
    lab.attach(&cli, "eth0", &lan, &["10.78.0.2/24", "fd78::2/64"])
        .expect("attach cli");
    // A server thread that entered the namespace and keeps serving.
    let _server = srv
        .spawn_thread(|| {
            let listener = TcpListener::bind("[::]:8080").expect("bind");
            for mut conn in listener.incoming().flatten() {
                let mut buf = [0u8; 5];
                if conn.read_exact(&mut buf).is_ok() {
                    let _ = conn.write_all(&buf.map(|c| c.to_ascii_uppercase()));
                }
            }
        })
        .expect("server thread");
    for target in ["10.78.0.1:8080", "[fd78::1]:8080"] {
        let addr: SocketAddr = target.parse().expect("addr");
        cli.wait_tcp(addr, Duration::from_secs(5))
            .expect("server reachable");
        let reply = cli
            .run(move || {
                let mut s = TcpStream::connect(addr).expect("connect");
                s.write_all(b"hello").expect("write");
                let mut buf = [0u8; 5];
                s.read_exact(&mut buf).expect("read");
                buf
            })
            .expect("client");
        assert_eq!(&reply, b"HELLO", "via {target}");
    }
    // Control: a namespace of the lab that is not on the bridge cannot reach
    // it. (Never probe from the host: its default route leads off the machine.)
    let outsider = lab.netns("out").expect("outsider");
    let addr: SocketAddr = "10.78.0.1:8080".parse().expect("addr");
    let from_outside = outsider
        .run(move || TcpStream::connect_timeout(&addr, Duration::from_millis(300)))
        .expect("outsider thread");
    assert!(
        from_outside.is_err(),
        "reached from an unconnected namespace"
    );
    let err = cli
        .wait_tcp(
            "10.78.0.1:8081".parse().expect("addr"),
            Duration::from_millis(300),
        )
        .expect_err("nobody listens on 8081");
    assert!(matches!(err, LabError::Timeout { .. }), "{err}");
}

#[test]
fn direct_link_between_two_namespaces() {
    let lab = Lab::new().expect("lab");
    let a = lab.netns("a").expect("a");
    let b = lab.netns("b").expect("b");
    lab.link(&a, "to-b", &["10.79.0.1/30"], &b, "to-a", &["10.79.0.2/30"])
        .expect("link");
    assert_eq!(
        udp_exchange(&a, &b, "10.79.0.2", PATIENT).as_deref(),
        Some(&b"hello"[..])
    );
    let addresses = b.addresses("to-a").expect("addresses");
    assert!(
        addresses.contains(&"10.79.0.2/30".to_owned()),
        "{addresses:?}"
    );
    b.set_link("to-a", false).expect("down");
    assert_eq!(udp_exchange(&a, &b, "10.79.0.2", BRIEF), None, "link down");
}

#[test]
fn spawned_process_runs_inside_the_namespace_with_the_commands_settings() {
    let lab = Lab::new().expect("lab");
    let lan = lab.bridge("lan").expect("bridge");
    let a = lab.netns("a").expect("a");
    lab.attach(&a, "labif0", &lan, &["10.83.0.1/24"])
        .expect("attach");
    let child = lab
        .spawn(
            &a,
            Command::new("sh")
                .args([
                    "-c",
                    "echo \"$TANDEM_LAB_TEST\"; pwd; ls /sys/class/net; cat /proc/net/dev",
                ])
                .env("TANDEM_LAB_TEST", "env kept")
                .current_dir("/tmp")
                .stdout(Stdio::piped()),
        )
        .expect("spawn");
    let out = child.wait_with_output().expect("output");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("env kept"));
    assert_eq!(lines.next(), Some("/tmp"));
    // /sys is the namespace's own: exactly its interfaces.
    let sys: Vec<&str> = lines.by_ref().take(2).collect();
    assert_eq!(sys, ["labif0", "lo"], "{text}");
    assert!(
        text.contains("labif0:"),
        "/proc/net/dev of the namespace: {text}"
    );
}

#[test]
fn exec_failure_names_the_namespace_command_and_stderr() {
    let lab = Lab::new().expect("lab");
    let a = lab.netns("a").expect("a");
    let err = a
        .exec("sh", &["-c", "echo oops >&2; exit 3"])
        .expect_err("exit 3");
    let msg = err.to_string();
    assert!(
        msg.contains(a.name()) && msg.contains("sh -c") && msg.contains("oops"),
        "{msg}"
    );
    let err = a
        .exec("/nonexistent/prog", &[])
        .expect_err("missing program");
    assert!(err.to_string().contains("/nonexistent/prog"), "{err}");
    let err = a
        .add_address("nope0", "10.9.9.9/24")
        .expect_err("no such interface");
    assert!(err.to_string().contains("nope0"), "{err}");
    assert!(matches!(
        lab.netns("bad/name"),
        Err(LabError::InvalidName { .. })
    ));
    assert!(matches!(
        lab.attach(
            &a,
            "a-much-too-long-name",
            &lab.bridge("br").expect("bridge"),
            &[]
        ),
        Err(LabError::InvalidName { .. })
    ));
}

#[test]
fn a_panic_inside_run_becomes_an_error_naming_the_namespace() {
    let lab = Lab::new().expect("lab");
    let a = lab.netns("a").expect("a");
    let err = a.run(|| panic!("boom")).expect_err("panicked");
    assert!(
        matches!(&err, LabError::Panicked { message, .. } if message == "boom"),
        "{err}"
    );
    assert!(err.to_string().contains(a.name()));
    // The caller's thread never changed namespace: it still sees the host's.
    let here = std::fs::read_link("/proc/thread-self/ns/net").expect("own netns");
    let there = a
        .run(|| std::fs::read_link("/proc/thread-self/ns/net"))
        .expect("run")
        .expect("netns");
    assert_ne!(here, there);
    assert_eq!(
        here,
        std::fs::read_link("/proc/thread-self/ns/net").expect("own netns")
    );
}

#[test]
fn sysctls_are_per_namespace() {
    let lab = Lab::new().expect("lab");
    let a = lab.netns("a").expect("a");
    let b = lab.netns("b").expect("b");
    let host = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").expect("host");
    let before = b.read_sysctl("net.ipv4.ip_forward").expect("read b");
    let flipped = if before == "1" { "0" } else { "1" };
    a.sysctl("net.ipv4.ip_forward", flipped).expect("set a");
    assert_eq!(
        a.read_sysctl("net.ipv4.ip_forward").expect("read a"),
        flipped
    );
    assert_eq!(
        b.read_sysctl("net.ipv4.ip_forward").expect("read b"),
        before
    );
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").expect("host"),
        host
    );
    assert_eq!(
        a.read_sysctl("net/ipv6/conf/default/accept_dad")
            .expect("dad"),
        "0"
    );
}

#[test]
fn lab_leaves_nothing_behind_after_drop() {
    let lab = Lab::new().expect("lab");
    let id = lab.id().to_owned();
    let lan = lab.bridge("lan").expect("bridge");
    let a = lab.netns("a").expect("a");
    let b = lab.netns("b").expect("b");
    lab.attach(&a, "eth0", &lan, &["10.80.0.1/24"])
        .expect("attach");
    lab.link(&a, "to-b", &[], &b, "to-a", &[]).expect("link");
    let names: Vec<String> = lab
        .namespaces()
        .iter()
        .map(|n| n.name().to_owned())
        .collect();
    assert_eq!(names.len(), 3, "a, b and the switch: {names:?}");
    let list = netns_list();
    assert!(
        names.iter().all(|n| list.contains(n.as_str())),
        "created: {list}"
    );
    drop(lab);
    assert_nothing_left(&id, &names);
}

#[test]
fn lab_leaves_nothing_behind_after_a_panic() {
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::thread::spawn(move || {
        let lab = Lab::new().expect("lab");
        let lan = lab.bridge("lan").expect("bridge");
        let a = lab.netns("a").expect("a");
        lab.attach(&a, "eth0", &lan, &["10.81.0.1/24"])
            .expect("attach");
        let _sleeper = lab
            .spawn(&a, Command::new("sleep").arg("1000"))
            .expect("spawn");
        let names: Vec<String> = lab
            .namespaces()
            .iter()
            .map(|n| n.name().to_owned())
            .collect();
        tx.send((lab.id().to_owned(), names)).expect("send id");
        panic!("a test failing halfway");
    })
    .join();
    assert!(result.is_err(), "the thread panicked");
    let (id, names) = rx.recv().expect("id");
    assert_eq!(names.len(), 2);
    assert_nothing_left(&id, &names);
}

#[test]
fn spawned_process_is_killed_when_the_lab_drops() {
    let lab = Lab::new().expect("lab");
    let a = lab.netns("a").expect("a");
    let mut child = lab
        .spawn(&a, Command::new("sleep").arg("1000"))
        .expect("spawn");
    let pid = child.pid();
    assert_eq!(kill(pid, None), Ok(()), "running");
    assert_eq!(child.try_wait().expect("try_wait"), None);
    let started = Instant::now();
    // The handle outlives the lab: the lab still stops and reaps it.
    drop(lab);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "sleep exits on SIGTERM, no SIGKILL wait"
    );
    assert_eq!(
        kill(pid, None),
        Err(Errno::ESRCH),
        "sleep {pid} still exists"
    );
    let status = child.try_wait().expect("try_wait").expect("exited");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGTERM)
    );
    assert!(
        matches!(child.kill(Signal::SIGKILL), Err(LabError::Exited { .. })),
        "no signal to a reaped pid"
    );
}

#[test]
fn a_process_ignoring_sigterm_is_killed() {
    let lab = Lab::new().expect("lab");
    let a = lab.netns("a").expect("a");
    let mut child = lab
        .spawn(
            &a,
            Command::new("sh")
                .args([
                    "-c",
                    "trap '' TERM; echo ready; while :; do sleep 0.05; done",
                ])
                .stdout(Stdio::piped()),
        )
        .expect("spawn");
    // Wait until the trap is installed before signalling.
    let mut ready = [0u8; 6];
    child
        .take_stdout()
        .expect("stdout")
        .read_exact(&mut ready)
        .expect("ready");
    let status = child.stop(Duration::from_millis(300)).expect("stop");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    assert_eq!(kill(child.pid(), None), Err(Errno::ESRCH));
}

#[test]
fn leftovers_of_a_dead_lab_are_swept() {
    // Owner pid "zzzzz" in base 36 = 60466175: beyond any pid_max (2^22).
    let stale = format!("tlzzzzz0-old{}", std::process::id());
    let added = Command::new("ip")
        .args(["netns", "add", &stale])
        .status()
        .expect("ip netns add");
    assert!(added.success());
    // Another test's Lab::new may sweep it first: either way it must go.
    let _lab = Lab::new().expect("lab");
    let gone = !netns_list().contains(&stale);
    if !gone {
        let _ = Command::new("ip").args(["netns", "del", &stale]).status();
    }
    assert!(gone, "stale namespace {stale} swept");
}

#[test]
fn leftovers_of_an_earlier_process_with_our_pid_are_swept() {
    let lab = Lab::new().expect("lab");
    let a = lab.netns("a").expect("a");
    // Same pid as ours, a sequence number this process has not used: what a
    // dead process with a recycled pid would have left.
    let stale = format!("{}zzzz-old", &lab.id()[..7]);
    let added = Command::new("ip")
        .args(["netns", "add", &stale])
        .status()
        .expect("ip netns add");
    assert!(added.success());
    let _second = Lab::new().expect("second lab");
    let list = netns_list();
    let gone = !list.contains(&stale);
    if !gone {
        let _ = Command::new("ip").args(["netns", "del", &stale]).status();
    }
    assert!(gone, "stale namespace {stale} swept");
    assert!(
        list.contains(a.name()),
        "a live lab of this process is kept"
    );
}

#[test]
fn workspace_bin_points_beside_the_test_executable() {
    let path = tandem_lab::workspace_bin("no-such-binary");
    let exe = std::env::current_exe().expect("exe");
    assert_eq!(path.parent(), exe.parent().and_then(Path::parent));
    let err = tandem_lab::require_workspace_bin("no-such-binary").expect_err("missing");
    assert!(err.to_string().contains("cargo build --workspace"), "{err}");
    let err = tandem_lab::wait_for_unix_socket(
        Path::new("/nonexistent/tandem.sock"),
        Duration::from_millis(50),
    )
    .expect_err("no socket");
    assert!(
        err.to_string().contains("/nonexistent/tandem.sock"),
        "{err}"
    );
}
