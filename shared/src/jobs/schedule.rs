//! `schedule`: one event of a deployment's schedule (`shared::scheduler` enqueues it when
//! it is due, once). A start or shutdown queues one `power` job per VM, as follow-ups
//! enqueued atomically with this job's ack (their keys name the event, so a re-run adds
//! nothing); a warning is written to the deployment's event stream; the expiry starts the
//! teardown. Done when: that is queued or written. Nothing happens to a deployment that is
//! no longer active.

use chrono::{DateTime, Utc};
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use crate::jobs::power::{DEFAULT_SHUTDOWN_TIMEOUT, PowerAction, PowerJob, slot_keys};
use crate::jobs::state::Phase;
use crate::jobs::{Env, Job, VmRef, keys, teardown_jobs};
use crate::plan::Plan;
use crate::queue::{JobError, JobSpec, Lease};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    Start,
    Warn,
    Shutdown,
    ExpiryWarn,
    Expire,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleJob {
    pub deployment: String,
    pub cluster: String,
    /// The schedule's generation (a changed schedule is a new one).
    pub generation: u32,
    /// `<occurrence>/<kind>`.
    pub event: String,
    /// What the event does (not `kind`: that is the payload's tag).
    pub what: EventKind,
    pub due: DateTime<Utc>,
    /// The end of the event's window (or the expiry).
    pub until: DateTime<Utc>,
}

fn redis_err(e: impl std::fmt::Display) -> JobError {
    JobError::Retry(format!("redis: {e}"))
}

pub async fn run(j: &ScheduleJob, lease: &Lease, env: &Env) -> Result<(), JobError> {
    let store = &env.store;
    let Some(v) = store.read(&j.deployment).await.map_err(redis_err)? else {
        return Ok(());
    };
    if v.rec.phase != Phase::Active {
        tracing::info!(deployment = %j.deployment, event = %j.event, phase = %v.rec.phase, "schedule event for a deployment that is not active: nothing to do");
        return Ok(());
    }
    match j.what {
        EventKind::Start | EventKind::Shutdown => power(j, lease, env, v.rec.epoch).await,
        EventKind::Warn | EventKind::ExpiryWarn => {
            let what = if j.what == EventKind::Warn {
                "the VMs shut down"
            } else {
                "the deployment expires (teardown)"
            };
            let msg = format!("{what} at {}", j.until.to_rfc3339());
            let mut c = store.queue().connection();
            let _: String = c
                .xadd_maxlen(
                    store.key_events(&j.deployment),
                    redis::streams::StreamMaxlen::Approx(10_000),
                    "*",
                    &[
                        ("subject", "schedule"),
                        ("step", "warning"),
                        ("state", "warning"),
                        ("error", msg.as_str()),
                    ],
                )
                .await
                .map_err(redis_err)?;
            Ok(())
        }
        EventKind::Expire => expire(env, &j.deployment).await,
    }
}

/// The operation id of a scheduled event's power jobs.
pub fn op_of(j: &ScheduleJob) -> String {
    format!(
        "sched-{}-{}",
        j.generation,
        j.event.replace(['/', ':'], "-")
    )
}

async fn power(j: &ScheduleJob, lease: &Lease, env: &Env, epoch: u32) -> Result<(), JobError> {
    let store = &env.store;
    let Some(plan) = store
        .plan_json(&j.deployment, epoch)
        .await
        .map_err(redis_err)?
    else {
        return Ok(());
    };
    let plan: Plan = serde_json::from_str(&plan)
        .map_err(|e| JobError::Permanent(format!("stored plan: {e}")))?;
    let sc = crate::jobs::scope(&j.deployment, epoch);
    let facts = store.vm_facts(&sc).await.map_err(redis_err)?;
    let (action, tag) = match j.what {
        EventKind::Start => (PowerAction::Start, "start"),
        _ => (PowerAction::Shutdown, "shutdown"),
    };
    let op = op_of(j);
    let mut specs = Vec::new();
    for v in &plan.vms {
        let Some(f) = facts.get(&v.key) else { continue };
        let job = Job::Power(PowerJob {
            vm: VmRef {
                deployment: j.deployment.clone(),
                cluster: plan.cluster.clone(),
                key: v.key.clone(),
                node: f.node.clone(),
            },
            op: op.clone(),
            action,
            timeout_secs: (action == PowerAction::Shutdown).then_some(DEFAULT_SHUTDOWN_TIMEOUT),
        });
        let starts = action == PowerAction::Start;
        specs.push(
            JobSpec::new(
                keys::op_vm(&sc, &op, &v.key, tag),
                job.kind(),
                job.to_value(),
            )
            .group(sc.clone())
            .slots(slot_keys(&sc, &v.key, &plan.cluster, &f.node, starts)),
        );
    }
    tracing::info!(deployment = %j.deployment, event = %j.event, jobs = specs.len(), "schedule: power jobs queued");
    lease.add_followups(specs);
    Ok(())
}

/// Starts the teardown of an active deployment (what `producer teardown` does): the
/// record moves to `tearing-down` at the next epoch by compare-and-set, the active epoch's
/// jobs are cancelled, and the teardown's jobs are queued.
async fn expire(env: &Env, id: &str) -> Result<(), JobError> {
    let store = &env.store;
    for _ in 0..8 {
        let Some(v) = store.read(id).await.map_err(redis_err)? else {
            return Ok(());
        };
        let rec = match v.rec.phase {
            Phase::TornDown => return Ok(()),
            // Started (by this job's earlier attempt, or by hand): make sure its jobs are
            // queued (idempotent by key).
            Phase::TearingDown => v.rec.clone(),
            Phase::Active => {
                let mut rec = v.rec.clone();
                rec.epoch += 1;
                rec.phase = Phase::TearingDown;
                rec.updated = Utc::now();
                if !store
                    .commit(Some(&v), &rec, None)
                    .await
                    .map_err(redis_err)?
                {
                    continue;
                }
                rec
            }
        };
        let vm_epoch = rec.epoch.saturating_sub(1);
        let active = crate::jobs::scope(id, vm_epoch);
        store
            .queue()
            .cancel_group(&active)
            .await
            .map_err(redis_err)?;
        let plan = store
            .plan_json(id, vm_epoch)
            .await
            .map_err(redis_err)?
            .and_then(|p| serde_json::from_str::<Plan>(&p).ok());
        let vmids = store
            .vm_facts(&active)
            .await
            .map_err(redis_err)?
            .into_iter()
            .map(|(k, f)| (k, f.vmid))
            .collect();
        let tscope = crate::jobs::scope(id, rec.epoch);
        let specs = match &plan {
            Some(p) => teardown_jobs::teardown(p, &tscope, rec.epoch, &vmids),
            None => Vec::new(),
        };
        store
            .queue()
            .enqueue_batch(&specs)
            .await
            .map_err(redis_err)?;
        tracing::info!(
            deployment = id,
            jobs = specs.len(),
            "schedule: expired, teardown queued"
        );
        return Ok(());
    }
    Err(JobError::Retry(format!(
        "deployment {id} kept changing while expiring it"
    )))
}
