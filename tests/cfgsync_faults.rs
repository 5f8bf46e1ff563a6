//! cfg-syncd under faults, on the real daemons in two namespaces with a real
//! OpenSSH sshd on the backup (tests/cfgsync_lab.rs). Each test has its
//! control: the same scenario with the mechanism switched off (a fault
//! switch of debug builds, see crates/cfg-syncd/src/fault.rs) must fail.
//! Build first: `cargo build -p cfg-syncd -p lb-forwarder -p tandemctl`.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use tandem_e2e::cfgsync_lab::{CfgSyncLab, SyncNode, replicated_tree};
use tandem_proto::v1;

// ---------------------------------------------------------------------------
// Atomic batches: SIGKILL of either side at random points of 50 bursts.

/// Farm files rewritten by every burst.
const FARMS: usize = 8;
/// Each file operation of an apply on the backup pauses this long, so that
/// a kill lands inside an apply instead of between two.
const OP_DELAY_MS: &str = "5";

fn burst_farm(i: usize, k: usize) -> String {
    let port = 20_000 + k * FARMS + i;
    format!(
        "name = \"f{i}\"\nvip = \"10.0.0.100\"\nport = {port}\nprotocol = \"tcp\"\n\
         snat_address = \"10.1.0.100\"\n\n[health_check]\nkind = \"none\"\n\n\
         [[backends]]\naddress = \"10.1.0.11\"\n"
    )
}

/// The replicated files after burst `k` (cluster.toml aside): every farm
/// rewritten, a tag rewritten, a file created (and the previous one
/// deleted), a file moved.
fn burst_tree(k: usize) -> BTreeMap<String, Vec<u8>> {
    let mut t = BTreeMap::new();
    for i in 0..FARMS {
        t.insert(format!("farms/f{i}.toml"), burst_farm(i, k).into_bytes());
    }
    t.insert("checks/tag".into(), format!("burst {k}\n").into_bytes());
    t.insert(
        format!("checks/new-{k}.sh"),
        format!("#!/bin/sh\n# created by burst {k}\n").into_bytes(),
    );
    t.insert(
        format!("checks/moved-{k}.sh"),
        b"#!/bin/sh\n# renamed by every burst\n".to_vec(),
    );
    t
}

/// A node's tree as burst numbers see it: content only, cluster.toml aside.
fn tree_of(node: &SyncNode) -> BTreeMap<String, Vec<u8>> {
    replicated_tree(&node.config)
        .into_iter()
        .filter(|(p, _)| p != "cluster.toml")
        .map(|(p, (data, _))| (p, data))
        .collect()
}

/// Which of bursts `k - 1` and `k` a tree is, if it is one of them whole.
fn burst_of(tree: &BTreeMap<String, Vec<u8>>, k: usize) -> Option<usize> {
    [k - 1, k].into_iter().find(|j| *tree == burst_tree(*j))
}

/// The burst whose farms lb-forwarder runs, if they all come from one.
fn forwarder_burst(lab: &CfgSyncLab) -> Option<usize> {
    let farms = lab.forwarder_farms();
    let port = farms.get("f0")?;
    let k = (*port as usize).checked_sub(20_000)? / FARMS;
    let want: BTreeMap<String, u32> = (0..FARMS)
        .map(|i| (format!("f{i}"), (20_000 + k * FARMS + i) as u32))
        .collect();
    (farms == want).then_some(k)
}

/// Writes burst `k` on the master: each file replaced atomically (as
/// editors and clustermanager do), the previous burst's extra files gone.
fn write_burst(node: &SyncNode, k: usize) {
    let new = burst_tree(k);
    for (p, data) in &new {
        let path = node.path(p);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let tmp = path.with_file_name(".burst.tmp");
        fs::write(&tmp, data).unwrap();
        fs::rename(&tmp, &path).unwrap();
    }
    if k > 0 {
        for p in burst_tree(k - 1).keys().filter(|p| !new.contains_key(*p)) {
            fs::remove_file(node.path(p)).unwrap();
        }
    }
}

/// Batches cfg-syncd logged on the backup: applied there, or completed at
/// start after a kill.
fn applied_batches(node: &SyncNode) -> usize {
    node.log()
        .lines()
        .filter(|l| l.contains(" applied batch ") || l.contains(" completed batch "))
        .count()
}

fn forwarder_generation(lab: &CfgSyncLab) -> u64 {
    lab.forwarder_status()
        .daemon
        .map(|d| d.config_generation)
        .unwrap_or(0)
}

