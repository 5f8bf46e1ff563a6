//! Tandem's configuration: `node.toml` (this node only), `cluster.toml` and
//! `farms/*.toml` (replicated). [`Config::load`] reads a directory, checks
//! everything — syntax, types, ranges, and consistency across files — and
//! returns either a configuration that is entirely valid or every error
//! found, each with file, line and column. Nothing half-valid escapes.

mod locate;
mod model;
mod scaleout;
mod validate;
mod validate_farm;

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use model::*;
pub use scaleout::{
    MAX_NODES as MAX_ACTIVE_NODES, MIN_NODES as MIN_ACTIVE_NODES, bird_protocol_name,
};

use locate::Seg::{self, Key};
use validate::Report;

/// Where the daemons and `tandemctl` look when not told otherwise.
pub const DEFAULT_CONFIG_DIR: &str = "/etc/tandem";
/// This node's file in the configuration directory (required, never replicated).
pub const NODE_FILE: &str = "node.toml";
/// The cluster's file in the configuration directory (optional, replicated).
pub const CLUSTER_FILE: &str = "cluster.toml";
/// The directory of farm files, one `<name>.toml` per farm (optional, replicated).
pub const FARMS_DIR: &str = "farms";

/// A whole, validated configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// `node.toml`.
    pub node: NodeConfig,
    /// `cluster.toml`; None on a standalone node.
    pub cluster: Option<ClusterConfig>,
    /// `farms/*.toml`, sorted by name.
    pub farms: Vec<Farm>,
}

/// One problem, where it is and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file at fault (the missing one, for a missing `node.toml`).
    pub file: PathBuf,
    /// 1-based; None when the problem is the file as a whole (missing, unreadable).
    pub line: Option<usize>,
    /// 1-based, in characters; None with `line`.
    pub column: Option<usize>,
    /// A sentence for the operator.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let (Some(l), Some(c)) = (self.line, self.column) {
            write!(f, ":{l}:{c}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in a configuration directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    pub fn iter(&self) -> impl Iterator<Item = &ConfigError> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Each error as text, its file shown relative to `base` — for a
    /// configuration validated in a scratch copy whose errors must name the
    /// live file (`farms/web.toml:3:8: …`).
    pub fn relative_to(&self, base: &Path) -> Vec<String> {
        self.0
            .iter()
            .map(|e| {
                let mut e = e.clone();
                if let Ok(rel) = e.file.strip_prefix(base) {
                    e.file = rel.to_owned();
                }
                e.to_string()
            })
            .collect()
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A file's text, kept to place errors in it.
struct Source {
    path: PathBuf,
    text: String,
}

impl Source {
    fn error_at(&self, path: &[Seg], message: String) -> ConfigError {
        let at =
            locate::span_of(&self.text, path).map(|s| locate::line_column(&self.text, s.start));
        ConfigError {
            file: self.path.clone(),
            line: at.map(|a| a.0),
            column: at.map(|a| a.1),
            message,
        }
    }
}

struct Loader {
    errors: Vec<ConfigError>,
}

impl Loader {
    /// The file's text; None (and an error) when it cannot be read. A file
    /// that does not exist is an error only when `required`.
    fn read(&mut self, path: PathBuf, required: bool) -> Option<Source> {
        match fs::read_to_string(&path) {
            Ok(text) => Some(Source { path, text }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => None,
            Err(e) => {
                self.errors.push(ConfigError {
                    message: format!("cannot read: {e}"),
                    file: path,
                    line: None,
                    column: None,
                });
                None
            }
        }
    }

    fn parse<T: DeserializeOwned>(&mut self, src: &Source) -> Option<T> {
        match toml::from_str::<T>(&src.text) {
            Ok(v) => Some(v),
            Err(e) => {
                let at = e.span().map(|s| locate::line_column(&src.text, s.start));
                self.errors.push(ConfigError {
                    file: src.path.clone(),
                    line: at.map(|a| a.0),
                    column: at.map(|a| a.1),
                    message: e.message().trim().to_owned(),
                });
                None
            }
        }
    }

    fn report(&mut self, src: &Source, report: Report) {
        for (path, message) in report.issues {
            self.errors.push(src.error_at(&path, message));
        }
    }
}

impl Config {
    /// Reads and validates the configuration in `dir`: `node.toml`
    /// (required), `cluster.toml` (absent: a standalone node) and
    /// `farms/*.toml` (absent: no farms). Every file is checked on its own
    /// and against the others; the result is either a configuration valid
    /// as a whole or every error found, in file order.
    pub fn load(dir: &Path) -> Result<Config, ConfigErrors> {
        let mut l = Loader { errors: Vec::new() };

        let node_path = dir.join(NODE_FILE);
        // try_exists: a directory we may not search is "cannot read", not "missing".
        let node_src = if !matches!(node_path.try_exists(), Ok(false)) {
            l.read(node_path, true)
        } else {
            l.errors.push(ConfigError {
                message: format!(
                    "missing: every node needs {NODE_FILE} (at least `name = \"...\"`); is {} the configuration directory?",
                    dir.display()
                ),
                file: node_path,
                line: None,
                column: None,
            });
            None
        };
        let node = node_src.as_ref().and_then(|src| {
            let n: NodeConfig = l.parse(src)?;
            l.report(src, validate::node(&n));
            Some(n)
        });

        let cluster_src = l.read(dir.join(CLUSTER_FILE), false);
        let cluster = cluster_src.as_ref().and_then(|src| {
            let c: ClusterConfig = l.parse(src)?;
            match c.mode {
                ClusterMode::ActivePassive => {
                    l.report(src, validate::cluster(&c));
                    l.report(src, scaleout::pair(&c));
                }
                ClusterMode::ActiveActive => l.report(src, scaleout::cluster(&c)),
            }
            Some(c)
        });

        let mut farms: Vec<(Source, Farm)> = Vec::new();
        for path in farm_files(&dir.join(FARMS_DIR), &mut l.errors) {
            let Some(src) = l.read(path, false) else {
                continue;
            };
            let Some(farm) = l.parse::<Farm>(&src) else {
                continue;
            };
            let stem = src
                .path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or_default()
                .to_owned();
            l.report(&src, validate::farm(&farm, &stem));
            farms.push((src, farm));
        }
        farms.sort_by(|a, b| {
            a.1.name
                .cmp(&b.1.name)
                .then_with(|| a.0.path.cmp(&b.0.path))
        });

        cross_check_farms(&mut l, &farms);
        cross_check_backends(&mut l, node.as_ref(), cluster.as_ref(), &farms);
        if let (Some(node_src), Some(node), Some(cluster_src), Some(cluster)) =
            (&node_src, &node, &cluster_src, &cluster)
        {
            cross_check_cluster(&mut l, node_src, node, cluster_src, cluster, &farms);
        }

        match node {
            Some(node) if l.errors.is_empty() => Ok(Config {
                node,
                cluster,
                farms: farms.into_iter().map(|(_, f)| f).collect(),
            }),
            _ => Err(ConfigErrors(l.errors)),
        }
    }
}

/// The `*.toml` files of the farms directory, sorted; a missing directory
/// means no farms. Other files (editor swap files, `web.toml.tmp`,
/// `web.toml~`) and hidden ones (`.web.toml`, how atomic writers and
/// editors name their temporaries) are ignored.
fn farm_files(dir: &Path, errors: &mut Vec<ConfigError>) -> Vec<PathBuf> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            errors.push(ConfigError {
                file: dir.to_owned(),
                line: None,
                column: None,
                message: format!("cannot read the farms directory: {e}"),
            });
            return Vec::new();
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "toml")
                && !p
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                && p.is_file()
        })
        .collect();
    files.sort();
    files
}

