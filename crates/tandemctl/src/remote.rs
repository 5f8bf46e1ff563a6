//! `tandemctl --remote HOST:PORT --api-key-file FILE --fingerprint SHA256:…`:
//! the control API of a node's clustermanager over TLS, with an API key as
//! bearer token, instead of the local root-only Unix socket. The
//! certificate is pinned by its SHA-256 fingerprint (the one clustermanager
//! logs and `tandemctl status --json` shows as `control_fingerprint`), so a
//! generated self-signed certificate is as safe as a CA-signed one.
//!
//! Also `tandemctl api-key new NAME --role read|admin`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};

use anyhow::{Context as _, bail};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tandem_proto::v1::cluster_manager_client::ClusterManagerClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Uri};

/// A clustermanager client, local (no token) or remote (bearer token).
pub type Cm = ClusterManagerClient<InterceptedService<Channel, Bearer>>;

/// Where tandemctl talks to, when `--remote` is given.
#[derive(Debug, Clone)]
pub struct Remote {
    pub address: String,
    pub token: String,
    pub fingerprint: String,
}

static REMOTE: OnceLock<Remote> = OnceLock::new();

/// Sets the remote target (once, from main).
pub fn set(r: Remote) {
    let _ = REMOTE.set(r);
}

/// The remote target, if any.
pub fn get() -> Option<&'static Remote> {
    REMOTE.get()
}

/// The command-line flags, checked and turned into a [`Remote`].
pub fn from_flags(
    address: &str,
    key_file: Option<&Path>,
    fingerprint: Option<&str>,
) -> anyhow::Result<Remote> {
    let Some(key_file) = key_file else {
        bail!(
            "--remote needs --api-key-file FILE (a file holding the token `tandemctl api-key new` printed)"
        );
    };
    let Some(fingerprint) = fingerprint else {
        bail!(
            "--remote needs --fingerprint SHA256:<hex> (the control API's certificate fingerprint: `tandemctl status --json` on the node, or clustermanager's log line `control API listening on …`)"
        );
    };
    let fingerprint = normalise_fingerprint(fingerprint).with_context(|| {
        format!("--fingerprint {fingerprint}: expected SHA256: and 64 hex digits")
    })?;
    let token = std::fs::read_to_string(key_file)
        .with_context(|| format!("--api-key-file: reading {}", key_file.display()))?
        .trim()
        .to_owned();
    if token.is_empty() || token.contains(char::is_whitespace) {
        bail!(
            "--api-key-file {}: expected the token alone on one line",
            key_file.display()
        );
    }
    if address.parse::<std::net::SocketAddr>().is_err() && !address.contains(':') {
        bail!("--remote {address}: expected HOST:PORT, e.g. 192.0.2.10:9443");
    }
    Ok(Remote {
        address: address.to_owned(),
        token,
        fingerprint,
    })
}

/// `SHA256:<64 lowercase hex>` from what an operator pastes (any case,
/// colons between bytes or not).
pub fn normalise_fingerprint(s: &str) -> Option<String> {
    let hex: String = s
        .trim()
        .strip_prefix("SHA256:")
        .or_else(|| s.trim().strip_prefix("sha256:"))
        .unwrap_or(s.trim())
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_lowercase();
    (hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit())).then(|| format!("SHA256:{hex}"))
}

fn fingerprint_of(der: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, der);
    format!("SHA256:{}", hex(d.as_ref()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Adds `authorization: Bearer <token>` to every call (nothing locally).
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// Accepts exactly the certificate whose SHA-256 is pinned.
#[derive(Debug)]
struct Pinned {
    fingerprint: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen = fingerprint_of(end_entity.as_ref());
        if seen == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the server's certificate is {seen}, not the pinned {}",
                self.fingerprint
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

async fn tls_channel(r: &Remote) -> anyhow::Result<Channel> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned {
            fingerprint: r.fingerprint.clone(),
            provider,
        }))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let address = r.address.clone();
    let host = address
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']').to_owned())
        .unwrap_or_default();
    let name = ServerName::try_from(host)
        .unwrap_or_else(|_| ServerName::try_from("tandem").expect("a valid DNS name"))
        .to_owned();
    let target = address.clone();
    // The URI is required by tonic and ignored by the connector.
    Endpoint::from_static("http://[::]:9443")
        .connect_timeout(std::time::Duration::from_secs(10))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let connector = connector.clone();
            let name = name.clone();
            let target = target.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(&target).await?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .map_err(|e| {
            let mut why = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                why = s.to_string();
                src = s.source();
            }
            anyhow::anyhow!("connecting to the control API at {address}: {why}")
        })
}

