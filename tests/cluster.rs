//! The cluster lifecycle on two full nodes (tests/cluster_lab.rs):
//! `tandemctl cluster create` and `destroy`, and the creation failures that
//! must change nothing on either node.

use std::time::Duration;

use tandem_e2e::cluster_lab::{ClusterLifecycleLab, ROOT_PASSWORD, SNAT, VIP, diff, text};
use tandem_proto::v1;
use tandem_proto::v1::cluster_manager_client::ClusterManagerClient;

/// The replicated part of a config dir, as docs/cfg-syncd.md lists it.
fn replicated(dir: &std::path::Path) -> std::collections::BTreeMap<String, (Vec<u8>, u32)> {
    tandem_e2e::cfgsync_lab::replicated_tree(dir)
}

#[test]
fn create_makes_lb1_master_and_lb2_backup_with_lb1s_configuration() {
    let lab = ClusterLifecycleLab::new();
    // Control: before, the trees differ and both nodes are standalone.
    assert_ne!(replicated(&lab.lb1.config), replicated(&lab.lb2.config));
    assert_eq!(lab.vrrp_state("lb1"), v1::VrrpState::Standalone);
    assert_eq!(
        lab.ask_vip().as_deref().map(|b| b.starts_with('b')),
        Some(true)
    );

    let out = lab.create(ROOT_PASSWORD);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "create failed: {stdout}\n{}\n{}\n{}",
        text(&out.stderr),
        lab.lb1.logs(),
        lab.lb2.logs()
    );
    eprintln!("{stdout}");
    assert!(stdout.contains("lb1 is master, lb2 is backup"), "{stdout}");
    assert!(
        stdout.contains("farms/old.toml"),
        "the erase list: {stdout}"
    );

    // Roles.
    assert_eq!(lab.vrrp_state("lb1"), v1::VrrpState::Master);
    assert_eq!(lab.vrrp_state("lb2"), v1::VrrpState::Backup);
    assert!(lab.lb1.holds("eth0", VIP) && lab.lb1.holds("eth1", SNAT));
    assert!(!lab.lb2.holds("eth0", VIP));

    // Identical replicated trees, and equal cfg-syncd manifests.
    assert_eq!(replicated(&lab.lb1.config), replicated(&lab.lb2.config));
    lab.wait_for(
        "cfg-syncd push/receive with equal manifests",
        Duration::from_secs(15),
        |l| {
            let (a, b) = (l.cfgsync_status("lb1"), l.cfgsync_status("lb2"));
            a.direction() == v1::SyncDirection::Push
                && b.direction() == v1::SyncDirection::Receive
                && a.peer_connected
                && !a.manifest_hash.is_empty()
                && a.manifest_hash == b.manifest_hash
        },
    );
    lab.wait_for(
        "conntrack-syncd sender/receiver",
        Duration::from_secs(15),
        |l| {
            let (a, b) = (l.conntrack_status("lb1"), l.conntrack_status("lb2"));
            a.role() == v1::SyncRole::Sender && b.role() == v1::SyncRole::Receiver && a.peer_alive
        },
    );

    // What creation wrote.
    let cluster = lab.lb2.read("cluster.toml").expect("cluster.toml on lb2");
    // The default VRID, derived from the two cluster addresses (never 51,
    // keepalived's sample value): 1 + (sum of their bytes) mod 255.
    assert!(cluster.contains("virtual_router_id = 159"), "{cluster}");
    assert!(
        cluster.contains("address = \"10.0.0.100/24\"\ninterface = \"eth0\""),
        "{cluster}"
    );
    assert!(
        cluster.contains("address = \"10.1.0.100/24\"\ninterface = \"eth1\""),
        "{cluster}"
    );
    for n in [&lab.lb1, &lab.lb2] {
        let node = n.read("node.toml").unwrap();
        assert!(node.contains("cluster_interface = \"eth2\""), "{node}");
        assert!(
            node.contains(&format!("cluster_address = \"{}\"", n.addr)),
            "{node}"
        );
        assert!(
            node.starts_with(&format!("# {}", n.name)),
            "comments kept: {node}"
        );
        let mode = std::fs::metadata(n.path("ssh/id_ed25519")).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
        let public = n.read("ssh/id_ed25519.pub").unwrap();
        let key = public.split_whitespace().nth(1).unwrap().to_owned();
        for m in [&lab.lb1, &lab.lb2] {
            let ak = std::fs::read_to_string(m.authorized_keys()).unwrap();
            assert!(
                ak.contains(&key),
                "{}'s authorized_keys has the cluster key",
                m.name
            );
        }
    }
    assert_eq!(
        lab.lb1.read("ssh/id_ed25519"),
        lab.lb2.read("ssh/id_ed25519")
    );
    let pin = lab.lb1.read("ssh/known_hosts").unwrap();
    let host2 = std::fs::read_to_string(lab.lb2.dir.join("sshd/host_ed25519.pub")).unwrap();
    assert!(
        pin.contains(host2.split_whitespace().nth(1).unwrap()),
        "lb1 pins lb2: {pin}"
    );
    let pin = lab.lb2.read("ssh/known_hosts").unwrap();
    let host1 = std::fs::read_to_string(lab.lb1.dir.join("sshd/host_ed25519.pub")).unwrap();
    assert!(
        pin.contains(host1.split_whitespace().nth(1).unwrap()),
        "lb2 pins lb1: {pin}"
    );
    let key = lab.lb2.read("keys/sync.key").unwrap();
    assert_eq!(key.trim().len(), 64, "{key}");
    // lb2's previous files: gone from the live tree, kept in backups/, and
    // node-local ones untouched.
    assert!(lab.lb2.read("farms/old.toml").is_none());
    assert_eq!(
        lab.lb2.read("notes.txt").as_deref(),
        Some("node-local, never replicated\n")
    );
    let backups = std::fs::read_dir(lab.lb2.path("backups")).unwrap().count();
    assert_eq!(backups, 1);

    // clustermanager runs as under a unit that forbids mlock (the lab drops
    // CAP_IPC_LOCK, RLIMIT_MEMLOCK 0): it noticed, at debug level, and
    // neither it nor russh logged a warning about it.
    let cm = lab.lb1.log("clustermanager");
    assert!(
        cm.contains("memory locking is not permitted here"),
        "mlock was refused in this lab: {cm}"
    );
    assert!(
        !cm.contains("Security warning") && !cm.contains("lock/unlock memory"),
        "{cm}"
    );

    // The farm still answers, and a change on the master reaches the backup.
    assert!(lab.ask_vip().is_some(), "the VIP answers after creation");
    lab.lb1.write("checks/new.sh", "#!/bin/sh\nexit 0\n");
    lab.wait_for(
        "cfg-syncd to carry a new file",
        Duration::from_secs(10),
        |l| l.lb2.read("checks/new.sh").is_some(),
    );
}

