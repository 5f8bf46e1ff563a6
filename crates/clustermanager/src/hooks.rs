//! The operator's hooks (keepalived's notify scripts): executables named in
//! node.toml's `[hooks]`, run when this node becomes master, backup, faulty
//! or enters maintenance, and when a backend enters or leaves the rotation.
//!
//! Off the fast path by construction: vrrpd moves the floating IPs itself
//! and lb-forwarder's datapath is in the kernel; this module only follows
//! their streams (vrrpd's WatchState, lb-forwarder's WatchBackends). Events
//! queue in arrival order and their hooks run one at a time, each with the
//! event in `TANDEM_*` environment variables, killed (with its process
//! group) after `timeout_ms`; each exit is logged.
//!
//! The pure part ([`vrrp_event`], [`backend_event`], [`HookEvent::env`])
//! turns stream messages into events; [`run`] is the shell.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use tandem_proto::v1::{
    self, VrrpState, lb_forwarder_client::LbForwarderClient, vrrpd_client::VrrpdClient,
};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

use crate::state::Shared;

/// One event for the hooks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookEvent {
    /// `master`, `backup`, `fault`, `maintenance` or `backend`.
    pub kind: &'static str,
    /// Positional arguments, as keepalived passes them to notify scripts:
    /// `INSTANCE VI_<vrid> <STATE> <priority>`, or `BACKEND <farm>
    /// <address:port> <UP|DOWN>`.
    pub args: Vec<String>,
    /// `TANDEM_*` variables besides TANDEM_EVENT, TANDEM_NODE,
    /// TANDEM_SEQUENCE and TANDEM_UNIX_MS.
    pub vars: Vec<(&'static str, String)>,
    pub at: SystemTime,
}

