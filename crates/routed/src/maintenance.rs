//! Maintenance, kept across restarts: a node put in maintenance stays out
//! of the routers' ECMP groups until the operator takes it out, even if it
//! reboots in between. The file `<state-dir>/routed/maintenance` holds the
//! reason; its absence means "in service".

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// The file that records maintenance under `state_dir`.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("routed").join("maintenance")
}

/// The persisted reason, if the node is in maintenance. A file that cannot
/// be read counts as maintenance: announcing a node its operator took out
/// would be worse than keeping it out.
pub fn load(state_dir: &Path) -> Option<String> {
    let p = path(state_dir);
    match fs::read_to_string(&p) {
        Ok(reason) => Some(reason.trim().to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => Some(format!("{} unreadable: {e}", p.display())),
    }
}

/// Records `reason` (Some: in maintenance) or clears it, durably.
pub fn store(state_dir: &Path, reason: Option<&str>) -> std::io::Result<()> {
    let p = path(state_dir);
    match reason {
        None => match fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
        Some(reason) => {
            let dir = p.parent().unwrap_or(state_dir);
            fs::create_dir_all(dir)?;
            let tmp = dir.join(".maintenance.tmp");
            let mut f = fs::File::create(&tmp)?;
            writeln!(f, "{reason}")?;
            f.sync_all()?;
            fs::rename(&tmp, &p)?;
            fs::File::open(dir)?.sync_all()
        }
    }
}
