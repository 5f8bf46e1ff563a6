//! cfg-syncd's use of the SSH session to the peer (tandem-ssh): key
//! authentication with this node's identity, the peer's host key pinned in
//! `<config_dir>/ssh/known_hosts`, files staged over SFTP (many in flight,
//! each streamed from a descriptor opened without following links), and
//! the peer cfg-syncd's gRPC service tunnelled to its Unix socket, with the
//! manifest and the batch streamed in bounded chunks.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use russh_sftp::protocol::{FileAttributes, OpenFlags, StatusCode};
use tandem_proto::v1::cfg_sync_client::CfgSyncClient;
use tandem_ssh::{Auth, HostKeyCheck, SFTP_CHUNK, SshError, SshSession};
use tonic::transport::Channel;

use crate::apply::{Batch, into_chunks};
use crate::manifest::{Entry, Manifest, ManifestReader, Sha};
use crate::nofollow;

/// Files staged concurrently over the one SFTP channel (requests are
/// pipelined; the round trips overlap). Each holds one 64 KiB buffer.
const SFTP_PARALLEL: usize = 32;
/// Files whose upload futures exist at once.
const STAGE_WINDOW: usize = 512;

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

    /// The peer's manifest, read chunk by chunk and checked against the hash
    /// its last chunk announces.
    pub async fn manifest(&self) -> Result<Manifest, TransportError> {
        let mut stream = self
            .rpc
            .clone()
            .get_manifest(tandem_proto::v1::GetManifestRequest {})
            .await
            .map_err(|e| self.rpc_error(e))?
            .into_inner();
        let mut reader = ManifestReader::default();
        while let Some(chunk) = stream.message().await.map_err(|e| self.rpc_error(e))? {
            reader
                .push(chunk)
                .map_err(|e| self.rpc_error(tonic::Status::data_loss(e.to_string())))?;
        }
        reader
            .finish()
            .map_err(|e| self.rpc_error(tonic::Status::data_loss(e.to_string())))
    }

    /// Streams the batch to the peer's cfg-syncd (bounded chunks, the last
    /// one commits) and returns its answer.
    pub async fn apply(
        &self,
        batch: Batch,
    ) -> Result<tandem_proto::v1::ApplyReply, TransportError> {
        let r = self
            .rpc
            .clone()
            .apply(tokio_stream::iter(into_chunks(batch)))
            .await
            .map_err(|e| self.rpc_error(e))?;
        Ok(r.into_inner())
    }

    /// Stages `files` (read from `root`) under `staging` on the peer, a
    /// directory that must not exist yet. Returns the entries as actually
    /// sent: a file that changed since the manifest was taken is sent as it
    /// is now, with its new hash; one that vanished, turned into a link or
    /// outgrew `max_file_bytes` is not sent (the next scan says why).
    /// Staged files are not fsync'd one by one: the peer syncs the batch
    /// before its commit.
    pub async fn stage(
        &self,
        root: Arc<OwnedFd>,
        staging: &str,
        files: &[Entry],
        max_file_bytes: u64,
    ) -> Result<Vec<Entry>, TransportError> {
        if files.is_empty() {
            return Ok(vec![]);
        }
        let sftp = self.ssh.sftp().await?;
        self.ssh.mkdir_p(&parent(staging)).await?;
        // A fresh directory: nothing planted in it can redirect a write.
        sftp.mkdir(
            staging.to_owned(),
            FileAttributes {
                permissions: Some(0o700),
                ..FileAttributes::empty()
            },
        )
        .await
        .map_err(|e| sftp_err(&self.peer, "mkdir", staging, e))?;
        let mut dirs: Vec<String> = files
            .iter()
            .map(|e| parent(&format!("{staging}/{}", e.path)))
            .filter(|d| d != staging)
            .collect();
        dirs.sort();
        dirs.dedup();
        for d in &dirs {
            self.ssh.mkdir_p(d).await?;
        }
        // Futures are built a window at a time (each is a few KB: 100,000
        // of them at once would be hundreds of MB), in a loop, not a
        // closure: a closure returning borrowing futures trips rustc's
        // `Send is not general enough`.
        let mut sent = Vec::with_capacity(files.len());
        for window in files.chunks(STAGE_WINDOW) {
            let mut jobs = Vec::with_capacity(window.len());
            for e in window {
                jobs.push(self.stage_one(root.clone(), staging, e, max_file_bytes));
            }
            let mut results = futures::stream::iter(jobs).buffer_unordered(SFTP_PARALLEL);
            while let Some(r) = results.next().await {
                if let Some(e) = r? {
                    sent.push(e);
                }
            }
        }
        sent.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(sent)
    }

    async fn stage_one(
        &self,
        root: Arc<OwnedFd>,
        staging: &str,
        entry: &Entry,
        cap: u64,
    ) -> Result<Option<Entry>, TransportError> {
        let local = |why: String| TransportError::Local {
            peer: self.peer.to_string(),
            path: entry.path.to_string(),
            why,
        };
        let (file, st) = match nofollow::open_file_beneath(&*root, &entry.path) {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e)
                if nofollow::is_link_error(&e) || e.kind() == std::io::ErrorKind::InvalidData =>
            {
                return Ok(None);
            }
            Err(e) => return Err(local(e.to_string())),
        };
        let mut file = file;
        let target = format!("{staging}/{}", entry.path);
        let sftp = self.ssh.sftp().await?;
        // Staged 0600: the apply sets the announced owner and mode.
        let handle = sftp
            .open(
                target.clone(),
                OpenFlags::CREATE | OpenFlags::TRUNCATE | OpenFlags::WRITE | OpenFlags::EXCLUDE,
                FileAttributes {
                    permissions: Some(0o600),
                    ..FileAttributes::empty()
                },
            )
            .await
            .map_err(|e| sftp_err(&self.peer, "open", &target, e))?
            .handle;
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; SFTP_CHUNK];
        let mut offset = 0u64;
        let mut too_big = false;
        loop {
            // A 64 KiB read of a local file, on the runtime thread: a
            // blocking-pool thread per read (tokio::fs) costs more, and
            // dozens of such threads fragment the allocator.
            let n = std::io::Read::read(&mut file, &mut buf).map_err(|e| local(e.to_string()))?;
            if n == 0 {
                break;
            }
            if offset + n as u64 > cap {
                too_big = true;
                break;
            }
            ctx.update(&buf[..n]);
            sftp.write(handle.clone(), offset, buf[..n].to_vec())
                .await
                .map_err(|e| sftp_err(&self.peer, "write", &target, e))?;
            offset += n as u64;
        }
        sftp.close(handle)
            .await
            .map_err(|e| sftp_err(&self.peer, "close", &target, e))?;
        if too_big {
            return Ok(None);
        }
        Ok(Some(Entry {
            path: entry.path.clone(),
            sha: Sha::from_digest(ctx.finish()),
            size: offset,
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
        }))
    }

    pub async fn close(self) {
        self.ssh.close().await;
    }
}

fn sftp_err(
    peer: &PeerSpec,
    what: &'static str,
    path: &str,
    e: russh_sftp::client::error::Error,
) -> TransportError {
    let why = match &e {
        russh_sftp::client::error::Error::Status(s) if s.status_code == StatusCode::Failure => {
            format!("{e} (already exists, or no space left)")
        }
        _ => e.to_string(),
    };
    TransportError::Ssh(SshError::Sftp {
        peer: peer.to_string(),
        what,
        path: path.to_owned(),
        why,
    })
}

fn parent(path: &str) -> String {
    match path.rfind('/') {
        Some(i) => path[..i].to_owned(),
        None => String::new(),
    }
}

/// The path of the staging directory of `batch` on the peer.
pub fn staging_path(peer_config_dir: &Path, batch: &str) -> String {
    peer_config_dir
        .join(crate::manifest::STAGING_DIR)
        .join(batch)
        .display()
        .to_string()
}
