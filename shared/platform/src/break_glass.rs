//! Break-glass sessions: a named user's time-limited emergency access, opened with a reason,
//! stored sealed in [`Table::BreakGlass`], audited, and raised as an alert for review.
//!
//! * [`open`] judges a request (`POST /break-glass`): the role must be allowed to ask, the reason
//!   must say why, the length is capped at [`BREAK_GLASS_MAX_MINUTES`], and a caller who already
//!   holds an active grant is refused (409): a grant is never extended; a new one may be asked for
//!   once it has ended.
//! * [`latest_grant`] finds the caller's most relevant grant for the HTTP extractor, which
//!   attaches it to the [`Principal`] (never from the token).
//!
//! # The alert
//! Opening a grant appends, in the same atomic commit as the sealed row, one audit event with
//! `action = break-glass`, `detail = "break-glass-alert"` ([`ALERT_DETAIL`]), `break_glass = true`
//! and purpose ETREAT, naming the grant id. That event is the review item: an auditor finds every
//! opened session with `GET /audit/events?action=break-glass`. The same moment is logged at WARN
//! on target `rxflow::alert` (grant id, subject, tenant, end time; never the reason).
//!
//! # Storage
//! The row id is the grant id; the row's blind index is the HMAC of the subject (domain
//! `break-glass-subject`); the sealed body is the whole [`BreakGlassGrant`], reason included (it
//! may name a patient). The row's status is the grant's window as an ISO 8601 interval,
//! `<granted_at>/<expires_at>`, so the look-up made on every request opens no sealed body and
//! writes no read event; the attached grant carries an empty reason for that reason.
//!
//! # The look-up cache
//! That look-up runs on every authenticated request, so its answer is kept per (tenant,
//! subject) for [`LOOKUP_TTL`]. It can only be stale in the safe direction: a grant is never
//! extended or widened, its end is absolute (checked against the clock at each decision), and
//! [`open`] drops the entry of the subject it opens a grant for; only a grant stored another way
//! (another process on the same store, [`record`] called directly) is seen up to [`LOOKUP_TTL`]
//! late. The cache ([`GrantCache`]) belongs to one server's state, never to the process.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use chrono::{DateTime, Duration, Utc};
use rx_guard::access::{
    self, grant_break_glass, Action, BreakGlassGrant, Decision, Policy, Principal,
    BREAK_GLASS_DEFAULT_MINUTES, BREAK_GLASS_MAX_MINUTES, BREAK_GLASS_MIN_REASON_CHARS,
};
use rx_guard::audit::{self, AuditEvent, Outcome, Purpose, ResourceRef};
use rx_store::{Changes, Table};
use serde::{Deserialize, Serialize};

use crate::error::StepError;
use crate::flow::person_cx;
use crate::services::Services;

/// The function name in audit events.
pub const FUNCTION: &str = "break-glass";
/// `detail` of the audit event that raises a break-glass session for review.
pub const ALERT_DETAIL: &str = "break-glass-alert";
/// Blind-index domain of the subject a grant belongs to.
const SUBJECT_DOMAIN: &str = "break-glass-subject";
/// Resource kind of a grant in audit events.
const KIND: &str = "BreakGlass";

/// Body of `POST /break-glass`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakGlassRequest {
    /// Why emergency access is needed, in words (kept sealed, never logged).
    #[serde(default)]
    pub reason: Option<String>,
    /// Length of the grant; default 60, values above the maximum are capped to it.
    #[serde(default)]
    pub minutes: Option<i64>,
}

/// What `POST /break-glass` answers.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Opened {
    pub id: String,
    pub granted_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub minutes: i64,
}

impl From<&BreakGlassGrant> for Opened {
    fn from(g: &BreakGlassGrant) -> Self {
        Opened {
            id: g.id.clone(),
            granted_at: g.granted_at,
            expires_at: g.expires_at,
            minutes: (g.expires_at - g.granted_at).num_minutes(),
        }
    }
}

/// How long a look-up's answer is reused (see the module docs).
pub const LOOKUP_TTL: std::time::Duration = std::time::Duration::from_secs(2);
/// Entries kept at most; past it the cache starts over (it is only a cache).
const LOOKUP_MAX: usize = 10_000;

type Key = (String, String);

/// The per-server cache of [`latest_grant`] answers (see the module docs).
#[derive(Default)]
pub struct GrantCache {
    map: Mutex<HashMap<Key, (Instant, Option<BreakGlassGrant>)>>,
}