#[derive(Debug, Clone, Copy)]
enum Kill {
    None,
    /// The backup's cfg-syncd, as soon as the batch starts landing.
    BackupMidApply,
    /// The master's cfg-syncd, as soon as the batch starts landing there.
    MasterMidApply,
    BackupAfter(Duration),
    MasterAfter(Duration),
}

/// A small deterministic generator (the seed is printed).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
}

fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    cond()
}

/// Runs `kills.len()` bursts, one kill schedule each, and returns every
/// broken promise seen: a live tree that is no complete batch, or daemons
/// not running the tree they have.
fn run_bursts(lab: &mut CfgSyncLab, kills: &[Kill]) -> Vec<String> {
    let mut broken = Vec::new();
    for (n, kill) in kills.iter().enumerate() {
        let k = n + 1;
        let generation = forwarder_generation(lab);
        // Each burst is one batch: written while the master is paused.
        lab.pause();
        lab.wait_for("the master to be idle", Duration::from_secs(20), || {
            !lab.status(&lab.master).batch_in_flight
        });
        write_burst(&lab.master, k);
        lab.resume();
        let landing = |lab: &CfgSyncLab| {
            let prev = burst_tree(k - 1);
            wait_until(Duration::from_secs(20), || tree_of(&lab.backup) != prev)
        };
        let (backup_killed, master_killed) = match *kill {
            Kill::None => (false, false),
            Kill::BackupMidApply => {
                assert!(landing(lab), "burst {k} never started landing");
                lab.kill_backup();
                (true, false)
            }
            Kill::MasterMidApply => {
                assert!(landing(lab), "burst {k} never started landing");
                lab.kill_master();
                (false, true)
            }
            Kill::BackupAfter(d) => {
                std::thread::sleep(d);
                lab.kill_backup();
                (true, false)
            }
            Kill::MasterAfter(d) => {
                std::thread::sleep(d);
                lab.kill_master();
                (false, true)
            }
        };
        // Whatever the live tree holds while cfg-syncd is dead, the daemons
        // run a complete batch: they reload only after one landed whole.
        match forwarder_burst(lab) {
            Some(j) if j == k - 1 || j == k => {}
            other => broken.push(format!(
                "burst {k} ({kill:?}): lb-forwarder runs {other:?}, not a whole burst"
            )),
        }
        if backup_killed {
            lab.pause();
            lab.start_backup();
            let tree = tree_of(&lab.backup);
            let j = burst_of(&tree, k);
            if j.is_none() {
                let stale: Vec<&String> = tree
                    .iter()
                    .filter(|(p, d)| burst_tree(k).get(*p) != Some(*d))
                    .map(|(p, _)| p)
                    .take(4)
                    .collect();
                broken.push(format!(
                    "burst {k} ({kill:?}): after the backup's restart its live tree is no complete batch (not burst {k}: {stale:?})"
                ));
            }
            if !wait_until(Duration::from_secs(5), || {
                j.is_some() && forwarder_burst(lab) == j
            }) {
                broken.push(format!(
                    "burst {k} ({kill:?}): the live tree is burst {j:?}, lb-forwarder runs {:?}",
                    forwarder_burst(lab)
                ));
            }
            lab.resume();
        }
        if master_killed {
            // The backup finishes (or drops) what it was given, alone.
            lab.wait_for("the backup to be idle", Duration::from_secs(20), || {
                lab.try_status(&lab.backup)
                    .is_some_and(|s| !s.batch_in_flight)
            });
            let j = burst_of(&tree_of(&lab.backup), k);
            if j.is_none() {
                broken.push(format!(
                    "burst {k} ({kill:?}): with the master dead, the backup's live tree is no complete batch"
                ));
            }
            if !wait_until(Duration::from_secs(5), || {
                j.is_some() && forwarder_burst(lab) == j
            }) {
                broken.push(format!(
                    "burst {k} ({kill:?}): with the master dead, the live tree is burst {j:?} and lb-forwarder runs {:?}",
                    forwarder_burst(lab)
                ));
            }
            lab.start_master();
        }
        lab.wait_converged(Duration::from_secs(30));
        if !wait_until(Duration::from_secs(5), || forwarder_burst(lab) == Some(k)) {
            broken.push(format!(
                "burst {k} ({kill:?}): converged, but lb-forwarder runs {:?}",
                forwarder_burst(lab)
            ));
        }
        // A burst is one batch, applied whole once whatever was killed when
        // (resent if it never committed, replayed if it did): lb-forwarder
        // reloads exactly once for it.
        std::thread::sleep(Duration::from_millis(100));
        let reloads = forwarder_generation(lab) - generation;
        if reloads != 1 {
            broken.push(format!(
                "burst {k} ({kill:?}): lb-forwarder reloaded {reloads} times for one batch"
            ));
        }
    }
    broken
}

