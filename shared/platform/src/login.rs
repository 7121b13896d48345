//! Refused sign-ins in the audit trail (HIPAA 164.308(a)(5)(ii)(C), log-in monitoring).
//!
//! Every request whose bearer token is missing or refused (a 401) appends one `login` event:
//! outcome denied, the route template (never the path: it may hold a patient id), the peer
//! address and the fixed reason sentence (never anything of the token, whose claims are
//! unverified). The actor is `unauthenticated` in the deployment's own tenant: nobody's claims
//! are trusted, and the organisation that runs the service is the one whose auditor reviews it.
//!
//! So that a flood of bad tokens cannot grow the trail without bound, refusals are recorded one
//! by one only up to [`LoginFailures::limit`] per source network (an IPv4 /24, an IPv6 /64: one
//! host easily holds many addresses of its network) and [`LoginFailures::total`] in all, per
//! window (a minute by default). The rest are counted per network, and the counts are recorded
//! as summary `login` events ("N more refused sign-ins from 203.0.113.0/24 …") when the window
//! has passed ([`LoginFailures::counted`], which the server calls on a timer and when it stops),
//! so a burst is never recorded as fewer attempts than it was.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rx_guard::audit::{Action, Actor, AuditEvent, Outcome, Purpose, ResourceRef};

/// The actor of a refused sign-in.
pub const UNAUTHENTICATED: &str = "unauthenticated";
/// Refused sign-ins recorded one by one per source network and window.
pub const DEFAULT_LIMIT: u32 = 20;
/// Refused sign-ins recorded one by one in all per window.
pub const DEFAULT_TOTAL: u32 = 200;
/// The window those are counted in.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(60);
/// Source networks tracked at once; past that, new ones share one count.
const MAX_SOURCES: usize = 10_000;
/// Summary events handed out at once: the networks with the most refusals get one each, the
/// rest one together.
pub const MAX_SUMMARIES: usize = 100;
/// The shared count's key (and the source of requests with no peer address).
const OTHERS: &str = "other networks";

/// The network a peer address is limited by: its IPv4 /24 or IPv6 /64 (an IPv4-mapped IPv6
/// address counts as IPv4).
pub fn network_of(ip: &str) -> String {
    match ip.parse::<IpAddr>() {
        Ok(IpAddr::V4(v4)) => {
            let [a, b, c, _] = v4.octets();
            format!("{a}.{b}.{c}.0/24")
        }
        Ok(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => network_of(&v4.to_string()),
            None => {
                let s = v6.segments();
                let net = std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
                format!("{net}/64")
            }
        },
        Err(_) => OTHERS.to_string(),
    }
}

/// Whether a refused sign-in is recorded one by one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Record it; `last` says it reaches its network's limit for the window.
    Record { last: bool },
    /// Count it only.
    Count,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    since: DateTime<Utc>,
    recorded: u32,
    counted: u64,
}

impl Window {
    fn new(now: Instant) -> Self {
        Window {
            started: now,
            since: Utc::now(),
            recorded: 0,
            counted: 0,
        }
    }
}

/// Refusals counted and not recorded one by one: `count` from `network` since `since`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counted {
    pub network: String,
    pub count: u64,
    pub since: DateTime<Utc>,
}

#[derive(Debug, Default)]
struct State {
    sources: HashMap<String, Window>,
    /// Recorded in all in the current overall window, and when it began.
    total: Option<(Instant, u32)>,
    /// The overall limit was reached in the current overall window (logged once).
    total_reached: bool,
    /// Counts of windows that ended, not yet recorded.
    ended: Vec<Counted>,
}

/// Refused sign-ins per source network, for the limits above.
#[derive(Debug)]
pub struct LoginFailures {
    /// The tenant the events are recorded in (the deployment's own).
    pub tenant: String,
    pub limit: u32,
    pub total: u32,
    pub window: Duration,
    state: Mutex<State>,
}

impl LoginFailures {
    pub fn new(tenant: &str, limit: u32, total: u32, window: Duration) -> Self {
        LoginFailures {
            tenant: tenant.to_string(),
            limit,
            total,
            window,
            state: Mutex::new(State::default()),
        }
    }

