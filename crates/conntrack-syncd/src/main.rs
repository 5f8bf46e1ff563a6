//! conntrack-syncd — replicates the kernel's connection-tracking table to the peer so established connections survive a failover.

mod api;

use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use conntrack_syncd::engine::{Engine, Mechanisms, Snapshot};
use conntrack_syncd::kernel::Mode;
use conntrack_syncd::priority::Priority;
use tandem_proto::v1::{SyncRole, conntrack_sync_server::ConntrackSyncServer};
use tandem_runtime::{ConfigCell, DaemonArgs};
use tokio::sync::{mpsc, watch};
use tonic::transport::Server;

/// Tandem's connection-state replication daemon (ctnetlink to the peer over UDP).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    daemon: DaemonArgs,
    /// Where the peer's entries go: into the kernel table as they arrive
    /// (inject, the default), or into a cache committed on becoming master
    /// (cache: slower failover, kept for comparison).
    #[arg(long, value_enum, default_value_t = ModeArg::Inject)]
    mode: ModeArg,
    /// Scheduling niceness while replication falls behind (a turn of the
    /// loop finds more kernel events or datagrams waiting than it takes, the
    /// peer acknowledges a tenth of the lag threshold late or more, or the
    /// peer sends full datagrams: it has a backlog),
    /// until it has caught up for 2 s: -20 (most favoured) to 19; not below
    /// the niceness it was started with: never changed. Favoured all the
    /// time, the daemon wakes for every few events and in the bench cost
    /// the datapath twice the CPU per connection; never favoured, a node
    /// whose CPUs are saturated starves it and the peer's copies lag
    /// seconds behind (docs/conntrack-syncd.md, Figures).
    #[arg(long, default_value_t = -10, allow_negative_numbers = true, value_parser = clap::value_parser!(i32).range(-20..=19))]
    nice: i32,
    /// Switches a protection off, for the tests that prove it (each fault
    /// test runs once as shipped and once without its mechanism, which must
    /// fail). Never for production.
    #[arg(long, value_enum, hide = true, value_delimiter = ',')]
    without: Vec<MechanismArg>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum MechanismArg {
    EpochHandshake,
    BothWays,
    ExactResync,
    FarmFilter,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ModeArg {
    Inject,
    Cache,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mode = match args.mode {
        ModeArg::Inject => Mode::Inject,
        ModeArg::Cache => Mode::Cache,
    };
    let off = |m| args.without.contains(&m);
    let mechanisms = Mechanisms {
        epoch_handshake: !off(MechanismArg::EpochHandshake),
        both_ways: !off(MechanismArg::BothWays),
        exact_resync: !off(MechanismArg::ExactResync),
        farm_filter: !off(MechanismArg::FarmFilter),
    };
    if !args.without.is_empty() {
        eprintln!(
            "conntrack-syncd: running WITHOUT {:?} (a test control, not for production)",
            args.without
        );
    }
    tandem_runtime::run("conntrack-syncd", args.daemon, |ctx| async move {
        let config = ConfigCell::load(ctx.daemon, ctx.config_dir())?;
        config.reload_on_sighup(&ctx);
        let (snapshot_tx, snapshot) = watch::channel(Snapshot::default());
        let registry = conntrack_syncd::metrics::registry(snapshot.clone());
        tandem_runtime::metrics::spawn(
            ctx.daemon,
            &config,
            std::sync::Arc::new(registry),
            ctx.shutdown(),
        );
        let (commands_tx, commands) = mpsc::channel(16);
        let (role_tx, vrrp_role) = watch::channel(SyncRole::Unspecified);
        let follower = tokio::spawn(conntrack_syncd::role::follow_vrrpd(
            ctx.runtime_dir().to_owned(),
            role_tx,
            ctx.shutdown(),
        ));
        let engine = tokio::spawn(
            Engine {
                config: config.clone(),
                config_dir: ctx.config_dir().to_owned(),
                mode,
                mechanisms,
                commands,
                snapshot: snapshot_tx,
                vrrp_role,
                shutdown: ctx.shutdown(),
                priority: Priority::new(Some(args.nice), conntrack_syncd::priority::current()),
            }
            .run(),
        );
        let api = api::ConntrackSyncApi {
            config,
            snapshot,
            commands: commands_tx,
        };
        let served = ctx
            .serve(Server::builder().add_service(ConntrackSyncServer::new(api)))
            .await;
        ctx.trigger_shutdown();
        let _ = engine.await;
        let _ = follower.await;
        served
    })
}
