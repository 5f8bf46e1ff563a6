//! A load-balancer lab: a client (10.0.0.50-57), a balancer node holding
//! the VIP (10.0.0.100) and the floating SNAT source (10.1.0.100), and three
//! backends (10.1.0.11-13:8080) that answer a connection with their name and
//! then echo lines. lb-forwarder runs in the balancer namespace.
//! [`LabOptions`] adds backends (up to 9), client addresses beyond the
//! first eight (10.0.1.0/16 onwards), extra TCP and UDP ports on every
//! backend, and a directory put first in lb-forwarder's PATH.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use tandem_lab::{Lab, LabChild, Netns};
use tandem_proto::v1::{self, lb_forwarder_client::LbForwarderClient};

pub const VIP: &str = "10.0.0.100";

/// How a lab differs from the default one.
#[derive(Debug, Clone, Default)]
pub struct LabOptions {
    /// Backends b1..bN (10.1.0.11..); 0 means 3.
    pub backends: usize,
    /// Client addresses beyond 10.0.0.50-57: 10.0.1.1, 10.0.1.2, … (/16).
    pub extra_sources: usize,
    /// More TCP ports every backend greets and echoes on (beside 8080).
    pub tcp_ports: Vec<u16>,
    /// UDP ports every backend answers with its name.
    pub udp_ports: Vec<u16>,
    /// Put first in lb-forwarder's PATH (to watch the processes it starts).
    pub path_prefix: Option<PathBuf>,
    /// Direct server return (see [`FwdLab::new_dsr`]).
    pub dsr: bool,
    /// Lines added to node.toml (`name = "lb1"`).
    pub node_extra: String,
}

/// The extra client addresses of a lab with `extra_sources`.
pub fn extra_source(i: usize) -> String {
    format!("10.0.{}.{}", 1 + i / 250, 1 + i % 250)
}

pub struct FwdLab {
    pub lab: Lab,
    pub client: Netns,
    pub lb: Netns,
    pub config: PathBuf,
    pub runtime: PathBuf,
    pub fwd: Option<LabChild>,
    /// b1, b2, b3 (more with [`LabOptions::backends`]).
    pub backends: Vec<Netns>,
    path_prefix: Option<PathBuf>,
    _tmp: tempfile::TempDir,
}

impl FwdLab {
    pub fn new(farm: &str) -> FwdLab {
        Self::with(farm, LabOptions::default())
    }

    /// The lab for a direct-server-return farm on port 80: the backends
    /// also sit on the clients' LAN (10.0.0.11-13), hold the VIP on `lo`
    /// without answering ARP for it, and answer the clients directly; the
    /// balancer reaches them over the back network.
    pub fn new_dsr(farm: &str) -> FwdLab {
        Self::with(
            farm,
            LabOptions {
                dsr: true,
                ..LabOptions::default()
            },
        )
    }

