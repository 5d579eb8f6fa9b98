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
use shared::jobs::state::{self, DeploymentRecord, PlanDoc, StepState, Store, Totals};
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
    let wanted: BTreeSet<String> = cfg
        .deployment
        .machines
        .iter()
        .map(|m| m.template_node.to_string())
        .collect();
    let _ = wanted;
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
        for d in deps.iter().filter(|d| d.id != id && d.phase == "active") {
            if let Ok(Some(p)) = store.plan_json(&d.id).await
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
    let prior: Option<Plan> = store
        .plan_json(&id)
        .await
        .ok()
        .flatten()
        .and_then(|s| serde_json::from_str(&s).ok());
    let pinned: BTreeMap<String, String> = prior
        .as_ref()
        .map(|p| {
            p.students
                .iter()
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
    let mut plan = plan::build(cfg, facts, placement, &vmids, &bridges);
    if allocate && let Some(prior) = &prior {
        plan.retire_from(prior);
    }
    Ok(plan)
}

/// Submits (or resubmits: converges) the deployment. Returns its id.
pub async fn submit(
    cfg: &Config,
    pve: &PveClient,
    store: &Store,
    key: Option<&SecretKey>,
) -> Result<(String, Plan), Failure> {
    let mut facts = gather_facts(pve, cfg)
        .await
        .map_err(|e| pve_failure(e, "reading the cluster"))?;
    let plan = make_plan(cfg, &mut facts, store, true).await?;
    let id = plan.id.clone();
    let now = Utc::now();
    let mut rec = store
        .deployment(&id)
        .await
        .map_err(|e| Failure::new(Exit::RedisUnreachable, e))?
        .unwrap_or(DeploymentRecord {
            id: id.clone(),
            cluster: cfg.cluster.clone(),
            name: cfg.deployment.name.clone(),
            epoch: 0,
            created: now,
            updated: now,
            finished: None,
            phase: "active".into(),
            totals: None,
        });
    if rec.phase != "active" {
        rec.epoch += 1;
        rec.phase = "active".into();
    }
    rec.updated = now;
    rec.finished = None;
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for v in &plan.vms {
        *per_node.entry(v.node.clone()).or_default() += 1;
    }
    rec.totals = Some(Totals {
        vms: plan.vms.len(),
        retired: plan.retired.len(),
        per_node,
    });
    let mut sealed = BTreeMap::new();
    if plan.students.iter().any(|s| s.create_user) {
        let key = key.ok_or_else(|| {
            Failure::new(
                Exit::InvalidConfig,
                anyhow::anyhow!("labfleet will create @pve users and needs a secret key to hand their passwords to the workers: set LABFLEET_SECRET_KEY (`producer secret keygen`) for the producer and every worker"),
            )
        })?;
        for s in plan.students.iter().filter(|s| s.create_user) {
            sealed.insert(
                s.user.clone(),
                key.seal(&student_password(key, &id, &s.user)),
            );
        }
    }
    let caps = cfg.connection().caps;
    let q = store.queue();
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
        q.set_cap(&slot, Some(cap))
            .await
            .map_err(|e| Failure::new(Exit::RedisUnreachable, e))?;
    }
    let plan_json = serde_json::to_string(&plan).context("serializing the plan")?;
    // Before the jobs: a worker's step record reads the VM steps to derive the VM's state.
    let doc = PlanDoc {
        json: &plan_json,
        vm_steps: &plan::vm_steps(&plan),
    };
    store
        .put_deployment(&rec, Some(doc))
        .await
        .map_err(|e| Failure::new(Exit::RedisUnreachable, e))?;
    let specs = plan::jobs(&plan, &rec.scope(), &sealed);
    q.enqueue_batch(&specs)
        .await
        .map_err(|e| Failure::new(Exit::RedisUnreachable, e))?;
    tracing::info!(deployment = %id, jobs = specs.len(), vms = plan.vms.len(), "submitted");
    Ok((id, plan))
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Listing {
    All,
    Failed,
}

/// A deployment's record, or the exit code that says why not.
async fn record(store: &Store, id: &str) -> Result<DeploymentRecord, Failure> {
    store
        .deployment(id)
        .await
        .map_err(|e| Failure::new(Exit::RedisUnreachable, e))?
        .ok_or_else(|| {
            Failure::new(
                Exit::Usage,
                anyhow::anyhow!("no deployment {id:?} (see `producer list`)"),
            )
        })
}

/// A deployment's record and plan, or the exit code that says why not.
pub async fn load(store: &Store, id: &str) -> Result<(DeploymentRecord, Plan), Failure> {
    let redis = |e| Failure::new(Exit::RedisUnreachable, e);
    let rec = record(store, id).await?;
    let plan: Plan = store
        .plan_json(id)
        .await
        .map_err(redis)?
        .and_then(|s| serde_json::from_str(&s).ok())
        .ok_or_else(|| {
            Failure::new(
                Exit::Usage,
                anyhow::anyhow!("deployment {id:?} has no plan"),
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
    if rec.phase != "active" {
        return status(store, id).await;
    }
    let progress = store.progress(id).await.map_err(redis)?;
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
        let records = store.some_steps(id, &fields).await.map_err(redis)?;
        let keys: Vec<String> = failed_steps.keys().map(|k| (*k).to_owned()).collect();
        let facts = store.some_vms(id, &keys).await.map_err(redis)?;
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
    let state = overall_state(&rec, totals.vms, &counts, false, &g);
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
    })
}

/// The deployment's state in one word, from its phase, the VM counts and its jobs.
pub fn overall_state(
    rec: &DeploymentRecord,
    total: usize,
    counts: &BTreeMap<String, usize>,
    setup_failed: bool,
    g: &GroupStats,
) -> &'static str {
    let runnable = g.ready + g.scheduled + g.in_flight + g.waiting_for_slot;
    let count = |s: &str| counts.get(s).copied().unwrap_or(0);
    if rec.phase == "torn-down" {
        "torn-down"
    } else if rec.phase == "tearing-down" {
        "tearing-down"
    } else if count("done") == total && !setup_failed {
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

/// Every VM's state, read from every step record and the plan (its cost grows with the
/// deployment: see [`summary`]).
pub async fn status(store: &Store, id: &str) -> Result<Status, Failure> {
    let redis = |e| Failure::new(Exit::RedisUnreachable, e);
    let (rec, plan) = load(store, id).await?;
    let steps = store.steps(id).await.map_err(redis)?;
    let facts = store.vm_facts(id).await.map_err(redis)?;
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
        let (state, error) = if rec.phase == "torn-down" {
            ("removed".to_owned(), None)
        } else if let Some(f) = failed.copied().or(student_failed) {
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
            state: if rec.phase == "torn-down" {
                "removed".to_owned()
            } else {
                "not-in-files".to_owned()
            },
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
    let state = overall_state(&rec, total, &counts, !setup_failures.is_empty(), &g);
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
    })
}

/// Starts a teardown: cancels the deployment's queued jobs, fences in-flight ones, then
/// enqueues destroy jobs for every VM it may have created, and the removal of pools, users
/// and bridges it created once those are gone.
pub async fn teardown(store: &Store, id: &str) -> Result<String, Failure> {
    let redis = |e| Failure::new(Exit::RedisUnreachable, e);
    let (mut rec, plan) = load(store, id).await?;
    let q = store.queue();
    q.cancel_group(&rec.scope()).await.map_err(redis)?;
    rec.epoch += 1;
    rec.phase = "tearing-down".into();
    rec.updated = Utc::now();
    store.put_deployment(&rec, None).await.map_err(redis)?;
    let scope = rec.scope();
    let facts = store.vm_facts(id).await.map_err(redis)?;
    let mut specs = Vec::new();
    let mut by_user: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut by_node: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    use shared::jobs::{DestroyJob, Job, NodeNetworkJob, StudentJob, VmRef, keys};
    use shared::queue::JobSpec;
    for v in plan.vms.iter().chain(&plan.retired) {
        let k = keys::destroy(&scope, &v.key);
        let job = Job::Destroy(DestroyJob {
            vm: VmRef {
                deployment: id.to_owned(),
                cluster: plan.cluster.clone(),
                key: v.key.clone(),
                node: v.node.clone(),
            },
            vmid: facts.get(&v.key).map(|f| f.vmid),
        });
        specs.push(JobSpec::new(k.clone(), job.kind(), job.to_value()).group(scope.clone()));
        by_user.entry(&v.user).or_default().push(k.clone());
        by_node.entry(&v.node).or_default().push(k);
    }
    for s in plan.students.iter().chain(&plan.retired_students) {
        let job = Job::StudentTeardown(StudentJob {
            deployment: id.to_owned(),
            cluster: plan.cluster.clone(),
            user: s.user.clone(),
            pool: s.pool.clone(),
            sealed_password: None,
        });
        let gate = by_user.get(s.user.as_str()).cloned().unwrap_or_default();
        specs.push(
            JobSpec::new(
                keys::student_teardown(&scope, &s.user),
                job.kind(),
                job.to_value(),
            )
            .group(scope.clone())
            .after(gate),
        );
    }
    // Every node that got private bridges, including for students no longer in the files.
    let bridge_nodes: BTreeSet<&str> = plan
        .students
        .iter()
        .chain(&plan.retired_students)
        .filter(|s| !s.bridges.is_empty())
        .map(|s| s.node.as_str())
        .collect();
    for node in bridge_nodes {
        let job = Job::NodeNetworkTeardown(NodeNetworkJob {
            deployment: id.to_owned(),
            cluster: plan.cluster.clone(),
            node: node.to_owned(),
            bridges: vec![],
        });
        let gate = by_node.get(node).cloned().unwrap_or_default();
        specs.push(
            JobSpec::new(
                keys::node_network_teardown(&scope, node),
                job.kind(),
                job.to_value(),
            )
            .group(scope.clone())
            .after(gate),
        );
    }
    q.enqueue_batch(&specs).await.map_err(redis)?;
    Ok(scope)
}

/// Finishes a teardown whose jobs are all done: frees VMIDs and bridge names, clears the
/// progress records, marks the deployment torn down.
pub async fn finish_teardown(store: &Store, id: &str, pve: &PveClient) -> Result<bool, Failure> {
    let redis = |e| Failure::new(Exit::RedisUnreachable, e);
    let Some(mut rec) = store.deployment(id).await.map_err(redis)? else {
        return Ok(false);
    };
    if rec.phase != "tearing-down" {
        return Ok(rec.phase == "torn-down");
    }
    let g = store
        .queue()
        .group_stats(&rec.scope())
        .await
        .map_err(redis)?;
    if g.ready + g.scheduled + g.in_flight + g.waiting_for_slot + g.gated > 0 {
        return Ok(false);
    }
    if g.dead > 0 {
        return Err(Failure::new(
            Exit::DeploymentFailed,
            anyhow::anyhow!(
                "{} teardown jobs failed; see `producer status {id}`, fix, then `producer retry {id}`",
                g.dead
            ),
        ));
    }
    // A clone fenced by the cancel may still have finished on Proxmox after its destroy job
    // looked: verify against the cluster and destroy again what is still there.
    let facts = store.vm_facts(id).await.map_err(redis)?;
    let quarantined: BTreeSet<u32> = store
        .quarantined(&rec.cluster)
        .await
        .map_err(redis)?
        .into_iter()
        .map(|q| q.vmid)
        .collect();
    let present: BTreeSet<u32> = pve
        .cluster_vms()
        .await
        .map_err(|e| pve_failure(e, "checking the cluster after teardown"))?
        .into_iter()
        .map(|v| v.vmid)
        .collect();
    let leftovers: Vec<(&String, &shared::jobs::state::VmFacts)> = facts
        .iter()
        .filter(|(_, f)| present.contains(&f.vmid) && !quarantined.contains(&f.vmid))
        .collect();
    if !leftovers.is_empty() {
        use shared::jobs::{DestroyJob, Job, VmRef, keys};
        let round = Utc::now().timestamp_millis();
        let specs: Vec<shared::queue::JobSpec> = leftovers
            .iter()
            .map(|(key, f)| {
                let job = Job::Destroy(DestroyJob {
                    vm: VmRef {
                        deployment: id.to_owned(),
                        cluster: rec.cluster.clone(),
                        key: (*key).clone(),
                        node: f.node.clone(),
                    },
                    vmid: Some(f.vmid),
                });
                shared::queue::JobSpec::new(
                    format!("{}/{round}", keys::destroy(&rec.scope(), key)),
                    job.kind(),
                    job.to_value(),
                )
                .group(rec.scope())
            })
            .collect();
        tracing::info!(
            deployment = id,
            count = specs.len(),
            "VMs still present after teardown; destroying them again"
        );
        store.queue().enqueue_batch(&specs).await.map_err(redis)?;
        return Ok(false);
    }
    if let Ok(Some(p)) = store.plan_json(id).await
        && let Ok(plan) = serde_json::from_str::<Plan>(&p)
    {
        let q = store.queue();
        let owners: Vec<String> = plan
            .vms
            .iter()
            .chain(&plan.retired)
            .map(|v| plan::vm_owner(id, &v.key))
            .collect();
        alloc::release(q, &Space::vmids(q, &plan.cluster), &owners)
            .await
            .map_err(|e| Failure::new(Exit::RedisUnreachable, e))?;
        let mut by_node: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for s in plan.students.iter().chain(&plan.retired_students) {
            for alias in s.bridges.keys() {
                by_node
                    .entry(&s.node)
                    .or_default()
                    .push(format!("{id}|{}|{alias}", s.user));
            }
        }
        for (node, owners) in by_node {
            alloc::release(q, &Space::bridges(q, &plan.cluster, node), &owners)
                .await
                .map_err(|e| Failure::new(Exit::RedisUnreachable, e))?;
        }
    }
    store.clear_progress(id).await.map_err(redis)?;
    rec.phase = "torn-down".into();
    rec.finished = Some(Utc::now());
    store.put_deployment(&rec, None).await.map_err(redis)?;
    Ok(true)
}
