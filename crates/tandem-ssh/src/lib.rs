//! Tandem's SSH client, shared by cfg-syncd (replication) and clustermanager
//! (cluster creation, command replication): a russh session to the peer's
//! stock OpenSSH sshd with
//!
//! - the peer's host key either pinned in an OpenSSH `known_hosts` file
//!   (never trust on first use) or recorded on first contact, which only
//!   cluster creation does, to pin it for every later session;
//! - authentication with the cluster's ed25519 identity, or once, at cluster
//!   creation, with the peer's root password (never logged, never stored);
//! - `exec` of a command (status, stdout, stderr);
//! - raw SFTP (russh-sftp's `RawSftpSession`: OpenSSH's plain `rename` refuses
//!   to replace a file, so atomic writes use `posix-rename@openssh.com`);
//! - a gRPC channel tunnelled through a direct-streamlocal channel to one of
//!   the peer daemons' Unix sockets (no extra open port).

mod known_hosts;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client::{self, Handle};
use russh::keys::{
    Algorithm, HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate,
};
use russh::{ChannelMsg, Disconnect};
use russh_sftp::client::RawSftpSession;
use russh_sftp::protocol::{FileAttributes, OpenFlags, Packet, StatusCode};
use tokio::sync::OnceCell;
use tonic::transport::{Channel, Endpoint, Uri};

pub use known_hosts::{known_hosts_line, pinned_keys};

/// OpenSSH's sftp-server accepts writes up to 256 KiB; stay well below.
pub const SFTP_CHUNK: usize = 64 * 1024;
/// How long the TCP connect and the SSH handshake may take together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How the peer's host key is judged.
#[derive(Debug, Clone)]
pub enum HostKeyCheck {
    /// Only a key pinned for this host in this known_hosts file is accepted.
    Pinned { known_hosts: PathBuf },
    /// Only the key with this SHA-256 fingerprint (`SHA256:...`, as
    /// `ssh-keygen -l` prints it) is accepted: cluster creation, after the
    /// operator has seen and confirmed the peer's key ([`peer_host_key`]).
    /// Any other key ends the handshake before authentication, so neither a
    /// password nor a key signature reaches it.
    Confirmed { fingerprint: String },
    /// Any key is accepted and recorded (`SshSession::host_key_line`). Never
    /// used with a password: only to read a host key (see [`peer_host_key`]).
    RecordFirst,
}

/// How this node authenticates as the remote user.
#[derive(Clone)]
pub enum Auth {
    /// An OpenSSH private key file (the cluster identity).
    Key(PathBuf),
    /// The remote user's password: used once, at cluster creation.
    Password(String),
}

impl std::fmt::Debug for Auth {
    // The password must never reach a log line, even through `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Key(p) => f.debug_tuple("Key").field(p).finish(),
            Auth::Password(_) => f.write_str("Password(<redacted>)"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    /// `target` is `ip:port`, or the caller's label (which names the address).
    #[error("cannot reach {target}: {why}")]
    Unreachable { target: String, why: String },
    #[error(
        "peer {peer}: host key mismatch, refusing to connect: the peer presented {got}, {pin} pins {expected}; if the peer was reinstalled, create the cluster again to pin its new key"
    )]
    HostKeyMismatch {
        peer: String,
        got: String,
        expected: String,
        pin: String,
    },
    #[error(
        "the peer {peer} presented the host key {got}, not the confirmed {confirmed}: nothing was sent to it (no password, no key); if its key really changed, check the new one on the peer and confirm it"
    )]
    UnconfirmedHostKey {
        peer: String,
        got: String,
        confirmed: String,
    },
    #[error(
        "peer {peer}: refusing to send a password to a host key nobody confirmed (only a confirmed key gets a password)"
    )]
    PasswordToUnconfirmedKey { peer: String },
    #[error(
        "`{0}` is not an SSH host key fingerprint: expected SHA256:<base64>, as `ssh-keygen -lf` prints it"
    )]
    BadFingerprint(String),
    #[error(
        "peer {peer}: no pinned host key for {host} in {path} ({why}); it is written when the cluster is created"
    )]
    NoPin {
        peer: String,
        host: String,
        path: String,
        why: String,
    },
    #[error("reading this node's SSH identity {path}: {why}")]
    Identity { path: String, why: String },
    #[error("the peer {peer} refused the {user} password")]
    PasswordRefused { peer: String, user: String },
    #[error(
        "peer {peer}: authentication as {user} with {identity} refused (is its public key in the peer's authorized_keys?)"
    )]
    KeyRefused {
        peer: String,
        user: String,
        identity: String,
    },
    #[error("peer {peer}: {what}: {why}")]
    Link {
        peer: String,
        what: &'static str,
        why: String,
    },
    #[error("peer {peer}: running `{command}`: {why}")]
    Exec {
        peer: String,
        command: String,
        why: String,
    },
    #[error("peer {peer}: SFTP {what} {path}: {why}")]
    Sftp {
        peer: String,
        what: &'static str,
        path: String,
        why: String,
    },
    #[error("peer {peer}: gRPC tunnel to {socket}: {why}")]
    Tunnel {
        peer: String,
        socket: String,
        why: String,
    },
    #[error("generating an SSH key: {0}")]
    KeyGen(String),
}

