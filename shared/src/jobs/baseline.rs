//! `baseline`: the snapshot a reset rolls back to (`labfleet-baseline`), taken when the
//! deployment asks for it (`baseline: true`), after the VM's network and permission are set
//! and before it is first started. Done when: the VM has the snapshot.

use crate::jobs::{Env, VmRef, pve_error, require_vm};
use crate::queue::{JobError, Lease};
use serde::{Deserialize, Serialize};

/// The name of the baseline snapshot.
pub const BASELINE_SNAPSHOT: &str = "labfleet-baseline";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaselineJob {
    pub vm: VmRef,
}

/// Whether the VM has the baseline snapshot.
pub async fn has_baseline(
    pve: &crate::pve::PveClient,
    node: &str,
    vmid: u32,
) -> Result<bool, JobError> {
    Ok(pve
        .snapshots(node, vmid)
        .await
        .map_err(pve_error)?
        .iter()
        .any(|s| s.name == BASELINE_SNAPSHOT))
}

pub async fn run(j: &BaselineJob, lease: &Lease, env: &Env) -> Result<(), JobError> {
    let facts = require_vm(env, lease, &j.vm).await?;
    let pve = env.pve(&j.vm.cluster)?;
    if has_baseline(&pve, &facts.node, facts.vmid).await? {
        return Ok(());
    }
    lease.check().await?;
    let upid = pve
        .create_snapshot(
            &facts.node,
            facts.vmid,
            BASELINE_SNAPSHOT,
            "labfleet: the state `producer reset` rolls back to",
        )
        .await
        .map_err(pve_error)?;
    match env.wait_task(&pve, &upid, lease).await? {
        Ok(()) => Ok(()),
        // A lost reply may have let an earlier attempt's snapshot finish: then it is there.
        Err(e) => {
            if has_baseline(&pve, &facts.node, facts.vmid).await? {
                Ok(())
            } else {
                Err(pve_error(e))
            }
        }
    }
}
