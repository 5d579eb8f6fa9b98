//! `PveClient`: one connection to one Proxmox VE cluster.
//!
//! It owns the HTTP plumbing every typed call goes through: the one reqwest client of the
//! connection (keep-alive pool; Proxmox closes the connection after every error response and
//! the pool reconnects), authentication, the concurrency bound, request counters and the
//! redacted debug log. The typed calls live in the sibling modules (`cluster`, `vm`,
//! `network`, `access`, `task`) as further `impl PveClient` blocks.
//!
//! Authentication: with a password, the first call logs in (`POST /access/ticket`) and all
//! clones of the client share that ticket; it is renewed (with the ticket itself as password)
//! once older than `ticket_renew_after`, well before Proxmox's 2 h expiry. A call refused with
//! 401 drops the ticket, logs in once more and is retried once. The login mutex makes
//! concurrent callers wait for a single login instead of each logging in. An API token is
//! sent as a header on each call and never logs in.
//!
//! Concurrency: a semaphore of `max_concurrent_requests` permits is held for each HTTP
//! request (not while a task waits between polls). N worker processes therefore put at
//! most N x `max_concurrent_requests` requests on pveproxy at once.
//!
//! One file (over 600 lines): login, ticket renewal, the request path and the typed calls
//! share the connection state and its counters; the calls are thin and grouped by area.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use reqwest::Method;
use reqwest::header::{COOKIE, HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::{Mutex, Semaphore};

use super::config::{Auth, ClientConfig};
use super::error::{MAX_RESPONSE_BYTES, ParamErrors, PveError};
use super::gate::{ApiGate, node_of, urgent_user_cfg, writes_user_cfg};
use super::latency::{LatencyHistogram, LatencySnapshot};
use super::lenient::value_to_string;
use super::tls::{PresentedCert, build_http_client, transport_error};
use super::watch::{TaskListShare, TaskWatcher};
use crate::secret::Secret;

const CSRF_HEADER: &str = "csrfpreventiontoken";
/// Proxmox refuses tickets older than this.
const TICKET_LIFETIME: Duration = Duration::from_secs(7200);

/// What a request is for, for the per-client counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestKind {
    Login,
    Poll,
    /// The task watcher's `GET /nodes/{node}/tasks?source=all`: a poll too.
    TaskList,
    Other,
}

/// Requests sent by a client (and its clones) so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestCounts {
    /// `POST /access/ticket`: logins and renewals.
    pub logins: u64,
    /// Requests made by `wait_task`: task status and log reads, and the task watcher's
    /// node task listings.
    pub polls: u64,
    /// Of `polls`, the task watcher's listings (`GET /nodes/{node}/tasks?source=all`).
    pub task_lists: u64,
    /// Everything else.
    pub other: u64,
    /// Not a request: listings another process published that this client's watcher used
    /// instead of asking Proxmox (`TaskListShare`).
    pub shared_task_lists: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    logins: AtomicU64,
    polls: AtomicU64,
    task_lists: AtomicU64,
    other: AtomicU64,
    pub(crate) shared_task_lists: AtomicU64,
    /// Request latency (send until the body is read, or the transport error), by kind.
    latency: [LatencyHistogram; 3],
}

/// Query or form parameters of one call. Deliberately without `Debug`: it may hold a password.
#[derive(Default, Clone)]
pub(crate) struct Params(Vec<(String, String)>);

