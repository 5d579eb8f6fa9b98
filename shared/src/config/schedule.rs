//! `schedule:` in deployment_config.yml: when the class runs (one-off and weekly windows in
//! a required IANA time zone), how long before a window the VMs are started
//! (`start_before`), when a warning precedes a shutdown or the expiry (`warn_before`), and
//! when the deployment is torn down (`expires_at`).
//!
//! Times are wall-clock times in the zone, across DST changes: a time that falls in a DST
//! gap moves to the first valid minute after it; one that falls in a repeated hour is its
//! first occurrence. `jobs::schedule` turns the validated [`Schedule`] into durable events.

use std::path::Path;

use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Utc, Weekday};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;

use super::issue::Issue;

/// `schedule:` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSchedule {
    pub timezone: Option<Spanned<String>>,
    pub start_before: Option<Spanned<String>>,
    pub warn_before: Option<Spanned<String>>,
    pub expires_at: Option<Spanned<String>>,
    #[serde(default)]
    pub windows: Vec<RawWindow>,
}

/// One window: `{days: [mon, wed], start: "08:00", end: "09:30"}` (weekly) or
/// `{date: 2026-12-10, start: "14:00", end: "16:00"}` (one-off).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWindow {
    pub days: Option<Spanned<Vec<String>>>,
    pub date: Option<Spanned<String>>,
    pub start: Spanned<String>,
    pub end: Spanned<String>,
}

/// The validated schedule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// IANA name (`Europe/Berlin`).
    pub timezone: String,
    pub start_before_secs: u64,
    pub warn_before_secs: u64,
    /// Local wall time of the teardown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<NaiveDateTime>,
    pub windows: Vec<Window>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    /// Weekdays (0 = Monday) of a weekly window; empty for a one-off.
    #[serde(default)]
    pub days: Vec<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub date: Option<NaiveDate>,
    pub start: NaiveTime,
    pub end: NaiveTime,
}

/// The defaults of `start_before` and `warn_before`: ten minutes.
pub const DEFAULT_LEAD_SECS: u64 = 600;

impl Schedule {
    pub fn tz(&self) -> Tz {
        self.timezone.parse().unwrap_or(Tz::UTC)
    }

    /// The instant of a local wall time in the schedule's zone (DST gap: the first valid
    /// minute after it; repeated hour: the first).
    pub fn instant(&self, local: NaiveDateTime) -> DateTime<Utc> {
        to_utc(self.tz(), local)
    }
}

/// A local wall time in `tz` as an instant (see [`Schedule::instant`]).
pub fn to_utc(tz: Tz, local: NaiveDateTime) -> DateTime<Utc> {
    let mut t = local;
    for _ in 0..=180 {
        if let Some(d) = tz.from_local_datetime(&t).earliest() {
            return d.with_timezone(&Utc);
        }
        t += chrono::Duration::minutes(1);
    }
    Utc.from_utc_datetime(&local)
}

/// `90s`, `10m`, `1h`, `1h30m`, `2d` -> seconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a duration: write e.g. 90s, 10m, 1h30m or 2d");
    let mut total = 0u64;
    let mut num = String::new();
    for c in s.trim().chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num.parse().map_err(|_| bad())?;
        num.clear();
        total += n * match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(bad()),
        };
    }
    if !num.is_empty() || s.trim().is_empty() {
        return Err(bad());
    }
    Ok(total)
}

fn weekday(s: &str) -> Option<u8> {
    let d: Weekday = s.parse().ok()?;
    Some(d.num_days_from_monday() as u8)
}

fn time(s: &str) -> Result<NaiveTime, String> {
    NaiveTime::parse_from_str(s.trim(), "%H:%M")
        .map_err(|_| format!("{s:?} is not a time of day: write HH:MM, e.g. \"08:15\""))
}

/// Parses `YYYY-MM-DD HH:MM` (or with a `T`).
pub fn parse_local(s: &str) -> Result<NaiveDateTime, String> {
    let t = s.trim().replace('T', " ");
    NaiveDateTime::parse_from_str(&t, "%Y-%m-%d %H:%M").map_err(|_| {
        format!("{s:?} is not a local date and time: write \"YYYY-MM-DD HH:MM\" (in the schedule's timezone)")
    })
}

struct Cx<'a> {
    file: &'a Path,
    issues: &'a mut Vec<Issue>,
}

impl Cx<'_> {
    fn at<T>(&mut self, s: &Spanned<T>, msg: impl Into<String>, hint: &str) {
        let mut i = Issue::new(self.file, s.referenced.line(), s.referenced.column(), msg);
        if !hint.is_empty() {
            i.hint = Some(hint.to_owned());
        }
        self.issues.push(i);
    }
    fn duration(&mut self, s: &Option<Spanned<String>>, what: &str) -> u64 {
        match s {
            None => DEFAULT_LEAD_SECS,
            Some(v) => parse_duration(&v.value).unwrap_or_else(|e| {
                self.at(v, format!("{what}: {e}"), "the default is 10m");
                DEFAULT_LEAD_SECS
            }),
        }
    }
}

