//! Serving: TLS (HTTP/1.1-only ALPN, like pveproxy) or plain HTTP, one tokio task per
//! connection with hyper's HTTP/1 server, request-level fault injection in front of the
//! router (before the call runs, or after it ran: the reply lost), pveproxy's hand-over of
//! protected calls to a node's API workers with its proxy timeout, pvestatd's RRD rounds,
//! and the library face (`Sim::start` → `SimHandle`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tower::ServiceExt;

use crate::access::AclEntry;
use crate::api;
use crate::cluster::{SimConfig, TlsMode};
use crate::error::PveError;
use crate::faults::{Fault, FaultPlan, FaultState, RequestFault};
use crate::locks::{Flocks, StorageLocks};
use crate::state::{PoolInfo, Shared, State, VmInfo};

/// The simulator.
pub struct Sim;

struct Inner {
    app: Arc<Shared>,
    addr: SocketAddr,
    base_url: String,
    seed: u64,
    shutdown: watch::Sender<bool>,
    join: Mutex<Option<JoinHandle<()>>>,
}

/// A running simulator. Cheap to clone.
#[derive(Clone)]
pub struct SimHandle {
    inner: Arc<Inner>,
}

fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn tls_config(mode: &TlsMode) -> anyhow::Result<Option<(rustls::ServerConfig, String)>> {
    let (certs, key): (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) = match mode {
        TlsMode::Plain => return Ok(None),
        TlsMode::SelfSigned => {
            let ck = rcgen::generate_simple_self_signed(vec![
                "127.0.0.1".to_string(),
                "::1".to_string(),
                "localhost".to_string(),
            ])?;
            (
                vec![ck.cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der())),
            )
        }
        TlsMode::Pem { cert, key } => {
            let cert_pem =
                std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
            let key_pem =
                std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
            let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("parsing {}", cert.display()))?;
            let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
                .with_context(|| format!("parsing {}", key.display()))?
                .with_context(|| format!("no private key in {}", key.display()))?;
            (certs, key)
        }
    };
    let fp = fingerprint(certs.first().context("no certificate")?.as_ref());
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some((cfg, fp)))
}

/// Whether pveproxy hands this call to an API worker (pvedaemon): every write except the
/// login, which pveproxy answers itself. Reads are served by pveproxy's own workers.
fn is_protected(method: &hyper::Method, rest: &str) -> bool {
    method != hyper::Method::GET
        && method != hyper::Method::HEAD
        && !(method == hyper::Method::POST && rest.starts_with("/access/ticket"))
}

/// The node whose pvedaemon runs a call: `{node}` of `/nodes/{node}/...`, else the node
/// the client talks to (the first node of the cluster file).
fn worker_node(app: &Shared, rest: &str) -> Option<String> {
    let st = app.state.lock();
    match rest.strip_prefix("/nodes/") {
        Some(r) => {
            let n = r.split('/').next().unwrap_or("");
            // A call for an unknown or offline node is answered by the proxy (500/595).
            st.nodes
                .get(n)
                .filter(|ns| ns.is_online(Instant::now()))
                .map(|_| n.to_string())
        }
        None => st.nodes.keys().next().cloned(),
    }
}

fn lost_reply(kind: &'static str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::ConnectionReset, kind)
}