impl Params {
    pub(crate) fn new() -> Self {
        Params::default()
    }
    pub(crate) fn str(mut self, k: &str, v: impl Into<String>) -> Self {
        self.0.push((k.to_owned(), v.into()));
        self
    }
    pub(crate) fn opt_str(self, k: &str, v: Option<&str>) -> Self {
        match v {
            Some(v) => self.str(k, v),
            None => self,
        }
    }
    /// Proxmox accepts only `1`/`0` for booleans in forms and query strings.
    pub(crate) fn bool(self, k: &str, v: bool) -> Self {
        self.str(k, if v { "1" } else { "0" })
    }
    pub(crate) fn opt_bool(self, k: &str, v: Option<bool>) -> Self {
        match v {
            Some(v) => self.bool(k, v),
            None => self,
        }
    }
    /// Only sends the flag when it is set (`purge=1`), like the GUI.
    pub(crate) fn flag(self, k: &str, v: bool) -> Self {
        if v { self.bool(k, true) } else { self }
    }
    pub(crate) fn num(self, k: &str, v: impl fmt::Display) -> Self {
        self.str(k, v.to_string())
    }
    pub(crate) fn opt_num<N: fmt::Display>(self, k: &str, v: Option<N>) -> Self {
        match v {
            Some(v) => self.num(k, v),
            None => self,
        }
    }
    pub(crate) fn list(self, k: &str, v: &[impl AsRef<str>]) -> Self {
        if v.is_empty() {
            return self;
        }
        let joined = v.iter().map(|s| s.as_ref()).collect::<Vec<_>>().join(",");
        self.str(k, joined)
    }
    pub(crate) fn secret(self, k: &str, v: &Secret) -> Self {
        self.str(k, v.expose())
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    #[cfg(test)]
    pub(crate) fn pairs_for_test(&self) -> Vec<(String, String)> {
        self.0.clone()
    }
}

/// The success envelope: `{"data": ..., "total"?: n, "changes"?: "..."}`.
#[derive(Debug, Default)]
pub(crate) struct Envelope {
    pub(crate) data: Value,
    pub(crate) total: Option<u64>,
    pub(crate) changes: Option<String>,
}

#[derive(Deserialize, Default)]
struct RawEnvelope {
    #[serde(default)]
    data: Value,
    #[serde(default)]
    total: Option<Value>,
    #[serde(default)]
    changes: Option<Value>,
}

#[derive(Deserialize, Default)]
struct ErrorBody {
    #[serde(default)]
    message: Option<Value>,
    #[serde(default)]
    errors: Option<Value>,
}

#[derive(Clone)]
struct Ticket {
    ticket: Secret,
    csrf: Secret,
    obtained: Instant,
    generation: u64,
}

enum AuthState {
    Token {
        header: HeaderValue,
    },
    Ticket {
        user: String,
        password: Secret,
        slot: Mutex<Option<Ticket>>,
        generation: AtomicU64,
    },
}

/// Credentials attached to one request.
enum Credentials {
    None,
    Token(HeaderValue),
    Ticket(Ticket),
}

struct Inner {
    http: reqwest::Client,
    base_url: String,
    origin: String,
    auth: AuthState,
    config: ClientConfig,
    limiter: Semaphore,
    counters: Counters,
    presented: PresentedCert,
    /// Shared by every `wait_task` of this client and its clones.
    pub(crate) watcher: TaskWatcher,
    /// Bounds the protected calls per node across processes, when set (`gate.rs`).
    gate: std::sync::OnceLock<Arc<dyn ApiGate>>,
    /// Where the task watcher shares its listings with other processes, when set.
    task_list_share: std::sync::OnceLock<Arc<dyn TaskListShare>>,
    /// Told the node of every call answered 595 (the node did not answer the proxy), when
    /// set: the workers' way of noticing a node going away (`jobs::node_loss`).
    unreachable: std::sync::OnceLock<UnreachableHook>,
    /// The node the connection talks to (`local` in `GET /cluster/status`), looked up once
    /// for the gate's cluster-wide calls; `None` when it could not be learned.
    entry_node: tokio::sync::OnceCell<Option<String>>,
}

/// Called with the node of a call answered 595; must return at once (it runs inline).
pub type UnreachableHook = Arc<dyn Fn(&str) + Send + Sync>;

/// A client for one Proxmox VE cluster. Cheap to clone; clones share the connection pool,
/// the login and the concurrency bound.
#[derive(Clone)]
pub struct PveClient {
    inner: Arc<Inner>,
}

impl fmt::Debug for PveClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PveClient")
            .field("connection", &self.inner.config.connection_name)
            .field("base_url", &self.inner.base_url)
            .field("principal", &self.inner.config.auth.principal())
            .field("config", &self.inner.config)
            .finish()
    }
}

