//! Task listings shared in Redis: the [`TaskListShare`] of the worker's Proxmox clients.
//!
//! Each worker process watches the nodes its jobs wait on with one task listing per node
//! per interval (`pve::watch`). Without sharing, N worker processes list every node N times
//! as often. Here a process that fetched a node's listing publishes it under
//! `tasks:<cluster>/<node>` (in the queue's hash slot), and a process whose watcher is due
//! takes that listing instead of asking Proxmox while it is as young as the watcher needs
//! (half its waiters' shortest interval). Its age comes from the key's remaining time to
//! live ([`KEEP`]), so no two hosts' clocks are compared.
//!
//! Two watchers due at once would both find nothing and both list; so the one that finds
//! nothing also takes `tasks-turn:<cluster>/<node>` (`SET NX`, [`TURN`]) and lists, and the
//! others ask again every [`AGAIN`] until its listing is in, its turn ends without one, or
//! as long as their own listing would take has passed (then they list, without
//! publishing). A watcher whose tolerance is under two listings' time does not use the
//! share at all (`pve::watch`): at that pace a listing from elsewhere is seldom young enough.
//!
//! Redis being slow or away costs only the sharing: a read that fails or takes longer
//! than [`REDIS_WAIT`] lets the watcher ask Proxmox itself, and the share stays unused for
//! [`BACKOFF`] after a failure, so that a paused Redis does not slow every listing.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::pve::{SharedListing, SharedTake, TaskListShare};
use crate::queue::Queue;

/// The longest a watcher waits for Redis before it asks Proxmox itself.
pub const REDIS_WAIT: Duration = Duration::from_millis(250);

/// How long the share stays unused after Redis failed to answer.
pub const BACKOFF: Duration = Duration::from_secs(5);

/// The longest one process's turn to list a node can keep the others waiting (its
/// worker killed mid-listing).
pub const TURN: Duration = Duration::from_secs(1);

/// How often a watcher waiting for another's listing asks again.
pub const AGAIN: Duration = Duration::from_millis(2);

/// How long a published listing is kept; readers take it while it is as young as they
/// need (its age: the time it was kept plus its age when published).
pub const KEEP: Duration = Duration::from_secs(10);

/// The listing if there is one young enough (ARGV[3]: the oldest wanted, ms, counted in
/// the time it was kept), else the turn if free: `{1, listing, pttl}`, `{2, '', 0}` (the
/// turn is ours) or `{3, '', 0}` (another process is listing).
static TAKE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local v = redis.call('GET', KEYS[1])
if v then
  local pttl = redis.call('PTTL', KEYS[1])
  if tonumber(ARGV[4]) - pttl <= tonumber(ARGV[3]) then return {1, v, pttl} end
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', tonumber(ARGV[2])) then return {2, '', 0} end
return {3, '', 0}
",
    )
});

/// Publishes the listing (ARGV[1], for ARGV[2] ms) and ends the turn if it is ours (ARGV[3]).
static PUT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
return 1
",
    )
});

/// Ends the turn if it is ours (ARGV[1]).
static GIVE_UP: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
",
    )
});

/// What asking for a listing brought.
enum Asked {
    /// A listing young enough (its JSON) and its remaining time to live (ms).
    Listing(String, i64),
    /// The turn to list is ours.
    Turn,
    /// Another process held the turn all the time we would wait.
    NothingInTime,
}

/// What is stored: the listing and its age when published.
#[derive(Deserialize)]
struct Stored {
    aged_ms: u64,
    #[serde(flatten)]
    listing: SharedListing,
}

/// [`Stored`], as written.
#[derive(Serialize)]
struct StoredRef<'a> {
    aged_ms: u64,
    #[serde(flatten)]
    listing: &'a SharedListing,
}

/// The listings of one cluster's nodes, in Redis.
pub struct RedisTaskLists {
    queue: Queue,
    cluster: String,
    /// Milliseconds since `epoch` before which the share is not asked (after a failure).
    quiet_until: AtomicU64,
    epoch: Instant,
    /// This process's mark on a turn it holds.
    token: String,
}

impl RedisTaskLists {
    pub fn new(queue: Queue, cluster: &str) -> Arc<RedisTaskLists> {
        Arc::new(RedisTaskLists {
            queue,
            cluster: cluster.to_owned(),
            quiet_until: AtomicU64::new(0),
            epoch: Instant::now(),
            token: uuid::Uuid::new_v4().to_string(),
        })
    }

    fn key(&self, node: &str) -> String {
        self.queue.key(&format!("tasks:{}/{node}", self.cluster))
    }

