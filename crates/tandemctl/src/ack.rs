//! `tandemctl cluster ack`: the operator has seen the local changes this
//! node set aside when its peer's configuration replaced them (after a
//! partition). They leave cfg-syncd's status and the node table; the files
//! stay in their set-aside directory.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use tandem_proto::v1::{self, cfg_sync_client::CfgSyncClient};

pub async fn run(runtime_dir: &Path, directories: Vec<String>) -> anyhow::Result<ExitCode> {
    let ch = tandem_runtime::connect(runtime_dir, "cfg-syncd")
        .await
        .context("set-aside files are listed by this node's cfg-syncd")?;
    let reply = CfgSyncClient::new(ch)
        .acknowledge_set_aside(v1::AcknowledgeSetAsideRequest { directories })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner();
    if reply.acknowledged.is_empty() {
        println!("nothing to acknowledge: this node lists no set-aside files");
        return Ok(ExitCode::SUCCESS);
    }
    for s in &reply.acknowledged {
        println!(
            "acknowledged {} set aside in {} (the files stay there):",
            files(s.paths.len()),
            s.directory
        );
        for p in &s.paths {
            println!("  {p}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn files(n: usize) -> String {
    if n == 1 {
        "1 file".to_owned()
    } else {
        format!("{n} files")
    }
}
