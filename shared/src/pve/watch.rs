//! The task watcher: one `GET /nodes/{node}/tasks?source=all&since=<oldest waiter's start>`
//! per node per interval, shared by every [`PveClient::wait_task`] of the process that waits
//! on that node, instead of one status poll per task per interval.
//!
//! Each node has a [`NodeWatch`]: waiters register their UPID, one background loop lists
//! the node's tasks started since the oldest waiter's (the UPID's start time is the
//! server's own clock, so no skew allowance is needed) whenever the earliest waiter is due
//! (each waiter's interval is `wait_task`'s: half the task's age, within
//! `[initial_poll, max_poll]`) and hands every waiter a [`Verdict`]: still running (keep
//! waiting), or ended with the status the list shows. Proxmox keeps an ended task in the
//! active part of the list, with its exit status, until the node's next task starts or
//! ends, then moves it to the archive part, which also shows the exit status; with
//! `source=all` either part answers, so a task's end costs no status read of its own. A
//! waiter whose task is in neither part (a cut page) reads its own status. The loop stops
//! when nobody waits.
//!
//! Two things keep the listings few while tasks keep starting. A node learns how long
//! each task type runs there (the shortest of its last OK runs): a new task is not looked
//! at before three quarters of that, and listings are at least a quarter of it apart. And
//! with a [`TaskListShare`] (the worker's, in Redis), a listing another process fetched
//! recently enough answers this process's waiters too, so N worker processes do not list
//! a node N times as often. A node whose listing is refused for good (permission, an
//! old server) is marked so and its waiters poll each task's status as before.
//!
//! The watcher owns no retry policy and never decides an outcome: `wait_task` does, from
//! the verdicts.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use reqwest::Method;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

use super::client::{Params, PveClient, RequestKind, decode, seg};
use super::error::{ErrorClass, PveError};
use super::lenient;
use super::task::parse_exitstatus;
use super::upid::Upid;

/// More tasks than this on one node since the oldest waiter's started and the listing is
/// cut; a waiter whose task is not on the page reads its status, so a cut list costs
/// requests, never correctness.
const LIST_LIMIT: u64 = 1000;

/// The shortest time between two listings of one node, in first intervals
/// (`initial_poll`), until the node has seen how long its tasks run: a task's end is seen
/// at most this much later than its own interval would see it, and a young task's first
/// check waits for the node's next listing.
const LISTING_GAP: u32 = 3;

/// How many recent OK durations of a task type a node keeps. Once it has that many, a new
/// task of that type is first checked when three quarters of the shortest have passed,
/// and two listings of the node are the shortest over [`PACE_DIVISOR`] apart (the
/// shortest of the waiters' types; at least half a first interval). A listing
/// is shared by the node's tasks, but with clones starting all the time the young ones'
/// first intervals set its pace: 3.9 listings per VM on the bench's class, when a linked
/// clone there never ends within 2.5 s.
const DURATION_SAMPLES: usize = 4;

/// See [`DURATION_SAMPLES`]: with listings a quarter of the shortest run apart, a task's
/// end is seen on average an eighth of that run late. 0.2, 0.3 and 0.4 of it were measured
/// on the bench's class (BENCHMARKS.md, session 10): polls per VM 1.8-2.0, 1.6-1.9 and more
/// makespan than the listings saved at 0.4 and up.
const PACE_DIVISOR: u32 = 4;

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

/// A node's task listing as one process fetched it, for the other processes watching the
/// same node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SharedListing {
    /// The listing's `since` (Unix seconds, the node's clock): tasks started earlier are
    /// not in it.
    pub since: i64,
    /// Each listed task's UPID and exit status (`None` while it runs).
    pub tasks: Vec<(String, Option<String>)>,
}

/// Task listings shared by the processes that watch the same nodes (the worker's:
/// `jobs::task_lists`, in Redis), so that the listings Proxmox serves do not grow with the
/// number of worker processes: a listing one process fetched answers the others' waiters
/// while it is no older than half their shortest interval (nor than their listing floor).
/// Stale answers cannot mislead: a task shown running is
/// looked at again, one not shown reads its own status, and an end shown is an end.
pub trait TaskListShare: Send + Sync {
    /// The listing of `node` fetched at most `max_age` ago, waiting up to `wait` for the
    /// one another process is fetching right now; or this process's turn to fetch it.
    fn take<'a>(
        &'a self,
        node: &'a str,
        max_age: Duration,
        wait: Duration,
    ) -> Pin<Box<dyn Future<Output = SharedTake> + Send + 'a>>;

    /// Publishes `listing` of `node`, fetched `age` ago, and ends this process's turn.
    fn put<'a>(
        &'a self,
        node: &'a str,
        listing: &'a SharedListing,
        age: Duration,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

    /// Ends this process's turn without a listing (Proxmox refused it).
    fn give_up<'a>(&'a self, node: &'a str) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>>;
}

/// What [`TaskListShare::take`] found.
#[derive(Debug)]
pub enum SharedTake {
    /// Another process's listing, and its age.
    Listing(SharedListing, Duration),
    /// Nobody is fetching one: this process's turn (then `put` or `give_up`).
    Yours,
    /// The share cannot tell (Redis slow or away): list without publishing.
    Unavailable,
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
}

