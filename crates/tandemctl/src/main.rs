//! tandemctl — the operator's CLI for a Tandem cluster.

mod ack;
mod cluster;
mod cluster_create;
mod completions;
mod config_check;
mod farms;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Drive and inspect a Tandem load-balancer node.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Where the daemons' gRPC sockets live.
    #[arg(long, global = true, value_name = "DIR", env = "TANDEM_RUNTIME_DIR", default_value = tandem_runtime::DEFAULT_RUNTIME_DIR)]
    runtime_dir: PathBuf,

    /// The configuration directory (for config, save, restore, clear).
    #[arg(long, global = true, value_name = "DIR", env = "TANDEM_CONFIG_DIR", default_value = tandem_config::DEFAULT_CONFIG_DIR)]
    config_dir: PathBuf,

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
        /// Machine-readable output.
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
    /// The cluster: its settings and its two nodes.
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
    Completions { shell: clap_complete::Shell },
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Run on the future master: join the peer over SSH (its root password,
    /// asked once), check the pair, erase the peer's configuration, sync.
    Create(cluster_create::CreateArgs),
    /// Both nodes standalone again; the node that serves keeps the VIPs.
    Destroy(cluster_create::DestroyArgs),
    /// Interface, failback, check interval, tracked interfaces, floating IPs.
    Show {
        #[arg(long)]
        json: bool,
    },
    /// Both nodes: role, IP, hostname, status (green, orange, grey, red) and why.
    Nodes {
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
    Enable {
        /// The node (default: this node).
        node: Option<String>,
    },
    Disable {
        /// The node (default: this node).
        node: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum FarmCommand {
    /// Add a farm from a farm file (through the master; replicated).
    Add { file: PathBuf },
    /// Replace a farm with a farm file (through the master; replicated).
    Edit { file: PathBuf },
    /// Delete a farm (through the master; replicated).
    Delete { name: String },
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
        #[arg(long)]
        json: bool,
    },
    /// Replace every farm with those of a saved document (FILE or stdin),
    /// through the master, replicated; the whole configuration is validated
    /// first, nothing changes if invalid; unchanged farm files are kept.
    Restore { file: Option<PathBuf> },
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
        farm: String,
        /// ADDRESS or ADDRESS:PORT ([v6]:PORT).
        backend: String,
        state: String,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a configuration directory; print every error, or `ok`.
    Check {
        /// The configuration directory.
        #[arg(default_value = tandem_config::DEFAULT_CONFIG_DIR)]
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Config {
            command: ConfigCommand::Check { dir },
        } => config_check::run(&dir),
        Command::Completions { shell } => completions::run(shell),
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
                        MaintenanceAction::Enable { node } => {
                            cluster::maintenance(&cli.runtime_dir, true, node).await
                        }
                        MaintenanceAction::Disable { node } => {
                            cluster::maintenance(&cli.runtime_dir, false, node).await
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
                    Command::Conn {
                        command: ConnCommand::List { farm, json },
                    } => farms::connections(&cli.runtime_dir, farm.as_deref(), json).await,
                    Command::Config { .. } | Command::Completions { .. } => {
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
