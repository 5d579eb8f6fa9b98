//! `/nodes`, `/nodes/{node}/status`, `/nodes/{node}/storage` and the task endpoints
//! (status and log answerable only on the task's own node).

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, State};
use serde_json::{Value, json};

use super::cluster::node_entry;
use super::{ApiResult, envelope, ok};
use crate::auth::Auth;
use crate::error::PveError;
use crate::params::{P, Params, Ty};
use crate::state::Shared;
use crate::tasks::parse_upid;

pub(super) async fn index(State(app): State<Arc<Shared>>, Auth(who): Auth, p: Params) -> ApiResult {
    p.check(&[], |_| false)?;
    let st = app.state.lock();
    let now = Instant::now();
    let data: Vec<Value> = st
        .nodes
        .keys()
        .map(|n| {
            let mut v = node_entry(
                &st,
                n,
                now,
                st.has(&who, &format!("/nodes/{n}"), "Sys.Audit"),
            );
            if let Some(fp) = &app.fingerprint {
                v["ssl_fingerprint"] = json!(fp);
            }
            v
        })
        .collect();
    ok(Value::Array(data))
}

pub(super) async fn status(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    Path(node): Path<String>,
    p: Params,
) -> ApiResult {
    p.check(&[], |_| false)?;
    let st = app.state.lock();
    st.proxy_to(&node, Instant::now())?;
    st.check(&who, &format!("/nodes/{node}"), "Sys.Audit")?;
    let n = &st.nodes[&node];
    let used = st.node_mem_used(&node);
    let cpu = st.node_cpu(&node);
    let load = format!("{:.2}", cpu * n.cpus as f64);
    ok(json!({
        "cpu": cpu, "wait": 0.0, "idle": 0,
        "loadavg": [load, load, load],
        "memory": { "total": n.memory, "used": used, "free": n.memory.saturating_sub(used),
                    "available": n.memory.saturating_sub(used) },
        "swap": { "total": 8u64 << 30, "used": 0, "free": 8u64 << 30 },
        "ksm": { "shared": 0 },
        "rootfs": { "total": n.rootfs, "used": n.rootfs / 5, "free": n.rootfs / 5 * 4, "avail": n.rootfs / 5 * 4 },
        "cpuinfo": { "cpus": n.cpus, "cores": n.cpus / 2, "sockets": 1, "model": "Simulated CPU", "mhz": "2900.000", "hvm": "1" },
        "uptime": 86_400 + n.pstart / 100,
        "pveversion": format!("pve-manager/{}/c0ffee42", app.version),
        "kversion": "Linux 6.14.8-2-pve #1 SMP PREEMPT_DYNAMIC PMX 6.14.8-2",
        "current-kernel": { "sysname": "Linux", "release": "6.14.8-2-pve", "machine": "x86_64", "version": "#1 SMP PREEMPT_DYNAMIC PMX 6.14.8-2" },
        "boot-info": { "mode": "efi", "secureboot": 0 },
    }))
}

pub(super) async fn storage(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    Path(node): Path<String>,
    p: Params,
) -> ApiResult {
    p.check(
        &[
            P("storage", Ty::StorageId, false),
            P("content", Ty::Str, false),
            P("enabled", Ty::Bool, false),
            P("target", Ty::Node, false),
            P("format", Ty::Bool, false),
        ],
        |_| false,
    )?;
    let st = app.state.lock();
    st.proxy_to(&node, Instant::now())?;
    let mut data = Vec::new();
    for s in st.storages.values() {
        if st.storage_on(&s.id, &node).is_none()
            || p.str("storage").is_some_and(|x| x != s.id)
            || p.str("content").is_some_and(|c| !s.content.contains(&c))
            || p.str("target")
                .is_some_and(|t| st.storage_on(&s.id, &t).is_none())
            || !st.has_any(
                &who,
                &format!("/storage/{}", s.id),
                &["Datastore.Audit", "Datastore.AllocateSpace"],
            )
        {
            continue;
        }
        let total = s.capacity_gib << 30;
        let used = st.storage_used(&s.id, &node);
        data.push(json!({
            "storage": s.id, "type": s.kind, "content": s.content.join(","), "enabled": 1,
            "active": 1, "shared": s.shared as u8, "total": total, "used": used,
            "avail": total.saturating_sub(used), "used_fraction": used as f64 / total.max(1) as f64,
        }));
    }
    ok(Value::Array(data))
}