impl SshError {
    /// A refused host key is logged differently: retrying cannot fix it.
    pub fn is_host_key(&self) -> bool {
        matches!(
            self,
            SshError::HostKeyMismatch { .. }
                | SshError::NoPin { .. }
                | SshError::UnconfirmedHostKey { .. }
        )
    }
}

/// What a remote command left behind.
#[derive(Debug, Clone, Default)]
pub struct ExecOutput {
    /// The exit status; None when the command died of a signal or the server
    /// sent none.
    pub status: Option<u32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl ExecOutput {
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// `ssh-ed25519 SHA256:...`, as `ssh-keygen -l` shows it.
pub fn fingerprint(key: &PublicKey) -> String {
    format!("{} {}", key.algorithm(), sha256(key))
}

/// The key's SHA-256 fingerprint alone: `SHA256:<base64, unpadded>`.
pub fn sha256(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// The `SHA256:...` fingerprint in what an operator pasted: the bare
/// fingerprint, `ssh-ed25519 SHA256:...`, or a whole `ssh-keygen -lf` line
/// (`256 SHA256:... root@lb2 (ED25519)`).
pub fn parse_fingerprint(text: &str) -> Result<String, SshError> {
    let bad = || SshError::BadFingerprint(text.trim().to_owned());
    let token = text
        .split_whitespace()
        .find(|w| w.starts_with("SHA256:"))
        .ok_or_else(bad)?;
    let b64 = &token["SHA256:".len()..];
    // 32 bytes: 43 characters of base64 without padding.
    let ok = b64.trim_end_matches('=').len() == 43
        && b64
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=');
    if !ok {
        return Err(bad());
    }
    Ok(format!("SHA256:{}", b64.trim_end_matches('=')))
}

/// The server-key check: accepts a pinned key (or any, with RecordFirst) and
/// records what the server showed, so a refusal can name both fingerprints
/// and creation can pin it.
struct HostKeyHandler {
    /// None: record first.
    pinned: Option<Vec<PublicKey>>,
    /// Some: only the key of this SHA-256 fingerprint.
    confirmed: Option<String>,
    seen: Arc<Mutex<Option<PublicKey>>>,
}

impl client::Handler for HostKeyHandler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        // Certificates are not part of the design: only a plain key.
        let PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            return Ok(false);
        };
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(key.clone());
        }
        Ok(match (&self.pinned, &self.confirmed) {
            (Some(pinned), _) => pinned.iter().any(|p| p.key_data() == key.key_data()),
            (None, Some(fp)) => sha256(key) == *fp,
            (None, None) => true,
        })
    }
}

/// An authenticated session to a peer.
pub struct SshSession {
    label: String,
    addr: SocketAddr,
    handle: Arc<Handle<HostKeyHandler>>,
    host_key: PublicKey,
    sftp: OnceCell<RawSftpSession>,
}

impl SshSession {
    /// Connects to `addr` as `user`; errors name the peer by its address.
    pub async fn connect(
        addr: SocketAddr,
        user: &str,
        check: HostKeyCheck,
        auth: Auth,
    ) -> Result<SshSession, SshError> {
        SshSession::connect_labelled(&addr.ip().to_string(), addr, user, check, auth).await
    }

