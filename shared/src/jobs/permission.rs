//! `permission`: the deployment's role for the student on their VM (`/vms/<vmid>`), so the
//! student sees and uses only their own VMs. Granting an ACL that exists is a no-op in
//! Proxmox, so the step converges without a read.

use crate::jobs::{Env, PermissionJob, pve_error, require_vm};
use crate::pve::AclUpdate;
use crate::queue::{JobError, Lease};

pub async fn run(j: &PermissionJob, lease: &Lease, env: &Env) -> Result<(), JobError> {
    let facts = require_vm(env, lease, &j.vm).await?;
    let pve = env.pve(&j.vm.cluster)?;
    lease.check().await?;
    pve.update_acl(&AclUpdate {
        path: format!("/vms/{}", facts.vmid),
        roles: vec![j.role.clone()],
        users: vec![j.user.clone()],
        propagate: Some(false),
        ..AclUpdate::default()
    })
    .await
    .map_err(pve_error)
}
