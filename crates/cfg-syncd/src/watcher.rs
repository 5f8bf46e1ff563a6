//! Watches the configuration directory (inotify through notify, debounced
//! and coalesced by notify-debouncer-full) and reports which replicated
//! paths changed. Node-local paths never wake the push engine.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::RecursiveMode;
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};
use tokio::sync::mpsc;

use crate::manifest::{INCLUDED_TREES, is_replicated, may_contain_replicated, rel_string};

/// Events closer together than this are delivered together. Small enough
/// that a change reaches the backup well within 200 ms.
pub const DEBOUNCE: Duration = Duration::from_millis(50);

/// What the watcher reports: the replicated paths that changed, or that a
/// full rescan is needed (the kernel queue overflowed, a watch failed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Paths(BTreeSet<String>),
    Rescan(String),
}

/// Keeps the watches alive; dropping it stops watching.
///
/// The configuration directory itself is watched non-recursively and only
/// the replicated trees recursively: the backup's staging area (renamed
/// and removed in bulk on every batch) and node-local trees cost nothing.
pub struct Watcher {
    debouncer: Debouncer<notify::RecommendedWatcher, RecommendedCache>,
    root: PathBuf,
}

impl Watcher {
    /// Starts watching a replicated tree that appeared after start.
    pub fn add_tree(&mut self, rel: &str) {
        let path = self.root.join(rel);
        if let Err(e) = self.debouncer.watch(&path, RecursiveMode::Recursive) {
            tracing::warn!(path = %path.display(), error = %e, "cannot watch a replicated directory");
        }
    }
}

/// The relevant part of one event's paths, relative to `root`: replicated
/// files, and directories that may hold them (a whole `farms/` removed or
/// moved counts as a change).
pub fn relevant(root: &Path, paths: &[PathBuf]) -> BTreeSet<String> {
    paths
        .iter()
        .filter_map(|p| p.strip_prefix(root).ok())
        .filter_map(rel_string)
        .filter(|rel| !rel.is_empty() && (is_replicated(rel) || may_contain_replicated(rel)))
        .collect()
}

/// The top-level directories that hold replicated files.
pub fn watched_trees() -> impl Iterator<Item = &'static str> {
    INCLUDED_TREES
        .iter()
        .copied()
        .chain(std::iter::once("keys"))
}

pub fn watch(config_dir: &Path, tx: mpsc::UnboundedSender<Change>) -> notify::Result<Watcher> {
    let root = config_dir.to_owned();
    let mut debouncer = new_debouncer(DEBOUNCE, None, move |res: DebounceEventResult| match res {
        Ok(events) => {
            let mut changed = BTreeSet::new();
            for ev in &events {
                if ev.event.need_rescan() {
                    let _ = tx.send(Change::Rescan("the kernel dropped file events".into()));
                }
                changed.extend(relevant(&root, &ev.event.paths));
            }
            if !changed.is_empty() {
                let _ = tx.send(Change::Paths(changed));
            }
        }
        Err(errors) => {
            let why = errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ");
            let _ = tx.send(Change::Rescan(why));
        }
    })?;
    debouncer.watch(config_dir, RecursiveMode::NonRecursive)?;
    let mut w = Watcher {
        debouncer,
        root: config_dir.to_owned(),
    };
    for tree in watched_trees() {
        if config_dir.join(tree).is_dir() {
            w.add_tree(tree);
        }
    }
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_replicated_paths_are_relevant() {
        let root = Path::new("/etc/tandem");
        let got = relevant(
            root,
            &[
                root.join("farms/web.toml"),
                root.join("farms/.web.toml.swp"),
                root.join("node.toml"),
                root.join("ssh/known_hosts"),
                root.join(".tandem-sync/b1/farms/web.toml"),
                root.join("farms"),
                PathBuf::from("/elsewhere/farms/x.toml"),
            ],
        );
        let got: Vec<_> = got.iter().map(String::as_str).collect();
        assert_eq!(got, ["farms", "farms/web.toml"]);
    }

    #[tokio::test]
    async fn a_burst_of_writes_arrives_coalesced() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("farms")).unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut _w = watch(tmp.path(), tx).unwrap();
        for i in 0..50 {
            std::fs::write(tmp.path().join(format!("farms/f{i}.toml")), "x").unwrap();
            std::fs::write(tmp.path().join("node.toml"), "name = \"x\"").unwrap();
        }
        let mut seen = BTreeSet::new();
        let mut deliveries = 0;
        while seen.len() < 50 {
            let c = tokio::time::timeout(Duration::from_secs(2), rx.recv())
                .await
                .expect("changes within 2 s")
                .expect("watcher alive");
            if let Change::Paths(p) = c {
                deliveries += 1;
                seen.extend(p);
            }
        }
        assert!(!seen.contains("node.toml"));
        let _ = &mut _w;
        assert!(
            deliveries < 50,
            "{deliveries} deliveries for 50 writes: not coalesced"
        );
    }
}
