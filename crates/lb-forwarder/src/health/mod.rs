//! Health checks: every backend of every farm probed on its farm's
//! `[health_check]`, a rise/fall verdict per backend, published for the
//! datapath, the API and the logs.
//!
//! The rooms, as in vrrpd:
//! - [`fsm`] — the pure rise/fall state machine of one backend;
//! - [`probe`] — one probe (`tcp`, `http`, `https`, `command`, `none`),
//!   bounded by `timeout_ms`, `Ok` or a [`ProbeError`] whose text is the
//!   reason an operator reads;
//! - `tls` — the TLS client of `https` checks, which does not verify
//!   certificates (its documentation says why);
//! - [`HealthMonitor`] (`runner`) — the I/O shell: one task per backend,
//!   publishing the verdicts.
//!
//! ```no_run
//! # async fn demo(farms: Vec<tandem_config::Farm>) {
//! use lb_forwarder::health::HealthMonitor;
//! let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
//! let mut monitor = HealthMonitor::start(&farms, async move {
//!     let _ = stop_rx.wait_for(|s| *s).await;
//! });
//! let failing = monitor.failing(); // feed the datapath
//! let mut events = monitor.subscribe();
//! while let Ok(event) = events.recv().await {
//!     println!("{} {}: {} -> {}", event.key.farm, event.target, event.old, event.new);
//! }
//! monitor.reconfigure(&farms); // on reload
//! let _ = stop_tx.send(true);
//! # let _ = failing; }
//! ```

pub mod fsm;
pub mod probe;
mod runner;
mod tls;

pub use crate::ruleset::BackendKey;
pub use fsm::{BackendFsm, Health, HealthChange};
pub use probe::{ProbeError, Prober};
pub use runner::{BackendHealth, HealthEvent, HealthMonitor};
