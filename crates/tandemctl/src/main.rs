//! tandemctl — the operator's CLI for a Tandem cluster.

mod ack;
mod cluster;
mod cluster_create;
mod completions;
mod config_check;
mod farms;
mod membership;
mod remote;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Drive and inspect a Tandem load-balancer node.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    /// Where the daemons' gRPC sockets live.
    #[arg(long, global = true, value_name = "DIR", env = "TANDEM_RUNTIME_DIR", default_value = tandem_runtime::DEFAULT_RUNTIME_DIR)]
    runtime_dir: PathBuf,

    /// The configuration directory (for config, save, restore, clear).
    #[arg(long, global = true, value_name = "DIR", env = "TANDEM_CONFIG_DIR", default_value = tandem_config::DEFAULT_CONFIG_DIR)]
    config_dir: PathBuf,

    /// Talk to this node's control API over TLS instead of the local
    /// socket (node.toml `control_listen`); needs --api-key-file and
    /// --fingerprint.
    #[arg(long, global = true, value_name = "HOST:PORT", env = "TANDEM_REMOTE")]
    remote: Option<String>,

    /// With --remote: the file holding the API key's token.
    #[arg(long, global = true, value_name = "FILE", env = "TANDEM_API_KEY_FILE")]
    api_key_file: Option<PathBuf>,

    /// With --remote: the SHA-256 fingerprint of the control API's
    /// certificate, which must match (`SHA256:<64 hex digits>`).
    #[arg(
        long,
        global = true,
        value_name = "SHA256:HEX",
        env = "TANDEM_FINGERPRINT"
    )]
    fingerprint: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Ask every daemon of this node for its status and print a table.
    /// Exits 3 when a daemon is not running, 4 when this node is red
    /// (failure), 5 when it is yellow (degraded: replication lagging, a
    /// foreign VRRP speaker, configuration set aside or refused); 0 when it
    /// is green, or orange (maintenance).
    Status {
        /// Print JSON (one object per daemon) instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Ask the running daemons to reload their configuration.
    Reload {
        /// Only this daemon (default: every running daemon).
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(tandem_proto::DAEMONS))]
        daemon: Option<String>,
    },
    /// Farms (virtual services), like ipvsadm.
    Farm {
        #[command(subcommand)]
        command: FarmCommand,
    },
    /// A backend of a farm.
    Backend {
        #[command(subcommand)]
        command: BackendCommand,
    },
    /// The connection table (ipvsadm -L -n -c).
    Conn {
        #[command(subcommand)]
        command: ConnCommand,
    },
    /// The cluster: its settings and its nodes.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// A node of the cluster.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Print the shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell to complete in.
        shell: clap_complete::Shell,
    },
    /// API keys of the control API.
    ApiKey {
        #[command(subcommand)]
        command: ApiKeyCommand,
    },
    /// Names for shell completion: farms, nodes, daemons or backend states
    /// (used by the completion scripts).
    #[command(hide = true, name = "__complete")]
    Complete {
        /// farms, nodes, daemons or states.
        kind: String,
    },
}

