//! `POST /nodes/{node}/qemu/{vmid}/migrate`: moving a VM to another node of the cluster
//! (task `qmigrate`, id = vmid, on the source node), as qemu-server's `migrate_vm` and
//! `PVE::QemuMigrate` do it for a migration inside one cluster.
//!
//! Synchronous checks (the POST fails): `target` is the node asked (400 `target is local
//! node.`), unknown target, `VM.Migrate`, root-only options, a config `lock`, a running VM
//! without `online=1`, a disk's storage not available on the target. The task then holds
//! the VM's config flock, checks again, writes `lock: migrate`, scans the disks (shared
//! storage stays where it is; local disks are copied to the same storage, or the one
//! `targetstorage` maps them to, on the target), and at the end moves the config to the
//! target node and removes the lock. A failure before the move logs the reason, removes the
//! lock and ends with PVE's exit status `migration aborted`; the VM stays on the source.
//!
//! As on PVE, local disks of a *stopped* VM are copied without asking; `with-local-disks=1`
//! is needed only to live-migrate a running VM's attached local disks. Not modelled: HA
//! (`hamigrate`), replication, snapshots, local devices, conntrack state, bandwidth limits;
//! `migration_type`/`migration_network` are checked (root only) and otherwise ignored.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, State};
use serde_json::json;

use super::{ApiResult, ok};
use crate::access::Identity;
use crate::auth::Auth;
use crate::error::{PveError, PveResult};
use crate::locks::FlockGuard;
use crate::params::{P, Params, Ty, path_vmid, valid_storage_id};
use crate::state::{Shared, Vm, VmDisk, unix_now};
use crate::tasks::{Outcome, TaskCtx, start_task};

const MIGRATE_PARAMS: &[P] = &[
    P("target", Ty::Node, true),
    P("online", Ty::Bool, false),
    P("force", Ty::Bool, false),
    P("migration_type", Ty::Str, false),
    P("migration_network", Ty::Str, false),
    P("with-local-disks", Ty::Bool, false),
    P("targetstorage", Ty::Str, false),
    P("bwlimit", Ty::Int(0, i64::MAX), false),
    P("with-conntrack-state", Ty::Bool, false),
];

/// Storage types `PVE::QemuMigrate` can copy a local disk of.
const MIGRATABLE_LOCAL: &[&str] = &["dir", "btrfs", "zfspool", "lvmthin", "lvm"];

/// Nominal seconds of the config move and the bookkeeping around it.
const MIGRATE_BASE_SECONDS: f64 = 1.0;
/// Nominal RAM transfer rate of a live migration, MiB per second.
const LIVE_RAM_MIB_PER_S: f64 = 1024.0;

/// `targetstorage`: one storage for every local disk, `1` for "the same storage", or
/// `source:target` pairs (a bare id among them is the default).
#[derive(Default)]
struct StorageMap {
    default: Option<String>,
    entries: BTreeMap<String, String>,
}

impl StorageMap {
    fn parse(s: &str) -> Result<StorageMap, String> {
        let mut map = StorageMap::default();
        for part in s.split([',', ';', ' ']).filter(|p| !p.is_empty()) {
            if part == "1" {
                continue;
            }
            match part.split_once(':') {
                Some((from, to)) if valid_storage_id(from) && valid_storage_id(to) => {
                    map.entries.insert(from.to_string(), to.to_string());
                }
                None if valid_storage_id(part) => map.default = Some(part.to_string()),
                _ => {
                    return Err(format!(
                        "failed to parse storage map: invalid format - '{part}'"
                    ));
                }
            }
        }
        Ok(map)
    }

    fn target_of(&self, storage: &str) -> String {
        self.entries
            .get(storage)
            .or(self.default.as_ref())
            .cloned()
            .unwrap_or_else(|| storage.to_string())
    }
}

/// One disk of the VM as the migration sees it.
struct Disk {
    key: String,
    storage: String,
    volname: String,
    size: u64,
    shared: bool,
    kind: String,
    target_storage: String,
}

