//! The probes: one check of one backend, bounded by the farm's `timeout_ms`,
//! passing (`Ok`) or failing with a reason an operator can act on.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tandem_config::{HealthCheck, HealthCheckKind};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio_rustls::TlsConnector;

use super::tls;

/// At most this much of a response is read looking for the status line: a
/// backend sending an endless line must not make the checker buffer it.
const MAX_STATUS_LINE: usize = 1024;
/// At most this much of a command's stdout and of its stderr is kept; the
/// rest is read and discarded so the command never blocks on a full pipe.
const MAX_CAPTURED_OUTPUT: usize = 4096;
/// At most this many characters of a command's output go into a reason:
/// it is one log line.
const MAX_OUTPUT_IN_REASON: usize = 200;
/// How long the output of a command that has exited is still read. A child
/// of the command that keeps the pipes open (a daemon it started) must not
/// turn a finished check into a timeout.
const PIPE_GRACE: Duration = Duration::from_millis(100);
/// The only environment a check command gets: nothing of the daemon's.
const COMMAND_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Why a check failed. The `Display` text is the reason logged and
/// published with a health change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("connection refused")]
    Refused,
    #[error("timeout after {timeout_ms} ms")]
    Timeout { timeout_ms: u32 },
    /// Any other failure to connect (no route to host, network unreachable…).
    #[error("connect failed: {0}")]
    Connect(String),
    /// The connection broke while sending the request or reading the answer.
    #[error("{0}")]
    Io(String),
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    #[error("HTTP {got}, expected {expected}")]
    Status { got: u16, expected: u16 },
    /// The answer did not start with an HTTP/1.x status line.
    #[error("not an HTTP response: {0}")]
    BadResponse(String),
    /// `output` is the command's stdout and stderr, shortened to one line.
    #[error("exit status {code}{}", reason_output(.output))]
    Exit { code: i32, output: String },
    #[error("killed by signal {signal}{}", reason_output(.output))]
    Signal { signal: i32, output: String },
    #[error("cannot run {path}: {error}")]
    Spawn { path: String, error: String },
}

fn reason_output(output: &str) -> String {
    if output.is_empty() {
        String::new()
    } else {
        format!(": {output}")
    }
}

/// How one farm checks its backends, built once from its `[health_check]`.
#[derive(Debug, Clone)]
pub struct Prober {
    kind: Kind,
    timeout: Duration,
    timeout_ms: u32,
}

#[derive(Debug, Clone)]
enum Kind {
    None,
    Tcp,
    Http(HttpCheck),
    Https(HttpCheck, Result<Arc<rustls::ClientConfig>, rustls::Error>),
    /// None when the configuration lacks `command` (validation refuses it;
    /// every check then fails saying so).
    Command(Option<PathBuf>),
}

#[derive(Debug, Clone)]
struct HttpCheck {
    path: String,
    expect_status: u16,
}

impl Prober {
    pub fn new(check: &HealthCheck) -> Prober {
        let http = || HttpCheck {
            path: check.http_path().to_owned(),
            expect_status: check.http_expect_status(),
        };
        let kind = match check.kind {
            HealthCheckKind::None => Kind::None,
            HealthCheckKind::Tcp => Kind::Tcp,
            HealthCheckKind::Http => Kind::Http(http()),
            HealthCheckKind::Https => Kind::Https(http(), tls::client_config()),
            HealthCheckKind::Command => Kind::Command(check.command.as_ref().map(PathBuf::from)),
        };
        Prober {
            kind,
            timeout: Duration::from_millis(u64::from(check.timeout_ms)),
            timeout_ms: check.timeout_ms,
        }
    }

    /// Whether this is `kind = "none"`: nothing to probe, always healthy.
    pub fn is_none(&self) -> bool {
        matches!(self.kind, Kind::None)
    }

