//! Health checks against real servers: probes on loopback (ports the test
//! binds itself) and inside a lab namespace, and the runner following
//! backends that go down and come back.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lb_forwarder::health::{BackendKey, Health, HealthEvent, HealthMonitor, ProbeError, Prober};
use tandem_config::{Farm, HealthCheck, HealthCheckKind};
use tandem_lab::Lab;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn check(kind: HealthCheckKind, timeout_ms: u32) -> HealthCheck {
    HealthCheck {
        kind,
        timeout_ms,
        ..HealthCheck::default()
    }
}

/// A loopback port nobody listens on (bound, then released).
async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind((LOCALHOST, 0)).await.expect("bind");
    l.local_addr().expect("addr")
}

// ---------------------------------------------------------------- tcp

#[tokio::test]
async fn tcp_check_passes_on_an_open_port() {
    let listener = TcpListener::bind((LOCALHOST, 0)).await.expect("bind");
    let target = listener.local_addr().expect("addr");
    let prober = Prober::new(&check(HealthCheckKind::Tcp, 1000));
    assert_eq!(prober.probe(target).await, Ok(()));
    drop(listener);
    // Control: the same port, closed.
    assert_eq!(prober.probe(target).await, Err(ProbeError::Refused));
}

#[tokio::test]
async fn tcp_check_of_a_closed_port_fails_with_connection_refused() {
    let target = closed_port().await;
    let result = Prober::new(&check(HealthCheckKind::Tcp, 1000))
        .probe(target)
        .await;
    assert_eq!(result, Err(ProbeError::Refused));
    assert_eq!(
        result.map_err(|e| e.to_string()),
        Err("connection refused".into())
    );
}

/// Inside a lab: an address of the subnet nobody holds never answers ARP,
/// so the SYN is never sent and connect hangs (for ~3 s, then "no route to
/// host"). The check must give up at its own timeout. Control: a backend
/// that does hold an address on the same bridge passes.
#[test]
fn tcp_check_of_a_silent_address_times_out_within_timeout_ms() {
    let lab = Lab::new().expect("lab");
    let lan = lab.bridge("lan").expect("bridge");
    let checker = lab.netns("chk").expect("netns");
    let backend = lab.netns("be").expect("netns");
    lab.attach(&checker, "eth0", &lan, &["10.77.0.1/24"])
        .expect("attach checker");
    lab.attach(&backend, "eth0", &lan, &["10.77.0.2/24"])
        .expect("attach backend");
    // The socket belongs to the backend namespace whatever thread keeps it.
    let _listener = backend
        .run(|| std::net::TcpListener::bind("10.77.0.2:8080"))
        .expect("in netns")
        .expect("bind");

    let timeout_ms = 300;
    let results = checker
        .run(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let prober = Prober::new(&check(HealthCheckKind::Tcp, timeout_ms));
                let mut out = Vec::new();
                for target in ["10.77.0.2:8080", "10.77.0.99:8080"] {
                    let start = Instant::now();
                    let result = prober.probe(target.parse().expect("addr")).await;
                    out.push((result, start.elapsed()));
                }
                out
            })
        })
        .expect("in netns");

    assert_eq!(results[0].0, Ok(()), "control: the live backend passes");
    let (result, elapsed) = &results[1];
    assert_eq!(result, &Err(ProbeError::Timeout { timeout_ms }));
    assert_eq!(
        result.clone().map_err(|e| e.to_string()),
        Err("timeout after 300 ms".into())
    );
    assert!(
        *elapsed >= Duration::from_millis(290) && *elapsed < Duration::from_millis(1500),
        "gave up after {elapsed:?}"
    );
}

// ---------------------------------------------------------------- http(s)

/// Serves every connection one fixed status line and reports each request
/// received. `tls`: wrap connections in this acceptor first.
async fn http_server(
    status: &'static str,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> (SocketAddr, mpsc::UnboundedReceiver<String>, JoinHandle<()>) {
    let listener = TcpListener::bind((LOCALHOST, 0)).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::unbounded_channel();
    let server = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                match tls {
                    Some(acceptor) => {
                        if let Ok(s) = acceptor.accept(stream).await {
                            answer(s, status, tx).await;
                        }
                    }
                    None => answer(stream, status, tx).await,
                }
            });
        }
    });
    (addr, rx, server)
}