/// The clustermanager to talk to: the remote one with `--remote`, else the
/// local Unix socket.
pub async fn cluster_manager(runtime_dir: &Path) -> anyhow::Result<Cm> {
    let (ch, bearer) = match get() {
        Some(r) => {
            let v: MetadataValue<Ascii> = format!("Bearer {}", r.token)
                .parse()
                .context("the API key holds characters a header cannot carry")?;
            (tls_channel(r).await?, Bearer(Some(v)))
        }
        None => (
            tandem_runtime::connect(runtime_dir, "clustermanager")
                .await
                .with_context(|| {
                    format!(
                        "connecting to clustermanager in {} (is it running? `systemctl start tandem.target`)",
                        runtime_dir.display()
                    )
                })?,
            Bearer(None),
        ),
    };
    Ok(ClusterManagerClient::with_interceptor(ch, bearer))
}

/// Refuses a command that works on this node's files or sockets only.
pub fn local_only(what: &str) -> anyhow::Result<()> {
    if let Some(r) = get() {
        bail!(
            "`{what}` works on this node only, not over --remote {}: run it on the node",
            r.address
        );
    }
    Ok(())
}

/// The replicated configuration files of the remote node (ReadConfig), or
/// None when local.
pub async fn config_files(runtime_dir: &Path) -> anyhow::Result<Option<Vec<(String, Vec<u8>)>>> {
    if get().is_none() {
        return Ok(None);
    }
    let files = cluster_manager(runtime_dir)
        .await?
        .read_config(tandem_proto::v1::ReadConfigRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        .into_inner()
        .files;
    Ok(Some(
        files
            .into_iter()
            .map(|f| (f.path, f.content.unwrap_or_default()))
            .collect(),
    ))
}

/// The role of a new API key.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum KeyRole {
    /// Status, node table, cluster settings, farms, events.
    Read,
    /// Also every change (farms, backends, cluster settings, maintenance).
    Admin,
}

/// `tandemctl api-key new NAME --role ROLE [--out FILE]`: a new random
/// token, printed once (or written to FILE, mode 0600), and the
/// `[[api_keys]]` entry to paste into node.toml.
pub fn new_key(name: &str, role: KeyRole, out: Option<&PathBuf>) -> anyhow::Result<ExitCode> {
    use ring::rand::SecureRandom as _;
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        bail!("API key name `{name}`: use letters, digits, `-`, `_` or `.`");
    }
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("the system's random generator failed"))?;
    let token = format!("tdm_{}", hex(&bytes));
    let sha = hex(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref());
    let role = match role {
        KeyRole::Read => "read",
        KeyRole::Admin => "admin",
    };
    match out {
        Some(path) => {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("creating {} (it must not exist)", path.display()))?;
            writeln!(f, "{token}").with_context(|| format!("writing {}", path.display()))?;
            eprintln!("token written to {} (mode 0600)", path.display());
        }
        None => {
            eprintln!(
                "the token (shown once; keep it in a file only its user reads, for --api-key-file):"
            );
            println!("{token}");
        }
    }
    eprintln!(
        "add to node.toml of every node, then `tandemctl reload clustermanager` (only the SHA-256 is stored):"
    );
    println!("[[api_keys]]\nname = \"{name}\"\nrole = \"{role}\"\nsha256 = \"{sha}\"");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_read_as_operators_paste_them() {
        let hex = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let want = format!("SHA256:{hex}");
        assert_eq!(normalise_fingerprint(&want).as_deref(), Some(want.as_str()));
        assert_eq!(
            normalise_fingerprint(&hex.to_uppercase()).as_deref(),
            Some(want.as_str())
        );
        let colons: Vec<String> = hex
            .as_bytes()
            .chunks(2)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect();
        assert_eq!(
            normalise_fingerprint(&format!("sha256:{}", colons.join(":"))).as_deref(),
            Some(want.as_str())
        );
        assert_eq!(normalise_fingerprint("SHA256:abc"), None);
        assert_eq!(fingerprint_of(b"test"), want);
    }
}
