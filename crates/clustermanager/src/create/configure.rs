//! Step 4, **configure**: the cluster's `cluster.toml` (the same on both
//! nodes) and the cluster link added to each node's `node.toml`, its other
//! lines and comments kept.

use std::net::IpAddr;

use tandem_config::IpNet;
use tandem_ssh::SshSession;

use super::files::write_atomic;
use super::preflight::Prepared;
use super::{BACKUP_PRIORITY, CreateContext, MASTER_PRIORITY, Plan, Progress};

/// Writes node.toml on both nodes and cluster.toml here (the peer gets
/// cluster.toml with the first sync).
pub async fn write(
    ctx: &CreateContext,
    plan: &Plan,
    ssh: &SshSession,
    pre: &Prepared,
    p: &Progress,
) -> anyhow::Result<()> {
    write_atomic(
        &ctx.local_path(tandem_config::NODE_FILE),
        pre.local_node_toml.as_bytes(),
        0o644,
    )?;
    write_atomic(
        &ctx.local_path(tandem_config::CLUSTER_FILE),
        pre.cluster_toml.as_bytes(),
        0o644,
    )?;
    ssh.write_file(
        &ctx.peer_path(tandem_config::NODE_FILE),
        pre.peer_node_toml.as_bytes(),
        0o644,
    )
    .await?;
    p.step(
        "configure",
        format!(
            "cluster.toml written (virtual router {}, {} priority {MASTER_PRIORITY}, {} priority {BACKUP_PRIORITY}, failback none); node.toml of both nodes names {}",
            plan.vrid, pre.local.node_name, pre.peer.node_name, pre.cluster_if
        ),
    )
    .await;
    Ok(())
}

/// cluster.toml of the new pair (identical on both nodes).
pub fn cluster_toml(
    plan: &Plan,
    master: &str,
    backup: &str,
    floating: &[(IpNet, String)],
    ssh_port: u16,
) -> String {
    let mut s = format!(
        "# Written by `tandemctl cluster create` on {master}; replicated to {backup} by cfg-syncd.\n\
         virtual_router_id = {vrid}\nfailback = \"none\"\n\n\
         [[nodes]]\nname = \"{master}\"\naddress = \"{l}\"\npriority = {MASTER_PRIORITY}\n\n\
         [[nodes]]\nname = \"{backup}\"\naddress = \"{r}\"\npriority = {BACKUP_PRIORITY}\n",
        vrid = plan.vrid,
        l = plan.local_ip,
        r = plan.remote_ip,
    );
    for (net, ifname) in floating {
        s.push_str(&format!(
            "\n[[floating_ips]]\naddress = \"{net}\"\ninterface = \"{ifname}\"\n"
        ));
    }
    s.push_str("\n[sync]\nkey_file = \"keys/sync.key\"\n");
    if ssh_port != 22 {
        s.push_str(&format!("ssh_port = {ssh_port}\n"));
    }
    s
}

/// node.toml with `cluster_interface` / `cluster_address` set (other lines,
/// comments included, kept). The keys are top-level: they go before the
/// first table.
pub fn with_cluster_link(node_toml: &str, ifname: &str, addr: IpAddr) -> String {
    let mut head = Vec::new();
    let mut tail = Vec::new();
    let mut in_tables = false;
    for line in node_toml.lines() {
        let t = line.trim_start();
        if t.starts_with('[') {
            in_tables = true;
        }
        if in_tables {
            tail.push(line);
            continue;
        }
        let key = t.split('=').next().unwrap_or("").trim();
        if key != "cluster_interface" && key != "cluster_address" {
            head.push(line);
        }
    }
    while head.last().is_some_and(|l| l.trim().is_empty()) {
        head.pop();
    }
    let mut out = head.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    out.push_str(&format!(
        "cluster_interface = \"{ifname}\"\ncluster_address = \"{addr}\"\n"
    ));
    if !tail.is_empty() {
        out.push('\n');
        out.push_str(&tail.join("\n"));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_link_is_set_and_everything_else_kept() {
        let before = "# lb2\nname = \"lb2\"\ncluster_interface = \"eth9\"\nmetrics_listen = \"127.0.0.1:9100\"\n\n[[api_keys]]\nname = \"m\"\nsha256 = \"x\"\n";
        let after = with_cluster_link(before, "eth2", "192.168.100.2".parse().unwrap());
        assert_eq!(
            after,
            "# lb2\nname = \"lb2\"\nmetrics_listen = \"127.0.0.1:9100\"\ncluster_interface = \"eth2\"\ncluster_address = \"192.168.100.2\"\n\n[[api_keys]]\nname = \"m\"\nsha256 = \"x\"\n"
        );
        let node: tandem_config::NodeConfig = toml::from_str(&after).unwrap();
        assert_eq!(node.cluster_interface.as_deref(), Some("eth2"));
    }
}
