//! `clone`: one VM from its template (or the template's replica on the student's node),
//! with a VMID reserved in Redis and the marker in `description`. Not the pool: a clone with
//! `pool` adds the VM under Proxmox's cluster-wide `user.cfg` lock at the end of its task,
//! holding the job's slots while it waits there (10 s at most, then the whole clone is
//! rolled back: `clone failed: can't add VM ...`); the permission step adds the VM instead,
//! through labfleet's own `user.cfg` pass (`api_slots`).
//!
//! Ownership before the clone's real config exists rests on the VMID reserved in Redis
//! (recorded in the VM's facts before the POST) and on the UPID recorded right after it;
//! once the config exists, on the marker. A retried or re-delivered clone therefore first
//! looks at what the previous attempt left:
//! - its task still running -> wait for it (the job keeps its slots meanwhile);
//! - the VM complete with our marker -> done, nothing cloned twice;
//! - a half-made VM (the task died: `unexpected status`, or a `lock: clone` left behind) ->
//!   destroy it (with `skiplock` when the connection may use it), or quarantine its VMID and
//!   clone again under a new one;
//! - a VM of ours under `lock: destroyed` (an earlier attempt's clean-up whose end it never
//!   saw, its reply or its poll lost) -> come back once it is gone; never taken for done;
//! - the VMID taken by something that is not ours -> a new VMID.
//!
//! "Ours" is this epoch's marker (`labfleet deployment=<id> vm=<key> epoch=<e>`), or the
//! marker without an epoch that versions before epochs wrote; a VM of another epoch of the
//! same deployment is not ours. The VM is looked up by VMID cluster-wide (an admin may have
//! migrated it). "Half-made" is only `lock: clone` with our marker or no description yet, at a
//! VMID reserved for this VM: any other lock is somebody's work, never destroyed.
//!
//! Whenever a clone task of ours may still run and the job gives up for now (shutdown, a
//! poll or the clone call without an answer, a record that could not be written), it keeps
//! its node and storage slots (`DeferredKeepingSlots`, `RetryKeepingSlots`): the caps count
//! tasks on Proxmox, not jobs that are running.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::Utc;

use crate::alloc::{self, Space};
use crate::jobs::lost_reply::{self, CloneSearch};
use crate::jobs::state::{Quarantined, VmFacts};
use crate::jobs::{
    CloneJob, Env, destroy, epoch_of_scope, find_marker, leaks, marker, pve_error, retryable,
    scope_of_key,
};
use crate::pve::{CloneParams, DestroyParams, PveClient, PveError, Upid, VmConfig};
use crate::queue::{JobError, Lease};

/// What is at a VMID, as far as this VM is concerned.
enum Found {
    Nothing,
    /// Complete, with our marker.
    Ours,
    /// A config with `lock: clone` and no description yet: a clone in progress or dead.
    Unfinished {
        node: String,
        lock: String,
    },
    /// Ours (or not yet described) under `lock: destroyed`: a destroy of ours (an earlier
    /// attempt's clean-up whose end this job never saw) is removing it. Not a VM to keep:
    /// the job comes back once it is gone.
    Going {
        node: String,
    },
    /// Something else.
    Foreign,
}

pub async fn run(j: &CloneJob, lease: &Lease, env: &Env) -> Result<(), JobError> {
    // Whenever a clone job hands itself back, a clone task of its own may still run on
    // Proxmox (it is waiting for it, or cannot rule it out): its node and storage slots stay
    // taken until it is claimed again, so the caps keep holding across shutdowns.
    match clone_vm(j, lease, env).await {
        Err(JobError::Deferred) => Err(JobError::DeferredKeepingSlots(Duration::ZERO)),
        Err(JobError::DeferredFor(d)) => Err(JobError::DeferredKeepingSlots(d)),
        other => other,
    }
}

/// What one attempt of a clone job works with.
struct Ctx<'a> {
    j: &'a CloneJob,
    lease: &'a Lease,
    env: &'a Env,
    pve: PveClient,
    space: Space,
    owner: String,
    me: Me<'a>,
}

