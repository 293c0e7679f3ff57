//! Billing cycles (DESIGN.md R1): month-long half-open intervals of local midnights,
//! counted from the plan's start date in the workspace's timezone.

use chrono::{
    DateTime, Datelike, LocalResult, Months, NaiveDate, NaiveDateTime, Offset, TimeZone, Utc,
};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

/// Why no billing cycle could be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CycleError {
    /// The cycle would start or end outside the calendar chrono can represent (about
    /// ±262,000 years): the instant is absurdly far from the plan start.
    #[error("the billing cycle falls outside the representable calendar")]
    OutOfRange,
}

impl CycleError {
    /// Stable snake_case code that callers match on instead of the message.
    pub fn code(&self) -> &'static str {
        match self {
            CycleError::OutOfRange => "cycle_out_of_range",
        }
    }
}

/// One billing cycle: the half-open interval `[start, end)` (DESIGN.md R1).
///
/// `start` and `end` are the first instants of the local dates `first_day` and the
/// day after `last_day` in the workspace timezone, as UTC instants. The UI shows the
/// period as `first_day`–`last_day` and "Resets on" the local date of `end`, which are
/// the same boundaries enforcement uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BillingCycle {
    /// First instant of the cycle (inclusive), UTC.
    pub start: DateTime<Utc>,
    /// First instant of the next cycle (exclusive), UTC.
    pub end: DateTime<Utc>,
    /// The cycle's first local date.
    pub first_day: NaiveDate,
    /// The cycle's last local date: `end`'s local date minus one day.
    pub last_day: NaiveDate,
}

impl BillingCycle {
    /// The cycle that contains `at`, for a plan started on `plan_start` in `tz`.
    ///
    /// Cycle k starts at the first instant of the local date `plan_start + k months`,
    /// the day clamped to the month's end, months always added to `plan_start` itself
    /// (so a plan started on 31 January renews on 28/29 February, 31 March, 30 April).
    /// The first instant is local midnight; where midnight is ambiguous, its earliest
    /// occurrence; where a DST change skips midnight, the first instant after the gap.
    /// An instant exactly at a boundary belongs to the cycle that starts there; k is
    /// negative for instants before the plan start. Constant time: two or three
    /// boundary computations. Errors only outside chrono's calendar range.
    pub fn containing(
        plan_start: NaiveDate,
        tz: Tz,
        at: DateTime<Utc>,
    ) -> Result<BillingCycle, CycleError> {
        let local = at.with_timezone(&tz).date_naive();
        // The boundary of cycle k lies in the same local month as `at`, so either it
        // is at or before `at` (cycle k) or after it (cycle k - 1).
        let mut k = (i64::from(local.year()) - i64::from(plan_start.year())) * 12
            + i64::from(local.month())
            - i64::from(plan_start.month());
        let mut start = Boundary::of(plan_start, tz, k)?;
        let mut end = Boundary::of(plan_start, tz, k + 1)?;
        // Bounded, not a bare loop: with local time that only moves forward one step
        // settles it; the spare steps absorb a zone whose clock goes back across
        // midnight right at a boundary.
        for _ in 0..4 {
            if start.instant > at {
                k -= 1;
                end = start;
                start = Boundary::of(plan_start, tz, k)?;
            } else if end.instant <= at {
                k += 1;
                start = end;
                end = Boundary::of(plan_start, tz, k + 1)?;
            } else {
                break;
            }
        }
        if !(start.instant <= at && at < end.instant) {
            return Err(CycleError::OutOfRange);
        }
        Ok(BillingCycle {
            start: start.instant,
            end: end.instant,
            first_day: start.date,
            last_day: end.date.pred_opt().ok_or(CycleError::OutOfRange)?,
        })
    }

    /// When spend resets: the end of this cycle, UTC ("Resets on", DESIGN.md R1, §3).
    pub fn next_reset(&self) -> DateTime<Utc> {
        self.end
    }

    /// True when `at` falls in `[start, end)`.
    pub fn contains(&self, at: DateTime<Utc>) -> bool {
        self.start <= at && at < self.end
    }
}

/// A cycle boundary: its local date and its first instant.
#[derive(Debug, Clone, Copy)]
struct Boundary {
    date: NaiveDate,
    instant: DateTime<Utc>,
}

impl Boundary {
    fn of(plan_start: NaiveDate, tz: Tz, k: i64) -> Result<Boundary, CycleError> {
        let months =
            Months::new(u32::try_from(k.unsigned_abs()).map_err(|_| CycleError::OutOfRange)?);
        let date = if k >= 0 {
            plan_start.checked_add_months(months)
        } else {
            plan_start.checked_sub_months(months)
        }
        .ok_or(CycleError::OutOfRange)?;
        let instant = first_instant_of(tz, date).ok_or(CycleError::OutOfRange)?;
        Ok(Boundary { date, instant })
    }
}

