//! Every rule a configuration must follow, on the typed model. A rule that
//! fails records the path of the offending value and a sentence for the
//! operator; the loader turns paths into file, line and column.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use crate::locate::Seg::{self, Index, Key};
use crate::model::*;

/// Problems found in one file: (path, message).
#[derive(Debug, Default)]
pub struct Report {
    pub issues: Vec<(Vec<Seg>, String)>,
}

impl Report {
    pub fn add(&mut self, path: Vec<Seg>, message: impl Into<String>) {
        self.issues.push((path, message.into()));
    }
}

pub(crate) fn with(path: &[Seg], seg: Seg) -> Vec<Seg> {
    let mut p = path.to_vec();
    p.push(seg);
    p
}

/// A hostname label: what node names must be.
pub fn check_node_name(r: &mut Report, path: Vec<Seg>, name: &str) {
    let ok = (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !ok {
        r.add(
            path,
            format!("node name `{name}` must be a hostname label: 1-63 of a-z, 0-9 and '-', not starting or ending with '-'"),
        );
    }
}

/// Linux interface names: 1-15 bytes, no '/', ':' or white space.
pub fn check_interface(r: &mut Report, path: Vec<Seg>, name: &str) {
    let ok = (1..=15).contains(&name.len())
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace());
    if !ok {
        r.add(
            path,
            format!(
                "`{name}` is not a valid interface name (1-15 characters, no '/', ':' or spaces)"
            ),
        );
    }
}

/// Whether `name` is 1-`max` of `[A-Za-z0-9_-]`; records an error if not.
fn check_ident(r: &mut Report, path: Vec<Seg>, what: &str, name: &str, max: usize) -> bool {
    let ok = (1..=max).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !ok {
        r.add(
            path,
            format!("{what} `{name}` must be 1-{max} of A-Z, a-z, 0-9, '_' and '-'"),
        );
    }
    ok
}

pub(crate) fn check_range<T: PartialOrd + std::fmt::Display>(
    r: &mut Report,
    path: Vec<Seg>,
    what: &str,
    v: T,
    lo: T,
    hi: T,
) {
    if v < lo || v > hi {
        r.add(path, format!("{what} {v} is out of range ({lo}-{hi})"));
    }
}

pub(crate) fn usable_unicast(a: IpAddr) -> bool {
    !(a.is_unspecified()
        || a.is_multicast()
        || a.is_loopback()
        || matches!(a, IpAddr::V4(v4) if v4.is_broadcast()))
}

pub fn node(n: &NodeConfig) -> Report {
    let mut r = Report::default();
    check_node_name(&mut r, vec![Key("name")], &n.name);
    if let Some(i) = &n.cluster_interface {
        check_interface(&mut r, vec![Key("cluster_interface")], i);
    }
    if let Some(a) = n.cluster_address
        && !usable_unicast(a)
    {
        r.add(
            vec![Key("cluster_address")],
            format!("cluster_address {a} is not a usable unicast address"),
        );
    }
    if let Some(l) = n.control_listen
        && l.port() == 0
    {
        r.add(
            vec![Key("control_listen")],
            format!(
                "control_listen {l}: give a port (1-65535), e.g. {}:9443",
                l.ip()
            ),
        );
    }
    match (&n.control_tls_cert, &n.control_tls_key) {
        (Some(_), None) => r.add(
            vec![Key("control_tls_cert")],
            "control_tls_cert is set but control_tls_key is not: give both (or neither, for a generated self-signed pair)",
        ),
        (None, Some(_)) => r.add(
            vec![Key("control_tls_key")],
            "control_tls_key is set but control_tls_cert is not: give both (or neither, for a generated self-signed pair)",
        ),
        _ => {}
    }
    for (key, path) in [
        ("control_tls_cert", &n.control_tls_cert),
        ("control_tls_key", &n.control_tls_key),
    ] {
        if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            r.add(vec![Key(key)], format!("{key} is empty: give a PEM file"));
        }
    }
    crate::validate_farm::hooks(&mut r, &n.hooks);
    let mut names = HashSet::new();
    for (i, k) in n.api_keys.iter().enumerate() {
        let p = vec![Key("api_keys"), Index(i)];
        check_ident(&mut r, with(&p, Key("name")), "API key name", &k.name, 64);
        if !names.insert(k.name.as_str()) {
            r.add(
                with(&p, Key("name")),
                format!("API key `{}` appears twice", k.name),
            );
        }
        if k.sha256.len() != 64
            || !k
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            r.add(
                with(&p, Key("sha256")),
                format!(
                    "API key `{}`: sha256 must be 64 lowercase hex digits",
                    k.name
                ),
            );
        }
    }
    r
}

