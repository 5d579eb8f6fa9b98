//! `LeaseBackend<Args>`: the apalis `Backend` over `Queue`. It claims in batches no bigger
//! than the worker's free slots, decodes payloads (dead-lettering those it cannot decode),
//! never ends or errors its stream (Redis errors back off and retry), runs a reaper, and on
//! shutdown hands back anything claimed but not started.

use std::collections::VecDeque;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use apalis_core::backend::{Backend, BackendConfig, finalize::Ephemeral};
use apalis_core::task::{Task, builder::TaskBuilder, task_id::TaskId};
use apalis_core::worker::context::WorkerContext;
use futures::FutureExt;
use futures::future::BoxFuture;
use futures::task::AtomicWaker;
use serde::de::DeserializeOwned;

use super::error::QueueError;
use super::layer::LeaseLayer;
use super::lease::Lease;
use super::queue::{Claim, ClaimedJob, FailOutcome, Queue, ReaperHandle};

/// State shared by the backend and its layer.
pub(crate) struct WorkerShared {
    pub(crate) queue: Queue,
    running: AtomicUsize,
    waker: AtomicWaker,
    /// Set when a job of this worker settled since the last claim was sent: its ack may have
    /// freed a capped slot or opened gates, so an idle wait ends early (see `poll_next`).
    finished: AtomicBool,
}

impl WorkerShared {
    pub(crate) fn job_finished(&self) {
        self.running.fetch_sub(1, Ordering::SeqCst);
        self.finished.store(true, Ordering::SeqCst);
        self.waker.wake();
    }
}

/// Options of one worker's backend.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Worker id recorded on every claim and attempt record; unique per process
    /// (default `<hostname>:<pid>:<random>`).
    pub worker_id: String,
    /// Jobs this worker runs at once. The backend enforces it (no `.concurrency()` layer is
    /// needed) and never claims more than its free slots.
    pub concurrency: usize,
}

impl WorkerOptions {
    /// Default worker id with the given concurrency.
    pub fn new(concurrency: usize) -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "host".to_owned());
        let rand = uuid::Uuid::new_v4().simple().to_string();
        Self {
            worker_id: format!("{host}:{}:{}", std::process::id(), &rand[..8]),
            concurrency: concurrency.max(1),
        }
    }
}

type ClaimFuture = BoxFuture<'static, Result<Claim, QueueError>>;

/// apalis backend over a `Queue`; `Args` is decoded from each job's JSON payload.
pub struct LeaseBackend<Args> {
    shared: Arc<WorkerShared>,
    opts: WorkerOptions,
    buffer: VecDeque<ClaimedJob>,
    fetch: Option<ClaimFuture>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Whether `sleep` is the idle wait (which a finished job may cut short), not the
    /// error backoff.
    sleep_is_idle: bool,
    error_backoff: Duration,
    reaper: Option<ReaperHandle>,
    close: Option<BoxFuture<'static, ()>>,
    _args: PhantomData<fn() -> Args>,
}

impl<Args> std::fmt::Debug for LeaseBackend<Args> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseBackend")
            .field("worker_id", &self.opts.worker_id)
            .field("concurrency", &self.opts.concurrency)
            .finish_non_exhaustive()
    }
}

impl<Args> LeaseBackend<Args> {
    /// A backend for one worker.
    pub fn new(queue: Queue, opts: WorkerOptions) -> Self {
        Self {
            shared: Arc::new(WorkerShared {
                queue,
                running: AtomicUsize::new(0),
                waker: AtomicWaker::new(),
                finished: AtomicBool::new(false),
            }),
            opts,
            buffer: VecDeque::new(),
            fetch: None,
            sleep: None,
            sleep_is_idle: false,
            error_backoff: Duration::from_millis(200),
            reaper: None,
            close: None,
            _args: PhantomData,
        }
    }

    /// The worker id claims are recorded under.
    pub fn worker_id(&self) -> &str {
        &self.opts.worker_id
    }

    fn queue(&self) -> &Queue {
        &self.shared.queue
    }
}

impl<Args: DeserializeOwned + Send + 'static> LeaseBackend<Args> {
    /// Turns a claimed job into a task, or dead-letters an undecodable payload.
    fn to_task(&self, job: ClaimedJob) -> Option<Task<Args>> {
        match serde_json::from_str::<Args>(&job.payload) {
            Ok(args) => {
                let lease = Lease::new(
                    self.queue().clone(),
                    job.clone(),
                    self.opts.worker_id.clone(),
                );
                Some(
                    TaskBuilder::new(args)
                        .task_id(TaskId::from_string(job.key.clone()))
                        .attempt(job.attempt.saturating_sub(1) as usize)
                        .max_attempts(job.max_attempts as usize)
                        .data(lease)
                        .build(),
                )
            }
            Err(e) => {
                tracing::error!(job_id = %job.key, kind = %job.kind, error = %e, "undecodable payload; dead-lettering");
                let q = self.queue().clone();
                let worker = self.opts.worker_id.clone();
                tokio::spawn(async move {
                    let msg = format!("undecodable payload: {e}");
                    if let Err(e) = q
                        .fail(&job.key, &job.token, &worker, &FailOutcome::permanent(&msg))
                        .await
                    {
                        tracing::warn!(job_id = %job.key, error = %e, "could not dead-letter");
                    }
                });
                None
            }
        }
    }
}

