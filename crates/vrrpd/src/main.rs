//! vrrpd — the cluster's heartbeat: VRRP election, floating IPs, tracked
//! interfaces and maintenance (RFC 5798).

mod api;

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use tandem_proto::v1::vrrpd_server::VrrpdServer;
use tandem_runtime::{ConfigCell, DaemonArgs};
use tonic::transport::Server;
use vrrpd::maintenance::MaintenanceFile;
use vrrpd::router::{self, Maintenance, Shared};

/// Tandem's VRRP daemon: elects the master and moves the floating IPs.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    daemon: DaemonArgs,
}

fn main() -> ExitCode {
    // The floating-IP guard vrrpd starts for itself (see guard.rs).
    if std::env::args().nth(1).as_deref() == Some(vrrpd::guard::GUARD_ARG) {
        return vrrpd::guard::run();
    }
    let args = Args::parse();
    tandem_runtime::run("vrrpd", args.daemon, |ctx| async move {
        let config = ConfigCell::load(ctx.daemon, ctx.config_dir())?;
        config.reload_on_sighup(&ctx);
        let file = MaintenanceFile::new(ctx.state_dir());
        let operator = match file.load() {
            Ok(on) => on,
            Err(e) => {
                tracing::error!(
                    "cannot read the maintenance state {}: {e}; starting as if maintenance were off",
                    file.path().display()
                );
                false
            }
        };
        if operator {
            tracing::info!(
                "maintenance is on (kept in {}): this node stays out of the election until `tandemctl node maintenance disable`",
                file.path().display()
            );
        }
        let shared = Shared::with_maintenance(Maintenance {
            operator,
            hold: false,
        });
        let registry = vrrpd::metrics::registry(&shared, ctx.shutdown());
        tandem_runtime::metrics::spawn(
            ctx.daemon,
            &config,
            std::sync::Arc::new(registry),
            ctx.shutdown(),
        );
        let router = router::spawn(config.clone(), shared.clone(), ctx.shutdown())
            .context("starting the VRRP router thread")?;
        let api = api::VrrpdApi {
            config,
            shared,
            maintenance_file: file,
        };
        let served = ctx
            .serve(Server::builder().add_service(VrrpdServer::new(api)))
            .await;
        // A master hands over (priority 0, floating IPs kept until the peer
        // has taken over) before the router thread ends.
        ctx.trigger_shutdown();
        tokio::task::spawn_blocking(move || router.join())
            .await
            .context("waiting for the VRRP router thread")?
            .map_err(|_| anyhow::anyhow!("the VRRP router thread panicked"))?;
        served
    })
}