    /// As `connect`, with errors naming the peer as `label` (e.g. its node
    /// name and address).
    pub async fn connect_labelled(
        label: &str,
        addr: SocketAddr,
        user: &str,
        check: HostKeyCheck,
        auth: Auth,
    ) -> Result<SshSession, SshError> {
        let pinned = match &check {
            HostKeyCheck::Pinned { known_hosts } => Some(pinned_keys(known_hosts, addr, label)?),
            HostKeyCheck::Confirmed { .. } | HostKeyCheck::RecordFirst => None,
        };
        let confirmed = match &check {
            HostKeyCheck::Confirmed { fingerprint } => Some(parse_fingerprint(fingerprint)?),
            _ => None,
        };
        if matches!(auth, Auth::Password(_)) && confirmed.is_none() {
            return Err(SshError::PasswordToUnconfirmedKey {
                peer: label.to_owned(),
            });
        }
        // The identity is read before connecting: a broken key file is a
        // local error, not the peer's.
        let key = match &auth {
            Auth::Key(path) => Some(load_identity(path)?),
            Auth::Password(_) => None,
        };
        let seen = Arc::new(Mutex::new(None));
        let config = client::Config {
            // A dead peer is noticed within ~6 s even without traffic.
            keepalive_interval: Some(Duration::from_secs(2)),
            keepalive_max: 3,
            nodelay: true,
            ..Default::default()
        };
        let handler = HostKeyHandler {
            pinned: pinned.clone(),
            confirmed: confirmed.clone(),
            seen: seen.clone(),
        };
        let connecting = client::connect(Arc::new(config), addr, handler);
        let mut handle = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Err(_) => {
                return Err(SshError::Unreachable {
                    target: target(label, addr),
                    why: format!("no SSH handshake within {} s", CONNECT_TIMEOUT.as_secs()),
                });
            }
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                let shown = seen.lock().ok().and_then(|s| s.clone());
                if let (Some(got), Some(fp)) = (&shown, &confirmed)
                    && sha256(got) != *fp
                {
                    return Err(SshError::UnconfirmedHostKey {
                        peer: label.to_owned(),
                        got: fingerprint(got),
                        confirmed: fp.clone(),
                    });
                }
                if let (Some(got), Some(pinned), HostKeyCheck::Pinned { known_hosts }) =
                    (shown, &pinned, &check)
                    && !pinned.iter().any(|p| p.key_data() == got.key_data())
                {
                    return Err(SshError::HostKeyMismatch {
                        peer: label.to_owned(),
                        got: fingerprint(&got),
                        expected: pinned
                            .iter()
                            .map(fingerprint)
                            .collect::<Vec<_>>()
                            .join(" or "),
                        pin: known_hosts.display().to_string(),
                    });
                }
                return Err(match e {
                    russh::Error::IO(io) => SshError::Unreachable {
                        target: target(label, addr),
                        why: io.to_string(),
                    },
                    other => SshError::Link {
                        peer: label.to_owned(),
                        what: "connecting",
                        why: other.to_string(),
                    },
                });
            }
        };
        let link = |what: &'static str| {
            move |e: russh::Error| SshError::Link {
                peer: label.to_owned(),
                what,
                why: e.to_string(),
            }
        };
        let ok = match (&auth, key) {
            (Auth::Key(path), Some(key)) => {
                let hash = handle
                    .best_supported_rsa_hash()
                    .await
                    .ok()
                    .flatten()
                    .flatten();
                let r = handle
                    .authenticate_publickey(user, PrivateKeyWithHashAlg::new(Arc::new(key), hash))
                    .await
                    .map_err(link("authenticating"))?;
                if !r.success() {
                    return Err(SshError::KeyRefused {
                        peer: label.to_owned(),
                        user: user.to_owned(),
                        identity: path.display().to_string(),
                    });
                }
                true
            }
            (Auth::Password(password), _) => {
                let r = handle
                    .authenticate_password(user, password.as_str())
                    .await
                    .map_err(link("authenticating"))?;
                r.success()
            }
            (Auth::Key(_), None) => false,
        };
        if !ok {
            return Err(SshError::PasswordRefused {
                peer: label.to_owned(),
                user: user.to_owned(),
            });
        }
        let host_key = seen
            .lock()
            .ok()
            .and_then(|s| s.clone())
            .ok_or_else(|| SshError::Link {
                peer: label.to_owned(),
                what: "connecting",
                why: "the server showed no host key".into(),
            })?;
        Ok(SshSession {
            label: label.to_owned(),
            addr,
            handle: Arc::new(handle),
            host_key,
            sftp: OnceCell::new(),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How errors name this peer.
    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }

    /// The peer's host key as an OpenSSH public-key line (`ssh-ed25519 AAAA...`).
    pub fn host_key_line(&self) -> String {
        self.host_key
            .to_openssh()
            .unwrap_or_else(|_| format!("{} <unencodable key>", self.host_key.algorithm()))
    }

    pub fn host_key(&self) -> &PublicKey {
        &self.host_key
    }

    /// Runs `command` through the peer's shell and collects its output.
    pub async fn exec(&self, command: &str) -> Result<ExecOutput, SshError> {
        let err = |why: String| SshError::Exec {
            peer: self.label.clone(),
            command: command.to_owned(),
            why,
        };
        let mut channel = self
            .handle
            .channel_open_session()
            .await
            .map_err(|e| err(e.to_string()))?;
        channel
            .exec(true, command)
            .await
            .map_err(|e| err(e.to_string()))?;
        let mut out = ExecOutput::default();
        while let Some(msg) = channel.wait().await {
            match msg {
                ChannelMsg::Data { data } => out.stdout.extend_from_slice(&data),
                ChannelMsg::ExtendedData { data, ext: 1 } => out.stderr.extend_from_slice(&data),
                ChannelMsg::ExitStatus { exit_status } => out.status = Some(exit_status),
                ChannelMsg::Failure => return Err(err("the server refused to run it".into())),
                _ => {}
            }
        }
        Ok(out)
    }

    /// As `exec`, but a non-zero exit status is an error quoting stderr.
    pub async fn exec_ok(&self, command: &str) -> Result<ExecOutput, SshError> {
        let out = self.exec(command).await?;
        if !out.success() {
            return Err(SshError::Exec {
                peer: self.label.clone(),
                command: command.to_owned(),
                why: format!(
                    "exit status {}: {}",
                    out.status
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "none".into()),
                    out.stderr_text().trim()
                ),
            });
        }
        Ok(out)
    }

    /// A gRPC channel to the Unix socket `socket` on the peer, through a
    /// direct-streamlocal channel of this session (needs sshd's
    /// `AllowStreamLocalForwarding`, OpenSSH's default). The remote daemon
    /// sees the connection as coming from sshd (uid 0).
    pub async fn grpc_channel(&self, socket: &Path) -> Result<Channel, SshError> {
        let sock = socket.display().to_string();
        let tunnel = self.handle.clone();
        let path = sock.clone();
        // The URI is required by tonic and ignored by the connector.
        Endpoint::from_static("http://[::]:50051")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let tunnel = tunnel.clone();
                let path = path.clone();
                async move {
                    let ch = tunnel
                        .channel_open_direct_streamlocal(path)
                        .await
                        .map_err(std::io::Error::other)?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(ch.into_stream()))
                }
            }))
            .await
            .map_err(|e| SshError::Tunnel {
                peer: self.label.clone(),
                socket: sock,
                why: format!("{e} (is the daemon running on the peer?)"),
            })
    }

    /// The session's SFTP channel, opened on first use.
    pub async fn sftp(&self) -> Result<&RawSftpSession, SshError> {
        self.sftp
            .get_or_try_init(|| async {
                let link = |what: &'static str| {
                    move |e: russh::Error| SshError::Link {
                        peer: self.label.clone(),
                        what,
                        why: e.to_string(),
                    }
                };
                let channel = self
                    .handle
                    .channel_open_session()
                    .await
                    .map_err(link("opening the SFTP channel"))?;
                channel
                    .request_subsystem(true, "sftp")
                    .await
                    .map_err(link("starting the SFTP subsystem"))?;
                let sftp = RawSftpSession::new(channel.into_stream());
                sftp.set_timeout(30);
                sftp.init().await.map_err(|e| SshError::Sftp {
                    peer: self.label.clone(),
                    what: "init",
                    path: String::new(),
                    why: e.to_string(),
                })?;
                Ok(sftp)
            })
            .await
    }

    fn sftp_err(
        &self,
        what: &'static str,
        path: &str,
    ) -> impl Fn(russh_sftp::client::error::Error) -> SshError + use<> {
        let peer = self.label.clone();
        let path = path.to_owned();
        move |e| SshError::Sftp {
            peer: peer.clone(),
            what,
            path: path.clone(),
            why: e.to_string(),
        }
    }

    /// Creates `dir` and its parents on the peer, mode 0700 for new ones
    /// (existing ones are fine).
    pub async fn mkdir_p(&self, dir: &str) -> Result<(), SshError> {
        let sftp = self.sftp().await?;
        // Usually the directory is there already: one round trip, not one
        // per path component.
        if sftp
            .lstat(dir.to_owned())
            .await
            .is_ok_and(|a| a.attrs.is_dir())
        {
            return Ok(());
        }
        let mut path = String::new();
        for part in dir.split('/').filter(|p| !p.is_empty()) {
            path.push('/');
            path.push_str(part);
            if let Err(e) = sftp
                .mkdir(
                    path.clone(),
                    FileAttributes {
                        permissions: Some(0o700),
                        ..FileAttributes::empty()
                    },
                )
                .await
            {
                // OpenSSH answers "Failure" for an existing directory.
                let exists = matches!(&e, russh_sftp::client::error::Error::Status(s) if s.status_code == StatusCode::Failure);
                if !exists {
                    return Err(self.sftp_err("mkdir", &path)(e));
                }
            }
        }
        Ok(())
    }

    /// Writes `content` to `path` on the peer (created or truncated with
    /// `mode`, which sftp-server's umask may narrow), fsync'd and closed; not
    /// atomic (see `write_file`). Many uploads may run concurrently: the SFTP
    /// requests are pipelined.
    pub async fn upload(&self, path: &str, content: &[u8], mode: u32) -> Result<(), SshError> {
        self.upload_with(path, content, mode, false).await
    }

    async fn upload_with(
        &self,
        path: &str,
        content: &[u8],
        mode: u32,
        exact_mode: bool,
    ) -> Result<(), SshError> {
        let sftp = self.sftp().await?;
        let attrs = FileAttributes {
            permissions: Some(mode),
            ..FileAttributes::empty()
        };
        let handle = sftp
            .open(
                path.to_owned(),
                OpenFlags::CREATE | OpenFlags::TRUNCATE | OpenFlags::WRITE,
                attrs.clone(),
            )
            .await
            .map_err(self.sftp_err("open", path))?
            .handle;
        for (i, chunk) in content.chunks(SFTP_CHUNK).enumerate() {
            sftp.write(handle.clone(), (i * SFTP_CHUNK) as u64, chunk.to_vec())
                .await
                .map_err(self.sftp_err("write", path))?;
        }
        if exact_mode {
            // The open's mode is filtered by sftp-server's umask.
            sftp.fsetstat(handle.clone(), attrs)
                .await
                .map_err(self.sftp_err("chmod", path))?;
        }
        sftp.fsync(handle.clone())
            .await
            .map_err(self.sftp_err("fsync", path))?;
        sftp.close(handle)
            .await
            .map_err(self.sftp_err("close", path))?;
        Ok(())
    }

    /// Replaces `path` on the peer atomically: a temporary file next to it,
    /// fsync'd, then `posix-rename@openssh.com` over the target (OpenSSH's
    /// plain SFTP rename refuses an existing target). Parent directories are
    /// created; the file gets exactly `mode`.
    pub async fn write_file(&self, path: &Path, content: &[u8], mode: u32) -> Result<(), SshError> {
        let target = path.display().to_string();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            self.mkdir_p(&parent.display().to_string()).await?;
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = path
            .with_file_name(format!(".{name}.{}.tmp", rand::random::<u32>()))
            .display()
            .to_string();
        self.upload_with(&tmp, content, mode, true).await?;
        if let Err(e) = self.posix_rename(&tmp, &target).await {
            let _ = self.sftp().await?.remove(tmp).await;
            return Err(e);
        }
        Ok(())
    }

    /// `posix-rename@openssh.com`: rename(2) on the peer, replacing `to`.
    pub async fn posix_rename(&self, from: &str, to: &str) -> Result<(), SshError> {
        let sftp = self.sftp().await?;
        let mut data = Vec::with_capacity(from.len() + to.len() + 8);
        for s in [from, to] {
            data.extend_from_slice(&(s.len() as u32).to_be_bytes());
            data.extend_from_slice(s.as_bytes());
        }
        match sftp
            .extended("posix-rename@openssh.com", data)
            .await
            .map_err(self.sftp_err("rename", to))?
        {
            Packet::Status(s) if s.status_code == StatusCode::Ok => Ok(()),
            Packet::Status(s) => Err(SshError::Sftp {
                peer: self.label.clone(),
                what: "rename",
                path: format!("{from} -> {to}"),
                why: format!("{:?}: {}", s.status_code, s.error_message),
            }),
            other => Err(SshError::Sftp {
                peer: self.label.clone(),
                what: "rename",
                path: format!("{from} -> {to}"),
                why: format!("unexpected answer {other:?}"),
            }),
        }
    }

    /// Removes a file on the peer; a missing file is fine.
    pub async fn remove_file(&self, path: &Path) -> Result<(), SshError> {
        let p = path.display().to_string();
        match self.sftp().await?.remove(p.clone()).await {
            Ok(_) => Ok(()),
            Err(russh_sftp::client::error::Error::Status(s))
                if s.status_code == StatusCode::NoSuchFile =>
            {
                Ok(())
            }
            Err(e) => Err(self.sftp_err("remove", &p)(e)),
        }
    }

    /// Reads a whole file on the peer; None when it does not exist.
    pub async fn read_file(&self, path: &Path) -> Result<Option<Vec<u8>>, SshError> {
        let sftp = self.sftp().await?;
        let p = path.display().to_string();
        let handle = match sftp
            .open(p.clone(), OpenFlags::READ, FileAttributes::empty())
            .await
        {
            Ok(h) => h.handle,
            Err(russh_sftp::client::error::Error::Status(s))
                if s.status_code == StatusCode::NoSuchFile =>
            {
                return Ok(None);
            }
            Err(e) => return Err(self.sftp_err("open", &p)(e)),
        };
        let mut out = Vec::new();
        loop {
            match sftp
                .read(handle.clone(), out.len() as u64, SFTP_CHUNK as u32)
                .await
            {
                Ok(d) if d.data.is_empty() => break,
                Ok(d) => out.extend_from_slice(&d.data),
                Err(russh_sftp::client::error::Error::Status(s))
                    if s.status_code == StatusCode::Eof =>
                {
                    break;
                }
                Err(e) => return Err(self.sftp_err("read", &p)(e)),
            }
        }
        let _ = sftp.close(handle).await;
        Ok(Some(out))
    }

    pub async fn close(self) {
        let _ = self
            .handle
            .disconnect(Disconnect::ByApplication, "done", "en")
            .await;
    }
}

