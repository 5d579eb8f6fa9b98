//! The `pve-sim` command line: parse arguments into a `SimConfig`, start, print the address
//! and fingerprint, serve until ctrl-c or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

use crate::cluster::{SimConfig, TlsMode};
use crate::faults::FaultPlan;
use crate::server::Sim;

/// Simulated Proxmox VE cluster (HTTP API on HTTPS, like pveproxy).
#[derive(Debug, Parser)]
#[command(name = "pve-sim", version)]
pub struct Args {
    /// Cluster description (YAML), e.g. data/sim/cluster.yml.
    #[arg(long)]
    pub cluster: PathBuf,
    /// Address to listen on; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:8006")]
    pub listen: SocketAddr,
    /// Multiplies all simulated durations; 0 = zero-cost mode (default: the file's time_scale).
    #[arg(long)]
    pub time_scale: Option<f64>,
    /// Fault plan (YAML; schema in the crate README).
    #[arg(long)]
    pub faults: Option<PathBuf>,
    /// Seed for fault injection and generated MACs/uuids.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// PEM certificate (with --key) instead of a generated self-signed one.
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// PEM private key for --cert.
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// Serve plain HTTP instead of HTTPS.
    #[arg(long, conflicts_with = "cert")]
    pub plain_http: bool,
}

impl Args {
    pub fn to_config(&self) -> anyhow::Result<SimConfig> {
        let mut cfg = SimConfig::from_cluster_file(&self.cluster)?;
        cfg.listen = self.listen;
        if let Some(t) = self.time_scale {
            anyhow::ensure!(t >= 0.0 && t.is_finite(), "--time-scale must be >= 0");
            cfg.time_scale = t;
        }
        if let Some(f) = &self.faults {
            cfg.faults = FaultPlan::from_file(f)?;
        }
        cfg.seed = self.seed;
        cfg.tls = match (&self.cert, &self.key, self.plain_http) {
            (_, _, true) => TlsMode::Plain,
            (Some(c), Some(k), _) => TlsMode::Pem {
                cert: c.clone(),
                key: k.clone(),
            },
            _ => TlsMode::SelfSigned,
        };
        Ok(cfg)
    }
}

/// Starts the simulator, prints `pve-sim listening on <url>` and `fingerprint <fp>`, and
/// serves until ctrl-c or SIGTERM.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let cfg = args.to_config()?;
    let sim = Sim::start(cfg).await.context("starting the simulator")?;
    println!("pve-sim listening on {}", sim.base_url());
    if let Some(fp) = sim.fingerprint() {
        println!("fingerprint {fp}");
    }
    wait_for_signal().await;
    sim.shutdown().await;
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
