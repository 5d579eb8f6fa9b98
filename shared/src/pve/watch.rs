//! The task watcher: one `GET /nodes/{node}/tasks?source=active` per node per interval,
//! shared by every [`PveClient::wait_task`] of the process that waits on that node, instead
//! of one status poll per task per interval.
//!
//! Each node has a [`NodeWatch`]: waiters register their UPID, one background loop lists
//! the node's active tasks whenever the earliest waiter is due (each waiter's interval is
//! `wait_task`'s: half the task's age, within `[initial_poll, max_poll]`) and hands every
//! waiter a [`Verdict`]: still running (keep waiting), ended with the status the list shows
//! (Proxmox keeps an ended task in the active list until the node's next task starts or
//! ends), or gone from the list (archived: the waiter reads that one task's status). The
//! loop stops when nobody waits. A node whose listing is refused for good (permission, an
//! old server) is marked so and its waiters poll each task's status as before.
//!
//! The watcher owns no retry policy and never decides an outcome: `wait_task` does, from
//! the verdicts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use reqwest::Method;
use serde::Deserialize;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use super::client::{Params, PveClient, RequestKind, decode, seg};
use super::error::{ErrorClass, PveError};
use super::lenient;
use super::upid::Upid;

/// More active tasks than this on one node and the listing is cut; a waiter whose task is
/// not on the page reads its status, so a cut list costs requests, never correctness.
const LIST_LIMIT: u64 = 1000;

/// The shortest time between two listings of one node, in first intervals
/// (`initial_poll`): a task's end is seen at most this much later than its own interval
/// would see it, and a young task's first check waits for the node's next listing.
const LISTING_GAP: u32 = 3;

/// One entry of `GET /nodes/{node}/tasks`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct TaskListEntry {
    pub upid: String,
    #[serde(default)]
    pub node: String,
    #[serde(rename = "type", default)]
    pub task_type: String,
    /// The task's object: for `qmclone` the *source* VMID.
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub id: Option<String>,
    /// For a token's task the token's user; the token id is in `tokenid`.
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub user: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub tokenid: Option<String>,
    /// `RUNNING` in the active list while it runs; else the exit status (`OK`,
    /// `WARNINGS: n`, the error text).
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub status: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub starttime: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub endtime: Option<u64>,
}

impl TaskListEntry {
    /// The exit status, once the task has ended.
    pub fn exitstatus(&self) -> Option<&str> {
        self.status.as_deref().filter(|s| *s != "RUNNING")
    }
}

/// Which of a node's tasks `GET /nodes/{node}/tasks` lists (pve-manager `Tasks.pm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TaskSource {
    /// Archived (ended) tasks: Proxmox's default.
    #[default]
    Archive,
    /// Running tasks, and ended ones not archived yet.
    Active,
    /// Both, active first.
    All,
}

/// Filters of `GET /nodes/{node}/tasks`.
#[derive(Debug, Clone, Default)]
pub struct TaskQuery {
    pub source: TaskSource,
    /// The task's id field: a clone's *source* VMID, the VMID of a start, config, destroy.
    pub vmid: Option<u32>,
    /// `qmclone`, `qmstart`, ...
    pub typefilter: Option<String>,
    /// Only tasks started at or after this Unix time (server clock).
    pub since: Option<i64>,
    /// Skip this many matches.
    pub start: Option<u64>,
    /// At most this many entries (Proxmox's default is 50).
    pub limit: Option<u64>,
}

/// A page of `GET /nodes/{node}/tasks`, with the number of matches in all.
#[derive(Debug, Clone, Default)]
pub struct TaskList {
    pub tasks: Vec<TaskListEntry>,
    pub total: Option<u64>,
}

impl PveClient {
    /// `GET /nodes/{node}/tasks` with filters, as Proxmox serves it.
    pub async fn node_tasks(&self, node: &str, q: &TaskQuery) -> Result<TaskList, PveError> {
        self.node_tasks_as(node, q, RequestKind::Other).await
    }

    pub(crate) async fn node_tasks_as(
        &self,
        node: &str,
        q: &TaskQuery,
        kind: RequestKind,
    ) -> Result<TaskList, PveError> {
        let path = format!("/nodes/{}/tasks", seg(node));
        let source = match q.source {
            TaskSource::Archive => None,
            TaskSource::Active => Some("active"),
            TaskSource::All => Some("all"),
        };
        let params = Params::new()
            .opt_str("source", source)
            .opt_num("vmid", q.vmid)
            .opt_str("typefilter", q.typefilter.as_deref())
            .opt_num("since", q.since)
            .opt_num("start", q.start)
            .opt_num("limit", q.limit);
        let env = self.request(Method::GET, &path, &params, kind).await?;
        Ok(TaskList {
            tasks: decode(&path, env.data)?,
            total: env.total,
        })
    }

