//! Running helper commands (`ip`, programs inside namespaces) to completion.

use std::process::{Command, Output, Stdio};

use crate::LabError;

/// `program arg arg ...`, for error messages.
pub(crate) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// Runs `cmd` to completion with stdin closed; a non-zero exit is an error
/// carrying `what` (the command line, and the namespace if any) and stderr.
pub(crate) fn output(cmd: &mut Command, what: String) -> Result<Output, LabError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| LabError::Spawn {
            command: what.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(LabError::Command {
            command: what,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out)
}

/// `ip ARGS...`. Topology is built with iproute2 rather than raw netlink:
/// the commands are the ones an operator would type to reproduce a failing
/// test by hand, and their errors are already readable.
pub(crate) fn ip(args: &[&str]) -> Result<Output, LabError> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    let what = describe(&cmd);
    output(&mut cmd, what)
}
