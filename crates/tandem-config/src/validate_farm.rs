//! The rules of the farm features IPVS and keepalived users expect —
//! persistence, thresholds, the sorry server, timeouts, one-packet
//! scheduling, firewall marks — and of the node's `[hooks]`.

use crate::locate::Seg::{Index, Key};
use crate::model::*;
use crate::validate::{Report, check_range, usable_unicast, with};

/// The longest timeout accepted anywhere: 30 days.
const MAX_TIMEOUT_S: u32 = 2_592_000;

pub fn features(r: &mut Report, f: &Farm) {
    let name = &f.name;
    let dsr = f.forwarding == Forwarding::Dsr;
    let refuse_dsr = |r: &mut Report, key: &'static str, what: &str| {
        r.add(
            vec![Key(key)],
            format!("farm `{name}`: {what} needs connection state, which direct server return does not keep; remove {key} or use forwarding = \"nat\""),
        );
    };

    if let Some(m) = f.fwmark {
        if m == 0 {
            r.add(
                vec![Key("fwmark")],
                format!("farm `{name}`: fwmark must be 1-4294967295 (0 is every unmarked packet)"),
            );
        }
        if dsr {
            r.add(
                vec![Key("fwmark")],
                format!("farm `{name}`: a firewall-mark farm cannot use direct server return (its packets are chosen before the operator's rules mark them); use forwarding = \"nat\""),
            );
        }
    }

    match (f.persistence_timeout_s, f.persistence_netmask) {
        (None, Some(_)) => r.add(
            vec![Key("persistence_netmask")],
            format!("farm `{name}`: persistence_netmask needs persistence_timeout_s"),
        ),
        (Some(t), mask) => {
            check_range(
                r,
                vec![Key("persistence_timeout_s")],
                &format!("farm `{name}`: persistence_timeout_s"),
                t,
                1,
                MAX_TIMEOUT_S,
            );
            if dsr {
                refuse_dsr(r, "persistence_timeout_s", "persistence");
            }
            if let Some(m) = mask {
                let max = if f.vip.is_ipv4() { 32 } else { 128 };
                if f.vip.is_ipv6() && m.dotted {
                    r.add(
                        vec![Key("persistence_netmask")],
                        format!("farm `{name}`: persistence_netmask `{m}` is an IPv4 mask but the vip is IPv6; write a prefix length such as \"/64\""),
                    );
                } else if m.prefix_len > max {
                    r.add(
                        vec![Key("persistence_netmask")],
                        format!("farm `{name}`: persistence_netmask `{m}` is longer than an address of the vip's family (/{max})"),
                    );
                }
            }
        }
        (None, None) => {}
    }

    if f.hash_source_port && !matches!(f.scheduler, Scheduler::Sh | Scheduler::Mh) {
        r.add(
            vec![Key("hash_source_port")],
            format!("farm `{name}`: hash_source_port applies to the sh and mh schedulers only"),
        );
    }

    if f.one_packet {
        let why = if f.protocol != Protocol::Udp {
            Some("one-packet scheduling is for udp farms (protocol = \"udp\")")
        } else if dsr {
            Some(
                "one-packet scheduling needs connection tracking, which direct server return does not use",
            )
        } else if f.fwmark.is_some() {
            Some("one-packet scheduling needs vip and port: a firewall mark is set too late for it")
        } else if f.persistence_timeout_s.is_some() {
            Some(
                "one-packet scheduling and persistence contradict each other (every datagram of a client would go to one backend); use one or the other",
            )
        } else {
            None
        };
        if let Some(why) = why {
            r.add(vec![Key("one_packet")], format!("farm `{name}`: {why}"));
        }
    }

    if dsr && f.on_backend_failure == OnBackendFailure::Reset {
        refuse_dsr(
            r,
            "on_backend_failure",
            "resetting a failed backend's connections",
        );
    }

    if let Some(s) = &f.sorry_server {
        let p = vec![Key("sorry_server")];
        if dsr {
            refuse_dsr(r, "sorry_server", "a sorry server");
        }
        if s.address.is_ipv4() != f.vip.is_ipv4() {
            r.add(
                with(&p, Key("address")),
                format!(
                    "farm `{name}`: sorry server {} and vip {} are of different families",
                    s.address, f.vip
                ),
            );
        } else if !usable_unicast(s.address) {
            r.add(
                with(&p, Key("address")),
                format!(
                    "farm `{name}`: sorry server {} is not a usable unicast address",
                    s.address
                ),
            );
        }
        if s.port == Some(0) {
            r.add(
                with(&p, Key("port")),
                format!("farm `{name}`: sorry server port must be 1-65535"),
            );
        }
        let port = |p: Option<u16>| p.or(f.port.is_single().then_some(f.port.first));
        if f.backends
            .iter()
            .any(|b| b.address == s.address && port(b.port) == port(s.port))
        {
            r.add(
                with(&p, Key("address")),
                format!(
                    "farm `{name}`: the sorry server {} is also a backend; it answers only when no backend can",
                    s.address
                ),
            );
        }
    }

    let t = &f.timeouts;
    let tp = |k| vec![Key("timeouts"), Key(k)];
    for (key, v, tcp) in [
        ("tcp_s", t.tcp_s, true),
        ("tcp_fin_s", t.tcp_fin_s, true),
        ("udp_s", t.udp_s, false),
    ] {
        let Some(v) = v else { continue };
        check_range(
            r,
            tp(key),
            &format!("farm `{name}`: {key}"),
            v,
            1,
            MAX_TIMEOUT_S,
        );
        if dsr {
            r.add(
                tp(key),
                format!("farm `{name}`: direct server return does not track connections, so it has no timeouts; remove [timeouts]"),
            );
        } else if tcp && f.protocol == Protocol::Udp {
            r.add(
                tp(key),
                format!("farm `{name}`: {key} is a TCP timeout but the farm is udp-only"),
            );
        } else if !tcp && f.protocol == Protocol::Tcp {
            r.add(
                tp(key),
                format!("farm `{name}`: udp_s is a UDP timeout but the farm is tcp-only"),
            );
        }
    }

    for (i, b) in f.backends.iter().enumerate() {
        let p = vec![Key("backends"), Index(i)];
        let who = crate::validate::endpoint(
            b.address,
            b.port.map_or_else(|| f.port.to_string(), |p| p.to_string()),
        );
        if let Some(x) = b.upper_threshold {
            check_range(
                r,
                with(&p, Key("upper_threshold")),
                &format!("farm `{name}`: backend {who} upper_threshold"),
                x,
                1,
                1_000_000,
            );
            if dsr {
                r.add(
                    with(&p, Key("upper_threshold")),
                    format!("farm `{name}`: connection thresholds need connection counts, which direct server return cannot give"),
                );
            }
        }
        match (b.lower_threshold, b.upper_threshold) {
            (Some(_), None) => r.add(
                with(&p, Key("lower_threshold")),
                format!("farm `{name}`: backend {who}: lower_threshold needs upper_threshold"),
            ),
            (Some(y), Some(x)) if y >= x => r.add(
                with(&p, Key("lower_threshold")),
                format!("farm `{name}`: backend {who}: lower_threshold ({y}) must be below upper_threshold ({x})"),
            ),
            _ => {}
        }
    }
}

pub fn hooks(r: &mut Report, h: &Hooks) {
    for (key, path) in [
        ("master", &h.master),
        ("backup", &h.backup),
        ("fault", &h.fault),
        ("maintenance", &h.maintenance),
        ("backend", &h.backend),
        ("notify", &h.notify),
    ] {
        if let Some(p) = path
            && !p.starts_with('/')
        {
            r.add(
                vec![Key("hooks"), Key(key)],
                format!("hooks: {key} = `{p}` must be an absolute path to an executable"),
            );
        }
    }
    check_range(
        r,
        vec![Key("hooks"), Key("timeout_ms")],
        "hooks: timeout_ms",
        h.timeout_ms,
        100,
        3_600_000,
    );
}
