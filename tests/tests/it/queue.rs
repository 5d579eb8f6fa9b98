//! The queue layer's properties (issue 5), each against a real redis-server.

use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use apalis::prelude::*;
use labfleet_tests::redis_server::{RedisOptions, RedisServer};
use labfleet_tests::wait::wait_for;
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use serde_json::json;
use shared::queue::{
    Enqueued, FailOutcome, JobError, JobSpec, Lease, LeaseBackend, Queue, QueueConfig, RetryPolicy,
    Settled, WorkerOptions,
};
use tokio_util::sync::CancellationToken;

const SECS: fn(u64) -> Duration = Duration::from_secs;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Short lease and sweep so re-delivery happens in about a second.
fn cfg() -> QueueConfig {
    let mut c = QueueConfig::default().lease(ms(1000));
    c.reap_every = ms(250);
    c.idle_poll = ms(100);
    c.shutdown_grace = SECS(2);
    c.default_retry = RetryPolicy {
        max_attempts: 3,
        base: ms(50),
        cap: ms(200),
    };
    c
}

async fn queue(r: &RedisServer, c: QueueConfig) -> Queue {
    Queue::connect(&r.url(), c).await.expect("connect")
}

fn noop(key: &str) -> JobSpec {
    JobSpec::new(key, "noop", json!({}))
}

async fn state(q: &Queue, key: &str) -> String {
    q.job(key)
        .await
        .unwrap()
        .map(|j| j.state)
        .unwrap_or_default()
}

/// Payload of the in-process test handler.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Work {
    #[serde(default)]
    sleep_ms: u64,
    #[serde(default)]
    fail: Option<String>,
    #[serde(default)]
    followups: Vec<String>,
}

/// What the in-process handler records.
#[derive(Default)]
struct Seen {
    started: AtomicUsize,
    lost: AtomicUsize,
}

async fn work(job: Work, lease: Lease, seen: Data<Arc<Seen>>) -> Result<(), JobError> {
    seen.started.fetch_add(1, Ordering::SeqCst);
    let q = lease.queue().clone();
    let mut conn = q.connection();
    // Concurrency per slot key as the handlers see it, recorded atomically in Redis.
    for s in slot_keys_of(lease.job_key()) {
        let n: i64 = conn.incr(q.key(&format!("test:cur:{s}")), 1).await.unwrap();
        let _: () = redis::cmd("EVAL")
            .arg("local m = tonumber(redis.call('GET', KEYS[1]) or '0'); if tonumber(ARGV[1]) > m then redis.call('SET', KEYS[1], ARGV[1]) end")
            .arg(1)
            .arg(q.key(&format!("test:max:{s}")))
            .arg(n)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let end = tokio::time::Instant::now() + ms(job.sleep_ms);
    let mut lost = false;
    while tokio::time::Instant::now() < end {
        if lease.is_lost() {
            lost = true;
            break;
        }
        tokio::time::sleep(ms(20)).await;
    }
    for s in slot_keys_of(lease.job_key()) {
        let _: i64 = conn.decr(q.key(&format!("test:cur:{s}")), 1).await.unwrap();
    }
    if lost {
        seen.lost.fetch_add(1, Ordering::SeqCst);
        return Err(JobError::LeaseLost);
    }
    match job.fail.as_deref() {
        Some("retry") => return Err(JobError::Retry("boom".into())),
        Some("permanent") => return Err(JobError::Permanent("bad input".into())),
        Some("panic") => panic!("handler panicked"),
        _ => {}
    }
    lease.add_followups(
        job.followups
            .iter()
            .map(|k| JobSpec::new(k, "work", json!({}))),
    );
    Ok(())
}

/// Test job keys encode their slot keys after a `@`: `j1@a,b`.
fn slot_keys_of(key: &str) -> Vec<String> {
    key.split_once('@')
        .map(|(_, s)| s.split(',').map(str::to_owned).collect())
        .unwrap_or_default()
}

fn work_spec(key: &str, w: &Work) -> JobSpec {
    JobSpec::new(key, "work", serde_json::to_value(w).unwrap()).slots(slot_keys_of(key))
}

/// An in-process apalis worker over a `LeaseBackend`, stopped by the token.
///
/// The worker has its own runtime and its own connection: redis-rs re-creates a lost
/// connection on the runtime that noticed the loss, which must outlive its users.
fn spawn_worker(
    r: &RedisServer,
    q: &Queue,
    concurrency: usize,
    seen: Arc<Seen>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let (url, c) = (r.url(), q.config().clone());
    // `catch_panic`'s handler type makes the run future not provably `Send`, so the worker
    // gets its own single-threaded runtime on a blocking thread.
    tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let q = Queue::connect(&url, c).await.expect("connect");
            let backend = LeaseBackend::<Work>::new(q, WorkerOptions::new(concurrency));
            let worker = WorkerBuilder::new("test-worker")
                .backend(backend)
                .data(seen)
                .catch_panic()
                .build(work);
            worker
                .run_until(async move {
                    stop.cancelled().await;
                    Ok::<(), std::io::Error>(())
                })
                .await
        })
        .expect("worker run");
    })
}

/// A `queue_test_worker` process.
struct WorkerProc {
    child: Child,
    id: String,
}

impl WorkerProc {
    fn spawn(r: &RedisServer, id: &str, env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_queue_test_worker"));
        cmd.env("QW_URL", r.url())
            .env("QW_ID", id)
            .env("QW_LEASE_MS", "1000")
            .env("QW_REAP_MS", "250")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self {
            child: cmd.spawn().expect("spawn queue_test_worker"),
            id: id.to_owned(),
        }
    }

    fn signal(&self, sig: &str) {
        Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status()
            .expect("kill");
    }

    async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let end = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < end,
                "worker {} did not exit in {within:?}",
                self.id
            );
            tokio::time::sleep(ms(50)).await;
        }
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        self.signal("-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn list(q: &Queue, name: &str) -> Vec<String> {
    q.connection().lrange(q.key(name), 0, -1).await.unwrap()
}

// 1. Enqueue ----------------------------------------------------------------------------------