/// Converts `schedule:`, pushing every problem to `issues` (located in `file`).
pub(super) fn from_raw(
    raw: &Spanned<RawSchedule>,
    file: &Path,
    issues: &mut Vec<Issue>,
) -> Option<Schedule> {
    let before = issues.len();
    let mut cx = Cx { file, issues };
    let r = &raw.value;
    let timezone = match &r.timezone {
        None => {
            cx.at(
                raw,
                "schedule needs a timezone",
                "add e.g. `timezone: Europe/Berlin` (an IANA name): times are wall-clock times there",
            );
            String::new()
        }
        Some(t) => match t.value.parse::<Tz>() {
            Ok(tz) => tz.name().to_owned(),
            Err(_) => {
                cx.at(
                    t,
                    format!("timezone {:?} is not an IANA time zone", t.value),
                    "write a name of the tz database, e.g. Europe/Berlin, America/New_York or UTC",
                );
                String::new()
            }
        },
    };
    let start_before_secs = cx.duration(&r.start_before, "start_before");
    let warn_before_secs = cx.duration(&r.warn_before, "warn_before");
    let expires_at = r.expires_at.as_ref().and_then(|e| {
        parse_local(&e.value)
            .map_err(|m| cx.at(e, format!("expires_at: {m}"), ""))
            .ok()
    });
    let mut windows = Vec::new();
    for w in &r.windows {
        if let Some(win) = window(w, &mut cx) {
            windows.push(win);
        }
    }
    if windows.is_empty() && expires_at.is_none() && cx.issues.len() == before {
        cx.at(
            raw,
            "schedule has neither windows nor expires_at",
            "add `windows: [{days: [mon], start: \"08:00\", end: \"10:00\"}]` or `expires_at: \"2027-01-31 18:00\"`",
        );
    }
    (issues.len() == before).then_some(Schedule {
        timezone,
        start_before_secs,
        warn_before_secs,
        expires_at,
        windows,
    })
}

fn window(w: &RawWindow, cx: &mut Cx<'_>) -> Option<Window> {
    let start = time(&w.start.value)
        .map_err(|e| cx.at(&w.start, e, ""))
        .ok();
    let end = time(&w.end.value).map_err(|e| cx.at(&w.end, e, "")).ok();
    let (start, end) = (start?, end?);
    if end <= start {
        cx.at(
            &w.end,
            format!(
                "window ends ({}) before it starts ({})",
                w.end.value, w.start.value
            ),
            "a window lies within one day; split one that crosses midnight in two",
        );
        return None;
    }
    match (&w.days, &w.date) {
        (Some(d), None) => {
            let mut days = Vec::new();
            for s in &d.value {
                match weekday(s) {
                    Some(n) => days.push(n),
                    None => {
                        cx.at(
                            d,
                            format!("{s:?} is not a weekday"),
                            "use mon, tue, wed, thu, fri, sat, sun",
                        );
                        return None;
                    }
                }
            }
            if days.is_empty() {
                cx.at(
                    d,
                    "days is empty",
                    "list the weekdays of the window, e.g. [mon, thu]",
                );
                return None;
            }
            days.sort_unstable();
            days.dedup();
            Some(Window {
                days,
                date: None,
                start,
                end,
            })
        }
        (None, Some(d)) => match NaiveDate::parse_from_str(d.value.trim(), "%Y-%m-%d") {
            Ok(date) => Some(Window {
                days: vec![],
                date: Some(date),
                start,
                end,
            }),
            Err(_) => {
                cx.at(
                    d,
                    format!("{:?} is not a date", d.value),
                    "write YYYY-MM-DD",
                );
                None
            }
        },
        _ => {
            cx.at(
                &w.start,
                "a window needs either `days` (weekly) or `date` (one-off)",
                "e.g. {days: [mon], start: \"08:00\", end: \"10:00\"} or {date: 2026-12-10, start: \"14:00\", end: \"16:00\"}",
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_dst() {
        assert_eq!(parse_duration("10m").unwrap(), 600);
        assert_eq!(parse_duration("1h30m").unwrap(), 5400);
        assert!(parse_duration("10").is_err() && parse_duration("x").is_err());
        let tz: Tz = "Europe/Berlin".parse().unwrap();
        // 2027-03-28 02:30 does not exist in Berlin (clocks go 02:00 -> 03:00).
        let gap = parse_local("2027-03-28 02:30").unwrap();
        assert_eq!(to_utc(tz, gap).to_rfc3339(), "2027-03-28T01:00:00+00:00");
        // 2026-10-25 02:30 happens twice: the first (CEST, UTC+2).
        let twice = parse_local("2026-10-25 02:30").unwrap();
        assert_eq!(to_utc(tz, twice).to_rfc3339(), "2026-10-25T00:30:00+00:00");
    }
}
