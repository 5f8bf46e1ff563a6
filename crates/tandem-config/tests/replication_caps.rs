//! `[sync] max_file_bytes` and `max_files`: cfg-syncd's per-file and
//! file-count caps, with their defaults and ranges.

mod common;

use common::{CLUSTER, dir, errors};
use tandem_config::{Config, DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_FILES};

#[test]
fn the_caps_default_to_4_mib_and_100000_files() {
    let d = dir(&[]);
    let c = Config::load(d.path()).expect("valid");
    let sync = &c.cluster.expect("clustered").sync;
    assert_eq!(sync.max_file_bytes, 4 * 1024 * 1024);
    assert_eq!(sync.max_file_bytes, DEFAULT_MAX_FILE_BYTES);
    assert_eq!(sync.max_files, 100_000);
    assert_eq!(sync.max_files, DEFAULT_MAX_FILES);
}

#[test]
fn caps_in_range_are_taken() {
    let cluster = format!("{CLUSTER}\n[sync]\nmax_file_bytes = 65536\nmax_files = 20\n");
    let d = dir(&[("cluster.toml", &cluster)]);
    let sync = Config::load(d.path())
        .expect("valid")
        .cluster
        .expect("clustered")
        .sync;
    assert_eq!((sync.max_file_bytes, sync.max_files), (65536, 20));
}

#[test]
fn caps_out_of_range_are_refused_at_their_position() {
    let cluster = format!("{CLUSTER}\n[sync]\nmax_file_bytes = 10\nmax_files = 0\n");
    let d = dir(&[("cluster.toml", &cluster)]);
    assert_eq!(
        errors(d.path()),
        [
            "cluster.toml:24:18: cluster: max_file_bytes 10 is out of range (1024-1073741824)",
            "cluster.toml:25:13: cluster: max_files 0 is out of range (1-1000000)",
        ]
    );
}
