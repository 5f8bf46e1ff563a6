use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tandem_config::Config;
use tandem_proto::v1;
use tokio::sync::watch;

use crate::{Context, unix_ms};

/// A configuration that was validated as a whole and is now in force.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub generation: u64,
    pub loaded_at: SystemTime,
}

/// The result of a reload: applied, or refused with every error found (the
/// previous configuration stays in force).
#[derive(Debug, Clone)]
pub enum ReloadOutcome {
    Applied { generation: u64 },
    Refused { errors: Vec<String> },
}

impl From<ReloadOutcome> for v1::ReloadReply {
    fn from(o: ReloadOutcome) -> Self {
        match o {
            ReloadOutcome::Applied { generation } => v1::ReloadReply {
                applied: true,
                config_generation: generation,
                errors: vec![],
            },
            ReloadOutcome::Refused { errors } => v1::ReloadReply {
                applied: false,
                config_generation: 0,
                errors,
            },
        }
    }
}

/// Holds the configuration in force and swaps it atomically on reload.
/// Parts of the daemon that act on configuration watch it with
/// [`ConfigCell::subscribe`]; nothing is applied unless all of it is valid.
pub struct ConfigCell {
    daemon: &'static str,
    config_dir: PathBuf,
    started: SystemTime,
    current: watch::Sender<Arc<Loaded>>,
    last_error: Mutex<String>,
}

impl ConfigCell {
    /// The first load: an invalid configuration is an error that lists every
    /// problem found, and the daemon does not start.
    pub fn load(daemon: &'static str, config_dir: &Path) -> anyhow::Result<Arc<Self>> {
        let config = Config::load(config_dir).map_err(|errors| {
            anyhow::anyhow!(
                "invalid configuration in {}:\n{errors}",
                config_dir.display()
            )
        })?;
        tracing::info!(
            config_dir = %config_dir.display(),
            node = %config.node.name,
            farms = config.farms.len(),
            clustered = config.cluster.is_some(),
            "configuration loaded"
        );
        let loaded = Arc::new(Loaded {
            config,
            generation: 1,
            loaded_at: SystemTime::now(),
        });
        Ok(Arc::new(ConfigCell {
            daemon,
            config_dir: config_dir.to_owned(),
            started: SystemTime::now(),
            current: watch::channel(loaded).0,
            last_error: Mutex::new(String::new()),
        }))
    }

    pub fn current(&self) -> Arc<Loaded> {
        self.current.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Loaded>> {
        self.current.subscribe()
    }

    /// Reads and validates the whole configuration again; applies it only if
    /// it is valid. One log line for the outcome, one per error.
    pub fn reload(&self) -> ReloadOutcome {
        crate::lifecycle::notify_reloading();
        let outcome = match Config::load(&self.config_dir) {
            Ok(config) => {
                // The generation counts the distinct configurations put in
                // force: a reload that finds the same configuration (a
                // repeated SIGHUP, a reload asked again after a restart)
                // keeps it. Subscribers still hear of the reload, so what
                // failed to apply before (a metrics port taken) is retried.
                let generation = {
                    let current = self.current.borrow();
                    current.generation + u64::from(current.config != config)
                };
                tracing::info!(
                    generation,
                    farms = config.farms.len(),
                    "configuration reloaded and applied"
                );
                self.current.send_replace(Arc::new(Loaded {
                    config,
                    generation,
                    loaded_at: SystemTime::now(),
                }));
                self.set_last_error(String::new());
                ReloadOutcome::Applied { generation }
            }
            Err(errors) => {
                let errors: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
                tracing::error!(
                    errors = errors.len(),
                    "configuration reload refused; the previous configuration stays in force"
                );
                for e in &errors {
                    tracing::error!("{e}");
                }
                self.set_last_error(errors.join("; "));
                ReloadOutcome::Refused { errors }
            }
        };
        crate::lifecycle::notify_ready();
        outcome
    }

    fn set_last_error(&self, e: String) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = e;
        }
    }

    /// Reloads on every SIGHUP until shutdown.
    pub fn reload_on_sighup(self: &Arc<Self>, ctx: &Context) {
        let cell = self.clone();
        let mut requests = ctx.reload_requests();
        let mut shutdown = ctx.shutdown();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = requests.changed() => {
                        if changed.is_err() { break; }
                        cell.reload();
                    }
                    () = shutdown.wait() => break,
                }
            }
        });
    }

    /// The [`v1::DaemonInfo`] that starts this daemon's Status reply.
    pub fn daemon_info(&self) -> v1::DaemonInfo {
        let loaded = self.current();
        v1::DaemonInfo {
            daemon: self.daemon.to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            started_unix_ms: unix_ms(self.started),
            config_dir: self.config_dir.display().to_string(),
            node_name: loaded.config.node.name.clone(),
            config_generation: loaded.generation,
            config_loaded_unix_ms: unix_ms(loaded.loaded_at),
            last_reload_error: self
                .last_error
                .lock()
                .map(|e| e.clone())
                .unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reload that finds the same configuration keeps the generation (a
    /// reload asked twice for one change counts once); a changed one
    /// moves it on; subscribers hear of both.
    #[test]
    fn the_generation_counts_distinct_configurations() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("node.toml"), "name = \"lb1\"\n").expect("node.toml");
        let cell = ConfigCell::load("test", dir.path()).expect("load");
        let mut rx = cell.subscribe();
        rx.borrow_and_update();
        assert_eq!(cell.current().generation, 1);
        assert!(matches!(
            cell.reload(),
            ReloadOutcome::Applied { generation: 1 }
        ));
        assert!(rx.has_changed().unwrap_or(false), "a reload is heard");
        rx.borrow_and_update();
        std::fs::write(
            dir.path().join("node.toml"),
            "name = \"lb1\"\nmetrics_listen = \"127.0.0.1:9100\"\n",
        )
        .expect("node.toml");
        assert!(matches!(
            cell.reload(),
            ReloadOutcome::Applied { generation: 2 }
        ));
        assert!(matches!(
            cell.reload(),
            ReloadOutcome::Applied { generation: 2 }
        ));
        assert_eq!(cell.current().generation, 2);
    }
}