/// The lab for the bursts: lb-forwarder on the backup, burst 0 on the
/// master, both cfg-syncd running and converged.
fn burst_lab(backup_env: &[(&str, &str)]) -> CfgSyncLab {
    let mut lab = CfgSyncLab::with_sshd();
    write_burst(&lab.master, 0);
    lab.backup.env = backup_env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    lab.start_backup_forwarder();
    lab.start_backup();
    lab.start_master();
    lab.wait_converged(Duration::from_secs(20));
    lab.wait_for("lb-forwarder on burst 0", Duration::from_secs(10), || {
        forwarder_burst(&lab) == Some(0)
    });
    lab
}

#[test]
fn fifty_bursts_with_either_side_killed_land_whole_and_reload_once_each() {
    let mut lab = burst_lab(&[("TANDEM_CFGSYNC_FAULT_APPLY_DELAY_MS", OP_DELAY_MS)]);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("kill schedule seed {seed}");
    let mut rng = Lcg(seed);
    let kills: Vec<Kill> = (0..50)
        .map(|n| {
            let d = Duration::from_millis(rng.next() % 400);
            match n % 5 {
                0 => Kill::None,
                1 => Kill::BackupMidApply,
                2 => Kill::MasterMidApply,
                3 => Kill::BackupAfter(d),
                _ => Kill::MasterAfter(d),
            }
        })
        .collect();
    let started = Instant::now();
    let broken = run_bursts(&mut lab, &kills);
    eprintln!(
        "50 bursts, 40 kills, in {:?}; {} batches applied on the backup",
        started.elapsed(),
        applied_batches(&lab.backup)
    );
    assert!(
        broken.is_empty(),
        "{} broken promises:\n{}\n--- backup log\n{}",
        broken.len(),
        broken.join("\n"),
        lab.backup.log()
    );
    // Journals replayed at start did happen (the kills landed mid-apply).
    assert!(
        lab.backup.log().contains(" completed batch "),
        "no kill landed after a commit:\n{}",
        lab.backup.log()
    );
}

#[test]
fn control_without_the_commit_journal_a_kill_leaves_half_a_batch_or_stale_daemons() {
    let mut lab = burst_lab(&[
        ("TANDEM_CFGSYNC_FAULT_APPLY_DELAY_MS", OP_DELAY_MS),
        ("TANDEM_CFGSYNC_FAULT_NONATOMIC", "1"),
    ]);
    let kills: Vec<Kill> = (0..4)
        .map(|n| {
            if n % 2 == 0 {
                Kill::BackupMidApply
            } else {
                Kill::MasterMidApply
            }
        })
        .collect();
    let broken = run_bursts(&mut lab, &kills);
    eprintln!(
        "the control broke {} promises:\n{}",
        broken.len(),
        broken.join("\n")
    );
    assert!(
        broken
            .iter()
            .any(|b| b.contains("BackupMidApply") && b.contains("no complete batch")),
        "a backup killed mid-apply must leave half a batch without the journal: {broken:?}"
    );
    assert!(
        broken.iter().any(|b| b.contains("MasterMidApply")),
        "a master killed mid-apply must leave the daemons stale without the detached apply: {broken:?}"
    );
}

// ---------------------------------------------------------------------------
// Set-id bits: owner first, then mode.

fn mode(p: &std::path::Path) -> u32 {
    fs::symlink_metadata(p)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0)
}

fn chmod(p: &std::path::Path, m: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(m)).unwrap();
}

