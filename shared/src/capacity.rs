//! Capacity: what a placement commits on each node (memory) and each storage (the disks of
//! full clones), against what the node or storage has. Pure: the producer gathers the
//! figures (`/cluster/resources`), placement ranks nodes by the same figures, and `plan`
//! prints them; `submit` refuses a placement this module says does not fit.
//!
//! Memory committed on a node = the configured memory (`maxmem`) of every VM already on it,
//! running or not (templates never run and are left out), plus what other active
//! deployments planned there and have not made yet, plus what this plan adds. Proxmox
//! itself refuses nothing (ballooning, KSM, and students who do not run everything at once
//! make some overcommit normal), so the limit is `memory_overcommit` (per cluster, default
//! 1.5) times the node's memory. Linked clones share their template's disk; a full clone
//! needs its template's disks on its target storage, which must have that much free.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::config::{CloneMode, Config};
use crate::placement::{NodeCapacity, Placement};
use crate::plan::{self, Facts, Plan};
use crate::pve::{StorageResource, VmResource};

/// `memory_overcommit` when `connections.yml` does not set it.
pub const DEFAULT_MEMORY_OVERCOMMIT: f64 = 1.5;

/// A storage as one node sees it (`/cluster/resources`, type `storage`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StorageFree {
    pub storage: String,
    pub node: String,
    pub shared: bool,
    /// Bytes used and total (`disk`, `maxdisk`).
    pub used: u64,
    pub total: u64,
}

/// One node's figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeUse {
    pub node: String,
    pub online: bool,
    /// Students and VMs this plan places here.
    pub students: usize,
    pub vms: usize,
    /// `maxmem` of every VM already on the node.
    pub existing_mem: u64,
    /// Memory of VMs other active deployments planned here and have not made yet.
    pub elsewhere_mem: u64,
    /// Memory of the VMs this plan adds (those not made yet).
    pub adds_mem: u64,
    /// The node's memory and the limit (`memory_overcommit` times it).
    pub total_mem: u64,
    pub limit_mem: u64,
    pub over: bool,
}

impl NodeUse {
    pub fn committed(&self) -> u64 {
        self.existing_mem + self.elsewhere_mem + self.adds_mem
    }
}

/// One storage's figures for the full clones of this plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StorageUse {
    pub storage: String,
    /// The node of a local storage; `None` for a shared one (one pool cluster-wide).
    pub node: Option<String>,
    pub adds: u64,
    pub free: u64,
    pub total: u64,
    pub over: bool,
}

impl StorageUse {
    pub fn place(&self) -> String {
        match &self.node {
            Some(n) => format!("storage {} on {n}", self.storage),
            None => format!("shared storage {}", self.storage),
        }
    }
}

/// The capacity of a placement: every node, and every storage full clones write to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capacity {
    pub cluster: String,
    pub memory_overcommit: f64,
    pub nodes: Vec<NodeUse>,
    pub storages: Vec<StorageUse>,
}

fn gib(b: u64) -> String {
    format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
}

impl Capacity {
    pub fn fits(&self) -> bool {
        !self.nodes.iter().any(|n| n.over) && !self.storages.iter().any(|s| s.over)
    }

    /// One sentence per node or storage over its limit: where, the figures, and the fix.
    pub fn refusals(&self) -> Vec<String> {
        let mut out = Vec::new();
        for n in self.nodes.iter().filter(|n| n.over) {
            out.push(format!(
                "node {} would commit {} of memory ({} by the VMs on it, {} planned by other deployments, {} by this plan for {} students) but may hold {} ({} x memory_overcommit {}); fix: fewer students, another cluster, or a higher memory_overcommit for cluster {} in connections.yml",
                n.node,
                gib(n.committed()),
                gib(n.existing_mem),
                gib(n.elsewhere_mem),
                gib(n.adds_mem),
                n.students,
                gib(n.limit_mem),
                gib(n.total_mem),
                self.memory_overcommit,
                self.cluster,
            ));
        }
        for s in self.storages.iter().filter(|s| s.over) {
            out.push(format!(
                "{} would need {} for full clones but has {} free of {}; fix: fewer students, linked clones, another `storage:` for the machines, or free space there",
                s.place(),
                gib(s.adds),
                gib(s.free),
                gib(s.total),
            ));
        }
        out
    }
}