#[derive(Debug, Subcommand)]
enum ApiKeyCommand {
    /// Make a new random token: prints it once (or writes it to --out) and
    /// the `[[api_keys]]` entry to paste into node.toml.
    New {
        /// The key's name, logged with every admin call it makes.
        name: String,
        /// What the key may do.
        #[arg(long, value_enum, default_value = "read")]
        role: remote::KeyRole,
        /// Write the token to this new file (mode 0600) instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Run on the future master: join the peer over SSH (its root password,
    /// asked once), check the pair, erase the peer's configuration, sync.
    /// With --node (repeated): an active-active cluster of 3-8 nodes, this
    /// one the leader.
    Create(cluster_create::CreateArgs),
    /// Active-active, on the leader: a standalone node joins the cluster.
    AddNode(membership::AddNodeArgs),
    /// Active-active, on the leader: a node leaves the cluster (its VIPs
    /// withdrawn first) and becomes standalone.
    RemoveNode(membership::RemoveNodeArgs),
    /// Both nodes standalone again; the node that serves keeps the VIPs.
    Destroy(cluster_create::DestroyArgs),
    /// Interface, failback, check interval, tracked interfaces, floating IPs.
    Show {
        /// Print JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Both nodes: role, IP, hostname, status (green, orange, grey, red) and why.
    Nodes {
        /// Print JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Acknowledge the local changes this node set aside when the peer's
    /// configuration replaced them (listed in `cluster nodes` until then);
    /// the files stay in their set-aside directory.
    Ack {
        /// Set-aside directories to acknowledge (default: every one listed).
        #[arg(value_name = "DIRECTORY")]
        directories: Vec<String>,
    },
    /// Change cluster settings on the master; replicated to the backup.
    Edit {
        /// `none` or the preferred master's node name.
        #[arg(long, value_name = "none|NODE")]
        failback: Option<String>,
        /// The heartbeat (VRRP advertisement) interval.
        #[arg(long, value_name = "MS")]
        check_interval: Option<u32>,
        /// Interfaces whose loss makes a node give up mastership (comma
        /// separated; an empty string clears the list).
        #[arg(long, value_name = "IF,..")]
        tracked: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Put a node in maintenance (a master hands over first) or take it out.
    Maintenance {
        #[command(subcommand)]
        action: MaintenanceAction,
    },
}

#[derive(Debug, Subcommand)]
enum MaintenanceAction {
    /// Into maintenance: a master hands its VIPs over first.
    Enable {
        /// The node (default: this node).
        node: Option<String>,
        /// Why, for the logs and the node table.
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
    /// Out of maintenance: the node serves again as backup (or master).
    Disable {
        /// The node (default: this node).
        node: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum FarmCommand {
    /// Add a farm from a farm file (through the master; replicated).
    Add {
        /// The farm file (TOML, as in farms/NAME.toml).
        file: PathBuf,
    },
    /// Replace a farm with a farm file (through the master; replicated).
    Edit {
        /// The farm file (TOML, as in farms/NAME.toml).
        file: PathBuf,
    },
    /// Delete a farm (through the master; replicated).
    Delete {
        /// The farm's name.
        name: String,
    },
    /// Farms and backends with state, health and active connections (ipvsadm -L -n).
    List {
        /// Machine-readable output (every field of every farm).
        #[arg(long)]
        json: bool,
        /// Rates instead: connections, packets and bytes per second (ipvsadm --rate).
        #[arg(long)]
        rate: bool,
    },
    /// Packet, byte and connection counters read from the kernel (ipvsadm -L --stats).
    Stats {
        /// Machine-readable output (every field of every farm).
        #[arg(long)]
        json: bool,
        /// Rates instead: connections, packets and bytes per second (ipvsadm --rate).
        #[arg(long)]
        rate: bool,
    },
    /// Every farm as one TOML document (or JSON), for `farm restore`.
    Save {
        /// Print JSON instead of TOML.
        #[arg(long)]
        json: bool,
    },
    /// Replace every farm with those of a saved document (FILE or stdin),
    /// through the master, replicated; the whole configuration is validated
    /// first, nothing changes if invalid; unchanged farm files are kept.
    Restore {
        /// The saved document (default: read stdin).
        file: Option<PathBuf>,
    },
    /// Remove every farm (ipvsadm -C), through the master, replicated.
    Clear {
        /// Confirm.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ConnCommand {
    /// Every live connection of the farms, with farm and backend (ipvsadm -L -n -c).
    List {
        /// Only this farm's connections.
        #[arg(long)]
        farm: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum BackendCommand {
    /// Set a backend's state: up, down, drain (no new connections) or maintenance.
    Set {
        /// The farm's name.
        farm: String,
        /// ADDRESS or ADDRESS:PORT ([v6]:PORT).
        backend: String,
        /// The new state.
        #[arg(value_parser = ["up", "down", "drain", "maintenance"])]
        state: String,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a configuration directory; print every error, or `ok`.
    Check {
        /// The configuration directory (default: --config-dir, or
        /// TANDEM_CONFIG_DIR, or /etc/tandem).
        dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    // A closed stdout (`tandemctl status | head -1`) ends the process
    // quietly with SIGPIPE, as other Unix tools do (exit 141 in a shell),
    // instead of a panic in println!.
    // SAFETY: restoring the default disposition of one signal, before any
    // thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    if let Some(address) = &cli.remote {
        match remote::from_flags(
            address,
            cli.api_key_file.as_deref(),
            cli.fingerprint.as_deref(),
        ) {
            Ok(r) => remote::set(r),
            Err(e) => {
                eprintln!("tandemctl: {e:#}");
                return ExitCode::from(2);
            }
        }
    }
    match cli.command {
        Command::Config {
            command: ConfigCommand::Check { dir },
        } => config_check::run(dir.as_deref().unwrap_or(&cli.config_dir)),
        Command::Completions { shell } => completions::run(shell),
        Command::ApiKey {
            command: ApiKeyCommand::New { name, role, out },
        } => remote::new_key(&name, role, out.as_ref()).unwrap_or_else(|e| {
            eprintln!("tandemctl: {e:#}");
            ExitCode::FAILURE
        }),
        command => {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("tandemctl: starting the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(async move {
                if let Some(what) = local_only(&command)
                    && let Err(e) = remote::local_only(what)
                {
                    eprintln!("tandemctl: {e:#}");
                    return ExitCode::from(2);
                }
                let result = match command {
                    Command::Status { json } => status::run(&cli.runtime_dir, json).await,
                    Command::Reload { daemon } => {
                        status::reload(&cli.runtime_dir, daemon.as_deref()).await
                    }
                    Command::Farm { command } => match command {
                        FarmCommand::List { json, rate } => {
                            let view = if rate {
                                farms::View::Rate
                            } else {
                                farms::View::List
                            };
                            farms::list(&cli.runtime_dir, json, view).await
                        }
                        FarmCommand::Stats { json, rate } => {
                            let view = if rate {
                                farms::View::Rate
                            } else {
                                farms::View::Stats
                            };
                            farms::list(&cli.runtime_dir, json, view).await
                        }
                        FarmCommand::Save { json } => farms::save(&cli.config_dir, json),
                        FarmCommand::Restore { file } => {
                            farms::restore(&cli.config_dir, &cli.runtime_dir, file.as_deref()).await
                        }
                        FarmCommand::Clear { yes } => {
                            farms::clear(&cli.config_dir, &cli.runtime_dir, yes).await
                        }
                        FarmCommand::Add { file } => {
                            cluster::farm_put(&cli.config_dir, &cli.runtime_dir, &file, false).await
                        }
                        FarmCommand::Edit { file } => {
                            cluster::farm_put(&cli.config_dir, &cli.runtime_dir, &file, true).await
                        }
                        FarmCommand::Delete { name } => {
                            cluster::farm_delete(&cli.config_dir, &cli.runtime_dir, &name).await
                        }
                    },
                    Command::Cluster { command } => match command {
                        ClusterCommand::Create(args) => {
                            cluster_create::create(&cli.runtime_dir, &args).await
                        }
                        ClusterCommand::AddNode(args) => {
                            membership::add_node(&cli.runtime_dir, &args).await
                        }
                        ClusterCommand::RemoveNode(args) => {
                            membership::remove_node(&cli.runtime_dir, &args).await
                        }
                        ClusterCommand::Destroy(args) => {
                            cluster_create::destroy(&cli.runtime_dir, &args).await
                        }
                        ClusterCommand::Show { json } => {
                            cluster::show(&cli.runtime_dir, json).await
                        }
                        ClusterCommand::Nodes { json } => {
                            cluster::nodes(&cli.runtime_dir, json).await
                        }
                        ClusterCommand::Ack { directories } => {
                            ack::run(&cli.runtime_dir, directories).await
                        }
                        ClusterCommand::Edit {
                            failback,
                            check_interval,
                            tracked,
                        } => {
                            cluster::edit(&cli.runtime_dir, failback, check_interval, tracked).await
                        }
                    },
                    Command::Node {
                        command: NodeCommand::Maintenance { action },
                    } => match action {
                        MaintenanceAction::Enable { node, reason } => {
                            cluster::maintenance(&cli.runtime_dir, true, node, reason).await
                        }
                        MaintenanceAction::Disable { node } => {
                            cluster::maintenance(&cli.runtime_dir, false, node, None).await
                        }
                    },
                    Command::Backend {
                        command:
                            BackendCommand::Set {
                                farm,
                                backend,
                                state,
                            },
                    } => {
                        farms::set_backend(
                            &cli.runtime_dir,
                            &cli.config_dir,
                            &farm,
                            &backend,
                            &state,
                        )
                        .await
                    }
                    Command::Complete { kind } => {
                        completions::names(&cli.config_dir, &cli.runtime_dir, &kind).await
                    }
                    Command::Conn {
                        command: ConnCommand::List { farm, json },
                    } => farms::connections(&cli.runtime_dir, farm.as_deref(), json).await,
                    Command::Config { .. }
                    | Command::Completions { .. }
                    | Command::ApiKey { .. } => {
                        unreachable!("handled above")
                    }
                };
                result.unwrap_or_else(|e| {
                    eprintln!("tandemctl: {e:#}");
                    ExitCode::FAILURE
                })
            })
        }
    }
}

/// Commands that read or write this node's own files or daemons, and so do
/// not run over --remote.
fn local_only(c: &Command) -> Option<&'static str> {
    match c {
        Command::Farm {
            command: FarmCommand::Stats { .. },
        } => Some("farm stats"),
        Command::Farm {
            command: FarmCommand::Save { .. },
        } => Some("farm save"),
        Command::Farm {
            command: FarmCommand::Restore { .. },
        } => Some("farm restore"),
        Command::Farm {
            command: FarmCommand::Clear { .. },
        } => Some("farm clear"),
        Command::Backend { .. } => Some("backend set"),
        Command::Conn { .. } => Some("conn list"),
        Command::Cluster {
            command: ClusterCommand::Create(_),
        } => Some("cluster create"),
        // Both ask for a root password and confirm host keys on the terminal.
        Command::Cluster {
            command: ClusterCommand::AddNode(_),
        } => Some("cluster add-node"),
        Command::Cluster {
            command: ClusterCommand::Ack { .. },
        } => Some("cluster ack"),
        _ => None,
    }
}
