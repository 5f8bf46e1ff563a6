//! tandemctl — the operator's CLI for a Tandem cluster.

mod config_check;
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
                    Command::Config { .. } => unreachable!("handled above"),
                };
                result.unwrap_or_else(|e| {
                    eprintln!("tandemctl: {e:#}");
                    ExitCode::FAILURE
                })
            })
        }
    }
}
