//! cfg-syncd end to end: the real daemon on two namespaced nodes, a real
//! OpenSSH sshd on the backup. Build the daemon first: `cargo build -p cfg-syncd`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use tandem_e2e::cfgsync_lab::{self, CfgSyncLab, farm, replicated_tree, staged_files};

const VISIBLE: Duration = Duration::from_secs(1);

fn mode(p: &std::path::Path) -> u32 {
    fs::metadata(p)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0)
}

#[test]
fn create_modify_delete_and_rename_propagate_within_a_second() {
    let mut lab = CfgSyncLab::with_sshd();
    lab.master.write("farms/web.toml", &farm("web", 80));
    lab.master.write("checks/ftp.sh", "#!/bin/sh\nexit 0\n");
    // Control: before cfg-syncd runs, the backup has none of it.
    assert!(lab.backup.read("farms/web.toml").is_none());
    lab.start_backup();
    lab.start_master();
    // The full sync at start.
    lab.wait_converged(Duration::from_secs(10));
    let (m, b) = (&lab.master, &lab.backup);

    // Create, with a mode of its own.
    let t = Instant::now();
    m.write("checks/probe.sh", "#!/bin/sh\necho probe\n");
    fs::set_permissions(m.path("checks/probe.sh"), fs::Permissions::from_mode(0o750)).unwrap();
    lab.wait_for("a created file on the backup", VISIBLE, || {
        b.read("checks/probe.sh").as_deref() == Some("#!/bin/sh\necho probe\n")
            && mode(&b.path("checks/probe.sh")) == 0o750
    });
    eprintln!("create visible after {:?}", t.elapsed());

    // Modify.
    let t = Instant::now();
    m.write("farms/web.toml", &farm("web", 8080));
    lab.wait_for("a modified farm on the backup", VISIBLE, || {
        b.read("farms/web.toml") == Some(farm("web", 8080))
    });
    eprintln!("modify visible after {:?}", t.elapsed());

    // Rename: the content moves, the old name goes.
    let t = Instant::now();
    fs::rename(m.path("checks/probe.sh"), m.path("checks/probe-renamed.sh")).unwrap();
    lab.wait_for("a rename on the backup", VISIBLE, || {
        b.read("checks/probe.sh").is_none()
            && b.read("checks/probe-renamed.sh").as_deref() == Some("#!/bin/sh\necho probe\n")
    });
    eprintln!("rename visible after {:?}", t.elapsed());
    assert_eq!(mode(&b.path("checks/probe-renamed.sh")), 0o750);

    // Delete.
    let t = Instant::now();
    fs::remove_file(m.path("checks/ftp.sh")).unwrap();
    lab.wait_for("a deletion on the backup", VISIBLE, || {
        b.read("checks/ftp.sh").is_none()
    });
    eprintln!("delete visible after {:?}", t.elapsed());

    lab.wait_converged(VISIBLE);
    // Status answers from the last scan (it never scans itself): each node
    // publishes the hash of its tree as soon as its batch or scan is done.
    lab.wait_for("equal manifest hashes", VISIBLE, || {
        lab.status(&lab.master).manifest_hash == lab.status(&lab.backup).manifest_hash
    });
    let (sm, sb) = (lab.status(&lab.master), lab.status(&lab.backup));
    assert!(sm.peer_connected, "{sm:?}");
    assert_eq!(
        sm.peer,
        format!("{}:{}", cfgsync_lab::BACKUP_ADDR, cfgsync_lab::SSH_PORT)
    );
    assert!(!sm.manifest_hash.is_empty());
    assert_eq!(
        sm.manifest_hash, sb.manifest_hash,
        "both nodes prove equality by manifest"
    );
    assert!(sm.last_error.is_empty(), "{}", sm.last_error);
    // Unchanged content did not cross the link: the rename sent nothing.
    let log = lab.master.log();
    let rename = log
        .lines()
        .find(|l| l.contains("renamed=1"))
        .unwrap_or_else(|| panic!("no rename batch:\n{log}"));
    assert!(rename.contains("sent=0 bytes=0"), "{rename}");
    // The backup's own identity never changes.
    assert!(
        lab.backup
            .read("node.toml")
            .unwrap()
            .contains("name = \"lb2\"")
    );
}

#[test]
fn a_burst_of_1000_changes_converges_to_identical_manifests() {
    let lab = CfgSyncLab::running();
    lab.wait_converged(Duration::from_secs(10));
    let start = Instant::now();
    for i in 0..1000u16 {
        lab.master.write(
            &format!("farms/f{i:04}.toml"),
            &farm(&format!("f{i:04}"), 1000 + i),
        );
    }
    // Rewrites and deletions inside the burst.
    for i in (0..1000u16).step_by(10) {
        lab.master.write(
            &format!("farms/f{i:04}.toml"),
            &farm(&format!("f{i:04}"), 3000 + i),
        );
    }
    for i in (5..1000u16).step_by(50) {
        fs::remove_file(lab.master.path(&format!("farms/f{i:04}.toml"))).unwrap();
    }
    let took = lab.wait_converged(Duration::from_secs(60));
    eprintln!(
        "1000-change burst converged {:?} after the last write ({:?} in all)",
        took,
        start.elapsed()
    );
    assert_eq!(replicated_tree(&lab.backup.config).len(), 1 + 1000 - 20);
    // Manifests (computed by each daemon on its own tree) agree.
    lab.wait_for("equal manifest hashes", Duration::from_secs(5), || {
        lab.status(&lab.master).manifest_hash == lab.status(&lab.backup).manifest_hash
    });
}

