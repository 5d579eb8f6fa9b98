//! Schedules and expiry (issue 14), driven by moved time: the workers run with
//! `LABFLEET_TEST_CLOCK=1`, so their schedule clock is Redis' `TIME` plus the test-only
//! offset in `{lf}:testclock`, which this test moves. A weekly window in Europe/Berlin runs
//! its start and shutdown exactly once across 3 workers, one of them SIGKILLed and Redis
//! restarted in between; `--skip next` skips a week; `--extend` moves a shutdown; an
//! occurrence the clock jumped over is reported missed; the expiry tears the class down.

use std::process::Command;
use std::time::Duration;

use chrono::{DateTime, Datelike, Duration as Days, NaiveDate, TimeZone, Utc};
use chrono_tz::Europe::Berlin;
use labfleet_tests::bins::bin;
use labfleet_tests::fleet::WorkerOpts;
use labfleet_tests::redis_server::RedisOptions;
use labfleet_tests::wait::wait_for;
use redis::AsyncCommands;
use serde_json::Value;

use crate::reliability::{Rig, RigOpts, SERIAL};

/// The schedule's clock as the workers see it (a Redis just restarted may refuse the
/// first calls: tried again).
async fn sched_now(rig: &Rig) -> DateTime<Utc> {
    for _ in 0..100 {
        let mut c = rig.q().connection();
        let t: redis::RedisResult<(i64, i64)> = redis::cmd("TIME").query_async(&mut c).await;
        let off: redis::RedisResult<Option<i64>> = c.get(rig.q().key("testclock")).await;
        if let (Ok((s, us)), Ok(off)) = (t, off) {
            return Utc
                .timestamp_millis_opt(s * 1000 + us / 1000 + off.unwrap_or(0))
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("Redis did not answer TIME");
}

/// Moves the workers' schedule clock to `t`.
async fn set_clock(rig: &Rig, t: DateTime<Utc>) {
    let now = sched_now(rig).await;
    let by = Duration::from_millis((t - now).num_milliseconds().max(0) as u64);
    rig.store.advance_test_clock(by).await.unwrap();
}

fn berlin(d: NaiveDate, hm: (u32, u32)) -> DateTime<Utc> {
    Berlin
        .from_local_datetime(&d.and_hms_opt(hm.0, hm.1, 0).unwrap())
        .earliest()
        .unwrap()
        .with_timezone(&Utc)
}

fn producer(rig: &Rig, args: &[&str]) -> std::process::Output {
    Command::new(bin("producer"))
        .arg("--data-dir")
        .arg(rig.data.path())
        .arg("--redis")
        .arg(&rig.redis_url)
        .args(args)
        .env("LABFLEET_SECRET_KEY", rig.key.to_base64().expose())
        .env("LABFLEET_TEST_CLOCK", "1")
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn vm_states(rig: &Rig) -> Vec<String> {
    rig.sim
        .vms()
        .into_iter()
        .filter(|v| !v.template)
        .map(|v| v.status)
        .collect()
}

fn tasks(rig: &Rig, ttype: &str) -> u64 {
    rig.sim.stats()["tasks"][ttype]["ok"].as_u64().unwrap_or(0)
}

/// Asserts the simulator ran `want` VM starts; when it did not, prints what the workers
/// logged about schedules and power, which says which event or job started the extra ones.
fn assert_starts(rig: &Rig, want: u64, why: &str) {
    let got = tasks(rig, "qmstart");
    if got == want {
        return;
    }
    for (name, log) in rig.fleet.logs() {
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| {
                ["schedule", "power", "start", "lease"]
                    .iter()
                    .any(|w| l.contains(w))
            })
            .collect();
        eprintln!("== worker {name}\n{}", lines.join("\n"));
    }
    panic!("{got} VM starts, {want} expected: {why}");
}

async fn outcome(rig: &Rig, id: &str, event: &str) -> Option<String> {
    rig.store
        .schedule_log(id)
        .await
        .unwrap_or_default()
        .into_iter()
        .find(|l| l.event == event)
        .map(|l| l.outcome)
}

async fn wait_outcome(rig: &Rig, id: &str, event: &str, want: &str) {
    wait_for(
        Duration::from_secs(60),
        &format!("{event} {want}"),
        || async { outcome(rig, id, event).await.as_deref() == Some(want) },
    )
    .await;
}

async fn wait_vms(rig: &Rig, want: &str) {
    wait_for(
        Duration::from_secs(60),
        &format!("every VM {want}"),
        || async {
            let s = vm_states(rig);
            !s.is_empty() && s.iter().all(|x| x == want)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weekly_schedule_runs_each_event_once_across_crashes_skip_extend_and_expiry() {
    let _one_at_a_time = SERIAL.lock().await;
    // The first window: tomorrow (Berlin) 10:00-10:30; weekly; expiry four weeks later.
    let today = Utc::now().with_timezone(&Berlin).date_naive();
    let day1 = today + Days::days(1);
    let day = |week: i64| day1 + Days::days(7 * week);
    let wd = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
        [day1.weekday().num_days_from_monday() as usize];
    let occ = |week: i64| format!("{}T10:00", day(week).format("%Y-%m-%d"));
    let deployment = format!(
        "name: sched-lab\nmachines:\n  - {{device_type: linux, name: student-pc, template_node: pve1, template_vmid: 100, networks: [{{bridge: vmbr0}}]}}\nschedule:\n  timezone: Europe/Berlin\n  start_before: 10m\n  warn_before: 10m\n  expires_at: \"{} 12:00\"\n  windows:\n    - {{days: [{wd}], start: \"10:00\", end: \"10:30\"}}\n",
        day(3).format("%Y-%m-%d")
    );
    let mut rig = Rig::new(RigOpts {
        users: 2,
        deployment,
        workers: WorkerOpts {
            test_clock: true,
            ..WorkerOpts::default()
        },
        redis: RedisOptions {
            appendfsync: "always",
            ..RedisOptions::default()
        },
        ..RigOpts::default()
    })
    .await;
    let names: Vec<String> = (0..3).map(|_| rig.fleet.spawn()).collect();
    let (id, _) = rig.submit().await;
    rig.wait_state(&id, "done", Duration::from_secs(120)).await;
    let listed = producer(&rig, &["--json", "schedule", &id]);
    assert!(listed.status.success(), "{listed:?}");
    let doc: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(doc["coming"][0]["event"], format!("{}/start", occ(0)));
    assert_eq!(doc["timezone"], "Europe/Berlin");

    // Week 0: started at 09:50 (start_before), a worker SIGKILLed, Redis restarted, then
    // shut down at 10:30: one start and one shutdown per VM.
    set_clock(&rig, berlin(day(0), (9, 51))).await;
    wait_outcome(&rig, &id, &format!("{}/start", occ(0)), "fired").await;
    wait_vms(&rig, "running").await;
    rig.fleet.kill(&names[1]);
    rig.redis.as_mut().unwrap().restart();
    set_clock(&rig, berlin(day(0), (10, 21))).await;
    wait_outcome(&rig, &id, &format!("{}/warn", occ(0)), "fired").await;
    let st = producer(&rig, &["--json", "status", &id]);
    let st: Value = serde_json::from_slice(&st.stdout).unwrap();
    let warning = st["schedule"]["warning"].as_str().unwrap_or_default();
    assert!(warning.starts_with("the VMs shut down at "), "{st}");
    assert_eq!(
        st["schedule"]["next"]["event"],
        format!("{}/shutdown", occ(0))
    );
    // The dashboard's deployment page carries it too.
    let plans = producer::serve::model::PlanCache::default();
    let view = producer::serve::model::deployment(&rig.store, &plans, &id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(view.schedule_warning.as_deref(), Some(warning));
    set_clock(&rig, berlin(day(0), (10, 31))).await;
    wait_outcome(&rig, &id, &format!("{}/shutdown", occ(0)), "fired").await;
    wait_vms(&rig, "stopped").await;
    assert_starts(&rig, 2, "one start per VM");
    assert_eq!(tasks(&rig, "qmshutdown"), 2, "one shutdown per VM");

    // Week 1 skipped.
    let skip = producer(&rig, &["schedule", &id, "--skip", "next"]);
    assert!(skip.status.success(), "{skip:?}");
    set_clock(&rig, berlin(day(1), (10, 31))).await;
    wait_outcome(&rig, &id, &format!("{}/shutdown", occ(1)), "skipped").await;
    assert_eq!(
        outcome(&rig, &id, &format!("{}/start", occ(1)))
            .await
            .as_deref(),
        Some("skipped")
    );
    assert_starts(&rig, 2, "a skipped week starts nothing");

    // Week 2: extended by 30 minutes: still running at 10:31, stopped after 11:00.
    set_clock(&rig, berlin(day(2), (9, 51))).await;
    wait_vms(&rig, "running").await;
    let ext = producer(&rig, &["schedule", &id, "--extend", "30m"]);
    assert!(ext.status.success(), "{ext:?}");
    set_clock(&rig, berlin(day(2), (10, 31))).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(vm_states(&rig).iter().all(|s| s == "running"));
    assert_eq!(
        outcome(&rig, &id, &format!("{}/shutdown", occ(2))).await,
        None
    );
    set_clock(&rig, berlin(day(2), (11, 1))).await;
    wait_outcome(&rig, &id, &format!("{}/shutdown", occ(2)), "fired").await;
    wait_vms(&rig, "stopped").await;
    assert_starts(&rig, 4, "week 2 started each VM once");

    // Jump past week 3's window to after the expiry: the window is reported missed, the
    // expiry tears the class down.
    set_clock(&rig, berlin(day(3), (12, 1))).await;
    wait_outcome(&rig, &id, "expiry/expire", "fired").await;
    assert_eq!(
        outcome(&rig, &id, &format!("{}/start", occ(3)))
            .await
            .as_deref(),
        Some("missed")
    );
    let ran = producer(&rig, &["schedule", &id]);
    assert!(ran.status.success(), "{ran:?}");
    let text = String::from_utf8_lossy(&ran.stdout);
    assert!(
        text.contains("skipped") && text.contains("missed"),
        "{text}"
    );
    eprintln!("{text}");
    rig.wait_state(&id, "torn-down", Duration::from_secs(120))
        .await;
    assert!(vm_states(&rig).is_empty());
    assert_starts(&rig, 4, "the missed window started nothing");
}
