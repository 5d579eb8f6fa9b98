//! Durable schedules: a deployment's `schedule:` as events in Redis (start the class, warn,
//! shut it down, warn of the expiry, tear it down), fired by whichever worker is there,
//! exactly once per event with any number of workers and across worker and Redis restarts.
//!
//! Keys (under the queue's hash tag):
//! - `d:<id>` field `schedule`: JSON [`ScheduleDoc`]: the schedule, its generation (bumped
//!   by a submit that changes it), skipped occurrences, extensions, the last event handled
//!   (`cursor`) and the next one (`pending`).
//! - `schedules`: ZSET deployment id -> due time (ms) of its pending event.
//! - `d:<id>:schedlog`: HASH `<gen>|<event>` -> JSON [`LogEntry`] (`fired`, `missed`,
//!   `skipped`): what ran.
//!
//! Each worker ticks ([`tick`], every half second): the deployments whose pending event is
//! due are read, the event's job is enqueued (its key `<scope>/sched/<gen>/<event>` makes a
//! second enqueue a no-op), then one compare-and-set of the document moves `cursor` and
//! `pending` on and writes the log entry. A worker that dies between the two leaves the
//! event due; the next tick enqueues nothing new and completes the step. An event found due
//! after its window closed is recorded `missed` (a start), or still run (a shutdown, the
//! expiry: late is better than never).
//!
//! Time: Redis' `TIME`, so worker clocks never matter, plus, only in processes started with
//! `LABFLEET_TEST_CLOCK=1`, the offset in `testclock` (ms): a test-only setting that moves
//! the schedule's clock (and nothing else) forward.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::LazyLock;

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use crate::config::schedule::Schedule;
use crate::jobs::schedule::{EventKind, ScheduleJob};
use crate::jobs::state::Store;
use crate::jobs::{Job, scope};
use crate::queue::{JobSpec, QueueError};

/// A deployment's schedule as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleDoc {
    pub def: Schedule,
    pub cluster: String,
    pub generation: u32,
    /// Occurrences (ids) that `--skip` skipped.
    #[serde(default)]
    pub skip: BTreeSet<String>,
    /// Extra seconds per occurrence id (its end), or for `expiry`.
    #[serde(default)]
    pub extend: BTreeMap<String, i64>,
    /// The last event handled: (due ms, event id).
    #[serde(default)]
    pub cursor: Option<(i64, String)>,
    /// The next event: (due ms, event id).
    #[serde(default)]
    pub pending: Option<(i64, String)>,
}

/// One event of a schedule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Event {
    /// `<occurrence>/<kind>`, e.g. `2026-12-07T08:00/start`, or `expiry/expire`.
    pub id: String,
    /// The occurrence (`2026-12-07T08:00`, local start) or `expiry`.
    pub occurrence: String,
    pub kind: EventKind,
    pub due: DateTime<Utc>,
    /// The end of its window (the expiry itself for the expiry's events).
    pub until: DateTime<Utc>,
}

/// What happened to an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    pub event: String,
    /// `fired`, `missed` or `skipped`.
    pub outcome: String,
    pub due: DateTime<Utc>,
    pub at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
}

fn occurrence_id(date: NaiveDate, w: &crate::config::schedule::Window) -> String {
    format!("{}T{}", date.format("%Y-%m-%d"), w.start.format("%H:%M"))
}

