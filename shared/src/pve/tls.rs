//! TLS set-up for the client: CA file, fingerprint pinning, insecure, system roots.
//!
//! Pinning, CA files and insecure mode use our own rustls [`ServerCertVerifier`] on the
//! `ring` provider (never a process-wide default). It records the SHA-256 fingerprint of
//! every leaf certificate it is shown, so a refused handshake can report what the server
//! presented (`check-connection` prints it for pinning). Handshake signatures are always
//! checked, even when the certificate is not, so the peer proves it holds the key.
//!
//! System roots (and plain HTTP, for which reqwest still sets up TLS) go through reqwest's
//! built-in rustls-platform-verifier, which needs a process-level crypto provider;
//! [`build_http_client`] installs `ring` as the process default if none is set yet.

use std::fmt;
use std::sync::{Arc, Mutex};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

use super::config::{ClientConfig, Scheme, TlsPolicy, format_fingerprint};
use super::error::PveError;

/// The fingerprint of the last certificate a server presented to this client.
#[derive(Clone, Default)]
pub(crate) struct PresentedCert(Arc<Mutex<Option<[u8; 32]>>>);

impl PresentedCert {
    fn record(&self, fp: [u8; 32]) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(fp);
    }
    pub(crate) fn get(&self) -> Option<[u8; 32]> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

enum Check {
    Pin([u8; 32]),
    Roots(Arc<WebPkiServerVerifier>),
    Nothing,
}

struct LabVerifier {
    check: Check,
    provider: Arc<CryptoProvider>,
    presented: PresentedCert,
}

impl fmt::Debug for LabVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = match self.check {
            Check::Pin(_) => "pin",
            Check::Roots(_) => "ca-file",
            Check::Nothing => "insecure",
        };
        f.debug_struct("LabVerifier").field("mode", &mode).finish()
    }
}

impl ServerCertVerifier for LabVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fp: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        self.presented.record(fp);
        match &self.check {
            Check::Pin(pin) if *pin == fp => Ok(ServerCertVerified::assertion()),
            Check::Pin(_) => Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            )),
            Check::Roots(inner) => {
                inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
            }
            Check::Nothing => Ok(ServerCertVerified::assertion()),
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

fn load_ca_file(path: &std::path::Path) -> Result<RootCertStore, PveError> {
    let bytes = std::fs::read(path)
        .map_err(|e| PveError::Config(format!("cannot read CA file {}: {e}", path.display())))?;
    let mut roots = RootCertStore::empty();
    let mut n = 0;
    for cert in rustls_pemfile::certs(&mut bytes.as_slice()) {
        let cert = cert.map_err(|e| {
            PveError::Config(format!("cannot parse CA file {}: {e}", path.display()))
        })?;
        roots
            .add(cert)
            .map_err(|e| PveError::Config(format!("bad certificate in {}: {e}", path.display())))?;
        n += 1;
    }
    if n == 0 {
        return Err(PveError::Config(format!(
            "CA file {} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(roots)
}

/// Builds the one reqwest client of a connection, and the slot that will hold the
/// fingerprint of the certificate the server presents.
pub(crate) fn build_http_client(
    cfg: &ClientConfig,
) -> Result<(reqwest::Client, PresentedCert), PveError> {
    let presented = PresentedCert::default();
    let builder = reqwest::Client::builder()
        .timeout(cfg.request_timeout)
        .connect_timeout(cfg.request_timeout.min(std::time::Duration::from_secs(10)))
        .pool_idle_timeout(std::time::Duration::from_secs(60))
        .http1_only()
        // The API never redirects; a redirect would only leak credentials elsewhere.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("labfleet/", env!("CARGO_PKG_VERSION")));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let check = match (&cfg.scheme, &cfg.tls) {
        (Scheme::Http, _) => None,
        (Scheme::Https, TlsPolicy::SystemRoots) => None,
        (Scheme::Https, TlsPolicy::Fingerprint(fp)) => Some(Check::Pin(*fp)),
        (Scheme::Https, TlsPolicy::CaFile(path)) => {
            let roots = load_ca_file(path)?;
            let v = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| PveError::Config(format!("CA file {}: {e}", path.display())))?;
            Some(Check::Roots(v))
        }
        (Scheme::Https, TlsPolicy::Insecure) => {
            tracing::warn!(
                connection = %cfg.connection_name,
                host = %cfg.host,
                "TLS certificate verification is disabled for this connection (verify_tls: false)"
            );
            Some(Check::Nothing)
        }
    };
    let builder = match check {
        Some(check) => {
            let verifier = LabVerifier {
                check,
                provider: provider.clone(),
                presented: presented.clone(),
            };
            let mut tls = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| PveError::Config(format!("TLS setup: {e}")))?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth();
            // pveproxy speaks HTTP/1.1 only; HTTP/2 would also lose the reason phrase.
            tls.alpn_protocols = vec![b"http/1.1".to_vec()];
            builder.tls_backend_preconfigured(tls)
        }
        None => {
            // reqwest sets up its TLS connector even for plain HTTP, so it needs a provider.
            if CryptoProvider::get_default().is_none() {
                // Losing this race to another thread installing a provider is fine.
                let _ = rustls::crypto::ring::default_provider().install_default();
            }
            builder
        }
    };
    let client = builder
        .build()
        .map_err(|e| PveError::Config(format!("cannot build HTTP client: {e}")))?;
    Ok((client, presented))
}

/// Maps a reqwest error that has no response to Connect/Tls/Timeout.
pub(crate) fn transport_error(
    err: reqwest::Error,
    method: &str,
    path: &str,
    url: &str,
    presented: &PresentedCert,
) -> PveError {
    if err.is_timeout() {
        return PveError::Timeout {
            method: method.to_owned(),
            path: path.to_owned(),
        };
    }
    // reqwest's Display ends at its own layer; the cause sits deeper in the chain.
    let mut chain = Vec::new();
    let mut tls = false;
    let mut refused = false;
    let mut timed_out = false;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&err);
    while let Some(e) = cur {
        chain.push(e.to_string());
        if e.downcast_ref::<rustls::Error>().is_some() {
            tls = true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => refused = true,
                std::io::ErrorKind::TimedOut => timed_out = true,
                _ => {}
            }
            // io::Error::source() skips the wrapped error itself, so look at it here.
            if let Some(inner) = io.get_ref() {
                if inner.downcast_ref::<rustls::Error>().is_some() {
                    tls = true;
                }
                chain.push(inner.to_string());
            }
        }
        cur = e.source();
    }
    chain.dedup();
    let message = chain.iter().skip(1).cloned().collect::<Vec<_>>().join(": ");
    let message = if message.is_empty() {
        chain.first().cloned().unwrap_or_default()
    } else {
        message
    };
    let text = super::error::classify_transport_text(&chain.join(" "));
    if tls || text == super::error::TransportText::Certificate {
        return PveError::Tls {
            url: url.to_owned(),
            message,
            presented_fingerprint: presented.get().map(|fp| format_fingerprint(&fp)),
        };
    }
    if timed_out {
        return PveError::Timeout {
            method: method.to_owned(),
            path: path.to_owned(),
        };
    }
    let kind = if text == super::error::TransportText::Dns {
        super::error::ConnectFailure::Dns
    } else if refused {
        super::error::ConnectFailure::Refused
    } else {
        super::error::ConnectFailure::Other
    };
    PveError::Connect {
        kind,
        url: url.to_owned(),
        message,
    }
}
