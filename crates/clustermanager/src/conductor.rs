//! The shell of role orchestration: follows the local vrrpd's WatchState,
//! feeds its state changes and the measured resync progress to the pure
//! [`Orchestrator`](crate::orchestrate::Orchestrator), and performs what it
//! answers (conntrack-syncd's role, cfg-syncd's direction, vrrpd
//! maintenance for failback gating), retrying what failed.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tandem_proto::v1::{self, VrrpState, vrrpd_client::VrrpdClient};

use crate::orchestrate::{Action, Gate, Progress, merge};
use crate::state::Shared;

/// How often resync progress is measured while a node is held back, and
/// the orchestration RPCs retried after a failure.
const TICK: Duration = Duration::from_millis(500);

/// Follows the local vrrpd until shutdown, reconnecting every 200 ms.
pub async fn run(shared: Arc<Shared>, mut shutdown: tandem_runtime::Shutdown) {
    let mut waiting_logged = false;
    let mut retries = Retries::default();
    loop {
        let stream = match tandem_runtime::connect(&shared.runtime_dir, "vrrpd").await {
            Ok(ch) => VrrpdClient::new(ch)
                .watch_state(v1::WatchStateRequest {})
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| s.message().to_owned()),
            Err(e) => Err(e.to_string()),
        };
        match stream {
            Ok(mut stream) => {
                waiting_logged = false;
                tracing::info!("following vrrpd's state");
                shared.with_orchestrator(|o| o.vrrpd_restarted());
                let mut pending: Vec<Action> = Vec::new();
                let mut last_progress: Option<Progress> = None;
                let mut tick = tokio::time::interval(TICK);
                loop {
                    tokio::select! {
                        item = stream.next() => match item {
                            Some(Ok(change)) => {
                                let mut peer_master = peer_is_master(&shared, &change.master_address);
                                if !peer_master && change.new_state() == VrrpState::Backup && shared.preferred() {
                                    // Out of maintenance vrrpd may not have
                                    // heard the master yet: ask the peer.
                                    peer_master = matches!(
                                        shared.peer.status(&shared.config).await,
                                        Ok(s) if s.role() == v1::NodeRole::Master
                                    );
                                }
                                let actions = shared.with_orchestrator(|o| o.on_state(change.new_state(), peer_master));
                                pending = perform(&shared, &mut retries, merge(pending, actions)).await;
                            }
                            Some(Err(s)) => {
                                tracing::warn!("vrrpd's state stream failed: {}", s.message());
                                break;
                            }
                            None => break,
                        },
                        _ = tick.tick() => {
                            let preferred = shared.preferred();
                            let mut actions = shared.with_orchestrator(|o| o.set_preferred(preferred));
                            if shared.with_orchestrator(|o| o.gate()) == Gate::Holding {
                                let p = measure(&shared).await;
                                if last_progress != Some(p) {
                                    tracing::info!(
                                        config_synced = p.config_synced,
                                        conntrack_synced = p.conntrack_synced,
                                        peer_reachable = p.peer_reachable,
                                        "failback gate: waiting for the resync"
                                    );
                                    last_progress = Some(p);
                                }
                                actions.extend(shared.with_orchestrator(|o| o.on_progress(p)));
                            }
                            pending = perform(&shared, &mut retries, merge(pending, actions)).await;
                        }
                        () = shutdown.wait() => return,
                    }
                }
                tracing::warn!("lost vrrpd's state stream; reconnecting");
            }
            Err(why) => {
                if !waiting_logged {
                    tracing::warn!("waiting for vrrpd to follow its state: {why}");
                    waiting_logged = true;
                }
            }
        }
        // Short: until clustermanager follows vrrpd, a returning preferred
        // master is not gated.
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
            () = shutdown.wait() => return,
        }
    }
}

fn peer_is_master(shared: &Shared, master_address: &str) -> bool {
    let loaded = shared.config.current();
    let own = loaded.config.node.cluster_address.map(|a| a.to_string());
    !master_address.is_empty() && Some(master_address) != own.as_deref()
}