impl GrantCache {
    /// The grant to attach to `p` ([`latest_grant`]), from the cache when fresh.
    pub async fn latest(
        &self,
        svc: &Services,
        p: &Principal,
    ) -> Result<Option<BreakGlassGrant>, StepError> {
        let key = (p.tenant.clone(), p.subject.clone());
        if let Some(hit) = self.cached(&key) {
            return Ok(hit);
        }
        let found = latest_grant(svc, p).await?;
        if let Ok(mut map) = self.map.lock() {
            if map.len() >= LOOKUP_MAX {
                map.clear();
            }
            map.insert(key, (Instant::now(), found.clone()));
        }
        Ok(found)
    }

    fn cached(&self, key: &Key) -> Option<Option<BreakGlassGrant>> {
        let map = self.map.lock().ok()?;
        let (at, grant) = map.get(key)?;
        (at.elapsed() < LOOKUP_TTL).then(|| grant.clone())
    }

    /// Drop what is known of `subject` in `tenant` (a grant was just stored for them).
    pub fn forget(&self, tenant: &str, subject: &str) {
        if let Ok(mut map) = self.map.lock() {
            map.remove(&(tenant.to_string(), subject.to_string()));
        }
    }
}

/// Serializes check-then-insert so two concurrent requests of one caller cannot both open a
/// grant (the embedded server is one process; a multi-instance store would need a conditional
/// write on a per-subject slot instead).
static OPENING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn resource(id: &str) -> ResourceRef {
    ResourceRef {
        kind: KIND.to_string(),
        id: id.to_string(),
    }
}

/// Append a refusal of a break-glass request, then return `err`.
async fn refuse(
    svc: &Services,
    p: &Principal,
    source_ip: &Option<String>,
    detail: String,
    err: StepError,
) -> StepError {
    let mut ev = AuditEvent::new(
        p.actor(),
        audit::Action::Deny,
        resource("-"),
        FUNCTION,
        Purpose::Emergency,
    );
    ev.outcome = Outcome::Denied;
    ev.detail = Some(detail);
    ev.source_ip = source_ip.clone();
    match svc.vault.audit(&[ev]).await {
        Ok(()) => err,
        Err(e) => e.into(),
    }
}

/// Open a break-glass grant for `p` (see the module docs for the rules). Every refusal is
/// audited; the grant, its audit event and its alert are committed together.
pub async fn open(
    svc: &Services,
    grants: &GrantCache,
    p: &Principal,
    source_ip: Option<String>,
    req: &BreakGlassRequest,
) -> Result<BreakGlassGrant, StepError> {
    let now = Utc::now();
    // The request is judged without any grant the caller already holds.
    let asking = Principal {
        break_glass: None,
        ..p.clone()
    };
    let decision = Policy::embedded().decide(&asking, Action::BreakGlass, None, now);
    if let Decision::Deny(why) = decision {
        let mut ev = access::audit_event(
            &asking,
            Action::BreakGlass,
            &decision,
            resource("-"),
            FUNCTION,
        );
        ev.source_ip = source_ip.clone();
        return Err(match svc.vault.audit(&[ev]).await {
            Ok(()) => StepError::Forbidden(why.sentence()),
            Err(e) => e.into(),
        });
    }
    let reason = req.reason.as_deref().map(str::trim).unwrap_or("");
    if reason.chars().count() < BREAK_GLASS_MIN_REASON_CHARS {
        let err = StepError::Invalid {
            code: "required",
            message: format!(
                "break-glass needs a reason of at least {BREAK_GLASS_MIN_REASON_CHARS} characters saying why the emergency access is needed"
            ),
            expression: Some("reason".into()),
        };
        return Err(refuse(
            svc,
            &asking,
            &source_ip,
            "break-glass:reason-required".into(),
            err,
        )
        .await);
    }
    let minutes = req.minutes.unwrap_or(BREAK_GLASS_DEFAULT_MINUTES);
    if minutes <= 0 {
        return Err(StepError::Invalid {
            code: "value",
            message: format!(
                "minutes must be a whole number from 1 to {BREAK_GLASS_MAX_MINUTES} (longer requests are capped)"
            ),
            expression: Some("minutes".into()),
        });
    }
    let minutes = minutes.min(BREAK_GLASS_MAX_MINUTES);

    let _one_at_a_time = OPENING.lock().await;
    if let Some(current) = latest_grant(svc, &asking).await? {
        if current.is_active(now) {
            let err = StepError::Conflict(format!(
                "you already hold a break-glass grant until {}; a grant cannot be extended, ask for a new one after it ends",
                current.expires_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ));
            return Err(refuse(
                svc,
                &asking,
                &source_ip,
                "break-glass:already-active".into(),
                err,
            )
            .await);
        }
    }
    let grant = grant_break_glass(&asking, reason, now, Some(Duration::minutes(minutes)))?;
    let recorded = record(svc, &asking, source_ip, &grant).await;
    grants.forget(&asking.tenant, &asking.subject);
    recorded?;
    Ok(grant)
}

