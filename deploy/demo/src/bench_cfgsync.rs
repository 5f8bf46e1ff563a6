//! Benchmark: configuration replication by cfg-syncd against `rsync -a
//! --delete` over the same SSH link and keys, in the two-namespace lab of
//! tests/cfgsync_lab.rs (a real sshd on the backup). Measures the
//! change-to-visible latency of N single-file changes (from the write on the
//! master to the new content readable on the backup) and the time to bring
//! 1,000 farm files to an empty backup. With `--scale`, also cfg-syncd's
//! tested limits: 100,000 files holding 1 GiB to an empty backup (time and
//! both daemons' peak RSS), against rsync of the same tree.
//! Usage: tandem-bench-cfgsync [N] [--scale] (default 200); run by
//! deploy/bench-cfgsync.sh.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use comfy_table::{Table, presets};
use tandem_e2e::cfgsync_lab::{BACKUP_ADDR, CfgSyncLab, farm, populate_scale_tree, proc_status};

/// Writes like clustermanager and editors that replace files do: a
/// temporary name, then an atomic rename.
fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("f")
    ));
    fs::write(&tmp, text).expect("write temporary");
    fs::rename(&tmp, path).expect("rename into place");
}

fn wait_content(lab: &CfgSyncLab, path: &Path, want: &str, timeout: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if fs::read_to_string(path).is_ok_and(|t| t == want) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "{} never showed the new content\n--- master log\n{}\n--- backup log\n{}",
            path.display(),
            lab.master.log(),
            lab.backup.log()
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// The i-th version of the latency farm. Consecutive versions differ in
/// size: rsync's quick check (size and mtime, at one-second resolution
/// here) would otherwise skip a same-size change made within the same
/// second, and report it done.
fn changed(base: u16, i: usize) -> String {
    format!(
        "{}{}",
        farm("lat", base + (i % 1000) as u16),
        "#\n".repeat(i % 2)
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// `rsync -a --delete` of the master's farms/ onto the backup's, from the
/// master's namespace; returns how long it took.
fn rsync_farms(lab: &CfgSyncLab) -> Duration {
    let src = format!("{}/", lab.master.path("farms").display());
    let dst = format!("root@{BACKUP_ADDR}:{}/", lab.backup.path("farms").display());
    let ssh = lab.ssh_command();
    let start = Instant::now();
    let out = lab
        .master
        .ns
        .exec("rsync", &["-a", "--delete", "-e", &ssh, &src, &dst])
        .expect("rsync (apt-get install rsync)");
    let took = start.elapsed();
    assert!(
        out.status.success(),
        "rsync failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

/// 100000 -> "100,000".
fn thousands(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `rsync -a --delete` of the master's whole replicated tree onto the
/// backup's (node-local files excluded, as cfg-syncd does).
fn rsync_all(lab: &CfgSyncLab) -> Duration {
    let src = format!("{}/", lab.master.config.display());
    let dst = format!("root@{BACKUP_ADDR}:{}/", lab.backup.config.display());
    let ssh = lab.ssh_command();
    let start = Instant::now();
    let out = lab
        .master
        .ns
        .exec(
            "rsync",
            &[
                "-a",
                "--delete",
                "--exclude",
                "/node.toml",
                "--exclude",
                "/ssh/",
                "--exclude",
                ".*",
                "-e",
                &ssh,
                &src,
                &dst,
            ],
        )
        .expect("rsync (apt-get install rsync)");
    let took = start.elapsed();
    assert!(
        out.status.success(),
        "rsync failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

/// 100,000 files, 1 GiB: cfg-syncd's full sync (time, peak RSS of both
/// daemons) and rsync's, each to an empty backup. Returns the table rows.
fn scale() -> Vec<[String; 3]> {
    let shm = std::path::Path::new("/dev/shm");
    let parent = if shm.is_dir() {
        shm.to_owned()
    } else {
        std::env::temp_dir()
    };
    let mut lab = CfgSyncLab::with_sshd_in(&parent);
    lab.master.write("farms/web.toml", &farm("web", 80));
    let (files, bytes) = populate_scale_tree(&lab.master.config);
    lab.start_backup();
    lab.start_master();
    let start = Instant::now();
    lab.wait_for("the full sync", Duration::from_secs(1800), || {
        let (m, b) = (lab.status(&lab.master), lab.status(&lab.backup));
        !m.manifest_hash.is_empty()
            && m.manifest_hash == b.manifest_hash
            && !m.batch_in_flight
            && m.pending_changes == 0
    });
    let ours = start.elapsed();
    let rss = [&lab.master, &lab.backup].map(|n| proc_status(n.pid().expect("pid"), "VmHWM:"));
    lab.kill_master();
    lab.kill_backup();
    for dir in ["certs", "checks", "farms"] {
        fs::remove_dir_all(lab.backup.path(dir)).expect("empty the backup");
    }
    let theirs = rsync_all(&lab);
    assert!(
        lab.backup.path("checks/big/b255.bin").exists(),
        "rsync did not copy the tree"
    );
    vec![
        [
            format!(
                "full sync of {} files ({:.2} GiB) to an empty backup",
                thousands(files + 2),
                bytes as f64 / f64::from(1u32 << 30)
            ),
            format!("{:.1} s", ours.as_secs_f64()),
            format!("{:.1} s", theirs.as_secs_f64()),
        ],
        [
            "peak RSS during it, master / backup".to_owned(),
            format!("{} MB / {} MB", rss[0] / 1024, rss[1] / 1024),
            "not measured".to_owned(),
        ],
    ]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(200);
    let with_scale = args.iter().any(|a| a == "--scale");
    let lab = CfgSyncLab::running();
    lab.master.write("farms/lat.toml", &farm("lat", 2000));
    lab.wait_converged(Duration::from_secs(10));
    let master_farm = lab.master.path("farms/lat.toml");
    let backup_farm = lab.backup.path("farms/lat.toml");

    // 1. cfg-syncd: change-to-visible latency.
    let mut ours = Vec::with_capacity(n);
    for i in 0..n {
        let text = changed(2001, i);
        let start = Instant::now();
        write_atomic(&master_farm, &text);
        wait_content(&lab, &backup_farm, &text, Duration::from_secs(5));
        ours.push(start.elapsed());
        std::thread::sleep(Duration::from_millis(20));
    }
    ours.sort();

    // 2. rsync: the same changes, one rsync run per change (cfg-syncd paused).
    lab.pause();
    let rsync_n = n.min(100);
    let mut theirs = Vec::with_capacity(rsync_n);
    for i in 0..rsync_n {
        let text = changed(3001, i);
        let start = Instant::now();
        write_atomic(&master_farm, &text);
        rsync_farms(&lab);
        wait_content(&lab, &backup_farm, &text, Duration::from_secs(5));
        theirs.push(start.elapsed());
    }
    theirs.sort();

    // 3. Full sync of 1,000 farm files to a backup that has none of them.
    for i in 0..1000u16 {
        lab.master.write(
            &format!("farms/f{i:04}.toml"),
            &farm(&format!("f{i:04}"), 5000 + i),
        );
    }
    let start = Instant::now();
    lab.resume();
    lab.wait_converged(Duration::from_secs(120));
    let ours_full = start.elapsed();
    lab.pause();
    fs::remove_dir_all(lab.backup.path("farms")).expect("empty the backup's farms");
    fs::create_dir_all(lab.backup.path("farms")).expect("farms dir");
    let theirs_full = rsync_farms(&lab);
    assert!(lab.converged(), "rsync left the trees different");

    let mut t = Table::new();
    t.load_style(presets::UTF8_FULL_CONDENSED);
    t.set_header([
        "configuration replication (same lab, same SSH link and keys)",
        "cfg-syncd",
        "rsync -a --delete over ssh",
    ]);
    t.add_row([
        format!("change → visible on the backup, p50 ({n} / {rsync_n} changes)"),
        ms(percentile(&ours, 0.5)),
        ms(percentile(&theirs, 0.5)),
    ]);
    t.add_row([
        "change → visible on the backup, p99".to_owned(),
        ms(percentile(&ours, 0.99)),
        ms(percentile(&theirs, 0.99)),
    ]);
    t.add_row([
        "full sync of 1,000 farm files to an empty backup".to_owned(),
        ms(ours_full),
        ms(theirs_full),
    ]);
    if with_scale {
        drop(lab);
        for row in scale() {
            t.add_row(row);
        }
    }
    println!("{t}");
    println!(
        "cfg-syncd latency includes its 50 ms debounce; rsync latency is one whole rsync run per change (connection, handshake, file list), started right after the write."
    );
}