async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    status: &str,
    tx: mpsc::UnboundedSender<String>,
) {
    let mut request = Vec::new();
    let mut buf = [0u8; 512];
    while !request.ends_with(b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
        // Like nginx on a plain port given a TLS ClientHello.
        if !b"GET ".starts_with(&request[..request.len().min(4)]) {
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
            let _ = s.shutdown().await;
            return;
        }
    }
    let _ = tx.send(String::from_utf8_lossy(&request).into_owned());
    let response = format!("{status}\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello");
    let _ = s.write_all(response.as_bytes()).await;
    let _ = s.shutdown().await;
}

fn http_check(kind: HealthCheckKind, path: Option<&str>, expect: Option<u16>) -> HealthCheck {
    HealthCheck {
        path: path.map(str::to_owned),
        expect_status: expect,
        ..check(kind, 1000)
    }
}

#[tokio::test]
async fn http_check_passes_on_200_and_sends_the_documented_request() {
    let (addr, mut requests, _server) = http_server("HTTP/1.1 200 OK", None).await;
    let prober = Prober::new(&http_check(HealthCheckKind::Http, Some("/healthz"), None));
    assert_eq!(prober.probe(addr).await, Ok(()));
    let request = requests.recv().await.expect("request");
    assert_eq!(
        request,
        format!(
            "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nUser-Agent: tandem-health/1\r\n\r\n"
        )
    );
}

#[tokio::test]
async fn http_check_fails_on_503_naming_both_statuses() {
    let (addr, _requests, _server) = http_server("HTTP/1.1 503 Service Unavailable", None).await;
    let result = Prober::new(&http_check(HealthCheckKind::Http, None, None))
        .probe(addr)
        .await;
    assert_eq!(
        result.map_err(|e| e.to_string()),
        Err("HTTP 503, expected 200".into())
    );
}

#[tokio::test]
async fn http_check_compares_with_the_configured_status() {
    let (addr, _requests, _server) = http_server("HTTP/1.1 200 OK", None).await;
    let expect_204 = Prober::new(&http_check(HealthCheckKind::Http, None, Some(204)));
    assert_eq!(
        expect_204.probe(addr).await,
        Err(ProbeError::Status {
            got: 200,
            expected: 204
        })
    );
    let (addr, _requests, _server) = http_server("HTTP/1.0 204 No Content", None).await;
    assert_eq!(expect_204.probe(addr).await, Ok(()));
}

#[tokio::test]
async fn http_check_fails_on_a_server_that_is_not_http() {
    // Answers with an SSH banner, without waiting for the request.
    let listener = TcpListener::bind((LOCALHOST, 0)).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let _server = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.write_all(b"SSH-2.0-OpenSSH_9.6\r\n").await;
        }
    });
    let result = Prober::new(&http_check(HealthCheckKind::Http, None, None))
        .probe(addr)
        .await;
    assert!(
        matches!(&result, Err(ProbeError::BadResponse(r)) if r.contains("SSH-2.0")),
        "{result:?}"
    );
}

#[tokio::test]
async fn http_check_of_a_server_that_never_answers_times_out() {
    // Accepts, reads, never writes: the connect succeeds, the status line
    // never comes.
    let listener = TcpListener::bind((LOCALHOST, 0)).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let _server = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let start = Instant::now();
    let result = Prober::new(&with_timeout(
        http_check(HealthCheckKind::Http, None, None),
        200,
    ))
    .probe(addr)
    .await;
    assert_eq!(result, Err(ProbeError::Timeout { timeout_ms: 200 }));
    assert!(start.elapsed() < Duration::from_millis(1000));
}

fn with_timeout(check: HealthCheck, timeout_ms: u32) -> HealthCheck {
    HealthCheck {
        timeout_ms,
        ..check
    }
}

/// A TLS acceptor with a fresh self-signed certificate for `name`.
fn self_signed_acceptor(name: &str) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    let certified = rcgen::generate_simple_self_signed(vec![name.to_owned()]).expect("rcgen");
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        certified.signing_key.serialize_der(),
    ));
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(vec![certified.cert.der().clone()], key)
    .expect("server config");
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

