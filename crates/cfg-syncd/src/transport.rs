//! cfg-syncd's use of the SSH session to the peer (tandem-ssh): key
//! authentication with this node's identity, the peer's host key pinned in
//! `<config_dir>/ssh/known_hosts`, files staged over SFTP (many in flight),
//! and the peer cfg-syncd's gRPC service tunnelled to its Unix socket.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use futures::StreamExt;
use tandem_proto::v1::cfg_sync_client::CfgSyncClient;
use tandem_ssh::{Auth, HostKeyCheck, SshError, SshSession};
use tonic::transport::Channel;

use crate::manifest::{Entry, Manifest};

/// Files staged concurrently over the one SFTP channel (requests are
/// pipelined; the round trips overlap).
const SFTP_PARALLEL: usize = 32;

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
    #[error(transparent)]
    Ssh(#[from] SshError),
    #[error("reading {path} to send to peer {peer}: {why}")]
    Local {
        peer: String,
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
        matches!(self, TransportError::Ssh(e) if e.is_host_key())
    }
}

/// An authenticated session to the peer, ready to stage files and call the
/// peer's cfg-syncd.
pub struct PeerSession {
    pub peer: PeerSpec,
    ssh: SshSession,
    rpc: CfgSyncClient<Channel>,
}

impl PeerSession {
    pub async fn connect(peer: &PeerSpec) -> Result<PeerSession, TransportError> {
        let ssh = SshSession::connect_labelled(
            &peer.to_string(),
            peer.addr,
            &peer.user,
            HostKeyCheck::Pinned {
                known_hosts: peer.known_hosts.clone(),
            },
            Auth::Key(peer.identity.clone()),
        )
        .await?;
        // The SFTP channel is opened now: a peer without the subsystem is a
        // connection failure, not a failure of the first batch.
        ssh.sftp().await?;
        let socket = peer.peer_runtime_dir.join("cfg-syncd.sock");
        let channel = ssh.grpc_channel(&socket).await?;
        Ok(PeerSession {
            peer: peer.clone(),
            ssh,
            rpc: CfgSyncClient::new(channel),
        })
    }

    pub fn is_closed(&self) -> bool {
        self.ssh.is_closed()
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
            self.ssh.mkdir_p(d).await?;
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
                return Err(TransportError::Local {
                    peer: self.peer.to_string(),
                    path: entry.path.clone(),
                    why: e.to_string(),
                });
            }
        };
        let target = format!("{staging}/{}", entry.path);
        // Staged 0600: the apply sets the announced mode when it moves the
        // file into place.
        self.ssh.upload(&target, &data, 0o600).await?;
        let mut sent = entry;
        sent.size = data.len() as u64;
        sent.sha256 = crate::manifest::sha256_hex(&data);
        Ok(Some(sent))
    }

    pub async fn close(self) {
        self.ssh.close().await;
    }
}

fn parent(path: &str) -> String {
    match path.rfind('/') {
        Some(i) => path[..i].to_owned(),
        None => String::new(),
    }
}
