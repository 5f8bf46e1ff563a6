//! The thin shell to the kernel: `nft` for the table, `conntrack` for
//! connection counts. Each call is one process; `nft -f` applies a whole
//! script as one transaction.

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
pub async fn read_counters() -> Result<HashMap<String, Count>, NftError> {
    let out = Command::new("nft")
        .args(["-j", "list", "counters"])
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|source| NftError::Spawn {
            program: "nft",
            source,
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("No such file or directory") {
            return Ok(HashMap::new());
        }
        return Err(NftError::Failed {
            program: "nft",
            stderr: stderr.trim().to_owned(),
        });
    }
    parse_counters(&out.stdout)
}

/// Parses `nft -j list counters` output.
pub fn parse_counters(json: &[u8]) -> Result<HashMap<String, Count>, NftError> {
    let doc: serde_json::Value = serde_json::from_slice(json).map_err(|e| NftError::Output {
        program: "nft",
        why: e.to_string(),
    })?;
    let items = doc
        .get("nftables")
        .and_then(|v| v.as_array())
        .ok_or_else(|| NftError::Output {
            program: "nft",
            why: "no `nftables` array".into(),
        })?;
    let mut counters = HashMap::new();
    for item in items {
        if let Some(c) = item.get("counter") {
            let table = c.get("table").and_then(|v| v.as_str()).unwrap_or_default();
            if table != TABLE && table != DSR_TABLE {
                continue;
            }
            let name = c.get("name").and_then(|v| v.as_str()).unwrap_or_default();
            let packets = c.get("packets").and_then(|v| v.as_u64()).unwrap_or(0);
            let bytes = c.get("bytes").and_then(|v| v.as_u64()).unwrap_or(0);
            counters.insert(name.to_owned(), Count { packets, bytes });
        }
    }
    Ok(counters)
}

/// Established connections per conntrack mark (least connections). One
/// dump of the kernel table; entries that are not ESTABLISHED (TCP) do not
/// count, UDP entries count while they live.
pub async fn connections_by_mark() -> Result<HashMap<u32, u64>, NftError> {
    let out = Command::new("conntrack")
        .args(["-L"])
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|source| NftError::Spawn {
            program: "conntrack",
            source,
        })?;
    if !out.status.success() {
        return Err(NftError::Failed {
            program: "conntrack",
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(count_marks(&String::from_utf8_lossy(&out.stdout)))
}

/// Counts `conntrack -L` lines per `mark=` value.
pub fn count_marks(listing: &str) -> HashMap<u32, u64> {
    let mut counts = HashMap::new();
    for line in listing.lines() {
        let tcp = line.starts_with("tcp");
        if tcp && !line.contains(" ESTABLISHED ") {
            continue;
        }
        if let Some(mark) = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("mark="))
            .and_then(|m| m.parse::<u32>().ok())
            && mark != 0
        {
            *counts.entry(mark).or_insert(0) += 1;
        }
    }
    counts
}