struct Plan {
    node: String,
    target: String,
    vmid: u32,
    online: bool,
    with_local_disks: bool,
    map: StorageMap,
}

fn synchronous_checks(
    app: &Shared,
    who: &Identity,
    node: &str,
    vmid: u32,
    p: &Params,
) -> PveResult<Plan> {
    let target = p.str("target").unwrap_or_default();
    if target == node {
        return Err(PveError::param("target", "target is local node."));
    }
    let st = app.state.lock();
    st.proxy_to(node, Instant::now())?;
    if !st.nodes.contains_key(&target) {
        return Err(PveError::internal(format!(
            "no such cluster node '{target}'"
        )));
    }
    for opt in ["force", "migration_type", "migration_network"] {
        let given = match opt {
            "force" => p.flag(opt),
            _ => p.str(opt).is_some(),
        };
        if given && !who.is_root_ticket() {
            return Err(PveError::param(opt, "Only root may use this option."));
        }
    }
    if let Some(t) = p.str("migration_type")
        && t != "secure"
        && t != "insecure"
    {
        return Err(PveError::param(
            "migration_type",
            format!("value '{t}' does not have a value in the enumeration 'secure, insecure'"),
        ));
    }
    let vm = st.vm_on(node, vmid)?;
    st.check(who, &format!("/vms/{vmid}"), "VM.Migrate")?;
    if let Some(l) = vm.lock() {
        return Err(PveError::internal(format!("VM is locked ({l})")));
    }
    let online = vm.running && p.flag("online");
    if vm.running && !online {
        return Err(PveError::internal(
            "can't migrate running VM without --online",
        ));
    }
    let map = match p.str("targetstorage") {
        Some(s) => StorageMap::parse(&s).map_err(|e| PveError::param("targetstorage", e))?,
        None => StorageMap::default(),
    };
    // check_storage_availability: every disk's storage (or where the map sends a local
    // one) must be enabled on the target.
    for storage in vm.disks().into_iter().map(|d| d.storage) {
        let shared = st.storages.get(&storage).is_some_and(|s| s.shared);
        let dst = if shared {
            storage.clone()
        } else {
            map.target_of(&storage)
        };
        if !st.storages.contains_key(&dst) {
            return Err(PveError::internal(format!(
                "storage '{dst}' does not exist"
            )));
        }
        if st.storage_on(&dst, &target).is_none() {
            return Err(PveError::internal(format!(
                "storage '{dst}' is not available on node '{target}'"
            )));
        }
    }
    Ok(Plan {
        node: node.to_string(),
        target,
        vmid,
        online,
        with_local_disks: p.flag("with-local-disks"),
        map,
    })
}

pub(super) async fn migrate(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    Path((node, vmid)): Path<(String, String)>,
    p: Params,
) -> ApiResult {
    p.check(MIGRATE_PARAMS, |_| false)?;
    let vmid = path_vmid(&vmid)?;
    let plan = synchronous_checks(&app, &who, &node, vmid, &p)?;
    let upid = start_task(
        &app,
        &node,
        "qmigrate",
        &vmid.to_string(),
        &who,
        Some(vmid),
        move |ctx| run_migration(ctx, plan),
    )
    .await?;
    ok(json!(upid))
}

