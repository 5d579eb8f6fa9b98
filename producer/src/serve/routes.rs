//! The dashboard's routes: pages (GET), actions (POST, CSRF-checked, admin only), the
//! handout downloads, the live-update stream and the two static files.
//!
//! Actions only enqueue, as the CLI does: retry is `Queue::retry_dead_group`, teardown is
//! `deploy::teardown`; nothing here talks to Proxmox.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use shared::jobs::state::Store;
use shared::secret::SecretKey;

use super::auth::{self, Auth, Session};
use super::live::{self, Hub};
use super::model::{self, PlanCache};
use super::pages::{self, Frame, Offers};

/// What every handler shares.
pub struct App {
    pub store: Store,
    pub auth: Arc<Auth>,
    pub hub: Arc<Hub>,
    pub plans: Arc<PlanCache>,
    /// The `enc:` key, for handouts only.
    pub key: Option<SecretKey>,
}

type Shared = State<Arc<App>>;

/// The policy every response carries: scripts and styles from this origin only (no inline
/// ones), no frames, forms posting back here only.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");

pub fn router(app: Arc<App>) -> Router {
    let auth = app.auth.clone();
    Router::new()
        .route("/", get(list))
        .route("/queue", get(queue))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/d/{id}", get(deployment))
        .route("/d/{id}/events", get(events))
        .route("/d/{id}/retry", post(retry))
        .route("/d/{id}/teardown", get(teardown_page).post(teardown))
        .route("/d/{id}/handout.csv", get(handout_csv))
        .route("/d/{id}/handout.md", get(handout_md))
        .route("/static/app.js", get(app_js))
        .route("/static/app.css", get(app_css))
        .layer(middleware::from_fn_with_state(auth, auth::layer))
        .layer(middleware::from_fn(security_headers))
        .with_state(app)
}

async fn security_headers(req: axum::extract::Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

fn html(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        body,
    )
        .into_response()
}

fn framed(app: &App, s: &Session, title: &str, refresh: Option<u32>, body: &str) -> String {
    pages::page(
        &Frame {
            title,
            session: s,
            tokens: !app.auth.tokens.open(),
            refresh,
        },
        body,
    )
}

fn message(app: &App, s: &Session, status: StatusCode, title: &str, text: &str) -> Response {
    html(
        status,
        framed(app, s, title, None, &pages::message(title, text)),
    )
}

/// Pages need a logged-in session; without one, the login page.
fn need_login(s: &Session) -> Option<Response> {
    s.role
        .is_none()
        .then(|| Redirect::to("/login").into_response())
}

/// Actions need an admin.
fn need_admin(app: &App, s: &Session) -> Option<Response> {
    if s.role.is_none() {
        return Some(message(
            app,
            s,
            StatusCode::UNAUTHORIZED,
            "Not logged in",
            "Log in with an admin token first.",
        ));
    }
    (!s.is_admin()).then(|| {
        message(
            app,
            s,
            StatusCode::FORBIDDEN,
            "Admins only",
            "A viewer token shows the pages; retry, teardown and handouts need an admin token.",
        )
    })
}

fn redis_down(app: &App, s: &Session, e: impl std::fmt::Display) -> Response {
    tracing::warn!(error = %e, "dashboard: Redis read failed");
    message(
        app,
        s,
        StatusCode::SERVICE_UNAVAILABLE,
        "Redis did not answer",
        "The dashboard could not read Redis; it tries again at the next request.",
    )
}

fn form(body: &Bytes) -> HashMap<String, String> {
    url::form_urlencoded::parse(body).into_owned().collect()
}

/// A POST's CSRF check; the refusal when it fails.
fn csrf(app: &App, s: &Session, f: &HashMap<String, String>) -> Option<Response> {
    (!s.check_csrf(f.get("csrf").map(String::as_str))).then(|| {
        message(
            app,
            s,
            StatusCode::FORBIDDEN,
            "Refused",
            "The form's CSRF token is missing or stale; reload the page and try again.",
        )
    })
}

async fn list(State(app): Shared, Extension(s): Extension<Session>) -> Response {
    if let Some(r) = need_login(&s) {
        return r;
    }
    match model::deployments(&app.store).await {
        Ok(rows) => html(
            StatusCode::OK,
            framed(&app, &s, "Deployments", Some(5), &pages::deployments(&rows)),
        ),
        Err(e) => redis_down(&app, &s, e),
    }
}

