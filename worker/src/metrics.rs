//! The worker's `/metrics` endpoint for Prometheus (`worker --metrics 127.0.0.1:9100`), in
//! the text exposition format (0.0.4), written by hand: a handful of counters, gauges and
//! one histogram do not need a registry crate.
//!
//! What it shows, and where each figure comes from:
//! - this process's jobs by kind and outcome, retried runs, lost leases and jobs running
//!   per node: `shared::jobs::counters::JobCounters`, counted by `jobs::run`;
//! - the queue as a whole (all workers): depth by state and the age of the oldest ready job
//!   from `Queue::stats()`, holders and waiters of every capped concurrency key (the
//!   per-node clone slots) from `Queue::slot_stats()`; read from Redis at each scrape (O(1)
//!   reads per key), and `labfleet_queue_up 0` when Redis does not answer;
//! - Proxmox request latency of this process's clients by kind (`PveClient::request_latency`).
//!
//! It owns no state and changes nothing; a scrape is a few Redis reads.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use redis::AsyncCommands;
use shared::jobs::Env;
use shared::jobs::counters::Outcome;
use shared::queue::Queue;
use tokio_util::sync::CancellationToken;

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone)]
struct Scrape {
    env: Arc<Env>,
    queue: Queue,
}

/// Binds `addr` (so a taken port fails the worker at start) and serves `/metrics` until
/// `shutdown`; returns the bound address (port 0 picks a free one) and the server task.
pub async fn start(
    addr: SocketAddr,
    env: Arc<Env>,
    queue: Queue,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("metrics: cannot listen on {addr}"))?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(Scrape { env, queue });
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "metrics server stopped");
        }
    });
    tracing::info!(%bound, "metrics on http://{bound}/metrics");
    Ok((bound, task))
}

async fn metrics(State(s): State<Scrape>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        render(&s.env, &s.queue).await,
    )
}

/// The whole page.
pub async fn render(env: &Env, queue: &Queue) -> String {
    let mut p = Page::default();
    jobs(&mut p, env);
    queue_depth(&mut p, queue).await;
    pve_latency(&mut p, env);
    p.0
}

fn jobs(p: &mut Page, env: &Env) {
    let c = &env.counters;
    p.head(
        "labfleet_worker_jobs_total",
        "counter",
        "Job runs of this worker by kind and outcome (done, retry, failed, deferred, lease_lost).",
    );
    for (kind, outcome, n) in c.outcomes() {
        p.sample(
            "labfleet_worker_jobs_total",
            &[("kind", kind), ("outcome", outcome.as_str())],
            n,
        );
    }
    p.head(
        "labfleet_worker_job_retries_total",
        "counter",
        "Job runs of this worker that were a retry (attempt > 1), by kind.",
    );
    for (kind, n) in c.retries() {
        p.sample("labfleet_worker_job_retries_total", &[("kind", kind)], n);
    }
    p.head(
        "labfleet_worker_leases_lost_total",
        "counter",
        "Jobs of this worker whose lease was lost (renewal refused, or failing for longer than the lease).",
    );
    let lost: u64 = c
        .outcomes()
        .iter()
        .filter(|(_, o, _)| *o == Outcome::LeaseLost)
        .map(|(_, _, n)| n)
        .sum();
    p.sample("labfleet_worker_leases_lost_total", &[], lost);
    p.head(
        "labfleet_worker_jobs_in_flight",
        "gauge",
        "Jobs running in this worker by the node they work on (a clone: its source node).",
    );
    for ((cluster, node), n) in c.in_flight() {
        p.sample(
            "labfleet_worker_jobs_in_flight",
            &[("cluster", &cluster), ("node", &node)],
            n,
        );
    }
}

