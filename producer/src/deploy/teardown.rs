//! `teardown`: the record moved to `tearing-down` by compare-and-set, the active epoch's
//! jobs cancelled, the teardown's jobs (built purely by `shared::jobs::teardown_jobs`) queued.

use std::collections::BTreeMap;

use chrono::Utc;
use serde::Serialize;
use shared::jobs::state::{DeploymentRecord, Phase, Store};
use shared::jobs::{scope, teardown_jobs};

use super::{DeployError, plan_of, read, record};

/// Makes sure every unfinished teardown of the deployment has its jobs in the queue
/// (idempotent by key): a producer that stopped between moving the record and enqueueing
/// leaves a teardown that the next command completes.
pub async fn ensure_teardowns(store: &Store, rec: &DeploymentRecord) -> Result<(), DeployError> {
    let mut epochs = rec.teardowns.clone();
    if rec.phase == Phase::TearingDown && !epochs.contains(&rec.epoch) {
        epochs.push(rec.epoch);
    }
    for e in epochs {
        let vm_epoch = e.saturating_sub(1);
        let plan = plan_of(store, rec, vm_epoch).await?;
        let vmids: BTreeMap<String, u32> = store
            .vm_facts(&scope(&rec.id, vm_epoch))
            .await?
            .into_iter()
            .map(|(k, f)| (k, f.vmid))
            .collect();
        let specs = match &plan {
            Some(p) => teardown_jobs::teardown(p, &scope(&rec.id, e), e, &vmids),
            // No plan left (nothing was ever planned for that epoch): only the finish.
            None => vec![teardown_jobs::finish_only(&rec.id, &rec.cluster, e)],
        };
        store.queue().enqueue_batch(&specs).await?;
    }
    Ok(())
}

/// What `teardown` did.
#[derive(Debug, Clone, Serialize)]
pub struct TeardownStarted {
    /// The teardown's epoch (its jobs' scope is `<id>#<epoch>`).
    pub epoch: u32,
    /// The deployment was torn down already; nothing to do.
    pub already_torn_down: bool,
}

/// Starts a teardown: moves the record to `tearing-down` (compare-and-set), cancels the
/// active epoch's jobs (fencing in-flight ones), then enqueues a destroy per VM it may have
/// created, the removal of pools, users and bridges once those are gone, and the finish job
/// that completes it: a teardown finishes by itself, whether anyone waits or not. Run on a
/// deployment already tearing down, it makes sure those jobs are queued (resume).
pub async fn teardown(store: &Store, id: &str) -> Result<TeardownStarted, DeployError> {
    for _ in 0..8 {
        let v = read(store, id)
            .await?
            .ok_or_else(|| DeployError::NoDeployment { id: id.to_owned() })?;
        match v.rec.phase {
            Phase::TornDown => {
                return Ok(TeardownStarted {
                    epoch: v.rec.epoch,
                    already_torn_down: true,
                });
            }
            Phase::TearingDown => {
                ensure_teardowns(store, &v.rec).await?;
                return Ok(TeardownStarted {
                    epoch: v.rec.epoch,
                    already_torn_down: false,
                });
            }
            Phase::Active => {}
        }
        let mut rec = v.rec.clone();
        let active = rec.scope();
        rec.epoch += 1;
        rec.phase = Phase::TearingDown;
        rec.updated = Utc::now();
        if !store.commit(Some(&v), &rec, None).await? {
            continue;
        }
        store.queue().cancel_group(&active).await?;
        ensure_teardowns(store, &rec).await?;
        return Ok(TeardownStarted {
            epoch: rec.epoch,
            already_torn_down: false,
        });
    }
    Err(DeployError::Contended {
        id: id.to_owned(),
        doing: "starting its teardown",
    })
}

/// How far teardown `epoch` of a deployment is.
#[derive(Debug, Clone, Serialize)]
pub struct TeardownProgress {
    pub finished: bool,
    /// Its jobs: done, still to run, dead (failed for good).
    pub done: u64,
    pub open: u64,
    pub dead: u64,
}

/// Reads how far teardown `epoch` is (the finish job moves the record; this only reads).
pub async fn teardown_progress(
    store: &Store,
    id: &str,
    epoch: u32,
) -> Result<TeardownProgress, DeployError> {
    let rec = record(store, id).await?;
    let g = store.queue().group_stats(&scope(id, epoch)).await?;
    Ok(TeardownProgress {
        finished: rec.teardown_finished(epoch),
        done: g.done,
        open: g.open(),
        dead: g.dead,
    })
}
