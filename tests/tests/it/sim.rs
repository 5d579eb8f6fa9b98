//! The `pve-sim` binary as shipped: started as a process on the shipped cluster file and
//! demo certificate, it prints its address and the demo fingerprint, and labfleet's own
//! client (pinning that fingerprint) can read the cluster and clone template 100 on pve1,
//! as the original design's example deploys it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use shared::pve::*;
use shared::secret::Secret;
use tokio_util::sync::CancellationToken;

/// Fingerprint of `data/sim/demo-cert.pem` (also in data/sim/README.md).
const DEMO_FINGERPRINT: &str = "7A:78:1B:6F:76:0A:C1:8C:58:08:48:4F:C9:BA:87:01:E3:6D:A1:24:5F:36:69:FD:C6:B3:AB:7C:06:62:B6:AF";
/// Demo-only token secret from `data/sim/cluster.yml`.
const DEMO_TOKEN_SECRET: &str = "a3058775-b2df-4b2b-9997-bdc0e3d45c01";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The pve-sim binary, built on demand when this package is tested alone.
fn sim_binary() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"));
    let bin = target.join("debug").join("pve-sim");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let ok = Command::new(cargo)
            .args(["build", "-p", "pve-sim", "--bin", "pve-sim"])
            .current_dir(repo())
            .status()
            .expect("running cargo build -p pve-sim");
        assert!(ok.success(), "cargo build -p pve-sim failed");
    }
    bin
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn shipped_binary_serves_the_demo_cluster_to_labfleets_client() {
    let data = repo().join("data/sim");
    let mut child = Command::new(sim_binary())
        .arg("--cluster")
        .arg(data.join("cluster.yml"))
        .args(["--listen", "127.0.0.1:0", "--time-scale", "0"])
        .arg("--cert")
        .arg(data.join("demo-cert.pem"))
        .arg("--key")
        .arg(data.join("demo-key.pem"))
        .stdout(Stdio::piped())
        .spawn()
        .expect("pve-sim starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let _guard = Running(child);
    let first = lines.next().unwrap().unwrap();
    let second = lines.next().unwrap().unwrap();
    let addr = first
        .strip_prefix("pve-sim listening on https://")
        .unwrap_or_else(|| panic!("unexpected first line: {first}"));
    assert_eq!(second, format!("fingerprint {DEMO_FINGERPRINT}"));
    let (host, port) = addr.rsplit_once(':').unwrap();

    let mut cfg = ClientConfig::new(
        "sim",
        host,
        Auth::Token {
            user: "root@pam".into(),
            token_name: "labfleet".into(),
            secret: Secret::new(DEMO_TOKEN_SECRET),
        },
    );
    cfg.port = port.parse().unwrap();
    cfg.tls = TlsPolicy::Fingerprint(parse_fingerprint(DEMO_FINGERPRINT).unwrap());
    cfg.request_timeout = Duration::from_secs(10);
    let pve = PveClient::new(cfg).unwrap();

    let nodes = pve.nodes().await.unwrap();
    assert_eq!(nodes.len(), 3);
    let newid = pve.nextid(None).await.unwrap();
    let upid = pve
        .clone_vm(
            "pve1",
            100,
            &CloneParams {
                newid,
                name: Some("example-vm".into()),
                ..CloneParams::default()
            },
        )
        .await
        .unwrap();
    let opts = WaitOptions::with_timeout(Duration::from_secs(30), CancellationToken::new());
    pve.wait_task(&upid, &opts).await.unwrap();
    let config = pve.vm_config("pve1", newid).await.unwrap();
    assert_eq!(config.name().as_deref(), Some("example-vm"));
}
