//! The SSH session to the peer: a russh client with key authentication,
//! the peer's host key pinned in `<config_dir>/ssh/known_hosts`, an SFTP
//! channel that stages files, and the peer cfg-syncd's gRPC service tunnelled
//! over a direct-streamlocal channel to its Unix socket.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use russh::client::{self, Handle};
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh_sftp::client::RawSftpSession;
use russh_sftp::protocol::{FileAttributes, OpenFlags, StatusCode};
use tandem_proto::v1::cfg_sync_client::CfgSyncClient;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::manifest::{Entry, Manifest};

/// Files staged concurrently over the one SFTP channel (requests are
/// pipelined; the round trips overlap).
const SFTP_PARALLEL: usize = 32;
/// OpenSSH's sftp-server accepts writes up to 256 KiB; stay well below.
const SFTP_CHUNK: usize = 64 * 1024;

/// Where the peer is and how to reach it.
#[derive(Debug, Clone)]
pub struct PeerSpec {
    pub name: String,
    pub addr: SocketAddr,
    pub user: String,
    /// This node's SSH identity (OpenSSH private key).
    pub identity: PathBuf,
    /// The peer's pinned host key(s), OpenSSH known_hosts format.
    pub known_hosts: PathBuf,
    pub peer_config_dir: PathBuf,
    pub peer_runtime_dir: PathBuf,
}

impl std::fmt::Display for PeerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name, self.addr)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
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
    #[error("peer {peer}: {what}: {why}")]
    Link {
        peer: String,
        what: &'static str,
        why: String,
    },
    #[error(
        "peer {peer}: authentication as {user} with {identity} refused (is its public key in the peer's authorized_keys?)"
    )]
    AuthRefused {
        peer: String,
        user: String,
        identity: String,
    },
    #[error("peer {peer}: SFTP {what} {path}: {why}")]
    Sftp {
        peer: String,
        what: &'static str,
        path: String,
        why: String,
    },
    #[error("peer {peer}: cfg-syncd at {socket}: {why}")]
    Rpc {
        peer: String,
        socket: String,
        why: String,
    },
}

impl TransportError {
    /// A refused host key is logged differently: retrying cannot fix it.
    pub fn is_host_key(&self) -> bool {
        matches!(
            self,
            TransportError::HostKeyMismatch { .. } | TransportError::NoPin { .. }
        )
    }
}

fn fingerprint(key: &PublicKey) -> String {
    format!("{} {}", key.algorithm(), key.fingerprint(HashAlg::Sha256))
}

/// The host keys pinned for `addr` in a known_hosts file: plain `host`,
/// `[host]:port` and hashed (`|1|salt|hash`) entries are understood.
pub fn pinned_keys(
    path: &Path,
    addr: SocketAddr,
    peer: &str,
) -> Result<Vec<PublicKey>, TransportError> {
    let host = addr.ip().to_string();
    let no_pin = |why: String| TransportError::NoPin {
        peer: peer.to_owned(),
        host: host.clone(),
        path: path.display().to_string(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| no_pin(e.to_string()))?;
    let bracketed = format!("[{host}]:{}", addr.port());
    let mut keys = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('@') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(hosts), Some(_alg), Some(b64)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let matches = hosts.split(',').any(|h| {
            h == host || h == bracketed || hashed_match(h, &host) || hashed_match(h, &bracketed)
        });
        if matches {
            let key = russh::keys::parse_public_key_base64(b64)
                .map_err(|e| no_pin(format!("unreadable key for {hosts}: {e}")))?;
            keys.push(key);
        }
    }
    if keys.is_empty() {
        return Err(no_pin("no line names this host".into()));
    }
    Ok(keys)
}

/// OpenSSH's hashed host names: `|1|base64(salt)|base64(HMAC-SHA1(salt, host))`.
fn hashed_match(entry: &str, host: &str) -> bool {
    use ring::hmac;
    let Some(rest) = entry.strip_prefix("|1|") else {
        return false;
    };
    let Some((salt, hash)) = rest.split_once('|') else {
        return false;
    };
    let (Ok(salt), Ok(hash)) = (b64_decode(salt), b64_decode(hash)) else {
        return false;
    };
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &salt);
    hmac::verify(&key, host.as_bytes(), &hash).is_ok()
}

