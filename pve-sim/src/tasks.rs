//! Worker tasks: UPIDs in PVE's exact format, the task table with logs and exit status,
//! and the runner that executes a task body on the (scaled) clock. In zero-cost mode
//! (`time_scale` 0) a task runs to its end before its UPID is returned.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use serde_json::{Value, json};

use crate::access::Identity;
use crate::error::{PveError, PveResult};
use crate::state::{Shared, unix_now};
use crate::stats::TaskWork;

pub(crate) struct Task {
    pub upid: String,
    pub node: String,
    pub pid: u32,
    pub pstart: u32,
    pub starttime: u64,
    pub ttype: String,
    pub id: String,
    pub user: String,
    pub tokenid: Option<String>,
    pub log: Vec<String>,
    pub exit: Option<String>,
    pub endtime: Option<u64>,
    /// Moved from the node's `active` file to the task index (archived). A task that ended
    /// stays in the active list, with its status, until the node's next task starts or ends.
    pub saved: bool,
}

impl Task {
    /// The user as the task endpoints report it: a token's tasks show the token's user, the
    /// token id is a separate `tokenid` field (pve-manager `Tasks.pm`, `convert_token_task`).
    pub fn owner(&self) -> &str {
        match &self.tokenid {
            Some(_) => self.user.split_once('!').map_or(&self.user, |(u, _)| u),
            None => &self.user,
        }
    }

    /// Whether `who` may read this task without `Sys.Audit` on the node: a token sees its
    /// own tasks, a user its own and its tokens' tasks.
    pub fn visible_to_owner(&self, who: &Identity) -> bool {
        let caller = who.full();
        match &self.tokenid {
            Some(_) => caller == self.user || caller == self.owner(),
            None => caller == self.user,
        }
    }

    pub fn status_json(&self) -> Value {
        let mut v = json!({
            "upid": self.upid, "node": self.node, "pid": self.pid, "pstart": self.pstart,
            "starttime": self.starttime, "type": self.ttype, "id": self.id, "user": self.owner(),
            "status": if self.exit.is_some() { "stopped" } else { "running" },
        });
        if let Some(e) = &self.exit {
            v["exitstatus"] = json!(e);
        }
        if let Some(t) = &self.tokenid {
            v["tokenid"] = json!(t);
        }
        v
    }

    pub fn list_json(&self) -> Value {
        let mut v = json!({
            "upid": self.upid, "node": self.node, "pid": self.pid, "pstart": self.pstart,
            "starttime": self.starttime, "type": self.ttype, "id": self.id, "user": self.owner(),
        });
        if let Some(t) = &self.tokenid {
            v["tokenid"] = json!(t);
        }
        match &self.exit {
            Some(e) => {
                v["status"] = json!(e);
                v["endtime"] = json!(self.endtime.unwrap_or(self.starttime));
            }
            None => v["status"] = json!("RUNNING"),
        }
        v
    }
}

/// How a task body ended.
pub(crate) enum Outcome {
    Ok,
    Warnings(u32),
    Error(String),
    /// The worker died without a final TASK line.
    Unexpected,
}

/// What a running task body may do.
pub(crate) struct TaskCtx {
    pub app: Arc<Shared>,
    pub upid: String,
    pub factor: f64,
    pub work: TaskWork,
}

impl TaskCtx {
    pub fn log(&self, line: impl Into<String>) {
        let mut st = self.app.state.lock();
        if let Some(t) = st.tasks.get_mut(&self.upid) {
            t.log.push(line.into());
        }
    }

    /// Spends `nominal` simulated seconds (scaled, slowed by a slow-task fault).
    pub async fn spend(&mut self, nominal: f64) {
        self.work.nominal_seconds += nominal;
        if !self.app.zero_cost() && nominal > 0.0 {
            tokio::time::sleep(self.app.wall(nominal * self.factor)).await;
        }
    }
}

pub(crate) fn make_upid(
    node: &str,
    pid: u32,
    pstart: u32,
    starttime: u64,
    ttype: &str,
    id: &str,
    user: &str,
) -> String {
    format!("UPID:{node}:{pid:08X}:{pstart:08X}:{starttime:08X}:{ttype}:{id}:{user}:")
}

