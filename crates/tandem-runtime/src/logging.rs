use tracing_subscriber::{EnvFilter, layer::SubscriberExt, util::SubscriberInitExt};

/// Logs to journald with structured fields when systemd started us (it sets
/// `JOURNAL_STREAM` for a unit whose output goes to the journal), otherwise as
/// readable text on stderr. The level comes from `RUST_LOG` (default `info`).
pub fn init_logging(daemon: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        match tracing_journald::layer() {
            Ok(layer) => {
                let layer = layer.with_syslog_identifier(daemon.to_owned());
                let _ = registry.with(layer).try_init();
                return;
            }
            Err(e) => {
                eprintln!("{daemon}: journald is not reachable ({e}); logging to stderr");
            }
        }
    }
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = registry
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(ansi)
                .with_target(false),
        )
        .try_init();
}
