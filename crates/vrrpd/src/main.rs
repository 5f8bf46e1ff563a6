//! vrrpd — the cluster's heartbeat: VRRP election, floating IPs, tracked
//! interfaces and maintenance (RFC 5798).

mod api;

use std::process::ExitCode;

use clap::Parser;
use tandem_proto::v1::vrrpd_server::VrrpdServer;
use tandem_runtime::{ConfigCell, DaemonArgs};
use tonic::transport::Server;
use vrrpd::router::{self, Shared};

/// Tandem's VRRP daemon: elects the master and moves the floating IPs.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    daemon: DaemonArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tandem_runtime::run("vrrpd", args.daemon, |ctx| async move {
        let config = ConfigCell::load(ctx.daemon, ctx.config_dir())?;
        config.reload_on_sighup(&ctx);
        let shared = Shared::new();
        let registry = vrrpd::metrics::registry(&shared, ctx.shutdown());
        tandem_runtime::metrics::spawn(
            ctx.daemon,
            &config,
            std::sync::Arc::new(registry),
            ctx.shutdown(),
        );
        let router = tokio::spawn(router::supervise(
            config.clone(),
            shared.clone(),
            ctx.shutdown(),
        ));
        let api = api::VrrpdApi {
            config,
            shared,
            shutdown: ctx.shutdown(),
        };
        let served = ctx
            .serve(Server::builder().add_service(VrrpdServer::new(api)))
            .await;
        // The router says goodbye (priority 0, floating IPs released) before we exit.
        ctx.trigger_shutdown();
        router.await?;
        served
    })
}
