//! `teardown-finish`: the last job of a teardown (gated on its destroys and cleanups) or of
//! a prune. It checks the cluster for anything of the torn-down epoch that is still there
//! (a clone fenced by the teardown may have finished after its destroy job looked) and
//! removes it, then in one fenced compare-and-set ([`Store::finish`]) moves the
//! deployment's phase and frees what the finished teardown leaves behind: VMIDs and bridge
//! names no later epoch uses, the epoch's progress records and plan, the students it alone
//! listed; it leaves a tombstone per VMID. Last, the torn-down epochs' queue records go.
//! Done when: the record no longer lists the teardown as unfinished.
//!
//! [`Store::finish`]: crate::jobs::state::Store::finish

use std::collections::{BTreeMap, BTreeSet};

use chrono::Utc;

use crate::alloc::Space;
use crate::jobs::destroy::{self, Target};
use crate::jobs::state::{FinishOps, Phase, RECORD_RETENTION, TOMBSTONE_RETENTION, Versioned};
use crate::jobs::{Env, PruneSet, TeardownFinishJob, find_marker, pve_error, scope};
use crate::plan::{self, Plan};
use crate::queue::{JobError, Lease};

fn redis(e: impl std::fmt::Display) -> JobError {
    JobError::Retry(format!("redis: {e}"))
}

pub async fn run(j: &TeardownFinishJob, lease: &Lease, env: &Env) -> Result<(), JobError> {
    let Some(v) = env.store.read(&j.deployment).await.map_err(redis)? else {
        return Ok(()); // nothing recorded: nothing to finish
    };
    match &j.prune {
        Some(p) => finish_prune(j, p, &v, lease, env).await,
        None => finish_teardown(j, &v, lease, env).await,
    }
}

async fn finish_teardown(
    j: &TeardownFinishJob,
    v: &Versioned,
    lease: &Lease,
    env: &Env,
) -> Result<(), JobError> {
    let id = &j.deployment;
    let store = &env.store;
    let vm_epoch = j.epoch.saturating_sub(1);
    let vm_scope = scope(id, vm_epoch);
    if !v.rec.teardown_finished(j.epoch) {
        let facts = store.vm_facts(&vm_scope).await.map_err(redis)?;
        let keys: Vec<&String> = facts.keys().collect();
        verify(j, env, lease, vm_epoch, &facts, &keys).await?;
        let plans = store.plans(id).await.map_err(redis)?;
        let finished: Option<Plan> = plans
            .get(&vm_epoch)
            .and_then(|p| serde_json::from_str(p).ok());
        if let Some(p) = &finished {
            sweep(
                j,
                p,
                p.students.iter().chain(&p.retired_students),
                lease,
                env,
            )
            .await?;
        }
        let others: Vec<Plan> = plans
            .iter()
            .filter(|(e, _)| **e != vm_epoch)
            .filter_map(|(_, p)| serde_json::from_str(p).ok())
            .collect();
        let now = Utc::now();
        let mut rec = v.rec.clone();
        rec.teardowns.retain(|e| *e != j.epoch);
        let torn_down = rec.phase == Phase::TearingDown && rec.epoch == j.epoch;
        if torn_down {
            rec.phase = Phase::TornDown;
            rec.finished = Some(now);
        }
        rec.updated = now;
        let mut ops = FinishOps::default();
        ops.del.extend(store.progress_keys(&vm_scope));
        ops.del.extend(store.progress_keys(&scope(id, j.epoch)));
        // What the operations on the torn-down VMs recorded (power states, reset memos).
        ops.del.push(store.key_power(&vm_scope));
        ops.del.push(store.key_op_memo(&vm_scope));
        ops.hdel.push(crate::jobs::state::plan_field(vm_epoch));
        ops.hdel.push(crate::jobs::state::sealed_field(vm_epoch));
        ops.hdel.push(crate::jobs::replace::files_field(vm_epoch));
        if torn_down {
            ops.del.push(store.key_events(id));
            ops.hdel.push("vmsteps".into());
            ops.expire_ms = RECORD_RETENTION.as_millis() as u64;
        }
        if let Some(p) = &finished {
            let vms: Vec<&str> = p
                .vms
                .iter()
                .chain(&p.retired)
                .map(|v| v.key.as_str())
                .collect();
            let users: Vec<&str> = p
                .students
                .iter()
                .chain(&p.retired_students)
                .map(|s| s.user.as_str())
                .collect();
            let bridges: Vec<(String, String)> = p
                .students
                .iter()
                .chain(&p.retired_students)
                .flat_map(|s| {
                    s.bridges
                        .keys()
                        .map(|a| (s.node.clone(), format!("{} {a}", s.user)))
                })
                .collect();
            frees(
                env,
                &mut ops,
                (id, &p.cluster),
                &others,
                &vms,
                &users,
                &bridges,
            );
        }
        tombstones(env, &mut ops, &j.cluster, id, &facts, now);
        store.finish(lease, v, &rec, &ops).await?;
        tracing::info!(deployment = %id, epoch = j.epoch, torn_down, "teardown finished");
        release_waiting_epoch(id, &rec, lease, env).await?;
    } else {
        // Finished before a re-delivery of this job: the waiting epoch's jobs may not have
        // been enqueued (they go with this job's ack). Enqueueing is idempotent by key.
        release_waiting_epoch(id, &v.rec, lease, env).await?;
    }
    // The finished epochs' queue records (idempotent: also after a re-delivery). This job's
    // own record goes with its ack.
    let q = store.queue();
    for e in 0..=j.epoch {
        q.purge_group(&scope(id, e)).await.map_err(redis)?;
    }
    Ok(())
}

