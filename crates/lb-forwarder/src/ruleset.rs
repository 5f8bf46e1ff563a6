//! The kernel datapath as a pure function: farms, health and loads in, one
//! nftables script out. The script replaces Tandem's table `inet tandem` in
//! a single transaction (`nft -f`), so a change is never half-applied and no
//! other table is touched.
//!
//! Shape of the table:
//! - `raw` (filter, raw priority; only when a farm schedules UDP one packet
//!   at a time): gives each datagram of such a farm a conntrack zone of its
//!   own, so each is a new connection.
//! - `prerouting` (nat): a packet to a farm's VIP:port/proto (or carrying a
//!   firewall-mark farm's mark) jumps to the farm's chain. There, a
//!   persistent client finds its backend in the dynamic map
//!   `persist_<farm>`; anyone else gets one from the scheduler, which sets
//!   the connection's conntrack mark to the chosen backend's id
//!   (`numgen`/`jhash` through a map); the sorry server's id when no
//!   backend can take the connection. `nat_<farm>` then counts the
//!   connection and DNATs it with maps keyed by that mark. Only a
//!   connection's first packet goes through nat chains; conntrack does the
//!   rest. There are no per-backend chains, so a farm of 1,000 backends
//!   stays a handful of rules.
//! - `postrouting` (nat): NAT farms SNAT toward the backends to their
//!   floating `snat_address`, so backends answer whichever node holds it.
//! - `forward` (filter): an object-reference map keyed by `ct mark . ct
//!   direction` counts every packet of a connection per backend and
//!   direction, in O(1); a farm's totals are the sum of its backends'.
//!
//! Counters are named objects; the caller passes their current values so a
//! replacement carries them over.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use tandem_config::{Backend, BackendState, Farm, Forwarding, Protocol, Scheduler};

use crate::sched::{self, Candidate, Load};

pub const FAMILY: &str = "inet";
pub const TABLE: &str = "tandem";
/// The companion tables of direct-server-return farms (`ip` and `ip6`).
pub const DSR_TABLE: &str = "tandem_dsr";
/// Hash buckets of source- and destination-hash farms: backends own
/// contiguous ranges, so when one leaves only its own sources move.
pub const SH_BUCKETS: u32 = 1024;
/// At most this many slots in a numgen schedule; larger weight sums are
/// scaled down proportionally (each backend keeps at least one slot).
pub const MAX_SLOTS: u64 = 4096;
/// How many of the next connections a load-aware schedule decides ahead,
/// from the loads read at each refresh: exact for that many new connections
/// per farm between two refreshes; beyond, the schedule repeats.
pub const MAX_PICKS: usize = 1024;
/// A finite schedule's numgen modulus: its counter never wraps back into
/// the schedule, so connections beyond its last slot find no backend.
const FINITE_MODULUS: u64 = 1 << 31;
/// Largest dynamic persistence map: client addresses (or masked networks)
/// remembered at once per farm. A full map makes new clients scheduled
/// without being remembered, nothing worse.
pub const PERSISTENCE_ENTRIES: u32 = 262_144;

/// One backend of one farm (or its sorry server).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    pub farm: String,
    pub address: IpAddr,
    /// The backend's configured port, None when it keeps the client's port.
    pub port: Option<u16>,
}

impl BackendKey {
    pub fn of(farm: &Farm, b: &Backend) -> Self {
        BackendKey {
            farm: farm.name.clone(),
            address: b.address,
            port: b.port,
        }
    }

    /// The farm's sorry server, if it has one.
    pub fn sorry(farm: &Farm) -> Option<Self> {
        farm.sorry_server.as_ref().map(|s| BackendKey {
            farm: farm.name.clone(),
            address: s.address,
            port: s.port,
        })
    }

    /// A stable, non-zero 32-bit id: the conntrack mark of its connections.
    /// Derived from the key alone (FNV-1a), so both nodes of a cluster — and
    /// the replicated conntrack entries — agree on it without coordination.
    pub fn mark(&self) -> u32 {
        let mut h: u32 = 0x811c_9dc5;
        let text = format!("{}/{}/{}", self.farm, self.address, self.port.unwrap_or(0));
        for b in text.bytes() {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
        h.max(1)
    }

    /// Name of its counters: readable, and safe inside quotes.
    pub fn name(&self) -> String {
        let addr: String = self
            .address
            .to_string()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        match self.port {
            Some(p) => format!("{}_{addr}_{p}", self.farm),
            None => format!("{}_{addr}", self.farm),
        }
    }

    /// The identity Maglev hashing permutes: the address and port alone,
    /// so the table depends on the backends and the seed, nothing else.
    fn maglev_key(&self) -> String {
        format!("{}/{}", self.address, self.port.unwrap_or(0))
    }
}

/// Packet and byte counts of one counter object.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Count {
    pub packets: u64,
    pub bytes: u64,
}

impl std::ops::Add for Count {
    type Output = Count;
    fn add(self, o: Count) -> Count {
        Count {
            packets: self.packets + o.packets,
            bytes: self.bytes + o.bytes,
        }
    }
}

/// Packets from the clients to the backend (the original direction).
pub fn backend_in_counter(key: &BackendKey) -> String {
    format!("in_{}", key.name())
}

/// Packets from the backend to the clients (the reply direction).
pub fn backend_out_counter(key: &BackendKey) -> String {
    format!("out_{}", key.name())
}

/// New connections sent to a backend (counted in its farm's nat chain).
pub fn backend_conn_counter(key: &BackendKey) -> String {
    format!("conn_{}", key.name())
}

/// Everything the datapath depends on besides the farms.
#[derive(Debug, Default)]
pub struct Inputs {
    /// Cluster-wide seed of the hash schedulers (nftables draws a random one
    /// per rule load otherwise, and two nodes would disagree).
    pub hash_seed: u32,
    /// How long a TCP packet of a connection this node has no entry for is
    /// held back (dropped) before the kernel handles it as before; 0: not
    /// at all. Set on a pair's nodes, where replication may bring the entry
    /// a few milliseconds after the first such packet.
    pub orphan_grace_ms: u32,
    /// Backends the health checks declared failing.
    pub failing: HashSet<BackendKey>,
    /// Operator overrides of a backend's state (SetBackendState), over the
    /// configured one.
    pub overrides: HashMap<BackendKey, BackendState>,
    /// Connections per backend, for the load-aware schedulers and
    /// thresholds.
    pub loads: HashMap<BackendKey, Load>,
    /// Backends over their upper connection threshold (and not yet back to
    /// their lower one).
    pub overloaded: HashSet<BackendKey>,
    /// The refresh of the loads this rendering follows: a finite schedule
    /// is rewritten at each one, so its counter starts again from the new
    /// loads.
    pub refresh: u64,
    /// Counter values to carry over into the new table.
    pub counters: HashMap<String, Count>,
}

