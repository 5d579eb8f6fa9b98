//! `start`: start the VM when the deployment asks for it (holding its node's start slot).
//! Done when: it runs, and its power state is recorded. A start whose reply was lost is
//! found again in the node's task list and waited for.

use crate::jobs::{Env, StartJob, lost_reply, power, pve_error, require_vm};
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
        let since = chrono::Utc::now();
        let upid = match pve.start_vm(&facts.node, facts.vmid).await {
            Ok(u) => u,
            // The start may have begun: wait for its task when the node lists it, so the
            // retry does not start it again while it runs.
            Err(e) if lost_reply::may_have_run(&e) => {
                match lost_reply::find_task(
                    &pve,
                    &facts.node,
                    facts.vmid,
                    "qmstart",
                    since,
                    lost_reply::Tasks::Any,
                )
                .await
                {
                    Ok(Some((u, _))) => u,
                    _ => return Err(pve_error(e)),
                }
            }
            Err(e) => return Err(pve_error(e)),
        };
        env.wait(&pve, &upid, lease).await?;
    }
    power::record(env, lease, &j.vm.key, true, "deploy", None).await
}
