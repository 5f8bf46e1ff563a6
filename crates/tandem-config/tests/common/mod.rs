//! A valid clustered configuration to break one piece at a time, written to
//! a real directory, and the errors read back as `file:line:column: message`.

#![allow(dead_code)] // each test binary uses a different part

use std::fs;
use std::path::Path;

use tandem_config::Config;

pub const NODE: &str =
    "name = \"lb1\"\ncluster_interface = \"eth1\"\ncluster_address = \"192.168.100.1\"\n";

pub const CLUSTER: &str = r#"virtual_router_id = 51
failback = "none"

[vrrp]
advert_interval_ms = 100

[[nodes]]
name = "lb1"
address = "192.168.100.1"

[[nodes]]
name = "lb2"
address = "192.168.100.2"

[[floating_ips]]
address = "10.0.0.100/24"
interface = "eth0"

[[floating_ips]]
address = "10.1.0.100/24"
interface = "eth2"
"#;

pub const WEB: &str = r#"name = "web"
vip = "10.0.0.100"
port = 80
snat_address = "10.1.0.100"

[health_check]
interval_ms = 2000
timeout_ms = 1000

[[backends]]
address = "10.1.0.11"
port = 8080

[[backends]]
address = "10.1.0.12"
port = 8080
"#;

/// Writes `files` (relative path, text) under a new temporary directory.
pub fn write(files: &[(&str, &str)]) -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tempdir");
    for (name, text) in files {
        let p = d.path().join(name);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(p, text).expect("write");
    }
    d
}

/// The valid node, cluster and web farm, with `files` added or replacing them.
pub fn dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let mut all = vec![
        ("node.toml", NODE),
        ("cluster.toml", CLUSTER),
        ("farms/web.toml", WEB),
    ];
    all.retain(|(n, _)| !files.iter().any(|(m, _)| m == n));
    all.extend_from_slice(files);
    write(&all)
}

/// "file:line:col: message" lines, with the temporary directory left out.
pub fn errors(d: &Path) -> Vec<String> {
    let errs = Config::load(d).expect_err("must be invalid");
    let prefix = format!("{}/", d.display());
    errs.iter()
        .map(|e| e.to_string().replace(&prefix, ""))
        .collect()
}

/// The single error of the base configuration changed by `files`.
pub fn one_error(files: &[(&str, &str)]) -> String {
    let d = dir(files);
    let e = errors(d.path());
    assert_eq!(e.len(), 1, "{e:#?}");
    e[0].clone()
}

/// The base web farm with `from` replaced by `to` (which must be there).
pub fn web_with(from: &str, to: &str) -> String {
    assert!(WEB.contains(from), "{from:?} not in WEB");
    WEB.replacen(from, to, 1)
}

/// The base cluster with `from` replaced by `to` (which must be there).
pub fn cluster_with(from: &str, to: &str) -> String {
    assert!(CLUSTER.contains(from), "{from:?} not in CLUSTER");
    CLUSTER.replacen(from, to, 1)
}
