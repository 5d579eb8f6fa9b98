//! `audit-remove`: removes one object `producer audit --fix` found that nobody owns, with
//! teardown's safety rules checked again at the moment of acting (the audit was read a
//! while ago): never an object of a live deployment, never a VM without this deployment's
//! marker of that epoch (removed by `destroy::remove`, which also leaves a foreign lock
//! alone), never a pool, user or bridge whose comment no longer names the deployment, never
//! a user a live deployment lists, never a volume of an existing VM or one a VM config
//! references. Done when: the object is gone, or is no longer ours to remove.

use serde::{Deserialize, Serialize};

use crate::audit::{Debris, live};
use crate::jobs::cache::Cache;
use crate::jobs::state::VmFacts;
use crate::jobs::teardown::creator;
use crate::jobs::{Env, deployment_marker, pve_error};
use crate::pve::{AclUpdate, Method, PveClient, PveError};
use crate::queue::{JobError, Lease};

/// Remove one unowned object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRemoveJob {
    pub cluster: String,
    /// The audit round (`audit@<cluster>#<ms>`), for logs.
    pub audit: String,
    pub object: Debris,
}

fn redis(e: impl std::fmt::Display) -> JobError {
    JobError::Retry(format!("redis: {e}"))
}

pub async fn run(j: &AuditRemoveJob, lease: &Lease, env: &Env) -> Result<(), JobError> {
    if let Some(d) = j.object.deployment()
        && live(&env.store, d).await.map_err(redis)?
    {
        tracing::warn!(object = %j.object.describe(), deployment = d, "deployment is live again; leaving it");
        return Ok(());
    }
    let pve = env.pve(&j.cluster)?;
    match &j.object {
        Debris::Vm {
            node,
            vmid,
            deployment,
            key,
            epoch,
        } => {
            let facts = VmFacts {
                vmid: *vmid,
                node: node.clone(),
                ..Default::default()
            };
            let t = crate::jobs::destroy::Target {
                cluster: &j.cluster,
                deployment,
                key,
                epoch: *epoch,
                facts: &facts,
                owner: crate::plan::vm_owner(deployment, key),
            };
            crate::jobs::destroy::remove(&t, lease, env).await
        }
        Debris::Pool { pool, deployment } => remove_pool(&pve, pool, deployment, lease).await,
        Debris::User { user, deployment } => {
            remove_user(j, &pve, user, deployment, lease, env).await
        }
        Debris::Bridge {
            node,
            iface,
            deployment,
        } => remove_bridge(&pve, node, iface, deployment, lease, env, &j.cluster).await,
        Debris::Acl {
            path,
            kind,
            ugid,
            role,
            ..
        } => {
            let present = pve
                .acl()
                .await
                .map_err(pve_error)?
                .iter()
                .any(|a| &a.path == path && &a.ugid == ugid && &a.roleid == role);
            if !present {
                return Ok(());
            }
            let mut p = AclUpdate {
                path: path.clone(),
                roles: vec![role.clone()],
                delete: true,
                ..AclUpdate::default()
            };
            match kind.as_str() {
                "group" => p.groups.push(ugid.clone()),
                "token" => p.tokens.push(ugid.clone()),
                _ => p.users.push(ugid.clone()),
            }
            lease.check().await?;
            pve.update_acl(&p).await.map_err(pve_error)
        }
        Debris::Volume {
            node,
            storage,
            volid,
            vmid,
            ..
        } => remove_volume(&pve, node, storage, volid, *vmid, lease, env).await,
    }
}

