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
    after_help = "Examples:\n  worker --redis redis://127.0.0.1:6379 --data-dir data\n  worker --concurrency 32 --name lab-host-1"
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