#[test]
fn cfg_syncd_killed_mid_transfer_leaves_no_partial_file_and_the_next_start_converges() {
    let mut lab = CfgSyncLab::running();
    lab.wait_converged(Duration::from_secs(10));
    // Previous content on the backup: a kill must leave old or new, never a mix.
    let big = |i: usize, round: u8| -> Vec<u8> {
        (0..2 * 1024 * 1024)
            .map(|j: usize| (j as u8) ^ (i as u8) ^ round)
            .collect()
    };
    for i in 0..40 {
        let p = lab.master.path(&format!("certs/big{i:02}.pem"));
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, big(i, 1)).unwrap();
    }
    lab.wait_converged(Duration::from_secs(60));
    for i in 0..40 {
        fs::write(lab.master.path(&format!("certs/big{i:02}.pem")), big(i, 2)).unwrap();
    }
    lab.master
        .write("certs/new.pem", "a file the backup never had\n");
    // Kill while the batch is being staged on the backup.
    // As soon as the first file is staged: 80 MiB are still to come.
    lab.wait_for("the batch being staged", Duration::from_secs(10), || {
        staged_files(&lab.backup.config) >= 1
    });
    lab.kill_master();
    assert!(
        staged_files(&lab.backup.config) > 0,
        "the kill must land mid-transfer"
    );

    // The live tree holds, for every file, the old content or the new one.
    let tree = replicated_tree(&lab.backup.config);
    for i in 0..40 {
        let (data, _) = &tree[&format!("certs/big{i:02}.pem")];
        assert!(
            *data == big(i, 1) || *data == big(i, 2),
            "certs/big{i:02}.pem is partial ({} bytes)",
            data.len()
        );
    }
    let master_tree = replicated_tree(&lab.master.config);
    for path in tree.keys() {
        assert!(
            master_tree.contains_key(path),
            "{path} on the backup is foreign"
        );
    }
    if let Some((data, _)) = tree.get("certs/new.pem") {
        assert_eq!(data, b"a file the backup never had\n");
    }

    lab.start_master();
    lab.wait_converged(Duration::from_secs(60));
    lab.wait_for("the staging area emptied", Duration::from_secs(5), || {
        staged_files(&lab.backup.config) == 0
    });
}

#[test]
fn an_unreachable_peer_is_retried_with_backoff_and_caught_up_when_it_returns() {
    let mut lab = CfgSyncLab::running();
    lab.wait_converged(Duration::from_secs(10));
    lab.stop_sshd();
    lab.master.write("farms/late.toml", &farm("late", 81));
    lab.wait_for(
        "the master to report the lost peer",
        Duration::from_secs(15),
        || {
            let s = lab.status(&lab.master);
            !s.peer_connected && !s.last_error.is_empty()
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    // Control: nothing can reach the backup while its sshd is down.
    assert!(lab.backup.read("farms/late.toml").is_none());
    let s = lab.status(&lab.master);
    assert!(s.last_error.contains("lb2"), "{}", s.last_error);
    assert!(s.pending_changes > 0, "{s:?}");
    // One line per state change, not one per retry.
    let lost = lab.master.log().matches(" lost, retrying").count();
    assert_eq!(lost, 1, "{}", lab.master.log());

    lab.start_sshd();
    // Backoff is capped at 5 s.
    let took = lab.wait_converged(Duration::from_secs(8));
    eprintln!("caught up {took:?} after sshd returned");
    assert_eq!(lab.backup.read("farms/late.toml"), Some(farm("late", 81)));
    lab.wait_for("connected again", Duration::from_secs(2), || {
        lab.status(&lab.master).peer_connected
    });
}

#[test]
fn a_wrong_pinned_host_key_is_refused_and_nothing_is_written() {
    let mut lab = CfgSyncLab::with_sshd();
    lab.master.write("farms/web.toml", &farm("web", 80));
    let right = lab.master.read("ssh/known_hosts").unwrap();
    let other = lab.ssh_dir.join("impostor");
    let out = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&other)
        .output()
        .unwrap();
    assert!(out.status.success());
    let wrong =
        cfgsync_lab::known_hosts_line(&fs::read_to_string(other.with_extension("pub")).unwrap());
    lab.master.write("ssh/known_hosts", &wrong);
    lab.start_backup();
    lab.start_master();

    lab.wait_for("the refusal in Status", Duration::from_secs(10), || {
        lab.status(&lab.master)
            .last_error
            .contains("host key mismatch")
    });
    let s = lab.status(&lab.master);
    assert!(
        s.last_error.contains("lb2"),
        "names the peer: {}",
        s.last_error
    );
    assert_eq!(
        s.last_error.matches("SHA256:").count(),
        2,
        "both fingerprints: {}",
        s.last_error
    );
    assert!(!s.peer_connected);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        lab.backup.read("farms/web.toml").is_none(),
        "nothing written"
    );
    assert!(!lab.backup.path(".tandem-sync").exists() || staged_files(&lab.backup.config) == 0);
    assert_eq!(
        lab.master.log().matches("host key mismatch").count(),
        1,
        "logged once:\n{}",
        lab.master.log()
    );

    // Control: with the right pin the same setup syncs.
    lab.master.write("ssh/known_hosts", &right);
    lab.sync_now();
    lab.wait_converged(Duration::from_secs(8));
}

