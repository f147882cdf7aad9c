//! Schedules: windows with a raised floor of replicas (issue 6). A window is active
//! from each start of its cron expression, in its time zone, for its duration.

use std::time::{Duration, SystemTime};

use jiff::{Timestamp, tz::TimeZone};
use snooze_crds::Schedule;

/// The highest `minReplicas` of the windows active at `now` (0 when none is), or a
/// readable error for an invalid cron expression or time zone.
pub fn floor_at(schedules: &[Schedule], now: SystemTime) -> Result<i32, String> {
    let mut floor = 0;
    let ts = Timestamp::try_from(now).map_err(|e| e.to_string())?;
    for s in schedules {
        let tz = TimeZone::get(&s.time_zone)
            .map_err(|_| format!("unknown time zone {:?}", s.time_zone))?;
        let cron: croner::Cron = s
            .cron
            .parse()
            .map_err(|e| format!("invalid cron {:?}: {e}", s.cron))?;
        let here = ts.to_zoned(tz);
        let Ok(start) = cron.find_previous_occurrence(&here, true) else {
            continue;
        };
        let dur: Duration = s.duration.into();
        let end = start
            .timestamp()
            .checked_add(jiff::SignedDuration::try_from(dur).map_err(|e| e.to_string())?);
        if end.is_ok_and(|end| ts < end) {
            floor = floor.max(s.min_replicas);
        }
    }
    Ok(floor)
}

/// Checks every schedule now, so a bad one is reported before it matters.
pub fn validate(schedules: &[Schedule]) -> Result<(), String> {
    floor_at(schedules, SystemTime::now()).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(cron: &str, tz: &str, minutes: u64, min: i32) -> Schedule {
        Schedule {
            cron: cron.into(),
            time_zone: tz.into(),
            duration: Duration::from_secs(minutes * 60).into(),
            min_replicas: min,
        }
    }

    fn t(rfc3339: &str) -> SystemTime {
        SystemTime::from(rfc3339.parse::<Timestamp>().unwrap())
    }

    #[test]
    fn weekday_mornings_in_a_time_zone() {
        // 08:00–10:00 Paris time on weekdays; 2026-11-23 is a Monday (UTC+1 in winter).
        let s = [sched("0 8 * * 1-5", "Europe/Paris", 120, 3)];
        assert_eq!(floor_at(&s, t("2026-11-23T06:59:00Z")).unwrap(), 0);
        assert_eq!(floor_at(&s, t("2026-11-23T07:00:00Z")).unwrap(), 3);
        assert_eq!(floor_at(&s, t("2026-11-23T08:59:59Z")).unwrap(), 3);
        assert_eq!(floor_at(&s, t("2026-11-23T09:00:00Z")).unwrap(), 0);
        // Saturday: none.
        assert_eq!(floor_at(&s, t("2026-11-28T07:30:00Z")).unwrap(), 0);
    }

    #[test]
    fn overlapping_windows_take_the_highest_floor() {
        let s = [
            sched("0 * * * *", "UTC", 30, 2),
            sched("0 12 * * *", "UTC", 60, 5),
        ];
        assert_eq!(floor_at(&s, t("2026-11-23T12:10:00Z")).unwrap(), 5);
        assert_eq!(floor_at(&s, t("2026-11-23T13:10:00Z")).unwrap(), 2);
        assert_eq!(floor_at(&s, t("2026-11-23T13:40:00Z")).unwrap(), 0);
    }

    #[test]
    fn bad_cron_or_zone_is_a_readable_error() {
        let e = floor_at(&[sched("61 * * * *", "UTC", 10, 1)], SystemTime::now()).unwrap_err();
        assert!(e.contains("invalid cron"), "{e}");
        let e = floor_at(
            &[sched("0 8 * * *", "Mars/Olympus", 10, 1)],
            SystemTime::now(),
        )
        .unwrap_err();
        assert!(e.contains("unknown time zone"), "{e}");
    }
}
