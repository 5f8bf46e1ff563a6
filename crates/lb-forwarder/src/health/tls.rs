//! TLS for `https` health checks, without certificate verification.
//!
//! Why: a health check asks "does this backend answer HTTP over TLS with the
//! expected status?", not "is this the server it claims to be?". Backends
//! behind a load balancer commonly present self-signed or internal-CA
//! certificates for names that are not their addresses, and Tandem dials
//! them by IP address, so name and chain checks would fail on healthy
//! backends. keepalived's `SSL_GET` behaves the same way. Nothing sensitive
//! is sent and the answer only feeds the rotation.
//!
//! What is still checked: the handshake itself. The server must prove it
//! holds the private key of the certificate it sent (the handshake
//! signature is verified with ring's algorithms), so a broken TLS stack or
//! a key/certificate mismatch on the backend still fails the check.

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};

/// Accepts any certificate chain for any name, but verifies handshake
/// signatures. Only for health checks (see the module documentation).
#[derive(Debug)]
pub(crate) struct AcceptAnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
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
        verify_tls13_signature(
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

/// The client configuration every https check shares: ring, TLS 1.2 and
/// 1.3, no client certificate, [`AcceptAnyCertificate`]. Built once; an
/// error (none is expected with ring's defaults) is kept and reported by
/// every https probe rather than aborting the daemon.
pub(crate) fn client_config() -> Result<Arc<ClientConfig>, rustls::Error> {
    static CONFIG: OnceLock<Result<Arc<ClientConfig>, rustls::Error>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate { provider }))
                .with_no_client_auth();
            Ok(Arc::new(config))
        })
        .clone()
}
