//! The control API: clustermanager's gRPC service on a TCP listener
//! (node.toml `control_listen`), TLS only, every call authorized by an API
//! key (`[[api_keys]]`, see auth.rs); every admin call is logged with the
//! key's name. The Unix socket stays as it is: root only, no token.
//!
//! TLS: the certificate chain and key named by `control_tls_cert` /
//! `control_tls_key`, or, when neither is set, a self-signed pair
//! generated once in `<state-dir>/control-api/` and kept across restarts,
//! so the SHA-256 fingerprint clients pin stays the same. A plaintext
//! client never reaches the service: its first bytes are not a TLS
//! ClientHello and the connection is closed.
//!
//! The listener follows the configuration like the metrics endpoint: a
//! changed `control_listen` moves it, a removed one closes it, a reload
//! re-reads the certificate files (a renewed certificate is served to new
//! connections without closing the open ones), and keys are looked up at
//! every call, so a key added or removed takes effect at the reload.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tandem_config::NodeConfig;
use tandem_proto::v1::{self, cluster_manager_server::ClusterManagerServer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::body::Body;
use tonic::codegen::http;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::api::ClusterManagerApi;
use crate::auth::{self, Access};
use crate::local::{LocalStatuses, Probe};
use crate::state::Shared;

/// A TLS handshake that takes longer than this is abandoned.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; more connections wait in the backlog.
const HANDSHAKES_IN_FLIGHT: usize = 64;
/// A refusal of the same kind from the same address is logged at most
/// once in this long (with the number of refusals not logged).
const DENIAL_LOG_EVERY: Duration = Duration::from_secs(60);
/// Where the generated self-signed pair lives, under the state directory.
pub const GENERATED_DIR: &str = "control-api";

/// What the control API serves now, for Status and `tandemctl status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub listen: SocketAddr,
    /// `SHA256:<64 hex digits>` of the certificate.
    pub fingerprint: String,
}

/// The TLS side: the rustls configuration and what it was made from.
struct Material {
    config: Arc<rustls::ServerConfig>,
    fingerprint: String,
    /// For the log: the files, or "self-signed, generated in …".
    source: String,
    /// The PEM bytes it was loaded from, to notice a renewed certificate.
    pem: (Vec<u8>, Vec<u8>),
}

/// `SHA256:<hex>` of a DER certificate.
pub fn fingerprint(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("SHA256:{hex}")
}

fn resolve(config_dir: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_owned()
    } else {
        config_dir.join(p)
    }
}