async fn queue(State(app): Shared, Extension(s): Extension<Session>) -> Response {
    if let Some(r) = need_login(&s) {
        return r;
    }
    match model::queue(&app.store).await {
        Ok(v) => html(
            StatusCode::OK,
            framed(&app, &s, "Queue", Some(2), &pages::queue(&v)),
        ),
        Err(e) => redis_down(&app, &s, e),
    }
}

async fn login_page(State(app): Shared, Extension(s): Extension<Session>) -> Response {
    if s.role.is_some() {
        return Redirect::to("/").into_response();
    }
    html(
        StatusCode::OK,
        framed(&app, &s, "Log in", None, &pages::login(&s.csrf, None)),
    )
}

async fn login(State(app): Shared, Extension(s): Extension<Session>, body: Bytes) -> Response {
    let f = form(&body);
    if let Some(r) = csrf(&app, &s, &f) {
        return r;
    }
    let presented = f.get("token").map(String::as_str).unwrap_or("");
    match app.auth.login(&s, presented) {
        Some(new) => {
            tracing::info!(role = new.role.map(|r| r.as_str()), "dashboard login");
            let mut r = Redirect::to("/").into_response();
            r.headers_mut()
                .insert(header::SET_COOKIE, auth::set_cookie(&new));
            r
        }
        None => {
            tracing::warn!("dashboard login refused: wrong token");
            html(
                StatusCode::UNAUTHORIZED,
                framed(
                    &app,
                    &s,
                    "Log in",
                    None,
                    &pages::login(&s.csrf, Some("Wrong token.")),
                ),
            )
        }
    }
}

async fn logout(State(app): Shared, Extension(s): Extension<Session>, body: Bytes) -> Response {
    if let Some(r) = csrf(&app, &s, &form(&body)) {
        return r;
    }
    let new = app.auth.logout(&s);
    let mut r = Redirect::to("/login").into_response();
    r.headers_mut()
        .insert(header::SET_COOKIE, auth::set_cookie(&new));
    r
}

/// Renders the deployment page; public for the render benchmark.
pub async fn render_deployment(app: &App, s: &Session, id: &str) -> Response {
    let view = match model::deployment(&app.store, &app.plans, id).await {
        Ok(Some(v)) => v,
        Ok(None) => {
            return message(
                app,
                s,
                StatusCode::NOT_FOUND,
                "No such deployment",
                &format!("Redis holds no deployment {id:?}."),
            );
        }
        Err(e) => return redis_down(app, s, e),
    };
    let grid = model::layout(&view.plan);
    let offers = Offers {
        admin: s.is_admin(),
        handout_missing: app.key.is_none().then_some(
            "the dashboard was started without LABFLEET_SECRET_KEY (the key used at submit), which the initial passwords are derived from",
        ),
    };
    let body = pages::deployment(&view, &grid, s, &offers);
    html(StatusCode::OK, framed(app, s, &view.rec.name, None, &body))
}

async fn deployment(
    State(app): Shared,
    Extension(s): Extension<Session>,
    Path(id): Path<String>,
) -> Response {
    if let Some(r) = need_login(&s) {
        return r;
    }
    render_deployment(&app, &s, &id).await
}

