//! routed — announces an active-active node's VIPs to its routers through
//! BIRD (BGP with BFD), and withdraws them when the node should not get
//! traffic.

mod api;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use routed::control::Control;
use routed::engine::{Engine, Snapshot};
use routed::forwarder::Forwarder;
use tandem_proto::v1::routed_server::RoutedServer;
use tandem_runtime::{ConfigCell, DaemonArgs};
use tokio::sync::watch;
use tonic::transport::Server;

/// Tandem's routing daemon: drives BIRD to announce this node's VIPs.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    daemon: DaemonArgs,

    /// BIRD's configuration file, which routed writes [default: <runtime-dir>/bird.conf].
    #[arg(long, value_name = "FILE", env = "TANDEM_BIRD_CONFIG")]
    bird_config: Option<PathBuf>,

    /// BIRD's control socket [default: <runtime-dir>/bird.ctl].
    #[arg(long, value_name = "FILE", env = "TANDEM_BIRD_SOCKET")]
    bird_socket: Option<PathBuf>,

    /// How long an unanswering lb-forwarder is trusted before the VIPs are
    /// withdrawn (its kernel rules keep serving while it restarts).
    #[arg(long, value_name = "MS", default_value_t = 3000)]
    forwarder_grace_ms: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = args.daemon.runtime_dir.clone();
    let bird_config = args
        .bird_config
        .unwrap_or_else(|| runtime.join("bird.conf"));
    let bird_socket = args.bird_socket.unwrap_or_else(|| runtime.join("bird.ctl"));
    let grace = Duration::from_millis(args.forwarder_grace_ms);
    tandem_runtime::run("routed", args.daemon, |ctx| async move {
        let config = ConfigCell::load(ctx.daemon, ctx.config_dir())?;
        config.reload_on_sighup(&ctx);
        let persisted = routed::maintenance::load(ctx.state_dir());
        if let Some(why) = &persisted {
            tracing::info!(node = %config.current().config.node.name, reason = %why, "in maintenance (kept from before the restart): no VIP is announced");
        }
        let (maintenance_tx, maintenance_rx) = watch::channel(persisted);
        let (snapshot_tx, snapshot_rx) = watch::channel(Snapshot::default());
        let mut engine = Engine::new(
            bird_config.clone(),
            Control::new(&bird_socket, Duration::from_secs(2)),
            Forwarder::new(ctx.runtime_dir()),
            grace,
            config.subscribe(),
            maintenance_rx,
            snapshot_tx,
        );
        // BIRD's unit starts after routed is ready: its file is there by then.
        engine.prime();
        let engine = tokio::spawn(engine.run(ctx.shutdown()));
        let api = api::RoutedApi {
            config,
            snapshot: snapshot_rx,
            maintenance: maintenance_tx,
            state_dir: ctx.state_dir().to_owned(),
            bird_config,
        };
        let served = ctx
            .serve(Server::builder().add_service(RoutedServer::new(api)))
            .await;
        ctx.trigger_shutdown();
        engine.await?;
        served
    })
}