async fn remove_pool(
    pve: &PveClient,
    pool: &str,
    deployment: &str,
    lease: &Lease,
) -> Result<(), JobError> {
    let info = match pve.pool(pool).await {
        Ok(i) => i,
        Err(PveError::NotFound { .. }) => return Ok(()),
        Err(e) => return Err(pve_error(e)),
    };
    if info.comment.as_deref().map(str::trim) != Some(deployment_marker(deployment).as_str()) {
        return Ok(());
    }
    let members = info.vmids();
    if !members.is_empty() {
        // Our VMs in it go first (their own jobs); anything else in it is not ours, and
        // Proxmox refuses to delete a pool that is not empty.
        return Err(JobError::Retry(format!(
            "pool {pool} still holds VMs {members:?}; waiting for them to go"
        )));
    }
    lease.check().await?;
    match pve.delete_pool(pool).await {
        Ok(()) | Err(PveError::NotFound { .. }) => Ok(()),
        Err(e) => Err(pve_error(e)),
    }
}

async fn remove_user(
    j: &AuditRemoveJob,
    pve: &PveClient,
    user: &str,
    deployment: &str,
    lease: &Lease,
    env: &Env,
) -> Result<(), JobError> {
    for other in env
        .store
        .listing_user(&j.cluster, user)
        .await
        .map_err(redis)?
    {
        if live(&env.store, &other).await.map_err(redis)? {
            tracing::info!(user, listed_by = %other, "a live deployment lists the user; keeping it");
            return Ok(());
        }
    }
    match pve.user(user).await {
        Ok(info) if creator(info.comment.as_deref()) == Some(deployment) => {}
        Ok(_) | Err(PveError::NotFound { .. }) => return Ok(()),
        Err(e) => return Err(pve_error(e)),
    }
    lease.check().await?;
    match pve
        .raw_call(Method::DELETE, &format!("/access/users/{user}"), &[])
        .await
    {
        Ok(_) | Err(PveError::NotFound { .. }) => {}
        Err(e) => return Err(pve_error(e)),
    }
    env.cache.forget(&Cache::users_key(&j.cluster), user);
    env.store
        .forget_creator(&j.cluster, user)
        .await
        .map_err(redis)?;
    env.store.count_removal(&j.cluster).await.map_err(redis)
}

async fn remove_bridge(
    pve: &PveClient,
    node: &str,
    iface: &str,
    deployment: &str,
    lease: &Lease,
    env: &Env,
    cluster: &str,
) -> Result<(), JobError> {
    let list = pve.network_list(node, None).await.map_err(pve_error)?;
    let ours = list.ifaces.iter().any(|i| {
        i.iface == iface
            && crate::audit::comment_deployment(i.comments.as_deref()) == Some(deployment)
    });
    if ours {
        lease.check().await?;
        match pve.network_delete(node, iface).await {
            Ok(()) | Err(PveError::NotFound { .. }) => {}
            Err(e) => return Err(pve_error(e)),
        }
    }
    if ours || list.changes.is_some() {
        lease.check().await?;
        let upid = pve.network_apply(node).await.map_err(pve_error)?;
        env.wait(pve, &upid, lease).await?;
    }
    env.cache.invalidate(&Cache::ifaces_key(cluster, node));
    if ours {
        env.store.count_removal(cluster).await.map_err(redis)?;
    }
    Ok(())
}

async fn remove_volume(
    pve: &PveClient,
    node: &str,
    storage: &str,
    volid: &str,
    vmid: Option<u32>,
    lease: &Lease,
    env: &Env,
) -> Result<(), JobError> {
    // A volume whose name gives no VMID was never reported as ours.
    let Some(v) = vmid else {
        return Ok(());
    };
    if crate::jobs::locate(pve, v).await?.is_some() {
        tracing::warn!(
            volid,
            vmid = v,
            "a VM with the volume's VMID exists; leaving it"
        );
        return Ok(());
    }
    let content = pve
        .storage_content(node, storage, None)
        .await
        .map_err(pve_error)?;
    if !content.iter().any(|e| e.volid == volid) {
        return Ok(());
    }
    lease.check().await?;
    match pve.delete_volume(node, storage, volid).await {
        Ok(upid) => env.wait(pve, &upid, lease).await,
        Err(PveError::NotFound { .. }) => Ok(()),
        Err(e) => Err(pve_error(e)),
    }
}
