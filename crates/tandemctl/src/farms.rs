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
    let ch = tandem_runtime::connect(runtime_dir, "lb-forwarder")
        .await
        .with_context(|| {
            format!(
                "connecting to lb-forwarder in {} (is it running? `systemctl start tandem.target`)",
                runtime_dir.display()
            )
        })?;
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
    /// 0: matched by `listen`.
    fwmark: u32,
    /// 0: no persistence.
    persistence_timeout_s: u32,
    persistence_netmask: &'a str,
    hash_source_port: bool,
    one_packet: bool,
    on_backend_failure: &'a str,
    timeouts: TimeoutsJson,
    sorry_server: Option<SorryJson<'a>>,
    all_backends_down: bool,
    schedule_finite: bool,
    connections: u64,
    packets: u64,
    bytes: u64,
    in_packets: u64,
    in_bytes: u64,
    out_packets: u64,
    out_bytes: u64,
    rates: RatesJson,
    backends: Vec<BackendJson<'a>>,
}

#[derive(Serialize)]
struct TimeoutsJson {
    tcp_s: u32,
    tcp_fin_s: u32,
    udp_s: u32,
}

#[derive(Serialize)]
struct SorryJson<'a> {
    address: &'a str,
    port: u32,
    active: bool,
    active_connections: u32,
    connections: u64,
    packets: u64,
    bytes: u64,
    rates: RatesJson,
}

#[derive(Serialize, Default)]
struct RatesJson {
    cps: f64,
    in_pps: f64,
    out_pps: f64,
    in_bps: f64,
    out_bps: f64,
}

impl From<Option<v1::Rates>> for RatesJson {
    fn from(r: Option<v1::Rates>) -> Self {
        let r = r.unwrap_or_default();
        RatesJson {
            cps: r.cps,
            in_pps: r.in_pps,
            out_pps: r.out_pps,
            in_bps: r.in_bps,
            out_bps: r.out_bps,
        }
    }
}

#[derive(Serialize)]
struct BackendJson<'a> {
    address: &'a str,
    port: u32,
    weight: u32,
    state: String,
    health: String,
    in_rotation: bool,
    active_connections: u32,
    inactive_connections: u32,
    /// 0: none.
    upper_threshold: u32,
    lower_threshold: u32,
    overloaded: bool,
    connections: u64,
    packets: u64,
    bytes: u64,
    in_packets: u64,
    in_bytes: u64,
    out_packets: u64,
    out_bytes: u64,
    rates: RatesJson,
}

fn to_json(f: &v1::FarmState) -> FarmJson<'_> {
    let c = f.counters.unwrap_or_default();
    let (i, o) = (
        f.in_counters.unwrap_or_default(),
        f.out_counters.unwrap_or_default(),
    );
    let t = f.timeouts.unwrap_or_default();
    FarmJson {
        name: &f.name,
        listen: listen(f),
        scheduler: &f.scheduler,
        forwarding: &f.forwarding,
        snat_address: &f.snat_address,
        fwmark: f.fwmark,
        persistence_timeout_s: f.persistence_timeout_s,
        persistence_netmask: &f.persistence_netmask,
        hash_source_port: f.hash_source_port,
        one_packet: f.one_packet,
        on_backend_failure: &f.on_backend_failure,
        timeouts: TimeoutsJson {
            tcp_s: t.tcp_s,
            tcp_fin_s: t.tcp_fin_s,
            udp_s: t.udp_s,
        },
        sorry_server: f.sorry_server.as_ref().map(|s| {
            let c = s.counters.unwrap_or_default();
            SorryJson {
                address: &s.address,
                port: s.port,
                active: s.active,
                active_connections: s.active_connections,
                connections: s.connections,
                packets: c.packets,
                bytes: c.bytes,
                rates: s.rates.into(),
            }
        }),
        all_backends_down: f.all_backends_down,
        schedule_finite: f.schedule_finite,
        connections: f.connections,
        packets: c.packets,
        bytes: c.bytes,
        in_packets: i.packets,
        in_bytes: i.bytes,
        out_packets: o.packets,
        out_bytes: o.bytes,
        rates: f.rates.into(),
        backends: f
            .backends
            .iter()
            .map(|b| {
                let c = b.counters.unwrap_or_default();
                let (i, o) = (
                    b.in_counters.unwrap_or_default(),
                    b.out_counters.unwrap_or_default(),
                );
                BackendJson {
                    address: &b.address,
                    port: b.port,
                    weight: b.weight,
                    state: lower(b.admin_state().as_str_name(), "BACKEND_ADMIN_STATE_"),
                    health: lower(b.health().as_str_name(), "BACKEND_HEALTH_"),
                    in_rotation: b.in_rotation,
                    active_connections: b.active_connections,
                    inactive_connections: b.inactive_connections,
                    upper_threshold: b.upper_threshold,
                    lower_threshold: b.lower_threshold,
                    overloaded: b.overloaded,
                    connections: b.connections,
                    packets: c.packets,
                    bytes: c.bytes,
                    in_packets: i.packets,
                    in_bytes: i.bytes,
                    out_packets: o.packets,
                    out_bytes: o.bytes,
                    rates: b.rates.into(),
                }
            })
            .collect(),
    }
}