#[tokio::test]
async fn enqueue_is_idempotent_resumable_and_unbounded() {
    let r = RedisServer::start();
    let q = queue(&r, cfg()).await;
    let specs: Vec<JobSpec> = (0..50_000)
        .map(|i| noop(&format!("j{i}")).group("dep1"))
        .collect();
    // A first push that stopped half-way (as if it timed out after some chunks)...
    let first = q.enqueue_batch(&specs[..20_000]).await.unwrap();
    assert!(first.iter().all(|e| *e == Enqueued::Created));
    // ...is resumed by pushing the whole batch again.
    let all = q.enqueue_batch(&specs).await.unwrap();
    assert_eq!(all.len(), 50_000);
    assert!(all[..20_000].iter().all(|e| *e == Enqueued::Existing));
    assert!(all[20_000..].iter().all(|e| *e == Enqueued::Created));
    let st = q.stats().await.unwrap();
    assert_eq!(st.ready, 50_000);
    assert_eq!(q.group_stats("dep1").await.unwrap().ready, 50_000);
    // The same key again returns the existing job, even with another payload.
    let again = JobSpec::new("j7", "other", json!({"x": 1}));
    assert_eq!(q.enqueue(&again).await.unwrap(), Enqueued::Existing);
    assert_eq!(q.job("j7").await.unwrap().unwrap().kind, "noop");
    // A 50k backlog does not wedge claims.
    let c = q.claim("w", 64).await.unwrap();
    assert_eq!(c.jobs.len(), 64);
    assert_eq!(c.jobs[0].key, "j0");
}

#[tokio::test]
async fn enqueue_that_timed_out_can_be_retried() {
    let r = RedisServer::start();
    let mut c = cfg();
    c.response_timeout = ms(300);
    let q = queue(&r, c).await;
    let specs: Vec<JobSpec> = (0..3000).map(|i| noop(&format!("t{i}"))).collect();
    r.pause();
    let res = q.enqueue_batch(&specs).await;
    assert!(res.is_err(), "a push to a frozen Redis times out");
    r.resume();
    // The commands already sent may or may not have been applied; pushing again is safe.
    let mut again = q.enqueue_batch(&specs).await;
    for _ in 0..20 {
        if again.is_ok() {
            break;
        }
        tokio::time::sleep(ms(100)).await;
        again = q.enqueue_batch(&specs).await;
    }
    assert_eq!(again.unwrap().len(), 3000);
    assert_eq!(q.stats().await.unwrap().ready, 3000);
}

// 2. Follow-ups and gates ---------------------------------------------------------------------

#[tokio::test]
async fn gates_release_successors_only_after_all_predecessors_succeed() {
    let r = RedisServer::start();
    let q = queue(&r, cfg()).await;
    q.enqueue_batch(&[
        noop("clone"),
        noop("bridges"),
        noop("network").after(["clone", "bridges"]),
    ])
    .await
    .unwrap();
    assert_eq!(state(&q, "network").await, "gated");
    let c = q.claim("w", 10).await.unwrap();
    assert_eq!(c.jobs.len(), 2, "the gated job is not claimable");
    let (a, b) = (&c.jobs[0], &c.jobs[1]);
    assert_eq!(q.ack(&a.key, &a.token).await.unwrap(), Settled::Done);
    assert_eq!(state(&q, "network").await, "gated");
    assert_eq!(q.job("network").await.unwrap().unwrap().gate_pending, 1);
    assert_eq!(q.ack(&b.key, &b.token).await.unwrap(), Settled::Done);
    assert_eq!(state(&q, "network").await, "ready");

    // A predecessor already done at enqueue time counts as satisfied.
    q.enqueue(&noop("late").after(["clone"])).await.unwrap();
    assert_eq!(state(&q, "late").await, "ready");

    // A dead predecessor blocks its successor until it is retried and succeeds.
    q.enqueue_batch(&[noop("p").max_attempts(1), noop("s").after(["p"])])
        .await
        .unwrap();
    let mut claimed = q.claim("w", 10).await.unwrap().jobs;
    claimed.retain(|j| j.key == "p");
    let p = &claimed[0];
    let out = q
        .fail(&p.key, &p.token, "w", &FailOutcome::retry("broken", ms(0)))
        .await
        .unwrap();
    assert_eq!(out, Settled::Dead);
    assert_eq!(state(&q, "s").await, "gated");
    assert_eq!(q.stats().await.unwrap().gated, 1);
    assert_eq!(q.retry_dead("p").await.unwrap(), 1);
    let p2 = q.claim("w", 10).await.unwrap().jobs;
    let p2 = p2.iter().find(|j| j.key == "p").unwrap();
    assert_eq!(p2.attempt, 1, "retry resets attempts");
    q.ack(&p2.key, &p2.token).await.unwrap();
    assert_eq!(state(&q, "s").await, "ready");
}

#[tokio::test]
async fn ack_with_followups_is_atomic_and_idempotent() {
    let r = RedisServer::start();
    let q = queue(&r, cfg()).await;
    q.enqueue(&noop("parent")).await.unwrap();
    // Already exists, and not due yet (so the claim below takes `parent`, whatever the
    // order of two jobs enqueued in the same millisecond).
    q.enqueue(&noop("f2").run_after(SECS(60))).await.unwrap();
    let j = q.claim("w", 1).await.unwrap().jobs.remove(0);
    assert_eq!(j.key, "parent");
    let f = [noop("f1").after(["f2"]), noop("f2")];
    let (s, created) = q.ack_with_followups(&j.key, &j.token, &f).await.unwrap();
    assert_eq!(s, Settled::Done);
    assert_eq!(created, vec![Enqueued::Created, Enqueued::Existing]);
    // A replay (the reply was lost) applies nothing twice.
    let (s, created) = q.ack_with_followups(&j.key, &j.token, &f).await.unwrap();
    assert_eq!(s, Settled::AlreadyApplied);
    assert!(created.is_empty());
    assert_eq!(state(&q, "f1").await, "gated");
    let st = q.stats().await.unwrap();
    assert_eq!((st.scheduled, st.gated, st.done), (1, 1, 1));

    // The same through a worker: the handler stages follow-ups, the layer acks with them.
    let seen = Arc::new(Seen::default());
    let stop = CancellationToken::new();
    let w = spawn_worker(&r, &q, 4, seen.clone(), stop.clone());
    let spec = work_spec(
        "chain",
        &Work {
            followups: vec!["chain-next".into()],
            ..Default::default()
        },
    );
    q.enqueue(&spec).await.unwrap();
    wait_for(SECS(10), "chain and its follow-up done", || async {
        state(&q, "chain").await == "done" && state(&q, "chain-next").await == "done"
    })
    .await;
    stop.cancel();
    w.await.unwrap();
}