#[tokio::test]
async fn https_check_accepts_a_self_signed_certificate_for_another_name() {
    // Self-signed, and for a name that is not the address dialled: both
    // would fail certificate verification, which health checks skip.
    let acceptor = self_signed_acceptor("backend.example.invalid");
    let (addr, mut requests, _server) = http_server("HTTP/1.1 200 OK", Some(acceptor)).await;
    let prober = Prober::new(&http_check(HealthCheckKind::Https, Some("/ready"), None));
    assert_eq!(prober.probe(addr).await, Ok(()));
    let request = requests.recv().await.expect("request");
    assert!(request.starts_with("GET /ready HTTP/1.1\r\n"), "{request}");
}

#[tokio::test]
async fn https_check_fails_on_503_over_tls() {
    let acceptor = self_signed_acceptor("127.0.0.1");
    let (addr, _requests, _server) = http_server("HTTP/1.1 503 Busy", Some(acceptor)).await;
    let result = Prober::new(&http_check(HealthCheckKind::Https, None, None))
        .probe(addr)
        .await;
    assert_eq!(
        result,
        Err(ProbeError::Status {
            got: 503,
            expected: 200
        })
    );
}

#[tokio::test]
async fn https_check_of_a_plain_http_server_fails_the_handshake() {
    let (addr, _requests, _server) = http_server("HTTP/1.1 200 OK", None).await;
    let result = Prober::new(&with_timeout(
        http_check(HealthCheckKind::Https, None, None),
        2000,
    ))
    .probe(addr)
    .await;
    assert!(matches!(result, Err(ProbeError::Tls(_))), "{result:?}");
    // Control: the same server passes an http check.
    let http = Prober::new(&http_check(HealthCheckKind::Http, None, None));
    assert_eq!(http.probe(addr).await, Ok(()));
}

// ---------------------------------------------------------------- command

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

fn command_check(path: &Path, timeout_ms: u32) -> HealthCheck {
    HealthCheck {
        command: Some(path.display().to_string()),
        ..check(HealthCheckKind::Command, timeout_ms)
    }
}

#[tokio::test]
async fn command_check_passes_on_exit_0_and_gets_address_and_port() {
    let dir = tempfile::tempdir().expect("tempdir");
    let seen = dir.path().join("seen");
    let env = dir.path().join("env");
    let ok = script(
        dir.path(),
        "ok.sh",
        &format!(
            "printf '%s|%s|%s' \"$#\" \"$1\" \"$2\" > {}\nenv > {}\nexit 0",
            seen.display(),
            env.display()
        ),
    );
    let target: SocketAddr = "192.0.2.7:8443".parse().expect("addr");
    let result = Prober::new(&command_check(&ok, 2000)).probe(target).await;
    assert_eq!(result, Ok(()));
    assert_eq!(
        std::fs::read_to_string(&seen).expect("seen"),
        "2|192.0.2.7|8443"
    );
    // The daemon's environment (cargo's, here) is not passed on.
    let env = std::fs::read_to_string(&env).expect("env");
    assert!(env.contains("PATH="), "{env}");
    assert!(!env.contains("CARGO"), "{env}");
}

#[tokio::test]
async fn command_check_fails_on_exit_2_with_its_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fail = script(
        dir.path(),
        "fail.sh",
        "echo 'db is'\necho 'read-only' >&2\nexit 2",
    );
    let result = Prober::new(&command_check(&fail, 2000))
        .probe((LOCALHOST, 80).into())
        .await;
    assert_eq!(
        result.map_err(|e| e.to_string()),
        Err("exit status 2: db is read-only".into())
    );
    let quiet = script(dir.path(), "quiet.sh", "exit 2");
    let result = Prober::new(&command_check(&quiet, 2000))
        .probe((LOCALHOST, 80).into())
        .await;
    assert_eq!(
        result.map_err(|e| e.to_string()),
        Err("exit status 2".into())
    );
}

#[tokio::test]
async fn command_check_with_a_lot_of_output_still_passes() {
    // More than a pipe buffer: the checker must keep reading or the
    // command blocks and times out.
    let dir = tempfile::tempdir().expect("tempdir");
    let chatty = script(
        dir.path(),
        "chatty.sh",
        "head -c 1000000 /dev/zero | tr '\\0' x\nexit 0",
    );
    let result = Prober::new(&command_check(&chatty, 5000))
        .probe((LOCALHOST, 80).into())
        .await;
    assert_eq!(result, Ok(()));
}

