//! Keeps the kernel datapath equal to what configuration, health, operator
//! overrides and connection loads ask for. Re-renders on every change and
//! applies only when the rules differ; counters are carried over.
//! On shutdown the table stays: the kernel keeps serving without us
//! (DESIGN.md, "the fast path stays short").
//!
//! Once a second, when a farm needs it, it also reads the connection table:
//! loads for the load-aware schedulers and thresholds, and — on a node that
//! does not hold a persistent farm's VIP — the persistence entries derived
//! from the replicated connections, so that a failover finds them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tandem_config::{BackendState, Farm, OnBackendFailure};
use tandem_runtime::{ConfigCell, Shutdown};
use tokio::sync::{Notify, broadcast, watch};

use crate::conns;
use crate::nft;
use crate::ruleset::{self, BackendKey, FarmPlan, Inputs};
use crate::sched::{self, Load, Thresholds};

/// How often loads are re-read (and persistence derived on a backup).
pub const LC_REFRESH: Duration = Duration::from_secs(1);

/// What the datapath currently is, for Status and the farm RPCs.
#[derive(Debug, Clone, Default)]
pub struct DatapathState {
    /// The table in the kernel matches the configuration in force.
    pub loaded: bool,
    pub loaded_at: Option<SystemTime>,
    /// How long the last apply took (render + nft).
    pub last_apply: Duration,
    pub applies: u64,
    pub last_error: Option<String>,
    pub plans: Vec<FarmPlan>,
    pub failing: HashSet<BackendKey>,
    pub overrides: HashMap<BackendKey, BackendState>,
    /// The connection counts of the last refresh (farms that need them).
    pub loads: HashMap<BackendKey, Load>,
    pub overloaded: HashSet<BackendKey>,
}

/// A backend entering or leaving the rotation (or a sorry server starting
/// or stopping to answer), for WatchBackends and the hooks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendEvent {
    pub key: BackendKey,
    /// The farm's sorry server rather than a backend.
    pub sorry: bool,
    pub in_rotation: bool,
    pub state: BackendState,
    pub failing: bool,
    pub overloaded: bool,
    /// Why, in words.
    pub reason: String,
    pub at: SystemTime,
}

pub struct Datapath {
    pub state: watch::Sender<DatapathState>,
    pub events: broadcast::Sender<BackendEvent>,
    overrides: Mutex<HashMap<BackendKey, BackendState>>,
    kick: Notify,
}

impl Datapath {
    pub fn new() -> Arc<Self> {
        Arc::new(Datapath {
            state: watch::channel(DatapathState::default()).0,
            events: broadcast::channel(1024).0,
            overrides: Mutex::new(HashMap::new()),
            kick: Notify::new(),
        })
    }

    /// An operator override of a backend's state; applied at once. `None`
    /// returns the backend to its configured state.
    pub fn set_override(&self, key: BackendKey, state: Option<BackendState>) {
        if let Ok(mut o) = self.overrides.lock() {
            match state {
                Some(s) => o.insert(key, s),
                None => o.remove(&key),
            };
        }
        self.kick.notify_one();
    }

    fn overrides(&self) -> HashMap<BackendKey, BackendState> {
        self.overrides.lock().map(|o| o.clone()).unwrap_or_default()
    }
}

/// What a backend is, as far as new connections are concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Standing {
    in_rotation: bool,
    state: BackendState,
    failing: bool,
    overloaded: bool,
}

/// Every backend's (and active sorry server's) standing.
fn standings(
    farms: &[Farm],
    inputs: &Inputs,
    plans: &[FarmPlan],
) -> BTreeMap<(BackendKey, bool), Standing> {
    let mut out = BTreeMap::new();
    for f in farms {
        let plan = plans.iter().find(|p| p.farm == f.name);
        for b in &f.backends {
            let k = BackendKey::of(f, b);
            let in_rotation = plan.is_some_and(|p| p.rotation.iter().any(|(r, _)| *r == k));
            out.insert(
                (k.clone(), false),
                Standing {
                    in_rotation,
                    state: inputs.state_of(&k, b.state),
                    failing: inputs.failing.contains(&k),
                    overloaded: inputs.overloaded.contains(&k),
                },
            );
        }
        if let Some(k) = BackendKey::sorry(f) {
            let on = plan.is_some_and(|p| p.sorry.as_ref() == Some(&k));
            out.insert(
                (k, true),
                Standing {
                    in_rotation: on,
                    state: BackendState::Up,
                    failing: false,
                    overloaded: false,
                },
            );
        }
    }
    out
}