/// A finished clone, as the steps below return it: `None` (nothing more to do) or the error.
fn done(r: Result<(), JobError>) -> Result<Option<u32>, JobError> {
    r.map(|()| None)
}

async fn clone_vm(j: &CloneJob, lease: &Lease, env: &Env) -> Result<(), JobError> {
    let dep = &j.vm.deployment;
    let key = &j.vm.key;
    let q = env.store.queue();
    let scope = scope_of_key(lease.job_key());
    let epoch = epoch_of_scope(scope);
    let c = Ctx {
        j,
        lease,
        env,
        pve: env.pve(&j.vm.cluster)?,
        space: Space::vmids(q, &j.vm.cluster),
        owner: crate::plan::vm_owner(dep, key),
        me: Me { j, epoch },
    };
    let prior = env
        .store
        .one_vm(scope, key)
        .await
        .map_err(|e| JobError::Retry(format!("redis: {e}")))?;
    let mut vmid = match &prior {
        Some(f) => f.vmid,
        None => alloc::lookup(q, &c.space, &c.owner)
            .await
            .map_err(|e| JobError::Retry(e.to_string()))?
            .unwrap_or(j.vmid),
    };
    let mut quarantined = prior
        .as_ref()
        .map(|f| f.quarantined.clone())
        .unwrap_or_default();
    // A previous attempt may have started a clone: find out what became of it.
    if let Some(f) = &prior {
        match resume(&c, f, vmid, &mut quarantined).await? {
            None => return Ok(()),
            Some(v) => vmid = v,
        }
    }
    clone_into(&c, prior.as_ref(), vmid, &mut quarantined).await
}

/// What became of a previous attempt's clone (`f`, at `vmid`): finished (`None`), or the
/// VMID to clone into now.
async fn resume(
    c: &Ctx<'_>,
    f: &VmFacts,
    mut vmid: u32,
    quarantined: &mut Vec<u32>,
) -> Result<Option<u32>, JobError> {
    let window =
        chrono::Duration::from_std(c.env.timing.lost_call_window).unwrap_or(chrono::TimeDelta::MAX);
    let recent =
        |since: Option<chrono::DateTime<Utc>>| since.is_some_and(|t| Utc::now() - t < window);
    let mut task_ended = false;
    let mut known = f.upid.as_deref().and_then(|u| u.parse::<Upid>().ok());
    // A call made without learning its UPID (its reply lost, or the worker died right
    // after it): look for its task before anything is retried or cleaned.
    if let (None, Some(since)) = (&known, f.since) {
        known = find_lost_clone(c.j, c.lease, c.env, &c.pve, vmid, since, quarantined).await?;
    }
    if let Some(upid) = known {
        task_ended = true;
        match c.pve.task_status(&upid).await {
            Ok(st) if st.is_running() => {
                tracing::info!(vmid, %upid, "clone of a previous attempt still running; waiting for it");
                match c.env.wait_task(&c.pve, &upid, c.lease).await? {
                    Ok(()) => {
                        let r = finish(c.j, c.lease, c.env, &c.pve, vmid, Some(upid), quarantined);
                        return done(r.await);
                    }
                    // It ended and failed: look at what it left below.
                    Err(PveError::TaskFailed { .. }) => {}
                    // Could not learn how it ended (past the task deadline, polls
                    // failing): it may still run, so nothing is cleaned up and the slots
                    // stay taken; the next attempt asks again.
                    Err(e) => return Err(keep_slots(pve_error(e))),
                }
            }
            Ok(_) => {}
            // Cannot tell whether that clone still runs: keep its slots.
            Err(e) if retryable(&e) => return Err(keep_slots(pve_error(e))),
            // Task unknown (e.g. node reinstalled): inspect the VMID instead.
            Err(PveError::NotFound { .. }) => {}
            Err(e) => return Err(pve_error(e)),
        }
    }
    match inspect(&c.pve, &c.me, vmid).await? {
        Found::Ours => {
            return done(finish(c.j, c.lease, c.env, &c.pve, vmid, None, quarantined).await);
        }
        // A call made just before the crash may not have written its config yet.
        Found::Nothing if !task_ended && recent(f.since) => {
            return Err(JobError::DeferredFor(c.env.timing.recheck));
        }
        Found::Nothing => {}
        Found::Unfinished { .. }
            if !task_ended
                && f.since.is_none_or(|t| {
                    Utc::now() - t
                        < chrono::Duration::from_std(c.env.timing.task_deadline)
                            .unwrap_or(chrono::TimeDelta::MAX)
                }) =>
        {
            // A clone whose task we never learned (the worker died between the call and
            // recording its UPID) may still be running: wait for it without spending an
            // attempt, until the clone deadline says it is half-made.
            return Err(JobError::DeferredFor(c.env.timing.recheck));
        }
        Found::Unfinished { .. } if !reserved_for_us(c.env, &c.space, &c.owner, vmid).await? => {
            vmid = new_vmid(c.j, c.env, &c.space, &c.owner).await?;
        }
        Found::Unfinished { node, lock } => {
            vmid = clean_up(c, vmid, &node, &lock, task_ended, quarantined).await?;
        }
        Found::Going { node } => {
            if destroy_running(c, &node, vmid).await? {
                return Err(JobError::DeferredFor(c.env.timing.recheck));
            }
            // The destroy died and left its lock: a half-made VM like any other.
            vmid = if reserved_for_us(c.env, &c.space, &c.owner, vmid).await? {
                clean_up(c, vmid, &node, "destroyed", task_ended, quarantined).await?
            } else {
                new_vmid(c.j, c.env, &c.space, &c.owner).await?
            };
        }
        Found::Foreign => {
            vmid = new_vmid(c.j, c.env, &c.space, &c.owner).await?;
        }
    }
    Ok(Some(vmid))
}