/// Returns (batches the master pushed in the 3 s after the chmods, the
/// backup's modes of the two files, its cfg-syncd's generation change).
fn set_id_scenario(backup_env: &[(&str, &str)]) -> (u64, (u32, u32), u64, String) {
    let mut lab = CfgSyncLab::with_sshd();
    lab.backup.env = backup_env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    // Created set-gid from the start: it travels as a staged file.
    lab.master.write("checks/born-sg.sh", "#!/bin/sh\nexit 0\n");
    chmod(&lab.master.path("checks/born-sg.sh"), 0o2755);
    lab.master.write("checks/sg.sh", "#!/bin/sh\necho sg\n");
    lab.master.write("checks/su.sh", "#!/bin/sh\necho su\n");
    // Group staff (50), so that the owner really changes on the backup too.
    nix::unistd::chown(
        &lab.master.path("checks/sg.sh"),
        None,
        Some(nix::unistd::Gid::from_raw(50)),
    )
    .unwrap();
    lab.start_backup();
    lab.start_master();
    let _ = lab.wait_for("the first sync", Duration::from_secs(20), || {
        lab.backup.read("checks/su.sh").is_some()
    });
    std::thread::sleep(Duration::from_millis(500));
    let born = mode(&lab.backup.path("checks/born-sg.sh"));
    let before = lab.status(&lab.master).batches_applied;
    let generation = lab.status(&lab.backup).daemon.unwrap().config_generation;
    // The chmods of the issue, back to back: one change.
    chmod(&lab.master.path("checks/sg.sh"), 0o2755);
    chmod(&lab.master.path("checks/su.sh"), 0o4755);
    std::thread::sleep(Duration::from_secs(3));
    let pushed = lab.status(&lab.master).batches_applied - before;
    let modes = (
        mode(&lab.backup.path("checks/sg.sh")),
        mode(&lab.backup.path("checks/su.sh")),
    );
    let reloads = lab.status(&lab.backup).daemon.unwrap().config_generation - generation;
    let gid = {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(lab.backup.path("checks/sg.sh")).unwrap().gid()
    };
    (
        pushed,
        modes,
        reloads,
        format!("born-sg {born:o}, sg.sh gid {gid}\n{}", lab.master.log()),
    )
}

#[test]
fn set_id_files_replicate_with_their_bits_in_one_batch_and_no_reload() {
    let (pushed, modes, reloads, info) = set_id_scenario(&[]);
    assert_eq!(modes, (0o2755, 0o4755), "{info}");
    assert!(
        pushed <= 1,
        "{pushed} batches for two chmods: a loop\n{info}"
    );
    assert_eq!(pushed, 1, "the chmods were replicated\n{info}");
    assert_eq!(reloads, 0, "a mode-only batch reloads no daemon\n{info}");
    assert!(info.starts_with("born-sg 2755, sg.sh gid 50"), "{info}");
}

#[test]
fn control_mode_before_owner_loses_the_bits_and_loops() {
    let (pushed, modes, _, info) =
        set_id_scenario(&[("TANDEM_CFGSYNC_FAULT_MODE_BEFORE_OWNER", "1")]);
    eprintln!(
        "control: {pushed} batches in 3 s, modes {:o}/{:o}",
        modes.0, modes.1
    );
    assert_eq!(modes, (0o755, 0o755), "chown cleared the bits: {info}");
    assert!(
        pushed > 5,
        "the loop of the issue: {pushed} batches\n{info}"
    );
}

#[test]
fn set_id_bits_a_node_cannot_carry_are_refused_by_name_without_a_loop() {
    let mut lab = CfgSyncLab::with_sshd();
    // The backup's cfg-syncd without CAP_FSETID: chmod(2) then drops a
    // set-gid bit silently for a group root is not in.
    lab.backup.wrapper = ["setpriv", "--bounding-set", "-fsetid", "--"]
        .map(str::to_owned)
        .to_vec();
    lab.master.write("checks/ok.sh", "#!/bin/sh\n");
    lab.start_backup();
    lab.start_master();
    lab.wait_converged(Duration::from_secs(20));
    lab.master.write("checks/sg.sh", "#!/bin/sh\necho sg\n");
    let sg = lab.master.path("checks/sg.sh");
    nix::unistd::chown(&sg, None, Some(nix::unistd::Gid::from_raw(50))).unwrap();
    chmod(&sg, 0o2755);
    lab.master
        .write("farms/web.toml", &tandem_e2e::cfgsync_lab::farm("web", 80));
    lab.wait_for("the refusal on the master", Duration::from_secs(10), || {
        lab.status(&lab.master)
            .last_error
            .contains("checks/sg.sh: mode 2755 cannot be set on this node (it became 755)")
    });
    std::thread::sleep(Duration::from_secs(2));
    let log = lab.master.log();
    assert_eq!(
        log.matches("cannot be set on this node").count(),
        1,
        "refused once, not in a loop:\n{log}"
    );
    // The batch was refused whole.
    assert!(lab.backup.read("checks/sg.sh").is_none());
    assert!(lab.backup.read("farms/web.toml").is_none());
    // Without the set-gid bit it replicates.
    chmod(&sg, 0o755);
    lab.wait_for("the file without its bit", Duration::from_secs(10), || {
        lab.backup.read("farms/web.toml").is_some()
            && mode(&lab.backup.path("checks/sg.sh")) == 0o755
    });
    lab.wait_for("the error cleared", Duration::from_secs(5), || {
        lab.status(&lab.master).last_error.is_empty()
    });
}

