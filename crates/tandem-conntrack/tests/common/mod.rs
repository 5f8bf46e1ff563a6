//! Helpers shared by the namespace tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::IpAddr;

use tandem_conntrack::entry::{proto, status, tcp};
use tandem_conntrack::{Conntrack, Entry, TcpInfo, Tuple};
use tandem_lab::Netns;

pub fn tuple(src: &str, sport: u16, dst: &str, dport: u16, protocol: u8) -> Tuple {
    Tuple {
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
        protocol,
        src_port: sport,
        dst_port: dport,
    }
}

/// A conntrack handle in `ns`.
pub fn open(ns: &Netns) -> Conntrack {
    ns.run(Conntrack::open)
        .expect("netns thread")
        .expect("open ctnetlink")
}

/// An established, assured TCP entry `client -> vip:vport`, DNATed to
/// `backend:bport` and SNATed to `floating`.
pub fn nat_tcp(
    client: &str,
    cport: u16,
    vip: &str,
    vport: u16,
    backend: &str,
    bport: u16,
    floating: &str,
) -> Entry {
    Entry {
        original: tuple(client, cport, vip, vport, proto::TCP),
        reply: tuple(backend, bport, floating, cport, proto::TCP),
        status: status::CONFIRMED | status::SEEN_REPLY | status::ASSURED,
        timeout_s: 3600,
        mark: 7,
        zone: 0,
        tcp: Some(TcpInfo {
            state: tcp::ESTABLISHED,
            wscale_original: 7,
            wscale_reply: 7,
            flags_original: tcp::FLAG_WINDOW_SCALE | tcp::FLAG_SACK_PERM,
            flags_reply: tcp::FLAG_WINDOW_SCALE | tcp::FLAG_SACK_PERM,
        }),
    }
}

/// `n` entries like [`nat_tcp`]'s from client 10.0.0.50 to the VIP
/// 10.0.0.100:80 via backend 10.1.0.11:8080, client ports from `first`.
pub fn nat_tcp_many(first: u16, n: u16) -> Vec<Entry> {
    (0..n)
        .map(|i| {
            nat_tcp(
                "10.0.0.50",
                first + i,
                "10.0.0.100",
                80,
                "10.1.0.11",
                8080,
                "10.1.0.100",
            )
        })
        .collect()
}

/// One line of `conntrack -L`: the protocol name, the TCP state (if any),
/// the original and reply tuples' key=value pairs, mark and flags.
#[derive(Debug, Default)]
pub struct CtLine {
    pub proto: String,
    pub state: Option<String>,
    pub original: HashMap<String, String>,
    pub reply: HashMap<String, String>,
    pub mark: Option<u32>,
    pub flags: Vec<String>,
    pub timeout_s: u32,
}

impl CtLine {
    pub fn original_tuple(&self, protocol: u8) -> Tuple {
        ct_tuple(&self.original, protocol)
    }
    pub fn reply_tuple(&self, protocol: u8) -> Tuple {
        ct_tuple(&self.reply, protocol)
    }
}

fn ct_tuple(m: &HashMap<String, String>, protocol: u8) -> Tuple {
    let addr = |k: &str| -> IpAddr { m[k].parse().unwrap() };
    let port = |k: &str| -> u16 { m.get(k).map_or(0, |v| v.parse().unwrap()) };
    Tuple {
        src: addr("src"),
        dst: addr("dst"),
        protocol,
        src_port: port("sport"),
        dst_port: port("dport"),
    }
}

/// `conntrack -L -f <family>` in `ns`, parsed.
pub fn conntrack_list(ns: &Netns, family: &str) -> Vec<CtLine> {
    let out = ns
        .exec("conntrack", &["-L", "-f", family])
        .expect("conntrack -L");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().map(parse_ct_line).collect()
}

fn parse_ct_line(line: &str) -> CtLine {
    let mut words = line.split_whitespace();
    let mut ct = CtLine {
        proto: words.next().unwrap_or_default().to_owned(),
        ..CtLine::default()
    };
    let _number = words.next();
    ct.timeout_s = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
    for w in words {
        if let Some((k, v)) = w.split_once('=') {
            if k == "mark" {
                ct.mark = v.parse().ok();
            } else if ct.reply.contains_key("src")
                || (k == "src" && ct.original.contains_key("src"))
            {
                // The second src= starts the reply tuple.
                ct.reply.insert(k.to_owned(), v.to_owned());
            } else if !matches!(k, "use" | "zone" | "id") {
                ct.original.insert(k.to_owned(), v.to_owned());
            }
        } else if w.starts_with('[') {
            ct.flags
                .push(w.trim_matches(|c| c == '[' || c == ']').to_owned());
        } else if w.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
            ct.state = Some(w.to_owned());
        }
    }
    ct
}
