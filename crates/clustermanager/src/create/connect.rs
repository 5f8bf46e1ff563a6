//! Step 1, **connect**: the SSH session to the peer, logged in as root with
//! the password the operator typed — but only once the peer has shown the
//! host key the operator confirmed. Another key ends the handshake before
//! authentication: the password never reaches it.

use std::net::SocketAddr;

use tandem_ssh::{Auth, HostKeyCheck, SshSession};

use super::{CreateContext, Plan, Progress};

/// Opens the session and reports the peer's (confirmed) host key.
pub async fn open(
    ctx: &CreateContext,
    plan: &Plan,
    password: &str,
    p: &Progress,
) -> anyhow::Result<SshSession> {
    let addr = SocketAddr::new(plan.remote_ip, ctx.ssh_port);
    let ssh = SshSession::connect(
        addr,
        "root",
        HostKeyCheck::Confirmed {
            fingerprint: plan.host_key.clone(),
        },
        Auth::Password(password.to_owned()),
    )
    .await?;
    p.step(
        "connect",
        format!(
            "connected to {addr} as root; it presented the confirmed host key {}",
            tandem_ssh::fingerprint(ssh.host_key())
        ),
    )
    .await;
    Ok(ssh)
}