/// A submit made during the teardown stored its epoch's plan and enqueued nothing: once no
/// teardown is left, its jobs go in with this job's ack (one atomic step).
async fn release_waiting_epoch(
    id: &str,
    rec: &crate::jobs::state::DeploymentRecord,
    lease: &Lease,
    env: &Env,
) -> Result<(), JobError> {
    if rec.phase != Phase::Active || !rec.teardowns.is_empty() {
        return Ok(());
    }
    let Some(plan) = env
        .store
        .plan_json(id, rec.epoch)
        .await
        .map_err(redis)?
        .and_then(|p| serde_json::from_str::<Plan>(&p).ok())
    else {
        return Ok(());
    };
    let sealed = env.store.sealed(id, rec.epoch).await.map_err(redis)?;
    let specs = plan::jobs(&plan, &rec.scope(), &sealed);
    tracing::info!(deployment = %id, epoch = rec.epoch, jobs = specs.len(), "enqueueing the epoch that waited for this teardown");
    lease.add_followups(specs);
    Ok(())
}

async fn finish_prune(
    j: &TeardownFinishJob,
    p: &PruneSet,
    v: &Versioned,
    lease: &Lease,
    env: &Env,
) -> Result<(), JobError> {
    let id = &j.deployment;
    let store = &env.store;
    let sc = scope(id, j.epoch);
    if v.rec.phase != Phase::Active || v.rec.epoch != j.epoch {
        // Torn down (or reset) since: that teardown removes and frees all of it.
        return Ok(());
    }
    let facts = store.vm_facts(&sc).await.map_err(redis)?;
    let keys: Vec<&String> = p.vms.iter().filter(|k| facts.contains_key(*k)).collect();
    verify(j, env, lease, j.epoch, &facts, &keys).await?;
    let plans = store.plans(id).await.map_err(redis)?;
    let current: Vec<Plan> = plans
        .values()
        .filter_map(|p| serde_json::from_str(p).ok())
        .collect();
    // The pruned VMs are in no stored plan any more (the submit that pruned them wrote the
    // plan without them), so "the plan they came from" is built from the prune set.
    let mut ops = FinishOps {
        forget_vms: p.vms.clone(),
        scope_keys: store.progress_keys(&sc).to_vec(),
        vm_steps: ALL_VM_STEPS.iter().map(|s| (*s).to_owned()).collect(),
        forget_jobs: p.jobs.clone(),
        forget_matching: p
            .bridges
            .iter()
            .map(|(node, _)| node)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .map(|node| {
                let prefix = crate::jobs::keys::node_network(&sc, node, &[]);
                let prefix = prefix.rsplit_once('/').map_or(prefix.as_str(), |(a, _)| a);
                (
                    sc.clone(),
                    crate::jobs::state::glob_prefix(&format!("{prefix}/")),
                )
            })
            .collect(),
        ..FinishOps::default()
    };
    let vms: Vec<&str> = p.vms.iter().map(String::as_str).collect();
    let users: Vec<&str> = p.users.iter().map(String::as_str).collect();
    frees(
        env,
        &mut ops,
        (id, &j.cluster),
        &current,
        &vms,
        &users,
        &p.bridges,
    );
    let pruned: std::collections::HashMap<String, crate::jobs::state::VmFacts> = facts
        .into_iter()
        .filter(|(k, _)| p.vms.contains(k))
        .collect();
    tombstones(env, &mut ops, &j.cluster, id, &pruned, Utc::now());
    let mut rec = v.rec.clone();
    rec.updated = Utc::now();
    store.finish(lease, v, &rec, &ops).await
}

