//! `node-network`: every private bridge the students on one node need, created and then
//! applied once (one `srvreload` task per node, not one per VM).
//! Done when: every bridge is in the node's interface list (applied or pending-then-applied).

use crate::jobs::cache::Cache;
use crate::jobs::{Env, NodeNetworkJob, deployment_marker, pve_error};
use crate::pve::{NetworkCreate, PveError};
use crate::queue::{JobError, Lease};

pub async fn run(j: &NodeNetworkJob, lease: &Lease, env: &Env) -> Result<(), JobError> {
    let pve = env.pve(&j.cluster)?;
    let key = Cache::ifaces_key(&j.cluster, &j.node);
    // Fresh list: bridges are created rarely and a stale "exists" would skip the apply.
    env.cache.invalidate(&key);
    let list = pve.network_list(&j.node, None).await.map_err(pve_error)?;
    let existing: std::collections::BTreeSet<&str> =
        list.ifaces.iter().map(|i| i.iface.as_str()).collect();
    let mut created = 0;
    for b in &j.bridges {
        if existing.contains(b.iface.as_str()) {
            continue;
        }
        lease.check().await?;
        let mut p = NetworkCreate::bridge(b.iface.clone());
        p.autostart = Some(true);
        p.bridge_vlan_aware = b.vlan_aware.then_some(true);
        p.comments = Some(format!("{} {}", deployment_marker(&j.deployment), b.owner));
        match pve.network_create(&j.node, &p).await {
            Ok(()) | Err(PveError::AlreadyExists { .. }) => created += 1,
            Err(e) => return Err(pve_error(e)),
        }
    }
    // Apply when we created something or a previous attempt left changes pending.
    if created > 0 || list.changes.is_some() {
        lease.check().await?;
        let upid = pve.network_apply(&j.node).await.map_err(pve_error)?;
        env.wait(&pve, &upid, lease).await?;
    }
    env.cache.invalidate(&key);
    Ok(())
}
