//! `student`: the student's `@pve` user (created with the sealed initial password when
//! missing; an existing user's password is never changed), their pool, and the
//! deployment's role for them on `/pool/<pool>`, which Proxmox applies to every VM in the
//! pool: one ACL per student instead of one per VM, each a write under the cluster-wide
//! `user.cfg` lock. Done when: the user, the pool and the ACL exist.

use crate::jobs::cache::Cache;
use crate::jobs::{Env, StudentJob, deployment_marker, pve_error};
use crate::pve::{AclUpdate, PveError, UserCreate};
use crate::queue::{JobError, Lease};

/// The key that runs a cluster's student jobs one at a time, in the plan's order (which
/// interleaves the nodes). Each makes two `user.cfg` writes, which Proxmox serialises under
/// one cluster-wide lock anyway: run all at once they finished in a random order over the
/// first seconds, and a node whose students came last had its storages idle meanwhile; one
/// at a time, the first student of every node is ready within a few tenths of a second and
/// the last no later than before.
pub fn slot(cluster: &str) -> String {
    format!("mutex:students/{cluster}")
}

pub async fn run(j: &StudentJob, lease: &Lease, env: &Env) -> Result<(), JobError> {
    let pve = env.pve(&j.cluster)?;
    // A teardown elsewhere may have removed what this process cached as existing.
    let removals = env
        .store
        .removals(&j.cluster)
        .await
        .map_err(|e| JobError::Retry(format!("redis: {e}")))?;
    env.cache.sync(&j.cluster, removals);
    let users = env.cache.users(&j.cluster, &pve).await.map_err(pve_error)?;
    let mut exists = users.contains(&j.user);
    if !exists {
        // Decide on fresh facts: the user may have been created since the cache was filled
        // (an admin fixing a failed deployment, then `producer retry`). Ask about this user
        // only: re-reading the whole list for every missing student made a class quadratic
        // (5,000 new students read 5,000 lists of up to 5,000 users).
        exists = match pve.user(&j.user).await {
            Ok(_) => true,
            Err(PveError::NotFound { .. }) => false,
            Err(e) => return Err(pve_error(e)),
        };
    }
    if !exists {
        let Some(sealed) = &j.sealed_password else {
            return Err(JobError::Permanent(format!(
                "user {} does not exist, and labfleet creates users only in the pve realm: create it in its realm first",
                j.user
            )));
        };
        let key = env.clusters.secret_key().ok_or_else(|| {
            JobError::Permanent("this worker has no secret key (LABFLEET_SECRET_KEY) to open the student's initial password".into())
        })?;
        let password = key
            .open(sealed)
            .map_err(|e| JobError::Permanent(format!("initial password of {}: {e}", j.user)))?;
        lease.check().await?;
        let create = UserCreate {
            userid: j.user.clone(),
            password: Some(password),
            comment: Some(deployment_marker(&j.deployment)),
            ..UserCreate::default()
        };
        match pve.create_user(&create).await {
            Ok(()) => {}
            // Made by a previous attempt of this job, or raced by another deployment's: the
            // comment on Proxmox says which; the record below is the common case's.
            Err(PveError::AlreadyExists { .. }) => {}
            Err(e) => return Err(pve_error(e)),
        }
        env.store
            .note_creator(&j.cluster, &j.user, &j.deployment)
            .await
            .map_err(|e| JobError::Retry(format!("redis: {e}")))?;
        env.cache.note(&Cache::users_key(&j.cluster), &j.user);
    }
    let pools = env.cache.pools(&j.cluster, &pve).await.map_err(pve_error)?;
    if !pools.contains(&j.pool) {
        lease.check().await?;
        match pve
            .create_pool(&j.pool, Some(&deployment_marker(&j.deployment)))
            .await
        {
            Ok(()) | Err(PveError::AlreadyExists { .. }) => {}
            Err(e) => return Err(pve_error(e)),
        }
        env.cache.note(&Cache::pools_key(&j.cluster), &j.pool);
    }
    if j.role.is_empty() {
        // Enqueued before the role moved to the pool: its permission jobs grant it per VM.
        return Ok(());
    }
    lease.check().await?;
    // Granting an ACL that exists is a no-op in Proxmox: no read first.
    let grant = AclUpdate::grant(format!("/pool/{}", j.pool), &j.role, &j.user, true);
    pve.update_acl(&grant).await.map_err(pve_error)
}
