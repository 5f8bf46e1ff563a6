//! The configuration model: what `node.toml`, `cluster.toml` and
//! `farms/*.toml` hold. Field docs are the reference (docs/configuration.md
//! repeats them with examples). Every table refuses unknown keys, so a typo
//! is an error rather than a silently ignored setting.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// `node.toml`: this node only; never replicated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's name: a hostname label (`[a-z0-9-]`, 1-63 characters).
    pub name: String,
    /// The interface of the cluster link (VRRP, sync). Required when clustered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_interface: Option<String>,
    /// This node's address on the cluster link. Required when clustered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_address: Option<IpAddr>,
    /// Where to serve Prometheus metrics; off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// API keys accepted by the control API.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_keys: Vec<ApiKey>,
}

/// An API key, stored as the SHA-256 of the token (never the token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    pub name: String,
    /// 64 lowercase hex digits.
    pub sha256: String,
}

/// `cluster.toml`: the cluster, replicated to both nodes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// VRRP virtual router id, 1-255; unique on the cluster link.
    pub virtual_router_id: u8,
    /// `"none"`: a master keeps the role until it fails. A node name: that
    /// node is the preferred master and takes the role back when it returns.
    #[serde(default)]
    pub failback: Failback,
    /// Seed of the hash schedulers, shared so both nodes send a flow to the
    /// same backend (nftables' jhash otherwise picks a random seed per load).
    #[serde(default = "default_hash_seed")]
    pub hash_seed: u32,
    /// Interfaces whose loss makes this node give up mastership.
    #[serde(default)]
    pub tracked_interfaces: Vec<String>,
    #[serde(default)]
    pub vrrp: VrrpSettings,
    /// The two nodes.
    pub nodes: Vec<ClusterNode>,
    /// The addresses that move with the master role.
    pub floating_ips: Vec<FloatingIp>,
    #[serde(default)]
    pub sync: SyncSettings,
}

fn default_hash_seed() -> u32 {
    0x7a6e_6465
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VrrpSettings {
    /// 3 (RFC 5798, default) or 2 (RFC 3768, keepalived's default).
    pub version: u8,
    /// Advertisement interval. v3: 10-40950 ms in steps of 10; v2: whole
    /// seconds, 1000-255000 ms.
    pub advert_interval_ms: u32,
    /// Gratuitous ARP / unsolicited NA sent on becoming master, 1-100.
    pub garp_repeat: u8,
    /// Pause between repeats, 0-10000 ms.
    pub garp_interval_ms: u32,
    /// Send adverts to the peer's address instead of the multicast group.
    pub unicast: bool,
}

impl Default for VrrpSettings {
    fn default() -> Self {
        VrrpSettings {
            version: 3,
            advert_interval_ms: 1000,
            garp_repeat: 3,
            garp_interval_ms: 100,
            unicast: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterNode {
    pub name: String,
    /// The node's address on the cluster link.
    pub address: IpAddr,
    /// VRRP priority, 1-254.
    #[serde(default = "default_priority")]
    pub priority: u8,
}

fn default_priority() -> u8 {
    100
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FloatingIp {
    /// Address with prefix, e.g. `10.0.0.100/24`.
    pub address: IpNet,
    /// Interface it is added to.
    pub interface: String,
}

impl fmt::Display for FloatingIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} dev {}", self.address, self.interface)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncSettings {
    /// UDP port of conntrack replication on the cluster link.
    pub conntrack_port: u16,
    /// Port of the peer's sshd (configuration replication, control).
    pub ssh_port: u16,
    /// Shared key of the conntrack sync protocol, relative to the config dir.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
}

impl Default for SyncSettings {
    fn default() -> Self {
        SyncSettings {
            conntrack_port: 3780,
            ssh_port: 22,
            key_file: None,
        }
    }
}

/// An address with a prefix length, written `addr/len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl FromStr for IpNet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s.split_once('/').ok_or_else(|| {
            format!("`{s}` has no prefix length: expected address/prefix, e.g. 10.0.0.100/24")
        })?;
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("`{a}` is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len: u8 = p
            .parse()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("prefix length `{p}` must be 0-{max}"))?;
        Ok(IpNet { addr, prefix_len })
    }
}

impl Serialize for IpNet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IpNet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

/// Who is preferred as master, if anyone.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Failback {
    #[default]
    None,
    Node(String),
}