    pub fn with(farm: &str, opts: LabOptions) -> FwdLab {
        let dsr = opts.dsr;
        let lab = Lab::new().expect("lab");
        let lan = lab.bridge("lan").expect("lan");
        let back = lab.bridge("back").expect("back");
        let client = lab.netns("cl").expect("client");
        let sources: Vec<String> = (50..58).map(|i| format!("10.0.0.{i}/24")).collect();
        let sources: Vec<&str> = sources.iter().map(String::as_str).collect();
        lab.attach(&client, "eth0", &lan, &sources)
            .expect("client eth0");
        if opts.extra_sources > 0 {
            // One `ip -batch` rather than a process per address.
            let batch: String = (0..opts.extra_sources)
                .map(|i| format!("address add {}/16 dev eth0\n", extra_source(i)))
                .collect();
            let file = std::env::temp_dir().join(format!("{}-sources", lab.id()));
            std::fs::write(&file, batch).expect("batch file");
            let out = Command::new("ip")
                .args(["-n", client.name(), "-batch"])
                .arg(&file)
                .output()
                .expect("ip -batch");
            let _ = std::fs::remove_file(&file);
            assert!(
                out.status.success(),
                "adding client addresses: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let lb = lab.netns("lb").expect("lb");
        lab.attach(&lb, "eth0", &lan, &["10.0.0.1/24", "10.0.0.100/24"])
            .expect("lb eth0");
        lab.attach(&lb, "eth1", &back, &["10.1.0.1/24", "10.1.0.100/24"])
            .expect("lb eth1");
        lb.sysctl("net.ipv4.ip_forward", "1").expect("forwarding");
        if opts.extra_sources > 0 {
            lb.ip(&["route", "add", "10.0.0.0/16", "dev", "eth0"])
                .expect("route to the extra clients");
        }
        let mut backends = Vec::new();
        let n = if opts.backends == 0 { 3 } else { opts.backends };
        for i in 1..=n {
            let ns = lab.netns(&format!("b{i}")).expect("backend");
            lab.attach(&ns, "eth0", &back, &[&format!("10.1.0.1{i}/24")])
                .expect("backend eth0");
            crate::echo_backend(&ns, &format!("b{i}"), 8080);
            for p in &opts.tcp_ports {
                crate::echo_backend(&ns, &format!("b{i}"), *p);
            }
            for p in &opts.udp_ports {
                crate::udp_backend(&ns, &format!("b{i}"), *p);
            }
            if dsr {
                lab.attach(&ns, "eth1", &lan, &[&format!("10.0.0.1{i}/24")])
                    .expect("backend eth1");
                ns.add_address("lo", &format!("{VIP}/32"))
                    .expect("VIP on lo");
                for (k, v) in [
                    ("net.ipv4.conf.all.arp_ignore", "1"),
                    ("net.ipv4.conf.all.arp_announce", "2"),
                    ("net.ipv4.conf.all.rp_filter", "0"),
                    ("net.ipv4.conf.eth0.rp_filter", "0"),
                ] {
                    ns.sysctl(k, v).expect("sysctl");
                }
                crate::echo_backend(&ns, &format!("b{i}"), 80);
            }
            backends.push(ns);
        }
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = tmp.path().join("etc");
        let runtime = tmp.path().join("run");
        std::fs::create_dir_all(config.join("farms")).expect("mkdir");
        std::fs::write(
            config.join("node.toml"),
            format!("name = \"lb1\"\n{}", opts.node_extra),
        )
        .expect("node.toml");
        std::fs::write(config.join("farms/web.toml"), farm).expect("farm");
        let mut l = FwdLab {
            lab,
            client,
            lb,
            config,
            runtime,
            fwd: None,
            backends,
            path_prefix: opts.path_prefix,
            _tmp: tmp,
        };
        l.start();
        l
    }

    pub fn start(&mut self) {
        let mut cmd = Command::new(crate::bin("lb-forwarder"));
        cmd.arg("--config-dir")
            .arg(&self.config)
            .arg("--runtime-dir")
            .arg(&self.runtime)
            .arg("--state-dir")
            .arg(crate::state_dir_beside(&self.runtime))
            .env("RUST_LOG", "info")
            .env_remove("JOURNAL_STREAM");
        if let Some(dir) = &self.path_prefix {
            let path = std::env::var("PATH").unwrap_or_default();
            cmd.env("PATH", format!("{}:{path}", dir.display()));
        }
        self.fwd = Some(
            self.lab
                .spawn(&self.lb, &mut cmd)
                .expect("spawn lb-forwarder"),
        );
        tandem_lab::wait_for_unix_socket(
            &self.runtime.join("lb-forwarder.sock"),
            Duration::from_secs(10),
        )
        .expect("serving");
        self.wait_for(Duration::from_secs(10), "the datapath to load", |s| {
            s.datapath_loaded
        });
    }

    pub fn rpc<T>(
        &self,
        f: impl AsyncFnOnce(LbForwarderClient<tonic::transport::Channel>) -> T,
    ) -> T {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async {
            let ch = tandem_runtime::connect(&self.runtime, "lb-forwarder")
                .await
                .expect("connect");
            f(LbForwarderClient::new(ch)).await
        })
    }

    pub fn status(&self) -> v1::LbForwarderStatus {
        self.rpc(async |mut c| {
            c.status(v1::StatusRequest {})
                .await
                .expect("status")
                .into_inner()
        })
    }

    pub fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        cond: impl Fn(&v1::LbForwarderStatus) -> bool,
    ) {
        let start = Instant::now();
        while !cond(&self.status()) {
            assert!(start.elapsed() < timeout, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn farm(&self) -> v1::FarmState {
        self.rpc(async |mut c| {
            c.get_farm(v1::GetFarmRequest { name: "web".into() })
                .await
                .expect("GetFarm")
                .into_inner()
        })
    }

    pub fn set_state(&self, addr: &str, state: v1::BackendAdminState) {
        self.rpc(async |mut c| {
            c.set_backend_state(v1::SetBackendStateRequest {
                farm: "web".into(),
                address: addr.into(),
                port: 8080,
                state: state.into(),
            })
            .await
            .expect("SetBackendState")
        });
    }

    /// A connection to the VIP from `source` (10.0.0.50 by default); the
    /// backend's name and the open stream.
    pub fn connect_from(&self, source: &str) -> (String, TcpStream) {
        let src: SocketAddr = format!("{source}:0").parse().expect("src");
        let dst: SocketAddr = format!("{VIP}:80").parse().expect("dst");
        let stream = self
            .client
            .run(move || {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                s.bind(&src.into())?;
                s.connect_timeout(&dst.into(), Duration::from_secs(2))?;
                Ok::<TcpStream, std::io::Error>(s.into())
            })
            .expect("client thread")
            .expect("connect to the VIP");
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut name = String::new();
        BufReader::new(stream.try_clone().expect("clone"))
            .read_line(&mut name)
            .expect("backend name");
        (name.trim().to_owned(), stream)
    }

    /// A TCP connection from `source` to `dst` within `timeout`: the
    /// backend's greeting (its name) and the open stream, or the error.
    pub fn try_connect(
        &self,
        source: &str,
        dst: SocketAddr,
        timeout: Duration,
    ) -> std::io::Result<(String, TcpStream)> {
        let src: SocketAddr = format!("{source}:0").parse().expect("src");
        let stream = self
            .client
            .run(move || {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                s.bind(&src.into())?;
                s.connect_timeout(&dst.into(), timeout)?;
                Ok::<TcpStream, std::io::Error>(s.into())
            })
            .expect("client thread")?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut name = String::new();
        BufReader::new(stream.try_clone()?).read_line(&mut name)?;
        Ok((name.trim().to_owned(), stream))
    }

    /// [`FwdLab::try_connect`] that must succeed.
    pub fn connect_to(&self, source: &str, dst: &str) -> (String, TcpStream) {
        let dst: SocketAddr = dst.parse().expect("dst");
        self.try_connect(source, dst, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("connect from {source} to {dst}: {e}"))
    }

    pub fn spread(&self, n: usize) -> HashMap<String, usize> {
        let mut seen = HashMap::new();
        for _ in 0..n {
            *seen.entry(self.connect_from("10.0.0.50").0).or_insert(0) += 1;
        }
        seen
    }
}
