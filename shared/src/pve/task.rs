//! Tasks: status, log, and [`PveClient::wait_task`].
//!
//! A mutating call returns a UPID; the work runs in a worker process on the UPID's node.
//! `wait_task` watches the node's active task list through the client's task watcher
//! (`watch.rs`; one listing per node per interval for all waiters, the interval short
//! first, then half the task's age so far, up to a cap) and reads the task's own status
//! only when it has left the list; it honours a deadline and a cancellation token, and
//! turns the exit status into [`TaskOutcome`] or [`PveError::TaskFailed`] with the log's
//! last lines. Polls are counted separately ([`super::RequestCounts::polls`]).

use std::time::Duration;

use reqwest::Method;
use serde::Deserialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::client::{Params, PveClient, RequestKind, decode, seg};
use super::error::{ErrorClass, PveError};
use super::lenient;
use super::upid::Upid;
use super::watch::Verdict;

/// Lines of the task log kept in [`PveError::TaskFailed`].
pub const LOG_TAIL_LINES: u64 = 20;
/// A just-started task may briefly be unknown ("no such task"); tolerated this many polls.
const UNKNOWN_TASK_POLLS: u32 = 5;
/// Consecutive transient poll failures (595, connection reset...) tolerated.
const TRANSIENT_POLL_FAILURES: u32 = 5;

/// `GET /nodes/{node}/tasks/{upid}/status`
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct TaskStatus {
    /// `running` or `stopped`.
    pub status: String,
    /// Only when stopped: `OK`, `WARNINGS: n`, or the error text.
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub exitstatus: Option<String>,
    #[serde(rename = "type", default)]
    pub task_type: String,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub id: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub user: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub starttime: Option<u64>,
}

impl TaskStatus {
    pub fn is_running(&self) -> bool {
        self.status == "running"
    }
}

/// One line of `GET /nodes/{node}/tasks/{upid}/log`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct TaskLogLine {
    #[serde(deserialize_with = "lenient::u64_")]
    pub n: u64,
    #[serde(default)]
    pub t: String,
}

/// How a task that ended successfully ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskOutcome {
    Ok,
    /// `WARNINGS: n`: done, with n warnings in the log.
    Warnings(u32),
}

/// How [`PveClient::wait_task`] waits.
#[derive(Debug, Clone)]
pub struct WaitOptions {
    /// Give up with [`PveError::TaskTimeout`] after this instant (the task keeps running).
    pub deadline: Option<Instant>,
    /// Stop waiting with [`PveError::Cancelled`] when cancelled (the task keeps running).
    pub cancel: CancellationToken,
    pub initial_poll: Duration,
    pub max_poll: Duration,
}

impl Default for WaitOptions {
    /// No deadline, polls from 250 ms apart growing with the task's age to 2 s.
    fn default() -> Self {
        WaitOptions {
            deadline: None,
            cancel: CancellationToken::new(),
            initial_poll: Duration::from_millis(250),
            max_poll: Duration::from_secs(2),
        }
    }
}

impl WaitOptions {
    pub fn with_timeout(timeout: Duration, cancel: CancellationToken) -> Self {
        WaitOptions {
            deadline: Some(Instant::now() + timeout),
            cancel,
            ..WaitOptions::default()
        }
    }
}

/// Interprets a stopped task's exit status: `Ok(outcome)` or `Err(error text)`.
pub fn parse_exitstatus(exitstatus: &str) -> Result<TaskOutcome, &str> {
    let s = exitstatus.trim();
    if s == "OK" {
        return Ok(TaskOutcome::Ok);
    }
    if let Some(n) = s.strip_prefix("WARNINGS:") {
        return Ok(TaskOutcome::Warnings(n.trim().parse().unwrap_or(1)));
    }
    Err(s)
}

fn task_path(upid: &Upid, what: &str) -> String {
    format!(
        "/nodes/{}/tasks/{}/{what}",
        seg(upid.node()),
        seg(upid.as_str())
    )
}

impl PveClient {
    /// `GET /nodes/{node}/tasks/{upid}/status` (asked on the UPID's node).
    pub async fn task_status(&self, upid: &Upid) -> Result<TaskStatus, PveError> {
        self.task_status_as(upid, RequestKind::Other).await
    }

    async fn task_status_as(&self, upid: &Upid, kind: RequestKind) -> Result<TaskStatus, PveError> {
        let path = task_path(upid, "status");
        let env = self
            .request(Method::GET, &path, &Params::new(), kind)
            .await?;
        decode(&path, env.data)
    }

