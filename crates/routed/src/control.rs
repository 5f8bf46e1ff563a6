//! BIRD's control socket (what `birdc` speaks): the reply codec, pure, and
//! a thin client that sends one command per connection.
//!
//! A reply is a sequence of lines. A line starting with a four-digit code
//! and `-` continues the reply, with the code and ` ` it ends it; a line
//! starting with a space continues the previous code's text. Codes 0xxx
//! report success, 1xxx and 2xxx carry table rows and headers, 8xxx and
//! 9xxx are errors (runtime and parse). BIRD greets a new connection with
//! `0001 BIRD <version> ready.`

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// One line of a reply: its code (inherited by continuation lines) and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub code: u16,
    pub text: String,
}

/// A complete reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub lines: Vec<Line>,
}

impl Reply {
    /// The code of the line that ended the reply.
    pub fn code(&self) -> u16 {
        self.lines.last().map_or(0, |l| l.code)
    }

    /// Whether BIRD reports an error (codes 8000 and up).
    pub fn is_error(&self) -> bool {
        self.code() >= 8000
    }

    /// The text of the ending line, e.g. `Reconfigured`.
    pub fn message(&self) -> &str {
        self.lines.last().map_or("", |l| l.text.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("line {0} of BIRD's reply has neither a code nor a continuation: {1:?}")]
    BadLine(usize, String),
    #[error("BIRD's reply is not UTF-8")]
    NotUtf8,
}

/// Decodes the reply at the start of `buf`: `Ok(None)` while it is
/// incomplete, else the reply and how many bytes it took.
pub fn decode(buf: &[u8]) -> Result<Option<(Reply, usize)>, DecodeError> {
    let mut lines: Vec<Line> = Vec::new();
    let mut at = 0;
    let mut n = 0;
    while let Some(end) = buf[at..].iter().position(|b| *b == b'\n') {
        let raw = std::str::from_utf8(&buf[at..at + end]).map_err(|_| DecodeError::NotUtf8)?;
        at += end + 1;
        n += 1;
        let bytes = raw.as_bytes();
        if bytes.len() >= 5
            && bytes[..4].iter().all(u8::is_ascii_digit)
            && matches!(bytes[4], b'-' | b' ')
        {
            let code: u16 = raw[..4]
                .parse()
                .map_err(|_| DecodeError::BadLine(n, raw.to_owned()))?;
            lines.push(Line {
                code,
                text: raw[5..].to_owned(),
            });
            if bytes[4] == b' ' {
                return Ok(Some((Reply { lines }, at)));
            }
        } else if let Some(rest) = raw.strip_prefix(' ') {
            let code = lines.last().map_or(0, |l| l.code);
            lines.push(Line {
                code,
                text: rest.to_owned(),
            });
        } else {
            return Err(DecodeError::BadLine(n, raw.to_owned()));
        }
    }
    Ok(None)
}

/// One row of `show protocols`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolRow {
    pub name: String,
    pub proto: String,
    pub table: String,
    /// `up`, `start`, `down`, `flush`, `stop`.
    pub state: String,
    pub since: String,
    /// BGP: `Established`, `Active`, `Connect`, `Idle`..., possibly with a
    /// reason (`Active  Socket: Connection refused`).
    pub info: String,
}

/// The rows of a `show protocols` reply (code 1002 lines).
pub fn protocols(reply: &Reply) -> Vec<ProtocolRow> {
    reply
        .lines
        .iter()
        .filter(|l| l.code == 1002)
        .filter_map(|l| {
            let mut words = l.text.split_whitespace();
            let name = words.next()?.to_owned();
            let proto = words.next()?.to_owned();
            let table = words.next()?.to_owned();
            let state = words.next()?.to_owned();
            // `timeformat protocol iso long`: a date and a time.
            let date = words.next().unwrap_or_default();
            let since = match words.clone().next() {
                Some(t) if date.contains('-') && t.contains(':') => {
                    words.next();
                    format!("{date} {t}")
                }
                _ => date.to_owned(),
            };
            let info = words.collect::<Vec<_>>().join(" ");
            Some(ProtocolRow {
                name,
                proto,
                table,
                state,
                since,
                info,
            })
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("BIRD's control socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("BIRD's control socket {path}: no complete reply within {timeout:?}")]
    Timeout { path: PathBuf, timeout: Duration },
    #[error("BIRD's control socket {path}: closed in the middle of a reply")]
    Closed { path: PathBuf },
    #[error("BIRD's control socket {path}: {source}")]
    Decode { path: PathBuf, source: DecodeError },
}

/// A client of BIRD's control socket; every command has its own
/// connection, so a restarted BIRD needs nothing special.
#[derive(Debug, Clone)]
pub struct Control {
    path: PathBuf,
    timeout: Duration,
}

impl Control {
    pub fn new(path: &Path, timeout: Duration) -> Control {
        Control {
            path: path.to_owned(),
            timeout,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends `command` and returns BIRD's reply (which may be an error
    /// reply: see [`Reply::is_error`]).
    pub async fn request(&self, command: &str) -> Result<Reply, ControlError> {
        match tokio::time::timeout(self.timeout, self.exchange(command)).await {
            Ok(r) => r,
            Err(_) => Err(ControlError::Timeout {
                path: self.path.clone(),
                timeout: self.timeout,
            }),
        }
    }

    async fn exchange(&self, command: &str) -> Result<Reply, ControlError> {
        let io = |source| ControlError::Io {
            path: self.path.clone(),
            source,
        };
        let mut stream = UnixStream::connect(&self.path).await.map_err(io)?;
        let mut buf = Vec::with_capacity(4096);
        // The greeting first, then the command's reply.
        let _greeting = self.read_reply(&mut stream, &mut buf).await?;
        stream
            .write_all(format!("{command}\n").as_bytes())
            .await
            .map_err(io)?;
        self.read_reply(&mut stream, &mut buf).await
    }

    async fn read_reply(
        &self,
        stream: &mut UnixStream,
        buf: &mut Vec<u8>,
    ) -> Result<Reply, ControlError> {
        loop {
            match decode(buf) {
                Ok(Some((reply, used))) => {
                    buf.drain(..used);
                    return Ok(reply);
                }
                Ok(None) => {}
                Err(source) => {
                    return Err(ControlError::Decode {
                        path: self.path.clone(),
                        source,
                    });
                }
            }
            let mut chunk = [0u8; 8192];
            let n = stream
                .read(&mut chunk)
                .await
                .map_err(|source| ControlError::Io {
                    path: self.path.clone(),
                    source,
                })?;
            if n == 0 {
                return Err(ControlError::Closed {
                    path: self.path.clone(),
                });
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }
}