/// The farm's options as ipvsadm prints them after the scheduler.
fn farm_notes(f: &v1::FarmState) -> String {
    let mut notes = Vec::new();
    if f.fwmark != 0 {
        notes.push(format!("fwmark {:#x}", f.fwmark));
    }
    if f.persistence_timeout_s != 0 {
        let mut p = format!("persistent {}", f.persistence_timeout_s);
        if !f.persistence_netmask.is_empty() {
            p.push_str(&format!(" mask {}", f.persistence_netmask));
        }
        notes.push(p);
    }
    if f.hash_source_port {
        notes.push("hash source port".into());
    }
    if f.one_packet {
        notes.push("ops".into());
    }
    if f.on_backend_failure == "reset" {
        notes.push("reset on failure".into());
    }
    if let Some(t) = f.timeouts
        && (t.tcp_s != 0 || t.tcp_fin_s != 0 || t.udp_s != 0)
    {
        let show = |v: u32| {
            if v == 0 {
                "-".to_owned()
            } else {
                v.to_string()
            }
        };
        notes.push(format!(
            "timeouts {} {} {}",
            show(t.tcp_s),
            show(t.tcp_fin_s),
            show(t.udp_s)
        ));
    }
    if f.all_backends_down {
        notes.push("NO BACKEND".into());
    } else if f.schedule_finite {
        notes.push("backends full soon".into());
    }
    notes.join(", ")
}

fn backend_notes(b: &v1::BackendState) -> String {
    let mut notes = Vec::new();
    if b.upper_threshold != 0 {
        let lower = if b.lower_threshold == 0 {
            "3/4".to_owned()
        } else {
            b.lower_threshold.to_string()
        };
        notes.push(format!("thresholds {}/{lower}", b.upper_threshold));
    }
    if b.overloaded {
        notes.push("overloaded".into());
    }
    notes.join(", ")
}

fn target(address: &str, port: u32) -> String {
    let addr = if address.contains(':') {
        format!("[{address}]")
    } else {
        address.to_owned()
    };
    if port == 0 {
        addr
    } else {
        format!("{addr}:{port}")
    }
}

fn rate_cells(r: Option<v1::Rates>) -> [String; 5] {
    let r = r.unwrap_or_default();
    [r.cps, r.in_pps, r.out_pps, r.in_bps, r.out_bps].map(|v| format!("{v:.0}"))
}

/// What `farm list` and `farm stats` show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    /// ipvsadm -L -n: scheduler, options, states, connections.
    List,
    /// ipvsadm -L --stats: connections, packets, bytes.
    Stats,
    /// ipvsadm -L --rate: per second.
    Rate,
}