/// The host key the sshd at `addr` presents, read with the SSH handshake
/// alone: the connection is closed before any authentication, so nothing
/// but the key exchange is sent. What cluster creation shows the operator
/// to confirm before the root password leaves the node.
pub async fn peer_host_key(addr: SocketAddr) -> Result<PublicKey, SshError> {
    let seen = Arc::new(Mutex::new(None));
    let handler = HostKeyHandler {
        pinned: None,
        confirmed: None,
        seen: seen.clone(),
    };
    let config = client::Config {
        nodelay: true,
        ..Default::default()
    };
    let label = addr.ip().to_string();
    let connecting = client::connect(Arc::new(config), addr, handler);
    let handle = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Err(_) => {
            return Err(SshError::Unreachable {
                target: addr.to_string(),
                why: format!("no SSH handshake within {} s", CONNECT_TIMEOUT.as_secs()),
            });
        }
        Ok(Err(russh::Error::IO(io))) => {
            return Err(SshError::Unreachable {
                target: addr.to_string(),
                why: io.to_string(),
            });
        }
        Ok(Err(e)) => {
            return Err(SshError::Link {
                peer: label,
                what: "reading its host key",
                why: e.to_string(),
            });
        }
        Ok(Ok(h)) => h,
    };
    let _ = handle
        .disconnect(Disconnect::ByApplication, "host key read", "en")
        .await;
    seen.lock()
        .ok()
        .and_then(|s| s.clone())
        .ok_or_else(|| SshError::Link {
            peer: label,
            what: "reading its host key",
            why: "the server showed no host key".into(),
        })
}

