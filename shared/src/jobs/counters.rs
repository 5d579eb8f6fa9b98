//! `JobCounters`: what the jobs of one worker process did, for the worker's `/metrics`.
//!
//! Counted in [`super::run`] from each handler's result: outcomes by kind (done, retry,
//! failed, deferred, lease_lost), and the jobs running now per (cluster, node) where their
//! Proxmox work happens (a clone's source node: its task runs there and its `clone-node`
//! slot is that node's). Process-local and lock-free on the hot path; it knows nothing of
//! the text format (that is `worker::metrics`).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use super::payload::{Job, KINDS};
use crate::queue::{JobError, Lease};

/// How one run of a job ended, as the queue will settle it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// Acked.
    Done,
    /// Failed, retried after a backoff.
    Retry,
    /// Failed for good: permanent error, or the last attempt failed (dead-lettered).
    Failed,
    /// Handed back without spending an attempt (shutdown, a task still running).
    Deferred,
    /// The lease was lost mid-job; someone else owns it now.
    LeaseLost,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Outcome::Done,
        Outcome::Retry,
        Outcome::Failed,
        Outcome::Deferred,
        Outcome::LeaseLost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Done => "done",
            Outcome::Retry => "retry",
            Outcome::Failed => "failed",
            Outcome::Deferred => "deferred",
            Outcome::LeaseLost => "lease_lost",
        }
    }

    /// How a job run ends: by the handler's result, unless the lease was lost meanwhile
    /// (then every settle is refused); a retry on the last attempt is a failure.
    pub fn of(result: &Result<(), JobError>, lease: &Lease) -> Outcome {
        if lease.is_lost() {
            return Outcome::LeaseLost;
        }
        Outcome::of_result(result, lease.attempt() >= lease.max_attempts())
    }

    /// The outcome of a handler's result alone.
    pub fn of_result(result: &Result<(), JobError>, last_attempt: bool) -> Outcome {
        match result {
            Ok(()) => Outcome::Done,
            Err(JobError::Permanent(_)) => Outcome::Failed,
            Err(JobError::Retry(_) | JobError::RetryAfter(..) | JobError::RetryKeepingSlots(_))
                if last_attempt =>
            {
                Outcome::Failed
            }
            Err(JobError::Retry(_) | JobError::RetryAfter(..) | JobError::RetryKeepingSlots(_)) => {
                Outcome::Retry
            }
            Err(
                JobError::Deferred | JobError::DeferredFor(_) | JobError::DeferredKeepingSlots(_),
            ) => Outcome::Deferred,
            Err(JobError::LeaseLost) => Outcome::LeaseLost,
        }
    }
}

/// Per-kind outcome counters and per-node in-flight gauges of one worker process.
pub struct JobCounters {
    /// `[kind index][outcome index]`, kinds in the order of [`KINDS`].
    outcomes: Vec<[AtomicU64; 5]>,
    /// Runs that were a retry (attempt > 1), by kind index.
    retries: Vec<AtomicU64>,
    in_flight: Mutex<BTreeMap<(String, String), i64>>,
}

impl Default for JobCounters {
    fn default() -> Self {
        JobCounters {
            outcomes: KINDS.iter().map(|_| Default::default()).collect(),
            retries: KINDS.iter().map(|_| AtomicU64::new(0)).collect(),
            in_flight: Mutex::default(),
        }
    }
}

