//! Fault injection: a seeded plan read from YAML (rates and windows) plus one-shot faults
//! injected from the library face. This module decides *whether* a fault fires; the places
//! that act on the decision are the HTTP front end (request faults), the storage lock,
//! the task runner and the clone worker.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// A fault plan. Every rate is a probability in `0..=1`, drawn from one RNG seeded with
/// `SimConfig::seed`, so the same request sequence gives the same faults.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultPlan {
    pub requests: RequestFaults,
    /// Fraction of storage-lock acquisitions that time out at once.
    pub lock_timeout_rate: f64,
    /// Fraction of tasks that run `slow_task_factor` times longer.
    pub slow_task_rate: f64,
    pub slow_task_factor: f64,
    /// Fraction of clone tasks that die half way, leaving a locked unnamed VM
    /// (exit status `unexpected status`).
    pub clone_half_fail_rate: f64,
    /// Fraction of task-starting calls that fail with
    /// `500 got no worker upid - start worker failed`.
    pub worker_start_fail_rate: f64,
    /// Fraction of `user.cfg` lock acquisitions (users, ACLs, pools, a clone's pool add)
    /// that time out after the full wait.
    pub user_cfg_lock_timeout_rate: f64,
    /// Nodes going offline for a window (seconds of simulated time since start; scaled).
    pub node_offline: Vec<OfflineWindow>,
}

/// Request-level faults, applied before routing.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RequestFaults {
    /// Fraction of requests that fail.
    pub rate: f64,
    /// Relative weights of the kinds of failure (all zero = equal weights).
    pub weight_596: f64,
    pub weight_500: f64,
    pub weight_reset: f64,
    /// The handler runs to its end (tasks it started keep running), then the reply is a
    /// `596 Connection timed out` sent when the proxy timeout has passed.
    pub weight_596_after_commit: f64,
    /// The handler runs to its end, then the connection is dropped without a reply.
    pub weight_reset_after_commit: f64,
    /// Only requests whose path (after `/api2/json`) starts with one of these; all if empty.
    /// `POST /access/ticket` is never faulted unless listed explicitly.
    pub paths: Vec<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OfflineWindow {
    pub node: String,
    pub after_seconds: f64,
    pub for_seconds: f64,
}

impl FaultPlan {
    pub fn from_yaml(yaml: &str) -> anyhow::Result<FaultPlan> {
        serde_saphyr::from_str(yaml).context("parsing fault YAML")
    }
    pub fn from_file(path: &Path) -> anyhow::Result<FaultPlan> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading fault file {}", path.display()))?;
        Self::from_yaml(&text).with_context(|| format!("in {}", path.display()))
    }
}

/// A kind of request failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum RequestFault {
    /// `596 Connection timed out` with an empty body (pveproxy could not reach pvedaemon).
    Proxy596,
    /// `500 Internal Server Error`-style failure with a message.
    Internal500,
    /// The connection is dropped without a response.
    ConnectionReset,
    /// The call runs to its end; the reply is a 596 after the proxy timeout.
    Proxy596AfterCommit,
    /// The call runs to its end; the connection is then dropped without a reply.
    ResetAfterCommit,
}

impl RequestFault {
    /// Whether the call still runs (its effects happen, only the reply is lost).
    pub fn after_commit(self) -> bool {
        matches!(
            self,
            RequestFault::Proxy596AfterCommit | RequestFault::ResetAfterCommit
        )
    }

    fn stat_key(self) -> &'static str {
        match self {
            RequestFault::Proxy596 => "request_596",
            RequestFault::Internal500 => "request_500",
            RequestFault::ConnectionReset => "request_reset",
            RequestFault::Proxy596AfterCommit => "request_596_after_commit",
            RequestFault::ResetAfterCommit => "request_reset_after_commit",
        }
    }
}