#[test]
fn destroy_leaves_two_standalone_nodes_and_the_master_keeps_the_vips() {
    let lab = ClusterLifecycleLab::new();
    let out = lab.create(ROOT_PASSWORD);
    assert!(
        out.status.success(),
        "create: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let cluster_key = lab.lb1.read("ssh/id_ed25519.pub").unwrap();
    let cluster_key = cluster_key.split_whitespace().nth(1).unwrap().to_owned();
    // Control: clustered, lb1 master holding the VIPs.
    assert_eq!(lab.vrrp_state("lb1"), v1::VrrpState::Master);

    let out = lab.tandemctl("lb1", &["cluster", "destroy", "--yes"], "");
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "destroy failed: {stdout}{}\n{}\n{}",
        text(&out.stderr),
        lab.lb1.logs(),
        lab.lb2.logs()
    );
    assert!(
        stdout.contains("lb1 and lb2 are standalone again; lb1 keeps the floating IPs"),
        "{stdout}"
    );
    for n in [&lab.lb1, &lab.lb2] {
        for rel in ["cluster.toml", "keys/sync.key", "ssh"] {
            assert!(!n.path(rel).exists(), "{} still has {rel}", n.name);
        }
        let ak = std::fs::read_to_string(n.authorized_keys()).unwrap_or_default();
        assert!(
            !ak.contains(&cluster_key),
            "{}'s authorized_keys still has the cluster key",
            n.name
        );
        // The farms stay.
        assert!(
            n.read("farms/web.toml").is_some(),
            "{} lost its farm",
            n.name
        );
    }
    lab.wait_for("both vrrpd standalone", Duration::from_secs(10), |l| {
        l.vrrp_state("lb1") == v1::VrrpState::Standalone
            && l.vrrp_state("lb2") == v1::VrrpState::Standalone
    });
    // A standalone vrrpd holds no VIP: lb1 keeps them as plain addresses.
    assert!(lab.lb1.holds("eth0", VIP) && lab.lb1.holds("eth1", SNAT));
    assert!(!lab.lb2.holds("eth0", VIP) && !lab.lb2.holds("eth1", SNAT));
    assert!(lab.ask_vip().is_some(), "lb1 still serves the farm");
    lab.wait_for("cfg-syncd idle on both", Duration::from_secs(10), |l| {
        l.cfgsync_status("lb1").direction() == v1::SyncDirection::None
            && l.cfgsync_status("lb2").direction() == v1::SyncDirection::None
    });
    // Both green at once: an error left by the replication that ended (a
    // push the peer refused) does not make a standalone node red.
    lab.wait_for(
        "both nodes green and standalone",
        Duration::from_secs(3),
        |l| {
            ["lb1", "lb2"].iter().all(|n| {
                let out = l.tandemctl(n, &["status"], "");
                text(&out.stdout).starts_with(&format!("{n}: ● green operational, standalone"))
            })
        },
    );
    // Standalone: a second destroy has nothing to do.
    let again = lab.tandemctl("lb1", &["cluster", "destroy", "--yes"], "");
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("lb1 is standalone"),
        "{}",
        text(&again.stderr)
    );
}

