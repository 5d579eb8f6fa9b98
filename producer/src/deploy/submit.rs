//! `submit`: facts, plan, the record moved by compare-and-set, then the epoch's jobs (or,
//! during a teardown, none: the teardown's finish job enqueues them).

use std::collections::BTreeMap;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::Serialize;
use shared::config::Config;
use shared::jobs::state::{self, DeploymentRecord, Phase, PlanDoc, Store, Totals, Versioned};
use shared::jobs::teardown_jobs;
use shared::plan::{self, Plan};
use shared::pve::PveClient;
use shared::secret::{Secret, SecretKey};

use super::allocate::{AllocMode, plan_with};
use super::teardown::ensure_teardowns;
use super::{DeployError, gather_facts, plan_of, read};

/// The initial password of a student, derived from the key and the deployment: the same
/// every time it is asked (so `handout` can print it again), unguessable without the key.
pub fn student_password(key: &SecretKey, deployment: &str, user: &str) -> Secret {
    let bytes = key.derive("student-password", &format!("{deployment}|{user}"));
    let s = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&bytes[..12]);
    Secret::new(s)
}

/// How a submit treats what an earlier submit had and the files no longer list.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubmitOptions {
    /// Remove those VMs, pools, bridges (and users nobody else lists) now, through the
    /// same jobs and safety rules as a teardown; without it they are kept (not-in-files).
    pub prune: bool,
}

/// What a submit did besides enqueueing its plan.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Submitted {
    /// The teardown epochs this submit's jobs wait for (a submit during a teardown).
    pub waits_for_teardowns: Vec<u32>,
    /// VMs being removed by `--prune`.
    pub pruning: Vec<String>,
    /// Students whose pools (and users) `--prune` removes.
    pub pruning_students: Vec<String>,
}

/// Submits (or resubmits: converges) the deployment. Returns its id.
pub async fn submit(
    cfg: &Config,
    pve: &PveClient,
    store: &Store,
    key: Option<&SecretKey>,
) -> Result<(String, Plan), DeployError> {
    submit_with(cfg, pve, store, key, SubmitOptions::default())
        .await
        .map(|(id, plan, _)| (id, plan))
}

/// Submits with options. A submit while the deployment is being torn down is accepted: it
/// starts the next epoch, whose jobs wait for the teardown's finish job (the reset of a
/// lab: `teardown` then `submit` at once). The record moves by compare-and-set: when
/// another producer or a worker moved it in between, the submit reads it again.
pub async fn submit_with(
    cfg: &Config,
    pve: &PveClient,
    store: &Store,
    key: Option<&SecretKey>,
    opts: SubmitOptions,
) -> Result<(String, Plan, Submitted), DeployError> {
    let mut facts = gather_facts(pve, cfg)
        .await
        .map_err(|e| DeployError::proxmox("reading the cluster", e))?;
    let id = plan::deployment_id(cfg);
    for _ in 0..8 {
        let prev = read(store, &id).await?;
        let now = Utc::now();
        // The plan whose VMs exist now (pins students to their nodes) and, when active,
        // whose retired VMs carry over.
        let prior = match &prev {
            Some(v) => plan_of(store, &v.rec, v.rec.vm_epoch()).await?,
            None => None,
        };
        let mut rec = next_record(prev.as_ref(), cfg, &id, now);
        let was_active = prev.as_ref().is_some_and(|v| v.rec.phase == Phase::Active);
        let mut plan =
            plan_with(cfg, &mut facts, store, AllocMode::Reserve, prior.as_ref()).await?;
        let pruned = match (&prior, was_active) {
            (Some(prior), true) => retire(&mut plan, prior, opts),
            _ => None,
        };
        rec.totals = Some(totals_of(&plan));
        let sealed = seal_passwords(&plan, &id, key)?;
        shared::replan::set_caps(store.queue(), &plan, &cfg.connection().caps).await?;
        let plan_json = serde_json::to_string(&plan)?;
        let sealed_json = serde_json::to_string(&sealed)?;
        // Before the jobs: a worker's step record reads the VM steps to derive the VM's state.
        let doc = PlanDoc {
            json: &plan_json,
            vm_steps: &plan::vm_steps(&plan),
            sealed: Some(&sealed_json),
        };
        if !store.commit(prev.as_ref(), &rec, Some(doc)).await? {
            tracing::info!(deployment = %id, "deployment changed while submitting; reading it again");
            continue;
        }
        keep_files(cfg, store, &rec).await?;
        let done = enqueue(store, &rec, &plan, &sealed, pruned.as_ref()).await?;
        install_schedule(cfg, store, &id, &plan).await?;
        return Ok((id, plan, done));
    }
    Err(DeployError::Contended {
        id,
        doing: "submitting",
    })
}

/// Keeps the deployment and users files with the epoch's plan, so that a worker can plan the
/// epoch again when a node is lost (`shared::jobs::replace`). Files that cannot be read again
/// (moved since the submit read them) are not kept: such students are then reported, not moved.
async fn keep_files(
    cfg: &Config,
    store: &Store,
    rec: &DeploymentRecord,
) -> Result<(), DeployError> {
    let files = match shared::config::StoredFiles::read(cfg) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(error = %e, "the files cannot be kept for re-placement");
            return Ok(());
        }
    };
    let json = serde_json::to_string(&files)?;
    let mut c = store.queue().connection();
    redis::AsyncCommands::hset::<_, _, _, ()>(
        &mut c,
        store.key_deployment(&rec.id),
        shared::jobs::replace::files_field(rec.epoch),
        json,
    )
    .await
    .map_err(shared::queue::QueueError::from)?;
    Ok(())
}

