//! File access that never follows a symbolic link, on either side.
//!
//! Every path inside a configuration directory (or the staging area) is
//! resolved from a directory file descriptor with `openat2(2)` and
//! `RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH`: a link anywhere in the path, or
//! a path that would leave the directory, fails with `ELOOP`/`EXDEV`
//! instead of being followed. What is checked is then used through the same
//! descriptor (`fstat`, `fchown`, `fchmod`, reads), so swapping a file for a
//! link between the check and the use changes nothing: the race is closed.
//! Names are only used with the `*at` calls that act on the entry itself
//! (`renameat`, `unlinkat`, `fstatat(AT_SYMLINK_NOFOLLOW)`), never on what
//! it points to.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag, open, openat, openat2};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat, mkdirat};

use crate::manifest::Sha;

/// Read buffer of the hashing loops.
pub const READ_CHUNK: usize = 64 * 1024;

fn resolve() -> ResolveFlag {
    ResolveFlag::RESOLVE_NO_SYMLINKS | ResolveFlag::RESOLVE_BENEATH
}

/// Opens a configuration (or staging) root directory. The root itself is
/// the operator's choice and may be reached through a link; nothing below
/// it is.
pub fn open_root(dir: &Path) -> io::Result<OwnedFd> {
    open(
        dir,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("{}: {e}", dir.display())))
}

/// Opens `rel` beneath `dir` with no link followed anywhere in the path.
/// `flags` add to `O_NOFOLLOW | O_CLOEXEC`.
pub fn open_beneath<Fd: AsFd>(dir: Fd, rel: &str, flags: OFlag) -> io::Result<OwnedFd> {
    let rel = if rel.is_empty() { "." } else { rel };
    let how = OpenHow::new()
        .flags(flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
        .resolve(resolve());
    if !OPENAT2_MISSING.load(Ordering::Relaxed) {
        match openat2(dir.as_fd(), rel, how) {
            Err(Errno::ENOSYS) => {
                // An older kernel, or a seccomp filter (a container's) that
                // does not know the call: the same guarantee, one component
                // at a time.
                if !OPENAT2_MISSING.swap(true, Ordering::Relaxed) {
                    tracing::info!(
                        "openat2(2) is not available here (ENOSYS): paths are resolved one component at a time, with O_NOFOLLOW at each"
                    );
                }
            }
            other => return other.map_err(io::Error::from),
        }
    }
    open_by_components(dir, rel, flags)
}

/// Set once `openat2` answered ENOSYS: every later open walks components.
static OPENAT2_MISSING: AtomicBool = AtomicBool::new(false);

/// What `openat2(RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH)` does, with plain
/// `openat`: each directory of the path opened with `O_NOFOLLOW |
/// O_DIRECTORY` from the previous one (a link fails with `ELOOP`, a
/// non-directory with `ENOTDIR`), `..` and absolute paths refused with
/// `EXDEV`, the last component opened with `flags | O_NOFOLLOW`.
fn open_by_components<Fd: AsFd>(dir: Fd, rel: &str, flags: OFlag) -> io::Result<OwnedFd> {
    if rel.starts_with('/') {
        return Err(Errno::EXDEV.into());
    }
    let parts: Vec<&str> = rel
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if parts.contains(&"..") {
        return Err(Errno::EXDEV.into());
    }
    let dir_flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let Some((last, dirs)) = parts.split_last() else {
        return openat(
            dir,
            ".",
            flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(io::Error::from);
    };
    // `O_DIRECTORY | O_NOFOLLOW` on a link answers ENOTDIR: tell a link
    // (ELOOP, as openat2 says) from a file.
    let open_one = |at: std::os::fd::BorrowedFd<'_>, name: &str, f: OFlag| {
        openat(at, name, f, Mode::empty()).map_err(|e| {
            let link = e == Errno::ENOTDIR
                && fstatat(at, name, AtFlags::AT_SYMLINK_NOFOLLOW)
                    .is_ok_and(|st| kind(&st) == Kind::Link);
            io::Error::from(if link { Errno::ELOOP } else { e })
        })
    };
    let mut cur: Option<OwnedFd> = None;
    for d in dirs {
        let at = cur.as_ref().map_or_else(|| dir.as_fd(), |fd| fd.as_fd());
        let next = open_one(at, d, dir_flags)?;
        cur = Some(next);
    }
    let at = cur.as_ref().map_or_else(|| dir.as_fd(), |fd| fd.as_fd());
    open_one(at, last, flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC)
}

/// A directory beneath `dir` (`""`: `dir` itself, reopened).
pub fn open_dir_beneath<Fd: AsFd>(dir: Fd, rel: &str) -> io::Result<OwnedFd> {
    open_beneath(dir, rel, OFlag::O_RDONLY | OFlag::O_DIRECTORY)
}

/// A regular file beneath `dir`, for reading. `O_NONBLOCK` keeps a FIFO
/// swapped in from blocking the open; anything but a regular file is
/// refused after the open, on the descriptor.
pub fn open_file_beneath<Fd: AsFd>(dir: Fd, rel: &str) -> io::Result<(File, FileStat)> {
    let fd = open_beneath(dir, rel, OFlag::O_RDONLY | OFlag::O_NONBLOCK)?;
    let st = fstat(&fd).map_err(io::Error::from)?;
    if kind(&st) != Kind::File {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{rel} is a {}, not a regular file", kind(&st).word()),
        ));
    }
    Ok((File::from(fd), st))
}