    fn turn_key(&self, node: &str) -> String {
        self.queue
            .key(&format!("tasks-turn:{}/{node}", self.cluster))
    }

    fn quiet(&self) -> bool {
        (self.epoch.elapsed().as_millis() as u64) < self.quiet_until.load(Ordering::Relaxed)
    }

    fn failed(&self, what: &str, e: &dyn std::fmt::Display) {
        tracing::debug!(cluster = %self.cluster, error = %e, "sharing task listings: {what} failed; each process lists alone for a while");
        let until = (self.epoch.elapsed() + BACKOFF).as_millis() as u64;
        self.quiet_until.store(until, Ordering::Relaxed);
    }

    async fn read(&self, node: &str, max_age: Duration, wait: Duration) -> SharedTake {
        if self.quiet() {
            return SharedTake::Unavailable;
        }
        let (key, turn) = (self.key(node), self.turn_key(node));
        // Another process's turn is waited for as long as the caller's own listing would
        // take (`wait`), no longer.
        let give_up_at = tokio::time::Instant::now() + wait.min(REDIS_WAIT);
        let asking = async {
            loop {
                let mut c = self.queue.connection();
                let (what, value, pttl): (i64, String, i64) = TAKE
                    .key(&key)
                    .key(&turn)
                    .arg(&self.token)
                    .arg(TURN.as_millis() as u64)
                    .arg(max_age.as_millis() as u64)
                    .arg(KEEP.as_millis() as u64)
                    .invoke_async(&mut c)
                    .await?;
                match what {
                    1 => return Ok::<_, redis::RedisError>(Asked::Listing(value, pttl)),
                    2 => return Ok(Asked::Turn),
                    _ if tokio::time::Instant::now() + AGAIN > give_up_at => {
                        return Ok(Asked::NothingInTime);
                    }
                    _ => tokio::time::sleep(AGAIN).await,
                }
            }
        };
        let (value, pttl) = match tokio::time::timeout(REDIS_WAIT, asking).await {
            Ok(Ok(Asked::Listing(v, pttl))) => (v, pttl),
            Ok(Ok(Asked::Turn)) => return SharedTake::Yours,
            // Another process's turn that brought nothing in time: not Redis's fault.
            Ok(Ok(Asked::NothingInTime)) => return SharedTake::Unavailable,
            Ok(Err(e)) => {
                self.failed("a read", &e);
                return SharedTake::Unavailable;
            }
            Err(_) => {
                self.failed("a read", &"no answer in time");
                return SharedTake::Unavailable;
            }
        };
        match serde_json::from_str::<Stored>(&value) {
            Ok(stored) if pttl > 0 => {
                let kept = (KEEP.as_millis() as u64).saturating_sub(pttl as u64);
                let age = Duration::from_millis(kept + stored.aged_ms);
                SharedTake::Listing(stored.listing, age)
            }
            _ => SharedTake::Unavailable,
        }
    }

    async fn write(&self, node: &str, listing: &SharedListing, age: Duration) {
        let aged_ms = age.as_millis() as u64;
        let Ok(value) = serde_json::to_string(&StoredRef { aged_ms, listing }) else {
            self.end_turn(node).await;
            return;
        };
        let mut c = self.queue.connection();
        let (key, turn) = (self.key(node), self.turn_key(node));
        let mut inv = PUT.key(&key);
        inv.key(&turn)
            .arg(value)
            .arg(KEEP.as_millis() as u64)
            .arg(&self.token);
        match tokio::time::timeout(REDIS_WAIT, inv.invoke_async::<i64>(&mut c)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => self.failed("a write", &e),
            Err(_) => self.failed("a write", &"no answer in time"),
        }
    }

    async fn end_turn(&self, node: &str) {
        let mut c = self.queue.connection();
        let turn = self.turn_key(node);
        let mut inv = GIVE_UP.key(&turn);
        inv.arg(&self.token);
        if let Ok(Err(e)) = tokio::time::timeout(REDIS_WAIT, inv.invoke_async::<i64>(&mut c)).await
        {
            self.failed("ending a turn", &e);
        }
    }
}

impl TaskListShare for RedisTaskLists {
    fn take<'a>(
        &'a self,
        node: &'a str,
        max_age: Duration,
        wait: Duration,
    ) -> Pin<Box<dyn Future<Output = SharedTake> + Send + 'a>> {
        Box::pin(self.read(node, max_age, wait))
    }

    fn put<'a>(
        &'a self,
        node: &'a str,
        listing: &'a SharedListing,
        age: Duration,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(self.write(node, listing, age))
    }

    fn give_up<'a>(&'a self, node: &'a str) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        Box::pin(self.end_turn(node))
    }
}