impl HookEvent {
    /// The whole environment of its hooks.
    pub fn env(&self, node: &str, sequence: u64) -> Vec<(String, String)> {
        let mut env = vec![
            ("TANDEM_EVENT".to_owned(), self.kind.to_owned()),
            ("TANDEM_NODE".to_owned(), node.to_owned()),
            ("TANDEM_SEQUENCE".to_owned(), sequence.to_string()),
            (
                "TANDEM_UNIX_MS".to_owned(),
                tandem_runtime::unix_ms(self.at).to_string(),
            ),
        ];
        env.extend(self.vars.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        env
    }

    /// What a log line says about it.
    fn describe(&self) -> String {
        match self.kind {
            "backend" => format!("backend {}", self.args[1..].join(" ")),
            k => k.to_owned(),
        }
    }
}

/// The event of a vrrpd state change, if it is one hooks follow: entering
/// master, backup, fault or maintenance. `delivered` is the last state an
/// event was made for: a stream that restarts (either side restarted)
/// reports the current state again, which is no news.
pub fn vrrp_event(
    change: &v1::VrrpStateChange,
    delivered: Option<VrrpState>,
    vrid: u8,
    priority: u8,
) -> Option<HookEvent> {
    let new = change.new_state();
    let kind = match new {
        VrrpState::Master => "master",
        VrrpState::Backup => "backup",
        VrrpState::Fault => "fault",
        VrrpState::Maintenance => "maintenance",
        _ => return None,
    };
    if delivered == Some(new) {
        return None;
    }
    let word = |s: VrrpState| {
        s.as_str_name()
            .trim_start_matches("VRRP_STATE_")
            .to_lowercase()
    };
    Some(HookEvent {
        kind,
        args: vec![
            "INSTANCE".into(),
            format!("VI_{vrid}"),
            kind.to_uppercase(),
            priority.to_string(),
        ],
        vars: vec![
            ("TANDEM_OLD_STATE", word(change.old_state())),
            ("TANDEM_NEW_STATE", word(new)),
            ("TANDEM_REASON", change.reason.clone()),
            ("TANDEM_VRID", vrid.to_string()),
            ("TANDEM_MASTER", change.master_address.clone()),
        ],
        at: SystemTime::now(),
    })
}

/// The event of a backend (or sorry server) entering or leaving the
/// rotation.
pub fn backend_event(c: &v1::BackendChange) -> HookEvent {
    let target = if c.port == 0 {
        c.address.clone()
    } else if c.address.contains(':') {
        format!("[{}]:{}", c.address, c.port)
    } else {
        format!("{}:{}", c.address, c.port)
    };
    let state = c
        .admin_state()
        .as_str_name()
        .trim_start_matches("BACKEND_ADMIN_STATE_")
        .to_lowercase();
    let flag = |b: bool| if b { "1" } else { "0" }.to_owned();
    HookEvent {
        kind: "backend",
        args: vec![
            "BACKEND".into(),
            c.farm.clone(),
            target.clone(),
            if c.in_rotation { "UP" } else { "DOWN" }.into(),
        ],
        vars: vec![
            ("TANDEM_FARM", c.farm.clone()),
            ("TANDEM_BACKEND", target),
            ("TANDEM_BACKEND_ADDRESS", c.address.clone()),
            ("TANDEM_BACKEND_PORT", c.port.to_string()),
            ("TANDEM_SORRY_SERVER", flag(c.sorry_server)),
            ("TANDEM_IN_ROTATION", flag(c.in_rotation)),
            ("TANDEM_BACKEND_STATE", state),
            ("TANDEM_FAILING", flag(c.failing)),
            ("TANDEM_OVERLOADED", flag(c.overloaded)),
            ("TANDEM_REASON", c.reason.clone()),
        ],
        at: SystemTime::now(),
    }
}

/// Pause between attempts to follow a daemon that is not there.
const RETRY: Duration = Duration::from_millis(500);

/// Follows vrrpd and lb-forwarder and runs the hooks until shutdown.
pub async fn run(shared: Arc<Shared>, shutdown: tandem_runtime::Shutdown) {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(follow_vrrpd(shared.clone(), tx.clone(), shutdown.clone()));
    tokio::spawn(follow_backends(shared.clone(), tx, shutdown.clone()));
    runner(shared, rx, shutdown).await;
}

async fn follow_vrrpd(
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<HookEvent>,
    mut shutdown: tandem_runtime::Shutdown,
) {
    let mut delivered: Option<VrrpState> = None;
    loop {
        if let Ok(ch) = tandem_runtime::connect(&shared.runtime_dir, "vrrpd").await
            && let Ok(reply) = VrrpdClient::new(ch)
                .watch_state(v1::WatchStateRequest {})
                .await
        {
            let mut stream = reply.into_inner();
            loop {
                tokio::select! {
                    item = stream.next() => match item {
                        Some(Ok(change)) => {
                            let (vrid, priority) = vrrp_identity(&shared);
                            if let Some(e) = vrrp_event(&change, delivered, vrid, priority) {
                                delivered = Some(change.new_state());
                                if tx.send(e).is_err() {
                                    return;
                                }
                            }
                        }
                        _ => break,
                    },
                    () = shutdown.wait() => return,
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(RETRY) => {}
            () = shutdown.wait() => return,
        }
    }
}

/// The VRID and this node's configured priority (0, 0 standalone).
fn vrrp_identity(shared: &Shared) -> (u8, u8) {
    let loaded = shared.config.current();
    let c = &loaded.config;
    c.cluster.as_ref().map_or((0, 0), |cl| {
        let priority = cl
            .nodes
            .iter()
            .find(|n| n.name == c.node.name)
            .map_or(0, |n| n.priority);
        (cl.virtual_router_id, priority)
    })
}

async fn follow_backends(
    shared: Arc<Shared>,
    tx: mpsc::UnboundedSender<HookEvent>,
    mut shutdown: tandem_runtime::Shutdown,
) {
    loop {
        if let Ok(ch) = tandem_runtime::connect(&shared.runtime_dir, "lb-forwarder").await
            && let Ok(reply) = LbForwarderClient::new(ch)
                .watch_backends(v1::WatchBackendsRequest {})
                .await
        {
            let mut stream = reply.into_inner();
            loop {
                tokio::select! {
                    item = stream.next() => match item {
                        Some(Ok(change)) => {
                            if tx.send(backend_event(&change)).is_err() {
                                return;
                            }
                        }
                        Some(Err(s)) => {
                            // Changes were lost (the stream lagged): say so once.
                            tracing::warn!("hooks: backend changes lost, some backend hooks will not run: {}", s.message());
                        }
                        None => break,
                    },
                    () = shutdown.wait() => return,
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(RETRY) => {}
            () = shutdown.wait() => return,
        }
    }
}

/// Runs the hooks of each event in order, one at a time.
async fn runner(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<HookEvent>,
    mut shutdown: tandem_runtime::Shutdown,
) {
    let mut sequence = 0u64;
    let mut behind_logged = false;
    loop {
        let event = tokio::select! {
            e = rx.recv() => match e {
                Some(e) => e,
                None => return,
            },
            () = shutdown.wait() => return,
        };
        sequence += 1;
        let loaded = shared.config.current();
        let hooks = loaded.config.node.hooks.clone();
        let node = loaded.config.node.name.clone();
        let timeout = Duration::from_millis(u64::from(hooks.timeout_ms));
        for hook in hooks.for_event(event.kind) {
            let env = event.env(&node, sequence);
            tokio::select! {
                () = run_one(Path::new(hook), &event, &env, timeout, &node) => {}
                () = shutdown.wait() => return,
            }
        }
        // Many events waiting means the hooks are slow: say so once.
        let waiting = rx.len();
        if waiting >= 16 && !behind_logged {
            tracing::warn!(
                node = %node,
                waiting,
                "hooks are {waiting} events behind: they run one at a time, in order; a slow hook delays the next ones"
            );
            behind_logged = true;
        } else if waiting == 0 {
            behind_logged = false;
        }
    }
}

/// Runs one hook to completion or its timeout, and logs how it ended.
async fn run_one(
    path: &Path,
    event: &HookEvent,
    env: &[(String, String)],
    timeout: Duration,
    node: &str,
) {
    let what = event.describe();
    let hook = path.display().to_string();
    let started = Instant::now();
    let mut cmd = tokio::process::Command::new(PathBuf::from(path));
    cmd.args(&event.args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a timeout kills its children too.
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(node = %node, hook = %hook, event = %event.kind, "hook {hook} for {what} could not start: {e}");
            return;
        }
    };
    let pid = child.id();
    // Its output, drained while it runs (a full pipe would block it) and
    // kept for the log line; a background child that keeps the pipes open
    // does not hold the next hook back.
    let drain = |pipe: Option<Box<dyn tokio::io::AsyncRead + Send + Unpin>>| {
        tokio::spawn(async move {
            let mut kept = Vec::new();
            if let Some(mut p) = pipe {
                let mut buf = [0u8; 4096];
                while let Ok(n) = p.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    if kept.len() < 4096 {
                        kept.extend_from_slice(&buf[..n.min(4096 - kept.len())]);
                    }
                }
            }
            kept
        })
    };
    let mut out = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let mut err = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let waited = tokio::time::timeout(timeout, child.wait()).await;
    let grace = Duration::from_millis(100);
    let said = async {
        let e = tokio::time::timeout(grace, &mut err)
            .await
            .ok()
            .and_then(Result::ok);
        let o = tokio::time::timeout(grace, &mut out)
            .await
            .ok()
            .and_then(Result::ok);
        err.abort();
        out.abort();
        e.as_deref()
            .and_then(first_line)
            .or_else(|| o.as_deref().and_then(first_line))
    };
    let waited = match waited {
        Ok(status) => Ok((status, said.await)),
        Err(e) => Err(e),
    };
    let took_ms = started.elapsed().as_millis() as u64;
    match waited {
        Ok((Ok(status), said)) => {
            let said = said.map(|s| format!(": {s}")).unwrap_or_default();
            match status.code() {
                Some(0) => tracing::info!(
                    node = %node, hook = %hook, event = %event.kind, status = 0, took_ms,
                    "hook {hook} for {what} exited 0 in {took_ms} ms{said}"
                ),
                Some(code) => tracing::warn!(
                    node = %node, hook = %hook, event = %event.kind, status = code, took_ms,
                    "hook {hook} for {what} failed with exit status {code} after {took_ms} ms{said}"
                ),
                None => tracing::warn!(
                    node = %node, hook = %hook, event = %event.kind, took_ms,
                    "hook {hook} for {what} was killed by a signal after {took_ms} ms{said}"
                ),
            }
        }
        Ok((Err(e), _)) => {
            tracing::warn!(node = %node, hook = %hook, event = %event.kind, "hook {hook} for {what}: waiting for it failed: {e}");
        }
        Err(_) => {
            if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            tracing::warn!(
                node = %node, hook = %hook, event = %event.kind, took_ms,
                "hook {hook} for {what} timed out after {} ms and was killed with its process group",
                timeout.as_millis()
            );
        }
    }
}

fn first_line(bytes: &[u8]) -> Option<String> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(|l| l.chars().take(200).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_proto::v1::BackendAdminState;

    fn change(old: VrrpState, new: VrrpState) -> v1::VrrpStateChange {
        let mut c = v1::VrrpStateChange {
            reason: "master down interval expired".into(),
            master_address: "192.168.100.2".into(),
            ..Default::default()
        };
        c.set_old_state(old);
        c.set_new_state(new);
        c
    }

    #[test]
    fn vrrp_states_map_to_events_once() {
        let c = change(VrrpState::Backup, VrrpState::Master);
        let e = vrrp_event(&c, None, 51, 100).expect("event");
        assert_eq!(e.kind, "master");
        assert_eq!(e.args, ["INSTANCE", "VI_51", "MASTER", "100"]);
        let env = e.env("lb2", 7);
        for (k, v) in [
            ("TANDEM_EVENT", "master"),
            ("TANDEM_NODE", "lb2"),
            ("TANDEM_SEQUENCE", "7"),
            ("TANDEM_OLD_STATE", "backup"),
            ("TANDEM_NEW_STATE", "master"),
            ("TANDEM_VRID", "51"),
            ("TANDEM_MASTER", "192.168.100.2"),
        ] {
            assert!(env.contains(&(k.to_owned(), v.to_owned())), "{k}: {env:?}");
        }
        assert!(vrrp_event(&c, Some(VrrpState::Master), 51, 100).is_none());
        for (s, k) in [
            (VrrpState::Backup, "backup"),
            (VrrpState::Fault, "fault"),
            (VrrpState::Maintenance, "maintenance"),
        ] {
            let e = vrrp_event(&change(VrrpState::Master, s), None, 51, 100).expect("event");
            assert_eq!(e.kind, k);
        }
        for s in [VrrpState::Initialize, VrrpState::Standalone] {
            assert!(vrrp_event(&change(VrrpState::Master, s), None, 51, 100).is_none());
        }
    }

    #[test]
    fn backend_changes_carry_farm_backend_and_state() {
        let mut c = v1::BackendChange {
            farm: "web".into(),
            address: "10.1.0.12".into(),
            port: 8080,
            in_rotation: false,
            failing: true,
            reason: "health check failing".into(),
            ..Default::default()
        };
        c.set_admin_state(BackendAdminState::Up);
        let e = backend_event(&c);
        assert_eq!(e.args, ["BACKEND", "web", "10.1.0.12:8080", "DOWN"]);
        let env = e.env("lb1", 1);
        for (k, v) in [
            ("TANDEM_EVENT", "backend"),
            ("TANDEM_FARM", "web"),
            ("TANDEM_BACKEND", "10.1.0.12:8080"),
            ("TANDEM_IN_ROTATION", "0"),
            ("TANDEM_BACKEND_STATE", "up"),
            ("TANDEM_FAILING", "1"),
            ("TANDEM_REASON", "health check failing"),
        ] {
            assert!(env.contains(&(k.to_owned(), v.to_owned())), "{k}: {env:?}");
        }
    }
}