fn cross_check_farms(l: &mut Loader, farms: &[(Source, Farm)]) {
    for (i, (src, farm)) in farms.iter().enumerate() {
        for (other_src, other) in &farms[..i] {
            if other.name == farm.name {
                l.errors.push(src.error_at(
                    &[Key("name")],
                    format!(
                        "farm `{}` is defined twice: here and in {}",
                        farm.name,
                        other_src.path.display()
                    ),
                ));
            }
            // A firewall-mark farm is matched by its mark, not its vip and port.
            if let (Some(a), Some(b)) = (other.fwmark, farm.fwmark)
                && a == b
                && other.protocol.intersects(farm.protocol)
            {
                l.errors.push(src.error_at(
                    &[Key("fwmark")],
                    format!(
                        "farms `{}` and `{}` both serve firewall mark {a:#x} (`{}` is in {})",
                        other.name,
                        farm.name,
                        other.name,
                        other_src.path.display()
                    ),
                ));
            }
            if other.fwmark.is_none()
                && farm.fwmark.is_none()
                && other.vip == farm.vip
                && other.port.overlaps(&farm.port)
                && other.protocol.intersects(farm.protocol)
            {
                let proto = if farm.protocol == Protocol::Both {
                    other.protocol
                } else {
                    farm.protocol
                };
                l.errors.push(src.error_at(
                    &[Key("port")],
                    format!(
                        "farms `{}` and `{}` both listen on {}/{} (`{}` is in {})",
                        other.name,
                        farm.name,
                        validate::endpoint(farm.vip, overlap(&other.port, &farm.port)),
                        proto.as_str(),
                        other.name,
                        other_src.path.display()
                    ),
                ));
            }
        }
    }
}

