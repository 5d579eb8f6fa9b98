//! `replace`: moves the students of a lost node (`jobs::node_loss`) whose VMs are not all
//! made to the remaining nodes (`jobs::debris` removes what the move left on the node once
//! it is back).
//!
//! A `replace` job (one per active deployment and loss) plans the epoch again from the files
//! its submit kept (`config::StoredFiles`) with the producer's own code (`replan::plan_with`:
//! fresh facts, the lost node offline and so refused, every other student pinned where they
//! are, placement by the capacity figures, one allocation step). Before that, the old VMID of
//! each moved VM is handed to a debris owner (`node_loss::debris_owner`), so the VM gets a
//! new VMID while the old one stays reserved as long as the VM left on the lost node may
//! exist. What is left there is recorded from the cluster's facts (the VMs
//! `/cluster/resources` lists at those VMIDs, and the moved students' bridge reservations
//! on the node) in `debris:<cluster>`, each move in `d:<scope>:moves`, and the new plan is
//! committed by compare-and-set. Then (also on a re-run after a crash) the moved VMs' old
//! jobs are cancelled (a late one is fenced), their old facts forgotten (only those naming
//! the old VMID), and the plan's jobs enqueued: only the moved VMs' (whose keys carry their
//! move count, `VmPlan::moved`) and their new node's network job are new.
//!
//! Students whose VMs were all made before the loss are not moved: their move record says
//! so, and their VMs are there again when the node is. A student that no remaining node can
//! hold is not moved either, with the placement's or the capacity check's reason.
//!
//! One file (a little over 600 lines): the re-placement is one sequence (hand the VMIDs over,
//! plan, keep the stayers, record the debris and the moves, commit; then cancel, forget and
//! enqueue) whose steps have to be read together to see that a re-run after a crash at any
//! point converges.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use crate::alloc::{self, Space};
use crate::config::StoredFiles;
use crate::jobs::node_loss::{Debris, Move, debris_owner, debris_spec};
use crate::jobs::state::{Phase, PlanDoc, StepState, Store, Versioned, step_field};
use crate::jobs::{BridgePlan, Env, NodeNetworkJob, scope_of_key};
use crate::plan::{self, Plan};
use crate::queue::{FencedScript, JobError, Lease};
use crate::replan::{self, AllocMode, ReplanError};

/// Re-place the students of `node` (lost since `since_ms`) in the job's scope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplaceJob {
    pub deployment: String,
    pub cluster: String,
    pub node: String,
    pub since_ms: i64,
}

/// Remove what re-placements recorded as left on `node`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDebrisJob {
    pub cluster: String,
    pub node: String,
}

/// The field of `d:<id>` holding the files epoch `epoch` was submitted with.
pub fn files_field(epoch: u32) -> String {
    format!("files:{epoch}")
}

fn redis(e: impl std::fmt::Display) -> JobError {
    JobError::Retry(format!("redis: {e}"))
}

/// The steps of a VM's making whose old jobs a move cancels.
const VM_JOB_STEPS: [&str; 5] = ["clone", "network", "permission", "baseline", "start"];

pub async fn run(j: &ReplaceJob, lease: &Lease, env: &Env) -> Result<(), JobError> {
    let store = &env.store;
    let scope = scope_of_key(lease.job_key()).to_owned();
    let Some(prev) = store.read(&j.deployment).await.map_err(redis)? else {
        return Ok(());
    };
    // A teardown (or a later epoch) took over: its own jobs deal with the node.
    if prev.rec.phase != Phase::Active || prev.rec.scope() != scope {
        return Ok(());
    }
    let Some(plan) = stored_plan(store, &j.deployment, prev.rec.epoch).await? else {
        return Ok(());
    };
    if plan.students.iter().any(|s| s.node == j.node) {
        replan_students(j, lease, env, &prev, &plan, &scope).await?;
    }
    finish_moves(j, lease, env, &scope).await
}

