//! `POST /nodes/{node}/qemu/{vmid}/clone` (qemu-server `clone_vm`): the synchronous checks
//! and plan, then the task: flocks on source and target, the temporary `lock: clone`
//! config, each disk under its storage lock (and, for a full clone, copied at the storage's
//! bandwidth), the pool add under the `user.cfg` lock (rolled back when it fails).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, State};
use serde_json::{Value, json};

use super::qemu::{flock, locked, storage_lock, vm_path};
use super::{ApiResult, ok};
use crate::access::Identity;
use crate::auth::Auth;
use crate::error::{PveError, PveResult};
use crate::locks::storage_timeout_msg;
use crate::params::{P, Params, Ty, path_vmid};
use crate::state::{Shared, State as SimState, Vm, canonical_net, format_size, is_disk_key};
use crate::tasks::{Outcome, TaskCtx, start_task};

const CLONE_PARAMS: &[P] = &[
    P("newid", Ty::Int(100, 999_999_999), true),
    P("name", Ty::DnsName, false),
    P("description", Ty::Str, false),
    P("pool", Ty::Str, false),
    P("target", Ty::Node, false),
    P("full", Ty::Bool, false),
    P("storage", Ty::StorageId, false),
    P("format", Ty::Enum(&["raw", "qcow2", "vmdk"]), false),
    P("snapname", Ty::Str, false),
    P("bwlimit", Ty::Int(0, i64::MAX), false),
];

/// One disk to create: config key, target storage, new volume name, size, source volid.
struct NewDisk {
    key: String,
    storage: String,
    shared: bool,
    volname: String,
    size: u64,
    src_volid: String,
    bandwidth: f64,
    lock_key: String,
}

struct ClonePlan {
    node: String,
    src: u32,
    newid: u32,
    target: String,
    full: bool,
    pool: Option<String>,
    config: BTreeMap<String, Value>,
    disks: Vec<NewDisk>,
}

/// What the request asks for, once checked: the pool, full or linked, the target storage
/// and node.
struct CloneRequest {
    pool: Option<String>,
    full: bool,
    storage: Option<String>,
    target: String,
}

fn plan_clone(
    app: &Shared,
    who: &Identity,
    node: &str,
    vmid: u32,
    p: &Params,
) -> PveResult<ClonePlan> {
    let mut st = app.state.lock();
    st.proxy_to(node, Instant::now())?;
    let newid = p.int("newid").unwrap_or(0) as u32;
    let src = st.vm_on(node, vmid)?.clone();
    let req = check_request(&st, who, node, vmid, newid, &src, p)?;
    let disks = plan_disks(&st, who, node, newid, &src, &req)?;
    if st.vms.get(&newid).is_some_and(|v| v.node == node) {
        return Err(PveError::internal(format!(
            "unable to create VM {newid}: config file already exists"
        )));
    }
    let config = new_config(&mut st, &src, vmid, p);
    Ok(ClonePlan {
        node: node.to_string(),
        src: vmid,
        newid,
        target: req.target,
        full: req.full,
        pool: req.pool,
        config,
        disks,
    })
}

