//! `/nodes/{node}/qemu/*`: list, status, power actions, destroy and template conversion,
//! with PVE's synchronous checks, the config `lock` property, config flocks and storage
//! locks. The config (`vm_config`), clone (`clone`), snapshot and guest-shutdown (`snapshot`,
//! `power`) endpoints have files of their own; what stays here shares the VM's flock and
//! lock checks, which is why it is one file of a little over 600 lines.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, State};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{ApiResult, ok};
use crate::access::Identity;
use crate::auth::Auth;
use crate::error::{PveError, PveResult};
use crate::locks::{FlockGuard, StorageLockGuard, storage_timeout_msg};
use crate::params::{P, Params, Ty, path_vmid};
use crate::state::{LooseVolume, Shared, Vm, VmDisk};
use crate::tasks::{Outcome, TaskCtx, start_task};

pub(super) fn vm_path(vmid: u32) -> String {
    format!("/vms/{vmid}")
}

pub(super) fn locked(l: &str) -> PveError {
    PveError::internal(format!("VM is locked ({l})"))
}

/// `skiplock` is for root@pam with a ticket only; every token (root's too) is refused.
pub(super) fn check_skiplock(p: &Params, who: &Identity) -> PveResult<bool> {
    let skip = p.flag("skiplock");
    if skip && !who.is_root_ticket() {
        return Err(PveError::param(
            "skiplock",
            "Only root may use this option.",
        ));
    }
    Ok(skip)
}