async fn stored_plan(store: &Store, id: &str, epoch: u32) -> Result<Option<Plan>, JobError> {
    Ok(store
        .plan_json(id, epoch)
        .await
        .map_err(redis)?
        .and_then(|s| serde_json::from_str(&s).ok()))
}

/// Students on the lost node whose every VM step is done (not moved), and the others.
fn split_finished(
    plan: &Plan,
    lost: &str,
    steps: &BTreeMap<String, StepState>,
) -> (Vec<String>, Vec<String>) {
    let vm_steps = plan::vm_steps(plan);
    let (mut done, mut open) = (Vec::new(), Vec::new());
    for s in plan.students.iter().filter(|s| s.node == lost) {
        let finished = plan.vms.iter().filter(|v| v.user == s.user).all(|v| {
            vm_steps
                .iter()
                .all(|st| steps.get(&step_field(&v.key, st)) == Some(&StepState::Done))
        });
        if finished {
            done.push(s.user.clone());
        } else {
            open.push(s.user.clone());
        }
    }
    (done, open)
}

async fn put_moves(store: &Store, scope: &str, moves: &[Move]) -> Result<(), JobError> {
    if moves.is_empty() {
        return Ok(());
    }
    let fields: Vec<(String, String)> = moves
        .iter()
        .map(|m| {
            (
                m.user.clone(),
                serde_json::to_string(m).expect("serializes"),
            )
        })
        .collect();
    let mut c = store.queue().connection();
    let _: () = c
        .hset_multiple(store.key_moves(scope), &fields)
        .await
        .map_err(redis)?;
    Ok(())
}

