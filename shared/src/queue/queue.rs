//! `Queue`: typed async operations over the Lua scripts. No apalis types here; the worker glue
//! (`backend`, `layer`) and the producer both use this. One file: every method is a call of
//! one script over the same keys and shares its encoding of replies; splitting it would
//! split that protocol across files.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use redis::{AsyncCommands, FromRedisValue, Script};
use serde::Deserialize;

use super::config::QueueConfig;
use super::connection::RedisConn;
use super::error::QueueError;
use super::keys::Keys;
use super::scripts::{self, FencedScript};
use super::spec::{Enqueued, JobSpec, WireSpec};
use super::stats::{GroupStats, QueueStats, SlotStats};

/// A handle on one queue (one namespace) in Redis. Cheap to clone; every clone shares one
/// multiplexed connection that reconnects by itself (to the same server, or to the master the
/// sentinels name: see `RedisConn`).
#[derive(Clone)]
pub struct Queue {
    conn: RedisConn,
    keys: Arc<Keys>,
    config: Arc<QueueConfig>,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("namespace", &self.config.namespace)
            .finish_non_exhaustive()
    }
}

/// One job taken by `claim`: the in-flight record is in Redis already.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedJob {
    /// Job key (id).
    pub key: String,
    /// Lease token of this claim; every settle and fenced write must carry it.
    pub token: String,
    /// Attempt number (1-based; lost leases do not count).
    pub attempt: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// Leases lost so far.
    pub lease_losses: u32,
    /// Job kind.
    pub kind: String,
    /// Payload as stored (JSON text).
    pub payload: String,
    /// Group, if any.
    pub group: Option<String>,
    /// When the job was enqueued (ms since the epoch, Redis' clock).
    pub created_at: i64,
}

/// The answer of one `claim` call.
#[derive(Debug, Clone, Default)]
pub struct Claim {
    /// Jobs now leased to the caller.
    pub jobs: Vec<ClaimedJob>,
    /// If nothing was claimed: when the next scheduled job falls due.
    pub next_due: Option<Duration>,
}

/// What a settle call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Acked: the job is done.
    Done,
    /// Failed and scheduled for another attempt.
    Rescheduled,
    /// Failed for good: moved to the dead letters.
    Dead,
    /// Handed back without spending an attempt.
    Released,
    /// This token already settled the job (a replay after a lost reply).
    AlreadyApplied,
    /// The token is no longer current; nothing changed.
    Stale,
}

/// What one reaper sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReapReport {
    /// Expired leases put back in line.
    pub requeued: u64,
    /// Expired leases that used up `max_lease_losses`.
    pub dead: u64,
    /// Jobs whose kept slots were freed because they were not re-delivered in time.
    pub slots_freed: u64,
    /// Dead letters deleted after `dead_retention`.
    pub purged: u64,
}

/// How a failed attempt settles (see [`Queue::fail`]).
#[derive(Debug, Clone, Copy)]
pub struct FailOutcome<'a> {
    /// The error, kept as the job's `last_error` and in its history.
    pub error: &'a str,
    /// Retried (until its attempts are spent) or dead-lettered at once.
    pub retryable: bool,
    /// Backoff before the retry.
    pub delay: Duration,
    /// Keep the job's concurrency slots: its outside work may still run.
    pub keep_slots: bool,
}

impl<'a> FailOutcome<'a> {
    /// A retryable failure, slots released.
    pub fn retry(error: &'a str, delay: Duration) -> Self {
        FailOutcome {
            error,
            retryable: true,
            delay,
            keep_slots: false,
        }
    }

    /// A failure for good.
    pub fn permanent(error: &'a str) -> Self {
        FailOutcome {
            error,
            retryable: false,
            delay: Duration::ZERO,
            keep_slots: false,
        }
    }
}