impl PveClient {
    /// Builds the client. Does no I/O: the first call connects (and logs in).
    pub fn new(config: ClientConfig) -> Result<PveClient, PveError> {
        if config.max_concurrent_requests == 0 {
            return Err(PveError::Config(
                "max_concurrent_requests must be at least 1".into(),
            ));
        }
        let (http, presented) = build_http_client(&config)?;
        let auth = match &config.auth {
            Auth::Token {
                user,
                token_name,
                secret,
            } => {
                let mut header = HeaderValue::from_str(&format!(
                    "PVEAPIToken={user}!{token_name}={}",
                    secret.expose()
                ))
                .map_err(|_| PveError::Config("API token contains invalid characters".into()))?;
                header.set_sensitive(true);
                AuthState::Token { header }
            }
            Auth::Password { user, password } => AuthState::Ticket {
                user: user.clone(),
                password: password.clone(),
                slot: Mutex::new(None),
                generation: AtomicU64::new(0),
            },
        };
        let base_url = config.base_url();
        let origin = base_url.trim_end_matches("/api2/json").to_owned();
        Ok(PveClient {
            inner: Arc::new(Inner {
                http,
                base_url,
                origin,
                auth,
                limiter: Semaphore::new(config.max_concurrent_requests),
                counters: Counters::default(),
                watcher: TaskWatcher::default(),
                gate: std::sync::OnceLock::new(),
                task_list_share: std::sync::OnceLock::new(),
                unreachable: std::sync::OnceLock::new(),
                entry_node: tokio::sync::OnceCell::new(),
                presented,
                config,
            }),
        })
    }

    /// Puts every protected call of this client (and its clones) behind `gate`; the first
    /// gate set stays.
    pub fn set_api_gate(&self, gate: Arc<dyn ApiGate>) {
        let _ = self.inner.gate.set(gate);
    }

    /// Lets the task watcher of this client (and its clones) take the node listings other
    /// processes published in `share` and publish its own there; the first share set stays.
    pub fn set_task_list_share(&self, share: Arc<dyn TaskListShare>) {
        let _ = self.inner.task_list_share.set(share);
    }

    pub(crate) fn task_list_share(&self) -> Option<&Arc<dyn TaskListShare>> {
        self.inner.task_list_share.get()
    }

    pub(crate) fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// Tells `hook` the node of every call of this client (and its clones) answered 595;
    /// the first hook set stays.
    pub fn on_unreachable_node(&self, hook: UnreachableHook) {
        let _ = self.inner.unreachable.set(hook);
    }

    /// The node whose pvedaemon runs the cluster-wide calls (`/access`, `/pools`): the one
    /// `GET /cluster/status` marks `local`. Asked once per client; `None` if it cannot be
    /// learned (the gate then counts those calls apart).
    async fn entry_node(&self) -> Option<String> {
        self.inner
            .entry_node
            .get_or_init(|| async {
                let env = Box::pin(self.request(
                    Method::GET,
                    "/cluster/status",
                    &Params::new(),
                    RequestKind::Other,
                ))
                .await
                .ok()?;
                env.data.as_array()?.iter().find_map(|e| {
                    let local = e.get("local").and_then(super::lenient::value_to_u64) == Some(1);
                    (e.get("type").and_then(Value::as_str) == Some("node") && local)
                        .then(|| e.get("name").and_then(Value::as_str).map(str::to_owned))
                        .flatten()
                })
            })
            .await
            .clone()
    }

    pub(crate) fn watcher(&self) -> &TaskWatcher {
        &self.inner.watcher
    }

    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// `scheme://host:port/api2/json`
    pub fn base_url(&self) -> &str {
        &self.inner.base_url
    }

    /// Requests sent so far by this client and its clones.
    pub fn request_counts(&self) -> RequestCounts {
        let c = &self.inner.counters;
        RequestCounts {
            logins: c.logins.load(Ordering::Relaxed),
            polls: c.polls.load(Ordering::Relaxed),
            task_lists: c.task_lists.load(Ordering::Relaxed),
            other: c.other.load(Ordering::Relaxed),
            shared_task_lists: c.shared_task_lists.load(Ordering::Relaxed),
        }
    }