/// Whether `pid` has terminated (gone, or a zombie waiting to be reaped).
fn is_dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

#[tokio::test]
async fn command_check_outliving_its_timeout_is_killed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pidfile = dir.path().join("pid");
    // `exec`: the process that sleeps is the one the checker started.
    let slow = script(
        dir.path(),
        "slow.sh",
        &format!("echo $$ > {}\nexec sleep 30", pidfile.display()),
    );
    let start = Instant::now();
    let result = Prober::new(&command_check(&slow, 300))
        .probe((LOCALHOST, 80).into())
        .await;
    let elapsed = start.elapsed();
    assert_eq!(result, Err(ProbeError::Timeout { timeout_ms: 300 }));
    assert!(elapsed < Duration::from_millis(1500), "took {elapsed:?}");

    let pid: u32 = std::fs::read_to_string(&pidfile)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    let deadline = Instant::now() + Duration::from_secs(3);
    while !is_dead(pid) {
        assert!(Instant::now() < deadline, "command {pid} still runs");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A check script's own children die with it: here a backgrounded
/// `sleep` that would otherwise outlive the timed-out check. Control: the
/// child is alive while the check runs.
#[tokio::test]
async fn command_check_children_are_killed_with_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pidfile = dir.path().join("child");
    let slow = script(
        dir.path(),
        "spawner.sh",
        &format!("sleep 30 &\necho $! > {}\nsleep 30", pidfile.display()),
    );
    let probe = tokio::spawn(async move {
        Prober::new(&command_check(&slow, 600))
            .probe((LOCALHOST, 80).into())
            .await
    });
    let deadline = Instant::now() + Duration::from_secs(3);
    let pid: u32 = loop {
        if let Some(p) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|t| t.trim().parse().ok())
        {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "the script did not start its child"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(!is_dead(pid), "the child runs while the check runs");
    let result = probe.await.expect("probe task");
    assert_eq!(result, Err(ProbeError::Timeout { timeout_ms: 600 }));
    let deadline = Instant::now() + Duration::from_secs(3);
    while !is_dead(pid) {
        assert!(
            Instant::now() < deadline,
            "the check's child {pid} outlived it"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn command_check_of_a_missing_program_says_so() {
    let result = Prober::new(&command_check(Path::new("/nonexistent/check.sh"), 1000))
        .probe((LOCALHOST, 80).into())
        .await;
    let reason = result.map_err(|e| e.to_string()).expect_err("fails");
    assert!(
        reason.starts_with("cannot run /nonexistent/check.sh:"),
        "{reason}"
    );
}

#[tokio::test]
async fn none_check_always_passes_without_probing() {
    let prober = Prober::new(&check(HealthCheckKind::None, 1000));
    assert!(prober.is_none());
    assert_eq!(prober.probe(closed_port().await).await, Ok(()));
}

// ---------------------------------------------------------------- runner

/// A TCP backend on loopback that can be stopped and started on the same
/// port.
struct Backend {
    addr: SocketAddr,
    server: Option<JoinHandle<()>>,
}

impl Backend {
    async fn start() -> Backend {
        let listener = TcpListener::bind((LOCALHOST, 0)).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        Backend {
            addr,
            server: Some(serve(listener)),
        }
    }

    async fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
            // Returns once the task, and so the listener, is dropped.
            let _ = server.await;
        }
    }

    async fn restart(&mut self) {
        let listener = TcpListener::bind(self.addr).await.expect("rebind");
        self.server = Some(serve(listener));
    }
}

fn serve(listener: TcpListener) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            // An accept error (a client that gave up) must not close the port.
            let _ = listener.accept().await;
        }
    })
}

fn farm(name: &str, check: &str, backends: &[(SocketAddr, &str)]) -> Farm {
    let mut text = format!(
        "name = \"{name}\"\nvip = \"10.0.0.100\"\nport = 80\nsnat_address = \"10.1.0.100\"\n[health_check]\n{check}\n"
    );
    for (addr, state) in backends {
        text += &format!(
            "[[backends]]\naddress = \"{}\"\nport = {}\nstate = \"{state}\"\n",
            addr.ip(),
            addr.port()
        );
    }
    toml::from_str(&text).expect("farm")
}