/// Clones into `vmid`, moving to a new VMID when the reserved one turns out to be taken.
async fn clone_into(
    c: &Ctx<'_>,
    prior: Option<&VmFacts>,
    mut vmid: u32,
    quarantined: &mut Vec<u32>,
) -> Result<(), JobError> {
    let j = c.j;
    // A previous attempt that recorded a VMID but no UPID may have made the clone call
    // anyway (the worker died in between): a clone in progress at that VMID may be ours.
    let maybe_ours_in_flight = prior.is_some_and(|f| f.upid.is_none());
    let prior_vmid = prior.map(|f| f.vmid);
    let my_marker = marker(&j.vm.deployment, &j.vm.key, c.me.epoch);
    for _ in 0..5 {
        // Our own earlier call into this VMID may still come to run (its reply was lost):
        // the task search then starts from that call, not from this one.
        let since = prior
            .filter(|f| f.vmid == vmid && f.upid.is_none())
            .and_then(|f| f.since)
            .unwrap_or_else(Utc::now);
        record_since(j, c.lease, c.env, vmid, None, quarantined, since).await?;
        c.lease.check().await?;
        let params = CloneParams {
            newid: vmid,
            name: Some(j.name.clone()),
            description: Some(my_marker.clone()),
            pool: None,
            target: (j.source_node != j.vm.node).then(|| j.vm.node.clone()),
            full: Some(j.full),
            storage: if j.full { j.storage.clone() } else { None },
        };
        let upid = match c.pve.clone_vm(&j.source_node, j.source_vmid, &params).await {
            Ok(u) => u,
            Err(PveError::AlreadyExists { .. }) => match inspect(&c.pve, &c.me, vmid).await? {
                Found::Ours => {
                    return finish(j, c.lease, c.env, &c.pve, vmid, None, quarantined).await;
                }
                Found::Unfinished { .. }
                    if (maybe_ours_in_flight && Some(vmid) == prior_vmid)
                        || reserved_for_us(c.env, &c.space, &c.owner, vmid).await? =>
                {
                    record_since(j, c.lease, c.env, vmid, None, quarantined, since)
                        .await
                        .map_err(keep_slots)?;
                    // Our own earlier call's clone, still running: wait for it.
                    return Err(JobError::DeferredFor(c.env.timing.recheck));
                }
                // Our half-made VM, its removal still running: the VMID is free soon.
                Found::Going { .. } => return Err(JobError::DeferredFor(c.env.timing.recheck)),
                _ => {
                    vmid = new_vmid(j, c.env, &c.space, &c.owner).await?;
                    continue;
                }
            },
            // No answer, or a proxy's in its place (596, 502-504, a dropped connection):
            // the call may have started a clone. Its slots stay taken, and its task is looked
            // for now; not found yet, the job comes back (keeping them) and looks again
            // before it clones anything.
            Err(e) if lost_reply::may_have_run(&e) => {
                tracing::warn!(vmid, error = %e, "clone call without an answer; looking for its task");
                match find_lost_clone(j, c.lease, c.env, &c.pve, vmid, since, quarantined).await? {
                    Some(u) => u,
                    None => return Err(JobError::DeferredFor(c.env.timing.recheck)),
                }
            }
            Err(e) => return Err(pve_error(e)),
        };
        // From here on our clone task runs: a failure keeps the slots.
        record_since(j, c.lease, c.env, vmid, Some(&upid), quarantined, since)
            .await
            .map_err(keep_slots)?;
        match c.env.wait_task(&c.pve, &upid, c.lease).await? {
            Ok(()) => {
                return finish(j, c.lease, c.env, &c.pve, vmid, Some(upid), quarantined).await;
            }
            // Could not learn the outcome (polls failing, or past the deadline): the task
            // may still run, so the job keeps its node and storage slots across the retry;
            // the next attempt finds the task by its recorded UPID.
            Err(e) if !matches!(e, PveError::TaskFailed { .. }) => {
                return Err(keep_slots(pve_error(e)));
            }
            Err(err) => match after_failed_task(c, vmid, upid, err, since, quarantined).await? {
                None => return Ok(()),
                Some(v) => vmid = v,
            },
        }
    }
    Err(JobError::Retry(
        "VMIDs kept colliding; retrying later".into(),
    ))
}