/// One attempt in a job's history (newest first, `history_len` kept).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct AttemptRecord {
    /// Attempt number.
    pub attempt: f64,
    /// `failed` or `lease_lost`.
    pub outcome: String,
    /// The error text.
    pub error: String,
    /// Worker id of the claim.
    #[serde(default)]
    pub worker: Option<String>,
    /// Claim time, ms since the Unix epoch (Redis clock).
    #[serde(default)]
    pub started_at: Option<f64>,
    /// When the attempt ended, ms since the Unix epoch (Redis clock).
    pub ended_at: f64,
}

/// One job as stored, for `status`, dead-letter listings and tests.
#[derive(Debug, Clone, PartialEq)]
pub struct JobInfo {
    /// Job key.
    pub key: String,
    /// `ready`, `scheduled`, `gated`, `waiting`, `running`, `done`, `dead` or `cancelled`.
    pub state: String,
    /// Job kind.
    pub kind: String,
    /// Payload JSON text.
    pub payload: String,
    /// Attempts spent (including a running one).
    pub attempts: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// Leases lost.
    pub lease_losses: u32,
    /// Group, if any.
    pub group: Option<String>,
    /// Worker of the last claim.
    pub worker: Option<String>,
    /// Last error.
    pub last_error: Option<String>,
    /// Predecessors still open (gated jobs).
    pub gate_pending: u32,
    /// Attempt history, newest first.
    pub history: Vec<AttemptRecord>,
}

fn ms(d: Duration) -> String {
    d.as_millis().to_string()
}

impl Queue {
    /// Connects (5 s response timeout by default; reconnects by itself afterwards). `url` is
    /// `redis://`, `rediss://` or `redis+sentinel://` / `rediss+sentinel://` (`RedisTarget`).
    pub async fn connect(url: &str, config: QueueConfig) -> Result<Self, QueueError> {
        let conn = RedisConn::connect(url, config.response_timeout).await?;
        Ok(Self {
            conn,
            keys: Arc::new(Keys::new(&config.namespace)),
            config: Arc::new(config),
        })
    }

    /// The settings this handle was made with.
    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    /// A key in this queue's hash slot (`{ns}:<suffix>`), for records the pipeline writes
    /// with `Lease::hset_fenced` or in its own scripts.
    pub fn key(&self, suffix: &str) -> String {
        self.keys.key(suffix)
    }

    /// Deletes every key of this queue's namespace, labfleet's records in it included (the
    /// demo's throwaway namespace at its end). Returns how many keys went.
    pub async fn delete_namespace(&self) -> Result<u64, QueueError> {
        let mut c = self.connection();
        // Every key of the namespace starts with its hash tag (`{ns}`).
        let pattern = glob_prefix(&self.key(""));
        let mut cursor: u64 = 0;
        let mut deleted = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut c)
                .await?;
            if !keys.is_empty() {
                let n: u64 = redis::cmd("DEL").arg(&keys).query_async(&mut c).await?;
                deleted += n;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }

    /// The shared connection, for the caller's own reads.
    pub fn connection(&self) -> RedisConn {
        self.conn.clone()
    }

    async fn eval<T: FromRedisValue>(
        &self,
        script: &Script,
        args: impl IntoIterator<Item = String>,
    ) -> Result<T, QueueError> {
        let mut inv = script.prepare_invoke();
        inv.key(self.keys.ready()).arg(self.keys.prefix());
        for a in args {
            inv.arg(a);
        }
        let mut conn = self.conn.clone();
        Ok(inv.invoke_async(&mut conn).await?)
    }