/// Writes `data` to `path` atomically with `mode` (0600 for the key).
fn write_private(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The self-signed pair of `<state-dir>/control-api/`, generated on first
/// use: (certificate PEM, key PEM, generated now).
fn generated_pair(state_dir: &Path, node: &NodeConfig) -> anyhow::Result<(Vec<u8>, Vec<u8>, bool)> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = state_dir.join(GENERATED_DIR);
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    if cert.exists() && key.exists() {
        let c = std::fs::read(&cert).with_context(|| format!("reading {}", cert.display()))?;
        let k = std::fs::read(&key).with_context(|| format!("reading {}", key.display()))?;
        return Ok((c, k, false));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let mut names = vec![node.name.clone(), "localhost".to_owned()];
    if let Some(l) = node.control_listen
        && !l.ip().is_unspecified()
    {
        names.push(l.ip().to_string());
    }
    if let Some(a) = node.cluster_address {
        names.push(a.to_string());
    }
    names.dedup();
    let pair = rcgen::generate_simple_self_signed(names)
        .context("generating the control API's self-signed certificate")?;
    let (c, k) = (
        pair.cert.pem().into_bytes(),
        pair.signing_key.serialize_pem().into_bytes(),
    );
    write_private(&key, &k, 0o600).with_context(|| format!("writing {}", key.display()))?;
    write_private(&cert, &c, 0o644).with_context(|| format!("writing {}", cert.display()))?;
    Ok((c, k, true))
}

fn load_material(
    config_dir: &Path,
    state_dir: &Path,
    node: &NodeConfig,
) -> anyhow::Result<Material> {
    let (cert_pem, key_pem, source) = match (&node.control_tls_cert, &node.control_tls_key) {
        (Some(c), Some(k)) => {
            let (c, k) = (resolve(config_dir, c), resolve(config_dir, k));
            let cert = std::fs::read(&c)
                .with_context(|| format!("control_tls_cert: reading {}", c.display()))?;
            let key = std::fs::read(&k)
                .with_context(|| format!("control_tls_key: reading {}", k.display()))?;
            (cert, key, format!("certificate {}", c.display()))
        }
        _ => {
            let (c, k, new) = generated_pair(state_dir, node)?;
            let dir = state_dir.join(GENERATED_DIR);
            let how = if new {
                "generated now"
            } else {
                "generated earlier"
            };
            (
                c,
                k,
                format!("self-signed certificate {how} in {}", dir.display()),
            )
        }
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("{source}: not a PEM certificate chain: {e}"))?;
    let Some(leaf) = certs.first() else {
        bail!("{source}: no certificate in the file");
    };
    let fingerprint = fingerprint(leaf.as_ref());
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| anyhow::anyhow!("{source}: no PEM private key in the key file: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| anyhow::anyhow!("{source}: the key does not fit the certificate: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Material {
        config: Arc::new(config),
        fingerprint,
        source,
        pem: (cert_pem, key_pem),
    })
}

/// Runs the control API for as long as the daemon runs, following the
/// configuration.
pub fn spawn(
    shared: Arc<Shared>,
    create: crate::create::CreateContext,
    state_dir: PathBuf,
    mut shutdown: tandem_runtime::Shutdown,
) {
    tokio::spawn(async move {
        let mut configs = shared.config.subscribe();
        let denials = Arc::new(DenialLog::default());
        loop {
            let node = configs.borrow_and_update().config.node.clone();
            let wanted = (
                node.control_listen,
                node.control_tls_cert.clone(),
                node.control_tls_key.clone(),
            );
            let running = match node.control_listen {
                None => None,
                Some(addr) => start(&shared, &create, &state_dir, &node, addr, &denials).await,
            };
            let stop = loop {
                tokio::select! {
                    r = configs.changed() => {
                        if r.is_err() {
                            break true;
                        }
                        let node = configs.borrow().config.node.clone();
                        let now = (node.control_listen, node.control_tls_cert.clone(), node.control_tls_key.clone());
                        if now != wanted {
                            tracing::info!("control API settings changed in node.toml; restarting the control API");
                            break false;
                        }
                        match &running {
                            // Could not start: every reload tries again.
                            None if wanted.0.is_some() => break false,
                            Some(r) => r.refresh(&shared, &state_dir, &node),
                            None => {}
                        }
                        if node.control_listen.is_some() && node.api_keys.is_empty() {
                            tracing::warn!("the control API has no [[api_keys]] in node.toml: every call is refused");
                        }
                    }
                    () = shutdown.wait() => break true,
                }
            };
            if let Some(r) = running {
                r.stop().await;
                set_served(&shared, None);
            }
            if stop {
                return;
            }
        }
    });
}

fn set_served(shared: &Shared, served: Option<Served>) {
    *shared
        .control_api
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = served;
}

/// A listener being served.
struct Running {
    listen: SocketAddr,
    tls: Arc<RwLock<Arc<rustls::ServerConfig>>>,
    pem: Mutex<(Vec<u8>, Vec<u8>)>,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// A reload: re-reads the certificate; a changed one is served to new
    /// connections.
    fn refresh(&self, shared: &Shared, state_dir: &Path, node: &NodeConfig) {
        match load_material(&shared.config_dir, state_dir, node) {
            Ok(m) => {
                let mut pem = self
                    .pem
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if *pem != m.pem {
                    *self
                        .tls
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = m.config;
                    *pem = m.pem;
                    tracing::info!(listen = %self.listen, fingerprint = %m.fingerprint, "control API on {}: new {} (fingerprint {}) served to new connections", self.listen, m.source, m.fingerprint);
                    set_served(
                        shared,
                        Some(Served {
                            listen: self.listen,
                            fingerprint: m.fingerprint,
                        }),
                    );
                }
            }
            Err(e) => {
                tracing::error!(listen = %self.listen, "control API on {}: keeping the certificate in use: {e:#}", self.listen);
            }
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        tracing::info!(listen = %self.listen, "control API on {} closed", self.listen);
    }
}

async fn start(
    shared: &Arc<Shared>,
    create: &crate::create::CreateContext,
    state_dir: &Path,
    node: &NodeConfig,
    addr: SocketAddr,
    denials: &Arc<DenialLog>,
) -> Option<Running> {
    let material = match load_material(&shared.config_dir, state_dir, node) {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(listen = %addr, "control API on {addr} not started: {e:#}");
            return None;
        }
    };
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(listen = %addr, "control API not started: binding {addr}: {e}; free the address, then `tandemctl reload clustermanager`");
            return None;
        }
    };
    let listen = listener.local_addr().unwrap_or(addr);
    tracing::info!(
        listen = %listen,
        fingerprint = %material.fingerprint,
        keys = node.api_keys.len(),
        "control API listening on {listen} (gRPC over TLS, {}; certificate fingerprint {}; {} API key(s))",
        material.source,
        material.fingerprint,
        node.api_keys.len()
    );
    if node.api_keys.is_empty() {
        tracing::warn!(listen = %listen, "the control API has no [[api_keys]] in node.toml: every call is refused");
    }
    set_served(
        shared,
        Some(Served {
            listen,
            fingerprint: material.fingerprint.clone(),
        }),
    );
    let tls = Arc::new(RwLock::new(material.config));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (conn_tx, conn_rx) =
        tokio::sync::mpsc::channel::<io::Result<TlsConn>>(HANDSHAKES_IN_FLIGHT);
    let accept = tokio::spawn(accept_loop(
        listener,
        tls.clone(),
        conn_tx,
        stop_rx.clone(),
        denials.clone(),
    ));
    let api = ClusterManagerApi {
        shared: shared.clone(),
        create: create.clone(),
    };
    let guard = GuardLayer {
        shared: shared.clone(),
        denials: denials.clone(),
    };
    let serve = tokio::spawn(async move {
        let mut stop = stop_rx;
        let incoming = tokio_stream::wrappers::ReceiverStream::new(conn_rx);
        let served = tonic::transport::Server::builder()
            .layer(guard)
            .add_service(ClusterManagerServer::new(api))
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = served {
            tracing::error!(listen = %listen, "control API on {listen} failed: {e}");
        }
    });
    Some(Running {
        listen,
        tls,
        pem: Mutex::new(material.pem),
        stop: stop_tx,
        tasks: vec![accept, serve],
    })
}

