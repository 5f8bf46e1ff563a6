//! `tandemctl cluster create --node ...` (an active-active cluster of 3-8
//! nodes), `cluster add-node` and `cluster remove-node`. Trust comes before
//! secrets as for the pair: each node's SSH host key is confirmed (on the
//! terminal, or given with `--host-key IP=SHA256:...`) before any password
//! is read, and each password goes only to the node presenting that key.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::net::IpAddr;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context as _, anyhow, bail};
use tandem_proto::v1;

use crate::cluster_create::{
    CreateArgs, client, confirm, confirm_host_key, follow, read_password, tty,
};

#[derive(Debug, clap::Args)]
pub struct AddNodeArgs {
    /// The new node's address on the cluster link (its sshd listens there).
    pub address: IpAddr,
    /// Its SSH host key fingerprint (`SHA256:...`, as `ssh-keygen -lf
    /// /etc/ssh/ssh_host_ed25519_key.pub` prints it there); without it, the
    /// key is shown and confirmed on the terminal before the password is
    /// asked.
    #[arg(long, value_name = "SHA256:...")]
    pub host_key: Option<String>,
    /// Do not ask before its replicated files are erased.
    #[arg(long)]
    pub yes: bool,
    /// Read its root password from the first line of stdin.
    #[arg(long)]
    pub password_stdin: bool,
}

#[derive(Debug, clap::Args)]
pub struct RemoveNodeArgs {
    /// The node's name (`tandemctl cluster nodes`).
    pub node: String,
    /// Do not ask for confirmation.
    #[arg(long)]
    pub yes: bool,
}

/// `NAME,ADDRESS,AS`.
pub fn parse_bgp_peer(text: &str) -> anyhow::Result<v1::BgpPeerInfo> {
    let parts: Vec<&str> = text.split(',').map(str::trim).collect();
    let [name, address, asn] = parts.as_slice() else {
        bail!("--bgp-peer `{text}` is not NAME,ADDRESS,AS (e.g. tor1,10.2.0.1,65000)");
    };
    let address: IpAddr = address
        .parse()
        .map_err(|_| anyhow!("--bgp-peer `{text}`: `{address}` is not an IP address"))?;
    let remote_as: u32 = asn
        .parse()
        .map_err(|_| anyhow!("--bgp-peer `{text}`: `{asn}` is not an AS number"))?;
    Ok(v1::BgpPeerInfo {
        name: (*name).to_owned(),
        address: address.to_string(),
        remote_as,
        bfd: true,
    })
}

/// `--host-key IP=SHA256:...` values by address; every address must be a
/// node of the request.
pub fn host_keys(given: &[String], nodes: &[IpAddr]) -> anyhow::Result<BTreeMap<IpAddr, String>> {
    let mut out = BTreeMap::new();
    for g in given {
        let Some((ip, key)) = g.split_once('=') else {
            bail!(
                "--host-key `{g}`: with several nodes, say whose key it is: IP=SHA256:... (e.g. {}=SHA256:...)",
                nodes.first().map(ToString::to_string).unwrap_or_default()
            );
        };
        let ip: IpAddr = ip
            .trim()
            .parse()
            .map_err(|_| anyhow!("--host-key `{g}`: `{ip}` is not an IP address"))?;
        if !nodes.contains(&ip) {
            bail!("--host-key `{g}`: {ip} is not one of the --node addresses");
        }
        if !key.contains("SHA256:") {
            bail!(
                "--host-key `{g}` is not a SHA-256 fingerprint: give IP=SHA256:... as `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` prints it on that node"
            );
        }
        out.insert(ip, key.trim().to_owned());
    }
    Ok(out)
}

/// The nodes' root passwords: from stdin, one line per node in order (or
/// one line for all); else asked on the terminal for each.
fn passwords(from_stdin: bool, nodes: &[IpAddr]) -> anyhow::Result<Vec<String>> {
    if !from_stdin {
        return nodes.iter().map(|ip| read_password(false, *ip)).collect();
    }
    let lines: Vec<String> = std::io::stdin()
        .lock()
        .lines()
        .collect::<Result<_, _>>()
        .context("reading the passwords from stdin")?;
    let lines: Vec<String> = lines
        .into_iter()
        .map(|l| l.trim_end_matches('\r').to_owned())
        .filter(|l| !l.is_empty())
        .collect();
    match lines.len() {
        1 => Ok(vec![lines[0].clone(); nodes.len()]),
        n if n == nodes.len() => Ok(lines),
        n => bail!(
            "--password-stdin: {n} line(s) for {} node(s): give one password per --node, in order, or one for all",
            nodes.len()
        ),
    }
}