/// Plans the lost node's open students onto other nodes and commits the plan.
async fn replan_students(
    j: &ReplaceJob,
    lease: &Lease,
    env: &Env,
    prev: &Versioned,
    plan: &Plan,
    scope: &str,
) -> Result<(), JobError> {
    let store = &env.store;
    let q = store.queue();
    let steps: BTreeMap<String, StepState> = store
        .steps(scope)
        .await
        .map_err(redis)?
        .into_iter()
        .map(|(k, r)| (k, r.state))
        .collect();
    let (done, open) = split_finished(plan, &j.node, &steps);
    let not_moved = |user: &str, why: String| Move {
        user: user.to_owned(),
        from: j.node.clone(),
        to: None,
        why,
        since_ms: j.since_ms,
        vms: Vec::new(),
    };
    let mut moves: Vec<Move> = done
        .iter()
        .map(|u| {
            not_moved(
                u,
                format!(
                    "its VMs were all made before {} was lost; they stay there",
                    j.node
                ),
            )
        })
        .collect();
    if open.is_empty() {
        return put_moves(store, scope, &moves).await;
    }
    let mut c = q.connection();
    let files: Option<String> = c
        .hget(
            store.key_deployment(&j.deployment),
            files_field(prev.rec.epoch),
        )
        .await
        .map_err(redis)?;
    let Some(files) = files.and_then(|f| serde_json::from_str::<StoredFiles>(&f).ok()) else {
        let why = "its deployment was submitted by a version that did not keep its files: submit it again to move it".to_owned();
        moves.extend(open.iter().map(|u| not_moved(u, why.clone())));
        return put_moves(store, scope, &moves).await;
    };
    let cfg = files
        .config(
            env.clusters.connections().clone(),
            &plan.cluster,
            &plan.name,
        )
        .map_err(|e| JobError::Permanent(format!("the stored files no longer validate: {e}")))?;
    let pve = env.pve(&j.cluster)?;
    let mut facts = replan::gather_facts(&pve, &cfg)
        .await
        .map_err(crate::jobs::pve_error)?;
    let vm_facts = store.vm_facts(scope).await.map_err(redis)?;
    let open_set: BTreeSet<&str> = open.iter().map(String::as_str).collect();
    let moving: Vec<&plan::VmPlan> = plan
        .vms
        .iter()
        .filter(|v| open_set.contains(v.user.as_str()))
        .collect();
    // The old VMIDs go to debris owners first, so the allocation below hands out new ones.
    let vmid_space = Space::vmids(q, &j.cluster);
    let mut old_vmids: BTreeMap<String, u32> = BTreeMap::new();
    for v in &moving {
        let owner = plan::vm_owner(&plan.id, &v.key);
        let mut allowed = vec![v.vmid];
        if let Some(f) = vm_facts.get(&v.key) {
            allowed.push(f.vmid);
        }
        let to = debris_owner(&owner, &j.node);
        let handed = alloc::rename(q, &vmid_space, &owner, &to, &allowed)
            .await
            .map_err(|e| JobError::Retry(e.to_string()))?;
        let old = match handed {
            Some(n) => n,
            // Handed over by an earlier run of this job.
            None => alloc::lookup(q, &vmid_space, &to)
                .await
                .map_err(|e| JobError::Retry(e.to_string()))?
                .unwrap_or(v.vmid),
        };
        old_vmids.insert(v.key.clone(), old);
    }
    let pins: BTreeMap<String, String> = plan
        .students
        .iter()
        .chain(&plan.retired_students)
        .filter(|s| !open_set.contains(s.user.as_str()))
        .map(|s| (s.user.clone(), s.node.clone()))
        .collect();
    // The moved students' VMs are made anew: the placement counts all of their memory.
    let mut prior = plan.clone();
    prior.vms.retain(|v| !open_set.contains(v.user.as_str()));
    let mut next = match replan::plan_with(
        &cfg,
        &mut facts,
        store,
        AllocMode::Reserve,
        Some(&prior),
        &pins,
    )
    .await
    {
        Ok(p) => p,
        Err(e @ (ReplanError::Placement(_) | ReplanError::CapacityRefused { .. })) => {
            let why = format!("no remaining node can hold it: {e}");
            moves.extend(open.iter().map(|u| not_moved(u, why.clone())));
            put_moves(store, scope, &moves).await?;
            return Err(JobError::RetryAfter(Duration::from_secs(30), why));
        }
        Err(e) => return Err(JobError::Retry(e.to_string())),
    };
    next.retired = plan.retired.clone();
    next.retired_students = plan.retired_students.clone();
    keep_on_lost_node(&mut next, plan, &j.node, &open_set, env).await?;
    next.carry_moves(plan);
    for v in next
        .vms
        .iter_mut()
        .filter(|v| open_set.contains(v.user.as_str()))
    {
        let before = plan
            .vms
            .iter()
            .find(|o| o.key == v.key)
            .map_or(0, |o| o.moved);
        v.moved = before + 1;
    }
    record_debris(j, env, plan, scope, &open_set, &old_vmids, &facts).await?;
    for u in &open {
        let to = next
            .students
            .iter()
            .find(|s| &s.user == u)
            .map(|s| s.node.clone());
        let vms = next
            .vms
            .iter()
            .filter(|v| &v.user == u)
            .map(|v| {
                (
                    v.key.clone(),
                    old_vmids.get(&v.key).copied().unwrap_or(0),
                    v.vmid,
                )
            })
            .collect();
        moves.push(Move {
            user: u.clone(),
            from: j.node.clone(),
            why: format!(
                "{} was lost (offline or unreachable past node_lost_after)",
                j.node
            ),
            to,
            since_ms: j.since_ms,
            vms,
        });
    }
    put_moves(store, scope, &moves).await?;
    lease.check().await?;
    let mut rec = prev.rec.clone();
    rec.updated = chrono::Utc::now();
    if let Some(t) = rec.totals.as_mut() {
        t.per_node = BTreeMap::new();
        for v in &next.vms {
            *t.per_node.entry(v.node.clone()).or_default() += 1;
        }
    }
    let json = serde_json::to_string(&next).expect("serializes");
    let doc = PlanDoc {
        json: &json,
        vm_steps: &plan::vm_steps(&next),
        sealed: None,
    };
    if !store
        .commit(Some(prev), &rec, Some(doc))
        .await
        .map_err(redis)?
    {
        return Err(JobError::Retry(
            "the deployment changed while its students were re-placed; planning again".into(),
        ));
    }
    tracing::warn!(deployment = %j.deployment, node = %j.node, students = open.len(), "students moved off a lost node");
    Ok(())
}