/// Every event due in `[from, to)`, sorted by (due, id).
pub fn events(doc: &ScheduleDoc, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<Event> {
    let def = &doc.def;
    let tz = def.tz();
    let expiry = def.expires_at.map(|x| {
        def.instant(x) + Duration::seconds(doc.extend.get("expiry").copied().unwrap_or(0))
    });
    let lead = Duration::seconds(def.start_before_secs as i64);
    let warn = Duration::seconds(def.warn_before_secs as i64);
    let mut out = Vec::new();
    let first = (from - Duration::days(2)).with_timezone(&tz).date_naive();
    let last = (to + Duration::days(2)).with_timezone(&tz).date_naive();
    for w in &def.windows {
        let dates: Vec<NaiveDate> = match w.date {
            Some(d) => vec![d],
            None => first
                .iter_days()
                .take_while(|d| *d <= last)
                .filter(|d| w.days.contains(&(d.weekday().num_days_from_monday() as u8)))
                .collect(),
        };
        for d in dates {
            let occ = occurrence_id(d, w);
            let start = def.instant(d.and_time(w.start));
            let end = def.instant(d.and_time(w.end))
                + Duration::seconds(doc.extend.get(&occ).copied().unwrap_or(0));
            if expiry.is_some_and(|x| start >= x) {
                continue;
            }
            let mut push = |kind, due| {
                out.push(Event {
                    id: format!("{occ}/{}", kind_name(kind)),
                    occurrence: occ.clone(),
                    kind,
                    due,
                    until: end,
                })
            };
            push(EventKind::Start, start - lead);
            if warn > Duration::zero() && end - warn > start - lead {
                push(EventKind::Warn, end - warn);
            }
            push(EventKind::Shutdown, end);
        }
    }
    if let Some(x) = expiry {
        for (kind, due) in [(EventKind::ExpiryWarn, x - warn), (EventKind::Expire, x)] {
            if kind == EventKind::ExpiryWarn && warn == Duration::zero() {
                continue;
            }
            out.push(Event {
                id: format!("expiry/{}", kind_name(kind)),
                occurrence: "expiry".into(),
                kind,
                due,
                until: x,
            });
        }
    }
    out.retain(|e| e.due >= from && e.due < to);
    out.sort_by(|a, b| (a.due, &a.id).cmp(&(b.due, &b.id)));
    out
}

pub fn kind_name(k: EventKind) -> &'static str {
    match k {
        EventKind::Start => "start",
        EventKind::Warn => "warn",
        EventKind::Shutdown => "shutdown",
        EventKind::ExpiryWarn => "expiry-warn",
        EventKind::Expire => "expire",
    }
}

/// How far ahead a search for the next event looks.
fn horizon(doc: &ScheduleDoc, from: DateTime<Utc>) -> DateTime<Utc> {
    let mut to = from + Duration::days(15);
    let def = &doc.def;
    for w in &def.windows {
        if let Some(d) = w.date {
            to = to.max(def.instant(d.and_time(w.end)) + Duration::days(2));
        }
    }
    if let Some(x) = def.expires_at {
        to = to.max(def.instant(x) + Duration::days(30));
    }
    to
}

/// The first `n` events after the cursor (or, without one, those whose window is not over
/// at `now`): what is coming.
pub fn upcoming(doc: &ScheduleDoc, now: DateTime<Utc>, n: usize) -> Vec<Event> {
    let from = match &doc.cursor {
        Some((ms, _)) => Utc.timestamp_millis_opt(*ms).single().unwrap_or(now),
        None => now - Duration::days(1),
    };
    let to = horizon(doc, from.max(now));
    events(doc, from, to)
        .into_iter()
        .filter(|e| match &doc.cursor {
            Some((ms, id)) => (e.due.timestamp_millis(), &e.id) > (*ms, id),
            None => e.until > now,
        })
        .take(n)
        .collect()
}

/// The event that comes after the cursor.
pub fn next_event(doc: &ScheduleDoc, now: DateTime<Utc>) -> Option<Event> {
    upcoming(doc, now, 1).into_iter().next()
}

impl Store {
    pub fn key_schedules(&self) -> String {
        self.queue().key("schedules")
    }
    pub fn key_schedlog(&self, id: &str) -> String {
        self.queue().key(&format!("d:{id}:schedlog"))
    }
    fn key_testclock(&self) -> String {
        self.queue().key("testclock")
    }

    /// The schedule's clock: Redis' `TIME`, plus the test-only offset when this process
    /// was started with `LABFLEET_TEST_CLOCK=1`.
    pub async fn schedule_now(&self) -> Result<DateTime<Utc>, QueueError> {
        let mut c = self.queue().connection();
        let (s, us): (i64, i64) = redis::cmd("TIME").query_async(&mut c).await?;
        let mut ms = s * 1000 + us / 1000;
        if std::env::var("LABFLEET_TEST_CLOCK").is_ok_and(|v| v == "1") {
            let off: Option<i64> = c.get(self.key_testclock()).await?;
            ms += off.unwrap_or(0);
        }
        Ok(Utc
            .timestamp_millis_opt(ms)
            .single()
            .unwrap_or_else(Utc::now))
    }

