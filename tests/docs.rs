//! The documentation is true and followable: every `tandemctl` command shown
//! in README.md and docs/*.md is run against the real CLI, every script and
//! repository path it names exists, every relative link resolves, and no page
//! speaks of how it was written instead of the product.
//!
//! Which commands are checked: every line of a fenced code block (```sh,
//! ```console, ```bash, ```shell or no language) that starts with
//! `tandemctl`, `$ tandemctl` or `# tandemctl`.
//! - A concrete command (no `|`, `[`, `<`, `{`, `...` metasyntax) is RUN: in a
//!   network namespace of its own (loopback only, so a command that would talk
//!   to a peer cannot reach anything), with empty runtime and configuration
//!   directories and no stdin. The CLI must accept it: clap must not reject
//!   it as a usage error. What it then does (usually: no daemon is running)
//!   is not judged here; the daemons' own tests cover that.
//! - A synopsis line (with metasyntax) names a subcommand path; that path
//!   must exist (`tandemctl <path> --help` exits 0).
//! - Commands that need nothing running are run whole and must succeed:
//!   `tandemctl config check` on the shipped examples, `tandemctl completions`.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tandem_e2e::{bin, examples_dir};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("repository root")
}

/// README.md and every page of docs/, with their text.
fn pages() -> Vec<(PathBuf, String)> {
    let root = repo();
    let mut files = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = fs::read_dir(root.join("docs"))
        .expect("docs/")
        .map(|e| e.expect("docs entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
        .into_iter()
        .map(|p| {
            let text = fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, text)
        })
        .collect()
}

fn rel(p: &Path) -> String {
    p.strip_prefix(repo()).unwrap_or(p).display().to_string()
}

/// The lines of the shell-like fenced blocks of a page, with line numbers.
fn fenced_shell_lines(text: &str) -> Vec<(usize, String)> {
    let mut out: Vec<(usize, String)> = Vec::new();
    let mut fence: Option<bool> = None; // Some(is_shell) inside a block
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_start();
        if let Some(info) = t.strip_prefix("```") {
            fence = match fence {
                Some(_) => None,
                None => {
                    let lang = info.split_whitespace().next().unwrap_or("");
                    Some(matches!(lang, "" | "sh" | "console" | "bash" | "shell"))
                }
            };
            continue;
        }
        if fence == Some(true) {
            // A line ending in `\` continues on the next one.
            match out.last_mut() {
                Some((_, prev)) if prev.ends_with('\\') => {
                    prev.pop();
                    prev.push(' ');
                    prev.push_str(t);
                }
                _ => out.push((i + 1, t.to_owned())),
            }
        }
    }
    out
}

/// A `tandemctl` command of a fenced line, without prompt and comment.
fn tandemctl_command(line: &str) -> Option<String> {
    let l = line
        .strip_prefix("$ ")
        .or_else(|| line.strip_prefix("# "))
        .unwrap_or(line);
    if !l.starts_with("tandemctl ") && l != "tandemctl" {
        return None;
    }
    // A trailing shell comment (` # ...`) explains the command.
    let cmd = match l.find(" #") {
        Some(i) => &l[..i],
        None => l,
    };
    // Pipes and redirections belong to the shell, not to tandemctl.
    let cmd = cmd
        .split(" | ")
        .next()
        .unwrap_or(cmd)
        .split(" > ")
        .next()
        .unwrap_or(cmd)
        .split(" < ")
        .next()
        .unwrap_or(cmd);
    Some(cmd.trim().to_owned())
}

fn is_synopsis(cmd: &str) -> bool {
    ["|", "[", "<", "{", "..."].iter().any(|m| cmd.contains(m))
}

/// Splits a command line the way a shell would for the simple quoting docs use.
fn shell_words(cmd: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut any = false;
    for c in cmd.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                any = true;
            }
            (None, c) if c.is_whitespace() => {
                if !cur.is_empty() || any {
                    words.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            (None, c) => cur.push(c),
        }
    }
    if !cur.is_empty() || any {
        words.push(cur);
    }
    words
}

