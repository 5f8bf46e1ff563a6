//! The failover proof at kernel level: an established, NATed TCP
//! connection through balancer lb1 keeps its byte stream when lb1 dies and
//! lb2 takes over the VIP and the floating source address — if lb1's
//! conntrack entry was injected into lb2 first. Without the injection (the
//! control) the same connection breaks, lb2 having
//! nf_conntrack_tcp_loose=0 so that it cannot pick the flow up mid-stream.
//!
//! ```text
//!  client 10.0.0.50 --lan-- lb1 (10.0.0.1, VIP 10.0.0.100 | 10.1.0.1, floating 10.1.0.100) --back-- backend 10.1.0.11:8080
//!                    \----- lb2 (10.0.0.2                  | 10.1.0.2)                       -----/
//! ```

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use common::open;
use tandem_conntrack::entry::proto;
use tandem_conntrack::{CreateOptions, Filter, Service};
use tandem_lab::{Lab, Netns};

const VIP: &str = "10.0.0.100";
const FLOATING: &str = "10.1.0.100";
const BACKEND: &str = "10.1.0.11";

/// The balancers' rules: DNAT of VIP:80 to the backend, SNAT of what goes
/// to the backend to the floating source (as lb-forwarder lays out a farm).
const RULES: &str = "
table ip tandem {
  chain pre {
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr 10.0.0.100 tcp dport 80 dnat to 10.1.0.11:8080
  }
  chain post {
    type nat hook postrouting priority srcnat; policy accept;
    ip daddr 10.1.0.11 tcp dport 8080 snat to 10.1.0.100
  }
}
";

struct FailoverLab {
    _lab: Lab,
    client: Netns,
    lb1: Netns,
    lb2: Netns,
    backend: Netns,
}

fn balancer(
    lab: &Lab,
    name: &str,
    lan: &tandem_lab::Bridge,
    back: &tandem_lab::Bridge,
    n: u8,
) -> Netns {
    let ns = lab.netns(name).unwrap();
    lab.attach(&ns, "eth0", lan, &[&format!("10.0.0.{n}/24")])
        .unwrap();
    lab.attach(&ns, "eth1", back, &[&format!("10.1.0.{n}/24")])
        .unwrap();
    ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
    // Neither balancer may adopt a flow it has no entry for from a
    // mid-stream packet: that would let the control pass.
    ns.sysctl("net.netfilter.nf_conntrack_tcp_loose", "0")
        .unwrap();
    // Counters show which balancer carried the flow.
    ns.sysctl("net.netfilter.nf_conntrack_acct", "1").unwrap();
    let mut nft = std::process::Command::new("nft");
    nft.args(["-f", "-"]).stdin(std::process::Stdio::piped());
    let mut child = lab.spawn(&ns, &mut nft).unwrap();
    child
        .take_stdin()
        .unwrap()
        .write_all(RULES.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "nft: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ns
}

impl FailoverLab {
    fn new() -> FailoverLab {
        let lab = Lab::new().unwrap();
        let lan = lab.bridge("lan").unwrap();
        let back = lab.bridge("back").unwrap();
        let client = lab.netns("cl").unwrap();
        lab.attach(&client, "eth0", &lan, &["10.0.0.50/24"])
            .unwrap();
        let lb1 = balancer(&lab, "lb1", &lan, &back, 1);
        let lb2 = balancer(&lab, "lb2", &lan, &back, 2);
        lb1.add_address("eth0", &format!("{VIP}/24")).unwrap();
        lb1.add_address("eth1", &format!("{FLOATING}/24")).unwrap();
        let backend = lab.netns("be").unwrap();
        lab.attach(&backend, "eth0", &back, &[&format!("{BACKEND}/24")])
            .unwrap();
        // An echo server: every byte comes back.
        let listener = backend
            .run(|| TcpListener::bind((BACKEND, 8080)))
            .unwrap()
            .unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut r = conn;
                    let mut w = r.try_clone().unwrap();
                    let _ = std::io::copy(&mut r, &mut w);
                });
            }
        });
        FailoverLab {
            _lab: lab,
            client,
            lb1,
            lb2,
            backend,
        }
    }

    /// lb1 dies; lb2 takes the VIP and the floating source. Clients and
    /// backends forget lb1's MAC address (what a gratuitous ARP does).
    fn move_addresses_to_lb2(&self) {
        self.lb1
            .remove_address("eth0", &format!("{VIP}/24"))
            .unwrap();
        self.lb1
            .remove_address("eth1", &format!("{FLOATING}/24"))
            .unwrap();
        self.lb1.set_link("eth0", false).unwrap();
        self.lb1.set_link("eth1", false).unwrap();
        self.lb2.add_address("eth0", &format!("{VIP}/24")).unwrap();
        self.lb2
            .add_address("eth1", &format!("{FLOATING}/24"))
            .unwrap();
        self.client.ip(&["neigh", "flush", "dev", "eth0"]).unwrap();
        self.backend.ip(&["neigh", "flush", "dev", "eth0"]).unwrap();
    }
}