/// Our clone task into `vmid` failed: what it left decides. Finished after all (`None`), or
/// the VMID to clone into next.
async fn after_failed_task(
    c: &Ctx<'_>,
    vmid: u32,
    upid: Upid,
    err: PveError,
    since: chrono::DateTime<Utc>,
    quarantined: &mut Vec<u32>,
) -> Result<Option<u32>, JobError> {
    let msg = match &err {
        PveError::TaskFailed { exitstatus, .. } => exitstatus.clone(),
        other => other.to_string(),
    };
    match inspect(&c.pve, &c.me, vmid).await? {
        Found::Ours => {
            done(finish(c.j, c.lease, c.env, &c.pve, vmid, Some(upid), quarantined).await)
        }
        Found::Nothing if collision(&msg, vmid) => {
            Ok(Some(new_vmid(c.j, c.env, &c.space, &c.owner).await?))
        }
        Found::Nothing => Err(task_error(err, msg)),
        Found::Unfinished { node, lock }
            if !collision(&msg, vmid)
                && reserved_for_us(c.env, &c.space, &c.owner, vmid).await? =>
        {
            // Our task died and left a half-made VM: remove or quarantine it, then clone
            // again (under a new VMID if quarantined).
            tracing::warn!(vmid, node, error = %msg, "clone task failed half way");
            let next = clean_up(c, vmid, &node, &lock, true, quarantined).await?;
            Ok(Some(next))
        }
        Found::Unfinished { .. }
            if collision(&msg, vmid)
                && reserved_for_us(c.env, &c.space, &c.owner, vmid).await? =>
        {
            // Another clone into our own reserved VMID: an earlier call of ours whose reply
            // was lost came to run. Wait for it (by the task search from that call) instead
            // of leaving it behind under a new VMID.
            record_since(c.j, c.lease, c.env, vmid, None, quarantined, since)
                .await
                .map_err(keep_slots)?;
            Err(JobError::DeferredFor(c.env.timing.recheck))
        }
        // Looked at again (and waited for) by the next attempt.
        Found::Going { .. } => Err(JobError::DeferredFor(c.env.timing.recheck)),
        Found::Unfinished { .. } | Found::Foreign => {
            Ok(Some(new_vmid(c.j, c.env, &c.space, &c.owner).await?))
        }
    }
}

