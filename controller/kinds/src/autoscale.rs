//! A pool that sizes itself: `spec.autoscale` (a buffer above the bound instances, schedules
//! that raise the floor, demand-driven pre-warming) and the cron schedules it reads. Types and
//! pure time arithmetic only; the decision is `poolkeeper_core::autoscale`.

use std::borrow::Cow;
use std::collections::BTreeSet;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// How a pool sizes its warm instances. The pool keeps the largest of what `warm`, `min`,
/// `buffer`, the open `schedules` and `demand` ask for, within `max`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Autoscale {
    /// Ready instances to keep above the bound ones: a count (`5`) or a share of the bound
    /// ones (`"20%"`, rounded up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buffer: Option<Buffer>,
    /// Fewest warm instances, whatever the other policies say.
    #[serde(default)]
    pub min: u32,
    /// Most warm instances the policies may ask for (the pool's `max` still caps all of its
    /// instances).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u32>,
    /// Windows that raise the floor: from each time `cron` fires (in `timeZone`), for
    /// `duration`, keep at least `warm`. The pool starts filling one fill time before.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedules: Vec<Schedule>,
    /// Size the pool from the claims' arrival rate and the pool's fill time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub demand: Option<Demand>,
    /// Time between two scale-downs, and after a scale-up before the first (default `60s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down_cooldown: Option<String>,
    /// Warm instances removed at most per scale-down (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_down_step: Option<u32>,
}

/// A number of instances, or a percentage of another number (`"20%"`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(untagged)]
pub enum Buffer {
    Count(u32),
    Percent(String),
}

impl JsonSchema for Buffer {
    fn schema_name() -> Cow<'static, str> {
        "Buffer".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "x-kubernetes-int-or-string": true })
    }
}

impl Buffer {
    /// Ready instances wanted above `bound`: the count, or the percentage of `bound` rounded
    /// up. An invalid percentage (refused by validation) wants none.
    pub fn above(&self, bound: u32) -> u32 {
        match self {
            Buffer::Count(n) => *n,
            Buffer::Percent(p) => match parse_percent(p) {
                Ok(pct) => (u64::from(bound) * u64::from(pct)).div_ceil(100) as u32,
                Err(_) => 0,
            },
        }
    }
}

/// `"20%"` -> 20 (0 to 1000).
pub fn parse_percent(text: &str) -> Result<u32, String> {
    let digits = text
        .trim()
        .strip_suffix('%')
        .ok_or_else(|| format!("{text:?} is neither a count nor a percentage like \"20%\""))?;
    let n: u32 = digits
        .trim()
        .parse()
        .map_err(|_| format!("{text:?}: not a whole percentage like \"20%\""))?;
    if n > 1000 {
        return Err(format!("{text:?}: at most 1000%"));
    }
    Ok(n)
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Schedule {
    /// When the window opens: five cron fields (minute hour day-of-month month day-of-week;
    /// `*`, lists, ranges and steps; day of week 0-7, Sunday 0 or 7).
    pub cron: String,
    /// The IANA time zone the cron reads in (default `UTC`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// How long the window stays open (e.g. `2h`).
    pub duration: String,
    /// Warm instances to keep while it is open.
    pub warm: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Demand {
    /// Share of claims to bind at once from a warm instance (default 0.99; below 1).
    #[serde(default = "default_hit_rate")]
    pub hit_rate: f64,
    /// How far back arrivals are counted for the rate (default `10m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
}

fn default_hit_rate() -> f64 {
    0.99
}

impl Default for Demand {
    fn default() -> Self {
        Demand {
            hit_rate: default_hit_rate(),
            window: None,
        }
    }
}

/// A parsed five-field cron expression.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cron {
    minutes: BTreeSet<u8>,
    hours: BTreeSet<u8>,
    days: BTreeSet<u8>,
    months: BTreeSet<u8>,
    weekdays: BTreeSet<u8>,
    /// Day of month and day of week both restricted: either matches (as cron does).
    either_day: bool,
}

fn field(text: &str, name: &str, lo: u8, hi: u8) -> Result<BTreeSet<u8>, String> {
    let mut out = BTreeSet::new();
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let step: u8 = s
                    .parse()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| format!("{name}: step {s:?} is not a positive number"))?;
                (r, step)
            }
            None => (part, 1),
        };
        let number = |s: &str| -> Result<u8, String> {
            s.parse::<u8>()
                .ok()
                .filter(|n| (lo..=hi).contains(n))
                .ok_or_else(|| format!("{name}: {s:?} is not a number from {lo} to {hi}"))
        };
        let (from, to) = if range == "*" {
            (lo, hi)
        } else if let Some((a, b)) = range.split_once('-') {
            let (a, b) = (number(a)?, number(b)?);
            if a > b {
                return Err(format!("{name}: range {range:?} runs backwards"));
            }
            (a, b)
        } else {
            let n = number(range)?;
            (n, if part.contains('/') { hi } else { n })
        };
        out.extend((from..=to).step_by(usize::from(step)));
    }
    Ok(out)
}