/// Rights, the source's lock, full/linked and storage/target rules.
fn check_request(
    st: &SimState,
    who: &Identity,
    node: &str,
    vmid: u32,
    newid: u32,
    src: &Vm,
    p: &Params,
) -> PveResult<CloneRequest> {
    st.check(who, &vm_path(vmid), "VM.Clone")?;
    let pool = p.str("pool");
    match &pool {
        Some(pl) => {
            if !st.pools.contains_key(pl) {
                return Err(PveError::forbidden(format!(
                    "Permission check failed (pool '{pl}' does not exist)"
                )));
            }
            st.check(who, &format!("/pool/{pl}"), "VM.Allocate")?;
        }
        None => st.check(who, &vm_path(newid), "VM.Allocate")?,
    }
    if let Some(l) = src.lock() {
        return Err(locked(&l));
    }
    if p.str("snapname").is_some() {
        return Err(PveError::internal(format!(
            "snapshot '{}' does not exist",
            p.str("snapname").unwrap_or_default()
        )));
    }
    let template = src.is_template();
    let full = p.bool("full").unwrap_or(!template);
    let storage = p.str("storage");
    if !full {
        if storage.is_some() {
            return Err(PveError::internal(
                "parameter 'storage' not allowed for linked clones",
            ));
        }
        if p.str("format").is_some() {
            return Err(PveError::internal(
                "parameter 'format' not allowed for linked clones",
            ));
        }
    }
    if let Some(s) = &storage {
        let Some(spec) = st.storages.get(s) else {
            return Err(PveError::internal(format!("storage '{s}' does not exist")));
        };
        if !spec.content.iter().any(|c| c == "images") {
            return Err(PveError::param(
                "storage",
                format!("storage '{s}' does not support vm images"),
            ));
        }
        if st.storage_on(s, node).is_none() {
            return Err(PveError::internal(format!(
                "storage '{s}' is not available on node '{node}'"
            )));
        }
    }
    let target = p.str("target").unwrap_or_else(|| node.to_string());
    if target != node {
        if !st.nodes.contains_key(&target) {
            return Err(PveError::internal(format!(
                "no such cluster node '{target}'"
            )));
        }
        if let Some(s) = &storage
            && !st.storages.get(s).is_some_and(|x| x.shared)
        {
            return Err(PveError::internal(format!(
                "can't clone to non-shared storage '{s}'"
            )));
        }
        if src
            .disks()
            .iter()
            .any(|d| !st.storages.get(&d.storage).is_some_and(|x| x.shared))
        {
            return Err(PveError::internal(format!(
                "can't clone VM to node '{target}' (VM uses local storage)"
            )));
        }
    }
    Ok(CloneRequest {
        pool,
        full,
        storage,
        target,
    })
}

/// The disks to create, each with its storage lock key and bandwidth; checks the linked
/// clone rules and `Datastore.AllocateSpace` on each target storage.
fn plan_disks(
    st: &SimState,
    who: &Identity,
    node: &str,
    newid: u32,
    src: &Vm,
    req: &CloneRequest,
) -> PveResult<Vec<NewDisk>> {
    let (full, template) = (req.full, src.is_template());
    let mut disks = Vec::new();
    for (i, d) in src.disks().iter().enumerate() {
        let (key, s, vol, size) = (&d.key, &d.storage, &d.volname, d.size);
        let dst = req.storage.clone().unwrap_or_else(|| s.clone());
        let spec = st
            .storages
            .get(&dst)
            .cloned()
            .ok_or_else(|| PveError::internal(format!("storage '{dst}' does not exist")))?;
        if !full && (!template || !spec.supports_linked_clone() || !vol.starts_with("base-")) {
            return Err(PveError::internal(format!(
                "Linked clone feature is not supported for '{s}:{vol}' ({key})"
            )));
        }
        let volname = if full {
            format!("vm-{newid}-disk-{i}")
        } else {
            format!("{vol}/vm-{newid}-disk-{i}")
        };
        disks.push(NewDisk {
            key: key.clone(),
            storage: dst.clone(),
            shared: spec.shared,
            volname,
            size,
            src_volid: format!("{s}:{vol}"),
            bandwidth: spec.bandwidth_mb_per_s,
            lock_key: st.storage_key(&dst, node),
        });
    }
    for d in &disks {
        st.check(
            who,
            &format!("/storage/{}", d.storage),
            "Datastore.AllocateSpace",
        )?;
    }
    if st.vms.get(&newid).is_some_and(|v| v.node == node) {
        return Err(PveError::internal(format!(
            "unable to create VM {newid}: config file already exists"
        )));
    }
    Ok(disks)
}

