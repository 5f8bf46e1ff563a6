//! The commit journal of a batch on the receiving node.
//!
//! A batch is checked and staged first; then its journal is written to
//! `<config_dir>/.tandem-sync/<batch>.journal` (a temporary name, fsync,
//! `rename(2)`): that rename is the batch's one atomic switch. Before it the
//! batch does not exist (staging is discarded at start); after it the batch
//! is applied whole, now or, after a crash, when cfg-syncd starts again: every
//! operation is idempotent and the journal is replayed until it is removed,
//! which happens only after the daemons reloaded.
//!
//! The format is line-based text (an operator can read it):
//!
//! ```text
//! tandem-cfg-syncd journal 1
//! batch lb1-1765071400123-7
//! from lb1
//! set-aside 20251207T013640Z
//! reload 1
//! D checks/old.sh
//! M <sha256> checks/a.sh<TAB>checks/b.sh
//! P 0 <sha256> farms/web.toml
//! A 2755 0 0 checks/sg.sh
//! end 4 <sha256 of every byte before this line>
//! ```
//!
//! `D` deletes, `M` moves a live file (same content), `P` places staged
//! file number N (already owned and moded) at its path, `A` sets owner then
//! mode. Paths never hold a control character (`manifest::is_replicated`),
//! so lines and the tab are unambiguous.

use std::io::{self, BufRead, Write};
use std::sync::Arc;

use ring::digest;

use crate::manifest::{Sha, hex, is_replicated};

