//! Planning a deployment: from the validated configuration and the cluster's facts to the
//! list of students, VMs, bridges and jobs. Pure (no I/O): the producer gathers the facts,
//! places the students, makes a [`draft`] (the reservations the placement needs), allocates them in Redis in one
//! step, then calls [`build`] and [`jobs`].
//!
//! One file (a little over 600 lines with its tests): the plan's types, the naming of VMs,
//! bridges and reservations and the job list are one contract that `status`, the workers and
//! the stored plans of earlier versions all read; the reservations' draft is in `draft`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::config::{BridgeTarget, Caps, CloneMode, Config, Machine, NetSpec, UserId, VmidPolicy};
use crate::jobs::{
    self, BridgePlan, CloneJob, Job, NetworkJob, NicPlan, NodeNetworkJob, PermissionJob, StartJob,
    StudentJob, VmRef,
};
use crate::placement::{NodeCapacity, Placement, StudentDemand};
use crate::queue::JobSpec;

mod draft;
pub use draft::{BridgeRequest, Draft, VmidRequest, draft};

/// A template (or replica) as the cluster reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Template {
    pub vmid: u32,
    pub node: String,
    pub name: Option<String>,
    /// Storages of its disks.
    pub storages: Vec<String>,
    /// Every disk on shared storage: clonable onto any node with `target`.
    pub shared: bool,
    pub maxmem: u64,
    /// Total size of its disks (what a full clone of it writes).
    #[serde(default)]
    pub disk: u64,
}

/// What the producer reads from the cluster before planning.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Facts {
    #[serde(skip)]
    pub nodes: Vec<NodeCapacity>,
    pub templates: Vec<Template>,
    pub vmids_in_use: BTreeSet<u32>,
    pub users: BTreeSet<String>,
    /// node -> interface names.
    pub ifaces: BTreeMap<String, BTreeSet<String>>,
    /// VMID -> node of every guest on the cluster (templates included).
    #[serde(skip)]
    pub vm_nodes: BTreeMap<u32, String>,
    /// Every storage as each node sees it (used and total bytes), for full clones.
    #[serde(skip)]
    pub storages: Vec<crate::capacity::StorageFree>,
}

