//! Noticing a lost node, and the records of what its loss moved and left behind.
//!
//! A node is *suspected* when a call to it is answered 595 (pveproxy could not reach it):
//! every worker's clients report it through `PveClient::on_unreachable_node` ([`hook`]),
//! which notes the first time in `nodes:<cluster>:suspect` (node -> ms, `HSETNX`, so the
//! earliest report stays). Nothing is read from Proxmox while no node is suspected, so a
//! healthy cluster pays nothing for the watch.
//!
//! Every worker runs [`run`]: for a cluster with a suspected or lost node it asks
//! `/cluster/resources?type=node` once per round. A suspected node seen online is cleared; one
//! still offline (or not answering) `node_lost_after` (per cluster in `connections.yml`) after
//! it was first suspected is recorded lost in `nodes:<cluster>:lost` (node -> [`LostNode`]).
//! While a node is lost, each round makes sure every active deployment on the cluster has
//! its re-placement job (`replace`, keyed by the node and when it was first suspected, so
//! however many workers enqueue it, it exists once; `jobs::replace`). When the lost node is
//! online again, the round enqueues its `node-debris` job (the same way, by key), which
//! removes what the re-placements recorded as left there, and only then forgets the loss.
//!
//! Time is Redis' (`TIME`), never a worker's clock.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::jobs::state::{Phase, Store};
use crate::jobs::{Env, Job};
use crate::pve::{ClusterResource, ResourceType, UnreachableHook};
use crate::queue::{JobSpec, Queue, QueueError};

/// A node recorded lost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostNode {
    /// When a call to it was first answered 595 (ms, Redis' clock): the loss's id.
    pub since_ms: i64,
    /// When it was recorded lost.
    pub lost_ms: i64,
}

/// One object a re-placement left on a lost node, removed when the node is back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Debris {
    /// A VM of a moved student, found on the cluster at the VMID its clone had.
    Vm {
        deployment: String,
        /// The VM key (`<user>/<machine>`).
        vm: String,
        epoch: u32,
        vmid: u32,
        node: String,
        #[serde(default)]
        upid: Option<String>,
        /// The reservation that keeps its VMID until it is removed (`debris_owner`).
        owner: String,
    },
    /// A private bridge a moved student had on the lost node (its reservation there).
    Bridge {
        deployment: String,
        node: String,
        iface: String,
        /// The bridge reservation's owner on that node.
        owner: String,
    },
}

impl Debris {
    /// The field of `debris:<cluster>`: `<node>|vm|<vmid>` or `<node>|bridge|<iface>`.
    pub fn field(&self, lost: &str) -> String {
        match self {
            Debris::Vm { vmid, .. } => format!("{lost}|vm|{vmid}"),
            Debris::Bridge { iface, .. } => format!("{lost}|bridge|{iface}"),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Debris::Vm { vm, vmid, node, .. } => format!("VM {vmid} ({vm}) on {node}"),
            Debris::Bridge { iface, node, .. } => format!("bridge {iface} on {node}"),
        }
    }
}

/// The reservation owner of a moved VM's old VMID until its debris is removed.
pub fn debris_owner(vm_owner: &str, lost: &str) -> String {
    format!("{vm_owner}~lost@{lost}")
}

/// What a re-placement did with one student placed on a lost node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    pub user: String,
    pub from: String,
    /// The node the student was moved to; `None`: not moved (`why` says why).
    pub to: Option<String>,
    pub why: String,
    /// When (ms, Redis' clock) the node was first suspected: the loss this move answers.
    pub since_ms: i64,
    /// (VM key, old VMID, new VMID) of each moved VM.
    #[serde(default)]
    pub vms: Vec<(String, u32, u32)>,
}

