//! Workers and producers on other hosts reach Redis with `rediss://` and a password (the
//! README's "Scaling workers across hosts"): a real redis-server with TLS and
//! `requirepass`, a test CA made here, and the producer binary verifying the server against
//! that CA (`SSL_CERT_FILE`); an unknown issuer and a wrong password are refused, exit 3,
//! the password never printed.

use std::net::TcpListener;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use labfleet_tests::bins::bin;

struct TlsRedis {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TLS-only redis-server (`--port 0`) with a password, its certificate issued by a CA
/// written to `ca.pem` in its folder.
fn start() -> TlsRedis {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let p = |f: &str| dir.path().join(f);
    std::fs::write(p("ca.pem"), ca.pem()).unwrap();
    std::fs::write(p("cert.pem"), cert.pem()).unwrap();
    std::fs::write(p("key.pem"), key.serialize_pem()).unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("redis-server")
        .args(["--port", "0", "--tls-port", &port.to_string()])
        .args(["--bind", "127.0.0.1", "--save", "", "--dir"])
        .arg(dir.path())
        .arg("--tls-cert-file")
        .arg(p("cert.pem"))
        .arg("--tls-key-file")
        .arg(p("key.pem"))
        .arg("--tls-ca-cert-file")
        .arg(p("ca.pem"))
        .args(["--tls-auth-clients", "no", "--requirepass", "tls-s3cret"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server not found: install it with `apt-get install redis-server`");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "TLS redis-server did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    TlsRedis { child, port, dir }
}

fn list(url: &str, ca_file: Option<&std::path::Path>) -> Output {
    let mut cmd = Command::new(bin("producer"));
    cmd.args(["list", "--json", "--redis", url])
        .env_remove("RUST_LOG")
        .env_remove("REDIS_URL")
        .stdin(Stdio::null());
    match ca_file {
        Some(f) => cmd.env("SSL_CERT_FILE", f),
        None => cmd.env_remove("SSL_CERT_FILE"),
    };
    cmd.output().expect("run producer")
}

#[test]
fn rediss_with_a_password_is_verified_and_redacted() {
    let r = start();
    let ca = r.dir.path().join("ca.pem");
    let url = format!("rediss://:tls-s3cret@localhost:{}", r.port);

    let ok = list(&url, Some(&ca));
    let err = String::from_utf8_lossy(&ok.stderr);
    assert_eq!(ok.status.code(), Some(0), "{err}");
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "[]");

    let unknown = list(&url, None);
    let err = String::from_utf8_lossy(&unknown.stderr);
    assert_eq!(unknown.status.code(), Some(3), "{err}");
    assert!(err.contains("certificate"), "{err}");

    let wrong = format!("rediss://:not-the-password@localhost:{}", r.port);
    let refused = list(&wrong, Some(&ca));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(3), "{err}");
    for o in [&unknown, &refused] {
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            !all.contains("tls-s3cret") && !all.contains("not-the-password"),
            "{all}"
        );
    }
}
