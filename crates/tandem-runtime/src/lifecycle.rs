use std::future::Future;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::server::Router;

use crate::{DaemonArgs, InstanceLock, bind_socket};

/// How long in-flight RPCs (streams included) may run after shutdown begins.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The one shutdown signal every task listens to.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// Resolves once shutdown has begun (at once if it already has).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|down| *down).await;
    }

    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }
}

/// What a daemon's body receives from [`run`]: its identity, its
/// directories, the shutdown signal and the SIGHUP reload requests.
pub struct Context {
    pub daemon: &'static str,
    pub args: DaemonArgs,
    lock: InstanceLock,
    shutdown: watch::Sender<bool>,
    reloads: watch::Receiver<u64>,
}

impl Context {
    pub fn config_dir(&self) -> &Path {
        &self.args.config_dir
    }

    pub fn runtime_dir(&self) -> &Path {
        &self.args.runtime_dir
    }

    /// `--state-dir`: state that outlives a restart (created on first use).
    pub fn state_dir(&self) -> &Path {
        &self.args.state_dir
    }

    pub fn shutdown(&self) -> Shutdown {
        Shutdown(self.shutdown.subscribe())
    }

    /// Begin shutdown from inside the daemon (a fatal condition).
    pub fn trigger_shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// A receiver that changes on every SIGHUP.
    pub fn reload_requests(&self) -> watch::Receiver<u64> {
        self.reloads.clone()
    }

    /// The usual daemon body: load and validate the configuration (refusing
    /// to start if it is invalid), reload it on SIGHUP, and serve the router
    /// that `make` builds around it until shutdown.
    pub async fn load_and_serve(
        &self,
        make: impl FnOnce(Arc<crate::ConfigCell>) -> Router,
    ) -> anyhow::Result<()> {
        let config = crate::ConfigCell::load(self.daemon, self.config_dir())?;
        config.reload_on_sighup(self);
        self.serve(make(config)).await
    }

    /// Serves `router` on `<runtime-dir>/<daemon>.sock` until shutdown, then
    /// lets in-flight RPCs finish (up to a grace period). Tells systemd
    /// READY once the socket accepts connections.
    pub async fn serve(&self, router: Router) -> anyhow::Result<()> {
        let listener = bind_socket(&self.lock)?;
        let socket = self.lock.socket_path().display().to_string();
        tracing::info!(socket = %socket, "serving gRPC");
        notify(&[
            NotifyState::Ready,
            NotifyState::Status(&format!("serving on {socket}")),
        ]);

        let mut stop = self.shutdown();
        let serve = router.serve_with_incoming_shutdown(UnixListenerStream::new(listener), {
            let mut stop = self.shutdown();
            async move { stop.wait().await }
        });
        tokio::pin!(serve);
        tokio::select! {
            res = &mut serve => res?,
            () = async { stop.wait().await; tokio::time::sleep(SHUTDOWN_GRACE).await } => {
                tracing::warn!(grace_s = SHUTDOWN_GRACE.as_secs(), "RPCs still running after the shutdown grace period; closing them");
            }
        }
        Ok(())
    }
}

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// Tells systemd a reload is in progress (Type=notify-reload protocol).
pub(crate) fn notify_reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now]),
        Err(_) => notify(&[NotifyState::Reloading]),
    }
}

pub(crate) fn notify_ready() {
    notify(&[NotifyState::Ready]);
}

/// Runs a daemon: logging, the single-instance lock, the tokio runtime,
/// signals (SIGTERM/SIGINT: shutdown; SIGHUP: reload), the systemd watchdog,
/// then `body`. Returns the process exit code; errors are logged with their
/// whole context chain.
pub fn run<F, Fut>(daemon: &'static str, args: DaemonArgs, body: F) -> ExitCode
where
    F: FnOnce(Context) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    crate::init_logging(daemon);
    // Refuse a second instance before doing anything else.
    let lock = match InstanceLock::acquire(&args.runtime_dir, daemon) {
        Ok(lock) => lock,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(daemon)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("starting the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let (shutdown_tx, _) = watch::channel(false);
        let (reload_tx, reload_rx) = watch::channel(0u64);
        let shutdown_tx = Arc::new(shutdown_tx);
        spawn_signal_handlers(daemon, shutdown_tx.clone(), reload_tx)?;
        spawn_watchdog(Shutdown(shutdown_tx.subscribe()));
        let ctx = Context {
            daemon,
            args,
            lock,
            shutdown: (*shutdown_tx).clone(),
            reloads: reload_rx,
        };
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            pid = std::process::id(),
            "{daemon} starting"
        );
        let result = body(ctx).await;
        notify(&[NotifyState::Stopping]);
        result
    });
    // Let blocking work (nft, netlink threads) finish briefly, not forever.
    runtime.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(()) => {
            tracing::info!("{daemon} stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{daemon} failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn spawn_signal_handlers(
    daemon: &'static str,
    shutdown: Arc<watch::Sender<bool>>,
    reload: watch::Sender<u64>,
) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => {
                    tracing::info!("SIGTERM received, {daemon} shutting down");
                    break;
                }
                _ = int.recv() => {
                    tracing::info!("SIGINT received, {daemon} shutting down");
                    break;
                }
                _ = hup.recv() => {
                    tracing::info!("SIGHUP received, reloading configuration");
                    reload.send_modify(|n| *n += 1);
                }
            }
        }
        notify(&[NotifyState::Stopping]);
        let _ = shutdown.send(true);
    });
    Ok(())
}

/// Pings the systemd watchdog at half its interval while the runtime is alive.
fn spawn_watchdog(mut shutdown: Shutdown) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval / 2);
        loop {
            tokio::select! {
                _ = tick.tick() => notify(&[NotifyState::Watchdog]),
                () = shutdown.wait() => break,
            }
        }
    });
}