/// Store `grant` sealed with its audit events (the row's create event and the alert, see the
/// module docs) in one commit. [`open`] calls it after its checks; tests use it to put a grant
/// with a chosen window in place.
pub async fn record(
    svc: &Services,
    p: &Principal,
    source_ip: Option<String>,
    grant: &BreakGlassGrant,
) -> Result<(), StepError> {
    let cx = person_cx(p, FUNCTION, source_ip.clone(), true);
    let index = svc.vault.blind(SUBJECT_DOMAIN, &grant.subject);
    let (write, create_ev) = svc
        .vault
        .new_row(
            &cx,
            Table::BreakGlass,
            &p.tenant,
            &grant.id,
            &window(grant),
            Some(index),
            None,
            grant,
        )
        .await?;
    let alert = alert_event(p, source_ip, grant);
    svc.vault
        .commit(Changes {
            writes: vec![write],
            transitions: Vec::new(),
            audit: vec![create_ev, alert],
        })
        .await?;
    tracing::warn!(
        target: "rxflow::alert",
        grant = %grant.id,
        subject = %grant.subject,
        tenant = %p.tenant,
        expires_at = %grant.expires_at,
        "break-glass session opened; review it"
    );
    Ok(())
}

/// The audit event that raises a grant for review.
fn alert_event(p: &Principal, source_ip: Option<String>, grant: &BreakGlassGrant) -> AuditEvent {
    let mut ev = access::audit_event(
        p,
        Action::BreakGlass,
        &Decision::Allow {
            via_break_glass: true,
        },
        resource(&grant.id),
        FUNCTION,
    );
    ev.purpose = Purpose::Emergency;
    ev.break_glass = true;
    ev.source_ip = source_ip;
    ev.detail = Some(ALERT_DETAIL.to_string());
    ev
}

fn window(g: &BreakGlassGrant) -> String {
    use chrono::SecondsFormat::Millis;
    format!(
        "{}/{}",
        g.granted_at.to_rfc3339_opts(Millis, true),
        g.expires_at.to_rfc3339_opts(Millis, true)
    )
}

fn parse_window(status: &str) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    let (from, to) = status.split_once('/')?;
    let from = DateTime::parse_from_rfc3339(from).ok()?.with_timezone(&Utc);
    let to = DateTime::parse_from_rfc3339(to).ok()?.with_timezone(&Utc);
    Some((from, to))
}

/// The grant to attach to `p`: an active one if there is one, else the most recent one (so an
/// access it no longer covers is refused as "break-glass expired"). Only grants of `p`'s
/// subject in `p`'s tenant count. The reason stays sealed: the attached grant's is empty.
pub async fn latest_grant(
    svc: &Services,
    p: &Principal,
) -> Result<Option<BreakGlassGrant>, StepError> {
    let index = svc.vault.blind(SUBJECT_DOMAIN, &p.subject);
    let rows = svc
        .vault
        .store
        .find_by_index(Table::BreakGlass, &p.tenant, &index)
        .await?;
    let now = Utc::now();
    let mut best: Option<BreakGlassGrant> = None;
    for row in rows {
        let Some((granted_at, expires_at)) = parse_window(&row.status) else {
            tracing::warn!(grant = %row.id, "break-glass row has an unreadable window; ignored");
            continue;
        };
        let g = BreakGlassGrant {
            id: row.id,
            subject: p.subject.clone(),
            reason: String::new(),
            granted_at,
            expires_at,
        };
        let better = match &best {
            None => true,
            Some(b) => match (g.is_active(now), b.is_active(now)) {
                (true, false) => true,
                (false, true) => false,
                _ => g.expires_at > b.expires_at,
            },
        };
        if better {
            best = Some(g);
        }
    }
    Ok(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_window_survives_the_row_status_round_trip() {
        let at = Utc::now();
        let g = BreakGlassGrant {
            id: "g".into(),
            subject: "s".into(),
            reason: String::new(),
            granted_at: at,
            expires_at: at + Duration::minutes(60),
        };
        let (from, to) = parse_window(&window(&g)).expect("parses");
        assert_eq!(from.timestamp_millis(), at.timestamp_millis());
        assert_eq!((to - from).num_minutes(), 60);
        assert!(parse_window("open").is_none());
        assert!(parse_window("2026-01-01T00:00:00Z/later").is_none());
    }
}