/// Accepts connections and completes their TLS handshakes (each in its own
/// task, so a slow or silent client delays nobody), handing the
/// established ones to the gRPC server.
async fn accept_loop(
    listener: TcpListener,
    tls: Arc<RwLock<Arc<rustls::ServerConfig>>>,
    out: tokio::sync::mpsc::Sender<io::Result<TlsConn>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    denials: Arc<DenialLog>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_IN_FLIGHT));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => return,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: wait, do not spin.
                tracing::warn!("control API: accepting a connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let local = tcp.local_addr().ok();
        let config = tls
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let out = out.clone();
        let denials = denials.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    let conn = TlsConn {
                        inner: stream,
                        info: TcpConnectInfo {
                            local_addr: local,
                            remote_addr: Some(peer),
                        },
                    };
                    let _ = out.send(Ok(conn)).await;
                }
                Ok(Err(e)) => denials.note(
                    peer.ip(),
                    "TLS handshake failed",
                    format_args!(
                        "control API: refused a connection from {peer}: TLS handshake failed ({e}); the control API speaks TLS only"
                    ),
                ),
                Err(_) => denials.note(
                    peer.ip(),
                    "TLS handshake timed out",
                    format_args!(
                        "control API: closed a connection from {peer}: no TLS handshake within {} s",
                        HANDSHAKE_TIMEOUT.as_secs()
                    ),
                ),
            }
        });
    }
}

/// An accepted TLS connection, with its addresses for the guard's log.
pub struct TlsConn {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: TcpConnectInfo,
}

impl Connected for TlsConn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Refusals, logged at most once per address and kind per
/// [`DENIAL_LOG_EVERY`]: a client retrying in a loop (or a scanner) cannot
/// flood the journal.
#[derive(Default)]
struct DenialLog {
    /// Per (address, kind): when last logged, and refusals since not logged.
    last: Mutex<HashMap<DenialKey, (Instant, u64)>>,
}

