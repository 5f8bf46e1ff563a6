use std::path::PathBuf;

/// The arguments every daemon takes (flatten into the daemon's own parser).
#[derive(Debug, Clone, clap::Args)]
pub struct DaemonArgs {
    /// Directory holding node.toml, cluster.toml and farms/.
    #[arg(
        long,
        value_name = "DIR",
        env = "TANDEM_CONFIG_DIR",
        default_value = "/etc/tandem"
    )]
    pub config_dir: PathBuf,

    /// Directory for the daemons' gRPC sockets (<DIR>/<daemon>.sock, mode 0600).
    #[arg(long, value_name = "DIR", env = "TANDEM_RUNTIME_DIR", default_value = crate::DEFAULT_RUNTIME_DIR)]
    pub runtime_dir: PathBuf,

    /// Directory for state that outlives a restart or a reboot (maintenance,
    /// configuration set aside after a partition). Never replicated.
    #[arg(long, value_name = "DIR", env = "TANDEM_STATE_DIR", default_value = crate::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
}
