//! The job kinds of a deployment, each in its own module with its handler and its "already
//! done?" check: `student`, `node_network`, `clone`, `network`, `permission`, `start`,
//! `destroy`, `teardown` (per student and per node), `finish` (a teardown's last job),
//! `audit` (`audit-remove`: one unowned object `producer audit --fix` found);
//! `baseline` (the snapshot a reset returns to), and the operations on a deployment's VMs:
//! `power` (start, stop, shutdown) and `reset`; `schedule` (one event of a schedule);
//! `replace` and `node-debris` (students moved off a lost node, and what the move left
//! there removed when it is back; `node_loss` notices the loss).
//! `payload` holds what sits in Redis, `state` the deployment's records, `teardown_jobs`
//! the (pure) job list of a teardown or a prune, `cache` the per-process cluster facts.
//!
//! A job's scope (`<deployment>#<epoch>`) is the first segment of its key: its step records
//! and VM facts go to that scope's keys, so jobs of two epochs never share a record.
//!
//! Handlers converge: each reads the current state, does only what is missing, and can run
//! twice without harm. They decide retry or give up by the error's variant
//! ([`PveError::is_transient`]), never by message text. Only workers run handlers; the
//! producer reuses the checks for `plan`, `retry` and `teardown`.

pub mod api_slots;
pub mod audit;
pub mod baseline;
pub mod cache;
pub mod clone;
pub mod counters;
pub mod debris;
pub mod destroy;
pub mod finish;
pub mod leaks;
pub mod lost_reply;
pub mod network;
pub mod node_loss;
pub mod node_network;
pub mod payload;
pub mod permission;
pub mod power;
pub mod replace;
pub mod reset;
mod retry;
pub mod schedule;
pub mod start;
pub mod state;
pub mod student;
pub mod task_lists;
pub mod teardown;
pub mod teardown_jobs;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use payload::*;
pub use retry::queue_config;

use crate::clusters::{Clusters, ConnectError};
use crate::pve::{PveClient, PveError, TaskOutcome, Upid, WaitOptions};
use crate::queue::{JobError, Lease, Queue};
use state::{StepState, Store};

/// Timing knobs of the handlers.
#[derive(Debug, Clone)]
pub struct Timing {
    /// A clone (or another VM task) still running after this long is considered stuck.
    pub task_deadline: Duration,
    /// Cluster facts (users, pools, bridges) are reused for this long.
    pub cache_ttl: Duration,
    /// Task polling: first interval, then half the task's age, up to `poll_max`.
    pub poll_initial: Duration,
    pub poll_max: Duration,
    /// How often a protected call waiting for room at its node's API gate asks again (with
    /// jitter up to as much again; `api_slots`).
    pub api_retry: Duration,
    /// How long a job that must look at a VM or task again (a clone of its own still
    /// running or being removed, a lost reply's task not found yet) hands itself back for.
    pub recheck: Duration,
    /// How long a clone call without an answer may still come to run (queued for an API
    /// worker or a lock): until then, a VMID showing nothing is looked at again.
    pub lost_call_window: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            task_deadline: Duration::from_secs(3600),
            cache_ttl: Duration::from_secs(10),
            poll_initial: Duration::from_millis(100),
            poll_max: Duration::from_secs(1),
            api_retry: api_slots::RETRY,
            recheck: Duration::from_secs(2),
            lost_call_window: Duration::from_secs(10),
        }
    }
}

/// A wall-clock timer at a simulator's time scale, kept above 5 ms.
pub fn at_scale(d: Duration, scale: f64) -> Duration {
    d.mul_f64(scale).max(Duration::from_millis(5))
}

