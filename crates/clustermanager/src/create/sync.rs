//! Step 5, **sync**: the first full sync. The peer's replicated files are
//! copied to `backups/cluster-create-<unix ms>/` on the peer (never
//! replicated), erased, and replaced by this node's over SFTP.

use std::time::SystemTime;

use anyhow::Context as _;
use tandem_ssh::SshSession;

use super::facts::{self, sh_quote};
use super::files::file_mode;
use super::preflight::Prepared;
use super::{CreateContext, Progress};

/// Makes the peer's replicated trees exactly this node's.
pub async fn first_sync(
    ctx: &CreateContext,
    ssh: &SshSession,
    pre: &Prepared,
    p: &Progress,
) -> anyhow::Result<()> {
    // Backed up, then erased, in one round trip.
    let (backup, keep) = backup_command(ctx, &pre.would_erase);
    ssh.exec_ok(&format!("{keep}{}", erase_command(ctx)))
        .await?;
    let files = facts::replicated_files(&ctx.config_dir)
        .with_context(|| format!("listing {}", ctx.config_dir.display()))?;
    let mut bytes = 0usize;
    for rel in &files {
        let path = ctx.local_path(rel);
        let data = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let mode = file_mode(&path)?;
        bytes += data.len();
        ssh.write_file(&ctx.peer_path(rel), &data, mode).await?;
    }
    p.step(
        "sync",
        format!(
            "{} replicated file(s), {bytes} bytes, copied to {}{}",
            files.len(),
            pre.peer.node_name,
            backup
                .map(|b| format!(" (its previous files are kept in {b})"))
                .unwrap_or_default()
        ),
    )
    .await;
    Ok(())
}

/// The shell command copying the peer's replicated files into
/// `backups/cluster-create-<ms>/` (never replicated) before they are
/// erased, ending with `&& ` (empty with nothing to keep); and that
/// directory.
fn backup_command(ctx: &CreateContext, files: &[String]) -> (Option<String>, String) {
    if files.is_empty() {
        return (None, String::new());
    }
    let rel = format!(
        "backups/cluster-create-{}",
        tandem_runtime::unix_ms(SystemTime::now())
    );
    let list: Vec<String> = files.iter().map(|f| sh_quote(f)).collect();
    (
        Some(ctx.peer_path(&rel).display().to_string()),
        format!(
            "( cd {} && mkdir -p {rel} && cp -a --parents -- {} {rel}/ ) && ",
            sh_quote(&ctx.peer_config_dir.display().to_string()),
            list.join(" ")
        ),
    )
}

/// The shell command removing the peer's replicated trees.
fn erase_command(ctx: &CreateContext) -> String {
    let targets: Vec<String> = facts::REPLICATED_FILES
        .iter()
        .chain(facts::REPLICATED_DIRS.iter())
        .map(|p| sh_quote(&ctx.peer_path(p).display().to_string()))
        .collect();
    format!("rm -rf -- {}", targets.join(" "))
}