/// Parsed UPID fields: (node, type, id, user).
pub(crate) fn parse_upid(upid: &str) -> Option<(String, String, String, String)> {
    let f: Vec<&str> = upid.split(':').collect();
    if f.len() != 9 || f[0] != "UPID" || !f[8].is_empty() {
        return None;
    }
    // pve-common `PVE::UPID::decode` takes hex digits in either case.
    let hex = |s: &str, lens: &[usize]| {
        lens.contains(&s.len()) && s.chars().all(|c| c.is_ascii_hexdigit())
    };
    if !hex(f[2], &[8])
        || !hex(f[3], &[8, 9])
        || !hex(f[4], &[8])
        || f[5].is_empty()
        || f[7].is_empty()
    {
        return None;
    }
    Some((f[1].into(), f[5].into(), f[6].into(), f[7].into()))
}

/// Starts a task on `node` and returns its UPID. `vm` is the VM the task acts on (for the
/// per-VM chains of the lower bound).
pub(crate) async fn start_task<F, Fut>(
    app: &Arc<Shared>,
    node: &str,
    ttype: &str,
    id: &str,
    who: &Identity,
    vm: Option<u32>,
    body: F,
) -> PveResult<String>
where
    F: FnOnce(TaskCtx) -> Fut + Send + 'static,
    Fut: Future<Output = (TaskCtx, Outcome)> + Send + 'static,
{
    let (upid, factor) = {
        let mut st = app.state.lock();
        if st.faults.worker_start_fail() {
            return Err(PveError::internal(
                "got no worker upid - start worker failed",
            ));
        }
        let factor = st.faults.task_factor();
        st.next_pid = st.next_pid.wrapping_add(1 + (st.next_pid % 7));
        let pid = st.next_pid;
        let pstart = st.nodes.get(node).map(|n| n.pstart).unwrap_or(0) + (pid % 1000) * 13;
        let starttime = unix_now();
        let user = who.full();
        let upid = make_upid(node, pid, pstart, starttime, ttype, id, &user);
        st.tasks.insert(
            upid.clone(),
            Task {
                upid: upid.clone(),
                node: node.into(),
                pid,
                pstart,
                starttime,
                ttype: ttype.into(),
                id: id.into(),
                user,
                tokenid: who.token.clone(),
                log: Vec::new(),
                exit: None,
                endtime: None,
                saved: false,
            },
        );
        st.archive_ended(node, None);
        st.task_order.push(upid.clone());
        st.stats.task_started(ttype, Instant::now());
        (upid, factor)
    };
    let ctx = TaskCtx {
        app: app.clone(),
        upid: upid.clone(),
        factor,
        work: TaskWork {
            vm,
            is_clone: ttype == "qmclone",
            ..TaskWork::default()
        },
    };
    let ttype = ttype.to_string();
    let run = async move {
        let (ctx, outcome) = body(ctx).await;
        let mut st = ctx.app.state.lock();
        let (exit, key, last) = match outcome {
            Outcome::Ok => ("OK".to_string(), "ok", Some("TASK OK".to_string())),
            Outcome::Warnings(n) => (
                format!("WARNINGS: {n}"),
                "warnings",
                Some(format!("TASK WARNINGS: {n}")),
            ),
            Outcome::Error(e) => {
                let flat = e.trim_end().replace('\n', " ");
                (flat.clone(), "error", Some(format!("TASK ERROR: {flat}")))
            }
            Outcome::Unexpected => ("unexpected status".to_string(), "unexpected", None),
        };
        if let Some(t) = st.tasks.get_mut(&ctx.upid) {
            if let Some(l) = last {
                t.log.push(l);
            }
            t.exit = Some(exit);
            t.endtime = Some(unix_now());
        }
        let node = st.tasks.get(&ctx.upid).map(|t| t.node.clone());
        if let Some(node) = node {
            st.archive_ended(&node, Some(&ctx.upid));
        }
        st.stats.task_ended(&ttype, key, Instant::now(), ctx.work);
    };
    if app.zero_cost() {
        run.await;
    } else {
        tokio::spawn(run);
    }
    Ok(upid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upid_format_round_trips() {
        let u = make_upid(
            "pve1",
            0x35D677,
            0x3AB00C3,
            0x66DC5987,
            "qmclone",
            "132",
            "root@pam!labfleet",
        );
        assert_eq!(
            u,
            "UPID:pve1:0035D677:03AB00C3:66DC5987:qmclone:132:root@pam!labfleet:"
        );
        let (node, t, id, user) = parse_upid(&u).unwrap();
        assert_eq!(
            (node.as_str(), t.as_str(), id.as_str(), user.as_str()),
            ("pve1", "qmclone", "132", "root@pam!labfleet")
        );
        assert!(parse_upid("UPID:pve1:1:2:3:x:1:u:").is_none());
        assert!(parse_upid(&u.to_lowercase().replace("upid:", "UPID:")).is_some());
    }
}