impl Inputs {
    /// The state a backend is in after operator overrides.
    pub fn state_of(&self, key: &BackendKey, configured: BackendState) -> BackendState {
        self.overrides.get(key).copied().unwrap_or(configured)
    }

    /// In rotation: up (not down, draining or in maintenance) and not
    /// failing its health check. A backend not yet checked is in rotation.
    pub fn in_rotation(&self, key: &BackendKey, configured: BackendState) -> bool {
        self.state_of(key, configured) == BackendState::Up && !self.failing.contains(key)
    }

    /// In rotation and not over its connection threshold: it may take new
    /// connections now.
    pub fn available(&self, key: &BackendKey, configured: BackendState) -> bool {
        self.in_rotation(key, configured) && !self.overloaded.contains(key)
    }

    fn load(&self, key: &BackendKey) -> Load {
        self.loads.get(key).copied().unwrap_or_default()
    }
}

/// What a farm's scheduler currently does, for status and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FarmPlan {
    pub farm: String,
    /// (backend, share) that take new connections; the shares' meaning
    /// depends on the scheduler (rr, fo: 1 each; wrr: weights; load-aware
    /// schedulers: slots of the next connections; hash schedulers: hash
    /// buckets or Maglev slots).
    pub rotation: Vec<(BackendKey, u64)>,
    /// The sorry server while it takes the new connections (no backend
    /// can).
    pub sorry: Option<BackendKey>,
    /// The schedule ends: connections beyond its last slot before the next
    /// refresh go to the sorry server, or are dropped (every backend with
    /// room is full: thresholds, ovf).
    pub finite: bool,
}

/// How new connections pick their backend in the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pick {
    /// No backend can take a connection.
    Nothing,
    /// `numgen inc mod len` over this order, wrapping.
    Cycle(Vec<BackendKey>),
    /// The same without wrapping: the slots end.
    Finite(Vec<BackendKey>),
    /// `jhash <key> mod len(owners)`: the owner of each bucket or slot.
    Hash {
        key: String,
        owners: Vec<BackendKey>,
    },
}

fn l4(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Both => "{ tcp, udp }",
    }
}

fn family(a: IpAddr) -> &'static str {
    if a.is_ipv4() { "ip" } else { "ip6" }
}

fn addr_type(a: IpAddr) -> &'static str {
    if a.is_ipv4() {
        "ipv4_addr"
    } else {
        "ipv6_addr"
    }
}

/// The hash input of a hash scheduler.
fn hash_key(farm: &Farm) -> String {
    let fam = family(farm.vip);
    match farm.scheduler {
        Scheduler::Dh => format!("{fam} daddr"),
        _ if farm.hash_source_port => format!("{fam} saddr . th sport"),
        _ => format!("{fam} saddr"),
    }
}

/// The farm's backends in the order a scheduler walks them: sorted by
/// address and port for rr, wrr, sh and dh (stable whatever the order of
/// the file); in the file's order for the IPVS schedulers whose ties go to
/// the first backend listed (lc, wlc, sed, nq, fo, ovf) and for mh.
fn ordered(farm: &Farm) -> Vec<&Backend> {
    let mut backends: Vec<&Backend> = farm.backends.iter().collect();
    if matches!(
        farm.scheduler,
        Scheduler::Rr | Scheduler::Wrr | Scheduler::Sh | Scheduler::Dh
    ) {
        backends.sort_by_key(|b| (b.address, b.port));
    }
    backends
}

fn has_thresholds(farm: &Farm) -> bool {
    farm.backends.iter().any(|b| b.upper_threshold.is_some())
}

/// Whether the farm's datapath depends on connection counts (read from
/// conntrack at each refresh).
pub fn needs_loads(farm: &Farm) -> bool {
    farm.forwarding == Forwarding::Nat && (farm.scheduler.uses_loads() || has_thresholds(farm))
}

/// How one farm spreads new connections over its backends.
pub fn plan(farm: &Farm, inputs: &Inputs) -> FarmPlan {
    plan_and_pick(farm, inputs).0
}

fn plan_and_pick(farm: &Farm, inputs: &Inputs) -> (FarmPlan, Pick) {
    let (pick, rotation) = pick(farm, inputs);
    let sorry = if rotation.is_empty() {
        BackendKey::sorry(farm)
    } else {
        None
    };
    let plan = FarmPlan {
        farm: farm.name.clone(),
        rotation,
        sorry,
        finite: matches!(pick, Pick::Finite(_)),
    };
    (plan, pick)
}

