//! The ipvsadm-style verbs: `farm list|stats|save|restore|clear` and
//! `backend set`. Reads come from lb-forwarder (the running datapath, with
//! kernel counters); save/restore/clear work on the configuration files,
//! validating the whole configuration before anything is written, then ask
//! lb-forwarder to reload.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use comfy_table::{Table, presets};
use serde::{Deserialize, Serialize};
use tandem_config::{Config, FARMS_DIR, Farm};
use tandem_proto::v1::{self, BackendAdminState, lb_forwarder_client::LbForwarderClient};
use tonic::transport::Channel;

async fn client(runtime_dir: &Path) -> anyhow::Result<LbForwarderClient<Channel>> {
    let ch = tandem_runtime::connect(runtime_dir, "lb-forwarder").await?;
    Ok(LbForwarderClient::new(ch))
}

fn lower(name: &str, prefix: &str) -> String {
    name.trim_start_matches(prefix).to_lowercase()
}

fn listen(f: &v1::FarmState) -> String {
    let port = if f.port_first == f.port_last {
        f.port_first.to_string()
    } else {
        format!("{}-{}", f.port_first, f.port_last)
    };
    let vip = if f.vip.contains(':') {
        format!("[{}]", f.vip)
    } else {
        f.vip.clone()
    };
    format!("{}:{port}/{}", vip, f.protocol)
}

/// JSON form of a farm, stable for scripts.
#[derive(Serialize)]
struct FarmJson<'a> {
    name: &'a str,
    listen: String,
    scheduler: &'a str,
    forwarding: &'a str,
    snat_address: &'a str,
    all_backends_down: bool,
    packets: u64,
    bytes: u64,
    backends: Vec<BackendJson<'a>>,
}

#[derive(Serialize)]
struct BackendJson<'a> {
    address: &'a str,
    port: u32,
    weight: u32,
    state: String,
    health: String,
    active_connections: u32,
    packets: u64,
    bytes: u64,
}

fn to_json(f: &v1::FarmState) -> FarmJson<'_> {
    let c = f.counters.unwrap_or_default();
    FarmJson {
        name: &f.name,
        listen: listen(f),
        scheduler: &f.scheduler,
        forwarding: &f.forwarding,
        snat_address: &f.snat_address,
        all_backends_down: f.all_backends_down,
        packets: c.packets,
        bytes: c.bytes,
        backends: f
            .backends
            .iter()
            .map(|b| {
                let c = b.counters.unwrap_or_default();
                BackendJson {
                    address: &b.address,
                    port: b.port,
                    weight: b.weight,
                    state: lower(b.admin_state().as_str_name(), "BACKEND_ADMIN_STATE_"),
                    health: lower(b.health().as_str_name(), "BACKEND_HEALTH_"),
                    active_connections: b.active_connections,
                    packets: c.packets,
                    bytes: c.bytes,
                }
            })
            .collect(),
    }
}