    /// Finds the UPID of a clone whose reply was lost (596, 502-504, a dropped connection):
    /// the `qmclone` tasks on `node` from template/VM `source` started since `since` (Unix
    /// time, server clock; allow for skew) whose log names a volume of `newid`
    /// (`vm-<newid>-disk-N`). `Ok(None)` when no such task is found; the log of a clone
    /// onto a storage that prints no volume names (rbd) cannot tell, so the caller must
    /// also check the new VM itself (its `lock: clone` config, its marker).
    pub async fn find_clone_task(
        &self,
        node: &str,
        source: u32,
        newid: u32,
        since: i64,
    ) -> Result<Option<Upid>, PveError> {
        let list = self
            .node_tasks(
                node,
                &TaskQuery {
                    source: TaskSource::All,
                    vmid: Some(source),
                    typefilter: Some("qmclone".into()),
                    since: Some(since),
                    limit: Some(500),
                    ..TaskQuery::default()
                },
            )
            .await?;
        let needle = format!("vm-{newid}-disk-");
        for t in list.tasks {
            let Ok(upid) = t.upid.parse::<Upid>() else {
                continue;
            };
            let (lines, _) = self.task_log(&upid, 0, 0).await?;
            if lines.iter().any(|l| l.t.contains(&needle)) {
                return Ok(Some(upid));
            }
        }
        Ok(None)
    }
}

/// What the watcher learned about one waiter's task.
#[derive(Debug, Clone)]
pub(crate) enum Verdict {
    /// Ended; the active list shows the exit status.
    Ended(String),
    /// Not in the active list (or the listing failed): read this task's status.
    CheckStatus,
}

struct Waiter {
    upid: String,
    /// A listing fetched before this cannot tell anything about the task.
    registered: Instant,
    started: Instant,
    initial: Duration,
    max: Duration,
    next_due: Instant,
    tx: Option<oneshot::Sender<Verdict>>,
}

#[derive(Default)]
struct NodeState {
    waiters: HashMap<u64, Waiter>,
    running: bool,
}

/// The watch of one node's tasks.
pub(crate) struct NodeWatch {
    node: String,
    state: Mutex<NodeState>,
    wake: Notify,
    next_id: AtomicU64,
    /// Set when listing is refused for good: waiters poll their own task's status.
    unsupported: AtomicBool,
}

/// A waiter's place in a [`NodeWatch`]; leaving (drop) unregisters it.
pub(crate) struct Registration {
    watch: Arc<NodeWatch>,
    id: u64,
    pub(crate) rx: oneshot::Receiver<Verdict>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.watch.state().waiters.remove(&self.id);
    }
}

/// Every node's watch, per client (clones of a client share it).
#[derive(Default)]
pub(crate) struct TaskWatcher {
    nodes: Mutex<HashMap<String, Arc<NodeWatch>>>,
}

impl TaskWatcher {
    pub(crate) fn node(&self, node: &str) -> Arc<NodeWatch> {
        lock(&self.nodes)
            .entry(node.to_owned())
            .or_insert_with(|| {
                Arc::new(NodeWatch {
                    node: node.to_owned(),
                    state: Mutex::new(NodeState::default()),
                    wake: Notify::new(),
                    next_id: AtomicU64::new(0),
                    unsupported: AtomicBool::new(false),
                })
            })
            .clone()
    }
}

/// `wait_task`'s interval for a task of this age: half its age within `[initial, max]`.
pub(crate) fn interval_for(age: Duration, initial: Duration, max: Duration) -> Duration {
    (age / 2).clamp(initial, max.max(initial))
}

