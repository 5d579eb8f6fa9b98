//! Each job kind's retry policy: how many attempts and how long a backoff. It belongs to the
//! kinds, so the producer (which enqueues) and the worker (which retries) read the same one.

use std::time::Duration;

use crate::queue::{QueueConfig, RetryPolicy};

use super::KINDS;

/// The queue settings labfleet's jobs use: retry policies per kind.
pub fn queue_config() -> QueueConfig {
    let mut q = QueueConfig::with_namespace("lf");
    // Attempts are spent only on errors (a lost lease or a hand-back spends none), and only
    // transient ones are retried. The budgets are sized for a flaky cluster: with 20% of
    // all Proxmox requests failing plus lock timeouts and clones dying half way (the
    // reliability test's rates), a clone attempt succeeds about half the time, and 10
    // attempts left about 1 clone in 800 dead (seen once in the 300-VM run); 20 leave
    // about 1 in 700,000. In time: ~5 min of backoff for quick kinds, ~14 min for clones,
    // during which `status` shows the VM retrying with its last error.
    let quick = RetryPolicy {
        max_attempts: 16,
        base: Duration::from_millis(500),
        cap: Duration::from_secs(30),
    };
    // Clones meet lock timeouts under load: longer backoff.
    let clone = RetryPolicy {
        max_attempts: 20,
        base: Duration::from_secs(1),
        cap: Duration::from_secs(60),
    };
    for k in KINDS {
        q.retry_by_kind.insert((*k).to_owned(), quick.clone());
    }
    q.retry_by_kind.insert("clone".into(), clone.clone());
    q.retry_by_kind.insert("destroy".into(), clone);
    q
}
