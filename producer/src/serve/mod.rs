//! `producer serve`: the live web dashboard for teachers and admins.
//!
//! It reads the same Redis as the workers and never talks to Proxmox: retry and teardown
//! only enqueue, as the CLI does. One module per concern: `auth` (tokens, sessions, cookie,
//! CSRF, who may listen where), `model` (what the pages show, read from Redis), `pages`
//! (the HTML), `live` (server-sent events from one Redis reader per server), `routes` (the
//! HTTP surface and its security headers). `assets/` holds the one script and style sheet.
//!
//! [`run`] serves on a bound listener until `shutdown`; the CLI (`cmd::serve`) and the demo
//! (`producer demo --serve`) call it.

pub mod auth;
pub mod live;
pub mod model;
pub mod pages;
pub mod routes;

use std::sync::Arc;
use std::time::Duration;

use shared::jobs::state::Store;
use shared::secret::SecretKey;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use auth::Tokens;

/// How the dashboard runs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub tokens: Tokens,
    /// The `enc:` key; without it the handout links say why there is none.
    pub secret_key: Option<SecretKey>,
    /// How often the live-update reader looks for new step records.
    pub tick: Duration,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            tokens: Tokens::default(),
            secret_key: None,
            tick: Duration::from_millis(250),
        }
    }
}

/// The shared state of one dashboard (also what the render benchmark drives).
pub fn app(store: Store, cfg: &ServeConfig) -> Arc<routes::App> {
    Arc::new(routes::App {
        store,
        auth: auth::Auth::new(cfg.tokens.clone()),
        hub: Arc::default(),
        plans: Arc::default(),
        key: cfg.secret_key.clone(),
    })
}

/// Serves the dashboard on `listener` until `shutdown`, with its one live-update reader.
pub async fn run(
    store: Store,
    cfg: ServeConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = app(store.clone(), &cfg);
    let reader = tokio::spawn(live::run_reader(
        app.hub.clone(),
        store,
        app.plans.clone(),
        cfg.tick,
        shutdown.child_token(),
    ));
    let stop = shutdown.clone();
    let served = axum::serve(listener, routes::router(app))
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
    shutdown.cancel();
    let _ = reader.await;
    served
}
