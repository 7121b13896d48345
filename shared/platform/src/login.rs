//! Refused sign-ins in the audit trail (HIPAA 164.308(a)(5)(ii)(C), log-in monitoring).
//!
//! Every request whose bearer token is missing or refused (a 401) appends one `login` event:
//! outcome denied, the route template (never the path: it may hold a patient id), the peer
//! address and the fixed reason sentence (never anything of the token, whose claims are
//! unverified). The actor is `unauthenticated` in the deployment's own tenant: nobody's claims
//! are trusted, and the organisation that runs the service is the one whose auditor reviews it.
//!
//! So that a flood of bad tokens cannot grow the trail without bound, each source address gets
//! at most [`LoginFailures::limit`] events per window (a minute by default); further failures in
//! that window are counted, and the source's next recorded event says how many were counted and
//! not recorded one by one. The event that reaches the limit says so.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rx_guard::audit::{Action, Actor, AuditEvent, Outcome, Purpose, ResourceRef};

/// The actor of a refused sign-in.
pub const UNAUTHENTICATED: &str = "unauthenticated";
/// Refused sign-ins recorded one by one per source and window.
pub const DEFAULT_LIMIT: u32 = 20;
/// The window those are counted in.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(60);
/// Sources tracked at once; past that, new sources share one count.
const MAX_SOURCES: usize = 10_000;
/// The shared count's key (and the source of requests with no peer address).
const OTHERS: &str = "*";

/// Whether a refused sign-in is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Record it; `counted_before` failures of this source were counted, not recorded, in its
    /// last window; `last` says this one reaches the window's limit.
    Record { counted_before: u64, last: bool },
    /// Count it only.
    Count,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    recorded: u32,
    counted: u64,
}

/// Refused sign-ins per source address, for the limit above.
#[derive(Debug)]
pub struct LoginFailures {
    /// The tenant the events are recorded in (the deployment's own).
    pub tenant: String,
    pub limit: u32,
    pub window: Duration,
    sources: Mutex<HashMap<String, Window>>,
}

