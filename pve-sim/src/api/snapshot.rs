//! `/nodes/{node}/qemu/{vmid}/snapshot*`: list, create, rollback and delete snapshots, as
//! qemu-server's `API2/Qemu.pm` and pve-guest-common's `AbstractConfig` do them in PVE 9.
//!
//! Each change is a task (`qmsnapshot`, `qmrollback`, `qmdelsnapshot`) that takes the VM's
//! config lock, sets the config `lock` property (`snapshot`, `rollback`,
//! `snapshot-delete`) for its duration and costs `snapshot_seconds`, `rollback_seconds` or
//! `snapshot_delete_seconds`. A rollback stops a running VM first (hard, as
//! `__snapshot_rollback_vm_stop` does), puts the snapshot's config back (with `parent`) and
//! the disk state as of the snapshot. Disks have no content here: each VM has a disk
//! *generation* that the library face bumps ([`crate::SimHandle::write_disk`], a student
//! changing files), a snapshot records and a rollback restores.
//!
//! Not modelled: RAM snapshots (`vmstate`) are refused like a non-migratable resource would
//! be only when asked for on a stopped VM; replication snapshots; TPM state.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, State};
use serde_json::{Value, json};

use super::qemu::{config_digest, vm_flock};
use super::{ApiResult, ok};
use crate::auth::Auth;
use crate::error::{PveError, PveResult};
use crate::params::{P, Params, Ty, path_vmid};
use crate::state::{Shared, unix_now};
use crate::tasks::{Outcome, TaskCtx, start_task};

/// One snapshot of a VM.
#[derive(Clone, Debug)]
pub(crate) struct Snap {
    pub config: BTreeMap<String, Value>,
    pub snaptime: u64,
    pub description: String,
    pub parent: Option<String>,
    /// The disk generation the snapshot holds.
    pub disk: u64,
}

/// A VM's snapshots and its disks' generation (the simulated content of its disks).
#[derive(Clone, Debug, Default)]
pub(crate) struct VmSnaps {
    pub snaps: BTreeMap<String, Snap>,
    pub disk: u64,
    /// What the disk state is now, for the library face: `written`, `rolled-back:<name>`.
    pub disk_note: Option<String>,
}

/// Keys of a VM config that a snapshot does not copy (`__snapshot_copy_config`).
const NOT_COPIED: &[&str] = &["lock", "parent", "snapstate", "snaptime", "vmstate"];

fn vm_path(vmid: u32) -> String {
    format!("/vms/{vmid}")
}

/// `pve-configid`: a letter, then letters, digits, `_` and `-`; at most 40 characters.
fn check_snapname(s: &str) -> PveResult<()> {
    let ok = s.len() >= 2
        && s.len() <= 40
        && s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else if s.len() > 40 {
        Err(PveError::param(
            "snapname",
            format!("value may only be 40 characters long (got {})", s.len()),
        ))
    } else {
        Err(PveError::param(
            "snapname",
            format!("invalid format - invalid configuration ID '{s}'"),
        ))
    }
}

pub(super) async fn list(
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
    let mut out = Vec::new();
    if let Some(s) = st.snaps.get(&vmid) {
        for (name, snap) in &s.snaps {
            let mut item = json!({
                "name": name, "snaptime": snap.snaptime, "vmstate": 0,
                "description": snap.description,
            });
            if let Some(p) = &snap.parent {
                item["parent"] = json!(p);
            }
            out.push(item);
        }
    }
    let mut current = json!({
        "name": "current", "digest": config_digest(&vm.config),
        "running": vm.running as u8, "description": "You are here!",
    });
    if let Some(p) = vm.config.get("parent") {
        current["parent"] = p.clone();
    }
    out.push(current);
    ok(Value::Array(out))
}

pub(super) async fn cmd_index(
    State(app): State<Arc<Shared>>,
    Auth(_who): Auth,
    Path((node, vmid, snapname)): Path<(String, String, String)>,
    p: Params,
) -> ApiResult {
    p.check(&[], |_| false)?;
    path_vmid(&vmid)?;
    check_snapname(&snapname)?;
    app.state.lock().proxy_to(&node, Instant::now())?;
    ok(json!([{"cmd": "rollback"}, {"cmd": "config"}]))
}