/// `farm list`: like `ipvsadm -L -n`.
pub async fn list(runtime_dir: &Path, json: bool, stats: bool) -> anyhow::Result<ExitCode> {
    let farms = client(runtime_dir)
        .await?
        .list_farms(v1::ListFarmsRequest {})
        .await
        .context("asking lb-forwarder for its farms")?
        .into_inner()
        .farms;
    if json {
        let out: Vec<FarmJson<'_>> = farms.iter().map(to_json).collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = Table::new();
    t.load_style(presets::NOTHING);
    if stats {
        t.set_header(["FARM / BACKEND", "CONNS", "PACKETS", "BYTES"]);
    } else {
        t.set_header([
            "FARM / BACKEND",
            "SCHED / WEIGHT",
            "STATE",
            "HEALTH",
            "ACTIVE",
        ]);
    }
    for f in &farms {
        let c = f.counters.unwrap_or_default();
        let down = if f.all_backends_down {
            "NO BACKEND"
        } else {
            ""
        };
        if stats {
            let conns: u32 = f.backends.iter().map(|b| b.active_connections).sum();
            t.add_row([
                format!("{} {}", f.name, listen(f)),
                conns.to_string(),
                c.packets.to_string(),
                c.bytes.to_string(),
            ]);
        } else {
            t.add_row([
                format!("{} {}", f.name, listen(f)),
                f.scheduler.clone(),
                down.to_owned(),
                String::new(),
                String::new(),
            ]);
        }
        for b in &f.backends {
            let c = b.counters.unwrap_or_default();
            let addr = if b.address.contains(':') {
                format!("[{}]", b.address)
            } else {
                b.address.clone()
            };
            let target = format!("  -> {addr}:{}", b.port);
            if stats {
                t.add_row([
                    target,
                    b.active_connections.to_string(),
                    c.packets.to_string(),
                    c.bytes.to_string(),
                ]);
            } else {
                t.add_row([
                    target,
                    b.weight.to_string(),
                    lower(b.admin_state().as_str_name(), "BACKEND_ADMIN_STATE_"),
                    lower(b.health().as_str_name(), "BACKEND_HEALTH_"),
                    b.active_connections.to_string(),
                ]);
            }
        }
    }
    println!("{t}");
    Ok(ExitCode::SUCCESS)
}

/// The farm file of `farm` with the backend's `state` set to `state`,
/// comments and layout kept: (path relative to the config dir, new text).
/// `port` 0 matches the backend by address alone, which must then be unique.
pub fn backend_state_edit(
    config_dir: &Path,
    farm: &str,
    address: &str,
    port: u32,
    state: &str,
) -> anyhow::Result<(String, String)> {
    let dir = config_dir.join(FARMS_DIR);
    let entries = std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    for file in files {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        let Ok(mut doc) = text.parse::<toml_edit::DocumentMut>() else {
            continue;
        };
        if doc.get("name").and_then(|n| n.as_str()) != Some(farm) {
            continue;
        }
        let rel = format!(
            "{FARMS_DIR}/{}",
            file.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        );
        let backends = doc
            .get_mut("backends")
            .and_then(|b| b.as_array_of_tables_mut())
            .with_context(|| format!("{rel}: farm `{farm}` has no [[backends]]"))?;
        let matches: Vec<usize> = backends
            .iter()
            .enumerate()
            .filter(|(_, b)| {
                b.get("address").and_then(|a| a.as_str()) == Some(address)
                    && (port == 0
                        || b.get("port").and_then(|p| p.as_integer()) == Some(i64::from(port)))
            })
            .map(|(i, _)| i)
            .collect();
        let i = match matches.as_slice() {
            [i] => *i,
            [] => bail!(
                "{rel}: farm `{farm}` has no backend {address}{}",
                if port == 0 {
                    String::new()
                } else {
                    format!(":{port}")
                }
            ),
            _ => bail!("{rel}: farm `{farm}` has several backends at {address}: give the port"),
        };
        let Some(table) = backends.get_mut(i) else {
            bail!("{rel}: backend {address} vanished");
        };
        table["state"] = toml_edit::value(state);
        return Ok((rel, doc.to_string()));
    }
    bail!("no farm named `{farm}` in {}", dir.display())
}

/// `backend set FARM ADDRESS[:PORT] STATE`.
pub async fn set_backend(
    runtime_dir: &Path,
    config_dir: &Path,
    farm: &str,
    backend: &str,
    state: &str,
) -> anyhow::Result<ExitCode> {
    let (address, port) = match backend.rsplit_once(':') {
        Some((a, p)) if !a.contains(':') || a.starts_with('[') => (
            a.trim_start_matches('[').trim_end_matches(']').to_owned(),
            p.parse::<u32>()
                .with_context(|| format!("`{p}` is not a port"))?,
        ),
        _ => (backend.to_owned(), 0),
    };
    let state = match state {
        "up" => BackendAdminState::Up,
        "down" => BackendAdminState::Down,
        "drain" => BackendAdminState::Drain,
        "maintenance" => BackendAdminState::Maintenance,
        other => bail!("unknown state `{other}`: up, down, drain or maintenance"),
    };
    let word = lower(state.as_str_name(), "BACKEND_ADMIN_STATE_");
    // Through clustermanager when it runs: the state is written into the
    // farm file (a configuration change, validated, applied and replicated
    // to the peer), so it survives restarts and failovers.
    if let Ok(channel) = tandem_runtime::connect(runtime_dir, "clustermanager").await {
        let (path, content) = backend_state_edit(config_dir, farm, &address, port, &word)?;
        let reply = v1::cluster_manager_client::ClusterManagerClient::new(channel)
            .apply_change(v1::ConfigChange {
                path: path.clone(),
                content: Some(content.into_bytes()),
                ..Default::default()
            })
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?
            .into_inner();
        if reply.applied {
            println!("farm {farm}: backend {backend} is now {word} ({path} updated)");
        }
        return Ok(crate::cluster::report_apply(&path, &reply));
    }
    // Standalone without clustermanager: lb-forwarder's runtime override
    // (not persisted).
    let reply = client(runtime_dir)
        .await?
        .set_backend_state(v1::SetBackendStateRequest {
            farm: farm.to_owned(),
            address,
            port,
            state: state.into(),
        })
        .await;
    match reply {
        Ok(_) => {
            println!(
                "farm {farm}: backend {backend} is now {word} (clustermanager is not running: lb-forwarder's runtime override, not kept across a restart)"
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(s) => bail!("{}", s.message()),
    }
}

/// The document `farm save` writes and `farm restore` reads.
#[derive(Serialize, Deserialize)]
struct Saved {
    #[serde(default)]
    farms: Vec<Farm>,
}

/// `farm save`: every farm of the configuration, as one TOML document.
pub fn save(config_dir: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    let saved = Saved {
        farms: config.farms,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&saved)?);
    } else {
        print!("{}", toml::to_string(&saved)?);
    }
    Ok(ExitCode::SUCCESS)
}

/// Replaces the farms of `config_dir` with `farms` — all or nothing: the
/// whole configuration with the new farms is validated in a copy first.
fn replace_farms(config_dir: &Path, farms: &[Farm]) -> anyhow::Result<()> {
    let staging = tempfile::Builder::new()
        .prefix(".tandem-restore")
        .tempdir_in(config_dir)
        .context("creating a staging directory")?;
    for name in ["node.toml", "cluster.toml"] {
        let src = config_dir.join(name);
        if src.exists() {
            std::fs::copy(&src, staging.path().join(name))
                .with_context(|| format!("copying {}", src.display()))?;
        }
    }
    let staged_farms = staging.path().join(FARMS_DIR);
    std::fs::create_dir_all(&staged_farms)?;
    for f in farms {
        std::fs::write(
            staged_farms.join(format!("{}.toml", f.name)),
            toml::to_string(f)?,
        )?;
    }
    if let Err(errors) = Config::load(staging.path()) {
        let prefix = format!("{}/", staging.path().display());
        let text = errors.to_string().replace(&prefix, "");
        bail!("the restored configuration is invalid; nothing was changed:\n{text}");
    }
    // Valid as a whole: swap the farms directory in with two renames.
    let live: PathBuf = config_dir.join(FARMS_DIR);
    let old = staging.path().join("farms.old");
    if live.exists() {
        std::fs::rename(&live, &old).context("moving the old farms aside")?;
    }
    std::fs::rename(&staged_farms, &live).context("moving the new farms in")?;
    Ok(())
}

async fn reload_forwarder(runtime_dir: &Path) -> anyhow::Result<()> {
    let reply = client(runtime_dir)
        .await?
        .reload(v1::ReloadRequest {})
        .await?
        .into_inner();
    if !reply.applied {
        bail!(
            "lb-forwarder refused the reload:\n{}",
            reply.errors.join("\n")
        );
    }
    Ok(())
}

/// The farm files of `config_dir` (`farms/*.toml`, hidden ones aside):
/// (relative path, text).
fn farm_files(config_dir: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let dir = config_dir.join(FARMS_DIR);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || !name.ends_with(".toml") || !e.path().is_file() {
            continue;
        }
        let text = std::fs::read_to_string(e.path())
            .with_context(|| format!("reading {}", e.path().display()))?;
        out.push((format!("{FARMS_DIR}/{name}"), text));
    }
    out.sort();
    Ok(out)
}

