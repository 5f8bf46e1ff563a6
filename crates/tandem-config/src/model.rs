//! The configuration model: what `node.toml`, `cluster.toml` and
//! `farms/*.toml` hold. Field docs are the reference (docs/configuration.md
//! repeats them with examples). Every table refuses unknown keys, so a typo
//! is an error rather than a silently ignored setting.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// `node.toml`: this node only; never replicated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This node's name: a hostname label (`[a-z0-9-]`, 1-63 characters, not
    /// starting or ending with `-`). When clustered, one of the cluster's nodes.
    pub name: String,
    /// The interface of the cluster link (VRRP, sync). Required when clustered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_interface: Option<String>,
    /// This node's address on the cluster link. Required when clustered, and
    /// then equal to this node's `address` in cluster.toml.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_address: Option<IpAddr>,
    /// Where to serve Prometheus metrics; off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    /// The control API: clustermanager's gRPC service over TLS on this TCP
    /// address (`ip:port`), for tandemctl `--remote` and automation; off
    /// when absent. Every call needs an `[[api_keys]]` token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_listen: Option<SocketAddr>,
    /// The control API's certificate chain (PEM), with `control_tls_key`;
    /// a relative path is relative to the configuration directory. Both
    /// absent: a self-signed pair generated once in the state directory,
    /// which clients pin by its SHA-256 fingerprint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_tls_cert: Option<PathBuf>,
    /// The private key (PEM) of `control_tls_cert`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_tls_key: Option<PathBuf>,
    /// API keys accepted by the control API.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_keys: Vec<ApiKey>,
    /// The `[hooks]` table: executables this node runs on its own role and
    /// backend changes (keepalived's notify scripts). Node-local: each node
    /// runs its own, and a standalone node has them too.
    #[serde(default, skip_serializing_if = "Hooks::is_empty")]
    pub hooks: Hooks,
}

/// `[hooks]` in `node.toml`: an absolute path per event (keepalived's
/// `notify_master`, `notify_backup`, `notify_fault`, `notify`). Each runs
/// with the event in `TANDEM_*` environment variables, one at a time in the
/// order of the events, off the failover path, and is killed after
/// `timeout_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Hooks {
    /// This node became master (it holds the floating IPs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub master: Option<String>,
    /// This node became backup.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    /// This node gave up mastership because a tracked interface is down.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault: Option<String>,
    /// This node entered maintenance.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<String>,
    /// A backend entered or left the rotation (health, operator state,
    /// thresholds), or a farm's sorry server started or stopped answering.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// Every event, after its own hook (keepalived `notify`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notify: Option<String>,
    /// How long one hook may run before it is killed, 100-3600000 ms,
    /// default 30000.
    pub timeout_ms: u32,
}

impl Default for Hooks {
    fn default() -> Self {
        Hooks {
            master: None,
            backup: None,
            fault: None,
            maintenance: None,
            backend: None,
            notify: None,
            timeout_ms: 30_000,
        }
    }
}

impl Hooks {
    /// No hook configured.
    pub fn is_empty(&self) -> bool {
        *self == Hooks::default()
    }

    /// The hooks of one event: its own, then `notify`.
    pub fn for_event(&self, event: &str) -> Vec<&str> {
        let own = match event {
            "master" => &self.master,
            "backup" => &self.backup,
            "fault" => &self.fault,
            "maintenance" => &self.maintenance,
            "backend" => &self.backend,
            _ => &None,
        };
        own.iter().chain(&self.notify).map(String::as_str).collect()
    }
}

/// An API key, stored as the SHA-256 of the token (never the token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// What the key is for, e.g. `monitoring`: unique, `[A-Za-z0-9_-]`, 1-64 characters.
    pub name: String,
    /// SHA-256 of the token, 64 lowercase hex digits (`sha256sum` output).
    pub sha256: String,
    /// What the key may do: `"read"` (the default: status, node table,
    /// farms, events) or `"admin"` (also every change).
    #[serde(default)]
    pub role: ApiRole,
}

/// The role of an API key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApiRole {
    /// Reads only: status, node table, cluster settings, farms, events.
    #[default]
    Read,
    /// Reads and changes: farms, backends, cluster settings, maintenance,
    /// reload, destroy.
    Admin,
}

