//! Break-glass: reason required, bounded duration, expiry, no extension, flagged decisions.

use chrono::{DateTime, Duration, TimeZone, Utc};
use rx_guard::access::{
    grant_break_glass, Action, Decision, DenyReason, Policy, Principal, Resource, Role,
};
use rx_guard::GuardError;

const REASON: &str = "unresponsive patient in ED, need medication history";

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 6, 1, 22, 15, 0)
        .single()
        .expect("time")
}

fn who(role: Role) -> Principal {
    Principal {
        subject: format!("{role}-7"),
        role,
        tenant: "acme".into(),
        mfa: true,
        npi: None,
        break_glass: None,
    }
}

fn others_order() -> Resource<'static> {
    Resource {
        tenant: "acme",
        prescriber_subject: Some("dr-other"),
        prescriber_npi: Some("1679576722"),
        controlled: false,
    }
}

fn forbidden(r: rx_guard::Result<rx_guard::access::BreakGlassGrant>) -> String {
    match r {
        Err(GuardError::Forbidden(m)) => m,
        other => panic!("expected Forbidden, got {other:?}"),
    }
}

#[test]
fn grant_needs_a_reason_of_at_least_ten_characters() {
    let p = who(Role::Pharmacist);
    for bad in ["", "   ", "urgent", "  emergency\t"] {
        let m = forbidden(grant_break_glass(&p, bad, t0(), None));
        assert!(m.contains("reason"), "{m}");
    }
    let g =
        grant_break_glass(&p, "  code blue bed 4  ", t0(), None).expect("ten characters and more");
    assert_eq!(g.reason, "code blue bed 4");
}

#[test]
fn refusal_does_not_echo_the_reason_text() {
    // A reason may name a patient: it must not come back in an error.
    let p = who(Role::Auditor);
    let m = forbidden(grant_break_glass(
        &p,
        "Jane Roe DOB 1970-01-01 chart",
        t0(),
        None,
    ));
    assert!(!m.contains("Jane") && !m.contains("1970"), "{m}");
}

#[test]
fn grant_defaults_to_sixty_minutes_for_the_named_user() {
    let p = who(Role::Technician);
    let g = grant_break_glass(&p, REASON, t0(), None).expect("grant");
    assert_eq!(g.subject, "technician-7");
    assert_eq!(g.granted_at, t0());
    assert_eq!(g.expires_at, t0() + Duration::minutes(60));
    assert!(uuid_like(&g.id), "{}", g.id);
}

fn uuid_like(s: &str) -> bool {
    s.len() == 36 && s.chars().filter(|c| *c == '-').count() == 4
}

#[test]
fn grant_duration_is_bounded_to_sixty_minutes() {
    let p = who(Role::Prescriber);
    let g = grant_break_glass(&p, REASON, t0(), Some(Duration::minutes(15))).expect("15 min");
    assert_eq!(g.expires_at - g.granted_at, Duration::minutes(15));
    for bad in [
        Duration::minutes(61),
        Duration::hours(8),
        Duration::zero(),
        Duration::minutes(-5),
    ] {
        let m = forbidden(grant_break_glass(&p, REASON, t0(), Some(bad)));
        assert!(m.contains("60 minutes"), "{m}");
    }
}

#[test]
fn roles_without_break_glass_in_the_policy_cannot_ask_for_it() {
    for role in [Role::Auditor, Role::Admin, Role::Service] {
        let m = forbidden(grant_break_glass(&who(role), REASON, t0(), None));
        assert!(m.contains(role.as_str()), "{m}");
    }
    for role in [Role::Prescriber, Role::Pharmacist, Role::Technician] {
        grant_break_glass(&who(role), REASON, t0(), None).expect("clinical roles may ask");
    }
}

#[test]
fn a_new_request_makes_a_new_grant_and_never_extends_the_old_one() {
    let p = who(Role::Technician);
    let first = grant_break_glass(&p, REASON, t0(), None).expect("first");
    let holding = p.clone().with_break_glass(first.clone());
    let later = t0() + Duration::minutes(50);
    let second = grant_break_glass(&holding, "still treating, need the history", later, None)
        .expect("second");
    assert_ne!(second.id, first.id);
    assert_eq!(second.granted_at, later);
    assert_eq!(second.expires_at, later + Duration::minutes(60));
    // The first grant is untouched: it still ends at its own time.
    assert_eq!(
        holding.break_glass.as_ref().map(|g| g.expires_at),
        Some(t0() + Duration::minutes(60))
    );
    let after_first = t0() + Duration::minutes(61);
    assert_eq!(
        Policy::embedded().decide(
            &holding,
            Action::ListPatientPrescriptions,
            Some(&others_order()),
            after_first
        ),
        Decision::Deny(DenyReason::BreakGlassExpired)
    );
}

#[test]
fn grant_widens_scope_only_until_it_expires() {
    let policy = Policy::embedded();
    let p = who(Role::Technician);
    let g = grant_break_glass(&p, REASON, t0(), None).expect("grant");
    let p = p.with_break_glass(g);
    let res = others_order();
    let list = Action::ListPatientPrescriptions;
    assert_eq!(
        policy.decide(&p, list, Some(&res), t0() - Duration::seconds(1)),
        Decision::Deny(DenyReason::BreakGlassExpired),
        "not yet active before granted_at"
    );
    for at in [
        t0(),
        t0() + Duration::minutes(30),
        t0() + Duration::minutes(60) - Duration::seconds(1),
    ] {
        assert_eq!(
            policy.decide(&p, list, Some(&res), at),
            Decision::Allow {
                via_break_glass: true
            },
            "{at}"
        );
    }
    assert_eq!(
        policy.decide(&p, list, Some(&res), t0() + Duration::minutes(60)),
        Decision::Deny(DenyReason::BreakGlassExpired)
    );
}

#[test]
fn every_access_during_a_grant_is_flagged_and_none_outside_it() {
    let policy = Policy::embedded();
    let p = who(Role::Pharmacist);
    let res = others_order();
    // In normal scope without a grant: not flagged.
    assert_eq!(
        policy.decide(&p, Action::ReadPrescription, Some(&res), t0()),
        Decision::Allow {
            via_break_glass: false
        }
    );
    let g = grant_break_glass(&p, REASON, t0(), None).expect("grant");
    let p = p.with_break_glass(g);
    for action in [
        Action::ReadPrescription,
        Action::ListPatientPrescriptions,
        Action::DispensePrescription,
        Action::ReadQueue,
    ] {
        assert_eq!(
            policy.decide(&p, action, Some(&res), t0() + Duration::minutes(1)),
            Decision::Allow {
                via_break_glass: true
            },
            "{action} during the grant"
        );
    }
    assert_eq!(
        policy.decide(
            &p,
            Action::ReadPrescription,
            Some(&res),
            t0() + Duration::minutes(90)
        ),
        Decision::Allow {
            via_break_glass: false
        },
        "after expiry normal access is normal again"
    );
}

#[test]
fn break_glass_does_not_reach_another_tenant() {
    let p = who(Role::Prescriber);
    let g = grant_break_glass(&p, REASON, t0(), None).expect("grant");
    let p = p.with_break_glass(g);
    let elsewhere = Resource {
        tenant: "other-pharmacy",
        ..others_order()
    };
    assert_eq!(
        Policy::embedded().decide(&p, Action::ReadPrescription, Some(&elsewhere), t0()),
        Decision::Deny(DenyReason::OtherTenant)
    );
}
