//! The worker: consumes labfleet's jobs from Redis and runs them against Proxmox.
//!
//! [`run`] wires the job handlers of `shared::jobs` into an apalis worker over labfleet's own
//! Redis backend (`shared::queue::LeaseBackend`): claims with a lease, renewal inside each
//! job, fenced settle, a reaper, retries by kind. Any number of worker processes on any
//! number of hosts may run at once; each has a unique identity. The binary (`main.rs`) and
//! the producer's demo both call [`run`]. With `WorkerConfig::metrics` set, it also serves
//! Prometheus metrics (`metrics`). Every worker writes a heartbeat record
//! (`shared::heartbeat`) while it runs and deletes it when it stops.

pub mod metrics;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use apalis::prelude::*;
use shared::clusters::Clusters;
use shared::config;
use shared::heartbeat::{self, Beat, BeatTiming};
use shared::jobs::{self, Env, Job, Timing};
use shared::queue::{JobError, Lease, LeaseBackend, Queue, QueueConfig, WorkerOptions};
use shared::secret::SecretKey;
use tokio_util::sync::CancellationToken;

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub redis_url: String,
    /// Folder with `connections.yml` (the worker reads nothing else of it).
    pub data_dir: PathBuf,
    pub concurrency: usize,
    /// Identity in claims and logs; default `<host>:<pid>:<random>`.
    pub name: Option<String>,
    pub queue: QueueConfig,
    pub timing: Timing,
    /// The `enc:` key (default: from `LABFLEET_SECRET_KEY` / `LABFLEET_SECRET_KEY_FILE`).
    pub secret_key: Option<SecretKey>,
    /// Serve Prometheus metrics at `http://<addr>/metrics` (port 0 picks a free port).
    pub metrics: Option<SocketAddr>,
    /// Set to the metrics server's bound address once it listens (useful with port 0).
    pub metrics_bound: Arc<OnceLock<SocketAddr>>,
    /// How often the worker's heartbeat record is written and how long it outlives it.
    pub heartbeat: BeatTiming,
}

impl WorkerConfig {
    pub fn new(redis_url: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        WorkerConfig {
            redis_url: redis_url.into(),
            data_dir: data_dir.into(),
            concurrency: 16,
            name: None,
            queue: jobs::queue_config(),
            timing: Timing::default(),
            secret_key: SecretKey::from_env().ok(),
            metrics: None,
            metrics_bound: Arc::default(),
            heartbeat: BeatTiming::default(),
        }
    }
}

impl WorkerConfig {
    /// labfleet's own timers (task polling, API gate, re-checks, queue polling, retry
    /// backoff) at a simulator's time scale: with wall-clock timers, a 1 s poll against
    /// `pve-sim --time-scale 0.1` is a 10 s poll in simulated time. Kept above 5 ms; a scale
    /// of 0 or less (the zero-cost simulator) changes nothing.
    pub fn scale_clocks(&mut self, scale: f64) {
        if scale <= 0.0 {
            return;
        }
        self.timing = self.timing.scaled(scale);
        let s = |d| jobs::at_scale(d, scale);
        self.queue.idle_poll = s(self.queue.idle_poll);
        for p in self
            .queue
            .retry_by_kind
            .values_mut()
            .chain([&mut self.queue.default_retry])
        {
            p.base = s(p.base);
            p.cap = s(p.cap);
        }
    }
}