impl fmt::Display for ApiRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ApiRole::Read => "read",
            ApiRole::Admin => "admin",
        })
    }
}

/// `cluster.toml`: the cluster, replicated to every node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// `"active-passive"` (default): the pair, a master holding the floating
    /// IPs. `"active-active"`: 3-8 nodes all forwarding, each announcing the
    /// farms' VIPs to the routers over BGP (`[bgp]`); DSR farms only.
    #[serde(default, skip_serializing_if = "ClusterMode::is_active_passive")]
    pub mode: ClusterMode,
    /// VRRP virtual router id, 1-255; unique on the cluster link. Required
    /// by the pair; an active-active cluster has no VRRP and leaves it out.
    #[serde(default)]
    pub virtual_router_id: u8,
    /// `"none"`: a master keeps the role until it fails. A node name: that
    /// node is the preferred master and takes the role back when it returns.
    #[serde(default)]
    pub failback: Failback,
    /// Seed of the hash schedulers, shared so both nodes send a flow to the
    /// same backend (nftables' jhash otherwise picks a random seed per load).
    /// Default 0x7a6e6465.
    #[serde(default = "default_hash_seed")]
    pub hash_seed: u32,
    /// Interfaces whose loss (link down) makes this node give up mastership.
    /// Default none. Names must be valid interface names, each listed once.
    #[serde(default)]
    pub tracked_interfaces: Vec<String>,
    /// The `[vrrp]` table: heartbeat timing and transport.
    #[serde(default)]
    pub vrrp: VrrpSettings,
    /// The `[[nodes]]`: exactly two in a pair, 3-8 when active-active.
    pub nodes: Vec<ClusterNode>,
    /// The `[[floating_ips]]`: the addresses that move with the master role;
    /// at least one in a pair, none when active-active (the farms' VIPs are
    /// announced over BGP instead).
    #[serde(default)]
    pub floating_ips: Vec<FloatingIp>,
    /// The `[sync]` table: ports and key of state and config replication.
    #[serde(default)]
    pub sync: SyncSettings,
    /// The `[bgp]` table: required when active-active, refused in a pair.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<BgpSettings>,
}

/// How the nodes of a cluster share the work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClusterMode {
    /// Two nodes; the master holds the floating IPs and forwards, the
    /// backup takes over when it fails (VRRP).
    #[default]
    ActivePassive,
    /// 3-8 nodes, all forwarding: each announces the VIPs over BGP and the
    /// routers spread flows over them by ECMP.
    ActiveActive,
}

impl ClusterMode {
    pub fn is_active_passive(&self) -> bool {
        *self == ClusterMode::ActivePassive
    }

    /// As written in cluster.toml.
    pub fn as_str(self) -> &'static str {
        match self {
            ClusterMode::ActivePassive => "active-passive",
            ClusterMode::ActiveActive => "active-active",
        }
    }
}

/// `[bgp]` in an active-active `cluster.toml`: how every node announces the
/// farms' VIPs to its upstream routers (through BIRD, which Tandem
/// configures and drives).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BgpSettings {
    /// The AS number every node announces from, 1-4294967294 (not 23456,
    /// AS_TRANS).
    pub local_as: u32,
    /// BGP hold time, 3-65535 s, default 9; keepalives every third of it.
    /// A backstop only: BFD detects a dead node in well under a second.
    #[serde(default = "default_hold_time_s")]
    pub hold_time_s: u16,
    /// The `[bgp.bfd]` table: how fast the routers see a node die.
    #[serde(default)]
    pub bfd: BfdSettings,
    /// The `[[bgp.peers]]`: the upstream routers; at least one for every node.
    pub peers: Vec<BgpPeer>,
}

fn default_hold_time_s() -> u16 {
    9
}

/// `[bgp.bfd]`: Bidirectional Forwarding Detection (RFC 5880) timers of
/// every session that has BFD on. A peer declares a node dead after
/// `interval_ms × multiplier` without a BFD packet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BfdSettings {
    /// Transmit and receive interval, 10-10000 ms, default 100.
    pub interval_ms: u32,
    /// Detection multiplier, 2-255, default 3.
    pub multiplier: u8,
}

