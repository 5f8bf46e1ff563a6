use std::process::Command;

#[test]
fn help_lists_the_commands() {
    let out = Command::new(env!("CARGO_BIN_EXE_tandemctl"))
        .arg("--help")
        .output()
        .expect("run tandemctl --help");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    for cmd in ["status", "config", "reload"] {
        assert!(help.contains(cmd), "--help lacks {cmd}:\n{help}");
    }
}

#[test]
fn config_check_of_the_examples_is_ok() {
    let out = Command::new(env!("CARGO_BIN_EXE_tandemctl"))
        .args(["config", "check"])
        .arg(tandem_e2e::examples_dir())
        .output()
        .expect("run tandemctl config check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.starts_with("ok: "), "{text}");
}
