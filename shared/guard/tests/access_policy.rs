//! The authorization matrix (every role × every action, from the table below, written by hand
//! and not derived from data/policy.tsv) and each attribute rule on top of it.

use chrono::{DateTime, Duration, TimeZone, Utc};
use rx_guard::access::{
    view_for, Action, BreakGlassGrant, Decision, DenyReason, Policy, Principal, Resource, Role,
    View,
};
use rx_guard::GuardError;

/// What a role may do with an action, as the team agreed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Never.
    N,
    /// On any record of the own tenant.
    Y,
    /// Only on orders the principal wrote.
    O,
    /// Own orders; any record of the tenant under break-glass.
    Ob,
    /// Only under break-glass.
    B,
}
use Expect::*;

use Action::*;
const ACTIONS: [Action; 12] = [
    SubmitPrescription,
    ReadPrescription,
    ListPatientPrescriptions,
    VerifyPrescription,
    DispensePrescription,
    CancelPrescription,
    ReadAuditEvents,
    ReadDisclosures,
    ExportAudit,
    BreakGlass,
    SealAudit,
    ReadQueue,
];

/// Rows in ACTIONS order; columns: prescriber, pharmacist, technician, auditor, admin, service.
const MATRIX: [(Action, [Expect; 6]); 12] = [
    (SubmitPrescription, [O, N, N, N, N, Y]),
    (ReadPrescription, [Ob, Y, Y, Y, N, Y]),
    (ListPatientPrescriptions, [Ob, Y, B, Y, N, Y]),
    (VerifyPrescription, [N, Y, N, N, N, N]),
    (DispensePrescription, [N, Y, N, N, N, N]),
    (CancelPrescription, [O, Y, N, N, N, N]),
    (ReadAuditEvents, [N, N, N, Y, N, N]),
    (ReadDisclosures, [N, N, N, Y, N, N]),
    (ExportAudit, [N, N, N, Y, N, N]),
    (BreakGlass, [Y, Y, Y, N, N, N]),
    (SealAudit, [N, N, N, N, Y, Y]),
    (ReadQueue, [N, Y, Y, N, N, Y]),
];
const ROLES: [Role; 6] = [
    Role::Prescriber,
    Role::Pharmacist,
    Role::Technician,
    Role::Auditor,
    Role::Admin,
    Role::Service,
];

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 3, 14, 9, 0, 0)
        .single()
        .expect("time")
}

fn principal(role: Role) -> Principal {
    Principal {
        subject: format!("{role}-1"),
        role,
        tenant: "acme".into(),
        mfa: true,
        npi: (role == Role::Prescriber).then(|| "1234567893".to_string()),
        break_glass: None,
    }
}

fn grant(p: &Principal, from: DateTime<Utc>, minutes: i64) -> BreakGlassGrant {
    BreakGlassGrant {
        id: "bg-1".into(),
        subject: p.subject.clone(),
        reason: "patient unconscious in the emergency department".into(),
        granted_at: from,
        expires_at: from + Duration::minutes(minutes),
    }
}

fn order<'a>(tenant: &'a str, writer: Option<&'a str>, npi: Option<&'a str>) -> Resource<'a> {
    Resource {
        tenant,
        prescriber_subject: writer,
        prescriber_npi: npi,
        controlled: false,
    }
}

fn role_denied(role: Role, action: Action) -> Decision {
    Decision::Deny(DenyReason::RoleNotAllowed { role, action })
}

const ALLOW: Decision = Decision::Allow {
    via_break_glass: false,
};
const ALLOW_BG: Decision = Decision::Allow {
    via_break_glass: true,
};

#[test]
fn matrix_covers_every_role_and_action() {
    let rows: Vec<Action> = MATRIX.iter().map(|(a, _)| *a).collect();
    assert_eq!(rows, ACTIONS.to_vec());
    assert_eq!(ROLES.to_vec(), Role::ALL.to_vec());
    assert_eq!(ACTIONS.to_vec(), Action::ALL.to_vec());
}

#[test]
fn matrix_on_records_in_scope() {
    // Same tenant; the principal wrote the order where the cell is about own orders.
    let policy = Policy::embedded();
    for (action, cells) in MATRIX {
        for (role, cell) in ROLES.into_iter().zip(cells) {
            let p = principal(role);
            let writer = if matches!(cell, O | Ob) {
                p.subject.clone()
            } else {
                "someone-else".into()
            };
            let res = order("acme", Some(&writer), None);
            let want = match cell {
                Y | O | Ob => ALLOW,
                B | N => role_denied(role, action),
            };
            assert_eq!(
                policy.decide(&p, action, Some(&res), now()),
                want,
                "{role} × {action}"
            );
        }
    }
}

