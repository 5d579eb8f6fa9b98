//! `start`: start the VM when the deployment asks for it (holding its node's start slot).
//! Done when: it runs, and its power state is recorded.

use crate::jobs::{Env, StartJob, power, pve_error, require_vm};
use crate::queue::{JobError, Lease};

pub async fn run(j: &StartJob, lease: &Lease, env: &Env) -> Result<(), JobError> {
    let facts = require_vm(env, lease, &j.vm).await?;
    let pve = env.pve(&j.vm.cluster)?;
    let status = pve
        .vm_status(&facts.node, facts.vmid)
        .await
        .map_err(pve_error)?;
    if !status.is_running() {
        lease.check().await?;
        let upid = pve
            .start_vm(&facts.node, facts.vmid)
            .await
            .map_err(pve_error)?;
        env.wait(&pve, &upid, lease).await?;
    }
    power::record(env, lease, &j.vm.key, true, "deploy", None).await
}
