//! Waiting for a condition with a deadline instead of sleeping (omicron's
//! `wait_for_condition`).

use std::future::Future;
use std::time::Duration;

/// Polls `cond` every 50 ms until it returns true; panics with `what` after `deadline`.
pub async fn wait_for<F, Fut>(deadline: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if cond().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "timed out after {deadline:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
