//! Keeps the kernel datapath equal to what configuration, health, operator
//! overrides and (for `lc`) connection loads ask for. Re-renders on every
//! change and applies only when the rules differ; counters are carried over.
//! On shutdown the table stays: the kernel keeps serving without us
//! (DESIGN.md, "the fast path stays short").

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tandem_config::{BackendState, Scheduler};
use tandem_runtime::{ConfigCell, Shutdown};
use tokio::sync::{Notify, watch};

use crate::nft;
use crate::ruleset::{self, BackendKey, FarmPlan, Inputs};

/// How often `lc` farms re-read connection counts from conntrack.
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
}

pub struct Datapath {
    pub state: watch::Sender<DatapathState>,
    overrides: Mutex<HashMap<BackendKey, BackendState>>,
    kick: Notify,
}

impl Datapath {
    pub fn new() -> Arc<Self> {
        Arc::new(Datapath {
            state: watch::channel(DatapathState::default()).0,
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
    let mut loads: HashMap<BackendKey, u64> = HashMap::new();
    let mut loads_unreadable = false;
    let mut lc_tick = tokio::time::interval(LC_REFRESH);
    lc_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let loaded = configs.borrow_and_update().clone();
        let farms = &loaded.config.farms;
        let has_lc = farms.iter().any(|f| f.scheduler == Scheduler::Lc);
        let inputs = Inputs {
            hash_seed: loaded.config.cluster.as_ref().map_or(0, |c| c.hash_seed),
            failing: failing.borrow_and_update().clone(),
            overrides: dp.overrides(),
            loads: loads.clone(),
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
            Some(update) => Some(nft::apply(&update).await),
            None => Some(
                async {
                    let counters = nft::read_counters().await?;
                    nft::apply(&parts.full(&counters)).await
                }
                .await,
            ),
        };
        let took = started.elapsed();
        match result {
            None => {}
            Some(Ok(())) => {
                tracing::info!(
                    farms = farms.len(),
                    took_ms = took.as_millis() as u64,
                    "datapath applied: {} in {} ms",
                    count(farms.len(), "farm"),
                    took.as_millis()
                );
                applied = Some(parts);
                dp.state.send_modify(|s| {
                    s.loaded = true;
                    s.loaded_at = Some(SystemTime::now());
                    s.last_apply = took;
                    s.applies += 1;
                    s.last_error = None;
                });
            }
            Some(Err(e)) => {
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
        dp.state.send_modify(|s| {
            s.plans = plans;
            s.failing = inputs.failing.clone();
            s.overrides = inputs.overrides.clone();
        });

        tokio::select! {
            r = configs.changed() => if r.is_err() { return },
            r = failing.changed() => if r.is_err() { return },
            () = dp.kick.notified() => {}
            _ = lc_tick.tick(), if has_lc => {
                match read_loads(&loaded.config.farms).await {
                    Ok(l) => {
                        if loads_unreadable {
                            tracing::info!("least-connections farms: connection counts readable again (conntrack -L)");
                        }
                        loads_unreadable = false;
                        loads = l;
                    }
                    // Logged once per failure, not every second.
                    Err(e) => {
                        if !loads_unreadable {
                            tracing::warn!(
                                error = %e,
                                "least-connections farms: cannot read connection counts (conntrack -L), scheduling on the last counts: {e}"
                            );
                        }
                        loads_unreadable = true;
                    }
                }
            }
            () = shutdown.wait() => return,
        }
    }
}

/// Established connections per backend of the `lc` farms.
async fn read_loads(
    farms: &[tandem_config::Farm],
) -> Result<HashMap<BackendKey, u64>, nft::NftError> {
    let by_mark = nft::connections_by_mark().await?;
    Ok(farms
        .iter()
        .filter(|f| f.scheduler == Scheduler::Lc)
        .flat_map(|f| f.backends.iter().map(move |b| BackendKey::of(f, b)))
        .map(|k| {
            let n = by_mark.get(&k.mark()).copied().unwrap_or(0);
            (k, n)
        })
        .collect())
}

/// `1 farm`, `3 farms`.
fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}