type DenialKey = (IpAddr, &'static str);

impl DenialLog {
    fn note(&self, ip: IpAddr, kind: &'static str, line: std::fmt::Arguments<'_>) {
        let now = Instant::now();
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.len() > 1024 {
            last.retain(|_, (at, _)| now.duration_since(*at) < DENIAL_LOG_EVERY);
        }
        match last.get_mut(&(ip, kind)) {
            Some((at, suppressed)) if now.duration_since(*at) < DENIAL_LOG_EVERY => {
                *suppressed += 1;
            }
            Some((at, suppressed)) => {
                let more = std::mem::take(suppressed);
                *at = now;
                tracing::warn!(peer = %ip, reason = kind, "{line} ({more} more from {ip} in the last {} s not logged)", DENIAL_LOG_EVERY.as_secs());
            }
            None => {
                last.insert((ip, kind), (now, 0));
                tracing::warn!(peer = %ip, reason = kind, "{line}");
            }
        }
    }
}

/// The authorization in front of the service (a tower layer on the
/// control API's router only).
#[derive(Clone)]
struct GuardLayer {
    shared: Arc<Shared>,
    denials: Arc<DenialLog>,
}

impl<S> tower::Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            shared: self.shared.clone(),
            denials: self.denials.clone(),
        }
    }
}

