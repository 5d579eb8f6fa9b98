//! Teardown of what a deployment created besides its VMs: each student's pool (its comment
//! carries the deployment marker), the user if labfleet created it (any labfleet
//! deployment's marker in its comment) and no other deployment in this Redis still lists it,
//! and each node's private bridges (their comments carry the marker too), applied once per
//! node. Runs after the VMs are destroyed (gated on their destroy jobs); destroying a VM
//! removed its ACLs already, so a student shared with another deployment keeps theirs
//! there. Anything without our marker stays.

use reqwest::Method;

use crate::jobs::cache::Cache;
use crate::jobs::{Env, NodeNetworkJob, StudentJob, deployment_marker, pve_error};
use crate::pve::PveError;
use crate::queue::{JobError, Lease};

pub async fn student(j: &StudentJob, lease: &Lease, env: &Env) -> Result<(), JobError> {
    let pve = env.pve(&j.cluster)?;
    let mine = deployment_marker(&j.deployment);
    match pve.pool(&j.pool).await {
        Ok(info) if info.comment.as_deref().map(str::trim) == Some(mine.as_str()) => {
            // Our VMs still in the pool (a clone fenced by the teardown that ended after its
            // destroy looked, one whose record was lost): removed by marker first, or the
            // pool cannot go.
            leftovers(j, &pve, &info.vmids(), lease, env).await?;
            lease.check().await?;
            match pve.delete_pool(&j.pool).await {
                Ok(()) | Err(PveError::NotFound { .. }) => {}
                Err(e) => return Err(pve_error(e)),
            }
            env.cache.forget(&Cache::pools_key(&j.cluster), &j.pool);
            count_removal(env, &j.cluster).await?;
        }
        Ok(_) | Err(PveError::NotFound { .. }) => {}
        Err(e) => return Err(pve_error(e)),
    }
    let others: Vec<String> = env
        .store
        .listing_user(&j.cluster, &j.user)
        .await
        .map_err(|e| JobError::Retry(format!("redis: {e}")))?
        .into_iter()
        .filter(|d| d != &j.deployment)
        .collect();
    if !others.is_empty() {
        tracing::info!(user = %j.user, still_listed_by = ?others, "keeping a student another deployment lists");
        return Ok(());
    }
    match pve.user(&j.user).await {
        Ok(info) if creator(info.comment.as_deref()).is_some() => {
            lease.check().await?;
            let path = format!("/access/users/{}", j.user);
            match pve.raw_call(Method::DELETE, &path, &[]).await {
                Ok(_) | Err(PveError::NotFound { .. }) => {}
                Err(e) => return Err(pve_error(e)),
            }
            env.cache.forget(&Cache::users_key(&j.cluster), &j.user);
            env.store
                .forget_creator(&j.cluster, &j.user)
                .await
                .map_err(|e| JobError::Retry(format!("redis: {e}")))?;
            count_removal(env, &j.cluster).await?;
        }
        Ok(_) | Err(PveError::NotFound { .. }) => {}
        Err(e) => return Err(pve_error(e)),
    }
    Ok(())
}

/// Destroys the VMs among `vmids` that carry a marker of this deployment (any epoch: the
/// pool is this deployment's, and its student's pool goes only after the VMs of every epoch
/// it tears down).
async fn leftovers(
    j: &StudentJob,
    pve: &crate::pve::PveClient,
    vmids: &[u32],
    lease: &Lease,
    env: &Env,
) -> Result<(), JobError> {
    for vmid in vmids {
        let Some(node) = crate::jobs::locate(pve, *vmid).await? else {
            continue;
        };
        let cfg = match pve.vm_config(&node, *vmid).await {
            Ok(c) => c,
            Err(PveError::NotFound { .. }) => continue,
            Err(e) => return Err(pve_error(e)),
        };
        let desc = cfg.description().unwrap_or_default();
        let Some((key, epoch)) = marked(&desc, &j.deployment) else {
            continue;
        };
        tracing::warn!(vmid, vm = %key, "a VM of ours is still in the pool at its student's teardown; removing it");
        let facts = crate::jobs::state::VmFacts {
            vmid: *vmid,
            node,
            ..Default::default()
        };
        let t = crate::jobs::destroy::Target {
            cluster: &j.cluster,
            deployment: &j.deployment,
            key: &key,
            epoch,
            facts: &facts,
            owner: crate::plan::vm_owner(&j.deployment, &key),
        };
        crate::jobs::destroy::remove(&t, lease, env).await?;
    }
    Ok(())
}

/// The VM key and epoch of a marker of `deployment` in a description (epoch 0 for a marker
/// of the version before epochs, which `MarkerMatch::is_ours` accepts for any epoch).
fn marked(description: &str, deployment: &str) -> Option<(String, u32)> {
    let prefix = format!("labfleet deployment={deployment} vm=");
    description.lines().map(str::trim).find_map(|l| {
        let rest = l.strip_prefix(&prefix)?;
        match rest.rsplit_once(" epoch=") {
            Some((key, e)) => Some((key.to_owned(), e.parse().ok()?)),
            None => Some((rest.to_owned(), 0)),
        }
    })
}

/// The deployment a user's comment names as its creator, if labfleet created it.
pub fn creator(comment: Option<&str>) -> Option<&str> {
    let c = comment?.trim();
    let id = c.strip_prefix("labfleet deployment=")?;
    (!id.is_empty() && !id.contains(char::is_whitespace)).then_some(id)
}

/// Removes the deployment's private bridges on the node: all of them, or (a prune) only those
/// named in `j.bridges`.
pub async fn node_network(j: &NodeNetworkJob, lease: &Lease, env: &Env) -> Result<(), JobError> {
    let pve = env.pve(&j.cluster)?;
    let mine = deployment_marker(&j.deployment);
    let list = pve.network_list(&j.node, None).await.map_err(pve_error)?;
    let mut removed = 0;
    for iface in &list.ifaces {
        let ours = iface
            .comments
            .as_deref()
            .is_some_and(|c| c.trim_start().starts_with(&format!("{mine} ")) || c.trim() == mine);
        let named = j.bridges.is_empty() || j.bridges.iter().any(|b| b.iface == iface.iface);
        if !ours || !named {
            continue;
        }
        lease.check().await?;
        match pve.network_delete(&j.node, &iface.iface).await {
            Ok(()) | Err(PveError::NotFound { .. }) => removed += 1,
            Err(e) => return Err(pve_error(e)),
        }
    }
    if removed > 0 || list.changes.is_some() {
        lease.check().await?;
        let upid = pve.network_apply(&j.node).await.map_err(pve_error)?;
        env.wait(&pve, &upid, lease).await?;
    }
    env.cache
        .invalidate(&Cache::ifaces_key(&j.cluster, &j.node));
    if removed > 0 {
        count_removal(env, &j.cluster).await?;
    }
    Ok(())
}

/// Tells other workers' caches that something they may hold as existing is gone.
async fn count_removal(env: &Env, cluster: &str) -> Result<(), JobError> {
    env.store
        .count_removal(cluster)
        .await
        .map_err(|e| JobError::Retry(format!("redis: {e}")))
}