impl BfdSettings {
    /// How long a peer waits before it declares a silent node dead.
    pub fn detection_ms(&self) -> u64 {
        u64::from(self.interval_ms) * u64::from(self.multiplier)
    }
}

impl Default for BfdSettings {
    fn default() -> Self {
        BfdSettings {
            interval_ms: 100,
            multiplier: 3,
        }
    }
}

/// One of the `[[bgp.peers]]`: an upstream router.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BgpPeer {
    /// A name for logs and status, unique: 1-32 of `[A-Za-z0-9_-]`,
    /// starting with a letter.
    pub name: String,
    /// The router's address; directly connected to the nodes that peer
    /// with it. IPv4 VIPs are announced over IPv4 sessions, IPv6 over IPv6.
    pub address: IpAddr,
    /// The router's AS number, 1-4294967294 (not 23456).
    pub remote_as: u32,
    /// The nodes that peer with this router; default every node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
    /// BFD on this session, default true: the router sees a dead node
    /// within the BFD detection time instead of the hold time.
    #[serde(default = "default_true")]
    pub bfd: bool,
}

impl BgpPeer {
    /// Whether node `name` peers with this router.
    pub fn serves(&self, name: &str) -> bool {
        self.nodes.is_empty() || self.nodes.iter().any(|n| n == name)
    }
}

fn default_true() -> bool {
    true
}

fn default_hash_seed() -> u32 {
    0x7a6e_6465
}

/// `[vrrp]` in `cluster.toml`: how the nodes elect the master.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VrrpSettings {
    /// 3 (RFC 5798, default) or 2 (RFC 3768, keepalived's default).
    pub version: u8,
    /// Advertisement interval, default 1000. v3: 10-40950 ms in steps of 10
    /// (centiseconds on the wire); v2: whole seconds, 1000-255000 ms. The
    /// backup takes over after about 3 intervals without an advert.
    pub advert_interval_ms: u32,
    /// Gratuitous ARPs / unsolicited NAs sent per floating IP on becoming
    /// master, 1-100, default 3.
    pub garp_repeat: u8,
    /// Pause between those repeats, 0-10000 ms, default 100.
    pub garp_interval_ms: u32,
    /// false (default): adverts go to 224.0.0.18 / ff02::12; true: to the
    /// peer's address, for links that drop multicast.
    pub unicast: bool,
    /// Gratuitous ARPs / unsolicited NAs per floating IP sent by a master
    /// that hears an advert it outranks (another master: a healed split
    /// brain or flap), so clients and backends come back to it at once.
    /// 0-100, default 3; 0 turns it off (keepalived's `garp_lower_prio_repeat`).
    pub garp_lower_prio_repeat: u8,
    /// At most one such burst per this many ms, 0-3600000, default 1000
    /// (keepalived's `garp_lower_prio_delay`).
    pub garp_lower_prio_delay_ms: u32,
    /// While master, announce every floating IP once every this many
    /// seconds; 0 (default) never (keepalived's `garp_master_refresh`). 0-86400.
    pub garp_refresh_s: u32,
    /// After vrrpd starts, the preferred node (failback) does not preempt
    /// a lower-priority master for this many seconds, so a restarted node
    /// rejoins as backup and clustermanager's failback gate decides when it
    /// takes the role back (keepalived's `preempt_delay`). 0-1000, default 5.
    pub preempt_delay_s: u16,
    /// true (default): adverts are accepted only from the `[[nodes]]`
    /// addresses (for IPv6, from the peer's link-local address, verified to
    /// be the same host); others are dropped and reported as foreign speakers.
    pub members_only: bool,
    /// Lifetime the floating IPs are added with, refreshed while vrrpd
    /// runs, so a dead vrrpd leaves no second master. Absent (default):
    /// derived from the advert interval (about Master_Down_Interval, at
    /// least 1 s); 0: permanent addresses; else 1-3600 s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub floating_ip_lifetime_s: Option<u32>,
    /// How long a master that hands over (maintenance, vrrpd stopping) keeps
    /// its floating IPs while waiting for the peer to advertise as master.
    /// Absent (default): four advert intervals, at least 1 s; 0: release
    /// at once (RFC 5798's and keepalived's behaviour); else 1-60000 ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handover_timeout_ms: Option<u32>,
    /// SCHED_FIFO priority of vrrpd's advert thread (timers, VRRP socket,
    /// floating IPs), 1-99, default 10; 0 runs it at normal priority.
    pub rt_priority: u8,
}