fn b64_decode(s: &str) -> Result<Vec<u8>, ()> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = ALPHABET.iter().position(|a| *a == c).ok_or(())?;
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

/// Accepts the server only if it shows a pinned key; records what it showed
/// so a refusal can name both fingerprints.
struct PinnedHost {
    pinned: Vec<PublicKey>,
    seen: Arc<Mutex<Option<PublicKey>>>,
}

impl client::Handler for PinnedHost {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        // Certificates are not part of the design: only a pinned plain key.
        let PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            return Ok(false);
        };
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(key.clone());
        }
        Ok(self.pinned.iter().any(|p| p.key_data() == key.key_data()))
    }
}

/// An authenticated session to the peer, ready to stage files and call the
/// peer's cfg-syncd.
pub struct PeerSession {
    pub peer: PeerSpec,
    handle: Arc<Handle<PinnedHost>>,
    sftp: RawSftpSession,
    rpc: CfgSyncClient<Channel>,
}

fn link<'a>(
    peer: &'a PeerSpec,
    what: &'static str,
) -> impl Fn(russh::Error) -> TransportError + 'a {
    move |e| TransportError::Link {
        peer: peer.to_string(),
        what,
        why: e.to_string(),
    }
}

impl PeerSession {
    pub async fn connect(peer: &PeerSpec) -> Result<PeerSession, TransportError> {
        let pinned = pinned_keys(&peer.known_hosts, peer.addr, &peer.name)?;
        let key = load_identity(&peer.identity)?;
        let seen = Arc::new(Mutex::new(None));
        let config = client::Config {
            // A dead peer is noticed within ~6 s even without traffic.
            keepalive_interval: Some(Duration::from_secs(2)),
            keepalive_max: 3,
            nodelay: true,
            ..Default::default()
        };
        let handler = PinnedHost {
            pinned: pinned.clone(),
            seen: seen.clone(),
        };
        let connecting = client::connect(Arc::new(config), peer.addr, handler);
        let mut handle = match tokio::time::timeout(Duration::from_secs(5), connecting).await {
            Err(_) => {
                return Err(TransportError::Link {
                    peer: peer.to_string(),
                    what: "connecting",
                    why: "timed out after 5 s".into(),
                });
            }
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                let shown = seen.lock().ok().and_then(|s| s.clone());
                if let Some(got) =
                    shown.filter(|g| !pinned.iter().any(|p| p.key_data() == g.key_data()))
                {
                    return Err(TransportError::HostKeyMismatch {
                        peer: peer.to_string(),
                        got: fingerprint(&got),
                        expected: pinned
                            .iter()
                            .map(fingerprint)
                            .collect::<Vec<_>>()
                            .join(" or "),
                        pin: peer.known_hosts.display().to_string(),
                    });
                }
                return Err(link(peer, "connecting")(e));
            }
        };
        let auth = handle
            .authenticate_publickey(&peer.user, PrivateKeyWithHashAlg::new(Arc::new(key), None))
            .await
            .map_err(link(peer, "authenticating"))?;
        if !auth.success() {
            return Err(TransportError::AuthRefused {
                peer: peer.to_string(),
                user: peer.user.clone(),
                identity: peer.identity.display().to_string(),
            });
        }
        let handle = Arc::new(handle);

        let channel = handle
            .channel_open_session()
            .await
            .map_err(link(peer, "opening the SFTP channel"))?;
        channel
            .request_subsystem(true, "sftp")
            .await
            .map_err(link(peer, "starting the SFTP subsystem"))?;
        let sftp = RawSftpSession::new(channel.into_stream());
        sftp.set_timeout(30);
        sftp.init().await.map_err(|e| TransportError::Sftp {
            peer: peer.to_string(),
            what: "init",
            path: String::new(),
            why: e.to_string(),
        })?;