impl JobCounters {
    /// Counts one run of a job of `kind` (its `attempt`, from 1) that ended with `outcome`.
    pub fn record(&self, kind: &str, attempt: u32, outcome: Outcome) {
        if let Some(i) = KINDS.iter().position(|k| *k == kind) {
            self.outcomes[i][outcome as usize].fetch_add(1, Ordering::Relaxed);
            if attempt > 1 {
                self.retries[i].fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Runs of each kind that were a retry (attempt > 1), zeros included.
    pub fn retries(&self) -> Vec<(&'static str, u64)> {
        KINDS
            .iter()
            .zip(&self.retries)
            .map(|(k, n)| (*k, n.load(Ordering::Relaxed)))
            .collect()
    }

    /// Jobs of `kind` that ended with `outcome` so far.
    pub fn count(&self, kind: &str, outcome: Outcome) -> u64 {
        KINDS.iter().position(|k| *k == kind).map_or(0, |i| {
            self.outcomes[i][outcome as usize].load(Ordering::Relaxed)
        })
    }

    /// Every (kind, outcome, count), zeros included, in a stable order.
    pub fn outcomes(&self) -> Vec<(&'static str, Outcome, u64)> {
        let mut v = Vec::with_capacity(KINDS.len() * Outcome::ALL.len());
        for (i, kind) in KINDS.iter().enumerate() {
            for o in Outcome::ALL {
                v.push((
                    *kind,
                    o,
                    self.outcomes[i][o as usize].load(Ordering::Relaxed),
                ));
            }
        }
        v
    }

    /// Counts `job` as running on its node until the guard is dropped.
    pub fn start(&self, job: &Job) -> InFlight<'_> {
        let key = job_node(job).map(|(c, n)| (c.to_owned(), n.to_owned()));
        if let Some(k) = &key {
            *self.map().entry(k.clone()).or_default() += 1;
        }
        InFlight {
            counters: self,
            key,
        }
    }

    /// Jobs running now by (cluster, node); nodes seen before stay listed at 0.
    pub fn in_flight(&self) -> Vec<((String, String), i64)> {
        self.map().iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), i64>> {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Held while a job runs; see [`JobCounters::start`].
pub struct InFlight<'a> {
    counters: &'a JobCounters,
    key: Option<(String, String)>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(k) = self.key.take() {
            *self.counters.map().entry(k).or_default() -= 1;
        }
    }
}

/// The (cluster, node) whose Proxmox API a job works on; none for per-student jobs.
fn job_node(job: &Job) -> Option<(&str, &str)> {
    match job {
        Job::Student(_)
        | Job::StudentTeardown(_)
        | Job::TeardownFinish(_)
        | Job::Schedule(_)
        | Job::Replace(_)
        | Job::AuditRemove(_) => None,
        Job::NodeDebris(j) => Some((&j.cluster, &j.node)),
        Job::NodeNetwork(j) | Job::NodeNetworkTeardown(j) => Some((&j.cluster, &j.node)),
        Job::Clone(j) => Some((&j.vm.cluster, &j.source_node)),
        Job::Network(j) => Some((&j.vm.cluster, &j.vm.node)),
        Job::Permission(j) => Some((&j.vm.cluster, &j.vm.node)),
        Job::Start(j) => Some((&j.vm.cluster, &j.vm.node)),
        Job::Destroy(j) => Some((&j.vm.cluster, &j.vm.node)),
        Job::Baseline(j) => Some((&j.vm.cluster, &j.vm.node)),
        Job::Power(j) => Some((&j.vm.cluster, &j.vm.node)),
        Job::Reset(j) => Some((&j.vm.cluster, &j.vm.node)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_by_variant() {
        assert_eq!(Outcome::of_result(&Ok(()), false), Outcome::Done);
        let retry = Err(JobError::Retry("x".into()));
        assert_eq!(Outcome::of_result(&retry, false), Outcome::Retry);
        assert_eq!(Outcome::of_result(&retry, true), Outcome::Failed);
        assert_eq!(
            Outcome::of_result(&Err(JobError::Permanent("x".into())), false),
            Outcome::Failed
        );
        assert_eq!(
            Outcome::of_result(&Err(JobError::Deferred), false),
            Outcome::Deferred
        );
        assert_eq!(
            Outcome::of_result(&Err(JobError::LeaseLost), false),
            Outcome::LeaseLost
        );
    }

    #[test]
    fn counts_by_kind_and_unknown_kinds_are_ignored() {
        let c = JobCounters::default();
        c.record("clone", 1, Outcome::Done);
        c.record("clone", 2, Outcome::Done);
        c.record("network", 1, Outcome::Retry);
        c.record("no-such-kind", 1, Outcome::Done);
        assert_eq!(c.count("clone", Outcome::Done), 2);
        assert_eq!(c.count("network", Outcome::Retry), 1);
        assert_eq!(c.outcomes().len(), KINDS.len() * 5);
        assert_eq!(c.outcomes().iter().map(|x| x.2).sum::<u64>(), 3);
        assert!(c.retries().contains(&("clone", 1)));
        assert_eq!(c.retries().iter().map(|x| x.1).sum::<u64>(), 1);
    }
}