impl Default for VrrpSettings {
    fn default() -> Self {
        VrrpSettings {
            version: 3,
            advert_interval_ms: 1000,
            garp_repeat: 3,
            garp_interval_ms: 100,
            unicast: false,
            garp_lower_prio_repeat: 3,
            garp_lower_prio_delay_ms: 1000,
            garp_refresh_s: 0,
            preempt_delay_s: 5,
            members_only: true,
            floating_ip_lifetime_s: None,
            handover_timeout_ms: None,
            rt_priority: 10,
        }
    }
}

/// One of the `[[nodes]]` of `cluster.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterNode {
    /// The node's name, as its `node.toml` gives it; unique.
    pub name: String,
    /// The node's address on the cluster link (its `cluster_address`):
    /// unique, unicast, the same family as the other node's.
    pub address: IpAddr,
    /// VRRP priority, 1-254, default 100; the higher wins the election.
    #[serde(default = "default_priority")]
    pub priority: u8,
    /// Active-active only: the node's BGP router id, unique. Default: its
    /// `address` when that is IPv4 (required otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub router_id: Option<Ipv4Addr>,
}

impl ClusterNode {
    /// The BGP router id: the configured one, else the IPv4 address.
    pub fn bgp_router_id(&self) -> Option<Ipv4Addr> {
        self.router_id.or(match self.address {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        })
    }
}

fn default_priority() -> u8 {
    100
}

/// One of the `[[floating_ips]]` of `cluster.toml`: an address the master
/// holds and the backup does not.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FloatingIp {
    /// Address with prefix, e.g. `"10.0.0.100/24"`; unique, unicast.
    pub address: IpNet,
    /// The interface the master adds it to.
    pub interface: String,
}

impl fmt::Display for FloatingIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} dev {}", self.address, self.interface)
    }
}

/// `[sync]` in `cluster.toml`: how the nodes replicate state and configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncSettings {
    /// UDP port of conntrack replication on the cluster link, 1-65535, default 3780.
    pub conntrack_port: u16,
    /// Port of the peer's sshd (configuration replication, control), 1-65535, default 22.
    pub ssh_port: u16,
    /// Shared key of the conntrack sync protocol; a relative path is taken
    /// from the configuration directory (see [`SyncSettings::key_path`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
    /// Most connection changes conntrack-syncd queues for the peer, 1024 to
    /// 16777216, default 131072 (about 25 MB at most). Changes of one flow
    /// fold into one entry, so this bounds the flows with unsent changes;
    /// beyond it the queue is dropped and one bulk resync follows.
    pub conntrack_queue_limit: u32,
    /// Replication lag above this for more than a few seconds makes
    /// conntrack-syncd's health degraded (yellow), 10 to 600000 ms, default 1000.
    pub conntrack_lag_threshold_ms: u32,
    /// A TCP packet to a NAT farm's VIP or SNAT address that belongs to no
    /// connection this node knows (and is not a SYN opening one) is
    /// dropped for this long after its flow is first seen, so that its
    /// retransmission finds the connection once replication has brought
    /// it, instead of the kernel resetting it or scheduling it anew; after
    /// that it is handled as before. 0 turns this off. 0-10000 ms, default
    /// 1000.
    pub orphan_grace_ms: u32,
    /// Configuration replication refuses a file larger than this, naming it
    /// (the peer keeps its previous copy); 1 KiB-1 GiB, default 4 MiB.
    pub max_file_bytes: u64,
    /// Configuration replication refuses the files beyond this many (after
    /// cluster.toml, keys/sync.key and farms/, in path order), naming them;
    /// 1-1,000,000, default 100,000.
    pub max_files: u32,
}