/// Puts back, as the old plan had them, the students that stay on the lost node (their VMs
/// were all made): the placement, which refuses an offline node, planned them elsewhere, with
/// bridges reserved there that they will never use (freed here).
async fn keep_on_lost_node(
    next: &mut Plan,
    plan: &Plan,
    lost: &str,
    moving: &BTreeSet<&str>,
    env: &Env,
) -> Result<(), JobError> {
    let q = env.store.queue();
    let stay: BTreeSet<&str> = plan
        .students
        .iter()
        .filter(|s| s.node == lost && !moving.contains(s.user.as_str()))
        .map(|s| s.user.as_str())
        .collect();
    if stay.is_empty() {
        return Ok(());
    }
    let of_stayer = |b: &BridgePlan| stay.iter().any(|u| b.owner.starts_with(&format!("{u} ")));
    for s in next
        .students
        .iter_mut()
        .filter(|s| stay.contains(s.user.as_str()))
    {
        if s.node != lost {
            let owners: Vec<String> = s
                .bridges
                .keys()
                .map(|a| plan::bridge_owner_of(&plan.id, &s.user, a))
                .collect();
            alloc::release(q, &Space::bridges(q, &plan.cluster, &s.node), &owners)
                .await
                .map_err(|e| JobError::Retry(e.to_string()))?;
        }
        if let Some(old) = plan.students.iter().find(|o| o.user == s.user) {
            *s = old.clone();
        }
        next.placement.nodes.insert(s.user.clone(), lost.to_owned());
    }
    for v in next
        .vms
        .iter_mut()
        .filter(|v| stay.contains(v.user.as_str()))
    {
        if let Some(old) = plan.vms.iter().find(|o| o.key == v.key) {
            *v = old.clone();
        }
    }
    for nn in &mut next.node_networks {
        nn.bridges.retain(|b| !of_stayer(b));
    }
    let kept: Vec<BridgePlan> = plan
        .node_networks
        .iter()
        .filter(|nn| nn.node == lost)
        .flat_map(|nn| nn.bridges.iter().filter(|b| of_stayer(b)).cloned())
        .collect();
    if !kept.is_empty() {
        match next.node_networks.iter_mut().find(|nn| nn.node == lost) {
            Some(nn) => {
                nn.bridges.extend(kept);
                nn.bridges.sort();
            }
            None => next.node_networks.push(NodeNetworkJob {
                deployment: plan.id.clone(),
                cluster: plan.cluster.clone(),
                node: lost.to_owned(),
                bridges: kept,
            }),
        }
    }
    next.node_networks.retain(|nn| !nn.bridges.is_empty());
    Ok(())
}

