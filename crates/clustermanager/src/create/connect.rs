//! Step 1, **connect**: the SSH session to the peer, logged in as root with
//! the password the operator typed.

use std::net::SocketAddr;

use tandem_proto::v1;
use tandem_ssh::{Auth, HostKeyCheck, SshSession};

use super::{CreateContext, Plan, Progress};

/// Opens the session and reports the peer's host key.
pub async fn open(
    ctx: &CreateContext,
    plan: &Plan,
    req: &v1::CreateClusterRequest,
    p: &Progress,
) -> anyhow::Result<SshSession> {
    let addr = SocketAddr::new(plan.remote_ip, ctx.ssh_port);
    let ssh = SshSession::connect(
        addr,
        "root",
        HostKeyCheck::RecordFirst,
        Auth::Password(req.remote_root_password.clone()),
    )
    .await?;
    p.step(
        "connect",
        format!(
            "connected to {addr} as root; its host key is {}",
            tandem_ssh::fingerprint(ssh.host_key())
        ),
    )
    .await;
    Ok(ssh)
}
