//! What the dashboard shows, read from Redis: a deployment's grid of cells (one per planned
//! VM, with its state, VMID, node and, when failed, Proxmox's message), its counts and its
//! state word; the queue's figures. Pages (`pages`) and live updates (`live`) both build on
//! [`cells`], so a cell never reads one way on the page and another in an update.
//!
//! A VM's state is the one `step.lua` derives (`d:<id>:vmstate`); on top of it a failed
//! step (`d:<id>:failed`) or a failed student set-up fails the VM with that step's error,
//! and during a teardown the VM's `destroy` record decides (`destroying`, `removed`). It
//! reads only Redis and never writes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::Serialize;
use shared::jobs::state::{
    DeploymentRecord, Phase, StepRecord, StepState, Store, VmFacts, step_field,
};
use shared::plan::Plan;
use shared::queue::QueueError;

/// One VM of the grid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cell {
    /// Index in the plan's VM list (the cell's id in updates).
    pub i: usize,
    pub state: String,
    pub vmid: Option<u32>,
    pub node: String,
    pub error: Option<String>,
}

/// Parsed plans, kept while their deployment record does not change (a 10,000-VM plan
/// is megabytes of JSON; parsing it for every page view would be most of the render).
#[derive(Default)]
pub struct PlanCache {
    map: Mutex<HashMap<String, (PlanStamp, Arc<Plan>)>>,
}

/// What identifies one stored plan: a submit rewrites the record (epoch or `updated`).
type PlanStamp = (u32, DateTime<Utc>);