    fn wire(&self, specs: &[JobSpec]) -> Result<String, QueueError> {
        let mut wire = Vec::with_capacity(specs.len());
        for s in specs {
            let bad = |reason| QueueError::InvalidSpec {
                key: s.key.clone(),
                reason,
            };
            if s.key.is_empty() || s.key.contains('\n') {
                return Err(bad("key must be non-empty and single-line"));
            }
            if s.slot_keys.iter().any(|k| k.is_empty() || k.contains('\n')) {
                return Err(bad("slot keys must be non-empty and single-line"));
            }
            if s.gate.iter().any(|g| g == &s.key) {
                return Err(bad("a job cannot gate on itself"));
            }
            let mut gate: Vec<&str> = s.gate.iter().map(String::as_str).collect();
            gate.sort_unstable();
            gate.dedup();
            let mut slots: Vec<&str> = s.slot_keys.iter().map(String::as_str).collect();
            slots.sort_unstable();
            slots.dedup();
            wire.push(WireSpec {
                k: &s.key,
                kind: &s.kind,
                p: serde_json::to_string(&s.payload).map_err(|source| QueueError::Payload {
                    key: s.key.clone(),
                    source,
                })?,
                m: s.max_attempts
                    .unwrap_or_else(|| self.config.retry_for(&s.kind).max_attempts)
                    .max(1),
                ml: self.config.max_lease_losses.max(1),
                d: s.run_after.map_or(0, |d| d.as_millis() as u64),
                g: s.group.as_deref().unwrap_or(""),
                gate,
                s: slots,
                f: s.forget_when_done,
            });
        }
        serde_json::to_string(&wire).map_err(|source| QueueError::Payload {
            key: String::new(),
            source,
        })
    }

    /// Enqueues one job.
    pub async fn enqueue(&self, spec: &JobSpec) -> Result<Enqueued, QueueError> {
        Ok(self.enqueue_batch(std::slice::from_ref(spec)).await?[0])
    }

    /// Enqueues many jobs, `enqueue_chunk` per atomic script call. Idempotent by key, so a
    /// call that failed or timed out half-way is resumed by calling it again with the same
    /// specs: what was written answers `Existing`. Returns one result per spec, in order.
    pub async fn enqueue_batch(&self, specs: &[JobSpec]) -> Result<Vec<Enqueued>, QueueError> {
        let chunk = self.config.enqueue_chunk.max(1);
        let wires = specs
            .chunks(chunk)
            .map(|c| self.wire(c))
            .collect::<Result<Vec<_>, _>>()?;
        let results: Vec<Vec<i64>> = futures::stream::iter(wires)
            .map(|w| async move { self.eval::<Vec<i64>>(&scripts::ENQUEUE, [w]).await })
            .buffered(4)
            .try_collect()
            .await?;
        Ok(results
            .into_iter()
            .flatten()
            .map(|r| {
                if r == 1 {
                    Enqueued::Created
                } else {
                    Enqueued::Existing
                }
            })
            .collect())
    }

    /// Claims up to `max` ready jobs for `worker`, each with its concurrency keys acquired,
    /// its attempt counted and a fresh lease token. Jobs whose keys are full are parked in
    /// place (no attempt spent) and skipped.
    pub async fn claim(&self, worker: &str, max: usize) -> Result<Claim, QueueError> {
        type Row = (String, String, u32, u32, u32, String, String, String, i64);
        let token_prefix = uuid::Uuid::new_v4().simple().to_string();
        let (hint, rows): (i64, Vec<Row>) = self
            .eval(
                &scripts::CLAIM,
                [
                    worker.to_owned(),
                    ms(self.config.lease),
                    token_prefix,
                    max.max(1).to_string(),
                    "1000".to_owned(),
                ],
            )
            .await?;
        Ok(Claim {
            next_due: u64::try_from(hint).ok().map(Duration::from_millis),
            jobs: rows
                .into_iter()
                .map(
                    |(
                        key,
                        token,
                        attempt,
                        max_attempts,
                        lease_losses,
                        kind,
                        payload,
                        group,
                        created_at,
                    )| ClaimedJob {
                        key,
                        token,
                        attempt,
                        max_attempts,
                        lease_losses,
                        kind,
                        payload,
                        group: (!group.is_empty()).then_some(group),
                        created_at,
                    },
                )
                .collect(),
        })
    }