impl Timing {
    /// These timers at a simulator's time scale (`scale` < 1 runs its tasks faster than a
    /// real cluster's), each kept above 5 ms; a scale of 0 or less changes nothing.
    pub fn scaled(&self, scale: f64) -> Timing {
        if scale <= 0.0 {
            return self.clone();
        }
        let s = |d| at_scale(d, scale);
        Timing {
            task_deadline: s(self.task_deadline),
            cache_ttl: self.cache_ttl,
            poll_initial: s(self.poll_initial),
            poll_max: s(self.poll_max),
            api_retry: self.api_retry.mul_f64(scale).max(Duration::from_millis(1)),
            recheck: s(self.recheck),
            lost_call_window: s(self.lost_call_window),
        }
    }
}

/// Everything a handler needs, shared by all jobs of a worker process.
pub struct Env {
    pub clusters: Clusters,
    pub store: Store,
    pub cache: cache::Cache,
    pub timing: Timing,
    /// Cancelled at shutdown: long waits end and the job is handed back.
    pub shutdown: CancellationToken,
    /// Outcomes by kind and jobs in flight per node, for the worker's `/metrics`.
    pub counters: counters::JobCounters,
}

impl Env {
    pub fn new(
        clusters: Clusters,
        queue: Queue,
        timing: Timing,
        shutdown: CancellationToken,
    ) -> Arc<Env> {
        Arc::new(Env {
            clusters,
            store: Store::new(queue),
            cache: cache::Cache::new(timing.cache_ttl),
            timing,
            shutdown,
            counters: counters::JobCounters::default(),
        })
    }

    pub fn pve(&self, cluster: &str) -> Result<PveClient, JobError> {
        self.clusters.client(cluster).map_err(connect_error)
    }

    /// Waits for a Proxmox task. Ends early (handing the job back) at shutdown or when the
    /// lease is lost; the task itself keeps running and a re-delivery finds it by its UPID.
    pub async fn wait(&self, pve: &PveClient, upid: &Upid, lease: &Lease) -> Result<(), JobError> {
        match self.wait_task(pve, upid, lease).await? {
            Ok(()) => Ok(()),
            Err(e) => Err(pve_error(e)),
        }
    }

    /// Like [`Env::wait`], but keeps the Proxmox error, so a caller can tell a task that
    /// failed (`PveError::TaskFailed`) from a wait that could not find out (a poll failing).
    /// The outer error is `Deferred` (shutdown) or `LeaseLost`.
    pub async fn wait_task(
        &self,
        pve: &PveClient,
        upid: &Upid,
        lease: &Lease,
    ) -> Result<Result<(), PveError>, JobError> {
        Ok(self.wait_outcome(pve, upid, lease).await?.map(|_| ()))
    }

    /// Like [`Env::wait_task`], with how the task ended (`OK` or `WARNINGS: n`).
    pub async fn wait_outcome(
        &self,
        pve: &PveClient,
        upid: &Upid,
        lease: &Lease,
    ) -> Result<Result<TaskOutcome, PveError>, JobError> {
        let cancel = self.shutdown.child_token();
        // A job holds its node and storage slots until it sees its task end, so the poll
        // interval is slot time: start at 100 ms and stay under 1 s (a linked clone takes a
        // few seconds; a 2 s interval would hold its slots up to 2 s past the end).
        let opts = WaitOptions {
            deadline: Some(tokio::time::Instant::now() + self.timing.task_deadline),
            cancel: cancel.clone(),
            initial_poll: self.timing.poll_initial,
            max_poll: self.timing.poll_max,
        };
        let waiting = pve.wait_task(upid, &opts);
        tokio::pin!(waiting);
        let r = tokio::select! {
            r = &mut waiting => r,
            _ = lease.lost() => return Err(JobError::LeaseLost),
        };
        match r {
            Ok(o) => Ok(Ok(o)),
            Err(PveError::Cancelled) => Err(JobError::Deferred),
            Err(e) => Ok(Err(e)),
        }
    }
}

fn connect_error(e: ConnectError) -> JobError {
    match e {
        ConnectError::Pve(p) => pve_error(p),
        other => JobError::Permanent(other.to_string()),
    }
}

/// Maps a Proxmox error to the queue's retry decision, by variant.
pub fn pve_error(e: PveError) -> JobError {
    if retryable(&e) {
        JobError::Retry(e.to_string())
    } else {
        JobError::Permanent(e.to_string())
    }
}