async fn handle(
    app: Arc<Shared>,
    router: axum::Router,
    req: hyper::Request<Incoming>,
) -> Result<axum::response::Response, std::io::Error> {
    let arrived = Instant::now();
    let Some(rest) = req
        .uri()
        .path()
        .strip_prefix("/api2/json")
        .filter(|r| !r.starts_with("/sim/"))
        .map(str::to_string)
    else {
        return Ok(route(router, req).await);
    };
    let fault = app
        .state
        .lock()
        .faults
        .request_fault(req.method().as_str(), &rest);
    match fault {
        Some(RequestFault::ConnectionReset) => {
            return Err(lost_reply("simulated connection reset"));
        }
        Some(RequestFault::Proxy596) => {
            return Ok(PveError::proxy(596, "Connection timed out").render(false));
        }
        Some(RequestFault::Internal500) => {
            return Ok(PveError::internal("got unexpected error (simulated fault)")
                .render(app.message_field));
        }
        _ => {}
    }
    // A protected call waits for one of its node's API workers, unless pveproxy refuses it
    // first (authentication) or cannot reach the node.
    let workers = (!app.zero_cost() && is_protected(req.method(), &rest))
        .then(|| {
            crate::auth::identify(&app, req.method(), req.headers())
                .ok()
                .and(worker_node(&app, &rest))
        })
        .flatten()
        .and_then(|node| app.api_workers.get(&node).map(|s| (node, s.clone())));
    let after_commit = fault.filter(|f| f.after_commit());
    if workers.is_none() && after_commit.is_none() {
        return Ok(route(router, req).await);
    }
    // The call runs in its own task: it carries on when pveproxy gives up on it.
    let app2 = app.clone();
    let call = tokio::spawn(async move {
        let permit = match &workers {
            Some((node, sem)) => {
                let p = sem.clone().acquire_owned().await.ok();
                let waited = arrived.elapsed();
                app2.state
                    .lock()
                    .stats
                    .api_call(node, app2.sim_seconds(waited));
                p
            }
            None => None,
        };
        let resp = route(router, req).await;
        drop(permit);
        resp
    });
    let deadline = tokio::time::Instant::from_std(arrived + app.proxy_timeout);
    match after_commit {
        Some(RequestFault::ResetAfterCommit) => {
            let _ = call.await;
            Err(lost_reply("simulated connection reset after the call ran"))
        }
        Some(_) => {
            let _ = call.await;
            tokio::time::sleep_until(deadline).await;
            Ok(PveError::proxy(596, "Connection timed out").render(false))
        }
        None => {
            match tokio::time::timeout_at(deadline, call).await {
                Ok(Ok(resp)) => Ok(resp),
                Ok(Err(_)) => Ok(PveError::internal("got unexpected error (worker died)")
                    .render(app.message_field)),
                Err(_) => {
                    let mut st = app.state.lock();
                    st.stats.api_proxy_timeout();
                    st.faults.count("api_proxy_timeout");
                    drop(st);
                    Ok(PveError::proxy(596, "Connection timed out").render(false))
                }
            }
        }
    }
}

async fn route(router: axum::Router, req: hyper::Request<Incoming>) -> axum::response::Response {
    let resp: Result<_, Infallible> = router.oneshot(req.map(Body::new)).await;
    resp.unwrap_or_else(|e| match e {})
}