/// Default of `[sync] max_file_bytes`: 4 MiB.
pub const DEFAULT_MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;
/// Default of `[sync] orphan_grace_ms`.
pub const DEFAULT_ORPHAN_GRACE_MS: u32 = 1000;
/// Default of `[sync] max_files`.
pub const DEFAULT_MAX_FILES: u32 = 100_000;

impl SyncSettings {
    /// `key_file` resolved against the configuration directory.
    pub fn key_path(&self, config_dir: &Path) -> Option<PathBuf> {
        self.key_file.as_ref().map(|k| config_dir.join(k))
    }
}

impl Default for SyncSettings {
    fn default() -> Self {
        SyncSettings {
            conntrack_port: 3780,
            ssh_port: 22,
            key_file: None,
            conntrack_queue_limit: 131_072,
            conntrack_lag_threshold_ms: 1000,
            orphan_grace_ms: DEFAULT_ORPHAN_GRACE_MS,
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
            max_files: DEFAULT_MAX_FILES,
        }
    }
}

/// An address with a prefix length, written (and serialized) `addr/len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    /// The address itself, e.g. 10.0.0.100.
    pub addr: IpAddr,
    /// The prefix length: 0-32 for IPv4, 0-128 for IPv6.
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

/// Who is preferred as master, if anyone; written `"none"` or a node name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Failback {
    /// No preference: the master keeps the role until it fails.
    #[default]
    None,
    /// This node takes the master role back when it returns (after its
    /// configuration and connection state are resynced).
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
    /// The virtual IP clients connect to; when clustered, one of the
    /// floating IPs, so that it moves at failover.
    pub vip: IpAddr,
    /// A port (`80`) or a range (`"8000-8100"`), 1-65535. No two farms may
    /// listen on the same vip, port and protocol.
    pub port: PortRange,
    /// `tcp` (default), `udp` or `both`.
    #[serde(default)]
    pub protocol: Protocol,
    /// How a backend is chosen for a new connection: `rr` (default),
    /// `wrr`, `lc`, `wlc`, `sed`, `nq`, `sh`, `dh`, `mh`, `fo` or `ovf`
    /// (the IPVS schedulers of the same names).
    #[serde(default)]
    pub scheduler: Scheduler,
    /// `nat` (default) or `dsr`.
    #[serde(default)]
    pub forwarding: Forwarding,
    /// Source address toward the backends; required with `nat`, refused
    /// with `dsr`; the vip's family. When clustered it must be a floating IP:
    /// the SNAT source must move with the VIP, or after a failover the
    /// backends answer the dead node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snat_address: Option<IpAddr>,
    /// A firewall-mark farm (`ipvsadm -f`): the farm serves the packets the
    /// operator's own nftables rules marked with this value (`meta mark`,
    /// set before the nat hook), whatever their address or port, instead of
    /// `vip` and `port`. 1-0xffffffff. `vip` and `port` still say where the
    /// marked traffic is addressed: the cluster checks and the replication
    /// of connection state use them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fwmark: Option<u32>,
    /// Persistence (`ipvsadm -p`, keepalived `persistence_timeout`): a
    /// client's new connections go to the backend its earlier ones went to
    /// while it keeps coming back within this many seconds, 1-2592000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistence_timeout_s: Option<u32>,
    /// Persistence granularity (`ipvsadm -M`, keepalived
    /// `persistence_granularity`): clients whose addresses share this mask
    /// are one client. `"255.255.255.0"` or `"/24"` (IPv6: `"/64"`); default
    /// the whole address. Needs `persistence_timeout_s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistence_netmask: Option<Netmask>,
    /// `sh`, `dh` and `mh`: hash the client's port too (`sh-port`,
    /// `mh-port`), spreading one client's connections. Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hash_source_port: bool,
    /// One-packet scheduling (`ipvsadm -o`): each UDP datagram is scheduled
    /// on its own, even within one flow (DNS-style traffic). udp only.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub one_packet: bool,
    /// What happens to the established connections of a backend whose
    /// health check fails: `quiesce` (default; keepalived
    /// `inhibit_on_failure`: weight 0, they continue) or `reset` (IPVS
    /// `expire_nodest_conn`: removed, so clients notice at once).
    #[serde(default, skip_serializing_if = "OnBackendFailure::is_default")]
    pub on_backend_failure: OnBackendFailure,
    /// `[sorry_server]` (keepalived `sorry_server`): where new connections
    /// go while no backend can take them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sorry_server: Option<SorryServer>,
    /// `[timeouts]` (`ipvsadm --set tcp tcpfin udp`): the kernel's
    /// connection-tracking timeouts for this farm's connections.
    #[serde(default, skip_serializing_if = "Timeouts::is_empty")]
    pub timeouts: Timeouts,
    /// The `[health_check]` table; absent: a TCP connect check with the
    /// defaults below.
    #[serde(default)]
    pub health_check: HealthCheck,
    /// The `[[backends]]`; none is valid (the farm accepts nothing yet).
    #[serde(default)]
    pub backends: Vec<Backend>,
}

