//! Storage content: `GET /nodes/{node}/storage/{storage}/content` (VM disks and the
//! volumes destroys left behind), `GET` and `DELETE .../content/{volume}` as pve-storage's
//! `API2/Storage/Content.pm` serves them (`DELETE` frees the volume in an `imgdel` task,
//! under the storage lock). Only VM images are modelled.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use serde_json::{Value, json};

use super::qemu::storage_lock;
use super::{ApiResult, ok};
use crate::access::Identity;
use crate::auth::Auth;
use crate::cluster::StorageSpec;
use crate::error::{PveError, PveResult};
use crate::locks::storage_timeout_msg;
use crate::params::{P, Params, Ty};
use crate::state::{LooseVolume, Shared, State as St, volume_owner};
use crate::tasks::{Outcome, TaskCtx, start_task};

/// The storage `id` on `node` (exists and is enabled there), with the caller's right.
fn storage_for(
    st: &St,
    who: &Identity,
    node: &str,
    id: &str,
    privs: &[&str],
) -> PveResult<StorageSpec> {
    st.proxy_to(node, Instant::now())?;
    let Some(spec) = st.storages.get(id) else {
        return Err(PveError::internal(format!("storage '{id}' does not exist")));
    };
    if st.storage_on(id, node).is_none() {
        return Err(PveError::internal(format!(
            "storage '{id}' is not available on node '{node}'"
        )));
    }
    if !st.has_any(who, &format!("/storage/{id}"), privs) {
        return Err(PveError::perm(&format!("/storage/{id}"), privs[0]));
    }
    Ok(spec.clone())
}

fn entry(storage: &str, v: &LooseVolume) -> Value {
    let mut e = json!({
        "volid": format!("{storage}:{}", v.volname),
        "format": "raw",
        "size": v.size,
        "content": "images",
    });
    if let Some(owner) = volume_owner(&v.volname) {
        e["vmid"] = json!(owner);
    }
    if let Some((base, _)) = v.volname.split_once('/') {
        e["parent"] = json!(format!("{storage}:{base}"));
    }
    e
}

/// `real_volume_id`: a volume with a storage prefix must name this storage.
fn volname_of(storage: &str, volume: &str) -> PveResult<String> {
    match volume.split_once(':') {
        Some((s, v)) if s == storage => Ok(v.to_string()),
        Some((s, _)) => Err(PveError::param(
            "volume",
            format!("volume storage id '{s}' does not match storage '{storage}'"),
        )),
        None => Ok(volume.to_string()),
    }
}

fn find(st: &St, storage: &str, node: &str, volname: &str) -> Option<LooseVolume> {
    // A linked clone's volume may be named with or without its base (`base-100-disk-0/`).
    st.volumes(storage, node)
        .into_iter()
        .find(|v| v.volname == volname || v.volname.rsplit('/').next() == Some(volname))
}

pub(super) async fn index(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    Path((node, storage)): Path<(String, String)>,
    p: Params,
) -> ApiResult {
    p.check(
        &[
            P("content", Ty::Str, false),
            P("vmid", Ty::Int(100, 999_999_999), false),
        ],
        |_| false,
    )?;
    let st = app.state.lock();
    let spec = storage_for(
        &st,
        &who,
        &node,
        &storage,
        &["Datastore.Audit", "Datastore.AllocateSpace"],
    )?;
    if p.str("content").is_some_and(|c| c != "images")
        || !spec.content.iter().any(|c| c == "images")
    {
        return ok(json!([]));
    }
    let vmid = p.int("vmid").map(|v| v as u32);
    let list: Vec<Value> = st
        .volumes(&storage, &node)
        .iter()
        .filter(|v| vmid.is_none_or(|id| volume_owner(&v.volname) == Some(id)))
        .map(|v| entry(&storage, v))
        .collect();
    ok(Value::Array(list))
}

fn volume_path(spec: &StorageSpec, v: &LooseVolume) -> String {
    let short = v.volname.rsplit('/').next().unwrap_or(&v.volname);
    match spec.kind.as_str() {
        "lvmthin" | "lvm" => format!("/dev/pve/{short}"),
        "rbd" => format!("rbd:{}/{short}", spec.id),
        "zfspool" => format!("/dev/zvol/rpool/data/{short}"),
        _ => format!(
            "/var/lib/vz/images/{}/{short}",
            volume_owner(short).unwrap_or(0)
        ),
    }
}

pub(super) async fn info(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    Path((node, storage, volume)): Path<(String, String, String)>,
    p: Params,
) -> ApiResult {
    p.check(&[], |_| false)?;
    let volname = volname_of(&storage, &volume)?;
    let st = app.state.lock();
    let spec = storage_for(
        &st,
        &who,
        &node,
        &storage,
        &["Datastore.Audit", "Datastore.AllocateSpace"],
    )?;
    let Some(v) = find(&st, &storage, &node, &volname) else {
        return Err(PveError::internal(format!(
            "no such volume '{storage}:{volname}'"
        )));
    };
    ok(json!({
        "path": volume_path(&spec, &v),
        "size": v.size,
        "used": if v.volname.contains('/') { 0 } else { v.size },
        "format": "raw",
    }))
}

pub(super) async fn delete(
    State(app): State<Arc<Shared>>,
    Auth(who): Auth,
    Path((node, storage, volume)): Path<(String, String, String)>,
    p: Params,
) -> ApiResult {
    p.check(&[P("delay", Ty::Int(1, 30), false)], |_| false)?;
    let volname = volname_of(&storage, &volume)?;
    let spec = {
        let st = app.state.lock();
        storage_for(&st, &who, &node, &storage, &["Datastore.Allocate"])?
    };
    let owner = volume_owner(&volname);
    let id = match owner {
        Some(o) => format!("{o}@{storage}"),
        None => storage.clone(),
    };
    let (n2, s2) = (node.clone(), storage.clone());
    let upid = start_task(
        &app,
        &node,
        "imgdel",
        &id,
        &who,
        owner,
        move |mut ctx: TaskCtx| async move {
            let app = ctx.app.clone();
            let volid = format!("{s2}:{volname}");
            let Some(v) = find(&app.state.lock(), &s2, &n2, &volname) else {
                return (
                    ctx,
                    Outcome::Error(format!("volume '{volid}' does not exist")),
                );
            };
            let key = app.state.lock().storage_key(&s2, &n2);
            if !app.zero_cost() {
                let Some(g) = storage_lock(&app, &key, spec.shared).await else {
                    return (ctx, Outcome::Error(storage_timeout_msg(&s2, spec.shared)));
                };
                ctx.spend(app.costs.volume_free_seconds).await;
                drop(g);
            }
            let mut st = app.state.lock();
            let before = st.loose.len();
            st.loose.retain(|l| {
                !(l.storage == s2 && l.volname == v.volname && st_key_eq(&l.node, &n2, spec.shared))
            });
            if st.loose.len() == before {
                // Still named by a VM config: the volume is gone, the config keeps naming it.
                st.freed.insert((key, v.volname.clone()));
            }
            drop(st);
            ctx.log(format!("Removed volume '{volid}'"));
            (ctx, Outcome::Ok)
        },
    )
    .await?;
    if let Some(delay) = p.int("delay") {
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
                Some(e) => return Err(PveError::internal(e)),
                None if Instant::now() >= deadline => break,
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
    ok(json!(upid))
}

/// A loose volume allocated from `vol_node` is the one asked for from `node`: always on a
/// shared storage, on the same node for a local one.
fn st_key_eq(vol_node: &str, node: &str, shared: bool) -> bool {
    shared || vol_node == node
}