// ---------------------------------------------------------------------------
// No link is ever followed.

fn sha256(data: &[u8]) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum");
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_owned()
}

/// Apply on the backup's cfg-syncd, as the master calls it (through the
/// SSH tunnel there, on its local socket here): one staged file.
fn apply_staged(
    lab: &CfgSyncLab,
    batch: &str,
    writes: Vec<v1::FileWrite>,
) -> Result<v1::ApplyReply, tonic::Status> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ch = tandem_runtime::connect(&lab.backup.runtime, "cfg-syncd")
            .await
            .unwrap();
        let req = v1::ApplyRequest {
            batch: batch.into(),
            from_node: "lb1".into(),
            writes,
            commit: true,
            ..Default::default()
        };
        v1::cfg_sync_client::CfgSyncClient::new(ch)
            .apply(tonic::codegen::tokio_stream::iter(vec![req]))
            .await
            .map(tonic::Response::into_inner)
    })
}

fn staged_write(path: &str, content: &[u8], mode: u32) -> v1::FileWrite {
    v1::FileWrite {
        path: path.into(),
        staged: true,
        sha256: sha256(content),
        size: content.len() as u64,
        mode,
        uid: 0,
        gid: 0,
    }
}

/// A file outside the configuration, which a followed link would expose:
/// returns its path.
fn secret(lab: &CfgSyncLab, content: &[u8]) -> std::path::PathBuf {
    let p = lab.ssh_dir.with_file_name("secret");
    fs::write(&p, content).unwrap();
    chmod(&p, 0o600);
    p
}

/// Returns (the Apply error, the mode of the link's target afterwards).
fn staged_link_scenario(backup_env: &[(&str, &str)]) -> (String, u32, bool) {
    let mut lab = CfgSyncLab::with_sshd();
    lab.backup.env = backup_env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    lab.start_backup();
    let content = b"root:$6$secret:19000:0:99999:7:::\n";
    let target = secret(&lab, content);
    // The staged file is a link to the secret.
    let staged = lab.backup.path(".tandem-sync/evil-1/checks");
    fs::create_dir_all(&staged).unwrap();
    std::os::unix::fs::symlink(&target, staged.join("x.sh")).unwrap();
    let r = apply_staged(
        &lab,
        "evil-1",
        vec![staged_write("checks/x.sh", content, 0o777)],
    );
    let err = match r {
        Ok(reply) => format!("applied: {reply:?}"),
        Err(s) => s.message().to_owned(),
    };
    let landed = fs::symlink_metadata(lab.backup.path("checks/x.sh")).is_ok();
    (err, mode(&target), landed)
}

#[test]
fn a_staged_link_is_refused_and_its_target_never_touched() {
    let (err, target_mode, landed) = staged_link_scenario(&[]);
    assert!(
        err.contains("checks/x.sh is (or passes through) a symbolic link"),
        "{err}"
    );
    assert_eq!(target_mode, 0o600, "the link's target was chmod'ed");
    assert!(!landed);
}

#[test]
fn control_following_the_staged_link_chmods_its_target() {
    let (err, target_mode, _) = staged_link_scenario(&[("TANDEM_CFGSYNC_FAULT_FOLLOW_LINKS", "1")]);
    eprintln!("control: {err}; target mode {target_mode:o}");
    assert_eq!(
        target_mode, 0o777,
        "the issue: Apply chmods the link's target"
    );
}

