//! API slots: `max_parallel_api.per_node` as a Redis count shared by every worker, the
//! [`ApiGate`] the worker's Proxmox clients ask before each protected call.
//!
//! Like the clone slots, the holders of one node's room are kept in Redis under the queue's
//! hash tag: `api:<cluster>/<node>` is a ZSET of pass id -> lease end (ms, Redis time). A pass
//! is taken by one script that first drops holders whose lease ended (a worker killed
//! mid-call gives its room back after [`PASS_LEASE`], 6 s: a pass is renewed while its call
//! runs), then adds itself if the count is
//! under the cap; it is given back (ZREM) when the call's answer is in. Cluster-wide calls
//! (`/access`, `/pools`) count against the node the connection talks to (the client learns
//! it from `GET /cluster/status`), or `api:<cluster>/@entry` when it could not. When Redis cannot be asked, the call goes ahead uncounted: the cap protects
//! Proxmox's queue, it must not stop a deployment.
//!
//! A caller that finds no room asks again after [`RETRY`], or at once when a pass of the
//! same key is given back in its own process (a `Notify` per key, woken after the ZREM):
//! the `user.cfg` room is one pass for the whole cluster, and handing it over only by
//! polling left it free 15-30 ms between two writers, which made every write of a class
//! wait that long per writer ahead of it (2,000 VMs at zero cost: 55-63 VMs/s). Callers in
//! other processes still poll; one process's waiters may go first while it has any, at
//! most as many as it runs jobs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::sync::Notify;

use crate::pve::{ApiGate, ApiPass};
use crate::queue::Queue;

/// A pass's lease: renewed every third of it while its call runs, so the pass of a worker
/// killed mid-call frees within this long.
pub const PASS_LEASE: Duration = Duration::from_secs(6);

/// How often a call waiting for room asks again (with jitter up to as much again), unless
/// the worker's `Timing::api_retry` says otherwise.
pub const RETRY: Duration = Duration::from_millis(15);

static RENEW: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
return 1
",
    )
});

/// Takes room under KEYS[1] (holders: pass id -> lease end) if under the cap. With KEYS[2]
/// (urgent waiters: id -> when their wait lapses), an urgent caller (ARGV[4] = 1) notes
/// itself there while it waits, and a caller that is not urgent takes room only while no
/// urgent one waits.
static TAKE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local urgent = ARGV[4] == '1'
local yield = false
if KEYS[2] then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if urgent then
    redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), ARGV[2])
    redis.call('PEXPIRE', KEYS[2], lease * 2)
  else
    yield = redis.call('ZCARD', KEYS[2]) > 0
  end
end
if not yield and redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + lease, ARGV[2])
  redis.call('PEXPIRE', KEYS[1], lease * 2)
  if KEYS[2] then redis.call('ZREM', KEYS[2], ARGV[2]) end
  return 1
end
return 0
",
    )
});

/// How long an urgent waiter's note stands without being renewed by its next try (so one
/// that died stops holding the others back within this long).
const URGENT_NOTE: Duration = Duration::from_secs(1);

/// The gate of one cluster's client.
pub struct ApiSlots {
    queue: Queue,
    cluster: String,
    cap: u32,
    retry: Duration,
    /// Per key: woken when this process gives a pass of it back.
    freed: Mutex<HashMap<String, Arc<Freed>>>,
}

/// Who in this process waits for a key's room: a pass given back wakes one urgent waiter if
/// there is one, else one plain waiter (a plain one would only yield to the urgent one).
#[derive(Default)]
struct Freed {
    plain: Notify,
    urgent: Notify,
    urgent_waiting: AtomicUsize,
}

impl Freed {
    fn wake_one(&self) {
        if self.urgent_waiting.load(Ordering::Acquire) > 0 {
            self.urgent.notify_one();
        } else {
            self.plain.notify_one();
        }
    }
}

/// Counts an urgent waiter of this process while it waits.
struct UrgentWaiting<'a>(&'a Freed);

impl<'a> UrgentWaiting<'a> {
    fn new(f: &'a Freed) -> Self {
        f.urgent_waiting.fetch_add(1, Ordering::AcqRel);
        UrgentWaiting(f)
    }
}

