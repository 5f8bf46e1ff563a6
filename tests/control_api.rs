//! The control API (node.toml `control_listen`, `[[api_keys]]`) on the
//! two-node ops lab (tests/cluster_ops_lab.rs), driven from the client's
//! namespace by real clients: `tandemctl --remote` and curl's HTTP/2.
//!
//! `cargo build --workspace && cargo nextest run --workspace -E 'binary(control_api)'`

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use tandem_e2e::cluster_ops_lab::{OpsLab, farm, text};

const API: &str = "10.0.0.1:9443";

/// Runs a program in the client's namespace; its output whatever the exit.
fn in_client(lab: &OpsLab, program: &Path, args: &[&str]) -> Output {
    let program = program.to_owned();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    lab.client
        .run(move || {
            Command::new(&program)
                .args(&args)
                .env_remove("TANDEM_REMOTE")
                .env_remove("TANDEM_API_KEY_FILE")
                .env_remove("TANDEM_FINGERPRINT")
                .env_remove("TANDEM_RUNTIME_DIR")
                .env_remove("TANDEM_CONFIG_DIR")
                .output()
        })
        .expect("enter the client namespace")
        .expect("run the client")
}

struct Keys {
    dir: tempfile::TempDir,
    entries: String,
}

impl Keys {
    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.key"))
    }
}

/// `tandemctl api-key new` for an admin and a read key, and a wrong token.
fn make_keys() -> Keys {
    let dir = tempfile::tempdir().unwrap();
    let mut entries = String::new();
    for (name, role) in [("deploy", "admin"), ("monitoring", "read")] {
        let out = Command::new(tandem_e2e::bin("tandemctl"))
            .args(["api-key", "new", name, "--role", role, "--out"])
            .arg(dir.path().join(format!("{name}.key")))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert!(stdout.starts_with("[[api_keys]]\n"), "{stdout}");
        assert!(stdout.contains(&format!("role = \"{role}\"")), "{stdout}");
        entries.push_str(&stdout);
        entries.push('\n');
    }
    std::fs::write(
        dir.path().join("wrong.key"),
        "tdm_0000000000000000000000000000000000000000000000000000000000000000\n",
    )
    .unwrap();
    Keys { dir, entries }
}

/// lb1 serves the control API (enabled by a reload); returns its
/// certificate fingerprint as `tandemctl status --json` shows it.
fn enable(lab: &OpsLab, keys: &Keys) -> String {
    let n = lab.node("lb1");
    let node_toml = n.config_dir.join("node.toml");
    let before = std::fs::read_to_string(&node_toml).unwrap();
    // Top-level keys before the [[api_keys]] tables.
    std::fs::write(
        &node_toml,
        format!(
            "{before}control_listen = \"0.0.0.0:9443\"\n\n{}",
            keys.entries
        ),
    )
    .unwrap();
    let out = n.tandemctl(&["reload", "clustermanager"]);
    assert!(out.status.success(), "{}", text(&out));
    let fingerprint = std::cell::RefCell::new(String::new());
    lab.wait_for("lb1's control API", Duration::from_secs(15), |l| {
        let out = l.node("lb1").tandemctl(&["status", "--json"]);
        let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let fp = rows
            .iter()
            .find(|r| r["daemon"] == "clustermanager")
            .and_then(|r| r["control_api"]["fingerprint"].as_str())
            .map(str::to_owned);
        match fp {
            Some(f) if f.starts_with("SHA256:") => {
                *fingerprint.borrow_mut() = f;
                true
            }
            _ => false,
        }
    });
    fingerprint.into_inner()
}

fn remote(lab: &OpsLab, key: &Path, fingerprint: &str, args: &[&str]) -> Output {
    let bin = tandem_e2e::bin("tandemctl");
    let key = key.display().to_string();
    let mut full = vec![
        "--remote",
        API,
        "--api-key-file",
        key.as_str(),
        "--fingerprint",
        fingerprint,
    ];
    full.extend_from_slice(args);
    in_client(lab, &bin, &full)
}