/// How an unreachable peer is named: its label when it is more than its
/// bare address.
fn target(label: &str, addr: SocketAddr) -> String {
    if label == addr.ip().to_string() {
        addr.to_string()
    } else {
        label.to_owned()
    }
}

/// Whether this process may lock memory (`mlock`), tried on one page.
///
/// russh locks the buffers that hold session keys so they are never swapped
/// out, and the first time the kernel refuses it logs a "Security warning"
/// at WARN, once per process. A systemd unit that forbids `mlock`
/// (`SystemCallFilter=` without `@memlock`, a `LimitMEMLOCK=` of 0) makes it
/// refuse every time, and that warning would read as a fault at every
/// start. Called before logging starts, this spends russh's one warning
/// where no one reads it (a first key buffer, locked or not) and tells the
/// caller the outcome, to say once at the level it deserves. Nothing is
/// lost: locking pages protects against swap only, and the secrets Tandem
/// handles (the root password of cluster creation, the cluster key read
/// from its file) live in ordinary memory before they reach russh anyway.
pub fn probe_memory_lock() -> Result<(), std::io::Error> {
    drop(russh::CryptoVec::new_zeroed(1));
    let page = vec![0u8; 4096];
    // SAFETY: the range is one live allocation of `page.len()` bytes, owned
    // here and unlocked before it is freed.
    let locked = unsafe { libc::mlock(page.as_ptr().cast(), page.len()) };
    if locked != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the same range, locked just above.
    unsafe { libc::munlock(page.as_ptr().cast(), page.len()) };
    Ok(())
}