/// `YYYY-MM-DD HH:MM:SS` (UTC), the prefix `PVE::AbstractMigrate` puts on its log lines.
fn stamp() -> String {
    let secs = unix_now();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn info(ctx: &TaskCtx, msg: &str) {
    ctx.log(format!("{} {msg}", stamp()));
}

fn err(ctx: &TaskCtx, msg: &str) {
    ctx.log(format!("{} ERROR: {msg}", stamp()));
}

fn duration(started: Instant, scale: f64) -> String {
    let wall = started.elapsed().as_secs_f64();
    let simulated = if scale > 0.0 { wall / scale } else { 0.0 };
    let s = simulated as u64;
    format!("{:02}:{:02}:{:02}", s / 3600, s % 3600 / 60, s % 60)
}

async fn run_migration(mut ctx: TaskCtx, plan: Plan) -> (TaskCtx, Outcome) {
    let app = ctx.app.clone();
    let started = Instant::now();
    // The whole migration runs under the VM's config flock (lock_config, 10 s).
    let _flock = if app.zero_cost() {
        FlockGuard::None
    } else {
        match app
            .flocks
            .lock(
                &plan.node,
                plan.vmid,
                true,
                app.wall(app.costs.vm_lock_timeout_seconds),
            )
            .await
        {
            Ok(g) => g,
            Err(e) => return abort(ctx, started, &e, None),
        }
    };
    let disks = match prepare(&ctx, &plan) {
        Ok(d) => d,
        Err(e) => return abort(ctx, started, &e, None),
    };
    let target_ip = app
        .state
        .lock()
        .nodes
        .get(&plan.target)
        .map(|n| n.ip.clone())
        .unwrap_or_default();
    info(
        &ctx,
        &format!(
            "starting migration of VM {} to node '{}' ({target_ip})",
            plan.vmid, plan.target
        ),
    );
    // phase 1: lock, scan, copy the local disks of a stopped VM.
    if let Ok(vm) = app.state.lock().vm_on_mut(&plan.node, plan.vmid) {
        vm.config.insert("lock".into(), json!("migrate"));
    }
    if let Err(e) = scan_local_volumes(&ctx, &plan, &disks) {
        err(&ctx, &e);
        info(&ctx, "aborting phase 1 - cleanup resources");
        return abort(ctx, started, &e, Some(&plan));
    }
    let local: Vec<&Disk> = disks.iter().filter(|d| !d.shared).collect();
    if !local.is_empty() {
        info(&ctx, "copying local disk images");
    }
    for d in &local {
        let bw = app
            .state
            .lock()
            .storages
            .get(&d.target_storage)
            .map(|s| s.bandwidth_mb_per_s)
            .unwrap_or(100.0);
        ctx.spend(d.size as f64 / (1u64 << 20) as f64 / bw).await;
        info(
            &ctx,
            &format!(
                "volume '{}:{}' is '{}:{}' on the target",
                d.storage, d.volname, d.target_storage, d.volname
            ),
        );
    }
    // phase 2 (running VM): move the RAM while it runs.
    if plan.online {
        let mib = app
            .state
            .lock()
            .vms
            .get(&plan.vmid)
            .map(|v| v.memory_mib())
            .unwrap_or(0);
        info(
            &ctx,
            &format!("starting VM {} on remote node '{}'", plan.vmid, plan.target),
        );
        info(&ctx, "starting online/live migration");
        ctx.spend(mib as f64 / LIVE_RAM_MIB_PER_S).await;
        info(&ctx, "migration status: completed");
    }
    // phase 3: move the config to the target and drop the lock.
    ctx.spend(MIGRATE_BASE_SECONDS).await;
    let moved = {
        let mut st = app.state.lock();
        match st.vm_on_mut(&plan.node, plan.vmid) {
            Ok(vm) => {
                move_config(vm, &disks, &plan.target);
                true
            }
            Err(_) => false,
        }
    };
    if !moved {
        return abort(ctx, started, "VM config vanished during migration", None);
    }
    info(
        &ctx,
        &format!(
            "migration finished successfully (duration {})",
            duration(started, app.scale)
        ),
    );
    (ctx, Outcome::Ok)
}

/// `move_config_to_node`: the config goes to `target` with its local disks' new volids
/// and without the migrate lock.
fn move_config(vm: &mut Vm, disks: &[Disk], target: &str) {
    for d in disks
        .iter()
        .filter(|d| !d.shared && d.target_storage != d.storage)
    {
        if let Some(v) = vm.config.get(&d.key).and_then(|v| v.as_str()) {
            let moved = v.replacen(
                &format!("{}:", d.storage),
                &format!("{}:", d.target_storage),
                1,
            );
            vm.config.insert(d.key.clone(), json!(moved));
        }
    }
    vm.config.remove("lock");
    vm.node = target.to_string();
}

/// `prepare`: the VM is still here, unlocked, and running only if `online`; the target up.
fn prepare(ctx: &TaskCtx, plan: &Plan) -> Result<Vec<Disk>, String> {
    let st = ctx.app.state.lock();
    let vm = st.vm_on(&plan.node, plan.vmid).map_err(|e| e.message)?;
    if let Some(l) = vm.lock() {
        return Err(format!("VM is locked ({l})"));
    }
    if vm.running && !plan.online {
        return Err("can't migrate running VM without --online".into());
    }
    if !st
        .nodes
        .get(&plan.target)
        .is_some_and(|n| n.is_online(Instant::now()))
    {
        // The SSH connection to the target fails first.
        return Err("Can't connect to destination address using public key".into());
    }
    Ok(vm
        .disks()
        .into_iter()
        .map(|d| {
            let VmDisk {
                key,
                storage,
                volname,
                size,
            } = d;
            let spec = st.storages.get(&storage);
            let shared = spec.is_some_and(|s| s.shared);
            Disk {
                target_storage: if shared {
                    storage.clone()
                } else {
                    plan.map.target_of(&storage)
                },
                kind: spec.map(|s| s.kind.clone()).unwrap_or_default(),
                key,
                storage,
                volname,
                size,
                shared,
            }
        })
        .collect())
}

/// `scan_local_volumes`: what can be copied. Errors per volume are logged as warnings and
/// abort with `can't migrate VM - check log`; the other checks abort with their own text.
fn scan_local_volumes(ctx: &TaskCtx, plan: &Plan, disks: &[Disk]) -> Result<(), String> {
    let prefix = "Problem found while scanning volumes - ";
    let used_as_base = {
        let st = ctx.app.state.lock();
        st.vms.values().any(|v| v.linked_from == Some(plan.vmid))
    };
    let mut volume_errors = Vec::new();
    for d in disks.iter().filter(|d| !d.shared) {
        let volid = format!("{}:{}", d.storage, d.volname);
        if d.volname.starts_with("base-") && !d.volname.contains('/') && used_as_base {
            volume_errors.push((volid.clone(), "referenced by linked clone(s)".to_string()));
        }
        if plan.online && !plan.with_local_disks {
            volume_errors.push((
                volid.clone(),
                "can't live migrate attached local disks without with-local-disks option"
                    .to_string(),
            ));
        }
        info(ctx, &format!("found local disk '{volid}' (attached)"));
    }
    for (volid, e) in &volume_errors {
        info(ctx, &format!("can't migrate local disk '{volid}': {e}"));
    }
    if !volume_errors.is_empty() {
        return Err(format!("{prefix}can't migrate VM - check log"));
    }
    for d in disks.iter().filter(|d| !d.shared) {
        let volid = format!("{}:{}", d.storage, d.volname);
        if !MIGRATABLE_LOCAL.contains(&d.kind.as_str()) {
            return Err(format!(
                "{prefix}can't migrate '{volid}' - storage type '{}' not supported",
                d.kind
            ));
        }
        // A linked clone on local storage: its base stays behind.
        if let Some((base, _)) = d.volname.split_once('/') {
            return Err(format!(
                "{prefix}can't migrate '{volid}' as it's a clone of '{base}'"
            ));
        }
    }
    Ok(())
}

/// Ends the task as `PVE::AbstractMigrate` does on an error: the reason in the log, the
/// `lock: migrate` written by phase 1 removed (`unlock`), exit status `migration aborted`.
fn abort(
    ctx: TaskCtx,
    started: Instant,
    reason: &str,
    unlock: Option<&Plan>,
) -> (TaskCtx, Outcome) {
    if let Some(plan) = unlock
        && let Ok(vm) = ctx.app.state.lock().vm_on_mut(&plan.node, plan.vmid)
    {
        vm.config.remove("lock");
    }
    err(
        &ctx,
        &format!(
            "migration aborted (duration {}): {reason}",
            duration(started, ctx.app.scale)
        ),
    );
    (ctx, Outcome::Error("migration aborted".into()))
}
