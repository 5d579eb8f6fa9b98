//! Lost replies: a call Proxmox may have run although its answer never reached us.
//!
//! pveproxy answers `596` when its proxy timeout passes while pvedaemon (or the node it
//! proxied to) carries on; a connection dropped after the request was sent, a request
//! timeout, a `502`-`504` from a proxy in front, or a `595`/`597`-`599` leave the same
//! doubt. A handler that gets one of these must not act as if nothing happened: a clone
//! may be running, a config may be written, a destroy may be under way.
//!
//! This module owns that doubt: [`may_have_run`] says which errors carry it (by variant,
//! never by text), and [`find_clone`] / [`find_task`] look for the task the call started in
//! the node's task list (`GET /nodes/{node}/tasks` with `vmid`, `typefilter`, `since`, as
//! Proxmox serves it). It decides nothing about retries or clean-up: the job modules do.

use chrono::{DateTime, Utc};

use crate::pve::{ConnectFailure, PveClient, PveError, TaskQuery, TaskSource, Upid};

/// How far the server's clock may be behind ours when we filter its tasks by start time.
const CLOCK_SKEW_SECS: i64 = 15;

/// At most this many candidate tasks are read; more than that and the search is undecided.
const MAX_CANDIDATES: u64 = 200;

/// A call whose reply was lost starts its task within this long of being sent (pveproxy's
/// 30 s proxy timeout, plus a queue at pvedaemon's workers): a clone started later that
/// names no volume yet is not taken for ours.
const LATE_START_SECS: i64 = 90;

/// Whether a failed call may nevertheless have run on Proxmox: no answer after the request
/// was sent (reset, closed, timed out), or a proxy's error in place of the answer.
/// A refused connection or a name that did not resolve never reached Proxmox.
pub fn may_have_run(e: &PveError) -> bool {
    match e {
        PveError::Connect { kind, .. } => *kind == ConnectFailure::Other,
        PveError::Timeout { .. } => true,
        PveError::Proxy { status, .. } => (595..=599).contains(status),
        PveError::Server { status, .. } => (502..=504).contains(status),
        _ => false,
    }
}

/// What the task list says about a clone whose reply was lost.
#[derive(Debug, Clone, PartialEq)]
pub enum CloneSearch {
    /// The clone's task: its log names a volume of the new VMID (`vm-<newid>-disk-N`).
    Found { upid: Upid, running: bool },
    /// A clone from the same source still runs and names no volume yet (it waits for a
    /// lock): it may be ours, so nothing may be retried or cleaned until it does.
    Undecided,
    /// No clone from that source since then is, or may be, ours.
    NotFound,
}

/// Looks for the clone of `source_vmid` on `source_node` into `newid` among the `qmclone`
/// tasks started since `since` (less [`CLOCK_SKEW_SECS`]).
pub async fn find_clone(
    pve: &PveClient,
    source_node: &str,
    source_vmid: u32,
    newid: u32,
    since: DateTime<Utc>,
) -> Result<CloneSearch, PveError> {
    let list = pve
        .node_tasks(
            source_node,
            &TaskQuery {
                source: TaskSource::All,
                vmid: Some(source_vmid),
                typefilter: Some("qmclone".into()),
                since: Some(since.timestamp() - CLOCK_SKEW_SECS),
                limit: Some(MAX_CANDIDATES),
                ..TaskQuery::default()
            },
        )
        .await?;
    let mut undecided = list.total.is_some_and(|t| t > MAX_CANDIDATES);
    let mut ended = None;
    let mut tasks = list.tasks;
    // Newest first: the newest ended task naming `newid` is the one that counts, so once
    // it is known, older ended tasks (most of a busy template's) are not read at all.
    tasks.sort_by_key(|t| std::cmp::Reverse(t.starttime.unwrap_or(0)));
    for t in tasks {
        let Ok(upid) = t.upid.parse::<Upid>() else {
            continue;
        };
        let running = t.exitstatus().is_none();
        if !running && ended.is_some() {
            continue;
        }
        let late = t
            .starttime
            .is_some_and(|s| s as i64 > since.timestamp() + LATE_START_SECS);
        let named = disk_owners(pve, &upid, running).await?;
        if named.contains(&newid) {
            // Two calls into one VMID (the first one's reply lost) make two tasks: the one
            // still running is the one that matters.
            if running {
                return Ok(CloneSearch::Found { upid, running });
            }
            ended = Some(upid);
            continue;
        }
        if running && !late && named.is_empty() {
            undecided = true;
        }
    }
    Ok(match ended {
        _ if undecided => CloneSearch::Undecided,
        Some(upid) => CloneSearch::Found {
            upid,
            running: false,
        },
        None => CloneSearch::NotFound,
    })
}

/// The VMIDs whose disks a clone task's log names, read once per process when decided.
async fn disk_owners(pve: &PveClient, upid: &Upid, running: bool) -> Result<Vec<u32>, PveError> {
    let key = (pve.base_url().to_owned(), upid.to_string());
    if let Some(named) = DECIDED_LOGS.get(&key) {
        return Ok(named);
    }
    let (lines, _) = pve.task_log(upid, 0, 0).await?;
    let named: Vec<u32> = lines.iter().filter_map(|l| vm_disk_owner(&l.t)).collect();
    // An ended task's log is final, and a running clone that names a volume has named
    // the VM it makes; a running one that names none yet is read again next time.
    if !running || !named.is_empty() {
        DECIDED_LOGS.put(key, named.clone());
    }
    Ok(named)
}