#[test]
fn an_invalid_farm_is_reported_and_not_applied_and_node_local_files_never_travel() {
    let lab = CfgSyncLab::running();
    lab.master.write("farms/web.toml", &farm("web", 80));
    lab.wait_converged(Duration::from_secs(10));
    // Each applied batch reloads once; wait until the last one has.
    lab.wait_for("the backup's reload", Duration::from_secs(5), || {
        let s = lab.status(&lab.backup);
        s.batches_applied >= 1 && s.daemon.unwrap().config_generation == 1 + s.batches_applied
    });
    let generation = lab.status(&lab.backup).daemon.unwrap().config_generation;

    let broken = farm("web", 80).replace("port = 80", "port = \"eighty\"");
    lab.master.write("farms/web.toml", &broken);
    lab.master
        .write("checks/with-the-bad-farm.sh", "#!/bin/sh\n");
    lab.wait_for(
        "the refusal reported on the master",
        Duration::from_secs(5),
        || {
            lab.status(&lab.master)
                .last_error
                .contains("farms/web.toml:3:")
        },
    );
    let s = lab.status(&lab.master);
    assert!(s.last_error.contains("refused"), "{}", s.last_error);
    // Nothing of the batch applied: the backup keeps its valid farm.
    assert_eq!(lab.backup.read("farms/web.toml"), Some(farm("web", 80)));
    assert!(lab.backup.read("checks/with-the-bad-farm.sh").is_none());
    assert_eq!(
        lab.status(&lab.backup).daemon.unwrap().config_generation,
        generation,
        "no reload for a refused batch"
    );

    // Node-local files never travel.
    lab.master.write(
        "node.toml",
        "name = \"lb1\"\ncluster_interface = \"eth0\"\ncluster_address = \"10.0.0.1\"\n# edited\n",
    );
    lab.master.write("ssh/extra", "secret");
    lab.master.write("backups/farms/web.toml", "old");
    lab.master.write("farms/.web.toml.swp", "swap");
    lab.master.write("farms/web.toml.tmp", "tmp");
    lab.master.write("keys/other.key", "not the sync key");
    lab.master
        .write("keys/sync.key", "the shared conntrack key");

    // Control: the fixed farm (and everything else pending) goes through.
    lab.master.write("farms/web.toml", &farm("web", 8080));
    lab.wait_for(
        "the fixed farm on the backup",
        Duration::from_secs(2),
        || lab.backup.read("farms/web.toml") == Some(farm("web", 8080)),
    );
    lab.wait_converged(Duration::from_secs(2));
    assert_eq!(
        lab.backup.read("keys/sync.key").as_deref(),
        Some("the shared conntrack key")
    );
    assert!(lab.backup.read("checks/with-the-bad-farm.sh").is_some());
    for local in [
        "ssh/extra",
        "backups/farms/web.toml",
        "farms/.web.toml.swp",
        "farms/web.toml.tmp",
        "keys/other.key",
    ] {
        assert!(lab.backup.read(local).is_none(), "{local} travelled");
    }
    assert!(
        lab.backup
            .read("node.toml")
            .unwrap()
            .contains("name = \"lb2\"")
    );
    // (An in-place write can be scanned half-written and refused for a
    // moment; the write's own event brings the next, valid, batch.)
    lab.wait_for("the error cleared", Duration::from_secs(2), || {
        lab.status(&lab.master).last_error.is_empty()
    });
}

#[test]
fn the_backup_reloads_after_each_applied_batch() {
    let lab = CfgSyncLab::running();
    lab.wait_converged(Duration::from_secs(10));
    // The trees start equal: wait for the session rather than a first batch.
    lab.wait_for("the master's session", Duration::from_secs(10), || {
        lab.status(&lab.master).peer_connected
    });
    let before = lab.status(&lab.backup).daemon.unwrap();
    lab.master.write("farms/web.toml", &farm("web", 80));
    lab.wait_converged(Duration::from_secs(2));
    lab.wait_for("the backup's reload", Duration::from_secs(2), || {
        lab.status(&lab.backup).daemon.unwrap().config_generation > before.config_generation
    });
    // The reloaded configuration is the replicated one.
    assert!(
        lab.backup
            .log()
            .contains("configuration reloaded and applied"),
        "{}",
        lab.backup.log()
    );
    // Control: the master itself does not reload because of its own push.
    assert_eq!(lab.status(&lab.master).daemon.unwrap().config_generation, 1);
}
