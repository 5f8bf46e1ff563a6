//! The thin shell to the kernel's nftables: `nft -f` applies a whole
//! script as one transaction (one process per apply); counters are read
//! over netlink without a process.

use std::collections::HashMap;
use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::ruleset::{Count, DSR_TABLE, FAMILY, TABLE};

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("running {program}: {source}")]
    Spawn {
        program: &'static str,
        source: std::io::Error,
    },
    #[error("nft refused the ruleset (nothing was changed): {0}")]
    Refused(String),
    #[error("{program} failed: {stderr}")]
    Failed {
        program: &'static str,
        stderr: String,
    },
    #[error("unexpected output from {program}: {why}")]
    Output { program: &'static str, why: String },
}

/// Applies a script with `nft -f -`: all of it, or (on error) none of it.
pub async fn apply(script: &str) -> Result<(), NftError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| NftError::Spawn {
            program: "nft",
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(|source| NftError::Spawn {
                program: "nft",
                source,
            })?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|source| NftError::Spawn {
            program: "nft",
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NftError::Refused(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

/// Removes Tandem's tables (and with them the datapath). Absent is fine.
pub async fn remove_table() -> Result<(), NftError> {
    apply(&format!(
        "table {FAMILY} {TABLE}\ndelete table {FAMILY} {TABLE}\n\
         table ip {DSR_TABLE}\ndelete table ip {DSR_TABLE}\n\
         table ip6 {DSR_TABLE}\ndelete table ip6 {DSR_TABLE}\n"
    ))
    .await
}

/// The counter objects of Tandem's tables; empty when they are absent.
/// Read over netlink ([`crate::nftnl`]) on a blocking thread: no process.
pub async fn read_counters() -> Result<HashMap<String, Count>, NftError> {
    match tokio::task::spawn_blocking(crate::nftnl::read_counters).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(NftError::Failed {
            program: "nf_tables netlink",
            stderr: e.to_string(),
        }),
        Err(e) => Err(NftError::Failed {
            program: "nf_tables netlink",
            stderr: format!("the reader stopped: {e}"),
        }),
    }
}