/// The reason each kind of action last failed, so a failure retried every
/// tick is logged once, again only when its reason changes, and its
/// recovery once.
#[derive(Default)]
struct Retries(std::collections::HashMap<&'static str, String>);

fn what(a: &Action) -> &'static str {
    match a {
        Action::SetConntrackRole(_) => "setting conntrack-syncd's role",
        Action::SetCfgDirection(_) => "setting cfg-syncd's direction",
        Action::SetMaintenance(_) => "setting vrrpd's maintenance",
        Action::ResyncConntrack => "asking conntrack-syncd for a resync",
        Action::Decision { .. } => "",
    }
}

/// Performs actions in order; returns those that failed (to retry).
async fn perform(shared: &Shared, retries: &mut Retries, actions: Vec<Action>) -> Vec<Action> {
    let dir = &shared.runtime_dir;
    let mut failed = Vec::new();
    for a in actions {
        let result = match &a {
            Action::Decision { kind, message } => {
                tracing::info!(kind, "{message}");
                shared.event(kind, message.clone());
                Ok(())
            }
            Action::SetConntrackRole(r) => crate::local::set_conntrack_role(dir, *r).await,
            Action::SetCfgDirection(d) => crate::local::set_cfg_direction(dir, *d).await,
            Action::SetMaintenance(on) => crate::local::set_maintenance_hold(dir, *on)
                .await
                .map(|_| ()),
            Action::ResyncConntrack => {
                shared.hold_started_ms.store(
                    tandem_runtime::unix_ms(std::time::SystemTime::now()),
                    std::sync::atomic::Ordering::SeqCst,
                );
                crate::local::resync_conntrack(dir).await
            }
        };
        let what = what(&a);
        match result {
            Err(why) => {
                if retries.0.get(what) != Some(&why) {
                    tracing::warn!(
                        node = %shared.node_name(),
                        "{what} failed: {why}; retrying every {} ms (logged again if the reason changes)",
                        TICK.as_millis()
                    );
                    retries.0.insert(what, why);
                }
                failed.push(a);
            }
            Ok(()) => {
                if retries.0.remove(what).is_some() {
                    tracing::info!(node = %shared.node_name(), "{what} succeeded after retries");
                }
            }
        }
    }
    failed
}

/// Is this (held) node's configuration the master's, and its conntrack
/// table resynced?
async fn measure(shared: &Shared) -> Progress {
    let dir = &shared.runtime_dir;
    let (cfg, ct, peer) = tokio::join!(
        crate::local::cfgsync_status(dir),
        crate::local::conntrack_status(dir),
        shared.peer.status(&shared.config),
    );
    let peer_hash = peer.as_ref().ok().map(|p| p.manifest_hash.clone());
    tracing::debug!(
        local_hash = ?cfg.running().map(|c| c.manifest_hash.clone()),
        pending = ?cfg.running().map(|c| c.pending_changes),
        ?peer_hash,
        conntrack = ?ct.running().map(|c| (c.peer_alive, c.resync_complete, c.last_resync_unix_ms)),
        "failback gate measured"
    );
    let config_synced = match (cfg.running(), &peer_hash) {
        // Equal manifest hashes: identical replicated trees. (pending_changes
        // counts what this node would push; a held node receives.)
        (Some(c), Some(h)) => !h.is_empty() && c.manifest_hash == *h,
        _ => false,
    };
    // A bulk resync completed after the hold began (ResyncConntrack).
    let since = shared
        .hold_started_ms
        .load(std::sync::atomic::Ordering::SeqCst);
    let conntrack_synced = ct.running().is_some_and(|c| {
        c.peer_alive
            && c.resync_complete
            && c.last_resync_unix_ms > 0
            && c.last_resync_unix_ms >= since
    });
    Progress {
        config_synced,
        conntrack_synced,
        peer_reachable: peer.is_ok(),
    }
}
