//! tandemctl — the operator's CLI for a Tandem cluster.

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
    /// Exits 3 when a daemon is not running.
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
    /// Print the shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
}

#[derive(Debug, Subcommand)]
enum FarmCommand {
    /// Farms and backends with state, health and active connections (ipvsadm -L -n).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Packet, byte and connection counters read from the kernel (ipvsadm -L --stats).
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// Every farm as one TOML document (or JSON), for `farm restore`.
    Save {
        #[arg(long)]
        json: bool,
    },
    /// Replace every farm with those of a saved document (FILE or stdin);
    /// the whole configuration is validated first, nothing changes if invalid.
    Restore { file: Option<PathBuf> },
    /// Remove every farm (ipvsadm -C).
    Clear {
        /// Confirm.
        #[arg(long)]
        yes: bool,
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
                        FarmCommand::List { json } => {
                            farms::list(&cli.runtime_dir, json, false).await
                        }
                        FarmCommand::Stats { json } => {
                            farms::list(&cli.runtime_dir, json, true).await
                        }
                        FarmCommand::Save { json } => farms::save(&cli.config_dir, json),
                        FarmCommand::Restore { file } => {
                            farms::restore(&cli.config_dir, &cli.runtime_dir, file.as_deref()).await
                        }
                        FarmCommand::Clear { yes } => {
                            farms::clear(&cli.config_dir, &cli.runtime_dir, yes).await
                        }
                    },
                    Command::Backend {
                        command:
                            BackendCommand::Set {
                                farm,
                                backend,
                                state,
                            },
                    } => farms::set_backend(&cli.runtime_dir, &farm, &backend, &state).await,
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