impl Drop for UrgentWaiting<'_> {
    fn drop(&mut self) {
        self.0.urgent_waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ApiSlots {
    /// The gate of `cluster`'s client: `cap` calls per node, a waiting call asking again
    /// every `retry` (plus jitter).
    pub fn new(queue: Queue, cluster: &str, cap: u32, retry: Duration) -> Arc<ApiSlots> {
        Arc::new(ApiSlots {
            queue,
            cluster: cluster.to_owned(),
            cap,
            retry: retry.max(Duration::from_millis(1)),
            freed: Mutex::default(),
        })
    }

    fn freed(&self, key: &str) -> Arc<Freed> {
        let mut m = self.freed.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(key.to_owned()).or_default().clone()
    }

    /// The Redis key counting the protected calls on `node` (`None`: the entry node).
    pub fn key(&self, node: Option<&str>) -> String {
        self.queue.key(&format!(
            "api:{}/{}",
            self.cluster,
            node.unwrap_or("@entry")
        ))
    }

    /// The Redis key of the `user.cfg` writers' room (one at a time; see
    /// [`ApiGate::enter_user_cfg`]).
    pub fn user_cfg_key(&self) -> String {
        self.queue.key(&format!("api:{}/#user.cfg", self.cluster))
    }

    /// Waits for room under `key` (at most `cap` holders) and holds it until dropped.
    async fn pass(&self, key: String, urgent: Option<(String, bool)>, cap: u32) -> ApiPass {
        let id = format!("{:016x}", rand::rng().random::<u64>());
        let (urgent_key, is_urgent) = match &urgent {
            Some((k, u)) => (Some(k.as_str()), *u),
            None => (None, false),
        };
        let freed = self.freed(&key);
        let _counted = is_urgent.then(|| UrgentWaiting::new(&freed));
        let notify = if is_urgent {
            &freed.urgent
        } else {
            &freed.plain
        };
        loop {
            // Listening before asking: a pass given back between the answer and the wait
            // still wakes this caller.
            let given_back = notify.notified();
            tokio::pin!(given_back);
            given_back.as_mut().enable();
            match self.take(&key, urgent_key, is_urgent, &id, cap).await {
                Ok(true) => {
                    let renewing = renew(self.queue.clone(), key.clone(), id.clone());
                    return ApiPass::holding(Held {
                        queue: self.queue.clone(),
                        key,
                        id,
                        renewing,
                        freed: freed.clone(),
                    });
                }
                Ok(false) => {
                    let jitter = rand::rng().random_range(0..=self.retry.as_millis() as u64);
                    tokio::select! {
                        _ = given_back => {}
                        _ = tokio::time::sleep(self.retry + Duration::from_millis(jitter)) => {}
                    }
                }
                Err(e) => {
                    tracing::debug!(key, error = %e, "API slot not counted; calling anyway");
                    return ApiPass::free();
                }
            }
        }
    }

    async fn take(
        &self,
        key: &str,
        urgent_key: Option<&str>,
        urgent: bool,
        id: &str,
        cap: u32,
    ) -> Result<bool, redis::RedisError> {
        let mut c = self.queue.connection();
        let mut inv = TAKE.key(key);
        if let Some(k) = urgent_key {
            inv.key(k);
        }
        let got: i64 = inv
            .arg(cap)
            .arg(id)
            .arg(PASS_LEASE.as_millis() as u64)
            .arg(if urgent { "1" } else { "0" })
            .arg(URGENT_NOTE.max(self.retry * 4).as_millis() as u64)
            .invoke_async(&mut c)
            .await?;
        Ok(got == 1)
    }
}

/// Gives a pass back when dropped; renews its lease meanwhile.
struct Held {
    queue: Queue,
    key: String,
    id: String,
    renewing: tokio::task::JoinHandle<()>,
    freed: Arc<Freed>,
}

fn renew(queue: Queue, key: String, id: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(PASS_LEASE / 3).await;
            let mut c = queue.connection();
            let _: Result<i64, _> = RENEW
                .key(&key)
                .arg(&id)
                .arg(PASS_LEASE.as_millis() as u64)
                .invoke_async(&mut c)
                .await;
        }
    })
}

impl Drop for Held {
    fn drop(&mut self) {
        self.renewing.abort();
        let (queue, key, id, freed) = (
            self.queue.clone(),
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.id),
            self.freed.clone(),
        );
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let mut c = queue.connection();
                let _: Result<i64, _> = redis::cmd("ZREM")
                    .arg(&key)
                    .arg(&id)
                    .query_async(&mut c)
                    .await;
                freed.wake_one();
            });
        }
    }
}

impl ApiGate for ApiSlots {
    fn enter<'a>(
        &'a self,
        node: Option<&'a str>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ApiPass> + Send + 'a>> {
        Box::pin(self.pass(self.key(node), None, self.cap))
    }

    fn enter_user_cfg(
        &self,
        urgent: bool,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ApiPass> + Send + '_>> {
        let key = self.user_cfg_key();
        let waiting = format!("{key}:urgent");
        Box::pin(self.pass(key, Some((waiting, urgent)), 1))
    }
}