fn task_access(
    st: &crate::state::State,
    who: &crate::access::Identity,
    node: &str,
    user: &str,
) -> Result<(), PveError> {
    if user == who.full() || user == who.user || st.has(who, &format!("/nodes/{node}"), "Sys.Audit")
    {
        Ok(())
    } else {
        Err(PveError::perm(&format!("/nodes/{node}"), "Sys.Audit"))
    }
}

pub(super) async fn task_status(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    Path((node, upid)): Path<(String, String)>,
    p: Params,
) -> ApiResult {
    p.check(&[], |_| false)?;
    let st = app.state.lock();
    st.proxy_to(&node, Instant::now())?;
    let Some((unode, ..)) = parse_upid(&upid) else {
        return Err(PveError::param("upid", "unable to parse worker upid"));
    };
    let task = st
        .tasks
        .get(&upid)
        .filter(|t| t.node == node && unode == node)
        .ok_or_else(|| PveError::param("upid", "no such task"))?;
    task_access(&st, &who, &node, &task.user)?;
    ok(task.status_json())
}

pub(super) async fn task_log(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    Path((node, upid)): Path<(String, String)>,
    p: Params,
) -> ApiResult {
    p.check(
        &[
            P("start", Ty::Int(0, i64::MAX), false),
            P("limit", Ty::Int(0, i64::MAX), false),
            P("download", Ty::Bool, false),
        ],
        |_| false,
    )?;
    let st = app.state.lock();
    st.proxy_to(&node, Instant::now())?;
    if parse_upid(&upid).is_none() {
        return Err(PveError::param("upid", "unable to parse worker upid"));
    }
    let task = st
        .tasks
        .get(&upid)
        .filter(|t| t.node == node)
        .ok_or_else(|| PveError::param("upid", "no such task"))?;
    task_access(&st, &who, &node, &task.user)?;
    let start = p.int("start").unwrap_or(0) as usize;
    let limit = p.int("limit").unwrap_or(50) as usize;
    let total = task.log.len();
    let data: Vec<Value> = if total == 0 {
        vec![json!({"n": 1, "t": "no content"})]
    } else {
        task.log
            .iter()
            .enumerate()
            .skip(start)
            .take(limit)
            .map(|(i, l)| json!({"n": i + 1, "t": l}))
            .collect()
    };
    envelope(json!({"data": data, "total": total.max(1)}))
}

pub(super) async fn task_list(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    Path(node): Path<String>,
    p: Params,
) -> ApiResult {
    p.check(
        &[
            P("start", Ty::Int(0, i64::MAX), false),
            P("limit", Ty::Int(0, i64::MAX), false),
            P("userfilter", Ty::Str, false),
            P("typefilter", Ty::Str, false),
            P("vmid", Ty::Int(100, 999_999_999), false),
            P("errors", Ty::Bool, false),
            P("since", Ty::Int(0, i64::MAX), false),
            P("until", Ty::Int(0, i64::MAX), false),
            P("statusfilter", Ty::Str, false),
            P("source", Ty::Str, false),
        ],
        |_| false,
    )?;
    let st = app.state.lock();
    st.proxy_to(&node, Instant::now())?;
    let audit = st.has(&who, &format!("/nodes/{node}"), "Sys.Audit");
    let source = p.str("source").unwrap_or_else(|| "archive".into());
    let me = who.full();
    let list: Vec<Value> = st
        .task_order
        .iter()
        .rev()
        .filter_map(|u| st.tasks.get(u))
        .filter(|t| t.node == node && (audit || t.user == me))
        .filter(|t| match source.as_str() {
            "active" => t.exit.is_none(),
            "all" => true,
            _ => t.exit.is_some(),
        })
        .filter(|t| p.str("typefilter").is_none_or(|f| t.ttype == f))
        .filter(|t| p.str("userfilter").is_none_or(|f| t.user.contains(&f)))
        .filter(|t| p.int("vmid").is_none_or(|v| t.id == v.to_string()))
        .filter(|t| !p.flag("errors") || t.exit.as_deref().is_some_and(|e| e != "OK"))
        .map(|t| t.list_json())
        .collect();
    let total = list.len();
    let start = p.int("start").unwrap_or(0) as usize;
    let limit = p.int("limit").unwrap_or(50) as usize;
    let data: Vec<Value> = list.into_iter().skip(start).take(limit).collect();
    envelope(json!({"data": data, "total": total}))
}