/// The configured memory of the guests on each node (templates left out: they never run).
pub fn committed_by_node(vms: &[VmResource]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for v in vms.iter().filter(|v| !v.template) {
        *out.entry(v.node.clone()).or_default() += v.maxmem.unwrap_or(0);
    }
    out
}

impl From<&StorageResource> for StorageFree {
    fn from(s: &StorageResource) -> StorageFree {
        StorageFree {
            storage: s.storage.clone(),
            node: s.node.clone(),
            shared: s.shared,
            used: s.disk.unwrap_or(0),
            total: s.maxdisk.unwrap_or(0),
        }
    }
}

/// Template disks' total size from a VM config's disk entries (`size=32G`).
pub fn disk_bytes(raw: &BTreeMap<String, serde_json::Value>) -> u64 {
    raw.iter()
        .filter(|(k, _)| is_disk_key(k))
        .filter_map(|(_, v)| v.as_str())
        .filter(|s| !s.contains("media=cdrom"))
        .filter_map(|s| s.split(',').find_map(|p| p.strip_prefix("size=")))
        .filter_map(parse_size)
        .sum()
}

/// A config key that names a disk (`scsi0`, `virtio1`, `efidisk0`, ...).
pub fn is_disk_key(k: &str) -> bool {
    ["scsi", "virtio", "ide", "sata", "efidisk", "tpmstate"]
        .iter()
        .any(|p| {
            k.strip_prefix(p)
                .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
        })
}

/// Proxmox's disk size: a number with an optional `K`, `M`, `G` or `T` (bytes without).
pub fn parse_size(s: &str) -> Option<u64> {
    let (num, mul) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 1u64 << 10),
        'M' | 'm' => (&s[..s.len() - 1], 1 << 20),
        'G' | 'g' => (&s[..s.len() - 1], 1 << 30),
        'T' | 't' => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let v: f64 = num.parse().ok()?;
    (v >= 0.0).then_some((v * mul as f64) as u64)
}

/// Memory other active deployments planned per node and have not made yet: a VM whose VMID
/// is on the cluster already counts in its node's `committed`, not here (counting it twice
/// made a node with a running class look full).
pub fn planned_elsewhere<'a>(
    plans: impl IntoIterator<Item = &'a Plan>,
    facts: &Facts,
) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for p in plans {
        for v in p
            .vms
            .iter()
            .filter(|v| !facts.vm_nodes.contains_key(&v.vmid))
        {
            *out.entry(v.node.clone()).or_default() += v.source.maxmem;
        }
    }
    out
}

/// The VMs of `prior` (this deployment's earlier plan) that exist on the node it placed them:
/// their memory is in `committed` already, so a resubmit does not add it again.
pub fn made(prior: Option<&Plan>, facts: &Facts) -> BTreeSet<String> {
    prior
        .into_iter()
        .flat_map(|p| p.vms.iter())
        .filter(|v| facts.vm_nodes.get(&v.vmid) == Some(&v.node))
        .map(|v| v.key.clone())
        .collect()
}

/// What one student's VMs still to be made need: memory, and bytes per full-clone target
/// storage on `node`.
fn student_needs(
    cfg: &Config,
    facts: &Facts,
    user: &crate::config::UserId,
    node: &str,
    made: &BTreeSet<String>,
) -> (u64, usize, BTreeMap<String, u64>) {
    let mut mem = 0;
    let mut disks = BTreeMap::new();
    let machines = &cfg.deployment.machines;
    for m in machines {
        if made.contains(&plan::vm_key(user, m)) {
            continue;
        }
        let (sources, _) = plan::sources(m, facts);
        let Some(src) = sources.get(node) else {
            continue;
        };
        mem += src.maxmem;
        if m.clone == CloneMode::Full {
            let target = m.storage.clone().or(src.storage.clone());
            let size = facts
                .templates
                .iter()
                .find(|t| t.node == src.node && t.vmid == src.vmid)
                .map(|t| t.disk)
                .unwrap_or(0);
            if let Some(st) = target {
                *disks.entry(st).or_default() += size;
            }
        }
    }
    (mem, machines.len(), disks)
}