/// The first instant whose local date in `tz` is `date`.
fn first_instant_of(tz: Tz, date: NaiveDate) -> Option<DateTime<Utc>> {
    let midnight = date.and_time(chrono::NaiveTime::MIN);
    match tz.from_local_datetime(&midnight) {
        LocalResult::Single(t) => Some(t.with_timezone(&Utc)),
        LocalResult::Ambiguous(earliest, _) => Some(earliest.with_timezone(&Utc)),
        LocalResult::None => first_instant_after_gap(tz, midnight),
    }
}

/// Local `midnight` does not exist (the clocks jump over it): find the UTC second at
/// which the local clock first reads `midnight` or later, i.e. the end of the gap.
///
/// Binary search over whole seconds (tz transitions fall on whole seconds) in a
/// window of ±26 hours around the naive instant, which covers every UTC offset the tz
/// database has, historical ones included. Runs only on the rare days a zone skips
/// midnight.
fn first_instant_after_gap(tz: Tz, midnight: NaiveDateTime) -> Option<DateTime<Utc>> {
    const WINDOW_SECS: i64 = 26 * 3600;
    let target = midnight.and_utc().timestamp();
    let local_secs_at = |utc_secs: i64| -> Option<i64> {
        let utc = DateTime::from_timestamp(utc_secs, 0)?;
        let offset = tz.offset_from_utc_datetime(&utc.naive_utc()).fix();
        Some(utc_secs + i64::from(offset.local_minus_utc()))
    };
    let mut lo = target - WINDOW_SECS;
    let mut hi = target + WINDOW_SECS;
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if local_secs_at(mid)? >= target {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    DateTime::from_timestamp(lo, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, FixedOffset};
    use proptest::prelude::*;

    fn date(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).unwrap()
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn cycle(plan_start: NaiveDate, tz: Tz, at: &str) -> BillingCycle {
        BillingCycle::containing(plan_start, tz, utc(at)).unwrap()
    }

    /// The cycles (first day, last day) met walking forward from `at` for `n` cycles.
    fn days(plan_start: NaiveDate, tz: Tz, at: &str, n: usize) -> Vec<(NaiveDate, NaiveDate)> {
        let mut c = cycle(plan_start, tz, at);
        let mut out = Vec::new();
        for _ in 0..n {
            out.push((c.first_day, c.last_day));
            c = BillingCycle::containing(plan_start, tz, c.end).unwrap();
        }
        out
    }

    fn offset_of(tz: Tz, at: DateTime<Utc>) -> FixedOffset {
        at.with_timezone(&tz).offset().fix()
    }

    #[test]
    fn plan_started_on_31_january_clamps_each_month_from_the_start_date() {
        let got = days(date(2026, 1, 31), Tz::UTC, "2026-02-01T12:00:00Z", 5);
        assert_eq!(
            got,
            vec![
                (date(2026, 1, 31), date(2026, 2, 27)),
                (date(2026, 2, 28), date(2026, 3, 30)),
                (date(2026, 3, 31), date(2026, 4, 29)),
                (date(2026, 4, 30), date(2026, 5, 30)),
                (date(2026, 5, 31), date(2026, 6, 29)),
            ]
        );
    }

    #[test]
    fn leap_year_gives_29_february() {
        let c = cycle(date(2024, 1, 31), Tz::UTC, "2024-03-01T00:00:00Z");
        assert_eq!(c.first_day, date(2024, 2, 29));
        assert_eq!(c.start, utc("2024-02-29T00:00:00Z"));
        assert_eq!(c.end, utc("2024-03-31T00:00:00Z"));
        assert_eq!(c.last_day, date(2024, 3, 30));
    }

    #[test]
    fn plan_started_on_29_february() {
        let got = days(date(2024, 2, 29), Tz::UTC, "2024-03-05T00:00:00Z", 13);
        assert_eq!(got[0], (date(2024, 2, 29), date(2024, 3, 28)));
        assert_eq!(got[1], (date(2024, 3, 29), date(2024, 4, 28)));
        // 2025 is not a leap year: the day clamps to 28 and comes back to 29 after.
        assert_eq!(got[11], (date(2025, 1, 29), date(2025, 2, 27)));
        assert_eq!(got[12], (date(2025, 2, 28), date(2025, 3, 28)));
        let c = cycle(date(2024, 2, 29), Tz::UTC, "2025-03-29T00:00:00Z");
        assert_eq!(c.first_day, date(2025, 3, 29));
    }

    #[test]
    fn boundary_instant_belongs_to_the_new_cycle() {
        let plan = date(2026, 1, 31);
        let boundary = utc("2026-02-28T00:00:00Z");
        let new = BillingCycle::containing(plan, Tz::UTC, boundary).unwrap();
        assert_eq!(new.start, boundary);
        let just_before = boundary - Duration::nanoseconds(1);
        let old = BillingCycle::containing(plan, Tz::UTC, just_before).unwrap();
        assert_eq!(old.end, boundary);
        assert_eq!(old.first_day, date(2026, 1, 31));
        assert_eq!(old.next_reset(), boundary);
        assert!(old.contains(just_before) && !old.contains(boundary));
    }

    #[test]
    fn instants_before_the_plan_start_get_earlier_cycles() {
        let c = cycle(date(2026, 1, 31), Tz::UTC, "2025-12-15T00:00:00Z");
        assert_eq!(
            (c.first_day, c.last_day),
            (date(2025, 11, 30), date(2025, 12, 30))
        );
        let c = cycle(date(2026, 3, 31), Tz::UTC, "2026-02-28T10:00:00Z");
        assert_eq!(
            (c.first_day, c.last_day),
            (date(2026, 2, 28), date(2026, 3, 30))
        );
    }

    #[test]
    fn berlin_boundaries_stay_at_local_midnight_across_dst() {
        let tz = chrono_tz::Europe::Berlin;
        // Spring: CET (+1) at the start, CEST (+2) at the end.
        let c = cycle(date(2026, 3, 15), tz, "2026-04-01T12:00:00Z");
        assert_eq!(c.start, utc("2026-03-14T23:00:00Z"));
        assert_eq!(c.end, utc("2026-04-14T22:00:00Z"));
        assert_eq!(offset_of(tz, c.start).local_minus_utc(), 3600);
        assert_eq!(offset_of(tz, c.end).local_minus_utc(), 7200);
        // Autumn: CEST to CET.
        let c = cycle(date(2026, 3, 15), tz, "2026-11-01T12:00:00Z");
        assert_eq!(c.start, utc("2026-10-14T22:00:00Z"));
        assert_eq!(c.end, utc("2026-11-14T23:00:00Z"));
        // The design's own example: December in Berlin.
        let c = cycle(date(2026, 1, 1), tz, "2026-12-10T00:00:00Z");
        assert_eq!(c.start, utc("2026-11-30T23:00:00Z"));
        assert_eq!(c.end, utc("2026-12-31T23:00:00Z"));
        assert_eq!(
            (c.first_day, c.last_day),
            (date(2026, 12, 1), date(2026, 12, 31))
        );
    }

    #[test]
    fn new_york_boundaries_stay_at_local_midnight_across_dst() {
        let tz = chrono_tz::America::New_York;
        let plan = date(2026, 1, 1);
        let c = cycle(plan, tz, "2026-03-20T00:00:00Z");
        assert_eq!(c.start, utc("2026-03-01T05:00:00Z"), "EST, -5");
        assert_eq!(c.end, utc("2026-04-01T04:00:00Z"), "EDT, -4");
        // DST ends at 02:00 on 1 November 2026: midnight is still EDT.
        let c = cycle(plan, tz, "2026-11-15T00:00:00Z");
        assert_eq!(c.start, utc("2026-11-01T04:00:00Z"));
        assert_eq!(c.end, utc("2026-12-01T05:00:00Z"));
        assert_eq!(c.last_day, date(2026, 11, 30));
    }

    #[test]
    fn lord_howe_half_hour_dst() {
        let tz = chrono_tz::Australia::Lord_Howe;
        let plan = date(2026, 1, 1);
        let summer = cycle(plan, tz, "2026-01-15T00:00:00Z");
        assert_eq!(summer.end, utc("2026-01-31T13:00:00Z"), "+11:00");
        let winter = cycle(plan, tz, "2026-07-15T00:00:00Z");
        assert_eq!(winter.start, utc("2026-06-30T13:30:00Z"), "+10:30");
        assert_eq!(offset_of(tz, winter.start).local_minus_utc(), 37_800);
    }

    #[test]
    fn kiritimati_utc_plus_14() {
        let tz = chrono_tz::Pacific::Kiritimati;
        let c = cycle(date(2026, 1, 1), tz, "2026-01-31T10:00:00Z");
        assert_eq!(c.start, utc("2026-01-31T10:00:00Z"));
        assert_eq!(c.first_day, date(2026, 2, 1));
        let c = cycle(date(2026, 1, 1), tz, "2026-01-31T09:59:59Z");
        assert_eq!(c.first_day, date(2026, 1, 1));
        assert_eq!(c.last_day, date(2026, 1, 31));
    }

    #[test]
    fn a_zone_skipping_midnight_starts_at_the_end_of_the_gap() {
        // Chile moves to summer time at 24:00 on the first Saturday of September:
        // 2024-09-08 00:00 local never happens, the clock reads 01:00 (-03) at
        // 04:00 UTC.
        let tz = chrono_tz::America::Santiago;
        let day = date(2024, 9, 8);
        assert!(matches!(
            tz.from_local_datetime(&day.and_time(chrono::NaiveTime::MIN)),
            LocalResult::None
        ));
        let c = cycle(date(2024, 1, 8), tz, "2024-09-20T00:00:00Z");
        assert_eq!(c.first_day, day);
        assert_eq!(c.start, utc("2024-09-08T04:00:00Z"));
        let local = c.start.with_timezone(&tz);
        assert_eq!(local.date_naive(), day);
        assert_eq!(
            local.time(),
            chrono::NaiveTime::from_hms_opt(1, 0, 0).unwrap()
        );
        // One second earlier is still the previous local day, hence the old cycle.
        let before = c.start - Duration::seconds(1);
        assert_eq!(before.with_timezone(&tz).date_naive(), date(2024, 9, 7));
        let old = BillingCycle::containing(date(2024, 1, 8), tz, before).unwrap();
        assert_eq!(old.end, c.start);
        assert_eq!(old.last_day, date(2024, 9, 7));
    }

    #[test]
    fn an_ambiguous_midnight_starts_at_its_first_occurrence() {
        // Cuba ends summer time at 01:00 on the first Sunday of November, back to
        // 00:00: on 2024-11-03 local midnight happens twice, first at -04 (04:00 UTC).
        let tz = chrono_tz::America::Havana;
        let day = date(2024, 11, 3);
        assert!(matches!(
            tz.from_local_datetime(&day.and_time(chrono::NaiveTime::MIN)),
            LocalResult::Ambiguous(_, _)
        ));
        let c = cycle(date(2024, 1, 3), tz, "2024-11-20T00:00:00Z");
        assert_eq!(c.first_day, day);
        assert_eq!(c.start, utc("2024-11-03T04:00:00Z"));
        // Both occurrences of midnight belong to the new cycle.
        let second = cycle(date(2024, 1, 3), tz, "2024-11-03T05:00:00Z");
        assert_eq!(second.start, c.start);
    }

    const ZONES: [Tz; 10] = [
        Tz::UTC,
        chrono_tz::Europe::Berlin,
        chrono_tz::America::New_York,
        chrono_tz::Australia::Lord_Howe,
        chrono_tz::Pacific::Kiritimati,
        chrono_tz::America::Santiago,
        chrono_tz::America::Havana,
        chrono_tz::Asia::Kolkata,
        chrono_tz::America::St_Johns,
        chrono_tz::Pacific::Chatham,
    ];

    proptest! {
        #[test]
        fn cycles_tile_time_and_contain_their_instant(
            plan_days in 0i64..(365 * 30),
            zone in 0usize..ZONES.len(),
            at_secs in 0i64..(60 * 366 * 86_400),
            at_nanos in 0u32..1_000_000_000,
        ) {
            let plan_start = date(2000, 1, 1) + Duration::days(plan_days);
            let tz = ZONES[zone];
            let at = DateTime::from_timestamp(946_684_800 + at_secs, at_nanos).unwrap();
            let c = BillingCycle::containing(plan_start, tz, at).unwrap();
            prop_assert!(c.start <= at && at < c.end, "{c:?} does not contain {at}");
            // No gap, no overlap: the cycle at `end` starts at `end`, and the cycle
            // just before `start` ends at `start`.
            let next = BillingCycle::containing(plan_start, tz, c.end).unwrap();
            prop_assert_eq!(next.start, c.end);
            prop_assert_eq!(next.first_day, c.last_day.succ_opt().unwrap());
            let prev = BillingCycle::containing(plan_start, tz, c.start - Duration::nanoseconds(1)).unwrap();
            prop_assert_eq!(prev.end, c.start);
            // Boundaries sit on the first instant of their local date.
            prop_assert_eq!(c.start.with_timezone(&tz).date_naive(), c.first_day);
            let before = (c.start - Duration::seconds(1)).with_timezone(&tz).date_naive();
            prop_assert!(before < c.first_day);
            // And on the date the rule names: plan_start + k months, clamped.
            let k_months = (c.first_day.year() - plan_start.year()) * 12
                + c.first_day.month() as i32 - plan_start.month() as i32;
            let expected = if k_months >= 0 {
                plan_start.checked_add_months(Months::new(k_months.unsigned_abs()))
            } else {
                plan_start.checked_sub_months(Months::new(k_months.unsigned_abs()))
            };
            prop_assert_eq!(Some(c.first_day), expected);
        }
    }
}