#[test]
fn matrix_on_orders_written_by_someone_else() {
    let policy = Policy::embedded();
    let res = order("acme", Some("dr-other"), Some("1679576722"));
    for (action, cells) in MATRIX {
        for (role, cell) in ROLES.into_iter().zip(cells) {
            let want = match cell {
                Y => ALLOW,
                O | Ob => Decision::Deny(DenyReason::NotOwnPatientOrder),
                B | N => role_denied(role, action),
            };
            assert_eq!(
                policy.decide(&principal(role), action, Some(&res), now()),
                want,
                "{role} × {action}"
            );
        }
    }
}

#[test]
fn matrix_under_active_break_glass() {
    let policy = Policy::embedded();
    let res = order("acme", Some("dr-other"), Some("1679576722"));
    for (action, cells) in MATRIX {
        for (role, cell) in ROLES.into_iter().zip(cells) {
            let p = principal(role);
            let p = p
                .clone()
                .with_break_glass(grant(&p, now() - Duration::minutes(5), 60));
            let want = match cell {
                Y | Ob | B => ALLOW_BG,
                O => Decision::Deny(DenyReason::NotOwnPatientOrder),
                N => role_denied(role, action),
            };
            assert_eq!(
                policy.decide(&p, action, Some(&res), now()),
                want,
                "{role} × {action}"
            );
        }
    }
}

#[test]
fn matrix_on_another_tenant_even_under_break_glass() {
    let policy = Policy::embedded();
    for (action, cells) in MATRIX {
        for (role, cell) in ROLES.into_iter().zip(cells) {
            let p = principal(role);
            let res = order("other-pharmacy", Some(&p.subject), p.npi.as_deref());
            let p = p.clone().with_break_glass(grant(&p, now(), 60));
            let want = match cell {
                N => role_denied(role, action),
                _ => Decision::Deny(DenyReason::OtherTenant),
            };
            assert_eq!(
                policy.decide(&p, action, Some(&res), now()),
                want,
                "{role} × {action}"
            );
        }
    }
}

#[test]
fn matrix_without_a_record() {
    let policy = Policy::embedded();
    for (action, cells) in MATRIX {
        for (role, cell) in ROLES.into_iter().zip(cells) {
            let on_one_record = matches!(
                action,
                SubmitPrescription
                    | ReadPrescription
                    | VerifyPrescription
                    | DispensePrescription
                    | CancelPrescription
            );
            let want = match cell {
                N | B => role_denied(role, action),
                _ if on_one_record => Decision::Deny(DenyReason::ResourceRequired { action }),
                _ => ALLOW,
            };
            assert_eq!(
                policy.decide(&principal(role), action, None, now()),
                want,
                "{role} × {action}"
            );
        }
    }
}

#[test]
fn prescriber_reads_own_order_matched_by_subject_or_by_npi() {
    let policy = Policy::embedded();
    let p = principal(Role::Prescriber);
    let by_subject = order("acme", Some("prescriber-1"), None);
    let by_npi = order("acme", Some("ehr-import"), Some("1234567893"));
    assert_eq!(
        policy.decide(&p, ReadPrescription, Some(&by_subject), now()),
        ALLOW
    );
    assert_eq!(
        policy.decide(&p, ReadPrescription, Some(&by_npi), now()),
        ALLOW
    );
    let no_npi = Principal {
        npi: None,
        ..p.clone()
    };
    assert_eq!(
        policy.decide(&no_npi, ReadPrescription, Some(&by_npi), now()),
        Decision::Deny(DenyReason::NotOwnPatientOrder)
    );
}

#[test]
fn prescriber_cannot_read_or_cancel_another_prescribers_order() {
    let policy = Policy::embedded();
    let p = principal(Role::Prescriber);
    let theirs = order("acme", Some("dr-other"), Some("1679576722"));
    for action in [
        ReadPrescription,
        CancelPrescription,
        ListPatientPrescriptions,
    ] {
        assert_eq!(
            policy.decide(&p, action, Some(&theirs), now()),
            Decision::Deny(DenyReason::NotOwnPatientOrder),
            "{action}"
        );
    }
}

