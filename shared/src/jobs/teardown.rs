//! Teardown of what a deployment created besides its VMs: each student's pool and the user
//! if labfleet created it (its comment carries the deployment marker), and each node's
//! private bridges (their comments carry it too), applied once per node. Runs after the
//! VMs are destroyed (gated on their destroy jobs). Anything without our marker stays.

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
            lease.check().await?;
            match pve.delete_pool(&j.pool).await {
                Ok(()) | Err(PveError::NotFound { .. }) => {}
                Err(e) => return Err(pve_error(e)),
            }
            env.cache.forget(&Cache::pools_key(&j.cluster), &j.pool);
        }
        Ok(_) | Err(PveError::NotFound { .. }) => {}
        Err(e) => return Err(pve_error(e)),
    }
    match pve.user(&j.user).await {
        Ok(info) if info.comment.as_deref().map(str::trim) == Some(mine.as_str()) => {
            lease.check().await?;
            let path = format!("/access/users/{}", j.user);
            match pve.raw_call(Method::DELETE, &path, &[]).await {
                Ok(_) | Err(PveError::NotFound { .. }) => {}
                Err(e) => return Err(pve_error(e)),
            }
            env.cache.forget(&Cache::users_key(&j.cluster), &j.user);
        }
        Ok(_) | Err(PveError::NotFound { .. }) => {}
        Err(e) => return Err(pve_error(e)),
    }
    Ok(())
}

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
        if !ours {
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
    Ok(())
}
