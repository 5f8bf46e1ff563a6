use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use tonic::transport::{Channel, Endpoint};

pub const DEFAULT_RUNTIME_DIR: &str = "/run/tandem";
/// Where daemons keep state across restarts (systemd `StateDirectory=tandem`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tandem";

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("creating runtime directory {path}: {source}")]
    RuntimeDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("opening lock file {path}: {source}")]
    LockFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another {daemon} is already running{pid} (it holds {path}); stop it first")]
    AlreadyRunning {
        daemon: String,
        pid: String,
        path: PathBuf,
    },
    #[error("binding gRPC socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{daemon} is not running (no socket at {path})")]
    NotRunning { daemon: String, path: PathBuf },
    #[error("connecting to {daemon} at {path}: {source}")]
    Connect {
        daemon: String,
        path: PathBuf,
        source: tonic::transport::Error,
    },
}

/// `<runtime_dir>/<daemon>.sock`.
pub fn socket_path(runtime_dir: &Path, daemon: &str) -> PathBuf {
    runtime_dir.join(format!("{daemon}.sock"))
}

fn lock_path(runtime_dir: &Path, daemon: &str) -> PathBuf {
    runtime_dir.join(format!("{daemon}.lock"))
}

/// Proof that this process is the only instance of a daemon using this
/// runtime directory: an exclusive `flock` on `<daemon>.lock`, released by
/// the kernel when the process exits, however it exits. A socket file alone
/// cannot tell a live owner from a crashed one; the lock can.
#[derive(Debug)]
pub struct InstanceLock {
    _lock: Flock<File>,
    socket: PathBuf,
}

impl InstanceLock {
    /// Takes the lock, or fails with [`RuntimeError::AlreadyRunning`] naming
    /// the pid that holds it.
    pub fn acquire(runtime_dir: &Path, daemon: &str) -> Result<Self, RuntimeError> {
        if !runtime_dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(runtime_dir)
                .map_err(|source| RuntimeError::RuntimeDir {
                    path: runtime_dir.to_owned(),
                    source,
                })?;
        }
        let path = lock_path(runtime_dir, daemon);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|source| RuntimeError::LockFile {
                path: path.clone(),
                source,
            })?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((mut file, _)) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let pid = if holder.is_empty() {
                    String::new()
                } else {
                    format!(" as pid {holder}")
                };
                return Err(RuntimeError::AlreadyRunning {
                    daemon: daemon.to_owned(),
                    pid,
                    path,
                });
            }
        };
        // Record our pid for the next instance's error message; the lock, not
        // this content, is what decides.
        let _ = lock.set_len(0);
        let _ = lock.rewind();
        let _ = writeln!(*lock, "{}", std::process::id());
        Ok(InstanceLock {
            _lock: lock,
            socket: socket_path(runtime_dir, daemon),
        })
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket
    }
}

impl Drop for InstanceLock {
    fn drop(&mut self) {
        // Only the lock holder may remove the socket: it is ours.
        let _ = fs::remove_file(&self.socket);
    }
}

/// Binds the daemon's gRPC socket (mode 0600). The caller holds the
/// instance lock, so any socket file already there is stale and is removed.
pub fn bind_socket(lock: &InstanceLock) -> Result<tokio::net::UnixListener, RuntimeError> {
    let path = lock.socket_path();
    match fs::remove_file(path) {
        Ok(()) => tracing::info!(socket = %path.display(), "removed stale socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(RuntimeError::Bind {
                path: path.to_owned(),
                source,
            });
        }
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(|source| RuntimeError::Bind {
        path: path.to_owned(),
        source,
    })?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(|source| {
        RuntimeError::Bind {
            path: path.to_owned(),
            source,
        }
    })?;
    Ok(listener)
}

/// A gRPC channel to a local daemon. A daemon that is not running fails fast
/// with [`RuntimeError::NotRunning`], which callers can show as such.
pub async fn connect(runtime_dir: &Path, daemon: &str) -> Result<Channel, RuntimeError> {
    let path = socket_path(runtime_dir, daemon);
    let absolute = std::path::absolute(&path).unwrap_or_else(|_| path.clone());
    let endpoint =
        Endpoint::from_shared(format!("unix://{}", absolute.display())).map_err(|source| {
            RuntimeError::Connect {
                daemon: daemon.to_owned(),
                path: path.clone(),
                source,
            }
        })?;
    match endpoint.connect().await {
        Ok(channel) => Ok(channel),
        Err(source) => {
            // A socket file with nobody listening (crash) or no file at all:
            // both mean "not running" to an operator.
            let refused = std::os::unix::net::UnixStream::connect(&path).is_err();
            if refused {
                Err(RuntimeError::NotRunning {
                    daemon: daemon.to_owned(),
                    path,
                })
            } else {
                Err(RuntimeError::Connect {
                    daemon: daemon.to_owned(),
                    path,
                    source,
                })
            }
        }
    }
}