/// What the watcher learned about one waiter's task.
#[derive(Debug, Clone)]
pub(crate) enum Verdict {
    /// Ended; the list shows the exit status.
    Ended(String),
    /// Not in the list (a cut page) or the listing failed: read this task's status.
    CheckStatus,
}

struct Waiter {
    upid: String,
    /// `qmclone`, `qmstart`, ...: whose durations this task's end adds to.
    task_type: String,
    /// The UPID's start time (Unix seconds, the node's clock): the listing's `since`.
    starttime: i64,
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
    /// The last [`DURATION_SAMPLES`] durations (from `wait_task`'s start to the listing
    /// that showed the end) of the tasks of each type that ended OK on this node.
    durations: HashMap<String, VecDeque<Duration>>,
}

impl NodeState {
    /// The shortest of the recent OK durations of this type; nothing until
    /// [`DURATION_SAMPLES`] have ended.
    fn shortest(&self, task_type: &str) -> Option<Duration> {
        match self.durations.get(task_type) {
            Some(d) if d.len() >= DURATION_SAMPLES => d.iter().min().copied(),
            _ => None,
        }
    }

    /// How long a new task of this type surely runs: three quarters of the shortest.
    fn surely_running(&self, task_type: &str) -> Duration {
        self.shortest(task_type).unwrap_or_default() * 3 / 4
    }

    /// The shortest time between two listings: the shortest recent duration of the
    /// waiters' task types over [`PACE_DIVISOR`] (at least half a first interval), or
    /// [`LISTING_GAP`] first intervals while no type has samples. Types without samples
    /// yet do not count: their tasks are seen at the pace of the others. A node whose
    /// tasks end within a second is thus listed more often than the gap, not less: a
    /// fixed 3-interval gap held every instant clone 300 ms (2,000 VMs at zero cost in
    /// 53 s, each process's jobs waiting for the listing, not working).
    fn listing_floor(&self) -> Option<Duration> {
        let initial = self.waiters.values().map(|w| w.initial).min()?;
        let pace = self
            .waiters
            .values()
            .filter_map(|w| self.shortest(&w.task_type))
            .min();
        Some(match pace {
            Some(d) => (d / PACE_DIVISOR).max(initial / 2),
            None => initial * LISTING_GAP,
        })
    }

    fn ended_ok(&mut self, task_type: &str, took: Duration) {
        let d = self.durations.entry(task_type.to_owned()).or_default();
        if d.len() == DURATION_SAMPLES {
            d.pop_front();
        }
        d.push_back(took);
    }
}