/// Where one machine's clone comes from on one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Source {
    pub node: String,
    pub vmid: u32,
    pub storage: Option<String>,
    pub shared: bool,
    pub maxmem: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StudentPlan {
    pub user: String,
    pub index: usize,
    pub node: String,
    pub pool: String,
    pub create_user: bool,
    /// alias -> (bridge, VLAN-aware).
    pub bridges: BTreeMap<String, (String, bool)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmPlan {
    pub key: String,
    pub user: String,
    pub machine: String,
    pub name: String,
    pub node: String,
    pub source: Source,
    pub full: bool,
    pub storage: Option<String>,
    pub vmid: u32,
    pub nics: Vec<NicPlan>,
    pub slots: Vec<String>,
    /// How many times the VM was re-placed after its node was lost (`jobs::replace`): its
    /// jobs' keys carry it, so the moved VM gets new jobs while the old ones stay cancelled.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub moved: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl VmPlan {
    /// The key of this VM's job for `step` in `scope`.
    pub fn job_key(&self, scope: &str, step: &str) -> String {
        jobs::keys::vm_step(scope, &vm_job_subject(&self.key, self.moved), step)
    }
}

/// The VM part of a VM's job keys: its key, with `~<n>` after its `n`th move.
pub fn vm_job_subject(key: &str, moved: u32) -> String {
    if moved == 0 {
        key.to_owned()
    } else {
        format!("{key}~{moved}")
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub id: String,
    pub cluster: String,
    pub name: String,
    pub role: String,
    pub start: bool,
    /// Take the baseline snapshot (`labfleet-baseline`) before the first start.
    #[serde(default)]
    pub baseline: bool,
    pub students: Vec<StudentPlan>,
    pub vms: Vec<VmPlan>,
    pub node_networks: Vec<NodeNetworkJob>,
    pub placement: Placement,
    pub warnings: Vec<String>,
    pub vmid_min: u32,
    pub vmid_max: u32,
    /// VMs of earlier submits that are no longer in the files: reported, kept, and removed
    /// by teardown.
    #[serde(default)]
    pub retired: Vec<VmPlan>,
    #[serde(default)]
    pub retired_students: Vec<StudentPlan>,
    /// What the placement commits per node and storage (`capacity::of`), when measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<crate::capacity::Capacity>,
}

impl Plan {
    /// Keeps the move count of every VM that an earlier plan moved and this one keeps on
    /// the node it was moved to (a resubmit after a re-placement keeps the moved jobs' keys).
    pub fn carry_moves(&mut self, prior: &Plan) {
        let moved: HashMap<&str, (&str, u32)> = prior
            .vms
            .iter()
            .filter(|v| v.moved > 0)
            .map(|v| (v.key.as_str(), (v.node.as_str(), v.moved)))
            .collect();
        for v in &mut self.vms {
            if let Some((node, n)) = moved.get(v.key.as_str())
                && *node == v.node
            {
                v.moved = *n;
            }
        }
    }

    /// Carries over what an earlier plan had and this one no longer has.
    pub fn retire_from(&mut self, prior: &Plan) {
        let keys: BTreeSet<&str> = self.vms.iter().map(|v| v.key.as_str()).collect();
        let users: BTreeSet<&str> = self.students.iter().map(|s| s.user.as_str()).collect();
        let mut retired: Vec<VmPlan> = prior
            .vms
            .iter()
            .chain(&prior.retired)
            .filter(|v| !keys.contains(v.key.as_str()))
            .cloned()
            .collect();
        retired.sort_by(|a, b| a.key.cmp(&b.key));
        retired.dedup_by(|a, b| a.key == b.key);
        let mut students: Vec<StudentPlan> = prior
            .students
            .iter()
            .chain(&prior.retired_students)
            .filter(|s| !users.contains(s.user.as_str()))
            .cloned()
            .collect();
        students.sort_by(|a, b| a.user.cmp(&b.user));
        students.dedup_by(|a, b| a.user == b.user);
        self.retired = retired;
        self.retired_students = students;
    }
}

/// The deployment id: `<name>@<cluster>`.
pub fn deployment_id(cfg: &Config) -> String {
    format!("{}@{}", cfg.deployment.name, cfg.cluster)
}

pub fn vm_key(user: &UserId, machine: &Machine) -> String {
    format!("{user}/{}", machine.name)
}

/// Slot keys (and their caps) of a clone.
pub fn clone_slots(
    cluster: &str,
    source: &Source,
    full: bool,
    storage: Option<&str>,
    caps: &Caps,
) -> Vec<(String, u32)> {
    let mut v = vec![(
        format!("clone-node:{cluster}/{}", source.node),
        caps.per_node,
    )];
    let st = storage.map(str::to_owned).or(source.storage.clone());
    if let Some(st) = st {
        // A shared storage is one resource cluster-wide; a local one is per node.
        let scope = if source.shared && storage.is_none() {
            st
        } else {
            format!("{}/{st}", source.node)
        };
        if full {
            v.push((
                format!("clone-full:{cluster}/{scope}"),
                caps.full_per_storage,
            ));
        } else {
            v.push((
                format!("clone-linked:{cluster}/{scope}"),
                caps.linked_per_storage,
            ));
        }
    }
    v
}

/// The sources of `m` on every node that can hold it, with why the others cannot.
pub fn sources(m: &Machine, facts: &Facts) -> (BTreeMap<String, Source>, BTreeMap<String, String>) {
    let by_id: BTreeMap<(String, u32), &Template> = facts
        .templates
        .iter()
        .map(|t| ((t.node.clone(), t.vmid), t))
        .collect();
    let main = by_id
        .get(&(m.template_node.to_string(), m.template_vmid.get()))
        .copied();
    let src = |t: &Template| Source {
        node: t.node.clone(),
        vmid: t.vmid,
        storage: t.storages.first().cloned(),
        shared: t.shared,
        maxmem: t.maxmem,
    };
    let mut ok = BTreeMap::new();
    let mut refused = BTreeMap::new();
    let Some(main) = main else {
        for n in &facts.nodes {
            refused.insert(
                n.name.clone(),
                format!(
                    "template {} not found on {}",
                    m.template_vmid, m.template_node
                ),
            );
        }
        return (ok, refused);
    };
    for n in &facts.nodes {
        let replica = if n.name == main.node {
            Some(main)
        } else if !m.replicas.is_empty() {
            m.replicas
                .iter()
                .find(|(node, _)| node.as_str() == n.name)
                .and_then(|(node, id)| by_id.get(&(node.to_string(), id.get())).copied())
        } else {
            facts
                .templates
                .iter()
                .find(|t| t.node == n.name && t.name.is_some() && t.name == main.name)
        };
        match replica {
            Some(t) => {
                ok.insert(n.name.clone(), src(t));
            }
            None if main.shared => {
                ok.insert(n.name.clone(), src(main));
            }
            None => {
                refused.insert(
                    n.name.clone(),
                    format!(
                        "no replica of template {} ({}) and it is not on shared storage",
                        main.vmid,
                        main.name.as_deref().unwrap_or("unnamed")
                    ),
                );
            }
        }
    }
    (ok, refused)
}

/// What each student needs, for placement. `pinned`: nodes from an earlier submit.
pub fn demands(
    cfg: &Config,
    facts: &Facts,
    pinned: &BTreeMap<String, String>,
) -> Vec<StudentDemand> {
    let per_machine: Vec<_> = cfg
        .deployment
        .machines
        .iter()
        .map(|m| sources(m, facts))
        .collect();
    let mut eligible: BTreeSet<String> = facts.nodes.iter().map(|n| n.name.clone()).collect();
    let mut refused = BTreeMap::new();
    let mut mem = 0u64;
    for (ok, no) in &per_machine {
        eligible.retain(|n| ok.contains_key(n));
        for (n, why) in no {
            refused.entry(n.clone()).or_insert_with(|| why.clone());
        }
        mem += ok.values().map(|s| s.maxmem).max().unwrap_or(0);
    }
    cfg.users
        .users
        .iter()
        .map(|u| StudentDemand {
            user: u.to_string(),
            mem,
            eligible: eligible.clone(),
            refused: refused.clone(),
            pinned: pinned.get(&u.to_string()).cloned(),
        })
        .collect()
}

/// Owners of VMID reservations and bridge reservations, in plan order.
pub fn vm_owner(id: &str, key: &str) -> String {
    format!("{id}|{key}")
}
pub fn bridge_owner(id: &str, user: &UserId, alias: &str) -> String {
    bridge_owner_of(id, &user.to_string(), alias)
}
/// [`bridge_owner`] for a user as the plan stores it.
pub fn bridge_owner_of(id: &str, user: &str, alias: &str) -> String {
    format!("{id}|{user}|{alias}")
}

/// The private aliases of the deployment, with whether any use of each carries a tag.
pub fn private_aliases(cfg: &Config) -> BTreeMap<String, bool> {
    let mut out: BTreeMap<String, bool> = BTreeMap::new();
    for m in &cfg.deployment.machines {
        for n in &m.networks {
            if let NetSpec::Private { alias, tag } = n {
                *out.entry(alias.clone()).or_default() |= tag.is_some();
            }
        }
    }
    out
}

/// Deterministic VMIDs (`vmid_base + index * stride + machine index`).
pub fn fixed_vmid(policy: &VmidPolicy, user_index: usize, machine_index: usize) -> Option<u32> {
    match policy {
        VmidPolicy::Fixed { base, stride } => {
            Some(base + user_index as u32 * stride + machine_index as u32)
        }
        VmidPolicy::Range { .. } => None,
    }
}

/// Builds the plan. `vmids`: vm owner -> VMID; `bridges`: bridge owner -> interface.
pub fn build(
    cfg: &Config,
    facts: &Facts,
    placement: Placement,
    vmids: &BTreeMap<String, u32>,
    bridges: &BTreeMap<String, String>,
) -> Plan {
    let id = deployment_id(cfg);
    let d = &cfg.deployment;
    let caps = cfg.connection().caps;
    let aliases = private_aliases(cfg);
    let per_machine: Vec<_> = d.machines.iter().map(|m| sources(m, facts).0).collect();
    let mut students = Vec::new();
    let mut vms = Vec::new();
    let mut node_bridges: BTreeMap<String, Vec<BridgePlan>> = BTreeMap::new();
    for (index, u) in cfg.users.users.iter().enumerate() {
        let user = u.to_string();
        let node = placement.nodes[&user].clone();
        let mut sb = BTreeMap::new();
        for (alias, vlan_aware) in &aliases {
            if let Some(iface) = bridges.get(&bridge_owner(&id, u, alias)) {
                sb.insert(alias.clone(), (iface.clone(), *vlan_aware));
                node_bridges
                    .entry(node.clone())
                    .or_default()
                    .push(BridgePlan {
                        iface: iface.clone(),
                        vlan_aware: *vlan_aware,
                        owner: format!("{user} {alias}"),
                    });
            }
        }
        students.push(StudentPlan {
            user: user.clone(),
            index,
            node: node.clone(),
            pool: d.pool_name(u),
            create_user: !facts.users.contains(&user) && u.realm() == "pve",
            bridges: sb.clone(),
        });
        for (mi, m) in d.machines.iter().enumerate() {
            let key = vm_key(u, m);
            let source = per_machine[mi][&node].clone();
            let full = m.clone == CloneMode::Full;
            let storage = if full { m.storage.clone() } else { None };
            let nics = m
                .networks
                .iter()
                .map(|n| nic(n, m, &node, &sb, d.vlan_base.map(|b| b + index as u16)))
                .collect();
            let slots = clone_slots(&cfg.cluster, &source, full, storage.as_deref(), &caps)
                .into_iter()
                .map(|(k, _)| k)
                .collect();
            vms.push(VmPlan {
                vmid: vmids.get(&vm_owner(&id, &key)).copied().unwrap_or(0),
                key,
                user: user.clone(),
                machine: m.name.to_string(),
                name: d.vm_name(m, u),
                node: node.clone(),
                source,
                full,
                storage,
                nics,
                slots,
                moved: 0,
            });
        }
    }
    let node_networks = node_bridges
        .into_iter()
        .map(|(node, mut bridges)| {
            bridges.sort();
            NodeNetworkJob {
                deployment: id.clone(),
                cluster: cfg.cluster.clone(),
                node,
                bridges,
            }
        })
        .collect();
    let (vmid_min, vmid_max) = match d.vmids {
        VmidPolicy::Range { min, max } => (min, max),
        VmidPolicy::Fixed { .. } => (crate::config::VMID_MIN, crate::config::VMID_MAX),
    };
    let warnings = placement.warnings.clone();
    Plan {
        id,
        cluster: cfg.cluster.clone(),
        name: d.name.clone(),
        role: d.role.clone(),
        start: d.start,
        baseline: d.baseline,
        students,
        vms,
        node_networks,
        placement,
        warnings,
        vmid_min,
        vmid_max,
        retired: Vec::new(),
        retired_students: Vec::new(),
        capacity: None,
    }
}

fn nic(
    n: &NetSpec,
    m: &Machine,
    node: &str,
    private: &BTreeMap<String, (String, bool)>,
    user_vlan: Option<u16>,
) -> NicPlan {
    let (bridge, tag) = match n {
        NetSpec::Existing { bridge, tag } => (bridge.clone(), *tag),
        NetSpec::Private { alias, tag } => (
            private.get(alias).map(|b| b.0.clone()).unwrap_or_default(),
            *tag,
        ),
        NetSpec::Mapped { target, tag, .. } => {
            let b = match target {
                BridgeTarget::Everywhere(b) => b.clone(),
                BridgeTarget::PerNode(map) => map
                    .iter()
                    .find(|(k, _)| k.as_str() == node)
                    .map(|(_, b)| b.clone())
                    .unwrap_or_default(),
            };
            (b, tag.or(user_vlan))
        }
    };
    NicPlan {
        model: m.device_type.nic_model().to_owned(),
        bridge,
        tag,
        firewall: m.device_type.nic_firewall(),
    }
}

/// The jobs of a plan. `scope` prefixes keys and groups them (`<id>#<epoch>`); `sealed`
/// holds the sealed initial password of each `@pve` user (made if missing when its job runs).
pub fn jobs(plan: &Plan, scope: &str, sealed: &BTreeMap<String, String>) -> Vec<JobSpec> {
    let mut out = Vec::new();
    let spec = |key: String, job: Job| {
        JobSpec::new(key, job.kind(), job.to_value()).group(scope.to_owned())
    };
    for s in &plan.students {
        let job = Job::Student(StudentJob {
            deployment: plan.id.clone(),
            cluster: plan.cluster.clone(),
            user: s.user.clone(),
            pool: s.pool.clone(),
            role: plan.role.clone(),
            // Every `@pve` student's, not only those missing at submit: a user another
            // deployment (or an earlier epoch) made may be gone by the time this job runs,
            // and is then made again with this deployment's password.
            sealed_password: sealed.get(&s.user).cloned(),
        });
        out.push(
            spec(jobs::keys::student(scope, &s.user), job)
                .slots(vec![jobs::student::slot(&plan.cluster)]),
        );
    }
    let mut nn_keys = BTreeMap::new();
    for nn in &plan.node_networks {
        let k = jobs::keys::node_network(scope, &nn.node, &nn.bridges);
        nn_keys.insert(nn.node.clone(), k.clone());
        out.push(spec(k, Job::NodeNetwork(nn.clone())));
    }
    let private_users: BTreeSet<&str> = plan
        .students
        .iter()
        .filter(|s| !s.bridges.is_empty())
        .map(|s| s.user.as_str())
        .collect();
    let pools: HashMap<&str, &str> = plan
        .students
        .iter()
        .map(|s| (s.user.as_str(), s.pool.as_str()))
        .collect();
    for v in &plan.vms {
        let vm = VmRef {
            deployment: plan.id.clone(),
            cluster: plan.cluster.clone(),
            key: v.key.clone(),
            node: v.node.clone(),
        };
        let clone_key = v.job_key(scope, "clone");
        out.push(
            spec(
                clone_key.clone(),
                Job::Clone(CloneJob {
                    vm: vm.clone(),
                    name: v.name.clone(),
                    source_node: v.source.node.clone(),
                    source_vmid: v.source.vmid,
                    full: v.full,
                    storage: v.storage.clone(),
                    vmid: v.vmid,
                    vmid_min: plan.vmid_min,
                    vmid_max: plan.vmid_max,
                }),
            )
            .after([jobs::keys::student(scope, &v.user)])
            .slots(v.slots.clone()),
        );
        let mut net_gate = vec![clone_key.clone()];
        if private_users.contains(v.user.as_str())
            && let Some(k) = nn_keys.get(&v.node)
        {
            net_gate.push(k.clone());
        }
        let net_key = v.job_key(scope, "network");
        out.push(
            spec(
                net_key.clone(),
                Job::Network(NetworkJob {
                    vm: vm.clone(),
                    nics: v.nics.clone(),
                }),
            )
            .after(net_gate),
        );
        let perm_key = v.job_key(scope, "permission");
        out.push(
            spec(
                perm_key.clone(),
                Job::Permission(PermissionJob {
                    vm: vm.clone(),
                    user: v.user.clone(),
                    role: plan.role.clone(),
                    pool: pools.get(v.user.as_str()).map(|p| (*p).to_owned()),
                }),
            )
            .after([clone_key.clone()]),
        );
        let mut start_gate = vec![net_key, perm_key];
        if plan.baseline {
            let key = v.job_key(scope, "baseline");
            out.push(
                spec(
                    key.clone(),
                    Job::Baseline(jobs::baseline::BaselineJob { vm: vm.clone() }),
                )
                .after(start_gate),
            );
            start_gate = vec![key];
        }
        if plan.start {
            out.push(
                spec(v.job_key(scope, "start"), Job::Start(StartJob { vm }))
                    .after(start_gate)
                    .slots(jobs::power::slot_keys(
                        scope,
                        &v.key,
                        &plan.cluster,
                        &v.node,
                        true,
                    )),
            );
        }
    }
    out
}

/// The steps every VM of `plan` goes through (for status).
pub fn vm_steps(plan: &Plan) -> Vec<&'static str> {
    let mut v = vec!["clone", "network", "permission"];
    if plan.baseline {
        v.push("baseline");
    }
    if plan.start {
        v.push("start");
    }
    v
}

/// The plan of the original design's example (2 students, a private `hq` network each),
/// for unit tests of what is built from a plan.
#[cfg(test)]
pub(crate) fn example_plan() -> Plan {
    tests::example()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DataPaths, load};
    use crate::placement::place;

    pub(super) fn example() -> Plan {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/original-design");
        let cfg = load(&DataPaths::in_dir(dir), None).unwrap();
        let f = facts();
        let placement = place(&demands(&cfg, &f, &BTreeMap::new()), &f.nodes).unwrap();
        let id = deployment_id(&cfg);
        let mut vmids = BTreeMap::new();
        let mut bridges = BTreeMap::new();
        for (i, u) in cfg.users.users.iter().enumerate() {
            vmids.insert(
                vm_owner(&id, &vm_key(u, &cfg.deployment.machines[0])),
                1000 + i as u32,
            );
            bridges.insert(bridge_owner(&id, u, "hq"), format!("vmbr{}", 1000 + i));
        }
        build(&cfg, &f, placement, &vmids, &bridges)
    }

    fn facts() -> Facts {
        let node = |n: &str| NodeCapacity {
            name: n.into(),
            online: true,
            maxmem: 64 << 30,
            mem: 0,
            committed: 0,
            cpu: 0.0,
            maxcpu: 16,
            planned_elsewhere: 0,
        };
        let t = |vmid, node: &str| Template {
            vmid,
            node: node.into(),
            name: Some("linux-template".into()),
            storages: vec!["local-lvm".into()],
            shared: false,
            maxmem: 2 << 30,
            disk: 10 << 30,
        };
        Facts {
            nodes: vec![node("pve1"), node("pve2")],
            templates: vec![t(100, "pve1"), t(101, "pve2")],
            ..Facts::default()
        }
    }

    #[test]
    fn a_draft_lists_every_reservation_and_skips_bridges_the_node_has() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/original-design");
        let cfg = load(&DataPaths::in_dir(dir), None).unwrap();
        let mut f = facts();
        f.ifaces.insert(
            "pve1".into(),
            ["vmbr0", "vmbr1000"].map(String::from).into(),
        );
        let placement = place(&demands(&cfg, &f, &BTreeMap::new()), &f.nodes).unwrap();
        let d = draft(&cfg, &f, placement);
        let id = deployment_id(&cfg);
        let n_vms = cfg.users.users.len() * cfg.deployment.machines.len();
        match &d.vmids {
            VmidRequest::Range { owners, .. } => {
                assert_eq!(owners.len(), n_vms);
                assert!(owners.iter().all(|o| o.starts_with(&format!("{id}|"))));
            }
            VmidRequest::Fixed(v) => assert_eq!(v.len(), n_vms),
        }
        let bridge_owners: usize = d.bridges.iter().map(|b| b.owners.len()).sum();
        assert_eq!(
            bridge_owners,
            cfg.users.users.len(),
            "one private `hq` per student"
        );
        for b in &d.bridges {
            let want: BTreeSet<u32> = if b.node == "pve1" {
                [0, 1000].into()
            } else {
                BTreeSet::new()
            };
            assert_eq!(b.taken, want, "{}", b.node);
        }
        // The same placement as the plan built from it.
        assert_eq!(d.placement, example().placement);
    }

    #[test]
    fn original_example_plans_with_replicas_private_bridges_and_gates() {
        let plan = example();
        let id = plan.id.clone();
        assert_eq!(plan.vms.len(), 2);
        let v1 = &plan.vms[0];
        let v2 = &plan.vms[1];
        assert_ne!(v1.node, v2.node, "two students spread over two equal nodes");
        assert_eq!(v2.source.vmid, 101, "replica on pve2 is the source there");
        assert_eq!(v1.nics[0].bridge, "vmbr0");
        assert_eq!(v1.nics[1].tag, Some(100));
        assert_eq!(v1.nics[1].bridge, "vmbr1000");
        assert!(v1.slots.iter().any(|s| s.starts_with("clone-node:")));
        let specs = jobs(&plan, &format!("{id}#0"), &BTreeMap::new());
        // 2 students + 2 node networks + 2 VMs x 3 steps
        assert_eq!(specs.len(), 10);
        let net = specs.iter().find(|s| s.kind == "network").unwrap();
        assert_eq!(
            net.gate.len(),
            2,
            "network waits for its clone and its node's bridges"
        );
        let clone = specs.iter().find(|s| s.kind == "clone").unwrap();
        assert!(clone.gate[0].contains("/student/"));
    }

    #[test]
    fn local_template_without_replica_refuses_other_nodes() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/original-design");
        let cfg = load(&DataPaths::in_dir(dir), None).unwrap();
        let mut f = facts();
        f.templates.retain(|t| t.node == "pve1");
        let d = demands(&cfg, &f, &BTreeMap::new());
        assert!(d[0].eligible.contains("pve1") && !d[0].eligible.contains("pve2"));
        assert!(d[0].refused["pve2"].contains("no replica"));
        f.templates[0].shared = true;
        let d = demands(&cfg, &f, &BTreeMap::new());
        assert!(d[0].eligible.contains("pve2"), "shared storage: any node");
    }
}