    /// Extends a lease; `false` when the token is stale (the job is no longer ours).
    pub async fn renew(&self, job: &str, token: &str) -> Result<bool, QueueError> {
        let lu: i64 = self
            .eval(
                &scripts::RENEW,
                [job.to_owned(), token.to_owned(), ms(self.config.lease)],
            )
            .await?;
        Ok(lu > 0)
    }

    /// Acks a job: done, its slots freed, its successors' gates counted down.
    pub async fn ack(&self, job: &str, token: &str) -> Result<Settled, QueueError> {
        self.ack_with_followups(job, token, &[])
            .await
            .map(|(s, _)| s)
    }

    /// Acks a job and enqueues its follow-ups in the same atomic step (idempotent by key).
    /// The follow-up results are empty unless the ack was applied by this call.
    pub async fn ack_with_followups(
        &self,
        job: &str,
        token: &str,
        followups: &[JobSpec],
    ) -> Result<(Settled, Vec<Enqueued>), QueueError> {
        let wire = if followups.is_empty() {
            String::new()
        } else {
            self.wire(followups)?
        };
        let (code, created): (i64, Vec<i64>) = self
            .eval(
                &scripts::ACK,
                [
                    job.to_owned(),
                    token.to_owned(),
                    wire,
                    ms(self.config.done_retention),
                ],
            )
            .await?;
        let created = created
            .into_iter()
            .map(|c| {
                if c == 1 {
                    Enqueued::Created
                } else {
                    Enqueued::Existing
                }
            })
            .collect();
        Ok((settled(code, Settled::Done), created))
    }

    /// Records a failed attempt: rescheduled after `delay` if `retryable` and attempts remain,
    /// else dead.
    pub async fn fail(
        &self,
        job: &str,
        token: &str,
        worker: &str,
        outcome: &FailOutcome<'_>,
    ) -> Result<Settled, QueueError> {
        // Kept slots are held until the job is claimed again, or freed by the reaper once
        // its backoff, a lease and a sweep have passed (also when it is dead-lettered).
        let hold = if outcome.keep_slots {
            outcome.delay + self.config.lease + self.config.reap_every
        } else {
            Duration::ZERO
        };
        let code: i64 = self
            .eval(
                &scripts::FAIL,
                [
                    job.to_owned(),
                    token.to_owned(),
                    outcome.error.to_owned(),
                    worker.to_owned(),
                    if outcome.retryable { "1" } else { "0" }.to_owned(),
                    ms(outcome.delay),
                    self.config.history_len.max(1).to_string(),
                    ms(hold),
                ],
            )
            .await?;
        Ok(match code {
            3 => Settled::Dead,
            c => settled(c, Settled::Rescheduled),
        })
    }

    /// Hands a job back without spending its attempt: at its old place in line, or after
    /// `delay` if non-zero.
    pub async fn release(
        &self,
        job: &str,
        token: &str,
        delay: Duration,
    ) -> Result<Settled, QueueError> {
        let code: i64 = self
            .eval(
                &scripts::RELEASE,
                [job.to_owned(), token.to_owned(), ms(delay), "0".to_owned()],
            )
            .await?;
        Ok(settled(code, Settled::Released))
    }

    /// As [`Queue::release`], but the job keeps its concurrency slots until it is claimed
    /// again, or until `delay + lease + reap_every` have passed without a claim (then the
    /// reaper frees them): work it started elsewhere is still running.
    pub async fn release_keeping_slots(
        &self,
        job: &str,
        token: &str,
        delay: Duration,
    ) -> Result<Settled, QueueError> {
        let hold = delay + self.config().lease + self.config().reap_every;
        let code: i64 = self
            .eval(
                &scripts::RELEASE,
                [job.to_owned(), token.to_owned(), ms(delay), ms(hold)],
            )
            .await?;
        Ok(settled(code, Settled::Released))
    }

