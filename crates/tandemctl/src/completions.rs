//! `tandemctl completions <shell>`: the shell completion script, generated
//! from the same clap definition as the parser, so it never drifts from the
//! real subcommands and flags.

use std::io::Write;
use std::path::Path;
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
    if shell == Shell::Bash {
        script.extend_from_slice(BASH_DYNAMIC.as_bytes());
    }
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

/// Bash: farm and node names come from the node itself (`tandemctl
/// __complete farms|nodes`), backend states and daemon names from the same
/// helper; everything else from the generated script.
const BASH_DYNAMIC: &str = r#"
_tandemctl_names() {
    local cur=${COMP_WORDS[COMP_CWORD]} kind= i sub=() w
    for ((i = 1; i < COMP_CWORD; i++)); do
        w=${COMP_WORDS[i]}
        case $w in
            --runtime-dir|--config-dir|--remote|--api-key-file|--fingerprint) ((i++)) ;;
            -*) ;;
            *) sub+=("$w") ;;
        esac
    done
    case "${sub[0]} ${sub[1]} ${#sub[@]}" in
        "farm delete 2"|"backend set 2") kind=farms ;;
        "node maintenance 3") kind=nodes ;;
        "backend set 4") kind=states ;;
        reload\ *\ 1) kind=daemons ;;
    esac
    if [[ -n $kind && $cur != -* ]]; then
        COMPREPLY=( $(compgen -W "$("${COMP_WORDS[0]}" __complete "$kind" 2>/dev/null)" -- "$cur") )
        return 0
    fi
    _tandemctl "$@"
}
if [[ "${BASH_VERSINFO[0]}" -eq 4 && "${BASH_VERSINFO[1]}" -ge 4 || "${BASH_VERSINFO[0]}" -gt 4 ]]; then
    complete -F _tandemctl_names -o nosort -o bashdefault -o default tandemctl
else
    complete -F _tandemctl_names -o bashdefault -o default tandemctl
fi
"#;

/// `tandemctl __complete KIND`: one name per line, for the completion
/// scripts. Reads the configuration directory as text (an invalid
/// configuration still completes); never fails loudly.
pub async fn names(config_dir: &Path, _runtime_dir: &Path, kind: &str) -> anyhow::Result<ExitCode> {
    let names: Vec<String> = match kind {
        "daemons" => tandem_proto::DAEMONS
            .iter()
            .map(|d| (*d).to_owned())
            .collect(),
        "states" => ["up", "down", "drain", "maintenance"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect(),
        "farms" => farm_names(config_dir),
        "nodes" => node_names(config_dir),
        other => anyhow::bail!("unknown kind `{other}`: farms, nodes, daemons or states"),
    };
    for n in names {
        println!("{n}");
    }
    Ok(ExitCode::SUCCESS)
}

fn farm_names(config_dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(config_dir.join(tandem_config::FARMS_DIR)) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let stem = n.strip_suffix(".toml")?;
            (!stem.starts_with('.')).then(|| stem.to_owned())
        })
        .collect();
    names.sort();
    names
}

fn node_names(config_dir: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(config_dir.join(tandem_config::CLUSTER_FILE)) else {
        return Vec::new();
    };
    let Ok(t) = text.parse::<toml::Table>() else {
        return Vec::new();
    };
    t.get("nodes")
        .and_then(toml::Value::as_array)
        .map(|nodes| {
            nodes
                .iter()
                .filter_map(|n| n.get("name")?.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}