/// `dir`/`name` as it is (a link is reported as a link); None if absent.
pub fn stat_at<Fd: AsFd>(dir: Fd, name: &str) -> io::Result<Option<FileStat>> {
    match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) | Err(Errno::ENOTDIR) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Whether an error says "a symbolic link was in the way".
pub fn is_link_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error().map(Errno::from_raw),
        Some(Errno::ELOOP) | Some(Errno::EXDEV)
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Link,
    Other,
}

impl Kind {
    pub fn word(self) -> &'static str {
        match self {
            Kind::File => "regular file",
            Kind::Dir => "directory",
            Kind::Link => "symbolic link",
            Kind::Other => "special file",
        }
    }
}

pub fn kind(st: &FileStat) -> Kind {
    match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFREG => Kind::File,
        SFlag::S_IFDIR => Kind::Dir,
        SFlag::S_IFLNK => Kind::Link,
        _ => Kind::Other,
    }
}

/// (parent, name) of a `/`-separated relative path.
pub fn split(rel: &str) -> (&str, &str) {
    match rel.rfind('/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => ("", rel),
    }
}

/// Opens directory `rel_dir` beneath `root`, creating the missing
/// components (mode `mode`); a component that is a link or not a directory
/// is an error naming it.
pub fn ensure_dir<Fd: AsFd>(root: Fd, rel_dir: &str, mode: u32) -> io::Result<OwnedFd> {
    let mut cur = open_dir_beneath(&root, "")?;
    let mut walked = String::new();
    for part in rel_dir.split('/').filter(|p| !p.is_empty()) {
        if !walked.is_empty() {
            walked.push('/');
        }
        walked.push_str(part);
        match mkdirat(&cur, part, Mode::from_bits_truncate(mode)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => {
                return Err(io::Error::new(
                    io::Error::from(e).kind(),
                    format!("creating directory {walked}: {e}"),
                ));
            }
        }
        cur = match open_dir_beneath(&cur, part) {
            Ok(fd) => fd,
            Err(e) => {
                let what = match stat_at(&cur, part) {
                    Ok(Some(st)) if kind(&st) != Kind::Dir => {
                        format!(
                            "is a {}, not a directory (links are never followed)",
                            kind(&st).word()
                        )
                    }
                    _ => e.to_string(),
                };
                return Err(io::Error::new(e.kind(), format!("{walked} {what}")));
            }
        };
    }
    Ok(cur)
}

