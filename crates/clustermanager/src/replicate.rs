//! Command replication: a change to one replicated file (write or delete),
//! or to several at once (farm restore, farm clear), is validated as the
//! whole configuration it would produce, written (each file atomically),
//! the local daemons reload once, and — on the master — the same change
//! goes to the peer's clustermanager (ReplicateChange), which does the same
//! on its side.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use tandem_config::{CLUSTER_FILE, Config, FARMS_DIR, NODE_FILE};

/// Top-level trees of replicated files besides cluster.toml and farms/
/// (the include list of docs/cfg-syncd.md; keys/ and ssh/ are not
/// changed through the API).
const OTHER_TREES: [&str; 4] = ["checks", "certs", "notifications", "routes"];

/// One change to the configuration tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Relative to the configuration directory.
    pub path: String,
    /// None: delete.
    pub content: Option<Vec<u8>>,
}

/// Accepts `cluster.toml`, `farms/<file>` and files of the other
/// replicated trees; refuses node-local files, absolute paths, `..`,
/// dotfiles and temporaries.
pub fn check_path(path: &str) -> Result<(), String> {
    let parts: Vec<&str> = path.split('/').collect();
    let bad_part = parts.iter().any(|p| {
        p.is_empty() || *p == "." || *p == ".." || p.starts_with('.') || p.ends_with(".tmp")
    });
    let allowed = path == CLUSTER_FILE
        || (parts.len() == 2 && parts[0] == FARMS_DIR)
        || (parts.len() >= 2 && OTHER_TREES.contains(&parts[0]));
    if path.starts_with('/') || bad_part || !allowed {
        return Err(format!(
            "{path:?} is not a replicated file that can be changed through the cluster (cluster.toml, farms/<name>.toml, checks/, certs/, notifications/, routes/)"
        ));
    }
    Ok(())
}

/// Whether the file takes part in tandem-config's validation.
fn validated(path: &str) -> bool {
    path == CLUSTER_FILE || path.starts_with("farms/")
}

/// Loads the configuration `change` would produce, in a scratch copy of
/// node.toml, cluster.toml and farms/ (a dot directory: neither replicated
/// nor watched). Errors name the live relative path (`farms/web.toml:3:8: …`).
/// Blocking.
pub fn validate(config_dir: &Path, changes: &[Change]) -> Result<Config, Vec<String>> {
    let view = config_dir.join(format!(".clustermanager-view-{}", std::process::id()));
    let _ = fs::remove_dir_all(&view);
    let io = |what: &str, p: &Path, e: io::Error| vec![format!("{what} {}: {e}", p.display())];
    let result = (|| {
        fs::create_dir_all(view.join(FARMS_DIR)).map_err(|e| io("creating", &view, e))?;
        for rel in [NODE_FILE, CLUSTER_FILE] {
            copy_if_present(&config_dir.join(rel), &view.join(rel))
                .map_err(|e| io("copying", &config_dir.join(rel), e))?;
        }
        if let Ok(entries) = fs::read_dir(config_dir.join(FARMS_DIR)) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_file()) {
                    fs::copy(e.path(), view.join(FARMS_DIR).join(e.file_name()))
                        .map_err(|err| io("copying", &e.path(), err))?;
                }
            }
        }
        for change in changes.iter().filter(|c| validated(&c.path)) {
            let target = view.join(&change.path);
            match &change.content {
                Some(c) => fs::write(&target, c).map_err(|e| io("writing", &target, e))?,
                None => match fs::remove_file(&target) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        return Err(io("removing", &target, e));
                    }
                    _ => {}
                },
            }
        }
        Config::load(&view).map_err(|errors| errors.relative_to(&view))
    })();
    let _ = fs::remove_dir_all(&view);
    result
}

fn copy_if_present(from: &Path, to: &Path) -> io::Result<()> {
    match fs::copy(from, to) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Checks a set of changes: each path replicated, none twice, at least one.
pub fn check_batch(changes: &[Change]) -> Result<(), String> {
    if changes.is_empty() {
        return Err("the change names no file".into());
    }
    let mut seen = std::collections::HashSet::new();
    for c in changes {
        check_path(&c.path)?;
        if !seen.insert(c.path.as_str()) {
            return Err(format!("{:?} appears twice in one change", c.path));
        }
    }
    Ok(())
}

/// Writes every change of a batch (each file atomically); the first error
/// stops it. Blocking.
pub fn write_all(config_dir: &Path, changes: &[Change]) -> io::Result<()> {
    for c in changes {
        write(config_dir, c)?;
    }
    Ok(())
}

/// Writes (temporary file, fsync, rename, directory fsync) or deletes the
/// file. Readers see the old file or the new one, never a part. Blocking.
pub fn write(config_dir: &Path, change: &Change) -> io::Result<()> {
    let target = config_dir.join(&change.path);
    let dir = target
        .parent()
        .map_or_else(|| config_dir.to_owned(), Path::to_path_buf);
    match &change.content {
        Some(content) => {
            fs::create_dir_all(&dir)?;
            let tmp = tmp_name(&target);
            let written = (|| {
                let mut f = fs::File::create(&tmp)?;
                f.write_all(content)?;
                f.sync_all()?;
                // Keep the mode of the file it replaces (cfg-syncd replicates it).
                if let Ok(md) = fs::metadata(&target) {
                    fs::set_permissions(&tmp, md.permissions())?;
                }
                fs::rename(&tmp, &target)
            })();
            if written.is_err() {
                let _ = fs::remove_file(&tmp);
            }
            written?;
        }
        None => match fs::remove_file(&target) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        },
    }
    fs::File::open(&dir)?.sync_all()
}

