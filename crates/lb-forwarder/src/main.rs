//! lb-forwarder — farms (virtual services), backends, schedulers, health checks and the nftables kernel datapath that serves them.

mod api;

use std::process::ExitCode;

use clap::Parser;
use tandem_proto::v1::lb_forwarder_server::LbForwarderServer;
use tandem_runtime::DaemonArgs;
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
        ctx.load_and_serve(|config| {
            Server::builder().add_service(LbForwarderServer::new(api::LbForwarderApi { config }))
        })
        .await
    })
}