impl Farm {
    /// The port health checks probe on `backend`: its own port, or the
    /// farm's (the first of a range) when it has none.
    pub fn check_port(&self, backend: &Backend) -> u16 {
        backend.port.unwrap_or(self.port.first)
    }

    /// The persistence netmask as a prefix length: the configured one, or
    /// the whole address.
    pub fn persistence_prefix(&self) -> u8 {
        let full = if self.vip.is_ipv4() { 32 } else { 128 };
        self.persistence_netmask.map_or(full, |m| m.prefix_len)
    }
}

/// Ports `first..=last`; one port when equal. Written `80` or `"8000-8100"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    /// The lowest port, 1-65535.
    pub first: u16,
    /// The highest port, `first`-65535.
    pub last: u16,
}

impl PortRange {
    /// One port.
    pub fn single(port: u16) -> PortRange {
        PortRange {
            first: port,
            last: port,
        }
    }

    /// Whether the two share at least one port.
    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.first <= other.last && other.first <= self.last
    }

    /// Whether this is one port rather than a range.
    pub fn is_single(&self) -> bool {
        self.first == self.last
    }

    /// Whether `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
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

const PORT_EXPECTED: &str = "a port (1-65535) or a range \"lo-hi\"";

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

/// A contiguous netmask, written `"255.255.255.0"` (IPv4) or `"/24"`
/// (either family); kept as its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Netmask {
    /// Leading one bits: 0-32 (IPv4) or 0-128 (IPv6).
    pub prefix_len: u8,
    /// Whether it was written as an IPv4 dotted mask (and so only fits IPv4).
    pub dotted: bool,
}

impl fmt::Display for Netmask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.dotted {
            let bits = u32::MAX
                .checked_shl(32 - u32::from(self.prefix_len))
                .unwrap_or(0);
            write!(f, "{}", std::net::Ipv4Addr::from(bits))
        } else {
            write!(f, "/{}", self.prefix_len)
        }
    }
}

impl FromStr for Netmask {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix('/') {
            let prefix_len: u8 = p
                .parse()
                .ok()
                .filter(|p| *p <= 128)
                .ok_or_else(|| format!("netmask `{s}`: a prefix length is /0-/128"))?;
            return Ok(Netmask {
                prefix_len,
                dotted: false,
            });
        }
        let a: std::net::Ipv4Addr = s.parse().map_err(|_| {
            format!("netmask `{s}` is neither a dotted IPv4 mask (255.255.255.0) nor a prefix length (/24)")
        })?;
        let bits = u32::from(a);
        let prefix_len = bits.leading_ones();
        if bits.checked_shl(prefix_len).unwrap_or(0) != 0 {
            return Err(format!(
                "netmask `{s}` is not contiguous: its one bits must all come first"
            ));
        }
        Ok(Netmask {
            prefix_len: prefix_len as u8,
            dotted: true,
        })
    }
}