/// A batch of three staged files; while the backup checks the first (each
/// check slowed to 300 ms), the third is replaced by a link to a secret
/// with the very content announced. Returns (the Apply answer, the
/// secret's mode afterwards, what of the batch reached the live tree).
fn swapped_link_scenario(backup_env: &[(&str, &str)]) -> (String, u32, Vec<String>) {
    let mut lab = CfgSyncLab::with_sshd();
    lab.backup.env = backup_env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    lab.backup
        .env
        .push(("TANDEM_CFGSYNC_FAULT_APPLY_DELAY_MS".into(), "300".into()));
    lab.start_backup();
    let c = b"#!/bin/sh\n# the third file\n";
    let target = secret(&lab, c);
    let staged = lab.backup.path(".tandem-sync/swap-1/checks");
    fs::create_dir_all(&staged).unwrap();
    let files: [(&str, &[u8]); 3] = [
        ("a.sh", b"#!/bin/sh\n# a\n"),
        ("b.sh", b"#!/bin/sh\n# b\n"),
        ("c.sh", c),
    ];
    for (n, data) in files {
        fs::write(staged.join(n), data).unwrap();
    }
    let writes: Vec<v1::FileWrite> = files
        .iter()
        .map(|(n, d)| staged_write(&format!("checks/{n}"), d, 0o777))
        .collect();
    let staged_c = staged.join("c.sh");
    let swapper = std::thread::spawn(move || {
        // a.sh leaves the staging area once it is checked.
        let moved = wait_until(Duration::from_secs(10), || !staged.join("a.sh").exists());
        fs::remove_file(&staged_c).unwrap();
        std::os::unix::fs::symlink(&target, &staged_c).unwrap();
        moved
    });
    let r = apply_staged(&lab, "swap-1", writes);
    assert!(swapper.join().unwrap(), "the apply never started");
    let answer = match r {
        Ok(reply) => format!("applied: {reply:?}"),
        Err(s) => s.message().to_owned(),
    };
    let landed: Vec<String> = ["a.sh", "b.sh", "c.sh"]
        .into_iter()
        .filter(|n| fs::symlink_metadata(lab.backup.path(&format!("checks/{n}"))).is_ok())
        .map(str::to_owned)
        .collect();
    (answer, mode(&lab.ssh_dir.with_file_name("secret")), landed)
}

#[test]
fn a_staged_file_swapped_for_a_link_mid_apply_is_refused_whole() {
    let (answer, target_mode, landed) = swapped_link_scenario(&[]);
    assert!(
        answer.contains("checks/c.sh is (or passes through) a symbolic link"),
        "{answer}"
    );
    assert_eq!(target_mode, 0o600, "the link's target was chmod'ed");
    assert!(
        landed.is_empty(),
        "a refused batch lands nothing: {landed:?}"
    );
}

#[test]
fn control_following_links_mid_apply_chmods_the_swapped_in_target() {
    let (answer, target_mode, _) =
        swapped_link_scenario(&[("TANDEM_CFGSYNC_FAULT_FOLLOW_LINKS", "1")]);
    eprintln!("control: {answer}; target mode {target_mode:o}");
    assert_eq!(target_mode, 0o777);
}

#[test]
fn links_on_the_master_are_named_and_never_read_or_sent() {
    let mut lab = CfgSyncLab::with_sshd();
    let target = secret(&lab, b"root:secret\n");
    lab.master.write("checks/ok.sh", "#!/bin/sh\n");
    std::os::unix::fs::symlink(&target, lab.master.path("checks/passwd.sh")).unwrap();
    std::os::unix::fs::symlink(target.parent().unwrap(), lab.master.path("certs")).unwrap();
    lab.start_backup();
    lab.start_master();
    lab.wait_for(
        "checks/ok.sh on the backup",
        Duration::from_secs(20),
        || lab.backup.read("checks/ok.sh").is_some(),
    );
    lab.wait_for("the refusals in Status", Duration::from_secs(5), || {
        lab.status(&lab.master).refused.len() == 2
    });
    let refused = lab.status(&lab.master).refused;
    assert_eq!(
        refused,
        [
            "certs: a symbolic link; not replicated (links are never followed)",
            "checks/passwd.sh: a symbolic link; not replicated (links are never followed)",
        ]
    );
    assert!(fs::symlink_metadata(lab.backup.path("checks/passwd.sh")).is_err());
    assert!(fs::symlink_metadata(lab.backup.path("certs")).is_err());
    let log = lab.master.log();
    assert_eq!(log.matches("not replicating 2 files").count(), 1, "{log}");
}

// ---------------------------------------------------------------------------
// Caps: a refused file is named, and nothing else stops replicating.