async fn queue_depth(p: &mut Page, queue: &Queue) {
    let stats = queue.stats().await;
    let slots = slots(queue).await;
    p.head(
        "labfleet_queue_up",
        "gauge",
        "1 if the queue's figures below were read from Redis at this scrape.",
    );
    p.sample(
        "labfleet_queue_up",
        &[],
        u64::from(stats.is_ok() && slots.is_ok()),
    );
    if let Ok(s) = stats {
        p.head(
            "labfleet_queue_jobs",
            "gauge",
            "Jobs of the whole queue (all workers) by state.",
        );
        for (state, n) in [
            ("ready", s.ready),
            ("scheduled", s.scheduled),
            ("gated", s.gated),
            ("waiting_for_slot", s.waiting_for_slot),
            ("in_flight", s.in_flight),
            ("dead", s.dead),
            ("done", s.done),
            ("cancelled", s.cancelled),
        ] {
            p.sample("labfleet_queue_jobs", &[("state", state)], n);
        }
        p.head(
            "labfleet_queue_acked_total",
            "counter",
            "Jobs acknowledged since the queue was created.",
        );
        p.sample("labfleet_queue_acked_total", &[], s.acked_total);
        p.head(
            "labfleet_queue_oldest_ready_age_seconds",
            "gauge",
            "How long the oldest ready job has been due (0 when none is ready).",
        );
        p.sample(
            "labfleet_queue_oldest_ready_age_seconds",
            &[],
            s.oldest_ready_age.unwrap_or_default().as_secs_f64(),
        );
    }
    if let Ok(slots) = slots {
        for (name, help) in [
            (
                "labfleet_queue_slot_held",
                "Jobs holding a capped concurrency key now, all workers (clone-node:<cluster>/<node> is a node's clones in flight).",
            ),
            (
                "labfleet_queue_slot_waiting",
                "Jobs parked until a capped concurrency key has room.",
            ),
            ("labfleet_queue_slot_cap", "The cap of a concurrency key."),
            (
                "labfleet_queue_slot_high_water",
                "Most holders of a concurrency key ever seen at once.",
            ),
        ] {
            p.head(name, "gauge", help);
            for (slot, s) in &slots {
                let v = match name {
                    "labfleet_queue_slot_held" => s.held,
                    "labfleet_queue_slot_waiting" => s.waiting,
                    "labfleet_queue_slot_cap" => u64::from(s.cap.unwrap_or(0)),
                    _ => s.high_water,
                };
                p.sample(name, &[("slot", slot)], v);
            }
        }
    }
}

/// Every capped concurrency key with its counts, sorted by name.
async fn slots(
    queue: &Queue,
) -> Result<Vec<(String, shared::queue::SlotStats)>, shared::queue::QueueError> {
    let mut conn = queue.connection();
    let mut names: Vec<String> = conn
        .hkeys(queue.key("caps"))
        .await
        .map_err(shared::queue::QueueError::from)?;
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        let s = queue.slot_stats(&n).await?;
        out.push((n, s));
    }
    Ok(out)
}

fn pve_latency(p: &mut Page, env: &Env) {
    const NAME: &str = "labfleet_pve_request_duration_seconds";
    p.head(
        NAME,
        "histogram",
        "Proxmox VE API requests of this worker by cluster and kind (login, poll = task status, other), send to body read.",
    );
    for (cluster, client) in env.clusters.clients() {
        for (kind, h) in client.request_latency() {
            let labels = [("cluster", cluster.as_str()), ("kind", kind)];
            for (le, n) in &h.buckets {
                p.bucket(NAME, &labels, &le.to_string(), *n);
            }
            p.bucket(NAME, &labels, "+Inf", h.count);
            p.sample(&format!("{NAME}_sum"), &labels, h.sum.as_secs_f64());
            p.sample(&format!("{NAME}_count"), &labels, h.count);
        }
    }
}

/// The page being written.
#[derive(Default)]
struct Page(String);

impl Page {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {}", help.replace('\n', " "));
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: impl std::fmt::Display) {
        let _ = writeln!(self.0, "{name}{} {v}", label_set(labels, None));
    }

    fn bucket(&mut self, name: &str, labels: &[(&str, &str)], le: &str, n: u64) {
        let _ = writeln!(self.0, "{name}_bucket{} {n}", label_set(labels, Some(le)));
    }
}

fn label_set(labels: &[(&str, &str)], le: Option<&str>) -> String {
    let mut parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

/// Label values escape `\`, `"` and newlines.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped_and_le_comes_last() {
        assert_eq!(label_set(&[], None), "");
        assert_eq!(
            label_set(&[("slot", "a\"b\\c\nd")], Some("0.5")),
            "{slot=\"a\\\"b\\\\c\\nd\",le=\"0.5\"}"
        );
    }
}