impl Sim {
    /// Binds `cfg.listen` (port 0 works), and serves until `SimHandle::shutdown`.
    pub async fn start(cfg: SimConfig) -> anyhow::Result<SimHandle> {
        let tls = tls_config(&cfg.tls)?;
        let listener = TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("binding {}", cfg.listen))?;
        let addr = listener.local_addr()?;
        let scale = cfg.time_scale.max(0.0);
        let state = State::new(&cfg.cluster, cfg.faults.clone(), cfg.seed);
        let app = Arc::new(Shared {
            state: Mutex::new(state),
            costs: cfg.cluster.costs.clone(),
            scale,
            auth_delay: Duration::from_secs_f64(
                cfg.cluster.api.auth_failure_delay_seconds.max(0.0),
            ),
            message_field: cfg.cluster.api.error_message_field,
            version: cfg.cluster.api.version.clone(),
            ticket_lifetime: cfg.cluster.api.ticket_lifetime_seconds as i64,
            flocks: Flocks::default(),
            storage_locks: StorageLocks::new(cfg.seed),
            copy_pools: Mutex::new(Default::default()),
            clock_offset: Default::default(),
            secret: rand::random(),
            fingerprint: tls.as_ref().map(|t| t.1.clone()),
            started: Instant::now(),
            api_workers: cfg
                .cluster
                .nodes
                .iter()
                .filter(|_| cfg.cluster.api.workers_per_node > 0)
                .map(|n| {
                    let sem = Semaphore::new(cfg.cluster.api.workers_per_node as usize);
                    (n.name.clone(), Arc::new(sem))
                })
                .collect(),
            proxy_timeout: Duration::from_secs_f64(
                (cfg.cluster.api.proxy_timeout_seconds * scale).max(0.0),
            ),
            rrd_interval: Duration::from_secs_f64(
                (cfg.cluster.api.rrd_interval_seconds * scale).max(0.0),
            ),
        });
        app.state.lock().sample_rrd(Instant::now());
        schedule_rrd_updates(&app);
        schedule_offline_windows(&app, &cfg.faults);
        let router = api::router(app.clone());
        let acceptor = tls.map(|(c, _)| tokio_rustls::TlsAcceptor::from(Arc::new(c)));
        let scheme = if acceptor.is_some() { "https" } else { "http" };
        let (tx, rx) = watch::channel(false);
        let app2 = app.clone();
        let join = tokio::spawn(async move {
            let mut stop = rx.clone();
            loop {
                let (stream, _) = tokio::select! {
                    r = listener.accept() => match r {
                        Ok(s) => s,
                        Err(_) => { tokio::time::sleep(Duration::from_millis(10)).await; continue; }
                    },
                    _ = stop.changed() => break,
                };
                let _ = stream.set_nodelay(true);
                let (app, router, acceptor, mut stop) =
                    (app2.clone(), router.clone(), acceptor.clone(), rx.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        handle(app.clone(), router.clone(), req)
                    });
                    match acceptor {
                        Some(acc) => {
                            let Ok(Ok(tls)) =
                                tokio::time::timeout(Duration::from_secs(10), acc.accept(stream))
                                    .await
                            else {
                                return;
                            };
                            serve(TokioIo::new(tls), svc, &mut stop).await;
                        }
                        None => serve(TokioIo::new(stream), svc, &mut stop).await,
                    }
                });
            }
        });
        Ok(SimHandle {
            inner: Arc::new(Inner {
                app,
                addr,
                base_url: format!("{scheme}://{addr}"),
                seed: cfg.seed,
                shutdown: tx,
                join: Mutex::new(Some(join)),
            }),
        })
    }
}

async fn serve<I, S>(io: I, svc: S, stop: &mut watch::Receiver<bool>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<
            hyper::Request<Incoming>,
            Response = axum::response::Response,
            Error = std::io::Error,
        >,
    S::Future: Send + 'static,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(io, svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stop.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
        }
    }
}

/// pvestatd: a fresh RRD sample of every VM once per interval (scaled).
fn schedule_rrd_updates(app: &Arc<Shared>) {
    if app.rrd_live() {
        return;
    }
    let weak = Arc::downgrade(app);
    let every = app.rrd_interval;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(app) = weak.upgrade() else { break };
            app.state.lock().sample_rrd(Instant::now());
        }
    });
}

fn schedule_offline_windows(app: &Arc<Shared>, plan: &FaultPlan) {
    if app.scale == 0.0 {
        return;
    }
    for w in &plan.node_offline {
        let (app, w) = (app.clone(), w.clone());
        tokio::spawn(async move {
            tokio::time::sleep(app.wall(w.after_seconds)).await;
            let until = Instant::now() + app.wall(w.for_seconds);
            if let Some(n) = app.state.lock().nodes.get_mut(&w.node) {
                n.offline_until = Some(until);
            }
        });
    }
}