impl LoginFailures {
    pub fn new(tenant: &str, limit: u32, window: Duration) -> Self {
        LoginFailures {
            tenant: tenant.to_string(),
            limit,
            window,
            sources: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a refused sign-in from `source` at `now` is recorded.
    pub fn admit(&self, source: Option<&str>, now: Instant) -> Admit {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        let mut key = source.unwrap_or(OTHERS);
        if sources.len() >= MAX_SOURCES && !sources.contains_key(key) {
            let window = self.window;
            sources.retain(|_, w| now.duration_since(w.started) < window);
            if sources.len() >= MAX_SOURCES {
                key = OTHERS;
            }
        }
        let w = sources.entry(key.to_string()).or_insert(Window {
            started: now,
            recorded: 0,
            counted: 0,
        });
        let mut counted_before = 0;
        if now.duration_since(w.started) >= self.window {
            counted_before = w.counted;
            *w = Window {
                started: now,
                recorded: 0,
                counted: 0,
            };
        }
        if w.recorded < self.limit {
            w.recorded += 1;
            let last = w.recorded == self.limit;
            if last {
                tracing::warn!(
                    limit = self.limit,
                    window_s = self.window.as_secs(),
                    "refused sign-ins from one source reached the limit; further ones in this window are counted, not recorded one by one"
                );
            }
            Admit::Record {
                counted_before,
                last,
            }
        } else {
            w.counted += 1;
            Admit::Count
        }
    }

    /// The audit event of a refused sign-in on `route`, or `None` when it is only counted.
    pub fn event(
        &self,
        route: &str,
        source_ip: Option<String>,
        reason: &str,
        now: Instant,
    ) -> Option<AuditEvent> {
        let (counted_before, last) = match self.admit(source_ip.as_deref(), now) {
            Admit::Record {
                counted_before,
                last,
            } => (counted_before, last),
            Admit::Count => return None,
        };
        let mut detail = reason.to_string();
        if counted_before > 0 {
            detail.push_str(&format!(
                "; {counted_before} more refused sign-ins from this source in its last window were counted, not recorded one by one"
            ));
        }
        if last {
            detail.push_str(&format!(
                "; this source reached {} recorded refusals in {} s: further ones in this window are counted",
                self.limit,
                self.window.as_secs()
            ));
        }
        let mut ev = AuditEvent::new(
            Actor {
                subject: UNAUTHENTICATED.into(),
                role: "none".into(),
                tenant: self.tenant.clone(),
            },
            Action::Login,
            ResourceRef {
                kind: "Endpoint".into(),
                id: route.to_string(),
            },
            "http",
            Purpose::Operations,
        );
        ev.outcome = Outcome::Denied;
        ev.source_ip = source_ip;
        ev.detail = Some(detail);
        Some(ev)
    }
}

impl Default for LoginFailures {
    fn default() -> Self {
        LoginFailures::new(crate::config::DEFAULT_TENANT, DEFAULT_LIMIT, DEFAULT_WINDOW)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_gets_its_limit_recorded_then_counted_and_the_count_reported_next_window() {
        let f = LoginFailures::new("t", 3, Duration::from_secs(60));
        let t0 = Instant::now();
        let ip = Some("10.0.0.7");
        assert_eq!(
            f.admit(ip, t0),
            Admit::Record {
                counted_before: 0,
                last: false
            }
        );
        assert_eq!(
            f.admit(ip, t0),
            Admit::Record {
                counted_before: 0,
                last: false
            }
        );
        assert_eq!(
            f.admit(ip, t0),
            Admit::Record {
                counted_before: 0,
                last: true
            }
        );
        for _ in 0..5 {
            assert_eq!(f.admit(ip, t0 + Duration::from_secs(30)), Admit::Count);
        }
        // Another source has its own count.
        assert!(matches!(
            f.admit(Some("10.0.0.8"), t0),
            Admit::Record { .. }
        ));
        // The next window reports what the last one only counted.
        assert_eq!(
            f.admit(ip, t0 + Duration::from_secs(61)),
            Admit::Record {
                counted_before: 5,
                last: false
            }
        );
        assert_eq!(
            f.admit(ip, t0 + Duration::from_secs(62)),
            Admit::Record {
                counted_before: 0,
                last: false
            }
        );
    }

    #[test]
    fn the_event_names_route_source_and_reason_and_no_one() {
        let f = LoginFailures::new("pharmacy-a", 1, Duration::from_secs(60));
        let t0 = Instant::now();
        let ev = f
            .event(
                "/patients/{id}/prescriptions",
                Some("10.1.1.1".into()),
                "the token has expired; sign in again",
                t0,
            )
            .expect("first is recorded");
        assert_eq!(ev.action, Action::Login);
        assert_eq!(ev.outcome, Outcome::Denied);
        assert_eq!(ev.actor.subject, UNAUTHENTICATED);
        assert_eq!(ev.actor.tenant, "pharmacy-a");
        assert_eq!(ev.resource.id, "/patients/{id}/prescriptions");
        assert_eq!(ev.source_ip.as_deref(), Some("10.1.1.1"));
        let detail = ev.detail.unwrap();
        assert!(detail.starts_with("the token has expired"), "{detail}");
        assert!(
            detail.contains("further ones in this window are counted"),
            "{detail}"
        );
        assert!(f
            .event("/queue", Some("10.1.1.1".into()), "x", t0)
            .is_none());
        let next = f
            .event(
                "/queue",
                Some("10.1.1.1".into()),
                "x",
                t0 + Duration::from_secs(60),
            )
            .expect("next window");
        assert!(next.detail.unwrap().contains("1 more refused sign-ins"));
    }

    #[test]
    fn past_the_tracked_sources_new_ones_share_one_count() {
        let f = LoginFailures::new("t", 1, Duration::from_secs(60));
        let t0 = Instant::now();
        for i in 0..MAX_SOURCES {
            assert!(matches!(
                f.admit(Some(&format!("src-{i}")), t0),
                Admit::Record { .. }
            ));
        }
        // The map is full of live windows: two new sources share the "*" count.
        assert!(matches!(f.admit(Some("new-1"), t0), Admit::Record { .. }));
        assert_eq!(f.admit(Some("new-2"), t0), Admit::Count);
        // Once the old windows have passed, a new source gets its own again.
        let later = t0 + Duration::from_secs(61);
        assert!(matches!(
            f.admit(Some("new-3"), later),
            Admit::Record { .. }
        ));
        assert!(matches!(
            f.admit(Some("new-4"), later),
            Admit::Record { .. }
        ));
    }
}
