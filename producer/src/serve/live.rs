//! Live updates of deployment pages over server-sent events, with one Redis reader per
//! server however many people watch.
//!
//! [`Hub`] keeps one `tokio::sync::broadcast` channel per deployment being watched. One
//! task ([`run_reader`]) polls, every `tick`, the event stream of each watched deployment
//! (`d:<id>:events`, which `step.lua` appends to with every step record) from where it
//! left off, re-reads the cells of the VMs those events name ([`model::cells`]), and
//! broadcasts one JSON update; viewers' SSE streams only receive from their channel. So
//! 50 viewers of one deployment cost one `XREAD` per tick, not 50.
//!
//! An update carries the changed cells and the deployment's state word and counts; a
//! `full` one carries every cell. A full update is sent when a deployment starts being
//! watched, when its record changes (a submit, a teardown), when a viewer joins (so what
//! changed between its page render and its subscription is not lost) or lags, and every
//! [`RESYNC`] as a safety net.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use serde::Serialize;
use shared::jobs::state::{DeploymentRecord, Store};
use shared::plan::Plan;
use shared::queue::QueueError;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::model::{self, Cell, PlanCache};

/// Every this long a watched deployment is read again in full.
pub const RESYNC: Duration = Duration::from_secs(30);
/// Events read per deployment per tick; more than this means a full re-read.
const BATCH: usize = 5000;

struct Topic {
    tx: broadcast::Sender<Arc<str>>,
    want_full: bool,
}

/// The broadcast channels of the deployments being watched.
#[derive(Default)]
pub struct Hub {
    topics: Mutex<HashMap<String, Topic>>,
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Topic>> {
        self.topics.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Joins deployment `id`'s channel; the reader sends a full update at its next tick.
    pub fn subscribe(&self, id: &str) -> broadcast::Receiver<Arc<str>> {
        let mut t = self.lock();
        let topic = t.entry(id.to_owned()).or_insert_with(|| Topic {
            tx: broadcast::channel(64).0,
            want_full: true,
        });
        topic.want_full = true;
        topic.tx.subscribe()
    }

    /// Asks for a full update of `id` (a viewer fell behind).
    pub fn resync(&self, id: &str) {
        if let Some(t) = self.lock().get_mut(id) {
            t.want_full = true;
        }
    }

    /// The deployments someone watches, with whether each wants a full update (which is
    /// then cleared); channels nobody listens to any more are dropped.
    fn watched(&self) -> Vec<(String, bool)> {
        let mut t = self.lock();
        t.retain(|_, topic| topic.tx.receiver_count() > 0);
        t.iter_mut()
            .map(|(id, topic)| (id.clone(), std::mem::take(&mut topic.want_full)))
            .collect()
    }

    fn publish(&self, id: &str, msg: Arc<str>) {
        if let Some(t) = self.lock().get(id) {
            let _ = t.tx.send(msg);
        }
    }

    /// Viewers of `id` now.
    pub fn viewers(&self, id: &str) -> usize {
        self.lock().get(id).map_or(0, |t| t.tx.receiver_count())
    }
}

/// The reader's memory of one watched deployment.
struct Watch {
    stamp: (
        u32,
        chrono::DateTime<chrono::Utc>,
        shared::jobs::state::Phase,
    ),
    last_id: String,
    rec: DeploymentRecord,
    plan: Arc<Plan>,
    cells: Vec<Cell>,
    by_key: HashMap<String, usize>,
    by_user: HashMap<String, Vec<usize>>,
    state: String,
    dead: u64,
    read_at: Instant,
}

/// One update as the page's script reads it.
#[derive(Serialize)]
struct Update<'a> {
    full: bool,
    state: &'a str,
    phase: &'a str,
    total: usize,
    finished: usize,
    dead: u64,
    counts: &'a model::Counts,
    per_node: &'a std::collections::BTreeMap<String, model::Counts>,
    cells: Vec<CellMsg<'a>>,
}

#[derive(Serialize)]
struct CellMsg<'a> {
    i: usize,
    s: &'a str,
    v: Option<u32>,
    n: &'a str,
    e: Option<&'a str>,
}

