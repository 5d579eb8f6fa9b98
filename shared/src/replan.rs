//! Planning against the live cluster: the I/O half of `plan`, shared by the producer's
//! `submit`/`plan` and the worker's re-placement of students when a node is lost
//! (`jobs::replace`). It reads the facts (a handful of requests whatever the size), places
//! the students by the figures of `capacity` (so the plan shown is the plan submitted, and a
//! submit that does not fit is refused before anything is reserved), then makes the one
//! allocation step in Redis between the pure `plan::draft` and the pure `plan::build`.

use std::collections::{BTreeMap, BTreeSet};

use crate::alloc::{self, AllocError, Space};
use crate::capacity::{self, Capacity};
use crate::config::Config;
use crate::jobs::state::{Phase, Store};
use crate::placement::{self, NodeCapacity, Placement, PlacementError};
use crate::plan::{self, Draft, Facts, Plan, Template, VmidRequest};
use crate::pve::{ClusterResource, PveClient, PveError};

/// Why a plan could not be made (the producer maps each to its exit code).
#[derive(Debug, thiserror::Error)]
pub enum ReplanError {
    #[error("placing students: {0}")]
    Placement(#[from] PlacementError),
    /// The class does not fit (a node over `memory_overcommit`, or a full storage).
    #[error(
        "the class does not fit on cluster {cluster}:\n  {}",
        refusals.join("\n  ")
    )]
    CapacityRefused {
        cluster: String,
        refusals: Vec<String>,
    },
    /// Reserving VMIDs or bridge names failed.
    #[error("reserving VMIDs and bridges: {0}")]
    Alloc(#[from] AllocError),
    #[error(
        "VMID {vmid} (vmid_base/vmid_stride) is already reserved by another deployment; choose another vmid_base"
    )]
    VmidTaken { vmid: u32 },
}

fn disk_storages(cfg: &crate::pve::VmConfig) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in &cfg.raw {
        if !capacity::is_disk_key(k) {
            continue;
        }
        if let Some(s) = v.as_str() {
            if s.contains("media=cdrom") {
                continue;
            }
            if let Some((st, _)) = s.split_once(':')
                && !out.iter().any(|o| o == st)
            {
                out.push(st.to_owned());
            }
        }
    }
    out
}

