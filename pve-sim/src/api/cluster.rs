//! `/version` and `/cluster/*`: status, resources (privilege-filtered), nextid (no
//! reservation), cluster-wide task list.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use serde_json::{Value, json};

use super::{ApiResult, envelope, ok};
use crate::auth::Auth;
use crate::error::PveError;
use crate::params::{P, Params, Ty};
use crate::state::{Shared, State as St};

pub(super) async fn version(State(app): State<Arc<Shared>>, _a: Auth, p: Params) -> ApiResult {
    p.check(&[], |_| false)?;
    let major = app.version.split('.').next().unwrap_or("9").to_string();
    ok(json!({
        "version": app.version,
        "release": format!("{major}.0"),
        "repoid": "c0ffee42",
        "console": "html5",
    }))
}

pub(super) async fn status(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    p: Params,
) -> ApiResult {
    p.check(&[], |_| false)?;
    let st = app.state.lock();
    st.check(&who, "/", "Sys.Audit")?;
    let now = Instant::now();
    let mut out = vec![json!({
        "type": "cluster", "id": "cluster", "name": st.cluster_name,
        "nodes": st.nodes.len(), "version": 5, "quorate": 1,
    })];
    for (i, n) in st.nodes.values().enumerate() {
        out.push(json!({
            "type": "node", "id": format!("node/{}", n.name), "name": n.name, "nodeid": i + 1,
            "ip": n.ip, "local": (i == 0) as u8, "online": n.is_online(now) as u8, "level": "",
        }));
    }
    ok(Value::Array(out))
}

pub(super) fn vm_resource(st: &St, vmid: u32, now: Instant) -> Value {
    let vm = &st.vms[&vmid];
    let node_online = st.nodes.get(&vm.node).is_some_and(|n| n.is_online(now));
    let maxdisk: u64 = vm.disks().iter().map(|d| d.3).sum();
    let mut v = json!({
        "id": format!("qemu/{vmid}"), "vmid": vmid, "node": vm.node, "type": "qemu",
        "status": if !node_online { "unknown" } else if vm.running { "running" } else { "stopped" },
        "template": vm.is_template() as u8,
        "maxcpu": vm.cores(), "cpu": if vm.running { 0.02 } else { 0.0 },
        "maxmem": vm.memory_mib() << 20,
        "mem": if vm.running { (vm.memory_mib() << 20) / 3 } else { 0 },
        "maxdisk": maxdisk, "disk": 0,
        "netin": 0, "netout": 0, "diskread": 0, "diskwrite": 0,
        "uptime": vm.started.map(|s| now.duration_since(s).as_secs()).unwrap_or(0),
    });
    v["name"] = json!(vm.name().unwrap_or_else(|| format!("VM {vmid}")));
    if let Some(l) = vm.lock() {
        v["lock"] = json!(l);
    }
    if let Some(t) = vm.config.get("tags") {
        v["tags"] = t.clone();
    }
    if let Some(p) = &vm.pool {
        v["pool"] = json!(p);
    }
    v
}

pub(super) fn node_entry(st: &St, name: &str, now: Instant, with_stats: bool) -> Value {
    let n = &st.nodes[name];
    let online = n.is_online(now);
    let mut v = json!({
        "id": format!("node/{name}"), "node": name, "type": "node",
        "status": if online { "online" } else { "offline" }, "level": "",
    });
    if with_stats && online {
        v["cpu"] = json!(st.node_cpu(name));
        v["maxcpu"] = json!(n.cpus);
        v["mem"] = json!(st.node_mem_used(name));
        v["maxmem"] = json!(n.memory);
        v["disk"] = json!(n.rootfs / 5);
        v["maxdisk"] = json!(n.rootfs);
        v["uptime"] = json!(86_400 + n.pstart / 100);
    }
    v
}

pub(super) async fn resources(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    p: Params,
) -> ApiResult {
    p.check(&[P("type", Ty::Str, false)], |_| false)?;
    let ty = p.str("type");
    if let Some(t) = &ty
        && !["vm", "storage", "node", "sdn"].contains(&t.as_str())
    {
        return Err(PveError::param(
            "type",
            format!(
                "value '{t}' does not have a value in the enumeration 'vm, storage, node, sdn'"
            ),
        ));
    }
    let want = |x: &str| ty.as_deref().is_none_or(|t| t == x);
    let st = app.state.lock();
    let now = Instant::now();
    let mut out = Vec::new();
    if want("vm") {
        for id in st.vms.keys() {
            if st.has(&who, &format!("/vms/{id}"), "VM.Audit") {
                out.push(vm_resource(&st, *id, now));
            }
        }
    }
    if want("node") {
        for name in st.nodes.keys() {
            if st.has(&who, &format!("/nodes/{name}"), "Sys.Audit") {
                out.push(node_entry(&st, name, now, true));
            }
        }
    }
    if want("storage") {
        for s in st.storages.values() {
            if !st.has_any(
                &who,
                &format!("/storage/{}", s.id),
                &["Datastore.Audit", "Datastore.AllocateSpace"],
            ) {
                continue;
            }
            for node in st.nodes.keys() {
                if st.storage_on(&s.id, node).is_none() {
                    continue;
                }
                out.push(json!({
                    "id": format!("storage/{node}/{}", s.id), "storage": s.id, "node": node,
                    "type": "storage", "plugintype": s.kind,
                    "status": if st.nodes[node].is_online(now) { "available" } else { "unknown" },
                    "shared": s.shared as u8, "content": s.content.join(","),
                    "disk": st.storage_used(&s.id, node), "maxdisk": s.capacity_gib << 30,
                }));
            }
        }
    }
    if ty.is_none() {
        for (id, pool) in &st.pools {
            if st.has(&who, &format!("/pool/{id}"), "Pool.Audit") {
                let _ = pool;
                out.push(json!({"id": format!("/pool/{id}"), "pool": id, "type": "pool"}));
            }
        }
    }
    ok(Value::Array(out))
}

pub(super) async fn nextid(State(app): State<Arc<Shared>>, _a: Auth, p: Params) -> ApiResult {
    p.check(&[P("vmid", Ty::Int(100, 999_999_999), false)], |_| false)?;
    let st = app.state.lock();
    if let Some(v) = p.int("vmid") {
        let v = v as u32;
        if st.vms.contains_key(&v) {
            return Err(PveError::param("vmid", format!("VM {v} already exists")));
        }
        return ok(json!(v.to_string()));
    }
    let mut id = 100u32;
    while st.vms.contains_key(&id) {
        id += 1;
    }
    if id >= 1_000_000 {
        return Err(PveError::internal(
            "unable to get any free VMID in range [100, 1000000]",
        ));
    }
    ok(json!(id.to_string()))
}

pub(super) async fn tasks(State(app): State<Arc<Shared>>, Auth(who): Auth, p: Params) -> ApiResult {
    p.check(&[], |_| false)?;
    let st = app.state.lock();
    let audit = st.has(&who, "/", "Sys.Audit");
    let me = who.full();
    let data: Vec<Value> = st
        .task_order
        .iter()
        .rev()
        .filter_map(|u| st.tasks.get(u))
        .filter(|t| audit || t.user == me)
        .take(500)
        .map(|t| t.list_json())
        .collect();
    envelope(json!({ "data": data }))
}
