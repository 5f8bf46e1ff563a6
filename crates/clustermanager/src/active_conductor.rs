//! Orchestration of an active-active node: no VRRP, so no roles to follow.
//! The leader (the first of cluster.toml's `[[nodes]]`) has cfg-syncd push
//! the replicated files to every other node; the others receive. The
//! direction is set when the leadership (or the mode) changes and checked
//! again every few seconds, so a restarted cfg-syncd gets it back.

use std::time::{Duration, Instant};

use tandem_proto::v1::SyncDirection;

use crate::active;
use crate::state::Shared;

const TICK: Duration = Duration::from_millis(500);
/// How often cfg-syncd's direction is read back.
const VERIFY_EVERY: Duration = Duration::from_secs(5);

/// Runs while this node is in an active-active cluster; true when the
/// daemon shuts down, false when the mode changed.
pub async fn run(shared: &Shared, shutdown: &mut tandem_runtime::Shutdown) -> bool {
    let mut applied: Option<SyncDirection> = None;
    let mut last_failure: Option<String> = None;
    let mut verified = Instant::now();
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.wait() => return true,
        }
        let loaded = shared.config.current();
        let config = &loaded.config;
        if !active::is_active(config) {
            return false;
        }
        shared.members.prune(config).await;
        let leads = active::leads(config);
        let want = if leads {
            SyncDirection::Push
        } else {
            SyncDirection::Receive
        };
        if applied == Some(want) && verified.elapsed() >= VERIFY_EVERY {
            verified = Instant::now();
            if let crate::local::Probe::Running(c) =
                crate::local::cfgsync_status(&shared.runtime_dir).await
                && c.direction() != want
            {
                tracing::info!(node = %config.node.name, "cfg-syncd's direction is {} (restarted?): setting it again", c.direction().as_str_name());
                applied = None;
            }
        }
        if applied == Some(want) {
            continue;
        }
        match crate::local::set_cfg_direction(&shared.runtime_dir, want).await {
            Ok(()) => {
                let others: Vec<String> =
                    active::others(config).into_iter().map(|(n, _)| n).collect();
                let leader = config
                    .cluster
                    .as_ref()
                    .and_then(active::leader)
                    .map(|n| n.name.clone())
                    .unwrap_or_default();
                let msg = if leads {
                    format!(
                        "{} leads the active-active cluster: cfg-syncd pushes the configuration to {}",
                        config.node.name,
                        others.join(", ")
                    )
                } else {
                    format!(
                        "{} follows the leader {leader}: cfg-syncd receives the configuration",
                        config.node.name
                    )
                };
                tracing::info!(node = %config.node.name, leader = %leader, "{msg}");
                shared.event("role", msg);
                applied = Some(want);
                verified = Instant::now();
                if last_failure.take().is_some() {
                    tracing::info!(node = %config.node.name, "setting cfg-syncd's direction succeeded after retries");
                }
            }
            Err(why) => {
                if last_failure.as_deref() != Some(why.as_str()) {
                    tracing::warn!(node = %config.node.name, "setting cfg-syncd's direction failed: {why}; retrying every {} ms (logged again if the reason changes)", TICK.as_millis());
                    last_failure = Some(why);
                }
            }
        }
    }
}
