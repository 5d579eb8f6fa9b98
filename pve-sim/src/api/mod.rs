//! The HTTP API: the router under `/api2/json`, the `{"data":..}` envelope, PVE's 501 for
//! unknown paths and methods, the request counter and the old/new-server switch for the
//! `message` field. One module per API area.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post, put};
use serde_json::{Value, json};

use crate::auth::Auth;
use crate::error::{ErrorMarker, JSON_CT, PveError, PveResult};
use crate::state::Shared;

mod access;
mod clone;
mod cluster;
mod config_lock;
mod migrate;
mod network;
mod nodes;
mod pools;
mod power;
mod qemu;
mod snapshot;
mod storage;
mod vm_config;

pub(crate) use snapshot::VmSnaps;

pub(crate) type ApiResult = PveResult<Response>;

/// `{"data": v}`.
pub(crate) fn ok(v: Value) -> ApiResult {
    envelope(json!({ "data": v }))
}

pub(crate) fn envelope(v: Value) -> ApiResult {
    let mut r = Response::new(Body::from(v.to_string()));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON_CT));
    Ok(r)
}

async fn not_implemented(req: Request) -> PveError {
    PveError::not_implemented(format!(
        "Method '{} {}' not implemented",
        req.method(),
        req.uri().path()
    ))
}

/// Inside the `/api2/json` nest the prefix is stripped; put it back in the message.
async fn api_not_implemented(req: Request) -> PveError {
    PveError::not_implemented(format!(
        "Method '{} /api2/json{}' not implemented",
        req.method(),
        req.uri().path()
    ))
}

async fn sim_stats(State(app): State<Arc<Shared>>, _auth: Auth) -> ApiResult {
    envelope(stats_json(&app))
}

pub(crate) fn stats_json(app: &Shared) -> Value {
    let (mut v, origin) = {
        let st = app.state.lock();
        let v = st
            .stats
            .to_json(app.scale, Instant::now(), json!(st.faults.fired));
        (v, st.stats.first_start())
    };
    v["locks"] = locks_json(app, origin);
    v
}

/// Each storage lock's (and `user.cfg`'s) use in simulated seconds: held, free while
/// someone waited (what the non-FIFO handover cost), the span from its first take to its
/// last release (and both as offsets from the first task's start), takes and timeouts. A
/// bench reads which lock bounded a run, and how late it was first fed, from it.
fn locks_json(app: &Shared, origin: Option<Instant>) -> Value {
    let sim = |wall: f64| {
        if app.scale > 0.0 {
            wall / app.scale
        } else {
            0.0
        }
    };
    let at = |t: Option<Instant>| match (origin, t) {
        (Some(o), Some(t)) => json!(sim(t.saturating_duration_since(o).as_secs_f64())),
        _ => Value::Null,
    };
    let m: serde_json::Map<String, Value> = app
        .storage_locks
        .usage()
        .into_iter()
        .map(|(k, u)| {
            let span = match (u.first_take, u.last_release) {
                (Some(a), Some(b)) if b > a => sim(b.duration_since(a).as_secs_f64()),
                _ => 0.0,
            };
            let v = json!({
                "held_seconds": sim(u.held_s),
                "free_while_waited_seconds": sim(u.free_while_waited_s),
                "span_seconds": span,
                "first_take_at": at(u.first_take),
                "last_release_at": at(u.last_release),
                "takes": u.takes,
                "timeouts": u.timeouts,
            });
            (k, v)
        })
        .collect();
    Value::Object(m)
}

/// Counts requests by template, sets the Server header, drops `message` on old servers.
async fn frame(State(app): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let key = req.extensions().get::<MatchedPath>().map(|p| {
        let p = p.as_str();
        format!(
            "{} {}",
            req.method(),
            p.strip_prefix("/api2/json").unwrap_or(p)
        )
    });
    if let Some(k) = key {
        app.state.lock().stats.request(k);
    }
    let mut resp = next.run(req).await;
    if !app.message_field
        && let Some(ErrorMarker(e)) = resp.extensions().get::<ErrorMarker>().cloned()
    {
        *resp.body_mut() = e.render(false).into_body();
    }
    resp.headers_mut().insert(
        header::SERVER,
        HeaderValue::from_static("pve-api-daemon/3.0"),
    );
    resp
}

