//! `destroy`: stop (if running) and destroy with purge one VM labfleet created, found by its
//! recorded VMID wherever it lives now (a clone's config sits on the source node until the
//! clone ends) and proven ours by the marker. A VM without our marker is left alone.
//! Done when: no VM at that VMID carries our marker.

use std::time::Duration;

use chrono::Utc;

use crate::jobs::state::Quarantined;
use crate::jobs::{DestroyJob, Env, marker, pve_error};
use crate::pve::{DestroyParams, PveError, Upid};
use crate::queue::{JobError, Lease};

pub async fn run(j: &DestroyJob, lease: &Lease, env: &Env) -> Result<(), JobError> {
    let facts = env
        .store
        .one_vm(&j.vm.deployment, &j.vm.key)
        .await
        .map_err(|e| JobError::Retry(format!("redis: {e}")))?;
    let Some(vmid) = facts.as_ref().map(|f| f.vmid).or(j.vmid) else {
        return Ok(()); // never cloned
    };
    let pve = env.pve(&j.vm.cluster)?;
    let Some(node) = pve
        .cluster_vms()
        .await
        .map_err(pve_error)?
        .into_iter()
        .find(|v| v.vmid == vmid)
        .map(|v| v.node)
    else {
        return Ok(());
    };
    let cfg = match pve.vm_config(&node, vmid).await {
        Ok(c) => c,
        Err(PveError::NotFound { .. }) => return Ok(()),
        Err(e) => return Err(pve_error(e)),
    };
    let mine = marker(&j.vm.deployment, &j.vm.key);
    let desc = cfg.description().unwrap_or_default();
    let ours = desc.lines().any(|l| l.trim() == mine);
    let mut skiplock = false;
    if let Some(lock) = cfg.lock()
        && (ours || desc.is_empty())
    {
        // Our clone still running: wait for it without spending an attempt. Its task
        // stopped and the lock stayed: a half-made VM, removed with skiplock where allowed,
        // else quarantined for the admin.
        let upid = facts
            .as_ref()
            .and_then(|f| f.upid.as_deref())
            .and_then(|u| u.parse::<Upid>().ok());
        let running = match &upid {
            Some(u) => pve.task_status(u).await.map_err(pve_error)?.is_running(),
            None => {
                return Err(JobError::Retry(format!(
                    "VM {vmid} is locked ({lock}) by a clone labfleet has no task id for; waiting"
                )));
            }
        };
        if running {
            return Err(JobError::DeferredFor(Duration::from_secs(2)));
        }
        if !env.clusters.can_skiplock(&j.vm.cluster) {
            let q = Quarantined {
                vmid,
                node: node.clone(),
                deployment: j.vm.deployment.clone(),
                vm: j.vm.key.clone(),
                reason: format!(
                    "half-made clone left with lock '{lock}' at teardown; removing it needs skiplock"
                ),
                at: Utc::now(),
            };
            env.store
                .quarantine(&q, &j.vm.cluster)
                .await
                .map_err(|e| JobError::Retry(format!("redis: {e}")))?;
            return Ok(());
        }
        skiplock = true;
    } else if !ours {
        tracing::warn!(
            vmid,
            node,
            "VM at the recorded VMID is not ours; leaving it alone"
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
    match pve.destroy_vm(&node, vmid, &p).await {
        Ok(upid) => env.wait(&pve, &upid, lease).await,
        Err(PveError::NotFound { .. }) => Ok(()),
        Err(e) => Err(pve_error(e)),
    }
}