/// A backend must be a real server, never an address of the balancer
/// itself: another farm's VIP or SNAT source, a floating IP, a node's
/// cluster address (the farm's own VIP and SNAT address are refused with
/// the farm). Forwarding there loops back into the balancer.
fn cross_check_backends(
    l: &mut Loader,
    node: Option<&NodeConfig>,
    cluster: Option<&ClusterConfig>,
    farms: &[(Source, Farm)],
) {
    use locate::Seg::Index;
    for (i, (src, farm)) in farms.iter().enumerate() {
        for (b, backend) in farm.backends.iter().enumerate() {
            let a = backend.address;
            if a == farm.vip || farm.snat_address == Some(a) {
                continue;
            }
            let mut why = None;
            for (j, (other_src, other)) in farms.iter().enumerate() {
                if j == i {
                    continue;
                }
                let what = if other.vip == a {
                    "VIP"
                } else if other.snat_address == Some(a) {
                    "SNAT address"
                } else {
                    continue;
                };
                why = Some(format!(
                    "is the {what} of farm `{}` ({})",
                    other.name,
                    other_src.path.display()
                ));
                break;
            }
            if why.is_none()
                && let Some(c) = cluster
            {
                if let Some(n) = c.nodes.iter().find(|n| n.address == a) {
                    why = Some(format!("is the cluster address of node `{}`", n.name));
                } else if c.floating_ips.iter().any(|f| f.address.addr == a) {
                    why = Some("is a floating IP of the cluster".to_owned());
                }
            }
            if why.is_none()
                && let Some(n) = node
                && n.cluster_address == Some(a)
            {
                why = Some(format!(
                    "is this node's cluster address (node `{}`)",
                    n.name
                ));
            }
            if let Some(why) = why {
                l.errors.push(src.error_at(
                    &[Key("backends"), Index(b), Key("address")],
                    format!(
                        "farm `{}`: backend {a} {why}: the balancer would forward to itself",
                        farm.name
                    ),
                ));
            }
        }
    }
}

fn overlap(a: &PortRange, b: &PortRange) -> PortRange {
    PortRange {
        first: a.first.max(b.first),
        last: a.last.min(b.last),
    }
}

fn cross_check_cluster(
    l: &mut Loader,
    node_src: &Source,
    node: &NodeConfig,
    cluster_src: &Source,
    cluster: &ClusterConfig,
    farms: &[(Source, Farm)],
) {
    if node.cluster_interface.is_none() {
        l.errors.push(node_src.error_at(
            &[Key("cluster_interface")],
            "clustered (cluster.toml exists) but cluster_interface is not set: which interface carries the cluster link?".into(),
        ));
    }
    match cluster.nodes.iter().position(|n| n.name == node.name) {
        None => {
            let known: Vec<&str> = cluster.nodes.iter().map(|n| n.name.as_str()).collect();
            l.errors.push(cluster_src.error_at(
                &[Key("nodes")],
                format!("this node, `{}` (node.toml), is not one of the cluster's nodes ({})", node.name, known.join(", ")),
            ));
        }
        Some(i) => match node.cluster_address {
            None => l.errors.push(node_src.error_at(
                &[Key("cluster_address")],
                format!(
                    "clustered (cluster.toml exists) but cluster_address is not set; cluster.toml gives this node {}",
                    cluster.nodes[i].address
                ),
            )),
            Some(a) if a != cluster.nodes[i].address => l.errors.push(node_src.error_at(
                &[Key("cluster_address")],
                format!("cluster_address {a} differs from the address cluster.toml gives node `{}`: {}", node.name, cluster.nodes[i].address),
            )),
            Some(_) => {}
        },
    }
    if cluster.mode == ClusterMode::ActiveActive {
        scaleout::cross_check(l, cluster, farms);
        return;
    }
    let floating: Vec<_> = cluster
        .floating_ips
        .iter()
        .map(|f| f.address.addr)
        .collect();
    let list = || {
        floating
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (src, farm) in farms {
        if !floating.contains(&farm.vip) {
            l.errors.push(src.error_at(
                &[Key("vip")],
                format!("farm `{}`: vip {} is not a floating IP of the cluster ({}): it would not move at failover", farm.name, farm.vip, list()),
            ));
        }
        if let Some(s) = farm.snat_address
            && !floating.contains(&s)
        {
            l.errors.push(src.error_at(
                &[Key("snat_address")],
                format!(
                    "farm `{}`: snat_address {s} is not a floating IP of the cluster ({}): the SNAT source must move with the VIP, or the backends answer the dead node after failover",
                    farm.name,
                    list()
                ),
            ));
        }
    }
}