/// A retry that keeps the job's slots: a clone task of ours may still run (see
/// `JobError::RetryKeepingSlots`). Other errors are unchanged.
fn keep_slots(e: JobError) -> JobError {
    match e {
        JobError::Retry(m) => JobError::RetryKeepingSlots(m),
        other => other,
    }
}

fn task_error(err: PveError, msg: String) -> JobError {
    if err.is_transient() {
        JobError::Retry(msg)
    } else {
        JobError::Permanent(msg)
    }
}

/// Whether a clone task failed because another guest holds (or took) the VMID.
fn collision(msg: &str, vmid: u32) -> bool {
    crate::pve::error::is_vmid_collision(msg, vmid)
}

/// Who is cloning, for telling our VM from another's.
struct Me<'a> {
    j: &'a CloneJob,
    epoch: u32,
}

/// Looks at the VMID wherever it is on the cluster (one listing, then its config).
async fn inspect(pve: &PveClient, me: &Me<'_>, vmid: u32) -> Result<Found, JobError> {
    let Some(node) = crate::jobs::locate(pve, vmid).await? else {
        return Ok(Found::Nothing);
    };
    match pve.vm_config(&node, vmid).await {
        Ok(cfg) => Ok(classify(&cfg, &node, me)),
        Err(PveError::NotFound { .. }) => Ok(Found::Nothing),
        Err(e) => Err(pve_error(e)),
    }
}

fn classify(cfg: &VmConfig, node: &str, me: &Me<'_>) -> Found {
    let desc = cfg.description().unwrap_or_default();
    let ours = find_marker(&desc, &me.j.vm.deployment, &me.j.vm.key).is_ours(me.epoch);
    match cfg.lock() {
        Some(lock) if lock == "clone" && (ours || desc.is_empty()) => Found::Unfinished {
            node: node.to_owned(),
            lock,
        },
        Some(lock) if lock == "destroyed" && (ours || desc.is_empty()) => Found::Going {
            node: node.to_owned(),
        },
        _ if ours => Found::Ours,
        _ => Found::Foreign,
    }
}

/// Whether a destroy of `vmid` runs on `node` (started within the task deadline): a VM under
/// `lock: destroyed` with none is a destroy that died. A task list that cannot be read for
/// a lasting reason counts as none (the clean-up's own destroy then meets the VM or not).
async fn destroy_running(c: &Ctx<'_>, node: &str, vmid: u32) -> Result<bool, JobError> {
    let window = chrono::Duration::from_std(c.env.timing.task_deadline)
        .unwrap_or(chrono::TimeDelta::days(1));
    match lost_reply::find_task(
        &c.pve,
        node,
        vmid,
        "qmdestroy",
        Utc::now() - window,
        lost_reply::Tasks::Any,
    )
    .await
    {
        Ok(found) => Ok(found.is_some_and(|(_, running)| running)),
        Err(e) if retryable(&e) => Err(keep_slots(pve_error(e))),
        Err(_) => Ok(false),
    }
}

/// Whether `vmid` is reserved in Redis for this VM: a half-made VM is ours to remove only
/// at a VMID we reserved.
async fn reserved_for_us(
    env: &Env,
    space: &Space,
    owner: &str,
    vmid: u32,
) -> Result<bool, JobError> {
    let held = alloc::owner_of(env.store.queue(), space, vmid)
        .await
        .map_err(|e| JobError::Retry(e.to_string()))?;
    Ok(held.as_deref() == Some(owner))
}