impl Serialize for Netmask {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Netmask {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

/// `[sorry_server]` of a farm: the server that answers new connections
/// while no backend can (every one down, failing, draining or over its
/// threshold). Established connections are never moved to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SorryServer {
    /// Its address, of the vip's family.
    pub address: IpAddr,
    /// 1-65535; default the port the client used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

/// What a failing health check does to a backend's established connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnBackendFailure {
    /// Out of the rotation; established connections continue (keepalived
    /// `inhibit_on_failure`, IPVS weight 0).
    #[default]
    Quiesce,
    /// Out of the rotation and its connections removed from the kernel's
    /// table, so their next packet is answered with a reset (IPVS
    /// `expire_nodest_conn`).
    Reset,
}

impl OnBackendFailure {
    fn is_default(&self) -> bool {
        *self == OnBackendFailure::default()
    }
}

/// `[timeouts]` of a farm (`ipvsadm --set tcp tcpfin udp`), in seconds,
/// 1-2592000; absent keys keep the kernel's defaults. They are set on the
/// farm's connections in the kernel (nftables `ct timeout` objects).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// An established TCP connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_s: Option<u32>,
    /// A TCP connection after its first FIN (FIN_WAIT, CLOSE_WAIT,
    /// LAST_ACK, TIME_WAIT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_fin_s: Option<u32>,
    /// A UDP flow, answered or not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp_s: Option<u32>,
}

impl Timeouts {
    /// Nothing set: the kernel's defaults.
    pub fn is_empty(&self) -> bool {
        *self == Timeouts::default()
    }
}

/// The transport protocol(s) a farm listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
    /// TCP and UDP on the same port(s), e.g. DNS.
    Both,
}

impl Protocol {
    /// Whether the two have a protocol in common.
    pub fn intersects(self, other: Protocol) -> bool {
        self == Protocol::Both || other == Protocol::Both || self == other
    }

    /// Whether TCP is one of them.
    pub fn has_tcp(self) -> bool {
        self != Protocol::Udp
    }

    /// `tcp`, `udp` or `tcp+udp`, as messages and listings show it.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Both => "tcp+udp",
        }
    }
}

/// How a farm picks a backend for a new connection: the IPVS schedulers
/// of the same names (see docs/lb-forwarder.md for how each is realised
/// and its precision).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scheduler {
    /// Round robin.
    #[default]
    Rr,
    /// Weighted round robin.
    Wrr,
    /// Least connections: the backend with the fewest connections.
    Lc,
    /// Weighted least connections: the fewest connections per unit of weight.
    Wlc,
    /// Shortest expected delay: the least (active connections + 1) / weight.
    Sed,
    /// Never queue: an idle backend if there is one, otherwise as `sed`.
    Nq,
    /// Source hash: a client keeps its backend. Seeded with the cluster's
    /// `hash_seed`, so both nodes pick the same backend for a flow.
    Sh,
    /// Destination hash: a destination address keeps its backend (for
    /// firewall-mark farms serving many addresses). Seeded like `sh`.
    Dh,
    /// Maglev hashing of the source: consistent, so removing one backend
    /// moves only its own clients; seeded like `sh`.
    Mh,
    /// Weighted failover: every new connection to the backend in rotation
    /// with the highest weight.
    Fo,
    /// Overflow: the backend with the highest weight until it holds as many
    /// connections as its weight, then the next.
    Ovf,
}

impl Scheduler {
    /// The name written in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheduler::Rr => "rr",
            Scheduler::Wrr => "wrr",
            Scheduler::Lc => "lc",
            Scheduler::Wlc => "wlc",
            Scheduler::Sed => "sed",
            Scheduler::Nq => "nq",
            Scheduler::Sh => "sh",
            Scheduler::Dh => "dh",
            Scheduler::Mh => "mh",
            Scheduler::Fo => "fo",
            Scheduler::Ovf => "ovf",
        }
    }

    /// Whether its decisions depend on the backends' connection counts.
    pub fn uses_loads(self) -> bool {
        matches!(
            self,
            Scheduler::Lc | Scheduler::Wlc | Scheduler::Sed | Scheduler::Nq | Scheduler::Ovf
        )
    }

    /// Whether it hashes the packet (stateless: every node picks the same
    /// backend for a flow).
    pub fn is_hash(self) -> bool {
        matches!(self, Scheduler::Sh | Scheduler::Dh | Scheduler::Mh)
    }
}

