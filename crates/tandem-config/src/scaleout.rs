//! The rules of an active-active cluster (`mode = "active-active"`): 3-8
//! nodes all forwarding, each announcing the farms' VIPs to its upstream
//! routers over BGP. The pair's rules stay in `validate.rs`; a pair only
//! learns here that the active-active keys are not for it.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use crate::locate::Seg::{self, Index, Key};
use crate::model::*;
use crate::validate::{Report, check_node_name, usable_unicast};
use crate::{Loader, Source};

/// Fewest and most nodes of an active-active cluster. Two nodes are the
/// pair; past eight, ECMP groups of common routers and the per-node
/// announcements become the limit (docs/scale-out.md).
pub const MIN_NODES: usize = 3;
pub const MAX_NODES: usize = 8;

/// AS_TRANS (RFC 6793): a placeholder on the wire, never a real AS.
const AS_TRANS: u32 = 23456;

fn with(path: &[Seg], seg: Seg) -> Vec<Seg> {
    let mut p = path.to_vec();
    p.push(seg);
    p
}

/// The name BIRD knows a peer's session by: `peer_` and the peer's name,
/// '-' made '_' (BIRD symbols have no '-').
pub fn bird_protocol_name(peer: &str) -> String {
    format!("peer_{}", peer.replace('-', "_"))
}

fn check_as(r: &mut Report, path: Vec<Seg>, what: &str, asn: u32) {
    if asn == 0 || asn == u32::MAX || asn == AS_TRANS {
        r.add(
            path,
            format!("cluster: {what} {asn} is not a usable AS number (1-4294967294, not 23456)"),
        );
    }
}

/// A pair's cluster.toml must not carry what only an active-active
/// cluster uses.
pub fn pair(c: &ClusterConfig) -> Report {
    let mut r = Report::default();
    if c.bgp.is_some() {
        r.add(
            vec![Key("bgp")],
            "cluster: [bgp] is for active-active clusters (mode = \"active-active\"); a pair moves floating IPs with VRRP instead",
        );
    }
    for (i, n) in c.nodes.iter().enumerate() {
        if n.router_id.is_some() {
            r.add(
                vec![Key("nodes"), Index(i), Key("router_id")],
                format!("cluster: node `{}`: router_id is for active-active clusters (BGP); a pair has no use for it", n.name),
            );
        }
    }
    r
}