    /// HSETs fields of `key` only while `token` holds `job`'s lease; `false` when stale.
    /// `key` must be in this queue's slot (made with `Queue::key`).
    pub async fn hset_fenced(
        &self,
        job: &str,
        token: &str,
        key: &str,
        fields: &[(&str, &str)],
    ) -> Result<bool, QueueError> {
        if !key.starts_with(self.keys.prefix()) {
            return Err(QueueError::ForeignKey(key.to_owned()));
        }
        let mut args = vec![job.to_owned(), token.to_owned(), key.to_owned()];
        for (f, v) in fields {
            args.push((*f).to_owned());
            args.push((*v).to_owned());
        }
        let ok: i64 = self.eval(&scripts::FENCED_HSET, args).await?;
        Ok(ok == 1)
    }

    /// Runs `script` only while `token` holds `job`'s lease; `false` when stale. `keys` (each
    /// made with `Queue::key`) come first in the body's arguments, then `args`.
    pub async fn eval_fenced(
        &self,
        script: &FencedScript,
        job: &str,
        token: &str,
        keys: &[&str],
        args: &[&str],
    ) -> Result<bool, QueueError> {
        if let Some(k) = keys.iter().find(|k| !k.starts_with(self.keys.prefix())) {
            return Err(QueueError::ForeignKey((*k).to_owned()));
        }
        let all = [job, token]
            .into_iter()
            .chain(keys.iter().copied())
            .chain(args.iter().copied())
            .map(str::to_owned);
        let ok: i64 = self.eval(&script.0, all).await?;
        Ok(ok == 1)
    }

    /// One reaper sweep (up to 200 leases); safe to run from every worker at once.
    pub async fn reap(&self) -> Result<ReapReport, QueueError> {
        let (requeued, dead, slots_freed, purged): (u64, u64, u64, u64) = self
            .eval(
                &scripts::REAP,
                [
                    "200".to_owned(),
                    ms(self.config.lease),
                    self.config.history_len.max(1).to_string(),
                    ms(self.config.dead_retention),
                ],
            )
            .await?;
        Ok(ReapReport {
            requeued,
            dead,
            slots_freed,
            purged,
        })
    }

