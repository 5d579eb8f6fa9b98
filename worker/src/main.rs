//! `worker`: runs labfleet jobs from Redis. All the work is in `worker::run`.

use std::path::PathBuf;

use clap::Parser;
use shared::telemetry::{self, LogFormat, LogOptions};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "worker",
    version,
    about = "Run labfleet jobs from Redis against Proxmox VE",
    after_help = "Examples:\n  worker --redis redis://127.0.0.1:6379 --data-dir data\n  worker --concurrency 32 --name lab-host-1\n  worker --redis rediss://:PASSWORD@queue.example.org:6380 --metrics 0.0.0.0:9100"
)]
struct Args {
    /// Redis URL (redis://[:password@]host:port[/db], rediss:// for TLS).
    #[arg(
        long,
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true
    )]
    redis: String,
    /// Folder with connections.yml.
    #[arg(long, default_value = "data")]
    data_dir: PathBuf,
    /// Jobs run at once by this process.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Worker identity (default: host:pid:random).
    #[arg(long)]
    name: Option<String>,
    /// Lease of a claimed job in seconds; a crashed worker's job is re-delivered within
    /// lease + sweep (35 s by default).
    #[arg(long, default_value_t = 30.0, value_name = "SECS")]
    lease: f64,
    /// How often this worker sweeps for expired leases, in seconds.
    #[arg(long, default_value_t = 5.0, value_name = "SECS")]
    sweep: f64,
    /// Grace period for running jobs at SIGTERM, in seconds; the rest is handed back.
    #[arg(long, default_value_t = 20.0, value_name = "SECS")]
    grace: f64,
    /// Cap of the retry backoff in seconds (per kind defaults: 30 s, clones 60 s).
    #[arg(long, value_name = "SECS")]
    backoff_cap: Option<f64>,
    /// Scale labfleet's own timers (task polling, re-checks, retry backoff) by this factor,
    /// for a simulator running at `pve-sim --time-scale` F; a real cluster is 1.
    #[arg(long, default_value_t = 1.0, value_name = "F")]
    time_scale: f64,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9100).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    #[arg(long, default_value = "text")]
    log_format: LogFormat,
    #[arg(long)]
    log_file: Option<PathBuf>,
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
    #[arg(short, long, action = clap::ArgAction::Count)]
    quiet: u8,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    telemetry::init(&LogOptions {
        format: a.log_format,
        verbosity: a.verbose as i8 - a.quiet as i8,
        file: a.log_file.clone(),
        ..LogOptions::default()
    })?;
    let mut cfg = worker::WorkerConfig::new(a.redis, a.data_dir);
    cfg.concurrency = a.concurrency.max(1);
    cfg.name = a.name;
    cfg.metrics = a.metrics;
    let secs = |s: f64| std::time::Duration::from_secs_f64(s.max(0.05));
    cfg.queue.lease = secs(a.lease);
    cfg.queue.renew_every = secs(a.lease / 3.0);
    cfg.queue.reap_every = secs(a.sweep);
    cfg.queue.shutdown_grace = secs(a.grace);
    // Scaled first: an explicit --backoff-cap is taken as written.
    if a.time_scale != 1.0 {
        cfg.scale_clocks(a.time_scale);
    }
    if let Some(cap) = a.backoff_cap {
        for p in cfg.queue.retry_by_kind.values_mut() {
            p.cap = secs(cap);
            p.base = p.base.min(secs(cap));
        }
    }
    let shutdown = CancellationToken::new();
    let s = shutdown.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("shutdown requested: no new jobs; running ones get the grace period");
        s.cancel();
    });
    worker::run(cfg, shutdown).await
}