/// Runs the students' and nodes' cleanup once more, now that every job of the torn-down
/// epoch has stopped: a student or bridge job fenced by the teardown may have made its user,
/// pool or bridge after the cleanup job looked. Both cleanups converge (what is gone stays
/// gone; a user another deployment lists is kept).
async fn sweep<'a>(
    j: &TeardownFinishJob,
    plan: &Plan,
    students: impl Iterator<Item = &'a crate::plan::StudentPlan>,
    lease: &Lease,
    env: &Env,
) -> Result<(), JobError> {
    let mut nodes = BTreeSet::new();
    for s in students {
        let sj = crate::jobs::StudentJob {
            deployment: plan.id.clone(),
            cluster: plan.cluster.clone(),
            user: s.user.clone(),
            pool: s.pool.clone(),
            role: plan.role.clone(),
            sealed_password: None,
        };
        crate::jobs::teardown::student(&sj, lease, env).await?;
        if !s.bridges.is_empty() {
            nodes.insert(s.node.clone());
        }
    }
    if j.prune.is_none() {
        for node in nodes {
            let nj = crate::jobs::NodeNetworkJob {
                deployment: plan.id.clone(),
                cluster: plan.cluster.clone(),
                node,
                bridges: vec![],
            };
            crate::jobs::teardown::node_network(&nj, lease, env).await?;
        }
    }
    Ok(())
}

/// Removes what is still on the cluster of `keys` (VMs of `epoch` by their facts), unless
/// quarantined; fails (to run again) when something could not be removed yet.
async fn verify(
    j: &TeardownFinishJob,
    env: &Env,
    lease: &Lease,
    epoch: u32,
    facts: &std::collections::HashMap<String, crate::jobs::state::VmFacts>,
    keys: &[&String],
) -> Result<(), JobError> {
    if keys.is_empty() {
        return Ok(());
    }
    let pve = env.pve(&j.cluster)?;
    let quarantined: BTreeSet<u32> = env
        .store
        .quarantined(&j.cluster)
        .await
        .map_err(redis)?
        .into_iter()
        .map(|q| q.vmid)
        .collect();
    let present: BTreeMap<u32, String> = pve
        .cluster_vms()
        .await
        .map_err(pve_error)?
        .into_iter()
        .map(|v| (v.vmid, v.node))
        .collect();
    for key in keys {
        let Some(f) = facts.get(*key) else { continue };
        let Some(node) = present.get(&f.vmid) else {
            continue;
        };
        if quarantined.contains(&f.vmid) {
            continue;
        }
        let cfg = match pve.vm_config(node, f.vmid).await {
            Ok(c) => c,
            Err(crate::pve::PveError::NotFound { .. }) => continue,
            Err(e) => return Err(pve_error(e)),
        };
        let desc = cfg.description().unwrap_or_default();
        let ours = find_marker(&desc, &j.deployment, key).is_ours(epoch);
        let half_made = cfg.lock().as_deref() == Some("clone") && desc.is_empty();
        if !(ours || half_made) {
            continue;
        }
        tracing::info!(vmid = f.vmid, vm = %key, "still on the cluster after its destroy; removing it");
        let t = Target {
            cluster: &j.cluster,
            deployment: &j.deployment,
            key,
            epoch,
            facts: f,
            owner: crate::plan::vm_owner(&j.deployment, key),
        };
        destroy::remove(&t, lease, env).await?;
    }
    Ok(())
}