pub(crate) fn config_digest(c: &BTreeMap<String, Value>) -> String {
    let mut h = Sha256::new();
    for (k, v) in c {
        let s = v
            .as_str()
            .map(String::from)
            .unwrap_or_else(|| v.to_string());
        h.update(format!("{k}: {s}\n").as_bytes());
    }
    h.finalize()
        .iter()
        .take(20)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Takes a storage's allocation lock (or times out, after the full wait, when a
/// lock-timeout fault fires). Never called in zero-cost mode.
pub(crate) async fn storage_lock(
    app: &Shared,
    key: &str,
    shared: bool,
) -> Option<StorageLockGuard> {
    let wait = app.wall(app.costs.storage_lock_timeout_seconds);
    if app.state.lock().faults.lock_timeout() {
        tokio::time::sleep(wait).await;
        return None;
    }
    app.storage_locks
        .lock(key, shared, wait, app.wall(0.1))
        .await
}

/// The VM's config lock with the usual timeout (`lock_config`), for the snapshot tasks.
pub(super) async fn vm_flock(app: &Shared, node: &str, vmid: u32) -> Result<FlockGuard, String> {
    flock(app, node, vmid, true, app.costs.vm_lock_timeout_seconds).await
}

pub(super) async fn flock(
    app: &Shared,
    node: &str,
    vmid: u32,
    exclusive: bool,
    timeout_s: f64,
) -> Result<FlockGuard, String> {
    if app.zero_cost() {
        return Ok(FlockGuard::None);
    }
    app.flocks
        .lock(node, vmid, exclusive, app.wall(timeout_s))
        .await
}

pub(super) async fn list(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    Path(node): Path<String>,
    p: Params,
) -> ApiResult {
    p.check(&[P("full", Ty::Bool, false)], |_| false)?;
    let st = app.state.lock();
    let now = Instant::now();
    st.proxy_to(&node, now)?;
    let mut out = Vec::new();
    for (id, vm) in st.vms.iter().filter(|(_, vm)| vm.node == node) {
        if !st.has(&who, &vm_path(*id), "VM.Audit") {
            continue;
        }
        out.push(vm_status(*id, vm, now));
    }
    ok(Value::Array(out))
}

fn vm_status(vmid: u32, vm: &Vm, now: Instant) -> Value {
    let mut v = json!({
        "vmid": vmid,
        "name": vm.name().unwrap_or_else(|| format!("VM {vmid}")),
        "status": if vm.running { "running" } else { "stopped" },
        "cpus": vm.cores(), "cpu": if vm.running { 0.02 } else { 0.0 },
        "maxmem": vm.memory_mib() << 20, "mem": if vm.running { (vm.memory_mib() << 20) / 3 } else { 0 },
        "maxdisk": vm.disks().iter().map(|d| d.size).sum::<u64>(), "disk": 0,
        "uptime": vm.started.map(|s| now.duration_since(s).as_secs()).unwrap_or(0),
        "netin": 0, "netout": 0, "diskread": 0, "diskwrite": 0,
    });
    if vm.running {
        v["pid"] = json!(10_000 + vmid % 50_000);
    }
    if vm.is_template() {
        v["template"] = json!(1);
    }
    if let Some(l) = vm.lock() {
        v["lock"] = json!(l);
    }
    if let Some(t) = vm.config.get("tags") {
        v["tags"] = t.clone();
    }
    v
}

pub(super) async fn index(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    Path((node, vmid)): Path<(String, String)>,
    p: Params,
) -> ApiResult {
    p.check(&[], |_| false)?;
    let vmid = path_vmid(&vmid)?;
    let st = app.state.lock();
    st.proxy_to(&node, Instant::now())?;
    st.vm_on(&node, vmid)?;
    st.check(&who, &vm_path(vmid), "VM.Audit")?;
    let subdirs = [
        "config", "status", "clone", "template", "pending", "snapshot",
    ];
    ok(json!(
        subdirs
            .iter()
            .map(|s| json!({"subdir": s}))
            .collect::<Vec<_>>()
    ))
}

pub(super) async fn current(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    Path((node, vmid)): Path<(String, String)>,
    p: Params,
) -> ApiResult {
    p.check(&[], |_| false)?;
    let vmid = path_vmid(&vmid)?;
    let st = app.state.lock();
    st.proxy_to(&node, Instant::now())?;
    let vm = st.vm_on(&node, vmid)?;
    st.check(&who, &vm_path(vmid), "VM.Audit")?;
    let mut v = vm_status(vmid, vm, Instant::now());
    v["qmpstatus"] = json!(if vm.running { "running" } else { "stopped" });
    v["ha"] = json!({"managed": 0});
    if vm.config.contains_key("agent") {
        v["agent"] = json!(1);
    }
    if vm.running {
        v["running-machine"] = json!("pc-i440fx-9.2+pve1");
        v["running-qemu"] = json!("9.2.0");
    }
    ok(v)
}

async fn power(
    app: Arc<Shared>,
    who: Identity,
    node: String,
    vmid: String,
    p: Params,
    action: &'static str,
) -> ApiResult {
    let vmid = path_vmid(&vmid)?;
    let skiplock = check_skiplock(&p, &who)?;
    {
        let st = app.state.lock();
        st.proxy_to(&node, Instant::now())?;
        st.vm_on(&node, vmid)?;
        st.check(&who, &vm_path(vmid), "VM.PowerMgmt")?;
    }
    let ttype = match action {
        "start" => "qmstart",
        "stop" => "qmstop",
        _ => "qmshutdown",
    };
    let guest = super::power::ShutdownOpts {
        timeout: p.int("timeout"),
        force_stop: p.flag("forceStop"),
    };
    let n2 = node.clone();
    let upid = start_task(
        &app,
        &node,
        ttype,
        &vmid.to_string(),
        &who,
        Some(vmid),
        move |mut ctx: TaskCtx| async move {
            let app = ctx.app.clone();
            let _g = match flock(&app, &n2, vmid, true, app.costs.vm_lock_timeout_seconds).await {
                Ok(g) => g,
                Err(e) => return (ctx, Outcome::Error(e)),
            };
            let check = {
                let st = app.state.lock();
                match st.vm_on(&n2, vmid) {
                    Err(e) => Err(e.message),
                    Ok(vm) => match (action, vm.lock()) {
                        ("start", _) if vm.is_template() => {
                            Err("you can't start a vm if it's a template".to_string())
                        }
                        (_, Some(l)) if !skiplock => Err(format!("VM is locked ({l})")),
                        ("start", _) if vm.running => Err(format!("VM {vmid} already running")),
                        _ => Ok(vm.running),
                    },
                }
            };
            let was_running = match check {
                Ok(r) => r,
                Err(e) => return (ctx, Outcome::Error(e)),
            };
            if action == "start"
                && let Some(missing) = missing_bridge(&app, &n2, vmid)
            {
                ctx.log(format!("starting VM {vmid}"));
                return (
                    ctx,
                    Outcome::Error(format!("bridge '{missing}' does not exist")),
                );
            }
            let secs = match action {
                "start" => app.costs.start_seconds,
                "stop" => app.costs.stop_seconds,
                _ => app.costs.shutdown_seconds,
            };
            if action == "start" {
                ctx.log(format!("starting VM {vmid}"));
            } else if !was_running {
                ctx.spend(0.1).await;
                return (ctx, Outcome::Ok);
            } else if action == "shutdown"
                && let Some(o) = super::power::guest_shutdown(&mut ctx, vmid, guest).await
            {
                return (ctx, o);
            }
            if action == "start" {
                app.start_booting(&n2);
            }
            ctx.spend(secs).await;
            if action == "start" {
                app.start_booted(&n2);
            }
            let mut st = app.state.lock();
            if let Some(vm) = st.vms.get_mut(&vmid) {
                vm.running = action == "start";
                vm.started = (action == "start").then(Instant::now);
            }
            drop(st);
            (ctx, Outcome::Ok)
        },
    )
    .await?;
    ok(json!(upid))
}

/// The first NIC bridge of the VM that does not exist on the node (qemu-server plugs each
/// tap into its bridge at start; pve-common `read_bridge_mtu` dies for a missing one).
fn missing_bridge(app: &Shared, node: &str, vmid: u32) -> Option<String> {
    let st = app.state.lock();
    let live = &st.nodes.get(node)?.net_live;
    let vm = st.vms.get(&vmid)?;
    vm.config
        .iter()
        .filter(|(k, _)| {
            k.strip_prefix("net")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|(_, v)| {
            v.as_str()?
                .split(',')
                .find_map(|p| p.strip_prefix("bridge="))
                .map(String::from)
        })
        .find(|b| !live.contains(b))
}

/// Start parameters; the migration ones are accepted and ignored (no migration here).
const START_PARAMS: &[P] = &[
    P("skiplock", Ty::Bool, false),
    P("timeout", Ty::Int(0, i64::MAX), false),
    P("force-cpu", Ty::Str, false),
    P("machine", Ty::Str, false),
    P("migratedfrom", Ty::Node, false),
    P("migration_network", Ty::Str, false),
    P("migration_type", Ty::Enum(&["secure", "insecure"]), false),
    P("nets-host-mtu", Ty::Str, false),
    P("stateuri", Ty::Str, false),
    P("targetstorage", Ty::Str, false),
    P("with-conntrack-state", Ty::Bool, false),
];
const STOP_PARAMS: &[P] = &[
    P("migratedfrom", Ty::Node, false),
    P("skiplock", Ty::Bool, false),
    P("timeout", Ty::Int(0, 86400), false),
    P("keepActive", Ty::Bool, false),
    P("overrule-shutdown", Ty::Bool, false),
];
const SHUTDOWN_PARAMS: &[P] = &[
    P("skiplock", Ty::Bool, false),
    P("timeout", Ty::Int(0, 86400), false),
    P("keepActive", Ty::Bool, false),
    P("forceStop", Ty::Bool, false),
];

pub(super) async fn start(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    Path((node, vmid)): Path<(String, String)>,
    p: Params,
) -> ApiResult {
    p.check(START_PARAMS, |_| false)?;
    power(app, who, node, vmid, p, "start").await
}

pub(super) async fn stop(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    Path((node, vmid)): Path<(String, String)>,
    p: Params,
) -> ApiResult {
    p.check(STOP_PARAMS, |_| false)?;
    power(app, who, node, vmid, p, "stop").await
}

pub(super) async fn shutdown(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    Path((node, vmid)): Path<(String, String)>,
    p: Params,
) -> ApiResult {
    p.check(SHUTDOWN_PARAMS, |_| false)?;
    power(app, who, node, vmid, p, "shutdown").await
}

pub(super) async fn destroy(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    Path((node, vmid)): Path<(String, String)>,
    p: Params,
) -> ApiResult {
    p.check(
        &[
            P("purge", Ty::Bool, false),
            P("destroy-unreferenced-disks", Ty::Bool, false),
            P("skiplock", Ty::Bool, false),
        ],
        |_| false,
    )?;
    let vmid = path_vmid(&vmid)?;
    let skiplock = check_skiplock(&p, &who)?;
    check_destroy(&app, &who, &node, vmid)?;
    let n2 = node.clone();
    let upid = start_task(
        &app,
        &node,
        "qmdestroy",
        &vmid.to_string(),
        &who,
        Some(vmid),
        move |ctx: TaskCtx| run_destroy(ctx, n2, vmid, skiplock),
    )
    .await?;
    ok(json!(upid))
}

/// The synchronous checks of a destroy: rights, protection, not running.
fn check_destroy(app: &Shared, who: &Identity, node: &str, vmid: u32) -> PveResult<()> {
    let st = app.state.lock();
    st.proxy_to(node, Instant::now())?;
    let vm = st.vm_on(node, vmid)?;
    st.check(who, &vm_path(vmid), "VM.Allocate")?;
    if vm
        .config
        .get("protection")
        .is_some_and(|v| v.as_i64() == Some(1) || v.as_str() == Some("1"))
    {
        return Err(PveError::internal(format!(
            "can't remove VM {vmid} - protection mode enabled"
        )));
    }
    if vm.running {
        return Err(PveError::internal(format!(
            "VM {vmid} is running - destroy failed"
        )));
    }
    Ok(())
}

/// The destroy task: under the VM's flock, mark it `destroyed`, free each disk under its
/// storage lock (a disk that cannot be freed is a warning and stays, qemu-server
/// `destroy_vm`), then remove the config, its pool membership and ACLs.
async fn run_destroy(
    mut ctx: TaskCtx,
    node: String,
    vmid: u32,
    skiplock: bool,
) -> (TaskCtx, Outcome) {
    let app = ctx.app.clone();
    let _g = match flock(&app, &node, vmid, true, app.costs.vm_lock_timeout_seconds).await {
        Ok(g) => g,
        Err(e) => return (ctx, Outcome::Error(e)),
    };
    let disks = match mark_destroyed(&app, &node, vmid, skiplock) {
        Ok(d) => d,
        Err(e) => return (ctx, Outcome::Error(e)),
    };
    let mut leaked = Vec::new();
    for d in &disks {
        if let Some(l) = free_disk(&mut ctx, &app, &node, d).await {
            leaked.push(l);
        }
    }
    ctx.spend(app.costs.destroy_seconds).await;
    let mut st = app.state.lock();
    if let Some(vm) = st.vms.remove(&vmid)
        && let Some(p) = vm.pool
        && let Some(pool) = st.pools.get_mut(&p)
    {
        pool.vms.remove(&vmid);
    }
    let path = vm_path(vmid);
    st.acls.retain(|a| a.path != path);
    // Its snapshots go with its disks.
    st.snaps.remove(&vmid);
    st.acpi_ignored.remove(&vmid);
    let warnings = leaked.len() as u32;
    for _ in &leaked {
        st.faults.count("destroy_leaked_volume");
    }
    st.loose.extend(leaked);
    drop(st);
    if warnings > 0 {
        return (ctx, Outcome::Warnings(warnings));
    }
    (ctx, Outcome::Ok)
}

/// Checks the VM can go (unlocked, stopped, not a base in use) and locks it `destroyed`;
/// returns its disks.
fn mark_destroyed(
    app: &Shared,
    node: &str,
    vmid: u32,
    skiplock: bool,
) -> Result<Vec<VmDisk>, String> {
    let mut st = app.state.lock();
    let base = format!("base-{vmid}-");
    let in_use = st.vms.values().any(|v| v.linked_from == Some(vmid))
        || st
            .loose
            .iter()
            .any(|l| l.volname.contains('/') && l.volname.starts_with(&base));
    let vm = st.vm_on_mut(node, vmid).map_err(|e| e.message)?;
    if let Some(l) = vm.lock().filter(|_| !skiplock) {
        return Err(format!("VM is locked ({l})"));
    }
    if vm.running {
        return Err(format!("VM {vmid} is running - destroy failed"));
    }
    let disks = vm.disks();
    if in_use && let Some(d) = disks.first() {
        return Err(format!(
            "base volume '{}' is still in use by linked cloned",
            d.volid()
        ));
    }
    vm.config.insert("lock".into(), json!("destroyed"));
    Ok(disks)
}

/// Frees one disk under its storage lock; returns it as a loose volume when the lock could
/// not be had ("Could not remove disk ..., check manually").
async fn free_disk(ctx: &mut TaskCtx, app: &Shared, node: &str, d: &VmDisk) -> Option<LooseVolume> {
    let (key, shared) = {
        let st = app.state.lock();
        let shared = st.storages.get(&d.storage).is_some_and(|x| x.shared);
        (st.storage_key(&d.storage, node), shared)
    };
    if !app.zero_cost() {
        let Some(g) = storage_lock(app, &key, shared).await else {
            ctx.log(format!(
                "Could not remove disk '{}', check manually: {}",
                d.volid(),
                storage_timeout_msg(&d.storage, shared)
            ));
            return Some(LooseVolume {
                storage: d.storage.clone(),
                node: node.to_owned(),
                volname: d.volname.clone(),
                size: d.size,
            });
        };
        let hold = app.costs.volume_free_seconds;
        app.state.lock().stats.busy_enter(&key, Instant::now());
        ctx.spend(hold).await;
        app.state.lock().stats.busy_exit(&key, Instant::now());
        ctx.work.storage.push((key.clone(), hold, 0.0));
        drop(g);
    }
    let short = d.volname.rsplit('/').next().unwrap_or(&d.volname);
    ctx.log(format!(
        "  Logical volume \"{short}\" successfully removed."
    ));
    None
}

pub(super) async fn template(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    Path((node, vmid)): Path<(String, String)>,
    p: Params,
) -> ApiResult {
    p.check(&[P("disk", Ty::DiskKey, false)], |_| false)?;
    let vmid = path_vmid(&vmid)?;
    let check = |st: &crate::state::State| -> PveResult<()> {
        let vm = st.vm_on(&node, vmid)?;
        if let Some(l) = vm.lock() {
            return Err(locked(&l));
        }
        if vm.is_template() {
            return Err(PveError::internal(
                "you can't convert a template to a template",
            ));
        }
        if vm.running {
            return Err(PveError::internal(
                "you can't convert a VM to template if VM is running",
            ));
        }
        Ok(())
    };
    {
        let st = app.state.lock();
        st.proxy_to(&node, Instant::now())?;
        st.vm_on(&node, vmid)?;
        st.check(&who, &vm_path(vmid), "VM.Allocate")?;
        check(&st)?;
    }
    let n2 = node.clone();
    let upid = start_task(
        &app,
        &node,
        "qmtemplate",
        &vmid.to_string(),
        &who,
        Some(vmid),
        move |mut ctx: TaskCtx| async move {
            let app = ctx.app.clone();
            let _g = match flock(&app, &n2, vmid, true, app.costs.vm_lock_timeout_seconds).await {
                Ok(g) => g,
                Err(e) => return (ctx, Outcome::Error(e)),
            };
            ctx.spend(app.costs.template_seconds).await;
            let mut st = app.state.lock();
            let Ok(vm) = st.vm_on_mut(&n2, vmid) else {
                return (
                    ctx,
                    Outcome::Error(format!(
                        "Configuration file 'nodes/{n2}/qemu-server/{vmid}.conf' does not exist"
                    )),
                );
            };
            if let Some(l) = vm.lock() {
                return (ctx, Outcome::Error(format!("VM is locked ({l})")));
            }
            for VmDisk {
                key: k,
                storage: s,
                volname: vol,
                ..
            } in vm.disks()
            {
                if let Some(v) = vm.config.get(&k).and_then(|v| v.as_str()).map(String::from) {
                    let newvol = vol.replacen("vm-", "base-", 1);
                    vm.config.insert(
                        k,
                        json!(v.replacen(&format!("{s}:{vol}"), &format!("{s}:{newvol}"), 1)),
                    );
                }
            }
            vm.config.insert("template".into(), json!(1));
            drop(st);
            (ctx, Outcome::Ok)
        },
    )
    .await?;
    ok(json!(upid))
}
