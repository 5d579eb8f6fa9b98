//! The producer's side of a deployment: gather the cluster's facts, place students,
//! allocate VMIDs and bridges in Redis, build the plan, enqueue its jobs; and read the state
//! back for `status`. Planning itself is pure (`shared::plan`); this module does the I/O.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Context;
use base64::Engine as _;
use chrono::Utc;
use serde::Serialize;
use shared::alloc::{self, Space};
use shared::clusters::{ConnectError, client_config};
use shared::config::{Config, VmidPolicy};
use shared::jobs::state::{
    self, DeploymentRecord, Phase, PlanDoc, StepState, Store, Totals, Versioned,
};
use shared::jobs::{keys, scope, teardown_jobs};
use shared::placement::{self, NodeCapacity};
use shared::plan::{self, Facts, Plan, Template};
use shared::pve::{ClusterResource, PveClient, PveError};
use shared::queue::{GroupStats, Queue, QueueConfig};
use shared::secret::{Secret, SecretKey};

use crate::exit::{Exit, Failure};

/// Opens the queue, mapping failure to exit code 3.
pub async fn connect_queue(url: &str, cfg: QueueConfig) -> Result<Queue, Failure> {
    let q = Queue::connect(url, cfg).await.map_err(|e| {
        Failure::new(
            Exit::RedisUnreachable,
            anyhow::anyhow!(
                "cannot reach Redis at {}: {e}\nhint: start one (`redis-server --appendonly yes`) or set --redis / REDIS_URL",
                shared::redact_url(url)
            ),
        )
    })?;
    // Queue::connect may succeed lazily; prove the server answers.
    let mut c = q.connection();
    let pong: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut c).await;
    pong.map_err(|e| {
        Failure::new(
            Exit::RedisUnreachable,
            anyhow::anyhow!("Redis at {} does not answer: {e}", shared::redact_url(url)),
        )
    })?;
    Ok(q)
}

/// Maps a Proxmox error to the exit code its variant calls for.
pub fn pve_failure(e: PveError, what: &str) -> Failure {
    let exit = match &e {
        PveError::Auth { .. } | PveError::Permission { .. } => Exit::AuthRefused,
        _ => Exit::ProxmoxUnreachable,
    };
    Failure::new(exit, anyhow::Error::new(e).context(what.to_owned()))
}

pub fn connect_pve(cfg: &Config, key: Option<&SecretKey>) -> Result<PveClient, Failure> {
    let cc = client_config(cfg.connection(), key).map_err(|e| match e {
        ConnectError::Pve(p) => pve_failure(p, "connecting to Proxmox"),
        other => Failure::new(Exit::InvalidConfig, other),
    })?;
    PveClient::new(cc).map_err(|e| pve_failure(e, "connecting to Proxmox"))
}

