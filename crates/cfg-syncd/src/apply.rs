//! The backup's side: a batch staged by SFTP in
//! `<config_dir>/.tandem-sync/<batch>/` is checked, validated as the
//! configuration it would produce, and only then moved into the live tree
//! (atomic renames, directory fsync). A refused or interrupted batch leaves
//! the live tree untouched.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tandem_config::{CLUSTER_FILE, Config, FARMS_DIR, NODE_FILE};
use tandem_proto::v1;

use crate::manifest::{STAGING_DIR, is_replicated, sha256_hex};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The request itself is wrong (a path that is not replicated, a
    /// staged file that is missing or differs from its announced hash).
    #[error("batch {batch} refused: {why}")]
    BadRequest { batch: String, why: String },
    /// The configuration the batch would produce is invalid: nothing applied.
    #[error("batch {batch} refused, the configuration would be invalid: {}", .errors.join("; "))]
    Invalid { batch: String, errors: Vec<String> },
    #[error("batch {batch}: {what} {path}: {source}")]
    Io {
        batch: String,
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// What a successful batch changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    pub written: usize,
    pub renamed: usize,
    pub deleted: usize,
}

/// Removes every staging batch (at start: whatever is there was
/// interrupted). Returns how many were removed.
pub fn clean_staging(config_dir: &Path) -> io::Result<usize> {
    let staging = config_dir.join(STAGING_DIR);
    let entries = match fs::read_dir(&staging) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut n = 0;
    for e in entries {
        let path = e?.path();
        remove_any(&path)?;
        n += 1;
    }
    Ok(n)
}

fn remove_any(path: &Path) -> io::Result<()> {
    let r = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

fn valid_batch_name(b: &str) -> bool {
    !b.is_empty()
        && b.len() <= 64
        && b.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
}

/// Applies `req` to `config_dir`, all of it or nothing. Blocking (file I/O
/// and validation): run it off the async runtime.
pub fn apply(config_dir: &Path, req: &v1::ApplyRequest) -> Result<Applied, ApplyError> {
    let batch = req.batch.clone();
    let bad = |why: String| ApplyError::BadRequest {
        batch: batch.clone(),
        why,
    };
    if !valid_batch_name(&req.batch) {
        return Err(bad(format!("invalid batch name {:?}", req.batch)));
    }
    let staged_root = config_dir.join(STAGING_DIR).join(&req.batch);
    let result = check_and_apply(config_dir, &staged_root, req, &bad);
    // Applied or refused, the staged copies are done with; so are batches an
    // interrupted master left behind (one master pushes one batch at a time).
    if let Err(e) = clean_staging(config_dir) {
        tracing::warn!(batch = %req.batch, error = %e, "could not remove the staging directory");
    }
    result
}

fn check_and_apply(
    config_dir: &Path,
    staged_root: &Path,
    req: &v1::ApplyRequest,
    bad: &dyn Fn(String) -> ApplyError,
) -> Result<Applied, ApplyError> {
    let io_err = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        let batch = req.batch.clone();
        move |source| ApplyError::Io {
            batch: batch.clone(),
            what,
            path: path.clone(),
            source,
        }
    };
    // The backup decides for itself what may land: node.toml, ssh/ and the
    // rest of the exclude list are refused whoever asks.
    let paths = req
        .writes
        .iter()
        .map(|w| &w.path)
        .chain(req.deletes.iter())
        .chain(req.renames.iter().flat_map(|r| [&r.from, &r.to]));
    for p in paths {
        if !is_replicated(p) {
            return Err(bad(format!("{p} is not a replicated path")));
        }
    }
    for w in req.writes.iter().filter(|w| w.staged) {
        let staged = staged_root.join(&w.path);
        let data = fs::read(&staged).map_err(|e| bad(format!("staged {}: {e}", w.path)))?;
        if sha256_hex(&data) != w.sha256 {
            return Err(bad(format!(
                "staged {} does not match its announced hash",
                w.path
            )));
        }
    }

    validate(config_dir, staged_root, req)?;

    let mut touched_dirs = BTreeSet::new();
    let mut applied = Applied::default();
    for r in &req.renames {
        let from = config_dir.join(&r.from);
        let to = config_dir.join(&r.to);
        make_parent(&to, &mut touched_dirs).map_err(io_err("creating the directory of", &to))?;
        fs::rename(&from, &to).map_err(io_err("renaming", &from))?;
        touched_dirs.insert(parent_of(&from));
        applied.renamed += 1;
    }
    for w in &req.writes {
        let live = config_dir.join(&w.path);
        let target = if w.staged {
            staged_root.join(&w.path)
        } else {
            live.clone()
        };
        fs::set_permissions(&target, fs::Permissions::from_mode(w.mode & 0o7777))
            .map_err(io_err("setting the mode of", &target))?;
        std::os::unix::fs::chown(&target, Some(w.uid), Some(w.gid))
            .map_err(io_err("setting the owner of", &target))?;
        if w.staged {
            make_parent(&live, &mut touched_dirs)
                .map_err(io_err("creating the directory of", &live))?;
            fs::rename(&target, &live).map_err(io_err("moving into place", &live))?;
            applied.written += 1;
        }
    }
    for d in &req.deletes {
        let live = config_dir.join(d);
        match fs::remove_file(&live) {
            Ok(()) => {
                touched_dirs.insert(parent_of(&live));
                applied.deleted += 1;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("deleting", &live)(e)),
        }
    }
    // Renames are durable only once their directories are on disk.
    for dir in &touched_dirs {
        if let Ok(f) = fs::File::open(dir)
            && let Err(e) = f.sync_all()
        {
            tracing::warn!(dir = %dir.display(), error = %e, "fsync of a directory failed");
        }
    }
    Ok(applied)
}

fn parent_of(p: &Path) -> PathBuf {
    p.parent().map(Path::to_path_buf).unwrap_or_default()
}

fn make_parent(p: &Path, touched: &mut BTreeSet<PathBuf>) -> io::Result<()> {
    let parent = parent_of(p);
    if !parent.is_dir() {
        fs::create_dir_all(&parent)?;
        if let Some(grand) = parent.parent() {
            touched.insert(grand.to_owned());
        }
    }
    touched.insert(parent);
    Ok(())
}

/// Builds the configuration the batch would produce in a scratch view
/// (this node's node.toml, cluster.toml and farms/ after the batch, hard
/// links where possible) and loads it with tandem-config. Errors name the
/// live path (`farms/web.toml:3:7: ...`).
fn validate(
    config_dir: &Path,
    staged_root: &Path,
    req: &v1::ApplyRequest,
) -> Result<(), ApplyError> {
    let mut view_files: BTreeMap<String, PathBuf> = BTreeMap::new();
    let validated = |rel: &str| {
        rel == CLUSTER_FILE
            || rel
                .strip_prefix(FARMS_DIR)
                .and_then(|r| r.strip_prefix('/'))
                .is_some_and(|name| !name.contains('/'))
    };
    if config_dir.join(CLUSTER_FILE).is_file() {
        view_files.insert(CLUSTER_FILE.into(), config_dir.join(CLUSTER_FILE));
    }
    if let Ok(entries) = fs::read_dir(config_dir.join(FARMS_DIR)) {
        for e in entries.flatten() {
            if let Some(name) = e.file_name().to_str() {
                view_files.insert(format!("{FARMS_DIR}/{name}"), e.path());
            }
        }
    }
    for r in &req.renames {
        if let Some(src) = view_files.remove(&r.from) {
            view_files.insert(r.to.clone(), src);
        } else if validated(&r.to) {
            view_files.insert(r.to.clone(), config_dir.join(&r.from));
        }
    }
    for w in req.writes.iter().filter(|w| w.staged && validated(&w.path)) {
        view_files.insert(w.path.clone(), staged_root.join(&w.path));
    }
    for d in &req.deletes {
        view_files.remove(d);
    }
    view_files.retain(|rel, _| validated(rel));

    let view = config_dir
        .join(STAGING_DIR)
        .join(format!("{}.view", req.batch));
    let io_err = |what: &'static str, path: &Path| {
        let path = path.to_owned();
        let batch = req.batch.clone();
        move |source| ApplyError::Io {
            batch: batch.clone(),
            what,
            path: path.clone(),
            source,
        }
    };
    fs::create_dir_all(view.join(FARMS_DIR)).map_err(io_err("creating", &view))?;
    let result = (|| {
        link_or_copy(&config_dir.join(NODE_FILE), &view.join(NODE_FILE)).map_err(io_err(
            "preparing validation with",
            &config_dir.join(NODE_FILE),
        ))?;
        for (rel, src) in &view_files {
            link_or_copy(src, &view.join(rel)).map_err(io_err("preparing validation with", src))?;
        }
        match Config::load(&view) {
            Ok(_) => Ok(()),
            Err(errors) => Err(ApplyError::Invalid {
                batch: req.batch.clone(),
                errors: errors.relative_to(&view),
            }),
        }
    })();
    let _ = fs::remove_dir_all(&view);
    result
}

