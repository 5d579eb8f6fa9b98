//! Errors: what handlers return (`JobError`) and what queue calls fail with (`QueueError`).

use std::time::Duration;

/// What a handler returns on failure; the variant decides what happens to the job.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// Failed; retried after the kind's backoff until its attempts are spent.
    #[error("{0}")]
    Retry(String),
    /// Failed; retried after the given delay (still spends an attempt).
    #[error("{1} (retry after {0:?})")]
    RetryAfter(Duration, String),
    /// As `Retry`, but the job keeps its concurrency slots until it is claimed again (or,
    /// if it is not, until its backoff, lease and sweep have passed; also when it is
    /// dead-lettered): it lost track of work it started outside (a Proxmox task whose
    /// polls failed), which may still run and use what the slots stand for.
    #[error("{0}")]
    RetryKeepingSlots(String),
    /// Failed for good: dead-lettered at once, no retry.
    #[error("permanent: {0}")]
    Permanent(String),
    /// Not failed: hand the job back at its place in line without spending an attempt
    /// (shutdown, or a previous attempt's Proxmox task still running).
    #[error("deferred")]
    Deferred,
    /// As `Deferred`, but not before the given delay.
    #[error("deferred for {0:?}")]
    DeferredFor(Duration),
    /// As `DeferredFor`, but the job keeps its concurrency slots until it is claimed again
    /// (or, if it is not, until lease + sweep have passed): the work it started outside (a
    /// Proxmox task) is still running and still uses what the slots stand for.
    #[error("deferred for {0:?}, keeping its slots")]
    DeferredKeepingSlots(Duration),
    /// The lease was lost (`Lease::check`, fenced write refused): stop, the job is someone
    /// else's now. Settles as a release, which the fence then refuses.
    #[error("lease lost")]
    LeaseLost,
}

/// A queue call that did not reach a result.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// Redis refused, timed out or was unreachable. Every queue call may be retried.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// A spec the queue cannot store.
    #[error("invalid job spec `{key}`: {reason}")]
    InvalidSpec {
        /// The job key.
        key: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A fenced write named a key outside this queue's hash tag.
    #[error("key `{0}` is not in this queue's hash slot")]
    ForeignKey(String),
    /// A payload could not be encoded.
    #[error("payload of `{key}`: {source}")]
    Payload {
        /// The job key.
        key: String,
        /// The encoder's error.
        source: serde_json::Error,
    },
}

/// Why the lease layer could not settle a job; emitted as the task's error event.
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    /// The task carried no `Lease` (not produced by `LeaseBackend`).
    #[error("task has no lease")]
    NoLease,
    /// The token is no longer current: the job was reaped, cancelled or re-claimed.
    #[error("lease of `{0}` is stale; settle refused")]
    Stale(String),
    /// Redis kept failing; the lease will expire and the job run again.
    #[error("settle of `{job}` failed: {source}")]
    Redis {
        /// The job key.
        job: String,
        /// The last error.
        source: QueueError,
    },
}
