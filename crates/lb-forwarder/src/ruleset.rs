//! The kernel datapath as a pure function: farms, health and loads in, one
//! nftables script out. The script replaces Tandem's table `inet tandem` in
//! a single transaction (`nft -f`), so a change is never half-applied and no
//! other table is touched.
//!
//! Shape of the table:
//! - `prerouting` (nat): a packet to a farm's VIP:port/proto jumps to the
//!   farm's chain, whose scheduler sets the connection's conntrack mark to
//!   the chosen backend's id (`numgen`/`jhash` through a map); maps keyed by
//!   that mark then count the connection and DNAT it. Only a connection's
//!   first packet goes through nat chains; conntrack does the rest. There
//!   are no per-backend chains, so a farm of 1,000 backends stays a handful
//!   of rules.
//! - `postrouting` (nat): NAT farms SNAT toward the backends to their
//!   floating `snat_address`, so backends answer whichever node holds it.
//! - `forward` (filter): an object-reference map keyed by `ct mark` counts
//!   every packet of a connection, both directions, per backend, in O(1);
//!   a farm's totals are the sum of its backends'.
//!
//! Counters are named objects; the caller passes their current values so a
//! replacement carries them over.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::IpAddr;

use tandem_config::{Backend, BackendState, Farm, Forwarding, Protocol, Scheduler};

pub const FAMILY: &str = "inet";
pub const TABLE: &str = "tandem";
/// The companion tables of direct-server-return farms (`ip` and `ip6`).
pub const DSR_TABLE: &str = "tandem_dsr";
/// Hash buckets of source-hash farms: backends own contiguous ranges, so
/// when one leaves only its own sources move.
pub const SH_BUCKETS: u32 = 1024;
/// Resolution of least-connections weights.
const LC_SCALE: u64 = 1000;
/// At most this many slots in a numgen schedule; larger weight sums are
/// scaled down proportionally (each backend keeps at least one slot).
pub const MAX_SLOTS: u64 = 4096;

/// One backend of one farm.
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

    /// Name of its counter and chains: readable, and safe inside quotes.
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
}

/// Packet and byte counts of one counter object.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Count {
    pub packets: u64,
    pub bytes: u64,
}

/// Counter object names. A farm's totals are the sum of its backends'
/// (one counter lookup per packet, not two).
pub fn backend_counter(key: &BackendKey) -> String {
    format!("be_{}", key.name())
}

/// New connections sent to a backend (counted in its DNAT chain).
pub fn backend_conn_counter(key: &BackendKey) -> String {
    format!("conn_{}", key.name())
}

/// Everything the datapath depends on besides the farms.
#[derive(Debug, Default)]
pub struct Inputs {
    /// Cluster-wide seed of `sh`'s jhash (nftables draws a random one per
    /// rule load otherwise, and two nodes would disagree).
    pub hash_seed: u32,
    /// Backends the health checks declared failing.
    pub failing: HashSet<BackendKey>,
    /// Operator overrides of a backend's state (SetBackendState), over the
    /// configured one.
    pub overrides: HashMap<BackendKey, BackendState>,
    /// Established connections per backend, for `lc`.
    pub loads: HashMap<BackendKey, u64>,
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
}

/// What a farm's scheduler currently does, for status and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FarmPlan {
    pub farm: String,
    /// (backend, share) in rotation; the shares' meaning depends on the
    /// scheduler (rr: 1 each; wrr/lc: weights; sh: hash buckets).
    pub rotation: Vec<(BackendKey, u64)>,
}

fn l4(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Both => "{ tcp, udp }",
    }
}

fn ports(farm: &Farm) -> String {
    farm.port.to_string()
}

fn family(a: IpAddr) -> &'static str {
    if a.is_ipv4() { "ip" } else { "ip6" }
}

