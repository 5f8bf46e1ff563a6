//! lb-forwarder — farms (virtual services), backends, schedulers, health
//! checks and the nftables kernel datapath that serves them.

mod api;

use std::collections::HashSet;
use std::process::ExitCode;

use clap::Parser;
use lb_forwarder::datapath::{self, Datapath};
use tandem_proto::v1::lb_forwarder_server::LbForwarderServer;
use tandem_runtime::{ConfigCell, DaemonArgs};
use tonic::transport::Server;

/// Tandem's load balancer: serves the farms through the kernel's nftables datapath.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    daemon: DaemonArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tandem_runtime::run("lb-forwarder", args.daemon, |ctx| async move {
        let config = ConfigCell::load(ctx.daemon, ctx.config_dir())?;
        config.reload_on_sighup(&ctx);
        let dp = Datapath::new();
        // Health checks feed this set of failing backends.
        let (_failing_tx, failing) = tokio::sync::watch::channel(HashSet::new());
        let datapath = tokio::spawn(datapath::run(
            config.clone(),
            dp.clone(),
            failing,
            ctx.shutdown(),
        ));
        let api = api::LbForwarderApi {
            config,
            datapath: dp,
        };
        let served = ctx
            .serve(Server::builder().add_service(LbForwarderServer::new(api)))
            .await;
        ctx.trigger_shutdown();
        datapath.await?;
        served
    })
}