/// Every step a VM's records may name (a pruned VM's are all removed).
const ALL_VM_STEPS: &[&str] = &["clone", "network", "permission", "start", "destroy"];

/// Adds to `ops` the freeing of what `vms`, `users` and `bridges` (node, owner `<user>
/// <alias>`) of deployment `id` on `cluster` held, except what another stored plan
/// (`others`) still uses.
fn frees(
    env: &Env,
    ops: &mut FinishOps,
    (id, cluster): (&str, &str),
    others: &[Plan],
    vms: &[&str],
    users: &[&str],
    bridges: &[(String, String)],
) {
    let q = env.store.queue();
    let kept_vms: BTreeSet<&str> = others
        .iter()
        .flat_map(|p| p.vms.iter().chain(&p.retired))
        .map(|v| v.key.as_str())
        .collect();
    let kept_users: BTreeSet<&str> = others
        .iter()
        .flat_map(|p| p.students.iter().chain(&p.retired_students))
        .map(|s| s.user.as_str())
        .collect();
    let kept_bridges: BTreeSet<(String, String)> = others
        .iter()
        .flat_map(|p| p.students.iter().chain(&p.retired_students))
        .flat_map(|s| {
            s.bridges
                .keys()
                .map(|a| (s.node.clone(), format!("{} {a}", s.user)))
        })
        .collect();
    let owners: Vec<String> = vms
        .iter()
        .filter(|k| !kept_vms.contains(*k))
        .map(|k| plan::vm_owner(id, k))
        .collect();
    let space = Space::vmids(q, cluster);
    let (ids, own) = space.keys();
    ops.release.push((ids.to_owned(), own.to_owned(), owners));
    let mut by_node: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (node, owner) in bridges.iter().filter(|b| !kept_bridges.contains(*b)) {
        let (user, alias) = owner.split_once(' ').unwrap_or((owner.as_str(), ""));
        by_node
            .entry(node)
            .or_default()
            .push(plan::bridge_owner_of(id, user, alias));
    }
    for (node, owners) in by_node {
        let space = Space::bridges(q, cluster, node);
        let (ids, own) = space.keys();
        ops.release.push((ids.to_owned(), own.to_owned(), owners));
    }
    for u in users.iter().filter(|u| !kept_users.contains(*u)) {
        ops.srem
            .push((env.store.key_student_users(cluster, u), id.to_owned()));
    }
}

/// Records which deployment last used each VMID, and trims tombstones past their retention.
fn tombstones(
    env: &Env,
    ops: &mut FinishOps,
    cluster: &str,
    id: &str,
    facts: &std::collections::HashMap<String, crate::jobs::state::VmFacts>,
    now: chrono::DateTime<Utc>,
) {
    let key = env.store.key_tombstones(cluster);
    let ms = now.timestamp_millis();
    for (vm, f) in facts {
        ops.zadd
            .push((key.clone(), ms, format!("{}|{id}|{vm}", f.vmid)));
        for q in &f.quarantined {
            ops.zadd.push((key.clone(), ms, format!("{q}|{id}|{vm}")));
        }
    }
    ops.ztrim
        .push((key, ms - TOMBSTONE_RETENTION.as_millis() as i64));
}