impl Store {
    pub fn key_suspects(&self, cluster: &str) -> String {
        self.queue().key(&format!("nodes:{cluster}:suspect"))
    }
    pub fn key_lost_nodes(&self, cluster: &str) -> String {
        self.queue().key(&format!("nodes:{cluster}:lost"))
    }
    pub fn key_debris(&self, cluster: &str) -> String {
        self.queue().key(&format!("debris:{cluster}"))
    }
    /// Per scope: user -> [`Move`].
    pub fn key_moves(&self, scope: &str) -> String {
        self.queue().key(&format!("d:{scope}:moves"))
    }

    pub async fn lost_nodes(
        &self,
        cluster: &str,
    ) -> Result<BTreeMap<String, LostNode>, QueueError> {
        let mut c = self.queue().connection();
        let m: HashMap<String, String> = c.hgetall(self.key_lost_nodes(cluster)).await?;
        Ok(m.into_iter()
            .filter_map(|(k, v)| serde_json::from_str(&v).ok().map(|l| (k, l)))
            .collect())
    }

    /// What re-placements left on the cluster's lost nodes, by field.
    pub async fn debris(&self, cluster: &str) -> Result<BTreeMap<String, Debris>, QueueError> {
        let mut c = self.queue().connection();
        let m: HashMap<String, String> = c.hgetall(self.key_debris(cluster)).await?;
        Ok(m.into_iter()
            .filter_map(|(k, v)| serde_json::from_str(&v).ok().map(|d| (k, d)))
            .collect())
    }

    pub async fn moves(&self, scope: &str) -> Result<BTreeMap<String, Move>, QueueError> {
        let mut c = self.queue().connection();
        let m: HashMap<String, String> = c.hgetall(self.key_moves(scope)).await?;
        Ok(m.into_iter()
            .filter_map(|(k, v)| serde_json::from_str(&v).ok().map(|l| (k, l)))
            .collect())
    }

    /// Redis' clock in ms.
    pub async fn redis_now_ms(&self) -> Result<i64, QueueError> {
        let mut c = self.queue().connection();
        let (s, us): (i64, i64) = redis::cmd("TIME").query_async(&mut c).await?;
        Ok(s * 1000 + us / 1000)
    }
}

/// The `PveClient::on_unreachable_node` hook of `cluster`'s clients: notes the node as
/// suspected (once a second per node at most; the write runs in the background).
pub fn hook(queue: Queue, cluster: &str) -> UnreachableHook {
    let store = Store::new(queue);
    let key = store.key_suspects(cluster);
    let last: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    Arc::new(move |node: &str| {
        {
            let mut m = last.lock().unwrap_or_else(|e| e.into_inner());
            if m.get(node)
                .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
            {
                return;
            }
            m.insert(node.to_owned(), Instant::now());
        }
        let (store, key, node) = (store.clone(), key.clone(), node.to_owned());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Ok(now) = store.redis_now_ms().await {
                    let mut c = store.queue().connection();
                    let _: Result<i64, _> = c.hset_nx(&key, &node, now).await;
                }
            });
        }
    })
}

/// Watches the suspected and lost nodes of every cluster until `stop` (see the header).
pub async fn run(env: Arc<Env>, every: Duration, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let clusters: Vec<String> = env
            .clusters
            .connections()
            .clusters
            .keys()
            .cloned()
            .collect();
        for cluster in clusters {
            if let Err(e) = round(&env, &cluster).await {
                tracing::debug!(cluster, error = %e, "node watch round failed; next round");
            }
        }
    }
}