pub fn cluster(c: &ClusterConfig) -> Report {
    let mut r = Report::default();
    replication_caps(&mut r, &c.sync);
    if c.virtual_router_id == 0 {
        r.add(
            vec![Key("virtual_router_id")],
            "cluster: virtual_router_id must be 1-255",
        );
    }
    // VRRP timing (RFC 5798 §5.2.7: 12 bits of centiseconds; RFC 3768: seconds).
    let v = &c.vrrp;
    let iv = v.advert_interval_ms;
    match v.version {
        3 => {
            if !(10..=40950).contains(&iv) || !iv.is_multiple_of(10) {
                r.add(
                    vec![Key("vrrp"), Key("advert_interval_ms")],
                    format!("cluster: advert_interval_ms {iv} must be 10-40950 in steps of 10 with VRRPv3"),
                );
            }
        }
        2 => {
            if !(1000..=255_000).contains(&iv) || !iv.is_multiple_of(1000) {
                r.add(
                    vec![Key("vrrp"), Key("advert_interval_ms")],
                    format!("cluster: advert_interval_ms {iv} must be whole seconds, 1000-255000, with VRRPv2"),
                );
            }
        }
        other => r.add(
            vec![Key("vrrp"), Key("version")],
            format!("cluster: VRRP version {other} does not exist (2 or 3)"),
        ),
    }
    check_range(
        &mut r,
        vec![Key("vrrp"), Key("garp_repeat")],
        "cluster: garp_repeat",
        v.garp_repeat,
        1,
        100,
    );
    check_range(
        &mut r,
        vec![Key("vrrp"), Key("garp_interval_ms")],
        "cluster: garp_interval_ms",
        v.garp_interval_ms,
        0,
        10_000,
    );
    check_range(
        &mut r,
        vec![Key("vrrp"), Key("garp_lower_prio_repeat")],
        "cluster: garp_lower_prio_repeat",
        v.garp_lower_prio_repeat,
        0,
        100,
    );
    check_range(
        &mut r,
        vec![Key("vrrp"), Key("garp_lower_prio_delay_ms")],
        "cluster: garp_lower_prio_delay_ms",
        v.garp_lower_prio_delay_ms,
        0,
        3_600_000,
    );
    check_range(
        &mut r,
        vec![Key("vrrp"), Key("garp_refresh_s")],
        "cluster: garp_refresh_s",
        v.garp_refresh_s,
        0,
        86_400,
    );
    check_range(
        &mut r,
        vec![Key("vrrp"), Key("preempt_delay_s")],
        "cluster: preempt_delay_s",
        v.preempt_delay_s,
        0,
        1000,
    );
    if let Some(l) = v.floating_ip_lifetime_s {
        check_range(
            &mut r,
            vec![Key("vrrp"), Key("floating_ip_lifetime_s")],
            "cluster: floating_ip_lifetime_s",
            l,
            0,
            3600,
        );
    }
    if let Some(t) = v.handover_timeout_ms {
        check_range(
            &mut r,
            vec![Key("vrrp"), Key("handover_timeout_ms")],
            "cluster: handover_timeout_ms",
            t,
            0,
            60_000,
        );
    }
    check_range(
        &mut r,
        vec![Key("vrrp"), Key("rt_priority")],
        "cluster: rt_priority",
        v.rt_priority,
        0,
        99,
    );

    if c.nodes.len() != 2 {
        r.add(
            vec![Key("nodes")],
            format!(
                "cluster: a Tandem cluster has exactly 2 nodes, this one lists {}",
                c.nodes.len()
            ),
        );
    }
    let mut names = HashMap::new();
    let mut addrs = HashMap::new();
    for (i, n) in c.nodes.iter().enumerate() {
        let p = vec![Key("nodes"), Index(i)];
        check_node_name(&mut r, with(&p, Key("name")), &n.name);
        if let Some(first) = names.insert(n.name.as_str(), i) {
            r.add(
                with(&p, Key("name")),
                format!(
                    "cluster: node `{}` appears twice (nodes {} and {})",
                    n.name,
                    first + 1,
                    i + 1
                ),
            );
        }
        if let Some(first) = addrs.insert(n.address, i) {
            r.add(
                with(&p, Key("address")),
                format!(
                    "cluster: address {} is given to nodes {} and {}",
                    n.address,
                    first + 1,
                    i + 1
                ),
            );
        }
        if !usable_unicast(n.address) {
            r.add(
                with(&p, Key("address")),
                format!(
                    "cluster: node `{}` address {} is not a usable unicast address",
                    n.name, n.address
                ),
            );
        }
        if v.version == 2 && n.address.is_ipv6() {
            r.add(
                with(&p, Key("address")),
                "cluster: VRRPv2 runs over IPv4 only; use version = 3 for IPv6",
            );
        }
        check_range(
            &mut r,
            with(&p, Key("priority")),
            &format!("cluster: node `{}` priority", n.name),
            n.priority,
            1,
            254,
        );
    }
    if let [a, b] = c.nodes.as_slice()
        && a.address.is_ipv4() != b.address.is_ipv4()
    {
        r.add(
            vec![Key("nodes"), Index(1), Key("address")],
            "cluster: both nodes' addresses must be of the same family",
        );
    }
    if let Failback::Node(pref) = &c.failback
        && !c.nodes.iter().any(|n| n.name == *pref)
    {
        let known: Vec<&str> = c.nodes.iter().map(|n| n.name.as_str()).collect();
        r.add(
            vec![Key("failback")],
            format!("cluster: failback names node `{pref}`, which is not one of the nodes ({}); use \"none\" or a node name", known.join(", ")),
        );
    }
    let mut seen = HashSet::new();
    for (i, t) in c.tracked_interfaces.iter().enumerate() {
        check_interface(&mut r, vec![Key("tracked_interfaces"), Index(i)], t);
        if !seen.insert(t) {
            r.add(
                vec![Key("tracked_interfaces"), Index(i)],
                format!("cluster: tracked interface `{t}` appears twice"),
            );
        }
    }
    if c.floating_ips.is_empty() {
        r.add(
            vec![Key("floating_ips")],
            "cluster: at least one floating IP is needed",
        );
    }
    let mut fips = HashSet::new();
    for (i, f) in c.floating_ips.iter().enumerate() {
        let p = vec![Key("floating_ips"), Index(i)];
        check_interface(&mut r, with(&p, Key("interface")), &f.interface);
        if !usable_unicast(f.address.addr) {
            r.add(
                with(&p, Key("address")),
                format!(
                    "cluster: floating IP {} is not a usable unicast address",
                    f.address.addr
                ),
            );
        }
        if f.address.prefix_len == 0 {
            r.add(
                with(&p, Key("address")),
                format!(
                    "cluster: floating IP {} has prefix length 0: the master would route every address to {} through it; give the prefix of the interface's subnet (e.g. {}/{})",
                    f.address,
                    f.interface,
                    f.address.addr,
                    if f.address.addr.is_ipv4() { 24 } else { 64 }
                ),
            );
        }
        if !fips.insert(f.address.addr) {
            r.add(
                with(&p, Key("address")),
                format!("cluster: floating IP {} appears twice", f.address.addr),
            );
        }
        if c.nodes.iter().any(|n| n.address == f.address.addr) {
            r.add(
                with(&p, Key("address")),
                format!(
                    "cluster: floating IP {} is a node's own address",
                    f.address.addr
                ),
            );
        }
    }
    if c.sync.conntrack_port == 0 {
        r.add(
            vec![Key("sync"), Key("conntrack_port")],
            "cluster: conntrack_port must be 1-65535",
        );
    }
    if !(1024..=16_777_216).contains(&c.sync.conntrack_queue_limit) {
        r.add(
            vec![Key("sync"), Key("conntrack_queue_limit")],
            format!(
                "cluster: conntrack_queue_limit {} is out of range (1024-16777216 entries)",
                c.sync.conntrack_queue_limit
            ),
        );
    }
    if !(10..=600_000).contains(&c.sync.conntrack_lag_threshold_ms) {
        r.add(
            vec![Key("sync"), Key("conntrack_lag_threshold_ms")],
            format!(
                "cluster: conntrack_lag_threshold_ms {} is out of range (10-600000)",
                c.sync.conntrack_lag_threshold_ms
            ),
        );
    }
    if c.sync.orphan_grace_ms > 10_000 {
        r.add(
            vec![Key("sync"), Key("orphan_grace_ms")],
            format!(
                "cluster: orphan_grace_ms {} is out of range (0-10000)",
                c.sync.orphan_grace_ms
            ),
        );
    }
    if c.sync.ssh_port == 0 {
        r.add(
            vec![Key("sync"), Key("ssh_port")],
            "cluster: ssh_port must be 1-65535",
        );
    }
    if let Some(k) = &c.sync.key_file {
        if k.trim().is_empty() {
            r.add(
                vec![Key("sync"), Key("key_file")],
                "cluster: key_file is empty; give a path (relative to the configuration directory) or remove the key",
            );
        } else if let Some(why) = outside_config_dir(k) {
            r.add(
                vec![Key("sync"), Key("key_file")],
                format!(
                    "cluster: key_file `{k}` {why}: the key must be a file inside the configuration directory, e.g. \"keys/sync.key\" (cluster.toml is replicated: a path outside would make the peer read any file of its own as the key)"
                ),
            );
        }
    }
    r
}

