//! An event filter that runs in the kernel: a classic BPF program attached
//! to the event socket (SO_ATTACH_FILTER), as conntrackd does, so events a
//! listener would throw away are never copied to user space nor count
//! against its receive buffer.
//!
//! It drops an event when
//! - its netlink header names the port id to ignore (the listener's own
//!   ctnetlink writes: a replicated entry it injected must not come back as
//!   a change to replicate), or
//! - its original destination is none of the given addresses (flows that
//!   are not to a VIP).
//!
//! An event whose tuple cannot be found is let through: user space judges
//! it. The attribute walk uses the kernel's netlink helpers for socket
//! filters (SKF_AD_NLATTR, SKF_AD_NLATTR_NEST), so the program stays short
//! whatever the attribute order.

use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;

// Classic BPF (linux/filter.h, linux/bpf_common.h).
const BPF_LD: u16 = 0x00;
const BPF_LDX: u16 = 0x01;
const BPF_ST: u16 = 0x02;
const BPF_JMP: u16 = 0x05;
const BPF_RET: u16 = 0x06;
const BPF_MISC: u16 = 0x07;
const BPF_W: u16 = 0x00;
const BPF_IMM: u16 = 0x00;
const BPF_ABS: u16 = 0x20;
const BPF_IND: u16 = 0x40;
const BPF_MEM: u16 = 0x60;
const BPF_JA: u16 = 0x00;
const BPF_JEQ: u16 = 0x10;
const BPF_K: u16 = 0x00;
const BPF_TAX: u16 = 0x00;
/// Ancillary loads: A = offset of the attribute of type X found from
/// offset A (NLATTR) or inside the nested attribute at offset A
/// (NLATTR_NEST); 0 when absent.
const SKF_AD_OFF: i32 = -0x1000;
const SKF_AD_NLATTR: i32 = 12;
const SKF_AD_NLATTR_NEST: i32 = 16;

/// Offset of the first attribute: nlmsghdr (16) + nfgenmsg (4).
const ATTRS: u32 = 20;
/// Offset of nlmsg_pid in the netlink header.
const NLMSG_PID: u32 = 12;
const CTA_TUPLE_ORIG: u32 = 1;
const CTA_TUPLE_IP: u32 = 1;
const CTA_IP_V4_DST: u32 = 2;
const CTA_IP_V6_DST: u32 = 4;

const ACCEPT: u32 = 0xffff_ffff;
const DROP: u32 = 0;

/// One classic BPF instruction (struct sock_filter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

