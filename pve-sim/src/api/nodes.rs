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

/// Tasks.pm: the owner (see `Task::visible_to_owner`) or `Sys.Audit` on the node. A task
/// that is not in the table (a UPID that parses but names no task) is judged by its UPID's
/// user field, as Proxmox does before it opens the file.
fn task_access(
    st: &crate::state::State,
    who: &crate::access::Identity,
    node: &str,
    task: Option<&crate::tasks::Task>,
    upid_user: &str,
) -> Result<(), PveError> {
    let owner = match task {
        Some(t) => t.visible_to_owner(who),
        None => {
            let full = who.full();
            upid_user == full || upid_user.split_once('!').is_some_and(|(u, _)| u == full)
        }
    };
    if owner || st.has(who, &format!("/nodes/{node}"), "Sys.Audit") {
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
    if parse_upid(&upid).is_none() {
        return Err(PveError::param("upid", "unable to parse worker upid"));
    }
    // The status is read from the task's log file on the node asked; a UPID of another
    // node, or one spelled differently (lower-case hex), names no file there.
    let task = st
        .tasks
        .get(&upid)
        .filter(|t| t.node == node)
        .ok_or_else(|| PveError::param("upid", "no such task"))?;
    task_access(&st, &who, &node, Some(task), &task.user)?;
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
    let Some((_, _, _, upid_user)) = parse_upid(&upid) else {
        return Err(PveError::param("upid", "unable to parse worker upid"));
    };
    let task = st.tasks.get(&upid).filter(|t| t.node == node);
    task_access(&st, &who, &node, task, &upid_user)?;
    let Some(task) = task else {
        // pve-common `dump_logfile`: a log that cannot be opened is one line, status 200.
        return envelope(json!({
            "data": [{"n": 1, "t": "unable to open file - No such file or directory"}],
            "total": 1,
        }));
    };
    let start = p.int("start").unwrap_or(0) as usize;
    // `limit=0` reads to the end.
    let limit = match p.int("limit").unwrap_or(50) as usize {
        0 => usize::MAX,
        n => n,
    };
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

/// `upid_normalize_status_type`: ok, warning, error, or unknown (running, unexpected status).
fn status_type(exit: Option<&str>) -> &'static str {
    match exit {
        None | Some("unexpected status") => "unknown",
        Some("OK") => "ok",
        Some(e)
            if e.strip_prefix("WARNINGS: ")
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) =>
        {
            "warning"
        }
        Some(_) => "error",
    }
}

/// `GET /nodes/{node}/tasks` as pve-manager's `Tasks.pm` serves it: the active list (tasks
/// running, and ended ones not yet archived) for `source=active|all`, then the archive
/// newest first for `archive|all`; filters by user (substring, any case), type, vmid
/// (the task's id), start time, status type; `start` skips and `limit` caps the matches,
/// `total` counts every match.
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
            P("since", Ty::Int(i64::MIN, i64::MAX), false),
            P("until", Ty::Int(i64::MIN, i64::MAX), false),
            P("statusfilter", Ty::Str, false),
            P("source", Ty::Enum(&["archive", "active", "all"]), false),
        ],
        |_| false,
    )?;
    let st = app.state.lock();
    st.proxy_to(&node, Instant::now())?;
    let audit = st.has(&who, &format!("/nodes/{node}"), "Sys.Audit");
    let source = p.str("source").unwrap_or_else(|| "archive".into());
    let errors = p.flag("errors");
    let wanted: Vec<String> = match p.str("statusfilter") {
        Some(f) if !errors => f
            .split([',', ';', ' ', '\0'])
            .filter(|x| !x.is_empty())
            .map(|x| x.to_lowercase())
            .collect(),
        _ if errors => vec!["warning".into(), "error".into(), "unknown".into()],
        _ => vec![
            "ok".into(),
            "warning".into(),
            "error".into(),
            "unknown".into(),
        ],
    };
    let userfilter = p.str("userfilter").map(|u| u.to_lowercase());
    let typefilter = p.str("typefilter").filter(|t| !t.is_empty());
    let vmid = p.int("vmid").map(|v| v.to_string());
    let (since, until) = (p.int("since"), p.int("until"));
    let start = p.int("start").unwrap_or(0) as usize;
    let limit = p.int("limit").unwrap_or(50) as usize;
    let matches = |t: &&crate::tasks::Task| {
        userfilter
            .as_ref()
            .is_none_or(|f| t.owner().to_lowercase().contains(f.as_str()))
            && (audit || t.visible_to_owner(&who))
            && typefilter.as_ref().is_none_or(|f| t.ttype == *f)
            && vmid.as_ref().is_none_or(|v| t.id == *v)
            && since.is_none_or(|s| t.starttime as i64 >= s)
            && until.is_none_or(|u| t.starttime as i64 <= u)
            && wanted.iter().any(|w| w == status_type(t.exit.as_deref()))
    };
    let newest_first = || {
        st.task_order
            .iter()
            .rev()
            .filter_map(|u| st.tasks.get(u))
            .filter(|t| t.node == node)
    };
    let active = newest_first().filter(|t| !t.saved);
    let archived = newest_first().filter(|t| t.saved);
    let chosen: Vec<&crate::tasks::Task> = match source.as_str() {
        "active" => active.filter(matches).collect(),
        "all" => active.chain(archived).filter(matches).collect(),
        _ => archived.filter(matches).collect(),
    };
    let total = chosen.len();
    let data: Vec<Value> = chosen
        .into_iter()
        .skip(start)
        .take(limit)
        .map(|t| t.list_json())
        .collect();
    envelope(json!({"data": data, "total": total}))
}