async fn events(
    State(app): Shared,
    Extension(s): Extension<Session>,
    Path(id): Path<String>,
) -> Response {
    if s.role.is_none() {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    live::events(app.hub.clone(), id).into_response()
}

async fn retry(
    State(app): Shared,
    Extension(s): Extension<Session>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    if let Some(r) = need_admin(&app, &s).or_else(|| csrf(&app, &s, &form(&body))) {
        return r;
    }
    let rec = match app.store.deployment(&id).await {
        Ok(Some(r)) => r,
        Ok(None) => {
            return message(&app, &s, StatusCode::NOT_FOUND, "No such deployment", &id);
        }
        Err(e) => return redis_down(&app, &s, e),
    };
    match app.store.queue().retry_dead_group(&rec.scope()).await {
        Ok(n) => {
            tracing::info!(deployment = %id, jobs = n, "dashboard: failed jobs queued again");
            Redirect::to(&format!("/d/{}", pages::seg(&id))).into_response()
        }
        Err(e) => redis_down(&app, &s, e),
    }
}

async fn teardown_page(
    State(app): Shared,
    Extension(s): Extension<Session>,
    Path(id): Path<String>,
) -> Response {
    if let Some(r) = need_admin(&app, &s) {
        return r;
    }
    let vms = match app.plans.load(&app.store, &id).await {
        Ok(Some((_, p))) => p.vms.len() + p.retired.len(),
        Ok(None) => return message(&app, &s, StatusCode::NOT_FOUND, "No such deployment", &id),
        Err(e) => return redis_down(&app, &s, e),
    };
    let body = pages::teardown_confirm(&id, vms, &s.csrf, None);
    html(StatusCode::OK, framed(&app, &s, "Tear down", None, &body))
}

async fn teardown(
    State(app): Shared,
    Extension(s): Extension<Session>,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let f = form(&body);
    if let Some(r) = need_admin(&app, &s).or_else(|| csrf(&app, &s, &f)) {
        return r;
    }
    if f.get("confirm").map(|c| c.trim()) != Some(id.as_str()) {
        let vms = app
            .plans
            .load(&app.store, &id)
            .await
            .ok()
            .flatten()
            .map_or(0, |(_, p)| p.vms.len() + p.retired.len());
        let body = pages::teardown_confirm(
            &id,
            vms,
            &s.csrf,
            Some("The name typed does not match; nothing was torn down."),
        );
        return html(
            StatusCode::BAD_REQUEST,
            framed(&app, &s, "Tear down", None, &body),
        );
    }
    match crate::deploy::teardown(&app.store, &id).await {
        Ok(started) => {
            tracing::info!(deployment = %id, epoch = started.epoch, "dashboard: teardown started");
            Redirect::to(&format!("/d/{}", pages::seg(&id))).into_response()
        }
        Err(f) => message(
            &app,
            &s,
            StatusCode::CONFLICT,
            "Teardown not started",
            &format!("{:#}", anyhow::Error::new(f)),
        ),
    }
}

async fn handout(app: &App, s: &Session, id: &str, csv: bool) -> Response {
    if let Some(r) = need_admin(app, s) {
        return r;
    }
    let Some(key) = &app.key else {
        return message(
            app,
            s,
            StatusCode::SERVICE_UNAVAILABLE,
            "No handout",
            "Start the dashboard with LABFLEET_SECRET_KEY (the key used at submit) to serve handouts.",
        );
    };
    let accounts = match crate::cmd::handout::accounts_in_redis(&app.store, id).await {
        Ok(a) => a,
        Err(f) => return (StatusCode::NOT_FOUND, format!("{:#}", f.error)).into_response(),
    };
    match crate::cmd::handout::tables(&app.store, id, key, &accounts, None).await {
        Ok(t) => {
            let safe = id.replace(['/', '@'], "_");
            let (body, ctype, ext) = if csv {
                (t.csv, "text/csv; charset=utf-8", "csv")
            } else {
                (t.markdown, "text/markdown; charset=utf-8", "md")
            };
            tracing::info!(deployment = %id, format = ext, "dashboard: handout downloaded");
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
            if let Ok(v) =
                HeaderValue::from_str(&format!("attachment; filename=\"handout-{safe}.{ext}\""))
            {
                h.insert(header::CONTENT_DISPOSITION, v);
            }
            (StatusCode::OK, h, body).into_response()
        }
        Err(f) => message(
            app,
            s,
            StatusCode::NOT_FOUND,
            "No handout",
            &format!("{:#}", f.error),
        ),
    }
}

async fn handout_csv(
    State(app): Shared,
    Extension(s): Extension<Session>,
    Path(id): Path<String>,
) -> Response {
    handout(&app, &s, &id, true).await
}

async fn handout_md(
    State(app): Shared,
    Extension(s): Extension<Session>,
    Path(id): Path<String>,
) -> Response {
    handout(&app, &s, &id, false).await
}

async fn app_js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        APP_JS,
    )
        .into_response()
}

async fn app_css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        APP_CSS,
    )
        .into_response()
}
