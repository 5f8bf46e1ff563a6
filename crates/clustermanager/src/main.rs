//! clustermanager — the cluster lifecycle, the node table, role orchestration and command replication.

mod api;

use std::process::ExitCode;

use clap::Parser;
use tandem_proto::v1::cluster_manager_server::ClusterManagerServer;
use tandem_runtime::DaemonArgs;
use tonic::transport::Server;

/// Tandem's cluster manager: the operator's entry point and the daemons' conductor.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    daemon: DaemonArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tandem_runtime::run("clustermanager", args.daemon, |ctx| async move {
        ctx.load_and_serve(|config| {
            Server::builder()
                .add_service(ClusterManagerServer::new(api::ClusterManagerApi { config }))
        })
        .await
    })
}