pub(super) async fn create(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    Path((node, vmid)): Path<(String, String)>,
    p: Params,
) -> ApiResult {
    p.check(
        &[
            P("snapname", Ty::Str, true),
            P("vmstate", Ty::Bool, false),
            P("description", Ty::Str, false),
        ],
        |_| false,
    )?;
    let vmid = path_vmid(&vmid)?;
    let name = p.str("snapname").unwrap_or_default();
    check_snapname(&name)?;
    {
        let st = app.state.lock();
        st.proxy_to(&node, Instant::now())?;
        st.check(&who, &vm_path(vmid), "VM.Snapshot")?;
        if name == "current" {
            return Err(PveError::internal(
                "unable to use snapshot name 'current' (reserved name)",
            ));
        }
        if name.eq_ignore_ascii_case("pending") {
            return Err(PveError::internal(
                "unable to use snapshot name 'pending' (reserved name)",
            ));
        }
        st.vm_on(&node, vmid)?;
    }
    let description = p.str("description").unwrap_or_default();
    let n2 = node.clone();
    let upid = start_task(
        &app,
        &node,
        "qmsnapshot",
        &vmid.to_string(),
        &who,
        Some(vmid),
        move |ctx: TaskCtx| async move { run_create(ctx, n2, vmid, name, description).await },
    )
    .await?;
    ok(json!(upid))
}

/// Checks what `__snapshot_prepare` checks and sets `lock: <lock>`, under the config lock.
async fn prepare(
    app: &Shared,
    node: &str,
    vmid: u32,
    lock: &str,
    check: impl FnOnce(&crate::state::State) -> Result<(), String>,
) -> Result<(), String> {
    let _g = vm_flock(app, node, vmid).await?;
    let mut st = app.state.lock();
    check(&st)?;
    let vm = st.vm_on_mut(node, vmid).map_err(|e| e.message)?;
    if let Some(l) = vm.lock() {
        return Err(format!("VM is locked ({l})"));
    }
    vm.config.insert("lock".into(), json!(lock));
    Ok(())
}

/// Removes the `lock` property (the task's last config write).
fn unlock(app: &Shared, vmid: u32) {
    if let Some(vm) = app.state.lock().vms.get_mut(&vmid) {
        vm.config.remove("lock");
    }
}

