//! Which way entries flow. The master sends its flows; the backup receives
//! and applies the master's. clustermanager sets the role (SetRole); until
//! it does, conntrack-syncd follows the local vrrpd's state stream itself.

use std::path::PathBuf;
use std::time::Duration;

use tandem_proto::v1::{SyncRole, VrrpState, vrrpd_client::VrrpdClient};
use tandem_runtime::Shutdown;
use tokio::sync::watch;

/// The role vrrpd's state implies.
pub fn role_of(state: VrrpState) -> SyncRole {
    match state {
        VrrpState::Master => SyncRole::Sender,
        VrrpState::Standalone => SyncRole::Standalone,
        VrrpState::Unspecified => SyncRole::Unspecified,
        // Backup, and the states in which this node does not hold the VIPs
        // (initialising, fault, maintenance): keep the peer's flows ready.
        _ => SyncRole::Receiver,
    }
}

/// Follows vrrpd's WatchState stream, publishing the implied role; waits
/// for vrrpd when it is not running and reconnects when it restarts (the
/// last role stays in force meanwhile).
pub async fn follow_vrrpd(
    runtime_dir: PathBuf,
    role: watch::Sender<SyncRole>,
    mut shutdown: Shutdown,
) {
    let mut announced_wait = false;
    loop {
        let stream = async {
            let channel = tandem_runtime::connect(&runtime_dir, "vrrpd").await?;
            let stream = VrrpdClient::new(channel)
                .watch_state(tandem_proto::v1::WatchStateRequest {})
                .await?
                .into_inner();
            Ok::<_, anyhow::Error>(stream)
        };
        let mut stream = tokio::select! {
            s = stream => s,
            () = shutdown.wait() => return,
        };
        match &mut stream {
            Ok(stream) => {
                tracing::info!("following vrrpd's state for the sync direction");
                announced_wait = false;
                loop {
                    let next = tokio::select! {
                        n = stream.message() => n,
                        () = shutdown.wait() => return,
                    };
                    match next {
                        Ok(Some(change)) => {
                            let r = role_of(change.new_state());
                            role.send_if_modified(|old| {
                                let changed = *old != r;
                                *old = r;
                                changed
                            });
                        }
                        Ok(None) | Err(_) => {
                            tracing::warn!(
                                "vrrpd's state stream ended; the sync direction stays as it is until vrrpd is back"
                            );
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                if !announced_wait {
                    tracing::info!("waiting for vrrpd to learn the sync direction: {e:#}");
                    announced_wait = true;
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
            () = shutdown.wait() => return,
        }
    }
}
