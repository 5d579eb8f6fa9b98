//! Job payloads: what sits in Redis between the producer and a worker.
//!
//! Payloads carry ids and the desired state, never credentials or snapshots of live state:
//! a worker loads the cluster's credentials from its own `connections.yml` by name. The one
//! secret that travels is a new student's initial password, sealed with the `enc:` key.
//! Payloads outlive upgrades in Redis, so their JSON is snapshot-tested (`tests.rs`): change
//! a field only in a backward-compatible way (new fields optional with a default).

use serde::{Deserialize, Serialize};

/// Every job kind. One closed list: the worker dispatches on it and `JobSpec::kind` is its tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Job {
    Student(StudentJob),
    NodeNetwork(NodeNetworkJob),
    Clone(CloneJob),
    Network(NetworkJob),
    Permission(PermissionJob),
    Start(StartJob),
    Destroy(DestroyJob),
    StudentTeardown(StudentJob),
    NodeNetworkTeardown(NodeNetworkJob),
    TeardownFinish(TeardownFinishJob),
    AuditRemove(crate::jobs::audit::AuditRemoveJob),
    Baseline(crate::jobs::baseline::BaselineJob),
    Power(crate::jobs::power::PowerJob),
    Reset(crate::jobs::reset::ResetJob),
    Schedule(crate::jobs::schedule::ScheduleJob),
    Replace(crate::jobs::replace::ReplaceJob),
    NodeDebris(crate::jobs::replace::NodeDebrisJob),
}

impl Job {
    pub fn kind(&self) -> &'static str {
        match self {
            Job::Student(_) => "student",
            Job::NodeNetwork(_) => "node-network",
            Job::Clone(_) => "clone",
            Job::Network(_) => "network",
            Job::Permission(_) => "permission",
            Job::Start(_) => "start",
            Job::Destroy(_) => "destroy",
            Job::StudentTeardown(_) => "student-teardown",
            Job::NodeNetworkTeardown(_) => "node-network-teardown",
            Job::TeardownFinish(_) => "teardown-finish",
            Job::AuditRemove(_) => "audit-remove",
            Job::Baseline(_) => "baseline",
            Job::Power(_) => "power",
            Job::Reset(_) => "reset",
            Job::Schedule(_) => "schedule",
            Job::Replace(_) => "replace",
            Job::NodeDebris(_) => "node-debris",
        }
    }

    pub fn deployment(&self) -> &str {
        match self {
            Job::Student(j) | Job::StudentTeardown(j) => &j.deployment,
            Job::NodeNetwork(j) | Job::NodeNetworkTeardown(j) => &j.deployment,
            Job::Clone(j) => &j.vm.deployment,
            Job::Network(j) => &j.vm.deployment,
            Job::Permission(j) => &j.vm.deployment,
            Job::Start(j) => &j.vm.deployment,
            Job::Destroy(j) => &j.vm.deployment,
            Job::TeardownFinish(j) => &j.deployment,
            Job::AuditRemove(j) => &j.audit,
            Job::Baseline(j) => &j.vm.deployment,
            Job::Power(j) => &j.vm.deployment,
            Job::Reset(j) => &j.vm.deployment,
            Job::Schedule(j) => &j.deployment,
            Job::Replace(j) => &j.deployment,
            Job::NodeDebris(j) => &j.cluster,
        }
    }

    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("payloads serialize")
    }
}

/// Every kind, for retry policies and metrics.
pub const KINDS: &[&str] = &[
    "student",
    "node-network",
    "clone",
    "network",
    "permission",
    "start",
    "destroy",
    "student-teardown",
    "node-network-teardown",
    "teardown-finish",
    "audit-remove",
    "baseline",
    "power",
    "reset",
    "schedule",
    "replace",
    "node-debris",
];

/// Which VM a job is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRef {
    pub deployment: String,
    pub cluster: String,
    /// `<user>/<machine>`, unique in the deployment.
    pub key: String,
    /// The node the VM lives on once cloned.
    pub node: String,
}

/// Create the student's `@pve` user if missing, their pool, and their role on the pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StudentJob {
    pub deployment: String,
    pub cluster: String,
    pub user: String,
    pub pool: String,
    /// The role granted on `/pool/<pool>`, which Proxmox applies to every member VM.
    /// Empty in a job enqueued before the role moved to the pool: its permission jobs
    /// grant the role per VM.
    #[serde(default)]
    pub role: String,
    /// The initial password for a user labfleet creates, sealed (`enc:`); `None` when the
    /// user is not in the `pve` realm (a missing user then fails the job, naming the user).
    #[serde(default)]
    pub sealed_password: Option<String>,
}