/// How one farm spreads new connections over its backends in rotation.
pub fn plan(farm: &Farm, inputs: &Inputs) -> FarmPlan {
    let mut plan = FarmPlan {
        farm: farm.name.clone(),
        rotation: Vec::new(),
    };
    if farm.forwarding == Forwarding::Dsr {
        // Stateless on the balancer: every packet picks its backend by hash.
        plan.rotation = bucket_shares(&dsr_owners(farm, inputs));
        return plan;
    }
    let mut backends: Vec<&Backend> = farm.backends.iter().collect();
    backends.sort_by_key(|b| (b.address, b.port));
    let up: Vec<(&Backend, BackendKey)> = backends
        .iter()
        .map(|b| (*b, BackendKey::of(farm, b)))
        .filter(|(b, k)| inputs.in_rotation(k, b.state))
        .collect();
    plan.rotation = match farm.scheduler {
        Scheduler::Rr => up.into_iter().map(|(_, k)| (k, 1)).collect(),
        Scheduler::Wrr => up
            .into_iter()
            .map(|(b, k)| (k, u64::from(b.weight)))
            .collect(),
        Scheduler::Lc => {
            // Weight ∝ configured weight / (established connections + 1):
            // new connections go mostly to the least loaded backends, in
            // proportion, until the next load reading (see docs).
            up.into_iter()
                .map(|(b, k)| {
                    let load = inputs.loads.get(&k).copied().unwrap_or(0);
                    let w = (u64::from(b.weight) * LC_SCALE / (load + 1)).max(1);
                    (k, w)
                })
                .collect()
        }
        Scheduler::Sh => sh_buckets(farm, inputs),
    };
    plan
}

/// Source hash: the owner of each of the [`SH_BUCKETS`] buckets.
/// Configured backends own contiguous ranges of buckets; the buckets of a
/// backend out of rotation are dealt out among those in rotation, so every
/// other source keeps its backend. Empty when no backend is in rotation.
pub fn sh_owners(farm: &Farm, inputs: &Inputs) -> Vec<BackendKey> {
    bucket_owners(farm, inputs, false)
}

/// The buckets of a direct-server-return farm: as [`sh_owners`], with home
/// ranges in proportion to the weights under `wrr`.
pub fn dsr_owners(farm: &Farm, inputs: &Inputs) -> Vec<BackendKey> {
    bucket_owners(farm, inputs, farm.scheduler == Scheduler::Wrr)
}