impl Cron {
    pub fn parse(text: &str) -> Result<Cron, String> {
        let parts: Vec<&str> = text.split_whitespace().collect();
        let [m, h, dom, mon, dow] = parts[..] else {
            return Err(format!(
                "{text:?}: expected five fields (minute hour day-of-month month day-of-week)"
            ));
        };
        let mut weekdays = field(dow, "day of week", 0, 7)?;
        if weekdays.remove(&7) {
            weekdays.insert(0);
        }
        Ok(Cron {
            minutes: field(m, "minute", 0, 59)?,
            hours: field(h, "hour", 0, 23)?,
            days: field(dom, "day of month", 1, 31)?,
            months: field(mon, "month", 1, 12)?,
            weekdays,
            either_day: dom != "*" && dow != "*",
        })
    }

    fn day_matches(&self, date: jiff::civil::Date) -> bool {
        if !self.months.contains(&(date.month() as u8)) {
            return false;
        }
        let dom = self.days.contains(&(date.day() as u8));
        let dow = self
            .weekdays
            .contains(&(date.weekday().to_sunday_zero_offset() as u8));
        if self.either_day {
            dom || dow
        } else {
            dom && dow
        }
    }

    /// The last time at or before `at` (unix ms) that this fires in `tz`, looking back at most
    /// `within_ms`.
    pub fn last_fire(&self, tz: &jiff::tz::TimeZone, at_ms: i64, within_ms: i64) -> Option<i64> {
        let now = jiff::Timestamp::from_millisecond(at_ms)
            .ok()?
            .to_zoned(tz.clone());
        let earliest = at_ms - within_ms;
        // Local times more than a DST change (at most a few hours) after now are later than
        // now: passed over without a time-zone conversion.
        let beyond = now
            .datetime()
            .checked_add(jiff::SignedDuration::from_hours(3))
            .ok();
        let mut date = now.date();
        loop {
            if self.day_matches(date) {
                // Latest first: the first time at or before `at` is the last fire, and it is
                // either recent enough or too old (so is every earlier one).
                for h in self.hours.iter().rev() {
                    for m in self.minutes.iter().rev() {
                        let t = date.at(*h as i8, *m as i8, 0, 0);
                        if beyond.is_some_and(|b| t > b) {
                            continue;
                        }
                        // Compared as instants, not as local times: in an hour that a DST
                        // change repeats, a local time already passed the first time round
                        // is later on the clock than now, and still the last fire. Such a
                        // time fires once, at its first instant; a time that the change
                        // skips fires as long after the change as it was into the hour
                        // (02:30 when 02:00 jumps to 03:00: 03:30), as RFC 9557 does.
                        let Ok(z) = t.to_zoned(tz.clone()) else {
                            continue;
                        };
                        let ms = z.timestamp().as_millisecond();
                        if ms > at_ms {
                            continue;
                        }
                        return (ms >= earliest).then_some(ms);
                    }
                }
            }
            // The day before ends where the date just searched begins (a day lasts 23 to 25
            // hours across DST changes): when that is before `earliest`, so is every fire.
            let start = date.to_zoned(tz.clone()).ok()?.timestamp().as_millisecond();
            if start <= earliest {
                return None;
            }
            date = date.yesterday().ok()?;
        }
    }