async fn new_vmid(j: &CloneJob, env: &Env, space: &Space, owner: &str) -> Result<u32, JobError> {
    let pve = env.pve(&j.vm.cluster)?;
    let taken: BTreeSet<u32> = pve
        .cluster_vms()
        .await
        .map_err(pve_error)?
        .into_iter()
        .map(|v| v.vmid)
        .collect();
    let id = alloc::replace(
        env.store.queue(),
        space,
        owner,
        j.vmid_min,
        j.vmid_max,
        &taken,
    )
    .await
    .map_err(|e| JobError::Retry(e.to_string()))?;
    tracing::warn!(vm = %j.vm.key, vmid = id, "VMID taken by another guest; moved to a new one");
    Ok(id)
}

/// Another clone of ours into `vmid` may still run (a call whose reply was lost came to run
/// late): its `lock: clone` is not a half-made VM yet. A clone task of ours that ended
/// explains the lock by itself: Proxmox writes the `lock: clone` config in the call, before
/// the task starts, and refuses any later call into a VMID whose config exists.
async fn wait_for_a_late_clone(c: &Ctx<'_>, vmid: u32) -> Result<(), JobError> {
    let (j, env) = (c.j, c.env);
    let since = env
        .store
        .one_vm(scope_of_key(c.lease.job_key()), &j.vm.key)
        .await
        .ok()
        .flatten()
        .and_then(|f| f.since)
        .unwrap_or_else(Utc::now);
    match lost_reply::find_clone(&c.pve, &j.source_node, j.source_vmid, vmid, since).await {
        Ok(CloneSearch::Found { running: true, .. } | CloneSearch::Undecided) => {
            Err(JobError::DeferredFor(env.timing.recheck))
        }
        Ok(_) => Ok(()),
        Err(e) if retryable(&e) => Err(keep_slots(pve_error(e))),
        Err(_) => Ok(()),
    }
}

/// Removes a half-made VM of ours, or quarantines its VMID when Proxmox will not let this
/// connection remove it (a stale `lock` needs `skiplock`, which only root@pam with a
/// password ticket may use). Returns the VMID to clone into next. `left_by_known_task`: the
/// VM is what our own clone task into `vmid`, known by its UPID and ended, left behind.
async fn clean_up(
    c: &Ctx<'_>,
    vmid: u32,
    node: &str,
    lock: &str,
    left_by_known_task: bool,
    quarantined: &mut Vec<u32>,
) -> Result<u32, JobError> {
    let (j, lease, env, pve) = (c.j, c.lease, c.env, &c.pve);
    lease.check().await?;
    if lock == "clone" && !left_by_known_task {
        wait_for_a_late_clone(c, vmid).await?;
    }
    let skiplock = env.clusters.can_skiplock(&j.vm.cluster);
    if skiplock {
        let p = DestroyParams {
            purge: true,
            skiplock: true,
            ..DestroyParams::default()
        };
        match pve.destroy_vm(node, vmid, &p).await {
            Ok(upid) => {
                let (upid, outcome) = match env.wait_outcome(pve, &upid, lease).await? {
                    Ok(o) => (Some(upid), o),
                    // An earlier attempt's destroy (its reply or its end lost) removed it
                    // first: what that one left behind is freed instead.
                    Err(e) if destroy::found_it_gone(&e) => {
                        destroy::last_destroy(env, pve, lease, node, vmid).await?
                    }
                    Err(e) => return Err(pve_error(e)),
                };
                tracing::warn!(vmid, node, "removed a half-made VM before cloning again");
                let d = leaks::Destroyed {
                    cluster: &j.vm.cluster,
                    deployment: &j.vm.deployment,
                    vm: &j.vm.key,
                    vmid,
                    node,
                    owner: &crate::plan::vm_owner(&j.vm.deployment, &j.vm.key),
                };
                leaks::free_after_destroy(env, pve, lease, &d, upid.as_ref(), outcome).await?;
                return Ok(vmid);
            }
            Err(PveError::NotFound { .. }) => return Ok(vmid),
            Err(e) if retryable(&e) => return Err(pve_error(e)),
            Err(_) => {}
        }
    }
    let q = Quarantined {
        vmid,
        node: node.to_owned(),
        deployment: j.vm.deployment.clone(),
        vm: j.vm.key.clone(),
        reason: format!(
            "half-made clone left with lock '{lock}'; removing it needs skiplock (root@pam with a password)"
        ),
        at: Utc::now(),
    };
    env.store
        .quarantine(&q, &j.vm.cluster)
        .await
        .map_err(|e| JobError::Retry(format!("redis: {e}")))?;
    quarantined.push(vmid);
    tracing::warn!(
        vmid,
        node,
        "quarantined a half-made VM; cloning under a new VMID"
    );
    // The job's backoff gives the lock a moment; a new VMID avoids waiting on it at all.
    tokio::time::sleep(Duration::from_millis(10)).await;
    new_vmid(j, env, &c.space, &c.owner).await
}