pub(crate) fn router(app: Arc<Shared>) -> Router {
    let api = Router::new()
        .route("/version", get(cluster::version))
        .route("/access/ticket", post(access::ticket))
        .route(
            "/access/users",
            get(access::list_users).post(access::create_user),
        )
        .route(
            "/access/users/{userid}",
            get(access::get_user)
                .put(access::update_user)
                .delete(access::delete_user),
        )
        .route(
            "/access/users/{userid}/token/{tokenid}",
            post(access::create_token).delete(access::delete_token),
        )
        .route("/access/acl", get(access::get_acl).put(access::put_acl))
        .route("/access/roles", get(access::roles))
        .route("/access/password", put(access::password))
        .route(
            "/pools",
            get(pools::index)
                .post(pools::create)
                .put(pools::update_q)
                .delete(pools::delete_q),
        )
        .route(
            "/pools/{poolid}",
            get(pools::get_p)
                .put(pools::update_p)
                .delete(pools::delete_p),
        )
        .route("/cluster/status", get(cluster::status))
        .route("/cluster/resources", get(cluster::resources))
        .route("/cluster/nextid", get(cluster::nextid))
        .route("/cluster/tasks", get(cluster::tasks))
        .route("/nodes", get(nodes::index))
        .route("/nodes/{node}/status", get(nodes::status))
        .route("/nodes/{node}/storage", get(nodes::storage))
        .route(
            "/nodes/{node}/storage/{storage}/content",
            get(storage::index),
        )
        .route(
            "/nodes/{node}/storage/{storage}/content/{volume}",
            get(storage::info).delete(storage::delete),
        )
        .route("/nodes/{node}/tasks", get(nodes::task_list))
        .route("/nodes/{node}/tasks/{upid}/status", get(nodes::task_status))
        .route("/nodes/{node}/tasks/{upid}/log", get(nodes::task_log))
        .route(
            "/nodes/{node}/network",
            get(network::index)
                .post(network::create)
                .put(network::apply)
                .delete(network::revert),
        )
        .route(
            "/nodes/{node}/network/{iface}",
            get(network::get_iface)
                .put(network::update)
                .delete(network::delete),
        )
        .route("/nodes/{node}/qemu", get(qemu::list))
        .route(
            "/nodes/{node}/qemu/{vmid}",
            get(qemu::index).delete(qemu::destroy),
        )
        .route("/nodes/{node}/qemu/{vmid}/clone", post(clone::clone))
        .route(
            "/nodes/{node}/qemu/{vmid}/config",
            get(vm_config::get_config)
                .post(vm_config::post_config)
                .put(vm_config::put_config),
        )
        .route(
            "/nodes/{node}/qemu/{vmid}/status/current",
            get(qemu::current),
        )
        .route("/nodes/{node}/qemu/{vmid}/status/start", post(qemu::start))
        .route("/nodes/{node}/qemu/{vmid}/status/stop", post(qemu::stop))
        .route(
            "/nodes/{node}/qemu/{vmid}/status/shutdown",
            post(qemu::shutdown),
        )
        .route("/nodes/{node}/qemu/{vmid}/template", post(qemu::template))
        .route(
            "/nodes/{node}/qemu/{vmid}/snapshot",
            get(snapshot::list).post(snapshot::create),
        )
        .route(
            "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}",
            get(snapshot::cmd_index).delete(snapshot::delete),
        )
        .route(
            "/nodes/{node}/qemu/{vmid}/snapshot/{snapname}/rollback",
            post(snapshot::rollback),
        )
        .route("/nodes/{node}/qemu/{vmid}/migrate", post(migrate::migrate))
        .route("/sim/stats", get(sim_stats))
        .fallback(api_not_implemented)
        .method_not_allowed_fallback(api_not_implemented);
    Router::new()
        .nest("/api2/json", api)
        .route("/sim/stats", get(sim_stats))
        .fallback(not_implemented)
        .method_not_allowed_fallback(not_implemented)
        .layer(middleware::from_fn_with_state(app.clone(), frame))
        .with_state(app)
}
