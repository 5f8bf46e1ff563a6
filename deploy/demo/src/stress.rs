//! `--stress`: vrrpd and keepalived in the same lab and the same run, no
//! node failing, while CPU hogs keep every core busy (4 busy processes per
//! core). What the hogs cost each speaker:
//!
//! - role changes: how often the advertising node changed on the wire (a
//!   false takeover, and the way back if the old master takes the role
//!   again), from a capture in the client's namespace;
//! - worst client outage: the longest time without an answer from the
//!   floating IP, probed every 2 ms (the probe and the nodes' responders run
//!   at real-time priority, so the hogs do not delay the measure itself);
//! - worst advert gap: the longest time between two adverts on the wire,
//!   from the kernel's receive timestamps.

use std::io::IoSliceMut;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use comfy_table::{Table, presets};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrIn, recvmsg, setsockopt, sockopt};
use socket2::{Domain, Protocol, Socket, Type};
use tandem_e2e::vrrp_lab::{ClusterOptions, Speaker, VrrpLab};
use tandem_lab::Netns;

/// Busy processes, killed by PID when dropped.
struct Hogs(Vec<Child>);

impl Hogs {
    fn start(n: usize) -> Hogs {
        Hogs(
            (0..n)
                .filter_map(|_| {
                    Command::new("sh")
                        .args(["-c", "while :; do :; done"])
                        .stdin(Stdio::null())
                        .spawn()
                        .ok()
                })
                .collect(),
        )
    }
}

impl Drop for Hogs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Every advert seen in a namespace: (kernel receive time in seconds,
/// source, priority).
struct Wire {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(f64, Ipv4Addr, u8)>>,
}

impl Wire {
    fn start(ns: &Netns) -> Wire {
        let sock = ns
            .run(|| -> std::io::Result<Socket> {
                let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(112)))?;
                // The client's address picks eth0 (the namespace has no default route).
                s.join_multicast_v4(&Ipv4Addr::new(224, 0, 0, 18), &Ipv4Addr::new(10, 0, 0, 50))?;
                s.set_read_timeout(Some(Duration::from_millis(100)))?;
                Ok(s)
            })
            .expect("client namespace")
            .expect("capture socket");
        setsockopt(&sock, sockopt::ReceiveTimestampns, &true).expect("SO_TIMESTAMPNS");
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            tandem_e2e::vrrp_lab::set_realtime();
            let mut seen = Vec::new();
            let mut buf = [0u8; 2048];
            while !s.load(Ordering::SeqCst) {
                let mut cmsg = nix::cmsg_space!(nix::sys::time::TimeSpec);
                let mut iov = [IoSliceMut::new(&mut buf)];
                let Ok(msg) = recvmsg::<SockaddrIn>(
                    sock.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::empty(),
                ) else {
                    continue;
                };
                let mut at = None;
                if let Ok(cmsgs) = msg.cmsgs() {
                    for c in cmsgs {
                        if let ControlMessageOwned::ScmTimestampns(ts) = c {
                            at = Some(ts.tv_sec() as f64 + ts.tv_nsec() as f64 / 1e9);
                        }
                    }
                }
                let n = msg.bytes;
                // IPv4 header (with the source), then the VRRP priority at +2.
                if let Some(at) = at
                    && n >= 24
                {
                    let ihl = usize::from(buf[0] & 0x0f) * 4;
                    if n > ihl + 2 {
                        let src = Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]);
                        seen.push((at, src, buf[ihl + 2]));
                    }
                }
            }
            seen
        });
        Wire { stop, thread }
    }

    fn finish(self) -> Vec<(f64, Ipv4Addr, u8)> {
        self.stop.store(true, Ordering::SeqCst);
        let mut v = self.thread.join().unwrap_or_default();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v
    }
}

struct Outcome {
    role_changes: usize,
    worst_outage: Duration,
    worst_advert_gap: Duration,
    adverts: usize,
}

fn one_run(interval_ms: u32, speaker: Speaker, seconds: u64) -> Option<Outcome> {
    let opts = ClusterOptions {
        advert_interval_ms: interval_ms,
        realtime_probe: true,
        ..ClusterOptions::default()
    };
    let mut lab = VrrpLab::new(&opts);
    lab.start_as("lb1", speaker);
    lab.start_as("lb2", speaker);
    lab.wait_stable(
        Duration::from_secs(20),
        Duration::from_secs(1),
        "one VIP holder",
        |l| l.vip_holders().len() == 1,
    );
    let wire = Wire::start(&lab.client);
    let probe = lab.start_probe(Duration::from_millis(2));
    std::thread::sleep(Duration::from_millis(500));
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let hogs = Hogs::start(4 * cores);
    std::thread::sleep(Duration::from_secs(seconds));
    drop(hogs);
    std::thread::sleep(Duration::from_millis(500));
    let log = probe.finish();
    let adverts: Vec<_> = wire
        .finish()
        .into_iter()
        .filter(|(_, _, prio)| *prio > 0)
        .collect();
    if adverts.is_empty() || log.answers.is_empty() {
        return None;
    }
    let role_changes = adverts.windows(2).filter(|w| w[0].1 != w[1].1).count();
    let worst_advert_gap = adverts
        .windows(2)
        .map(|w| Duration::from_secs_f64((w[1].0 - w[0].0).max(0.0)))
        .max()
        .unwrap_or_default();
    let worst_outage = log
        .answers
        .windows(2)
        .map(|w| w[1].0 - w[0].0)
        .max()
        .unwrap_or_default();
    Some(Outcome {
        role_changes,
        worst_outage,
        worst_advert_gap,
        adverts: adverts.len(),
    })
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

pub fn main(args: &[String]) {
    let seconds: u64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(60);
    let mut intervals: Vec<u32> = args.iter().skip(1).filter_map(|a| a.parse().ok()).collect();
    if intervals.is_empty() {
        intervals = vec![100, 50, 10];
    }
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut table = Table::new();
    table.load_style(presets::UTF8_FULL_CONDENSED);
    table.set_header([
        "advert interval",
        "speaker",
        "role changes",
        "worst client outage ms",
        "worst advert gap ms",
        "adverts seen",
    ]);
    for interval in intervals {
        for speaker in [Speaker::Vrrpd, Speaker::Keepalived] {
            let name = match speaker {
                Speaker::Vrrpd => "vrrpd",
                Speaker::Keepalived => "keepalived 2.2.7",
            };
            eprintln!(
                "{interval} ms, {name}: {seconds} s under {} CPU hogs",
                4 * cores
            );
            match one_run(interval, speaker, seconds) {
                Some(o) => table.add_row([
                    format!("{interval} ms"),
                    name.into(),
                    o.role_changes.to_string(),
                    ms(o.worst_outage),
                    ms(o.worst_advert_gap),
                    o.adverts.to_string(),
                ]),
                None => table.add_row([
                    format!("{interval} ms"),
                    name.into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "0".into(),
                ]),
            };
        }
    }
    println!(
        "{seconds} s with {} busy processes on {cores} cores, no node failing (vrrpd at its default rt_priority 10; keepalived at its defaults):",
        4 * cores
    );
    println!("{table}");
}