/// `<name>.<pid>.tmp` next to the target: the `.tmp` suffix keeps
/// cfg-syncd's watcher from replicating the half-written file.
fn tmp_name(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    target.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE: &str = "name = \"lb1\"\n";
    const FARM: &str = "name = \"web\"\nvip = \"10.0.0.100\"\nport = 80\nsnat_address = \"10.0.0.100\"\n\n[[backends]]\naddress = \"10.1.0.11\"\n";

    fn dir() -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("node.toml"), NODE).unwrap();
        t
    }

    #[test]
    fn only_replicated_files_can_change() {
        for ok in ["cluster.toml", "farms/web.toml", "checks/a/b.sh"] {
            assert!(check_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "node.toml",
            "ssh/id_ed25519",
            "keys/sync.key",
            "/etc/passwd",
            "farms/../node.toml",
            "farms/.web.toml.swp",
            "farms/web.toml.tmp",
            "farms/a/b.toml",
            "",
        ] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_valid_farm_is_written_atomically_and_an_invalid_one_changes_nothing() {
        let t = dir();
        let change = Change {
            path: "farms/web.toml".into(),
            content: Some(FARM.as_bytes().to_vec()),
        };
        let config = validate(t.path(), std::slice::from_ref(&change)).unwrap();
        assert_eq!(config.farms.len(), 1);
        write(t.path(), &change).unwrap();
        assert_eq!(
            fs::read_to_string(t.path().join("farms/web.toml")).unwrap(),
            FARM
        );

        let broken = Change {
            path: "farms/web.toml".into(),
            content: Some(FARM.replace("port = 80", "port = \"eighty\"").into_bytes()),
        };
        let errors = validate(t.path(), &[broken]).unwrap_err();
        assert!(errors[0].starts_with("farms/web.toml:3:"), "{errors:?}");
        assert_eq!(
            fs::read_to_string(t.path().join("farms/web.toml")).unwrap(),
            FARM
        );
        // No scratch view and no temporary left behind.
        let names: Vec<_> = fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
    }

    #[test]
    fn a_delete_is_validated_too() {
        let t = dir();
        fs::create_dir_all(t.path().join("farms")).unwrap();
        fs::write(t.path().join("farms/web.toml"), FARM).unwrap();
        let del = Change {
            path: "farms/web.toml".into(),
            content: None,
        };
        assert!(
            validate(t.path(), std::slice::from_ref(&del))
                .unwrap()
                .farms
                .is_empty()
        );
        write(t.path(), &del).unwrap();
        assert!(!t.path().join("farms/web.toml").exists());
    }

    #[test]
    fn a_batch_is_validated_as_one_configuration() {
        let t = dir();
        fs::create_dir_all(t.path().join("farms")).unwrap();
        fs::write(t.path().join("farms/web.toml"), FARM).unwrap();
        let api = FARM
            .replace("\"web\"", "\"api\"")
            .replace("port = 80", "port = 81");
        // Alone, `api` on port 80 would overlap `web`; with `web` deleted in
        // the same change it is valid.
        let moved = vec![
            Change {
                path: "farms/web.toml".into(),
                content: None,
            },
            Change {
                path: "farms/api.toml".into(),
                content: Some(api.replace("port = 81", "port = 80").into_bytes()),
            },
        ];
        assert!(validate(t.path(), &moved[1..]).is_err());
        let c = validate(t.path(), &moved).unwrap();
        assert_eq!(c.farms.len(), 1);
        write_all(t.path(), &moved).unwrap();
        assert!(!t.path().join("farms/web.toml").exists());
        assert!(check_batch(&moved).is_ok());
        assert!(check_batch(&[moved[0].clone(), moved[0].clone()]).is_err());
        assert!(check_batch(&[]).is_err());
    }
}
