//! Switches for the tests' controls and fault injection, read from the
//! environment in debug builds only (a release build has none of them):
//!
//! - `TANDEM_CFGSYNC_FAULT_NONATOMIC=1`: no commit journal, and the apply is
//!   tied to the master's RPC (the behaviour before batches were atomic):
//!   the atomicity test must fail with it.
//! - `TANDEM_CFGSYNC_FAULT_MODE_BEFORE_OWNER=1`: chmod, then chown (which
//!   clears the set-id bits): the set-id test must loop with it.
//! - `TANDEM_CFGSYNC_FAULT_FOLLOW_LINKS=1`: staged files are opened
//!   following links: the symlink test must see its target changed.
//! - `TANDEM_CFGSYNC_FAULT_NO_SET_ASIDE=1`: local changes are replaced
//!   without being kept: the partition test must lose the change.
//! - `TANDEM_CFGSYNC_FAULT_APPLY_DELAY_MS=N`: a pause of N ms before each
//!   file operation of an apply, so that a kill or a swap lands inside it.

use std::time::Duration;

#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    pub nonatomic: bool,
    pub mode_before_owner: bool,
    pub follow_links: bool,
    pub no_set_aside: bool,
    pub apply_delay: Option<Duration>,
}

impl Faults {
    #[cfg(debug_assertions)]
    pub fn from_env() -> Faults {
        let on = |k: &str| std::env::var(k).is_ok_and(|v| v == "1");
        Faults {
            nonatomic: on("TANDEM_CFGSYNC_FAULT_NONATOMIC"),
            mode_before_owner: on("TANDEM_CFGSYNC_FAULT_MODE_BEFORE_OWNER"),
            follow_links: on("TANDEM_CFGSYNC_FAULT_FOLLOW_LINKS"),
            no_set_aside: on("TANDEM_CFGSYNC_FAULT_NO_SET_ASIDE"),
            apply_delay: std::env::var("TANDEM_CFGSYNC_FAULT_APPLY_DELAY_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .map(Duration::from_millis),
        }
    }

    #[cfg(not(debug_assertions))]
    pub fn from_env() -> Faults {
        Faults::default()
    }

    pub fn any(&self) -> bool {
        self.nonatomic
            || self.mode_before_owner
            || self.follow_links
            || self.no_set_aside
            || self.apply_delay.is_some()
    }

    /// The injected pause before a file operation, if any.
    pub fn pause(&self) {
        if let Some(d) = self.apply_delay {
            std::thread::sleep(d);
        }
    }
}