    /// Whether a refused sign-in from `source` (a peer address) at `now` is recorded.
    pub fn admit(&self, source: Option<&str>, now: Instant) -> Admit {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let st = &mut *st;
        let mut key = source.map_or_else(|| OTHERS.to_string(), network_of);
        if st.sources.len() >= MAX_SOURCES && !st.sources.contains_key(&key) {
            self.sweep(st, now, false);
            if st.sources.len() >= MAX_SOURCES {
                key = OTHERS.to_string();
            }
        }
        let w = st
            .sources
            .entry(key.clone())
            .or_insert_with(|| Window::new(now));
        if now.duration_since(w.started) >= self.window {
            if w.counted > 0 {
                st.ended.push(Counted {
                    network: key,
                    count: w.counted,
                    since: w.since,
                });
            }
            *w = Window::new(now);
        }
        let total = match st.total {
            Some((began, n)) if now.duration_since(began) < self.window => n,
            _ => {
                st.total = Some((now, 0));
                st.total_reached = false;
                0
            }
        };
        if total >= self.total && !st.total_reached {
            st.total_reached = true;
            tracing::warn!(
                total = self.total,
                window_s = self.window.as_secs(),
                "refused sign-ins reached the overall limit; further ones in this window are counted and recorded as summaries"
            );
        }
        if w.recorded < self.limit && total < self.total {
            w.recorded += 1;
            st.total = st.total.map(|(began, n)| (began, n + 1));
            let last = w.recorded == self.limit;
            if last {
                tracing::warn!(
                    limit = self.limit,
                    window_s = self.window.as_secs(),
                    "refused sign-ins from one network reached the limit; further ones in this window are counted and recorded as one summary"
                );
            }
            Admit::Record { last }
        } else {
            w.counted += 1;
            Admit::Count
        }
    }

    /// Moves the counts of windows that have passed (all of them when `all`) to `ended`, and
    /// drops passed windows.
    fn sweep(&self, st: &mut State, now: Instant, all: bool) {
        let window = self.window;
        let ended = &mut st.ended;
        st.sources.retain(|network, w| {
            let passed = now.duration_since(w.started) >= window;
            if (passed || all) && w.counted > 0 {
                ended.push(Counted {
                    network: network.clone(),
                    count: w.counted,
                    since: w.since,
                });
                w.counted = 0;
            }
            !passed
        });
    }

    /// The counts not recorded yet: those of windows that have passed, or every count when
    /// `all` (the server stopping). Each is handed out once.
    pub fn counted(&self, now: Instant, all: bool) -> Vec<Counted> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.sweep(&mut st, now, all);
        let mut ended = std::mem::take(&mut st.ended);
        if ended.len() > MAX_SUMMARIES {
            ended.sort_by_key(|c| std::cmp::Reverse(c.count));
            let rest = ended.split_off(MAX_SUMMARIES - 1);
            ended.push(Counted {
                network: format!("{} other networks", rest.len()),
                count: rest.iter().map(|c| c.count).sum(),
                since: rest.iter().map(|c| c.since).min().unwrap_or_else(Utc::now),
            });
        }
        ended
    }

    /// The audit event of a refused sign-in on `route`, or `None` when it is only counted.
    pub fn event(
        &self,
        route: &str,
        source_ip: Option<String>,
        reason: &str,
        now: Instant,
    ) -> Option<AuditEvent> {
        let last = match self.admit(source_ip.as_deref(), now) {
            Admit::Record { last } => last,
            Admit::Count => return None,
        };
        let mut detail = reason.to_string();
        if last {
            detail.push_str(&format!(
                "; this network reached {} recorded refusals in {} s: further ones in this window are counted and recorded as one summary",
                self.limit,
                self.window.as_secs()
            ));
        }
        Some(self.login_event(route, source_ip, detail))
    }

    /// The summary event of refusals counted and not recorded one by one.
    pub fn summary_event(&self, c: &Counted) -> AuditEvent {
        let detail = format!(
            "{} more refused sign-ins from {} since {} were counted, not recorded one by one",
            c.count,
            c.network,
            c.since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        );
        // The network is in the sentence: `source_ip` holds addresses only.
        self.login_event("(counted)", None, detail)
    }

    fn login_event(&self, route: &str, source_ip: Option<String>, detail: String) -> AuditEvent {
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
        ev
    }
}

