//! The I/O shell of the health checks: one tokio task per probed backend,
//! ticking every `interval_ms`, feeding [`BackendFsm`] and publishing what
//! it decides.
//!
//! Which backends are probed: those whose configured `state` is `up` or
//! `drain` (a draining backend still serves its established connections,
//! and the operator wants to know whether it is healthy). `down` and
//! `maintenance` backends are not probed and do not appear in the
//! published health at all: they are out of the rotation whatever a check
//! would say. With `kind = "none"` backends are not probed and are
//! reported `Healthy` at once.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use tandem_config::{BackendState, Farm, HealthCheck, HealthCheckKind};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

use super::fsm::{BackendFsm, Health, HealthChange};
use super::probe::Prober;
use crate::ruleset::BackendKey;

/// First checks are spread over at most this long (or the interval, if
/// shorter), so that a thousand backends loaded at once are not probed in
/// the same millisecond; each task then keeps its own phase.
const MAX_STAGGER: Duration = Duration::from_secs(1);
/// Health events a subscriber may fall behind by before it misses some
/// (it then gets `RecvError::Lagged` and should re-read the snapshot).
const EVENT_BUFFER: usize = 1024;

/// The current health of one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendHealth {
    pub health: Health,
    /// The address and port probed (the backend's port, or the farm's).
    pub target: SocketAddr,
    /// Why it has this health: the reason of the last change, or "not
    /// checked yet", "health check disabled".
    pub reason: String,
    /// When it got this health (or was first seen).
    pub since: SystemTime,
}

/// One change of a backend's health, as published to subscribers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthEvent {
    pub key: BackendKey,
    /// The address and port probed.
    pub target: SocketAddr,
    pub old: Health,
    pub new: Health,
    /// "connection refused", "HTTP 503, expected 200", "2 checks passed in a row"…
    pub reason: String,
    pub at: SystemTime,
}

/// The health checks of a set of farms. Create it with
/// [`HealthMonitor::start`] inside a tokio runtime; it runs until the
/// shutdown future given there completes, or until it is dropped (which
/// stops every probe at once).
#[derive(Debug)]
pub struct HealthMonitor {
    shared: Arc<Shared>,
    tasks: HashMap<BackendKey, Task>,
    /// Becomes true when the shutdown future completes.
    stop: watch::Receiver<bool>,
    supervisor: JoinHandle<()>,
}

#[derive(Debug)]
struct Shared {
    health: watch::Sender<HashMap<BackendKey, BackendHealth>>,
    /// Derived from `health`, kept in step with it under its lock: what
    /// the datapath takes out of the rotation.
    failing: watch::Sender<HashSet<BackendKey>>,
    events: broadcast::Sender<HealthEvent>,
}

/// What a backend's task checks; a change restarts the task.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Spec {
    target: SocketAddr,
    check: HealthCheck,
}

#[derive(Debug)]
struct Task {
    spec: Spec,
    /// Set before the task is aborted: a task caught between a probe and
    /// its publication must not write over what reconfigure decided.
    retired: Arc<AtomicBool>,
    handle: JoinHandle<()>,
}

impl Task {
    fn retire(self) {
        self.retired.store(true, Ordering::SeqCst);
        self.handle.abort();
    }
}