// 3. Claim ------------------------------------------------------------------------------------

#[tokio::test]
async fn claim_writes_an_in_flight_record_and_idle_workers_wake_fast() {
    let r = RedisServer::start();
    let q = queue(&r, cfg()).await;
    q.enqueue(&noop("x")).await.unwrap();
    let j = q.claim("worker-a", 1).await.unwrap().jobs.remove(0);
    assert_eq!(j.attempt, 1);
    let mut conn = q.connection();
    let (st, worker, token, lease_until): (String, String, String, u64) = redis::pipe()
        .hget(q.key("job:x"), "state")
        .hget(q.key("job:x"), "worker")
        .hget(q.key("job:x"), "token")
        .hget(q.key("job:x"), "lease_until")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!((st.as_str(), worker.as_str()), ("running", "worker-a"));
    assert_eq!(token, j.token);
    assert!(lease_until > 0);
    let in_flight: Option<f64> = conn.zscore(q.key("inflight"), "x").await.unwrap();
    assert_eq!(in_flight, Some(lease_until as f64));

    // An idle worker sees a new job within a second.
    let seen = Arc::new(Seen::default());
    let stop = CancellationToken::new();
    let w = spawn_worker(&r, &q, 2, seen.clone(), stop.clone());
    tokio::time::sleep(ms(1500)).await;
    let t0 = Instant::now();
    q.enqueue(&work_spec("fresh", &Work::default()))
        .await
        .unwrap();
    wait_for(SECS(5), "fresh job started", || async {
        seen.started.load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(t0.elapsed() < SECS(1), "picked up after {:?}", t0.elapsed());
    stop.cancel();
    w.await.unwrap();
}

// 4. Lease ------------------------------------------------------------------------------------

#[tokio::test]
async fn long_job_keeps_its_lease_and_killed_worker_job_is_redelivered() {
    let r = RedisServer::start();
    let q = queue(&r, cfg()).await;
    // A 3.5 s job under a 1 s lease is renewed, never stolen.
    let mut a = WorkerProc::spawn(&r, "wa", &[]);
    let mut b = WorkerProc::spawn(&r, "wb", &[]);
    q.enqueue(&JobSpec::new("long", "sleep", json!({"sleep_ms": 3500})))
        .await
        .unwrap();
    wait_for(SECS(15), "long job done", || async {
        state(&q, "long").await == "done"
    })
    .await;
    let info = q.job("long").await.unwrap().unwrap();
    assert_eq!((info.attempts, info.lease_losses), (1, 0));
    assert_eq!(list(&q, "test:started").await.len(), 1);

    // Kill the worker running a job: another one gets it within lease + sweep.
    q.enqueue(&JobSpec::new("victim", "sleep", json!({"sleep_ms": 3000})))
        .await
        .unwrap();
    wait_for(SECS(5), "victim started", || async {
        list(&q, "test:started").await.len() == 2
    })
    .await;
    let holder = q.job("victim").await.unwrap().unwrap().worker.unwrap();
    let killed_at = Instant::now();
    let (victim_proc, other) = if holder == "wa" {
        (&mut a, &b)
    } else {
        (&mut b, &a)
    };
    victim_proc.signal("-KILL");
    victim_proc.wait_exit(SECS(5)).await;
    wait_for(SECS(10), "victim re-delivered", || async {
        list(&q, "test:started").await.len() == 3
    })
    .await;
    let redelivery = killed_at.elapsed();
    assert!(
        redelivery < ms(1000 + 250 + 1000),
        "re-delivered after {redelivery:?}"
    );
    wait_for(SECS(10), "victim done", || async {
        state(&q, "victim").await == "done"
    })
    .await;
    let info = q.job("victim").await.unwrap().unwrap();
    assert_eq!(info.worker.as_deref(), Some(other.id.as_str()));
    assert_eq!(
        (info.attempts, info.lease_losses),
        (1, 1),
        "a lost lease is no attempt"
    );
    assert_eq!(info.history[0].outcome, "lease_lost");
    assert_eq!(info.history[0].worker.as_deref(), Some(holder.as_str()));
}

// 5. Fencing ----------------------------------------------------------------------------------

#[tokio::test]
async fn stale_tokens_are_refused() {
    let r = RedisServer::start();
    let q = queue(&r, cfg().lease(ms(300))).await;
    q.enqueue(&noop("f")).await.unwrap();
    let old = q.claim("a", 1).await.unwrap().jobs.remove(0);
    tokio::time::sleep(ms(400)).await;
    assert_eq!(q.reap().await.unwrap().requeued, 1);
    let new = q.claim("b", 1).await.unwrap().jobs.remove(0);
    assert_ne!(old.token, new.token);
    let rec = q.key("vm:1");
    assert!(!q.renew("f", &old.token).await.unwrap());
    assert!(
        !q.hset_fenced("f", &old.token, &rec, &[("state", "old")])
            .await
            .unwrap()
    );
    assert_eq!(q.ack("f", &old.token).await.unwrap(), Settled::Stale);
    assert_eq!(
        q.fail("f", &old.token, "a", &FailOutcome::retry("x", ms(0)))
            .await
            .unwrap(),
        Settled::Stale
    );
    assert_eq!(
        q.release("f", &old.token, ms(0)).await.unwrap(),
        Settled::Stale
    );
    assert!(
        q.hset_fenced("f", &new.token, &rec, &[("state", "new")])
            .await
            .unwrap()
    );
    assert_eq!(q.ack("f", &new.token).await.unwrap(), Settled::Done);
    assert_eq!(
        q.ack("f", &new.token).await.unwrap(),
        Settled::AlreadyApplied
    );
    assert_eq!(q.ack("f", &old.token).await.unwrap(), Settled::Stale);
    let v: String = q.connection().hget(&rec, "state").await.unwrap();
    assert_eq!(v, "new");
    assert!(
        q.hset_fenced("f", &new.token, "elsewhere", &[])
            .await
            .is_err()
    );
}

#[tokio::test]
async fn paused_worker_cannot_complete_a_redelivered_job() {
    let r = RedisServer::start();
    let q = queue(&r, cfg()).await;
    let a = WorkerProc::spawn(&r, "wa", &[]);
    q.enqueue(&JobSpec::new("p", "sleep", json!({"sleep_ms": 4000})))
        .await
        .unwrap();
    wait_for(SECS(5), "p started on wa", || async {
        list(&q, "test:started").await.len() == 1
    })
    .await;
    a.signal("-STOP");
    let _b = WorkerProc::spawn(&r, "wb", &[]);
    wait_for(SECS(10), "p re-delivered to wb", || async {
        list(&q, "test:started").await.len() == 2
    })
    .await;
    // wa wakes up past its lease: its renewal is refused, the handler sees is_lost and stops;
    // whatever it tries to write or ack is refused.
    a.signal("-CONT");
    wait_for(SECS(15), "p done by wb", || async {
        state(&q, "p").await == "done"
    })
    .await;
    let ran: String = q.connection().hget(q.key("test:ran"), "p").await.unwrap();
    assert_eq!(ran, "wb");
    let finished = list(&q, "test:finished").await;
    assert_eq!(
        finished,
        vec!["p|wb|1".to_owned()],
        "wa's handler stopped early"
    );
    let info = q.job("p").await.unwrap().unwrap();
    assert_eq!(
        (info.state.as_str(), info.worker.as_deref()),
        ("done", Some("wb"))
    );
}

#[tokio::test]
async fn cancel_group_removes_queued_jobs_and_fences_running_ones() {
    let r = RedisServer::start();
    let q = queue(&r, cfg()).await;
    let seen = Arc::new(Seen::default());
    let stop = CancellationToken::new();
    let w = spawn_worker(&r, &q, 1, seen.clone(), stop.clone());
    let long = Work {
        sleep_ms: 20_000,
        ..Default::default()
    };
    q.enqueue_batch(&[
        work_spec("c1", &long).group("dep"),
        work_spec("c2", &long).group("dep"),
        work_spec("c3", &long).group("dep").after(["c1"]),
        work_spec("other", &Work::default()),
    ])
    .await
    .unwrap();
    wait_for(SECS(5), "c1 running", || async {
        seen.started.load(Ordering::SeqCst) >= 1
    })
    .await;
    assert_eq!(q.cancel_group("dep").await.unwrap(), 3);
    wait_for(
        SECS(5),
        "running handler told its lease is lost",
        || async { seen.lost.load(Ordering::SeqCst) == 1 },
    )
    .await;
    wait_for(SECS(5), "other job done", || async {
        state(&q, "other").await == "done"
    })
    .await;
    let g = q.group_stats("dep").await.unwrap();
    assert_eq!((g.cancelled, g.ready, g.gated, g.in_flight), (3, 0, 0, 0));
    stop.cancel();
    w.await.unwrap();
}

#[tokio::test]
async fn cancel_jobs_cancels_only_the_listed_unfinished_jobs_and_fences_a_running_one() {
    let r = RedisServer::start();
    let q = queue(&r, cfg()).await;
    let seen = Arc::new(Seen::default());
    let stop = CancellationToken::new();
    let w = spawn_worker(&r, &q, 1, seen.clone(), stop.clone());
    let long = Work {
        sleep_ms: 20_000,
        ..Default::default()
    };
    q.enqueue_batch(&[
        work_spec("k1", &long).group("dep"),
        work_spec("k2", &long).group("dep"),
        work_spec("k3", &Work::default()).group("dep").after(["k1"]),
        work_spec("keep", &Work::default())
            .group("dep")
            .after(["k2"]),
    ])
    .await
    .unwrap();
    wait_for(SECS(5), "k1 running", || async {
        seen.started.load(Ordering::SeqCst) >= 1
    })
    .await;
    // k1 runs, k2 waits for the one worker slot, k3 is gated; "keep" and an unknown key are
    // not cancelled, and a second call cancels nothing more.
    let listed = ["k1", "k3", "nope"].map(String::from);
    assert_eq!(q.cancel_jobs(&listed).await.unwrap(), 2);
    assert_eq!(q.cancel_jobs(&listed).await.unwrap(), 0);
    wait_for(
        SECS(5),
        "the running one told its lease is lost",
        || async { seen.lost.load(Ordering::SeqCst) == 1 },
    )
    .await;
    assert_eq!(state(&q, "k1").await, "cancelled");
    assert_eq!(state(&q, "k3").await, "cancelled");
    assert_ne!(state(&q, "k2").await, "cancelled");
    assert_eq!(state(&q, "keep").await, "gated");
    let g = q.group_stats("dep").await.unwrap();
    assert_eq!(g.cancelled, 2);
    stop.cancel();
    w.await.unwrap();
}

// 6. Per-key concurrency ----------------------------------------------------------------------

#[tokio::test]
async fn per_key_caps_hold_across_workers_and_do_not_starve() {
    let r = RedisServer::start();
    let q = queue(&r, cfg()).await;
    q.set_cap("a", Some(2)).await.unwrap();
    q.set_cap("b", Some(3)).await.unwrap();
    let w = Work {
        sleep_ms: 100,
        ..Default::default()
    };
    // a's backlog first, then b's, then jobs needing both.
    let mut specs: Vec<JobSpec> = (0..30).map(|i| work_spec(&format!("x{i}@a"), &w)).collect();
    specs.extend((0..15).map(|i| work_spec(&format!("y{i}@b"), &w)));
    specs.extend((0..5).map(|i| work_spec(&format!("z{i}@a,b"), &w)));
    q.enqueue_batch(&specs).await.unwrap();
    let seen = Arc::new(Seen::default());
    let stop = CancellationToken::new();
    let workers: Vec<_> = (0..3)
        .map(|_| spawn_worker(&r, &q, 4, seen.clone(), stop.clone()))
        .collect();
    // b is not starved by a's backlog: all of b's own jobs finish while a still has a queue.
    wait_for(SECS(20), "b's jobs done", || async {
        let mut done = 0;
        for i in 0..15 {
            done += usize::from(state(&q, &format!("y{i}@b")).await == "done");
        }
        done == 15
    })
    .await;
    let a_done = {
        let mut n = 0;
        for i in 0..30 {
            n += usize::from(state(&q, &format!("x{i}@a")).await == "done");
        }
        n
    };
    assert!(
        a_done < 30,
        "b finished only after a's backlog ({a_done} of a done)"
    );
    wait_for(SECS(30), "all 50 done", || async {
        q.stats().await.unwrap().done == 50
    })
    .await;
    for (key, cap) in [("a", 2), ("b", 3)] {
        let s = q.slot_stats(key).await.unwrap();
        assert_eq!(s.high_water, cap, "high-water mark of {key}");
        let seen_max: u64 = q
            .connection()
            .get(q.key(&format!("test:max:{key}")))
            .await
            .unwrap();
        assert!(seen_max <= cap, "handlers saw {seen_max} at once on {key}");
        assert_eq!((s.held, s.waiting), (0, 0));
    }
    // Parked jobs spent no attempt.
    for s in &specs {
        assert_eq!(q.job(&s.key).await.unwrap().unwrap().attempts, 1);
    }
    stop.cancel();
    for w in workers {
        w.await.unwrap();
    }
}

#[tokio::test]
async fn waiting_jobs_keep_their_place_and_caps_change_at_run_time() {
    let r = RedisServer::start();
    let q = queue(&r, cfg()).await;
    q.set_cap("n", Some(1)).await.unwrap();
    let specs: Vec<JobSpec> = (0..4)
        .map(|i| noop(&format!("n{i}")).slots(["n"]))
        .collect();
    q.enqueue_batch(&specs).await.unwrap();
    let c = q.claim("w", 4).await.unwrap();
    assert_eq!(c.jobs.len(), 1);
    assert_eq!(c.jobs[0].key, "n0");
    let s = q.slot_stats("n").await.unwrap();
    assert_eq!((s.held, s.waiting), (1, 3));
    assert_eq!(q.stats().await.unwrap().waiting_for_slot, 3);
    assert_eq!(q.job("n1").await.unwrap().unwrap().attempts, 0);
    // Raising the cap lets the waiting jobs in, in their order.
    q.set_cap("n", Some(3)).await.unwrap();
    let c = q.claim("w", 4).await.unwrap();
    let keys: Vec<_> = c.jobs.iter().map(|j| j.key.as_str()).collect();
    assert_eq!(keys, ["n1", "n2"]);
    // Acking frees a slot and the last one moves up.
    q.ack(&c.jobs[0].key, &c.jobs[0].token).await.unwrap();
    let c = q.claim("w", 4).await.unwrap();
    assert_eq!(c.jobs[0].key, "n3");
}

#[tokio::test]
async fn slots_are_kept_across_a_lost_lease_and_freed_if_not_redelivered() {
    let r = RedisServer::start();
    let q = queue(&r, cfg().lease(ms(300))).await;
    q.set_cap("node", Some(1)).await.unwrap();
    q.enqueue(&noop("holder").slots(["node"]).group("g"))
        .await
        .unwrap();
    let j = q.claim("dead-worker", 1).await.unwrap().jobs.remove(0);
    q.enqueue(&noop("next").slots(["node"])).await.unwrap();
    tokio::time::sleep(ms(400)).await;
    assert_eq!(q.reap().await.unwrap().requeued, 1);
    // The lost holder keeps the slot: its Proxmox task may still run.
    assert_eq!(q.slot_stats("node").await.unwrap().held, 1);
    let c = q.claim("w2", 2).await.unwrap();
    assert_eq!(c.jobs.len(), 1);
    assert_eq!(
        c.jobs[0].key, "holder",
        "only the re-delivered holder may run"
    );
    assert_ne!(c.jobs[0].token, j.token);
    q.ack("holder", &c.jobs[0].token).await.unwrap();
    assert_eq!(q.claim("w2", 1).await.unwrap().jobs[0].key, "next");

    // Not re-delivered (cancelled here): the slot is freed after lease + sweep.
    q.enqueue(&noop("h2").slots(["node2"]).group("g2"))
        .await
        .unwrap();
    q.set_cap("node2", Some(1)).await.unwrap();
    q.claim("w", 1).await.unwrap();
    q.cancel_group("g2").await.unwrap();
    assert_eq!(q.slot_stats("node2").await.unwrap().held, 1);
    tokio::time::sleep(ms(400)).await;
    assert_eq!(q.reap().await.unwrap().slots_freed, 1);
    assert_eq!(q.slot_stats("node2").await.unwrap().held, 0);
}

/// A `mutex:` key is held by one job at a time with no cap set, across a lost lease too:
/// a power job re-delivered after its worker died runs before the VM's next operation, never
/// beside it (it::schedule saw a late start race a shutdown and start the class again).
#[tokio::test]
async fn a_mutex_key_is_held_by_one_job_at_a_time_across_a_lost_lease() {
    let r = RedisServer::start();
    let q = queue(&r, cfg().lease(ms(300))).await;
    q.enqueue(&noop("start").slots(["mutex:power/d#0/vm1"]))
        .await
        .unwrap();
    q.enqueue(&noop("other-vm").slots(["mutex:power/d#0/vm2"]))
        .await
        .unwrap();
    let first = q.claim("dead-worker", 2).await.unwrap().jobs;
    assert_eq!(first.len(), 2, "different VMs do not wait for each other");
    let other = first.iter().find(|j| j.key == "other-vm").unwrap();
    q.ack("other-vm", &other.token).await.unwrap();
    q.enqueue(&noop("shutdown").slots(["mutex:power/d#0/vm1"]))
        .await
        .unwrap();
    assert!(
        q.claim("w2", 2).await.unwrap().jobs.is_empty(),
        "the shutdown waits while the start holds the VM"
    );
    assert_eq!(state(&q, "shutdown").await, "waiting");
    // The start's worker dies: the re-delivered start still goes first.
    tokio::time::sleep(ms(400)).await;
    assert_eq!(q.reap().await.unwrap().requeued, 1);
    let c = q.claim("w2", 2).await.unwrap().jobs;
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].key, "start");
    q.ack("start", &c[0].token).await.unwrap();
    assert_eq!(q.claim("w2", 2).await.unwrap().jobs[0].key, "shutdown");
    assert_eq!(
        q.slot_stats("mutex:power/d#0/vm1").await.unwrap().held,
        1,
        "held by the shutdown now"
    );
}