fn bucket_owners(farm: &Farm, inputs: &Inputs, weighted: bool) -> Vec<BackendKey> {
    let mut all: Vec<&Backend> = farm.backends.iter().collect();
    all.sort_by_key(|b| (b.address, b.port));
    let keys: Vec<(BackendKey, bool, u64)> = all
        .iter()
        .map(|b| {
            let k = BackendKey::of(farm, b);
            let up = inputs.in_rotation(&k, b.state);
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

fn sh_buckets(farm: &Farm, inputs: &Inputs) -> Vec<(BackendKey, u64)> {
    bucket_shares(&sh_owners(farm, inputs))
}

fn bucket_shares(owners: &[BackendKey]) -> Vec<(BackendKey, u64)> {
    let mut shares: BTreeMap<BackendKey, u64> = BTreeMap::new();
    for k in owners {
        *shares.entry(k.clone()).or_insert(0) += 1;
    }
    shares.into_iter().collect()
}

/// The bucket → backend ranges of an sh farm, merged where contiguous.
fn sh_ranges(farm: &Farm, inputs: &Inputs) -> Vec<(u32, u32, BackendKey)> {
    bucket_ranges(sh_owners(farm, inputs))
}

fn bucket_ranges(owners: Vec<BackendKey>) -> Vec<(u32, u32, BackendKey)> {
    let mut ranges: Vec<(u32, u32, BackendKey)> = Vec::new();
    for (b, k) in (0..SH_BUCKETS).zip(owners) {
        match ranges.last_mut() {
            Some((_, last, owner)) if *owner == k && *last + 1 == b => *last = b,
            _ => ranges.push((b, b, k)),
        }
    }
    ranges
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

/// Consecutive equal slots of a schedule as (first, last, backend) ranges.
fn merge_slots(order: &[BackendKey]) -> Vec<(u32, u32, BackendKey)> {
    let mut ranges: Vec<(u32, u32, BackendKey)> = Vec::new();
    for (i, k) in order.iter().enumerate() {
        let i = u32::try_from(i).unwrap_or(u32::MAX);
        match ranges.last_mut() {
            Some((_, last, owner)) if owner == k && *last + 1 == i => *last = i,
            _ => ranges.push((i, i, k.clone())),
        }
    }
    ranges
}

/// The table in two parts, so a change of rotation (health, an operator
/// override, lc loads) or of a farm's backends rewrites only what changed:
/// `structure` is everything but the farm chains' rules, kept as data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub structure: Structure,
    /// Each NAT farm chain's rules.
    pub farm_rules: BTreeMap<String, Vec<String>>,
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
}

/// A NAT farm's part of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FarmShape {
    /// Its rules in the prerouting and postrouting hook chains, and the key
    /// type of its maps: what an update in place cannot change.
    pre: String,
    post: String,
    addr_ty: &'static str,
    /// Its configured backends by mark: elements of the named maps.
    backends: BTreeMap<u32, ShapeBackend>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ShapeBackend {
    /// Counter objects: packets/bytes, new connections.
    counter: String,
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
            let _ = writeln!(out, "delete element {t} count_backend {{ {m:#x} }}");
            let _ = writeln!(out, "delete counter {t} {}", b.counter);
            let _ = writeln!(out, "delete counter {t} {}", b.conn_counter);
        }
        for (m, b) in &self.backends {
            if old.backends.get(m) == Some(b) {
                continue;
            }
            let _ = writeln!(out, "add counter {t} {}", b.counter);
            let _ = writeln!(out, "add counter {t} {}", b.conn_counter);
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
            let _ = writeln!(
                out,
                "add element {t} count_backend {{ {m:#x} : {} }}",
                b.counter
            );
        }
    }
}

impl Structure {
    /// Whether a table of shape `old` can be brought to this one in place:
    /// the same farms with the same VIPs, ports, protocols and SNAT, and the
    /// same DSR tables. Backends may differ.
    pub fn updatable_from(&self, old: &Structure) -> bool {
        self.dsr == old.dsr
            && self.farms.len() == old.farms.len()
            && self.farms.iter().zip(&old.farms).all(|((n, a), (o, b))| {
                n == o && a.pre == b.pre && a.post == b.post && a.addr_ty == b.addr_ty
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
            let v = values.get(c).copied().unwrap_or_default();
            let _ = writeln!(
                out,
                "  counter {c} {{\n    packets {} bytes {}\n  }}",
                v.packets, v.bytes
            );
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
                for c in [&b.counter, &b.conn_counter] {
                    let v = values.get(c).copied().unwrap_or_default();
                    let _ = writeln!(
                        out,
                        "  counter {c} {{\n    packets {} bytes {}\n  }}",
                        v.packets, v.bytes
                    );
                }
            }
        }
        let mut count = Vec::new();
        for (name, shape) in &st.farms {
            shape.map_declarations(name, &mut out);
            count.extend(
                shape
                    .backends
                    .iter()
                    .map(|(m, b)| format!("{m:#x} : {}", b.counter)),
            );
        }
        named_map(&mut out, "map", "count_backend", "mark : counter", &count);
        let hook =
            |out: &mut String, chain: &str, kind: &str, body: &dyn Fn(&FarmShape) -> &str| {
                let _ = writeln!(out, "  chain {chain} {{\n    {kind}");
                for shape in st.farms.values() {
                    out.push_str(body(shape));
                }
                let _ = writeln!(out, "  }}");
            };
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
        // Every packet of a farm's connections, both directions, is counted
        // against its backend, found by the connection's mark.
        let _ = writeln!(
            out,
            "  chain forward {{\n    type filter hook forward priority filter; policy accept;"
        );
        if !count.is_empty() {
            let _ = writeln!(out, "    counter name ct mark map @count_backend");
        }
        let _ = writeln!(out, "  }}");
        for (farm, rules) in &self.farm_rules {
            let _ = writeln!(out, "  chain farm_{farm} {{");
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
    /// farm chains whose rules changed. Empty when nothing changed. Only
    /// valid when `self.structure.updatable_from(&old.structure)`.
    pub fn update_from(&self, old: &Rendered) -> String {
        let mut out = String::new();
        for (farm, rules) in &self.farm_rules {
            if old.farm_rules.get(farm) == Some(rules) {
                continue;
            }
            let _ = writeln!(out, "flush chain {FAMILY} {TABLE} farm_{farm}");
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
                let _ = writeln!(
                    out,
                    "add rule {FAMILY} {TABLE} forward counter name ct mark map @count_backend"
                );
            }
        }
        for (farm, rules) in &self.farm_rules {
            if old.farm_rules.get(farm) == Some(rules) {
                continue;
            }
            for r in rules {
                let _ = writeln!(out, "add rule {FAMILY} {TABLE} farm_{farm} {r}");
            }
        }
        out
    }
}

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

pub fn render_parts(farms: &[Farm], inputs: &Inputs) -> Rendered {
    let mut plans = Vec::new();
    let mut shapes: BTreeMap<String, FarmShape> = BTreeMap::new();
    let mut farm_rules: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut dsr: [DsrTable; 2] = Default::default();

    for farm in farms {
        let plan = plan(farm, inputs);
        if farm.forwarding == Forwarding::Dsr {
            let table = &mut dsr[usize::from(farm.vip.is_ipv6())];
            render_dsr(farm, &plan, inputs, table);
            plans.push(plan);
            continue;
        }
        let name = &farm.name;
        let fam = family(farm.vip);
        let proto = l4(farm.protocol);
        let mut shape = FarmShape {
            pre: format!(
                "    {fam} daddr {} meta l4proto {proto} th dport {} jump farm_{name}\n",
                farm.vip,
                ports(farm)
            ),
            post: farm.snat_address.map_or_else(String::new, |snat| {
                format!(
                    "    ct status dnat meta l4proto {proto} ct original {fam} daddr {} ct original proto-dst {} snat {fam} to {snat}\n",
                    farm.vip,
                    ports(farm)
                )
            }),
            addr_ty: if farm.vip.is_ipv4() {
                "ipv4_addr"
            } else {
                "ipv6_addr"
            },
            backends: BTreeMap::new(),
        };
        // What depends on the configured backends only: their counters and
        // DNAT targets. Draining backends keep counting their established
        // connections.
        for b in &farm.backends {
            let key = BackendKey::of(farm, b);
            shape.backends.insert(
                key.mark(),
                ShapeBackend {
                    counter: backend_counter(&key),
                    conn_counter: backend_conn_counter(&key),
                    target: match b.port {
                        Some(p) => format!("{} . {p}", b.address),
                        None => b.address.to_string(),
                    },
                    ported: b.port.is_some(),
                },
            );
        }
        let any_ported = shape.backends.values().any(|b| b.ported);
        let any_kept = shape.backends.values().any(|b| !b.ported);

        // What the rotation decides: the scheduler sets the connection's
        // mark; the named maps, keyed by it, count and DNAT.
        let mut rules = Vec::new();
        if plan.rotation.is_empty() {
            rules.push("drop comment \"every backend is out of rotation\"".to_owned());
        } else {
            let slots: Vec<(u32, u32, BackendKey)> = match farm.scheduler {
                Scheduler::Sh => sh_ranges(farm, inputs),
                _ => merge_slots(&schedule(&plan.rotation)),
            };
            let elems = slot_elements(&slots);
            rules.push(match farm.scheduler {
                Scheduler::Sh => format!(
                    "ct mark set jhash {fam} saddr mod {SH_BUCKETS} seed {:#x} map {{ {} }}",
                    inputs.hash_seed,
                    elems.join(", ")
                ),
                _ => {
                    let n = slots.last().map_or(0, |(_, z, _)| z + 1);
                    format!(
                        "ct mark set numgen inc mod {n} map {{ {} }}",
                        elems.join(", ")
                    )
                }
            });
            rules.push(format!("counter name ct mark map @conn_{name}"));
            // A port in a DNAT target needs a transport match in the rule.
            if any_ported {
                rules.push(format!("ct mark @ported_{name} meta l4proto {proto} dnat {fam} to ct mark map @dnat_{name}"));
            }
            if any_kept {
                rules.push(format!("dnat {fam} to ct mark map @keep_{name}"));
            }
        }
        farm_rules.insert(name.clone(), rules);
        shapes.insert(name.clone(), shape);
        plans.push(plan);
    }

    Rendered {
        structure: Structure { farms: shapes, dsr },
        farm_rules,
        plans,
    }
}

/// A direct-server-return farm: packets to the VIP are left untracked,
/// hashed to a backend (the source address under `sh`, source address and
/// port otherwise) and sent to it unchanged — destination still the VIP,
/// which the backend holds on a non-ARPing interface — with `dup to`
/// (a copy routed to the backend as next hop) and the original dropped.
/// Stateless on the balancer: with the cluster's shared seed both nodes
/// pick the same backend for a flow, so a failover needs no replicated
/// state.
fn render_dsr(farm: &Farm, plan: &FarmPlan, inputs: &Inputs, t: &mut DsrTable) {
    let name = &farm.name;
    let fam = family(farm.vip);
    let addr_ty = if farm.vip.is_ipv4() {
        "ipv4_addr"
    } else {
        "ipv6_addr"
    };
    let matcher = format!(
        "{fam} daddr {} meta l4proto {} th dport {}",
        farm.vip,
        l4(farm.protocol),
        ports(farm)
    );
    let _ = writeln!(t.raw, "    {matcher} notrack");
    let _ = writeln!(t.pre, "    {matcher} jump farm_{name}");
    let mut backends: Vec<&Backend> = farm.backends.iter().collect();
    backends.sort_by_key(|b| (b.address, b.port));
    let mut targets = Vec::new();
    for b in &backends {
        let key = BackendKey::of(farm, b);
        let m = key.mark();
        let bc = backend_counter(&key);
        t.counters.push(bc.clone());
        t.count.push(format!("{m:#x} : {bc}"));
        targets.push(format!("{m:#x} : {}", b.address));
    }
    named_map(
        &mut t.maps,
        "map",
        &format!("dsr_{name}"),
        &format!("mark : {addr_ty}"),
        &targets,
    );
    let _ = writeln!(t.chains, "  chain farm_{name} {{");
    if plan.rotation.is_empty() {
        let _ = writeln!(
            t.chains,
            "    drop comment \"every backend is out of rotation\""
        );
    } else {
        let key = match farm.scheduler {
            Scheduler::Sh => format!("{fam} saddr"),
            _ => format!("{fam} saddr . th sport"),
        };
        let elems = slot_elements(&bucket_ranges(dsr_owners(farm, inputs)));
        let _ = writeln!(
            t.chains,
            "    meta mark set jhash {key} mod {SH_BUCKETS} seed {:#x} map {{ {} }}",
            inputs.hash_seed,
            elems.join(", ")
        );
        let _ = writeln!(t.chains, "    counter name meta mark map @count_backend");
        let _ = writeln!(t.chains, "    dup to meta mark map @dsr_{name}");
        let _ = writeln!(t.chains, "    drop");
    }
    let _ = writeln!(t.chains, "  }}");
}