    /// Latency of the requests sent so far by this client and its clones, by kind
    /// (`login`, `poll`, `other`, as in [`RequestCounts`]).
    pub fn request_latency(&self) -> [(&'static str, LatencySnapshot); 3] {
        let h = &self.inner.counters.latency;
        [
            ("login", h[0].snapshot()),
            ("poll", h[1].snapshot()),
            ("other", h[2].snapshot()),
        ]
    }

    /// SHA-256 fingerprint (`AB:CD:..`) of the last certificate the server presented, when
    /// the client verifies with a pin, a CA file or not at all.
    pub fn presented_fingerprint(&self) -> Option<String> {
        self.inner
            .presented
            .get()
            .map(|fp| super::config::format_fingerprint(&fp))
    }

    /// Logs in now (ticket auth) or does nothing (token auth). Useful to check credentials.
    pub async fn login(&self) -> Result<(), PveError> {
        self.credentials().await.map(|_| ())
    }

    /// Renews the ticket now, whatever its age (ticket auth); nothing for token auth.
    pub async fn renew_ticket(&self) -> Result<(), PveError> {
        if let AuthState::Ticket { slot, .. } = &self.inner.auth {
            let mut guard = slot.lock().await;
            let fresh = self.obtain_ticket(guard.as_ref()).await?;
            *guard = Some(fresh);
        }
        Ok(())
    }

    async fn credentials(&self) -> Result<Credentials, PveError> {
        match &self.inner.auth {
            AuthState::Token { header } => Ok(Credentials::Token(header.clone())),
            AuthState::Ticket { slot, .. } => {
                let mut guard = slot.lock().await;
                if let Some(t) = guard.as_ref()
                    && t.obtained.elapsed() < self.inner.config.ticket_renew_after
                {
                    return Ok(Credentials::Ticket(t.clone()));
                }
                let fresh = self.obtain_ticket(guard.as_ref()).await?;
                *guard = Some(fresh.clone());
                Ok(Credentials::Ticket(fresh))
            }
        }
    }

    /// Renews `current` if it is still valid, else (or if renewal fails) logs in with the
    /// password. Called with the login mutex held.
    async fn obtain_ticket(&self, current: Option<&Ticket>) -> Result<Ticket, PveError> {
        let AuthState::Ticket {
            user,
            password,
            generation,
            ..
        } = &self.inner.auth
        else {
            unreachable!("obtain_ticket is only called for ticket auth");
        };
        if let Some(t) = current {
            // Leave a margin for clock skew and the request itself.
            if t.obtained.elapsed() + Duration::from_secs(300) < TICKET_LIFETIME {
                match self.post_ticket(user, &t.ticket).await {
                    Ok((ticket, csrf)) => {
                        tracing::debug!(connection = %self.inner.config.connection_name, "ticket renewed");
                        return Ok(Ticket {
                            ticket,
                            csrf,
                            obtained: Instant::now(),
                            generation: generation.fetch_add(1, Ordering::Relaxed) + 1,
                        });
                    }
                    Err(e) if e.class() == super::ErrorClass::Auth => {
                        tracing::debug!(connection = %self.inner.config.connection_name, "ticket renewal refused; logging in again");
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        let (ticket, csrf) = self.post_ticket(user, password).await?;
        tracing::debug!(connection = %self.inner.config.connection_name, user = %user, "logged in");
        Ok(Ticket {
            ticket,
            csrf,
            obtained: Instant::now(),
            generation: generation.fetch_add(1, Ordering::Relaxed) + 1,
        })
    }

    async fn post_ticket(
        &self,
        user: &str,
        password: &Secret,
    ) -> Result<(Secret, Secret), PveError> {
        #[derive(Deserialize)]
        struct TicketData {
            ticket: String,
            #[serde(rename = "CSRFPreventionToken")]
            csrf: String,
        }
        let params = Params::new()
            .str("username", user)
            .secret("password", password);
        let env = self
            .send_once(
                Method::POST,
                "/access/ticket",
                &params,
                RequestKind::Login,
                &Credentials::None,
            )
            .await?;
        if env.data.is_null() {
            // Old servers answer a failed login with 200 and `data: null` in some paths.
            return Err(PveError::Auth {
                message: "authentication failure".into(),
            });
        }
        let d: TicketData = serde_json::from_value(env.data).map_err(|e| PveError::Decode {
            path: "/access/ticket".into(),
            message: e.to_string(),
        })?;
        Ok((Secret::new(d.ticket), Secret::new(d.csrf)))
    }

    /// One API call with authentication and the single 401 retry.
    pub(crate) async fn request(
        &self,
        method: Method,
        path: &str,
        params: &Params,
        kind: RequestKind,
    ) -> Result<Envelope, PveError> {
        let mut retried = false;
        let mut read_tries = 0u32;
        // A protected call (any write; the login does not come here) waits for room on
        // its node's API workers and holds it until its answer is in.
        // A write of `user.cfg` first waits for our other writers of it (see the gate).
        let _pass = match self.inner.gate.get() {
            Some(g) if method != Method::GET => {
                let file = if writes_user_cfg(path) {
                    Some(
                        g.enter_user_cfg(urgent_user_cfg(method.as_str(), path))
                            .await,
                    )
                } else {
                    None
                };
                let node = match node_of(path) {
                    Some(n) => Some(n.to_owned()),
                    None => self.entry_node().await,
                };
                Some((file, g.enter(node.as_deref()).await))
            }
            _ => None,
        };
        loop {
            let creds = self.credentials().await?;
            let result = self
                .send_once(method.clone(), path, params, kind, &creds)
                .await;
            if let (Err(PveError::Proxy { status: 595, .. }), Some(node)) = (&result, node_of(path))
                && let Some(hook) = self.inner.unreachable.get()
            {
                hook(node);
            }
            match &result {
                Err(e)
                    if method == Method::GET
                        && read_tries < self.inner.config.read_retries
                        && (e.is_transient() || matches!(e, PveError::Server { .. })) =>
                {
                    tracing::debug!(connection = %self.inner.config.connection_name, path, error = %e, "read failed; trying again");
                    tokio::time::sleep(Duration::from_millis(100 << read_tries)).await;
                    read_tries += 1;
                    continue;
                }
                _ => {}
            }
            match (result, &creds, &self.inner.auth) {
                (
                    Err(PveError::Auth { .. }),
                    Credentials::Ticket(t),
                    AuthState::Ticket { slot, .. },
                ) if !retried => {
                    retried = true;
                    let mut guard = slot.lock().await;
                    // Drop the ticket only if nobody replaced it meanwhile.
                    if guard.as_ref().map(|c| c.generation) == Some(t.generation) {
                        *guard = None;
                    }
                    tracing::debug!(connection = %self.inner.config.connection_name, path, "401 with a ticket; logging in again");
                }
                (result, _, _) => return result,
            }
        }
    }

    async fn send_once(
        &self,
        method: Method,
        path: &str,
        params: &Params,
        kind: RequestKind,
        creds: &Credentials,
    ) -> Result<Envelope, PveError> {
        let _permit = self
            .inner
            .limiter
            .acquire()
            .await
            .map_err(|_| PveError::Cancelled)?;
        let (counter, latency) = match kind {
            RequestKind::Login => (&self.inner.counters.logins, &self.inner.counters.latency[0]),
            RequestKind::Poll => (&self.inner.counters.polls, &self.inner.counters.latency[1]),
            RequestKind::TaskList => {
                self.inner
                    .counters
                    .task_lists
                    .fetch_add(1, Ordering::Relaxed);
                (&self.inner.counters.polls, &self.inner.counters.latency[1])
            }
            RequestKind::Other => (&self.inner.counters.other, &self.inner.counters.latency[2]),
        };
        counter.fetch_add(1, Ordering::Relaxed);

        let url = format!("{}{}", self.inner.base_url, path);
        let headers = auth_headers(&method, creds)?;
        let mut req = self
            .inner
            .http
            .request(method.clone(), &url)
            .headers(headers);
        if !params.is_empty() {
            req = if method == Method::GET || method == Method::DELETE {
                req.query(&params.0)
            } else {
                req.form(&params.0)
            };
        }
        let started = Instant::now();
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                let err = transport_error(
                    e,
                    method.as_str(),
                    path,
                    &self.inner.origin,
                    &self.inner.presented,
                );
                latency.observe(started.elapsed());
                tracing::debug!(
                    connection = %self.inner.config.connection_name,
                    method = %method, path, error = %err,
                    latency_ms = started.elapsed().as_millis() as u64,
                    "pve request failed"
                );
                return Err(err);
            }
        };
        let status = resp.status();
        // hyper keeps only non-canonical reason phrases; read it before consuming the body.
        let reason = resp
            .extensions()
            .get::<hyper::ext::ReasonPhrase>()
            .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned());
        let body = super::body::read_capped(resp, method.as_str(), path, MAX_RESPONSE_BYTES, |e| {
            transport_error(
                e,
                method.as_str(),
                path,
                &self.inner.origin,
                &self.inner.presented,
            )
        })
        .await;
        latency.observe(started.elapsed());
        let body = body?;
        tracing::debug!(
            connection = %self.inner.config.connection_name,
            method = %method, path, status = status.as_u16(),
            latency_ms = started.elapsed().as_millis() as u64,
            "pve request"
        );
        decode_reply(status, reason, &body, path)
    }

    // ----- helpers for the typed calls -----

    pub(crate) async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        params: Params,
    ) -> Result<T, PveError> {
        let env = self
            .request(Method::GET, path, &params, RequestKind::Other)
            .await?;
        decode(path, env.data)
    }

    pub(crate) async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        params: Params,
    ) -> Result<T, PveError> {
        let env = self
            .request(method, path, &params, RequestKind::Other)
            .await?;
        decode(path, env.data)
    }