// 7. Retries ----------------------------------------------------------------------------------

#[tokio::test]
async fn retries_back_off_then_dead_letter_with_history_and_come_back() {
    let r = RedisServer::start();
    let q = queue(&r, cfg()).await;
    let seen = Arc::new(Seen::default());
    let stop = CancellationToken::new();
    let w = spawn_worker(&r, &q, 4, seen.clone(), stop.clone());
    let fail = |how: &str| Work {
        fail: Some(how.into()),
        ..Default::default()
    };
    q.enqueue_batch(&[
        work_spec("r", &fail("retry")).group("g"),
        work_spec("perm", &fail("permanent")).group("g"),
        work_spec("panic", &fail("panic")).group("g"),
        JobSpec::new("poison", "work", json!({"sleep_ms": "not a number"})).group("g"),
    ])
    .await
    .unwrap();
    wait_for(SECS(10), "4 dead letters", || async {
        q.stats().await.unwrap().dead == 4
    })
    .await;
    let info = q.job("r").await.unwrap().unwrap();
    assert_eq!(info.attempts, 3, "kind policy: 3 attempts");
    assert_eq!(info.history.len(), 3);
    for (i, h) in info.history.iter().enumerate() {
        assert_eq!(h.attempt as usize, 3 - i);
        assert_eq!(h.outcome, "failed");
        assert_eq!(h.error, "boom");
        assert!(h.worker.is_some() && h.started_at.is_some());
    }
    // Backoff between attempts stays under the 200 ms cap (plus claim latency).
    let gap = info.history[0].started_at.unwrap() - info.history[1].ended_at;
    assert!(gap < 200.0 + 400.0, "gap {gap} ms");
    for k in ["perm", "panic", "poison"] {
        let i = q.job(k).await.unwrap().unwrap();
        assert_eq!((i.state.as_str(), i.attempts), ("dead", 1), "{k}");
    }
    assert!(
        q.job("poison")
            .await
            .unwrap()
            .unwrap()
            .last_error
            .unwrap()
            .contains("undecodable")
    );
    // Retry brings them back with the same id and reset attempts.
    assert_eq!(q.retry_dead_group("g").await.unwrap(), 4);
    wait_for(SECS(10), "dead again after a full new round", || async {
        q.stats().await.unwrap().dead == 4 && q.job("r").await.unwrap().unwrap().history.len() == 6
    })
    .await;
    stop.cancel();
    w.await.unwrap();
}