#[test]
fn destroy_with_the_peer_unreachable_makes_this_node_standalone_and_says_so() {
    let lab = ClusterLifecycleLab::new();
    let out = lab.create(ROOT_PASSWORD);
    assert!(
        out.status.success(),
        "create: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    // The cluster link goes down on lb2's side: neither a new SSH session
    // nor cfg-syncd's open one reaches it.
    lab.lb2.ns.set_link("eth2", false).unwrap();
    let lb2_before = tandem_e2e::cluster_lab::tree(&lab.lb2.config);

    let out = lab.tandemctl("lb1", &["cluster", "destroy", "--yes"], "");
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "destroy: {stdout}{}",
        text(&out.stderr)
    );
    assert!(
        stdout.contains("lb1 is standalone again and keeps the floating IPs; the peer lb2 was NOT changed (cannot reach lb2 (192.168.100.2:22)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("run `tandemctl cluster destroy` on it too"),
        "{stdout}"
    );
    for rel in ["cluster.toml", "keys/sync.key", "ssh"] {
        assert!(!lab.lb1.path(rel).exists(), "lb1 still has {rel}");
    }
    lab.wait_for("lb1's vrrpd standalone", Duration::from_secs(10), |l| {
        l.vrrp_state("lb1") == v1::VrrpState::Standalone
    });
    assert!(lab.lb1.holds("eth0", VIP));
    // Control: the peer, unreachable, kept everything.
    assert_eq!(tandem_e2e::cluster_lab::tree(&lab.lb2.config), lb2_before);
    assert!(lab.lb2.path("cluster.toml").exists());
}

/// Runs a creation that must fail with `expected` and change nothing; then
/// the control: `fix` undoes the cause and a preflight-only call passes.
fn refused_and_nothing_changed(
    lab: &mut ClusterLifecycleLab,
    password: &str,
    expected: &[&str],
    fix: impl FnOnce(&mut ClusterLifecycleLab),
) {
    let before = lab.snapshot();
    let out = lab.create(password);
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success(),
        "creation must fail: {}{stderr}",
        text(&out.stdout)
    );
    for e in expected {
        assert!(stderr.contains(e), "the error names `{e}`: {stderr}");
    }
    assert!(
        !stderr.contains(ROOT_PASSWORD),
        "the password is never echoed"
    );
    let after = lab.snapshot();
    assert!(before == after, "changed: {:?}", diff(&before, &after));
    assert_eq!(lab.vrrp_state("lb1"), v1::VrrpState::Standalone);
    assert_eq!(lab.vrrp_state("lb2"), v1::VrrpState::Standalone);
    for n in [&lab.lb1, &lab.lb2] {
        for d in ["clustermanager", "cfg-syncd"] {
            assert!(
                !n.log(d).contains(ROOT_PASSWORD),
                "{} {d} logged the password",
                n.name
            );
        }
    }

    // Control: with the cause removed, the same request passes preflight
    // (and, unconfirmed, still changes nothing).
    fix(lab);
    let steps = lab.preflight_only(ROOT_PASSWORD);
    let last = steps.last().expect("a result");
    assert!(
        last.ok && last.needs_confirmation,
        "preflight passes once fixed: {steps:?}"
    );
    assert!(
        last.would_erase.iter().any(|f| f == "farms/old.toml"),
        "{last:?}"
    );
}

