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
use crate::state::{Shared, State as St, rrd_sample};

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

/// A VM's `/cluster/resources` entry. The VM list (id, node, type) and the config
/// properties (`lock`, `tags`) and pool are current; everything else comes from pvestatd's
/// last RRD sample, so a new clone first shows `status: unknown` and no name (with the
/// RRD interval at 0, or in zero-cost mode, the sample is taken now).
pub(super) fn vm_resource(st: &St, vmid: u32, now: Instant, rrd_live: bool) -> Value {
    let vm = &st.vms[&vmid];
    let node_online = st.nodes.get(&vm.node).is_some_and(|n| n.is_online(now));
    let mut v = json!({
        "id": format!("qemu/{vmid}"), "vmid": vmid, "node": vm.node, "type": "qemu",
        "status": "unknown",
    });
    let sample = if rrd_live {
        Some(rrd_sample(vm, now))
    } else {
        vm.rrd.clone()
    };
    if let Some(m) = sample {
        for (k, x) in m {
            v[k] = x;
        }
    }
    if !node_online {
        v["status"] = json!("unknown");
    }
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
                out.push(vm_resource(&st, *id, now, app.rrd_live()));
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