#[tokio::test]
async fn lost_leases_are_counted_apart_with_their_own_limit() {
    let r = RedisServer::start();
    let mut c = cfg().lease(ms(150));
    c.max_lease_losses = 4;
    let q = queue(&r, c).await;
    q.enqueue(&noop("crashy").max_attempts(2)).await.unwrap();
    for round in 1..=4u32 {
        let j = q.claim("w", 1).await.unwrap().jobs.remove(0);
        assert_eq!((j.attempt, j.lease_losses), (1, round - 1));
        tokio::time::sleep(ms(200)).await;
        q.reap().await.unwrap();
    }
    // Four crashes with max_attempts 2: dead by the lease-loss limit, not as a poison pill
    // after the second.
    let info = q.job("crashy").await.unwrap().unwrap();
    assert_eq!(
        (info.state.as_str(), info.lease_losses, info.attempts),
        ("dead", 4, 0)
    );
    assert!(info.history.iter().all(|h| h.outcome == "lease_lost"));
    assert_eq!(QueueConfig::default().max_lease_losses, 10);
}

// 8. Redis faults -----------------------------------------------------------------------------

#[tokio::test]
async fn redis_restart_loses_no_acknowledged_write_and_workers_carry_on() {
    let mut r = RedisServer::start_with(RedisOptions {
        appendonly: true,
        appendfsync: "always",
    });
    let mut c = cfg();
    c.response_timeout = ms(1000);
    let q = queue(&r, c.clone()).await;
    let seen = Arc::new(Seen::default());
    let stop = CancellationToken::new();
    let w = spawn_worker(&r, &q, 4, seen.clone(), stop.clone());
    // A producer and an acking client keep writing while Redis dies.
    let producer = {
        let q = q.clone();
        tokio::spawn(async move {
            let mut confirmed = Vec::new();
            for i in 0..400 {
                let k = format!("e{i}");
                if q.enqueue(&work_spec(&k, &Work::default())).await.is_ok() {
                    confirmed.push(k);
                }
                tokio::time::sleep(ms(5)).await;
            }
            confirmed
        })
    };
    tokio::time::sleep(ms(700)).await;
    r.kill();
    tokio::time::sleep(ms(500)).await;
    r.restart();
    let confirmed = producer.await.unwrap();
    assert!(!confirmed.is_empty());
    // Every confirmed enqueue survived; the worker reconnected by itself and ran them all.
    wait_for(SECS(30), "every confirmed job done", || async {
        let mut all = true;
        for k in &confirmed {
            if state(&q, k).await != "done" {
                all = false;
                break;
            }
        }
        all
    })
    .await;

    // Acks confirmed before a kill are still there after it.
    let specs: Vec<JobSpec> = (0..50).map(|i| noop(&format!("a{i}"))).collect();
    stop.cancel();
    w.await.unwrap();
    q.enqueue_batch(&specs).await.unwrap();
    let jobs = q.claim("w", 50).await.unwrap().jobs;
    let mut acked = HashSet::new();
    for j in &jobs {
        if q.ack(&j.key, &j.token).await.unwrap() == Settled::Done {
            acked.insert(j.key.clone());
        }
    }
    r.kill();
    r.restart();
    let q2 = queue(&r, c).await;
    for k in &acked {
        assert_eq!(state(&q2, k).await, "done", "{k}");
    }
    assert_eq!(acked.len(), 50);
}