/// A poisoned lock only means a waiter panicked; the map is still consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl NodeWatch {
    fn state(&self) -> MutexGuard<'_, NodeState> {
        lock(&self.state)
    }

    pub(crate) fn unsupported(&self) -> bool {
        self.unsupported.load(Ordering::Relaxed)
    }

    /// Registers a waiter for `upid`, first checked at `first_check` (default: at once when
    /// the loop is idle, else `initial` from now), then every `interval_for(age)`.
    pub(crate) fn register(
        self: &Arc<Self>,
        client: &PveClient,
        upid: &Upid,
        started: Instant,
        initial: Duration,
        max: Duration,
        first_check: Option<Instant>,
    ) -> Registration {
        let (tx, rx) = oneshot::channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let start_loop = {
            let mut st = self.state();
            // Checked at once when the loop is idle, else with the next due listing.
            let first_check = first_check.unwrap_or_else(|| {
                if st.running {
                    Instant::now() + initial
                } else {
                    Instant::now()
                }
            });
            st.waiters.insert(
                id,
                Waiter {
                    upid: upid.as_str().to_owned(),
                    registered: Instant::now(),
                    started,
                    initial,
                    max,
                    next_due: first_check,
                    tx: Some(tx),
                },
            );
            !std::mem::replace(&mut st.running, true)
        };
        if start_loop {
            let (watch, client) = (self.clone(), client.clone());
            tokio::spawn(async move { watch.run(client).await });
        } else {
            self.wake.notify_one();
        }
        Registration {
            watch: self.clone(),
            id,
            rx,
        }
    }

    /// The loop: list when the earliest waiter is due, hand out verdicts, stop when idle.
    async fn run(self: Arc<Self>, client: PveClient) {
        // However the loop ends (idle, or its runtime going away), the next waiter must be
        // able to start a new one and the current ones must not wait for this one.
        struct Stopped(Arc<NodeWatch>);
        impl Drop for Stopped {
            fn drop(&mut self) {
                let mut st = self.0.state();
                st.running = false;
                for w in st.waiters.values_mut() {
                    if let Some(tx) = w.tx.take() {
                        let _ = tx.send(Verdict::CheckStatus);
                    }
                }
                st.waiters.retain(|_, w| w.tx.is_some());
            }
        }
        let _stopped = Stopped(self.clone());
        let mut last_listing: Option<Instant> = None;
        loop {
            let due = {
                let mut st = self.state();
                st.waiters
                    .retain(|_, w| w.tx.as_ref().is_some_and(|t| !t.is_closed()));
                // Never two listings closer than LISTING_GAP first intervals: with tasks
                // starting all the time, the youngest one's first interval set the pace
                // for every task of the node (5.5 listings per VM on the class, more
                // than one status poll per task would cost).
                let floor = last_listing
                    .zip(st.waiters.values().map(|w| w.initial).min())
                    .map(|(l, g)| l + g * LISTING_GAP);
                match st.waiters.values().map(|w| w.next_due).min() {
                    Some(d) => floor.map_or(d, |f| d.max(f)),
                    // `Stopped` marks the loop as not running, under this same lock hold
                    // being released first: a waiter registering meanwhile is answered
                    // `CheckStatus` and registers again, starting a new loop.
                    None => return,
                }
            };
            if due > Instant::now() {
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {}
                    _ = self.wake.notified() => continue,
                }
            }
            let fetched = Instant::now();
            last_listing = Some(fetched);
            let listing = client
                .node_tasks_as(
                    &self.node,
                    &TaskQuery {
                        source: TaskSource::Active,
                        limit: Some(LIST_LIMIT),
                        ..TaskQuery::default()
                    },
                    RequestKind::TaskList,
                )
                .await;
            let now = Instant::now();
            let listed: Option<HashMap<String, Option<String>>> = match listing {
                Ok(list) => Some(
                    list.tasks
                        .into_iter()
                        .map(|t| {
                            let exit = t.exitstatus().map(str::to_owned);
                            (t.upid, exit)
                        })
                        .collect(),
                ),
                Err(e) => {
                    if matches!(
                        e.class(),
                        ErrorClass::Permission | ErrorClass::NotFound | ErrorClass::Param
                    ) {
                        tracing::debug!(node = %self.node, error = %e, "task listing refused; waiters poll each task");
                        self.unsupported.store(true, Ordering::Relaxed);
                    }
                    None
                }
            };
            let mut st = self.state();
            for w in st.waiters.values_mut() {
                if w.registered > fetched {
                    continue;
                }
                let verdict = match &listed {
                    None => Some(Verdict::CheckStatus),
                    Some(l) => match l.get(&w.upid) {
                        Some(None) => None,
                        Some(Some(exit)) => Some(Verdict::Ended(exit.clone())),
                        None => Some(Verdict::CheckStatus),
                    },
                };
                match verdict {
                    Some(v) => {
                        if let Some(tx) = w.tx.take() {
                            let _ = tx.send(v);
                        }
                    }
                    None => {
                        w.next_due = now + interval_for(now - w.started, w.initial, w.max);
                    }
                }
            }
            st.waiters.retain(|_, w| w.tx.is_some());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_follow_the_task_age() {
        let (i, m) = (Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(interval_for(Duration::ZERO, i, m), i);
        assert_eq!(
            interval_for(Duration::from_millis(600), i, m),
            Duration::from_millis(300)
        );
        assert_eq!(interval_for(Duration::from_secs(60), i, m), m);
    }

    #[test]
    fn list_entries_decode() {
        let v: Vec<TaskListEntry> = serde_json::from_str(
            r#"[{"upid":"UPID:pve1:0035D677:03AB00C3:66DC5987:qmclone:100:root@pam:","node":"pve1","type":"qmclone","id":"100","user":"root@pam","tokenid":"labfleet","status":"RUNNING","starttime":1725716871,"pid":3528311,"pstart":61538499},
                {"upid":"UPID:pve1:0035D678:03AB00C4:66DC5988:qmstart:200:root@pam:","type":"qmstart","id":200,"status":"WARNINGS: 1","starttime":"1725716872","endtime":1725716880}]"#,
        )
        .unwrap();
        assert_eq!(v[0].exitstatus(), None);
        assert_eq!(v[0].tokenid.as_deref(), Some("labfleet"));
        assert_eq!(v[1].exitstatus(), Some("WARNINGS: 1"));
        assert_eq!(v[1].id.as_deref(), Some("200"));
        assert_eq!(v[1].endtime, Some(1725716880));
    }
}