/// Sends `round`'s 16 KiB and checks the echo is exactly it.
fn exchange(s: &mut TcpStream, round: u32) -> std::io::Result<()> {
    let data: Vec<u8> = (0..16384u32)
        .map(|i| (i.wrapping_mul(31).wrapping_add(round * 7) % 251) as u8)
        .collect();
    s.write_all(&data)?;
    let mut back = vec![0; data.len()];
    s.read_exact(&mut back)?;
    if back != data {
        return Err(std::io::Error::other(format!(
            "round {round}: bytes differ"
        )));
    }
    Ok(())
}

fn tandem_filter() -> Filter {
    Filter::new(
        [Service {
            vip: VIP.parse().unwrap(),
            protocol: proto::TCP,
            ports: 80..=80,
        }],
        [],
    )
}

/// Runs the scenario; the result of the exchanges after the takeover.
fn fail_over(inject: bool) -> std::io::Result<()> {
    let lab = FailoverLab::new();
    let mut s = lab
        .client
        .run(|| {
            TcpStream::connect_timeout(
                &format!("{VIP}:80").parse().unwrap(),
                Duration::from_secs(3),
            )
        })
        .unwrap()
        .expect("connect to the VIP through lb1");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for round in 0..10 {
        exchange(&mut s, round).expect("exchange through lb1");
    }
    let client_port = s.local_addr().unwrap().port();

    let filter = tandem_filter();
    let flows: Vec<_> = open(&lab.lb1)
        .dump()
        .unwrap()
        .into_iter()
        .filter(|r| filter.matches(&r.entry))
        .collect();
    assert_eq!(flows.len(), 1, "lb1 tracks the client's flow: {flows:#?}");
    let entry = &flows[0].entry;
    assert_eq!(entry.original.src_port, client_port);
    assert_eq!(
        entry.reply.src,
        BACKEND.parse::<std::net::IpAddr>().unwrap()
    );
    assert_eq!(
        entry.reply.dst,
        FLOATING.parse::<std::net::IpAddr>().unwrap()
    );

    let mut lb2 = open(&lab.lb2);
    if inject {
        lb2.create(entry, CreateOptions { be_liberal: true })
            .expect("inject into lb2");
        let injected = lb2.get(&entry.original).unwrap().expect("in lb2");
        assert_eq!(injected.entry.reply, entry.reply);
    }
    assert_eq!(
        lb2.dump().unwrap().len(),
        usize::from(inject),
        "lb2 has seen nothing of the flow itself"
    );

    lab.move_addresses_to_lb2();
    for round in 10..30 {
        exchange(&mut s, round)?;
    }
    // The flow really went through lb2's injected entry, both ways.
    let now = lb2.get(&entry.original).unwrap().expect("entry on lb2");
    assert_eq!(now.entry.reply, entry.reply);
    let c = now.counters.expect("counters on lb2");
    assert!(
        c.bytes_original >= 20 * 16384 && c.bytes_reply >= 20 * 16384,
        "{c:?}"
    );
    Ok(())
}

#[test]
fn an_injected_entry_keeps_the_connection_alive_across_failover() {
    fail_over(true).expect("the same TCP connection continues on lb2 with intact bytes");
}

#[test]
fn without_injection_the_connection_breaks_on_failover() {
    let err = fail_over(false).expect_err("without the entry lb2 must not carry the flow");
    eprintln!("control broke as expected: {err}");
}
