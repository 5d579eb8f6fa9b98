//! `destroy`: stop (if running) and destroy with purge one VM labfleet created, found by the
//! VMID its clone recorded (in the facts of the epoch being torn down) wherever it lives now
//! (a clone's config sits on the source node until the clone ends; an admin may have
//! migrated it), and proven ours by the marker of that epoch. A VM without it is left alone.
//! Done when: no VM at that VMID carries our marker.
//!
//! A VM under a `lock` is ours to remove only when it is our half-made clone: `lock: clone`,
//! our marker or no description yet, at a VMID reserved for this VM. Any other lock (a
//! backup, a migration, a snapshot) is someone's work in progress: the job waits for it.

use std::time::Duration;

use chrono::Utc;

use crate::alloc::{self, Space};
use crate::jobs::state::{Quarantined, VmFacts};
use crate::jobs::{
    DestroyJob, Env, epoch_of_scope, find_marker, leaks, lost_reply, pve_error, retryable, scope,
    scope_of_key,
};
use crate::pve::{DestroyParams, PveError, TaskOutcome, Upid};
use crate::queue::{JobError, Lease};

pub async fn run(j: &DestroyJob, lease: &Lease, env: &Env) -> Result<(), JobError> {
    // The epoch whose VM this is: in the payload, or (payloads of older versions) the one
    // before the teardown's own.
    let own = scope_of_key(lease.job_key());
    let vm_epoch = j
        .epoch
        .unwrap_or_else(|| epoch_of_scope(own).saturating_sub(1));
    let facts = env
        .store
        .one_vm(&scope(&j.vm.deployment, vm_epoch), &j.vm.key)
        .await
        .map_err(|e| JobError::Retry(format!("redis: {e}")))?;
    // No facts: the clone never recorded a VMID, so it never called Proxmox. The payload's
    // VMID is not used: a later epoch may own that number now.
    let Some(facts) = facts else {
        return Ok(());
    };
    let target = Target {
        cluster: &j.vm.cluster,
        deployment: &j.vm.deployment,
        key: &j.vm.key,
        epoch: vm_epoch,
        facts: &facts,
        owner: crate::plan::vm_owner(&j.vm.deployment, &j.vm.key),
    };
    remove(&target, lease, env).await
}

/// One VM to remove, as its clone recorded it.
pub struct Target<'a> {
    pub cluster: &'a str,
    pub deployment: &'a str,
    pub key: &'a str,
    /// The epoch that made it: only its marker proves it ours.
    pub epoch: u32,
    pub facts: &'a VmFacts,
    /// The owner of its VMID's reservation (`plan::vm_owner`, or a lost node's debris owner).
    pub owner: String,
}

/// Removes the VM if it is there and ours (see the module header). Converges.
pub async fn remove(t: &Target<'_>, lease: &Lease, env: &Env) -> Result<(), JobError> {
    let vmid = t.facts.vmid;
    let pve = env.pve(t.cluster)?;
    let Some(node) = crate::jobs::locate(&pve, vmid).await? else {
        // Gone: by an earlier attempt's destroy, perhaps one whose end this job never saw
        // (its reply lost, its worker killed). What that destroy left behind is freed now.
        return after_gone(t, &t.facts.node, &pve, lease, env).await;
    };
    let cfg = match pve.vm_config(&node, vmid).await {
        Ok(c) => c,
        Err(PveError::NotFound { .. }) => return Ok(()),
        Err(e) => return Err(pve_error(e)),
    };
    let desc = cfg.description().unwrap_or_default();
    let ours = find_marker(&desc, t.deployment, t.key).is_ours(t.epoch);
    let mut skiplock = false;
    if let Some(lock) = cfg.lock() {
        let half_made =
            lock == "clone" && (ours || desc.is_empty()) && reserved_for_us(t, env).await?;
        if !half_made {
            if ours {
                // Ours, but someone's work holds it (a backup, a migration): wait.
                return Err(JobError::RetryAfter(
                    Duration::from_secs(5),
                    format!("VM {vmid} is locked ({lock}); waiting for that to end"),
                ));
            }
            tracing::warn!(
                vmid,
                node,
                lock,
                "locked VM at the recorded VMID is not ours; leaving it alone"
            );
            return Ok(());
        }
        // Our clone still running: wait for it without spending an attempt. Its task
        // stopped and the lock stayed: a half-made VM, removed with skiplock where allowed,
        // else quarantined for the admin.
        let upid = t.facts.upid.as_deref().and_then(|u| u.parse::<Upid>().ok());
        let running = match &upid {
            Some(u) => match pve.task_status(u).await {
                Ok(st) => st.is_running(),
                Err(PveError::NotFound { .. }) => false,
                Err(e) => return Err(pve_error(e)),
            },
            None => {
                return Err(JobError::Retry(format!(
                    "VM {vmid} is locked ({lock}) by a clone labfleet has no task id for; waiting"
                )));
            }
        };
        if running {
            return Err(JobError::DeferredFor(env.timing.recheck));
        }
        if !env.clusters.can_skiplock(t.cluster) {
            let q = Quarantined {
                vmid,
                node: node.clone(),
                deployment: t.deployment.to_owned(),
                vm: t.key.to_owned(),
                reason: format!(
                    "half-made clone left with lock '{lock}' at teardown; removing it needs skiplock"
                ),
                at: Utc::now(),
            };
            env.store
                .quarantine(&q, t.cluster)
                .await
                .map_err(|e| JobError::Retry(format!("redis: {e}")))?;
            return Ok(());
        }
        skiplock = true;
    } else if !ours {
        tracing::warn!(
            vmid,
            node,
            "VM at the recorded VMID is not this epoch's; leaving it alone"
        );
        return Ok(());
    }
    if !skiplock {
        let status = pve.vm_status(&node, vmid).await.map_err(pve_error)?;
        if status.is_running() {
            lease.check().await?;
            let upid = pve.stop_vm(&node, vmid).await.map_err(pve_error)?;
            env.wait(&pve, &upid, lease).await?;
        }
    }
    lease.check().await?;
    let p = DestroyParams {
        purge: true,
        skiplock,
        ..DestroyParams::default()
    };
    let since = Utc::now();
    let upid = match pve.destroy_vm(&node, vmid, &p).await {
        Ok(upid) => upid,
        Err(PveError::NotFound { .. }) => return Ok(()),
        // The destroy may have started: wait for its task when the node lists it.
        Err(e) if lost_reply::may_have_run(&e) => {
            match lost_reply::find_task(
                &pve,
                &node,
                vmid,
                "qmdestroy",
                since,
                lost_reply::Tasks::Any,
            )
            .await
            {
                Ok(Some((upid, _))) => upid,
                _ => return Err(pve_error(e)),
            }
        }
        Err(e) => return Err(pve_error(e)),
    };
    let outcome = match env.wait_outcome(&pve, &upid, lease).await? {
        Ok(o) => o,
        Err(e) if found_it_gone(&e) => return after_gone(t, &node, &pve, lease, env).await,
        Err(e) => return Err(pve_error(e)),
    };
    let d = leaks::Destroyed {
        cluster: t.cluster,
        deployment: t.deployment,
        vm: t.key,
        vmid,
        node: &node,
        owner: &t.owner,
    };
    leaks::free_after_destroy(env, &pve, lease, &d, Some(&upid), outcome).await
}