    /// For calls documented to return `null`: any data is ignored.
    pub(crate) async fn call_null(
        &self,
        method: Method,
        path: &str,
        params: Params,
    ) -> Result<(), PveError> {
        self.request(method, path, &params, RequestKind::Other)
            .await
            .map(|_| ())
    }

    /// Raw access for calls without a typed wrapper: `GET`-style returns the `data` value.
    pub async fn raw_call(
        &self,
        method: Method,
        path: &str,
        params: &[(&str, &str)],
    ) -> Result<Value, PveError> {
        let mut p = Params::new();
        for (k, v) in params {
            p = p.str(k, *v);
        }
        Ok(self
            .request(method, path, &p, RequestKind::Other)
            .await?
            .data)
    }
}

pub(crate) fn decode<T: DeserializeOwned>(path: &str, data: Value) -> Result<T, PveError> {
    serde_json::from_value(data).map_err(|e| PveError::decode(path, e))
}

/// Percent-encodes one path segment (user ids hold `@` and `!`, UPIDs `:`).
pub(crate) fn seg(s: &str) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(s, SET).to_string()
}

/// Splits `key=value,key=value` property strings (net devices, ipconfig).
pub(crate) fn property_pairs(s: &str) -> BTreeMap<String, String> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.trim().to_owned(), v.trim().to_owned()),
            None => (p.trim().to_owned(), String::new()),
        })
        .collect()
}