async fn run_create(
    mut ctx: TaskCtx,
    node: String,
    vmid: u32,
    name: String,
    description: String,
) -> (TaskCtx, Outcome) {
    let app = ctx.app.clone();
    let checked = prepare(&app, &node, vmid, "snapshot", |st| {
        let vm = st.vm_on(&node, vmid).map_err(|e| e.message)?;
        if vm.is_template() {
            return Err("you can't take a snapshot if it's a template".into());
        }
        if st
            .snaps
            .get(&vmid)
            .is_some_and(|s| s.snaps.contains_key(&name))
        {
            return Err(format!("snapshot name '{name}' already used"));
        }
        let lvm = vm.disks().iter().any(|d| {
            st.storages
                .get(&d.storage)
                .is_some_and(|x| x.kind == "lvm" || x.kind == "iscsi")
        });
        if lvm {
            return Err("snapshot feature is not available".into());
        }
        Ok(())
    })
    .await;
    if let Err(e) = checked {
        return (ctx, Outcome::Error(e));
    }
    ctx.spend(app.costs.snapshot_seconds).await;
    let mut st = app.state.lock();
    let Some(vm) = st.vms.get_mut(&vmid) else {
        return (ctx, Outcome::Error(format!("VM {vmid} vanished")));
    };
    let config: BTreeMap<String, Value> = vm
        .config
        .iter()
        .filter(|(k, _)| !NOT_COPIED.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let parent = vm
        .config
        .get("parent")
        .and_then(|v| v.as_str())
        .map(String::from);
    vm.config.insert("parent".into(), json!(name));
    vm.config.remove("lock");
    let snaps = st.snaps.entry(vmid).or_default();
    let disk = snaps.disk;
    snaps.snaps.insert(
        name.clone(),
        Snap {
            config,
            snaptime: unix_now(),
            description,
            parent,
            disk,
        },
    );
    drop(st);
    ctx.log(format!("snapshot VM {vmid}: {name}"));
    (ctx, Outcome::Ok)
}

pub(super) async fn rollback(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    Path((node, vmid, name)): Path<(String, String, String)>,
    p: Params,
) -> ApiResult {
    p.check(&[P("start", Ty::Bool, false)], |_| false)?;
    let vmid = path_vmid(&vmid)?;
    check_snapname(&name)?;
    let start = p.flag("start");
    {
        let st = app.state.lock();
        st.proxy_to(&node, Instant::now())?;
        if !st.has_any(
            &who,
            &vm_path(vmid),
            &["VM.Snapshot", "VM.Snapshot.Rollback"],
        ) {
            return Err(PveError::perm(
                &vm_path(vmid),
                "VM.Snapshot|VM.Snapshot.Rollback",
            ));
        }
        if start {
            st.check(&who, &vm_path(vmid), "VM.PowerMgmt")?;
        }
    }
    let n2 = node.clone();
    let upid = start_task(
        &app,
        &node,
        "qmrollback",
        &vmid.to_string(),
        &who,
        Some(vmid),
        move |ctx: TaskCtx| async move { run_rollback(ctx, n2, vmid, name, start).await },
    )
    .await?;
    ok(json!(upid))
}

async fn run_rollback(
    mut ctx: TaskCtx,
    node: String,
    vmid: u32,
    name: String,
    start: bool,
) -> (TaskCtx, Outcome) {
    let app = ctx.app.clone();
    let missing = |st: &crate::state::State| -> Result<bool, String> {
        let vm = st.vm_on(&node, vmid).map_err(|e| e.message)?;
        if vm.is_template() {
            return Err("you can't rollback if vm is a template".into());
        }
        if !st
            .snaps
            .get(&vmid)
            .is_some_and(|s| s.snaps.contains_key(&name))
        {
            return Err(format!("snapshot '{name}' does not exist"));
        }
        if let Some(l) = vm.lock() {
            return Err(format!("VM is locked ({l})"));
        }
        Ok(vm.running)
    };
    let running = {
        let _g = match vm_flock(&app, &node, vmid).await {
            Ok(g) => g,
            Err(e) => return (ctx, Outcome::Error(e)),
        };
        match missing(&app.state.lock()) {
            Ok(r) => r,
            Err(e) => return (ctx, Outcome::Error(e)),
        }
    };
    if running {
        // `__snapshot_rollback_vm_stop`: a hard stop with a 5 s timeout.
        ctx.spend(app.costs.stop_seconds).await;
        if let Some(vm) = app.state.lock().vms.get_mut(&vmid) {
            vm.running = false;
            vm.started = None;
        }
    }
    if let Err(e) = prepare(&app, &node, vmid, "rollback", |_| Ok(())).await {
        return (ctx, Outcome::Error(e));
    }
    ctx.spend(app.costs.rollback_seconds).await;
    {
        let mut st = app.state.lock();
        let Some(snap) = st
            .snaps
            .get_mut(&vmid)
            .and_then(|s| s.snaps.get(&name).cloned())
        else {
            drop(st);
            unlock(&app, vmid);
            return (
                ctx,
                Outcome::Error(format!("snapshot '{name}' does not exist")),
            );
        };
        if let Some(s) = st.snaps.get_mut(&vmid) {
            s.disk = snap.disk;
            s.disk_note = Some(format!("rolled-back:{name}"));
        }
        if let Some(vm) = st.vms.get_mut(&vmid) {
            let mut c = snap.config.clone();
            c.insert("parent".into(), json!(name));
            vm.config = c;
        }
    }
    ctx.log(format!("rollback snapshot VM {vmid}: {name}"));
    if start {
        ctx.log(format!("starting VM {vmid}"));
        ctx.spend(app.costs.start_seconds).await;
        if let Some(vm) = app.state.lock().vms.get_mut(&vmid) {
            vm.running = true;
            vm.started = Some(Instant::now());
        }
    }
    (ctx, Outcome::Ok)
}

pub(super) async fn delete(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    Path((node, vmid, name)): Path<(String, String, String)>,
    p: Params,
) -> ApiResult {
    p.check(&[P("force", Ty::Bool, false)], |_| false)?;
    let vmid = path_vmid(&vmid)?;
    check_snapname(&name)?;
    {
        let st = app.state.lock();
        st.proxy_to(&node, Instant::now())?;
        st.check(&who, &vm_path(vmid), "VM.Snapshot")?;
    }
    let n2 = node.clone();
    let upid = start_task(
        &app,
        &node,
        "qmdelsnapshot",
        &vmid.to_string(),
        &who,
        Some(vmid),
        move |ctx: TaskCtx| async move { run_delete(ctx, n2, vmid, name).await },
    )
    .await?;
    ok(json!(upid))
}

async fn run_delete(mut ctx: TaskCtx, node: String, vmid: u32, name: String) -> (TaskCtx, Outcome) {
    let app = ctx.app.clone();
    let checked = prepare(&app, &node, vmid, "snapshot-delete", |st| {
        let vm = st.vm_on(&node, vmid).map_err(|e| e.message)?;
        if vm.is_template() {
            return Err("you can't delete a snapshot if vm is a template".into());
        }
        if !st
            .snaps
            .get(&vmid)
            .is_some_and(|s| s.snaps.contains_key(&name))
        {
            return Err(format!("snapshot '{name}' does not exist"));
        }
        Ok(())
    })
    .await;
    if let Err(e) = checked {
        return (ctx, Outcome::Error(e));
    }
    ctx.spend(app.costs.snapshot_delete_seconds).await;
    let mut st = app.state.lock();
    let mut parent = None;
    if let Some(s) = st.snaps.get_mut(&vmid)
        && let Some(gone) = s.snaps.remove(&name)
    {
        parent = gone.parent.clone();
        for snap in s.snaps.values_mut() {
            if snap.parent.as_deref() == Some(name.as_str()) {
                snap.parent = gone.parent.clone();
            }
        }
    }
    if let Some(vm) = st.vms.get_mut(&vmid) {
        if vm.config.get("parent").and_then(|v| v.as_str()) == Some(name.as_str()) {
            match parent {
                Some(p) => vm.config.insert("parent".into(), json!(p)),
                None => vm.config.remove("parent"),
            };
        }
        vm.config.remove("lock");
    }
    drop(st);
    ctx.log(format!("delete snapshot VM {vmid}: {name}"));
    (ctx, Outcome::Ok)
}

/// The library face's view and changes of a VM's disks and snapshots.
impl Shared {
    /// A running guest changed its disk (a student at work).
    pub(crate) fn write_disk(&self, vmid: u32) -> bool {
        let mut st = self.state.lock();
        if !st.vms.contains_key(&vmid) {
            return false;
        }
        let s = st.snaps.entry(vmid).or_default();
        s.disk += 1;
        s.disk_note = Some("written".into());
        true
    }

    /// (disk generation, what last happened to it) of a VM.
    pub(crate) fn disk_state(&self, vmid: u32) -> (u64, Option<String>) {
        let st = self.state.lock();
        st.snaps
            .get(&vmid)
            .map(|s| (s.disk, s.disk_note.clone()))
            .unwrap_or((0, None))
    }

    /// The names of a VM's snapshots.
    pub(crate) fn snapshot_names(&self, vmid: u32) -> Vec<String> {
        let st = self.state.lock();
        st.snaps
            .get(&vmid)
            .map(|s| s.snaps.keys().cloned().collect())
            .unwrap_or_default()
    }
}