/// Reads `file` to its end, hashing it. Stops early (returning
/// `over: true`) once more than `cap` bytes were read.
pub fn hash_file(file: &mut File, cap: u64, buf: &mut Vec<u8>) -> io::Result<Hashed> {
    buf.resize(READ_CHUNK, 0);
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut size = 0u64;
    loop {
        let n = match file.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        size += n as u64;
        if size > cap {
            return Ok(Hashed {
                sha: Sha([0; 32]),
                size,
                over: true,
            });
        }
        ctx.update(&buf[..n]);
    }
    Ok(Hashed {
        sha: Sha::from_digest(ctx.finish()),
        size,
        over: false,
    })
}

#[derive(Debug, Clone, Copy)]
pub struct Hashed {
    pub sha: Sha,
    pub size: u64,
    /// More than the cap was read: `sha` is meaningless.
    pub over: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn a_link_anywhere_in_the_path_is_refused_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("etc");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(root.join("farms")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), "s").unwrap();
        std::fs::write(root.join("farms/web.toml"), "w").unwrap();
        symlink(outside.join("secret"), root.join("farms/link.toml")).unwrap();
        symlink(&outside, root.join("checks")).unwrap();
        let fd = open_root(&root).unwrap();

        let (_, st) = open_file_beneath(&fd, "farms/web.toml").unwrap();
        assert_eq!(kind(&st), Kind::File);
        for rel in ["farms/link.toml", "checks/secret", "../outside/secret"] {
            let e = open_file_beneath(&fd, rel).unwrap_err();
            assert!(is_link_error(&e), "{rel}: {e}");
        }
        assert_eq!(kind(&stat_at(&fd, "checks").unwrap().unwrap()), Kind::Link);
        assert!(stat_at(&fd, "nothing").unwrap().is_none());
        let e = ensure_dir(&fd, "checks/sub", 0o755).unwrap_err();
        assert!(e.to_string().contains("checks is a symbolic link"), "{e}");
        assert!(!outside.join("sub").exists());
        ensure_dir(&fd, "routes/a/b", 0o755).unwrap();
        assert!(root.join("routes/a/b").is_dir());
    }

    /// Where openat2 is missing (ENOSYS), the component walk refuses the
    /// same paths.
    #[test]
    fn without_openat2_a_link_anywhere_in_the_path_is_refused_too() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("etc");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(root.join("farms/sub")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), "s").unwrap();
        std::fs::write(root.join("farms/web.toml"), "w").unwrap();
        std::fs::write(root.join("farms/sub/x.toml"), "x").unwrap();
        symlink(outside.join("secret"), root.join("farms/link.toml")).unwrap();
        symlink(&outside, root.join("checks")).unwrap();
        let fd = open_root(&root).unwrap();
        let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK;
        for rel in ["farms/web.toml", "./farms//sub/x.toml", "farms/sub/x.toml"] {
            let f = open_by_components(&fd, rel, flags).unwrap();
            assert_eq!(kind(&fstat(&f).unwrap()), Kind::File, "{rel}");
        }
        open_by_components(&fd, "", OFlag::O_RDONLY | OFlag::O_DIRECTORY).unwrap();
        for rel in [
            "farms/link.toml",
            "checks/secret",
            "checks",
            "../outside/secret",
            "/etc/passwd",
        ] {
            let e = open_by_components(&fd, rel, flags).unwrap_err();
            assert!(is_link_error(&e), "{rel}: {e}");
        }
    }

    #[test]
    fn hashing_stops_past_the_cap() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("f"), vec![7u8; 200_000]).unwrap();
        let fd = open_root(tmp.path()).unwrap();
        let mut buf = Vec::new();
        let (mut f, _) = open_file_beneath(&fd, "f").unwrap();
        let h = hash_file(&mut f, 1 << 20, &mut buf).unwrap();
        assert!(!h.over);
        assert_eq!(h.size, 200_000);
        assert_eq!(h.sha, Sha::of(&[7u8; 200_000]));
        let (mut f, _) = open_file_beneath(&fd, "f").unwrap();
        assert!(hash_file(&mut f, 100_000, &mut buf).unwrap().over);
    }
}