impl SimHandle {
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }
    /// `https://127.0.0.1:PORT` (or `http://` in plain mode).
    pub fn base_url(&self) -> String {
        self.inner.base_url.clone()
    }
    /// SHA-256 fingerprint of the certificate, `AB:CD:..`; `None` in plain mode.
    pub fn fingerprint(&self) -> Option<String> {
        self.inner.app.fingerprint.clone()
    }
    pub fn set_node_online(&self, node: &str, online: bool) {
        if let Some(n) = self.inner.app.state.lock().nodes.get_mut(node) {
            n.online = online;
            if online {
                n.offline_until = None;
            }
        }
    }
    /// Injects a one-shot fault now.
    pub fn inject(&self, fault: Fault) {
        let mut st = self.inner.app.state.lock();
        if let Fault::NodeOffline { node, duration } = &fault
            && let Some(n) = st.nodes.get_mut(node)
        {
            n.offline_until = Some(Instant::now() + *duration);
        }
        st.faults.inject(&fault);
    }
    /// Replaces the fault plan (rates; offline windows of a new plan are not scheduled).
    pub fn set_faults(&self, plan: FaultPlan) {
        let mut st = self.inner.app.state.lock();
        let fired = std::mem::take(&mut st.faults.fired);
        st.faults = FaultState::new(plan, self.inner.seed);
        st.faults.fired = fired;
    }
    /// Moves the ticket-validation clock forward (only that clock).
    pub fn advance_clock(&self, by: Duration) {
        self.inner
            .app
            .clock_offset
            .fetch_add(by.as_secs() as i64, Ordering::Relaxed);
    }
    /// The JSON of `GET /sim/stats`.
    pub fn stats(&self) -> Value {
        api::stats_json(&self.inner.app)
    }
    pub fn vms(&self) -> Vec<VmInfo> {
        let st = self.inner.app.state.lock();
        st.vms.iter().map(|(id, vm)| st.vm_info(*id, vm)).collect()
    }
    /// The guest of `vmid` wrote to its disks (a student at work); a rollback undoes it.
    /// False when there is no such VM.
    pub fn write_disk(&self, vmid: u32) -> bool {
        self.inner.app.write_disk(vmid)
    }
    /// A VM's disk generation (bumped by [`SimHandle::write_disk`], restored by a rollback)
    /// and what last happened to its disks (`written`, `rolled-back:<snapshot>`).
    pub fn disk_state(&self, vmid: u32) -> (u64, Option<String>) {
        self.inner.app.disk_state(vmid)
    }
    /// The names of a VM's snapshots.
    pub fn snapshots(&self, vmid: u32) -> Vec<String> {
        self.inner.app.snapshot_names(vmid)
    }
    /// Whether the guest of `vmid` powers off on ACPI shutdown (default yes); one that does
    /// not makes every shutdown wait for its timeout.
    pub fn set_guest_acpi(&self, vmid: u32, responds: bool) {
        self.inner.app.set_guest_acpi(vmid, responds)
    }
    pub fn users(&self) -> Vec<String> {
        self.inner.app.state.lock().users.keys().cloned().collect()
    }
    pub fn pools(&self) -> Vec<PoolInfo> {
        self.inner
            .app
            .state
            .lock()
            .pools
            .iter()
            .map(|(id, p)| PoolInfo {
                poolid: id.clone(),
                comment: p.comment.clone(),
                vms: p.vms.iter().copied().collect(),
                storage: p.storage.iter().cloned().collect(),
            })
            .collect()
    }
    pub fn acls(&self) -> Vec<AclEntry> {
        self.inner.app.state.lock().acls.clone()
    }
    /// Bridges that exist (are up) on `node`: in the interfaces file and brought up by
    /// the last completed network reload.
    pub fn bridges(&self, node: &str) -> Vec<String> {
        let st = self.inner.app.state.lock();
        st.nodes
            .get(node)
            .map(|n| {
                n.net_applied
                    .iter()
                    .filter(|(k, i)| {
                        n.net_live.contains(*k)
                            && i.get("type").and_then(|t| t.as_str()) == Some("bridge")
                    })
                    .map(|(k, _)| k.clone())
                    .collect()
            })
            .unwrap_or_default()
    }
    /// Whole-cluster state (VMs with configs, users, tokens, ACLs, pools, network), for
    /// comparing "before deploy" with "after teardown". MACs/uuids of surviving VMs are stable.
    pub fn snapshot(&self) -> Value {
        self.inner.app.state.lock().snapshot()
    }
    /// Seconds of simulated time since start (wall time ÷ time scale; 0 in zero-cost mode).
    pub fn sim_seconds(&self) -> f64 {
        let app = &self.inner.app;
        if app.scale > 0.0 {
            app.started.elapsed().as_secs_f64() / app.scale
        } else {
            0.0
        }
    }
    /// Stops accepting, lets open connections finish (2 s at most).
    pub async fn shutdown(self) {
        let _ = self.inner.shutdown.send(true);
        let join = self.inner.join.lock().take();
        if let Some(j) = join {
            let _ = j.await;
        }
    }
}
