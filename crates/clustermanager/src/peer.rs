//! The peer's clustermanager, reached through the SSH trust: one session
//! (pinned host key, the cluster identity) carrying a gRPC channel to the
//! peer's `clustermanager.sock`. The session is opened on first use, kept,
//! and opened again after a failure — no more often than the backoff
//! allows, so an unreachable peer costs one connection attempt per backoff
//! step, not one per request.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tandem_proto::v1::{self, cluster_manager_client::ClusterManagerClient};
use tandem_runtime::ConfigCell;
use tandem_ssh::{Auth, HostKeyCheck, SshSession};
use tokio::sync::Mutex;
use tonic::transport::Channel;

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A peer RPC that takes longer than this counts as unreachable.
pub const PEER_RPC_TIMEOUT: Duration = Duration::from_secs(3);

struct Link {
    session: Option<(SshSession, Channel)>,
    /// For which peer (name, address) the session was opened.
    target: Option<(String, SocketAddr)>,
    next_attempt: Option<Instant>,
    backoff: Duration,
    last_error: String,
    /// Logged state: true once "connected" was logged, false once "lost".
    up_logged: Option<bool>,
}

pub struct PeerLink {
    config_dir: PathBuf,
    peer_runtime_dir: PathBuf,
    link: Mutex<Link>,
    /// Held while a connection attempt runs.
    connecting: Mutex<()>,
    /// The role in the peer's last Status answer, and when (Unix ms).
    last_seen: std::sync::Mutex<Option<(v1::NodeRole, i64)>>,
}

/// Why the peer could not be asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    #[error("this node is standalone (no peer in cluster.toml)")]
    Standalone,
    #[error("peer {peer} unreachable: {why}")]
    Unreachable { peer: String, why: String },
    /// The peer answered with an error.
    #[error("peer {peer}: {why}")]
    Refused { peer: String, why: String },
}

impl PeerLink {
    pub fn new(config_dir: PathBuf, peer_runtime_dir: PathBuf) -> PeerLink {
        PeerLink {
            config_dir,
            peer_runtime_dir,
            link: Mutex::new(Link {
                session: None,
                target: None,
                next_attempt: None,
                backoff: BACKOFF_MIN,
                last_error: String::new(),
                up_logged: None,
            }),
            connecting: Mutex::new(()),
            last_seen: std::sync::Mutex::new(None),
        }
    }