#[test]
fn a_wrong_password_is_refused_with_a_clear_message_and_changes_nothing() {
    let mut lab = ClusterLifecycleLab::new();
    refused_and_nothing_changed(
        &mut lab,
        "not-the-password",
        &["the peer 192.168.100.2 refused the root password"],
        |_| {},
    );
}

#[test]
fn an_unreachable_peer_is_reported_and_nothing_changes() {
    let mut lab = ClusterLifecycleLab::new();
    lab.stop_sshd("lb2");
    refused_and_nothing_changed(
        &mut lab,
        ROOT_PASSWORD,
        &["cannot reach 192.168.100.2:22"],
        |l| l.start_sshd("lb2"),
    );
}

#[test]
fn a_node_name_clash_is_refused_and_nothing_changes() {
    let mut lab = ClusterLifecycleLab::new();
    let original = lab.lb2.read("node.toml").unwrap();
    lab.lb2.write("node.toml", "name = \"lb1\"\n");
    refused_and_nothing_changed(
        &mut lab,
        ROOT_PASSWORD,
        &["both nodes are named `lb1`", "nothing was changed"],
        |l| l.lb2.write("node.toml", &original),
    );
}

#[test]
fn a_nic_name_mismatch_is_refused_and_nothing_changes() {
    let mut lab = ClusterLifecycleLab::new();
    let rename = |l: &ClusterLifecycleLab, from: &str, to: &str| {
        l.lb2.ns.ip(&["link", "set", "dev", from, "down"]).unwrap();
        l.lb2
            .ns
            .ip(&["link", "set", "dev", from, "name", to])
            .unwrap();
        l.lb2.ns.ip(&["link", "set", "dev", to, "up"]).unwrap();
    };
    rename(&lab, "eth1", "eth5");
    refused_and_nothing_changed(
        &mut lab,
        ROOT_PASSWORD,
        &[
            "NIC names differ",
            "only on lb1: [eth1]; only on lb2: [eth5]",
        ],
        |l| rename(l, "eth5", "eth1"),
    );
}

/// The key lb1's clustermanager shows the operator (PeerHostKey).
fn shown_host_key(lab: &ClusterLifecycleLab) -> String {
    let remote = lab.lb2.addr.clone();
    tandem_e2e::rpc(&lab.lb1.runtime, "clustermanager", async move |ch| {
        ClusterManagerClient::new(ch)
            .peer_host_key(v1::PeerHostKeyRequest { remote_ip: remote })
            .await
            .expect("PeerHostKey")
            .into_inner()
            .fingerprint
    })
}