/// One round for one cluster.
async fn round(env: &Env, cluster: &str) -> Result<(), String> {
    let store = &env.store;
    let mut c = store.queue().connection();
    let suspects: HashMap<String, i64> = c
        .hgetall(store.key_suspects(cluster))
        .await
        .map_err(|e| e.to_string())?;
    let lost = store.lost_nodes(cluster).await.map_err(|e| e.to_string())?;
    if suspects.is_empty() && lost.is_empty() {
        return Ok(());
    }
    let pve = env.clusters.client(cluster).map_err(|e| e.to_string())?;
    // The cluster's own view; when even that is not answered, nothing is decided this round.
    let online: BTreeMap<String, bool> = pve
        .cluster_resources(Some(ResourceType::Node))
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter_map(|r| match r {
            ClusterResource::Node(n) => Some((n.node, n.status == "online")),
            _ => None,
        })
        .collect();
    let now = store.redis_now_ms().await.map_err(|e| e.to_string())?;
    let after = env
        .clusters
        .connections()
        .clusters
        .get(cluster)
        .map(|c| c.operating.node_lost_after)
        .unwrap_or(crate::config::DEFAULT_NODE_LOST_AFTER);
    for (node, first) in &suspects {
        let up = online.get(node).copied().unwrap_or(false);
        if up || lost.contains_key(node) {
            let _: i64 = c
                .hdel(store.key_suspects(cluster), node)
                .await
                .map_err(|e| e.to_string())?;
        } else if now - first >= after.as_millis() as i64 {
            let rec = LostNode {
                since_ms: *first,
                lost_ms: now,
            };
            let json = serde_json::to_string(&rec).expect("serializes");
            let _: bool = c
                .hset_nx(store.key_lost_nodes(cluster), node, json)
                .await
                .map_err(|e| e.to_string())?;
            tracing::warn!(
                cluster,
                node,
                offline_for_ms = now - first,
                "node lost: its students are moved"
            );
            let _: i64 = c
                .hdel(store.key_suspects(cluster), node)
                .await
                .map_err(|e| e.to_string())?;
            enqueue_replacements(store, cluster, node, &rec).await?;
        }
    }
    for (node, rec) in &lost {
        if online.get(node).copied().unwrap_or(false) {
            // Back: its debris goes first (by key, once), then the loss is forgotten.
            store
                .queue()
                .enqueue(&debris_spec(cluster, node, &format!("{}", rec.since_ms)))
                .await
                .map_err(|e| e.to_string())?;
            tracing::info!(
                cluster,
                node,
                "lost node is back: removing what was left on it"
            );
            let _: i64 = c
                .hdel(store.key_lost_nodes(cluster), node)
                .await
                .map_err(|e| e.to_string())?;
        } else {
            enqueue_replacements(store, cluster, node, rec).await?;
        }
    }
    Ok(())
}

/// The `replace` job of every active deployment on `cluster` for the loss `rec` of `node`.
async fn enqueue_replacements(
    store: &Store,
    cluster: &str,
    node: &str,
    rec: &LostNode,
) -> Result<(), String> {
    let deps = store.deployments().await.map_err(|e| e.to_string())?;
    let specs: Vec<JobSpec> = deps
        .iter()
        .filter(|d| d.cluster == cluster && d.phase == Phase::Active)
        .map(|d| {
            let scope = d.scope();
            let job = Job::Replace(crate::jobs::replace::ReplaceJob {
                deployment: d.id.clone(),
                cluster: cluster.to_owned(),
                node: node.to_owned(),
                since_ms: rec.since_ms,
            });
            JobSpec::new(
                format!("{scope}/replace/{node}/{}", rec.since_ms),
                job.kind(),
                job.to_value(),
            )
            .group(scope)
        })
        .collect();
    if !specs.is_empty() {
        store
            .queue()
            .enqueue_batch(&specs)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The `node-debris` job of `node` for one loss (`tag`: its id, or the scope of a
/// re-placement that ran after the node was back).
pub fn debris_spec(cluster: &str, node: &str, tag: &str) -> JobSpec {
    let job = Job::NodeDebris(crate::jobs::replace::NodeDebrisJob {
        cluster: cluster.to_owned(),
        node: node.to_owned(),
    });
    JobSpec::new(
        format!("debris@{cluster}/{node}/{tag}"),
        job.kind(),
        job.to_value(),
    )
    .group(format!("debris@{cluster}"))
}
