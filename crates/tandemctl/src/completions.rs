//! `tandemctl completions <shell>`: the shell completion script, generated
//! from the same clap definition as the parser, so it never drifts from the
//! real subcommands and flags.

use std::io::Write;
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;

/// Writes the completion script for `shell` to stdout. The packages install
/// the bash, zsh and fish scripts where those shells look for them
/// (deploy/install.sh, `[package.metadata.deb]`).
pub fn run(shell: Shell) -> ExitCode {
    let mut cmd = crate::Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "tandemctl", &mut script);
    // `generate` panics on a closed stdout; writing the buffer ourselves turns
    // `tandemctl completions bash | head` into a quiet exit instead.
    match std::io::stdout().lock().write_all(&script) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tandemctl: writing the {shell} completion script: {e}");
            ExitCode::FAILURE
        }
    }
}