fn key(farm: &str, addr: SocketAddr) -> BackendKey {
    BackendKey {
        farm: farm.into(),
        address: addr.ip(),
        port: Some(addr.port()),
    }
}

/// The next event for `addr`, within `within`; events of other backends
/// are collected into `others`.
async fn next_event_for(
    events: &mut broadcast::Receiver<HealthEvent>,
    addr: SocketAddr,
    within: Duration,
    others: &mut Vec<HealthEvent>,
) -> Option<HealthEvent> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) => return None,
            Ok(Ok(e)) if e.target == addr => return Some(e),
            Ok(Ok(e)) => others.push(e),
            Ok(Err(e)) => panic!("event stream: {e}"),
        }
    }
}

fn shutdown_signal() -> (
    watch::Sender<bool>,
    impl Future<Output = ()> + Send + 'static,
) {
    let (tx, mut rx) = watch::channel(false);
    (tx, async move {
        let _ = rx.wait_for(|s| *s).await;
    })
}

const FAST: &str = "interval_ms = 100\ntimeout_ms = 90\nrise = 2\nfall = 3";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_follows_a_backend_that_goes_down_and_comes_back() {
    let (interval, rise, fall) = (Duration::from_millis(100), 2u32, 3u32);
    let slack = Duration::from_millis(1000);
    let a = Backend::start().await;
    let mut b = Backend::start().await;
    let web = farm("web", FAST, &[(a.addr, "up"), (b.addr, "up")]);
    let (stop, shutdown) = shutdown_signal();
    let monitor = HealthMonitor::start(std::slice::from_ref(&web), shutdown);
    let mut events = monitor.subscribe();
    let failing = monitor.failing();

    let initial = monitor.snapshot();
    assert_eq!(initial.len(), 2);
    assert!(
        initial.values().all(|h| h.health == Health::Unknown),
        "{initial:?}"
    );

    // Both become healthy, in either order.
    let mut healthy = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while healthy.len() < 2 {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(e)) => healthy.insert(e.target, e),
            other => panic!("both backends healthy: {other:?}, got {healthy:?}"),
        };
    }
    for addr in [a.addr, b.addr] {
        let e = &healthy[&addr];
        assert_eq!((e.old, e.new), (Health::Unknown, Health::Healthy));
        assert_eq!(e.reason, "2 checks passed in a row");
        assert_eq!(e.key, key("web", addr));
    }

    b.stop().await;
    let down = Instant::now();
    let mut others = Vec::new();
    let e = next_event_for(&mut events, b.addr, fall * interval + slack, &mut others)
        .await
        .expect("backend b reported failing");
    let took = down.elapsed();
    assert_eq!((e.old, e.new), (Health::Healthy, Health::Failing));
    assert_eq!(e.reason, "connection refused");
    // `fall` failures in a row: the first may come right after the stop.
    assert!(took >= (fall - 1) * interval, "failing after only {took:?}");
    assert!(failing.borrow().contains(&key("web", b.addr)));
    assert_eq!(failing.borrow().len(), 1);
    let now = monitor.snapshot();
    assert_eq!(now[&key("web", a.addr)].health, Health::Healthy);
    assert_eq!(now[&key("web", b.addr)].health, Health::Failing);
    assert_eq!(now[&key("web", b.addr)].reason, "connection refused");

    b.restart().await;
    let up = Instant::now();
    let e = next_event_for(&mut events, b.addr, rise * interval + slack, &mut others)
        .await
        .expect("backend b reported healthy again");
    let took = up.elapsed();
    assert_eq!((e.old, e.new), (Health::Failing, Health::Healthy));
    assert!(took >= (rise - 1) * interval, "healthy after only {took:?}");
    assert!(failing.borrow().is_empty());
    assert!(others.is_empty(), "backend a stayed healthy: {others:?}");

    let _ = stop.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_stops_probing_at_shutdown() {
    let mut a = Backend::start().await;
    let check = "interval_ms = 200\ntimeout_ms = 180\nrise = 1\nfall = 1";
    let (stop, shutdown) = shutdown_signal();
    let monitor = HealthMonitor::start(&[farm("web", check, &[(a.addr, "up")])], shutdown);
    let mut events = monitor.subscribe();
    let mut others = Vec::new();
    let within = Duration::from_secs(2);
    let e = next_event_for(&mut events, a.addr, within, &mut others).await;
    assert_eq!(e.map(|e| e.new), Some(Health::Healthy));

    // Control: while running, a stop is noticed.
    a.stop().await;
    let e = next_event_for(&mut events, a.addr, within, &mut others).await;
    assert_eq!(e.map(|e| e.new), Some(Health::Failing));
    a.restart().await;
    let e = next_event_for(&mut events, a.addr, within, &mut others).await;
    assert_eq!(e.map(|e| e.new), Some(Health::Healthy));

    let _ = stop.send(true);
    tokio::time::sleep(Duration::from_millis(200)).await;
    a.stop().await;
    let e = next_event_for(
        &mut events,
        a.addr,
        Duration::from_millis(1000),
        &mut others,
    )
    .await;
    assert_eq!(e, None, "no probe after shutdown");
    assert_eq!(
        monitor.snapshot()[&key("web", a.addr)].health,
        Health::Healthy
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_skips_down_and_maintenance_backends_and_trusts_kind_none() {
    let closed = closed_port().await;
    let down = SocketAddr::new(LOCALHOST, closed.port().wrapping_add(1).max(1));
    let maint = SocketAddr::new("127.0.0.2".parse().expect("ip"), closed.port());
    let drain = SocketAddr::new("127.0.0.3".parse().expect("ip"), closed.port());
    let web = farm(
        "web",
        FAST,
        &[
            (closed, "up"),
            (down, "down"),
            (maint, "maintenance"),
            (drain, "drain"),
        ],
    );
    let dns = farm("dns", "kind = \"none\"", &[(closed, "up")]);
    let (_stop, shutdown) = shutdown_signal();
    let monitor = HealthMonitor::start(&[web, dns], shutdown);

    // kind none: healthy at once, without a probe (the port is closed).
    let now = monitor.snapshot();
    assert_eq!(now[&key("dns", closed)].health, Health::Healthy);
    assert_eq!(now[&key("dns", closed)].reason, "health check disabled");

    let mut failing = monitor.failing();
    tokio::time::timeout(
        Duration::from_secs(3),
        failing.wait_for(|f| f.contains(&key("web", closed)) && f.contains(&key("web", drain))),
    )
    .await
    .expect("up and drain backends probed and failing")
    .expect("watch");
    let now = monitor.snapshot();
    assert!(!now.contains_key(&key("web", down)), "{now:?}");
    assert!(!now.contains_key(&key("web", maint)), "{now:?}");
    assert_eq!(now.len(), 3, "{now:?}");
    assert_eq!(now[&key("dns", closed)].health, Health::Healthy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_reconfigure_keeps_the_health_of_backends_that_remain() {
    let a = Backend::start().await;
    let b = Backend::start().await;
    let c = Backend::start().await;
    let dead = closed_port().await;
    let (_stop, shutdown) = shutdown_signal();
    let mut monitor = HealthMonitor::start(
        &[farm(
            "web",
            FAST,
            &[(a.addr, "up"), (b.addr, "up"), (dead, "up")],
        )],
        shutdown,
    );
    let mut health = monitor.watch();
    tokio::time::timeout(
        Duration::from_secs(3),
        health.wait_for(|m| {
            m[&key("web", a.addr)].health == Health::Healthy
                && m[&key("web", b.addr)].health == Health::Healthy
                && m[&key("web", dead)].health == Health::Failing
        }),
    )
    .await
    .expect("initial verdicts")
    .expect("watch");
    let mut events = monitor.subscribe();

    // a: same check, but slower; b: removed; c: new; dead: check disabled.
    let slower = "interval_ms = 150\ntimeout_ms = 120\nrise = 2\nfall = 3";
    monitor.reconfigure(&[
        farm(
            "web",
            slower,
            &[(a.addr, "up"), (c.addr, "up"), (dead, "up")],
        ),
        farm("off", "kind = \"none\"", &[(dead, "up")]),
    ]);
    // `dead` of farm web keeps its check; only farm off's copy is unchecked.
    let now = monitor.snapshot();
    assert_eq!(now[&key("web", a.addr)].health, Health::Healthy, "kept");
    assert_eq!(now[&key("web", dead)].health, Health::Failing, "kept");
    assert_eq!(now[&key("web", c.addr)].health, Health::Unknown, "new");
    assert_eq!(now[&key("off", dead)].health, Health::Healthy);
    assert!(!now.contains_key(&key("web", b.addr)), "removed");
    assert_eq!(
        monitor
            .failing()
            .borrow()
            .iter()
            .cloned()
            .collect::<Vec<_>>(),
        vec![key("web", dead)]
    );

    let mut seen: HashMap<BackendKey, Vec<(Health, Health)>> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(1500);
    while let Ok(Ok(e)) = tokio::time::timeout_at(deadline, events.recv()).await {
        seen.entry(e.key).or_default().push((e.old, e.new));
    }
    assert_eq!(
        seen.remove(&key("off", dead)),
        Some(vec![(Health::Unknown, Health::Healthy)])
    );
    assert_eq!(
        seen.remove(&key("web", c.addr)),
        Some(vec![(Health::Unknown, Health::Healthy)])
    );
    assert!(
        seen.is_empty(),
        "no other change: {seen:?} {:?}",
        monitor.snapshot()
    );
}

// ---------------------------------------------------------------- logs

/// Collects the log lines of farm `logs`.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<(tracing::Level, String)>>>);

impl tracing::Subscriber for Lines {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        struct Message(String);
        impl tracing::field::Visit for Message {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                if f.name() == "message" {
                    self.0 = format!("{v:?}");
                }
            }
        }
        let mut m = Message(String::new());
        event.record(&mut m);
        if m.0.starts_with("farm logs:")
            && let Ok(mut lines) = self.0.lock()
        {
            lines.push((*event.metadata().level(), m.0));
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// The process-wide subscriber: a thread-local one (`set_default`) is not
/// enough, because tracing caches "nobody listens" for a log statement first
/// reached on a thread without one — here, by the other tests' monitors.
/// The farm name of this test (`logs`) sets its lines apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_logs_each_change_and_a_farm_with_no_working_backend() {
    let lines = Lines::default();
    tracing::subscriber::set_global_default(lines.clone()).expect("only this test sets one");
    let mut a = Backend::start().await;
    let mut b = Backend::start().await;
    let check = "interval_ms = 200\ntimeout_ms = 180\nrise = 1\nfall = 1";
    let (_stop, shutdown) = shutdown_signal();
    let monitor = HealthMonitor::start(
        &[farm("logs", check, &[(a.addr, "up"), (b.addr, "up")])],
        shutdown,
    );
    let mut health = monitor.watch();
    let within = Duration::from_secs(3);
    let all = |h: Health| {
        move |m: &HashMap<BackendKey, lb_forwarder::health::BackendHealth>| {
            m.values().all(|v| v.health == h)
        }
    };
    tokio::time::timeout(within, health.wait_for(all(Health::Healthy)))
        .await
        .expect("healthy")
        .expect("watch");
    // Lines are logged just after the change is published: poll for them.
    let logged = |level: tracing::Level, line: String| {
        let lines = lines.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(3);
            loop {
                let n = lines
                    .0
                    .lock()
                    .expect("lines")
                    .iter()
                    .filter(|(l, m)| *l == level && *m == line)
                    .count();
                if n > 0 || Instant::now() > deadline {
                    return n;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    let warning = || {
        logged(
            tracing::Level::WARN,
            "farm logs: every backend is failing; its new connections are dropped".into(),
        )
    };

    a.stop().await;
    let expected = format!(
        "farm logs: backend {} failing (was healthy): connection refused",
        a.addr
    );
    assert_eq!(logged(tracing::Level::INFO, expected).await, 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        lines
            .0
            .lock()
            .expect("lines")
            .iter()
            .filter(|(l, _)| *l == tracing::Level::WARN)
            .count(),
        0,
        "control: b still works"
    );
    b.stop().await;
    assert_eq!(warning().await, 1);
    let logged = lines.0.lock().expect("lines").clone();
    let expected = format!(
        "farm logs: backend {} healthy (was unknown): check passed",
        b.addr
    );
    assert!(logged.iter().any(|(_, m)| *m == expected), "{logged:?}");
}