/// `farm list` / `farm stats`: like `ipvsadm -L -n`, `--stats`, `--rate`.
pub async fn list(runtime_dir: &Path, json: bool, view: View) -> anyhow::Result<ExitCode> {
    let farms = if crate::remote::get().is_some() {
        crate::remote::cluster_manager(runtime_dir)
            .await?
            .list_farms(v1::ListFarmsRequest {})
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))
            .context("asking the remote node for its farms")?
            .into_inner()
            .farms
    } else {
        client(runtime_dir)
            .await?
            .list_farms(v1::ListFarmsRequest {})
            .await
            .context("asking lb-forwarder for its farms")?
            .into_inner()
            .farms
    };
    if json {
        let out: Vec<FarmJson<'_>> = farms.iter().map(to_json).collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = Table::new();
    t.load_style(presets::NOTHING);
    match view {
        View::Stats => t.set_header([
            "FARM / BACKEND",
            "CONNS",
            "INPKTS",
            "OUTPKTS",
            "INBYTES",
            "OUTBYTES",
        ]),
        View::Rate => t.set_header([
            "FARM / BACKEND",
            "CPS",
            "INPPS",
            "OUTPPS",
            "INBPS",
            "OUTBPS",
        ]),
        View::List => t.set_header([
            "FARM / BACKEND",
            "SCHED / WEIGHT",
            "STATE",
            "HEALTH",
            "ACTIVE",
            "INACTIVE",
            "NOTES",
        ]),
    };
    for f in &farms {
        let head = format!("{} {}", f.name, listen(f));
        let stats_cells = |conns: u64, i: Option<v1::Counters>, o: Option<v1::Counters>| {
            let (i, o) = (i.unwrap_or_default(), o.unwrap_or_default());
            [
                conns.to_string(),
                i.packets.to_string(),
                o.packets.to_string(),
                i.bytes.to_string(),
                o.bytes.to_string(),
            ]
        };
        match view {
            View::Stats => {
                let [a, b, c, d, e] = stats_cells(f.connections, f.in_counters, f.out_counters);
                t.add_row([head, a, b, c, d, e]);
            }
            View::Rate => {
                let [a, b, c, d, e] = rate_cells(f.rates);
                t.add_row([head, a, b, c, d, e]);
            }
            View::List => {
                t.add_row([
                    head,
                    f.scheduler.clone(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    farm_notes(f),
                ]);
            }
        }
        for b in &f.backends {
            let name = format!("  -> {}", target(&b.address, b.port));
            match view {
                View::Stats => {
                    let [a, b2, c, d, e] =
                        stats_cells(b.connections, b.in_counters, b.out_counters);
                    t.add_row([name, a, b2, c, d, e]);
                }
                View::Rate => {
                    let [a, b2, c, d, e] = rate_cells(b.rates);
                    t.add_row([name, a, b2, c, d, e]);
                }
                View::List => {
                    t.add_row([
                        name,
                        b.weight.to_string(),
                        lower(b.admin_state().as_str_name(), "BACKEND_ADMIN_STATE_"),
                        lower(b.health().as_str_name(), "BACKEND_HEALTH_"),
                        b.active_connections.to_string(),
                        b.inactive_connections.to_string(),
                        backend_notes(b),
                    ]);
                }
            }
        }
        if let Some(s) = &f.sorry_server {
            let name = format!("  -> {} (sorry server)", target(&s.address, s.port));
            match view {
                View::Stats => {
                    let c = stats_cells(s.connections, s.in_counters, s.out_counters);
                    t.add_row([
                        name,
                        c[0].clone(),
                        c[1].clone(),
                        c[2].clone(),
                        c[3].clone(),
                        c[4].clone(),
                    ])
                }
                View::Rate => {
                    let [a, b, c, d, e] = rate_cells(s.rates);
                    t.add_row([name, a, b, c, d, e])
                }
                View::List => t.add_row([
                    name,
                    String::new(),
                    if s.active { "answering" } else { "standby" }.to_owned(),
                    String::new(),
                    s.active_connections.to_string(),
                    String::new(),
                    String::new(),
                ]),
            };
        }
    }
    println!("{t}");
    Ok(ExitCode::SUCCESS)
}

/// JSON form of one connection.
#[derive(Serialize)]
struct ConnJson<'a> {
    farm: &'a str,
    protocol: &'a str,
    state: &'a str,
    expires_s: u32,
    client: String,
    #[serde(rename = "virtual")]
    virtual_: String,
    backend: String,
    sorry_server: bool,
    zone: u32,
}

/// `conn list`: the connection table, like `ipvsadm -L -n -c`.
pub async fn connections(
    runtime_dir: &Path,
    farm: Option<&str>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let conns = client(runtime_dir)
        .await?
        .list_connections(v1::ListConnectionsRequest {
            farm: farm.unwrap_or_default().to_owned(),
        })
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))
        .context("asking lb-forwarder for the connection table")?
        .into_inner()
        .connections;
    let rows: Vec<ConnJson<'_>> = conns
        .iter()
        .map(|c| ConnJson {
            farm: &c.farm,
            protocol: &c.protocol,
            state: &c.state,
            expires_s: c.expires_s,
            client: target(&c.client_address, c.client_port),
            virtual_: target(&c.virtual_address, c.virtual_port),
            backend: target(&c.backend_address, c.backend_port),
            sorry_server: c.sorry_server,
            zone: c.zone,
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = Table::new();
    t.load_style(presets::NOTHING);
    t.set_header([
        "PRO",
        "EXPIRE",
        "STATE",
        "SOURCE",
        "VIRTUAL",
        "DESTINATION",
        "FARM",
    ]);
    for r in &rows {
        let expire = format!("{:02}:{:02}", r.expires_s / 60, r.expires_s % 60);
        let dest = if r.sorry_server {
            format!("{} (sorry)", r.backend)
        } else {
            r.backend.clone()
        };
        t.add_row([
            r.protocol.to_uppercase(),
            expire,
            if r.state.is_empty() { "-" } else { r.state }.to_owned(),
            r.client.clone(),
            r.virtual_.clone(),
            dest,
            r.farm.to_owned(),
        ]);
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