const fn stmt(code: u16, k: u32) -> Insn {
    Insn {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

const fn jump(code: u16, k: u32, jt: u8, jf: u8) -> Insn {
    Insn { code, jt, jf, k }
}

const fn ancillary(what: i32) -> u32 {
    (SKF_AD_OFF + what) as u32
}

/// What the kernel should let through to an event socket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelFilter {
    /// Original destinations of interest (the VIPs); events of other flows
    /// are dropped. Empty: every flow is dropped.
    pub destinations: Vec<IpAddr>,
    /// Events caused by this netlink port id are dropped (0: none).
    pub ignore_portid: u32,
}

/// Most addresses the program compares (it must stay under the kernel's
/// 4096-instruction limit); beyond that, only the port id is filtered.
const MAX_DESTINATIONS: usize = 256;

impl KernelFilter {
    /// The BPF program.
    pub fn program(&self) -> Vec<Insn> {
        let mut p = Vec::new();
        if self.ignore_portid != 0 {
            // nlmsg_pid is in host order; BPF loads big-endian.
            let pid = u32::from_be_bytes(self.ignore_portid.to_ne_bytes());
            p.push(stmt(BPF_LD | BPF_W | BPF_ABS, NLMSG_PID));
            p.push(jump(BPF_JMP | BPF_JEQ | BPF_K, pid, 0, 1));
            p.push(stmt(BPF_RET | BPF_K, DROP));
        }
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for a in &self.destinations {
            match a {
                IpAddr::V4(a) => v4.push(u32::from(*a)),
                IpAddr::V6(a) => match a.to_ipv4_mapped() {
                    Some(m) => v4.push(u32::from(m)),
                    None => v6.push(a.octets()),
                },
            }
        }
        v4.sort_unstable();
        v4.dedup();
        v6.sort_unstable();
        v6.dedup();
        if v4.len() + v6.len() > MAX_DESTINATIONS {
            p.push(stmt(BPF_RET | BPF_K, ACCEPT));
            return p;
        }
        // A = offset of CTA_TUPLE_ORIG, then of its CTA_TUPLE_IP (kept in M[0]).
        p.push(stmt(BPF_LD | BPF_IMM, ATTRS));
        p.push(stmt(BPF_LDX | BPF_IMM, CTA_TUPLE_ORIG));
        p.push(stmt(BPF_LD | BPF_W | BPF_ABS, ancillary(SKF_AD_NLATTR)));
        p.push(jump(BPF_JMP | BPF_JEQ | BPF_K, 0, 0, 1));
        p.push(stmt(BPF_RET | BPF_K, ACCEPT));
        p.push(stmt(BPF_LDX | BPF_IMM, CTA_TUPLE_IP));
        p.push(stmt(
            BPF_LD | BPF_W | BPF_ABS,
            ancillary(SKF_AD_NLATTR_NEST),
        ));
        p.push(jump(BPF_JMP | BPF_JEQ | BPF_K, 0, 0, 1));
        p.push(stmt(BPF_RET | BPF_K, ACCEPT));
        p.push(stmt(BPF_ST, 0));
        // IPv4 destination?
        p.push(stmt(BPF_LDX | BPF_IMM, CTA_IP_V4_DST));
        p.push(stmt(
            BPF_LD | BPF_W | BPF_ABS,
            ancillary(SKF_AD_NLATTR_NEST),
        ));
        // Absent: jump over the IPv4 block (a long jump: its length grows
        // with the number of addresses).
        let v4_block = 2 + 2 * v4.len() + 1;
        p.push(jump(BPF_JMP | BPF_JEQ | BPF_K, 0, 0, 1));
        p.push(stmt(BPF_JMP | BPF_JA, v4_block as u32));
        p.push(stmt(BPF_MISC | BPF_TAX, 0));
        p.push(stmt(BPF_LD | BPF_W | BPF_IND, 4));
        for a in &v4 {
            p.push(jump(BPF_JMP | BPF_JEQ | BPF_K, *a, 0, 1));
            p.push(stmt(BPF_RET | BPF_K, ACCEPT));
        }
        p.push(stmt(BPF_RET | BPF_K, DROP));
        // IPv6 destination?
        p.push(stmt(BPF_LD | BPF_MEM, 0));
        p.push(stmt(BPF_LDX | BPF_IMM, CTA_IP_V6_DST));
        p.push(stmt(
            BPF_LD | BPF_W | BPF_ABS,
            ancillary(SKF_AD_NLATTR_NEST),
        ));
        p.push(jump(BPF_JMP | BPF_JEQ | BPF_K, 0, 0, 1));
        p.push(stmt(BPF_RET | BPF_K, ACCEPT));
        p.push(stmt(BPF_MISC | BPF_TAX, 0));
        for a in &v6 {
            for w in 0..4 {
                let word = u32::from_be_bytes([a[4 * w], a[4 * w + 1], a[4 * w + 2], a[4 * w + 3]]);
                p.push(stmt(BPF_LD | BPF_W | BPF_IND, 4 + 4 * w as u32));
                // Mismatch: skip the rest of this address's block.
                let rest = (2 * (3 - w) + 1) as u8;
                p.push(jump(BPF_JMP | BPF_JEQ | BPF_K, word, 0, rest));
            }
            p.push(stmt(BPF_RET | BPF_K, ACCEPT));
        }
        p.push(stmt(BPF_RET | BPF_K, DROP));
        p
    }

    /// Attaches the program to `socket` (replacing any earlier one).
    pub fn attach(&self, socket: &impl AsRawFd) -> io::Result<()> {
        let program: Vec<libc::sock_filter> = self
            .program()
            .iter()
            .map(|i| libc::sock_filter {
                code: i.code,
                jt: i.jt,
                jf: i.jf,
                k: i.k,
            })
            .collect();
        let fprog = libc::sock_fprog {
            len: u16::try_from(program.len()).map_err(|_| io::Error::other("filter too long"))?,
            filter: program.as_ptr().cast_mut(),
        };
        // SAFETY: a valid fd, and a sock_fprog pointing at `program`, which
        // outlives the call (the kernel copies it).
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ATTACH_FILTER,
                (&raw const fprog).cast(),
                size_of::<libc::sock_fprog>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// A classic BPF interpreter for the instructions [`KernelFilter`] emits,
/// with the kernel's semantics of the netlink attribute helpers: the
/// filter's tests run it on real message bytes.
#[doc(hidden)]
pub fn run(program: &[Insn], packet: &[u8]) -> Result<u32, String> {
    let (mut a, mut x) = (0u32, 0u32);
    let mut mem = [0u32; 16];
    let mut pc = 0usize;
    let load = |at: usize| -> Result<u32, String> {
        packet
            .get(at..at + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| format!("load beyond the packet at {at}"))
    };
    while let Some(i) = program.get(pc) {
        pc += 1;
        match i.code {
            c if c == BPF_LD | BPF_IMM => a = i.k,
            c if c == BPF_LDX | BPF_IMM => x = i.k,
            c if c == BPF_ST => mem[i.k as usize] = a,
            c if c == BPF_LD | BPF_MEM => a = mem[i.k as usize],
            c if c == BPF_MISC | BPF_TAX => x = a,
            c if c == BPF_LD | BPF_W | BPF_ABS && i.k == ancillary(SKF_AD_NLATTR) => {
                a = nla_find(packet, a as usize, packet.len(), x as u16);
            }
            c if c == BPF_LD | BPF_W | BPF_ABS && i.k == ancillary(SKF_AD_NLATTR_NEST) => {
                let at = a as usize;
                let len = packet
                    .get(at..at + 2)
                    .map_or(0, |b| u16::from_ne_bytes([b[0], b[1]]) as usize);
                a = if at + len > packet.len() || len < 4 {
                    0
                } else {
                    nla_find(packet, at + 4, at + len, x as u16)
                };
            }
            c if c == BPF_LD | BPF_W | BPF_ABS => a = load(i.k as usize)?,
            c if c == BPF_LD | BPF_W | BPF_IND => a = load((x + i.k) as usize)?,
            c if c == BPF_JMP | BPF_JA => pc += i.k as usize,
            c if c == BPF_JMP | BPF_JEQ | BPF_K => {
                pc += usize::from(if a == i.k { i.jt } else { i.jf })
            }
            c if c == BPF_RET | BPF_K => return Ok(i.k),
            c => return Err(format!("instruction {c:#x} not interpreted")),
        }
    }
    Err("ran off the end of the program".into())
}

/// The kernel's nla_find over `packet[from..to]`: the offset of the first
/// attribute of `kind` (flags masked off), 0 when absent.
fn nla_find(packet: &[u8], mut at: usize, to: usize, kind: u16) -> u32 {
    while at + 4 <= to {
        let len = u16::from_ne_bytes([packet[at], packet[at + 1]]) as usize;
        let ty = u16::from_ne_bytes([packet[at + 2], packet[at + 3]]) & 0x3fff;
        if len < 4 || at + len > to {
            return 0;
        }
        if ty == kind {
            return at as u32;
        }
        at += (len + 3) & !3;
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CreateOptions;
    use crate::codec::{create_attrs, key_attrs};
    use crate::entry::{Entry, Tuple, proto, status};
    use netlink_packet_netfilter::conntrack::ConntrackMessage;

    fn entry(dst: &str) -> Entry {
        let dst: IpAddr = dst.parse().unwrap();
        let src: IpAddr = if dst.is_ipv4() {
            "10.0.0.50".parse().unwrap()
        } else {
            "fd00::50".parse().unwrap()
        };
        let original = Tuple {
            src,
            dst,
            protocol: proto::TCP,
            src_port: 40000,
            dst_port: 80,
        };
        Entry {
            original,
            reply: original.inverted(),
            status: status::CONFIRMED,
            timeout_s: 10,
            mark: 0,
            zone: 0,
            tcp: None,
        }
    }

    /// An event as the kernel sends it: the message a create request would
    /// be, with the causing socket's port id in the header.
    fn event(dst: &str, portid: u32) -> Vec<u8> {
        let e = entry(dst);
        let mut b = crate::netlink::encode(
            crate::netlink::family_of(&e.original),
            ConntrackMessage::New(create_attrs(&e, CreateOptions::default())),
            0,
            0,
        );
        b[12..16].copy_from_slice(&portid.to_ne_bytes());
        b
    }

    fn filter() -> KernelFilter {
        KernelFilter {
            destinations: vec![
                "10.0.0.100".parse().unwrap(),
                "10.0.0.101".parse().unwrap(),
                "fd00::100".parse().unwrap(),
                "::ffff:10.0.0.102".parse().unwrap(),
            ],
            ignore_portid: 4242,
        }
    }

    #[test]
    fn events_to_a_destination_pass_others_are_dropped() {
        let p = filter().program();
        for (dst, pass) in [
            ("10.0.0.100", true),
            ("10.0.0.101", true),
            ("10.0.0.102", true),
            ("10.0.0.103", false),
            ("192.168.100.2", false),
            ("fd00::100", true),
            ("fd00::101", false),
            ("fd01::100", false),
        ] {
            let verdict = run(&p, &event(dst, 0)).unwrap();
            assert_eq!(verdict == ACCEPT, pass, "{dst}");
            assert!(verdict == ACCEPT || verdict == DROP);
        }
    }

    #[test]
    fn the_listeners_own_writes_are_dropped_others_pass() {
        let p = filter().program();
        assert_eq!(run(&p, &event("10.0.0.100", 4242)).unwrap(), DROP);
        assert_eq!(run(&p, &event("fd00::100", 4242)).unwrap(), DROP);
        assert_eq!(run(&p, &event("10.0.0.100", 4243)).unwrap(), ACCEPT);
        // No port id to ignore: only the destination counts.
        let f = KernelFilter {
            ignore_portid: 0,
            ..filter()
        };
        assert_eq!(run(&f.program(), &event("10.0.0.100", 0)).unwrap(), ACCEPT);
    }

    #[test]
    fn a_message_without_a_tuple_is_left_to_user_space_and_no_destination_drops_all() {
        let t = entry("10.0.0.1").original;
        let mut b = crate::netlink::encode(
            crate::netlink::family_of(&t),
            ConntrackMessage::Get(vec![]),
            0,
            0,
        );
        b[12..16].copy_from_slice(&7u32.to_ne_bytes());
        assert_eq!(run(&filter().program(), &b).unwrap(), ACCEPT);
        // A delete carries the original tuple only: still judged by it.
        let del = crate::netlink::encode(
            crate::netlink::family_of(&t),
            ConntrackMessage::Delete(key_attrs(&entry("10.0.0.100").original, 0)),
            0,
            0,
        );
        assert_eq!(run(&filter().program(), &del).unwrap(), ACCEPT);
        let none = KernelFilter::default();
        assert_eq!(run(&none.program(), &event("10.0.0.100", 0)).unwrap(), DROP);
    }

    #[test]
    fn many_destinations_fit_the_jump_ranges() {
        let destinations: Vec<IpAddr> = (0..200u32)
            .map(|i| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000u32 + i)))
            .chain((0..50u16).map(|i| IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, i])))
            .collect();
        let f = KernelFilter {
            destinations,
            ignore_portid: 1,
        };
        let p = f.program();
        assert!(p.len() < 4096);
        assert_eq!(run(&p, &event("10.0.0.199", 0)).unwrap(), ACCEPT);
        assert_eq!(run(&p, &event("10.0.0.200", 0)).unwrap(), DROP);
        assert_eq!(run(&p, &event("fd00::31", 0)).unwrap(), ACCEPT);
        assert_eq!(run(&p, &event("fd00::32", 0)).unwrap(), DROP);
    }
}