    /// Test only: moves the schedule clock of `LABFLEET_TEST_CLOCK=1` processes forward.
    pub async fn advance_test_clock(&self, by: std::time::Duration) -> Result<(), QueueError> {
        let mut c = self.queue().connection();
        let _: i64 = c.incr(self.key_testclock(), by.as_millis() as i64).await?;
        Ok(())
    }

    /// A deployment's schedule as stored, with its raw text for a compare-and-set.
    pub async fn schedule_doc(
        &self,
        id: &str,
    ) -> Result<Option<(ScheduleDoc, String)>, QueueError> {
        let mut c = self.queue().connection();
        let raw: Option<String> = c.hget(self.key_deployment(id), "schedule").await?;
        Ok(raw.and_then(|r| Some((serde_json::from_str(&r).ok()?, r))))
    }

    /// What ran, oldest first.
    pub async fn schedule_log(&self, id: &str) -> Result<Vec<LogEntry>, QueueError> {
        let mut c = self.queue().connection();
        let raw: BTreeMap<String, String> = c.hgetall(self.key_schedlog(id)).await?;
        let mut v: Vec<LogEntry> = raw
            .values()
            .filter_map(|r| serde_json::from_str(r).ok())
            .collect();
        v.sort_by(|a, b| (a.due, &a.event).cmp(&(b.due, &b.event)));
        Ok(v)
    }

    /// Writes `doc` if the stored one is still `prev` (`""`: none), moving the deployment in
    /// `schedules` to its pending event (or out), with an optional log entry.
    pub async fn put_schedule(
        &self,
        id: &str,
        prev: &str,
        doc: Option<&ScheduleDoc>,
        log: Option<(&str, &LogEntry)>,
    ) -> Result<bool, QueueError> {
        let mut c = self.queue().connection();
        let json = doc.map(|d| serde_json::to_string(d).expect("serializes"));
        let due = doc.and_then(|d| d.pending.as_ref()).map(|p| p.0);
        let (lf, lj) = match log {
            Some((f, e)) => (f.to_owned(), serde_json::to_string(e).expect("serializes")),
            None => (String::new(), String::new()),
        };
        let ok: i64 = PUT_SCHEDULE
            .key(self.key_deployment(id))
            .key(self.key_schedules())
            .key(self.key_schedlog(id))
            .arg(prev)
            .arg(json.unwrap_or_default())
            .arg(due.map(|d| d.to_string()).unwrap_or_default())
            .arg(id)
            .arg(lf)
            .arg(lj)
            .invoke_async(&mut c)
            .await?;
        Ok(ok == 1)
    }
}

static PUT_SCHEDULE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
-- KEYS: d:<id>, schedules, d:<id>:schedlog. ARGV: expected doc ('' = none), new doc ('' =
-- remove), pending due ms ('' = none), id, log field, log JSON.
local cur = redis.call('HGET', KEYS[1], 'schedule') or ''
if cur ~= ARGV[1] then return 0 end
if ARGV[2] == '' then
  redis.call('HDEL', KEYS[1], 'schedule')
else
  redis.call('HSET', KEYS[1], 'schedule', ARGV[2])
end
if ARGV[3] == '' then
  redis.call('ZREM', KEYS[2], ARGV[4])
else
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[3], ARGV[5], ARGV[6]) end
return 1
"#,
    )
});

/// The key of event `event` of generation `generation` (in the deployment's scope at that time).
pub fn event_job_key(id: &str, epoch: u32, generation: u32, event: &str) -> String {
    format!("{}/sched/{generation}/{event}", scope(id, epoch))
}

