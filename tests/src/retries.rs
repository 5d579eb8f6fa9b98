//! Retry timing for tests: the workers' retry policies with their backoff scaled down, so
//! a retried job comes back in tens of milliseconds instead of seconds.

use std::time::Duration;

use shared::queue::QueueConfig;

/// Every kind's backoff from 50 ms, capped at 500 ms (attempt budgets unchanged).
pub fn fast(q: &mut QueueConfig) {
    for p in q.retry_by_kind.values_mut() {
        p.base = Duration::from_millis(50);
        p.cap = Duration::from_millis(500);
    }
}