#[derive(Clone)]
struct Guard<S> {
    inner: S,
    shared: Arc<Shared>,
    denials: Arc<DenialLog>,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S> tower::Service<http::Request<Body>> for Guard<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let path = req.uri().path().to_owned();
        let peer = req
            .extensions()
            .get::<TcpConnectInfo>()
            .and_then(TcpConnectInfo::remote_addr);
        let peer_text = peer.map_or_else(|| "an unknown address".to_owned(), |p| p.to_string());
        let header = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .map(|v| v.to_str().unwrap_or("invalid"));
        let loaded = self.shared.config.current();
        match auth::authorize(&loaded.config.node.api_keys, &path, header) {
            Ok(grant) => {
                let method = auth::method_of(&path).unwrap_or(&path);
                if grant.access == Access::Admin {
                    tracing::info!(key = %grant.key, method, peer = %peer_text, "control API: {method} by admin key `{}` from {peer_text}", grant.key);
                } else {
                    tracing::debug!(key = %grant.key, method, peer = %peer_text, "control API: {method} by key `{}` ({}) from {peer_text}", grant.key, grant.role);
                }
                // The clone that was made ready serves this call; the fresh
                // clone waits for the next poll_ready.
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                Box::pin(inner.call(req))
            }
            Err(denied) => {
                if let Some(p) = peer {
                    self.denials.note(
                        p.ip(),
                        denied.kind(),
                        format_args!("control API: refused {path} from {peer_text}: {denied}"),
                    );
                }
                let status = tonic::Status::new(denied.code(), denied.to_string());
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

/// DaemonStatuses: this node's daemons as `tandemctl status` shows them.
pub fn daemon_statuses(
    runtime_dir: &Path,
    own: v1::ClusterManagerStatus,
    st: LocalStatuses,
) -> v1::DaemonStatusesReply {
    use v1::daemon_status_entry::Status as S;
    fn entry<T>(
        runtime_dir: &Path,
        daemon: &str,
        p: Probe<T>,
        wrap: fn(T) -> S,
    ) -> v1::DaemonStatusEntry {
        let (state, error, status) = match p {
            Probe::Running(s) => ("running", String::new(), Some(wrap(s))),
            Probe::NotRunning => (
                "not running",
                format!(
                    "no daemon listening on {}",
                    tandem_runtime::socket_path(runtime_dir, daemon).display()
                ),
                None,
            ),
            Probe::Failed(why) => ("not responding", why, None),
        };
        v1::DaemonStatusEntry {
            daemon: daemon.to_owned(),
            state: state.to_owned(),
            error,
            status,
        }
    }
    v1::DaemonStatusesReply {
        daemons: vec![
            entry(
                runtime_dir,
                "clustermanager",
                Probe::Running(own),
                S::ClusterManager,
            ),
            entry(runtime_dir, "vrrpd", st.vrrpd, S::Vrrpd),
            entry(runtime_dir, "lb-forwarder", st.forwarder, S::LbForwarder),
            entry(
                runtime_dir,
                "conntrack-syncd",
                st.conntrack,
                S::ConntrackSync,
            ),
            entry(runtime_dir, "cfg-syncd", st.cfgsync, S::CfgSync),
        ],
    }
}

/// ListFarms: the local lb-forwarder's answer.
pub async fn list_farms(runtime_dir: &Path) -> Result<v1::ListFarmsReply, tonic::Status> {
    let ch = tandem_runtime::connect(runtime_dir, "lb-forwarder")
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut client = v1::lb_forwarder_client::LbForwarderClient::new(ch);
    let call = client.list_farms(v1::ListFarmsRequest {});
    match tokio::time::timeout(crate::local::RPC_TIMEOUT * 5, call).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(tonic::Status::new(
            s.code(),
            format!("lb-forwarder: {}", s.message()),
        )),
        Err(_) => Err(tonic::Status::unavailable(
            "lb-forwarder did not answer ListFarms within 10 s",
        )),
    }
}

/// ReadConfig: cluster.toml and farms/*.toml as they are here (regular
/// files only, hidden and temporary files aside).
pub async fn read_config(config_dir: &Path) -> Result<v1::ReadConfigReply, tonic::Status> {
    let dir = config_dir.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut files = Vec::new();
        let mut add = |rel: String| -> Result<(), tonic::Status> {
            let path = dir.join(&rel);
            match std::fs::symlink_metadata(&path) {
                Ok(m) if m.is_file() => {}
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => {
                    return Err(tonic::Status::internal(format!(
                        "reading {}: {e}",
                        path.display()
                    )));
                }
            }
            let content = std::fs::read(&path)
                .map_err(|e| tonic::Status::internal(format!("reading {}: {e}", path.display())))?;
            files.push(v1::FileChange {
                path: rel,
                content: Some(content),
            });
            Ok(())
        };
        add(tandem_config::CLUSTER_FILE.to_owned())?;
        let farms = dir.join(tandem_config::FARMS_DIR);
        let mut names: Vec<String> = match std::fs::read_dir(&farms) {
            Ok(entries) => entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.') && n.ends_with(".toml"))
                .collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(tonic::Status::internal(format!(
                    "reading {}: {e}",
                    farms.display()
                )));
            }
        };
        names.sort();
        for n in names {
            add(format!("{}/{n}", tandem_config::FARMS_DIR))?;
        }
        Ok(v1::ReadConfigReply { files })
    })
    .await
    .map_err(|e| tonic::Status::internal(format!("reading the configuration: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fingerprint_is_the_sha256_of_the_der() {
        assert_eq!(
            fingerprint(b"test"),
            "SHA256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
    }

    #[test]
    fn a_generated_pair_is_kept_and_its_key_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let node: NodeConfig =
            toml::from_str("name = \"lb1\"\ncontrol_listen = \"127.0.0.1:9443\"\n").unwrap();
        let first = load_material(d.path(), d.path(), &node).unwrap();
        assert!(first.source.contains("generated now"), "{}", first.source);
        let key = d.path().join(GENERATED_DIR).join("key.pem");
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let again = load_material(d.path(), d.path(), &node).unwrap();
        assert_eq!(
            again.fingerprint, first.fingerprint,
            "a restart keeps the pinned certificate"
        );
        assert!(again.source.contains("generated earlier"));
    }

    #[test]
    fn configured_files_are_used_and_a_mismatch_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let a = rcgen::generate_simple_self_signed(vec!["a".to_owned()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["b".to_owned()]).unwrap();
        std::fs::write(d.path().join("a.pem"), a.cert.pem()).unwrap();
        std::fs::write(d.path().join("a.key"), a.signing_key.serialize_pem()).unwrap();
        std::fs::write(d.path().join("b.key"), b.signing_key.serialize_pem()).unwrap();
        let node: NodeConfig = toml::from_str(
            "name = \"lb1\"\ncontrol_tls_cert = \"a.pem\"\ncontrol_tls_key = \"a.key\"\n",
        )
        .unwrap();
        let m = load_material(d.path(), d.path(), &node).unwrap();
        assert_eq!(m.fingerprint, fingerprint(a.cert.der()));
        let node: NodeConfig = toml::from_str(
            "name = \"lb1\"\ncontrol_tls_cert = \"a.pem\"\ncontrol_tls_key = \"b.key\"\n",
        )
        .unwrap();
        let e = load_material(d.path(), d.path(), &node).err().unwrap();
        assert!(
            format!("{e:#}").contains("the key does not fit the certificate"),
            "{e:#}"
        );
        let node: NodeConfig = toml::from_str(
            "name = \"lb1\"\ncontrol_tls_cert = \"missing.pem\"\ncontrol_tls_key = \"a.key\"\n",
        )
        .unwrap();
        let e = load_material(d.path(), d.path(), &node).err().unwrap();
        assert!(
            format!("{e:#}").starts_with("control_tls_cert: reading "),
            "{e:#}"
        );
    }
}