/// Trust before secrets: the root password goes only to the host key the
/// operator confirmed. After a preflight with lb2's real key, an impostor
/// takes lb2's address with another key; the confirmed run is refused
/// before any password is sent, naming both fingerprints, and the
/// impostor's sshd logs no password attempt. Control: the same impostor,
/// confirmed, logs the password attempt — its log would have shown one.
#[test]
fn a_host_key_swapped_after_preflight_is_refused_before_the_password_is_sent() {
    let mut lab = ClusterLifecycleLab::new();
    let real = lab.host_key_fingerprint("lb2");
    assert_eq!(
        shown_host_key(&lab),
        real,
        "the operator is shown lb2's own key"
    );
    let before = lab.snapshot();
    let steps = lab.create_rpc(ROOT_PASSWORD, &real, false);
    let last = steps.last().expect("a result");
    assert!(last.ok && last.needs_confirmation, "{steps:?}");
    assert!(
        lab.sshd_log("lb2", false)
            .contains("Accepted password for root"),
        "preflight logged in to the real lb2"
    );

    let impostor = lab.start_impostor_sshd("lb2");
    assert_ne!(impostor, real);
    let out = lab.create(ROOT_PASSWORD);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{}{stderr}", text(&out.stdout));
    assert!(
        stderr.contains(&format!(
            "presented the host key ssh-ed25519 {impostor}, not the confirmed {real}"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("nothing was sent to it"), "{stderr}");
    let log = lab.sshd_log("lb2", true);
    assert!(
        log.contains(&format!("Connection from {}", lab.lb1.addr)),
        "the impostor was contacted:\n{log}"
    );
    assert!(
        !log.contains("password"),
        "the impostor saw a password attempt:\n{log}"
    );
    let after = lab.snapshot();
    assert!(before == after, "changed: {:?}", diff(&before, &after));

    // Control: confirmed, the impostor does get the password, and logs it.
    let steps = lab.create_rpc(ROOT_PASSWORD, &impostor, false);
    assert!(steps.last().is_some_and(|p| p.ok), "{steps:?}");
    assert!(
        lab.sshd_log("lb2", true)
            .contains("Accepted password for root"),
        "{}",
        lab.sshd_log("lb2", true)
    );
}

/// Without a confirmed key (a script with --yes but no --host-key, and no
/// terminal), creation stops before the password is even read, naming the
/// key the peer presents and how to confirm it. On a terminal, the key is
/// shown and asked about before the password; "n" cancels. The peer's sshd
/// saw no login. Control: with the key confirmed, it does.
#[test]
fn an_unconfirmed_host_key_stops_creation_before_the_password_is_sent() {
    let lab = ClusterLifecycleLab::new();
    let real = lab.host_key_fingerprint("lb2");
    let before = lab.snapshot();
    let out = lab.create_with(ROOT_PASSWORD, &[]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}{stderr}", text(&out.stdout));
    for part in [
        format!(
            "the peer's host key was not confirmed: {}:22 presents ssh-ed25519 {real}",
            lab.lb2.addr
        ),
        format!("run again with --host-key {real}"),
        "nothing was sent to the peer".to_owned(),
    ] {
        assert!(stderr.contains(&part), "`{part}` in:\n{stderr}");
    }

    let out = lab.tandemctl_on_terminal(
        "lb1",
        &[
            "cluster",
            "create",
            "--local-ip",
            &lab.lb1.addr,
            "--remote-ip",
            &lab.lb2.addr,
            "--yes",
        ],
        "n\n",
    );
    let screen = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(2), "{screen}");
    assert!(screen.contains(&format!("ssh-ed25519 {real}")), "{screen}");
    assert!(screen.contains("Is this the peer's host key?"), "{screen}");
    assert!(
        !screen.contains("root password of"),
        "the password was asked before the key was confirmed:\n{screen}"
    );
    assert!(
        !lab.sshd_log("lb2", false).contains("password"),
        "{}",
        lab.sshd_log("lb2", false)
    );
    let after = lab.snapshot();
    assert!(before == after, "changed: {:?}", diff(&before, &after));

    // Control: the key confirmed, the password reaches lb2.
    let steps = lab.preflight_only(ROOT_PASSWORD);
    assert!(steps.last().is_some_and(|p| p.ok), "{steps:?}");
    assert!(
        lab.sshd_log("lb2", false)
            .contains("Accepted password for root")
    );
}

#[test]
fn a_peer_sshd_that_would_not_read_the_cluster_key_is_refused_and_nothing_changes() {
    let mut lab = ClusterLifecycleLab::new();
    let config = lab.lb2.dir.join("sshd/sshd_config");
    let original = std::fs::read_to_string(&config).unwrap();
    let ak = lab.lb2.authorized_keys().display().to_string();
    // A stock sshd: root's own authorized_keys only (no Tandem drop-in).
    std::fs::write(
        &config,
        original.replace(
            &format!("AuthorizedKeysFile {ak}"),
            "AuthorizedKeysFile .ssh/authorized_keys",
        ),
    )
    .unwrap();
    refused_and_nothing_changed(
        &mut lab,
        ROOT_PASSWORD,
        &[
            &format!(
                "lb2's sshd does not read {ak} (its AuthorizedKeysFile is `.ssh/authorized_keys`)"
            ),
            "sshd_config.d/tandem.conf",
            "nothing was changed",
        ],
        |_| std::fs::write(&config, &original).unwrap(),
    );
}

/// A creation that fails after its first write is rolled back on both
/// nodes: first in [keys] (the peer cannot take the cluster identity: its
/// `ssh` is a file), then in [start] (the peer's start command fails, after
/// every file was written and both nodes' daemons took the cluster
/// configuration). Each time both config trees and authorized_keys are
/// exactly as before, both vrrpd are standalone again and lb1 serves the
/// VIP as before. Control: with the cause removed, the same creation
/// succeeds.
#[test]
fn a_creation_failing_after_its_first_write_is_rolled_back_on_both_nodes() {
    let marker = tempfile::NamedTempFile::new().unwrap();
    let marker_path = marker.path().display().to_string();
    let lab = ClusterLifecycleLab::with_peer_start_command(&format!(
        "test ! -e {marker_path} || {{ echo lab: start refused >&2; exit 3; }}"
    ));
    let before = lab.snapshot();

    // [keys]: lb2's config dir has a file where the cluster's ssh/ goes.
    lab.lb2.write("ssh", "not a directory\n");
    let before_keys = lab.snapshot();
    let out = lab.create(ROOT_PASSWORD);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{}{stderr}", text(&out.stdout));
    assert!(stderr.contains("[keys] FAILED"), "{stderr}");
    assert!(
        stderr
            .contains("rolled back: lb1 and lb2 have their configuration from before the creation"),
        "{stderr}"
    );
    let after = lab.snapshot();
    assert!(
        before_keys == after,
        "changed: {:?}",
        diff(&before_keys, &after)
    );
    assert_eq!(lab.vrrp_state("lb1"), v1::VrrpState::Standalone);
    std::fs::remove_file(lab.lb2.path("ssh")).unwrap();
    assert!(lab.snapshot() == before);

    // [start]: everything is written and both nodes reloaded, then the
    // peer's start command fails.
    let out = lab.create(ROOT_PASSWORD);
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("[sync]"),
        "the run got past its writes: {stdout}"
    );
    assert!(stdout.contains("lb2 reloaded"), "{stdout}");
    assert!(stderr.contains("[start] FAILED"), "{stderr}");
    assert!(stderr.contains("lab: start refused"), "{stderr}");
    assert!(
        stderr
            .contains("rolled back: lb1 and lb2 have their configuration from before the creation"),
        "{stderr}"
    );
    let after = lab.snapshot();
    assert!(before == after, "changed: {:?}", diff(&before, &after));
    lab.wait_for("both vrrpd standalone", Duration::from_secs(10), |l| {
        l.vrrp_state("lb1") == v1::VrrpState::Standalone
            && l.vrrp_state("lb2") == v1::VrrpState::Standalone
    });
    assert!(lab.lb1.holds("eth0", VIP) && lab.lb1.holds("eth1", SNAT));
    assert!(!lab.lb2.holds("eth0", VIP));
    assert!(lab.ask_vip().is_some(), "lb1 serves as before");
    // Nothing of the run is left in either node's temporary files.
    let undo_left: Vec<_> = std::fs::read_dir("/tmp")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("tandem-create-undo.")
        })
        .filter(|e| tar_mentions(&e.path().join("undo.tar"), &lab.lb1.config))
        .map(|e| e.path())
        .collect();
    assert!(undo_left.is_empty(), "{undo_left:?}");

    // Control: the cause removed, the same creation succeeds.
    std::fs::remove_file(marker.path()).unwrap();
    let out = lab.create(ROOT_PASSWORD);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_eq!(lab.vrrp_state("lb1"), v1::VrrpState::Master);
}