impl Watch {
    fn message(&self, changed: Option<&[usize]>) -> Arc<str> {
        let (counts, per_node) = model::counts(&self.cells);
        let cells: Vec<CellMsg> = match changed {
            None => self.cells.iter().map(pick).collect(),
            Some(ix) => ix
                .iter()
                .filter_map(|i| self.cells.get(*i))
                .map(pick)
                .collect(),
        };
        let u = Update {
            full: changed.is_none(),
            state: &self.state,
            phase: self.rec.phase.as_str(),
            total: self.cells.len(),
            finished: model::finished(&counts),
            dead: self.dead,
            counts: &counts,
            per_node: &per_node,
            cells,
        };
        serde_json::to_string(&u).expect("serializes").into()
    }
}

fn pick(c: &Cell) -> CellMsg<'_> {
    CellMsg {
        i: c.i,
        s: &c.state,
        v: c.vmid,
        n: &c.node,
        e: c.error.as_deref(),
    }
}

/// Reads the last event id of a deployment's stream ("0-0" when empty).
async fn stream_end(store: &Store, id: &str) -> Result<String, QueueError> {
    let mut c = store.queue().connection();
    let last: Vec<(String, HashMap<String, String>)> = redis::cmd("XREVRANGE")
        .arg(store.key_events(id))
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut c)
        .await?;
    Ok(last
        .into_iter()
        .next()
        .map(|(i, _)| i)
        .unwrap_or_else(|| "0-0".to_owned()))
}

async fn load(store: &Store, plans: &PlanCache, id: &str) -> Result<Option<Watch>, QueueError> {
    let last_id = stream_end(store, id).await?;
    let Some((rec, plan)) = plans.load(store, id).await? else {
        return Ok(None);
    };
    let cells = model::cells(store, &rec, &plan, None).await?;
    let mut by_key = HashMap::new();
    let mut by_user: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, v) in plan.vms.iter().enumerate() {
        by_key.insert(v.key.clone(), i);
        by_user.entry(v.user.clone()).or_default().push(i);
    }
    let mut w = Watch {
        stamp: (rec.epoch, rec.updated, rec.phase),
        last_id,
        rec,
        plan,
        cells,
        by_key,
        by_user,
        state: String::new(),
        dead: 0,
        read_at: Instant::now(),
    };
    refresh_state(store, &mut w).await?;
    Ok(Some(w))
}

/// Recomputes the state word from the cells and the group's jobs; whether it changed.
async fn refresh_state(store: &Store, w: &mut Watch) -> Result<bool, QueueError> {
    let (counts, _) = model::counts(&w.cells);
    // A failed student set-up already shows as its VMs failing (`model::cells`), which
    // decides the word the same way.
    let (state, dead) = model::state_word(store, &w.rec, &counts, w.plan.vms.len(), false).await?;
    let changed = state != w.state || dead != w.dead;
    w.state = state;
    w.dead = dead;
    Ok(changed)
}

/// The VMs (indices) that the new events of `w`'s stream name; `None`: too many, read all.
async fn new_events(store: &Store, w: &mut Watch) -> Result<Option<Vec<usize>>, QueueError> {
    let mut c = store.queue().connection();
    type Entries = Vec<(String, Vec<(String, HashMap<String, String>)>)>;
    let reply: Option<Entries> = redis::cmd("XREAD")
        .arg("COUNT")
        .arg(BATCH)
        .arg("STREAMS")
        .arg(store.key_events(&w.rec.id))
        .arg(&w.last_id)
        .query_async(&mut c)
        .await?;
    let entries = reply
        .and_then(|r| r.into_iter().next())
        .map(|(_, e)| e)
        .unwrap_or_default();
    if entries.len() >= BATCH {
        return Ok(None);
    }
    let mut changed = HashSet::new();
    for (eid, fields) in &entries {
        w.last_id.clone_from(eid);
        let Some(subject) = fields.get("subject") else {
            continue;
        };
        if let Some(i) = w.by_key.get(subject) {
            changed.insert(*i);
        } else if let Some(user) = subject.strip_prefix("student:")
            && let Some(ix) = w.by_user.get(user)
        {
            changed.extend(ix.iter().copied());
        }
    }
    let mut v: Vec<usize> = changed.into_iter().collect();
    v.sort_unstable();
    Ok(Some(v))
}