/// Whether a job should try again after this error. Besides the client's transient errors,
/// a 5xx of unknown meaning is retried within the kind's attempt budget: Proxmox answers 500
/// for hiccups too ("got unexpected error"), and a job converges when run again. Errors known
/// to be permanent by their variant (not found, permission, parameters, auth, TLS) are not.
pub fn retryable(e: &PveError) -> bool {
    e.is_transient() || matches!(e, PveError::Server { .. })
}

/// Runs one job: records `running`, calls the kind's handler, records the outcome.
pub async fn run(job: Job, lease: Lease, env: Arc<Env>) -> Result<(), JobError> {
    let (subject, step) = subject_and_step(&job);
    let node = vm_node(&job);
    let dep = job.deployment().to_owned();
    let scope = scope_of_key(lease.job_key()).to_owned();
    let in_flight = env.counters.start(&job);
    let update = |state, error| state::StepUpdate {
        subject: &subject,
        step,
        node,
        state,
        error,
    };
    // The finish job records nothing of its own: its outcome is the deployment's phase, and
    // the records of its scope are what it removes.
    // Operations (power, reset) are read back from their job records, not step records: a
    // VM's steps are those of its making, whatever is done to it later.
    let records = !matches!(
        job,
        Job::TeardownFinish(_)
            | Job::AuditRemove(_)
            | Job::Power(_)
            | Job::Reset(_)
            | Job::Schedule(_)
            | Job::Replace(_)
            | Job::NodeDebris(_)
    );
    if records {
        let _ = env
            .store
            .put_step(&lease, &dep, &scope, &update(StepState::Running, None))
            .await;
    }
    let mut result = match &job {
        Job::Student(j) => student::run(j, &lease, &env).await,
        Job::NodeNetwork(j) => node_network::run(j, &lease, &env).await,
        Job::Clone(j) => clone::run(j, &lease, &env).await,
        Job::Network(j) => network::run(j, &lease, &env).await,
        Job::Permission(j) => permission::run(j, &lease, &env).await,
        Job::Start(j) => start::run(j, &lease, &env).await,
        Job::Destroy(j) => destroy::run(j, &lease, &env).await,
        Job::StudentTeardown(j) => teardown::student(j, &lease, &env).await,
        Job::NodeNetworkTeardown(j) => teardown::node_network(j, &lease, &env).await,
        Job::TeardownFinish(j) => finish::run(j, &lease, &env).await,
        Job::AuditRemove(j) => audit::run(j, &lease, &env).await,
        Job::Baseline(j) => baseline::run(j, &lease, &env).await,
        Job::Power(j) => power::run(j, &lease, &env).await,
        Job::Reset(j) => reset::run(j, &lease, &env).await,
        Job::Schedule(j) => schedule::run(j, &lease, &env).await,
        Job::Replace(j) => replace::run(j, &lease, &env).await,
        Job::NodeDebris(j) => debris::run(j, &lease, &env).await,
    };
    let outcome = match &result {
        Ok(()) => Some((StepState::Done, None)),
        Err(JobError::Permanent(m)) => Some((StepState::Failed, Some(m.clone()))),
        Err(JobError::Retry(m) | JobError::RetryAfter(_, m) | JobError::RetryKeepingSlots(m)) => {
            let last = lease.attempt() >= lease.max_attempts();
            Some((
                if last {
                    StepState::Failed
                } else {
                    StepState::Retrying
                },
                Some(m.clone()),
            ))
        }
        Err(JobError::LeaseLost) => None,
        Err(JobError::Deferred | JobError::DeferredFor(_) | JobError::DeferredKeepingSlots(_)) => {
            None
        }
    };
    if let Some((state, err)) = outcome.filter(|_| records) {
        let written = env
            .store
            .put_step(&lease, &dep, &scope, &update(state, err.as_deref()))
            .await;
        // A done job's record must not lag its ack (status would show it running for good):
        // if the record could not be written, the job is not done and runs again.
        if let (Ok(()), Err(e)) = (&result, written) {
            result = Err(e);
        }
    }
    drop(in_flight);
    env.counters.record(
        job.kind(),
        lease.attempt(),
        counters::Outcome::of(&result, &lease),
    );
    match &result {
        Ok(()) => tracing::info!(kind = job.kind(), subject, "job done"),
        Err(e) => tracing::warn!(kind = job.kind(), subject, error = %e, "job not done"),
    }
    result
}