/// One pass: every deployment whose pending event is due gets it handled. Returns how
/// many events were handled.
pub async fn tick(store: &Store) -> Result<usize, QueueError> {
    let now = store.schedule_now().await?;
    let due: Vec<String> = {
        let mut c = store.queue().connection();
        c.zrangebyscore_limit(store.key_schedules(), "-inf", now.timestamp_millis(), 0, 50)
            .await?
    };
    let mut handled = 0;
    for id in due {
        if handle_due(store, &id, now).await? {
            handled += 1;
        }
    }
    Ok(handled)
}

async fn handle_due(store: &Store, id: &str, now: DateTime<Utc>) -> Result<bool, QueueError> {
    let Some((doc, raw)) = store.schedule_doc(id).await? else {
        let mut c = store.queue().connection();
        let _: i64 = c.zrem(store.key_schedules(), id).await?;
        return Ok(false);
    };
    let Some(ev) = next_event(&doc, now).filter(|e| e.due <= now) else {
        // Nothing due after all (an extension moved it): put the right time back.
        let mut d = doc.clone();
        d.pending = next_event(&doc, now).map(|e| (e.due.timestamp_millis(), e.id));
        return store
            .put_schedule(id, &raw, Some(&d), None)
            .await
            .map(|_| false);
    };
    let field = format!("{}|{}", doc.generation, ev.id);
    let log = store.schedule_log(id).await?;
    let start_missed = log
        .iter()
        .any(|l| l.outcome == "missed" && l.event == format!("{}/start", ev.occurrence));
    let outcome = if doc.skip.contains(&ev.occurrence) {
        "skipped"
    } else {
        match ev.kind {
            EventKind::Start | EventKind::Warn | EventKind::ExpiryWarn if now >= ev.until => {
                "missed"
            }
            EventKind::Shutdown if start_missed => "missed",
            _ => "fired",
        }
    };
    let mut job_key = None;
    if outcome == "fired" {
        let epoch = store.deployment(id).await?.map(|r| r.epoch).unwrap_or(0);
        let key = event_job_key(id, epoch, doc.generation, &ev.id);
        let job = Job::Schedule(ScheduleJob {
            deployment: id.to_owned(),
            cluster: doc.cluster.clone(),
            generation: doc.generation,
            event: ev.id.clone(),
            what: ev.kind,
            due: ev.due,
            until: ev.until,
        });
        store
            .queue()
            .enqueue(&JobSpec::new(key.clone(), job.kind(), job.to_value()))
            .await?;
        job_key = Some(key);
    }
    let mut d = doc.clone();
    d.cursor = Some((ev.due.timestamp_millis(), ev.id.clone()));
    d.pending = next_event(&d, now).map(|e| (e.due.timestamp_millis(), e.id));
    let entry = LogEntry {
        event: ev.id.clone(),
        outcome: outcome.into(),
        due: ev.due,
        at: now,
        job: job_key,
    };
    tracing::info!(deployment = id, event = %ev.id, outcome, "schedule event");
    store
        .put_schedule(id, &raw, Some(&d), Some((&field, &entry)))
        .await
}

/// Installs (or replaces, or removes) a deployment's schedule at submit. An unchanged
/// schedule is kept as it is (its skips, extensions and progress); a changed one starts a
/// new generation from now.
pub async fn install(
    store: &Store,
    id: &str,
    cluster: &str,
    def: Option<&Schedule>,
) -> Result<(), QueueError> {
    for _ in 0..8 {
        let cur = store.schedule_doc(id).await?;
        let (prev_raw, prev) = match &cur {
            Some((d, r)) => (r.as_str(), Some(d)),
            None => ("", None),
        };
        let doc = match (def, prev) {
            (None, None) => return Ok(()),
            (Some(s), Some(p)) if &p.def == s => return Ok(()),
            (None, Some(_)) => None,
            (Some(s), p) => {
                let now = store.schedule_now().await?;
                let mut d = ScheduleDoc {
                    def: s.clone(),
                    cluster: cluster.to_owned(),
                    generation: p.map(|p| p.generation + 1).unwrap_or(1),
                    skip: BTreeSet::new(),
                    extend: BTreeMap::new(),
                    cursor: None,
                    pending: None,
                };
                d.pending = next_event(&d, now).map(|e| (e.due.timestamp_millis(), e.id));
                Some(d)
            }
        };
        if store.put_schedule(id, prev_raw, doc.as_ref(), None).await? {
            return Ok(());
        }
    }
    Ok(())
}