/// Whether a tar archive holds files of `dir`.
fn tar_mentions(archive: &std::path::Path, dir: &std::path::Path) -> bool {
    std::process::Command::new("tar")
        .arg("--list")
        .arg("--absolute-names")
        .arg("--file")
        .arg(archive)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(&dir.display().to_string()))
        .unwrap_or(false)
}

/// A VRID another router advertises on the cluster link is refused before
/// anything changes, naming the source: a neighbouring keepalived (VRRPv2,
/// password authentication) on the pair's default VRID 159, then on a VRID
/// chosen with --vrid. Control: a VRID nobody advertises passes while the
/// neighbour still runs, and without the neighbour the default passes.
#[test]
fn a_vrid_in_use_on_the_cluster_link_is_refused_naming_the_source() {
    let mut lab = ClusterLifecycleLab::new();
    lab.start_keepalived(159);
    let before = lab.snapshot();
    let out = lab.create(ROOT_PASSWORD);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{}{stderr}", text(&out.stdout));
    for part in [
        "virtual router id 159 (the default) is in use on the cluster link: 192.168.100.9 advertises it (VRRPv2, priority 254,",
        "choose another with --vrid (free: 160)",
        "nothing was changed",
    ] {
        assert!(stderr.contains(part), "`{part}` in:\n{stderr}");
    }
    let fp = lab.host_key_fingerprint("lb2");
    let steps = lab.create_rpc_vrid(ROOT_PASSWORD, &fp, false, 159);
    let last = steps.last().expect("a result");
    assert!(!last.ok, "{steps:?}");
    assert!(
        last.message
            .contains("virtual router id 159 is in use on the cluster link: 192.168.100.9"),
        "{}",
        last.message
    );
    let after = lab.snapshot();
    assert!(before == after, "changed: {:?}", diff(&before, &after));

    // Control: a free VRID passes, and the neighbour shows in the summary.
    let steps = lab.create_rpc_vrid(ROOT_PASSWORD, &fp, false, 160);
    let last = steps.last().expect("a result");
    assert!(last.ok && last.needs_confirmation, "{steps:?}");
    assert!(
        steps.iter().any(|p| p.step == "preflight"
            && p.message.contains("virtual router id 160 free (other VRRP routers on the link: VRID 159 from 192.168.100.9)")),
        "{steps:?}"
    );
    lab.stop_keepalived();
    let steps = lab.preflight_only(ROOT_PASSWORD);
    assert!(
        steps.last().is_some_and(|p| p.ok && p.needs_confirmation),
        "{steps:?}"
    );
}