    /// Whether it fires at all (`0 0 31 2 *`, February 31st, never does): some day of the next
    /// eight years matches (a day of week recurs weekly, a month yearly, Feb 29 within eight).
    pub fn ever_fires(&self) -> bool {
        let Ok(start) = jiff::civil::Date::new(2024, 1, 1) else {
            return false;
        };
        let mut date = start;
        for _ in 0..(366 * 8) {
            if self.day_matches(date) {
                return true;
            }
            match date.tomorrow() {
                Ok(d) => date = d,
                Err(_) => return false,
            }
        }
        false
    }
}

/// The time zone of a schedule (`UTC` when none is named), from the IANA database bundled in
/// the binary (containers often have none on disk).
pub fn time_zone(name: Option<&str>) -> Result<jiff::tz::TimeZone, String> {
    match name {
        None => Ok(jiff::tz::TimeZone::UTC),
        Some(n) => jiff::tz::db()
            .get(n)
            .map_err(|_| format!("unknown time zone {n:?} (an IANA name like Europe/Paris)")),
    }
}

impl Schedule {
    /// Whether the window is open at `at_ms`, or opens within `lead_ms` (to fill ahead of it).
    /// Invalid schedules (refused by validation) are never open.
    pub fn open(&self, at_ms: i64, lead_ms: i64) -> bool {
        let (Ok(cron), Ok(tz), Ok(duration)) = (
            Cron::parse(&self.cron),
            time_zone(self.time_zone.as_deref()),
            crate::units::parse_duration(&self.duration),
        ) else {
            return false;
        };
        let duration = duration.as_millis() as i64;
        cron.last_fire(&tz, at_ms + lead_ms, duration + lead_ms)
            .is_some_and(|fired| fired + duration > at_ms)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ms(text: &str) -> i64 {
        text.parse::<jiff::Timestamp>().unwrap().as_millisecond()
    }

    fn class() -> Schedule {
        Schedule {
            cron: "50 8 * * 1-5".into(),
            time_zone: Some("Europe/Paris".into()),
            duration: "2h".into(),
            warm: 40,
        }
    }

    #[test]
    fn a_weekday_class_window_is_open_from_its_start_for_its_duration_in_its_time_zone() {
        let s = class();
        // Friday 2026-12-04, Paris is UTC+1: 08:50 local is 07:50Z.
        assert!(!s.open(ms("2026-12-04T07:49:00Z"), 0));
        assert!(s.open(ms("2026-12-04T07:50:00Z"), 0));
        assert!(s.open(ms("2026-12-04T09:49:59Z"), 0));
        assert!(!s.open(ms("2026-12-04T09:50:00Z"), 0));
        // Saturday: closed all day.
        assert!(!s.open(ms("2026-12-05T08:00:00Z"), 0));
    }

    fn window(cron: &str, zone: &str, duration: &str) -> Schedule {
        Schedule {
            cron: cron.into(),
            time_zone: Some(zone.into()),
            duration: duration.into(),
            warm: 1,
        }
    }

    /// Found in review: in the hour that the end of DST repeats, a window opened the first time
    /// round was taken for not yet opened the second time round (local times were compared).
    #[test]
    fn a_window_opened_in_a_repeated_hour_stays_open_through_its_repeat() {
        // New York, 2026-11-01: 02:00 EDT goes back to 01:00 EST. 01:30 EDT is 05:30Z.
        let s = window("30 1 * * *", "America/New_York", "2h");
        assert!(!s.open(ms("2026-11-01T05:29:00Z"), 0));
        assert!(s.open(ms("2026-11-01T05:30:00Z"), 0));
        // 01:10 EST, the second time round: still open, until 07:30Z.
        assert!(s.open(ms("2026-11-01T06:10:00Z"), 0));
        assert!(s.open(ms("2026-11-01T07:29:00Z"), 0));
        assert!(!s.open(ms("2026-11-01T07:30:00Z"), 0));
    }

    /// Found in review: a day of 25 hours (the end of DST) was searched as if of 24, and a window
    /// opened late that day closed early.
    #[test]
    fn a_window_opened_late_on_a_day_of_25_hours_stays_open_for_its_duration() {
        // Paris, 2026-10-25 (03:00 CEST went back to 02:00 CET): 23:30 CET is 22:30Z.
        let s = window("30 23 * * *", "Europe/Paris", "1h");
        assert!(s.open(ms("2026-10-25T22:30:00Z"), 0));
        assert!(s.open(ms("2026-10-25T23:10:00Z"), 0));
        assert!(!s.open(ms("2026-10-25T23:30:00Z"), 0));
    }

    #[test]
    fn a_time_that_a_dst_change_skips_fires_as_long_after_the_change() {
        // Paris, 2026-03-29: 02:00 CET jumps to 03:00 CEST; 02:30 fires at 03:30 CEST (01:30Z).
        let s = window("30 2 * * *", "Europe/Paris", "1h");
        assert!(!s.open(ms("2026-03-29T01:29:00Z"), 0));
        assert!(s.open(ms("2026-03-29T01:30:00Z"), 0));
        // And on the next day as on any other (02:30 CEST is 00:30Z).
        assert!(s.open(ms("2026-03-30T00:30:00Z"), 0));
    }

    #[test]
    fn a_lead_opens_the_window_one_fill_time_early() {
        let s = class();
        assert!(!s.open(ms("2026-12-04T07:49:00Z"), 0));
        assert!(s.open(ms("2026-12-04T07:49:00Z"), 90_000));
    }

    #[test]
    fn the_last_fire_is_the_latest_at_or_before_and_none_when_older_than_asked() {
        let every = Cron::parse("* * * * *").unwrap();
        let utc = jiff::tz::TimeZone::UTC;
        let at = ms("2026-12-04T07:49:30Z");
        assert_eq!(
            every.last_fire(&utc, at, 60_000),
            Some(ms("2026-12-04T07:49:00Z"))
        );
        let daily = Cron::parse("50 8 * * *").unwrap();
        let paris = time_zone(Some("Europe/Paris")).unwrap();
        // Fired at 07:50Z today: found within 10 minutes, not within 1.
        assert_eq!(
            daily.last_fire(&paris, ms("2026-12-04T07:59:00Z"), 600_000),
            Some(ms("2026-12-04T07:50:00Z"))
        );
        assert_eq!(
            daily.last_fire(&paris, ms("2026-12-04T07:59:00Z"), 60_000),
            None
        );
        // Before today's 08:50 Paris: yesterday's, if the window reaches back that far.
        assert_eq!(
            daily.last_fire(&paris, ms("2026-12-04T07:00:00Z"), 86_400_000),
            Some(ms("2026-12-03T07:50:00Z"))
        );
    }

    #[test]
    fn cron_fields_take_lists_ranges_and_steps_and_refuse_the_rest() {
        let c = Cron::parse("*/15 9-17 * * 0,6").unwrap();
        assert_eq!(c.minutes, [0, 15, 30, 45].into());
        assert_eq!(c.hours.len(), 9);
        assert_eq!(c.weekdays, [0, 6].into());
        assert_eq!(Cron::parse("0 0 * * 7").unwrap().weekdays, [0].into());
        for bad in [
            "",
            "* * * *",
            "60 * * * *",
            "* 24 * * *",
            "5-1 * * * *",
            "*/0 * * * *",
        ] {
            assert!(Cron::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn february_31st_never_fires_and_february_29th_does() {
        assert!(!Cron::parse("0 0 31 2 *").unwrap().ever_fires());
        assert!(!Cron::parse("0 0 30 2 *").unwrap().ever_fires());
        assert!(Cron::parse("0 0 29 2 *").unwrap().ever_fires());
        assert!(Cron::parse("0 9 * * 1-5").unwrap().ever_fires());
    }

    #[test]
    fn unknown_time_zones_are_refused_by_name() {
        assert!(time_zone(Some("Europe/Paris")).is_ok());
        let e = time_zone(Some("Mars/Olympus")).unwrap_err();
        assert!(e.contains("Mars/Olympus"), "{e}");
    }

    #[test]
    fn a_buffer_is_a_count_or_a_share_of_the_bound_rounded_up() {
        assert_eq!(Buffer::Count(5).above(100), 5);
        assert_eq!(Buffer::Percent("20%".into()).above(11), 3);
        assert_eq!(Buffer::Percent("20%".into()).above(0), 0);
        assert!(parse_percent("20").is_err());
        assert!(parse_percent("1001%").is_err());
    }
}
