//! `tandemctl cluster create` and `tandemctl cluster destroy`.
//!
//! Create runs on the future master. Trust comes before secrets: first the
//! peer's SSH host key is shown and confirmed on the terminal (or given with
//! `--host-key` by a script), and only then is the peer's root password
//! asked on the terminal (echo off) or read from stdin (`--password-stdin`).
//! It is never stored or logged, and goes to the local clustermanager,
//! which sends it only to a peer presenting the confirmed key, does the
//! work and streams its steps. Without `--yes`, preflight runs first, the
//! files the peer will lose are listed, and the operator confirms.

use std::io::{BufRead, Write};
use std::net::IpAddr;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use tandem_proto::v1;

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// This node's address on the cluster link.
    #[arg(long, value_name = "IP")]
    pub local_ip: IpAddr,
    /// The peer's address on the cluster link (its sshd listens there).
    #[arg(long, value_name = "IP")]
    pub remote_ip: IpAddr,
    /// VRRP virtual router id, unique on the cluster link (default: derived
    /// from the two cluster addresses, never 51; preflight refuses a VRID
    /// another router advertises on the link).
    #[arg(long, value_name = "1-255", value_parser = clap::value_parser!(u8).range(1..))]
    pub vrid: Option<u8>,
    /// The peer's SSH host key fingerprint, for scripts: `SHA256:...` as
    /// `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` prints it on the
    /// peer. Without it, the key the peer presents is shown and must be
    /// confirmed on the terminal before the password is asked (--yes does
    /// not confirm it). A peer presenting another key is refused before the
    /// password is sent.
    #[arg(long, value_name = "SHA256:...")]
    pub host_key: Option<String>,
    /// Do not ask before the peer's replicated files are erased (the host
    /// key must still be confirmed, or given with --host-key).
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

async fn client(runtime_dir: &Path) -> anyhow::Result<crate::remote::Cm> {
    crate::remote::cluster_manager(runtime_dir).await
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

/// The host key the peer presents, confirmed by the operator on the
/// terminal; None when the operator says no.
async fn confirm_host_key(
    cm: &mut crate::remote::Cm,
    remote: IpAddr,
) -> anyhow::Result<Option<String>> {
    let key = cm
        .peer_host_key(v1::PeerHostKeyRequest {
            remote_ip: remote.to_string(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("reading the peer's host key: {}", s.message()))?
        .into_inner();
    let shown = format!("{} {}", key.algorithm, key.fingerprint);
    let unconfirmed = || {
        format!(
            "the peer's host key was not confirmed: {} presents {shown}; check it on the peer (`ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub`) and run again with --host-key {}; nothing was sent to the peer",
            key.address, key.fingerprint
        )
    };
    let Ok((mut out, mut input)) = tty() else {
        bail!("{}", unconfirmed());
    };
    writeln!(
        out,
        "The peer {} presents the SSH host key\n    {shown}\nCompare it with the peer's own: run `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` on the peer.",
        key.address
    )?;
    write!(
        out,
        "Is this the peer's host key? The root password is sent to this key only. [y/N] "
    )?;
    out.flush()?;
    let mut answer = String::new();
    input.read_line(&mut answer)?;
    if matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
        Ok(Some(key.fingerprint))
    } else {
        Ok(None)
    }
}

pub async fn create(runtime_dir: &Path, args: &CreateArgs) -> anyhow::Result<ExitCode> {
    let mut cm = client(runtime_dir).await?;
    // Trust before secrets: the host key is settled before the password is
    // even read.
    let host_key = match &args.host_key {
        Some(k) => {
            if !k.contains("SHA256:") {
                bail!(
                    "--host-key `{k}` is not a SHA-256 fingerprint: give SHA256:... as `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` prints it on the peer"
                );
            }
            k.clone()
        }
        None => match confirm_host_key(&mut cm, args.remote_ip).await? {
            Some(k) => k,
            None => {
                eprintln!(
                    "cancelled: the host key was not confirmed; nothing was sent to the peer"
                );
                return Ok(ExitCode::from(2));
            }
        },
    };
    let password = read_password(args.password_stdin, args.remote_ip)?;
    let mut req = v1::CreateClusterRequest {
        local_ip: args.local_ip.to_string(),
        remote_ip: args.remote_ip.to_string(),
        remote_root_password: password,
        confirmed: args.yes,
        virtual_router_id: args.vrid.map_or(0, u32::from),
        host_key,
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
    // The confirmed run pins the same host key: a key swapped since
    // preflight is refused before the password is sent again.
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
