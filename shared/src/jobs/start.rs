//! `start`: start the VM when the deployment asks for it. Done when: it runs.

use crate::jobs::{Env, StartJob, pve_error, require_vm};
use crate::queue::{JobError, Lease};

pub async fn run(j: &StartJob, lease: &Lease, env: &Env) -> Result<(), JobError> {
    let facts = require_vm(env, lease, &j.vm).await?;
    let pve = env.pve(&j.vm.cluster)?;
    let status = pve
        .vm_status(&facts.node, facts.vmid)
        .await
        .map_err(pve_error)?;
    if status.is_running() {
        return Ok(());
    }
    lease.check().await?;
    let upid = pve
        .start_vm(&facts.node, facts.vmid)
        .await
        .map_err(pve_error)?;
    env.wait(&pve, &upid, lease).await
}
