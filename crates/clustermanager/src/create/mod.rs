//! `CreateCluster`: run on the future master, it joins a standalone peer
//! over SSH (the peer's root password, used once), checks the pair, installs
//! the cluster identity and pins both host keys, writes the cluster
//! configuration on both nodes, makes the peer's replicated trees exactly
//! this node's and starts the pair, this node as master. Each step is
//! streamed as a `CreateClusterProgress`, and each has its module, named as
//! its progress lines are: [`connect`], [`preflight`] (over the node facts
//! of [`facts`]), [`keys`], [`configure`], [`sync`], [`start`].
//!
//! Nothing changes on either node before preflight has passed, the
//! operator has confirmed what the peer loses, and both configurations
//! that will be written have been validated.

mod configure;
mod connect;
pub mod facts;
pub mod files;
pub mod keys;
mod preflight;
mod sshd;
pub mod start;
mod sync;
mod undo;
mod vrid;

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail};
use tandem_config::Config;
use tandem_proto::v1;
use tokio::sync::mpsc;

/// Where the cluster key is authorized, relative to the configuration
/// directory, on both nodes: node-local (never replicated), and not in
/// /root/.ssh, which the units cannot write (`ProtectHome=yes`). sshd reads
/// it through the drop-in /etc/ssh/sshd_config.d/tandem.conf
/// (`AuthorizedKeysFile .ssh/authorized_keys /etc/tandem/ssh/authorized_keys`);
/// preflight checks that it does.
pub const AUTHORIZED_KEYS: &str = "ssh/authorized_keys";
/// VRRP priorities written to cluster.toml: the creating node is master.
pub const MASTER_PRIORITY: u8 = 150;
pub const BACKUP_PRIORITY: u8 = 100;
/// Every daemon of a node, reloaded after its configuration changed.
pub const DAEMONS: [&str; 5] = [
    "lb-forwarder",
    "vrrpd",
    "conntrack-syncd",
    "cfg-syncd",
    "clustermanager",
];

/// Where things are on both nodes. The defaults fit a real pair; the tests
/// (two nodes on one filesystem) override the peer's paths.
#[derive(Debug, Clone)]
pub struct CreateContext {
    /// This node's configuration directory (absolute).
    pub config_dir: PathBuf,
    /// This node's runtime directory (the daemons' sockets).
    pub runtime_dir: PathBuf,
    /// The peer's configuration directory (default /etc/tandem).
    pub peer_config_dir: PathBuf,
    /// The peer's runtime directory (default /run/tandem).
    pub peer_runtime_dir: PathBuf,
    /// Where the peer's Tandem binaries are (default /usr/bin).
    pub peer_bin_dir: PathBuf,
    /// The authorized_keys this node's sshd reads the cluster key from
    /// (default <config_dir>/ssh/authorized_keys).
    pub authorized_keys: PathBuf,
    /// The same on the peer (default <peer_config_dir>/ssh/authorized_keys).
    pub peer_authorized_keys: PathBuf,
    /// This node's sshd configuration (`sshd -T -f`), default
    /// /etc/ssh/sshd_config.
    pub sshd_config: PathBuf,
    /// The peer's, default /etc/ssh/sshd_config.
    pub peer_sshd_config: PathBuf,
    /// This node's sshd host key, public part (default
    /// /etc/ssh/ssh_host_ed25519_key.pub): pinned on the peer.
    pub host_key_pub: PathBuf,
    /// Run on the peer once its configuration is in place (default
    /// `systemctl start tandem.target`; empty: nothing).
    pub peer_start_command: String,
    /// Both sshds' port (`[sync] ssh_port`, default 22).
    pub ssh_port: u16,
}

impl CreateContext {
    /// The production defaults for a node whose directories are given.
    pub fn new(config_dir: PathBuf, runtime_dir: PathBuf) -> CreateContext {
        CreateContext {
            authorized_keys: config_dir.join(AUTHORIZED_KEYS),
            config_dir,
            runtime_dir,
            peer_config_dir: tandem_config::DEFAULT_CONFIG_DIR.into(),
            peer_runtime_dir: "/run/tandem".into(),
            peer_bin_dir: "/usr/bin".into(),
            peer_authorized_keys: Path::new(tandem_config::DEFAULT_CONFIG_DIR)
                .join(AUTHORIZED_KEYS),
            sshd_config: "/etc/ssh/sshd_config".into(),
            peer_sshd_config: "/etc/ssh/sshd_config".into(),
            host_key_pub: "/etc/ssh/ssh_host_ed25519_key.pub".into(),
            peer_start_command: "systemctl start tandem.target".into(),
            ssh_port: 22,
        }
    }

