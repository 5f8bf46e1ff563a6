//! Generates the tonic/prost bindings for `proto/tandem/v1` at build time.
//! protoc comes from the `protoc-bin-vendored` crate, so a fresh machine needs
//! no system package.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "common.proto",
    "vrrpd.proto",
    "lb_forwarder.proto",
    "conntrack_sync.proto",
    "cfg_sync.proto",
    "cluster_manager.proto",
    "routed.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time: a build script binary may be reused for another
    // checkout sharing the target directory, and env!() would point there.
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files: Vec<PathBuf> = PROTOS
        .iter()
        .map(|p| root.join("tandem/v1").join(p))
        .collect();
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        // RPCs a daemon does not serve yet answer UNIMPLEMENTED instead of
        // every daemon carrying hand-written placeholders.
        .generate_default_stubs(true)
        .compile_with_config(config, &files, &[root])?;
    Ok(())
}
