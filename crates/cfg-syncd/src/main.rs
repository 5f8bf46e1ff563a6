//! cfg-syncd — replicates the replicated configuration trees to the peer over SSH, in real time.

mod api;

use std::process::ExitCode;

use clap::Parser;
use tandem_proto::v1::cfg_sync_server::CfgSyncServer;
use tandem_runtime::DaemonArgs;
use tonic::transport::Server;

/// Tandem's configuration replication daemon (watches /etc/tandem, pushes over SFTP).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    daemon: DaemonArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tandem_runtime::run("cfg-syncd", args.daemon, |ctx| async move {
        ctx.load_and_serve(|config| {
            Server::builder().add_service(CfgSyncServer::new(api::CfgSyncApi { config }))
        })
        .await
    })
}