/// Every rule of an active-active cluster.toml on its own.
pub fn cluster(c: &ClusterConfig) -> Report {
    let mut r = Report::default();
    let aa = "an active-active cluster";
    if c.virtual_router_id != 0 {
        r.add(
            vec![Key("virtual_router_id")],
            format!("cluster: virtual_router_id is for the active-passive pair; {aa} has no VRRP: remove it"),
        );
    }
    if !c.floating_ips.is_empty() {
        r.add(
            vec![Key("floating_ips")],
            format!("cluster: {aa} has no floating IPs: every node announces the farms' VIPs over BGP; remove [[floating_ips]]"),
        );
    }
    if c.failback != Failback::None {
        r.add(
            vec![Key("failback")],
            format!("cluster: failback chooses a master; {aa} has none: remove it"),
        );
    }
    if !c.tracked_interfaces.is_empty() {
        r.add(
            vec![Key("tracked_interfaces")],
            format!("cluster: tracked_interfaces give up mastership in a pair; in {aa} BFD tells the routers when a node's links fail: remove them"),
        );
    }
    if c.vrrp != VrrpSettings::default() {
        r.add(
            vec![Key("vrrp")],
            format!("cluster: [vrrp] is for the active-passive pair; {aa} has no VRRP: remove it"),
        );
    }

    let n = c.nodes.len();
    if !(MIN_NODES..=MAX_NODES).contains(&n) {
        r.add(
            vec![Key("nodes")],
            format!("cluster: {aa} has {MIN_NODES}-{MAX_NODES} nodes, this one lists {n} (two nodes are a pair: mode = \"active-passive\")"),
        );
    }
    let mut names = HashMap::new();
    let mut addrs = HashMap::new();
    let mut router_ids = HashMap::new();
    for (i, node) in c.nodes.iter().enumerate() {
        let p = vec![Key("nodes"), Index(i)];
        check_node_name(&mut r, with(&p, Key("name")), &node.name);
        if let Some(first) = names.insert(node.name.as_str(), i) {
            r.add(
                with(&p, Key("name")),
                format!(
                    "cluster: node `{}` appears twice (nodes {} and {})",
                    node.name,
                    first + 1,
                    i + 1
                ),
            );
        }
        if let Some(first) = addrs.insert(node.address, i) {
            r.add(
                with(&p, Key("address")),
                format!(
                    "cluster: address {} is given to nodes {} and {}",
                    node.address,
                    first + 1,
                    i + 1
                ),
            );
        }
        if !usable_unicast(node.address) {
            r.add(
                with(&p, Key("address")),
                format!(
                    "cluster: node `{}` address {} is not a usable unicast address",
                    node.name, node.address
                ),
            );
        }
        match node.bgp_router_id() {
            None => r.add(
                with(&p, Key("address")),
                format!("cluster: node `{}` has an IPv6 address, so BGP needs its router_id (an IPv4 address, unique in the cluster)", node.name),
            ),
            Some(id) => {
                if let Some(first) = router_ids.insert(id, i) {
                    let at = if node.router_id.is_some() { "router_id" } else { "address" };
                    r.add(
                        with(&p, Key(at)),
                        format!("cluster: nodes {} and {} have the same BGP router id {id}", first + 1, i + 1),
                    );
                }
            }
        }
    }

    match &c.bgp {
        None => r.add(
            vec![Key("bgp")],
            format!("cluster: {aa} needs [bgp]: local_as and at least one [[bgp.peers]] (the routers every node announces the VIPs to)"),
        ),
        Some(bgp) => check_bgp(&mut r, c, bgp),
    }
    r
}

