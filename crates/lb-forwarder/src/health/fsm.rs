//! The rise/fall state machine of one backend, as a pure function of check
//! results: no sockets, no clock. The runner feeds it the outcome of every
//! probe and publishes the [`HealthChange`]s it returns.
//!
//! A backend starts `Unknown`. `rise` passing checks in a row make it
//! `Healthy`, `fall` failing checks in a row make it `Failing`; from
//! `Unknown` whichever streak reaches its threshold first decides. A streak
//! is broken by one result of the other kind, so a backend that flaps
//! faster than the thresholds keeps the health it had.

use std::fmt;

/// What the health checks say about a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Health {
    /// Not checked enough yet to tell (and the state of a new backend).
    #[default]
    Unknown,
    /// `rise` checks in a row passed.
    Healthy,
    /// `fall` checks in a row failed.
    Failing,
}

impl Health {
    /// `unknown`, `healthy` or `failing`, as logs and listings show it.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Healthy => "healthy",
            Health::Failing => "failing",
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A transition, with the reason an operator reads in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthChange {
    pub old: Health,
    pub new: Health,
    /// For `Failing`, the last check's failure ("connection refused");
    /// for `Healthy`, how many checks passed in a row.
    pub reason: String,
}

/// The health of one backend and the streak of results leading to the next
/// transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendFsm {
    rise: u8,
    fall: u8,
    health: Health,
    /// Passing checks in a row (0 after any failure).
    passes: u8,
    /// Failing checks in a row (0 after any pass).
    failures: u8,
}

impl BackendFsm {
    /// A backend never checked. `rise` and `fall` below 1 are taken as 1
    /// (the configuration refuses them; a zero threshold would otherwise
    /// mean "never decide").
    pub fn new(rise: u8, fall: u8) -> Self {
        Self::resume(Health::Unknown, rise, fall)
    }

    /// A backend whose health is already known (kept across a reload): it
    /// keeps `health` until a full streak says otherwise.
    pub fn resume(health: Health, rise: u8, fall: u8) -> Self {
        BackendFsm {
            rise: rise.max(1),
            fall: fall.max(1),
            health,
            passes: 0,
            failures: 0,
        }
    }

    pub fn health(&self) -> Health {
        self.health
    }

    /// A check passed.
    pub fn on_pass(&mut self) -> Option<HealthChange> {
        self.failures = 0;
        self.passes = self.passes.saturating_add(1);
        if self.health == Health::Healthy || self.passes < self.rise {
            return None;
        }
        let reason = if self.rise == 1 {
            "check passed".to_owned()
        } else {
            format!("{} checks passed in a row", self.passes)
        };
        Some(self.enter(Health::Healthy, reason))
    }

    /// A check failed for `reason` ("connection refused", "timeout after
    /// 1000 ms", "HTTP 503, expected 200", "exit status 2").
    pub fn on_fail(&mut self, reason: &str) -> Option<HealthChange> {
        self.passes = 0;
        self.failures = self.failures.saturating_add(1);
        if self.health == Health::Failing || self.failures < self.fall {
            return None;
        }
        Some(self.enter(Health::Failing, reason.to_owned()))
    }

    /// A check's outcome: `Ok` passed, `Err(reason)` failed.
    pub fn on_result<E: fmt::Display>(&mut self, result: &Result<(), E>) -> Option<HealthChange> {
        match result {
            Ok(()) => self.on_pass(),
            Err(e) => self.on_fail(&e.to_string()),
        }
    }