/// A one-shot fault injected now from the library face.
#[derive(Clone, Debug)]
pub enum Fault {
    /// The next `count` API requests fail this way.
    Requests { kind: RequestFault, count: u32 },
    /// The next `count` storage-lock acquisitions time out.
    LockTimeouts { count: u32 },
    /// The next `count` tasks run `factor` times longer.
    SlowTasks { count: u32, factor: f64 },
    /// The next `count` clone tasks die half way.
    CloneHalfFail { count: u32 },
    /// The next `count` task-starting calls fail with "got no worker upid".
    WorkerStartFail { count: u32 },
    /// The next `count` `user.cfg` lock acquisitions time out.
    UserCfgLockTimeouts { count: u32 },
    /// The node is offline for this long (real time; not scaled).
    NodeOffline { node: String, duration: Duration },
}

/// Live fault state: plan, one-shot counters and the RNG.
pub(crate) struct FaultState {
    pub plan: FaultPlan,
    rng: StdRng,
    pending_requests: Vec<RequestFault>,
    pub lock_timeouts: u32,
    pub slow_tasks: Vec<f64>,
    pub clone_half_fail: u32,
    pub worker_start_fail: u32,
    pub user_cfg_lock_timeouts: u32,
    pub fired: BTreeMap<&'static str, u64>,
}

impl FaultState {
    pub fn new(plan: FaultPlan, seed: u64) -> Self {
        FaultState {
            plan,
            rng: StdRng::seed_from_u64(seed),
            pending_requests: Vec::new(),
            lock_timeouts: 0,
            slow_tasks: Vec::new(),
            clone_half_fail: 0,
            worker_start_fail: 0,
            user_cfg_lock_timeouts: 0,
            fired: BTreeMap::new(),
        }
    }

    pub fn inject(&mut self, fault: &Fault) {
        match fault {
            Fault::Requests { kind, count } => {
                for _ in 0..*count {
                    self.pending_requests.push(*kind);
                }
            }
            Fault::LockTimeouts { count } => self.lock_timeouts += count,
            Fault::SlowTasks { count, factor } => {
                for _ in 0..*count {
                    self.slow_tasks.push(*factor);
                }
            }
            Fault::CloneHalfFail { count } => self.clone_half_fail += count,
            Fault::WorkerStartFail { count } => self.worker_start_fail += count,
            Fault::UserCfgLockTimeouts { count } => self.user_cfg_lock_timeouts += count,
            Fault::NodeOffline { .. } => {}
        }
    }

    fn roll(&mut self, rate: f64) -> bool {
        rate > 0.0 && self.rng.random::<f64>() < rate
    }

    pub fn count(&mut self, what: &'static str) {
        *self.fired.entry(what).or_default() += 1;
    }

    fn count_request(&mut self, kind: RequestFault) {
        self.count("request");
        self.count(kind.stat_key());
    }

    /// Decides whether a request to `path` (after `/api2/json`) fails.
    pub fn request_fault(&mut self, method: &str, path: &str) -> Option<RequestFault> {
        if let Some(k) =
            (!self.pending_requests.is_empty()).then(|| self.pending_requests.remove(0))
        {
            self.count_request(k);
            return Some(k);
        }
        let rf = self.plan.requests.clone();
        if rf.rate <= 0.0 {
            return None;
        }
        let applies = if rf.paths.is_empty() {
            !(method == "POST" && path.starts_with("/access/ticket"))
        } else {
            rf.paths.iter().any(|p| path.starts_with(p.as_str()))
        };
        if !applies || !self.roll(rf.rate) {
            return None;
        }
        let kinds = [
            (rf.weight_596, RequestFault::Proxy596),
            (rf.weight_500, RequestFault::Internal500),
            (rf.weight_reset, RequestFault::ConnectionReset),
            (
                rf.weight_596_after_commit,
                RequestFault::Proxy596AfterCommit,
            ),
            (rf.weight_reset_after_commit, RequestFault::ResetAfterCommit),
        ];
        let total: f64 = kinds.iter().map(|(w, _)| w.max(0.0)).sum();
        // All weights zero: the three original kinds, equally likely.
        let weights: Vec<(f64, RequestFault)> = if total <= 0.0 {
            kinds[..3].iter().map(|(_, k)| (1.0, *k)).collect()
        } else {
            kinds.iter().map(|(w, k)| (w.max(0.0), *k)).collect()
        };
        let sum: f64 = weights.iter().map(|(w, _)| w).sum();
        let mut x = self.rng.random::<f64>() * sum;
        let mut kind = weights[weights.len() - 1].1;
        for (w, k) in &weights {
            if x < *w {
                kind = *k;
                break;
            }
            x -= w;
        }
        self.count_request(kind);
        Some(kind)
    }

