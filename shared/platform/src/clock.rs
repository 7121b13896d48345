//! Business time. Audit events and row timestamps always use the system clock; rules that depend
//! on "today" (expiry, fill windows, active therapy) use a [`Clock`], so a replay can process an
//! order as of the day it was written.

use chrono::{DateTime, Datelike, TimeZone, Utc};
use std::sync::Mutex;

pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock set by its owner: `rxflow run --replay` sets it to each order's `authoredOn`.
#[derive(Debug)]
pub struct ManualClock(Mutex<DateTime<Utc>>);

impl ManualClock {
    pub fn new(at: DateTime<Utc>) -> Self {
        ManualClock(Mutex::new(at))
    }

    pub fn set(&self, at: DateTime<Utc>) {
        match self.0.lock() {
            Ok(mut g) => *g = at,
            Err(poisoned) => *poisoned.into_inner() = at,
        }
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        match self.0.lock() {
            Ok(g) => *g,
            Err(poisoned) => *poisoned.into_inner(),
        }
    }
}

/// What a time given by a user (a query parameter, a command-line flag) must be.
pub const TIME_EXPECTED: &str = "must be an RFC 3339 time from 0000-01-01T00:00:00Z to \
                                 9999-12-31T23:59:59Z, e.g. 2025-01-06T09:00:00Z";

/// The earliest time a user may name: the first instant of year 0000.
pub fn earliest_time() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(0, 1, 1, 0, 0, 0)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// A time given by a user, in UTC: RFC 3339 with four-digit years, and in UTC within years
/// 0000–9999. Times are stored and compared as fixed-width RFC 3339 text, which orders a signed
/// or five-digit year wrongly: such a time would silently widen or empty a search (and near
/// chrono's limits, arithmetic on it overflows), so it is no time at all here.
pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    let t = DateTime::parse_from_rfc3339(s).ok()?.with_timezone(&Utc);
    (0..=9999).contains(&t.year()).then_some(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_time_is_rfc_3339_within_years_0000_to_9999_in_utc() {
        for ok in [
            "2025-01-06T09:00:00Z",
            "0000-01-01T00:00:00Z",
            "9999-12-31T23:59:59.999Z",
            "2025-01-06T09:00:00+05:30",
        ] {
            assert!(parse_time(ok).is_some(), "{ok}");
        }
        assert_eq!(parse_time("0000-01-01T00:00:00Z"), Some(earliest_time()));
        for bad in [
            "+10000-01-01T00:00:00Z",
            "-262143-01-01T00:00:00Z",
            "-0001-12-31T00:00:00Z",
            // in range as written, out of range in UTC
            "9999-12-31T23:00:00-05:00",
            "0000-01-01T00:00:00+01:00",
            "2025-01-06",
            "yesterday",
        ] {
            assert!(parse_time(bad).is_none(), "{bad}");
        }
    }
}