/// The record a submit writes: the same epoch while active, the next one after (or during)
/// a teardown.
fn next_record(
    prev: Option<&Versioned>,
    cfg: &Config,
    id: &str,
    now: DateTime<Utc>,
) -> DeploymentRecord {
    let mut rec = match prev {
        None => DeploymentRecord::new(id, &cfg.cluster, &cfg.deployment.name, now),
        Some(v) => v.rec.clone(),
    };
    match rec.phase {
        Phase::Active => {}
        Phase::TearingDown => {
            // The reset of a lab: the next epoch waits for this teardown to finish.
            if !rec.teardowns.contains(&rec.epoch) {
                rec.teardowns.push(rec.epoch);
            }
            rec.epoch += 1;
            rec.phase = Phase::Active;
        }
        Phase::TornDown => {
            rec.epoch += 1;
            rec.phase = Phase::Active;
            rec.created = now;
        }
    }
    rec.updated = now;
    rec.finished = None;
    rec.layout = state::LAYOUT;
    rec
}

/// Carries what `prior` had and the files no longer list as retired; with `--prune`,
/// moves it out of the plan into the returned plan of what to remove.
fn retire(plan: &mut Plan, prior: &Plan, opts: SubmitOptions) -> Option<Plan> {
    plan.retire_from(prior);
    if !opts.prune || (plan.retired.is_empty() && plan.retired_students.is_empty()) {
        return None;
    }
    let mut gone = plan.clone();
    gone.vms.clear();
    gone.students.clear();
    plan.retired.clear();
    plan.retired_students.clear();
    Some(gone)
}

fn totals_of(plan: &Plan) -> Totals {
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for v in &plan.vms {
        *per_node.entry(v.node.clone()).or_default() += 1;
    }
    Totals {
        vms: plan.vms.len(),
        retired: plan.retired.len(),
        per_node,
    }
}

/// Lists the students, enqueues the epoch's jobs (and a prune's), and makes sure earlier
/// teardowns it waits for are queued.
async fn enqueue(
    store: &Store,
    rec: &DeploymentRecord,
    plan: &Plan,
    sealed: &BTreeMap<String, String>,
    pruned: Option<&Plan>,
) -> Result<Submitted, DeployError> {
    let users: Vec<&str> = plan
        .students
        .iter()
        .chain(&plan.retired_students)
        .map(|s| s.user.as_str())
        .collect();
    store.list_students(&plan.cluster, &rec.id, &users).await?;
    let scope = rec.scope();
    let mut done = Submitted {
        waits_for_teardowns: rec.teardowns.clone(),
        ..Submitted::default()
    };
    // A submit during a teardown enqueues nothing: the teardown's finish job enqueues this
    // epoch's jobs (from the plan and sealed passwords just stored) atomically with its
    // own ack, so none can run before the teardown is done.
    let mut specs = if rec.teardowns.is_empty() {
        plan::jobs(plan, &scope, sealed)
    } else {
        Vec::new()
    };
    if let Some(gone) = pruned {
        let vmids: BTreeMap<String, u32> = store
            .vm_facts(&scope)
            .await?
            .into_iter()
            .map(|(k, f)| (k, f.vmid))
            .collect();
        let round = Utc::now().timestamp_millis().to_string();
        specs.extend(teardown_jobs::prune(
            gone, &scope, rec.epoch, &round, &vmids,
        ));
        done.pruning = gone.retired.iter().map(|v| v.key.clone()).collect();
        done.pruning_students = gone
            .retired_students
            .iter()
            .map(|s| s.user.clone())
            .collect();
    }
    store.queue().enqueue_batch(&specs).await?;
    ensure_teardowns(store, rec).await?;
    tracing::info!(deployment = %rec.id, jobs = specs.len(), vms = plan.vms.len(), "submitted");
    Ok(done)
}

/// Installs, replaces or removes the deployment's schedule, and caps the start slots its
/// starts will use.
async fn install_schedule(
    cfg: &Config,
    store: &Store,
    id: &str,
    plan: &Plan,
) -> Result<(), DeployError> {
    let def = cfg.deployment.schedule.as_ref();
    if def.is_some() {
        crate::operation::set_start_caps(
            store,
            &plan.cluster,
            plan.vms.iter().map(|v| v.node.as_str()),
            cfg.connection().starts_per_node,
        )
        .await?;
    }
    Ok(shared::scheduler::install(store, id, &plan.cluster, def).await?)
}

/// The sealed initial password of every `@pve` student: a user that went missing is made
/// again with the same password (derived from the key and the deployment).
fn seal_passwords(
    plan: &Plan,
    id: &str,
    key: Option<&SecretKey>,
) -> Result<BTreeMap<String, String>, DeployError> {
    let mut sealed = BTreeMap::new();
    let pve_realm: Vec<&str> = plan
        .students
        .iter()
        .map(|s| s.user.as_str())
        .filter(|u| u.ends_with("@pve"))
        .collect();
    if pve_realm.is_empty() {
        return Ok(sealed);
    }
    let Some(key) = key else {
        if plan.students.iter().any(|s| s.create_user) {
            return Err(DeployError::NoSecretKey);
        }
        return Ok(sealed);
    };
    for u in pve_realm {
        sealed.insert(u.to_owned(), key.seal(&student_password(key, id, u)));
    }
    Ok(sealed)
}
