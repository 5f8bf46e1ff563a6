//! tandemctl as a Unix tool: a closed pipe, failures that say what to do,
//! `config check` and the configuration directory, completions. No daemon
//! runs (an empty runtime directory) unless said.
//!
//! `cargo build --workspace && cargo nextest run --workspace -E 'binary(tandemctl)'`

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn tandemctl() -> Command {
    let mut c = Command::new(tandem_e2e::bin("tandemctl"));
    for v in [
        "TANDEM_RUNTIME_DIR",
        "TANDEM_CONFIG_DIR",
        "TANDEM_REMOTE",
        "TANDEM_API_KEY_FILE",
        "TANDEM_FINGERPRINT",
    ] {
        c.env_remove(v);
    }
    c
}

fn text(out: &Output) -> String {
    format!(
        "exit {:?} signal {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        out.status.signal(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A copy of the commented examples (deploy/examples): node lb1 of lb1
/// and lb2, farms dns, ftp-passive and web.
fn config_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    for f in ["node.toml", "cluster.toml"] {
        std::fs::copy(examples.join(f), d.path().join(f)).unwrap();
    }
    std::fs::create_dir(d.path().join("farms")).unwrap();
    for f in ["dns.toml", "ftp-passive.toml", "web.toml"] {
        std::fs::copy(
            examples.join("farms").join(f),
            d.path().join("farms").join(f),
        )
        .unwrap();
    }
    d
}

/// stdout is a pipe whose reader is gone before tandemctl writes: it ends
/// by SIGPIPE (141 in a shell) with nothing on stderr, never a panic.
#[test]
fn a_closed_pipe_ends_quietly() {
    let run = tempfile::tempdir().unwrap();
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["completions", "bash"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = tandemctl()
            .arg("--runtime-dir")
            .arg(run.path())
            .args(args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let quiet = out.status.signal() == Some(libc_sigpipe()) || out.status.code() == Some(0);
        assert!(quiet, "{args:?}: {}", text(&out));
        assert!(out.stderr.is_empty(), "{args:?}: {}", text(&out));
    }
    // The same through a shell: `tandemctl status | head -1` prints the
    // first line and the pipeline's status is 0 or 141.
    let out = Command::new("bash")
        .args([
            "-c",
            "set -o pipefail; \"$0\" --runtime-dir \"$1\" status | head -1; echo \"rc=$?\"",
        ])
        .arg(tandem_e2e::bin("tandemctl"))
        .arg(run.path())
        .env_remove("TANDEM_RUNTIME_DIR")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("this node: "), "{}", text(&out));
    assert!(
        stdout.contains("rc=141") || stdout.contains("rc=3"),
        "{}",
        text(&out)
    );
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "{}",
        text(&out)
    );
}

fn libc_sigpipe() -> i32 {
    13
}