/// The VM is gone: the newest destroy of its VMID on `node` (within the task deadline) that
/// did not fail may have left disks behind, and leaks recorded before may be freeable now.
async fn after_gone(
    t: &Target<'_>,
    node: &str,
    pve: &crate::pve::PveClient,
    lease: &Lease,
    env: &Env,
) -> Result<(), JobError> {
    let (upid, outcome) = last_destroy(env, pve, lease, node, t.facts.vmid).await?;
    let d = leaks::Destroyed {
        cluster: t.cluster,
        deployment: t.deployment,
        vm: t.key,
        vmid: t.facts.vmid,
        node,
        owner: &t.owner,
    };
    leaks::free_after_destroy(env, pve, lease, &d, upid.as_ref(), outcome).await
}

/// The newest destroy of `vmid` on `node` started within the task deadline that did not
/// fail (waited for if it still runs), and how it ended: the one that removed a VM found
/// gone. `None` (and `Ok`) when the node lists none.
pub(crate) async fn last_destroy(
    env: &Env,
    pve: &crate::pve::PveClient,
    lease: &Lease,
    node: &str,
    vmid: u32,
) -> Result<(Option<Upid>, TaskOutcome), JobError> {
    let since = Utc::now()
        - chrono::Duration::from_std(env.timing.task_deadline).unwrap_or(chrono::TimeDelta::zero());
    Ok(
        match lost_reply::find_task(pve, node, vmid, "qmdestroy", since, lost_reply::Tasks::Ran)
            .await
        {
            Ok(Some((upid, false))) => match pve.task_status(&upid).await {
                Ok(st) => match st.exitstatus.as_deref().map(crate::pve::parse_exitstatus) {
                    Some(Ok(o)) => (Some(upid), o),
                    _ => (None, TaskOutcome::Ok),
                },
                Err(e) if retryable(&e) => return Err(pve_error(e)),
                Err(_) => (None, TaskOutcome::Ok),
            },
            Ok(Some((upid, true))) => match env.wait_outcome(pve, &upid, lease).await? {
                Ok(o) => (Some(upid), o),
                Err(e) => return Err(pve_error(e)),
            },
            Ok(None) | Err(_) => (None, TaskOutcome::Ok),
        },
    )
}

/// Whether a destroy task failed because the VM was gone when it got the VM's lock: an
/// earlier destroy (one whose reply or end was lost) removed it first. Real Proxmox ends the
/// second with `Configuration file '...' does not exist`.
pub(crate) fn found_it_gone(e: &PveError) -> bool {
    matches!(
        e,
        PveError::TaskFailed {
            kind: crate::pve::MessageKind::NotFound,
            ..
        }
    )
}

/// Whether the VMID is reserved in Redis for this VM (a half-made clone at a VMID somebody
/// else reserved is theirs).
async fn reserved_for_us(t: &Target<'_>, env: &Env) -> Result<bool, JobError> {
    let q = env.store.queue();
    let owner = alloc::owner_of(q, &Space::vmids(q, t.cluster), t.facts.vmid)
        .await
        .map_err(|e| JobError::Retry(e.to_string()))?;
    Ok(owner.as_deref() == Some(t.owner.as_str()))
}