fn check_bgp(r: &mut Report, c: &ClusterConfig, bgp: &BgpSettings) {
    check_as(
        r,
        vec![Key("bgp"), Key("local_as")],
        "local_as",
        bgp.local_as,
    );
    if bgp.hold_time_s < 3 {
        r.add(
            vec![Key("bgp"), Key("hold_time_s")],
            format!(
                "cluster: hold_time_s {} is out of range (3-65535)",
                bgp.hold_time_s
            ),
        );
    }
    let bfd = &bgp.bfd;
    if !(10..=10_000).contains(&bfd.interval_ms) {
        r.add(
            vec![Key("bgp"), Key("bfd"), Key("interval_ms")],
            format!(
                "cluster: BFD interval_ms {} is out of range (10-10000)",
                bfd.interval_ms
            ),
        );
    }
    if bfd.multiplier < 2 {
        r.add(
            vec![Key("bgp"), Key("bfd"), Key("multiplier")],
            format!("cluster: BFD multiplier {} is out of range (2-255): one lost packet would take a node out", bfd.multiplier),
        );
    }
    if bgp.peers.is_empty() {
        r.add(
            vec![Key("bgp"), Key("peers")],
            "cluster: [bgp] needs at least one [[bgp.peers]]: the routers every node announces the VIPs to",
        );
    }
    let nodes: HashSet<&str> = c.nodes.iter().map(|n| n.name.as_str()).collect();
    let node_addrs: HashSet<IpAddr> = c.nodes.iter().map(|n| n.address).collect();
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut addrs: HashMap<IpAddr, usize> = HashMap::new();
    for (i, peer) in bgp.peers.iter().enumerate() {
        let p = vec![Key("bgp"), Key("peers"), Index(i)];
        let ok = (1..=32).contains(&peer.name.len())
            && peer.name.starts_with(|ch: char| ch.is_ascii_alphabetic())
            && peer
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !ok {
            r.add(
                with(&p, Key("name")),
                format!("cluster: BGP peer name `{}` must be 1-32 of A-Z, a-z, 0-9, '_' and '-', starting with a letter", peer.name),
            );
        } else if let Some(first) = names.insert(bird_protocol_name(&peer.name), i) {
            let other = &bgp.peers[first].name;
            r.add(
                with(&p, Key("name")),
                if *other == peer.name {
                    format!("cluster: BGP peer `{}` appears twice (peers {} and {})", peer.name, first + 1, i + 1)
                } else {
                    format!("cluster: BGP peers `{other}` and `{}` differ only by '-' and '_', which the routing daemon cannot tell apart", peer.name)
                },
            );
        }
        if let Some(first) = addrs.insert(peer.address, i) {
            r.add(
                with(&p, Key("address")),
                format!(
                    "cluster: BGP peer address {} is given to peers {} and {}",
                    peer.address,
                    first + 1,
                    i + 1
                ),
            );
        }
        if !usable_unicast(peer.address) {
            r.add(
                with(&p, Key("address")),
                format!(
                    "cluster: BGP peer `{}` address {} is not a usable unicast address",
                    peer.name, peer.address
                ),
            );
        } else if node_addrs.contains(&peer.address) {
            r.add(
                with(&p, Key("address")),
                format!(
                    "cluster: BGP peer `{}` address {} is a node's own address",
                    peer.name, peer.address
                ),
            );
        }
        check_as(
            r,
            with(&p, Key("remote_as")),
            &format!("BGP peer `{}` remote_as", peer.name),
            peer.remote_as,
        );
        let mut seen = HashSet::new();
        for (j, n) in peer.nodes.iter().enumerate() {
            if !nodes.contains(n.as_str()) {
                let mut known: Vec<&str> = nodes.iter().copied().collect();
                known.sort_unstable();
                r.add(
                    with(&with(&p, Key("nodes")), Index(j)),
                    format!("cluster: BGP peer `{}` names node `{n}`, which is not one of the nodes ({})", peer.name, known.join(", ")),
                );
            } else if !seen.insert(n) {
                r.add(
                    with(&with(&p, Key("nodes")), Index(j)),
                    format!("cluster: BGP peer `{}` lists node `{n}` twice", peer.name),
                );
            }
        }
    }
    if !bgp.peers.is_empty() {
        for (i, node) in c.nodes.iter().enumerate() {
            if !bgp.peers.iter().any(|p| p.serves(&node.name)) {
                r.add(
                    vec![Key("nodes"), Index(i), Key("name")],
                    format!("cluster: node `{}` peers with no router ([[bgp.peers]] nodes): it could announce nothing", node.name),
                );
            }
        }
    }
}

/// The farms of an active-active cluster: direct server return only, on
/// VIPs that are neither a node's nor a router's address.
pub(crate) fn cross_check(l: &mut Loader, cluster: &ClusterConfig, farms: &[(Source, Farm)]) {
    let taken: HashSet<IpAddr> = cluster
        .nodes
        .iter()
        .map(|n| n.address)
        .chain(
            cluster
                .bgp
                .iter()
                .flat_map(|b| b.peers.iter().map(|p| p.address)),
        )
        .collect();
    for (src, farm) in farms {
        if farm.forwarding != Forwarding::Dsr {
            l.errors.push(src.error_at(
                &[Key("forwarding")],
                format!("farm `{}`: an active-active cluster forwards with direct server return only (forwarding = \"dsr\"): a NAT flow moved by the routers to another node finds no NAT state there; keep NAT farms on an active-passive pair", farm.name),
            ));
        }
        if taken.contains(&farm.vip) {
            l.errors.push(src.error_at(
                &[Key("vip")],
                format!("farm `{}`: vip {} is a node's or a BGP peer's own address; a VIP is announced by every node and must be an address of its own", farm.name, farm.vip),
            ));
        }
    }
}
