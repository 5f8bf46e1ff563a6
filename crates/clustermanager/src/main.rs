//! clustermanager — the cluster lifecycle, the node table, role orchestration and command replication.

mod api;
mod auth;
mod conductor;
mod control_api;
mod create;
mod destroy;
mod edit;
mod hooks;
mod local;
mod node_table;
mod orchestrate;
mod peer;
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

    /// The authorized_keys file of this node's sshd that holds the cluster
    /// key (default: <config-dir>/ssh/authorized_keys, node-local, never
    /// replicated; sshd reads it through the drop-in
    /// /etc/ssh/sshd_config.d/tandem.conf the package ships).
    #[arg(long, value_name = "FILE")]
    authorized_keys: Option<PathBuf>,

    /// The same file on the peer (default:
    /// <peer-config-dir>/ssh/authorized_keys).
    #[arg(long, value_name = "FILE")]
    peer_authorized_keys: Option<PathBuf>,

    /// This node's sshd configuration, as `sshd -T -f` reads it (cluster
    /// create checks that sshd reads the cluster's authorized_keys).
    #[arg(long, value_name = "FILE", default_value = "/etc/ssh/sshd_config")]
    sshd_config: PathBuf,

    /// The peer's sshd configuration.
    #[arg(long, value_name = "FILE", default_value = "/etc/ssh/sshd_config")]
    peer_sshd_config: PathBuf,

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
    // Before logging starts: see tandem_ssh::probe_memory_lock (a unit that
    // forbids mlock must not produce a warning at every start).
    let memory_lock = tandem_ssh::probe_memory_lock();
    let daemon = args.daemon.clone();
    tandem_runtime::run("clustermanager", daemon, |ctx| async move {
        if let Err(e) = memory_lock {
            tracing::debug!(
                "memory locking is not permitted here (mlock: {e}): SSH session keys are in ordinary memory"
            );
        }
        let config = ConfigCell::load(ctx.daemon, ctx.config_dir())?;
        config.reload_on_sighup(&ctx);
        let config_dir = std::path::absolute(ctx.config_dir())
            .context("resolving the configuration directory")?;
        let create = create::CreateContext {
            config_dir: config_dir.clone(),
            runtime_dir: ctx.runtime_dir().to_owned(),
            peer_config_dir: args.peer_config_dir.clone(),
            peer_runtime_dir: args.peer_runtime_dir.clone(),
            peer_bin_dir: args.peer_bin_dir,
            authorized_keys: args
                .authorized_keys
                .unwrap_or_else(|| config_dir.join(create::AUTHORIZED_KEYS)),
            peer_authorized_keys: args
                .peer_authorized_keys
                .clone()
                .unwrap_or_else(|| args.peer_config_dir.join(create::AUTHORIZED_KEYS)),
            sshd_config: args.sshd_config,
            peer_sshd_config: args.peer_sshd_config,
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
        // Opt-in TCP listener with TLS and API keys (node.toml control_listen).
        control_api::spawn(
            shared.clone(),
            create.clone(),
            ctx.state_dir().to_owned(),
            ctx.shutdown(),
        );
        tokio::spawn(conductor::run(shared.clone(), ctx.shutdown()));
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