/// Runs [`tick`] every `every` until `stop` (each worker runs one).
pub async fn run(
    store: Store,
    every: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        if let Err(e) = tick(&store).await {
            tracing::warn!(error = %e, "schedule tick failed; trying again");
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::schedule::{Schedule, Window};
    use chrono::NaiveTime;

    fn doc(windows: Vec<Window>, expires: Option<&str>) -> ScheduleDoc {
        ScheduleDoc {
            def: Schedule {
                timezone: "Europe/Berlin".into(),
                start_before_secs: 600,
                warn_before_secs: 600,
                expires_at: expires.map(|e| crate::config::schedule::parse_local(e).unwrap()),
                windows,
            },
            cluster: "lab".into(),
            generation: 1,
            skip: BTreeSet::new(),
            extend: BTreeMap::new(),
            cursor: None,
            pending: None,
        }
    }

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn weekly_windows_follow_wall_clock_time_across_dst() {
        // Sundays 02:30-04:00 in Berlin; 2027-03-28 has no 02:30 (02:00 -> 03:00).
        let w = Window {
            days: vec![6],
            date: None,
            start: NaiveTime::from_hms_opt(2, 30, 0).unwrap(),
            end: NaiveTime::from_hms_opt(4, 0, 0).unwrap(),
        };
        let d = doc(vec![w], None);
        let ev = events(&d, t("2027-03-20T00:00:00Z"), t("2027-04-05T00:00:00Z"));
        let starts: Vec<String> = ev
            .iter()
            .filter(|e| e.kind == EventKind::Start)
            .map(|e| format!("{} {}", e.occurrence, e.due.to_rfc3339()))
            .collect();
        assert_eq!(
            starts,
            [
                // CET (UTC+1): 02:30 - 10 min = 01:20 UTC.
                "2027-03-21T02:30 2027-03-21T01:20:00+00:00",
                // The gap: the first valid minute, 03:00 CEST = 01:00 UTC, minus 10 min.
                "2027-03-28T02:30 2027-03-28T00:50:00+00:00",
                // CEST (UTC+2).
                "2027-04-04T02:30 2027-04-04T00:20:00+00:00",
            ]
        );
    }

    #[test]
    fn the_next_event_follows_the_cursor_and_stops_at_the_expiry() {
        let w = Window {
            days: vec![0],
            date: None,
            start: NaiveTime::from_hms_opt(8, 0, 0).unwrap(),
            end: NaiveTime::from_hms_opt(9, 0, 0).unwrap(),
        };
        let mut d = doc(vec![w], Some("2026-12-14 12:00"));
        // Monday 2026-12-07 (CET): start 06:50 UTC, warn 07:50, shutdown 08:00.
        let now = t("2026-12-06T12:00:00Z");
        let ids: Vec<String> = upcoming(&d, now, 10).into_iter().map(|e| e.id).collect();
        assert_eq!(
            ids,
            [
                "2026-12-07T08:00/start",
                "2026-12-07T08:00/warn",
                "2026-12-07T08:00/shutdown",
                "2026-12-14T08:00/start",
                "2026-12-14T08:00/warn",
                "2026-12-14T08:00/shutdown",
                "expiry/expiry-warn",
                "expiry/expire",
            ]
        );
        let first = next_event(&d, now).unwrap();
        assert_eq!(first.due, t("2026-12-07T06:50:00Z"));
        d.cursor = Some((first.due.timestamp_millis(), first.id));
        d.extend.insert("2026-12-07T08:00".into(), 1800);
        let next = next_event(&d, now).unwrap();
        assert_eq!(next.id, "2026-12-07T08:00/warn");
        assert_eq!(next.due, t("2026-12-07T08:20:00Z"), "extended by 30 min");
    }
}
