//! `tandemctl config check [DIR]`.

use std::path::Path;
use std::process::ExitCode;

use tandem_config::Config;

pub fn run(dir: &Path) -> ExitCode {
    match Config::load(dir) {
        Ok(config) => {
            println!(
                "ok: {} (node {}, {}, {} farm{})",
                dir.display(),
                config.node.name,
                if config.cluster.is_some() {
                    "clustered"
                } else {
                    "standalone"
                },
                config.farms.len(),
                if config.farms.len() == 1 { "" } else { "s" }
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors.0 {
                println!("{e}");
            }
            eprintln!(
                "{} error{} in {}",
                errors.0.len(),
                if errors.0.len() == 1 { "" } else { "s" },
                dir.display()
            );
            ExitCode::FAILURE
        }
    }
}