/// Records what the moved students leave on the lost node, from the cluster's facts: the
/// VMs at their old VMIDs, and their bridge reservations on the node. An old VMID nothing
/// is at is freed at once.
async fn record_debris(
    j: &ReplaceJob,
    env: &Env,
    plan: &Plan,
    scope: &str,
    open: &BTreeSet<&str>,
    old_vmids: &BTreeMap<String, u32>,
    facts: &plan::Facts,
) -> Result<(), JobError> {
    let store = &env.store;
    let q = store.queue();
    let vm_facts = store.vm_facts(scope).await.map_err(redis)?;
    let mut fields: Vec<(String, String)> = Vec::new();
    for (key, old) in old_vmids {
        let owner = debris_owner(&plan::vm_owner(&plan.id, key), &j.node);
        match facts.vm_nodes.get(old) {
            Some(node) => {
                let d = Debris::Vm {
                    deployment: plan.id.clone(),
                    vm: key.clone(),
                    epoch: crate::jobs::epoch_of_scope(scope),
                    vmid: *old,
                    node: node.clone(),
                    upid: vm_facts.get(key).and_then(|f| f.upid.clone()),
                    owner,
                };
                fields.push((
                    d.field(&j.node),
                    serde_json::to_string(&d).expect("serializes"),
                ));
            }
            None => {
                alloc::release(q, &Space::vmids(q, &j.cluster), &[owner])
                    .await
                    .map_err(|e| JobError::Retry(e.to_string()))?;
            }
        }
    }
    let space = Space::bridges(q, &j.cluster, &j.node);
    for s in plan
        .students
        .iter()
        .filter(|s| open.contains(s.user.as_str()))
    {
        for alias in s.bridges.keys() {
            let owner = plan::bridge_owner_of(&plan.id, &s.user, alias);
            if let Some(n) = alloc::lookup(q, &space, &owner)
                .await
                .map_err(|e| JobError::Retry(e.to_string()))?
            {
                let d = Debris::Bridge {
                    deployment: plan.id.clone(),
                    node: j.node.clone(),
                    iface: format!("vmbr{n}"),
                    owner,
                };
                fields.push((
                    d.field(&j.node),
                    serde_json::to_string(&d).expect("serializes"),
                ));
            }
        }
    }
    if !fields.is_empty() {
        let mut c = q.connection();
        let _: () = c
            .hset_multiple(store.key_debris(&j.cluster), &fields)
            .await
            .map_err(redis)?;
    }
    Ok(())
}

/// Forgets one VM's facts, only while the lease holds and only if they still name `vmid`.
static FORGET_VM: std::sync::LazyLock<FencedScript> = std::sync::LazyLock::new(|| {
    FencedScript::new(
        r#"
local v = redis.call('HGET', ARGV[4], ARGV[5])
if v and cjson.decode(v).vmid == tonumber(ARGV[6]) then redis.call('HDEL', ARGV[4], ARGV[5]) end
return 1
"#,
    )
});

/// Forgets a step record that no job will write again (the lost node's bridges step, when
/// no student is left there), only while the lease holds.
static FORGET_STEP: std::sync::LazyLock<FencedScript> = std::sync::LazyLock::new(|| {
    FencedScript::new(
        r#"
redis.call('HDEL', ARGV[4], ARGV[6])
redis.call('SREM', ARGV[5], ARGV[6])
return 1
"#,
    )
});

/// Cancels the lost node's network jobs that the plan no longer has (their bridges are
/// planned elsewhere now, or not at all), and forgets the node's step record when the plan
/// makes no bridges there any more.
async fn retire_node_network(
    j: &ReplaceJob,
    lease: &Lease,
    env: &Env,
    plan: &Plan,
    scope: &str,
) -> Result<(), JobError> {
    let store = &env.store;
    let q = store.queue();
    let current: Option<String> = plan
        .node_networks
        .iter()
        .find(|nn| nn.node == j.node)
        .map(|nn| crate::jobs::keys::node_network(scope, &nn.node, &nn.bridges));
    let prefix = format!("{scope}/node-network/{}/", j.node);
    let stale: Vec<String> = q
        .group_jobs(scope)
        .await
        .map_err(redis)?
        .into_iter()
        .filter(|k| k.starts_with(&prefix) && Some(k) != current.as_ref())
        .collect();
    q.cancel_jobs(&stale).await.map_err(redis)?;
    if current.is_none() {
        let field = step_field(&format!("node:{}", j.node), "bridges");
        lease
            .eval_fenced(
                &FORGET_STEP,
                &[&store.key_steps(scope), &store.key_failed(scope)],
                &[&field],
            )
            .await?;
    }
    Ok(())
}

