//! `tandemctl cluster create` and `tandemctl cluster destroy`.
//!
//! Create runs on the future master: it asks the peer's root password on the
//! terminal (echo off) or reads it from stdin (`--password-stdin`), never
//! stores or logs it, and hands it to the local clustermanager, which does
//! the work and streams its steps. Without `--yes`, preflight runs first,
//! the files the peer will lose are listed, and the operator confirms.

use std::io::{BufRead, Write};
use std::net::IpAddr;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use tandem_proto::v1::{self, cluster_manager_client::ClusterManagerClient};

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// This node's address on the cluster link.
    #[arg(long, value_name = "IP")]
    pub local_ip: IpAddr,
    /// The peer's address on the cluster link (its sshd listens there).
    #[arg(long, value_name = "IP")]
    pub remote_ip: IpAddr,
    /// VRRP virtual router id, unique on the cluster link.
    #[arg(long, value_name = "1-255", default_value_t = 51, value_parser = clap::value_parser!(u8).range(1..))]
    pub vrid: u8,
    /// Do not ask for confirmation (the peer's replicated files are erased).
    #[arg(long)]
    pub yes: bool,
    /// Read the peer's root password from the first line of stdin.
    #[arg(long)]
    pub password_stdin: bool,
}

#[derive(Debug, clap::Args)]
pub struct DestroyArgs {
    /// Do not ask for confirmation.
    #[arg(long)]
    pub yes: bool,
}

async fn client(
    runtime_dir: &Path,
) -> anyhow::Result<ClusterManagerClient<tonic::transport::Channel>> {
    let ch = tandem_runtime::connect(runtime_dir, "clustermanager")
        .await
        .with_context(|| {
            format!(
                "connecting to clustermanager in {} (is it running?)",
                runtime_dir.display()
            )
        })?;
    Ok(ClusterManagerClient::new(ch))
}

/// The controlling terminal, for prompts (stdin may carry the password).
fn tty() -> anyhow::Result<(std::fs::File, std::io::BufReader<std::fs::File>)> {
    let out = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/tty")
        .context("no terminal to ask on (use --password-stdin and --yes in scripts)")?;
    let input = std::fs::File::open("/dev/tty").context("opening /dev/tty")?;
    Ok((out, std::io::BufReader::new(input)))
}

/// Turns terminal echo off while it lives.
struct NoEcho;

impl NoEcho {
    fn new() -> anyhow::Result<NoEcho> {
        stty("-echo")?;
        Ok(NoEcho)
    }
}

impl Drop for NoEcho {
    fn drop(&mut self) {
        let _ = stty("echo");
    }
}

fn stty(arg: &str) -> anyhow::Result<()> {
    let tty = std::fs::File::open("/dev/tty").context("opening /dev/tty")?;
    let status = std::process::Command::new("stty")
        .arg(arg)
        .stdin(tty)
        .status()
        .context("running stty")?;
    if !status.success() {
        bail!("stty {arg} failed");
    }
    Ok(())
}

fn read_password(from_stdin: bool, remote: IpAddr) -> anyhow::Result<String> {
    let mut line = String::new();
    if from_stdin {
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading the password from stdin")?;
    } else {
        let (mut out, mut input) = tty()?;
        write!(out, "root password of {remote}: ")?;
        out.flush()?;
        let _echo = NoEcho::new()?;
        input.read_line(&mut line).context("reading the password")?;
        writeln!(out)?;
    }
    let password = line.trim_end_matches(['\n', '\r']).to_owned();
    if password.is_empty() {
        bail!("empty password");
    }
    Ok(password)
}

fn confirm(question: &str) -> anyhow::Result<bool> {
    let (mut out, mut input) = tty()?;
    write!(out, "{question} [y/N] ")?;
    out.flush()?;
    let mut answer = String::new();
    input.read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}

/// Prints the stream; returns its last message.
async fn follow(
    mut stream: tonic::Streaming<v1::CreateClusterProgress>,
) -> anyhow::Result<v1::CreateClusterProgress> {
    let mut last = None;
    while let Some(p) = stream.message().await.context("clustermanager stream")? {
        if p.ok {
            println!("[{}] {}", p.step, p.message);
        } else {
            eprintln!("[{}] FAILED: {}", p.step, p.message);
        }
        if !p.would_erase.is_empty() && p.step == "preflight" {
            for f in &p.would_erase {
                println!("    will be erased on the peer: {f}");
            }
        }
        let done = p.done;
        last = Some(p);
        if done {
            break;
        }
    }
    last.context("clustermanager ended the stream without a result")
}

pub async fn create(runtime_dir: &Path, args: &CreateArgs) -> anyhow::Result<ExitCode> {
    let password = read_password(args.password_stdin, args.remote_ip)?;
    let mut cm = client(runtime_dir).await?;
    let mut req = v1::CreateClusterRequest {
        local_ip: args.local_ip.to_string(),
        remote_ip: args.remote_ip.to_string(),
        remote_root_password: password,
        confirmed: args.yes,
        virtual_router_id: u32::from(args.vrid),
    };
    let last = follow(cm.create_cluster(req.clone()).await?.into_inner()).await?;
    if !last.ok {
        return Ok(ExitCode::FAILURE);
    }
    if !last.needs_confirmation {
        return Ok(ExitCode::SUCCESS);
    }
    if !confirm(&format!(
        "Erase the {} file(s) above on {} and create the cluster?",
        last.would_erase.len(),
        args.remote_ip
    ))? {
        eprintln!("cancelled; nothing was changed");
        return Ok(ExitCode::from(2));
    }
    req.confirmed = true;
    let last = follow(cm.create_cluster(req).await?.into_inner()).await?;
    Ok(if last.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub async fn destroy(runtime_dir: &Path, args: &DestroyArgs) -> anyhow::Result<ExitCode> {
    if !args.yes
        && !confirm(
            "Make both nodes standalone (the cluster key, sync key and cluster.toml are removed on both)?",
        )?
    {
        eprintln!("cancelled; nothing was changed");
        return Ok(ExitCode::from(2));
    }
    let mut cm = client(runtime_dir).await?;
    match cm.destroy_cluster(v1::DestroyClusterRequest {}).await {
        Ok(r) => {
            println!("{}", r.into_inner().message);
            Ok(ExitCode::SUCCESS)
        }
        Err(s) => {
            eprintln!("cluster destroy failed: {}", s.message());
            Ok(ExitCode::FAILURE)
        }
    }
}
