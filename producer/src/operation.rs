//! Operations on a deployment's VMs (`producer start|stop|shutdown|reset`): which VMs the
//! selectors name, one job per VM under a fresh operation id, and waiting for them.
//!
//! An operation's jobs belong to the deployment's active scope (their keys start with it
//! and they join its group), so a teardown cancels and fences them like the deployment's
//! own. Their outcome is read from the queue's job records (state and last error), not
//! from step records: a VM's steps are those of its making.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use serde::Serialize;
use shared::jobs::power::{PowerAction, PowerJob, slot_keys, start_slot};
use shared::jobs::reset::ResetJob;
use shared::jobs::state::{Phase, Store};
use shared::jobs::{Job, VmRef, keys};
use shared::plan::{Plan, VmPlan};
use shared::queue::JobSpec;

use crate::deploy;
use crate::exit::{Exit, Failure};

/// Which VMs an operation is about; empty lists = every VM of the deployment.
#[derive(Debug, Clone, Default)]
pub struct Selectors {
    /// Students as in users.yml (`student1@pve`) or their user part (`student1`).
    pub students: Vec<String>,
    /// Machine names of the deployment file (`student-pc`).
    pub vms: Vec<String>,
}

impl Selectors {
    fn student_matches(&self, user: &str) -> bool {
        self.students.is_empty()
            || self
                .students
                .iter()
                .any(|s| s == user || user.split('@').next() == Some(s.as_str()))
    }
    fn vm_matches(&self, machine: &str) -> bool {
        self.vms.is_empty() || self.vms.iter().any(|m| m == machine)
    }

    /// The plan's VMs the selectors name; a selector that names nothing is a usage error
    /// that lists what exists.
    pub fn select<'p>(&self, plan: &'p Plan) -> Result<Vec<&'p VmPlan>, Failure> {
        for s in &self.students {
            if !plan.vms.iter().any(|v| {
                Selectors {
                    students: vec![s.clone()],
                    vms: vec![],
                }
                .student_matches(&v.user)
            }) {
                let known: Vec<&str> = plan.students.iter().map(|s| s.user.as_str()).collect();
                return Err(usage(format!(
                    "--student {s}: no such student in {} (its students: {})",
                    plan.id,
                    known.join(", ")
                )));
            }
        }
        for m in &self.vms {
            if !plan.vms.iter().any(|v| &v.machine == m) {
                let mut known: Vec<&str> = plan.vms.iter().map(|v| v.machine.as_str()).collect();
                known.sort_unstable();
                known.dedup();
                return Err(usage(format!(
                    "--vm {m}: no machine of that name in {} (its machines: {})",
                    plan.id,
                    known.join(", ")
                )));
            }
        }
        Ok(plan
            .vms
            .iter()
            .filter(|v| self.student_matches(&v.user) && self.vm_matches(&v.machine))
            .collect())
    }
}

fn usage(msg: String) -> Failure {
    Failure::new(Exit::Usage, anyhow::anyhow!(msg))
}

/// What an operation does to each selected VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Power(PowerAction),
    Reset,
}

impl OpKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::Power(a) => a.as_str(),
            OpKind::Reset => "reset",
        }
    }
}

/// An operation as asked for.
#[derive(Debug, Clone)]
pub struct OpRequest {
    pub kind: OpKind,
    pub selectors: Selectors,
    /// Shutdown: seconds before falling back to a hard stop.
    pub timeout_secs: Option<u32>,
    /// VM starts at once per node (from connections.yml).
    pub starts_per_node: u32,
}

