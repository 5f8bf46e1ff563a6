//! Step 3, **keys**: one new ed25519 identity for the cluster on both nodes,
//! its public key in each node's authorized_keys, each node's sshd host key
//! pinned in the other's `ssh/known_hosts`, and a new conntrack sync key.

use std::path::Path;

use anyhow::{Context as _, bail};
use tandem_ssh::SshSession;

use super::files::write_atomic;
use super::preflight::Prepared;
use super::{CreateContext, Plan, Progress};

/// Installs the cluster identity, the pins and the sync key on both nodes.
pub(super) async fn install(
    ctx: &CreateContext,
    plan: &Plan,
    ssh: &SshSession,
    pre: &Prepared,
    p: &Progress,
) -> anyhow::Result<()> {
    let (private, public) = tandem_ssh::generate_identity()?;
    let own_host_key = std::fs::read_to_string(&ctx.host_key_pub).with_context(|| {
        format!(
            "reading this node's SSH host key {} (pinned on the peer)",
            ctx.host_key_pub.display()
        )
    })?;
    let peer_pin = tandem_ssh::known_hosts_line(plan.remote_ip, ctx.ssh_port, &ssh.host_key_line());
    let own_pin = tandem_ssh::known_hosts_line(plan.local_ip, ctx.ssh_port, own_host_key.trim());
    let sync_key = sync_key()?;

    // Local side first. If anything fails from here on, the run puts both
    // nodes back as they were (undo.rs).
    write_atomic(&ctx.local_path("ssh/id_ed25519"), private.as_bytes(), 0o600)?;
    write_atomic(
        &ctx.local_path("ssh/id_ed25519.pub"),
        format!("{public}\n").as_bytes(),
        0o644,
    )?;
    write_atomic(
        &ctx.local_path("ssh/known_hosts"),
        peer_pin.as_bytes(),
        0o644,
    )?;
    write_atomic(&ctx.local_path("keys/sync.key"), sync_key.as_bytes(), 0o600)?;
    authorize_local(&ctx.authorized_keys, &public)?;
    ssh.write_file(&ctx.peer_path("ssh/id_ed25519"), private.as_bytes(), 0o600)
        .await?;
    ssh.write_file(
        &ctx.peer_path("ssh/id_ed25519.pub"),
        format!("{public}\n").as_bytes(),
        0o644,
    )
    .await?;
    ssh.write_file(&ctx.peer_path("ssh/known_hosts"), own_pin.as_bytes(), 0o644)
        .await?;
    authorize_peer(ssh, &ctx.peer_authorized_keys, &public).await?;
    p.step(
        "keys",
        format!(
            "cluster identity {} installed on both nodes; {} pins {}, {} pins {}; new sync key",
            tandem_ssh::fingerprint_of_line(&public),
            pre.local.node_name,
            tandem_ssh::fingerprint(ssh.host_key()),
            pre.peer.node_name,
            tandem_ssh::fingerprint_of_line(&own_host_key),
        ),
    )
    .await;
    Ok(())
}

/// 32 random bytes from the kernel, hex, newline-terminated: the conntrack
/// sync key.
pub fn sync_key() -> anyhow::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom for the sync key")?;
    let mut s: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    s.push('\n');
    Ok(s)
}

/// Adds `public` to a local authorized_keys (once).
fn authorize_local(path: &Path, public: &str) -> anyhow::Result<()> {
    let old = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => bail!("reading {}: {e}", path.display()),
    };
    if let Some(new) = add_key_line(&old, public) {
        write_atomic(path, new.as_bytes(), 0o600)?;
    }
    Ok(())
}

async fn authorize_peer(ssh: &SshSession, path: &Path, public: &str) -> anyhow::Result<()> {
    let old = ssh
        .read_file(path)
        .await?
        .map(|d| String::from_utf8_lossy(&d).into_owned())
        .unwrap_or_default();
    if let Some(new) = add_key_line(&old, public) {
        ssh.write_file(path, new.as_bytes(), 0o600).await?;
    }
    Ok(())
}

/// The authorized_keys text with `public` appended; None if already there.
pub fn add_key_line(old: &str, public: &str) -> Option<String> {
    let key = key_blob(public)?;
    if old.lines().any(|l| key_blob(l) == Some(key)) {
        return None;
    }
    let mut new = old.to_owned();
    if !new.is_empty() && !new.ends_with('\n') {
        new.push('\n');
    }
    new.push_str(public.trim());
    new.push('\n');
    Some(new)
}

/// The authorized_keys text without any line of `public`'s key; None if
/// it had none.
pub fn remove_key_line(old: &str, public: &str) -> Option<String> {
    let key = key_blob(public)?;
    if !old.lines().any(|l| key_blob(l) == Some(key)) {
        return None;
    }
    let mut new: String = old
        .lines()
        .filter(|l| key_blob(l) != Some(key))
        .collect::<Vec<_>>()
        .join("\n");
    if !new.is_empty() {
        new.push('\n');
    }
    Some(new)
}

/// The base64 blob of a key line (after any options and the type).
fn key_blob(line: &str) -> Option<&str> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let i = words
        .iter()
        .position(|w| w.starts_with("ssh-") || w.starts_with("ecdsa-") || w.starts_with("sk-"))?;
    words.get(i + 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorized_keys_lines_are_added_once_and_removed() {
        let k = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKQ5W2r2Gh8wnYoF6v2eG4yRj6DpzPz1d0iTo1cbgHwV tandem-cluster";
        let other = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOther admin@desk";
        let with = add_key_line(other, k).unwrap();
        assert_eq!(with, format!("{other}\n{k}\n"));
        assert_eq!(add_key_line(&with, k), None, "added once");
        assert_eq!(remove_key_line(&with, k).unwrap(), format!("{other}\n"));
        assert_eq!(remove_key_line(other, k), None);
    }
}