#[test]
fn prescriber_cannot_submit_an_order_under_another_prescribers_npi() {
    let policy = Policy::embedded();
    let p = principal(Role::Prescriber);
    let forged = order("acme", None, Some("1679576722"));
    assert_eq!(
        policy.decide(&p, SubmitPrescription, Some(&forged), now()),
        Decision::Deny(DenyReason::NotOwnPatientOrder)
    );
    let own = order("acme", None, Some("1234567893"));
    assert_eq!(
        policy.decide(&p, SubmitPrescription, Some(&own), now()),
        ALLOW
    );
}

#[test]
fn prescriber_break_glass_reads_but_does_not_cancel_others_orders() {
    let policy = Policy::embedded();
    let p = principal(Role::Prescriber);
    let p = p.clone().with_break_glass(grant(&p, now(), 60));
    let theirs = order("acme", Some("dr-other"), None);
    assert_eq!(
        policy.decide(&p, ReadPrescription, Some(&theirs), now()),
        ALLOW_BG
    );
    assert_eq!(
        policy.decide(&p, CancelPrescription, Some(&theirs), now()),
        Decision::Deny(DenyReason::NotOwnPatientOrder)
    );
}

#[test]
fn pharmacist_needs_mfa_to_verify_or_dispense_a_controlled_substance() {
    let policy = Policy::embedded();
    let no_mfa = Principal {
        mfa: false,
        ..principal(Role::Pharmacist)
    };
    let controlled = Resource {
        controlled: true,
        ..order("acme", Some("dr-other"), None)
    };
    let plain = order("acme", Some("dr-other"), None);
    for action in [VerifyPrescription, DispensePrescription] {
        assert_eq!(
            policy.decide(&no_mfa, action, Some(&controlled), now()),
            Decision::Deny(DenyReason::MfaRequired),
            "{action}"
        );
        assert_eq!(
            policy.decide(&no_mfa, action, Some(&plain), now()),
            ALLOW,
            "{action}"
        );
        assert_eq!(
            policy.decide(
                &principal(Role::Pharmacist),
                action,
                Some(&controlled),
                now()
            ),
            ALLOW,
            "{action} with MFA"
        );
    }
    // Reading a controlled order needs no MFA.
    assert_eq!(
        policy.decide(&no_mfa, ReadPrescription, Some(&controlled), now()),
        ALLOW
    );
}

#[test]
fn whoever_wrote_an_order_cannot_verify_it() {
    let policy = Policy::embedded();
    let p = principal(Role::Pharmacist);
    let own = order("acme", Some(&p.subject), None);
    assert_eq!(
        policy.decide(&p, VerifyPrescription, Some(&own), now()),
        Decision::Deny(DenyReason::SeparationOfDuties)
    );
    // Break-glass does not lift it either.
    let bg = p.clone().with_break_glass(grant(&p, now(), 60));
    assert_eq!(
        policy.decide(&bg, VerifyPrescription, Some(&own), now()),
        Decision::Deny(DenyReason::SeparationOfDuties)
    );
    // Another pharmacist may verify it.
    let colleague = Principal {
        subject: "pharmacist-2".into(),
        ..p.clone()
    };
    assert_eq!(
        policy.decide(&colleague, VerifyPrescription, Some(&own), now()),
        ALLOW
    );
    // The author may still dispense once someone else verified.
    assert_eq!(
        policy.decide(&p, DispensePrescription, Some(&own), now()),
        ALLOW
    );
}

#[test]
fn tenant_isolation_holds_for_every_allowed_cell() {
    let policy = Policy::embedded();
    let p = principal(Role::Pharmacist);
    let elsewhere = order("other-pharmacy", Some("dr-other"), None);
    for action in [
        ReadPrescription,
        VerifyPrescription,
        DispensePrescription,
        CancelPrescription,
        ReadQueue,
    ] {
        assert_eq!(
            policy.decide(&p, action, Some(&elsewhere), now()),
            Decision::Deny(DenyReason::OtherTenant),
            "{action}"
        );
    }
}

