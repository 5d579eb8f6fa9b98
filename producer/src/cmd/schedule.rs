//! `producer schedule ID [--json] [--skip NEXT] [--extend DURATION]`: what is coming and
//! what ran of a deployment's schedule; `--skip next` (or an occurrence like
//! `2026-12-07T08:00`) skips an occurrence, `--extend 30m` moves the next shutdown (or the
//! expiry, when it comes first) later. The schedule itself comes from `schedule:` in the
//! deployment file, installed by `submit` (a changed one replaces it).

use serde_json::json;
use shared::config::schedule::parse_duration;
use shared::jobs::schedule::EventKind;
use shared::jobs::state::Store;
use shared::scheduler::{self, Event, ScheduleDoc};

use crate::cli::Global;
use crate::cmd::context;
use crate::exit::{Exit, Failure};
use crate::output::Out;

fn redis(e: impl Into<anyhow::Error>) -> Failure {
    Failure::new(Exit::RedisUnreachable, e)
}

fn usage(m: String) -> Failure {
    Failure::new(Exit::Usage, anyhow::anyhow!(m))
}

pub async fn run(
    g: &Global,
    id: &Option<String>,
    skip: Option<&str>,
    extend: Option<&str>,
    out: &mut Out,
) -> Result<Exit, Failure> {
    let id = context::resolve_id(g, id, out)?;
    let store = context::store(g).await?;
    if let Some(s) = skip {
        change(&store, &id, |doc, now| {
            let occ = if s == "next" || s == "NEXT" {
                scheduler::upcoming(doc, now, 50)
                    .into_iter()
                    .find(|e| e.kind == EventKind::Start && !doc.skip.contains(&e.occurrence))
                    .map(|e| e.occurrence)
                    .ok_or_else(|| usage(format!("{id}: no occurrence is coming")))?
            } else {
                s.to_owned()
            };
            doc.skip.insert(occ.clone());
            Ok(format!("skipping {occ}"))
        })
        .await
        .map(|m| out.err_line(m))?;
    }
    if let Some(d) = extend {
        let secs = parse_duration(d).map_err(|e| usage(format!("--extend: {e}")))? as i64;
        change(&store, &id, |doc, now| {
            let target = scheduler::upcoming(doc, now, 50).into_iter().find(|e| {
                matches!(e.kind, EventKind::Shutdown | EventKind::Expire)
                    && !doc.skip.contains(&e.occurrence)
            });
            let Some(t) = target else {
                return Err(usage(format!("{id}: no shutdown or expiry is coming")));
            };
            *doc.extend.entry(t.occurrence.clone()).or_default() += secs;
            Ok(format!("{} moved by {d}", t.id))
        })
        .await
        .map(|m| out.err_line(m))?;
    }
    print_listing(&store, &id, g.json, out).await?;
    Ok(Exit::Ok)
}

/// Prints what is coming (the next 10 events) and what ran (the last 20).
pub async fn print_listing(
    store: &Store,
    id: &str,
    json: bool,
    out: &mut Out,
) -> Result<(), Failure> {
    let (doc, _) = store
        .schedule_doc(id)
        .await
        .map_err(redis)?
        .ok_or_else(|| {
            usage(format!(
                "{id} has no schedule (add `schedule:` to deployment_config.yml and submit)"
            ))
        })?;
    let now = store.schedule_now().await.map_err(redis)?;
    let coming = scheduler::upcoming(&doc, now, 10);
    let ran = store.schedule_log(id).await.map_err(redis)?;
    if json {
        out.json(&json!({
            "id": id, "timezone": doc.def.timezone, "generation": doc.generation, "now": now,
            "skipped": doc.skip, "extended": doc.extend,
            "coming": coming.iter().map(|e| event_json(&doc, e)).collect::<Vec<_>>(),
            "ran": ran,
        }));
        return Ok(());
    }
    let tz = doc.def.tz();
    out.line(format!(
        "{id}: schedule (generation {}, times in {})",
        doc.generation, doc.def.timezone
    ));
    out.line("coming:");
    for e in &coming {
        let note = if doc.skip.contains(&e.occurrence) {
            " (skipped)"
        } else {
            ""
        };
        out.line(format!(
            "  {}  {:<12} {}{note}",
            e.due.with_timezone(&tz).format("%a %Y-%m-%d %H:%M"),
            scheduler::kind_name(e.kind),
            e.occurrence
        ));
    }
    out.line("ran:");
    for l in ran.iter().rev().take(20).rev() {
        out.line(format!(
            "  {}  {:<8} {}",
            l.due.with_timezone(&tz).format("%a %Y-%m-%d %H:%M"),
            l.outcome,
            l.event
        ));
    }
    Ok(())
}

fn event_json(doc: &ScheduleDoc, e: &Event) -> serde_json::Value {
    json!({
        "event": e.id, "kind": scheduler::kind_name(e.kind), "occurrence": e.occurrence,
        "due": e.due, "skipped": doc.skip.contains(&e.occurrence),
    })
}

/// Changes the stored schedule by compare-and-set, moving its pending event accordingly.
async fn change(
    store: &Store,
    id: &str,
    f: impl Fn(&mut ScheduleDoc, chrono::DateTime<chrono::Utc>) -> Result<String, Failure>,
) -> Result<String, Failure> {
    for _ in 0..8 {
        let Some((mut doc, raw)) = store.schedule_doc(id).await.map_err(redis)? else {
            return Err(usage(format!("{id} has no schedule")));
        };
        let now = store.schedule_now().await.map_err(redis)?;
        let msg = f(&mut doc, now)?;
        doc.pending = scheduler::next_event(&doc, now).map(|e| (e.due.timestamp_millis(), e.id));
        if store
            .put_schedule(id, &raw, Some(&doc), None)
            .await
            .map_err(redis)?
        {
            return Ok(msg);
        }
    }
    Err(redis(anyhow::anyhow!(
        "the schedule of {id} kept changing; run the command again"
    )))
}

/// For `status`: the next event of the schedule and, when the last thing that happened was
/// a warning (a shutdown or the expiry is coming), that warning.
pub async fn status_summary(store: &Store, id: &str) -> Result<Option<serde_json::Value>, Failure> {
    let Some((doc, _)) = store.schedule_doc(id).await.map_err(redis)? else {
        return Ok(None);
    };
    let now = store.schedule_now().await.map_err(redis)?;
    let tz = doc.def.tz();
    let next = scheduler::next_event(&doc, now);
    let ran = store.schedule_log(id).await.map_err(redis)?;
    let warning = ran
        .last()
        .filter(|l| l.outcome == "fired" && l.event.ends_with("warn"))
        .and(next.as_ref())
        .map(|n| {
            format!(
                "{} at {}",
                if n.kind == EventKind::Expire {
                    "the deployment expires (teardown)"
                } else {
                    "the VMs shut down"
                },
                n.due.with_timezone(&tz).format("%a %Y-%m-%d %H:%M %Z")
            )
        });
    Ok(Some(json!({
        "next": next.as_ref().map(|e| json!({
            "event": e.id, "kind": scheduler::kind_name(e.kind),
            "due": e.due, "local": e.due.with_timezone(&tz).format("%a %Y-%m-%d %H:%M %Z").to_string(),
        })),
        "warning": warning,
    })))
}