fn link_or_copy(src: &Path, dst: &Path) -> io::Result<()> {
    match fs::hard_link(src, dst) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(e),
        Err(_) => fs::copy(src, dst).map(|_| ()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE: &str = "name = \"lb2\"\n";
    const FARM: &str = "name = \"web\"\nvip = \"10.0.0.100\"\nport = 80\nprotocol = \"tcp\"\nsnat_address = \"10.1.0.100\"\n\n[[backends]]\naddress = \"10.1.0.11\"\n";

    fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }

    fn staged_write(root: &Path, batch: &str, rel: &str, text: &str) -> v1::FileWrite {
        write(root, &format!("{STAGING_DIR}/{batch}/{rel}"), text);
        v1::FileWrite {
            path: rel.into(),
            staged: true,
            sha256: sha256_hex(text.as_bytes()),
            size: text.len() as u64,
            mode: 0o640,
            uid: 0,
            gid: 0,
        }
    }

    #[test]
    fn a_valid_batch_lands_and_staging_is_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        write(root, "node.toml", NODE);
        write(root, "farms/old.toml", &FARM.replace("web", "old"));
        let req = v1::ApplyRequest {
            batch: "b1".into(),
            writes: vec![staged_write(root, "b1", "farms/web.toml", FARM)],
            deletes: vec!["farms/old.toml".into()],
            ..Default::default()
        };
        let applied = apply(root, &req).unwrap();
        assert_eq!(applied.written, 1);
        assert_eq!(applied.deleted, 1);
        assert_eq!(
            fs::read_to_string(root.join("farms/web.toml")).unwrap(),
            FARM
        );
        let mode = fs::metadata(root.join("farms/web.toml"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o640);
        assert!(!root.join("farms/old.toml").exists());
        assert!(!root.join(STAGING_DIR).join("b1").exists());
    }

    #[test]
    fn an_invalid_farm_is_refused_with_its_position_and_nothing_moves() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        write(root, "node.toml", NODE);
        write(root, "farms/web.toml", FARM);
        let broken = FARM.replace("port = 80", "port = \"eighty\"");
        let req = v1::ApplyRequest {
            batch: "b2".into(),
            writes: vec![
                staged_write(root, "b2", "farms/web.toml", &broken),
                staged_write(root, "b2", "checks/x.sh", "#!/bin/sh\n"),
            ],
            ..Default::default()
        };
        match apply(root, &req) {
            Err(ApplyError::Invalid { errors, .. }) => {
                assert!(errors[0].starts_with("farms/web.toml:3:"), "{errors:?}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(
            fs::read_to_string(root.join("farms/web.toml")).unwrap(),
            FARM
        );
        assert!(!root.join("checks/x.sh").exists());
        assert!(!root.join(STAGING_DIR).join("b2").exists());
    }

    #[test]
    fn node_local_paths_are_refused_whoever_asks() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        write(root, "node.toml", NODE);
        let req = v1::ApplyRequest {
            batch: "b3".into(),
            writes: vec![staged_write(root, "b3", "node.toml", "name = \"evil\"\n")],
            ..Default::default()
        };
        assert!(matches!(
            apply(root, &req),
            Err(ApplyError::BadRequest { .. })
        ));
        assert_eq!(fs::read_to_string(root.join("node.toml")).unwrap(), NODE);
        let req = v1::ApplyRequest {
            batch: "../../x".into(),
            ..Default::default()
        };
        assert!(matches!(
            apply(root, &req),
            Err(ApplyError::BadRequest { .. })
        ));
    }

    #[test]
    fn a_staged_file_that_differs_from_its_hash_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        write(root, "node.toml", NODE);
        let mut w = staged_write(root, "b4", "checks/a.sh", "full content");
        w.sha256 = sha256_hex(b"something else");
        let req = v1::ApplyRequest {
            batch: "b4".into(),
            writes: vec![w],
            ..Default::default()
        };
        assert!(matches!(
            apply(root, &req),
            Err(ApplyError::BadRequest { .. })
        ));
        assert!(!root.join("checks/a.sh").exists());
    }

    #[test]
    fn a_rename_moves_the_existing_content() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        write(root, "node.toml", NODE);
        write(root, "checks/a.sh", "probe");
        let req = v1::ApplyRequest {
            batch: "b5".into(),
            renames: vec![v1::FileRename {
                from: "checks/a.sh".into(),
                to: "checks/b.sh".into(),
            }],
            ..Default::default()
        };
        apply(root, &req).unwrap();
        assert!(!root.join("checks/a.sh").exists());
        assert_eq!(
            fs::read_to_string(root.join("checks/b.sh")).unwrap(),
            "probe"
        );
    }
}
