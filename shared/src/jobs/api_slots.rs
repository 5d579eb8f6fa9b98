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

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use rand::Rng;

use crate::pve::{ApiGate, ApiPass};
use crate::queue::Queue;

/// A pass's lease: renewed every third of it while its call runs, so the pass of a worker
/// killed mid-call frees within this long.
pub const PASS_LEASE: Duration = Duration::from_secs(6);

/// How often a call waiting for room asks again (with jitter up to as much again).
const RETRY: Duration = Duration::from_millis(15);

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

static TAKE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) * 2)
  return 1
end
return 0
",
    )
});

/// The gate of one cluster's client.
pub struct ApiSlots {
    queue: Queue,
    cluster: String,
    cap: u32,
}

impl ApiSlots {
    pub fn new(queue: Queue, cluster: &str, cap: u32) -> Arc<ApiSlots> {
        Arc::new(ApiSlots {
            queue,
            cluster: cluster.to_owned(),
            cap,
        })
    }

    /// The Redis key counting the protected calls on `node` (`None`: the entry node).
    pub fn key(&self, node: Option<&str>) -> String {
        self.queue.key(&format!(
            "api:{}/{}",
            self.cluster,
            node.unwrap_or("@entry")
        ))
    }

    async fn take(&self, key: &str, id: &str) -> Result<bool, redis::RedisError> {
        let mut c = self.queue.connection();
        let got: i64 = TAKE
            .key(key)
            .arg(self.cap)
            .arg(id)
            .arg(PASS_LEASE.as_millis() as u64)
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
        let (queue, key, id) = (
            self.queue.clone(),
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.id),
        );
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let mut c = queue.connection();
                let _: Result<i64, _> = redis::cmd("ZREM")
                    .arg(&key)
                    .arg(&id)
                    .query_async(&mut c)
                    .await;
            });
        }
    }
}

impl ApiGate for ApiSlots {
    fn enter<'a>(
        &'a self,
        node: Option<&'a str>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ApiPass> + Send + 'a>> {
        Box::pin(async move {
            let key = self.key(node);
            let id = format!("{:016x}", rand::rng().random::<u64>());
            loop {
                match self.take(&key, &id).await {
                    Ok(true) => {
                        let renewing = renew(self.queue.clone(), key.clone(), id.clone());
                        return ApiPass::holding(Held {
                            queue: self.queue.clone(),
                            key,
                            id,
                            renewing,
                        });
                    }
                    Ok(false) => {
                        let jitter = rand::rng().random_range(0..=RETRY.as_millis() as u64);
                        tokio::time::sleep(RETRY + Duration::from_millis(jitter)).await;
                    }
                    Err(e) => {
                        tracing::debug!(key, error = %e, "API slot not counted; calling anyway");
                        return ApiPass::free();
                    }
                }
            }
        })
    }
}