/// `[sync] max_file_bytes` and `max_files`: cfg-syncd's bounds.
fn replication_caps(r: &mut Report, s: &SyncSettings) {
    check_range(
        r,
        vec![Key("sync"), Key("max_file_bytes")],
        "cluster: max_file_bytes",
        s.max_file_bytes,
        1024,
        1 << 30,
    );
    check_range(
        r,
        vec![Key("sync"), Key("max_files")],
        "cluster: max_files",
        s.max_files,
        1,
        1_000_000,
    );
}

/// Why a path given relative to the configuration directory would reach
/// outside it, if it would.
fn outside_config_dir(path: &str) -> Option<&'static str> {
    if path.starts_with('/') {
        return Some("is an absolute path");
    }
    if path.split('/').any(|c| c == "..") {
        return Some("climbs out of the configuration directory with `..`");
    }
    None
}

/// Why a health-check command can never run as written, if so. The command
/// is executed directly (no shell), with the backend's address and port as
/// its two arguments: it must be the path of one executable.
fn unrunnable_command(c: &str) -> Option<String> {
    if let Some(ch) = c.chars().find(|ch| ch.is_whitespace() || ch.is_control()) {
        return Some(format!(
            "contains {}: it is run as one path, without a shell, with the backend's address and port as its arguments; put the command line in a script and give the script's path",
            if ch == ' ' {
                "a space".to_owned()
            } else {
                format!("the character {ch:?}")
            }
        ));
    }
    if let Some(ch) = c.chars().find(|ch| "|&;<>$`\\\"'".contains(*ch)) {
        return Some(format!(
            "contains the shell character `{ch}`: it is run as one path, without a shell; put the command line in a script and give the script's path"
        ));
    }
    if c.ends_with('/') {
        return Some("names a directory (it ends with '/'), not a program".to_owned());
    }
    None
}