/// The watch of one node's tasks.
pub(crate) struct NodeWatch {
    node: String,
    state: Mutex<NodeState>,
    wake: Notify,
    next_id: AtomicU64,
    /// Set when listing is refused for good: waiters poll their own task's status.
    unsupported: AtomicBool,
    /// How long this process's listings of the node take (microseconds, a moving average;
    /// 0 before the first).
    listing_us: AtomicU64,
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
                    listing_us: AtomicU64::new(0),
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
    /// Counts one listing's round trip into the node's average (a quarter weight).
    fn took(&self, d: Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        let old = self.listing_us.load(Ordering::Relaxed);
        let avg = if old == 0 { us } else { (old * 3 + us) / 4 };
        self.listing_us.store(avg.max(1), Ordering::Relaxed);
    }

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
            // A re-registration keeps its own time; a new task waits until it may have
            // ended, then is checked with the next due listing (at once when idle).
            let first_check = first_check.unwrap_or_else(|| {
                let soonest = started + st.surely_running(upid.task_type());
                let next = if st.running {
                    Instant::now() + initial
                } else {
                    Instant::now()
                };
                next.max(soonest)
            });
            st.waiters.insert(
                id,
                Waiter {
                    upid: upid.as_str().to_owned(),
                    starttime: upid.starttime(),
                    task_type: upid.task_type().to_owned(),
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

    /// The node's tasks since `since`: another process's listing from the share when one
    /// younger than `tolerance` covers them, else asked of Proxmox (and published).
    /// Returns when the listing was fetched (a waiter registered later learns nothing from
    /// it) and each task's exit status (`None`: running), or `None` if the listing failed.
    async fn list(
        &self,
        client: &PveClient,
        since: Option<i64>,
        tolerance: Duration,
    ) -> (Instant, Option<HashMap<String, Option<String>>>) {
        // Another process's listing reaches this one a round trip after it was fetched at
        // best: with less tolerance than two listings take, it is seldom young enough, and
        // waiting for it would only delay the waiters (tasks that end within milliseconds).
        let took = Duration::from_micros(self.listing_us.load(Ordering::Relaxed));
        let share = client
            .task_list_share()
            .filter(|_| !took.is_zero() && tolerance >= 2 * took);
        let since_or_all = since.unwrap_or(i64::MIN);
        let mut turn = false;
        if let Some(share) = share {
            let asked = Instant::now();
            match share.take(&self.node, tolerance, 2 * took).await {
                SharedTake::Listing(l, age) if l.since <= since_or_all => {
                    client
                        .counters()
                        .shared_task_lists
                        .fetch_add(1, Ordering::Relaxed);
                    let fetched = asked.checked_sub(age).unwrap_or(asked);
                    return (fetched, Some(l.tasks.into_iter().collect()));
                }
                // Listed since a later start than this process's oldest waiter's: list
                // from that one, and publish it for everyone.
                SharedTake::Listing(..) | SharedTake::Yours => turn = true,
                SharedTake::Unavailable => {}
            }
        }
        let fetched = Instant::now();
        let listing = client
            .node_tasks_as(
                &self.node,
                &TaskQuery {
                    source: TaskSource::All,
                    since,
                    limit: Some(LIST_LIMIT),
                    ..TaskQuery::default()
                },
                RequestKind::TaskList,
            )
            .await;
        match listing {
            Ok(list) => {
                self.took(fetched.elapsed());
                let tasks: Vec<(String, Option<String>)> = list
                    .tasks
                    .into_iter()
                    .map(|t| {
                        let exit = t.exitstatus().map(str::to_owned);
                        (t.upid, exit)
                    })
                    .collect();
                // A cut page covers less than `since` says: not for the others.
                let whole = list.total.is_none_or(|n| n as usize <= tasks.len());
                let l = SharedListing {
                    since: since_or_all,
                    tasks,
                };
                if let (Some(share), true) = (share, turn) {
                    if whole {
                        share.put(&self.node, &l, fetched.elapsed()).await;
                    } else {
                        share.give_up(&self.node).await;
                    }
                }
                (fetched, Some(l.tasks.into_iter().collect()))
            }
            Err(e) => {
                if let (Some(share), true) = (share, turn) {
                    share.give_up(&self.node).await;
                }
                if matches!(
                    e.class(),
                    ErrorClass::Permission | ErrorClass::NotFound | ErrorClass::Param
                ) {
                    tracing::debug!(node = %self.node, error = %e, "task listing refused; waiters poll each task");
                    self.unsupported.store(true, Ordering::Relaxed);
                }
                (fetched, None)
            }
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
            let (due, since, tolerance) = {
                let mut st = self.state();
                st.waiters
                    .retain(|_, w| w.tx.as_ref().is_some_and(|t| !t.is_closed()));
                // Never two listings closer than the node's floor: with tasks starting
                // all the time, the youngest one's first interval set the pace for every
                // task of the node (5.5 listings per VM on the class, more than one
                // status poll per task would cost).
                let gap = st.listing_floor();
                let floor = last_listing.zip(gap).map(|(l, g)| l + g);
                let since = st.waiters.values().map(|w| w.starttime).min();
                // Another process's listing will do if it is no older than half the
                // shortest interval of the waiters (nor than the floor): it then adds at
                // most half an interval to when a task's end is seen.
                let now = Instant::now();
                let tolerance = st
                    .waiters
                    .values()
                    .map(|w| interval_for(now - w.started, w.initial, w.max) / 2)
                    .min()
                    .unwrap_or_default()
                    .max(gap.unwrap_or_default());
                match st.waiters.values().map(|w| w.next_due).min() {
                    Some(d) => (floor.map_or(d, |f| d.max(f)), since, tolerance),
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
            let (fetched, listed) = self.list(&client, since, tolerance).await;
            last_listing = Some(fetched);
            let now = Instant::now();
            let mut st = self.state();
            let mut ended_ok = Vec::new();
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
                        if let Verdict::Ended(exit) = &v
                            && parse_exitstatus(exit).is_ok()
                        {
                            ended_ok.push((w.task_type.clone(), now - w.started));
                        }
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
            for (task_type, took) in ended_ok {
                st.ended_ok(&task_type, took);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiter(task_type: &str) -> Waiter {
        Waiter {
            upid: String::new(),
            task_type: task_type.to_owned(),
            starttime: 0,
            registered: Instant::now(),
            started: Instant::now(),
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            next_due: Instant::now(),
            tx: None,
        }
    }

    #[test]
    fn listings_are_paced_by_the_shortest_run_once_known() {
        let mut st = NodeState::default();
        assert_eq!(st.listing_floor(), None, "no waiter, no listing");
        st.waiters.insert(0, waiter("qmclone"));
        let ms = Duration::from_millis;
        assert_eq!(
            st.listing_floor(),
            Some(ms(300)),
            "the gap before any sample"
        );
        // Clones of 2.4 s and more: a quarter of the shortest, above the gap.
        for d in [2400, 2600, 3000, 2500] {
            st.ended_ok("qmclone", ms(d));
        }
        assert_eq!(st.listing_floor(), Some(ms(600)));
        // Clones that end at once (a zero-cost simulator, fast storage): listed more
        // often than the gap, down to half a first interval.
        for d in [120, 110, 130, 40] {
            st.ended_ok("qmclone", ms(d));
        }
        assert_eq!(st.listing_floor(), Some(ms(50)));
        for d in [400, 410, 420, 430] {
            st.ended_ok("qmclone", ms(d));
        }
        assert_eq!(st.listing_floor(), Some(ms(100)));
    }

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