// 9. Shutdown ---------------------------------------------------------------------------------

#[tokio::test]
async fn sigterm_stops_claiming_finishes_or_hands_back_and_exits() {
    let r = RedisServer::start();
    let q = queue(&r, cfg()).await;
    let mut w = WorkerProc::spawn(
        &r,
        "ws",
        &[("QW_GRACE_MS", "1500"), ("QW_LEASE_MS", "30000")],
    );
    q.enqueue_batch(&[
        JobSpec::new("short", "sleep", json!({"sleep_ms": 800})),
        JobSpec::new(
            "deferring",
            "sleep",
            json!({"sleep_ms": 20000, "defer_on_stop": true}),
        ),
        JobSpec::new("stubborn", "sleep", json!({"sleep_ms": 20000})),
    ])
    .await
    .unwrap();
    wait_for(SECS(5), "three started", || async {
        list(&q, "test:started").await.len() == 3
    })
    .await;
    let t0 = Instant::now();
    w.signal("-TERM");
    q.enqueue(&JobSpec::new("after", "sleep", json!({})))
        .await
        .unwrap();
    let status = w.wait_exit(SECS(10)).await;
    assert!(status.success());
    // Far below the 30 s lease: nothing waited for a lease to expire.
    assert!(t0.elapsed() < SECS(4), "exit took {:?}", t0.elapsed());
    assert_eq!(state(&q, "short").await, "done");
    assert_eq!(state(&q, "after").await, "ready", "no claim after SIGTERM");
    for k in ["deferring", "stubborn"] {
        let i = q.job(k).await.unwrap().unwrap();
        assert_eq!(
            (i.state.as_str(), i.attempts),
            ("ready", 0),
            "{k} handed back"
        );
    }
}