/// A private bridge on a node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BridgePlan {
    pub iface: String,
    pub vlan_aware: bool,
    /// `<user> <alias>`, written into the bridge's comment with the marker.
    pub owner: String,
}

/// Create every private bridge the students placed on `node` need, then apply once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeNetworkJob {
    pub deployment: String,
    pub cluster: String,
    pub node: String,
    pub bridges: Vec<BridgePlan>,
}

/// Clone one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneJob {
    pub vm: VmRef,
    pub name: String,
    pub source_node: String,
    pub source_vmid: u32,
    pub full: bool,
    #[serde(default)]
    pub storage: Option<String>,
    /// The VMID reserved at submit; a retry reuses the one recorded in the VM's state.
    pub vmid: u32,
    /// Where a replacement VMID comes from when this one turns out to be taken.
    pub vmid_min: u32,
    pub vmid_max: u32,
}

/// One NIC as it should be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicPlan {
    pub model: String,
    pub bridge: String,
    #[serde(default)]
    pub tag: Option<u16>,
    #[serde(default)]
    pub firewall: Option<bool>,
}

/// Set `net0..netN` of one VM (and remove NICs beyond N that the template had).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkJob {
    pub vm: VmRef,
    pub nics: Vec<NicPlan>,
}

/// Put the VM in its student's pool, where the role the student job granted on the pool
/// applies to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PermissionJob {
    pub vm: VmRef,
    pub user: String,
    pub role: String,
    /// The student's pool. `None` in a job enqueued before the role moved to the pool (its
    /// clone put the VM in the pool): the role is then granted on `/vms/<vmid>` as before.
    #[serde(default)]
    pub pool: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartJob {
    pub vm: VmRef,
}

/// Stop (if running) and destroy one VM labfleet created, found by the VMID its clone
/// recorded (in the facts of `epoch`) and proven ours by its marker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestroyJob {
    pub vm: VmRef,
    /// The VMID known when the teardown was planned; informational only: a destroy acts on
    /// the VMID in the facts of `epoch`, never on this one (a later epoch may own it now).
    #[serde(default)]
    pub vmid: Option<u32>,
    /// The epoch whose VM this destroys. Absent in payloads of versions before epochs were
    /// recorded: then it is the epoch before the teardown's own (the job key's scope).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u32>,
}

/// Finishes teardown `epoch` once its destroy and cleanup jobs are done (gated on them):
/// checks the cluster, frees the VMIDs and bridge names no later epoch uses, removes the
/// torn-down epoch's records and queue keys, and moves the deployment's phase, all in one
/// fenced compare-and-set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TeardownFinishJob {
    pub deployment: String,
    pub cluster: String,
    /// The teardown's epoch (its jobs' scope); it tears down the VMs of `epoch - 1`.
    pub epoch: u32,
    /// Set for a prune (`submit --prune`): only these VMs and students of the active epoch
    /// `epoch` were removed, and the deployment stays active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prune: Option<PruneSet>,
}

/// What one prune removes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneSet {
    /// Unique per prune (its job keys carry it).
    pub round: String,
    /// VM keys whose VMs were destroyed.
    pub vms: Vec<String>,
    /// Students whose pools (and users, when nobody else lists them) were removed.
    pub users: Vec<String>,
    /// (node, bridge owner `<user> <alias>`) of the private bridges removed.
    pub bridges: Vec<(String, String)>,
    /// The job keys of the removed VMs and students (their clone, network, ... and student
    /// jobs, and the node-network jobs that made their bridges): forgotten at the finish,
    /// so that a student listed again gets new jobs.
    #[serde(default)]
    pub jobs: Vec<String>,
}

/// The marker labfleet writes into a VM's description: proof of ownership when Redis state
/// is gone, and of the epoch that made it, so that no job of another epoch of the same
/// deployment ever takes it for its own.
pub fn marker(deployment: &str, key: &str, epoch: u32) -> String {
    format!("labfleet deployment={deployment} vm={key} epoch={epoch}")
}

/// Who made a VM, as its description says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkerMatch {
    /// No marker of this VM key of this deployment.
    None,
    /// This VM's marker, written by a version before epochs were recorded
    /// (`labfleet deployment=<id> vm=<key>`): ours, of an unknown epoch.
    Legacy,
    /// This VM's marker with its epoch.
    Epoch(u32),
}