/// Records the VMID about to be cloned into (and the UPID once known) before anything else
/// happens, only while this lease holds: what a re-delivery starts from. `since` is the time
/// of the clone call the facts are about (a task search for a call whose reply was lost
/// starts there).
async fn record_since(
    j: &CloneJob,
    lease: &Lease,
    env: &Env,
    vmid: u32,
    upid: Option<&Upid>,
    quarantined: &[u32],
    since: chrono::DateTime<Utc>,
) -> Result<(), JobError> {
    let scope = scope_of_key(lease.job_key());
    let facts = VmFacts {
        epoch: Some(epoch_of_scope(scope)),
        vmid,
        node: j.vm.node.clone(),
        upid: upid.map(|u| u.to_string()),
        quarantined: quarantined.to_vec(),
        since: Some(since),
    };
    env.store.put_vm(lease, scope, &j.vm.key, &facts).await
}

/// Looks for the task of a clone call into `vmid` made at `since` whose reply was lost.
/// Found, its UPID is recorded (a failure to record keeps the slots) and returned. A clone
/// from the same source that runs and names no volume yet may be ours: the job comes back
/// later (keeping its slots) until it does or ends, within the task deadline. `None`: no
/// task of ours, or a node that does not list its tasks (the VM itself is inspected next).
async fn find_lost_clone(
    j: &CloneJob,
    lease: &Lease,
    env: &Env,
    pve: &PveClient,
    vmid: u32,
    since: chrono::DateTime<Utc>,
    quarantined: &[u32],
) -> Result<Option<Upid>, JobError> {
    match lost_reply::find_clone(pve, &j.source_node, j.source_vmid, vmid, since).await {
        Ok(CloneSearch::Found { upid, running }) => {
            tracing::info!(vmid, %upid, running, "found the task of a clone whose reply was lost");
            record_since(j, lease, env, vmid, Some(&upid), quarantined, since)
                .await
                .map_err(keep_slots)?;
            Ok(Some(upid))
        }
        Ok(CloneSearch::Undecided)
            if Utc::now() - since
                < chrono::Duration::from_std(env.timing.task_deadline)
                    .unwrap_or(chrono::TimeDelta::MAX) =>
        {
            Err(JobError::DeferredFor(env.timing.recheck))
        }
        Ok(_) => Ok(None),
        Err(e) if retryable(&e) => Err(keep_slots(pve_error(e))),
        Err(_) => Ok(None),
    }
}

/// Confirms the VM and records its facts.
async fn finish(
    j: &CloneJob,
    lease: &Lease,
    env: &Env,
    _pve: &PveClient,
    vmid: u32,
    upid: Option<Upid>,
    quarantined: &[u32],
) -> Result<(), JobError> {
    let scope = scope_of_key(lease.job_key());
    env.store
        .put_vm(
            lease,
            scope,
            &j.vm.key,
            &VmFacts {
                epoch: Some(epoch_of_scope(scope)),
                vmid,
                node: j.vm.node.clone(),
                upid: upid.map(|u| u.to_string()),
                quarantined: quarantined.to_vec(),
                since: None,
            },
        )
        .await
}
