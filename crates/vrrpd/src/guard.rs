//! The floating-IP guard: a dead vrrpd must not leave a second master.
//!
//! vrrpd starts a small process of its own binary (`vrrpd
//! --floating-ip-guard`) with a pipe on its stdin, and tells it which
//! floating IPs it holds each time that changes. When vrrpd ends properly
//! it says `bye` (after its handover); when it dies any other way (SIGKILL,
//! a crash, the OOM killer) the pipe closes, and the guard removes the
//! addresses at once and exits. The backup takes over after
//! Master_Down_Interval, so the VIPs are on one node from then on.
//!
//! A vrrpd that hangs rather than dies keeps the pipe open: for that, the
//! addresses carry a kernel lifetime that only a running vrrpd refreshes
//! (see `setup::auto_lifetime`). The guard ignores SIGTERM, SIGINT and
//! SIGHUP: systemd stopping the unit signals every process of it, and the
//! handover in progress must keep the addresses until vrrpd says `bye`.
//!
//! The protocol on the pipe, one line each:
//! `hold <interface> <address>/<prefix> [<interface> <address>/<prefix> ...]`
//! (an empty `hold` when nothing is held) and `bye`.

use std::io::{self, BufRead, Write};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::time::Duration;

use crate::addresses::{Addresses, FloatingIp};

/// The argument that makes vrrpd the guard.
pub const GUARD_ARG: &str = "--floating-ip-guard";

/// vrrpd's side: the running guard.
pub struct Guard {
    child: Child,
    stdin: Option<ChildStdin>,
    /// A write failed and was logged (the guard is gone).
    failed: bool,
}

impl Guard {
    /// Starts the guard (this binary, in this network namespace; at this
    /// thread's scheduling priority).
    pub fn spawn() -> io::Result<Guard> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .arg(GUARD_ARG)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take();
        Ok(Guard {
            child,
            stdin,
            failed: false,
        })
    }

    /// Tells the guard the floating IPs now held.
    pub fn hold(&mut self, ips: &[FloatingIp]) {
        let mut line = String::from("hold");
        for ip in ips {
            line.push_str(&format!(" {} {}", ip.interface, ip.cidr()));
        }
        line.push('\n');
        self.send(&line);
    }

    /// vrrpd ends properly: the guard leaves the addresses alone and exits.
    pub fn bye(mut self) {
        self.send("bye\n");
        self.stdin = None;
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        tracing::warn!(
            pid = self.child.id(),
            "the floating-IP guard did not exit within 1 s of bye"
        );
    }

    fn send(&mut self, line: &str) {
        let Some(stdin) = self.stdin.as_mut() else {
            return;
        };
        let result = stdin
            .write_all(line.as_bytes())
            .and_then(|()| stdin.flush());
        if let Err(e) = result
            && !self.failed
        {
            tracing::error!(
                pid = self.child.id(),
                "the floating-IP guard is gone ({e}): if vrrpd dies, only the addresses' lifetime removes them"
            );
            self.failed = true;
        }
    }
}

/// One held address, as the pipe carries it.
fn parse_hold(line: &str) -> Result<Vec<FloatingIp>, String> {
    let words: Vec<&str> = line.split_whitespace().skip(1).collect();
    if !words.len().is_multiple_of(2) {
        return Err(format!("odd number of words in `{line}`"));
    }
    words
        .chunks_exact(2)
        .map(|w| {
            let (addr, prefix) = w[1]
                .split_once('/')
                .ok_or_else(|| format!("`{}` has no prefix", w[1]))?;
            Ok(FloatingIp {
                address: addr
                    .parse()
                    .map_err(|_| format!("`{addr}` is not an address"))?,
                prefix_len: prefix
                    .parse()
                    .map_err(|_| format!("`{prefix}` is not a prefix length"))?,
                interface: w[0].to_owned(),
            })
        })
        .collect()
}

/// The guard's main: follows the pipe until `bye` or its end.
pub fn run() -> ExitCode {
    tandem_runtime::init_logging("vrrpd");
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: setting a signal's disposition to "ignore" is always sound.
        unsafe {
            libc::signal(sig, libc::SIG_IGN);
        }
    }
    let mut held: Vec<FloatingIp> = Vec::new();
    for line in io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if line == "bye" {
            return ExitCode::SUCCESS;
        }
        if line.starts_with("hold") {
            match parse_hold(&line) {
                Ok(ips) => held = ips,
                Err(e) => tracing::error!("floating-IP guard: bad line from vrrpd: {e}"),
            }
        }
    }
    if held.is_empty() {
        return ExitCode::SUCCESS;
    }
    let names = held
        .iter()
        .map(FloatingIp::cidr)
        .collect::<Vec<_>>()
        .join(", ");
    tracing::warn!(
        "vrrpd ended without handing over: removing its floating IPs {names} so that no second master remains"
    );
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(
                "floating-IP guard: no runtime ({e}); {names} stay until their lifetime ends"
            );
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        let addrs = match Addresses::new() {
            Ok(a) => a,
            Err(e) => {
                tracing::error!("floating-IP guard: no netlink ({e}); {names} stay until their lifetime ends");
                return ExitCode::FAILURE;
            }
        };
        let mut code = ExitCode::SUCCESS;
        for ip in &held {
            match addrs.remove(ip).await {
                Ok(true) => tracing::info!(vip = %ip.cidr(), interface = %ip.interface, "floating IP {} removed from {} (vrrpd is gone)", ip.cidr(), ip.interface),
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(vip = %ip.cidr(), interface = %ip.interface, "removing floating IP {} from {} failed: {e}", ip.cidr(), ip.interface);
                    code = ExitCode::FAILURE;
                }
            }
        }
        code
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hold_lines_parse_back_to_the_addresses() {
        let ips = parse_hold("hold eth0 10.0.0.100/24 eth1 fd00::100/64").unwrap();
        assert_eq!(ips.len(), 2);
        assert_eq!(ips[0].interface, "eth0");
        assert_eq!(ips[0].cidr(), "10.0.0.100/24");
        assert_eq!(ips[1].cidr(), "fd00::100/64");
        assert!(parse_hold("hold").unwrap().is_empty());
        assert!(parse_hold("hold eth0").is_err());
        assert!(parse_hold("hold eth0 10.0.0.100").is_err());
    }
}
