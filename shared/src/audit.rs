//! The audit: every object on a cluster that carries labfleet's marker, and every volume no
//! VM config references, each with the deployment in Redis that owns it, or none.
//!
//! Marked objects: VMs (`labfleet deployment=<id> vm=<key> epoch=<e>` in the description),
//! pools and private bridges (`labfleet deployment=<id>` in the comment), users whose
//! comment names the deployment that created them, and the ACLs on those paths (or for
//! those users). An object is owned while its deployment is live (`active` or
//! `tearing-down`); a user also while a live deployment lists it (`su:<cluster>:<user>`); a
//! volume while a live deployment holds its VMID, and it is kept whenever a VM with its
//! VMID exists. The quarantined VMIDs and the tombstones are reported as the records they
//! are. Reading only: removal is the `audit-remove` job's (`jobs::audit`), which checks
//! every rule again before it acts.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::alloc::{self, Space};
use crate::jobs::state::{Phase, Quarantined, Store};
use crate::jobs::teardown::creator;
use crate::pve::{ClusterResource, PveClient, PveError};
use crate::queue::QueueError;

/// One object the audit found, as the `audit-remove` job needs it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Debris {
    Vm {
        node: String,
        vmid: u32,
        deployment: String,
        key: String,
        epoch: u32,
    },
    Pool {
        pool: String,
        deployment: String,
    },
    User {
        user: String,
        deployment: String,
    },
    Bridge {
        node: String,
        iface: String,
        deployment: String,
    },
    Acl {
        path: String,
        /// `user`, `group` or `token`.
        kind: String,
        ugid: String,
        role: String,
        deployment: String,
    },
    Volume {
        node: String,
        storage: String,
        volid: String,
        vmid: Option<u32>,
        /// The deployment that reserved its VMID, if any.
        deployment: Option<String>,
    },
}

impl Debris {
    /// The deployment the object names (its marker, or the VMID's reservation).
    pub fn deployment(&self) -> Option<&str> {
        match self {
            Debris::Vm { deployment, .. }
            | Debris::Pool { deployment, .. }
            | Debris::User { deployment, .. }
            | Debris::Bridge { deployment, .. }
            | Debris::Acl { deployment, .. } => Some(deployment),
            Debris::Volume { deployment, .. } => deployment.as_deref(),
        }
    }

    /// A short, unique name: `vm 4101 on pve1`, `pool lab-s1`, ...
    pub fn describe(&self) -> String {
        match self {
            Debris::Vm { node, vmid, .. } => format!("vm {vmid} on {node}"),
            Debris::Pool { pool, .. } => format!("pool {pool}"),
            Debris::User { user, .. } => format!("user {user}"),
            Debris::Bridge { node, iface, .. } => format!("bridge {iface} on {node}"),
            Debris::Acl {
                path, ugid, role, ..
            } => format!("acl {path} {ugid} {role}"),
            Debris::Volume { volid, node, .. } => format!("volume {volid} on {node}"),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Debris::Vm { .. } => "vm",
            Debris::Pool { .. } => "pool",
            Debris::User { .. } => "user",
            Debris::Bridge { .. } => "bridge",
            Debris::Acl { .. } => "acl",
            Debris::Volume { .. } => "volume",
        }
    }
}

/// Who keeps an object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "kebab-case")]
pub enum Owner {
    /// A live deployment in Redis.
    Deployment { id: String },
    /// A volume of a VM that exists: never removed, whatever Redis says.
    ExistingVm { vmid: u32 },
    /// A volume whose VMID no labfleet record names (no reservation, no tombstone): not
    /// ours to judge; reported and left for the admin.
    NotOurs,
    /// Nobody: `audit --fix` removes it.
    Nobody,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Found {
    pub object: Debris,
    pub owner: Owner,
}

/// What an audit of one cluster found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub cluster: String,
    pub found: Vec<Found>,
    pub quarantined: Vec<Quarantined>,
    pub tombstones: u64,
}

