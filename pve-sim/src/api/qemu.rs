//! `/nodes/{node}/qemu/*`: list, config (GET, sync PUT, async POST), status, power
//! actions, destroy, template conversion and clone, with PVE's synchronous checks, config
//! `lock` property, config flocks, storage locks and the copy-bandwidth model.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{ApiResult, ok};
use crate::access::Identity;
use crate::auth::Auth;
use crate::error::{PveError, PveResult};
use crate::locks::{FlockGuard, StorageLockGuard, storage_timeout_msg};
use crate::params::{P, Params, Ty, path_vmid, valid_dns_name};
use crate::state::{LooseVolume, Shared, Vm, canonical_net, format_size, is_disk_key};
use crate::tasks::{Outcome, TaskCtx, start_task};

fn vm_path(vmid: u32) -> String {
    format!("/vms/{vmid}")
}

fn locked(l: &str) -> PveError {
    PveError::internal(format!("VM is locked ({l})"))
}

/// `skiplock` is for root@pam with a ticket only; every token (root's too) is refused.
fn check_skiplock(p: &Params, who: &Identity) -> PveResult<bool> {
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

async fn flock(
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
        "maxdisk": vm.disks().iter().map(|d| d.3).sum::<u64>(), "disk": 0,
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

pub(super) async fn get_config(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    Path((node, vmid)): Path<(String, String)>,
    p: Params,
) -> ApiResult {
    p.check(
        &[P("current", Ty::Bool, false), P("snapshot", Ty::Str, false)],
        |_| false,
    )?;
    let vmid = path_vmid(&vmid)?;
    let st = app.state.lock();
    st.proxy_to(&node, Instant::now())?;
    let vm = st.vm_on(&node, vmid)?;
    st.check(&who, &vm_path(vmid), "VM.Audit")?;
    if let Some(s) = p.str("snapshot") {
        return Err(PveError::internal(format!("snapshot '{s}' does not exist")));
    }
    let mut c: serde_json::Map<String, Value> = vm
        .config
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if c.contains_key("cipassword") {
        c.insert("cipassword".into(), json!("**********"));
    }
    c.insert("digest".into(), json!(config_digest(&vm.config)));
    ok(Value::Object(c))
}

fn is_config_key(k: &str) -> bool {
    let idx = |p: &str, max: u32| {
        k.strip_prefix(p)
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|n| n <= max)
    };
    idx("net", 31)
        || idx("ipconfig", 31)
        || is_disk_key(k)
        || matches!(
            k,
            "name"
                | "description"
                | "tags"
                | "cores"
                | "sockets"
                | "memory"
                | "balloon"
                | "cpu"
                | "cpulimit"
                | "cpuunits"
                | "vcpus"
                | "numa"
                | "ciuser"
                | "cipassword"
                | "sshkeys"
                | "nameserver"
                | "searchdomain"
                | "citype"
                | "onboot"
                | "protection"
                | "agent"
                | "boot"
                | "ostype"
                | "scsihw"
                | "machine"
                | "bios"
                | "vga"
                | "serial0"
                | "lock"
                | "hotplug"
                | "kvm"
                | "startup"
                | "smbios1"
                | "vmgenid"
                | "template"
        )
}

fn config_priv(k: &str) -> &'static str {
    if k.starts_with("net") {
        "VM.Config.Network"
    } else if matches!(
        k,
        "cores" | "sockets" | "cpu" | "cpulimit" | "cpuunits" | "vcpus" | "numa"
    ) {
        "VM.Config.CPU"
    } else if matches!(k, "memory" | "balloon") {
        "VM.Config.Memory"
    } else if k.starts_with("ipconfig")
        || matches!(
            k,
            "ciuser" | "cipassword" | "sshkeys" | "nameserver" | "searchdomain" | "citype"
        )
    {
        "VM.Config.Cloudinit"
    } else if is_disk_key(k) {
        "VM.Config.Disk"
    } else if matches!(
        k,
        "machine" | "bios" | "vga" | "scsihw" | "serial0" | "kvm" | "hotplug"
    ) {
        "VM.Config.HWType"
    } else {
        "VM.Config.Options"
    }
}

const UPDATE_PARAMS: &[P] = &[
    P("delete", Ty::Str, false),
    P("revert", Ty::Str, false),
    P("digest", Ty::Str, false),
    P("skiplock", Ty::Bool, false),
    P("force", Ty::Bool, false),
];

const UPDATE_PARAMS_ASYNC: &[P] = &[
    P("delete", Ty::Str, false),
    P("revert", Ty::Str, false),
    P("digest", Ty::Str, false),
    P("skiplock", Ty::Bool, false),
    P("force", Ty::Bool, false),
    P("background_delay", Ty::Int(1, 30), false),
];

