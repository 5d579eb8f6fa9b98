//! `status`: a deployment's state from the workers' counters ([`summary`], a few reads
//! whatever the size) or from every VM's step records ([`status`]), in typed states.

use std::collections::BTreeMap;

use serde::Serialize;
use shared::jobs::scope;
use shared::jobs::state::{self, DeploymentRecord, Phase, StepRecord, StepState, Store};
use shared::plan;
use shared::queue::GroupStats;

use super::{DeployError, load, record, vm_plan};

/// A deployment's state in one word, as `status` prints it (the stored and printed text is
/// the kebab-case name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeploymentState {
    Pending,
    Running,
    Done,
    Failed,
    /// Its jobs wait for an earlier teardown (a reset of the lab).
    WaitingForTeardown,
    TearingDown,
    TornDown,
}

impl DeploymentState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeploymentState::Pending => "pending",
            DeploymentState::Running => "running",
            DeploymentState::Done => "done",
            DeploymentState::Failed => "failed",
            DeploymentState::WaitingForTeardown => "waiting-for-teardown",
            DeploymentState::TearingDown => "tearing-down",
            DeploymentState::TornDown => "torn-down",
        }
    }

    /// Nothing more will happen without a command (done, failed, torn down).
    pub fn is_settled(self) -> bool {
        matches!(
            self,
            DeploymentState::Done | DeploymentState::Failed | DeploymentState::TornDown
        )
    }
}

/// Printed as its text, and compared with text (`st.state == "done"`).
macro_rules! as_text {
    ($($t:ty),*) => {$(
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl PartialEq<&str> for $t {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
    )*};
}

as_text!(DeploymentState, VmState);

/// One VM's state (the text `step.lua` counts under).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    Pending,
    Cloning,
    Retrying,
    /// Cloned; network, permission (and start) to go.
    Configuring,
    Done,
    Failed,
    /// An earlier submit's VM that the files no longer list (kept without `--prune`).
    NotInFiles,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Pending => "pending",
            VmState::Cloning => "cloning",
            VmState::Retrying => "retrying",
            VmState::Configuring => "configuring",
            VmState::Done => "done",
            VmState::Failed => "failed",
            VmState::NotInFiles => "not-in-files",
        }
    }
}

/// One VM's state for `status`.
#[derive(Debug, Clone, Serialize)]
pub struct VmStatus {
    pub user: String,
    pub machine: String,
    pub name: String,
    pub vmid: Option<u32>,
    pub node: String,
    pub state: VmState,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub id: String,
    pub state: DeploymentState,
    /// VMs of the deployment (those no longer in the files included).
    pub total: usize,
    pub counts: BTreeMap<String, usize>,
    pub per_node: BTreeMap<String, BTreeMap<String, usize>>,
    /// What `vms` holds: `all` VMs, or only the `failed` ones (see [`summary`]).
    pub listing: Listing,
    pub vms: Vec<VmStatus>,
    pub setup_failures: Vec<String>,
    pub quarantined: Vec<serde_json::Value>,
    /// Disks its destroys left behind that no worker could free (`crate::leaks`).
    pub leaked: Vec<serde_json::Value>,
    /// Students of a lost node: moved (and where) or not (and why) (`shared::jobs::replace`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub moves: Vec<shared::jobs::node_loss::Move>,
    /// What moves left on lost nodes, removed when each is back.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left_on_lost_nodes: Vec<String>,
}