// 10. Observability ---------------------------------------------------------------------------

#[tokio::test]
async fn stats_count_every_state_per_queue_key_and_group() {
    let r = RedisServer::start();
    let q = queue(&r, cfg()).await;
    q.set_cap("k", Some(1)).await.unwrap();
    q.enqueue_batch(&[
        noop("r1").group("g"),
        noop("r2").group("g"),
        noop("s1").run_after(SECS(60)).group("g"),
        noop("g1").after(["r1"]).group("g"),
        noop("k1").slots(["k"]),
        noop("k2").slots(["k"]),
        noop("d1").max_attempts(1),
    ])
    .await
    .unwrap();
    tokio::time::sleep(ms(50)).await;
    let st = q.stats().await.unwrap();
    assert_eq!((st.ready, st.scheduled, st.gated), (5, 1, 1));
    assert!(st.oldest_ready_age.unwrap() >= ms(40));
    // Claim everything claimable: r1 r2 k1 d1 (k2 parks on k).
    let jobs = q.claim("w", 10).await.unwrap().jobs;
    assert_eq!(jobs.len(), 4);
    let d1 = jobs.iter().find(|j| j.key == "d1").unwrap();
    q.fail("d1", &d1.token, "w", &FailOutcome::retry("x", ms(0)))
        .await
        .unwrap();
    let r1 = jobs.iter().find(|j| j.key == "r1").unwrap();
    q.ack("r1", &r1.token).await.unwrap();
    let st = q.stats().await.unwrap();
    assert_eq!(
        (
            st.ready,
            st.scheduled,
            st.gated,
            st.waiting_for_slot,
            st.in_flight,
            st.dead,
            st.done
        ),
        (1, 1, 0, 1, 2, 1, 1)
    );
    let k = q.slot_stats("k").await.unwrap();
    assert_eq!((k.cap, k.held, k.waiting), (Some(1), 1, 1));
    let g = q.group_stats("g").await.unwrap();
    assert_eq!((g.ready, g.scheduled, g.in_flight, g.done), (1, 1, 1, 1));
}

#[tokio::test]
async fn a_job_handed_back_while_its_outside_work_runs_keeps_its_slots() {
    let r = RedisServer::start();
    let q = queue(&r, cfg().lease(ms(300))).await;
    q.set_cap("node", Some(1)).await.unwrap();
    q.enqueue(&noop("cloning").slots(["node"])).await.unwrap();
    let j = q.claim("w1", 1).await.unwrap().jobs.remove(0);
    q.enqueue(&noop("next").slots(["node"])).await.unwrap();
    // Shutdown while its Proxmox task still runs: handed back, slot kept, no attempt spent.
    q.release_keeping_slots(&j.key, &j.token, ms(0))
        .await
        .unwrap();
    assert_eq!(q.job("cloning").await.unwrap().unwrap().attempts, 0);
    assert_eq!(q.slot_stats("node").await.unwrap().held, 1);
    let c = q.claim("w2", 2).await.unwrap();
    assert_eq!(c.jobs.len(), 1);
    assert_eq!(c.jobs[0].key, "cloning", "only the holder may run");
    q.ack(&c.jobs[0].key, &c.jobs[0].token).await.unwrap();
    let c = q.claim("w2", 2).await.unwrap();
    assert_eq!(c.jobs[0].key, "next");

    // Handed back with a delay: the slot stays held through delay + lease + sweep.
    q.ack(&c.jobs[0].key, &c.jobs[0].token).await.unwrap();
    q.set_cap("other", Some(1)).await.unwrap();
    q.enqueue(&noop("held").slots(["other"])).await.unwrap();
    let h = q.claim("w3", 1).await.unwrap().jobs.remove(0);
    assert_eq!(h.key, "held");
    q.release_keeping_slots(&h.key, &h.token, ms(10_000))
        .await
        .unwrap();
    assert_eq!(q.slot_stats("other").await.unwrap().held, 1);
    tokio::time::sleep(ms(400)).await;
    q.reap().await.unwrap();
    assert_eq!(
        q.slot_stats("other").await.unwrap().held,
        1,
        "still within delay + lease + sweep"
    );
}