/// Why a backend stands where it does, in words.
fn reason(s: &Standing, sorry: bool) -> String {
    if sorry {
        return if s.in_rotation {
            "no backend can take a connection: the sorry server answers".into()
        } else {
            "a backend is back: the sorry server no longer answers".into()
        };
    }
    if s.in_rotation {
        "in rotation".into()
    } else if s.state != BackendState::Up {
        format!("state {}", state_word(s.state))
    } else if s.failing {
        "health check failing".into()
    } else if s.overloaded {
        "over its upper connection threshold".into()
    } else {
        "not chosen by the scheduler".into()
    }
}

pub fn state_word(s: BackendState) -> &'static str {
    match s {
        BackendState::Up => "up",
        BackendState::Down => "down",
        BackendState::Drain => "drain",
        BackendState::Maintenance => "maintenance",
    }
}

/// The local addresses of this node's namespace.
fn local_addresses() -> HashSet<IpAddr> {
    match nix::ifaddrs::getifaddrs() {
        Ok(addrs) => addrs
            .filter_map(|a| a.address)
            .filter_map(|s| {
                s.as_sockaddr_in()
                    .map(|v4| IpAddr::V4(v4.ip()))
                    .or_else(|| s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
            })
            .collect(),
        Err(_) => HashSet::new(),
    }
}

/// The persistence entries of the farms whose VIP this node does not hold
/// (a backup), derived from its connection table: the script that replaces
/// each such farm's persistence map, and whether anything is to apply.
fn persistence_script(
    farms: &[Farm],
    records: &[tandem_conntrack::Record],
    local: &HashSet<IpAddr>,
) -> String {
    let mut out = String::new();
    for f in farms {
        let Some(timeout) = f.persistence_timeout_s else {
            continue;
        };
        if f.forwarding != tandem_config::Forwarding::Nat || local.contains(&f.vip) {
            continue;
        }
        let members: Vec<u32> = f
            .backends
            .iter()
            .map(|b| BackendKey::of(f, b).mark())
            .collect();
        let seeds = conns::persistence_seeds(records, &members, f.persistence_prefix());
        out.push_str(&ruleset::persistence_seed_script(f, &seeds, timeout));
    }
    out
}

/// Runs until shutdown. `failing` is the health checks' verdict.
pub async fn run(
    config: Arc<ConfigCell>,
    dp: Arc<Datapath>,
    mut failing: watch::Receiver<HashSet<BackendKey>>,
    mut shutdown: Shutdown,
) {
    let mut configs = config.subscribe();
    // What the kernel holds, as last applied; None forces a full replacement.
    let mut applied: Option<ruleset::Rendered> = None;
    let mut loads: HashMap<BackendKey, Load> = HashMap::new();
    let mut overloaded: HashSet<BackendKey> = HashSet::new();
    let mut refresh: u64 = 0;
    let mut tick = tokio::time::interval(LC_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut was_failing: HashSet<BackendKey> = HashSet::new();
    let mut standing: BTreeMap<(BackendKey, bool), Standing> = BTreeMap::new();
    let mut table_unreadable = false;
    let mut last_seed: Option<(String, Instant)> = None;
    loop {
        let loaded = configs.borrow_and_update().clone();
        let farms = &loaded.config.farms;
        let ticking = farms
            .iter()
            .any(|f| ruleset::needs_loads(f) || f.persistence_timeout_s.is_some());
        let failing_now = failing.borrow_and_update().clone();
        reset_failed(farms, &was_failing, &failing_now);
        was_failing.clone_from(&failing_now);
        let inputs = Inputs {
            hash_seed: loaded.config.cluster.as_ref().map_or(0, |c| c.hash_seed),
            // A pair replicates its connections: hold back the packets of
            // one whose entry is still on its way.
            orphan_grace_ms: loaded
                .config
                .cluster
                .as_ref()
                .filter(|c| c.mode.is_active_passive())
                .map_or(0, |c| c.sync.orphan_grace_ms),
            failing: failing_now,
            overrides: dp.overrides(),
            loads: loads.clone(),
            overloaded: overloaded.clone(),
            refresh,
            counters: HashMap::new(),
        };
        let parts = ruleset::render_parts(farms, &inputs);
        let plans = parts.plans.clone();
        // The same farms (VIPs, ports, SNAT): update in place what changed —
        // farm chains, backends' map elements and counters — keeping the
        // table and the other counters. Otherwise replace the table,
        // carrying the counters over.
        let fast = applied
            .as_ref()
            .filter(|a| parts.structure.updatable_from(&a.structure))
            .map(|a| parts.update_from(a));
        let started = Instant::now();
        let result = match fast {
            Some(update) if update.is_empty() => None,
            Some(update) => Some((nft::apply(&update).await, false)),
            None => Some((
                async {
                    let counters = nft::read_counters().await?;
                    nft::apply(&parts.full(&counters)).await
                }
                .await,
                true,
            )),
        };
        let took = started.elapsed();
        match result {
            None => {}
            Some((Ok(()), whole)) => {
                // Load refreshes rewrite a farm chain every second: not news.
                if whole || !ticking {
                    tracing::info!(
                        farms = farms.len(),
                        took_ms = took.as_millis() as u64,
                        "datapath applied: {} in {} ms",
                        count(farms.len(), "farm"),
                        took.as_millis()
                    );
                } else {
                    tracing::debug!(
                        farms = farms.len(),
                        took_ms = took.as_millis() as u64,
                        "datapath updated: {} in {} ms",
                        count(farms.len(), "farm"),
                        took.as_millis()
                    );
                }
                applied = Some(parts);
                dp.state.send_modify(|s| {
                    s.loaded = true;
                    s.loaded_at = Some(SystemTime::now());
                    s.last_apply = took;
                    s.applies += 1;
                    s.last_error = None;
                });
            }
            Some((Err(e), _)) => {
                tracing::error!(
                    farms = farms.len(),
                    error = %e,
                    "datapath for {} not applied, the rules in force stay: {e}",
                    count(farms.len(), "farm")
                );
                // Whatever the kernel holds now, the next change replaces it whole.
                applied = None;
                dp.state.send_modify(|s| {
                    s.loaded = false;
                    s.last_error = Some(e.to_string());
                });
            }
        }
        // Backends entering or leaving the rotation: one event each.
        let now = standings(farms, &inputs, &plans);
        for ((key, sorry), s) in &now {
            let before = standing.get(&(key.clone(), *sorry));
            if before.is_some_and(|b| b.in_rotation == s.in_rotation) {
                continue;
            }
            // A sorry server that never answered is no news.
            if before.is_none() && (*sorry && !s.in_rotation || !*sorry && s.in_rotation) {
                continue;
            }
            let why = reason(s, *sorry);
            if *sorry {
                tracing::warn!(farm = %key.farm, backend = %key.address, "farm {}: {why} ({})", key.farm, key.address);
            } else if !s.in_rotation {
                tracing::info!(farm = %key.farm, backend = %key.address, "farm {}: backend {} left the rotation: {why}", key.farm, key.address);
            } else {
                tracing::info!(farm = %key.farm, backend = %key.address, "farm {}: backend {} is back in rotation", key.farm, key.address);
            }
            let _ = dp.events.send(BackendEvent {
                key: key.clone(),
                sorry: *sorry,
                in_rotation: s.in_rotation,
                state: s.state,
                failing: s.failing,
                overloaded: s.overloaded,
                reason: why,
                at: SystemTime::now(),
            });
        }
        standing = now;
        dp.state.send_modify(|s| {
            s.plans = plans;
            s.failing = inputs.failing.clone();
            s.overrides = inputs.overrides.clone();
            s.loads = inputs.loads.clone();
            s.overloaded = inputs.overloaded.clone();
        });

        tokio::select! {
            r = configs.changed() => if r.is_err() { return },
            r = failing.changed() => if r.is_err() { return },
            () = dp.kick.notified() => {}
            _ = tick.tick(), if ticking => {
                match conns::dump_async().await {
                    Ok(records) => {
                        if table_unreadable {
                            table_unreadable = false;
                            tracing::info!("the connection table is readable again");
                        }
                        let by_mark = conns::loads_by_mark(&records);
                        let (l, o) = loads_of(&loaded.config.farms, &by_mark, &overloaded);
                        loads = l;
                        overloaded = o;
                        refresh += 1;
                        let script = persistence_script(&loaded.config.farms, &records, &local_addresses());
                        // Re-applied when it changes, and at least every few
                        // seconds so derived entries outlive their timeout
                        // only while their connections live.
                        let stale = last_seed.as_ref().is_none_or(|(s, at)| *s != script || at.elapsed() >= Duration::from_secs(5));
                        if !script.is_empty() && stale {
                            match nft::apply(&script).await {
                                Ok(()) => last_seed = Some((script, Instant::now())),
                                Err(e) => tracing::warn!(error = %e, "persistence entries derived from the connection table not applied: {e}"),
                            }
                        }
                    }
                    Err(e) => {
                        if !table_unreadable {
                            table_unreadable = true;
                            tracing::warn!(error = %e, "cannot read the connection table (load-aware schedulers keep their last loads): {e}");
                        }
                    }
                }
            }
            () = shutdown.wait() => return,
        }
    }
}

/// `1 farm`, `3 farms`.
fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// Loads of the backends of the farms that need them, and which are
/// overloaded now (thresholds, with the hysteresis of `-y`).
fn loads_of(
    farms: &[Farm],
    by_mark: &HashMap<u32, Load>,
    was: &HashSet<BackendKey>,
) -> (HashMap<BackendKey, Load>, HashSet<BackendKey>) {
    let mut loads = HashMap::new();
    let mut overloaded = HashSet::new();
    for f in farms.iter().filter(|f| ruleset::needs_loads(f)) {
        for b in &f.backends {
            let k = BackendKey::of(f, b);
            let load = by_mark.get(&k.mark()).copied().unwrap_or_default();
            if let Some(upper) = b.upper_threshold {
                let t = Thresholds {
                    upper: u64::from(upper),
                    lower: b.lower_threshold.map(u64::from),
                };
                let over = sched::overloaded(was.contains(&k), load.total(), t);
                if over != was.contains(&k) {
                    let word = if over { "overloaded" } else { "readmitted" };
                    tracing::info!(
                        farm = %f.name,
                        backend = %b.address,
                        "farm {}: backend {} {word}: {} connections (thresholds {}/{})",
                        f.name,
                        b.address,
                        load.total(),
                        upper,
                        b.lower_threshold.map_or_else(|| "3/4".to_owned(), |l| l.to_string())
                    );
                }
                if over {
                    overloaded.insert(k.clone());
                }
            }
            loads.insert(k, load);
        }
    }
    (loads, overloaded)
}

/// Removes from the kernel the connections of backends that just started
/// failing their health check, in farms with `on_backend_failure = "reset"`
/// (IPVS `expire_nodest_conn`); on a blocking thread, not awaited.
fn reset_failed(farms: &[Farm], was: &HashSet<BackendKey>, now: &HashSet<BackendKey>) {
    for f in farms
        .iter()
        .filter(|f| f.on_backend_failure == OnBackendFailure::Reset)
    {
        for b in &f.backends {
            let k = BackendKey::of(f, b);
            if !now.contains(&k) || was.contains(&k) {
                continue;
            }
            let mark = k.mark();
            tokio::task::spawn_blocking(move || match conns::delete_marked(mark) {
                Ok(n) => tracing::info!(
                    farm = %k.farm,
                    backend = %k.address,
                    "farm {}: backend {} is failing: {n} of its connections reset",
                    k.farm,
                    k.address
                ),
                Err(e) => tracing::warn!(
                    farm = %k.farm,
                    backend = %k.address,
                    "farm {}: backend {} is failing but its connections could not be reset: {e}",
                    k.farm,
                    k.address
                ),
            });
        }
    }
}