/// The headers that authenticate a request: the token, or the ticket cookie (and, on
/// writes, its CSRF token).
fn auth_headers(method: &Method, creds: &Credentials) -> Result<HeaderMap, PveError> {
    let mut headers = HeaderMap::new();
    match creds {
        Credentials::None => {}
        Credentials::Token(h) => {
            headers.insert(reqwest::header::AUTHORIZATION, h.clone());
        }
        Credentials::Ticket(t) => {
            let mut cookie = HeaderValue::from_str(&format!("PVEAuthCookie={}", t.ticket.expose()))
                .map_err(|_| PveError::Decode {
                    path: "/access/ticket".into(),
                    message: "ticket is not a valid header value".into(),
                })?;
            cookie.set_sensitive(true);
            headers.insert(COOKIE, cookie);
            if *method != Method::GET {
                let mut csrf =
                    HeaderValue::from_str(t.csrf.expose()).map_err(|_| PveError::Decode {
                        path: "/access/ticket".into(),
                        message: "CSRF token is not a valid header value".into(),
                    })?;
                csrf.set_sensitive(true);
                headers.insert(HeaderName::from_static(CSRF_HEADER), csrf);
            }
        }
    }
    Ok(headers)
}

/// A reply's envelope, or the error its status and body describe (Proxmox's message, the
/// reason phrase, or the status; per-parameter errors of a 400).
fn decode_reply(
    status: reqwest::StatusCode,
    reason: Option<String>,
    body: &[u8],
    path: &str,
) -> Result<Envelope, PveError> {
    if status.is_success() {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Envelope::default());
        }
        let raw: RawEnvelope =
            serde_json::from_slice(body).map_err(|e| PveError::decode(path, e))?;
        return Ok(Envelope {
            data: raw.data,
            total: raw.total.as_ref().and_then(super::lenient::value_to_u64),
            changes: raw.changes.as_ref().and_then(value_to_string),
        });
    }
    let parsed: ErrorBody = serde_json::from_slice(body).unwrap_or_default();
    let message = parsed
        .message
        .as_ref()
        .and_then(value_to_string)
        .map(|m| m.trim_end().to_owned())
        .filter(|m| !m.is_empty())
        .or(reason)
        .or_else(|| status.canonical_reason().map(str::to_owned))
        .unwrap_or_else(|| format!("HTTP {}", status.as_u16()));
    let mut errors = ParamErrors::new();
    if let Some(Value::Object(map)) = parsed.errors {
        for (k, v) in map {
            let text = value_to_string(&v).unwrap_or_else(|| v.to_string());
            errors.insert(k, text.trim_end().to_owned());
        }
    }
    Err(PveError::from_response(status.as_u16(), &message, errors))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_encoded() {
        assert_eq!(seg("u@pve"), "u%40pve");
        assert_eq!(seg("root@pam!labfleet"), "root%40pam%21labfleet");
        assert_eq!(seg("UPID:pve1:0A:"), "UPID%3Apve1%3A0A%3A");
        assert_eq!(seg("lab-pool_1.x"), "lab-pool_1.x");
        assert_eq!(seg("a/b"), "a%2Fb");
    }

    #[test]
    fn params_booleans_are_0_1() {
        let p = Params::new()
            .bool("full", true)
            .bool("x", false)
            .flag("purge", false)
            .flag("skiplock", true)
            .list("roles", &["PVEVMUser", "PVEAuditor"])
            .list("none", &[] as &[&str]);
        assert_eq!(
            p.0,
            vec![
                ("full".to_owned(), "1".to_owned()),
                ("x".to_owned(), "0".to_owned()),
                ("skiplock".to_owned(), "1".to_owned()),
                ("roles".to_owned(), "PVEVMUser,PVEAuditor".to_owned()),
            ]
        );
    }

    #[test]
    fn debug_of_client_hides_password_and_token() {
        for auth in [
            Auth::Password {
                user: "root@pam".into(),
                password: "pw-hunter2-xyz".into(),
            },
            Auth::Token {
                user: "root@pam".into(),
                token_name: "labfleet".into(),
                secret: "tok-5ecret-0000".into(),
            },
        ] {
            let mut cfg = ClientConfig::new("lab", "127.0.0.1", auth);
            cfg.tls = super::super::TlsPolicy::Insecure;
            let c = PveClient::new(cfg.clone()).unwrap();
            for text in [format!("{c:?}"), format!("{cfg:?}"), format!("{c:#?}")] {
                assert!(!text.contains("hunter2"), "{text}");
                assert!(!text.contains("5ecret"), "{text}");
                assert!(text.contains("root@pam"), "{text}");
            }
        }
    }
}