    pub fn peer_path(&self, rel: &str) -> PathBuf {
        self.peer_config_dir.join(rel)
    }

    pub fn local_path(&self, rel: &str) -> PathBuf {
        self.config_dir.join(rel)
    }
}

/// The progress stream's sender, with the step names in one place.
struct Progress {
    tx: mpsc::Sender<v1::CreateClusterProgress>,
}

impl Progress {
    async fn step(&self, step: &str, message: impl Into<String>) {
        let message = message.into();
        tracing::info!(step, "cluster create: {message}");
        let _ = self
            .tx
            .send(v1::CreateClusterProgress {
                step: step.into(),
                ok: true,
                message,
                ..Default::default()
            })
            .await;
    }

    async fn send(&self, p: v1::CreateClusterProgress) {
        let _ = self.tx.send(p).await;
    }
}

/// Runs cluster creation, streaming its steps to `progress`. The last
/// message has `done` set: `ok` with the outcome, or not `ok` with the
/// error (and what was left changed, if anything).
pub async fn create_cluster(
    ctx: &CreateContext,
    req: v1::CreateClusterRequest,
    progress: mpsc::Sender<v1::CreateClusterProgress>,
) {
    let p = Progress { tx: progress };
    let mut current = String::from("request");
    let result = run(ctx, &req, &p, &mut current).await;
    match result {
        Ok(last) => p.send(last).await,
        Err(e) => {
            let message = format!("{e:#}");
            tracing::error!(step = %current, "cluster creation failed: {message}");
            p.send(v1::CreateClusterProgress {
                step: current,
                ok: false,
                message,
                done: true,
                ..Default::default()
            })
            .await;
        }
    }
}

/// What the request asks, checked.
struct Plan {
    local_ip: IpAddr,
    remote_ip: IpAddr,
    vrid: u8,
    /// The operator named the VRID (`--vrid`); otherwise it is the default.
    vrid_chosen: bool,
    /// The peer's host key fingerprint the operator confirmed.
    host_key: String,
}

/// The VRRP virtual router id a new cluster gets when the operator names
/// none: 1 + (the sum of the bytes of both cluster addresses) mod 255,
/// moved to 52 if that is 51 — keepalived's sample value, which neighbouring
/// keepalived pairs use by default. Two pairs on one link differ as soon as
/// their addresses do; preflight refuses a VRID heard on the link anyway.
pub fn default_vrid(a: IpAddr, b: IpAddr) -> u8 {
    let bytes = |ip: IpAddr| match ip {
        IpAddr::V4(v) => v.octets().iter().map(|&x| u32::from(x)).sum::<u32>(),
        IpAddr::V6(v) => v.octets().iter().map(|&x| u32::from(x)).sum::<u32>(),
    };
    let vrid = 1 + (bytes(a) + bytes(b)) % 255;
    match u8::try_from(vrid) {
        Ok(51) => 52,
        Ok(v) => v,
        Err(_) => 52,
    }
}

fn parse_request(req: &v1::CreateClusterRequest) -> anyhow::Result<Plan> {
    let local_ip: IpAddr = req
        .local_ip
        .parse()
        .map_err(|_| anyhow!("local IP `{}` is not an IP address", req.local_ip))?;
    let remote_ip: IpAddr = req
        .remote_ip
        .parse()
        .map_err(|_| anyhow!("remote IP `{}` is not an IP address", req.remote_ip))?;
    if local_ip == remote_ip {
        bail!("the local and remote IPs are the same ({local_ip})");
    }
    if local_ip.is_ipv4() != remote_ip.is_ipv4() {
        bail!("the local and remote IPs must be of the same family ({local_ip}, {remote_ip})");
    }
    let vrid = match req.virtual_router_id {
        0 => default_vrid(local_ip, remote_ip),
        v @ 1..=255 => v as u8,
        v => bail!("virtual router id {v} is out of range 1-255"),
    };
    if req.host_key.trim().is_empty() {
        bail!(
            "the peer's host key was not confirmed: the root password is sent only to a host key the operator has seen and confirmed (`tandemctl cluster create` shows it, or give --host-key SHA256:...)"
        );
    }
    let host_key = tandem_ssh::parse_fingerprint(&req.host_key)?;
    if req.remote_root_password.is_empty() {
        bail!("the peer's root password is empty");
    }
    Ok(Plan {
        local_ip,
        remote_ip,
        vrid,
        vrid_chosen: req.virtual_router_id != 0,
        host_key,
    })
}