impl PlanCache {
    /// The deployment's record and plan; `None` when there is no such deployment or plan.
    pub async fn load(
        &self,
        store: &Store,
        id: &str,
    ) -> Result<Option<(DeploymentRecord, Arc<Plan>)>, QueueError> {
        let Some(rec) = store.upgrade(id).await?.map(|v| v.rec) else {
            return Ok(None);
        };
        let stamp = (rec.epoch, rec.updated);
        if let Some((s, p)) = self.lock().get(id)
            && *s == stamp
        {
            return Ok(Some((rec, p.clone())));
        }
        let Some(plan) = store
            .plan_json(id, rec.vm_epoch())
            .await?
            .and_then(|s| serde_json::from_str::<Plan>(&s).ok())
        else {
            // A finished teardown removes the plan with everything else: a page that showed
            // the class keeps its grid (every VM removed) from the plan it had.
            if rec.phase == Phase::TornDown
                && let Some((_, p)) = self.lock().get(id)
            {
                return Ok(Some((rec, p.clone())));
            }
            return Ok(None);
        };
        let plan = Arc::new(plan);
        self.lock().insert(id.to_owned(), (stamp, plan.clone()));
        Ok(Some((rec, plan)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (PlanStamp, Arc<Plan>)>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The grid's layout: students (rows) by machines (columns), from the plan.
#[derive(Debug, Clone)]
pub struct Layout {
    pub students: Vec<String>,
    pub machines: Vec<String>,
    /// (row, column) -> index in the plan's VM list.
    pub at: HashMap<(usize, usize), usize>,
}

pub fn layout(plan: &Plan) -> Layout {
    let mut students: Vec<String> = plan.students.iter().map(|s| s.user.clone()).collect();
    let mut machines: Vec<String> = Vec::new();
    let mut row: HashMap<&str, usize> = students
        .iter()
        .enumerate()
        .map(|(i, s)| (s.as_str(), i))
        .collect();
    let mut extra = Vec::new();
    let mut at = HashMap::new();
    for (i, v) in plan.vms.iter().enumerate() {
        let c = match machines.iter().position(|m| *m == v.machine) {
            Some(c) => c,
            None => {
                machines.push(v.machine.clone());
                machines.len() - 1
            }
        };
        let r = match row.get(v.user.as_str()) {
            Some(r) => *r,
            None => {
                extra.push(v.user.clone());
                let r = students.len() + extra.len() - 1;
                row.insert(&v.user, r);
                r
            }
        };
        at.insert((r, c), i);
    }
    students.extend(extra);
    Layout {
        students,
        machines,
        at,
    }
}

/// The cells of the VMs at `which` (indices into `plan.vms`; `None`: all of them), read in
/// a few pipelined calls whatever their number.
pub async fn cells(
    store: &Store,
    rec: &DeploymentRecord,
    plan: &Plan,
    which: Option<&[usize]>,
) -> Result<Vec<Cell>, QueueError> {
    let idx: Vec<usize> = match which {
        Some(w) => w.iter().copied().filter(|i| *i < plan.vms.len()).collect(),
        None => (0..plan.vms.len()).collect(),
    };
    if idx.is_empty() {
        return Ok(Vec::new());
    }
    let keys: Vec<&str> = idx.iter().map(|i| plan.vms[*i].key.as_str()).collect();
    let mut c = store.queue().connection();
    let tearing = rec.phase != Phase::Active;
    let vm_scope = rec.vm_scope();
    let own_scope = rec.scope();
    let (states, facts, failed): (Vec<Option<String>>, Vec<Option<String>>, Vec<String>) = {
        let mut p = redis::pipe();
        p.cmd("HMGET")
            .arg(store.key_vm_states(&vm_scope))
            .arg(&keys);
        p.cmd("HMGET").arg(store.key_vms(&vm_scope)).arg(&keys);
        p.cmd("SMEMBERS").arg(store.key_failed(&vm_scope));
        p.query_async(&mut c).await?
    };
    let destroys: Vec<Option<String>> = if tearing {
        let fields: Vec<String> = keys.iter().map(|k| step_field(k, "destroy")).collect();
        // A teardown's destroy records are in its own scope.
        redis::cmd("HMGET")
            .arg(store.key_steps(&own_scope))
            .arg(&fields)
            .query_async(&mut c)
            .await?
    } else {
        Vec::new()
    };
    // The failed steps: of a VM (`<key>|<step>`) or of a student's set-up.
    let failed_vm: HashSet<&str> = failed
        .iter()
        .filter_map(|f| f.rsplit_once('|').map(|(s, _)| s))
        .collect();
    let asked: HashSet<&str> = keys.iter().copied().collect();
    let wanted_errors: Vec<&String> = failed
        .iter()
        .filter(|f| {
            f.rsplit_once('|')
                .is_some_and(|(s, _)| s.starts_with("student:") || asked.contains(s))
        })
        .collect();
    let errors: HashMap<String, StepRecord> = if wanted_errors.is_empty() {
        HashMap::new()
    } else {
        let fields: Vec<String> = wanted_errors.iter().map(|s| (*s).clone()).collect();
        store.some_steps(&vm_scope, &fields).await?
    };
    let order = shared::plan::vm_steps(plan);
    // Failed student set-ups by user, looked up once per user rather than per VM.
    let student_failed: HashMap<&str, &StepRecord> = errors
        .iter()
        .filter(|(_, r)| r.state == StepState::Failed)
        .filter_map(|(k, r)| {
            k.strip_prefix("student:")
                .and_then(|k| k.strip_suffix("|student"))
                .map(|u| (u, r))
        })
        .collect();
    let mut out = Vec::with_capacity(idx.len());
    for (n, i) in idx.iter().enumerate() {
        let v = &plan.vms[*i];
        let f: Option<VmFacts> = facts[n]
            .as_deref()
            .and_then(|s| serde_json::from_str(s).ok());
        let derived = states[n]
            .as_deref()
            .and_then(|s| s.split_once('|'))
            .map(|(s, _)| s.to_owned())
            .unwrap_or_else(|| "pending".to_owned());
        let step_error = || {
            order
                .iter()
                .filter_map(|s| errors.get(&step_field(&v.key, s)))
                .find(|r| r.state == StepState::Failed)
                .and_then(|r| r.error.clone())
        };
        let student = student_failed.get(v.user.as_str());
        let destroy: Option<StepRecord> = destroys
            .get(n)
            .and_then(|d| d.as_deref())
            .and_then(|s| serde_json::from_str(s).ok());
        let (state, error) = cell_state(
            rec.phase,
            destroy,
            failed_vm.contains(v.key.as_str()),
            derived,
            student.copied(),
            step_error,
        );
        let removed = state == "removed";
        out.push(Cell {
            i: *i,
            vmid: if removed {
                None
            } else {
                f.as_ref()
                    .map(|f| f.vmid)
                    .or(Some(v.vmid))
                    .filter(|x| *x != 0)
            },
            node: f.map(|f| f.node).unwrap_or_else(|| v.node.clone()),
            state,
            error,
        });
    }
    Ok(out)
}

/// A cell's state and error: removed or destroying during a teardown (from the destroy
/// record), failed with the first failed step's (or the student set-up's) error, else the
/// state the workers derived.
fn cell_state(
    phase: Phase,
    destroy: Option<StepRecord>,
    vm_failed: bool,
    derived: String,
    student: Option<&StepRecord>,
    step_error: impl FnOnce() -> Option<String>,
) -> (String, Option<String>) {
    let tearing = phase != Phase::Active;
    if phase == Phase::TornDown {
        ("removed".to_owned(), None)
    } else if let Some(d) = destroy.filter(|_| tearing) {
        match d.state {
            StepState::Done => ("removed".to_owned(), None),
            StepState::Failed => ("failed".to_owned(), d.error),
            StepState::Running | StepState::Retrying => ("destroying".to_owned(), d.error),
        }
    } else if tearing {
        ("destroying".to_owned(), None)
    } else if vm_failed && derived == "failed" {
        ("failed".to_owned(), step_error())
    } else if let Some(s) = student {
        ("failed".to_owned(), s.error.clone())
    } else {
        (derived, None)
    }
}

/// VMs per state, and per node and state, of a grid.
pub fn counts(cells: &[Cell]) -> (Counts, BTreeMap<String, Counts>) {
    let mut all = Counts::new();
    let mut per_node: BTreeMap<String, Counts> = BTreeMap::new();
    for c in cells {
        *all.entry(c.state.clone()).or_default() += 1;
        *per_node
            .entry(c.node.clone())
            .or_default()
            .entry(c.state.clone())
            .or_default() += 1;
    }
    (all, per_node)
}

pub type Counts = BTreeMap<String, usize>;

/// VMs that are finished one way or another (the progress bar's numerator).
pub fn finished(counts: &Counts) -> usize {
    ["done", "failed", "removed"]
        .iter()
        .filter_map(|s| counts.get(*s))
        .sum()
}

/// A deployment as its page shows it.
pub struct DeploymentView {
    pub rec: DeploymentRecord,
    pub plan: Arc<Plan>,
    pub state: String,
    pub cells: Vec<Cell>,
    pub counts: Counts,
    pub per_node: BTreeMap<String, Counts>,
    /// Failed student or node set-up steps, with their error.
    pub setup_failures: Vec<String>,
    /// Dead jobs of the current epoch (what retry brings back).
    pub dead_jobs: u64,
    /// The schedule's warning, while a shutdown or the expiry it announced is coming.
    pub schedule_warning: Option<String>,
}

/// The deployment's state word (`producer status`'s) from a grid's counts.
pub async fn state_word(
    store: &Store,
    rec: &DeploymentRecord,
    counts: &Counts,
    total: usize,
    setup_failed: bool,
) -> Result<(String, u64), QueueError> {
    let g = store.queue().group_stats(&rec.scope()).await?;
    Ok((
        crate::deploy::overall_state(
            rec,
            total,
            counts,
            setup_failed,
            &g,
            &shared::queue::GroupStats::default(),
        )
        .as_str()
        .to_owned(),
        g.dead,
    ))
}

/// Everything the deployment page needs; `None` when there is no such deployment.
pub async fn deployment(
    store: &Store,
    plans: &PlanCache,
    id: &str,
) -> Result<Option<DeploymentView>, QueueError> {
    let Some((rec, plan)) = plans.load(store, id).await? else {
        return Ok(None);
    };
    let cells = cells(store, &rec, &plan, None).await?;
    let (counts, per_node) = counts(&cells);
    let failed: Vec<String> = {
        let mut c = store.queue().connection();
        redis::cmd("SMEMBERS")
            .arg(store.key_failed(&rec.vm_scope()))
            .query_async(&mut c)
            .await?
    };
    let setup: Vec<String> = failed
        .iter()
        .filter(|f| f.starts_with("student:") || f.starts_with("node:"))
        .cloned()
        .collect();
    let setup_failures = if setup.is_empty() {
        Vec::new()
    } else {
        let recs = store.some_steps(id, &setup).await?;
        let mut v: Vec<String> = recs
            .iter()
            .map(|(k, r)| format!("{k}: {}", r.error.clone().unwrap_or_default()))
            .collect();
        v.sort();
        v
    };
    let (state, dead_jobs) = state_word(
        store,
        &rec,
        &counts,
        plan.vms.len(),
        !setup_failures.is_empty(),
    )
    .await?;
    let schedule_warning = crate::cmd::schedule::status_summary(store, id)
        .await
        .ok()
        .flatten()
        .and_then(|s| s["warning"].as_str().map(String::from));
    Ok(Some(DeploymentView {
        rec,
        plan,
        state,
        cells,
        counts,
        per_node,
        setup_failures,
        dead_jobs,
        schedule_warning,
    }))
}

/// One line of the deployments list.
pub struct DeploymentRow {
    pub rec: DeploymentRecord,
    pub state: String,
    pub total: usize,
    pub counts: BTreeMap<String, usize>,
}

/// Every deployment with its counts (the counters `producer status` reads: a few small
/// reads per deployment, whatever its size).
pub async fn deployments(store: &Store) -> Result<Vec<DeploymentRow>, QueueError> {
    let mut rows = Vec::new();
    for rec in store.deployments().await? {
        let (state, total, counts) = match crate::deploy::summary(store, &rec.id).await {
            Ok(st) => (st.state.as_str().to_owned(), st.total, st.counts),
            Err(_) => (rec.phase.as_str().to_owned(), 0, BTreeMap::new()),
        };
        rows.push(DeploymentRow {
            rec,
            state,
            total,
            counts,
        });
    }
    rows.sort_by_key(|r| std::cmp::Reverse(r.rec.created));
    Ok(rows)
}

/// The queue page's figures.
pub struct QueueView {
    pub stats: shared::queue::QueueStats,
    /// Capped concurrency keys with their counts, by name.
    pub slots: Vec<(String, shared::queue::SlotStats)>,
    pub workers: Vec<shared::heartbeat::WorkerBeat>,
}

pub async fn queue(store: &Store) -> Result<QueueView, QueueError> {
    let q = store.queue();
    let stats = q.stats().await?;
    let mut c = q.connection();
    let mut names: Vec<String> = redis::cmd("HKEYS")
        .arg(q.key("caps"))
        .query_async(&mut c)
        .await?;
    names.sort();
    let mut slots = Vec::with_capacity(names.len());
    for n in names {
        let s = q.slot_stats(&n).await?;
        slots.push((n, s));
    }
    Ok(QueueView {
        stats,
        slots,
        workers: shared::heartbeat::list(q).await?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(i: usize, state: &str, node: &str) -> Cell {
        Cell {
            i,
            state: state.into(),
            vmid: Some(100 + i as u32),
            node: node.into(),
            error: None,
        }
    }

    #[test]
    fn counts_per_state_and_node() {
        let cells = [
            cell(0, "done", "pve1"),
            cell(1, "failed", "pve1"),
            cell(2, "done", "pve2"),
            cell(3, "cloning", "pve2"),
        ];
        let (all, per_node) = counts(&cells);
        assert_eq!(all["done"], 2);
        assert_eq!(all["failed"], 1);
        assert_eq!(per_node["pve2"]["cloning"], 1);
        assert_eq!(
            finished(&all),
            3,
            "done and failed are finished, cloning is not"
        );
    }
}