/// A checked config change.
struct Change {
    set: Vec<(String, Value)>,
    delete: Vec<String>,
    digest: Option<String>,
    skiplock: bool,
}

/// Synchronous checks of a config update (both PUT and POST).
fn prepare_update(
    app: &Shared,
    who: &Identity,
    node: &str,
    vmid: u32,
    p: &Params,
) -> PveResult<Change> {
    let skiplock = check_skiplock(p, who)?;
    let control = [
        "delete",
        "revert",
        "digest",
        "skiplock",
        "force",
        "background_delay",
    ];
    let mut set = Vec::new();
    let mut errors = BTreeMap::new();
    let mut st = app.state.lock();
    st.proxy_to(node, Instant::now())?;
    st.vm_on(node, vmid)?;
    let delete: Vec<String> = p
        .str("delete")
        .map(|d| {
            d.split([',', ';', ' '])
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    for (k, _) in p.map.iter().filter(|(k, _)| !control.contains(&k.as_str())) {
        let v = p.json(k).unwrap_or(Value::Null);
        let text = v
            .as_str()
            .map(String::from)
            .unwrap_or_else(|| v.to_string());
        if delete.contains(k) {
            errors.insert(
                "delete".to_string(),
                format!("you can't use '-{k}' and -delete {k}' at the same time"),
            );
            continue;
        }
        let value = if k.starts_with("net") {
            let mac = st.random_mac();
            match canonical_net(&text, &mac) {
                Ok(s) => json!(s),
                Err(e) => {
                    errors.insert(k.clone(), e);
                    continue;
                }
            }
        } else if k == "name" {
            if !valid_dns_name(&text) {
                errors.insert(
                    k.clone(),
                    format!("invalid format - value '{text}' does not look like a valid DNS name"),
                );
                continue;
            }
            json!(text)
        } else if matches!(
            k.as_str(),
            "cores" | "sockets" | "onboot" | "protection" | "balloon" | "vcpus" | "numa"
        ) {
            match text.parse::<i64>() {
                Ok(n) => json!(n),
                Err(_) => {
                    errors.insert(
                        k.clone(),
                        format!("type check ('integer') failed - got '{text}'"),
                    );
                    continue;
                }
            }
        } else {
            json!(text)
        };
        set.push((k.clone(), value));
    }
    for d in &delete {
        if !is_config_key(d) {
            errors.insert(
                "delete".into(),
                format!("invalid format - unknown option '{d}'"),
            );
        }
    }
    if !errors.is_empty() {
        return Err(PveError::params(errors));
    }
    super::config_lock::check(who, &set, &delete)?;
    if set.is_empty() && delete.is_empty() && p.str("revert").is_none() {
        return Err(PveError::internal("no options specified"));
    }
    for k in set.iter().map(|(k, _)| k).chain(delete.iter()) {
        st.check(who, &vm_path(vmid), config_priv(k))?;
    }
    let vm = st.vm_on(node, vmid)?;
    if !skiplock && let Some(l) = vm.lock() {
        return Err(locked(&l));
    }
    Ok(Change {
        set,
        delete,
        digest: p.str("digest"),
        skiplock,
    })
}

fn apply_change(app: &Shared, node: &str, vmid: u32, ch: &Change) -> PveResult<()> {
    let mut st = app.state.lock();
    let vm = st.vm_on_mut(node, vmid)?;
    if let Some(d) = &ch.digest
        && *d != config_digest(&vm.config)
    {
        return Err(PveError::internal(
            "checksum mismatch (file change by other user?)",
        ));
    }
    if !ch.skiplock
        && let Some(l) = vm.lock()
    {
        return Err(locked(&l));
    }
    for k in &ch.delete {
        vm.config.remove(k);
    }
    for (k, v) in &ch.set {
        vm.config.insert(k.clone(), v.clone());
    }
    Ok(())
}

/// Schema types of the config keys that are plain integers or booleans: Proxmox checks
/// them with the other parameters (400), before it looks at the VM.
fn check_config_types(p: &Params) -> PveResult<()> {
    let ints: &[(&str, i64, i64)] = &[
        ("cores", 1, 1024),
        ("sockets", 1, 16),
        ("vcpus", 1, 1024),
        ("cpuunits", 1, 262_144),
        ("balloon", 0, i64::MAX),
    ];
    let bools = [
        "onboot",
        "protection",
        "template",
        "kvm",
        "acpi",
        "tablet",
        "localtime",
    ];
    let mut spec: Vec<P> = ints
        .iter()
        .map(|(k, lo, hi)| P(k, Ty::Int(*lo, *hi), false))
        .collect();
    spec.extend(bools.iter().map(|k| P(k, Ty::Bool, false)));
    p.check(&spec, |_| true)
}

pub(super) async fn put_config(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    Path((node, vmid)): Path<(String, String)>,
    p: Params,
) -> ApiResult {
    p.check(UPDATE_PARAMS, is_config_key)?;
    check_config_types(&p)?;
    let vmid = path_vmid(&vmid)?;
    let ch = prepare_update(&app, &who, &node, vmid, &p)?;
    let _g = flock(&app, &node, vmid, true, app.costs.vm_lock_timeout_seconds)
        .await
        .map_err(PveError::internal)?;
    apply_change(&app, &node, vmid, &ch)?;
    ok(Value::Null)
}

pub(super) async fn post_config(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    Path((node, vmid)): Path<(String, String)>,
    p: Params,
) -> ApiResult {
    p.check(UPDATE_PARAMS_ASYNC, is_config_key)?;
    check_config_types(&p)?;
    let vmid = path_vmid(&vmid)?;
    let ch = prepare_update(&app, &who, &node, vmid, &p)?;
    let n2 = node.clone();
    let upid = start_task(
        &app,
        &node,
        "qmconfig",
        &vmid.to_string(),
        &who,
        Some(vmid),
        move |mut ctx: TaskCtx| async move {
            let app = ctx.app.clone();
            let _g = match flock(&app, &n2, vmid, true, app.costs.vm_lock_timeout_seconds).await {
                Ok(g) => g,
                Err(e) => return (ctx, Outcome::Error(e)),
            };
            for (k, v) in &ch.set {
                ctx.log(format!(
                    "update VM {vmid}: -{k} {}",
                    v.as_str()
                        .map(String::from)
                        .unwrap_or_else(|| v.to_string())
                ));
            }
            if let Err(e) = apply_change(&app, &n2, vmid, &ch) {
                return (ctx, Outcome::Error(e.message));
            }
            ctx.spend(app.costs.config_seconds).await;
            (ctx, Outcome::Ok)
        },
    )
    .await?;
    if let Some(delay) = p.int("background_delay") {
        let deadline = Instant::now() + Duration::from_secs(delay as u64);
        loop {
            let exit = app
                .state
                .lock()
                .tasks
                .get(&upid)
                .and_then(|t| t.exit.clone());
            match exit {
                Some(e) if e == "OK" || e.starts_with("WARNINGS") => return ok(Value::Null),
                Some(e) => {
                    return Err(PveError::internal(format!(
                        "failed to update VM {vmid}: {e}"
                    )));
                }
                None if Instant::now() >= deadline => break,
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
    ok(json!(upid))
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
    {
        let st = app.state.lock();
        st.proxy_to(&node, Instant::now())?;
        let vm = st.vm_on(&node, vmid)?;
        st.check(&who, &vm_path(vmid), "VM.Allocate")?;
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
    }
    let n2 = node.clone();
    let upid = start_task(
        &app,
        &node,
        "qmdestroy",
        &vmid.to_string(),
        &who,
        Some(vmid),
        move |mut ctx: TaskCtx| async move {
            let app = ctx.app.clone();
            let _g = match flock(&app, &n2, vmid, true, app.costs.vm_lock_timeout_seconds).await {
                Ok(g) => g,
                Err(e) => return (ctx, Outcome::Error(e)),
            };
            let disks = {
                let mut st = app.state.lock();
                let base = format!("base-{vmid}-");
                let in_use = st.vms.values().any(|v| v.linked_from == Some(vmid))
                    || st
                        .loose
                        .iter()
                        .any(|l| l.volname.contains('/') && l.volname.starts_with(&base));
                match st.vm_on_mut(&n2, vmid) {
                    Err(e) => return (ctx, Outcome::Error(e.message)),
                    Ok(vm) => {
                        if let Some(l) = vm.lock().filter(|_| !skiplock) {
                            return (ctx, Outcome::Error(format!("VM is locked ({l})")));
                        }
                        if vm.running {
                            return (
                                ctx,
                                Outcome::Error(format!("VM {vmid} is running - destroy failed")),
                            );
                        }
                        let disks = vm.disks();
                        if in_use && let Some((_, s, vol, _)) = disks.first() {
                            return (
                                ctx,
                                Outcome::Error(format!(
                                    "base volume '{s}:{vol}' is still in use by linked cloned"
                                )),
                            );
                        }
                        vm.config.insert("lock".into(), json!("destroyed"));
                        disks
                    }
                }
            };
            // qemu-server `destroy_vm`: each disk is freed under its storage lock; a disk
            // that cannot be freed is only a warning and stays on the storage.
            let mut leaked = Vec::new();
            for (_, s, vol, size) in &disks {
                let volid = format!("{s}:{vol}");
                let (key, shared) = {
                    let st = app.state.lock();
                    let shared = st.storages.get(s).is_some_and(|x| x.shared);
                    (st.storage_key(s, &n2), shared)
                };
                if !app.zero_cost() {
                    let Some(g) = storage_lock(&app, &key, shared).await else {
                        ctx.log(format!(
                            "Could not remove disk '{volid}', check manually: {}",
                            storage_timeout_msg(s, shared)
                        ));
                        leaked.push(LooseVolume {
                            storage: s.clone(),
                            node: n2.clone(),
                            volname: vol.clone(),
                            size: *size,
                        });
                        continue;
                    };
                    let hold = app.costs.volume_free_seconds;
                    app.state.lock().stats.busy_enter(&key, Instant::now());
                    ctx.spend(hold).await;
                    app.state.lock().stats.busy_exit(&key, Instant::now());
                    ctx.work.storage.push((key.clone(), hold, 0.0));
                    drop(g);
                }
                let short = vol.rsplit('/').next().unwrap_or(vol);
                ctx.log(format!(
                    "  Logical volume \"{short}\" successfully removed."
                ));
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
        },
    )
    .await?;
    ok(json!(upid))
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
            for (k, s, vol, _) in vm.disks() {
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
    let src_disks = src.disks();
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
        if src_disks
            .iter()
            .any(|(_, s, _, _)| !st.storages.get(s).is_some_and(|x| x.shared))
        {
            return Err(PveError::internal(format!(
                "can't clone VM to node '{target}' (VM uses local storage)"
            )));
        }
    }
    let mut disks = Vec::new();
    for (i, (key, s, vol, size)) in src_disks.iter().enumerate() {
        let dst = storage.clone().unwrap_or_else(|| s.clone());
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
            size: *size,
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
    // The new config: source minus template/lock/unused, fresh MACs, uuid and vmgenid.
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
    Ok(ClonePlan {
        node: node.to_string(),
        src: vmid,
        newid,
        target,
        full,
        pool,
        config,
        disks,
    })
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
    let ClonePlan {
        node, src, newid, ..
    } = plan;
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
    let half_fail = {
        let mut st = app.state.lock();
        match st.vm_on(&node, src) {
            Err(e) => return (ctx, Outcome::Error(e.message)),
            Ok(vm) => {
                if let Some(l) = vm.lock() {
                    return (ctx, Outcome::Error(format!("VM is locked ({l})")));
                }
            }
        }
        if let Some(existing) = st.vms.get(&newid) {
            let msg = if existing.node == node {
                format!("unable to create VM {newid}: config file already exists")
            } else {
                format!(
                    "close (rename) atomic file '/etc/pve/nodes/{node}/qemu-server/{newid}.conf' failed: File exists"
                )
            };
            return (ctx, Outcome::Error(msg));
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
        st.stats.clone_begin(&node, &stat_storage);
        st.faults.clone_half_fail()
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
        if plan.full {
            ctx.log(format!(
                "create full clone of drive {} ({})",
                d.key, d.src_volid
            ));
        } else {
            ctx.log(format!(
                "create linked clone of drive {} ({})",
                d.key, d.src_volid
            ));
        }
        let hold = app.costs.storage_lock_hold_seconds;
        if !app.zero_cost() {
            let Some(permit) = storage_lock(&app, &d.lock_key, d.shared).await else {
                return fail(ctx, storage_timeout_msg(&d.storage, d.shared));
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
        let short = d
            .volname
            .rsplit('/')
            .next()
            .unwrap_or(&d.volname)
            .to_string();
        ctx.log(format!("  Logical volume \"{short}\" created."));
        let mut copy_secs = 0.0;
        if plan.full {
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
        config.insert(
            d.key.clone(),
            json!(format!(
                "{}:{},size={}",
                d.storage,
                d.volname,
                format_size(d.size)
            )),
        );
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
    let mut st = app.state.lock();
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
        vm.linked_from = (!plan.full).then_some(src);
    }
    st.stats.clone_end(&node, &stat_storage);
    drop(st);
    if warnings > 0 {
        ctx.log(format!(
            "WARN: can't add VM {newid} to pool - pool does not exist"
        ));
        return (ctx, Outcome::Warnings(warnings));
    }
    (ctx, Outcome::Ok)
}