    /// Checks `target` once; gives up after `timeout_ms` (a command still
    /// running then is killed).
    pub async fn probe(&self, target: SocketAddr) -> Result<(), ProbeError> {
        let check = async {
            match &self.kind {
                Kind::None => Ok(()),
                Kind::Tcp => connect(target).await.map(drop),
                Kind::Http(http) => {
                    let mut stream = connect(target).await?;
                    http.exchange(&mut stream, target).await
                }
                Kind::Https(http, config) => {
                    let config = config
                        .as_ref()
                        .map_err(|e| ProbeError::Tls(format!("TLS client setup: {e}")))?;
                    let stream = connect(target).await?;
                    // An IP-address server name: rustls then sends no SNI,
                    // and the name is not checked (see `tls`).
                    let name = rustls::pki_types::ServerName::IpAddress(target.ip().into());
                    let mut stream = TlsConnector::from(config.clone())
                        .connect(name, stream)
                        .await
                        .map_err(|e| ProbeError::Tls(e.to_string()))?;
                    http.exchange(&mut stream, target).await
                }
                Kind::Command(Some(path)) => run_command(path, target).await,
                Kind::Command(None) => Err(ProbeError::Spawn {
                    path: "(none)".into(),
                    error: "no `command` configured".into(),
                }),
            }
        };
        tokio::time::timeout(self.timeout, check)
            .await
            .unwrap_or(Err(ProbeError::Timeout {
                timeout_ms: self.timeout_ms,
            }))
    }
}

async fn connect(target: SocketAddr) -> Result<TcpStream, ProbeError> {
    TcpStream::connect(target)
        .await
        .map_err(|e| match e.kind() {
            io::ErrorKind::ConnectionRefused => ProbeError::Refused,
            _ => ProbeError::Connect(e.to_string()),
        })
}

impl HttpCheck {
    /// A minimal HTTP/1.1 exchange: one GET, then only the status line of
    /// the answer is read; the body is never looked at.
    async fn exchange<S>(&self, stream: &mut S, target: SocketAddr) -> Result<(), ProbeError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        // RFC 9112 §3.2: Host is the authority, address and port
        // (`[v6]:port` for IPv6, as SocketAddr writes it).
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\nUser-Agent: tandem-health/1\r\n\r\n",
            self.path
        );
        let io_err = |what: &str, e: io::Error| ProbeError::Io(format!("{what}: {e}"));
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| io_err("sending the request", e))?;
        stream
            .flush()
            .await
            .map_err(|e| io_err("sending the request", e))?;

        let mut buf = Vec::with_capacity(256);
        let mut chunk = [0u8; 256];
        let line_end = loop {
            if let Some(end) = buf.iter().position(|&b| b == b'\n') {
                break end;
            }
            if buf.len() >= MAX_STATUS_LINE {
                return Err(ProbeError::BadResponse(format!(
                    "no status line in the first {MAX_STATUS_LINE} bytes"
                )));
            }
            let room = (MAX_STATUS_LINE - buf.len()).min(chunk.len());
            let n = match stream.read(&mut chunk[..room]).await {
                Ok(n) => n,
                // A TLS peer closing without close_notify after a partial
                // line, or a reset: nothing more will come.
                Err(e) if buf.is_empty() => return Err(io_err("reading the response", e)),
                Err(_) => 0,
            };
            if n == 0 {
                if buf.is_empty() {
                    return Err(ProbeError::BadResponse(
                        "connection closed without a response".into(),
                    ));
                }
                break buf.len();
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let got = parse_status_line(&buf[..line_end])?;
        if got == self.expect_status {
            Ok(())
        } else {
            Err(ProbeError::Status {
                got,
                expected: self.expect_status,
            })
        }
    }
}

/// The status code of `HTTP/1.x NNN reason` (RFC 9112 §4).
fn parse_status_line(line: &[u8]) -> Result<u16, ProbeError> {
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end();
    let bad = || ProbeError::BadResponse(format!("`{}`", shorten(text, 80)));
    let mut parts = text.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") || code.len() != 3 {
        return Err(bad());
    }
    code.parse()
        .ok()
        .filter(|c| (100..=999).contains(c))
        .ok_or_else(bad)
}