fn disk_storages(cfg: &shared::pve::VmConfig) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in &cfg.raw {
        let is_disk = ["scsi", "virtio", "ide", "sata", "efidisk", "tpmstate"]
            .iter()
            .any(|p| k.starts_with(p) && k[p.len()..].chars().all(|c| c.is_ascii_digit()));
        if !is_disk {
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
    for r in resources {
        match r {
            ClusterResource::Node(n) => nodes.push(NodeCapacity {
                online: n.status == "online",
                maxmem: n.maxmem.unwrap_or(0),
                mem: n.mem.unwrap_or(0),
                cpu: n.cpu.unwrap_or(0.0),
                maxcpu: n.maxcpu.unwrap_or(0) as u32,
                planned_elsewhere: 0,
                name: n.node,
            }),
            ClusterResource::Storage(s) => {
                shared_storage.insert(s.storage.clone(), s.shared);
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
    for v in vms.iter().filter(|v| v.template) {
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
    Ok(Facts {
        nodes,
        templates,
        vmids_in_use: vms.iter().map(|v| v.vmid).collect(),
        users,
        ifaces,
    })
}

/// The initial password of a student, derived from the key and the deployment: the same
/// every time it is asked (so `handout` can print it again), unguessable without the key.
pub fn student_password(key: &SecretKey, deployment: &str, user: &str) -> Secret {
    let bytes = key.derive("student-password", &format!("{deployment}|{user}"));
    let s = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&bytes[..12]);
    Secret::new(s)
}

/// What other active deployments have planned per node (memory), for placement.
async fn planned_elsewhere(store: &Store, id: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    if let Ok(deps) = store.deployments().await {
        for d in deps
            .iter()
            .filter(|d| d.id != id && d.phase == Phase::Active)
        {
            if let Ok(Some(p)) = store.plan_json(&d.id, d.epoch).await
                && let Ok(p) = serde_json::from_str::<Plan>(&p)
            {
                for v in &p.vms {
                    *out.entry(v.node.clone()).or_default() += v.source.maxmem;
                }
            }
        }
    }
    out
}

/// Plans the deployment. With `allocate`, VMIDs and bridges are reserved in Redis and what an
/// earlier submit had but the files no longer have is carried as retired (submit); without,
/// they are previewed (plan): the next free numbers, not reserved.
pub async fn make_plan(
    cfg: &Config,
    facts: &mut Facts,
    store: &Store,
    allocate: bool,
) -> Result<Plan, Failure> {
    let id = plan::deployment_id(cfg);
    let prior = match read(store, &id).await? {
        Some(v) => plan_of(store, &v.rec, v.rec.vm_epoch()).await?,
        None => None,
    };
    let mut plan = plan_with(cfg, facts, store, allocate, prior.as_ref()).await?;
    if allocate && let Some(prior) = &prior {
        plan.retire_from(prior);
    }
    Ok(plan)
}

/// Plans with students pinned to the nodes `prior` placed them on (without carrying its
/// retired VMs: the caller decides).
async fn plan_with(
    cfg: &Config,
    facts: &mut Facts,
    store: &Store,
    allocate: bool,
    prior: Option<&Plan>,
) -> Result<Plan, Failure> {
    let id = plan::deployment_id(cfg);
    // A student keeps their node: those in the files, and those dropped without --prune
    // whose VMs are still there (listed again, they must not be planned elsewhere).
    let pinned: BTreeMap<String, String> = prior
        .as_ref()
        .map(|p| {
            p.students
                .iter()
                .chain(&p.retired_students)
                .map(|s| (s.user.clone(), s.node.clone()))
                .collect()
        })
        .unwrap_or_default();
    let elsewhere = planned_elsewhere(store, &id).await;
    for n in &mut facts.nodes {
        n.planned_elsewhere = elsewhere.get(&n.name).copied().unwrap_or(0);
    }
    let demands = plan::demands(cfg, facts, &pinned);
    let placement = placement::place(&demands, &facts.nodes).map_err(|e| {
        Failure::new(
            Exit::InvalidConfig,
            anyhow::Error::new(e).context("placing students"),
        )
    })?;
    let q = store.queue();
    // VMIDs.
    let mut vmids = BTreeMap::new();
    let owners: Vec<(String, usize, usize)> = cfg
        .users
        .users
        .iter()
        .enumerate()
        .flat_map(|(ui, u)| {
            let id = &id;
            cfg.deployment
                .machines
                .iter()
                .enumerate()
                .map(move |(mi, m)| (plan::vm_owner(id, &plan::vm_key(u, m)), ui, mi))
        })
        .collect();
    let space = Space::vmids(q, &cfg.cluster);
    match cfg.deployment.vmids {
        VmidPolicy::Range { min, max } => {
            if allocate {
                let names: Vec<String> = owners.iter().map(|o| o.0.clone()).collect();
                vmids = alloc::reserve(q, &space, &names, min, max, &facts.vmids_in_use)
                    .await
                    .map_err(|e| Failure::new(Exit::RedisUnreachable, e))?;
            } else {
                let names: Vec<String> = owners.iter().map(|o| o.0.clone()).collect();
                vmids = alloc::preview(q, &space, &names, min, &facts.vmids_in_use)
                    .await
                    .map_err(|e| Failure::new(Exit::RedisUnreachable, e))?;
            }
        }
        policy @ VmidPolicy::Fixed { .. } => {
            for (o, ui, mi) in &owners {
                let want = plan::fixed_vmid(&policy, *ui, *mi).expect("fixed policy");
                if allocate {
                    match alloc::reserve_exact(q, &space, o, want)
                        .await
                        .map_err(|e| Failure::new(Exit::RedisUnreachable, e))?
                    {
                        Some(v) => {
                            vmids.insert(o.clone(), v);
                        }
                        None => {
                            return Err(Failure::new(
                                Exit::InvalidConfig,
                                anyhow::anyhow!(
                                    "VMID {want} (vmid_base/vmid_stride) is already reserved by another deployment; choose another vmid_base"
                                ),
                            ));
                        }
                    }
                } else {
                    vmids.insert(o.clone(), want);
                }
            }
        }
    }
    // Private bridges per (node, student, alias).
    let aliases = plan::private_aliases(cfg);
    let mut bridges = BTreeMap::new();
    if !aliases.is_empty() {
        let (lo, hi) = cfg.deployment.bridge_range;
        let mut per_node: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for u in &cfg.users.users {
            let node = &placement.nodes[&u.to_string()];
            for alias in aliases.keys() {
                per_node
                    .entry(node.clone())
                    .or_default()
                    .push(plan::bridge_owner(&id, u, alias));
            }
        }
        for (node, owners) in per_node {
            let taken: BTreeSet<u32> = facts
                .ifaces
                .get(&node)
                .into_iter()
                .flatten()
                .filter_map(|i| i.strip_prefix("vmbr").and_then(|n| n.parse().ok()))
                .collect();
            let space = Space::bridges(q, &cfg.cluster, &node);
            let got = if allocate {
                alloc::reserve(q, &space, &owners, lo, hi, &taken)
                    .await
                    .map_err(|e| Failure::new(Exit::RedisUnreachable, e))?
            } else {
                alloc::preview(q, &space, &owners, lo, &taken)
                    .await
                    .map_err(|e| Failure::new(Exit::RedisUnreachable, e))?
            };
            for (o, n) in got {
                bridges.insert(o, format!("vmbr{n}"));
            }
        }
    }
    Ok(plan::build(cfg, facts, placement, &vmids, &bridges))
}

/// A deployment's record, moved to the current key layout first.
pub async fn read(store: &Store, id: &str) -> Result<Option<Versioned>, Failure> {
    store
        .upgrade(id)
        .await
        .map_err(|e| Failure::new(Exit::RedisUnreachable, e))
}

/// The stored plan of one epoch of a deployment, if any.
pub async fn plan_of(
    store: &Store,
    rec: &DeploymentRecord,
    epoch: u32,
) -> Result<Option<Plan>, Failure> {
    Ok(store
        .plan_json(&rec.id, epoch)
        .await
        .map_err(|e| Failure::new(Exit::RedisUnreachable, e))?
        .and_then(|s| serde_json::from_str(&s).ok()))
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
) -> Result<(String, Plan), Failure> {
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
) -> Result<(String, Plan, Submitted), Failure> {
    let redis = |e| Failure::new(Exit::RedisUnreachable, e);
    let mut facts = gather_facts(pve, cfg)
        .await
        .map_err(|e| pve_failure(e, "reading the cluster"))?;
    let id = plan::deployment_id(cfg);
    for _ in 0..8 {
        let prev = read(store, &id).await?;
        let now = Utc::now();
        let mut rec = match &prev {
            None => DeploymentRecord::new(&id, &cfg.cluster, &cfg.deployment.name, now),
            Some(v) => v.rec.clone(),
        };
        // The plan whose VMs exist now (pins students to their nodes) and, when active,
        // whose retired VMs carry over.
        let prior = match &prev {
            Some(v) => plan_of(store, &v.rec, v.rec.vm_epoch()).await?,
            None => None,
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
        let was_active = prev.as_ref().is_some_and(|v| v.rec.phase == Phase::Active);
        let mut plan = plan_with(cfg, &mut facts, store, true, prior.as_ref()).await?;
        let mut pruned = None;
        if was_active && let Some(prior) = &prior {
            plan.retire_from(prior);
            if opts.prune && !(plan.retired.is_empty() && plan.retired_students.is_empty()) {
                let mut gone = plan.clone();
                gone.vms.clear();
                gone.students.clear();
                plan.retired.clear();
                plan.retired_students.clear();
                pruned = Some(gone);
            }
        }
        rec.updated = now;
        rec.finished = None;
        rec.layout = state::LAYOUT;
        let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
        for v in &plan.vms {
            *per_node.entry(v.node.clone()).or_default() += 1;
        }
        rec.totals = Some(Totals {
            vms: plan.vms.len(),
            retired: plan.retired.len(),
            per_node,
        });
        let sealed = seal_passwords(&plan, &id, key)?;
        set_caps(cfg, &plan, store).await?;
        let plan_json = serde_json::to_string(&plan).context("serializing the plan")?;
        // Before the jobs: a worker's step record reads the VM steps to derive the VM's state.
        let doc = PlanDoc {
            json: &plan_json,
            vm_steps: &plan::vm_steps(&plan),
            sealed: None,
        };
        let sealed_json = serde_json::to_string(&sealed).expect("serializes");
        let doc = PlanDoc {
            sealed: Some(&sealed_json),
            ..doc
        };
        if !store
            .commit(prev.as_ref(), &rec, Some(doc))
            .await
            .map_err(redis)?
        {
            tracing::info!(deployment = %id, "deployment changed while submitting; reading it again");
            continue;
        }
        let users: Vec<&str> = plan
            .students
            .iter()
            .chain(&plan.retired_students)
            .map(|s| s.user.as_str())
            .collect();
        store
            .list_students(&plan.cluster, &id, &users)
            .await
            .map_err(redis)?;
        let scope = rec.scope();
        let mut done = Submitted {
            waits_for_teardowns: rec.teardowns.clone(),
            ..Submitted::default()
        };
        // A submit during a teardown enqueues nothing: the teardown's finish job enqueues this
        // epoch's jobs (from the plan and sealed passwords just stored) atomically with its
        // own ack, so none can run before the teardown is done.
        let mut specs = if rec.teardowns.is_empty() {
            plan::jobs(&plan, &scope, &sealed)
        } else {
            Vec::new()
        };
        if let Some(gone) = &pruned {
            let vmids: BTreeMap<String, u32> = store
                .vm_facts(&scope)
                .await
                .map_err(redis)?
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
        store.queue().enqueue_batch(&specs).await.map_err(redis)?;
        ensure_teardowns(store, &rec).await?;
        tracing::info!(deployment = %id, jobs = specs.len(), vms = plan.vms.len(), "submitted");
        return Ok((id, plan, done));
    }
    Err(Failure::new(
        Exit::RedisUnreachable,
        anyhow::anyhow!(
            "deployment {id} kept changing while submitting (another producer or a teardown finishing); run the submit again"
        ),
    ))
}

/// The sealed initial password of every `@pve` student: a user that went missing is made
/// again with the same password (derived from the key and the deployment).
fn seal_passwords(
    plan: &Plan,
    id: &str,
    key: Option<&SecretKey>,
) -> Result<BTreeMap<String, String>, Failure> {
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
            return Err(Failure::new(
                Exit::InvalidConfig,
                anyhow::anyhow!(
                    "labfleet will create @pve users and needs a secret key to hand their passwords to the workers: set LABFLEET_SECRET_KEY (`producer secret keygen`) for the producer and every worker"
                ),
            ));
        }
        return Ok(sealed);
    };
    for u in pve_realm {
        sealed.insert(u.to_owned(), key.seal(&student_password(key, id, u)));
    }
    Ok(sealed)
}

/// Sets the clone caps the plan's slots need.
async fn set_caps(cfg: &Config, plan: &Plan, store: &Store) -> Result<(), Failure> {
    let caps = cfg.connection().caps;
    let mut cap_set = BTreeMap::new();
    for v in &plan.vms {
        for (slot, cap) in plan::clone_slots(
            &plan.cluster,
            &v.source,
            v.full,
            v.storage.as_deref(),
            &caps,
        ) {
            cap_set.insert(slot, cap);
        }
    }
    for (slot, cap) in cap_set {
        store
            .queue()
            .set_cap(&slot, Some(cap))
            .await
            .map_err(|e| Failure::new(Exit::RedisUnreachable, e))?;
    }
    Ok(())
}

/// Makes sure every unfinished teardown of the deployment has its jobs in the queue
/// (idempotent by key): a producer that stopped between moving the record and enqueueing
/// leaves a teardown that the next command completes.
pub async fn ensure_teardowns(store: &Store, rec: &DeploymentRecord) -> Result<(), Failure> {
    let redis = |e| Failure::new(Exit::RedisUnreachable, e);
    let mut epochs = rec.teardowns.clone();
    if rec.phase == Phase::TearingDown && !epochs.contains(&rec.epoch) {
        epochs.push(rec.epoch);
    }
    for e in epochs {
        let vm_epoch = e.saturating_sub(1);
        let plan = plan_of(store, rec, vm_epoch).await?;
        let vmids: BTreeMap<String, u32> = store
            .vm_facts(&scope(&rec.id, vm_epoch))
            .await
            .map_err(redis)?
            .into_iter()
            .map(|(k, f)| (k, f.vmid))
            .collect();
        let specs = match &plan {
            Some(p) => teardown_jobs::teardown(p, &scope(&rec.id, e), e, &vmids),
            None => {
                // No plan left (nothing was ever planned for that epoch): only the finish.
                let job = shared::jobs::Job::TeardownFinish(shared::jobs::TeardownFinishJob {
                    deployment: rec.id.clone(),
                    cluster: rec.cluster.clone(),
                    epoch: e,
                    prune: None,
                });
                vec![
                    shared::queue::JobSpec::new(
                        keys::teardown_finish(&scope(&rec.id, e)),
                        job.kind(),
                        job.to_value(),
                    )
                    .group(scope(&rec.id, e))
                    .forget_when_done(),
                ]
            }
        };
        store.queue().enqueue_batch(&specs).await.map_err(redis)?;
    }
    Ok(())
}

/// One VM's state for `status`.
#[derive(Debug, Clone, Serialize)]
pub struct VmStatus {
    pub user: String,
    pub machine: String,
    pub name: String,
    pub vmid: Option<u32>,
    pub node: String,
    pub state: String,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub id: String,
    pub state: String,
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Listing {
    All,
    Failed,
}

/// A deployment's record, or the exit code that says why not.
async fn record(store: &Store, id: &str) -> Result<DeploymentRecord, Failure> {
    read(store, id).await?.map(|v| v.rec).ok_or_else(|| {
        Failure::new(
            Exit::Usage,
            anyhow::anyhow!("no deployment {id:?} (see `producer list`)"),
        )
    })
}

/// A deployment's record and plan, or the exit code that says why not.
/// The plan is the one whose VMs exist: the active epoch's, or the one being torn down.
pub async fn load(store: &Store, id: &str) -> Result<(DeploymentRecord, Plan), Failure> {
    let rec = record(store, id).await?;
    let plan = plan_of(store, &rec, rec.vm_epoch()).await?.ok_or_else(|| {
        Failure::new(
            Exit::Usage,
            anyhow::anyhow!(
                "deployment {id:?} has no plan ({}): `producer submit` makes one",
                rec.phase
            ),
        )
    })?;
    Ok((rec, plan))
}

/// The deployment's state from the counters the workers keep (`step.lua`): a few small
/// reads whatever its size, with `vms` listing only the failed VMs. Where the counters cannot
/// say everything it returns the per-VM [`status`] instead: a deployment recorded before
/// counters existed, one being or having been torn down, one with VMs no longer in the
/// files, and one whose student or node setup failed (its VMs count as failed).
pub async fn summary(store: &Store, id: &str) -> Result<Status, Failure> {
    let redis = |e| Failure::new(Exit::RedisUnreachable, e);
    let rec = record(store, id).await?;
    let Some(totals) = rec.totals.clone().filter(|t| t.retired == 0) else {
        return status(store, id).await;
    };
    if rec.phase != Phase::Active {
        return status(store, id).await;
    }
    let progress = store.progress(&rec.vm_scope()).await.map_err(redis)?;
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
        let records = store
            .some_steps(&rec.vm_scope(), &fields)
            .await
            .map_err(redis)?;
        let keys: Vec<String> = failed_steps.keys().map(|k| (*k).to_owned()).collect();
        let facts = store
            .some_vms(&rec.vm_scope(), &keys)
            .await
            .map_err(redis)?;
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
                state: "failed".to_owned(),
                error,
            });
        }
    }
    let g = store
        .queue()
        .group_stats(&rec.scope())
        .await
        .map_err(redis)?;
    let teardown = prior_teardowns(store, &rec).await?;
    let state = overall_state(&rec, totals.vms, &counts, false, &g, &teardown);
    Ok(Status {
        id: id.to_owned(),
        state: state.to_owned(),
        total: totals.vms,
        counts,
        per_node,
        listing: Listing::Failed,
        vms,
        setup_failures: Vec::new(),
        quarantined: quarantined_of(store, &rec).await?,
        leaked: crate::leaks::leaked_of_record(store, &rec).await?,
    })
}

/// The earlier teardowns an active epoch waits for: their jobs, summed.
async fn prior_teardowns(store: &Store, rec: &DeploymentRecord) -> Result<GroupStats, Failure> {
    let mut sum = GroupStats::default();
    if rec.phase != Phase::Active {
        return Ok(sum);
    }
    for e in &rec.teardowns {
        let g = store
            .queue()
            .group_stats(&scope(&rec.id, *e))
            .await
            .map_err(|e| Failure::new(Exit::RedisUnreachable, e))?;
        sum.ready += g.ready;
        sum.scheduled += g.scheduled;
        sum.in_flight += g.in_flight;
        sum.waiting_for_slot += g.waiting_for_slot;
        sum.gated += g.gated;
        sum.dead += g.dead;
        sum.done += g.done;
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
) -> &'static str {
    let runnable = g.ready + g.scheduled + g.in_flight + g.waiting_for_slot;
    let count = |s: &str| counts.get(s).copied().unwrap_or(0);
    let teardown_open = teardown.ready
        + teardown.scheduled
        + teardown.in_flight
        + teardown.waiting_for_slot
        + teardown.gated;
    if rec.phase == Phase::TornDown {
        "torn-down"
    } else if rec.phase == Phase::TearingDown {
        "tearing-down"
    } else if !rec.teardowns.is_empty() {
        if teardown.dead > 0 && teardown_open <= 1 {
            // Only its finish job (gated on the dead ones) is left: stuck until `retry`.
            "failed"
        } else {
            "waiting-for-teardown"
        }
    } else if count("done") == total && !setup_failed && runnable + g.gated == 0 {
        "done"
    } else if runnable == 0 && (count("failed") > 0 || setup_failed || g.dead > 0) {
        "failed"
    } else if count("pending") == total && g.in_flight == 0 && g.done == 0 {
        "pending"
    } else {
        "running"
    }
}

/// The quarantined VMIDs of this deployment, with the command that clears each.
async fn quarantined_of(
    store: &Store,
    rec: &DeploymentRecord,
) -> Result<Vec<serde_json::Value>, Failure> {
    Ok(store
        .quarantined(&rec.cluster)
        .await
        .map_err(|e| Failure::new(Exit::RedisUnreachable, e))?
        .into_iter()
        .filter(|q| q.deployment == rec.id)
        .map(|q| serde_json::json!({"vmid": q.vmid, "node": q.node, "vm": q.vm, "reason": q.reason, "command": q.command()}))
        .collect())
}

/// The status of a torn-down deployment: nothing of it is left.
fn torn_down(rec: &DeploymentRecord) -> Status {
    Status {
        id: rec.id.clone(),
        state: Phase::TornDown.as_str().to_owned(),
        total: 0,
        counts: BTreeMap::new(),
        per_node: BTreeMap::new(),
        listing: Listing::All,
        vms: Vec::new(),
        setup_failures: Vec::new(),
        quarantined: Vec::new(),
        leaked: Vec::new(),
    }
}

/// Every VM's state, read from every step record and the plan (its cost grows with the
/// deployment: see [`summary`]).
pub async fn status(store: &Store, id: &str) -> Result<Status, Failure> {
    let redis = |e| Failure::new(Exit::RedisUnreachable, e);
    let rec = record(store, id).await?;
    if rec.phase == Phase::TornDown {
        let mut s = torn_down(&rec);
        s.leaked = crate::leaks::leaked_of_record(store, &rec).await?;
        return Ok(s);
    }
    let plan = plan_of(store, &rec, rec.vm_epoch()).await?.ok_or_else(|| {
        Failure::new(
            Exit::Usage,
            anyhow::anyhow!("deployment {id:?} has no plan ({})", rec.phase),
        )
    })?;
    let steps = store.steps(&rec.vm_scope()).await.map_err(redis)?;
    let facts = store.vm_facts(&rec.vm_scope()).await.map_err(redis)?;
    let names = plan::vm_steps(&plan);
    let mut vms = Vec::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut per_node: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for v in &plan.vms {
        let recs: Vec<Option<&shared::jobs::state::StepRecord>> = names
            .iter()
            .map(|s| steps.get(&shared::jobs::state::step_field(&v.key, s)))
            .collect();
        let failed = recs.iter().flatten().find(|r| r.state == StepState::Failed);
        let student_failed = steps
            .get(&shared::jobs::state::step_field(
                &format!("student:{}", v.user),
                "student",
            ))
            .filter(|r| r.state == StepState::Failed);
        let (state, error) = if let Some(f) = failed.copied().or(student_failed) {
            ("failed".to_owned(), f.error.clone())
        } else if recs
            .iter()
            .all(|r| r.is_some_and(|r| r.state == StepState::Done))
        {
            ("done".to_owned(), None)
        } else {
            let clone = recs[0];
            let s = match clone.map(|r| r.state) {
                None => "pending",
                Some(StepState::Running) => "cloning",
                Some(StepState::Retrying) => "retrying",
                Some(StepState::Done) => "configuring",
                Some(StepState::Failed) => "failed",
            };
            (s.to_owned(), clone.and_then(|r| r.error.clone()))
        };
        *counts.entry(state.clone()).or_default() += 1;
        *per_node
            .entry(v.node.clone())
            .or_default()
            .entry(state.clone())
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
        *counts.entry("not-in-files".to_owned()).or_default() += 1;
        let f = facts.get(&v.key);
        vms.push(VmStatus {
            user: v.user.clone(),
            machine: v.machine.clone(),
            name: v.name.clone(),
            vmid: f.map(|f| f.vmid),
            node: v.node.clone(),
            state: "not-in-files".to_owned(),
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
    let g = store
        .queue()
        .group_stats(&rec.scope())
        .await
        .map_err(redis)?;
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
    Ok(Status {
        id: id.to_owned(),
        state: state.to_owned(),
        total: total + plan.retired.len(),
        counts,
        per_node,
        listing: Listing::All,
        vms,
        setup_failures,
        quarantined: quarantined_of(store, &rec).await?,
        leaked: crate::leaks::leaked_of_record(store, &rec).await?,
    })
}

/// What `teardown` did.
#[derive(Debug, Clone, Serialize)]
pub struct TeardownStarted {
    /// The teardown's epoch (its jobs' scope is `<id>#<epoch>`).
    pub epoch: u32,
    /// The deployment was torn down already; nothing to do.
    pub already_torn_down: bool,
}

/// Starts a teardown: moves the record to `tearing-down` (compare-and-set), cancels the
/// active epoch's jobs (fencing in-flight ones), then enqueues a destroy per VM it may have
/// created, the removal of pools, users and bridges once those are gone, and the finish job
/// that completes it: a teardown finishes by itself, whether anyone waits or not. Run on a
/// deployment already tearing down, it makes sure those jobs are queued (resume).
pub async fn teardown(store: &Store, id: &str) -> Result<TeardownStarted, Failure> {
    let redis = |e| Failure::new(Exit::RedisUnreachable, e);
    for _ in 0..8 {
        let v = read(store, id).await?.ok_or_else(|| {
            Failure::new(
                Exit::Usage,
                anyhow::anyhow!("no deployment {id:?} (see `producer list`)"),
            )
        })?;
        match v.rec.phase {
            Phase::TornDown => {
                return Ok(TeardownStarted {
                    epoch: v.rec.epoch,
                    already_torn_down: true,
                });
            }
            Phase::TearingDown => {
                ensure_teardowns(store, &v.rec).await?;
                return Ok(TeardownStarted {
                    epoch: v.rec.epoch,
                    already_torn_down: false,
                });
            }
            Phase::Active => {}
        }
        let mut rec = v.rec.clone();
        let active = rec.scope();
        rec.epoch += 1;
        rec.phase = Phase::TearingDown;
        rec.updated = Utc::now();
        if !store.commit(Some(&v), &rec, None).await.map_err(redis)? {
            continue;
        }
        store.queue().cancel_group(&active).await.map_err(redis)?;
        ensure_teardowns(store, &rec).await?;
        return Ok(TeardownStarted {
            epoch: rec.epoch,
            already_torn_down: false,
        });
    }
    Err(Failure::new(
        Exit::RedisUnreachable,
        anyhow::anyhow!("deployment {id} kept changing while starting its teardown; run it again"),
    ))
}

/// How far teardown `epoch` of a deployment is.
#[derive(Debug, Clone, Serialize)]
pub struct TeardownProgress {
    pub finished: bool,
    /// Its jobs: done, still to run, dead (failed for good).
    pub done: u64,
    pub open: u64,
    pub dead: u64,
}

/// Reads how far teardown `epoch` is (the finish job moves the record; this only reads).
pub async fn teardown_progress(
    store: &Store,
    id: &str,
    epoch: u32,
) -> Result<TeardownProgress, Failure> {
    let redis = |e| Failure::new(Exit::RedisUnreachable, e);
    let rec = record(store, id).await?;
    let g = store
        .queue()
        .group_stats(&scope(id, epoch))
        .await
        .map_err(redis)?;
    Ok(TeardownProgress {
        finished: rec.teardown_finished(epoch),
        done: g.done,
        open: g.ready + g.scheduled + g.in_flight + g.waiting_for_slot + g.gated,
        dead: g.dead,
    })
}
