//! The lab's own guarantees: topologies that carry traffic, and nothing left
//! behind afterwards — after a drop, after a panic, after a dead process.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::kill;
use tandem_lab::{Lab, Netns};

fn netns_list() -> String {
    String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns")
            .stdout,
    )
    .into_owned()
}

fn root_links() -> String {
    String::from_utf8_lossy(
        &Command::new("ip")
            .args(["-o", "link"])
            .output()
            .expect("ip link")
            .stdout,
    )
    .into_owned()
}

fn assert_nothing_left(id: &str) {
    assert!(
        !netns_list().contains(id),
        "namespaces of {id} left:\n{}",
        netns_list()
    );
    assert!(
        !root_links().contains(id),
        "links of {id} in the root namespace"
    );
}

fn udp_exchange(from: &Netns, to: &Netns, to_addr: &str) {
    let server = to
        .run(|| UdpSocket::bind("0.0.0.0:5000"))
        .expect("ns")
        .expect("bind");
    let dest: SocketAddr = format!("{to_addr}:5000").parse().expect("addr");
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let (n, peer) = server.recv_from(&mut buf).expect("recv");
        server.send_to(&buf[..n], peer).expect("send back");
    });
    let got = from
        .run(move || {
            let s = UdpSocket::bind("0.0.0.0:0").expect("bind client");
            s.set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            s.send_to(b"hello", dest).expect("send");
            let mut buf = [0u8; 64];
            let n = s.recv(&mut buf).expect("reply");
            buf[..n].to_vec()
        })
        .expect("client thread");
    echo.join().expect("echo thread");
    assert_eq!(got, b"hello");
}

#[test]
fn two_namespaces_on_a_bridge_reach_each_other() {
    let lab = Lab::new().expect("lab");
    let lan = lab.bridge("lan").expect("bridge");
    let a = lab.netns("a").expect("a");
    let b = lab.netns("b").expect("b");
    lab.attach(&a, "eth0", &lan, &["10.77.0.1/24"])
        .expect("attach a");
    lab.attach(&b, "eth0", &lan, &["10.77.0.2/24"])
        .expect("attach b");
    let ping = a
        .exec("ping", &["-c", "1", "-W", "2", "10.77.0.2"])
        .expect("ping");
    assert!(String::from_utf8_lossy(&ping.stdout).contains("1 received"));
    udp_exchange(&a, &b, "10.77.0.2");
    // An address nobody has does not answer: the test can fail.
    assert!(
        a.exec("ping", &["-c", "1", "-W", "1", "10.77.0.3"])
            .is_err()
    );
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
    let listener = srv
        .run(|| TcpListener::bind("[::]:8080"))
        .expect("ns")
        .expect("bind");
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 5];
            if conn.read_exact(&mut buf).is_ok() {
                let _ = conn.write_all(&buf.map(|c| c.to_ascii_uppercase()));
            }
        }
    });
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
}

#[test]
fn direct_link_between_two_namespaces() {
    let lab = Lab::new().expect("lab");
    let a = lab.netns("a").expect("a");
    let b = lab.netns("b").expect("b");
    lab.link(&a, "to-b", &["10.79.0.1/30"], &b, "to-a", &["10.79.0.2/30"])
        .expect("link");
    udp_exchange(&a, &b, "10.79.0.2");
}

#[test]
fn lab_leaves_nothing_behind_after_drop() {
    let lab = Lab::new().expect("lab");
    let id = lab.id().to_owned();
    let lan = lab.bridge("lan").expect("bridge");
    let a = lab.netns("a").expect("a");
    lab.attach(&a, "eth0", &lan, &["10.80.0.1/24"])
        .expect("attach");
    assert!(netns_list().contains(&id), "created");
    drop(lab);
    assert_nothing_left(&id);
}

#[test]
fn lab_leaves_nothing_behind_after_a_panic() {
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::thread::spawn(move || {
        let lab = Lab::new().expect("lab");
        tx.send(lab.id().to_owned()).expect("send id");
        let lan = lab.bridge("lan").expect("bridge");
        let a = lab.netns("a").expect("a");
        lab.attach(&a, "eth0", &lan, &["10.81.0.1/24"])
            .expect("attach");
        panic!("a test failing halfway");
    })
    .join();
    assert!(result.is_err(), "the thread panicked");
    let id = rx.recv().expect("id");
    assert_nothing_left(&id);
}

#[test]
fn spawned_process_is_killed_when_the_lab_drops() {
    let lab = Lab::new().expect("lab");
    let a = lab.netns("a").expect("a");
    let child = lab
        .spawn(&a, Command::new("sleep").arg("1000"))
        .expect("spawn");
    let pid = child.pid();
    assert!(kill(pid, None).is_ok(), "running");
    // The child handle outlives the lab: the lab still stops it by PID.
    drop(lab);
    drop(child);
    assert!(kill(pid, None).is_err(), "sleep {pid} still alive");
}

#[test]
fn leftovers_of_a_dead_lab_are_swept() {
    // pid "zzzzz" in base 36 = 60466175: beyond pid_max (4194304 at most).
    let stale = "tlzzzzzx0-old";
    Command::new("ip")
        .args(["netns", "add", stale])
        .status()
        .expect("ip netns add");
    assert!(netns_list().contains(stale));
    let _lab = Lab::new().expect("lab");
    assert!(!netns_list().contains(stale), "stale namespace swept");
}