/// Clone task logs already read whose answer cannot change, by API URL and UPID: the
/// searches of lost clones from one template (a class cloning it) read the same tasks,
/// each of which costs a request that may fail.
static DECIDED_LOGS: DecidedLogs = DecidedLogs(std::sync::Mutex::new(None));

/// At most this many logs are remembered; past it the memory starts again.
const DECIDED_LOGS_MAX: usize = 4096;

type LogKey = (String, String);

struct DecidedLogs(std::sync::Mutex<Option<std::collections::HashMap<LogKey, Vec<u32>>>>);

impl DecidedLogs {
    fn get(&self, key: &LogKey) -> Option<Vec<u32>> {
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.as_ref().and_then(|m| m.get(key).cloned())
    }

    fn put(&self, key: LogKey, named: Vec<u32>) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let m = m.get_or_insert_with(Default::default);
        if m.len() >= DECIDED_LOGS_MAX {
            m.clear();
        }
        m.insert(key, named);
    }
}

/// Which tasks [`find_task`] looks among.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tasks {
    /// Every one: the task a call whose reply was lost started (a destroy, a start).
    Any,
    /// Those running or ended `OK`/`WARNINGS`: the destroy that removed a VM, when a later
    /// destroy of ours found it already gone and failed.
    Ran,
}

/// The newest task of `typefilter` for `vmid` on `node` started since `since` (less
/// [`CLOCK_SKEW_SECS`]) among `which`, with whether it still runs, when the VMID's tasks
/// are ours alone.
pub async fn find_task(
    pve: &PveClient,
    node: &str,
    vmid: u32,
    typefilter: &str,
    since: DateTime<Utc>,
    which: Tasks,
) -> Result<Option<(Upid, bool)>, PveError> {
    let list = pve
        .node_tasks(
            node,
            &TaskQuery {
                source: TaskSource::All,
                vmid: Some(vmid),
                typefilter: Some(typefilter.into()),
                since: Some(since.timestamp() - CLOCK_SKEW_SECS),
                limit: Some(50),
                ..TaskQuery::default()
            },
        )
        .await?;
    Ok(list
        .tasks
        .into_iter()
        .filter(|t| {
            which == Tasks::Any
                || t.exitstatus()
                    .is_none_or(|e| crate::pve::parse_exitstatus(e).is_ok())
        })
        .filter_map(|t| {
            let running = t.exitstatus().is_none();
            let upid = t.upid.parse::<Upid>().ok()?;
            Some((upid, running, t.starttime.unwrap_or(0)))
        })
        .max_by_key(|(_, _, start)| *start)
        .map(|(u, r, _)| (u, r)))
}

/// The VMID a log line names a disk of (`vm-123-disk-0`, `base-100-disk-0/vm-123-disk-0`).
pub fn vm_disk_owner(line: &str) -> Option<u32> {
    let mut rest = line;
    while let Some(i) = rest.find("vm-") {
        let before = rest[..i].chars().next_back();
        let after = &rest[i + 3..];
        let digits: String = after.chars().take_while(|c| c.is_ascii_digit()).collect();
        let starts_word = before.is_none_or(|c| !c.is_ascii_alphanumeric() && c != '-');
        if starts_word
            && !digits.is_empty()
            && after[digits.len()..].starts_with("-disk-")
            && let Ok(id) = digits.parse()
        {
            return Some(id);
        }
        rest = after;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_owners_are_read_from_log_lines() {
        assert_eq!(
            vm_disk_owner("  Logical volume \"vm-123-disk-0\" created."),
            Some(123)
        );
        assert_eq!(
            vm_disk_owner("Could not remove disk 'local-lvm:vm-4007-disk-1', check manually"),
            Some(4007)
        );
        assert_eq!(
            vm_disk_owner("create linked clone of drive scsi0 (ceph-vm:base-120-disk-0)"),
            None
        );
        assert_eq!(
            vm_disk_owner("ceph-vm:base-120-disk-0/vm-130-disk-0"),
            Some(130)
        );
        assert_eq!(vm_disk_owner("nvm-12-disk-0"), None);
    }

    #[test]
    fn only_errors_without_a_real_answer_may_hide_a_call_that_ran() {
        let proxy = |status| PveError::Proxy {
            status,
            message: "Connection timed out".into(),
        };
        let server = |status| PveError::Server {
            status,
            message: "x".into(),
            transient: true,
        };
        let connect = |kind| PveError::Connect {
            kind,
            url: "https://127.0.0.1:8006".into(),
            message: "x".into(),
        };
        assert!(may_have_run(&proxy(596)));
        assert!(may_have_run(&proxy(595)));
        assert!(may_have_run(&server(502)));
        assert!(may_have_run(&server(504)));
        assert!(!may_have_run(&server(500)));
        assert!(may_have_run(&connect(ConnectFailure::Other)));
        assert!(!may_have_run(&connect(ConnectFailure::Refused)));
        assert!(!may_have_run(&connect(ConnectFailure::Dns)));
        assert!(may_have_run(&PveError::Timeout {
            method: "POST".into(),
            path: "/x".into()
        }));
    }
}
