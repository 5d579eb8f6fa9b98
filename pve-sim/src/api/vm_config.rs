//! `/nodes/{node}/qemu/{vmid}/config`: GET (with `current` and `snapshot`), PUT (sync) and
//! POST (a task), with Proxmox's checks: key privileges, schema types, digests, the config
//! `lock` property and the VM's flock.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use serde_json::{Value, json};

use super::qemu::{check_skiplock, config_digest, flock, locked, vm_path};
use super::{ApiResult, ok};
use crate::access::Identity;
use crate::auth::Auth;
use crate::error::{PveError, PveResult};
use crate::params::{P, Params, Ty, path_vmid, valid_dns_name};
use crate::state::{Shared, canonical_net, is_disk_key};
use crate::tasks::{Outcome, TaskCtx, start_task};

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
