//! Pools in both forms clients use: `/pools?poolid=` (PVE >= 8.1) and the older
//! `/pools/{poolid}`.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, State};
use serde_json::{Value, json};

use super::cluster::vm_resource;
use super::{ApiResult, ok};
use crate::access::Identity;
use crate::auth::Auth;
use crate::error::PveError;
use crate::params::{P, Params, Ty};
use crate::state::{Pool, Shared, State as St};

fn valid_poolid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() <= 3
        && parts.iter().all(|p| {
            p.starts_with(|c: char| c.is_ascii_alphabetic())
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        })
}

fn members(st: &St, pool: &Pool, ty: Option<&str>, rrd_live: bool) -> Vec<Value> {
    let now = Instant::now();
    let mut out = Vec::new();
    if ty.is_none_or(|t| t == "qemu") {
        for vmid in pool.vms.iter().filter(|v| st.vms.contains_key(v)) {
            out.push(vm_resource(st, *vmid, now, rrd_live));
        }
    }
    if ty.is_none_or(|t| t == "storage") {
        for s in &pool.storage {
            for node in st.nodes.keys().filter(|n| st.storage_on(s, n).is_some()) {
                out.push(json!({"id": format!("storage/{node}/{s}"), "storage": s, "node": node, "type": "storage"}));
            }
        }
    }
    out
}

fn pool_info(
    app: &Shared,
    st: &St,
    who: &Identity,
    id: &str,
    ty: Option<&str>,
) -> Result<Value, PveError> {
    let pool = st
        .pools
        .get(id)
        .ok_or_else(|| PveError::internal(format!("pool '{id}' does not exist")))?;
    st.check(who, &format!("/pool/{id}"), "Pool.Audit")?;
    let mut v = json!({"poolid": id, "members": members(st, pool, ty, app.rrd_live())});
    if let Some(c) = &pool.comment {
        v["comment"] = json!(c);
    }
    Ok(v)
}

pub(super) async fn index(State(app): State<Arc<Shared>>, Auth(who): Auth, p: Params) -> ApiResult {
    p.check(
        &[
            P("poolid", Ty::Str, false),
            P("type", Ty::Enum(&["qemu", "lxc", "storage"]), false),
        ],
        |_| false,
    )?;
    let st = app.state.lock();
    if let Some(id) = p.str("poolid") {
        return ok(json!([pool_info(
            &app,
            &st,
            &who,
            &id,
            p.str("type").as_deref()
        )?]));
    }
    let data: Vec<Value> = st
        .pools
        .iter()
        .filter(|(id, _)| st.has(&who, &format!("/pool/{id}"), "Pool.Audit"))
        .map(|(id, pool)| {
            let mut v = json!({"poolid": id});
            if let Some(c) = &pool.comment {
                v["comment"] = json!(c);
            }
            v
        })
        .collect();
    ok(Value::Array(data))
}

pub(super) async fn get_p(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    Path(id): Path<String>,
    p: Params,
) -> ApiResult {
    p.check(
        &[P("type", Ty::Enum(&["qemu", "lxc", "storage"]), false)],
        |_| false,
    )?;
    let st = app.state.lock();
    // pve-manager `Pool.pm` answers with `index()[0]`, `poolid` included.
    ok(pool_info(&app, &st, &who, &id, p.str("type").as_deref())?)
}

pub(super) async fn create(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    p: Params,
) -> ApiResult {
    p.check(
        &[P("poolid", Ty::Str, true), P("comment", Ty::Str, false)],
        |_| false,
    )?;
    let id = p.str("poolid").unwrap_or_default();
    if !valid_poolid(&id) {
        return Err(PveError::param(
            "poolid",
            format!(
                "invalid format - pool name '{id}' contains illegal characters or does not start with a letter"
            ),
        ));
    }
    let _cfg = app
        .user_cfg_lock("create pool failed")
        .await
        .map_err(PveError::internal)?;
    let mut st = app.state.lock();
    st.check(&who, &format!("/pool/{id}"), "Pool.Allocate")?;
    if st.pools.contains_key(&id) {
        return Err(PveError::internal(format!(
            "create pool failed: pool '{id}' already exists"
        )));
    }
    st.pools.insert(
        id,
        Pool {
            comment: p.str("comment"),
            ..Pool::default()
        },
    );
    ok(Value::Null)
}

const UPDATE: &[P] = &[
    P("vms", Ty::Str, false),
    P("storage", Ty::Str, false),
    P("delete", Ty::Bool, false),
    P("allow-move", Ty::Bool, false),
    P("comment", Ty::Str, false),
    P("digest", Ty::Str, false),
];