async fn run(
    ctx: &CreateContext,
    req: &v1::CreateClusterRequest,
    p: &Progress,
    current: &mut String,
) -> anyhow::Result<v1::CreateClusterProgress> {
    let plan = parse_request(req)?;
    if ctx.local_path(tandem_config::CLUSTER_FILE).exists() {
        bail!(
            "this node is already clustered ({} exists); run `tandemctl cluster destroy` first",
            ctx.local_path(tandem_config::CLUSTER_FILE).display()
        );
    }
    let local_config = Config::load(&ctx.config_dir).map_err(|e| {
        anyhow!(
            "this node's configuration is invalid, fix it first: {}",
            e.iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        )
    })?;

    // Preflight's ear on the cluster link starts first: it must listen for
    // more than three advert intervals, while the rest goes on.
    let listening =
        vrid::start_listening(&plan, local_config.node.cluster_interface.as_deref()).await;

    *current = "connect".into();
    let ssh = connect::open(ctx, &plan, &req.remote_root_password, p).await?;

    // Everything after the password login, on the one session.
    let outcome = async {
        *current = "preflight".into();
        let pre = preflight::run(ctx, &plan, &local_config, &ssh, p, listening).await?;
        if !req.confirmed {
            return Ok(v1::CreateClusterProgress {
                step: "confirm".into(),
                ok: true,
                message: format!(
                    "preflight passed; nothing was changed. Creating the cluster erases {} replicated file(s) on {} and replaces them with {}'s",
                    pre.would_erase.len(),
                    pre.peer.node_name,
                    pre.local.node_name
                ),
                done: true,
                would_erase: pre.would_erase,
                needs_confirmation: true,
            });
        }
        // From here on the run writes: what it may change is saved on
        // both nodes first, and put back if any later step fails.
        *current = "keys".into();
        let mut undo = undo::Undo::save(ctx, &ssh, undo::held(&pre.floating, &pre.local)).await?;
        let steps = async {
            *current = "keys".into();
            keys::install(ctx, &plan, &ssh, &pre, p).await?;
            *current = "configure".into();
            configure::write(ctx, &plan, &ssh, &pre, p).await?;
            *current = "sync".into();
            sync::first_sync(ctx, &ssh, &pre, p).await?;
            *current = "start".into();
            start::start(ctx, &ssh, &pre, p, &mut undo).await
        }
        .await;
        let message = match steps {
            Ok(m) => {
                undo.discard(&ssh).await;
                m
            }
            Err(e) => {
                let names = (pre.local.node_name.as_str(), pre.peer.node_name.as_str());
                let report = undo
                    .roll_back(ctx, &plan, &req.remote_root_password, &ssh, names)
                    .await;
                bail!("{e:#}; {report}");
            }
        };
        tracing::info!("{message}");
        Ok(v1::CreateClusterProgress {
            step: "done".into(),
            ok: true,
            message,
            done: true,
            ..Default::default()
        })
    }
    .await;
    ssh.close().await;
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_vrid_comes_from_the_addresses_and_is_never_51() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // 192+168+100+1 + 192+168+100+2 = 923; 923 mod 255 = 158; + 1.
        assert_eq!(default_vrid(ip("192.168.100.1"), ip("192.168.100.2")), 159);
        assert_eq!(
            default_vrid(ip("192.168.100.2"), ip("192.168.100.1")),
            159,
            "the same on both nodes"
        );
        assert_ne!(
            default_vrid(ip("192.168.100.3"), ip("192.168.100.4")),
            159,
            "another pair on the link"
        );
        // 10.0.0.15 twice sums to 50: 1 + 50 would be 51.
        assert_eq!(default_vrid(ip("10.0.0.15"), ip("10.0.0.15")), 51 + 1);
        for last in 0..=255u8 {
            let v = default_vrid(ip("10.0.0.1"), IpAddr::from([10, 0, 0, last]));
            assert!((1..=255).contains(&v) && v != 51, "{v}");
        }
        assert!(default_vrid(ip("fd00::1"), ip("fd00::2")) != 51);
    }

    fn req() -> v1::CreateClusterRequest {
        v1::CreateClusterRequest {
            local_ip: "192.168.100.1".into(),
            remote_ip: "192.168.100.2".into(),
            remote_root_password: "pw".into(),
            confirmed: false,
            virtual_router_id: 0,
            host_key: "SHA256:uNiVztksCsDhcc0u9e8BujQXVUpKZIDTMczCvj3tD2s".into(),
        }
    }

    #[test]
    fn a_request_without_a_confirmed_host_key_is_refused() {
        assert!(parse_request(&req()).is_ok());
        let e = parse_request(&v1::CreateClusterRequest {
            host_key: String::new(),
            ..req()
        })
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("host key was not confirmed"), "{e}");
        let e = parse_request(&v1::CreateClusterRequest {
            host_key: "yes".into(),
            ..req()
        })
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("not an SSH host key fingerprint"), "{e}");
    }
}