/// After the plan moved: cancels the moved VMs' old jobs, forgets their old facts, sets the
/// caps of their new slots and enqueues the plan's jobs (only the new ones are created).
async fn finish_moves(
    j: &ReplaceJob,
    lease: &Lease,
    env: &Env,
    scope: &str,
) -> Result<(), JobError> {
    let store = &env.store;
    let q = store.queue();
    let moves: Vec<Move> = store
        .moves(scope)
        .await
        .map_err(redis)?
        .into_values()
        .filter(|m| m.from == j.node && m.since_ms == j.since_ms && m.to.is_some())
        .collect();
    if moves.is_empty() {
        return Ok(());
    }
    let Some(rec) = store.read(&j.deployment).await.map_err(redis)? else {
        return Ok(());
    };
    let Some(plan) = stored_plan(store, &j.deployment, rec.rec.epoch).await? else {
        return Ok(());
    };
    let mut old_jobs = Vec::new();
    for (key, old_vmid, _) in moves.iter().flat_map(|m| &m.vms) {
        let Some(v) = plan.vms.iter().find(|v| &v.key == key) else {
            continue;
        };
        if v.moved == 0 {
            continue;
        }
        let subject = plan::vm_job_subject(key, v.moved - 1);
        old_jobs.extend(VM_JOB_STEPS.map(|st| crate::jobs::keys::vm_step(scope, &subject, st)));
        lease
            .eval_fenced(
                &FORGET_VM,
                &[&store.key_vms(scope)],
                &[key, &old_vmid.to_string()],
            )
            .await?;
    }
    q.cancel_jobs(&old_jobs).await.map_err(redis)?;
    retire_node_network(j, lease, env, &plan, scope).await?;
    if let Some(conn) = env.clusters.connections().clusters.get(&plan.cluster) {
        replan::set_caps(q, &plan, &conn.caps)
            .await
            .map_err(redis)?;
    }
    lease.check().await?;
    let still_lost = store
        .lost_nodes(&j.cluster)
        .await
        .map_err(redis)?
        .contains_key(&j.node);
    enqueue_plan(store, &plan, scope, still_lost.then_some(j.node.as_str())).await?;
    // The node came back before this move was made: its debris job has run already.
    if !still_lost {
        q.enqueue(&debris_spec(&j.cluster, &j.node, &format!("after-{scope}")))
            .await
            .map_err(redis)?;
    }
    Ok(())
}

/// Enqueues the jobs of `plan` (those that exist already stay as they are), except, while
/// `lost` is lost, the network job of that node: it could only fail until the node is back,
/// and the node's `node-debris` job enqueues the plans again then.
pub async fn enqueue_plan(
    store: &Store,
    plan: &Plan,
    scope: &str,
    lost: Option<&str>,
) -> Result<(), JobError> {
    let sealed = store
        .sealed(&plan.id, crate::jobs::epoch_of_scope(scope))
        .await
        .map_err(redis)?;
    let skip = lost.map(|n| format!("{scope}/node-network/{n}/"));
    let specs: Vec<_> = plan::jobs(plan, scope, &sealed)
        .into_iter()
        .filter(|s| skip.as_ref().is_none_or(|p| !s.key.starts_with(p.as_str())))
        .collect();
    store.queue().enqueue_batch(&specs).await.map_err(redis)?;
    Ok(())
}

/// After a lost node is back: enqueues again the plan of every active deployment on the
/// cluster that has bridges to make there (the network job a move left out).
pub async fn converge_on_return(env: &Env, cluster: &str, node: &str) -> Result<(), JobError> {
    let store = &env.store;
    for d in store.deployments().await.map_err(redis)? {
        if d.cluster != cluster || d.phase != Phase::Active {
            continue;
        }
        if let Some(plan) = stored_plan(store, &d.id, d.epoch).await?
            && plan.node_networks.iter().any(|nn| nn.node == node)
        {
            enqueue_plan(store, &plan, &d.scope(), None).await?;
        }
    }
    Ok(())
}