/// One VM of an operation.
#[derive(Debug, Clone, Serialize)]
pub struct OpVm {
    pub vm: String,
    pub name: String,
    pub user: String,
    pub vmid: Option<u32>,
    pub node: String,
    /// The job's key (`None` when no job was queued: the VM was not made yet).
    #[serde(skip)]
    pub job: Option<String>,
    /// `queued`, `running`, `done`, `failed` (or `not-made` for a VM without facts).
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// An operation queued, then followed to its end.
#[derive(Debug, Clone, Serialize)]
pub struct OpReport {
    pub id: String,
    pub op: String,
    pub action: &'static str,
    pub vms: Vec<OpVm>,
}

impl OpReport {
    pub fn counts(&self) -> BTreeMap<&str, usize> {
        let mut c = BTreeMap::new();
        for v in &self.vms {
            *c.entry(v.state.as_str()).or_default() += 1;
        }
        c
    }
    pub fn finished(&self) -> bool {
        self.vms
            .iter()
            .all(|v| matches!(v.state.as_str(), "done" | "failed" | "not-made"))
    }
    pub fn exit(&self) -> Exit {
        if self.vms.iter().all(|v| v.state == "done") {
            Exit::Ok
        } else {
            Exit::DeploymentFailed
        }
    }
    pub fn summary(&self) -> String {
        let c: Vec<String> = self
            .counts()
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        format!(
            "{} {} ({}): {}",
            self.action,
            self.id,
            self.op,
            c.join(", ")
        )
    }
}

/// A new operation id: the UTC time and 4 random hex digits (`20261202T061500-3fa9`).
pub fn new_op_id() -> String {
    let r = &uuid::Uuid::new_v4().simple().to_string()[..4];
    format!("{}-{r}", Utc::now().format("%Y%m%dT%H%M%S"))
}

/// Queues one job per selected VM of the active deployment `id`.
pub async fn start(store: &Store, id: &str, req: &OpRequest) -> Result<OpReport, Failure> {
    let redis = |e| Failure::new(Exit::RedisUnreachable, e);
    let (rec, plan) = deploy::load(store, id).await?;
    if rec.phase != Phase::Active || !rec.teardowns.is_empty() {
        return Err(usage(format!(
            "deployment {id} is {}{}: `{}` works on the VMs of an active deployment",
            rec.phase,
            if rec.teardowns.is_empty() {
                ""
            } else {
                " (waiting for its teardown)"
            },
            req.kind.as_str()
        )));
    }
    let selected = req.selectors.select(&plan)?;
    let scope = rec.scope();
    let facts = store.vm_facts(&scope).await.map_err(redis)?;
    let op = new_op_id();
    let mut specs = Vec::new();
    let mut vms = Vec::new();
    for v in selected {
        let f = facts.get(&v.key);
        let mut row = OpVm {
            vm: v.key.clone(),
            name: v.name.clone(),
            user: v.user.clone(),
            vmid: f.map(|f| f.vmid),
            node: f.map(|f| f.node.clone()).unwrap_or_else(|| v.node.clone()),
            job: None,
            state: "not-made".into(),
            error: None,
        };
        if f.is_none() {
            row.error = Some("no VM recorded yet (its clone has not finished)".into());
            vms.push(row);
            continue;
        }
        let vm = VmRef {
            deployment: id.to_owned(),
            cluster: plan.cluster.clone(),
            key: v.key.clone(),
            node: row.node.clone(),
        };
        let key = keys::op_vm(&scope, &op, &v.key, req.kind.as_str());
        let job = match req.kind {
            OpKind::Power(action) => Job::Power(PowerJob {
                vm,
                op: op.clone(),
                action,
                timeout_secs: req.timeout_secs,
            }),
            OpKind::Reset => Job::Reset(ResetJob { vm, op: op.clone() }),
        };
        let starts = matches!(req.kind, OpKind::Power(PowerAction::Start) | OpKind::Reset);
        specs.push(
            JobSpec::new(key.clone(), job.kind(), job.to_value())
                .group(scope.clone())
                .slots(slot_keys(&scope, &v.key, &plan.cluster, &row.node, starts)),
        );
        row.job = Some(key);
        row.state = "queued".into();
        vms.push(row);
    }
    set_start_caps(
        store,
        &plan.cluster,
        vms.iter().map(|v| v.node.as_str()),
        req.starts_per_node,
    )
    .await?;
    store.queue().enqueue_batch(&specs).await.map_err(redis)?;
    tracing::info!(deployment = %id, op = %op, action = req.kind.as_str(), jobs = specs.len(), "operation queued");
    Ok(OpReport {
        id: id.to_owned(),
        op,
        action: req.kind.as_str(),
        vms,
    })
}

/// Caps the start slot of each node (idempotent; the last value set wins).
pub async fn set_start_caps<'a>(
    store: &Store,
    cluster: &str,
    nodes: impl IntoIterator<Item = &'a str>,
    cap: u32,
) -> Result<(), shared::queue::QueueError> {
    let mut seen = std::collections::BTreeSet::new();
    for n in nodes {
        if seen.insert(n) {
            store
                .queue()
                .set_cap(&start_slot(cluster, n), Some(cap))
                .await?;
        }
    }
    Ok(())
}