/// Every log line of both nodes' daemons, counted per file.
fn log_lines(lab: &ClusterLifecycleLab) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    for n in [&lab.lb1, &lab.lb2] {
        for d in tandem_e2e::cluster_lab::NODE_DAEMONS {
            out.push((format!("{} {d}", n.name), n.log(d).lines().count()));
        }
    }
    out
}

/// `tandemctl status` on a node: its first line and exit status.
fn status(lab: &ClusterLifecycleLab, node: &str) -> (String, Option<i32>) {
    let out = lab.tandemctl(node, &["status"], "");
    let first = text(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    (first, out.status.code())
}

/// A healthy standalone node is green in `tandemctl status` (exit 0) and
/// quiet: over 10 s idle, no daemon of either node logs a line. Maintenance
/// there says there is no peer and fails. Red makes `tandemctl status` exit
/// 4 (a farm file lb-forwarder refuses); fixed, it is green and 0 again.
#[test]
fn a_standalone_node_is_green_and_quiet_and_has_no_maintenance() {
    let lab = ClusterLifecycleLab::new();
    lab.wait_for("lb1 green and standalone", Duration::from_secs(20), |l| {
        status(l, "lb1") == ("lb1: ● green operational, standalone".to_owned(), Some(0))
    });
    // Whatever the daemons say while starting has been said.
    std::thread::sleep(Duration::from_secs(2));
    let before = log_lines(&lab);
    std::thread::sleep(Duration::from_secs(10));
    let after = log_lines(&lab);
    let grew: Vec<String> = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| a.1 != b.1)
        .map(|(b, a)| format!("{}: {} new line(s)", b.0, a.1 - b.1))
        .collect();
    assert!(
        grew.is_empty(),
        "idle standalone nodes logged: {grew:?}\n{}\n{}",
        lab.lb1.logs(),
        lab.lb2.logs()
    );
    assert_eq!(
        status(&lab, "lb1"),
        ("lb1: ● green operational, standalone".to_owned(), Some(0))
    );

    let out = lab.tandemctl("lb1", &["node", "maintenance", "enable"], "");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains(
            "lb1 is standalone (no cluster.toml): there is no peer to hand the traffic to"
        ),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(lab.vrrp_state("lb1"), v1::VrrpState::Standalone);

    // Red, every daemon running: exit 4.
    lab.lb1
        .write("farms/bad.toml", "name = \"bad\"\nvip = \"10.0.0.100\"\n");
    let out = lab.tandemctl("lb1", &["reload", "lb-forwarder"], "");
    assert!(!out.status.success(), "{}", text(&out.stdout));
    lab.wait_for("lb1 red", Duration::from_secs(10), |l| {
        status(l, "lb1").1 == Some(4)
    });
    let (line, _) = status(&lab, "lb1");
    assert!(
        line.starts_with("lb1: ● red failure, standalone (lb-forwarder: last reload refused: "),
        "{line}"
    );
    std::fs::remove_file(lab.lb1.path("farms/bad.toml")).unwrap();
    let out = lab.tandemctl("lb1", &["reload", "lb-forwarder"], "");
    assert!(out.status.success(), "{}", text(&out.stdout));
    lab.wait_for("lb1 green again", Duration::from_secs(10), |l| {
        status(l, "lb1") == ("lb1: ● green operational, standalone".to_owned(), Some(0))
    });
}