impl MarkerMatch {
    /// Whether a job of `epoch` may treat the VM as its own: its own epoch's VM, or one made
    /// before epochs were recorded (deployments upgraded in place keep their VMs).
    pub fn is_ours(self, epoch: u32) -> bool {
        match self {
            MarkerMatch::None => false,
            MarkerMatch::Legacy => true,
            MarkerMatch::Epoch(e) => e == epoch,
        }
    }
}

/// Reads the marker of VM `key` of `deployment` out of a description (one marker a line).
pub fn find_marker(description: &str, deployment: &str, key: &str) -> MarkerMatch {
    let legacy = format!("labfleet deployment={deployment} vm={key}");
    for line in description.lines().map(str::trim) {
        if line == legacy {
            return MarkerMatch::Legacy;
        }
        if let Some(e) = line
            .strip_prefix(legacy.as_str())
            .and_then(|r| r.strip_prefix(" epoch="))
            .and_then(|e| e.parse().ok())
        {
            return MarkerMatch::Epoch(e);
        }
    }
    MarkerMatch::None
}

/// The scope (`<deployment>#<epoch>`) a job belongs to: its key's first segment (every key
/// in [`keys`] starts with it).
pub fn scope_of_key(job_key: &str) -> &str {
    job_key.split('/').next().unwrap_or(job_key)
}

/// The epoch of a scope `<deployment>#<epoch>` (0 for a malformed one).
pub fn epoch_of_scope(scope: &str) -> u32 {
    scope
        .rsplit_once('#')
        .and_then(|(_, e)| e.parse().ok())
        .unwrap_or(0)
}

/// The scope of epoch `epoch` of a deployment.
pub fn scope(deployment: &str, epoch: u32) -> String {
    format!("{deployment}#{epoch}")
}

/// The marker's deployment part, for objects that belong to a deployment as a whole.
pub fn deployment_marker(deployment: &str) -> String {
    format!("labfleet deployment={deployment}")
}

/// Job keys: `<deployment>/<what>/<step>`. Stable, so a resubmit finds the same jobs.
pub mod keys {
    pub fn student(dep: &str, user: &str) -> String {
        format!("{dep}/student/{user}")
    }
    pub fn student_teardown(dep: &str, user: &str) -> String {
        format!("{dep}/teardown/student/{user}")
    }
    /// Keyed by the set of bridges, so adding students makes a new job: the count and a
    /// digest of the sorted names, not the names themselves. Every network job of the node
    /// gates on this key, and a class of 5,000 students puts ~1,700 bridges on a node: a
    /// key listing them was 15 KB, copied into 10,000 gates (tripling the enqueue's cost).
    pub fn node_network(dep: &str, node: &str, bridges: &[super::BridgePlan]) -> String {
        use sha2::{Digest, Sha256};
        let mut names: Vec<&str> = bridges.iter().map(|b| b.iface.as_str()).collect();
        names.sort_unstable();
        let digest = Sha256::digest(names.join("+").as_bytes());
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        format!("{dep}/node-network/{node}/{}-{hex}", names.len())
    }
    pub fn node_network_teardown(dep: &str, node: &str) -> String {
        format!("{dep}/teardown/node-network/{node}")
    }
    pub fn vm_step(dep: &str, vm: &str, step: &str) -> String {
        format!("{dep}/vm/{vm}/{step}")
    }
    pub fn destroy(dep: &str, vm: &str) -> String {
        format!("{dep}/teardown/vm/{vm}")
    }
    /// The job that finishes teardown `dep` (a teardown's scope); a submit made during the
    /// teardown gates its jobs on it.
    pub fn teardown_finish(dep: &str) -> String {
        format!("{dep}/teardown/finish")
    }
    /// Removal of a VM whose student was pruned from the files (`submit --prune`).
    pub fn prune_vm(dep: &str, round: &str, vm: &str) -> String {
        format!("{dep}/prune/{round}/vm/{vm}")
    }
    pub fn prune_student(dep: &str, round: &str, user: &str) -> String {
        format!("{dep}/prune/{round}/student/{user}")
    }
    pub fn prune_node_network(dep: &str, round: &str, node: &str) -> String {
        format!("{dep}/prune/{round}/node-network/{node}")
    }
    pub fn prune_finish(dep: &str, round: &str) -> String {
        format!("{dep}/prune/{round}/finish")
    }
    /// One VM's part of operation `op` (`start`, `stop`, `shutdown`, `reset`): each
    /// operation's keys are new, so it runs even when an earlier one's jobs are kept done.
    pub fn op_vm(dep: &str, op: &str, vm: &str, action: &str) -> String {
        format!("{dep}/op/{op}/vm/{vm}/{action}")
    }
}