    /// `GET /nodes/{node}/tasks/{upid}/log?start=&limit=`, with the envelope's `total`.
    pub async fn task_log(
        &self,
        upid: &Upid,
        start: u64,
        limit: u64,
    ) -> Result<(Vec<TaskLogLine>, Option<u64>), PveError> {
        self.task_log_as(upid, start, limit, RequestKind::Other)
            .await
    }

    async fn task_log_as(
        &self,
        upid: &Upid,
        start: u64,
        limit: u64,
        kind: RequestKind,
    ) -> Result<(Vec<TaskLogLine>, Option<u64>), PveError> {
        let path = task_path(upid, "log");
        let env = self
            .request(
                Method::GET,
                &path,
                &Params::new().num("start", start).num("limit", limit),
                kind,
            )
            .await?;
        Ok((decode(&path, env.data)?, env.total))
    }

    /// The last `lines` lines of a task's log.
    pub async fn task_log_tail(&self, upid: &Upid, lines: u64) -> Result<Vec<String>, PveError> {
        // The first page tells the total; ask again from the end only if it was not all.
        let (first, total) = self.task_log_as(upid, 0, lines, RequestKind::Poll).await?;
        let lines_of = |v: Vec<TaskLogLine>| v.into_iter().map(|l| l.t).collect::<Vec<_>>();
        match total {
            Some(total) if total > lines => {
                let (tail, _) = self
                    .task_log_as(upid, total - lines, lines, RequestKind::Poll)
                    .await?;
                Ok(lines_of(tail))
            }
            _ => Ok(lines_of(first)),
        }
    }

    /// Waits until the task stops. `Ok` for `OK` and `WARNINGS: n`; otherwise
    /// [`PveError::TaskFailed`] with the exit status and the last [`LOG_TAIL_LINES`] log
    /// lines. [`PveError::TaskTimeout`] past the deadline, [`PveError::Cancelled`] on
    /// cancellation; in both cases the task itself keeps running on the server.
    ///
    /// The wait goes through the client's task watcher (module `watch`): one listing of
    /// the node's active tasks per interval, shared by all waiters on that node, and this
    /// task's own status read only once it has left the list. A node that refuses the
    /// listing is waited on by polling this task's status.
    pub async fn wait_task(
        &self,
        upid: &Upid,
        opts: &WaitOptions,
    ) -> Result<TaskOutcome, PveError> {
        let watch = self.watcher().node(upid.node());
        if watch.unsupported() {
            return self.poll_task(upid, opts).await;
        }
        let first = opts.initial_poll.max(Duration::from_millis(10));
        let started = Instant::now();
        let mut status_reads = 0u32;
        let mut transient_failures = 0u32;
        let mut next_check = None;
        loop {
            if opts.cancel.is_cancelled() {
                return Err(PveError::Cancelled);
            }
            if opts.deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(PveError::TaskTimeout {
                    upid: Box::new(upid.clone()),
                });
            }
            let mut reg = watch.register(self, upid, started, first, opts.max_poll, next_check);
            let deadline = opts.deadline;
            // The watcher answers every waiter at least every `max_poll`; past this, read
            // the status anyway (a listing stuck in a slow request must not stall waits).
            let stalled = opts.max_poll.max(first) * 3 + Duration::from_secs(10);
            let verdict = tokio::select! {
                biased;
                _ = opts.cancel.cancelled() => return Err(PveError::Cancelled),
                _ = tokio::time::sleep(stalled) => Verdict::CheckStatus,
                _ = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                } => continue,
                v = &mut reg.rx => v.unwrap_or(Verdict::CheckStatus),
            };
            drop(reg);
            let exit = match verdict {
                Verdict::Ended(exit) => exit,
                Verdict::CheckStatus => {
                    if watch.unsupported() {
                        return self.poll_task(upid, opts).await;
                    }
                    status_reads += 1;
                    match self.task_status_as(upid, RequestKind::Poll).await {
                        Ok(s) if !s.is_running() => s
                            .exitstatus
                            .unwrap_or_else(|| "unexpected status".to_owned()),
                        Ok(_) => {
                            // Running but not listed (a cut list, or listed a moment late).
                            transient_failures = 0;
                            let now = Instant::now();
                            next_check = Some(
                                now + super::watch::interval_for(
                                    now - started,
                                    first,
                                    opts.max_poll,
                                ),
                            );
                            continue;
                        }
                        Err(e)
                            if status_reads <= UNKNOWN_TASK_POLLS
                                && matches!(
                                    e.class(),
                                    ErrorClass::NotFound | ErrorClass::Param
                                ) =>
                        {
                            next_check = Some(Instant::now() + first);
                            continue;
                        }
                        Err(e)
                            if e.is_transient() && transient_failures < TRANSIENT_POLL_FAILURES =>
                        {
                            transient_failures += 1;
                            tracing::debug!(upid = %upid, error = %e, "task status read failed; retrying");
                            next_check = Some(Instant::now() + first);
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                }
            };
            return self.task_outcome(upid, &exit).await;
        }
    }