/// Reads what planning needs from the cluster: nodes, templates (with their storages),
/// used VMIDs, users, and each node's interfaces. A handful of requests, whatever the size.
pub async fn gather_facts(pve: &PveClient, cfg: &Config) -> Result<Facts, PveError> {
    let resources = pve.cluster_resources(None).await?;
    let mut nodes = Vec::new();
    let mut shared_storage: BTreeMap<String, bool> = BTreeMap::new();
    let mut vms = Vec::new();
    let mut storages = Vec::new();
    for r in resources {
        match r {
            ClusterResource::Node(n) => nodes.push(NodeCapacity {
                online: n.status == "online",
                maxmem: n.maxmem.unwrap_or(0),
                mem: n.mem.unwrap_or(0),
                committed: 0,
                cpu: n.cpu.unwrap_or(0.0),
                maxcpu: n.maxcpu.unwrap_or(0) as u32,
                planned_elsewhere: 0,
                name: n.node,
            }),
            ClusterResource::Storage(s) => {
                shared_storage.insert(s.storage.clone(), s.shared);
                storages.push(capacity::StorageFree::from(&s));
            }
            ClusterResource::Vm(v) => vms.push(v),
            _ => {}
        }
    }
    let mut templates = Vec::new();
    // Template configs: only templates whose name matches one the deployment uses, plus
    // the named template VMIDs themselves (a few requests).
    let wanted_ids: BTreeSet<(String, u32)> = cfg
        .deployment
        .machines
        .iter()
        .flat_map(|m| {
            std::iter::once((m.template_node.to_string(), m.template_vmid.get()))
                .chain(m.replicas.iter().map(|(n, v)| (n.to_string(), v.get())))
        })
        .collect();
    let wanted_names: BTreeSet<String> = vms
        .iter()
        .filter(|v| wanted_ids.contains(&(v.node.clone(), v.vmid)))
        .filter_map(|v| v.name.clone())
        .collect();
    // A template on an offline node cannot be read (nor cloned from): it is left out, and
    // the node, offline, is refused by the placement anyway.
    let online: BTreeSet<&str> = nodes
        .iter()
        .filter(|n| n.online)
        .map(|n| n.name.as_str())
        .collect();
    for v in vms
        .iter()
        .filter(|v| v.template && online.contains(v.node.as_str()))
    {
        let relevant = wanted_ids.contains(&(v.node.clone(), v.vmid))
            || v.name.as_ref().is_some_and(|n| wanted_names.contains(n));
        if !relevant {
            continue;
        }
        let c = pve.vm_config(&v.node, v.vmid).await?;
        let storages = disk_storages(&c);
        let shared = !storages.is_empty()
            && storages
                .iter()
                .all(|s| shared_storage.get(s).copied().unwrap_or(false));
        templates.push(Template {
            vmid: v.vmid,
            node: v.node.clone(),
            name: c.name().or(v.name.clone()),
            storages,
            shared,
            maxmem: c.memory_mib().map(|m| m << 20).or(v.maxmem).unwrap_or(0),
            disk: capacity::disk_bytes(&c.raw),
        });
    }
    let users = pve.users().await?.into_iter().map(|u| u.userid).collect();
    let mut ifaces = BTreeMap::new();
    for n in nodes.iter().filter(|n| n.online) {
        let list = pve.network_list(&n.name, None).await?;
        ifaces.insert(
            n.name.clone(),
            list.ifaces.into_iter().map(|i| i.iface).collect(),
        );
    }
    let committed = capacity::committed_by_node(&vms);
    for n in &mut nodes {
        n.committed = committed.get(&n.name).copied().unwrap_or(0);
    }
    Ok(Facts {
        nodes,
        templates,
        vmids_in_use: vms.iter().map(|v| v.vmid).collect(),
        users,
        ifaces,
        vm_nodes: vms.iter().map(|v| (v.vmid, v.node.clone())).collect(),
        storages,
    })
}

/// What other active deployments have planned per node and not made yet (memory).
pub async fn planned_elsewhere(store: &Store, id: &str, facts: &Facts) -> BTreeMap<String, u64> {
    let mut plans = Vec::new();
    if let Ok(deps) = store.deployments().await {
        for d in deps
            .iter()
            .filter(|d| d.id != id && d.phase == Phase::Active)
        {
            if let Ok(Some(p)) = store.plan_json(&d.id, d.epoch).await
                && let Ok(p) = serde_json::from_str::<Plan>(&p)
            {
                plans.push(p);
            }
        }
    }
    capacity::planned_elsewhere(&plans, facts)
}

/// Places the students (`pinned` to the nodes an earlier plan gave them) and measures the
/// placement. With `enforce` (submit), a placement over a node's `memory_overcommit` or a
/// storage's free space is refused with every node and storage over its limit.
pub fn place(
    cfg: &Config,
    facts: &Facts,
    pinned: &BTreeMap<String, String>,
    prior: Option<&Plan>,
    enforce: bool,
) -> Result<(Placement, Capacity), ReplanError> {
    let made = capacity::made(prior, facts);
    let mut demands = plan::demands(cfg, facts, pinned);
    // A resubmit adds only the VMs not made yet: the others are in their node's figures.
    for v in prior.into_iter().flat_map(|p| &p.vms) {
        if made.contains(&v.key)
            && let Some(d) = demands.iter_mut().find(|d| d.user == v.user)
        {
            d.mem = d.mem.saturating_sub(v.source.maxmem);
        }
    }
    let placement = placement::place(&demands, &facts.nodes)?;
    let ratio = cfg.connection().operating.memory_overcommit;
    let cap = capacity::of(cfg, facts, &placement, &made, ratio);
    if enforce && !cap.fits() {
        return Err(ReplanError::CapacityRefused {
            cluster: cfg.cluster.clone(),
            refusals: cap.refusals(),
        });
    }
    Ok((placement, cap))
}