#[test]
fn a_100_mb_farm_file_is_refused_by_name_and_other_changes_still_replicate() {
    let lab = CfgSyncLab::running();
    let farm = tandem_e2e::cfgsync_lab::farm("web", 80);
    lab.master.write("farms/web.toml", &farm);
    lab.wait_converged(Duration::from_secs(20));
    // The valid farm file padded to 100 MB.
    let padded = format!(
        "{farm}{}",
        "# padding padding padding padding padding padding\n".repeat(2_000_000)
    );
    assert!(padded.len() > 100_000_000);
    fs::write(lab.master.path("farms/web.toml"), &padded).unwrap();
    lab.master.write(
        "farms/other.toml",
        &tandem_e2e::cfgsync_lab::farm("other", 81),
    );
    lab.wait_for(
        "the other farm on the backup",
        Duration::from_secs(10),
        || lab.backup.read("farms/other.toml").is_some(),
    );
    lab.wait_for("the refusal in Status", Duration::from_secs(5), || {
        !lab.status(&lab.master).refused.is_empty()
    });
    let s = lab.status(&lab.master);
    assert_eq!(
        s.refused,
        [format!(
            "farms/web.toml: {} bytes, over the 4194304-byte cap ([sync] max_file_bytes); not replicated, the peer keeps its copy",
            padded.len()
        )]
    );
    assert!(s.last_error.is_empty(), "{}", s.last_error);
    // The backup keeps its copy, and runs it.
    assert_eq!(lab.backup.read("farms/web.toml"), Some(farm.clone()));
    let log = lab.master.log();
    assert_eq!(
        log.matches("not replicating 1 files: farms/web.toml")
            .count(),
        1,
        "named once in the log:\n{log}"
    );
    // Back under the cap: replicated, and the refusal is gone.
    let edited = tandem_e2e::cfgsync_lab::farm("web", 8080);
    lab.master.write("farms/web.toml", &edited);
    lab.wait_for(
        "the edited farm on the backup",
        Duration::from_secs(10),
        || lab.backup.read("farms/web.toml") == Some(edited.clone()),
    );
    lab.wait_for("no refusal", Duration::from_secs(5), || {
        lab.status(&lab.master).refused.is_empty()
    });
    assert!(
        lab.master
            .log()
            .contains("every replicated file is replicated again")
    );
}

#[test]
fn the_file_count_cap_refuses_the_excess_by_name_and_the_farms_still_replicate() {
    let mut lab = CfgSyncLab::with_sshd();
    for node in [&lab.master, &lab.backup] {
        let cluster = node.read("cluster.toml").unwrap();
        node.write(
            "cluster.toml",
            &cluster.replace("[sync]\n", "[sync]\nmax_files = 20\n"),
        );
    }
    for i in 0..25 {
        lab.master
            .write(&format!("certs/c{i:02}.pem"), &format!("cert {i}\n"));
    }
    lab.start_backup();
    lab.start_master();
    // cluster.toml and 19 certificates fit; 6 are refused, by name.
    lab.wait_for("the refusals", Duration::from_secs(20), || {
        lab.status(&lab.master).refused.len() == 6
    });
    let refused = lab.status(&lab.master).refused;
    assert_eq!(
        refused[0],
        "certs/c19.pem: beyond the 20-file cap ([sync] max_files); not replicated, the peer keeps its copy"
    );
    lab.wait_for(
        "19 certificates on the backup",
        Duration::from_secs(10),
        || (0..19).all(|i| lab.backup.read(&format!("certs/c{i:02}.pem")).is_some()),
    );
    assert!(lab.backup.read("certs/c19.pem").is_none());
    // A farm comes first under the cap: it replicates, one more certificate
    // is refused.
    lab.master
        .write("farms/web.toml", &tandem_e2e::cfgsync_lab::farm("web", 80));
    lab.wait_for("the farm on the backup", Duration::from_secs(10), || {
        lab.backup.read("farms/web.toml").is_some()
    });
    lab.wait_for("7 refusals", Duration::from_secs(5), || {
        lab.status(&lab.master).refused.len() == 7
    });
    // The peer keeps the certificate that no longer fits.
    assert!(lab.backup.read("certs/c18.pem").is_some());
}

// ---------------------------------------------------------------------------
// Partitions are honest: the loser's change is set aside at the heal.

struct Partition {
    lab: CfgSyncLab,
    mine: String,
}

/// A partition: lb1 and lb2 both become master; lb2 (which loses the
/// election at the heal) changes a farm and adds a check, lb1 changes the
/// same farm and adds one; then the heal: lb2 receives again.
fn partition_scenario(loser_env: &[(&str, &str)]) -> Partition {
    use tandem_e2e::cfgsync_lab::farm;
    let mut lab = CfgSyncLab::with_sshd();
    lab.backup.env = loser_env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    lab.master.write("farms/web.toml", &farm("web", 80));
    lab.master.write("checks/keep.sh", "#!/bin/sh\nexit 0\n");
    lab.start_backup();
    lab.start_master();
    lab.wait_converged(Duration::from_secs(20));
    // Ordinary batches set nothing aside.
    assert!(lab.status(&lab.backup).set_aside.is_empty());

    for node in [&lab.master, &lab.backup] {
        node.ns.set_link("eth0", false).unwrap();
    }
    lab.set_direction(&lab.backup, v1::SyncDirection::Push);
    let mine = farm("web", 8081);
    lab.backup.write("farms/web.toml", &mine);
    lab.backup.write(
        "checks/local.sh",
        "#!/bin/sh\n# made on lb2 during the partition\n",
    );
    lab.master.write("farms/web.toml", &farm("web", 8082));
    lab.master.write("farms/new.toml", &farm("new", 90));
    std::thread::sleep(Duration::from_millis(500));

    lab.set_direction(&lab.backup, v1::SyncDirection::Receive);
    for node in [&lab.master, &lab.backup] {
        node.ns.set_link("eth0", true).unwrap();
    }
    lab.wait_converged(Duration::from_secs(60));
    Partition { lab, mine }
}