/// The subject (VM key, `student:<user>`, `node:<node>`) and step name a job records under.
pub fn subject_and_step(job: &Job) -> (String, &'static str) {
    match job {
        Job::Student(j) => (format!("student:{}", j.user), "student"),
        Job::StudentTeardown(j) => (format!("student:{}", j.user), "teardown"),
        Job::NodeNetwork(j) => (format!("node:{}", j.node), "bridges"),
        Job::NodeNetworkTeardown(j) => (format!("node:{}", j.node), "teardown"),
        Job::Clone(j) => (j.vm.key.clone(), "clone"),
        Job::Network(j) => (j.vm.key.clone(), "network"),
        Job::Permission(j) => (j.vm.key.clone(), "permission"),
        Job::Start(j) => (j.vm.key.clone(), "start"),
        Job::Destroy(j) => (j.vm.key.clone(), "destroy"),
        Job::TeardownFinish(j) => (format!("teardown:{}", j.epoch), "finish"),
        Job::AuditRemove(j) => (j.object.describe(), "audit-remove"),
        Job::Baseline(j) => (j.vm.key.clone(), "baseline"),
        Job::Power(j) => (j.vm.key.clone(), j.action.as_str()),
        Job::Reset(j) => (j.vm.key.clone(), "reset"),
        Job::Schedule(j) => (format!("schedule:{}", j.event), "schedule"),
        Job::Replace(j) => (format!("node:{}", j.node), "replace"),
        Job::NodeDebris(j) => (format!("node:{}", j.node), "debris"),
    }
}

/// The planned node of a VM's step (the steps `status` counts per VM); `None` for the
/// others, teardown included.
pub fn vm_node(job: &Job) -> Option<&str> {
    match job {
        Job::Clone(j) => Some(&j.vm.node),
        Job::Network(j) => Some(&j.vm.node),
        Job::Permission(j) => Some(&j.vm.node),
        Job::Start(j) => Some(&j.vm.node),
        Job::Baseline(j) => Some(&j.vm.node),
        Job::Power(_) | Job::Reset(_) | Job::Schedule(_) | Job::Replace(_) | Job::NodeDebris(_) => {
            None
        }
        Job::Student(_)
        | Job::StudentTeardown(_)
        | Job::NodeNetwork(_)
        | Job::NodeNetworkTeardown(_)
        | Job::Destroy(_)
        | Job::TeardownFinish(_)
        | Job::AuditRemove(_) => None,
    }
}

/// The node a VMID lives on now, wherever that is on the cluster (one listing): an admin
/// may have migrated the VM, and a clone's config sits on its source node until it ends.
pub async fn locate(pve: &PveClient, vmid: u32) -> Result<Option<String>, JobError> {
    Ok(pve
        .cluster_vms()
        .await
        .map_err(pve_error)?
        .into_iter()
        .find(|v| v.vmid == vmid)
        .map(|v| v.node))
}

/// The VM's facts as the clone job of the same scope recorded them; a step after the clone
/// needs them.
pub async fn require_vm(env: &Env, lease: &Lease, vm: &VmRef) -> Result<state::VmFacts, JobError> {
    match env
        .store
        .one_vm(scope_of_key(lease.job_key()), &vm.key)
        .await
    {
        Ok(Some(f)) => Ok(f),
        Ok(None) => Err(JobError::Retry(format!(
            "no VM recorded for {} yet (its clone job has not finished)",
            vm.key
        ))),
        Err(e) => Err(JobError::Retry(format!("redis: {e}"))),
    }
}
