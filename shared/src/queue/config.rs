//! Queue settings with their defaults, and the retry policy per job kind.

use std::collections::HashMap;
use std::time::Duration;

/// How a job kind is retried after its handler fails.
///
/// The delay before attempt `n + 1` is drawn uniformly from `0..=min(cap, base * 2^(n-1))`
/// ("full jitter"), so a burst of failures does not come back as a burst.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts the handler may spend (lost leases do not count, see `max_lease_losses`).
    pub max_attempts: u32,
    /// Backoff before the second attempt, doubled for every further one.
    pub base: Duration,
    /// Upper bound of the backoff.
    pub cap: Duration,
}

impl Default for RetryPolicy {
    /// 5 attempts, 2 s base, 5 min cap.
    fn default() -> Self {
        Self {
            max_attempts: 5,
            base: Duration::from_secs(2),
            cap: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// The jittered delay after the given (1-based) failed attempt.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(30);
        let ceiling = self.base.saturating_mul(1u32 << exp).min(self.cap);
        let ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rand::random_range(0..=ms))
    }
}

/// Everything the queue layer can be tuned with. `Default` gives the production values; tests
/// shorten the lease and sweep.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// Hash tag of every key: `{lf}:...`. One tag means one Redis Cluster slot per queue.
    pub namespace: String,
    /// How long a claim stays valid without renewal. Default 30 s.
    pub lease: Duration,
    /// How often a running job renews its lease. Default lease / 3 (10 s).
    pub renew_every: Duration,
    /// How often each worker's reaper sweeps expired leases. Default 5 s. A killed worker's
    /// job is re-delivered within `lease + reap_every` (35 s by default) of its last renewal.
    pub reap_every: Duration,
    /// How often an idle worker polls for new or newly due jobs. Default 200 ms.
    pub idle_poll: Duration,
    /// Most jobs one claim call takes (never more than the worker's free slots). Default 64.
    pub claim_batch: usize,
    /// Jobs per enqueue script call; each chunk is atomic. Default 500.
    pub enqueue_chunk: usize,
    /// On shutdown, how long running jobs get before they are dropped and handed back
    /// without spending an attempt. Default 20 s.
    pub shutdown_grace: Duration,
    /// Retry policy of kinds not in `retry_by_kind`.
    pub default_retry: RetryPolicy,
    /// Retry policy per job kind.
    pub retry_by_kind: HashMap<String, RetryPolicy>,
    /// Lost leases (worker killed, paused or cut off) a job may suffer before it is dead.
    /// Counted apart from handler failures. Default 10.
    pub max_lease_losses: u32,
    /// Attempt records kept per job (newest first). Default 20.
    pub history_len: u32,
    /// How long a finished job stays (idempotency of its key, satisfied gates). Default 7 days.
    pub done_retention: Duration,
    /// How long a dead letter stays before the reaper deletes it. Default 30 days.
    pub dead_retention: Duration,
    /// Redis response timeout. Default 5 s.
    pub response_timeout: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        let lease = Duration::from_secs(30);
        Self {
            namespace: "lf".to_owned(),
            lease,
            renew_every: lease / 3,
            reap_every: Duration::from_secs(5),
            idle_poll: Duration::from_millis(200),
            claim_batch: 64,
            enqueue_chunk: 500,
            shutdown_grace: Duration::from_secs(20),
            default_retry: RetryPolicy::default(),
            retry_by_kind: HashMap::new(),
            max_lease_losses: 10,
            history_len: 20,
            done_retention: Duration::from_secs(7 * 24 * 3600),
            dead_retention: Duration::from_secs(30 * 24 * 3600),
            response_timeout: Duration::from_secs(5),
        }
    }
}

impl QueueConfig {
    /// The default settings under another namespace.
    pub fn with_namespace(namespace: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            ..Self::default()
        }
    }

    /// Sets the lease and derives the renewal period (lease / 3).
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self.renew_every = lease / 3;
        self
    }

    /// The retry policy of a job kind.
    pub fn retry_for(&self, kind: &str) -> &RetryPolicy {
        self.retry_by_kind.get(kind).unwrap_or(&self.default_retry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_capped_and_jittered() {
        let p = RetryPolicy {
            max_attempts: 5,
            base: Duration::from_millis(100),
            cap: Duration::from_millis(1000),
        };
        for attempt in 1..40 {
            let d = p.backoff(attempt);
            let ceiling = (100u64 << (attempt - 1).min(30)).min(1000);
            assert!(d <= Duration::from_millis(ceiling), "{attempt}: {d:?}");
        }
    }
}
