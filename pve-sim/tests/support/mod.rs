//! What the pve-sim integration tests share: a reqwest client pinned to the simulator's
//! certificate, token/ticket auth, and replies with status, reason phrase and body.

// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use pve_sim::{Sim, SimConfig, SimHandle};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde_json::Value;
use sha2::{Digest, Sha256};

pub const TOKEN: &str = "PVEAPIToken=root@pam!labfleet=a3058775-b2df-4b2b-9997-bdc0e3d45c01";

#[derive(Debug)]
struct Pinned {
    fp: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        ee: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = Sha256::digest(ee.as_ref())
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":");
        if got == self.fp {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General("fingerprint mismatch".into()))
        }
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            m,
            c,
            d,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            m,
            c,
            d,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

pub fn cluster_file() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/sim/cluster.yml")
}

pub async fn start_with(scale: f64, tweak: impl FnOnce(&mut SimConfig)) -> (SimHandle, Api) {
    let mut cfg = SimConfig::from_cluster_file(&cluster_file()).unwrap();
    cfg.time_scale = scale;
    cfg.cluster.api.auth_failure_delay_seconds = 0.01;
    tweak(&mut cfg);
    let sim = Sim::start(cfg).await.unwrap();
    let api = Api::new(&sim);
    (sim, api)
}

pub async fn start(scale: f64) -> (SimHandle, Api) {
    start_with(scale, |_| {}).await
}

#[derive(Clone)]
pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
    pub auth: Auth,
}

#[derive(Clone)]
pub enum Auth {
    None,
    Token(String),
    Ticket { ticket: String, csrf: String },
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub reason: String,
    pub body: Value,
    pub raw: String,
    pub connection_close: bool,
}

impl Reply {
    pub fn data(&self) -> &Value {
        &self.body["data"]
    }
}

pub fn client_tls(fp: &str) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned {
            fp: fp.to_string(),
            provider,
        }))
        .with_no_client_auth()
}

impl Api {
    pub fn new(sim: &SimHandle) -> Api {
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(client_tls(&sim.fingerprint().unwrap()))
            .build()
            .unwrap();
        Api {
            http,
            base: sim.base_url(),
            auth: Auth::Token(TOKEN.into()),
        }
    }

    pub fn with(&self, auth: Auth) -> Api {
        Api {
            auth,
            ..self.clone()
        }
    }

    pub async fn login(&self, user: &str, password: &str) -> Api {
        let r = self
            .with(Auth::None)
            .call(
                "POST",
                "/access/ticket",
                &[("username", user), ("password", password)],
            )
            .await;
        assert_eq!(r.status, 200, "{r:?}");
        self.with(Auth::Ticket {
            ticket: r.data()["ticket"].as_str().unwrap().into(),
            csrf: r.data()["CSRFPreventionToken"].as_str().unwrap().into(),
        })
    }

    pub async fn call(&self, method: &str, path: &str, params: &[(&str, &str)]) -> Reply {
        let url = format!("{}/api2/json{path}", self.base);
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut rb = self.http.request(m.clone(), &url);
        rb = if method == "GET" || method == "DELETE" {
            rb.query(params)
        } else if !params.is_empty() {
            rb.form(params)
        } else {
            rb
        };
        match &self.auth {
            Auth::None => {}
            Auth::Token(t) => rb = rb.header("Authorization", t),
            Auth::Ticket { ticket, csrf } => {
                rb = rb.header("Cookie", format!("PVEAuthCookie={ticket}"));
                if method != "GET" {
                    rb = rb.header("CSRFPreventionToken", csrf);
                }
            }
        }
        let resp = rb.send().await.unwrap();
        reply(resp).await
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.call("GET", path, &[]).await
    }

    pub async fn wait_task(&self, node: &str, upid: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let r = self
                .get(&format!("/nodes/{node}/tasks/{upid}/status"))
                .await;
            assert_eq!(r.status, 200, "{r:?}");
            if r.data()["status"] == "stopped" {
                return r.data().clone();
            }
            assert!(Instant::now() < deadline, "task {upid} did not end");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Clone and wait; returns the exit status.
    pub async fn clone_vm(&self, node: &str, src: u32, params: &[(&str, &str)]) -> String {
        let r = self
            .call("POST", &format!("/nodes/{node}/qemu/{src}/clone"), params)
            .await;
        assert_eq!(r.status, 200, "{r:?}");
        let upid = r.data().as_str().unwrap().to_string();
        self.wait_task(node, &upid).await["exitstatus"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

pub async fn reply(resp: reqwest::Response) -> Reply {
    let status = resp.status().as_u16();
    let reason = resp
        .extensions()
        .get::<hyper::ext::ReasonPhrase>()
        .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned())
        .unwrap_or_else(|| resp.status().canonical_reason().unwrap_or("").to_string());
    let connection_close = resp
        .headers()
        .get("connection")
        .is_some_and(|v| v == "close");
    let raw = resp.text().await.unwrap();
    let body = serde_json::from_str(&raw).unwrap_or(Value::Null);
    Reply {
        status,
        reason,
        body,
        raw,
        connection_close,
    }
}