    /// Runs `reap` every `reap_every` until the handle is dropped. Every worker runs one: no
    /// leader is needed, each sweep is one atomic script.
    pub fn spawn_reaper(&self) -> ReaperHandle {
        let queue = self.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(queue.config.reap_every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                loop {
                    match queue.reap().await {
                        Ok(r) if r.requeued + r.dead >= 200 || r.slots_freed >= 200 => continue,
                        Ok(r) => {
                            if r.requeued + r.dead + r.slots_freed + r.purged > 0 {
                                tracing::info!(
                                    requeued = r.requeued,
                                    dead = r.dead,
                                    slots_freed = r.slots_freed,
                                    purged = r.purged,
                                    "reaper sweep"
                                );
                            }
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "reaper sweep failed");
                            break;
                        }
                    }
                }
            }
        });
        ReaperHandle(task)
    }

    /// Sets (or with `None` removes) the cluster-wide cap of a concurrency key. Takes effect
    /// at the next claim; parked jobs are woken if there is room now.
    pub async fn set_cap(&self, slot: &str, cap: Option<u32>) -> Result<(), QueueError> {
        let _: i64 = self
            .eval(
                &scripts::SET_CAP,
                [
                    slot.to_owned(),
                    cap.map(|c| c.to_string()).unwrap_or_default(),
                ],
            )
            .await?;
        Ok(())
    }

    /// Cancels every not-finished job of a group; in-flight ones are fenced at once (their
    /// renewal fails, so their handler sees `Lease::is_lost`, and their ack is refused).
    pub async fn cancel_group(&self, group: &str) -> Result<u64, QueueError> {
        self.eval(
            &scripts::CANCEL_GROUP,
            [group.to_owned(), ms(self.config.lease)],
        )
        .await
    }

    /// Cancels these jobs where they are not finished, as [`Queue::cancel_group`] does for a
    /// group (a moved VM's jobs, `jobs::replace`). Returns how many were cancelled.
    pub async fn cancel_jobs(&self, jobs: &[String]) -> Result<u64, QueueError> {
        if jobs.is_empty() {
            return Ok(0);
        }
        let mut args = vec![ms(self.config.lease)];
        args.extend(jobs.iter().cloned());
        self.eval(&scripts::CANCEL_JOBS, args).await
    }

    /// Deletes every finished (done, cancelled) or still queued job of a group with its
    /// history and successor set, then the group's set and counters: what a torn-down
    /// deployment's epoch leaves in the queue. A job still running keeps its record, and a
    /// cancelled job still holding slots for a Proxmox task that may run is left for the
    /// reaper, which deletes it when it frees those slots. Returns the jobs deleted.
    pub async fn purge_group(&self, group: &str) -> Result<u64, QueueError> {
        let mut total = 0;
        loop {
            let n: u64 = self
                .eval(&scripts::PURGE_GROUP, [group.to_owned(), "500".to_owned()])
                .await?;
            total += n;
            if n < 500 {
                return Ok(total);
            }
        }
    }

    /// Brings a dead job back (same id, attempts and lease losses reset). Returns 1 or 0.
    pub async fn retry_dead(&self, job: &str) -> Result<u64, QueueError> {
        self.eval(&scripts::RETRY_DEAD, ["job".to_owned(), job.to_owned()])
            .await
    }

    /// Brings every dead job of a group back.
    pub async fn retry_dead_group(&self, group: &str) -> Result<u64, QueueError> {
        self.eval(&scripts::RETRY_DEAD, ["group".to_owned(), group.to_owned()])
            .await
    }

    /// Queue-wide counts (one pipelined round trip of O(1) reads).
    pub async fn stats(&self) -> Result<QueueStats, QueueError> {
        let k = &self.keys;
        let mut conn = self.conn.clone();
        #[allow(clippy::type_complexity)] // one tuple per pipelined reply
        let (ready, scheduled, gated, in_flight, dead, counts, acked, oldest, time): (
            u64,
            u64,
            u64,
            u64,
            u64,
            HashMap<String, i64>,
            Option<u64>,
            Vec<(String, f64)>,
            (u64, u64),
        ) = redis::pipe()
            .zcard(k.ready())
            .zcard(k.key("scheduled"))
            .scard(k.key("gated"))
            .zcard(k.key("inflight"))
            .zcard(k.key("dead"))
            .hgetall(k.key("counts"))
            .hget(k.key("stats"), "acked")
            .zrange_withscores(k.ready(), 0, 0)
            .cmd("TIME")
            .query_async(&mut conn)
            .await?;
        let now = time.0 * 1000 + time.1 / 1000;
        let count = |s: &str| counts.get(s).copied().unwrap_or(0).max(0) as u64;
        Ok(QueueStats {
            ready,
            scheduled,
            gated,
            waiting_for_slot: count("waiting"),
            in_flight,
            dead,
            done: count("done"),
            cancelled: count("cancelled"),
            acked_total: acked.unwrap_or(0),
            oldest_ready_age: oldest
                .first()
                .map(|(_, s)| Duration::from_millis(now.saturating_sub(*s as u64))),
        })
    }

    /// Counts of one concurrency key.
    pub async fn slot_stats(&self, slot: &str) -> Result<SlotStats, QueueError> {
        let k = &self.keys;
        let mut conn = self.conn.clone();
        #[allow(clippy::type_complexity)] // one tuple per pipelined reply
        let (cap, held, waiting, hwm, oldest, time): (
            Option<u32>,
            u64,
            u64,
            Option<u64>,
            Vec<(String, f64)>,
            (u64, u64),
        ) = redis::pipe()
            .hget(k.key("caps"), slot)
            .scard(k.key(&format!("slot:{slot}")))
            .zcard(k.key(&format!("wait:{slot}")))
            .hget(k.key("slothwm"), slot)
            .zrange_withscores(k.key(&format!("wait:{slot}")), 0, 0)
            .cmd("TIME")
            .query_async(&mut conn)
            .await?;
        let now = time.0 * 1000 + time.1 / 1000;
        Ok(SlotStats {
            cap,
            held,
            waiting,
            high_water: hwm.unwrap_or(0),
            oldest_waiting_age: oldest
                .first()
                .map(|(_, s)| Duration::from_millis(now.saturating_sub(*s as u64))),
        })
    }

    /// Counts of one group by state (one HGETALL).
    pub async fn group_stats(&self, group: &str) -> Result<GroupStats, QueueError> {
        let mut conn = self.conn.clone();
        let counts: HashMap<String, i64> = conn
            .hgetall(self.keys.key(&format!("gcounts:{group}")))
            .await?;
        let count = |s: &str| counts.get(s).copied().unwrap_or(0).max(0) as u64;
        Ok(GroupStats {
            ready: count("ready"),
            scheduled: count("scheduled"),
            gated: count("gated"),
            waiting_for_slot: count("waiting"),
            in_flight: count("running"),
            dead: count("dead"),
            done: count("done"),
            cancelled: count("cancelled"),
        })
    }

    /// Keys of the job of a group (including finished ones still retained).
    pub async fn group_jobs(&self, group: &str) -> Result<Vec<String>, QueueError> {
        let mut conn = self.conn.clone();
        Ok(conn
            .smembers(self.keys.key(&format!("group:{group}")))
            .await?)
    }

    /// Dead letters, oldest first.
    pub async fn dead_letters(&self, limit: usize) -> Result<Vec<String>, QueueError> {
        let mut conn = self.conn.clone();
        let stop = isize::try_from(limit).unwrap_or(isize::MAX).max(1) - 1;
        Ok(conn.zrange(self.keys.key("dead"), 0, stop).await?)
    }

    /// One job with its attempt history, if it exists.
    pub async fn job(&self, key: &str) -> Result<Option<JobInfo>, QueueError> {
        let mut conn = self.conn.clone();
        let (h, hist): (HashMap<String, String>, Vec<String>) = redis::pipe()
            .hgetall(self.keys.job(key))
            .lrange(self.keys.key(&format!("hist:{key}")), 0, -1)
            .query_async(&mut conn)
            .await?;
        if h.is_empty() {
            return Ok(None);
        }
        let s = |f: &str| h.get(f).cloned().unwrap_or_default();
        let n = |f: &str| h.get(f).and_then(|v| v.parse().ok()).unwrap_or(0);
        let o = |f: &str| h.get(f).filter(|v| !v.is_empty()).cloned();
        Ok(Some(JobInfo {
            key: key.to_owned(),
            state: s("state"),
            kind: s("kind"),
            payload: s("payload"),
            attempts: n("attempts"),
            max_attempts: n("max_attempts"),
            lease_losses: n("lease_losses"),
            group: o("group"),
            worker: o("worker"),
            last_error: o("last_error"),
            gate_pending: n("gate_pending"),
            history: hist
                .iter()
                .filter_map(|e| serde_json::from_str(e).ok())
                .collect(),
        }))
    }
}

fn settled(code: i64, applied: Settled) -> Settled {
    match code {
        0 => Settled::Stale,
        2 => Settled::AlreadyApplied,
        _ => applied,
    }
}

/// The reaper task of one worker; stopped when dropped.
#[derive(Debug)]
pub struct ReaperHandle(tokio::task::JoinHandle<()>);

impl Drop for ReaperHandle {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A SCAN MATCH pattern for every key starting with `prefix` (its glob characters escaped).
pub fn glob_prefix(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('*');
    out
}
