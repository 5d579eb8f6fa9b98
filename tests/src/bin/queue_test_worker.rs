//! A queue worker process for the kill/pause/shutdown tests: a `LeaseBackend` apalis worker
//! whose handler sleeps as its payload says. Settings come from the environment:
//! `QW_URL`, `QW_NS`, `QW_LEASE_MS`, `QW_REAP_MS`, `QW_GRACE_MS`, `QW_CONCURRENCY`, `QW_ID`.
//!
//! Payload: `{"sleep_ms": u64, "defer_on_stop": bool}`. While sleeping the handler checks its
//! lease every 50 ms; it returns `LeaseLost` once lost, or `Deferred` on shutdown when
//! `defer_on_stop`. Every start is recorded in `{ns}:test:started` (`job|worker|attempt`),
//! every finish in `{ns}:test:finished`, and a fenced write sets `{ns}:test:ran` field job to
//! the worker id. SIGTERM starts a graceful shutdown.

use std::time::Duration;

use apalis::prelude::*;
use redis::AsyncCommands;
use serde::Deserialize;
use shared::queue::{JobError, Lease, LeaseBackend, Queue, QueueConfig, WorkerOptions};

#[derive(Debug, Deserialize)]
struct Job {
    #[serde(default)]
    sleep_ms: u64,
    #[serde(default)]
    defer_on_stop: bool,
}

fn env_ms(name: &str, default: u64) -> Duration {
    Duration::from_millis(
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default),
    )
}

async fn handle(job: Job, lease: Lease) -> Result<(), JobError> {
    let q = lease.queue().clone();
    let mut conn = q.connection();
    let rec = format!("{}|{}|{}", lease.job_key(), lease.worker(), lease.attempt());
    let _: () = conn
        .rpush(q.key("test:started"), &rec)
        .await
        .map_err(|e| JobError::Retry(e.to_string()))?;
    let end = tokio::time::Instant::now() + Duration::from_millis(job.sleep_ms);
    while tokio::time::Instant::now() < end {
        if lease.is_lost() {
            return Err(JobError::LeaseLost);
        }
        if job.defer_on_stop && lease.should_stop() {
            return Err(JobError::Deferred);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _: () = conn
        .rpush(q.key("test:finished"), &rec)
        .await
        .map_err(|e| JobError::Retry(e.to_string()))?;
    lease
        .hset_fenced(&q.key("test:ran"), &[(lease.job_key(), lease.worker())])
        .await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let url = std::env::var("QW_URL")?;
    let lease = env_ms("QW_LEASE_MS", 2000);
    let mut cfg =
        QueueConfig::with_namespace(std::env::var("QW_NS").unwrap_or("lf".into())).lease(lease);
    cfg.reap_every = env_ms("QW_REAP_MS", 500);
    cfg.shutdown_grace = env_ms("QW_GRACE_MS", 5000);
    cfg.idle_poll = Duration::from_millis(100);
    let queue = Queue::connect(&url, cfg).await?;
    let mut opts = WorkerOptions::new(
        std::env::var("QW_CONCURRENCY")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(4),
    );
    if let Ok(id) = std::env::var("QW_ID") {
        opts.worker_id = id;
    }
    let backend = LeaseBackend::<Job>::new(queue, opts);
    let worker = WorkerBuilder::new("queue-test-worker")
        .backend(backend)
        .catch_panic()
        .build(handle);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    worker
        .run_until(async move {
            term.recv().await;
            Ok::<(), std::io::Error>(())
        })
        .await?;
    tracing::info!("worker exited");
    Ok(())
}
