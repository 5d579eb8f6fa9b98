//! `Lease`: what a running handler knows about its claim, and its fenced writes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use apalis_core::task::Task;
use apalis_core::task::data::MissingDataError;
use apalis_core::task::from_request::FromRequest;
use tokio::sync::watch;

use super::error::JobError;
use super::queue::{ClaimedJob, Queue};
use super::scripts::FencedScript;
use super::spec::JobSpec;

/// The lease of one claimed job, handed to the handler as an extractor (`lease: Lease`).
///
/// `is_lost()` turns true when renewal is refused (the job was reaped after a pause, or its
/// group was cancelled) or keeps failing for longer than the lease; from then on every ack
/// and fenced write is refused, so the handler should stop at its next safe point.
/// `should_stop()` is also true once the worker shuts down.
#[derive(Clone)]
pub struct Lease {
    inner: Arc<Inner>,
}

struct Inner {
    queue: Queue,
    job: ClaimedJob,
    worker: String,
    lost: watch::Sender<bool>,
    stop: watch::Sender<bool>,
    followups: Mutex<Vec<JobSpec>>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("job_key", &self.inner.job.key)
            .field("attempt", &self.inner.job.attempt)
            .field("lost", &self.is_lost())
            .finish_non_exhaustive()
    }
}

impl Lease {
    pub(crate) fn new(queue: Queue, job: ClaimedJob, worker: String) -> Self {
        Self {
            inner: Arc::new(Inner {
                queue,
                job,
                worker,
                lost: watch::channel(false).0,
                stop: watch::channel(false).0,
                followups: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Job key (id).
    pub fn job_key(&self) -> &str {
        &self.inner.job.key
    }

    /// Job kind.
    pub fn kind(&self) -> &str {
        &self.inner.job.kind
    }

    /// Lease token of this claim.
    pub fn token(&self) -> &str {
        &self.inner.job.token
    }

    /// Attempt number, 1-based (lost leases are not attempts).
    pub fn attempt(&self) -> u32 {
        self.inner.job.attempt
    }

    /// When this job was enqueued (ms since the epoch, Redis' clock), as read at its claim.
    pub fn enqueued_at(&self) -> i64 {
        self.inner.job.created_at
    }

    /// Attempts allowed.
    pub fn max_attempts(&self) -> u32 {
        self.inner.job.max_attempts
    }

    /// Leases this job lost before this claim (previous workers killed or paused). A handler
    /// may use it to look for a Proxmox task a previous attempt started.
    pub fn lease_losses(&self) -> u32 {
        self.inner.job.lease_losses
    }

    /// Group of the job, if any.
    pub fn group(&self) -> Option<&str> {
        self.inner.job.group.as_deref()
    }

    /// Worker id that holds the claim.
    pub fn worker(&self) -> &str {
        &self.inner.worker
    }

    /// The queue the job came from.
    pub fn queue(&self) -> &Queue {
        &self.inner.queue
    }

    /// True once the lease is known to be lost.
    pub fn is_lost(&self) -> bool {
        *self.inner.lost.borrow()
    }

    /// Resolves when the lease is lost (never, if it is not).
    pub async fn lost(&self) {
        let mut rx = self.inner.lost.subscribe();
        let _ = rx.wait_for(|l| *l).await;
    }

    /// True once the lease is lost or the worker is shutting down: stop at the next safe point
    /// and return `JobError::Deferred` (or `LeaseLost`).
    pub fn should_stop(&self) -> bool {
        self.is_lost() || *self.inner.stop.borrow()
    }

    /// Resolves when `should_stop` turns true.
    pub async fn stop_requested(&self) {
        let mut lost = self.inner.lost.subscribe();
        let mut stop = self.inner.stop.subscribe();
        tokio::select! {
            _ = lost.wait_for(|l| *l) => {}
            _ = stop.wait_for(|s| *s) => {}
        }
    }

    /// Checks with Redis that the lease still holds (and extends it); `Err(LeaseLost)` if not.
    /// Call it right before a side effect that must not be done twice.
    pub async fn check(&self) -> Result<(), JobError> {
        if self.is_lost() {
            return Err(JobError::LeaseLost);
        }
        match self.inner.queue.renew(self.job_key(), self.token()).await {
            Ok(true) => Ok(()),
            Ok(false) => {
                self.mark_lost();
                Err(JobError::LeaseLost)
            }
            Err(e) => Err(JobError::Retry(format!("lease check: {e}"))),
        }
    }

    /// Writes hash fields of `key` (a key made with `Queue::key`) only while this lease holds.
    pub async fn hset_fenced(&self, key: &str, fields: &[(&str, &str)]) -> Result<(), JobError> {
        let r = self
            .inner
            .queue
            .hset_fenced(self.job_key(), self.token(), key, fields)
            .await;
        self.fenced(r)
    }

    /// Runs a fenced script (see [`FencedScript`]) only while this lease holds.
    pub async fn eval_fenced(
        &self,
        script: &FencedScript,
        keys: &[&str],
        args: &[&str],
    ) -> Result<(), JobError> {
        let r = self
            .inner
            .queue
            .eval_fenced(script, self.job_key(), self.token(), keys, args)
            .await;
        self.fenced(r)
    }

    /// A fenced write's answer: refused means the lease is lost; an error is retried.
    fn fenced(&self, r: Result<bool, super::QueueError>) -> Result<(), JobError> {
        match r {
            Ok(true) => Ok(()),
            Ok(false) => {
                self.mark_lost();
                Err(JobError::LeaseLost)
            }
            Err(e) => Err(JobError::Retry(format!("fenced write: {e}"))),
        }
    }

    /// Stages follow-up jobs: enqueued in the same atomic step as this job's ack, if the
    /// handler succeeds; dropped if it fails.
    pub fn add_followups(&self, specs: impl IntoIterator<Item = JobSpec>) {
        self.inner
            .followups
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(specs);
    }

    pub(crate) fn take_followups(&self) -> Vec<JobSpec> {
        std::mem::take(
            &mut *self
                .inner
                .followups
                .lock()
                .unwrap_or_else(|e| e.into_inner()),
        )
    }

    pub(crate) fn mark_lost(&self) {
        self.inner.lost.send_replace(true);
    }

    pub(crate) fn request_stop(&self) {
        self.inner.stop.send_replace(true);
    }

    pub(crate) async fn renew(&self) -> Result<bool, super::error::QueueError> {
        self.inner.queue.renew(self.job_key(), self.token()).await
    }

    pub(crate) fn lease_len(&self) -> Duration {
        self.inner.queue.config().lease
    }
}

impl<Args: Sync> FromRequest<Task<Args>> for Lease {
    type Error = MissingDataError;

    async fn from_request(task: &Task<Args>) -> Result<Self, Self::Error> {
        task.data().get_checked::<Lease>().cloned()
    }
}