    fn enter(&mut self, new: Health, reason: String) -> HealthChange {
        let old = std::mem::replace(&mut self.health, new);
        HealthChange { old, new, reason }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds a script of results ('+' pass, '-' fail) and returns every
    /// change with the index of the result that caused it.
    fn run(fsm: &mut BackendFsm, script: &str) -> Vec<(usize, Health, Health)> {
        script
            .chars()
            .enumerate()
            .filter_map(|(i, c)| {
                let change = match c {
                    '+' => fsm.on_pass(),
                    '-' => fsm.on_fail("connection refused"),
                    other => panic!("bad script character {other:?}"),
                };
                change.map(|ch| (i, ch.old, ch.new))
            })
            .collect()
    }

    #[test]
    fn unknown_becomes_healthy_after_rise_passes() {
        let mut fsm = BackendFsm::new(2, 3);
        assert_eq!(fsm.on_pass(), None);
        assert_eq!(fsm.health(), Health::Unknown);
        let change = fsm.on_pass().expect("second pass decides");
        assert_eq!(
            change,
            HealthChange {
                old: Health::Unknown,
                new: Health::Healthy,
                reason: "2 checks passed in a row".into(),
            }
        );
        assert_eq!(fsm.health(), Health::Healthy);
        assert_eq!(fsm.on_pass(), None, "no repeated transition");
    }

    #[test]
    fn unknown_becomes_failing_after_fall_failures_with_the_last_reason() {
        let mut fsm = BackendFsm::new(2, 3);
        assert_eq!(fsm.on_fail("connection refused"), None);
        assert_eq!(fsm.on_fail("connection refused"), None);
        let change = fsm.on_fail("timeout after 1000 ms").expect("third failure");
        assert_eq!(change.old, Health::Unknown);
        assert_eq!(change.new, Health::Failing);
        assert_eq!(change.reason, "timeout after 1000 ms");
        assert_eq!(fsm.on_fail("connection refused"), None);
    }

    #[test]
    fn from_unknown_the_first_threshold_reached_decides() {
        // fall 1: one failure decides even though a pass came first.
        let mut fsm = BackendFsm::new(3, 1);
        assert_eq!(
            run(&mut fsm, "+-"),
            vec![(1, Health::Unknown, Health::Failing)]
        );
        // rise 1: one pass decides after failures below fall.
        let mut fsm = BackendFsm::new(1, 3);
        assert_eq!(
            run(&mut fsm, "--+"),
            vec![(2, Health::Unknown, Health::Healthy)]
        );
    }

    #[test]
    fn healthy_becomes_failing_after_fall_failures_and_back_after_rise() {
        let mut fsm = BackendFsm::new(2, 3);
        assert_eq!(
            run(&mut fsm, "++---++"),
            vec![
                (1, Health::Unknown, Health::Healthy),
                (4, Health::Healthy, Health::Failing),
                (6, Health::Failing, Health::Healthy),
            ]
        );
    }

    #[test]
    fn flapping_below_the_thresholds_never_changes_health() {
        // From Unknown: never two passes nor three failures in a row.
        let mut fsm = BackendFsm::new(2, 3);
        assert_eq!(run(&mut fsm, "+-+--+--+-+--+"), vec![]);
        assert_eq!(fsm.health(), Health::Unknown);

        // From Healthy: failures in pairs, broken by a pass.
        let mut fsm = BackendFsm::new(2, 3);
        assert_eq!(
            run(&mut fsm, "++"),
            vec![(1, Health::Unknown, Health::Healthy)]
        );
        assert_eq!(run(&mut fsm, "--+--+-+--+"), vec![]);
        assert_eq!(fsm.health(), Health::Healthy);

        // From Failing: single passes broken by a failure.
        let mut fsm = BackendFsm::new(2, 3);
        assert_eq!(
            run(&mut fsm, "---"),
            vec![(2, Health::Unknown, Health::Failing)]
        );
        assert_eq!(run(&mut fsm, "+-+-+--+-"), vec![]);
        assert_eq!(fsm.health(), Health::Failing);
    }

    #[test]
    fn rise_and_fall_of_one_follow_every_result() {
        let mut fsm = BackendFsm::new(1, 1);
        let change = fsm.on_pass().expect("pass");
        assert_eq!(change.reason, "check passed");
        assert_eq!(
            run(&mut fsm, "-+-"),
            vec![
                (0, Health::Healthy, Health::Failing),
                (1, Health::Failing, Health::Healthy),
                (2, Health::Healthy, Health::Failing),
            ]
        );
    }

    #[test]
    fn zero_thresholds_are_taken_as_one() {
        let mut fsm = BackendFsm::new(0, 0);
        assert_eq!(
            run(&mut fsm, "+-"),
            vec![
                (0, Health::Unknown, Health::Healthy),
                (1, Health::Healthy, Health::Failing),
            ]
        );
    }

    #[test]
    fn resumed_backend_keeps_its_health_until_a_full_streak() {
        let mut fsm = BackendFsm::resume(Health::Failing, 2, 3);
        assert_eq!(fsm.health(), Health::Failing);
        assert_eq!(run(&mut fsm, "+-+"), vec![]);
        assert_eq!(
            run(&mut fsm, "+"),
            vec![(0, Health::Failing, Health::Healthy)]
        );
    }

    #[test]
    fn on_result_maps_ok_and_err() {
        let mut fsm = BackendFsm::new(1, 1);
        let change = fsm
            .on_result(&Err::<(), _>("HTTP 503, expected 200"))
            .expect("fails");
        assert_eq!(change.reason, "HTTP 503, expected 200");
        let change = fsm.on_result(&Ok::<(), String>(())).expect("passes");
        assert_eq!(change.new, Health::Healthy);
    }
}
