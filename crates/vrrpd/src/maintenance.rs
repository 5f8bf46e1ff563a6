//! The operator's maintenance, kept on disk so it survives a vrrpd restart
//! and a reboot: `<state dir>/vrrpd/maintenance` exists while maintenance
//! is on (its content says since when). Written atomically: a temporary
//! file, fsync, rename, fsync of the directory, so a crash leaves either
//! the old state or the new one.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct MaintenanceFile {
    path: PathBuf,
}

impl MaintenanceFile {
    /// The flag file under `state_dir` (default /var/lib/tandem).
    pub fn new(state_dir: &Path) -> MaintenanceFile {
        MaintenanceFile {
            path: state_dir.join("vrrpd").join("maintenance"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether maintenance was left on.
    pub fn load(&self) -> io::Result<bool> {
        self.path.try_exists()
    }

    /// Persists `on`; returns once the change is durable.
    pub fn store(&self, on: bool, unix_ms: i64) -> io::Result<()> {
        let dir = self
            .path
            .parent()
            .ok_or_else(|| io::Error::other("the maintenance file has no directory"))?;
        if on {
            fs::create_dir_all(dir)?;
            let tmp = dir.join(".maintenance.tmp");
            {
                let mut f = fs::File::create(&tmp)?;
                writeln!(
                    f,
                    "maintenance enabled by the operator at unix_ms {unix_ms}; \
                     `tandemctl node maintenance disable` ends it"
                )?;
                f.sync_all()?;
            }
            fs::rename(&tmp, &self.path)?;
        } else {
            match fs::remove_file(&self.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        fs::File::open(dir)?.sync_all()
    }
}
