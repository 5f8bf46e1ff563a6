//! cfg-syncd — replicates the replicated configuration trees to the peer over SSH, in real time.

mod api;
mod apply;
mod baseline;
mod fault;
mod journal;
mod manifest;
mod metrics;
mod nofollow;
mod scan;
mod set_aside;
mod sync;
mod transport;
mod watcher;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use tandem_proto::v1::{SyncDirection, cfg_sync_server::CfgSyncServer};
use tandem_runtime::{ConfigCell, DaemonArgs};
use tokio::sync::mpsc;
use tonic::transport::Server;

/// Tandem's configuration replication daemon (watches /etc/tandem, pushes over SFTP).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    daemon: DaemonArgs,

    /// Start in this direction instead of following the local vrrpd's role
    /// (clustermanager's SetDirection overrides it later).
    #[arg(long, value_enum)]
    direction: Option<Direction>,

    /// The peer's configuration directory.
    #[arg(long, value_name = "DIR", default_value = "/etc/tandem")]
    peer_config_dir: PathBuf,

    /// The peer's runtime directory (where its cfg-syncd.sock is).
    #[arg(long, value_name = "DIR", default_value = "/run/tandem")]
    peer_runtime_dir: PathBuf,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Direction {
    Push,
    Receive,
    None,
}

/// glibc gives every thread that allocates an arena of its own, and memory
/// freed in one arena is not reused by another: with the runtime's threads
/// a 100,000-file sync measured 160 MB of RSS for about 60 MB of live data.
/// Two arenas keep it within the 128 MB the design allows
/// (tests/cfgsync_scale.rs).
#[cfg(target_env = "gnu")]
fn limit_malloc_arenas() {
    // SAFETY: mallopt only tunes the allocator, and runs before any thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

#[cfg(not(target_env = "gnu"))]
fn limit_malloc_arenas() {}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let args = Args::parse();
    let daemon = args.daemon.clone();
    tandem_runtime::run("cfg-syncd", daemon, |ctx| async move {
        let config_dir = std::path::absolute(ctx.config_dir())
            .context("resolving the configuration directory")?;
        let state_dir =
            std::path::absolute(ctx.state_dir()).context("resolving the state directory")?;
        let faults = fault::Faults::from_env();
        if faults.any() {
            tracing::warn!(?faults, "test fault switches are on (debug build)");
        }

        // A batch committed before the last stop is completed before the
        // configuration is loaded: what loads is the batch's result.
        let mut scanner = scan::Scanner::default();
        let mut baseline = match baseline::Baseline::load(&state_dir) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "the record of the last sync is unreadable ({e}); local changes cannot be told apart until the next sync, so none are set aside before it");
                None
            }
        };
        let store = Mutex::new(set_aside::Store::load(&state_dir));
        let env = apply::Env {
            root: config_dir.clone(),
            state_dir: state_dir.clone(),
            faults,
        };
        let recovered = {
            let mut local = apply::Local {
                scanner: &mut scanner,
                baseline: &mut baseline,
                set_aside: &store,
            };
            apply::recover(&env, &mut local, scan::Caps::default())
        };
        let store = store.into_inner().unwrap_or_else(|p| p.into_inner());
        store.discard_partials(&[]);
        // Whatever else is staged was never committed: it never reaches the
        // live tree.
        match apply::clean_staging_except(&config_dir, None) {
            0 => {}
            n => tracing::info!(
                entries = n,
                "removed {n} uncommitted staging entries from {}/{}",
                config_dir.display(),
                manifest::STAGING_DIR
            ),
        }

        let config = ConfigCell::load(ctx.daemon, &config_dir)?;
        config.reload_on_sighup(&ctx);
        let explicit = args.direction.map(|d| match d {
            Direction::Push => SyncDirection::Push,
            Direction::Receive => SyncDirection::Receive,
            Direction::None => SyncDirection::None,
        });
        let shared = Arc::new(sync::Shared::new(sync::SharedInit {
            config,
            config_dir: config_dir.clone(),
            state_dir,
            runtime_dir: ctx.runtime_dir().to_owned(),
            peer_config_dir: args.peer_config_dir,
            peer_runtime_dir: args.peer_runtime_dir,
            explicit,
            scanner,
            baseline,
            set_aside: store,
            faults,
        }));
        shared.update_direction();
        {
            let listed = shared
                .set_aside
                .lock()
                .map(|s| s.listed().to_vec())
                .unwrap_or_default();
            for r in &listed {
                tracing::warn!(
                    directory = %r.directory.display(),
                    files = r.paths.len(),
                    "local changes set aside in {} are not acknowledged yet ({} files); `tandemctl cluster ack` clears this warning",
                    r.directory.display(),
                    r.paths.len()
                );
            }
        }
        if !recovered.is_empty() {
            let s = shared.clone();
            // Held until the journals are gone: a batch arriving meanwhile
            // must not replay them a second time.
            let one = shared.apply_lock.clone().try_lock_owned().ok();
            tokio::spawn(async move {
                let _one = one;
                for r in recovered {
                    api::finish_recovered(&s, r.applied).await;
                }
            });
        }
        let registry = metrics::registry(shared.clone());
        tandem_runtime::metrics::spawn(
            ctx.daemon,
            &shared.config,
            Arc::new(registry),
            ctx.shutdown(),
        );

        let (tx, rx) = mpsc::unbounded_channel();
        let watcher = watcher::watch(&config_dir, tx)
            .with_context(|| format!("watching {}", config_dir.display()))?;
        tokio::spawn(sync::Engine::new(shared.clone(), rx).run(watcher, ctx.shutdown()));
        tokio::spawn(sync::follow_vrrpd(shared.clone(), ctx.shutdown()));

        ctx.serve(Server::builder().add_service(CfgSyncServer::new(api::CfgSyncApi { shared })))
            .await
    })
}