#[tokio::test]
async fn a_failed_attempt_that_lost_track_of_its_work_keeps_its_slots() {
    let r = RedisServer::start();
    let q = queue(&r, cfg().lease(ms(300))).await;
    q.set_cap("node", Some(1)).await.unwrap();
    q.enqueue(&noop("cloning").slots(["node"]).max_attempts(2))
        .await
        .unwrap();
    let j = q.claim("w1", 1).await.unwrap().jobs.remove(0);
    q.enqueue(&noop("next").slots(["node"])).await.unwrap();
    // Its task's polls failed: the task may still run. The attempt is spent, the slot kept.
    let lost = FailOutcome {
        keep_slots: true,
        ..FailOutcome::retry("polls failing", ms(0))
    };
    q.fail(&j.key, &j.token, "w1", &lost).await.unwrap();
    assert_eq!(q.job("cloning").await.unwrap().unwrap().attempts, 1);
    assert_eq!(q.slot_stats("node").await.unwrap().held, 1);
    let c = q.claim("w2", 2).await.unwrap();
    assert_eq!(c.jobs.len(), 1, "{:?}", c.jobs);
    assert_eq!(c.jobs[0].key, "cloning", "only the holder may run");
    // Its last attempt fails the same way: dead-lettered, and the slot is still kept until
    // the hold passes (the task may still run), then freed by the reaper.
    let settled = q
        .fail(&c.jobs[0].key, &c.jobs[0].token, "w2", &lost)
        .await
        .unwrap();
    assert_eq!(settled, Settled::Dead);
    assert!(
        q.claim("w2", 2).await.unwrap().jobs.is_empty(),
        "next waits"
    );
    assert_eq!(q.slot_stats("node").await.unwrap().held, 1);
    tokio::time::sleep(ms(700)).await;
    q.reap().await.unwrap();
    let c = q.claim("w2", 2).await.unwrap();
    assert_eq!(c.jobs.len(), 1);
    assert_eq!(c.jobs[0].key, "next", "freed once lease + sweep passed");
}

/// Keys that went on forever: a purged dead letter's successor set, and every record of a
/// finished group (done, cancelled, queued and dead jobs with their history), which a
/// torn-down deployment's epoch leaves behind. A running job survives the purge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purges_leave_no_record_of_a_finished_group_or_a_dead_letter() {
    let r = RedisServer::start();
    let mut c = cfg();
    c.dead_retention = ms(300);
    let q = queue(&r, c).await;
    let mut conn = q.connection();
    let keys = |pat: &'static str| {
        let mut conn = conn.clone();
        async move {
            let mut v: Vec<String> = redis::cmd("KEYS")
                .arg(pat)
                .query_async(&mut conn)
                .await
                .unwrap();
            v.sort();
            v
        }
    };

    // A dead letter with a successor: once purged, its successor set goes too.
    q.enqueue_batch(&[noop("p").max_attempts(1), noop("s").after(["p"])])
        .await
        .unwrap();
    let j = q.claim("w", 1).await.unwrap().jobs.remove(0);
    q.fail(&j.key, &j.token, "w", &FailOutcome::permanent("boom"))
        .await
        .unwrap();
    assert_eq!(state(&q, "p").await, "dead");
    assert_eq!(keys("*succ:p").await.len(), 1);
    tokio::time::sleep(ms(400)).await;
    q.reap().await.unwrap();
    assert_eq!(state(&q, "p").await, "", "purged after its retention");
    assert!(
        keys("*succ:p").await.is_empty(),
        "its successor set is gone too"
    );

    // A group with a done, a cancelled, a dead, a gated and a running job.
    let g = |k: &str| noop(k).group("dep#0");
    q.enqueue_batch(&[
        g("g-done"),
        g("g-dead").max_attempts(1),
        g("g-run"),
        g("g-gated").after(["g-run"]),
        g("g-later").run_after(SECS(60)),
    ])
    .await
    .unwrap();
    let mut claimed = q.claim("w", 3).await.unwrap().jobs;
    claimed.sort_by(|a, b| a.key.cmp(&b.key));
    let [dead, done, run] = <[_; 3]>::try_from(claimed).unwrap();
    q.ack(&done.key, &done.token).await.unwrap();
    q.fail(&dead.key, &dead.token, "w", &FailOutcome::permanent("x"))
        .await
        .unwrap();
    assert_eq!(
        q.purge_group("dep#0").await.unwrap(),
        4,
        "all but the running job"
    );
    assert_eq!(
        state(&q, "g-run").await,
        "running",
        "a live job is never deleted"
    );
    assert!(keys("*hist:g-*").await.is_empty());
    let gs = q.group_stats("dep#0").await.unwrap();
    assert_eq!(
        (gs.dead, gs.gated, gs.scheduled, gs.done, gs.in_flight),
        (0, 0, 0, 0, 1),
        "{gs:?}"
    );
    let stats = q.stats().await.unwrap();
    // `s`, gated on the purged dead letter `p`, is the only gated job left (not in the group).
    assert_eq!(
        (stats.dead, stats.gated, stats.scheduled),
        (0, 1, 0),
        "{stats:?}"
    );
    // The last one done, purged: nothing of the group is left.
    q.ack(&run.key, &run.token).await.unwrap();
    q.purge_group("dep#0").await.unwrap();
    let left: Vec<String> = keys("*")
        .await
        .into_iter()
        .filter(|k| k.contains("g-") || k.contains("dep#0"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let _: () = redis::cmd("PING").query_async(&mut conn).await.unwrap();
}

/// A job enqueued to be forgotten leaves nothing at its ack, after releasing what it gated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_job_releases_its_successors_and_leaves_nothing() {
    let r = RedisServer::start();
    let q = queue(&r, cfg()).await;
    q.enqueue_batch(&[
        noop("f").group("grp").forget_when_done(),
        noop("after-f").after(["f"]),
    ])
    .await
    .unwrap();
    let j = q.claim("w", 1).await.unwrap().jobs.remove(0);
    assert_eq!(j.key, "f");
    q.ack(&j.key, &j.token).await.unwrap();
    assert_eq!(state(&q, "f").await, "", "forgotten at its ack");
    assert_eq!(
        state(&q, "after-f").await,
        "ready",
        "its successor was released first"
    );
    let mut conn = q.connection();
    let left: Vec<String> = redis::cmd("KEYS")
        .arg("*grp*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        left.is_empty(),
        "its group went with its last member: {left:?}"
    );
}