impl Report {
    pub fn unowned(&self) -> impl Iterator<Item = &Found> {
        self.found.iter().filter(|f| f.owner == Owner::Nobody)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(transparent)]
    Pve(#[from] PveError),
    #[error("redis: {0}")]
    Redis(#[from] QueueError),
    #[error("redis: {0}")]
    Alloc(#[from] alloc::AllocError),
}

/// The deployment of a `labfleet deployment=<id>` comment (pools, bridges).
pub fn comment_deployment(comment: Option<&str>) -> Option<&str> {
    let rest = comment?.trim().strip_prefix("labfleet deployment=")?;
    let id = rest.split_whitespace().next()?;
    (!id.is_empty()).then_some(id)
}

/// The deployment, VM key and epoch of a VM marker line in a description.
pub fn vm_marker(description: &str) -> Option<(String, String, u32)> {
    description.lines().map(str::trim).find_map(|l| {
        let rest = l.strip_prefix("labfleet deployment=")?;
        let (dep, rest) = rest.split_once(" vm=")?;
        let (key, epoch) = match rest.rsplit_once(" epoch=") {
            Some((k, e)) => (k, e.parse().ok()?),
            None => (rest, 0),
        };
        Some((dep.to_owned(), key.to_owned(), epoch))
    })
}

/// Whether deployment `id` is live (active or being torn down) in Redis.
pub async fn live(store: &Store, id: &str) -> Result<bool, QueueError> {
    Ok(store
        .deployment(id)
        .await?
        .is_some_and(|r| r.phase != Phase::TornDown))
}

/// Memoized [`live`] for one scan.
struct Lives<'a> {
    store: &'a Store,
    seen: BTreeMap<String, bool>,
}

impl Lives<'_> {
    async fn owner(&mut self, id: &str) -> Result<Owner, QueueError> {
        let live = match self.seen.get(id) {
            Some(l) => *l,
            None => {
                let l = live(self.store, id).await?;
                self.seen.insert(id.to_owned(), l);
                l
            }
        };
        Ok(if live {
            Owner::Deployment { id: id.to_owned() }
        } else {
            Owner::Nobody
        })
    }
}

/// The volume ids a VM config references (disks and `unusedN`).
fn referenced(cfg: &crate::pve::VmConfig, out: &mut BTreeSet<String>) {
    for (k, v) in &cfg.raw {
        let disk = crate::capacity::is_disk_key(k)
            || k.strip_prefix("unused")
                .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
        if let (true, Some(s)) = (disk, v.as_str())
            && let Some(vol) = s.split(',').next()
            && vol.contains(':')
        {
            out.insert(vol.to_owned());
        }
    }
}

/// Audits `cluster`: reads the cluster (one config per guest, the access lists, each online
/// node's interfaces and each storage's content) and Redis. Changes nothing.
pub async fn scan(pve: &PveClient, store: &Store, cluster: &str) -> Result<Report, AuditError> {
    let mut lives = Lives {
        store,
        seen: BTreeMap::new(),
    };
    let mut found = Vec::new();
    let mut nodes = Vec::new();
    let mut storages = Vec::new();
    let mut vms = Vec::new();
    for r in pve.cluster_resources(None).await? {
        match r {
            ClusterResource::Node(n) if n.status == "online" => nodes.push(n.node),
            ClusterResource::Storage(s) => storages.push(s),
            ClusterResource::Vm(v) => vms.push(v),
            _ => {}
        }
    }
    let mut refs = BTreeSet::new();
    let mut marked_vms: BTreeMap<u32, String> = BTreeMap::new();
    for v in &vms {
        let cfg = match pve.vm_config(&v.node, v.vmid).await {
            Ok(c) => c,
            Err(PveError::NotFound { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        referenced(&cfg, &mut refs);
        if let Some((deployment, key, epoch)) = vm_marker(&cfg.description().unwrap_or_default()) {
            marked_vms.insert(v.vmid, deployment.clone());
            let owner = lives.owner(&deployment).await?;
            let object = Debris::Vm {
                node: v.node.clone(),
                vmid: v.vmid,
                deployment,
                key,
                epoch,
            };
            found.push(Found { object, owner });
        }
    }
    access(pve, store, cluster, &marked_vms, &mut lives, &mut found).await?;
    for n in &nodes {
        for i in pve.network_list(n, None).await?.ifaces {
            if let Some(d) = comment_deployment(i.comments.as_deref()) {
                let owner = lives.owner(d).await?;
                let object = Debris::Bridge {
                    node: n.clone(),
                    iface: i.iface,
                    deployment: d.to_owned(),
                };
                found.push(Found { object, owner });
            }
        }
    }
    let existing: BTreeSet<u32> = vms.iter().map(|v| v.vmid).collect();
    volumes(
        pve, store, cluster, &nodes, &storages, &refs, &existing, &mut lives, &mut found,
    )
    .await?;
    found.sort_by(|a, b| a.object.cmp(&b.object));
    let tombstones = tombstones(store, cluster).await?.len() as u64;
    Ok(Report {
        cluster: cluster.to_owned(),
        found,
        quarantined: store.quarantined(cluster).await?,
        tombstones,
    })
}

/// Marked pools and users, and the ACLs on them (or on marked VMs, or for marked users).
async fn access(
    pve: &PveClient,
    store: &Store,
    cluster: &str,
    marked_vms: &BTreeMap<u32, String>,
    lives: &mut Lives<'_>,
    found: &mut Vec<Found>,
) -> Result<(), AuditError> {
    let mut marked_pools = BTreeMap::new();
    for p in pve.pools().await? {
        if let Some(d) = comment_deployment(p.comment.as_deref()) {
            marked_pools.insert(p.poolid.clone(), d.to_owned());
            let owner = lives.owner(d).await?;
            let object = Debris::Pool {
                pool: p.poolid,
                deployment: d.to_owned(),
            };
            found.push(Found { object, owner });
        }
    }
    let mut marked_users = BTreeMap::new();
    for u in pve.users().await? {
        if let Some(d) = creator(u.comment.as_deref()) {
            marked_users.insert(u.userid.clone(), d.to_owned());
            let mut owner = lives.owner(d).await?;
            for other in store.listing_user(cluster, &u.userid).await? {
                if owner == Owner::Nobody {
                    owner = lives.owner(&other).await?;
                }
            }
            let object = Debris::User {
                user: u.userid,
                deployment: d.to_owned(),
            };
            found.push(Found { object, owner });
        }
    }
    for a in pve.acl().await? {
        let on = a
            .path
            .strip_prefix("/pool/")
            .and_then(|p| marked_pools.get(p))
            .or_else(|| {
                a.path
                    .strip_prefix("/vms/")
                    .and_then(|v| v.parse().ok())
                    .and_then(|v: u32| marked_vms.get(&v))
            })
            .or_else(|| {
                (a.kind == "user")
                    .then(|| marked_users.get(&a.ugid))
                    .flatten()
            });
        if let Some(d) = on.cloned() {
            let owner = lives.owner(&d).await?;
            let object = Debris::Acl {
                path: a.path,
                kind: a.kind,
                ugid: a.ugid,
                role: a.roleid,
                deployment: d,
            };
            found.push(Found { object, owner });
        }
    }
    Ok(())
}

/// VMID -> the deployment that last used it, from `tombs:<cluster>` (oldest first, so the
/// latest wins).
async fn tombstones(store: &Store, cluster: &str) -> Result<BTreeMap<u32, String>, QueueError> {
    let mut c = store.queue().connection();
    let members: Vec<String> =
        redis::AsyncCommands::zrange(&mut c, store.key_tombstones(cluster), 0, -1).await?;
    Ok(members
        .iter()
        .filter_map(|m| {
            let mut it = m.splitn(3, '|');
            Some((it.next()?.parse().ok()?, it.next()?.to_owned()))
        })
        .collect())
}

/// The volumes no VM config references, each storage once (a shared one from one node).
#[allow(clippy::too_many_arguments)] // one scan's state, passed down once
async fn volumes(
    pve: &PveClient,
    store: &Store,
    cluster: &str,
    nodes: &[String],
    storages: &[crate::pve::StorageResource],
    refs: &BTreeSet<String>,
    existing: &BTreeSet<u32>,
    lives: &mut Lives<'_>,
    found: &mut Vec<Found>,
) -> Result<(), AuditError> {
    let q = store.queue();
    let space = Space::vmids(q, cluster);
    let tombs = tombstones(store, cluster).await?;
    let mut seen_shared = BTreeSet::new();
    for s in storages {
        let images = s
            .content
            .as_deref()
            .is_some_and(|c| c.split(',').any(|x| x.trim() == "images"));
        if !images || !nodes.contains(&s.node) || s.status != "available" && !s.status.is_empty() {
            continue;
        }
        if s.shared && !seen_shared.insert(s.storage.clone()) {
            continue;
        }
        for e in pve.storage_content(&s.node, &s.storage, None).await? {
            if refs.contains(&e.volid) {
                continue;
            }
            let vmid = e.vmid.and_then(|v| u32::try_from(v).ok());
            let deployment = match vmid {
                Some(v) => alloc::owner_of(q, &space, v)
                    .await?
                    .and_then(|o| o.split_once('|').map(|(d, _)| d.to_owned()))
                    .or_else(|| tombs.get(&v).cloned()),
                None => None,
            };
            let owner = match (vmid, &deployment) {
                (Some(v), _) if existing.contains(&v) => Owner::ExistingVm { vmid: v },
                (_, Some(d)) => lives.owner(d).await?,
                _ => Owner::NotOurs,
            };
            let object = Debris::Volume {
                node: s.node.clone(),
                storage: s.storage.clone(),
                volid: e.volid,
                vmid,
                deployment,
            };
            found.push(Found { object, owner });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_parse() {
        assert_eq!(
            vm_marker("x\nlabfleet deployment=lab@c vm=s1@pve/pc epoch=3\n"),
            Some(("lab@c".into(), "s1@pve/pc".into(), 3))
        );
        assert_eq!(
            vm_marker("labfleet deployment=lab@c vm=s1@pve/pc"),
            Some(("lab@c".into(), "s1@pve/pc".into(), 0))
        );
        assert_eq!(vm_marker("made by hand"), None);
        assert_eq!(
            comment_deployment(Some("labfleet deployment=lab@c s1@pve hq\n")),
            Some("lab@c")
        );
        assert_eq!(comment_deployment(Some("labfleet deployment=")), None);
        assert_eq!(comment_deployment(Some("bridge for the lab")), None);
    }
}