/// Reads each job's state into the report.
pub async fn refresh(store: &Store, report: &mut OpReport) -> Result<(), Failure> {
    for v in &mut report.vms {
        let Some(key) = &v.job else { continue };
        let info = store
            .queue()
            .job(key)
            .await
            .map_err(|e| Failure::new(Exit::RedisUnreachable, e))?;
        let Some(info) = info else {
            // Purged: a teardown finished meanwhile.
            v.state = "failed".into();
            v.error = Some("the job is gone (the deployment was torn down)".into());
            continue;
        };
        v.state = match info.state.as_str() {
            "done" => "done",
            "dead" | "cancelled" => "failed",
            "running" => "running",
            "scheduled" => "retrying",
            _ => "queued",
        }
        .into();
        v.error = match info.state.as_str() {
            "done" => None,
            "cancelled" => Some("cancelled (a teardown started)".into()),
            _ => info.last_error,
        };
    }
    Ok(())
}

/// Follows the operation until every VM is done or failed; `progress` gets each changed
/// summary line.
pub async fn wait(
    store: &Store,
    report: &mut OpReport,
    every: Duration,
    mut progress: impl FnMut(&OpReport),
) -> Result<(), Failure> {
    let mut last = String::new();
    loop {
        refresh(store, report).await?;
        let line = report.summary();
        if line != last {
            progress(report);
            last = line;
        }
        if report.finished() {
            return Ok(());
        }
        tokio::time::sleep(every).await;
    }
}

/// Each VM's power state for `status`, by VM name: as labfleet last recorded it
/// (`d:<scope>:power`), or, with `live`, as Proxmox reports it now (`/cluster/resources`,
/// one call; Proxmox refreshes it every few seconds).
pub async fn power_states(
    store: &Store,
    id: &str,
    live: Option<&shared::pve::PveClient>,
) -> Result<BTreeMap<String, String>, Failure> {
    let mut out = BTreeMap::new();
    let (rec, plan) = match deploy::load(store, id).await {
        Ok(v) => v,
        // Torn down: no VM is left to have a power state.
        Err(deploy::DeployError::NoPlan { .. }) => return Ok(out),
        Err(e) => return Err(e.into()),
    };
    let scope = rec.vm_scope();
    let redis = |e| Failure::new(Exit::RedisUnreachable, e);
    let vms = plan.vms.iter().chain(&plan.retired);
    match live {
        Some(pve) => {
            let facts = store.vm_facts(&scope).await.map_err(redis)?;
            let now: BTreeMap<u32, String> = pve
                .cluster_vms()
                .await
                .map_err(|e| deploy::DeployError::proxmox("reading the VMs' power states", e))?
                .into_iter()
                .map(|v| (v.vmid, v.status))
                .collect();
            for v in vms {
                if let Some(s) = facts.get(&v.key).and_then(|f| now.get(&f.vmid)) {
                    out.insert(v.name.clone(), s.clone());
                }
            }
        }
        None => {
            let recs = store.power_records(&scope).await.map_err(redis)?;
            for v in vms {
                if let Some(r) = recs.get(&v.key) {
                    out.insert(v.name.clone(), r.state.clone());
                }
            }
        }
    }
    Ok(out)
}
