//! cfg-syncd — replicates the replicated configuration trees to the peer over SSH, in real time.

mod api;
mod apply;
mod manifest;
mod metrics;
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
use tokio::sync::{Notify, mpsc, watch};
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

fn main() -> ExitCode {
    let args = Args::parse();
    let daemon = args.daemon.clone();
    tandem_runtime::run("cfg-syncd", daemon, |ctx| async move {
        let config = ConfigCell::load(ctx.daemon, ctx.config_dir())?;
        config.reload_on_sighup(&ctx);
        let config_dir = std::path::absolute(ctx.config_dir())
            .context("resolving the configuration directory")?;
        // Whatever is staged now was interrupted: it never reaches the live tree.
        match apply::clean_staging(&config_dir) {
            Ok(0) => {}
            Ok(n) => tracing::info!(batches = n, "removed interrupted staging batches"),
            Err(e) => tracing::warn!(error = %e, "could not clean the staging directory"),
        }
        let explicit = args.direction.map(|d| match d {
            Direction::Push => SyncDirection::Push,
            Direction::Receive => SyncDirection::Receive,
            Direction::None => SyncDirection::None,
        });
        let shared = Arc::new(sync::Shared {
            config,
            config_dir: config_dir.clone(),
            runtime_dir: ctx.runtime_dir().to_owned(),
            peer_config_dir: args.peer_config_dir,
            peer_runtime_dir: args.peer_runtime_dir,
            explicit: Mutex::new(explicit),
            from_vrrpd: Mutex::new(None),
            direction: watch::channel(SyncDirection::None).0,
            paused: watch::channel(false).0,
            sync_now: Notify::new(),
            status: Mutex::default(),
            apply_lock: tokio::sync::Mutex::new(()),
            scanner: Mutex::default(),
        });
        shared.update_direction();
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
