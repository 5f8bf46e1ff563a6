//! conntrack-syncd — replicates the kernel's connection-tracking table to the peer so established connections survive a failover.

mod api;

use std::process::ExitCode;

use clap::Parser;
use tandem_proto::v1::conntrack_sync_server::ConntrackSyncServer;
use tandem_runtime::DaemonArgs;
use tonic::transport::Server;

/// Tandem's connection-state replication daemon (ctnetlink to the peer over UDP).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    daemon: DaemonArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tandem_runtime::run("conntrack-syncd", args.daemon, |ctx| async move {
        ctx.load_and_serve(|config| {
            Server::builder()
                .add_service(ConntrackSyncServer::new(api::ConntrackSyncApi { config }))
        })
        .await
    })
}