#[test]
fn expired_break_glass_no_longer_widens_scope() {
    let policy = Policy::embedded();
    let theirs = order("acme", Some("dr-other"), None);
    let tech = principal(Role::Technician);
    let tech = tech
        .clone()
        .with_break_glass(grant(&tech, now() - Duration::minutes(61), 60));
    assert_eq!(
        policy.decide(&tech, ListPatientPrescriptions, Some(&theirs), now()),
        Decision::Deny(DenyReason::BreakGlassExpired)
    );
    let doc = principal(Role::Prescriber);
    let doc = doc
        .clone()
        .with_break_glass(grant(&doc, now() - Duration::minutes(61), 60));
    assert_eq!(
        policy.decide(&doc, ReadPrescription, Some(&theirs), now()),
        Decision::Deny(DenyReason::BreakGlassExpired)
    );
    // Normal scope still works, and is no longer flagged.
    assert_eq!(
        policy.decide(&tech, ReadPrescription, Some(&theirs), now()),
        ALLOW
    );
}

#[test]
fn break_glass_grant_of_another_subject_counts_for_nothing() {
    let policy = Policy::embedded();
    let doc = principal(Role::Prescriber);
    let colleague = Principal {
        subject: "dr-colleague".into(),
        ..doc.clone()
    };
    let borrowed = doc.clone().with_break_glass(grant(&colleague, now(), 60));
    let theirs = order("acme", Some("dr-other"), None);
    assert_eq!(
        policy.decide(&borrowed, ReadPrescription, Some(&theirs), now()),
        Decision::Deny(DenyReason::NotOwnPatientOrder)
    );
}

#[test]
fn every_role_gets_its_minimum_necessary_view() {
    assert_eq!(view_for(Role::Prescriber), View::Clinical);
    assert_eq!(view_for(Role::Pharmacist), View::Full);
    assert_eq!(view_for(Role::Technician), View::Operational);
    assert_eq!(view_for(Role::Auditor), View::AuditOnly);
    assert_eq!(view_for(Role::Admin), View::AuditOnly);
    assert_eq!(view_for(Role::Service), View::Full);
}

#[test]
fn deny_reasons_have_stable_codes_and_forbidden_sentences() {
    let reasons = [
        (
            DenyReason::RoleNotAllowed {
                role: Role::Technician,
                action: VerifyPrescription,
            },
            "role-not-allowed",
        ),
        (DenyReason::OtherTenant, "other-tenant"),
        (DenyReason::NotOwnPatientOrder, "not-own-patient-order"),
        (DenyReason::MfaRequired, "mfa-required"),
        (DenyReason::SeparationOfDuties, "separation-of-duties"),
        (DenyReason::BreakGlassExpired, "break-glass-expired"),
        (
            DenyReason::ResourceRequired {
                action: ReadPrescription,
            },
            "resource-required",
        ),
    ];
    for (reason, code) in reasons {
        assert_eq!(reason.code(), code);
        let sentence = reason.to_string();
        assert!(sentence.len() > 20, "{code}: {sentence}");
        match Decision::Deny(reason).into_result() {
            Err(GuardError::Forbidden(m)) => assert_eq!(m, sentence),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        DenyReason::RoleNotAllowed {
            role: Role::Technician,
            action: VerifyPrescription
        }
        .to_string(),
        "the technician role may not verify prescription; ask someone with a role that may"
    );
    assert!(matches!(ALLOW_BG.into_result(), Ok(true)));
}

#[test]
fn decisions_become_audit_events_with_denials_and_break_glass_flagged() {
    use rx_guard::access::audit_event;
    use rx_guard::audit::{Action as Audit, Outcome, Purpose, ResourceRef};
    let policy = Policy::embedded();
    let rx = || ResourceRef {
        kind: "MedicationRequest".into(),
        id: "0194c8a0-1111-7000-8000-00000000abcd".into(),
    };
    let tech = principal(Role::Technician);
    let res = order("acme", Some("dr-other"), None);
    let denied = policy.decide(&tech, VerifyPrescription, Some(&res), now());
    let e = audit_event(&tech, VerifyPrescription, &denied, rx(), "verify");
    assert_eq!((e.action, e.outcome), (Audit::Deny, Outcome::Denied));
    assert_eq!(
        e.detail.as_deref(),
        Some("verify-prescription:role-not-allowed")
    );
    assert_eq!(e.actor.subject, "technician-1");
    assert!(!e.break_glass);

    let tech = tech.clone().with_break_glass(grant(&tech, now(), 60));
    let allowed = policy.decide(&tech, ListPatientPrescriptions, Some(&res), now());
    let e = audit_event(&tech, ListPatientPrescriptions, &allowed, rx(), "records");
    assert_eq!((e.action, e.outcome), (Audit::Read, Outcome::Success));
    assert!(e.break_glass);
    assert_eq!(e.purpose, Purpose::Emergency);
}
