//! Worker heartbeats: each worker process records in Redis who it is (name, host, version,
//! pid, start time), when it was last seen and how many jobs it runs now, and refreshes the
//! record every few seconds. The record expires on its own when the worker stops beating
//! (a crash, a kill, a partition); a worker that stops cleanly deletes it.
//!
//! Keys (under the queue's hash tag): `worker:<name>` (STRING, JSON [`WorkerBeat`], with a
//! TTL of [`BeatTiming::ttl`]) and `workers` (ZSET name -> last seen, ms), the index that
//! lets [`list`] read every live record without `SCAN`. Entries whose record has expired are
//! removed from the index by the next [`list`].
//!
//! This module only reads and writes those two keys; it knows nothing of jobs except the
//! in-flight count the worker hands it ([`Beat::job`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::queue::{Queue, QueueError};

/// One worker's heartbeat record, as stored in Redis.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerBeat {
    pub name: String,
    pub host: String,
    /// The worker's crate version.
    pub version: String,
    pub pid: u32,
    pub started: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    /// Jobs running in the process at the last beat.
    pub in_flight: u64,
    /// Jobs the process runs at most at once.
    pub concurrency: usize,
}

/// How often a worker beats and how long its record outlives the last beat.
#[derive(Debug, Clone, Copy)]
pub struct BeatTiming {
    pub every: Duration,
    pub ttl: Duration,
}

impl Default for BeatTiming {
    fn default() -> Self {
        BeatTiming {
            every: Duration::from_secs(2),
            ttl: Duration::from_secs(10),
        }
    }
}

/// The live side of a worker's heartbeat: its identity and its in-flight counter.
#[derive(Debug)]
pub struct Beat {
    name: String,
    host: String,
    version: String,
    started: DateTime<Utc>,
    concurrency: usize,
    in_flight: AtomicU64,
}

/// Counts one running job until dropped (see [`Beat::job`]).
pub struct JobGuard(Arc<Beat>);

impl Drop for JobGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Beat {
    pub fn new(name: &str, version: &str, concurrency: usize) -> Arc<Beat> {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "host".to_owned());
        Arc::new(Beat {
            name: name.to_owned(),
            host,
            version: version.to_owned(),
            started: Utc::now(),
            concurrency,
            in_flight: AtomicU64::new(0),
        })
    }

    /// Counts a job as running until the guard is dropped.
    pub fn job(self: &Arc<Self>) -> JobGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        JobGuard(self.clone())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The record as of now.
    pub fn record(&self) -> WorkerBeat {
        WorkerBeat {
            name: self.name.clone(),
            host: self.host.clone(),
            version: self.version.clone(),
            pid: std::process::id(),
            started: self.started,
            last_seen: Utc::now(),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            concurrency: self.concurrency,
        }
    }
}

fn record_key(queue: &Queue, name: &str) -> String {
    queue.key(&format!("worker:{name}"))
}

fn index_key(queue: &Queue) -> String {
    queue.key("workers")
}

/// Writes one beat: the record with its TTL and the index entry, in one transaction.
pub async fn write(queue: &Queue, rec: &WorkerBeat, ttl: Duration) -> Result<(), QueueError> {
    let mut c = queue.connection();
    let json = serde_json::to_string(rec).expect("serializes");
    redis::pipe()
        .atomic()
        .cmd("SET")
        .arg(record_key(queue, &rec.name))
        .arg(json)
        .arg("PX")
        .arg(ttl.as_millis().max(1) as u64)
        .ignore()
        .zadd(
            index_key(queue),
            &rec.name,
            rec.last_seen.timestamp_millis(),
        )
        .ignore()
        .query_async::<()>(&mut c)
        .await?;
    Ok(())
}

/// Deletes a worker's record (a clean stop).
pub async fn remove(queue: &Queue, name: &str) -> Result<(), QueueError> {
    let mut c = queue.connection();
    redis::pipe()
        .atomic()
        .del(record_key(queue, name))
        .ignore()
        .zrem(index_key(queue), name)
        .ignore()
        .query_async::<()>(&mut c)
        .await?;
    Ok(())
}

/// Every worker whose record has not expired, by name; prunes expired index entries.
pub async fn list(queue: &Queue) -> Result<Vec<WorkerBeat>, QueueError> {
    let mut c = queue.connection();
    let names: Vec<String> = redis::cmd("ZRANGE")
        .arg(index_key(queue))
        .arg(0)
        .arg(-1)
        .query_async(&mut c)
        .await?;
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let keys: Vec<String> = names.iter().map(|n| record_key(queue, n)).collect();
    let recs: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(&mut c).await?;
    let mut out = Vec::new();
    let mut gone = Vec::new();
    for (name, rec) in names.iter().zip(recs) {
        match rec.and_then(|s| serde_json::from_str::<WorkerBeat>(&s).ok()) {
            Some(r) => out.push(r),
            None => gone.push(name.clone()),
        }
    }
    if !gone.is_empty() {
        let _: redis::RedisResult<()> = redis::cmd("ZREM")
            .arg(index_key(queue))
            .arg(&gone)
            .query_async(&mut c)
            .await;
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Beats every `timing.every` until `shutdown`, then deletes the record. A failed write is
/// logged and tried again at the next beat (the record may expire meanwhile: the worker
/// then looks gone, which is what a Redis that cannot be written to should show).
pub async fn run(queue: Queue, beat: Arc<Beat>, timing: BeatTiming, shutdown: CancellationToken) {
    loop {
        if let Err(e) = write(&queue, &beat.record(), timing.ttl).await {
            tracing::warn!(worker = beat.name(), error = %e, "heartbeat not written");
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(timing.every) => {}
        }
    }
    if let Err(e) = remove(&queue, beat.name()).await {
        tracing::warn!(worker = beat.name(), error = %e, "heartbeat record not removed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_guards_count_in_flight() {
        let b = Beat::new("w1", "0.1.0", 4);
        let g1 = b.job();
        let g2 = b.job();
        assert_eq!(b.record().in_flight, 2);
        drop(g1);
        assert_eq!(b.record().in_flight, 1);
        drop(g2);
        let r = b.record();
        assert_eq!((r.in_flight, r.concurrency, r.name.as_str()), (0, 4, "w1"));
        assert_eq!(r.pid, std::process::id());
    }

    #[test]
    fn the_record_is_stable_json() {
        let r = WorkerBeat {
            name: "w1".into(),
            host: "h".into(),
            version: "0.1.0".into(),
            pid: 7,
            started: DateTime::from_timestamp(0, 0).unwrap(),
            last_seen: DateTime::from_timestamp(1, 0).unwrap(),
            in_flight: 2,
            concurrency: 16,
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"name":"w1","host":"h","version":"0.1.0","pid":7,"started":"1970-01-01T00:00:00Z","last_seen":"1970-01-01T00:00:01Z","in_flight":2,"concurrency":16}"#
        );
    }
}