/// Runs tandemctl with `args` in `ns`, with empty runtime/config dirs, no
/// stdin, killed after 30 s.
fn run_in(ns: &tandem_lab::Netns, dirs: &Path, args: &[String]) -> Output {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns.name()])
        .arg(bin("tandemctl"))
        .args(args)
        .env("TANDEM_RUNTIME_DIR", dirs.join("run"))
        .env("TANDEM_CONFIG_DIR", dirs.join("etc"))
        .env("HOME", dirs.join("home"))
        .env_remove("TANDEM_STATE_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running tandemctl");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match child.try_wait().expect("waiting for tandemctl") {
            Some(_) => break,
            None if Instant::now() > deadline => {
                let _ = child.kill();
                break;
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    child.wait_with_output().expect("tandemctl output")
}

/// clap's own usage errors all end with this hint.
fn usage_error(out: &Output) -> bool {
    String::from_utf8_lossy(&out.stderr).contains("For more information, try '--help'")
}

#[test]
fn every_tandemctl_command_in_the_docs_is_accepted_by_the_cli() {
    let lab = tandem_lab::Lab::new().expect("lab");
    let ns = lab.netns("docs").expect("namespace");
    let tmp = tempfile::tempdir().expect("tempdir");
    for d in ["run", "etc", "home"] {
        fs::create_dir_all(tmp.path().join(d)).expect("dir");
    }
    let mut failures = Vec::new();
    let mut ran = 0;
    let mut synopses = BTreeSet::new();
    for (page, text) in pages() {
        for (line, l) in fenced_shell_lines(&text) {
            let Some(cmd) = tandemctl_command(&l) else {
                continue;
            };
            let words = shell_words(&cmd);
            let args: Vec<String> = words.into_iter().skip(1).collect();
            if is_synopsis(&cmd) {
                // The subcommand path: the leading lower-case words.
                let path: Vec<String> = args
                    .iter()
                    .take_while(|w| {
                        !w.is_empty()
                            && w.chars().all(|c| c.is_ascii_lowercase() || c == '-')
                            && !w.starts_with('-')
                    })
                    .cloned()
                    .collect();
                synopses.insert((path, format!("{}:{line}", rel(&page)), cmd.clone()));
                continue;
            }
            let out = run_in(&ns, tmp.path(), &args);
            ran += 1;
            if usage_error(&out) {
                failures.push(format!(
                    "{}:{line}: `{cmd}` is refused by the CLI:\n{}",
                    rel(&page),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
    }
    for (path, at, cmd) in &synopses {
        let mut args = path.clone();
        args.push("--help".into());
        let out = run_in(&ns, tmp.path(), &args);
        if !out.status.success() {
            failures.push(format!(
                "{at}: `{cmd}`: `tandemctl {}` does not exist:\n{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of the documented tandemctl commands fail:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    assert!(
        ran >= 10,
        "only {ran} concrete tandemctl commands found in the docs"
    );
}

#[test]
fn the_commands_that_need_nothing_running_succeed() {
    let out = Command::new(bin("tandemctl"))
        .args(["config", "check"])
        .arg(examples_dir())
        .output()
        .expect("tandemctl config check");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ok"),
        "tandemctl config check deploy/examples: {out:?}"
    );
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(bin("tandemctl"))
            .args(["completions", shell])
            .output()
            .expect("tandemctl completions");
        assert!(
            out.status.success() && !out.stdout.is_empty(),
            "tandemctl completions {shell}: {out:?}"
        );
    }
}

/// Paths a page names in backticks or links that must exist in the repository.
fn named_paths(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for part in text.split(['`', '(', ')', ' ', '\n']) {
        let p = part.trim_end_matches([',', '.', ':', ';']);
        if [
            "deploy/", "docs/", "crates/", "tests/", "systemd/", "proto/", ".ci/",
        ]
        .iter()
        .any(|pre| p.starts_with(pre))
            && !p.contains(['*', '<', '{', '$', '…'])
            && !p.contains("...")
        {
            out.push(p.split('#').next().unwrap_or(p).to_owned());
        }
    }
    out
}

#[test]
fn every_script_path_and_link_named_in_the_docs_exists() {
    let root = repo();
    let mut failures = Vec::new();
    for (page, text) in pages() {
        let dir = page.parent().expect("page dir").to_owned();
        for p in named_paths(&text) {
            let p = p.split_whitespace().next().unwrap_or(&p);
            // `tests/x.rs::a_test` names a test in a file.
            let p = p.split("::").next().unwrap_or(p).to_owned();
            // A crate's page may name its files relative to the crate.
            let in_a_crate = || {
                fs::read_dir(root.join("crates"))
                    .into_iter()
                    .flatten()
                    .flatten()
                    .any(|c| c.path().join(&p).exists())
            };
            if !root.join(&p).exists() && !in_a_crate() {
                failures.push(format!("{}: names `{p}`, which does not exist", rel(&page)));
            }
        }
        // Relative links: [text](target.md) and [text](../x).
        for (i, _) in text.match_indices("](") {
            let rest = &text[i + 2..];
            let Some(end) = rest.find(')') else { continue };
            let target = &rest[..end];
            if target.starts_with("http") || target.starts_with('#') || target.contains(' ') {
                continue;
            }
            let file = target.split('#').next().unwrap_or(target);
            if !dir.join(file).exists() {
                failures.push(format!(
                    "{}: links to `{target}`, which does not exist",
                    rel(&page)
                ));
            }
        }
        // Scripts shown in fenced blocks: present, executable, valid bash.
        for (line, l) in fenced_shell_lines(&text) {
            let l = l
                .strip_prefix("$ ")
                .or_else(|| l.strip_prefix("# "))
                .unwrap_or(&l);
            let Some(script) = l.split_whitespace().next() else {
                continue;
            };
            if !(script.starts_with("deploy/") || script.starts_with(".ci/")) {
                continue;
            }
            let path = root.join(script);
            let ok = fs::metadata(&path).is_ok_and(|m| {
                use std::os::unix::fs::PermissionsExt;
                m.permissions().mode() & 0o111 != 0
            });
            if !ok {
                failures.push(format!(
                    "{}:{line}: `{script}` is not an executable file",
                    rel(&page)
                ));
                continue;
            }
            let syntax = Command::new("bash")
                .arg("-n")
                .arg(&path)
                .output()
                .expect("bash -n");
            if !syntax.status.success() {
                failures.push(format!(
                    "{}:{line}: `{script}`: {}",
                    rel(&page),
                    String::from_utf8_lossy(&syntax.stderr).trim()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_docs_speak_of_the_product_only() {
    // How a page was written is not the product's business, and every build
    // or test command is the README's, with `--workspace`.
    let forbidden = [
        "issue #",
        "the issue",
        "this issue",
        "github issue",
        "closing note",
        "the helper",
        "helper's",
        "helpers'",
        "earlier runs",
        "this session",
        "cargo build -p",
        "cargo test -p",
        "nextest run -p",
        "not served yet",
        "todo",
        "tbd",
    ];
    let mut failures = Vec::new();
    for (page, text) in pages() {
        for (i, line) in text.lines().enumerate() {
            let lower = line.to_lowercase();
            for f in forbidden {
                let hit = lower.match_indices(f).any(|(at, _)| {
                    // Whole words for the short ones (`todo` in `todos`…).
                    let before = lower[..at].chars().next_back();
                    let after = lower[at + f.len()..].chars().next();
                    let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric());
                    !(word(before) || (f.len() <= 4 && word(after)))
                });
                if hit {
                    failures.push(format!("{}:{}: `{f}`: {}", rel(&page), i + 1, line.trim()));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Runs deploy/man.sh on the built binaries and reads a page as text.
fn man_text(pages: &Path, page: &str) -> String {
    let out = Command::new("man")
        .arg("-l")
        .arg(pages.join(page))
        .env("MANWIDTH", "100")
        .env("MAN_KEEP_FORMATTING", "0")
        .output()
        .expect("man -l");
    assert!(out.status.success(), "man -l {page}: {out:?}");
    // Without a terminal, man overstrikes bold and underline (`X\x08X`).
    let mut text = String::new();
    for c in String::from_utf8_lossy(&out.stdout).chars() {
        if c == '\u{8}' {
            text.pop();
        } else {
            text.push(c);
        }
    }
    text
}

#[test]
fn man_pages_have_exit_status_files_examples_and_tandem_toml_5_is_the_configuration_reference() {
    let bin_dir = bin("tandemctl").parent().expect("bin dir").to_owned();
    for b in [
        "lb-forwarder",
        "vrrpd",
        "conntrack-syncd",
        "cfg-syncd",
        "clustermanager",
        "routed",
    ] {
        bin(b);
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = Command::new(repo().join("deploy/man.sh"))
        .arg(&bin_dir)
        .arg(tmp.path())
        .output()
        .expect("deploy/man.sh");
    assert!(out.status.success(), "deploy/man.sh: {out:?}");
    for b in [
        "lb-forwarder",
        "vrrpd",
        "conntrack-syncd",
        "cfg-syncd",
        "clustermanager",
        "routed",
        "tandemctl",
    ] {
        let text = man_text(tmp.path(), &format!("man8/{b}.8.gz"));
        for section in [
            "NAME",
            "SYNOPSIS",
            "EXIT STATUS",
            "FILES",
            "EXAMPLES",
            "SEE ALSO",
        ] {
            assert!(
                text.lines().any(|l| l == section),
                "{b}(8) has no {section} section:\n{text}"
            );
        }
        // The page is the binary's own --help: its options are there.
        assert!(
            text.contains("--config-dir"),
            "{b}(8) lacks its options:\n{text}"
        );
    }
    // tandem.toml(5) is docs/configuration.md: every key of its tables is in it.
    let page = man_text(tmp.path(), "man5/tandem.toml.5.gz");
    // Lines are filled, justified and hyphenated: compare words.
    let flat = page
        .replace("\u{2010}\n", "")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let doc = fs::read_to_string(repo().join("docs/configuration.md")).expect("configuration.md");
    let mut keys = 0;
    for line in doc.lines().filter(|l| l.starts_with("| `")) {
        let key = line.split('`').nth(1).expect("a key in backticks");
        assert!(flat.contains(key), "tandem.toml(5) lacks `{key}`");
        keys += 1;
    }
    assert!(
        keys >= 20,
        "only {keys} keys found in docs/configuration.md"
    );
    for section in ["NAME", "SEE ALSO"] {
        assert!(
            page.lines().any(|l| l == section),
            "tandem.toml(5) has no {section}"
        );
    }
}