        let socket = peer
            .peer_runtime_dir
            .join("cfg-syncd.sock")
            .display()
            .to_string();
        let tunnel = handle.clone();
        let sock = socket.clone();
        let endpoint = Endpoint::from_static("http://[::]:50051");
        let channel = endpoint
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let tunnel = tunnel.clone();
                let sock = sock.clone();
                async move {
                    let ch = tunnel
                        .channel_open_direct_streamlocal(sock)
                        .await
                        .map_err(std::io::Error::other)?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(ch.into_stream()))
                }
            }))
            .await
            .map_err(|e| TransportError::Rpc {
                peer: peer.to_string(),
                socket: socket.clone(),
                why: format!("{e} (is cfg-syncd running on the peer?)"),
            })?;
        Ok(PeerSession {
            peer: peer.clone(),
            handle,
            sftp,
            rpc: CfgSyncClient::new(channel),
        })
    }

    pub fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }

    fn rpc_error(&self, e: tonic::Status) -> TransportError {
        TransportError::Rpc {
            peer: self.peer.to_string(),
            socket: self
                .peer
                .peer_runtime_dir
                .join("cfg-syncd.sock")
                .display()
                .to_string(),
            why: format!("{}: {}", e.code(), e.message()),
        }
    }

    pub async fn manifest(&self) -> Result<Manifest, TransportError> {
        let m = self
            .rpc
            .clone()
            .get_manifest(tandem_proto::v1::GetManifestRequest {})
            .await
            .map_err(|e| self.rpc_error(e))?;
        Ok(m.into_inner().into())
    }

    pub async fn apply(
        &self,
        req: tandem_proto::v1::ApplyRequest,
    ) -> Result<tandem_proto::v1::ApplyReply, TransportError> {
        let r = self
            .rpc
            .clone()
            .apply(req)
            .await
            .map_err(|e| self.rpc_error(e))?;
        Ok(r.into_inner())
    }

    fn sftp_err(
        &self,
        what: &'static str,
        path: &str,
    ) -> impl Fn(russh_sftp::client::error::Error) -> TransportError {
        let peer = self.peer.to_string();
        let path = path.to_owned();
        move |e| TransportError::Sftp {
            peer: peer.clone(),
            what,
            path: path.clone(),
            why: e.to_string(),
        }
    }

    /// Creates `dir` and its parents on the peer (existing ones are fine).
    async fn mkdir_p(&self, dir: &str) -> Result<(), TransportError> {
        let mut path = String::new();
        for part in dir.split('/').filter(|p| !p.is_empty()) {
            path.push('/');
            path.push_str(part);
            if let Err(e) = self
                .sftp
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

    /// Stages `files` (content read from `local_root`) under `staging` on the
    /// peer: each written, fsync'd and closed before the batch is applied.
    /// Returns the entries as they were actually sent (a file that changed
    /// since the manifest was taken is sent as it is now, with its new hash).
    pub async fn stage(
        &self,
        local_root: &Path,
        staging: &str,
        files: &[Entry],
    ) -> Result<Vec<Entry>, TransportError> {
        let mut dirs: Vec<String> = files
            .iter()
            .map(|e| parent(&format!("{staging}/{}", e.path)))
            .collect();
        dirs.sort();
        dirs.dedup();
        for d in &dirs {
            self.mkdir_p(d).await?;
        }
        // Futures built in a loop, not a closure: a closure returning
        // borrowing futures trips rustc's `Send is not general enough`.
        let mut jobs = Vec::with_capacity(files.len());
        for e in files {
            jobs.push(self.stage_one(local_root.to_owned(), staging.to_owned(), e.clone()));
        }
        let sent: Vec<Result<Option<Entry>, TransportError>> = futures::stream::iter(jobs)
            .buffer_unordered(SFTP_PARALLEL)
            .collect()
            .await;
        let mut out = Vec::with_capacity(sent.len());
        for s in sent {
            if let Some(e) = s? {
                out.push(e);
            }
        }
        Ok(out)
    }

    async fn stage_one(
        &self,
        local_root: PathBuf,
        staging: String,
        entry: Entry,
    ) -> Result<Option<Entry>, TransportError> {
        let data = match tokio::fs::read(local_root.join(&entry.path)).await {
            Ok(d) => d,
            // Deleted since the scan: the next round deletes it on the peer.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(TransportError::Sftp {
                    peer: self.peer.to_string(),
                    what: "reading local",
                    path: entry.path.clone(),
                    why: e.to_string(),
                });
            }
        };
        let target = format!("{staging}/{}", entry.path);
        let handle = self
            .sftp
            .open(
                target.clone(),
                OpenFlags::CREATE | OpenFlags::TRUNCATE | OpenFlags::WRITE,
                FileAttributes {
                    permissions: Some(0o600),
                    ..FileAttributes::empty()
                },
            )
            .await
            .map_err(self.sftp_err("open", &target))?
            .handle;
        for (i, chunk) in data.chunks(SFTP_CHUNK).enumerate() {
            self.sftp
                .write(handle.clone(), (i * SFTP_CHUNK) as u64, chunk.to_vec())
                .await
                .map_err(self.sftp_err("write", &target))?;
        }
        self.sftp
            .fsync(handle.clone())
            .await
            .map_err(self.sftp_err("fsync", &target))?;
        self.sftp
            .close(handle)
            .await
            .map_err(self.sftp_err("close", &target))?;
        let mut sent = entry;
        sent.size = data.len() as u64;
        sent.sha256 = crate::manifest::sha256_hex(&data);
        Ok(Some(sent))
    }

    pub async fn close(self) {
        let _ = self
            .handle
            .disconnect(russh::Disconnect::ByApplication, "cfg-syncd stopping", "en")
            .await;
    }
}