/// How packets reach the backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Forwarding {
    /// DNAT to the backend, SNAT to the farm's floating source address.
    #[default]
    Nat,
    /// Direct server return: backends hold the VIP (on a non-ARPing
    /// interface) and answer clients directly; ports cannot be rewritten.
    Dsr,
}

/// `[health_check]` in a farm: how each backend is probed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheck {
    /// `none`, `tcp` (default), `http`, `https` or `command`. A udp-only
    /// farm cannot use the TCP-based kinds. Probes go to
    /// [`Farm::check_port`].
    pub kind: HealthCheckKind,
    /// Time between two probes of a backend, 100-3600000 ms, default 2000.
    pub interval_ms: u32,
    /// Time a probe may take, 10-3600000 ms and less than `interval_ms`,
    /// default 1000.
    pub timeout_ms: u32,
    /// Successes in a row before a backend enters the rotation, 1-100, default 2.
    pub rise: u8,
    /// Failures in a row before a backend leaves the rotation, 1-100, default 3.
    pub fall: u8,
    /// `http`/`https` only: the path requested, starting with `/`; default
    /// `/` (see [`HealthCheck::http_path`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// `http`/`https` only: the status expected, 100-599; default 200 (see
    /// [`HealthCheck::http_expect_status`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expect_status: Option<u16>,
    /// `command` only, and required there: an absolute path, run with the
    /// backend's address and port; exit status 0 means healthy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
}

impl HealthCheck {
    /// The path an HTTP(S) check requests.
    pub fn http_path(&self) -> &str {
        self.path.as_deref().unwrap_or("/")
    }

    /// The status an HTTP(S) check expects.
    pub fn http_expect_status(&self) -> u16 {
        self.expect_status.unwrap_or(200)
    }
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

/// What a health check does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthCheckKind {
    /// No probing: backends are as healthy as their `state` says.
    None,
    /// A TCP connect to the backend's port.
    #[default]
    Tcp,
    /// An HTTP GET of `path`, expecting `expect_status`.
    Http,
    /// The same over TLS (certificates are not verified).
    Https,
    /// Runs `command`; exit status 0 means healthy.
    Command,
}

impl HealthCheckKind {
    /// The name written in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthCheckKind::None => "none",
            HealthCheckKind::Tcp => "tcp",
            HealthCheckKind::Http => "http",
            HealthCheckKind::Https => "https",
            HealthCheckKind::Command => "command",
        }
    }
}

/// One of a farm's `[[backends]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    /// The backend's address, of the vip's family; unique with `port`.
    pub address: IpAddr,
    /// 1-65535. Default: the port the client connected to (with a range,
    /// each connection keeps its port). With `dsr`, only the farm's own port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// 1-10000, default 1: the backend's relative capacity, used by `wrr`,
    /// `wlc`, `sed`, `nq`, `mh`, `fo` and `ovf` (`ovf`: its connection limit).
    #[serde(default = "default_weight")]
    pub weight: u16,
    /// `up` (default), `down`, `drain` or `maintenance`.
    #[serde(default)]
    pub state: BackendState,
    /// Upper connection threshold (`ipvsadm -x`): at this many connections
    /// the backend takes no new ones until it is down to
    /// `lower_threshold`. 1-1000000; default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upper_threshold: Option<u32>,
    /// Lower connection threshold (`ipvsadm -y`): an overloaded backend is
    /// readmitted at this many connections or fewer. Below
    /// `upper_threshold`; default: readmitted below 3/4 of it, as IPVS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lower_threshold: Option<u32>,
}

impl Backend {
    /// The port a connection to `requested` (a port of the farm) is sent to.
    pub fn target_port(&self, requested: u16) -> u16 {
        self.port.unwrap_or(requested)
    }
}

fn default_weight() -> u16 {
    1
}

/// The operator's state of a backend (health checks are separate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendState {
    /// In the rotation while its health check passes.
    #[default]
    Up,
    /// Out of the rotation, whatever its health check says.
    Down,
    /// No new connections; established ones continue.
    Drain,
    /// Out of the rotation for maintenance, like `down`, but shown apart.
    Maintenance,
}