impl HealthMonitor {
    /// Starts checking every backend of `farms` (see the module
    /// documentation for which). Probing stops when `shutdown` completes.
    /// Must be called within a tokio runtime.
    pub fn start<F>(farms: &[Farm], shutdown: F) -> HealthMonitor
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let (stop_tx, stop) = watch::channel(false);
        let supervisor = tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let mut monitor = HealthMonitor {
            shared: Arc::new(Shared {
                health: watch::Sender::new(HashMap::new()),
                failing: watch::Sender::new(HashSet::new()),
                events: broadcast::Sender::new(EVENT_BUFFER),
            }),
            tasks: HashMap::new(),
            stop,
            supervisor,
        };
        monitor.reconfigure(farms);
        monitor
    }

    /// The current health of every backend checked (or `kind = "none"`).
    pub fn snapshot(&self) -> HashMap<BackendKey, BackendHealth> {
        self.shared.health.borrow().clone()
    }

    /// The same, as a watch that changes with every health change.
    pub fn watch(&self) -> watch::Receiver<HashMap<BackendKey, BackendHealth>> {
        self.shared.health.subscribe()
    }

    /// The backends currently `Failing`: what the datapath must take out
    /// of the rotation. Changes only when that set changes.
    pub fn failing(&self) -> watch::Receiver<HashSet<BackendKey>> {
        self.shared.failing.subscribe()
    }

    /// Every health change from now on. Events are sent in the order the
    /// snapshot changes, under its lock: subscribe first, then read the
    /// snapshot, and no change is missed or seen twice. Removals by
    /// [`HealthMonitor::reconfigure`] send no event.
    pub fn subscribe(&self) -> broadcast::Receiver<HealthEvent> {
        self.shared.events.subscribe()
    }

    /// Applies a new farm list (a reload). A backend that still exists keeps
    /// its health; if its check changed (kind, timing, port…) its probing
    /// restarts with fresh rise/fall streaks. New backends start
    /// `Unknown`; backends gone, or now `down`/`maintenance`, stop being
    /// probed and leave the published health (without an event).
    pub fn reconfigure(&mut self, farms: &[Farm]) {
        let mut wanted: HashMap<BackendKey, Spec> = HashMap::new();
        for farm in farms {
            for backend in &farm.backends {
                if matches!(
                    backend.state,
                    BackendState::Down | BackendState::Maintenance
                ) {
                    continue;
                }
                let spec = Spec {
                    target: SocketAddr::new(backend.address, farm.check_port(backend)),
                    check: farm.health_check.clone(),
                };
                wanted.insert(BackendKey::of(farm, backend), spec);
            }
        }

        let stale: Vec<BackendKey> = self
            .tasks
            .iter()
            .filter(|(key, task)| wanted.get(*key) != Some(&task.spec))
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            if let Some(task) = self.tasks.remove(&key) {
                task.retire();
            }
        }

        let now = SystemTime::now();
        self.shared.update(|map| {
            map.retain(|key, _| wanted.contains_key(key));
            let mut announced = Vec::new();
            for (key, spec) in &wanted {
                let entry = map.entry(key.clone()).or_insert_with(|| BackendHealth {
                    health: Health::Unknown,
                    target: spec.target,
                    reason: "not checked yet".into(),
                    since: now,
                });
                entry.target = spec.target;
                if spec.check.kind == HealthCheckKind::None && entry.health != Health::Healthy {
                    let change = HealthChange {
                        old: entry.health,
                        new: Health::Healthy,
                        reason: "health check disabled".into(),
                    };
                    entry.health = Health::Healthy;
                    entry.reason.clone_from(&change.reason);
                    entry.since = now;
                    announced.push(Announce::new(key, spec.target, change, now, false));
                }
            }
            announced
        });

        let current = self.snapshot();
        for (key, spec) in wanted {
            let prober = Prober::new(&spec.check);
            if self.tasks.contains_key(&key) || prober.is_none() {
                continue;
            }
            let health = current.get(&key).map_or(Health::Unknown, |h| h.health);
            let fsm = BackendFsm::resume(health, spec.check.rise, spec.check.fall);
            let retired = Arc::new(AtomicBool::new(false));
            let handle = tokio::spawn(check_loop(CheckLoop {
                key: key.clone(),
                target: spec.target,
                interval: Duration::from_millis(u64::from(spec.check.interval_ms.max(1))),
                prober,
                fsm,
                shared: self.shared.clone(),
                retired: retired.clone(),
                stop: self.stop.clone(),
            }));
            self.tasks.insert(
                key,
                Task {
                    spec,
                    retired,
                    handle,
                },
            );
        }
    }
}

impl Drop for HealthMonitor {
    fn drop(&mut self) {
        self.supervisor.abort();
        for (_, task) in self.tasks.drain() {
            task.retire();
        }
    }
}

impl Shared {
    /// Changes the health map and, under the same lock, the failing set
    /// derived from it, and sends the events of the changes `change`
    /// returns: a subscriber that subscribes and then reads the snapshot
    /// misses no change and sees none twice. Logs them after the lock.
    fn update(
        &self,
        change: impl FnOnce(&mut HashMap<BackendKey, BackendHealth>) -> Vec<Announce>,
    ) {
        let mut announced = Vec::new();
        self.health.send_modify(|map| {
            announced = change(map);
            let failing: HashSet<BackendKey> = map
                .iter()
                .filter(|(_, h)| h.health == Health::Failing)
                .map(|(k, _)| k.clone())
                .collect();
            self.failing.send_if_modified(|set| {
                let modified = *set != failing;
                *set = failing;
                modified
            });
            for a in &announced {
                // No subscriber is fine: the snapshot holds the state.
                let _ = self.events.send(a.event.clone());
            }
        });
        for a in announced {
            a.log();
        }
    }