    /// The peer's role when its clustermanager last answered Status, and
    /// when (Unix ms); None if it never did.
    pub fn last_seen(&self) -> Option<(v1::NodeRole, i64)> {
        *self
            .last_seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn seen(
        &self,
        r: Result<v1::ClusterManagerStatus, PeerError>,
    ) -> Result<v1::ClusterManagerStatus, PeerError> {
        if let Ok(s) = &r {
            *self
                .last_seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((
                s.role(),
                tandem_runtime::unix_ms(std::time::SystemTime::now()),
            ));
        }
        r
    }

    /// A client of the peer's clustermanager, connecting if needed — unless
    /// `patient` is false and the peer is known to be unreachable (the last
    /// attempt failed): then the last error at once, and the health
    /// watcher, which asks every second, is the one that reconnects.
    async fn client(
        &self,
        config: &ConfigCell,
        patient: bool,
    ) -> Result<(String, ClusterManagerClient<Channel>), PeerError> {
        let loaded = config.current();
        let Some((name, ip)) = peer_of(&loaded.config) else {
            return Err(PeerError::Standalone);
        };
        let port = loaded
            .config
            .cluster
            .as_ref()
            .map_or(22, |c| c.sync.ssh_port);
        let addr = SocketAddr::new(ip, port);
        let label = format!("{name} ({addr})");
        // One connection attempt at a time; the link's state is locked
        // only briefly, so an operator's request never waits behind the
        // health watcher's attempt to reach a peer that is away.
        let _connecting = match self.connecting.try_lock() {
            Ok(g) => g,
            Err(_) => {
                let link = self.link.lock().await;
                if !patient && link.next_attempt.is_some() {
                    return Err(PeerError::Unreachable {
                        peer: label,
                        why: link.last_error.clone(),
                    });
                }
                drop(link);
                self.connecting.lock().await
            }
        };
        let mut link = self.link.lock().await;
        if link.target.as_ref() != Some(&(name.clone(), addr)) {
            // cluster.toml names another peer now.
            if let Some((s, _)) = link.session.take() {
                s.close().await;
            }
            link.target = Some((name.clone(), addr));
        }
        if let Some((s, _)) = &link.session
            && s.is_closed()
        {
            link.session = None;
        }
        if let Some((_, ch)) = &link.session {
            return Ok((label, ClusterManagerClient::new(ch.clone())));
        }
        if let Some(at) = link.next_attempt
            && (Instant::now() < at || !patient)
        {
            return Err(PeerError::Unreachable {
                peer: label,
                why: link.last_error.clone(),
            });
        }
        drop(link);
        let connected = async {
            let session = SshSession::connect_labelled(
                &label,
                addr,
                "root",
                HostKeyCheck::Pinned {
                    known_hosts: self.config_dir.join("ssh/known_hosts"),
                },
                Auth::Key(self.config_dir.join("ssh/id_ed25519")),
            )
            .await
            .map_err(|e| e.to_string())?;
            match session
                .grpc_channel(&self.peer_runtime_dir.join("clustermanager.sock"))
                .await
            {
                Ok(ch) => Ok((session, ch)),
                Err(e) => {
                    session.close().await;
                    Err(e.to_string())
                }
            }
        };
        let outcome = tokio::time::timeout(PEER_RPC_TIMEOUT * 2, connected)
            .await
            .unwrap_or_else(|_| Err("connecting timed out".into()));
        let mut link = self.link.lock().await;
        match outcome {
            Ok((session, ch)) => {
                if link.up_logged != Some(true) {
                    tracing::info!(peer = %label, "connected to the peer's clustermanager over SSH");
                    link.up_logged = Some(true);
                }
                link.backoff = BACKOFF_MIN;
                link.next_attempt = None;
                link.last_error.clear();
                link.session = Some((session, ch.clone()));
                Ok((label, ClusterManagerClient::new(ch)))
            }
            Err(why) => {
                if link.up_logged != Some(false) {
                    tracing::warn!(peer = %label, "peer's clustermanager unreachable, retrying with backoff: {why}");
                    link.up_logged = Some(false);
                }
                link.next_attempt = Some(Instant::now() + link.backoff);
                link.backoff = (link.backoff * 2).min(BACKOFF_MAX);
                link.last_error = why.clone();
                Err(PeerError::Unreachable { peer: label, why })
            }
        }
    }

    /// Forgets a session that failed an RPC: the next patient call
    /// reconnects at once; an operator's request (`call_now`) learns that
    /// the peer is away without waiting for a connection attempt.
    async fn broken(&self, why: &str) {
        let mut link = self.link.lock().await;
        if let Some((s, _)) = link.session.take() {
            s.close().await;
        }
        link.last_error = why.to_owned();
        link.next_attempt = Some(Instant::now());
    }

    /// Calls the peer; transport failures and timeouts are "unreachable"
    /// (and drop the session), an answered error is "refused". Connects
    /// (with backoff) when there is no session.
    pub async fn call<T, F, Fut>(&self, config: &ConfigCell, f: F) -> Result<T, PeerError>
    where
        F: FnOnce(ClusterManagerClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call_with(config, true, f).await
    }

    /// As `call`, but an operator's request does not wait for a connection
    /// attempt to a peer known to be unreachable (a partition): it learns
    /// at once that the peer is away.
    pub async fn call_now<T, F, Fut>(&self, config: &ConfigCell, f: F) -> Result<T, PeerError>
    where
        F: FnOnce(ClusterManagerClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call_with(config, false, f).await
    }

    async fn call_with<T, F, Fut>(
        &self,
        config: &ConfigCell,
        patient: bool,
        f: F,
    ) -> Result<T, PeerError>
    where
        F: FnOnce(ClusterManagerClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let (peer, client) = self.client(config, patient).await?;
        match tokio::time::timeout(PEER_RPC_TIMEOUT, f(client)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s))
                if matches!(
                    s.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                ) =>
            {
                let why = s.message().to_owned();
                self.broken(&why).await;
                Err(PeerError::Unreachable { peer, why })
            }
            Ok(Err(s)) => Err(PeerError::Refused {
                peer,
                why: s.message().to_owned(),
            }),
            Err(_) => {
                let why = format!("no answer within {} s", PEER_RPC_TIMEOUT.as_secs());
                self.broken(&why).await;
                Err(PeerError::Unreachable { peer, why })
            }
        }
    }

    /// The peer clustermanager's Status.
    pub async fn status(&self, config: &ConfigCell) -> Result<v1::ClusterManagerStatus, PeerError> {
        let r = self
            .call(config, |mut c| async move {
                c.status(v1::StatusRequest {}).await
            })
            .await;
        self.seen(r)
    }

    /// The peer clustermanager's Status for an operator's request: at once
    /// "unreachable" when it is known to be (see `call_now`).
    pub async fn status_now(
        &self,
        config: &ConfigCell,
    ) -> Result<v1::ClusterManagerStatus, PeerError> {
        let r = self
            .call_now(config, |mut c| async move {
                c.status(v1::StatusRequest {}).await
            })
            .await;
        self.seen(r)
    }

    /// A session is up (no connection attempt is made).
    pub async fn seems_reachable(&self) -> bool {
        let link = self.link.lock().await;
        link.session.as_ref().is_some_and(|(s, _)| !s.is_closed())
    }

    pub async fn close(&self) {
        let mut link = self.link.lock().await;
        if let Some((s, _)) = link.session.take() {
            s.close().await;
        }
    }
}

/// The other node of cluster.toml: its name and cluster address.
pub fn peer_of(c: &tandem_config::Config) -> Option<(String, std::net::IpAddr)> {
    let cluster = c.cluster.as_ref()?;
    cluster
        .nodes
        .iter()
        .find(|n| n.name != c.node.name)
        .map(|n| (n.name.clone(), n.address))
}
