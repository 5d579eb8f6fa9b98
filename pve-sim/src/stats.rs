//! Counters behind `GET /sim/stats`: requests per method and path template, tasks per type
//! and outcome, exact high-water marks of concurrent clones per node and storage, storage
//! busy time, task makespan and the lower bound of the work done.
//!
//! Lower bound (in simulated seconds, computed from the nominal cost of the tasks that
//! ended OK or with warnings):
//! `lower_bound = max( max over storages s of max(Σ lock_hold(s), Σ copy(s)),
//!                     max over VMs v of Σ duration(tasks acting on v) )`
//! where `lock_hold(s)` is the storage-lock hold time of each disk allocated on `s` (the lock
//! serialises them), `copy(s)` is bytes copied to `s` ÷ its bandwidth (the bandwidth is
//! shared, so the total cannot go faster), and the tasks of one VM (its clone, config
//! changes, start...) run one after the other. `clone_lower_bound` is the same with only
//! clone tasks, each clone's own duration standing in for the per-VM chains.

use std::collections::BTreeMap;
use std::time::Instant;

use serde_json::{Value, json};

#[derive(Default)]
struct Busy {
    count: u32,
    since: Option<Instant>,
    total: f64,
}

#[derive(Default)]
pub(crate) struct Stats {
    requests: BTreeMap<String, u64>,
    tasks: BTreeMap<String, BTreeMap<&'static str, u64>>,
    clones_node: BTreeMap<String, u32>,
    clones_storage: BTreeMap<String, u32>,
    peak_node: BTreeMap<String, u32>,
    peak_storage: BTreeMap<String, u32>,
    busy: BTreeMap<String, Busy>,
    first_start: Option<Instant>,
    last_end: Option<Instant>,
    lock_hold: BTreeMap<String, f64>,
    copy: BTreeMap<String, f64>,
    chains: BTreeMap<u32, f64>,
    longest_clone: f64,
    api: ApiWorkerStats,
    /// VM starts in progress per node, and the most seen at once.
    starts_node: BTreeMap<String, u32>,
    peak_starts_node: BTreeMap<String, u32>,
}

/// Protected calls and their wait for an API worker, per node (simulated seconds).
#[derive(Default)]
struct ApiWorkerStats {
    calls: BTreeMap<String, u64>,
    queued: BTreeMap<String, u64>,
    wait_seconds: BTreeMap<String, f64>,
    max_wait_seconds: f64,
    proxy_timeouts: u64,
}

/// Nominal work of one finished task, for the lower bound.
#[derive(Clone, Debug, Default)]
pub(crate) struct TaskWork {
    pub nominal_seconds: f64,
    /// (storage key, lock hold seconds, copy seconds)
    pub storage: Vec<(String, f64, f64)>,
    pub vm: Option<u32>,
    pub is_clone: bool,
}

impl Stats {
    /// A protected call got an API worker on `node` after waiting `waited` simulated seconds.
    pub fn api_call(&mut self, node: &str, waited: f64) {
        *self.api.calls.entry(node.to_string()).or_default() += 1;
        // Below a millisecond of simulated time the call did not queue.
        if waited > 0.001 {
            *self.api.queued.entry(node.to_string()).or_default() += 1;
        }
        *self.api.wait_seconds.entry(node.to_string()).or_default() += waited;
        self.api.max_wait_seconds = self.api.max_wait_seconds.max(waited);
    }

    /// A protected call was answered 596 because it had no answer by the proxy timeout.
    pub fn api_proxy_timeout(&mut self) {
        self.api.proxy_timeouts += 1;
    }

    pub fn request(&mut self, key: String) {
        *self.requests.entry(key).or_default() += 1;
    }

    pub fn task_started(&mut self, ttype: &str, now: Instant) {
        *self
            .tasks
            .entry(ttype.to_string())
            .or_default()
            .entry("started")
            .or_default() += 1;
        self.first_start.get_or_insert(now);
    }

    pub fn task_ended(&mut self, ttype: &str, outcome: &'static str, now: Instant, work: TaskWork) {
        *self
            .tasks
            .entry(ttype.to_string())
            .or_default()
            .entry(outcome)
            .or_default() += 1;
        self.last_end = Some(now);
        if outcome == "ok" || outcome == "warnings" {
            for (k, hold, copy) in &work.storage {
                *self.lock_hold.entry(k.clone()).or_default() += hold;
                *self.copy.entry(k.clone()).or_default() += copy;
            }
            if let Some(vm) = work.vm {
                *self.chains.entry(vm).or_default() += work.nominal_seconds;
            }
            if work.is_clone {
                self.longest_clone = self.longest_clone.max(work.nominal_seconds);
            }
        }
    }