/// The new config: the source's minus template/lock/unused/disks, fresh MACs, uuid and
/// vmgenid, the name and description asked for.
fn new_config(st: &mut SimState, src: &Vm, vmid: u32, p: &Params) -> BTreeMap<String, Value> {
    let mut config: BTreeMap<String, Value> = src
        .config
        .iter()
        .filter(|(k, _)| {
            !matches!(k.as_str(), "template" | "lock")
                && !k.starts_with("unused")
                && !is_disk_key(k)
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let net_keys: Vec<String> = config
        .keys()
        .filter(|k| k.starts_with("net"))
        .cloned()
        .collect();
    for k in net_keys {
        let old = config[&k].as_str().unwrap_or_default().to_string();
        let stripped: Vec<&str> = old.split(',').collect();
        let model = stripped[0]
            .split('=')
            .next()
            .unwrap_or("virtio")
            .to_string();
        let rest = stripped[1..].join(",");
        let mac = st.random_mac();
        let net = if rest.is_empty() {
            model
        } else {
            format!("{model},{rest}")
        };
        config.insert(k, json!(canonical_net(&net, &mac).unwrap_or(old)));
    }
    let uuid = st.random_uuid();
    config.insert("smbios1".into(), json!(format!("uuid={uuid}")));
    if config.contains_key("vmgenid") {
        let g = st.random_uuid();
        config.insert("vmgenid".into(), json!(g));
    }
    let name = p.str("name").unwrap_or_else(|| {
        format!(
            "Copy-of-VM-{}",
            src.name().unwrap_or_else(|| vmid.to_string())
        )
    });
    config.insert("name".into(), json!(name));
    if let Some(d) = p.str("description") {
        config.insert("description".into(), json!(d));
    }
    config
}

pub(super) async fn clone(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    Path((node, vmid)): Path<(String, String)>,
    p: Params,
) -> ApiResult {
    p.check(CLONE_PARAMS, |_| false)?;
    let vmid = path_vmid(&vmid)?;
    let plan = plan_clone(&app, &who, &node, vmid, &p)?;
    let newid = plan.newid;
    let upid = start_task(
        &app,
        &node,
        "qmclone",
        &vmid.to_string(),
        &who,
        Some(newid),
        move |ctx| run_clone(ctx, plan),
    )
    .await?;
    ok(json!(upid))
}

async fn run_clone(mut ctx: TaskCtx, plan: ClonePlan) -> (TaskCtx, Outcome) {
    let app = ctx.app.clone();
    let (node, src, newid) = (plan.node.clone(), plan.src, plan.newid);
    let timeout = app.costs.clone_lock_timeout_seconds;
    let running = app.state.lock().vms.get(&src).is_some_and(|v| v.running);
    let _g1 = match flock(&app, &node, src, running, timeout).await {
        Ok(g) => g,
        Err(e) => return (ctx, Outcome::Error(e)),
    };
    let _g2 = match flock(&app, &node, newid, true, timeout).await {
        Ok(g) => g,
        Err(e) => return (ctx, Outcome::Error(e)),
    };
    let stat_storage = plan
        .disks
        .first()
        .map(|d| d.lock_key.clone())
        .unwrap_or_default();
    let half_fail = match begin(&app, &plan, &stat_storage) {
        Ok(h) => h,
        Err(e) => return (ctx, Outcome::Error(e)),
    };
    let fail = |ctx: TaskCtx, msg: String| {
        let mut st = ctx.app.state.lock();
        st.vms.remove(&newid);
        st.stats.clone_end(&node, &stat_storage);
        drop(st);
        (ctx, Outcome::Error(format!("clone failed: {msg}")))
    };
    let mut config = plan.config.clone();
    for (i, d) in plan.disks.iter().enumerate() {
        let value = match make_disk(&mut ctx, &app, plan.full, d).await {
            Ok(v) => v,
            Err(msg) => return fail(ctx, msg),
        };
        config.insert(d.key.clone(), value);
        if i == 0 {
            if half_fail {
                // The worker dies here: the temp config (lock: clone, no name) stays behind.
                app.state.lock().stats.clone_end(&node, &stat_storage);
                return (ctx, Outcome::Unexpected);
            }
            let mut real = plan.config.clone();
            real.extend(config.iter().map(|(k, v)| (k.clone(), v.clone())));
            real.insert("lock".into(), json!("clone"));
            if let Some(vm) = app.state.lock().vms.get_mut(&newid) {
                vm.config = real;
            }
        }
    }
    if plan.disks.is_empty() && half_fail {
        app.state.lock().stats.clone_end(&node, &stat_storage);
        return (ctx, Outcome::Unexpected);
    }
    let fixed = if plan.full {
        app.costs.full_clone_overhead_seconds
    } else {
        app.costs.linked_clone_seconds
    };
    ctx.spend(fixed).await;
    // The pool add runs under the cluster-wide `user.cfg` lock, inside the clone's eval:
    // when it fails the new VM is removed again (qemu-server `clone_vm`).
    let _cfg = match &plan.pool {
        Some(pl) => match app
            .user_cfg_lock(&format!("can't add VM {newid} to pool '{pl}'"))
            .await
        {
            Ok(g) => g,
            Err(e) => return fail(ctx, e),
        },
        None => None,
    };
    finish(ctx, &plan, config, &stat_storage)
}

/// Checks the source again under the flocks and writes the temporary config
/// (`lock: clone`) at the new VMID. Returns whether this clone is to die half way (fault).
fn begin(app: &Shared, plan: &ClonePlan, stat_storage: &str) -> Result<bool, String> {
    let (node, src, newid) = (&plan.node, plan.src, plan.newid);
    let mut st = app.state.lock();
    let vm = st.vm_on(node, src).map_err(|e| e.message)?;
    if let Some(l) = vm.lock() {
        return Err(format!("VM is locked ({l})"));
    }
    if let Some(existing) = st.vms.get(&newid) {
        return Err(if existing.node == *node {
            format!("unable to create VM {newid}: config file already exists")
        } else {
            format!(
                "close (rename) atomic file '/etc/pve/nodes/{node}/qemu-server/{newid}.conf' failed: File exists"
            )
        });
    }
    let mut temp = BTreeMap::new();
    temp.insert("lock".to_string(), json!("clone"));
    st.vms.insert(
        newid,
        Vm {
            node: node.clone(),
            config: temp,
            running: false,
            started: None,
            pool: None,
            linked_from: None,
            rrd: None,
        },
    );
    st.stats.clone_begin(node, stat_storage);
    Ok(st.faults.clone_half_fail())
}

/// Creates one disk under its storage lock (a full clone also copies it); returns its
/// config value, or the storage lock's timeout message.
async fn make_disk(
    ctx: &mut TaskCtx,
    app: &Shared,
    full: bool,
    d: &NewDisk,
) -> Result<Value, String> {
    let kind = if full { "full" } else { "linked" };
    ctx.log(format!(
        "create {kind} clone of drive {} ({})",
        d.key, d.src_volid
    ));
    let hold = app.costs.storage_lock_hold_seconds;
    if !app.zero_cost() {
        let Some(permit) = storage_lock(app, &d.lock_key, d.shared).await else {
            return Err(storage_timeout_msg(&d.storage, d.shared));
        };
        app.state
            .lock()
            .stats
            .busy_enter(&d.lock_key, Instant::now());
        ctx.spend(hold).await;
        app.state
            .lock()
            .stats
            .busy_exit(&d.lock_key, Instant::now());
        drop(permit);
    }
    let short = d.volname.rsplit('/').next().unwrap_or(&d.volname);
    ctx.log(format!("  Logical volume \"{short}\" created."));
    let mut copy_secs = 0.0;
    if full {
        let mb = d.size as f64 / (1u64 << 20) as f64;
        copy_secs = mb / d.bandwidth;
        if !app.zero_cost() {
            let pool = app.copy_pool(&d.lock_key, d.bandwidth);
            app.state
                .lock()
                .stats
                .busy_enter(&d.lock_key, Instant::now());
            pool.copy(mb).await;
            app.state
                .lock()
                .stats
                .busy_exit(&d.lock_key, Instant::now());
        }
        ctx.work.nominal_seconds += copy_secs;
        let gib = d.size as f64 / (1u64 << 30) as f64;
        ctx.log(format!(
            "transferred {gib:.1} GiB of {gib:.1} GiB (100.00%)"
        ));
    }
    ctx.work.storage.push((d.lock_key.clone(), hold, copy_secs));
    Ok(json!(format!(
        "{}:{},size={}",
        d.storage,
        d.volname,
        format_size(d.size)
    )))
}

/// The clone's end: the pool membership, the final config (lock removed), the target node.
fn finish(
    ctx: TaskCtx,
    plan: &ClonePlan,
    mut config: BTreeMap<String, Value>,
    stat_storage: &str,
) -> (TaskCtx, Outcome) {
    let newid = plan.newid;
    let mut st = ctx.app.state.lock();
    let mut warnings = 0;
    let mut pool_ok = None;
    if let Some(pl) = &plan.pool {
        if let Some(pool) = st.pools.get_mut(pl) {
            pool.vms.insert(newid);
            pool_ok = Some(pl.clone());
        } else {
            warnings += 1;
        }
    }
    if let Some(vm) = st.vms.get_mut(&newid) {
        config.remove("lock");
        vm.config = config;
        vm.node = plan.target.clone();
        vm.pool = pool_ok;
        vm.linked_from = (!plan.full).then_some(plan.src);
    }
    st.stats.clone_end(&plan.node, stat_storage);
    drop(st);
    if warnings > 0 {
        ctx.log(format!(
            "WARN: can't add VM {newid} to pool - pool does not exist"
        ));
        return (ctx, Outcome::Warnings(warnings));
    }
    (ctx, Outcome::Ok)
}