/// Runs the check command with the backend's address and port as its two
/// arguments. It inherits nothing: stdin is /dev/null, the environment is
/// only `PATH`, the working directory is `/`; output is captured for the
/// reason. It runs in a process group of its own; when the check ends —
/// answered, or dropped at the timeout — the whole group is killed
/// (SIGKILL), so a script's own children (a `curl` it started, a
/// backgrounded helper) never outlive it.
async fn run_command(path: &std::path::Path, target: SocketAddr) -> Result<(), ProbeError> {
    let mut child = Command::new(path)
        .arg(target.ip().to_string())
        .arg(target.port().to_string())
        .env_clear()
        .env("PATH", COMMAND_PATH)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0)
        .spawn()
        .map_err(|e| ProbeError::Spawn {
            path: path.display().to_string(),
            error: e.to_string(),
        })?;
    let _group = child.id().map(ProcessGroup);
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    let mut out = Vec::new();
    let mut err = Vec::new();
    let status = {
        let mut captures = std::pin::pin!(async {
            tokio::join!(capture(stdout, &mut out), capture(stderr, &mut err))
        });
        let first = tokio::select! {
            status = child.wait() => Some(status),
            _ = &mut captures => None,
        };
        match first {
            Some(status) => {
                let _ = tokio::time::timeout(PIPE_GRACE, &mut captures).await;
                status
            }
            None => child.wait().await,
        }
    }
    .map_err(|e| ProbeError::Spawn {
        path: path.display().to_string(),
        error: format!("waiting for it: {e}"),
    })?;
    if status.success() {
        return Ok(());
    }
    out.extend_from_slice(&err);
    let output = one_line(&String::from_utf8_lossy(&out));
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => Err(ProbeError::Exit { code, output }),
        (None, Some(signal)) => Err(ProbeError::Signal { signal, output }),
        (None, None) => Err(ProbeError::Exit { code: -1, output }),
    }
}

/// A check command's process group (its id is the command's pid), killed
/// when the check is over.
struct ProcessGroup(u32);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if let Ok(pgid) = i32::try_from(self.0) {
            // ESRCH (the group is already gone) is the usual case.
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Reads `pipe` to its end, keeping the first [`MAX_CAPTURED_OUTPUT`] bytes.
async fn capture<R: AsyncRead + Unpin>(pipe: Option<R>, keep: &mut Vec<u8>) {
    let Some(mut pipe) = pipe else { return };
    let mut chunk = [0u8; 1024];
    loop {
        match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let room = MAX_CAPTURED_OUTPUT.saturating_sub(keep.len());
                keep.extend_from_slice(&chunk[..n.min(room)]);
            }
        }
    }
}

/// Whitespace (newlines included) collapsed, at most
/// [`MAX_OUTPUT_IN_REASON`] characters: a reason is one log line.
fn one_line(text: &str) -> String {
    let joined = text.split_whitespace().collect::<Vec<_>>().join(" ");
    shorten(&joined, MAX_OUTPUT_IN_REASON)
}

fn shorten(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_are_parsed() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r"), Ok(200));
        assert_eq!(parse_status_line(b"HTTP/1.0 503"), Ok(503));
        assert_eq!(
            parse_status_line(b"HTTP/1.1 503 Service Unavailable"),
            Ok(503)
        );
        for bad in [
            &b"SSH-2.0-OpenSSH_9.6"[..],
            b"HTTP/1.1 2000 OK",
            b"HTTP/2 200",
            b"",
        ] {
            assert!(
                matches!(parse_status_line(bad), Err(ProbeError::BadResponse(_))),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn reasons_read_as_sentences() {
        assert_eq!(
            ProbeError::Timeout { timeout_ms: 1000 }.to_string(),
            "timeout after 1000 ms"
        );
        assert_eq!(
            ProbeError::Status {
                got: 503,
                expected: 200
            }
            .to_string(),
            "HTTP 503, expected 200"
        );
        assert_eq!(
            ProbeError::Exit {
                code: 2,
                output: String::new()
            }
            .to_string(),
            "exit status 2"
        );
        assert_eq!(
            ProbeError::Exit {
                code: 1,
                output: "db down".into()
            }
            .to_string(),
            "exit status 1: db down"
        );
    }

    #[test]
    fn command_output_becomes_one_short_line() {
        assert_eq!(one_line("  a\n b\t\tc \n"), "a b c");
        let long = "x".repeat(500);
        let line = one_line(&long);
        assert_eq!(line.chars().count(), MAX_OUTPUT_IN_REASON + 1);
        assert!(line.ends_with('…'));
        assert_eq!(shorten("héllo", 2), "hé…");
    }
}
