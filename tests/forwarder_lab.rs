//! A load-balancer lab: a client (10.0.0.50-57), a balancer node holding
//! the VIP (10.0.0.100) and the floating SNAT source (10.1.0.100), and three
//! backends (10.1.0.11-13:8080) that answer a connection with their name and
//! then echo lines. lb-forwarder runs in the balancer namespace.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use tandem_lab::{Lab, LabChild, Netns};
use tandem_proto::v1::{self, lb_forwarder_client::LbForwarderClient};

pub const VIP: &str = "10.0.0.100";

pub struct FwdLab {
    pub lab: Lab,
    pub client: Netns,
    pub lb: Netns,
    pub config: PathBuf,
    pub runtime: PathBuf,
    pub fwd: Option<LabChild>,
    /// b1, b2, b3.
    pub backends: Vec<Netns>,
    _tmp: tempfile::TempDir,
}

impl FwdLab {
    pub fn new(farm: &str) -> FwdLab {
        Self::build(farm, false)
    }

    /// The lab for a direct-server-return farm on port 80: the backends
    /// also sit on the clients' LAN (10.0.0.11-13), hold the VIP on `lo`
    /// without answering ARP for it, and answer the clients directly; the
    /// balancer reaches them over the back network.
    pub fn new_dsr(farm: &str) -> FwdLab {
        Self::build(farm, true)
    }

    fn build(farm: &str, dsr: bool) -> FwdLab {
        let lab = Lab::new().expect("lab");
        let lan = lab.bridge("lan").expect("lan");
        let back = lab.bridge("back").expect("back");
        let client = lab.netns("cl").expect("client");
        let sources: Vec<String> = (50..58).map(|i| format!("10.0.0.{i}/24")).collect();
        let sources: Vec<&str> = sources.iter().map(String::as_str).collect();
        lab.attach(&client, "eth0", &lan, &sources)
            .expect("client eth0");
        let lb = lab.netns("lb").expect("lb");
        lab.attach(&lb, "eth0", &lan, &["10.0.0.1/24", "10.0.0.100/24"])
            .expect("lb eth0");
        lab.attach(&lb, "eth1", &back, &["10.1.0.1/24", "10.1.0.100/24"])
            .expect("lb eth1");
        lb.sysctl("net.ipv4.ip_forward", "1").expect("forwarding");
        let mut backends = Vec::new();
        for i in 1..=3 {
            let ns = lab.netns(&format!("b{i}")).expect("backend");
            lab.attach(&ns, "eth0", &back, &[&format!("10.1.0.1{i}/24")])
                .expect("backend eth0");
            crate::echo_backend(&ns, &format!("b{i}"), 8080);
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
        std::fs::write(config.join("node.toml"), "name = \"lb1\"\n").expect("node.toml");
        std::fs::write(config.join("farms/web.toml"), farm).expect("farm");
        let mut l = FwdLab {
            lab,
            client,
            lb,
            config,
            runtime,
            fwd: None,
            backends,
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

    pub fn spread(&self, n: usize) -> HashMap<String, usize> {
        let mut seen = HashMap::new();
        for _ in 0..n {
            *seen.entry(self.connect_from("10.0.0.50").0).or_insert(0) += 1;
        }
        seen
    }
}