    /// A stopped task's outcome from its exit status; a failure carries the log's tail.
    async fn task_outcome(&self, upid: &Upid, exit: &str) -> Result<TaskOutcome, PveError> {
        match parse_exitstatus(exit) {
            Ok(outcome) => Ok(outcome),
            Err(text) => {
                let log_tail = self
                    .task_log_tail(upid, LOG_TAIL_LINES)
                    .await
                    .unwrap_or_default();
                Err(PveError::task_failed(upid, text, log_tail))
            }
        }
    }

    /// Waits by polling this task's status alone (for nodes that refuse the task listing).
    async fn poll_task(&self, upid: &Upid, opts: &WaitOptions) -> Result<TaskOutcome, PveError> {
        let first = opts.initial_poll.max(Duration::from_millis(10));
        let started = Instant::now();
        let mut polls = 0u32;
        let mut transient_failures = 0u32;
        loop {
            if opts.cancel.is_cancelled() {
                return Err(PveError::Cancelled);
            }
            polls += 1;
            let status = tokio::select! {
                biased;
                _ = opts.cancel.cancelled() => return Err(PveError::Cancelled),
                s = self.task_status_as(upid, RequestKind::Poll) => s,
            };
            match status {
                Ok(s) if !s.is_running() => {
                    let exit = s
                        .exitstatus
                        .unwrap_or_else(|| "unexpected status".to_owned());
                    return self.task_outcome(upid, &exit).await;
                }
                Ok(_) => transient_failures = 0,
                // Right after the start the task may not be visible yet (bpg retries too).
                Err(e)
                    if polls <= UNKNOWN_TASK_POLLS
                        && matches!(e.class(), ErrorClass::NotFound | ErrorClass::Param) => {}
                Err(e) if e.is_transient() && transient_failures < TRANSIENT_POLL_FAILURES => {
                    transient_failures += 1;
                    tracing::debug!(upid = %upid, error = %e, "task poll failed; retrying");
                }
                Err(e) => return Err(e),
            }
            let now = Instant::now();
            // The next poll comes after half the time the task has run so far, within
            // [initial_poll, max_poll]: an ended task is seen at most half its run time
            // late. A job holds its node and storage slots until it sees its task end.
            let mut wake = now + super::watch::interval_for(now - started, first, opts.max_poll);
            if let Some(deadline) = opts.deadline {
                if now >= deadline {
                    return Err(PveError::TaskTimeout {
                        upid: Box::new(upid.clone()),
                    });
                }
                wake = wake.min(deadline);
            }
            tokio::select! {
                biased;
                _ = opts.cancel.cancelled() => return Err(PveError::Cancelled),
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses() {
        assert_eq!(parse_exitstatus("OK"), Ok(TaskOutcome::Ok));
        assert_eq!(
            parse_exitstatus("WARNINGS: 3"),
            Ok(TaskOutcome::Warnings(3))
        );
        assert_eq!(
            parse_exitstatus("clone failed: can't lock file 'x' - got timeout"),
            Err("clone failed: can't lock file 'x' - got timeout")
        );
        assert_eq!(
            parse_exitstatus("unexpected status"),
            Err("unexpected status")
        );
    }

    #[test]
    fn task_json_decodes() {
        let s: TaskStatus = serde_json::from_str(
            r#"{"status":"stopped","exitstatus":"OK","type":"qmclone","id":"9000","user":"root@pam","starttime":1725716871,"pid":12,"upid":"x"}"#,
        )
        .unwrap();
        assert!(!s.is_running());
        let l: Vec<TaskLogLine> =
            serde_json::from_str(r#"[{"n":1,"t":"create linked clone"},{"n":"2","t":"TASK OK"}]"#)
                .unwrap();
        assert_eq!(l[1].n, 2);
    }
}
