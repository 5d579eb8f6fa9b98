//! What a producer or a handler asks the queue to run.

use std::time::Duration;

use serde::Serialize;

/// One job to enqueue. The key is the idempotency key and the job id: enqueuing a key that
/// exists (in any state, within `done_retention` once done) returns `Existing` and changes nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    /// Idempotency key and job id, e.g. `dep-42/vm-101/clone`. Must not contain a newline.
    pub key: String,
    /// Job kind; selects the retry policy and lets the worker dispatch.
    pub kind: String,
    /// Handler input; decoded by the worker into its `Args` type.
    pub payload: serde_json::Value,
    /// Attempts the handler may spend; `None` takes the kind's `RetryPolicy`.
    pub max_attempts: Option<u32>,
    /// Keys of jobs that must have succeeded before this one becomes ready.
    pub gate: Vec<String>,
    /// Concurrency keys, e.g. `node:pve1`, `storage:pve1/local-lvm`: all acquired at claim.
    pub slot_keys: Vec<String>,
    /// Not before this delay from enqueue time (Redis clock).
    pub run_after: Option<Duration>,
    /// Group (e.g. the deployment id) for `group_stats`, `cancel_group`, `retry_dead_group`.
    pub group: Option<String>,
    /// Deleted at its ack (after releasing its successors) instead of kept for the done
    /// retention: for a job whose own success removes everything else of its group.
    pub forget_when_done: bool,
}

impl JobSpec {
    /// A job with no gate, slot, delay or group.
    pub fn new(
        key: impl Into<String>,
        kind: impl Into<String>,
        payload: serde_json::Value,
    ) -> Self {
        Self {
            key: key.into(),
            kind: kind.into(),
            payload,
            max_attempts: None,
            gate: Vec::new(),
            slot_keys: Vec::new(),
            run_after: None,
            group: None,
            forget_when_done: false,
        }
    }

    /// Deletes the job at its ack instead of keeping it (see [`JobSpec::forget_when_done`]).
    pub fn forget_when_done(mut self) -> Self {
        self.forget_when_done = true;
        self
    }

    /// Holds the job until every named job has succeeded.
    pub fn after(mut self, keys: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.gate.extend(keys.into_iter().map(Into::into));
        self
    }

    /// Adds concurrency keys. A key named `mutex:...` is held by one job at a time (cap 1
    /// without [`crate::queue::Queue::set_cap`]), e.g. to serialize the jobs that change one
    /// VM.
    pub fn slots(mut self, keys: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.slot_keys.extend(keys.into_iter().map(Into::into));
        self
    }

    /// Sets the group.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }

    /// Sets the delay.
    pub fn run_after(mut self, delay: Duration) -> Self {
        self.run_after = Some(delay);
        self
    }

    /// Sets max attempts.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n);
        self
    }
}

/// What enqueueing one spec did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// A new job was written.
    Created,
    /// A job with this key already existed; nothing changed.
    Existing,
}

/// The spec as the Lua scripts read it (short names keep big batches small).
#[derive(Serialize)]
pub(crate) struct WireSpec<'a> {
    pub k: &'a str,
    pub kind: &'a str,
    /// Payload as JSON text.
    pub p: String,
    pub m: u32,
    pub ml: u32,
    pub d: u64,
    pub g: &'a str,
    pub gate: Vec<&'a str>,
    pub s: Vec<&'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub f: bool,
}