fn update(app: &Shared, who: &Identity, id: &str, p: &Params) -> ApiResult {
    let mut st = app.state.lock();
    st.check(who, &format!("/pool/{id}"), "Pool.Allocate")?;
    if !st.pools.contains_key(id) {
        return Err(PveError::internal(format!(
            "update pools failed: pool '{id}' does not exist"
        )));
    }
    let list = |k: &str| -> Vec<String> {
        p.str(k)
            .map(|s| {
                s.split([',', ';', ' '])
                    .filter(|x| !x.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    };
    let delete = p.flag("delete");
    let allow_move = p.flag("allow-move");
    let mut vmids = Vec::new();
    for v in list("vms") {
        let vmid: u32 = v.parse().map_err(|_| {
            PveError::param(
                "vms",
                format!("invalid format - value '{v}' does not look like a valid VM ID"),
            )
        })?;
        if !st.vms.contains_key(&vmid) {
            return Err(PveError::internal(format!(
                "update pools failed: no such VM '{vmid}'"
            )));
        }
        if !st.has(who, &format!("/vms/{vmid}"), "VM.Allocate")
            && !st.has(who, &format!("/vms/{vmid}"), "Permissions.Modify")
        {
            return Err(PveError::perm(
                &format!("/vms/{vmid}"),
                "Permissions.Modify",
            ));
        }
        let cur = st.vms[&vmid].pool.clone();
        if delete {
            if cur.as_deref() != Some(id) {
                return Err(PveError::internal(format!(
                    "update pools failed: VM {vmid} is not a pool member"
                )));
            }
        } else {
            match cur.as_deref() {
                Some(c) if c == id => {
                    return Err(PveError::internal(format!(
                        "update pools failed: VM {vmid} is already a pool member"
                    )));
                }
                Some(c) if !allow_move => {
                    return Err(PveError::internal(format!(
                        "update pools failed: VM {vmid} belongs already to pool '{c}' and 'allow-move' is not set"
                    )));
                }
                _ => {}
            }
        }
        vmids.push((vmid, cur));
    }
    let storages = list("storage");
    for s in &storages {
        if !st.storages.contains_key(s) {
            return Err(PveError::internal(format!(
                "update pools failed: storage '{s}' does not exist"
            )));
        }
    }
    for (vmid, cur) in vmids {
        if let Some(c) = cur
            && let Some(old) = st.pools.get_mut(&c)
        {
            old.vms.remove(&vmid);
        }
        if let Some(vm) = st.vms.get_mut(&vmid) {
            vm.pool = (!delete).then(|| id.to_string());
        }
        if !delete && let Some(pool) = st.pools.get_mut(id) {
            pool.vms.insert(vmid);
        }
    }
    let pool = st.pools.get_mut(id).expect("checked");
    for s in storages {
        if delete {
            pool.storage.remove(&s);
        } else {
            pool.storage.insert(s);
        }
    }
    if let Some(c) = p.str("comment") {
        pool.comment = Some(c);
    }
    ok(Value::Null)
}

pub(super) async fn update_q(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    p: Params,
) -> ApiResult {
    let mut spec: Vec<P> = UPDATE.iter().map(|x| P(x.0, x.1, x.2)).collect();
    spec.push(P("poolid", Ty::Str, true));
    p.check(&spec, |_| false)?;
    let _cfg = app
        .user_cfg_lock("update pools failed")
        .await
        .map_err(PveError::internal)?;
    update(&app, &who, &p.str("poolid").unwrap_or_default(), &p)
}

pub(super) async fn update_p(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    Path(id): Path<String>,
    p: Params,
) -> ApiResult {
    p.check(UPDATE, |_| false)?;
    let _cfg = app
        .user_cfg_lock("update pools failed")
        .await
        .map_err(PveError::internal)?;
    update(&app, &who, &id, &p)
}

fn delete(app: &Shared, who: &Identity, id: &str) -> ApiResult {
    let mut st = app.state.lock();
    st.check(who, &format!("/pool/{id}"), "Pool.Allocate")?;
    let Some(pool) = st.pools.get(id) else {
        return Err(PveError::internal(format!(
            "delete pool failed: pool '{id}' does not exist"
        )));
    };
    if let Some(vm) = pool.vms.iter().find(|v| st.vms.contains_key(v)) {
        return Err(PveError::internal(format!(
            "delete pool failed: pool '{id}' is not empty (contains VM {vm})"
        )));
    }
    if let Some(s) = pool.storage.iter().next() {
        return Err(PveError::internal(format!(
            "delete pool failed: pool '{id}' is not empty (contains storage '{s}')"
        )));
    }
    st.pools.remove(id);
    let path = format!("/pool/{id}");
    st.acls.retain(|a| a.path != path);
    ok(Value::Null)
}

pub(super) async fn delete_q(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    p: Params,
) -> ApiResult {
    p.check(&[P("poolid", Ty::Str, true)], |_| false)?;
    let _cfg = app
        .user_cfg_lock("delete pool failed")
        .await
        .map_err(PveError::internal)?;
    delete(&app, &who, &p.str("poolid").unwrap_or_default())
}

pub(super) async fn delete_p(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    Path(id): Path<String>,
    p: Params,
) -> ApiResult {
    p.check(&[], |_| false)?;
    let _cfg = app
        .user_cfg_lock("delete pool failed")
        .await
        .map_err(PveError::internal)?;
    delete(&app, &who, &id)
}