/// The capacity of `placement`. `elsewhere` is [`planned_elsewhere`]; `made`, [`made`].
pub fn of(
    cfg: &Config,
    facts: &Facts,
    placement: &Placement,
    made: &BTreeSet<String>,
    ratio: f64,
) -> Capacity {
    let mut nodes: BTreeMap<&str, NodeUse> = facts
        .nodes
        .iter()
        .map(|n| (n.name.as_str(), node_use(n, ratio)))
        .collect();
    // (storage, node or "" for shared) -> bytes.
    let mut storage_adds: BTreeMap<(String, Option<String>), u64> = BTreeMap::new();
    for u in &cfg.users.users {
        let Some(node) = placement.nodes.get(&u.to_string()) else {
            continue;
        };
        let (mem, vms, disks) = student_needs(cfg, facts, u, node, made);
        if let Some(n) = nodes.get_mut(node.as_str()) {
            n.students += 1;
            n.vms += vms;
            n.adds_mem += mem;
        }
        for (st, bytes) in disks {
            let shared = facts.storages.iter().any(|s| s.storage == st && s.shared);
            let key = (st, (!shared).then(|| node.clone()));
            *storage_adds.entry(key).or_default() += bytes;
        }
    }
    for n in nodes.values_mut() {
        n.over = n.adds_mem > 0 && n.committed() > n.limit_mem;
    }
    let storages = storage_adds
        .into_iter()
        .filter(|(_, adds)| *adds > 0)
        .map(|((storage, node), adds)| {
            let seen = facts
                .storages
                .iter()
                .find(|s| s.storage == storage && node.as_ref().is_none_or(|n| *n == s.node));
            let (used, total) = seen.map(|s| (s.used, s.total)).unwrap_or((0, 0));
            let free = total.saturating_sub(used);
            StorageUse {
                storage,
                node,
                adds,
                free,
                total,
                over: adds > free,
            }
        })
        .collect();
    Capacity {
        cluster: cfg.cluster.clone(),
        memory_overcommit: ratio,
        nodes: nodes.into_values().collect(),
        storages,
    }
}

fn node_use(n: &NodeCapacity, ratio: f64) -> NodeUse {
    NodeUse {
        node: n.name.clone(),
        online: n.online,
        students: 0,
        vms: 0,
        existing_mem: n.committed,
        elsewhere_mem: n.planned_elsewhere,
        adds_mem: 0,
        total_mem: n.maxmem,
        limit_mem: (n.maxmem as f64 * ratio) as u64,
        over: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_as_proxmox_writes_them() {
        assert_eq!(parse_size("32G"), Some(32 << 30));
        assert_eq!(parse_size("4M"), Some(4 << 20));
        assert_eq!(parse_size("1T"), Some(1 << 40));
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("x"), None);
        let raw: BTreeMap<String, serde_json::Value> = serde_json::from_str(
            r#"{"scsi0":"local-lvm:base-100-disk-0,size=10G","efidisk0":"local-lvm:base-100-disk-1,size=4M",
               "ide2":"local:iso/x.iso,media=cdrom,size=1G","scsihw":"virtio-scsi-pci","memory":"2048"}"#,
        )
        .unwrap();
        assert_eq!(disk_bytes(&raw), (10 << 30) + (4 << 20));
    }

    #[test]
    fn a_node_over_its_ratio_is_refused_with_its_figures() {
        let c = Capacity {
            cluster: "lab".into(),
            memory_overcommit: 1.5,
            nodes: vec![NodeUse {
                node: "pve1".into(),
                online: true,
                students: 4,
                vms: 8,
                existing_mem: 4 << 30,
                elsewhere_mem: 0,
                adds_mem: 10 << 30,
                total_mem: 8 << 30,
                limit_mem: 12 << 30,
                over: true,
            }],
            storages: vec![],
        };
        assert!(!c.fits());
        let r = c.refusals();
        assert_eq!(r.len(), 1);
        assert!(r[0].contains("node pve1 would commit 14.0 GiB"), "{}", r[0]);
        assert!(r[0].contains("may hold 12.0 GiB (8.0 GiB x memory_overcommit 1.5)"));
        assert!(r[0].contains("fewer students"));
    }
}
