//! Rollback of a confirmed creation that fails in [keys] or later: nothing
//! is left half-written. Before the first write, everything the run may
//! change on a node — node.toml, cluster.toml, `keys/`, `ssh/`, the
//! replicated trees, `backups/`, the cluster's authorized_keys — is saved
//! in a tar archive on that node (`tar --absolute-names`, modes kept;
//! paths that do not exist are noted as absent). Rolling back removes
//! those paths and extracts the archive, on both nodes; daemons that were
//! reloaded with the new configuration are reloaded again, and floating IPs
//! this node served as plain addresses before are put back. A daemon that
//! was started stays started, with the restored configuration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow, bail};
use tandem_config::IpNet;
use tandem_proto::v1;
use tandem_ssh::{Auth, HostKeyCheck, SshSession};

use super::facts::{self, run_local, sh_quote};
use super::start::{reload_local, reload_peer, wait_local_vrrp};
use super::{CreateContext, Plan};

/// What a node may lose to the run, relative to its configuration
/// directory (its authorized_keys file is added when outside).
const TOUCHED: [&str; 10] = [
    "node.toml",
    "cluster.toml",
    "keys",
    "ssh",
    "farms",
    "checks",
    "certs",
    "notifications",
    "routes",
    "backups",
];

fn touched(config_dir: &Path, authorized_keys: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = TOUCHED.iter().map(|p| config_dir.join(p)).collect();
    if !out.iter().any(|p| authorized_keys.starts_with(p)) {
        out.push(authorized_keys.to_owned());
    }
    out
}