#[test]
fn a_change_made_on_the_loser_of_a_partition_is_set_aside_at_the_heal_until_acknowledged() {
    let Partition { mut lab, mine } = partition_scenario(&[]);
    // Listed once the batch that replaced them is complete.
    lab.wait_for("the set-aside in Status", Duration::from_secs(5), || {
        !lab.status(&lab.backup).set_aside.is_empty()
    });
    let s = lab.status(&lab.backup);
    assert_eq!(s.set_aside.len(), 1, "{s:?}");
    let kept = &s.set_aside[0];
    assert!(
        kept.directory.starts_with(
            &lab.backup
                .state_dir()
                .join("set-aside/")
                .display()
                .to_string()
        ),
        "{}",
        kept.directory
    );
    // Exactly the loser's changes: not the untouched files, not the winner's.
    assert_eq!(kept.paths, ["checks/local.sh", "farms/web.toml"]);
    let dir = std::path::PathBuf::from(&kept.directory);
    assert_eq!(
        fs::read_to_string(dir.join("farms/web.toml")).unwrap(),
        mine
    );
    assert!(
        fs::read_to_string(dir.join("checks/local.sh"))
            .unwrap()
            .contains("during the partition")
    );
    let warned = |l: &&str| l.contains("WARN") && l.contains("kept 2 local changes");
    lab.wait_for("the WARN naming the files", Duration::from_secs(5), || {
        lab.backup.log().lines().any(|l| warned(&l))
    });
    let log = lab.backup.log();
    let warn = log.lines().find(warned).unwrap();
    assert!(warn.contains("checks/local.sh, farms/web.toml"), "{warn}");
    assert!(warn.contains(&kept.directory), "{warn}");
    // The master was told too.
    lab.wait_for("the master's WARN", Duration::from_secs(5), || {
        lab.master.log().contains("kept its local changes")
    });

    // Listed across a restart, until acknowledged.
    lab.kill_backup();
    lab.start_backup();
    assert_eq!(lab.status(&lab.backup).set_aside.len(), 1);

    let out = std::process::Command::new(tandem_e2e::bin("tandemctl"))
        .arg("--runtime-dir")
        .arg(&lab.backup.runtime)
        .args(["cluster", "ack"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "acknowledged 2 files set aside in {}",
            kept.directory
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains("  farms/web.toml") && stdout.contains("  checks/local.sh"),
        "{stdout}"
    );
    assert!(lab.status(&lab.backup).set_aside.is_empty());
    assert_eq!(
        fs::read_to_string(dir.join("farms/web.toml")).unwrap(),
        mine,
        "kept on disk"
    );
    lab.kill_backup();
    lab.start_backup();
    assert!(
        lab.status(&lab.backup).set_aside.is_empty(),
        "acknowledged for good"
    );
    // A second ack has nothing to do.
    let out = std::process::Command::new(tandem_e2e::bin("tandemctl"))
        .arg("--runtime-dir")
        .arg(&lab.backup.runtime)
        .args(["cluster", "ack"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing to acknowledge"));
}

#[test]
fn control_without_set_aside_the_losers_change_is_gone_at_the_heal() {
    let Partition { lab, mine } = partition_scenario(&[("TANDEM_CFGSYNC_FAULT_NO_SET_ASIDE", "1")]);
    assert!(lab.status(&lab.backup).set_aside.is_empty());
    // The change exists nowhere on the node any more: the data loss.
    let everywhere = tandem_e2e::file_tree(&lab.backup.config.with_file_name(""), |_| true);
    assert!(
        !everywhere
            .values()
            .any(|(data, _)| *data == mine.as_bytes()),
        "the control kept the change somewhere"
    );
    assert!(lab.backup.read("checks/local.sh").is_none());
}
