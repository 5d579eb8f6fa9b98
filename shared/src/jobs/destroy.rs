//! `destroy`: stop (if running) and destroy with purge one VM labfleet created, found by its
//! recorded VMID and proven ours by the marker. A VM without our marker is left alone.
//! Done when: no VM at that VMID carries our marker.

use crate::jobs::{DestroyJob, Env, marker, pve_error};
use crate::pve::{DestroyParams, PveError};
use crate::queue::{JobError, Lease};

pub async fn run(j: &DestroyJob, lease: &Lease, env: &Env) -> Result<(), JobError> {
    let facts = env
        .store
        .one_vm(&j.vm.deployment, &j.vm.key)
        .await
        .map_err(|e| JobError::Retry(format!("redis: {e}")))?;
    let (vmid, node) = match (&facts, j.vmid) {
        (Some(f), _) => (f.vmid, f.node.clone()),
        (None, Some(v)) => (v, j.vm.node.clone()),
        (None, None) => return Ok(()), // never cloned
    };
    let pve = env.pve(&j.vm.cluster)?;
    let cfg = match pve.vm_config(&node, vmid).await {
        Ok(c) => c,
        Err(PveError::NotFound { .. }) => return Ok(()),
        Err(e) => return Err(pve_error(e)),
    };
    let mine = marker(&j.vm.deployment, &j.vm.key);
    let desc = cfg.description().unwrap_or_default();
    let ours = desc.lines().any(|l| l.trim() == mine);
    if let Some(lock) = cfg.lock()
        && (ours || desc.is_empty())
    {
        {
            // Our clone still running (or a stale lock): try again later.
            return Err(JobError::Retry(format!(
                "VM {vmid} is locked ({lock}); waiting"
            )));
        }
    }
    if !ours {
        tracing::warn!(
            vmid,
            node,
            "VM at the recorded VMID is not ours; leaving it alone"
        );
        return Ok(());
    }
    let status = pve.vm_status(&node, vmid).await.map_err(pve_error)?;
    if status.is_running() {
        lease.check().await?;
        let upid = pve.stop_vm(&node, vmid).await.map_err(pve_error)?;
        env.wait(&pve, &upid, lease).await?;
    }
    lease.check().await?;
    let p = DestroyParams {
        purge: true,
        ..DestroyParams::default()
    };
    match pve.destroy_vm(&node, vmid, &p).await {
        Ok(upid) => env.wait(&pve, &upid, lease).await,
        Err(PveError::NotFound { .. }) => Ok(()),
        Err(e) => Err(pve_error(e)),
    }
}