/// Runs a worker until `shutdown` is cancelled, then drains gracefully.
pub async fn run(cfg: WorkerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let conn_path = cfg.data_dir.join("connections.yml");
    let connections = config::load_connections(&conn_path)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("reading {}", conn_path.display()))?;
    let key = cfg.secret_key.clone();
    let queue = Queue::connect(&cfg.redis_url, cfg.queue.clone())
        .await
        .with_context(|| {
            format!(
                "connecting to Redis at {}",
                shared::redact_url(&cfg.redis_url)
            )
        })?;
    warn_about_redis(&queue).await;
    let slots_queue = queue.clone();
    let api_retry = cfg.timing.api_retry;
    let gates: Arc<shared::clusters::GateMaker> = Arc::new(move |cluster: &str, cap: u32| {
        shared::jobs::api_slots::ApiSlots::new(slots_queue.clone(), cluster, cap, api_retry)
            as Arc<dyn shared::pve::ApiGate>
    });
    let watch_queue = queue.clone();
    let watches: Arc<shared::clusters::WatchMaker> =
        Arc::new(move |cluster: &str| shared::jobs::node_loss::hook(watch_queue.clone(), cluster));
    let lists_queue = queue.clone();
    let task_lists: Arc<shared::clusters::ShareMaker> = Arc::new(move |cluster: &str| {
        shared::jobs::task_lists::RedisTaskLists::new(lists_queue.clone(), cluster)
            as Arc<dyn shared::pve::TaskListShare>
    });
    let env = Env::new(
        Clusters::new(connections, key)
            .with_api_gates(gates)
            .with_node_watch(watches)
            .with_task_list_shares(task_lists),
        queue.clone(),
        cfg.timing.clone(),
        shutdown.child_token(),
    );
    let metrics = match cfg.metrics {
        Some(addr) => {
            let (bound, task) =
                metrics::start(addr, env.clone(), queue.clone(), shutdown.child_token()).await?;
            let _ = cfg.metrics_bound.set(bound);
            Some(task)
        }
        None => None,
    };
    let mut opts = WorkerOptions::new(cfg.concurrency);
    if let Some(n) = &cfg.name {
        opts.worker_id = n.clone();
    }
    tracing::info!(worker = %opts.worker_id, concurrency = cfg.concurrency, "worker started");
    let beat = Beat::new(&opts.worker_id, env!("CARGO_PKG_VERSION"), cfg.concurrency);
    let beat_stop = CancellationToken::new();
    let beating = tokio::spawn(heartbeat::run(
        queue.clone(),
        beat.clone(),
        cfg.heartbeat,
        beat_stop.clone(),
    ));
    // Every worker ticks the schedules; events fire once, whoever ticks (`shared::scheduler`).
    let scheduling = tokio::spawn(shared::scheduler::run(
        shared::jobs::state::Store::new(queue.clone()),
        Duration::from_millis(500),
        beat_stop.clone(),
    ));
    // Every worker watches the nodes its calls found unanswered (`jobs::node_loss`).
    let watching = tokio::spawn(shared::jobs::node_loss::run(
        env.clone(),
        Duration::from_millis(500),
        beat_stop.clone(),
    ));
    let backend = LeaseBackend::<Job>::new(queue, opts);
    let worker = WorkerBuilder::new("labfleet")
        .backend(backend)
        .data(env.clone())
        .data(beat)
        .catch_panic()
        .build(handle);
    let stop = shutdown.clone();
    let worker = worker
        .run_until(async move {
            stop.cancelled().await;
            env.shutdown.cancel();
            Ok::<(), std::io::Error>(())
        })
        .await
        .map_err(|e| anyhow::anyhow!("worker: {e}"));
    // The record goes when the last job has been handed back, not before.
    beat_stop.cancel();
    let _ = beating.await;
    let _ = scheduling.await;
    let _ = watching.await;
    worker?;
    if let Some(task) = metrics {
        let _ = task.await;
    }
    tracing::info!("worker stopped");
    Ok(())
}

async fn handle(
    job: Job,
    lease: Lease,
    env: Data<Arc<Env>>,
    beat: Data<Arc<Beat>>,
) -> Result<(), JobError> {
    let env: Arc<Env> = (*env).clone();
    let _running = beat.job();
    jobs::run(job, lease, env).await
}

/// Warns when Redis is not configured to keep what it acknowledges.
async fn warn_about_redis(queue: &Queue) {
    let mut c = queue.connection();
    let get = |k: &'static str| {
        let mut c = c.clone();
        async move {
            let v: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
                .arg("GET")
                .arg(k)
                .query_async(&mut c)
                .await;
            v.ok().and_then(|v| v.get(1).cloned())
        }
    };
    let aof = get("appendonly").await;
    let policy = get("maxmemory-policy").await;
    let fsync = get("appendfsync").await;
    let _ = &mut c;
    if aof.as_deref() == Some("no") {
        tracing::warn!(
            "Redis runs without AOF persistence (appendonly no): a Redis restart loses every queued job and all deployment state; set `appendonly yes`"
        );
    }
    if let Some(p) = policy.filter(|p| p != "noeviction") {
        tracing::warn!(policy = %p, "Redis may evict keys under memory pressure; set `maxmemory-policy noeviction`");
    }
    if fsync.as_deref() == Some("no") {
        tracing::warn!(
            "Redis appendfsync is `no`: a host crash can lose recent acknowledgements; use `everysec` or `always`"
        );
    }
}
