//! Break-glass: a named user's time-limited emergency access beyond their normal scope.
//!
//! A grant is never extended: asking again makes a new grant with its own id and clock, so every
//! window of emergency access is reviewed on its own.

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use super::{Action, Decision, Policy, Principal};
use crate::{GuardError, Result};

/// Length of a grant when the request names none.
pub const BREAK_GLASS_DEFAULT_MINUTES: i64 = 60;
/// Longest grant one request can get.
pub const BREAK_GLASS_MAX_MINUTES: i64 = 60;
/// A reason shorter than this (after trimming) is refused: it must say why, in words.
pub const BREAK_GLASS_MIN_REASON_CHARS: usize = 10;

/// One emergency access grant.
///
/// `reason` is free text typed by a person: it may name a patient, so store it sealed and keep it
/// out of logs and audit events (they carry the grant `id`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakGlassGrant {
    /// UUIDv7.
    pub id: String,
    /// JWT subject of the person it was granted to; it counts for nobody else.
    pub subject: String,
    pub reason: String,
    pub granted_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

impl BreakGlassGrant {
    /// Active from `granted_at` (inclusive) until `expires_at` (exclusive).
    pub fn is_active(&self, now: DateTime<Utc>) -> bool {
        self.granted_at <= now && now < self.expires_at
    }
}

/// Grants `p` break-glass access from `now` for `duration` (default 60 minutes, at most 60).
///
/// Refused when the role may not ask for break-glass, when the reason is missing or shorter than
/// [`BREAK_GLASS_MIN_REASON_CHARS`], or when the duration is not between one second and the
/// maximum. A principal already holding a grant gets a new, separate grant: the old one is not
/// extended.
pub fn grant_break_glass(
    p: &Principal,
    reason: &str,
    now: DateTime<Utc>,
    duration: Option<Duration>,
) -> Result<BreakGlassGrant> {
    // The request itself is judged without any grant the caller already holds.
    let asking = Principal {
        break_glass: None,
        ..p.clone()
    };
    if let Decision::Deny(why) = Policy::embedded().decide(&asking, Action::BreakGlass, None, now) {
        return Err(GuardError::Forbidden(why.sentence()));
    }
    let reason = reason.trim();
    if reason.chars().count() < BREAK_GLASS_MIN_REASON_CHARS {
        return Err(GuardError::Forbidden(format!(
            "break-glass needs a reason of at least {BREAK_GLASS_MIN_REASON_CHARS} characters saying why the emergency access is needed"
        )));
    }
    let duration = duration.unwrap_or(Duration::minutes(BREAK_GLASS_DEFAULT_MINUTES));
    if duration <= Duration::zero() || duration > Duration::minutes(BREAK_GLASS_MAX_MINUTES) {
        return Err(GuardError::Forbidden(format!(
            "break-glass lasts between one second and {BREAK_GLASS_MAX_MINUTES} minutes; ask for a new grant when it ends"
        )));
    }
    Ok(BreakGlassGrant {
        id: uuid::Uuid::now_v7().to_string(),
        subject: p.subject.clone(),
        reason: reason.to_string(),
        granted_at: now,
        expires_at: now + duration,
    })
}