    /// Records a change decided by `key`'s task, unless the task has been
    /// retired meanwhile.
    fn publish(
        &self,
        key: &BackendKey,
        target: SocketAddr,
        change: HealthChange,
        retired: &AtomicBool,
    ) {
        let at = SystemTime::now();
        self.update(|map| {
            if retired.load(Ordering::SeqCst) {
                return Vec::new();
            }
            map.insert(
                key.clone(),
                BackendHealth {
                    health: change.new,
                    target,
                    reason: change.reason.clone(),
                    since: at,
                },
            );
            let farm_down = change.new == Health::Failing
                && map
                    .iter()
                    .filter(|(k, _)| k.farm == key.farm)
                    .all(|(_, h)| h.health == Health::Failing);
            vec![Announce::new(key, target, change, at, farm_down)]
        });
    }
}

/// A change to send and log.
struct Announce {
    event: HealthEvent,
    /// The change left its farm without a backend that is not failing.
    farm_down: bool,
}

impl Announce {
    fn new(
        key: &BackendKey,
        target: SocketAddr,
        change: HealthChange,
        at: SystemTime,
        farm_down: bool,
    ) -> Announce {
        Announce {
            event: HealthEvent {
                key: key.clone(),
                target,
                old: change.old,
                new: change.new,
                reason: change.reason,
                at,
            },
            farm_down,
        }
    }

    /// One line per change; a warning when the farm has nothing left.
    fn log(&self) {
        let e = &self.event;
        tracing::info!(
            farm = %e.key.farm,
            backend = %e.target,
            old = %e.old,
            new = %e.new,
            "farm {}: backend {} {} (was {}): {}",
            e.key.farm,
            e.target,
            e.new,
            e.old,
            e.reason
        );
        if self.farm_down {
            tracing::warn!(
                farm = %e.key.farm,
                "farm {}: every backend is failing; its new connections are dropped",
                e.key.farm
            );
        }
    }
}

struct CheckLoop {
    key: BackendKey,
    target: SocketAddr,
    interval: Duration,
    prober: Prober,
    fsm: BackendFsm,
    shared: Arc<Shared>,
    retired: Arc<AtomicBool>,
    stop: watch::Receiver<bool>,
}

/// Probes one backend every `interval` until shutdown. A probe never
/// outlives its timeout, which validation keeps below the interval, so
/// probes of one backend never overlap; a late tick is delayed, not
/// bunched.
async fn check_loop(mut c: CheckLoop) {
    let first = Instant::now() + stagger(&c.key, c.interval);
    let mut ticks = tokio::time::interval_at(first, c.interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stopped(&mut c.stop) => return,
            _ = ticks.tick() => {}
        }
        let result = tokio::select! {
            () = stopped(&mut c.stop) => return,
            result = c.prober.probe(c.target) => result,
        };
        if let Some(change) = c.fsm.on_result(&result) {
            c.shared.publish(&c.key, c.target, change, &c.retired);
        }
    }
}

/// Resolves once shutdown has begun (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// A delay in `[0, min(interval, MAX_STAGGER))` fixed by the key, so a
/// backend keeps its phase across restarts of its task.
fn stagger(key: &BackendKey, interval: Duration) -> Duration {
    let spread = u64::try_from(interval.min(MAX_STAGGER).as_millis())
        .unwrap_or(1)
        .max(1);
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    Duration::from_millis(h.finish() % spread)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stagger_stays_within_the_interval_and_a_second() {
        let key = |i: u16| BackendKey {
            farm: "web".into(),
            address: "10.1.0.11".parse().expect("ip"),
            port: Some(i),
        };
        for i in 0..200 {
            assert!(stagger(&key(i), Duration::from_millis(100)) < Duration::from_millis(100));
            assert!(stagger(&key(i), Duration::from_secs(60)) < MAX_STAGGER);
        }
        let spread: HashSet<Duration> = (0..200)
            .map(|i| stagger(&key(i), Duration::from_secs(2)))
            .collect();
        assert!(
            spread.len() > 100,
            "first checks are spread out: {}",
            spread.len()
        );
    }
}
