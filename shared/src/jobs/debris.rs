//! `node-debris`: once a lost node is back, removes what the re-placements of its students
//! recorded as left there (`jobs::node_loss::Debris`), each object proven ours first as a
//! teardown proves it, then frees its reservation and forgets it; then enqueues again the
//! plans that have bridges to make there (`replace::converge_on_return`).

use redis::AsyncCommands;

use crate::alloc::{self, Space};
use crate::jobs::node_loss::Debris;
use crate::jobs::replace::NodeDebrisJob;
use crate::jobs::state::VmFacts;
use crate::jobs::{BridgePlan, Env, NodeNetworkJob};
use crate::queue::{JobError, Lease, QueueError};

fn redis(e: impl std::fmt::Display) -> JobError {
    JobError::Retry(format!("redis: {e}"))
}

/// Removes every object recorded as left on the node (it is back), each proven ours as a
/// teardown proves it (the VM's marker of its epoch, the bridge's marker), then frees its
/// reservation and forgets it.
pub async fn run(j: &NodeDebrisJob, lease: &Lease, env: &Env) -> Result<(), JobError> {
    let store = &env.store;
    let q = store.queue();
    let prefix = format!("{}|", j.node);
    let all = store.debris(&j.cluster).await.map_err(redis)?;
    for (field, d) in all.into_iter().filter(|(f, _)| f.starts_with(&prefix)) {
        lease.check().await?;
        match &d {
            Debris::Vm {
                deployment,
                vm,
                epoch,
                vmid,
                node,
                upid,
                owner,
            } => {
                let facts = VmFacts {
                    epoch: Some(*epoch),
                    vmid: *vmid,
                    node: node.clone(),
                    upid: upid.clone(),
                    ..VmFacts::default()
                };
                let t = crate::jobs::destroy::Target {
                    cluster: &j.cluster,
                    deployment,
                    key: vm,
                    epoch: *epoch,
                    facts: &facts,
                    owner: owner.clone(),
                };
                crate::jobs::destroy::remove(&t, lease, env).await?;
                alloc::release(q, &Space::vmids(q, &j.cluster), std::slice::from_ref(owner))
                    .await
                    .map_err(|e| JobError::Retry(e.to_string()))?;
            }
            Debris::Bridge {
                deployment,
                node,
                iface,
                owner,
            } => {
                let nn = NodeNetworkJob {
                    deployment: deployment.clone(),
                    cluster: j.cluster.clone(),
                    node: node.clone(),
                    bridges: vec![BridgePlan {
                        iface: iface.clone(),
                        vlan_aware: false,
                        owner: String::new(),
                    }],
                };
                crate::jobs::teardown::node_network(&nn, lease, env).await?;
                alloc::release(
                    q,
                    &Space::bridges(q, &j.cluster, node),
                    std::slice::from_ref(owner),
                )
                .await
                .map_err(|e| JobError::Retry(e.to_string()))?;
            }
        }
        let mut c = q.connection();
        let _: i64 = c
            .hdel(store.key_debris(&j.cluster), &field)
            .await
            .map_err(|e: redis::RedisError| redis(QueueError::from(e)))?;
        tracing::info!(cluster = %j.cluster, what = %d.describe(), "removed what a lost node kept");
    }
    crate::jobs::replace::converge_on_return(env, &j.cluster, &j.node).await
}