/// One tick for one deployment: the message to broadcast, if any.
async fn tick_one(
    store: &Store,
    plans: &PlanCache,
    watches: &mut HashMap<String, Watch>,
    id: &str,
    want_full: bool,
) -> Result<Option<Arc<str>>, QueueError> {
    let Some(rec) = store.deployment(id).await? else {
        watches.remove(id);
        return Ok(None);
    };
    let stamp = (rec.epoch, rec.updated, rec.phase);
    let stale = watches
        .get(id)
        .is_none_or(|w| w.stamp != stamp || w.read_at.elapsed() >= RESYNC);
    if stale {
        let Some(w) = load(store, plans, id).await? else {
            watches.remove(id);
            return Ok(None);
        };
        let msg = w.message(None);
        watches.insert(id.to_owned(), w);
        return Ok(Some(msg));
    }
    let w = watches.get_mut(id).expect("checked above");
    w.rec = rec;
    let Some(changed) = new_events(store, w).await? else {
        // More events than one batch: read everything again.
        let Some(fresh) = load(store, plans, id).await? else {
            return Ok(None);
        };
        *w = fresh;
        return Ok(Some(w.message(None)));
    };
    if !changed.is_empty() {
        let fresh = model::cells(store, &w.rec, &w.plan, Some(&changed)).await?;
        for c in fresh {
            let i = c.i;
            w.cells[i] = c;
        }
    }
    let state_changed = refresh_state(store, w).await?;
    if want_full {
        Ok(Some(w.message(None)))
    } else if !changed.is_empty() || state_changed {
        Ok(Some(w.message(Some(&changed))))
    } else {
        Ok(None)
    }
}

/// The one Redis reader of a server: every `tick`, reads what changed in each watched
/// deployment and broadcasts it, until `shutdown`.
pub async fn run_reader(
    hub: Arc<Hub>,
    store: Store,
    plans: Arc<PlanCache>,
    tick: Duration,
    shutdown: CancellationToken,
) {
    let mut watches: HashMap<String, Watch> = HashMap::new();
    let mut warned = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        let watched = hub.watched();
        let ids: HashSet<&str> = watched.iter().map(|(i, _)| i.as_str()).collect();
        watches.retain(|id, _| ids.contains(id.as_str()));
        for (id, want_full) in &watched {
            match tick_one(&store, &plans, &mut watches, id, *want_full).await {
                Ok(Some(msg)) => hub.publish(id, msg),
                Ok(None) => {}
                Err(e) => {
                    if !warned {
                        tracing::warn!(deployment = %id, error = %e, "live updates: Redis read failed; retrying every tick");
                        warned = true;
                    }
                    // Read it all again once Redis answers.
                    watches.remove(id);
                    hub.resync(id);
                }
            }
        }
    }
}

/// The SSE response of one viewer of deployment `id`.
pub fn events(hub: Arc<Hub>, id: String) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let rx = hub.subscribe(&id);
    let stream = futures::stream::unfold((rx, hub, id), |(mut rx, hub, id)| async move {
        loop {
            match rx.recv().await {
                Ok(msg) => {
                    let ev = Event::default().event("update").data(&*msg);
                    return Some((Ok(ev), (rx, hub, id)));
                }
                Err(broadcast::error::RecvError::Lagged(_)) => hub.resync(&id),
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fifty_viewers_are_one_topic_and_each_gets_every_update() {
        let hub = Hub::default();
        let mut rx: Vec<_> = (0..50).map(|_| hub.subscribe("d@lab")).collect();
        let watched = hub.watched();
        assert_eq!(
            watched,
            vec![("d@lab".to_owned(), true)],
            "one topic, wanting a full update"
        );
        assert!(!hub.watched()[0].1, "the request is taken once");
        assert_eq!(hub.viewers("d@lab"), 50);
        hub.publish("d@lab", Arc::from("{\"full\":true}"));
        for r in &mut rx {
            assert_eq!(&*r.recv().await.unwrap(), "{\"full\":true}");
        }
        drop(rx);
        assert!(hub.watched().is_empty(), "nobody watches: the topic goes");
    }
}