fn quoted(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| sh_quote(&p.display().to_string()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `tar` saving `paths` into `archive` (absent paths are skipped: they are
/// absent again after a rollback).
fn save_script(dir: &str, paths: &[PathBuf]) -> String {
    format!(
        "umask 077 && tar --create --preserve-permissions --absolute-names --ignore-failed-read --file {dir}/undo.tar -- {} 2>/dev/null",
        quoted(paths)
    )
}

/// Removing `paths` and extracting the archive: the node as it was.
fn restore_script(dir: &str, paths: &[PathBuf]) -> String {
    format!(
        "rm -rf -- {} && tar --extract --preserve-permissions --absolute-names --file {dir}/undo.tar && rm -rf -- {dir}",
        quoted(paths)
    )
}

/// The saved state of both nodes, and what the run did beyond files.
pub struct Undo {
    local_dir: String,
    local_paths: Vec<PathBuf>,
    peer_dir: String,
    peer_paths: Vec<PathBuf>,
    /// This node's daemons were reloaded with the new configuration.
    pub local_reloaded: bool,
    /// The peer's were.
    pub peer_reloaded: bool,
    /// Floating IPs this node held before the run (a standalone node's
    /// plain addresses), with their interfaces.
    held: Vec<(IpNet, String)>,
}

impl Undo {
    /// Saves both nodes' state before the first write. An error here has
    /// changed nothing (the archives are removed).
    pub async fn save(
        ctx: &CreateContext,
        ssh: &SshSession,
        held: Vec<(IpNet, String)>,
    ) -> anyhow::Result<Undo> {
        let local_paths = touched(&ctx.config_dir, &ctx.authorized_keys);
        let peer_paths = touched(&ctx.peer_config_dir, &ctx.peer_authorized_keys);
        let local_dir = run_local("mktemp", &["-d", "/tmp/tandem-create-undo.XXXXXX"])
            .await
            .context("saving this node's configuration before the creation")?
            .trim()
            .to_owned();
        let saved = run_local(
            "sh",
            &["-c", &save_script(&sh_quote(&local_dir), &local_paths)],
        )
        .await
        .context("saving this node's configuration before the creation");
        if let Err(e) = saved {
            let _ = std::fs::remove_dir_all(&local_dir);
            return Err(e);
        }
        let peer_dir = ssh
            .exec_ok(&format!(
                "d=$(mktemp -d /tmp/tandem-create-undo.XXXXXX) && {} && echo \"$d\"",
                save_script("\"$d\"", &peer_paths)
            ))
            .await
            .map(|o| o.stdout_text().trim().to_owned());
        let peer_dir = match peer_dir {
            Ok(d) => d,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&local_dir);
                bail!("saving the peer's configuration before the creation: {e}");
            }
        };
        Ok(Undo {
            local_dir,
            local_paths,
            peer_dir,
            peer_paths,
            local_reloaded: false,
            peer_reloaded: false,
            held,
        })
    }

    /// The run succeeded: the saved state is no longer needed.
    pub async fn discard(self, ssh: &SshSession) {
        let _ = std::fs::remove_dir_all(&self.local_dir);
        let _ = ssh
            .exec(&format!("rm -rf -- {}", sh_quote(&self.peer_dir)))
            .await;
    }

    /// Puts both nodes back as they were; the sentence that tells the
    /// operator what was done (or what is left, if a rollback failed).
    pub async fn roll_back(
        self,
        ctx: &CreateContext,
        plan: &Plan,
        password: &str,
        ssh: &SshSession,
        names: (&str, &str),
    ) -> String {
        let (me, peer) = names;
        let mut done = Vec::new();
        let mut failed = Vec::new();
        // This node first: once its daemons have reloaded the restored
        // configuration, its cfg-syncd no longer pushes to the peer, whose
        // files are restored next.
        let local = run_local(
            "sh",
            &[
                "-c",
                &restore_script(&sh_quote(&self.local_dir), &self.local_paths),
            ],
        )
        .await;
        match local {
            Ok(_) => done.push(me.to_owned()),
            Err(e) => failed.push(format!(
                "on {me}: {e:#}; its files from before are in {}/undo.tar",
                self.local_dir
            )),
        }
        if self.local_reloaded {
            let reloaded = reload_local(&ctx.runtime_dir).await;
            tracing::info!(
                "cluster create rollback: {me} reloaded: {}",
                reloaded.join(", ")
            );
            if !self.held.is_empty() {
                // Leaving the cluster, vrrpd released the floating IPs this
                // node served as plain addresses before: put them back.
                wait_local_vrrp(&ctx.runtime_dir, &[v1::VrrpState::Standalone]).await;
                for (net, ifname) in &self.held {
                    let net = net.to_string();
                    if let Err(e) = run_local("ip", &["addr", "replace", &net, "dev", ifname]).await
                    {
                        failed.push(format!("on {me}: {e:#}"));
                    }
                }
            }
        }
        match self.roll_back_peer(ctx, plan, password, ssh).await {
            Ok(()) => done.push(peer.to_owned()),
            Err(e) => failed.push(format!(
                "on {peer}: {e:#}; its files from before are in {peer}:{}/undo.tar (`tar --extract --absolute-names --preserve-permissions --file` restores them)",
                self.peer_dir
            )),
        }
        let text = if failed.is_empty() {
            format!(
                "rolled back: {} have their configuration from before the creation, nothing of it is left",
                done.join(" and ")
            )
        } else {
            format!(
                "ROLLBACK INCOMPLETE {}{}; run `tandemctl cluster destroy` once the cause is fixed",
                failed.join("; "),
                if done.is_empty() {
                    String::new()
                } else {
                    format!(" ({} rolled back)", done.join(" and "))
                }
            )
        };
        tracing::warn!("cluster create: {text}");
        text
    }

    async fn roll_back_peer(
        &self,
        ctx: &CreateContext,
        plan: &Plan,
        password: &str,
        ssh: &SshSession,
    ) -> anyhow::Result<()> {
        let script = restore_script(&sh_quote(&self.peer_dir), &self.peer_paths);
        let restored = if ssh.is_closed() {
            Err(anyhow!("the SSH session is closed"))
        } else {
            ssh.exec_ok(&script).await.map_err(anyhow::Error::from)
        };
        let reconnected;
        let session = match restored {
            Ok(_) => ssh,
            Err(_) => {
                // The session died with the failure (the peer's sshd
                // restarted, the link flapped): once more, to the same
                // confirmed key.
                reconnected = SshSession::connect(
                    SocketAddr::new(plan.remote_ip, ctx.ssh_port),
                    "root",
                    HostKeyCheck::Confirmed {
                        fingerprint: plan.host_key.clone(),
                    },
                    Auth::Password(password.to_owned()),
                )
                .await?;
                reconnected.exec_ok(&script).await?;
                &reconnected
            }
        };
        if self.peer_reloaded {
            let reloaded = reload_peer(session, &ctx.peer_runtime_dir).await;
            tracing::info!(
                "cluster create rollback: the peer reloaded: {}",
                reloaded.join(", ")
            );
        }
        Ok(())
    }
}

/// The floating IPs this node holds now (plain addresses of a standalone
/// node), as `ip addr replace` would put them back.
pub fn held(floating: &[(IpNet, String)], local: &facts::Facts) -> Vec<(IpNet, String)> {
    floating
        .iter()
        .filter_map(|(net, _)| {
            local
                .addresses
                .iter()
                .find(|(_, a)| a.addr == net.addr)
                .map(|(ifname, a)| (*a, ifname.clone()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_saved_paths_cover_what_the_run_writes() {
        let p = touched(
            Path::new("/etc/tandem"),
            Path::new("/etc/tandem/ssh/authorized_keys"),
        );
        assert_eq!(p.len(), TOUCHED.len(), "authorized_keys is under ssh/");
        let p = touched(
            Path::new("/etc/tandem"),
            Path::new("/root/.ssh/authorized_keys"),
        );
        assert_eq!(p.last().unwrap(), Path::new("/root/.ssh/authorized_keys"));
        let s = restore_script("'/tmp/x'", &p[..2]);
        assert_eq!(
            s,
            "rm -rf -- '/etc/tandem/node.toml' '/etc/tandem/cluster.toml' && tar --extract --preserve-permissions --absolute-names --file '/tmp/x'/undo.tar && rm -rf -- '/tmp/x'"
        );
    }
}
