//! Benchmark (not a test): no-op jobs per second through labfleet's queue layer next to raw
//! apalis-redis 1.0.0 on the same redis-server in the same run.
//!
//! Pinned baseline, so neither side can be weakened: `N` (default 5,000; apalis-redis cannot
//! hold 8,000 due jobs) jobs bulk-pushed before the worker starts; apalis-redis batch size 100;
//! the same idle poll interval (100 ms) and the same `concurrency(C)` layer on both sides (and
//! `C` as our backend's concurrency); drain time measured the same way on both sides: from
//! building the worker until the handler has run N times. Each side runs `ROUNDS` times,
//! alternating, each round on a fresh queue name.
//!
//! `cargo run --release -p bench --bin queue_bench -- [N] [C] [ROUNDS]`

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use apalis::prelude::*;
use apalis_redis::{Config, RedisStorage};
use labfleet_tests::redis_server::RedisServer;
use serde::{Deserialize, Serialize};
use shared::queue::{JobError, JobSpec, LeaseBackend, Queue, QueueConfig, WorkerOptions};
use tokio_util::sync::CancellationToken;

const POLL: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Noop {
    i: u32,
}

#[derive(Clone)]
struct Counter {
    n: usize,
    seen: Arc<AtomicUsize>,
    done: CancellationToken,
}

impl Counter {
    fn new(n: usize) -> Self {
        Self {
            n,
            seen: Arc::new(AtomicUsize::new(0)),
            done: CancellationToken::new(),
        }
    }

    fn hit(&self) {
        if self.seen.fetch_add(1, Ordering::SeqCst) + 1 == self.n {
            self.done.cancel();
        }
    }
}

async fn ours_handler(_job: Noop, c: Data<Counter>) -> Result<(), JobError> {
    c.hit();
    Ok(())
}

async fn raw_handler(_job: Noop, c: Data<Counter>) -> Result<(), BoxDynError> {
    c.hit();
    Ok(())
}

async fn run_ours(url: &str, ns: &str, n: usize, conc: usize) -> anyhow::Result<Duration> {
    let mut cfg = QueueConfig::with_namespace(ns);
    cfg.idle_poll = POLL;
    let queue = Queue::connect(url, cfg).await?;
    let specs: Vec<JobSpec> = (0..n as u32)
        .map(|i| JobSpec::new(format!("n{i}"), "noop", serde_json::json!({ "i": i })))
        .collect();
    queue.enqueue_batch(&specs).await?;
    let counter = Counter::new(n);
    let t0 = Instant::now();
    let worker = WorkerBuilder::new(format!("bench-{ns}"))
        .backend(LeaseBackend::<Noop>::new(
            queue.clone(),
            WorkerOptions::new(conc),
        ))
        .concurrency(conc)
        .data(counter.clone())
        .build(ours_handler);
    let done = counter.done.clone();
    let handle = tokio::spawn(worker.run_until(async move {
        done.cancelled().await;
        Ok::<(), std::io::Error>(())
    }));
    let drained = tokio::time::timeout(Duration::from_secs(120), counter.done.cancelled())
        .await
        .is_ok();
    let elapsed = t0.elapsed();
    counter.done.cancel();
    anyhow::ensure!(drained, "{ns}: not drained within 120 s");
    handle.await??;
    let st = queue.stats().await?;
    anyhow::ensure!(st.done as usize == n, "only {} of {n} acked", st.done);
    Ok(elapsed)
}

async fn run_raw(url: &str, ns: &str, n: usize, conc: usize) -> anyhow::Result<Duration> {
    let conn = apalis_redis::connect(url).await?;
    let mut storage =
        RedisStorage::<Noop>::new(conn).with_config(Config::default().queue(ns).batch_size(100));
    storage
        .push_bulk((0..n as u32).map(|i| Noop { i }).collect())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let counter = Counter::new(n);
    let t0 = Instant::now();
    let worker = WorkerBuilder::new(format!("bench-{ns}"))
        .backend(storage.poll_with_interval(POLL))
        .concurrency(conc)
        .data(counter.clone())
        .build(raw_handler);
    let done = counter.done.clone();
    let handle = tokio::spawn(worker.run_until(async move {
        done.cancelled().await;
        Ok::<(), std::io::Error>(())
    }));
    let drained = tokio::time::timeout(Duration::from_secs(120), counter.done.cancelled())
        .await
        .is_ok();
    let elapsed = t0.elapsed();
    counter.done.cancel();
    anyhow::ensure!(drained, "{ns}: not drained within 120 s");
    handle.await??;
    anyhow::ensure!(
        counter.seen.load(Ordering::SeqCst) >= n,
        "raw side did not drain"
    );
    Ok(elapsed)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(Ok(5000), |a| a.parse())?;
    let conc: usize = args.next().map_or(Ok(32), |a| a.parse())?;
    let rounds: usize = args.next().map_or(Ok(3), |a| a.parse())?;
    let redis = RedisServer::start();
    let url = redis.url();
    println!("n={n} concurrency={conc} rounds={rounds} poll={POLL:?} apalis-redis batch=100");
    let (mut ours, mut raw) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let d = run_raw(&url, &format!("raw{r}"), n, conc).await?;
        println!(
            "apalis-redis round {r}: {d:?} = {:.0} jobs/s",
            n as f64 / d.as_secs_f64()
        );
        raw.push(n as f64 / d.as_secs_f64());
        let d = run_ours(&url, &format!("lf{r}"), n, conc).await?;
        println!(
            "labfleet     round {r}: {d:?} = {:.0} jobs/s",
            n as f64 / d.as_secs_f64()
        );
        ours.push(n as f64 / d.as_secs_f64());
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (o, r) = (median(&mut ours), median(&mut raw));
    println!(
        "median: labfleet {o:.0} jobs/s, apalis-redis {r:.0} jobs/s, ratio {:.2}",
        o / r
    );
    Ok(())
}