/// `cluster create` of an active-active cluster.
pub async fn create_active(runtime_dir: &Path, args: &CreateArgs) -> anyhow::Result<ExitCode> {
    let nodes = args.node.clone();
    let local_as = args.local_as.ok_or_else(|| {
        anyhow!("an active-active cluster needs --local-as (the cluster's AS number)")
    })?;
    if args.bgp_peer.is_empty() {
        bail!(
            "an active-active cluster needs at least one --bgp-peer NAME,ADDRESS,AS: the routers every node announces the VIPs to"
        );
    }
    let peers = args
        .bgp_peer
        .iter()
        .map(|p| parse_bgp_peer(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut keys = host_keys(&args.host_key, &nodes)?;
    let mut cm = client(runtime_dir).await?;
    // Trust before secrets: every key is settled before any password is read.
    for ip in &nodes {
        if keys.contains_key(ip) {
            continue;
        }
        match confirm_host_key(&mut cm, *ip).await? {
            Some(k) => {
                keys.insert(*ip, k);
            }
            None => {
                eprintln!(
                    "cancelled: the host key of {ip} was not confirmed; nothing was sent to any node"
                );
                return Ok(ExitCode::from(2));
            }
        }
    }
    let passwords = passwords(args.password_stdin, &nodes)?;
    let mut req = v1::CreateClusterRequest {
        local_ip: args.local_ip.to_string(),
        confirmed: args.yes,
        mode: "active-active".into(),
        nodes: nodes
            .iter()
            .zip(passwords)
            .map(|(ip, password)| v1::JoiningNode {
                address: ip.to_string(),
                root_password: password,
                host_key: keys.get(ip).cloned().unwrap_or_default(),
            })
            .collect(),
        bgp: Some(v1::BgpPlan {
            local_as,
            peers,
            bfd_interval_ms: args.bfd_interval.unwrap_or(0),
            bfd_multiplier: args.bfd_multiplier.unwrap_or(0),
        }),
        hash_seed: args.hash_seed.unwrap_or(0),
        ..Default::default()
    };
    let last = follow(cm.create_cluster(req.clone()).await?.into_inner()).await?;
    if !last.ok {
        return Ok(ExitCode::FAILURE);
    }
    if !last.needs_confirmation {
        return Ok(ExitCode::SUCCESS);
    }
    if !confirm(&format!(
        "Erase the {} file(s) above and create the cluster of {} nodes?",
        last.would_erase.len(),
        nodes.len() + 1
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

/// `cluster add-node`.
pub async fn add_node(runtime_dir: &Path, args: &AddNodeArgs) -> anyhow::Result<ExitCode> {
    let mut cm = client(runtime_dir).await?;
    let host_key = match &args.host_key {
        Some(k) if k.contains("SHA256:") => k.clone(),
        Some(k) => bail!(
            "--host-key `{k}` is not a SHA-256 fingerprint: give SHA256:... as `ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub` prints it on the new node"
        ),
        None => match confirm_host_key(&mut cm, args.address).await? {
            Some(k) => k,
            None => {
                eprintln!(
                    "cancelled: the host key was not confirmed; nothing was sent to {}",
                    args.address
                );
                return Ok(ExitCode::from(2));
            }
        },
    };
    let password = read_password(args.password_stdin, args.address)?;
    let mut req = v1::AddNodeRequest {
        node: Some(v1::JoiningNode {
            address: args.address.to_string(),
            root_password: password,
            host_key,
        }),
        confirmed: args.yes,
    };
    let last = follow(cm.add_node(req.clone()).await?.into_inner()).await?;
    if !last.ok {
        return Ok(ExitCode::FAILURE);
    }
    if !last.needs_confirmation {
        return Ok(ExitCode::SUCCESS);
    }
    if !confirm(&format!(
        "Erase the {} file(s) above on {} and add it to the cluster?",
        last.would_erase.len(),
        args.address
    ))? {
        eprintln!("cancelled; nothing was changed");
        return Ok(ExitCode::from(2));
    }
    req.confirmed = true;
    let last = follow(cm.add_node(req).await?.into_inner()).await?;
    Ok(if last.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `cluster remove-node`.
pub async fn remove_node(runtime_dir: &Path, args: &RemoveNodeArgs) -> anyhow::Result<ExitCode> {
    if !args.yes {
        // A terminal is needed to ask; scripts give --yes.
        tty()?;
        if !confirm(&format!(
            "Remove {} from the cluster (its VIPs are withdrawn first, then it becomes standalone)?",
            args.node
        ))? {
            eprintln!("cancelled; nothing was changed");
            return Ok(ExitCode::from(2));
        }
    }
    let mut cm = client(runtime_dir).await?;
    let last = follow(
        cm.remove_node(v1::RemoveNodeRequest {
            node: args.node.clone(),
        })
        .await?
        .into_inner(),
    )
    .await?;
    Ok(if last.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bgp_peers_and_host_keys_are_read_or_refused_clearly() {
        let p = parse_bgp_peer("tor1,10.2.0.1,65000").unwrap();
        assert_eq!(
            (p.name.as_str(), p.address.as_str(), p.remote_as),
            ("tor1", "10.2.0.1", 65000)
        );
        assert!(
            parse_bgp_peer("tor1,10.2.0.1")
                .unwrap_err()
                .to_string()
                .contains("NAME,ADDRESS,AS")
        );
        assert!(parse_bgp_peer("tor1,router,65000").is_err());
        let nodes: Vec<IpAddr> = vec!["10.2.0.12".parse().unwrap(), "10.2.0.13".parse().unwrap()];
        let k = host_keys(&["10.2.0.13=SHA256:abc".into()], &nodes).unwrap();
        assert_eq!(k[&nodes[1]], "SHA256:abc");
        assert!(
            host_keys(&["SHA256:abc".into()], &nodes)
                .unwrap_err()
                .to_string()
                .contains("say whose key it is")
        );
        assert!(host_keys(&["10.2.0.99=SHA256:abc".into()], &nodes).is_err());
    }
}