impl Default for LoginFailures {
    fn default() -> Self {
        LoginFailures::new(
            crate::config::DEFAULT_TENANT,
            DEFAULT_LIMIT,
            DEFAULT_TOTAL,
            DEFAULT_WINDOW,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(limit: u32, total: u32) -> LoginFailures {
        LoginFailures::new("t", limit, total, Duration::from_secs(60))
    }

    #[test]
    fn networks_are_ipv4_slash_24_and_ipv6_slash_64() {
        assert_eq!(network_of("10.1.2.3"), "10.1.2.0/24");
        assert_eq!(network_of("::ffff:10.1.2.3"), "10.1.2.0/24");
        assert_eq!(network_of("2001:db8:a:b:1:2:3:4"), "2001:db8:a:b::/64");
        assert_eq!(network_of("::1"), "::/64");
        assert_eq!(network_of("not an address"), OTHERS);
    }

    #[test]
    fn a_network_gets_its_limit_recorded_then_counted_and_the_count_handed_out_once() {
        let f = f(3, 100);
        let t0 = Instant::now();
        assert_eq!(f.admit(Some("10.0.0.7"), t0), Admit::Record { last: false });
        // Another address of the same /24 shares the limit.
        assert_eq!(f.admit(Some("10.0.0.8"), t0), Admit::Record { last: false });
        assert_eq!(f.admit(Some("10.0.0.9"), t0), Admit::Record { last: true });
        for _ in 0..5 {
            assert_eq!(
                f.admit(Some("10.0.0.7"), t0 + Duration::from_secs(30)),
                Admit::Count
            );
        }
        // Another network has its own limit.
        assert_eq!(f.admit(Some("10.0.1.7"), t0), Admit::Record { last: false });
        // Nothing is handed out while the window runs, unless the server stops.
        assert!(f.counted(t0 + Duration::from_secs(59), false).is_empty());
        let ended = f.counted(t0 + Duration::from_secs(61), false);
        assert_eq!(ended.len(), 1);
        assert_eq!(
            (ended[0].network.as_str(), ended[0].count),
            ("10.0.0.0/24", 5)
        );
        assert!(f.counted(t0 + Duration::from_secs(62), true).is_empty());
        // A new window records again.
        assert_eq!(
            f.admit(Some("10.0.0.7"), t0 + Duration::from_secs(61)),
            Admit::Record { last: false }
        );
    }

    #[test]
    fn many_networks_are_held_to_the_overall_limit_and_their_counts_handed_out() {
        let f = f(20, 50);
        let t0 = Instant::now();
        let mut recorded = 0;
        for i in 0..500u32 {
            let ip = format!("10.{}.{}.1", i / 250, i % 250);
            for _ in 0..25 {
                if matches!(f.admit(Some(&ip), t0), Admit::Record { .. }) {
                    recorded += 1;
                }
            }
        }
        assert_eq!(recorded, 50);
        // At stop, every count comes out: together with what was recorded, all 12,500, in at
        // most MAX_SUMMARIES summaries (the last one for the networks with the fewest).
        let summaries = f.counted(t0, true);
        assert_eq!(summaries.len(), MAX_SUMMARIES);
        assert!(summaries[MAX_SUMMARIES - 1]
            .network
            .ends_with("other networks"));
        let counted: u64 = summaries.iter().map(|c| c.count).sum();
        assert_eq!(counted + recorded, 500 * 25);
    }

    #[test]
    fn a_window_that_rolls_over_keeps_its_count_for_the_summary() {
        let f = f(1, 100);
        let t0 = Instant::now();
        f.admit(Some("10.0.0.1"), t0);
        f.admit(Some("10.0.0.1"), t0);
        f.admit(Some("10.0.0.1"), t0);
        // The network fails again after the window: its old count is kept for the summary.
        f.admit(Some("10.0.0.1"), t0 + Duration::from_secs(70));
        let ended = f.counted(t0 + Duration::from_secs(71), false);
        assert_eq!(ended.iter().map(|c| c.count).sum::<u64>(), 2);
    }

    #[test]
    fn events_name_route_source_and_reason_and_summaries_the_count() {
        let f = LoginFailures::new("pharmacy-a", 1, 100, Duration::from_secs(60));
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
            .event("/queue", Some("10.1.1.2".into()), "x", t0)
            .is_none());
        let counted = f.counted(t0, true);
        let summary = f.summary_event(&counted[0]);
        assert_eq!(summary.source_ip, None);
        assert!(summary
            .detail
            .unwrap()
            .starts_with("1 more refused sign-ins from 10.1.1.0/24"));
    }

    #[test]
    fn past_the_tracked_networks_new_ones_share_one_count() {
        let f = f(1, u32::MAX);
        let t0 = Instant::now();
        for i in 0..MAX_SOURCES {
            let ip = format!("10.{}.{}.1", i / 256, i % 256);
            assert!(matches!(f.admit(Some(&ip), t0), Admit::Record { .. }));
        }
        // Full of live windows: two new networks share the one count.
        assert!(matches!(
            f.admit(Some("192.168.1.1"), t0),
            Admit::Record { .. }
        ));
        assert_eq!(f.admit(Some("192.168.2.1"), t0), Admit::Count);
        // Once the old windows have passed, a new network gets its own again.
        let later = t0 + Duration::from_secs(61);
        assert!(matches!(
            f.admit(Some("192.168.3.1"), later),
            Admit::Record { .. }
        ));
        assert!(matches!(
            f.admit(Some("192.168.4.1"), later),
            Admit::Record { .. }
        ));
    }
}