/// A gRPC call with curl (HTTP/2 over TLS, certificate not checked: the
/// server's refusal is what is tested): the response headers.
fn curl_grpc(lab: &OpsLab, method: &str, authorization: Option<&str>) -> String {
    let body = tempfile::NamedTempFile::new().unwrap();
    // An empty protobuf message in one gRPC frame.
    std::fs::write(body.path(), [0u8; 5]).unwrap();
    let url = format!("https://{API}/tandem.v1.ClusterManager/{method}");
    let data = format!("@{}", body.path().display());
    let auth = authorization.map(|a| format!("authorization: {a}"));
    let mut args = vec![
        "-sk",
        "--http2",
        "--max-time",
        "10",
        "-o",
        "/dev/null",
        "-D",
        "-",
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "--data-binary",
        &data,
    ];
    if let Some(a) = &auth {
        args.extend(["-H", a.as_str()]);
    }
    args.push(&url);
    // A loaded machine can drop a first connection attempt; the answer, not
    // the connect, is what the callers judge. Three tries, then everything
    // curl said.
    let mut said = String::new();
    for _ in 0..3 {
        let out = in_client(lab, Path::new("curl"), &args);
        if !out.stdout.is_empty() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        said = format!(
            "curl printed no headers ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
    said
}

#[test]
fn the_control_api_needs_a_key_a_read_key_only_reads_and_an_admin_key_adds_a_replicated_farm() {
    let lab = OpsLab::running();
    let keys = make_keys();
    let fp = enable(&lab, &keys);

    // A read key reads: the remote node's status and node table.
    let out = remote(&lab, &keys.file("monitoring"), &fp, &["status", "--json"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out),
        lab.node("lb1").log()
    );
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rows.len(), 5, "{rows:?}");
    assert!(rows.iter().all(|r| r["state"] == "running"), "{rows:?}");
    assert!(rows.iter().all(|r| r["node"] == "lb1"), "{rows:?}");
    let out = remote(&lab, &keys.file("monitoring"), &fp, &["cluster", "nodes"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("lb2"), "{}", text(&out));

    // No token (curl, a plain HTTP/2 gRPC client): UNAUTHENTICATED (16).
    let headers = curl_grpc(&lab, "Status", None);
    assert!(headers.contains("grpc-status: 16"), "{headers}");
    // The control: the same request with the read key's token is served.
    let token = std::fs::read_to_string(keys.file("monitoring")).unwrap();
    let headers = curl_grpc(&lab, "Status", Some(&format!("Bearer {}", token.trim())));
    assert!(
        headers.contains("grpc-status: 0") || !headers.contains("grpc-status:"),
        "{headers}"
    );
    assert!(headers.contains("HTTP/2 200"), "{headers}");

    // A wrong token: refused, and nothing is said of the methods.
    let out = remote(&lab, &keys.file("wrong"), &fp, &["status"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("unknown API key"), "{}", text(&out));

    // A read key attempting a change: refused, the farm is not added.
    let farm_file = keys.dir.path().join("api.toml");
    std::fs::write(&farm_file, farm("api", 8443)).unwrap();
    let f = farm_file.display().to_string();
    let out = remote(&lab, &keys.file("monitoring"), &fp, &["farm", "add", &f]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("API key `monitoring` has the read role; ApplyChange changes the cluster and needs an admin key"),
        "{}",
        text(&out)
    );
    assert!(lab.node("lb1").read("farms/api.toml").is_empty());

    // A wrong fingerprint: tandemctl refuses the server before sending the key.
    let wrong_fp = format!("SHA256:{}", "0".repeat(64));
    let out = remote(&lab, &keys.file("deploy"), &wrong_fp, &["status"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("not the pinned"), "{}", text(&out));

    // The admin key adds the farm: written on lb1, replicated to lb2, served.
    let out = remote(&lab, &keys.file("deploy"), &fp, &["farm", "add", &f]);
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out),
        lab.node("lb1").log()
    );
    lab.wait_for("farm api on both nodes", Duration::from_secs(20), |l| {
        !l.node("lb1").read("farms/api.toml").is_empty()
            && !l.node("lb2").read("farms/api.toml").is_empty()
    });
    assert_eq!(lab.node("lb2").read("farms/api.toml"), farm("api", 8443));
    let out = remote(
        &lab,
        &keys.file("monitoring"),
        &fp,
        &["farm", "list", "--json"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("\"api\""), "{}", text(&out));
    // Logged with the key's name.
    let log = lab.node("lb1").daemon_log("clustermanager");
    assert!(
        log.contains("control API: ApplyChange by admin key `deploy` from 10.0.0.50:"),
        "{log}"
    );
    // Commands on this node's own files are refused over --remote.
    let out = remote(&lab, &keys.file("deploy"), &fp, &["farm", "save"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("works on this node only"),
        "{}",
        text(&out)
    );
}

#[test]
fn plaintext_is_refused_on_the_control_api() {
    let lab = OpsLab::running();
    let keys = make_keys();
    let _fp = enable(&lab, &keys);
    // gRPC's HTTP/2 preface in clear text, with a valid token: the server
    // answers with a TLS alert (or closes) and never with HTTP/2.
    let token = std::fs::read_to_string(keys.file("deploy")).unwrap();
    let answer = lab
        .client
        .run(move || {
            let mut s = TcpStream::connect(API).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
            let _ = s.write_all(format!("authorization: Bearer {}\r\n", token.trim()).as_bytes());
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            buf
        })
        .unwrap();
    // An HTTP/2 server would answer with a SETTINGS frame (type 4 at byte 3).
    assert!(
        answer.len() < 9 || answer[3] != 4,
        "plaintext got an HTTP/2 answer: {answer:?}"
    );
    if let Some(first) = answer.first() {
        assert_eq!(*first, 0x15, "a TLS alert record, not {answer:?}");
    }
    // curl in clear text (HTTP/2 prior knowledge) gets no gRPC answer.
    let out = in_client(
        &lab,
        Path::new("curl"),
        &[
            "-s",
            "--http2-prior-knowledge",
            "--max-time",
            "10",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "-H",
            "content-type: application/grpc",
            &format!("http://{API}/tandem.v1.ClusterManager/Status"),
        ],
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("grpc-status"), "{}", text(&out));
    // The control: the same curl against a plaintext gRPC server (this
    // node's local socket) gets a gRPC answer, so the probe can tell.
    let sock = lab.node("lb1").runtime_dir.join("clustermanager.sock");
    let out = Command::new("curl")
        .args([
            "-s",
            "--http2-prior-knowledge",
            "--max-time",
            "10",
            "-D",
            "-",
            "-o",
            "/dev/null",
        ])
        .arg("--unix-socket")
        .arg(&sock)
        .args([
            "-H",
            "content-type: application/grpc",
            "http://localhost/tandem.v1.ClusterManager/Status",
        ])
        .output()
        .unwrap();
    assert!(text(&out).contains("grpc-status"), "{}", text(&out));
    lab.wait_for("the refusal logged", Duration::from_secs(5), |l| {
        l.node("lb1")
            .daemon_log("clustermanager")
            .contains("TLS handshake failed")
    });
}