/// Slots per backend, in first-appearance order.
fn shares(owners: &[BackendKey]) -> Vec<(BackendKey, u64)> {
    let mut out: Vec<(BackendKey, u64)> = Vec::new();
    let mut index: HashMap<&BackendKey, usize> = HashMap::new();
    for k in owners {
        match index.get(k) {
            Some(&i) => out[i].1 += 1,
            None => {
                index.insert(k, out.len());
                out.push((k.clone(), 1));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The farm's pick and its rotation: (backend, share) of those that take
/// new connections.
fn pick(farm: &Farm, inputs: &Inputs) -> (Pick, Vec<(BackendKey, u64)>) {
    let hashed = |owners: Vec<BackendKey>| {
        if owners.is_empty() {
            return (Pick::Nothing, Vec::new());
        }
        let rotation = shares(&owners);
        (
            Pick::Hash {
                key: hash_key(farm),
                owners,
            },
            rotation,
        )
    };
    if farm.forwarding == Forwarding::Dsr {
        return hashed(dsr_owners(farm, inputs));
    }
    let available: Vec<(&Backend, BackendKey)> = ordered(farm)
        .into_iter()
        .map(|b| (b, BackendKey::of(farm, b)))
        .filter(|(b, k)| inputs.available(k, b.state))
        .collect();
    if available.is_empty() {
        return (Pick::Nothing, Vec::new());
    }
    let greedy = farm.scheduler.uses_loads() || (has_thresholds(farm) && !farm.scheduler.is_hash());
    if greedy {
        let candidates: Vec<Candidate> = available
            .iter()
            .map(|(b, k)| {
                let load = inputs.load(k);
                Candidate {
                    weight: u64::from(b.weight),
                    load,
                    room: b
                        .upper_threshold
                        .map(|x| u64::from(x).saturating_sub(load.total())),
                }
            })
            .collect();
        let (picks, exhausted) = sched::greedy(farm.scheduler, &candidates, MAX_PICKS);
        let order: Vec<BackendKey> = picks.iter().map(|&i| available[i].1.clone()).collect();
        let rotation = shares(&order);
        let pick = match (order.is_empty(), exhausted) {
            (true, _) => Pick::Nothing,
            (false, true) => Pick::Finite(order),
            (false, false) => Pick::Cycle(order),
        };
        return (pick, rotation);
    }
    match farm.scheduler {
        Scheduler::Rr | Scheduler::Wrr => {
            let rotation: Vec<(BackendKey, u64)> = available
                .iter()
                .map(|(b, k)| {
                    let w = if farm.scheduler == Scheduler::Wrr {
                        u64::from(b.weight)
                    } else {
                        1
                    };
                    (k.clone(), w)
                })
                .collect();
            (Pick::Cycle(schedule(&rotation)), rotation)
        }
        Scheduler::Fo => match fo_choice(farm, inputs) {
            Some(k) => (Pick::Cycle(vec![k.clone()]), vec![(k, 1)]),
            None => (Pick::Nothing, Vec::new()),
        },
        Scheduler::Sh | Scheduler::Dh => hashed(sh_owners(farm, inputs)),
        Scheduler::Mh => hashed(mh_owners(farm, inputs)),
        // Handled by the greedy branch above.
        Scheduler::Lc | Scheduler::Wlc | Scheduler::Sed | Scheduler::Nq | Scheduler::Ovf => {
            (Pick::Nothing, Vec::new())
        }
    }
}

/// Weighted failover: the backend with the highest weight among those
/// that can take connections, the first listed on a tie.
fn fo_choice(farm: &Farm, inputs: &Inputs) -> Option<BackendKey> {
    let mut best: Option<(&Backend, BackendKey)> = None;
    for b in &farm.backends {
        let k = BackendKey::of(farm, b);
        if inputs.available(&k, b.state) && best.as_ref().is_none_or(|(x, _)| b.weight > x.weight) {
            best = Some((b, k));
        }
    }
    best.map(|(_, k)| k)
}

/// Source (or destination) hash: the owner of each of the [`SH_BUCKETS`]
/// buckets. Configured backends own contiguous ranges of buckets; the
/// buckets of a backend out of rotation are dealt out among those in
/// rotation, so every other source keeps its backend. Empty when no backend
/// is in rotation.
pub fn sh_owners(farm: &Farm, inputs: &Inputs) -> Vec<BackendKey> {
    bucket_owners(farm, inputs, false)
}

/// Maglev hashing: the owner of each slot of a table of
/// [`sched::maglev_size`] slots (a prime ≥ 100 × the configured backends),
/// built over the configured backends with the cluster's hash seed; the
/// slots of those that cannot take connections go to the others
/// ([`sched::maglev_with_absent`]). Empty when none can.
pub fn mh_owners(farm: &Farm, inputs: &Inputs) -> Vec<BackendKey> {
    let all: Vec<(BackendKey, u64, bool)> = farm
        .backends
        .iter()
        .map(|b| {
            let k = BackendKey::of(farm, b);
            let up = inputs.available(&k, b.state);
            (k, u64::from(b.weight), up)
        })
        .collect();
    let keys: Vec<(String, u64)> = all.iter().map(|(k, w, _)| (k.maglev_key(), *w)).collect();
    let available: Vec<bool> = all.iter().map(|(_, _, up)| *up).collect();
    let size = sched::maglev_size(farm.backends.len());
    sched::maglev_with_absent(&keys, &available, size, inputs.hash_seed)
        .into_iter()
        .map(|i| all[i].0.clone())
        .collect()
}

/// The buckets of a direct-server-return farm: as [`sh_owners`], with home
/// ranges in proportion to the weights under `wrr`; the Maglev table under
/// `mh`; every bucket to the highest weight under `fo`.
pub fn dsr_owners(farm: &Farm, inputs: &Inputs) -> Vec<BackendKey> {
    match farm.scheduler {
        Scheduler::Mh => mh_owners(farm, inputs),
        Scheduler::Fo => fo_choice(farm, inputs).into_iter().collect(),
        _ => bucket_owners(farm, inputs, farm.scheduler == Scheduler::Wrr),
    }
}

fn bucket_owners(farm: &Farm, inputs: &Inputs, weighted: bool) -> Vec<BackendKey> {
    let mut all: Vec<&Backend> = farm.backends.iter().collect();
    all.sort_by_key(|b| (b.address, b.port));
    let keys: Vec<(BackendKey, bool, u64)> = all
        .iter()
        .map(|b| {
            let k = BackendKey::of(farm, b);
            let up = inputs.available(&k, b.state);
            let w = if weighted {
                u64::from(b.weight).max(1)
            } else {
                1
            };
            (k, up, w)
        })
        .collect();
    let up: Vec<&BackendKey> = keys
        .iter()
        .filter(|(_, u, _)| *u)
        .map(|(k, _, _)| k)
        .collect();
    if up.is_empty() {
        return Vec::new();
    }
    // Backend i's home is the buckets whose scaled position falls in its
    // slice [sum of weights before it, + its weight) of the total.
    let total: u64 = keys.iter().map(|(_, _, w)| *w).sum();
    let mut ends = Vec::with_capacity(keys.len());
    let mut acc = 0u64;
    for (_, _, w) in &keys {
        acc += w;
        ends.push(acc);
    }
    (0..SH_BUCKETS)
        .map(|b| {
            let pos = u64::from(b) * total / u64::from(SH_BUCKETS);
            let home = ends.partition_point(|e| *e <= pos);
            match keys.get(home) {
                Some((k, true, _)) => k.clone(),
                _ => up[b as usize % up.len()].clone(),
            }
        })
        .collect()
}

/// Consecutive equal owners as (first, last, backend) ranges.
fn ranges(owners: &[BackendKey]) -> Vec<(u32, u32, BackendKey)> {
    let mut out: Vec<(u32, u32, BackendKey)> = Vec::new();
    for (i, k) in owners.iter().enumerate() {
        let i = u32::try_from(i).unwrap_or(u32::MAX);
        match out.last_mut() {
            Some((_, last, owner)) if owner == k && *last + 1 == i => *last = i,
            _ => out.push((i, i, k.clone())),
        }
    }
    out
}

/// The order in which a numgen scheduler hands out new connections: smooth
/// weighted round robin (as nginx does), so weights interleave instead of
/// forming blocks — `numgen inc` over weight ranges would send a burst of
/// consecutive connections to one backend.
pub fn schedule(rotation: &[(BackendKey, u64)]) -> Vec<BackendKey> {
    let total: u64 = rotation.iter().map(|(_, w)| *w).sum();
    let weights: Vec<i64> = rotation
        .iter()
        .map(|(_, w)| {
            let scaled = if total > MAX_SLOTS {
                (*w * MAX_SLOTS / total).max(1)
            } else {
                *w
            };
            i64::try_from(scaled).unwrap_or(i64::MAX)
        })
        .collect();
    let sum: i64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut order = Vec::with_capacity(usize::try_from(sum).unwrap_or(0));
    for _ in 0..sum {
        let mut best = 0;
        for i in 0..weights.len() {
            current[i] += weights[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= sum;
        order.push(rotation[best].0.clone());
    }
    order
}

/// `first-last : mark` elements of a scheduler's map.
fn slot_elements(slots: &[(u32, u32, BackendKey)]) -> Vec<String> {
    slots
        .iter()
        .map(|(a, z, k)| {
            if a == z {
                format!("{a} : {:#x}", k.mark())
            } else {
                format!("{a}-{z} : {:#x}", k.mark())
            }
        })
        .collect()
}

/// The table in two parts, so a change of rotation (health, an operator
/// override, loads) or of a farm's backends rewrites only what changed:
/// `structure` is everything but the farms' chains' rules, kept as data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub structure: Structure,
    /// Each NAT farm's chains (`farm_<f>`, `nat_<f>`, `persist_<f>`) and
    /// their rules.
    pub chains: BTreeMap<String, Vec<String>>,
    pub plans: Vec<FarmPlan>,
}

/// What the configuration alone decides, kept as data: comparing it needs
/// no script, and the script is assembled only when it is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Structure {
    /// NAT farms by name.
    farms: BTreeMap<String, FarmShape>,
    /// Direct-server-return farms, IPv4 then IPv6.
    dsr: [DsrTable; 2],
    /// The guard of connections not (yet) known here.
    orphans: Orphans,
}

/// Packets of a TCP connection this node has no conntrack entry for, to a
/// NAT farm's VIP:port or to a SNAT address: a client's or a backend's
/// packet of a connection opened on the peer whose replicated entry is
/// still on its way (a planned handover, a failover in the last
/// milliseconds). Left to the kernel, such a packet is reset by the local
/// stack or (with `nf_conntrack_tcp_loose`) scheduled anew to a backend
/// that resets it; the connection is lost although its entry arrives a
/// moment later. So the first packets of such a flow are dropped for
/// `grace_ms` after it is first seen: their retransmissions find the
/// entry. After the grace the flow is handled as before, so a connection
/// that no replication will bring is still reset, not left hanging. IPVS
/// does the same without `sloppy_tcp`: no connection, no forwarding of a
/// non-SYN.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Orphans {
    grace_ms: u32,
    /// Per family (IPv4, IPv6): `addr . port` of the VIPs, and the SNAT
    /// addresses.
    vips: [BTreeSet<String>; 2],
    snat: [BTreeSet<String>; 2],
}

/// Flows remembered per family while in grace or after it: a flood of
/// orphan packets beyond this is handled by the kernel as before.
pub const ORPHAN_FLOWS: u32 = 65_536;
/// How long a flow past its grace stays remembered after its last packet.
const ORPHAN_SEEN_S: u32 = 60;
/// The named counter of the orphan packets held back.
pub const ORPHAN_COUNTER: &str = "orphans_held";

impl Orphans {
    fn active(&self) -> bool {
        self.grace_ms > 0 && (0..2).any(|i| !self.vips[i].is_empty() || !self.snat[i].is_empty())
    }

    fn render(&self, values: &HashMap<String, Count>, out: &mut String) {
        if !self.active() {
            return;
        }
        counter_decl(out, ORPHAN_COUNTER, values);
        let mut rules = vec![
            "ct state established,related,untracked return".to_owned(),
            "meta l4proto != tcp return".to_owned(),
            "ct state new tcp flags & (fin | syn | rst | ack) == syn return".to_owned(),
        ];
        let mut chains = String::new();
        for (i, (fam, ty)) in [("ip", "ipv4_addr"), ("ip6", "ipv6_addr")]
            .into_iter()
            .enumerate()
        {
            if self.vips[i].is_empty() && self.snat[i].is_empty() {
                continue;
            }
            let key = format!("{fam} saddr . tcp sport . {fam} daddr . tcp dport");
            let flow = format!("{ty} . inet_service . {ty} . inet_service");
            let _ = writeln!(
                out,
                "  set orphan_grace_{fam} {{\n    type {flow}\n    size {ORPHAN_FLOWS}\n    flags dynamic,timeout\n    timeout {}ms\n  }}",
                self.grace_ms
            );
            let _ = writeln!(
                out,
                "  set orphan_seen_{fam} {{\n    type {flow}\n    size {ORPHAN_FLOWS}\n    flags dynamic,timeout\n    timeout {ORPHAN_SEEN_S}s\n  }}"
            );
            if !self.vips[i].is_empty() {
                let _ = writeln!(
                    out,
                    "  set orphan_vips_{fam} {{\n    type {ty} . inet_service\n    flags interval\n    elements = {{ {} }}\n  }}",
                    self.vips[i]
                        .iter()
                        .map(String::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                rules.push(format!(
                    "{fam} daddr . tcp dport @orphan_vips_{fam} goto orphan_{fam}"
                ));
            }
            if !self.snat[i].is_empty() {
                let elems: Vec<String> = self.snat[i].iter().cloned().collect();
                named_map(out, "set", &format!("orphan_snat_{fam}"), ty, &elems);
                rules.push(format!("{fam} daddr @orphan_snat_{fam} goto orphan_{fam}"));
            }
            let _ = writeln!(
                chains,
                "  chain orphan_{fam} {{\n    {key} @orphan_grace_{fam} counter name {ORPHAN_COUNTER} drop\n    {key} != @orphan_seen_{fam} add @orphan_seen_{fam} {{ {key} }} add @orphan_grace_{fam} {{ {key} }} counter name {ORPHAN_COUNTER} drop\n    update @orphan_seen_{fam} {{ {key} }}\n  }}"
            );
        }
        let _ = writeln!(
            out,
            "  chain orphans {{\n    type filter hook prerouting priority mangle; policy accept;"
        );
        for r in rules {
            let _ = writeln!(out, "    {r}");
        }
        let _ = writeln!(out, "  }}");
        out.push_str(&chains);
    }
}

/// A NAT farm's part of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FarmShape {
    /// Its rules in the hook chains, its own objects (timeout policies, the
    /// persistence map), its chains and the key type of its maps: what an
    /// update in place cannot change.
    raw: String,
    pre: String,
    post: String,
    decl: String,
    chains: Vec<String>,
    addr_ty: &'static str,
    /// A firewall-mark farm SNATs by the marks of its members.
    by_mark: bool,
    /// Connection caps (mark, most connections): the kernel's own count in
    /// the dynamic set `live_<f>` keeps each elements' cap from its
    /// creation, so a change of caps recreates the set.
    caps: Vec<(u32, u64)>,
    /// Its configured backends (and sorry server) by mark: elements of the
    /// named maps.
    backends: BTreeMap<u32, ShapeBackend>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ShapeBackend {
    /// Counter objects: packets/bytes each way, new connections.
    in_counter: String,
    out_counter: String,
    conn_counter: String,
    /// DNAT target: `addr . port`, or `addr` alone to keep the client's port.
    target: String,
    ported: bool,
}

impl FarmShape {
    fn map_declarations(&self, name: &str, out: &mut String) {
        let elems = |f: &dyn Fn(&u32, &ShapeBackend) -> Option<String>| -> Vec<String> {
            self.backends.iter().filter_map(|(m, b)| f(m, b)).collect()
        };
        let addr_ty = self.addr_ty;
        named_map(
            out,
            "map",
            &format!("dnat_{name}"),
            &format!("mark : {addr_ty} . inet_service"),
            &elems(&|m, b| b.ported.then(|| format!("{m:#x} : {}", b.target))),
        );
        named_map(
            out,
            "set",
            &format!("ported_{name}"),
            "mark",
            &elems(&|m, b| b.ported.then(|| format!("{m:#x}"))),
        );
        named_map(
            out,
            "map",
            &format!("keep_{name}"),
            &format!("mark : {addr_ty}"),
            &elems(&|m, b| (!b.ported).then(|| format!("{m:#x} : {}", b.target))),
        );
        named_map(
            out,
            "map",
            &format!("conn_{name}"),
            "mark : counter",
            &elems(&|m, b| Some(format!("{m:#x} : {}", b.conn_counter))),
        );
        if self.by_mark {
            named_map(
                out,
                "set",
                &format!("members_{name}"),
                "mark",
                &elems(&|m, _| Some(format!("{m:#x}"))),
            );
        }
    }

    /// Statements bringing the farm's maps and counters from `old` to this
    /// shape: elements and counters of backends that left are deleted
    /// (elements first: they reference the counters), those of new ones
    /// added. Backends that stay keep their counters.
    fn update_from(&self, name: &str, old: &FarmShape, out: &mut String) {
        let t = format!("{FAMILY} {TABLE}");
        for (m, b) in &old.backends {
            if self.backends.get(m) == Some(b) {
                continue;
            }
            let map = if b.ported { "dnat" } else { "keep" };
            let _ = writeln!(out, "delete element {t} {map}_{name} {{ {m:#x} }}");
            if b.ported {
                let _ = writeln!(out, "delete element {t} ported_{name} {{ {m:#x} }}");
            }
            let _ = writeln!(out, "delete element {t} conn_{name} {{ {m:#x} }}");
            if self.by_mark {
                let _ = writeln!(out, "delete element {t} members_{name} {{ {m:#x} }}");
            }
            let _ = writeln!(
                out,
                "delete element {t} count_backend {{ {m:#x} . original, {m:#x} . reply }}"
            );
            for c in [&b.in_counter, &b.out_counter, &b.conn_counter] {
                let _ = writeln!(out, "delete counter {t} {c}");
            }
        }
        for (m, b) in &self.backends {
            if old.backends.get(m) == Some(b) {
                continue;
            }
            for c in [&b.in_counter, &b.out_counter, &b.conn_counter] {
                let _ = writeln!(out, "add counter {t} {c}");
            }
            let map = if b.ported { "dnat" } else { "keep" };
            let _ = writeln!(
                out,
                "add element {t} {map}_{name} {{ {m:#x} : {} }}",
                b.target
            );
            if b.ported {
                let _ = writeln!(out, "add element {t} ported_{name} {{ {m:#x} }}");
            }
            let _ = writeln!(
                out,
                "add element {t} conn_{name} {{ {m:#x} : {} }}",
                b.conn_counter
            );
            if self.by_mark {
                let _ = writeln!(out, "add element {t} members_{name} {{ {m:#x} }}");
            }
            let _ = writeln!(
                out,
                "add element {t} count_backend {{ {m:#x} . original : {}, {m:#x} . reply : {} }}",
                b.in_counter, b.out_counter
            );
        }
    }
}

impl Structure {
    /// Whether a table of shape `old` can be brought to this one in place:
    /// the same farms with the same matches, SNAT, objects and chains, and
    /// the same DSR tables. Backends may differ.
    pub fn updatable_from(&self, old: &Structure) -> bool {
        self.dsr == old.dsr
            && self.orphans == old.orphans
            && self.farms.len() == old.farms.len()
            && self.farms.iter().zip(&old.farms).all(|((n, a), (o, b))| {
                n == o
                    && a.raw == b.raw
                    && a.pre == b.pre
                    && a.post == b.post
                    && a.decl == b.decl
                    && a.chains == b.chains
                    && a.addr_ty == b.addr_ty
                    && a.by_mark == b.by_mark
                    && a.caps == b.caps
            })
    }
}

/// The companion table of direct-server-return farms, `ip tandem_dsr` or
/// `ip6 tandem_dsr`: nft (1.0.6) has no `dup` in `inet` tables. It is
/// replaced in the same transaction as `inet tandem`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct DsrTable {
    counters: Vec<String>,
    maps: String,
    /// `mark : counter` elements of its count_backend map.
    count: Vec<String>,
    raw: String,
    pre: String,
    chains: String,
}

impl DsrTable {
    fn render(&self, family: &str, values: &HashMap<String, Count>, out: &mut String) {
        // Create-then-delete: removes a DSR table left from before, and is
        // a no-op when there is none.
        let _ = writeln!(
            out,
            "table {family} {DSR_TABLE}\ndelete table {family} {DSR_TABLE}"
        );
        if self.pre.is_empty() {
            return;
        }
        let _ = writeln!(out, "table {family} {DSR_TABLE} {{");
        for c in &self.counters {
            counter_decl(out, c, values);
        }
        out.push_str(&self.maps);
        named_map(out, "map", "count_backend", "mark : counter", &self.count);
        // Untracked: the replies never cross the balancer, and conntrack
        // would judge a one-sided TCP flow invalid.
        let _ = writeln!(
            out,
            "  chain raw {{\n    type filter hook prerouting priority raw; policy accept;\n{}  }}",
            self.raw
        );
        let _ = writeln!(
            out,
            "  chain pre {{\n    type filter hook prerouting priority mangle; policy accept;\n{}  }}",
            self.pre
        );
        out.push_str(&self.chains);
        out.push_str("}\n");
    }
}

fn counter_decl(out: &mut String, name: &str, values: &HashMap<String, Count>) {
    let v = values.get(name).copied().unwrap_or_default();
    let _ = writeln!(
        out,
        "  counter {name} {{\n    packets {} bytes {}\n  }}",
        v.packets, v.bytes
    );
}

impl Rendered {
    /// The complete script replacing the table, with `values` as the
    /// counters' starting values. Create-then-delete makes the delete succeed
    /// on a first load; the whole script is one transaction.
    pub fn full(&self, values: &HashMap<String, Count>) -> String {
        let st = &self.structure;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\ntable {FAMILY} {TABLE} {{"
        );
        for shape in st.farms.values() {
            for b in shape.backends.values() {
                for c in [&b.in_counter, &b.out_counter, &b.conn_counter] {
                    counter_decl(&mut out, c, values);
                }
            }
            out.push_str(&shape.decl);
        }
        let mut count = Vec::new();
        for (name, shape) in &st.farms {
            shape.map_declarations(name, &mut out);
            for (m, b) in &shape.backends {
                count.push(format!("{m:#x} . original : {}", b.in_counter));
                count.push(format!("{m:#x} . reply : {}", b.out_counter));
            }
        }
        named_map(
            &mut out,
            "map",
            "count_backend",
            "mark . ct_dir : counter",
            &count,
        );
        let hook =
            |out: &mut String, chain: &str, kind: &str, body: &dyn Fn(&FarmShape) -> &str| {
                let _ = writeln!(out, "  chain {chain} {{\n    {kind}");
                for shape in st.farms.values() {
                    out.push_str(body(shape));
                }
                let _ = writeln!(out, "  }}");
            };
        st.orphans.render(values, &mut out);
        if st.farms.values().any(|f| !f.raw.is_empty()) {
            hook(
                &mut out,
                "raw",
                "type filter hook prerouting priority raw; policy accept;",
                &|f| &f.raw,
            );
        }
        hook(
            &mut out,
            "prerouting",
            "type nat hook prerouting priority dstnat; policy accept;",
            &|f| &f.pre,
        );
        hook(
            &mut out,
            "postrouting",
            "type nat hook postrouting priority srcnat; policy accept;",
            &|f| &f.post,
        );
        // Every packet of a farm's connections is counted against its
        // backend and direction, found by the connection's mark.
        let _ = writeln!(
            out,
            "  chain forward {{\n    type filter hook forward priority filter; policy accept;"
        );
        if !count.is_empty() {
            let _ = writeln!(out, "    {FORWARD_COUNT}");
        }
        let _ = writeln!(out, "  }}");
        for (chain, rules) in &self.chains {
            let _ = writeln!(out, "  chain {chain} {{");
            for r in rules {
                let _ = writeln!(out, "    {r}");
            }
            let _ = writeln!(out, "  }}");
        }
        out.push_str("}\n");
        st.dsr[0].render("ip", values, &mut out);
        st.dsr[1].render("ip6", values, &mut out);
        out
    }

    /// A script that brings a table rendered as `old` to this one in place:
    /// map elements and counters of backends that came or went, and the
    /// chains whose rules changed. Empty when nothing changed. Only valid
    /// when `self.structure.updatable_from(&old.structure)`.
    pub fn update_from(&self, old: &Rendered) -> String {
        let mut out = String::new();
        let changed: Vec<(&String, &Vec<String>)> = self
            .chains
            .iter()
            .filter(|(c, rules)| old.chains.get(*c) != Some(*rules))
            .collect();
        // Rules go first, so no rule refers to an element about to go.
        for (chain, _) in &changed {
            let _ = writeln!(out, "flush chain {FAMILY} {TABLE} {chain}");
        }
        for (name, shape) in &self.structure.farms {
            if let Some(before) = old.structure.farms.get(name)
                && before.backends != shape.backends
            {
                shape.update_from(name, before, &mut out);
            }
        }
        // Whether forward counts depends on there being backends at all.
        let had = old.structure.farms.values().any(|f| !f.backends.is_empty());
        let has = self
            .structure
            .farms
            .values()
            .any(|f| !f.backends.is_empty());
        if had != has {
            let _ = writeln!(out, "flush chain {FAMILY} {TABLE} forward");
            if has {
                let _ = writeln!(out, "add rule {FAMILY} {TABLE} forward {FORWARD_COUNT}");
            }
        }
        for (chain, rules) in &changed {
            for r in *rules {
                let _ = writeln!(out, "add rule {FAMILY} {TABLE} {chain} {r}");
            }
        }
        out
    }
}

/// The conntrack events a farm's connections report (set on their first
/// packet): their creation, their TCP handshake's end (`assured`: the entry
/// is ESTABLISHED with its reply seen), a UDP flow's first reply, and their
/// end — what replication needs. The TCP state changes in between (SYN_RECV,
/// the closing states) are not reported: the kernel builds no event message
/// for them in the packet path, and conntrack-syncd reads and sends fewer.
fn event_rules(p: Protocol) -> Vec<String> {
    let tcp = "meta l4proto tcp ct event set new,assured,destroy".to_owned();
    let udp = "meta l4proto udp ct event set new,reply,assured,destroy".to_owned();
    match p {
        Protocol::Tcp => vec![tcp],
        Protocol::Udp => vec![udp],
        Protocol::Both => vec![tcp, udp],
    }
}

/// The forward chain's one rule: per backend and direction, O(1).
const FORWARD_COUNT: &str = "counter name ct mark . ct direction map @count_backend";

/// Renders the whole table. Deterministic: the same inputs give the same
/// script on both nodes.
pub fn render(farms: &[Farm], inputs: &Inputs) -> (String, Vec<FarmPlan>) {
    let r = render_parts(farms, inputs);
    (r.full(&inputs.counters), r.plans)
}

/// A map declaration; `elements` may be empty.
fn named_map(out: &mut String, kind: &str, name: &str, ty: &str, elements: &[String]) {
    let _ = writeln!(out, "  {kind} {name} {{\n    type {ty}");
    if !elements.is_empty() {
        let _ = writeln!(out, "    elements = {{ {} }}", elements.join(", "));
    }
    let _ = writeln!(out, "  }}");
}

/// The most connections each backend may hold: its upper threshold, and
/// under `ovf` its weight (the smaller of the two).
fn caps(farm: &Farm) -> Vec<(u32, u64)> {
    if farm.forwarding != Forwarding::Nat {
        return Vec::new();
    }
    let mut out: Vec<(u32, u64)> = farm
        .backends
        .iter()
        .filter_map(|b| {
            let ovf = (farm.scheduler == Scheduler::Ovf).then_some(u64::from(b.weight));
            let cap = match (b.upper_threshold.map(u64::from), ovf) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            cap.map(|c| (BackendKey::of(farm, b).mark(), c))
        })
        .collect();
    out.sort();
    out
}

/// The statements that replace a persistent farm's map with `seeds`
/// (client, masked → backend mark), each for the farm's whole timeout: what
/// a node that does not hold the VIP derives from the connections its peer
/// replicated, so the clients keep their backends after a failover.
pub fn persistence_seed_script(farm: &Farm, seeds: &[(IpAddr, u32)], timeout_s: u32) -> String {
    let mut out = format!("flush map {FAMILY} {TABLE} persist_{}\n", farm.name);
    for chunk in seeds.chunks(1024) {
        let elems: Vec<String> = chunk
            .iter()
            .map(|(a, m)| format!("{a} timeout {timeout_s}s : {m:#x}"))
            .collect();
        let _ = writeln!(
            out,
            "add element {FAMILY} {TABLE} persist_{} {{ {} }}",
            farm.name,
            elems.join(", ")
        );
    }
    out
}

/// The masked client address persistence remembers: `ip saddr` with the
/// farm's persistence netmask applied.
fn persistence_key(farm: &Farm) -> String {
    let fam = family(farm.vip);
    let prefix = farm.persistence_prefix();
    let full = if farm.vip.is_ipv4() { 32 } else { 128 };
    if prefix >= full {
        return format!("{fam} saddr");
    }
    let mask: IpAddr = if farm.vip.is_ipv4() {
        let bits = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
        IpAddr::V4(bits.into())
    } else {
        let bits = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
        IpAddr::V6(bits.into())
    };
    format!("{fam} saddr and {mask}")
}

/// The `ct timeout` objects of a farm and the rules that attach them to
/// its new connections: (declarations, rules).
fn timeout_policies(farm: &Farm) -> (String, Vec<String>) {
    let t = &farm.timeouts;
    let l3 = family(farm.vip);
    let name = &farm.name;
    let mut decl = String::new();
    let mut rules = Vec::new();
    if farm.protocol.has_tcp() && (t.tcp_s.is_some() || t.tcp_fin_s.is_some()) {
        let mut policy = Vec::new();
        if let Some(s) = t.tcp_s {
            policy.push(format!("established : {s}"));
        }
        if let Some(s) = t.tcp_fin_s {
            for state in ["fin_wait", "close_wait", "last_ack", "time_wait"] {
                policy.push(format!("{state} : {s}"));
            }
        }
        let _ = writeln!(
            decl,
            "  ct timeout timeouts_{name}_tcp {{\n    protocol tcp; l3proto {l3};\n    policy = {{ {} }}\n  }}",
            policy.join(", ")
        );
        rules.push(format!(
            "meta l4proto tcp ct timeout set \"timeouts_{name}_tcp\""
        ));
    }
    if farm.protocol != Protocol::Tcp
        && let Some(s) = t.udp_s
    {
        let _ = writeln!(
            decl,
            "  ct timeout timeouts_{name}_udp {{\n    protocol udp; l3proto {l3};\n    policy = {{ unreplied : {s}, replied : {s} }}\n  }}"
        );
        rules.push(format!(
            "meta l4proto udp ct timeout set \"timeouts_{name}_udp\""
        ));
    }
    (decl, rules)
}

pub fn render_parts(farms: &[Farm], inputs: &Inputs) -> Rendered {
    let mut plans = Vec::new();
    let mut shapes: BTreeMap<String, FarmShape> = BTreeMap::new();
    let mut chains: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut dsr: [DsrTable; 2] = Default::default();
    let mut orphans = Orphans {
        grace_ms: inputs.orphan_grace_ms,
        ..Orphans::default()
    };

    for farm in farms {
        let (plan, pick) = plan_and_pick(farm, inputs);
        if farm.forwarding == Forwarding::Dsr {
            let table = &mut dsr[usize::from(farm.vip.is_ipv6())];
            render_dsr(farm, &pick, inputs.hash_seed, table);
            plans.push(plan);
            continue;
        }
        let name = &farm.name;
        let fam = family(farm.vip);
        let proto = l4(farm.protocol);
        if farm.protocol != Protocol::Udp {
            let i = usize::from(farm.vip.is_ipv6());
            if farm.fwmark.is_none() {
                orphans.vips[i].insert(format!("{} . {}", farm.vip, farm.port));
            }
            if let Some(snat) = farm.snat_address {
                orphans.snat[usize::from(snat.is_ipv6())].insert(snat.to_string());
            }
        }
        let vip_match = format!(
            "{fam} daddr {} meta l4proto {proto} th dport {}",
            farm.vip, farm.port
        );
        let (mut decl, timeout_rules) = timeout_policies(farm);
        let persistent = farm.persistence_timeout_s.is_some();
        if let Some(t) = farm.persistence_timeout_s {
            let _ = writeln!(
                decl,
                "  map persist_{name} {{\n    type {} : mark\n    size {PERSISTENCE_ENTRIES}\n    flags dynamic,timeout\n    timeout {t}s\n  }}",
                addr_type(farm.vip)
            );
        }
        if !caps(farm).is_empty() {
            let _ = writeln!(
                decl,
                "  set live_{name} {{\n    type mark\n    flags dynamic\n  }}"
            );
        }
        let mut farm_chains = vec![format!("farm_{name}"), format!("nat_{name}")];
        if persistent {
            farm_chains.push(format!("persist_{name}"));
        }
        farm_chains.sort();
        let mut shape = FarmShape {
            // One-packet scheduling: a conntrack zone per datagram (the
            // original direction only; replies find their entry by the
            // reply tuple, made unique by SNAT), so every datagram is a new
            // connection that the scheduler sees.
            raw: if farm.one_packet {
                format!("    {vip_match} ct original zone set numgen inc mod 65535\n")
            } else {
                String::new()
            },
            pre: match farm.fwmark {
                Some(m) => format!(
                    "    meta nfproto {} meta mark {m:#x} meta l4proto {proto} jump farm_{name}\n",
                    if farm.vip.is_ipv4() { "ipv4" } else { "ipv6" }
                ),
                None => format!("    {vip_match} jump farm_{name}\n"),
            },
            post: farm.snat_address.map_or_else(String::new, |snat| match farm.fwmark {
                Some(_) => format!(
                    "    ct status dnat meta nfproto {} ct mark @members_{name} snat {fam} to {snat}\n",
                    if farm.vip.is_ipv4() { "ipv4" } else { "ipv6" }
                ),
                None => format!(
                    "    ct status dnat meta l4proto {proto} ct original {fam} daddr {} ct original proto-dst {} snat {fam} to {snat}\n",
                    farm.vip, farm.port
                ),
            }),
            decl,
            chains: farm_chains,
            addr_ty: addr_type(farm.vip),
            by_mark: farm.fwmark.is_some(),
            caps: caps(farm),
            backends: BTreeMap::new(),
        };
        // What depends on the configured backends only: their counters and
        // DNAT targets. Draining backends keep counting their established
        // connections.
        let members = farm
            .backends
            .iter()
            .map(|b| (BackendKey::of(farm, b), b.port))
            .chain(
                BackendKey::sorry(farm)
                    .into_iter()
                    .map(|k| (k.clone(), k.port)),
            );
        for (key, port) in members {
            shape.backends.insert(
                key.mark(),
                ShapeBackend {
                    in_counter: backend_in_counter(&key),
                    out_counter: backend_out_counter(&key),
                    conn_counter: backend_conn_counter(&key),
                    target: match port {
                        Some(p) => format!("{} . {p}", key.address),
                        None => key.address.to_string(),
                    },
                    ported: port.is_some(),
                },
            );
        }
        let any_ported = shape.backends.values().any(|b| b.ported);
        let any_kept = shape.backends.values().any(|b| !b.ported);

        // farm_<f>: timeouts, then a persistent client's backend, then the
        // scheduler's, then the sorry server; each success jumps to nat_<f>.
        let mut rules = event_rules(farm.protocol);
        rules.extend(timeout_rules);
        let then = if persistent {
            format!("persist_{name}")
        } else {
            format!("nat_{name}")
        };
        if persistent && !plan.rotation.is_empty() {
            let usable: Vec<String> = plan
                .rotation
                .iter()
                .map(|(k, _)| format!("{:#x}", k.mark()))
                .collect();
            rules.push(format!(
                "ct mark set {} map @persist_{name} ct mark {{ {} }} goto persist_{name}",
                persistence_key(farm),
                usable.join(", ")
            ));
        }
        match &pick {
            Pick::Nothing => {}
            Pick::Cycle(order) => {
                let slots = ranges(order);
                rules.push(format!(
                    "ct mark set numgen inc mod {} map {{ {} }} goto {then}",
                    order.len(),
                    slot_elements(&slots).join(", ")
                ));
            }
            Pick::Finite(order) => {
                // Rewritten at every refresh of the loads, so the counter
                // starts again at 0 from the new loads.
                rules.push(format!(
                    "ct mark set numgen inc mod {FINITE_MODULUS} map {{ {} }} goto {then} comment \"refresh {}\"",
                    slot_elements(&ranges(order)).join(", "),
                    inputs.refresh
                ));
            }
            Pick::Hash { key, owners } => {
                rules.push(format!(
                    "ct mark set jhash {key} mod {} seed {:#x} map {{ {} }} goto {then}",
                    owners.len(),
                    inputs.hash_seed,
                    slot_elements(&ranges(owners)).join(", ")
                ));
            }
        }
        match BackendKey::sorry(farm) {
            Some(k) => rules.push(format!(
                "ct mark set {:#x} goto nat_{name} comment \"sorry server: no backend can take the connection\"",
                k.mark()
            )),
            None => rules.push(if plan.rotation.is_empty() {
                "drop comment \"every backend is out of rotation\"".to_owned()
            } else {
                "drop comment \"every backend is full\"".to_owned()
            }),
        }
        chains.insert(format!("farm_{name}"), rules);
        if persistent {
            chains.insert(
                format!("persist_{name}"),
                vec![
                    format!(
                        "update @persist_{name} {{ {} : ct mark }}",
                        persistence_key(farm)
                    ),
                    format!("goto nat_{name}"),
                ],
            );
        }
        // nat_<f>: count the connection, then DNAT it. A port in a DNAT
        // target needs a transport match in the rule.
        // A backend at its cap (upper threshold; ovf: its weight) takes no
        // connection beyond it, whatever the schedule says: the kernel
        // counts its open connections (nf_conncount) and drops the first
        // packet of one more — the client resends its SYN a second later
        // and finds the schedule refreshed. The schedule keeps this rare:
        // it gives a backend only the room its loads leave.
        let mut nat: Vec<String> = shape
            .caps
            .iter()
            .map(|(m, cap)| {
                format!(
                    "ct mark {m:#x} add @live_{name} {{ ct mark ct count over {cap} }} drop comment \"at its connection limit\""
                )
            })
            .collect();
        nat.push(format!("counter name ct mark map @conn_{name}"));
        if any_ported {
            nat.push(format!(
                "ct mark @ported_{name} meta l4proto {proto} dnat {fam} to ct mark map @dnat_{name}"
            ));
        }
        if any_kept {
            nat.push(format!("dnat {fam} to ct mark map @keep_{name}"));
        }
        chains.insert(format!("nat_{name}"), nat);
        shapes.insert(name.clone(), shape);
        plans.push(plan);
    }

    Rendered {
        structure: Structure {
            farms: shapes,
            dsr,
            orphans,
        },
        chains,
        plans,
    }
}

/// A direct-server-return farm: packets to the VIP are left untracked,
/// hashed to a backend (the source address under `sh` and `mh`, the
/// destination under `dh`, source address and port otherwise) and sent to
/// it unchanged — destination still the VIP, which the backend holds on a
/// non-ARPing interface — with `dup to` (a copy routed to the backend as
/// next hop) and the original dropped. Stateless on the balancer: with the
/// cluster's shared seed both nodes pick the same backend for a flow, so a
/// failover needs no replicated state.
fn render_dsr(farm: &Farm, pick: &Pick, seed: u32, t: &mut DsrTable) {
    let name = &farm.name;
    let fam = family(farm.vip);
    let matcher = format!(
        "{fam} daddr {} meta l4proto {} th dport {}",
        farm.vip,
        l4(farm.protocol),
        farm.port
    );
    let _ = writeln!(t.raw, "    {matcher} notrack");
    let _ = writeln!(t.pre, "    {matcher} jump farm_{name}");
    let mut backends: Vec<&Backend> = farm.backends.iter().collect();
    backends.sort_by_key(|b| (b.address, b.port));
    let mut targets = Vec::new();
    for b in &backends {
        let key = BackendKey::of(farm, b);
        let m = key.mark();
        let c = backend_in_counter(&key);
        t.counters.push(c.clone());
        t.count.push(format!("{m:#x} : {c}"));
        targets.push(format!("{m:#x} : {}", b.address));
    }
    named_map(
        &mut t.maps,
        "map",
        &format!("dsr_{name}"),
        &format!("mark : {}", addr_type(farm.vip)),
        &targets,
    );
    let _ = writeln!(t.chains, "  chain farm_{name} {{");
    match pick {
        Pick::Hash { key, owners } if !owners.is_empty() => {
            let key = match farm.scheduler {
                Scheduler::Rr | Scheduler::Wrr => format!("{fam} saddr . th sport"),
                _ => key.clone(),
            };
            let _ = writeln!(
                t.chains,
                "    meta mark set jhash {key} mod {} seed {:#x} map {{ {} }}",
                owners.len(),
                seed,
                slot_elements(&ranges(owners)).join(", ")
            );
            let _ = writeln!(t.chains, "    counter name meta mark map @count_backend");
            let _ = writeln!(t.chains, "    dup to meta mark map @dsr_{name}");
            let _ = writeln!(t.chains, "    drop");
        }
        _ => {
            let _ = writeln!(
                t.chains,
                "    drop comment \"every backend is out of rotation\""
            );
        }
    }
    let _ = writeln!(t.chains, "  }}");
}