fn parent(path: &str) -> String {
    match path.rfind('/') {
        Some(i) => path[..i].to_owned(),
        None => String::new(),
    }
}

fn load_identity(path: &Path) -> Result<PrivateKey, TransportError> {
    let err = |why: String| TransportError::Identity {
        path: path.display().to_string(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    russh::keys::decode_secret_key(&text, None).map_err(|e| err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashed_known_hosts_entries_match_their_host_only() {
        // `ssh-keygen -H` of "10.0.0.2" with this salt.
        use ring::hmac;
        let salt = [7u8; 20];
        let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &salt);
        let tag = hmac::sign(&key, b"10.0.0.2");
        let entry = format!("|1|{}|{}", b64(&salt), b64(tag.as_ref()));
        assert!(hashed_match(&entry, "10.0.0.2"));
        assert!(!hashed_match(&entry, "10.0.0.3"));
    }

    fn b64(data: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut s = String::new();
        for c in data.chunks(3) {
            let n = (u32::from(c[0]) << 16)
                | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
                | u32::from(*c.get(2).unwrap_or(&0));
            for i in 0..4 {
                if i <= c.len() {
                    s.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    s.push('=');
                }
            }
        }
        s
    }

    #[test]
    fn b64_roundtrip() {
        for data in [
            &b""[..],
            b"a",
            b"ab",
            b"abc",
            b"abcd",
            &[0xff, 0, 0x10, 0x80],
        ] {
            assert_eq!(b64_decode(&b64(data)).unwrap(), data);
        }
    }

    #[test]
    fn a_missing_pin_is_an_error_not_trust_on_first_use() {
        let tmp = tempfile::tempdir().unwrap();
        let addr: SocketAddr = "10.0.0.2:22".parse().unwrap();
        let e = pinned_keys(&tmp.path().join("known_hosts"), addr, "lb2").unwrap_err();
        assert!(e.is_host_key(), "{e}");
        std::fs::write(
            tmp.path().join("known_hosts"),
            "10.0.0.9 ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKQ5W2r2Gh8wnYoF6v2eG4yRj6DpzPz1d0iTo1cbgHwV\n",
        )
        .unwrap();
        let e = pinned_keys(&tmp.path().join("known_hosts"), addr, "lb2").unwrap_err();
        assert!(e.to_string().contains("no line names this host"), "{e}");
    }
}