/// Reads an OpenSSH private key file.
pub fn load_identity(path: &Path) -> Result<PrivateKey, SshError> {
    let err = |why: String| SshError::Identity {
        path: path.display().to_string(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    russh::keys::decode_secret_key(&text, None).map_err(|e| err(e.to_string()))
}

/// A new ed25519 identity: (private key in OpenSSH format, public key line
/// `ssh-ed25519 AAAA... tandem-cluster`).
pub fn generate_identity() -> Result<(String, String), SshError> {
    let mut key = PrivateKey::random(&mut rand::rng(), Algorithm::Ed25519)
        .map_err(|e| SshError::KeyGen(e.to_string()))?;
    key.set_comment("tandem-cluster");
    let private = key
        .to_openssh(russh::keys::ssh_key::LineEnding::LF)
        .map_err(|e| SshError::KeyGen(e.to_string()))?;
    let public = key
        .public_key()
        .to_openssh()
        .map_err(|e| SshError::KeyGen(e.to_string()))?;
    Ok((private.to_string(), public))
}

/// Parses an OpenSSH public-key line (`type base64 [comment]`).
pub fn parse_public_key_line(line: &str) -> Option<PublicKey> {
    let mut f = line.split_whitespace();
    let _alg = f.next()?;
    russh::keys::parse_public_key_base64(f.next()?).ok()
}

/// The SHA-256 fingerprint of an OpenSSH public-key line, for messages.
pub fn fingerprint_of_line(line: &str) -> String {
    parse_public_key_line(line)
        .map(|k| fingerprint(&k))
        .unwrap_or_else(|| "<unreadable key>".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_identity_loads_back_and_its_public_line_matches() {
        let (private, public) = generate_identity().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("id_ed25519");
        std::fs::write(&path, &private).unwrap();
        let key = load_identity(&path).unwrap();
        assert!(public.starts_with("ssh-ed25519 "), "{public}");
        assert_eq!(
            parse_public_key_line(&public).unwrap().key_data(),
            key.public_key().key_data()
        );
        let (_, other) = generate_identity().unwrap();
        assert_ne!(public, other, "two identities must differ");
    }

    #[test]
    fn fingerprints_are_read_from_what_operators_paste() {
        let fp = "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s";
        for text in [
            fp.to_owned(),
            format!("ssh-ed25519 {fp}"),
            format!("256 {fp} root@lb2 (ED25519)\n"),
            format!("{fp}="),
        ] {
            assert_eq!(parse_fingerprint(&text).unwrap(), fp, "{text}");
        }
        for bad in [
            "",
            "MD5:aa:bb",
            "SHA256:short",
            "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s!",
        ] {
            assert!(parse_fingerprint(bad).is_err(), "{bad}");
        }
        let (_, public) = generate_identity().unwrap();
        let key = parse_public_key_line(&public).unwrap();
        assert_eq!(parse_fingerprint(&sha256(&key)).unwrap(), sha256(&key));
        assert_eq!(fingerprint(&key), format!("ssh-ed25519 {}", sha256(&key)));
    }

    #[test]
    fn the_password_never_shows_in_debug_output() {
        let a = Auth::Password("hunter2".into());
        assert!(!format!("{a:?}").contains("hunter2"));
    }
}