impl fmt::Display for Failback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failback::None => f.write_str("none"),
            Failback::Node(n) => f.write_str(n),
        }
    }
}

impl Serialize for Failback {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Failback {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(if s == "none" {
            Failback::None
        } else {
            Failback::Node(s)
        })
    }
}

/// `farms/<name>.toml`: one virtual service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Farm {
    /// `[A-Za-z0-9_-]`, 1-32 characters; the file is `<name>.toml`.
    pub name: String,
    /// The virtual IP clients connect to.
    pub vip: IpAddr,
    /// A port (`80`) or a range (`"8000-8100"`).
    pub port: PortRange,
    #[serde(default)]
    pub protocol: Protocol,
    #[serde(default)]
    pub scheduler: Scheduler,
    #[serde(default)]
    pub forwarding: Forwarding,
    /// Source address toward the backends with NAT forwarding; must be a
    /// floating IP so it moves with the VIP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snat_address: Option<IpAddr>,
    #[serde(default)]
    pub health_check: HealthCheck,
    #[serde(default)]
    pub backends: Vec<Backend>,
}

/// Ports `first..=last`; one port when equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.first <= other.last && other.first <= self.last
    }

    pub fn is_single(&self) -> bool {
        self.first == self.last
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_single() {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

impl Serialize for PortRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.is_single() {
            s.serialize_u16(self.first)
        } else {
            s.collect_str(self)
        }
    }
}

const PORT_EXPECTED: &str = "a port (1-65535) or a range \"first-last\"";

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = PortRange;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(PORT_EXPECTED)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortRange, E> {
                let p = u16::try_from(v).ok().filter(|p| *p != 0).ok_or_else(|| {
                    E::custom(format!(
                        "port {v} is out of range: expected {PORT_EXPECTED}"
                    ))
                })?;
                Ok(PortRange { first: p, last: p })
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PortRange, E> {
                self.visit_i64(i64::try_from(v).unwrap_or(-1))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<PortRange, E> {
                let bad = || E::custom(format!("`{s}` is not {PORT_EXPECTED}"));
                let (a, b) = s.split_once('-').unwrap_or((s, s));
                let first: u16 = a.trim().parse().map_err(|_| bad())?;
                let last: u16 = b.trim().parse().map_err(|_| bad())?;
                if first == 0 || last == 0 {
                    return Err(bad());
                }
                if first > last {
                    return Err(E::custom(format!("port range `{s}` ends before it starts")));
                }
                Ok(PortRange { first, last })
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
    Both,
}

impl Protocol {
    pub fn intersects(self, other: Protocol) -> bool {
        self == Protocol::Both || other == Protocol::Both || self == other
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Both => "tcp+udp",
        }
    }
}

/// How a farm picks a backend for a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scheduler {
    /// Round robin.
    #[default]
    Rr,
    /// Weighted round robin.
    Wrr,
    /// Least connections.
    Lc,
    /// Source hash.
    Sh,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Forwarding {
    /// DNAT to the backend, SNAT to the farm's floating source address.
    #[default]
    Nat,
    /// Direct server return: backends hold the VIP and answer clients directly.
    Dsr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheck {
    pub kind: HealthCheckKind,
    /// 100-3600000 ms.
    pub interval_ms: u32,
    /// 10-3600000 ms, less than interval_ms.
    pub timeout_ms: u32,
    /// Successes in a row before a backend enters the rotation, 1-100.
    pub rise: u8,
    /// Failures in a row before a backend leaves the rotation, 1-100.
    pub fall: u8,
    /// HTTP(S) only: the path requested (starts with `/`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// HTTP(S) only: the status expected, 100-599.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expect_status: Option<u16>,
    /// `command` only: an absolute path, run with the backend's address and port.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            kind: HealthCheckKind::Tcp,
            interval_ms: 2000,
            timeout_ms: 1000,
            rise: 2,
            fall: 3,
            path: None,
            expect_status: None,
            command: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthCheckKind {
    None,
    #[default]
    Tcp,
    Http,
    Https,
    Command,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub address: IpAddr,
    /// Default: the port the client connected to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// 1-10000; relative share with `wrr`.
    #[serde(default = "default_weight")]
    pub weight: u16,
    #[serde(default)]
    pub state: BackendState,
}

fn default_weight() -> u16 {
    1
}

/// The operator's state of a backend (health checks are separate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendState {
    #[default]
    Up,
    Down,
    /// No new connections; established ones continue.
    Drain,
    Maintenance,
}