impl<Args: DeserializeOwned + Send + 'static> Backend for LeaseBackend<Args> {
    type Task = Task<Args>;
    type Error = QueueError;

    fn poll_ready(
        &mut self,
        cx: &mut Context<'_>,
        _worker: &WorkerContext,
    ) -> Poll<Result<(), Self::Error>> {
        if self.reaper.is_none() {
            self.reaper = Some(self.queue().spawn_reaper());
        }
        if !self.buffer.is_empty() {
            return Poll::Ready(Ok(()));
        }
        self.shared.waker.register(cx.waker());
        if self.shared.running.load(Ordering::SeqCst) < self.opts.concurrency {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        _worker: &WorkerContext,
    ) -> Poll<Option<Result<Self::Task, Self::Error>>> {
        loop {
            if let Some(job) = self.buffer.pop_front() {
                if let Some(task) = self.to_task(job) {
                    self.shared.running.fetch_add(1, Ordering::SeqCst);
                    return Poll::Ready(Some(Ok(task)));
                }
                continue;
            }
            if let Some(fetch) = self.fetch.as_mut() {
                let res = match fetch.poll_unpin(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(r) => r,
                };
                self.fetch = None;
                let cfg = self.queue().config();
                match res {
                    Ok(claim) if claim.jobs.is_empty() => {
                        let wait = claim
                            .next_due
                            .map_or(cfg.idle_poll, |d| d.min(cfg.idle_poll));
                        self.error_backoff = Duration::from_millis(200);
                        self.sleep = Some(Box::pin(tokio::time::sleep(wait)));
                        self.sleep_is_idle = true;
                    }
                    Ok(claim) => {
                        self.error_backoff = Duration::from_millis(200);
                        self.buffer.extend(claim.jobs);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, backoff = ?self.error_backoff, "claim failed; backing off");
                        self.sleep = Some(Box::pin(tokio::time::sleep(self.error_backoff)));
                        self.sleep_is_idle = false;
                        self.error_backoff =
                            (self.error_backoff * 2).min(Duration::from_millis(6400));
                    }
                }
                continue;
            }
            if let Some(sleep) = self.sleep.as_mut() {
                // A job of ours settled while we idled: its ack may have freed a capped slot
                // (parked jobs are ready again) or opened gates, so claim now instead of at
                // the end of the idle poll. Without this a slot hand-off waited up to
                // `idle_poll` (200 ms: 8% of a 2.5 s linked clone on a capped node).
                let kicked =
                    self.sleep_is_idle && self.shared.finished.swap(false, Ordering::SeqCst);
                if !kicked && sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.sleep = None;
            }
            let running = self.shared.running.load(Ordering::SeqCst);
            let free = self.opts.concurrency.saturating_sub(running).max(1);
            let n = free.min(self.queue().config().claim_batch.max(1));
            let q = self.queue().clone();
            let worker = self.opts.worker_id.clone();
            // Finishes from here on are seen by this claim or flagged for the next one.
            self.shared.finished.store(false, Ordering::SeqCst);
            self.fetch = Some(async move { q.claim(&worker, n).await }.boxed());
        }
    }

    fn poll_close(
        &mut self,
        cx: &mut Context<'_>,
        _worker: &WorkerContext,
    ) -> Poll<Result<(), Self::Error>> {
        if self.close.is_none() {
            self.reaper = None;
            let q = self.queue().clone();
            let fetch = self.fetch.take();
            let mut jobs: Vec<ClaimedJob> = self.buffer.drain(..).collect();
            self.close = Some(
                async move {
                    // A claim already sent may have taken jobs: finish it and hand them back.
                    if let Some(f) = fetch
                        && let Ok(c) = f.await
                    {
                        jobs.extend(c.jobs);
                    }
                    for j in jobs {
                        if let Err(e) = q.release(&j.key, &j.token, Duration::ZERO).await {
                            tracing::warn!(job_id = %j.key, error = %e, "release at shutdown failed");
                        }
                    }
                }
                .boxed(),
            );
        }
        match self.close.as_mut().map(|f| f.poll_unpin(cx)) {
            Some(Poll::Pending) => Poll::Pending,
            _ => Poll::Ready(Ok(())),
        }
    }
}

impl<Args> BackendConfig for LeaseBackend<Args> {
    type Args = Args;
    type Id = String;
    type Kind = Ephemeral;
    type Config = WorkerOptions;
    type Layer = LeaseLayer;

    fn config(&self) -> &Self::Config {
        &self.opts
    }

    fn middleware(&mut self, worker: &mut WorkerContext) -> Self::Layer {
        LeaseLayer::new(self.shared.clone(), worker.clone())
    }
}