/// The change that makes the farms of `config_dir` exactly `farms`: each
/// farm whose file already says the same (parsed) is left alone, comments
/// and all; a changed or new farm is written whole; a farm file no longer
/// wanted is deleted.
pub fn farm_changes(config_dir: &Path, farms: &[Farm]) -> anyhow::Result<Vec<v1::FileChange>> {
    let current = farm_files(config_dir)?;
    let mut out = Vec::new();
    for f in farms {
        let path = format!("{FARMS_DIR}/{}.toml", f.name);
        let same = current
            .iter()
            .find(|(p, _)| *p == path)
            .and_then(|(_, text)| toml::from_str::<Farm>(text).ok())
            .is_some_and(|existing| existing == *f);
        if !same {
            out.push(v1::FileChange {
                path,
                content: Some(toml::to_string(f)?.into_bytes()),
            });
        }
    }
    for (path, _) in &current {
        if !farms
            .iter()
            .any(|f| *path == format!("{FARMS_DIR}/{}.toml", f.name))
        {
            out.push(v1::FileChange {
                path: path.clone(),
                content: None,
            });
        }
    }
    Ok(out)
}

/// Replaces every farm with `farms`: through clustermanager's ApplyChange
/// (validated as a whole, master only, replicated to the peer, the daemons
/// reloaded once). Without clustermanager, a standalone node writes them
/// here and reloads lb-forwarder; a clustered one refuses.
async fn change_farms(
    config_dir: &Path,
    runtime_dir: &Path,
    farms: &[Farm],
    what: &str,
) -> anyhow::Result<ExitCode> {
    let changes = farm_changes(config_dir, farms)?;
    if changes.is_empty() {
        println!("{what}: nothing to change, the farms are already those");
        return Ok(ExitCode::SUCCESS);
    }
    if tandem_runtime::connect(runtime_dir, "clustermanager")
        .await
        .is_ok()
    {
        let summary = format!(
            "{what} ({} file(s): {})",
            changes.len(),
            changes
                .iter()
                .map(|c| format!(
                    "{} {}",
                    if c.content.is_some() {
                        "write"
                    } else {
                        "delete"
                    },
                    c.path
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
        return crate::cluster::apply_files(runtime_dir, &summary, changes).await;
    }
    if config_dir.join(tandem_config::CLUSTER_FILE).exists() {
        bail!(
            "clustermanager is not running: on a cluster node, farm changes go through it (master only, validated, replicated to the peer); start it first"
        );
    }
    replace_farms(config_dir, farms)?;
    println!(
        "{what}: {} farm(s) in {} (clustermanager is not running: written here)",
        farms.len(),
        config_dir.join(FARMS_DIR).display()
    );
    reload_forwarder(runtime_dir).await?;
    Ok(ExitCode::SUCCESS)
}

/// `farm restore [FILE]`: replace every farm with those of a saved document.
pub async fn restore(
    config_dir: &Path,
    runtime_dir: &Path,
    file: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let text = match file {
        Some(f) => {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
        }
        None => std::io::read_to_string(std::io::stdin()).context("reading standard input")?,
    };
    let saved: Saved = toml::from_str(&text).context("parsing the saved farms")?;
    change_farms(config_dir, runtime_dir, &saved.farms, "farm restore").await
}

/// `farm clear --yes`: remove every farm (like `ipvsadm -C`).
pub async fn clear(config_dir: &Path, runtime_dir: &Path, yes: bool) -> anyhow::Result<ExitCode> {
    if !yes {
        bail!(
            "this removes every farm of {}; run again with --yes",
            config_dir.display()
        );
    }
    change_farms(config_dir, runtime_dir, &[], "farm clear").await
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB: &str = "# the web farm\nname = \"web\"\nvip = \"10.0.0.100\"\nport = 80\nsnat_address = \"10.1.0.100\"\n\n[[backends]]\naddress = \"10.1.0.11\"\n";

    #[test]
    fn restore_writes_only_what_changes_and_keeps_surviving_files() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("farms")).unwrap();
        std::fs::write(d.path().join("farms/web.toml"), WEB).unwrap();
        std::fs::write(
            d.path().join("farms/old.toml"),
            WEB.replace("\"web\"", "\"old\"")
                .replace("port = 80", "port = 81"),
        )
        .unwrap();
        std::fs::write(d.path().join("farms/.web.toml.swp"), "x").unwrap();
        let web: Farm = toml::from_str(WEB).unwrap();
        let mut api = web.clone();
        api.name = "api".into();
        api.port.first = 82;
        api.port.last = 82;
        let c = farm_changes(d.path(), &[web.clone(), api]).unwrap();
        let paths: Vec<(&str, bool)> = c
            .iter()
            .map(|c| (c.path.as_str(), c.content.is_some()))
            .collect();
        // web.toml is the same farm: untouched, its comment kept.
        assert_eq!(paths, [("farms/api.toml", true), ("farms/old.toml", false)]);
        let c = farm_changes(d.path(), &[]).unwrap();
        assert_eq!(c.len(), 2, "clear deletes both farms, never the swap file");
        assert!(c.iter().all(|c| c.content.is_none()));
        assert!(
            farm_changes(d.path(), &[web])
                .unwrap()
                .iter()
                .all(|c| c.path == "farms/old.toml")
        );
    }
}
