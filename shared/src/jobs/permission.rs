//! `permission`: the VM into its student's pool, where the role the student job granted on
//! `/pool/<pool>` applies to it, so the student sees and uses only their own VMs. One write
//! under Proxmox's cluster-wide `user.cfg` lock, made through labfleet's own pass
//! (`api_slots`), after the clone's task has ended and its slots are free (a clone with
//! `pool` made the same write inside its task, holding its slots while it waited).
//! Done when: the VM is a member of the pool.
//!
//! A job enqueued before the role moved to the pool has no pool (its clone added the VM):
//! it grants the role on `/vms/<vmid>` as that version did.

use crate::jobs::{Env, PermissionJob, pve_error, require_vm};
use crate::pve::error::is_in_another_pool;
use crate::pve::{AclUpdate, PoolUpdate, PveError};
use crate::queue::{JobError, Lease};

pub async fn run(j: &PermissionJob, lease: &Lease, env: &Env) -> Result<(), JobError> {
    let facts = require_vm(env, lease, &j.vm).await?;
    let pve = env.pve(&j.vm.cluster)?;
    lease.check().await?;
    let Some(pool) = &j.pool else {
        let grant = AclUpdate::grant(format!("/vms/{}", facts.vmid), &j.role, &j.user, false);
        return pve.update_acl(&grant).await.map_err(pve_error);
    };
    let add = PoolUpdate {
        vms: vec![facts.vmid],
        ..PoolUpdate::default()
    };
    match pve.update_pool(pool, &add).await {
        Ok(()) => Ok(()),
        // A lost reply's write, or a previous attempt's, already made it.
        Err(PveError::AlreadyExists { message, .. }) if !is_in_another_pool(&message) => Ok(()),
        Err(PveError::AlreadyExists { message, .. }) => Err(JobError::Permanent(format!(
            "VM {} ({}) is in another pool, not in {pool}: {message}; someone moved it there. \
             Move it back (`PUT /pools/{pool}` with `vms={}` and `allow-move=1`), then `producer retry`",
            facts.vmid, j.vm.key, facts.vmid
        ))),
        Err(e) => Err(pve_error(e)),
    }
}