/// Whether an allocation reserves (submit) or only previews the next free numbers (plan).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocMode {
    Reserve,
    Preview,
}

/// What an allocation hands out: vm owner -> VMID, bridge owner -> interface.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Allocation {
    pub vmids: BTreeMap<String, u32>,
    pub bridges: BTreeMap<String, String>,
}

/// Plans `cfg` with students pinned to `pins` (user -> node; a pinned node that is offline
/// or cannot hold them places them anew), measured by capacity (refused over the limits
/// when `mode` reserves), allocated in one step, then built.
pub async fn plan_with(
    cfg: &Config,
    facts: &mut Facts,
    store: &Store,
    mode: AllocMode,
    prior: Option<&Plan>,
    pins: &BTreeMap<String, String>,
) -> Result<Plan, ReplanError> {
    let id = plan::deployment_id(cfg);
    let elsewhere = planned_elsewhere(store, &id, facts).await;
    for n in &mut facts.nodes {
        n.planned_elsewhere = elsewhere.get(&n.name).copied().unwrap_or(0);
    }
    let enforce = mode == AllocMode::Reserve;
    let (placement, capacity) = place(cfg, facts, pins, prior, enforce)?;
    let draft = plan::draft(cfg, facts, placement);
    let got = allocate(store, &cfg.cluster, facts, &draft, mode).await?;
    let mut plan = plan::build(cfg, facts, draft.placement, &got.vmids, &got.bridges);
    plan.capacity = Some(capacity);
    Ok(plan)
}

/// The one allocation step: every VMID and bridge name the draft needs.
pub async fn allocate(
    store: &Store,
    cluster: &str,
    facts: &Facts,
    draft: &Draft,
    mode: AllocMode,
) -> Result<Allocation, ReplanError> {
    let q = store.queue();
    let mut out = Allocation::default();
    let space = Space::vmids(q, cluster);
    match (&draft.vmids, mode) {
        (VmidRequest::Range { min, max, owners }, AllocMode::Reserve) => {
            out.vmids = alloc::reserve(q, &space, owners, *min, *max, &facts.vmids_in_use).await?;
        }
        (VmidRequest::Range { min, owners, .. }, AllocMode::Preview) => {
            out.vmids = alloc::preview(q, &space, owners, *min, &facts.vmids_in_use).await?;
        }
        (VmidRequest::Fixed(wanted), AllocMode::Reserve) => {
            for (owner, want) in wanted {
                match alloc::reserve_exact(q, &space, owner, *want).await? {
                    Some(v) => {
                        out.vmids.insert(owner.clone(), v);
                    }
                    None => return Err(ReplanError::VmidTaken { vmid: *want }),
                }
            }
        }
        (VmidRequest::Fixed(wanted), AllocMode::Preview) => {
            out.vmids = wanted.iter().cloned().collect();
        }
    }
    let (lo, hi) = draft.bridge_range;
    for b in &draft.bridges {
        let space = Space::bridges(q, cluster, &b.node);
        let got = match mode {
            AllocMode::Reserve => alloc::reserve(q, &space, &b.owners, lo, hi, &b.taken).await?,
            AllocMode::Preview => alloc::preview(q, &space, &b.owners, lo, &b.taken).await?,
        };
        for (o, n) in got {
            out.bridges.insert(o, format!("vmbr{n}"));
        }
    }
    Ok(out)
}

/// Sets the cap of every clone slot the plan's VMs use (from the cluster's
/// `max_parallel_clones`), before their jobs are enqueued.
pub async fn set_caps(
    q: &crate::queue::Queue,
    plan: &Plan,
    caps: &crate::config::Caps,
) -> Result<(), crate::queue::QueueError> {
    let mut cap_set = BTreeMap::new();
    for v in &plan.vms {
        for (slot, cap) in
            plan::clone_slots(&plan.cluster, &v.source, v.full, v.storage.as_deref(), caps)
        {
            cap_set.insert(slot, cap);
        }
    }
    for (slot, cap) in cap_set {
        q.set_cap(&slot, Some(cap)).await?;
    }
    Ok(())
}
