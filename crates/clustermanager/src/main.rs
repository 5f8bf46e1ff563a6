//! clustermanager — the cluster lifecycle, the node table, role orchestration and command replication.

mod api;
mod create;
mod destroy;
mod edit;
mod hooks;
mod local;
mod node_table;
mod orchestrate;
mod peer;
mod preflight;
mod replicate;
mod state;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use tandem_proto::v1::cluster_manager_server::ClusterManagerServer;
use tandem_runtime::{ConfigCell, DaemonArgs};
use tonic::transport::Server;

/// Tandem's cluster manager: the operator's entry point and the daemons' conductor.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    daemon: DaemonArgs,

    /// The peer's runtime directory (where its clustermanager.sock is),
    /// reached through SSH.
    #[arg(long, value_name = "DIR", default_value = "/run/tandem")]
    peer_runtime_dir: PathBuf,

    /// The peer's configuration directory (cluster create and destroy).
    #[arg(long, value_name = "DIR", default_value = tandem_config::DEFAULT_CONFIG_DIR)]
    peer_config_dir: PathBuf,

    /// Where the peer's Tandem binaries are (cluster create's preflight).
    #[arg(long, value_name = "DIR", default_value = "/usr/bin")]
    peer_bin_dir: PathBuf,

    /// root's authorized_keys on this node (the cluster key is added there).
    #[arg(
        long,
        value_name = "FILE",
        default_value = "/root/.ssh/authorized_keys"
    )]
    authorized_keys: PathBuf,

    /// root's authorized_keys on the peer.
    #[arg(
        long,
        value_name = "FILE",
        default_value = "/root/.ssh/authorized_keys"
    )]
    peer_authorized_keys: PathBuf,

    /// This node's sshd host key, public part (pinned on the peer).
    #[arg(
        long,
        value_name = "FILE",
        default_value = "/etc/ssh/ssh_host_ed25519_key.pub"
    )]
    host_key_pub: PathBuf,

    /// Run on the peer once its configuration is in place ("" for nothing).
    #[arg(
        long,
        value_name = "COMMAND",
        default_value = "systemctl start tandem.target"
    )]
    peer_start_command: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let daemon = args.daemon.clone();
    tandem_runtime::run("clustermanager", daemon, |ctx| async move {
        let config = ConfigCell::load(ctx.daemon, ctx.config_dir())?;
        config.reload_on_sighup(&ctx);
        let config_dir = std::path::absolute(ctx.config_dir())
            .context("resolving the configuration directory")?;
        let create = create::CreateContext {
            config_dir: config_dir.clone(),
            runtime_dir: ctx.runtime_dir().to_owned(),
            peer_config_dir: args.peer_config_dir,
            peer_runtime_dir: args.peer_runtime_dir.clone(),
            peer_bin_dir: args.peer_bin_dir,
            authorized_keys: args.authorized_keys,
            peer_authorized_keys: args.peer_authorized_keys,
            host_key_pub: args.host_key_pub,
            peer_start_command: args.peer_start_command,
            ..create::CreateContext::new(config_dir.clone(), ctx.runtime_dir().to_owned())
        };
        let peer = peer::PeerLink::new(config_dir.clone(), args.peer_runtime_dir);
        let shared = Arc::new(state::Shared::new(
            config,
            config_dir,
            ctx.runtime_dir().to_owned(),
            peer,
        ));
        // Opt-in /metrics (node.toml metrics_listen, port + 4): build info.
        tandem_runtime::metrics::spawn(
            ctx.daemon,
            &shared.config,
            Arc::new(tandem_runtime::metrics::registry("clustermanager")),
            ctx.shutdown(),
        );
        tokio::spawn(orchestrate::run(shared.clone(), ctx.shutdown()));
        tokio::spawn(node_table::watch_health(shared.clone(), ctx.shutdown()));
        // node.toml [hooks]: off the failover path (see hooks.rs).
        tokio::spawn(hooks::run(shared.clone(), ctx.shutdown()));
        let served = ctx
            .serve(Server::builder().add_service(ClusterManagerServer::new(
                api::ClusterManagerApi {
                    shared: shared.clone(),
                    create,
                },
            )))
            .await;
        shared.peer.close().await;
        served
    })
}