    pub fn lock_timeout(&mut self) -> bool {
        if self.lock_timeouts > 0 {
            self.lock_timeouts -= 1;
            self.count("lock_timeout");
            return true;
        }
        let r = self.plan.lock_timeout_rate;
        let hit = self.roll(r);
        if hit {
            self.count("lock_timeout");
        }
        hit
    }

    /// The slow-down factor for a new task (1.0 = normal).
    pub fn task_factor(&mut self) -> f64 {
        if !self.slow_tasks.is_empty() {
            self.count("slow_task");
            return self.slow_tasks.remove(0);
        }
        let r = self.plan.slow_task_rate;
        if self.roll(r) {
            self.count("slow_task");
            self.plan.slow_task_factor.max(1.0)
        } else {
            1.0
        }
    }

    pub fn clone_half_fail(&mut self) -> bool {
        if self.clone_half_fail > 0 {
            self.clone_half_fail -= 1;
            self.count("clone_half_fail");
            return true;
        }
        let r = self.plan.clone_half_fail_rate;
        let hit = self.roll(r);
        if hit {
            self.count("clone_half_fail");
        }
        hit
    }

    pub fn user_cfg_lock_timeout(&mut self) -> bool {
        if self.user_cfg_lock_timeouts > 0 {
            self.user_cfg_lock_timeouts -= 1;
            self.count("user_cfg_lock_timeout");
            return true;
        }
        let r = self.plan.user_cfg_lock_timeout_rate;
        let hit = self.roll(r);
        if hit {
            self.count("user_cfg_lock_timeout");
        }
        hit
    }

    pub fn worker_start_fail(&mut self) -> bool {
        if self.worker_start_fail > 0 {
            self.worker_start_fail -= 1;
            self.count("worker_start_fail");
            return true;
        }
        let r = self.plan.worker_start_fail_rate;
        let hit = self.roll(r);
        if hit {
            self.count("worker_start_fail");
        }
        hit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_schema_and_is_reproducible() {
        let plan = FaultPlan::from_yaml(
            "requests:\n  rate: 0.5\n  weight_596: 1\n  paths: [/nodes/]\nlock_timeout_rate: 0.1\nnode_offline:\n  - {node: pve2, after_seconds: 5, for_seconds: 10}\n",
        )
        .unwrap();
        assert_eq!(plan.node_offline[0].node, "pve2");
        let draw = |seed| {
            let mut f = FaultState::new(plan.clone(), seed);
            (0..50)
                .map(|_| f.request_fault("GET", "/nodes/pve1/qemu").is_some())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert!(draw(7).iter().any(|x| *x));
        let mut f = FaultState::new(plan, 1);
        assert!(f.request_fault("GET", "/version").is_none());

        // Only the after-commit kinds weighted: every fault is one of them, both occur.
        let plan = FaultPlan::from_yaml(
            "requests: {rate: 1, weight_596_after_commit: 1, weight_reset_after_commit: 1}",
        )
        .unwrap();
        let mut f = FaultState::new(plan, 3);
        let kinds: Vec<RequestFault> = (0..40)
            .filter_map(|_| f.request_fault("POST", "/nodes/pve1/qemu/100/clone"))
            .collect();
        assert_eq!(kinds.len(), 40);
        assert!(kinds.iter().all(|k| k.after_commit()));
        assert!(kinds.contains(&RequestFault::Proxy596AfterCommit));
        assert!(kinds.contains(&RequestFault::ResetAfterCommit));
        assert_eq!(f.fired["request"], 40);
        assert_eq!(
            f.fired["request_596_after_commit"] + f.fired["request_reset_after_commit"],
            40
        );
    }
}