/// The moves of the active epoch's students and what they left on lost nodes.
async fn moves_of(
    store: &Store,
    rec: &DeploymentRecord,
) -> Result<(Vec<shared::jobs::node_loss::Move>, Vec<String>), DeployError> {
    if rec.phase != Phase::Active {
        return Ok((Vec::new(), Vec::new()));
    }
    let moves: Vec<_> = store.moves(&rec.scope()).await?.into_values().collect();
    let left = store
        .debris(&rec.cluster)
        .await?
        .into_values()
        .filter(|d| match d {
            shared::jobs::node_loss::Debris::Vm { deployment, .. }
            | shared::jobs::node_loss::Debris::Bridge { deployment, .. } => deployment == &rec.id,
        })
        .map(|d| d.describe())
        .collect();
    Ok((moves, left))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Listing {
    All,
    Failed,
}

/// The deployment's state from the counters the workers keep (`step.lua`): a few small
/// reads whatever its size, with `vms` listing only the failed VMs. Where the counters cannot
/// say everything it returns the per-VM [`status`] instead: a deployment recorded before
/// counters existed, one being or having been torn down, one with VMs no longer in the
/// files, and one whose student or node setup failed (its VMs count as failed).
pub async fn summary(store: &Store, id: &str) -> Result<Status, DeployError> {
    let rec = record(store, id).await?;
    let Some(totals) = rec.totals.clone().filter(|t| t.retired == 0) else {
        return status(store, id).await;
    };
    if rec.phase != Phase::Active {
        return status(store, id).await;
    }
    let progress = store.progress(&rec.vm_scope()).await?;
    let setup_failed = progress
        .failed
        .iter()
        .any(|f| f.starts_with("student:") || f.starts_with("node:"));
    if setup_failed {
        return status(store, id).await;
    }
    let pending_of = |total: usize, counted: &BTreeMap<String, usize>| {
        let seen: usize = counted
            .iter()
            .filter(|(s, _)| *s != "pending")
            .map(|(_, n)| n)
            .sum();
        total.saturating_sub(seen)
    };
    let with_pending = |total: usize, mut counted: BTreeMap<String, usize>| {
        let pending = pending_of(total, &counted);
        counted.remove("pending");
        if pending > 0 {
            counted.insert("pending".to_owned(), pending);
        }
        counted
    };
    let counts = with_pending(totals.vms, progress.states.clone());
    let per_node: BTreeMap<String, BTreeMap<String, usize>> = totals
        .per_node
        .iter()
        .map(|(node, n)| {
            let counted = progress.per_node.get(node).cloned().unwrap_or_default();
            (node.clone(), with_pending(*n, counted))
        })
        .collect();
    // The failed VMs, with the error of their first failed step.
    let mut failed_steps: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for f in &progress.failed {
        if let Some((vm, step)) = f.rsplit_once('|') {
            failed_steps.entry(vm).or_default().push(step);
        }
    }
    let mut vms = Vec::new();
    if !failed_steps.is_empty() {
        let (_, plan) = load(store, id).await?;
        let order = plan::vm_steps(&plan);
        let fields: Vec<String> = failed_steps
            .iter()
            .flat_map(|(vm, steps)| steps.iter().map(move |s| state::step_field(vm, s)))
            .collect();
        let records = store.some_steps(&rec.vm_scope(), &fields).await?;
        let keys: Vec<String> = failed_steps.keys().map(|k| (*k).to_owned()).collect();
        let facts = store.some_vms(&rec.vm_scope(), &keys).await?;
        for v in plan
            .vms
            .iter()
            .filter(|v| failed_steps.contains_key(v.key.as_str()))
        {
            let error = order
                .iter()
                .filter_map(|s| records.get(&state::step_field(&v.key, s)))
                .find(|r| r.state == StepState::Failed)
                .and_then(|r| r.error.clone());
            vms.push(VmStatus {
                user: v.user.clone(),
                machine: v.machine.clone(),
                name: v.name.clone(),
                vmid: facts
                    .get(&v.key)
                    .map(|f| f.vmid)
                    .or(Some(v.vmid))
                    .filter(|v| *v != 0),
                node: v.node.clone(),
                state: VmState::Failed,
                error,
            });
        }
    }
    let g = store.queue().group_stats(&rec.scope()).await?;
    let teardown = prior_teardowns(store, &rec).await?;
    let state = overall_state(&rec, totals.vms, &counts, false, &g, &teardown);
    let (moves, left_on_lost_nodes) = moves_of(store, &rec).await?;
    Ok(Status {
        id: id.to_owned(),
        state,
        total: totals.vms,
        counts,
        per_node,
        listing: Listing::Failed,
        vms,
        setup_failures: Vec::new(),
        quarantined: quarantined_of(store, &rec).await?,
        leaked: crate::leaks::leaked_of_record(store, &rec).await?,
        moves,
        left_on_lost_nodes,
    })
}

/// The earlier teardowns an active epoch waits for: their jobs, summed.
async fn prior_teardowns(store: &Store, rec: &DeploymentRecord) -> Result<GroupStats, DeployError> {
    let mut sum = GroupStats::default();
    if rec.phase != Phase::Active {
        return Ok(sum);
    }
    for e in &rec.teardowns {
        sum.add(&store.queue().group_stats(&scope(&rec.id, *e)).await?);
    }
    Ok(sum)
}

/// The deployment's state in one word, from its phase, the VM counts and its jobs (and, for
/// an epoch that waits for an earlier teardown, that teardown's jobs).
pub fn overall_state(
    rec: &DeploymentRecord,
    total: usize,
    counts: &BTreeMap<String, usize>,
    setup_failed: bool,
    g: &GroupStats,
    teardown: &GroupStats,
) -> DeploymentState {
    let runnable = g.runnable();
    let count = |s: VmState| counts.get(s.as_str()).copied().unwrap_or(0);
    match rec.phase {
        Phase::TornDown => DeploymentState::TornDown,
        Phase::TearingDown => DeploymentState::TearingDown,
        // Only its finish job (gated on the dead ones) is left: stuck until `retry`.
        Phase::Active if !rec.teardowns.is_empty() && teardown.dead > 0 && teardown.open() <= 1 => {
            DeploymentState::Failed
        }
        Phase::Active if !rec.teardowns.is_empty() => DeploymentState::WaitingForTeardown,
        Phase::Active
            if count(VmState::Done) == total && !setup_failed && runnable + g.gated == 0 =>
        {
            DeploymentState::Done
        }
        Phase::Active
            if runnable == 0 && (count(VmState::Failed) > 0 || setup_failed || g.dead > 0) =>
        {
            DeploymentState::Failed
        }
        Phase::Active if count(VmState::Pending) == total && g.in_flight == 0 && g.done == 0 => {
            DeploymentState::Pending
        }
        Phase::Active => DeploymentState::Running,
    }
}

/// The quarantined VMIDs of this deployment, with the command that clears each.
async fn quarantined_of(
    store: &Store,
    rec: &DeploymentRecord,
) -> Result<Vec<serde_json::Value>, DeployError> {
    Ok(store
        .quarantined(&rec.cluster)
        .await
        ?
        .into_iter()
        .filter(|q| q.deployment == rec.id)
        .map(|q| serde_json::json!({"vmid": q.vmid, "node": q.node, "vm": q.vm, "reason": q.reason, "command": q.command()}))
        .collect())
}

/// The status of a torn-down deployment: nothing of it is left.
fn torn_down(rec: &DeploymentRecord) -> Status {
    Status {
        id: rec.id.clone(),
        state: DeploymentState::TornDown,
        total: 0,
        counts: BTreeMap::new(),
        per_node: BTreeMap::new(),
        listing: Listing::All,
        vms: Vec::new(),
        setup_failures: Vec::new(),
        quarantined: Vec::new(),
        leaked: Vec::new(),
        moves: Vec::new(),
        left_on_lost_nodes: Vec::new(),
    }
}

/// Every VM's state, read from every step record and the plan (its cost grows with the
/// deployment: see [`summary`]).
pub async fn status(store: &Store, id: &str) -> Result<Status, DeployError> {
    let rec = record(store, id).await?;
    if rec.phase == Phase::TornDown {
        let mut s = torn_down(&rec);
        s.leaked = crate::leaks::leaked_of_record(store, &rec).await?;
        return Ok(s);
    }
    let plan = vm_plan(store, &rec).await?;
    let steps = store.steps(&rec.vm_scope()).await?;
    let facts = store.vm_facts(&rec.vm_scope()).await?;
    let names = plan::vm_steps(&plan);
    let mut vms = Vec::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut per_node: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for v in &plan.vms {
        let recs: Vec<Option<&StepRecord>> = names
            .iter()
            .map(|s| steps.get(&state::step_field(&v.key, s)))
            .collect();
        let failed = recs.iter().flatten().find(|r| r.state == StepState::Failed);
        let student_failed = steps
            .get(&state::step_field(
                &format!("student:{}", v.user),
                "student",
            ))
            .filter(|r| r.state == StepState::Failed);
        let (state, error) = vm_state(&recs, failed.copied().or(student_failed));
        *counts.entry(state.as_str().to_owned()).or_default() += 1;
        *per_node
            .entry(v.node.clone())
            .or_default()
            .entry(state.as_str().to_owned())
            .or_default() += 1;
        let f = facts.get(&v.key);
        vms.push(VmStatus {
            user: v.user.clone(),
            machine: v.machine.clone(),
            name: v.name.clone(),
            vmid: f.map(|f| f.vmid).or(Some(v.vmid)).filter(|v| *v != 0),
            node: v.node.clone(),
            state,
            error,
        });
    }
    for v in &plan.retired {
        *counts
            .entry(VmState::NotInFiles.as_str().to_owned())
            .or_default() += 1;
        let f = facts.get(&v.key);
        vms.push(VmStatus {
            user: v.user.clone(),
            machine: v.machine.clone(),
            name: v.name.clone(),
            vmid: f.map(|f| f.vmid),
            node: v.node.clone(),
            state: VmState::NotInFiles,
            error: None,
        });
    }
    let setup_failures: Vec<String> = steps
        .iter()
        .filter(|(k, r)| {
            (k.starts_with("student:") || k.starts_with("node:")) && r.state == StepState::Failed
        })
        .map(|(k, r)| format!("{k}: {}", r.error.clone().unwrap_or_default()))
        .collect();
    let g = store.queue().group_stats(&rec.scope()).await?;
    let total = plan.vms.len();
    let teardown = prior_teardowns(store, &rec).await?;
    let mut setup_failures = setup_failures;
    if teardown.dead > 0 {
        setup_failures.push(format!(
            "the teardown this submit waits for has {} failed jobs: fix the cause, then `producer retry {id}`",
            teardown.dead
        ));
    }
    let state = overall_state(
        &rec,
        total,
        &counts,
        !setup_failures.is_empty(),
        &g,
        &teardown,
    );
    let (moves, left_on_lost_nodes) = moves_of(store, &rec).await?;
    Ok(Status {
        id: id.to_owned(),
        state,
        total: total + plan.retired.len(),
        counts,
        per_node,
        listing: Listing::All,
        vms,
        setup_failures,
        quarantined: quarantined_of(store, &rec).await?,
        leaked: crate::leaks::leaked_of_record(store, &rec).await?,
        moves,
        left_on_lost_nodes,
    })
}

/// One VM's state from its step records (in step order) and the failure that decides it.
fn vm_state(
    recs: &[Option<&StepRecord>],
    failed: Option<&StepRecord>,
) -> (VmState, Option<String>) {
    if let Some(f) = failed {
        return (VmState::Failed, f.error.clone());
    }
    if recs
        .iter()
        .all(|r| r.is_some_and(|r| r.state == StepState::Done))
    {
        return (VmState::Done, None);
    }
    let clone = recs[0];
    let s = match clone.map(|r| r.state) {
        None => VmState::Pending,
        Some(StepState::Running) => VmState::Cloning,
        Some(StepState::Retrying) => VmState::Retrying,
        Some(StepState::Done) => VmState::Configuring,
        Some(StepState::Failed) => VmState::Failed,
    };
    (s, clone.and_then(|r| r.error.clone()))
}