    pub fn clone_begin(&mut self, node: &str, storage: &str) {
        let n = self.clones_node.entry(node.to_string()).or_default();
        *n += 1;
        let n = *n;
        let p = self.peak_node.entry(node.to_string()).or_default();
        *p = (*p).max(n);
        let s = self.clones_storage.entry(storage.to_string()).or_default();
        *s += 1;
        let s = *s;
        let p = self.peak_storage.entry(storage.to_string()).or_default();
        *p = (*p).max(s);
    }

    pub fn clone_end(&mut self, node: &str, storage: &str) {
        if let Some(n) = self.clones_node.get_mut(node) {
            *n = n.saturating_sub(1);
        }
        if let Some(n) = self.clones_storage.get_mut(storage) {
            *n = n.saturating_sub(1);
        }
    }

    /// A `qmstart` began booting a VM on `node` (a start's cost, not its lock wait).
    pub fn start_begin(&mut self, node: &str) {
        let n = self.starts_node.entry(node.to_string()).or_default();
        *n += 1;
        let n = *n;
        let p = self.peak_starts_node.entry(node.to_string()).or_default();
        *p = (*p).max(n);
    }

    pub fn start_end(&mut self, node: &str) {
        if let Some(n) = self.starts_node.get_mut(node) {
            *n = n.saturating_sub(1);
        }
    }

    /// When the first task started (the origin of the task makespan).
    pub fn first_start(&self) -> Option<Instant> {
        self.first_start
    }

    pub fn busy_enter(&mut self, storage: &str, now: Instant) {
        let b = self.busy.entry(storage.to_string()).or_default();
        if b.count == 0 {
            b.since = Some(now);
        }
        b.count += 1;
    }

    pub fn busy_exit(&mut self, storage: &str, now: Instant) {
        let b = self.busy.entry(storage.to_string()).or_default();
        b.count = b.count.saturating_sub(1);
        if b.count == 0
            && let Some(s) = b.since.take()
        {
            b.total += now.duration_since(s).as_secs_f64();
        }
    }

    /// The JSON of `GET /sim/stats`. `scale` converts wall seconds into simulated seconds.
    pub fn to_json(&self, scale: f64, now: Instant, faults: Value) -> Value {
        let sim = |wall: f64| if scale > 0.0 { wall / scale } else { 0.0 };
        let busy: BTreeMap<&String, f64> = self
            .busy
            .iter()
            .map(|(k, b)| {
                let open = b
                    .since
                    .map(|s| now.duration_since(s).as_secs_f64())
                    .unwrap_or(0.0);
                (k, sim(b.total + open))
            })
            .collect();
        let makespan = match (self.first_start, self.last_end) {
            (Some(a), Some(b)) if b > a => sim(b.duration_since(a).as_secs_f64()),
            _ => 0.0,
        };
        let storage_bound = self
            .lock_hold
            .iter()
            .map(|(k, h)| h.max(self.copy.get(k).copied().unwrap_or(0.0)))
            .fold(0.0f64, f64::max);
        let chain_bound = self.chains.values().copied().fold(0.0f64, f64::max);
        let total_requests: u64 = self.requests.values().sum();
        json!({
            "time_scale": scale,
            "requests": self.requests,
            "requests_total": total_requests,
            "tasks": self.tasks,
            "peak_concurrent_clones": { "nodes": self.peak_node, "storages": self.peak_storage },
            "running_clones": { "nodes": self.clones_node, "storages": self.clones_storage },
            "peak_concurrent_starts": { "nodes": self.peak_starts_node },
            "storage_busy_seconds": busy,
            "task_makespan_seconds": makespan,
            "lower_bound_seconds": storage_bound.max(chain_bound),
            "clone_lower_bound_seconds": storage_bound.max(self.longest_clone),
            "faults_injected": faults,
            "api_workers": {
                "calls": self.api.calls,
                "queued_calls": self.api.queued,
                "wait_seconds": self.api.wait_seconds,
                "wait_seconds_total": self.api.wait_seconds.values().sum::<f64>(),
                "max_wait_seconds": self.api.max_wait_seconds,
                "proxy_timeouts": self.api.proxy_timeouts,
            },
        })
    }
}