/// Failures exit non-zero with one line that says what to do.
#[test]
fn failures_say_what_to_do() {
    let run = tempfile::tempdir().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["reload"], "no daemon is running"),
        (&["reload", "vrrpd"], "vrrpd"),
        (&["cluster", "nodes"], "is it running?"),
        (
            &["farm", "list"],
            "is it running? `systemctl start tandem.target`",
        ),
        (&["farm", "stats"], "is it running?"),
        (
            &["--remote", "192.0.2.1:9443", "status"],
            "--remote needs --api-key-file",
        ),
    ];
    for (args, want) in cases {
        let out = tandemctl()
            .arg("--runtime-dir")
            .arg(run.path())
            .args(*args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        let all = format!("{}{err}", String::from_utf8_lossy(&out.stdout));
        assert!(all.contains(want), "{args:?}: {}", text(&out));
        assert!(!err.contains("panicked"), "{args:?}: {}", text(&out));
        assert!(
            err.lines().count() <= 1,
            "{args:?}: one line: {}",
            text(&out)
        );
    }
    // A bad backend state is a usage error naming the states.
    let out = tandemctl()
        .args(["backend", "set", "web", "10.0.0.1", "sideways"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("up, down, drain, maintenance"),
        "{}",
        text(&out)
    );
}

#[test]
fn config_check_honours_config_dir_and_the_environment() {
    let good = config_dir();
    let empty = tempfile::tempdir().unwrap();
    let ok = |out: &Output, dir: &Path| {
        assert!(out.status.success(), "{}", text(out));
        assert!(
            String::from_utf8_lossy(&out.stdout).starts_with(&format!(
                "ok: {} (node lb1, clustered, 3 farms)",
                dir.display()
            )),
            "{}",
            text(out)
        );
    };
    let out = tandemctl()
        .arg("--config-dir")
        .arg(good.path())
        .args(["config", "check"])
        .output()
        .unwrap();
    ok(&out, good.path());
    let out = tandemctl()
        .env("TANDEM_CONFIG_DIR", good.path())
        .args(["config", "check"])
        .output()
        .unwrap();
    ok(&out, good.path());
    // An explicit DIR wins over both.
    let out = tandemctl()
        .env("TANDEM_CONFIG_DIR", empty.path())
        .args(["config", "check"])
        .arg(good.path())
        .output()
        .unwrap();
    ok(&out, good.path());
    // The control: the empty directory is checked when it is the one given.
    let out = tandemctl()
        .arg("--config-dir")
        .arg(empty.path())
        .args(["config", "check"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("node.toml: missing"),
        "{}",
        text(&out)
    );
}

/// Every argument and option of every subcommand has a help text.
#[test]
fn every_argument_has_help() {
    let out = tandemctl().arg("--help").output().unwrap();
    let top = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut paths: Vec<Vec<String>> = vec![vec![]];
    let mut checked = 0;
    while let Some(path) = paths.pop() {
        let out = tandemctl().args(&path).arg("--help").output().unwrap();
        assert!(out.status.success(), "{path:?}: {}", text(&out));
        let help = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut section = "";
        for line in help.lines() {
            if !line.starts_with(' ') {
                section = line.trim_end_matches(':');
                continue;
            }
            let entry = line.trim_start();
            if entry.is_empty() || line.starts_with("          ") {
                continue;
            }
            match section {
                "Commands" => {
                    let name = entry.split_whitespace().next().unwrap_or_default();
                    if name != "help" {
                        let mut p = path.clone();
                        p.push(name.to_owned());
                        paths.push(p);
                    }
                }
                "Arguments" | "Options" => {
                    // `  -h, --help  Print help`: the name, two spaces, the help.
                    let described = entry
                        .split_once("  ")
                        .is_some_and(|(_, h)| !h.trim().is_empty());
                    // A long name alone on its line has its help on the next.
                    assert!(
                        described || help.contains(&format!("{entry}\n          ")),
                        "tandemctl {}: `{entry}` has no help\n{help}",
                        path.join(" ")
                    );
                    checked += 1;
                }
                _ => {}
            }
        }
    }
    assert!(checked > 60, "{checked} arguments checked\n{top}");
}

#[test]
fn completions_offer_states_daemons_farms_and_nodes() {
    let cfg = config_dir();
    let names = |kind: &str| {
        let out = tandemctl()
            .arg("--config-dir")
            .arg(cfg.path())
            .args(["__complete", kind])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(names("farms"), "dns\nftp-passive\nweb\n");
    assert_eq!(names("nodes"), "lb1\nlb2\n");
    assert_eq!(names("states"), "up\ndown\ndrain\nmaintenance\n");
    assert!(names("daemons").contains("conntrack-syncd\n"));

    // Bash, as a user presses TAB: the generated script, sourced.
    let script = tempfile::NamedTempFile::new().unwrap();
    let out = tandemctl().args(["completions", "bash"]).output().unwrap();
    std::fs::write(script.path(), &out.stdout).unwrap();
    let bin = tandem_e2e::bin("tandemctl");
    let complete = |words: &str| {
        let out = Command::new("bash")
            .args([
                "-c",
                &format!(
                    "source \"$0\"; COMP_WORDS=(\"$1\" {words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); \
                     COMP_LINE=\"${{COMP_WORDS[*]}}\"; COMP_POINT=${{#COMP_LINE}}; \
                     _tandemctl_names; printf '%s\\n' \"${{COMPREPLY[@]}}\""
                ),
            ])
            .arg(script.path())
            .arg(&bin)
            .env("TANDEM_CONFIG_DIR", cfg.path())
            .output()
            .unwrap();
        let mut words: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect();
        words.sort();
        (words, text(&out))
    };
    let (w, t) = complete("farm delete \"\"");
    assert_eq!(w, ["dns", "ftp-passive", "web"], "{t}");
    let (w, t) = complete("backend set w");
    assert_eq!(w, ["web"], "{t}");
    let (w, t) = complete("node maintenance enable \"\"");
    assert_eq!(w, ["lb1", "lb2"], "{t}");
    let (w, t) = complete("backend set web 10.0.0.1 d");
    assert_eq!(w, ["down", "drain"], "{t}");
    let (w, t) = complete("reload c");
    assert!(
        w.contains(&"cfg-syncd".to_owned()) && w.contains(&"conntrack-syncd".to_owned()),
        "{t}"
    );
}