pub fn farm(f: &Farm, file_stem: &str) -> Report {
    let mut r = Report::default();
    let name = &f.name;
    // An invalid name has no right file name to suggest.
    if check_ident(&mut r, vec![Key("name")], "farm name", name, 32) && name != file_stem {
        r.add(
            vec![Key("name")],
            format!("farm `{name}` must be in a file named {name}.toml, not {file_stem}.toml"),
        );
    }
    if !usable_unicast(f.vip) {
        r.add(
            vec![Key("vip")],
            format!(
                "farm `{name}`: vip {} is not a usable unicast address",
                f.vip
            ),
        );
    }
    match (f.forwarding, f.snat_address) {
        (Forwarding::Nat, None) => r.add(
            vec![Key("snat_address")],
            format!("farm `{name}`: NAT forwarding needs snat_address, a floating IP on the backends' side (masquerading to the node's own address breaks every flow at failover)"),
        ),
        (Forwarding::Nat, Some(s)) if !usable_unicast(s) => {
            r.add(
                vec![Key("snat_address")],
                format!("farm `{name}`: snat_address {s} is not a usable unicast address"),
            );
        }
        (Forwarding::Nat, Some(s)) if s.is_ipv4() != f.vip.is_ipv4() => {
            r.add(vec![Key("snat_address")], format!("farm `{name}`: snat_address {s} and vip {} are of different families", f.vip));
        }
        (Forwarding::Dsr, Some(_)) => {
            r.add(vec![Key("snat_address")], format!("farm `{name}`: direct server return does not translate addresses; remove snat_address"));
        }
        _ => {}
    }
    if f.forwarding == Forwarding::Dsr && f.scheduler.uses_loads() {
        r.add(
            vec![Key("scheduler")],
            format!(
                "farm `{name}`: {} cannot be used with direct server return: the replies never cross the balancer, so it cannot count connections; use rr, wrr, sh, dh, mh or fo",
                match f.scheduler {
                    Scheduler::Lc => "least connections",
                    Scheduler::Wlc => "weighted least connections (wlc)",
                    Scheduler::Sed => "shortest expected delay (sed)",
                    Scheduler::Nq => "never queue (nq)",
                    _ => "overflow (ovf)",
                }
            ),
        );
    }
    crate::validate_farm::features(&mut r, f);
    let hc = &f.health_check;
    let hp = |k| vec![Key("health_check"), Key(k)];
    check_range(
        &mut r,
        hp("interval_ms"),
        &format!("farm `{name}`: interval_ms"),
        hc.interval_ms,
        100,
        3_600_000,
    );
    check_range(
        &mut r,
        hp("timeout_ms"),
        &format!("farm `{name}`: timeout_ms"),
        hc.timeout_ms,
        10,
        3_600_000,
    );
    if hc.timeout_ms >= hc.interval_ms {
        r.add(
            hp("timeout_ms"),
            format!(
                "farm `{name}`: timeout_ms ({}) must be less than interval_ms ({})",
                hc.timeout_ms, hc.interval_ms
            ),
        );
    }
    check_range(
        &mut r,
        hp("rise"),
        &format!("farm `{name}`: rise"),
        hc.rise,
        1,
        100,
    );
    check_range(
        &mut r,
        hp("fall"),
        &format!("farm `{name}`: fall"),
        hc.fall,
        1,
        100,
    );
    let http = matches!(hc.kind, HealthCheckKind::Http | HealthCheckKind::Https);
    if let Some(p) = &hc.path {
        if !http {
            r.add(
                hp("path"),
                format!("farm `{name}`: path applies to http and https checks only"),
            );
        } else if !p.starts_with('/') {
            r.add(
                hp("path"),
                format!("farm `{name}`: path `{p}` must start with '/'"),
            );
        }
    }
    if let Some(s) = hc.expect_status {
        if !http {
            r.add(
                hp("expect_status"),
                format!("farm `{name}`: expect_status applies to http and https checks only"),
            );
        } else {
            check_range(
                &mut r,
                hp("expect_status"),
                &format!("farm `{name}`: expect_status"),
                s,
                100,
                599,
            );
        }
    }
    // A TCP connect (or HTTP request) to a UDP-only service fails on every
    // backend, taking the whole farm out of rotation.
    if f.protocol == Protocol::Udp
        && matches!(
            hc.kind,
            HealthCheckKind::Tcp | HealthCheckKind::Http | HealthCheckKind::Https
        )
    {
        let implicit = *hc == HealthCheck::default();
        r.add(
            if implicit {
                vec![Key("protocol")]
            } else {
                vec![Key("health_check"), Key("kind")]
            },
            format!(
                "farm `{name}`: health check kind `{}` probes over TCP, but the farm is udp-only; set [health_check] kind = \"command\" (a script that speaks the protocol) or \"none\"{}",
                hc.kind.as_str(),
                if implicit {
                    " (tcp is the default)"
                } else {
                    ""
                }
            ),
        );
    }
    match (&hc.command, hc.kind) {
        (None, HealthCheckKind::Command) => {
            r.add(
                vec![Key("health_check"), Key("kind")],
                format!("farm `{name}`: a command check needs `command`"),
            );
        }
        (Some(c), HealthCheckKind::Command) if !c.starts_with('/') => {
            r.add(
                hp("command"),
                format!("farm `{name}`: command `{c}` must be an absolute path"),
            );
        }
        (Some(c), HealthCheckKind::Command) => {
            if let Some(why) = unrunnable_command(c) {
                r.add(
                    hp("command"),
                    format!("farm `{name}`: command `{c}` can never run: it {why}"),
                );
            }
        }
        (Some(_), k) if k != HealthCheckKind::Command => {
            r.add(
                hp("command"),
                format!("farm `{name}`: command applies to command checks only"),
            );
        }
        _ => {}
    }
    let mut seen = HashSet::new();
    for (i, b) in f.backends.iter().enumerate() {
        let p = vec![Key("backends"), Index(i)];
        // On a single-port farm, no port and the farm's port are the same backend.
        let port = match b.port {
            None if f.port.is_single() => Some(f.port.first),
            p => p,
        };
        let backend = endpoint(
            b.address,
            port.map_or_else(|| f.port.to_string(), |p| p.to_string()),
        );
        if b.address.is_ipv4() != f.vip.is_ipv4() {
            r.add(
                with(&p, Key("address")),
                format!(
                    "farm `{name}`: backend {} and vip {} are of different families",
                    b.address, f.vip
                ),
            );
        }
        if !usable_unicast(b.address) {
            r.add(
                with(&p, Key("address")),
                format!(
                    "farm `{name}`: backend address {} is not a usable unicast address",
                    b.address
                ),
            );
        }
        if b.port == Some(0) {
            r.add(
                with(&p, Key("port")),
                format!("farm `{name}`: backend port must be 1-65535"),
            );
        }
        if f.forwarding == Forwarding::Dsr
            && b.port
                .is_some_and(|bp| !f.port.is_single() || bp != f.port.first)
        {
            r.add(with(&p, Key("port")), format!("farm `{name}`: with direct server return a backend cannot use another port than the farm's"));
        }
        check_range(
            &mut r,
            with(&p, Key("weight")),
            &format!("farm `{name}`: backend {backend} weight"),
            b.weight,
            1,
            10_000,
        );
        if b.address == f.vip {
            r.add(
                with(&p, Key("address")),
                format!("farm `{name}`: backend {} is the farm's own VIP: the balancer would forward to itself", b.address),
            );
        }
        if f.snat_address == Some(b.address) {
            r.add(
                with(&p, Key("address")),
                format!("farm `{name}`: backend {} is the farm's SNAT address: the balancer would forward to itself", b.address),
            );
        }
        if !seen.insert((b.address, port)) {
            r.add(p, format!("farm `{name}`: backend {backend} appears twice"));
        }
    }
    r
}

/// `addr:port`, with IPv6 addresses in brackets.
pub fn endpoint(addr: IpAddr, port: impl std::fmt::Display) -> String {
    match addr {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}