pub const MAGIC: &str = "tandem-cfg-syncd journal 1";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Delete {
        path: Arc<str>,
    },
    Move {
        sha: Sha,
        from: Arc<str>,
        to: Arc<str>,
    },
    Place {
        ready: u32,
        sha: Sha,
        path: Arc<str>,
    },
    Attrs {
        mode: u32,
        uid: u32,
        gid: u32,
        path: Arc<str>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Journal {
    pub batch: String,
    pub from_node: String,
    /// The set-aside directory's final name (under `<state>/set-aside/`),
    /// staged as `<name>.partial` before the commit.
    pub set_aside: Option<String>,
    /// Whether the daemons reload once the batch is in place (false for a
    /// batch that only changes modes and owners).
    pub reload: bool,
    pub ops: Vec<Op>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JournalError {
    #[error("line {line}: {why}")]
    Line { line: usize, why: String },
    #[error("no end line: the journal is incomplete")]
    Truncated,
    #[error("the checksum does not match: the journal is damaged")]
    Checksum,
}

/// Writes `j` to `out`, checksum line included.
pub fn encode<W: Write>(j: &Journal, out: W) -> io::Result<()> {
    let mut w = Hashing {
        inner: io::BufWriter::new(out),
        ctx: digest::Context::new(&digest::SHA256),
    };
    writeln!(w, "{MAGIC}")?;
    writeln!(w, "batch {}", j.batch)?;
    writeln!(w, "from {}", j.from_node)?;
    writeln!(w, "set-aside {}", j.set_aside.as_deref().unwrap_or("-"))?;
    writeln!(w, "reload {}", u8::from(j.reload))?;
    for op in &j.ops {
        match op {
            Op::Delete { path } => writeln!(w, "D {path}")?,
            Op::Move { sha, from, to } => writeln!(w, "M {sha} {from}\t{to}")?,
            Op::Place { ready, sha, path } => writeln!(w, "P {ready} {sha} {path}")?,
            Op::Attrs {
                mode,
                uid,
                gid,
                path,
            } => writeln!(w, "A {mode:o} {uid} {gid} {path}")?,
        }
    }
    let sum = hex(w.ctx.clone().finish().as_ref());
    let Hashing { mut inner, .. } = w;
    writeln!(inner, "end {} {sum}", j.ops.len())?;
    inner.flush()
}

#[cfg(test)]
pub fn encode_to_vec(j: &Journal) -> Vec<u8> {
    let mut v = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = encode(j, &mut v);
    v
}

struct Hashing<W: Write> {
    inner: W,
    ctx: digest::Context,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.ctx.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Reads a journal, refusing anything incomplete, damaged or malformed.
pub fn decode<R: BufRead>(mut input: R) -> Result<Journal, JournalError> {
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut raw = Vec::new();
    let mut n = 0usize;
    let mut header: Vec<String> = Vec::new();
    let mut ops = Vec::new();
    loop {
        raw.clear();
        let read = input
            .read_until(b'\n', &mut raw)
            .map_err(|e| JournalError::Line {
                line: n + 1,
                why: e.to_string(),
            })?;
        if read == 0 || raw.last() != Some(&b'\n') {
            return Err(JournalError::Truncated);
        }
        n += 1;
        let err = |why: &str| JournalError::Line {
            line: n,
            why: why.to_owned(),
        };
        let line = std::str::from_utf8(&raw[..raw.len() - 1]).map_err(|_| err("not UTF-8"))?;
        if let Some(rest) = line.strip_prefix("end ") {
            let (count, sum) = rest.split_once(' ').ok_or_else(|| err("bad end line"))?;
            if hex(ctx.finish().as_ref()) != sum {
                return Err(JournalError::Checksum);
            }
            if count.parse::<usize>().ok() != Some(ops.len()) {
                return Err(err("operation count differs"));
            }
            break;
        }
        ctx.update(&raw);
        if header.len() < 5 {
            header.push(line.to_owned());
            continue;
        }
        ops.push(parse_op(line).map_err(err)?);
    }
    if header.len() < 5 || header[0] != MAGIC {
        return Err(JournalError::Line {
            line: 1,
            why: "not a cfg-syncd journal".into(),
        });
    }
    let field = |i: usize, key: &str| -> Result<String, JournalError> {
        header[i]
            .strip_prefix(key)
            .and_then(|v| v.strip_prefix(' '))
            .map(str::to_owned)
            .ok_or_else(|| JournalError::Line {
                line: i + 1,
                why: format!("expected `{key} ...`"),
            })
    };
    let set_aside = field(3, "set-aside")?;
    let reload = field(4, "reload")?;
    Ok(Journal {
        batch: field(1, "batch")?,
        from_node: field(2, "from")?,
        set_aside: (set_aside != "-").then_some(set_aside),
        reload: match reload.as_str() {
            "1" => true,
            "0" => false,
            _ => {
                return Err(JournalError::Line {
                    line: 5,
                    why: "reload must be 0 or 1".into(),
                });
            }
        },
        ops,
    })
}

fn path(s: &str) -> Result<Arc<str>, &'static str> {
    if is_replicated(s) {
        Ok(Arc::from(s))
    } else {
        Err("not a replicated path")
    }
}

fn sha(s: &str) -> Result<Sha, &'static str> {
    Sha::from_hex(s).ok_or("bad sha256")
}

fn parse_op(line: &str) -> Result<Op, &'static str> {
    let (kind, rest) = line.split_once(' ').ok_or("bad operation")?;
    match kind {
        "D" => Ok(Op::Delete { path: path(rest)? }),
        "M" => {
            let (s, paths) = rest.split_once(' ').ok_or("bad move")?;
            let (from, to) = paths.split_once('\t').ok_or("bad move")?;
            Ok(Op::Move {
                sha: sha(s)?,
                from: path(from)?,
                to: path(to)?,
            })
        }
        "P" => {
            let mut f = rest.splitn(3, ' ');
            let ready = f
                .next()
                .and_then(|v| v.parse().ok())
                .ok_or("bad staged file number")?;
            let s = sha(f.next().ok_or("bad place")?)?;
            Ok(Op::Place {
                ready,
                sha: s,
                path: path(f.next().ok_or("bad place")?)?,
            })
        }
        "A" => {
            let mut f = rest.splitn(4, ' ');
            let mode = f
                .next()
                .and_then(|v| u32::from_str_radix(v, 8).ok())
                .filter(|m| *m <= 0o7777)
                .ok_or("bad mode")?;
            let uid = f.next().and_then(|v| v.parse().ok()).ok_or("bad uid")?;
            let gid = f.next().and_then(|v| v.parse().ok()).ok_or("bad gid")?;
            Ok(Op::Attrs {
                mode,
                uid,
                gid,
                path: path(f.next().ok_or("bad attrs")?)?,
            })
        }
        _ => Err("unknown operation"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Journal {
        Journal {
            batch: "lb1-1765071400123-7".into(),
            from_node: "lb1".into(),
            set_aside: Some("20251207T013640Z".into()),
            reload: true,
            ops: vec![
                Op::Delete {
                    path: "checks/old.sh".into(),
                },
                Op::Move {
                    sha: Sha::of(b"a"),
                    from: "checks/a.sh".into(),
                    to: "checks/b c.sh".into(),
                },
                Op::Place {
                    ready: 0,
                    sha: Sha::of(b"w"),
                    path: "farms/web.toml".into(),
                },
                Op::Attrs {
                    mode: 0o2755,
                    uid: 0,
                    gid: 50,
                    path: "checks/sg.sh".into(),
                },
            ],
        }
    }

    #[test]
    fn the_journal_has_this_exact_text() {
        let a = Sha::of(b"a").hex();
        let w = Sha::of(b"w").hex();
        let body = format!(
            "tandem-cfg-syncd journal 1\nbatch lb1-1765071400123-7\nfrom lb1\nset-aside 20251207T013640Z\nreload 1\n\
             D checks/old.sh\nM {a} checks/a.sh\tchecks/b c.sh\nP 0 {w} farms/web.toml\nA 2755 0 50 checks/sg.sh\n"
        );
        let sum = crate::manifest::sha256_hex(body.as_bytes());
        let want = format!("{body}end 4 {sum}\n");
        assert_eq!(String::from_utf8(encode_to_vec(&sample())).unwrap(), want);
        assert_eq!(decode(want.as_bytes()).unwrap(), sample());
    }

    #[test]
    fn an_empty_journal_round_trips() {
        let j = Journal {
            batch: "b".into(),
            from_node: "lb1".into(),
            set_aside: None,
            reload: false,
            ops: vec![],
        };
        let bytes = encode_to_vec(&j);
        assert!(String::from_utf8_lossy(&bytes).contains("set-aside -\nreload 0\nend 0 "));
        assert_eq!(decode(&bytes[..]).unwrap(), j);
    }

    #[test]
    fn a_torn_or_damaged_journal_is_refused() {
        let bytes = encode_to_vec(&sample());
        // Cut anywhere: never a valid journal.
        for cut in [0, 10, bytes.len() / 2, bytes.len() - 1] {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        // One byte changed in an operation (still well-formed).
        let mut bad = bytes.clone();
        let i = String::from_utf8_lossy(&bytes).find("P 0 ").unwrap();
        bad[i + 2] = b'1';
        assert_eq!(decode(&bad[..]), Err(JournalError::Checksum));
        // A path that is never replicated, with a valid checksum.
        let text = String::from_utf8(bytes)
            .unwrap()
            .replace("farms/web.toml", "node.toml");
        assert!(matches!(
            decode(text.as_bytes()),
            Err(JournalError::Line { .. } | JournalError::Checksum)
        ));
    }
}
