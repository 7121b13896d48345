//! verify on a real embedded deployment: orders go through intake, validate and review first.

mod support;

use std::sync::Arc;

use chrono::{Duration, Utc};
use rx_domain::{AlertKind, Status};
use rx_fn_verify::{handle, VerifyRequest};
use rx_guard::audit::Action;
use rx_platform::{EventKind, ManualClock, StepError};
use serde_json::json;
use support::*;

fn request(v: serde_json::Value) -> VerifyRequest {
    serde_json::from_value(v).expect("request parses")
}

fn approve() -> VerifyRequest {
    request(json!({"decision": "approve"}))
}

#[tokio::test]
async fn pharmacist_approves_an_order_without_blocking_alerts() {
    let d = open();
    let rx = queued(&d, &Order::lisinopril()).await;
    let before = load(&d, &rx).await.row.version;

    let out = handle(&d.svc, &pharmacist("rph-1", false), None, &rx, &approve())
        .await
        .expect("approved");

    assert_eq!(out.status, Status::Verified);
    assert_eq!(out.version, before + 1);
    assert!(!out.duplicate);
    assert_eq!(out.events.len(), 1);
    assert_eq!(out.events[0].kind, EventKind::Verified);
    assert_eq!(out.events[0].version, out.version);
    let v = stored(&d, &rx)
        .await
        .verification
        .expect("verification recorded");
    assert!(v.approved);
    assert_eq!(v.pharmacist, "rph-1");
    assert_eq!(status(&d, &rx).await, Status::Verified);
    // The write carries its audit event; the request read the order exactly once.
    assert_eq!(
        audit(&d, Some("rph-1"), Some(Action::Update), Some(&rx))
            .await
            .len(),
        1
    );
    assert_eq!(
        audit(&d, Some("rph-1"), Some(Action::Read), Some(&rx))
            .await
            .len(),
        1
    );
}

#[tokio::test]
async fn pharmacist_rejects_an_order_with_a_reason() {
    let d = open();
    let rx = queued(&d, &Order::lisinopril()).await;
    let req =
        request(json!({"decision": "reject", "reason": "duplicate of an order filled elsewhere"}));

    let out = handle(&d.svc, &pharmacist("rph-1", false), None, &rx, &req)
        .await
        .expect("rejected");

    assert_eq!(out.status, Status::Rejected);
    assert_eq!(out.events[0].kind, EventKind::Rejected);
    let v = stored(&d, &rx).await.verification.expect("verification");
    assert!(!v.approved);
    assert_eq!(v.reason.expect("reason").code, "pharmacist-rejected");
}

#[tokio::test]
async fn rejecting_without_a_reason_is_invalid_and_changes_nothing() {
    let d = open();
    let rx = queued(&d, &Order::lisinopril()).await;
    for req in [
        request(json!({"decision": "reject"})),
        request(json!({"decision": "reject", "reason": "   "})),
    ] {
        let err = handle(&d.svc, &pharmacist("rph-1", false), None, &rx, &req)
            .await
            .expect_err("refused");
        assert!(
            matches!(
                err,
                StepError::Invalid {
                    code: "required",
                    ..
                }
            ),
            "{err:?}"
        );
    }
    assert_eq!(status(&d, &rx).await, Status::AwaitingVerification);
}

#[tokio::test]
async fn approving_an_order_with_a_blocking_alert_requires_an_override() {
    let d = open();
    let rx = queued(&d, &Order::amoxicillin().allergic_to("Penicillin")).await;
    let alerts = stored(&d, &rx).await.alerts;
    assert!(alerts
        .iter()
        .any(|a| a.kind == AlertKind::Allergy && a.is_blocking()));

    let err = handle(&d.svc, &pharmacist("rph-1", false), None, &rx, &approve())
        .await
        .expect_err("override required");

    let StepError::Refused(msg) = &err else {
        panic!("{err:?}")
    };
    assert!(msg.contains("allergy"), "{msg}");
    assert_eq!(err.status(), 422);
    assert_eq!(status(&d, &rx).await, Status::AwaitingVerification);
}

#[tokio::test]
async fn an_override_with_a_blank_reason_does_not_count() {
    let d = open();
    let rx = queued(&d, &Order::amoxicillin().allergic_to("Penicillin")).await;
    let req =
        request(json!({"decision": "approve", "overrides": [{"alert": "allergy", "reason": " "}]}));

    let err = handle(&d.svc, &pharmacist("rph-1", false), None, &rx, &req)
        .await
        .expect_err("blank reason");

    assert!(
        matches!(&err, StepError::Refused(m) if m.contains("allergy")),
        "{err:?}"
    );
}

#[tokio::test]
async fn approving_with_an_override_and_a_reason_verifies_and_keeps_the_reason() {
    let d = open();
    let rx = queued(&d, &Order::amoxicillin().allergic_to("Penicillin")).await;
    let req = request(json!({
        "decision": "approve",
        "overrides": [{"alert": "allergy", "reason": "rash in childhood only; prescriber confirmed"}]
    }));

    let out = handle(&d.svc, &pharmacist("rph-1", false), None, &rx, &req)
        .await
        .expect("approved with override");

    assert_eq!(out.status, Status::Verified);
    let v = stored(&d, &rx).await.verification.expect("verification");
    assert_eq!(v.overrides.len(), 1);
    assert_eq!(v.overrides[0].alert, AlertKind::Allergy);
    assert!(v.overrides[0].reason.starts_with("rash"));
}

#[tokio::test]
async fn an_override_of_an_alert_the_order_does_not_carry_is_invalid() {
    let d = open();
    let rx = queued(&d, &Order::lisinopril()).await;
    let req = request(
        json!({"decision": "approve", "overrides": [{"alert": "high-mme", "reason": "ok"}]}),
    );

    let err = handle(&d.svc, &pharmacist("rph-1", false), None, &rx, &req)
        .await
        .expect_err("no such alert");

    assert!(matches!(err, StepError::Invalid { .. }), "{err:?}");
}

#[tokio::test]
async fn controlled_order_without_mfa_is_denied_and_audited() {
    let d = open();
    let rx = queued(&d, &Order::oxycodone()).await;

    let err = handle(&d.svc, &pharmacist("rph-1", false), None, &rx, &approve())
        .await
        .expect_err("mfa required");

    assert!(
        matches!(&err, StepError::Forbidden(m) if m.contains("multi-factor")),
        "{err:?}"
    );
    let denied = denials(&d, "rph-1").await;
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0].resource.id, rx);
    assert_eq!(
        denied[0].detail.as_deref(),
        Some("verify-prescription:mfa-required")
    );
    assert!(
        denied[0].patient.is_some(),
        "the denial names the patient by blind index"
    );
    assert_eq!(status(&d, &rx).await, Status::AwaitingVerification);

    let out = handle(&d.svc, &pharmacist("rph-1", true), None, &rx, &approve())
        .await
        .expect("with MFA");
    assert_eq!(out.status, Status::Verified);
    assert_eq!(denials(&d, "rph-1").await.len(), 1);
}

#[tokio::test]
async fn the_submitter_cannot_verify_their_own_order() {
    let d = open();
    let rx = queued(&d, &Order::lisinopril()).await;
    // The prescriber also holds a pharmacist role: separation of duties still holds.
    let same_person = pharmacist(DR_PUMP.subject, true);

    let err = handle(&d.svc, &same_person, None, &rx, &approve())
        .await
        .expect_err("separation of duties");

    assert!(matches!(err, StepError::Forbidden(_)), "{err:?}");
    let denied = denials(&d, DR_PUMP.subject).await;
    assert_eq!(denied.len(), 1);
    assert_eq!(
        denied[0].detail.as_deref(),
        Some("verify-prescription:separation-of-duties")
    );
    assert_eq!(status(&d, &rx).await, Status::AwaitingVerification);
}

#[tokio::test]
async fn pharmacist_of_another_tenant_is_refused_and_the_attempt_audited() {
    let d = open();
    let rx = queued(&d, &Order::lisinopril()).await;
    let outsider = pharmacist_of(OTHER_TENANT);

    let err = handle(&d.svc, &outsider, None, &rx, &approve())
        .await
        .expect_err("other tenant");

    // Whether the id exists in another pharmacy is not told: not found, and audited as a denial.
    assert!(matches!(err, StepError::NotFound(_)), "{err:?}");
    let denied = denials(&d, &outsider.subject).await;
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0].resource.id, rx);
    assert_eq!(denied[0].actor.tenant, OTHER_TENANT);
    assert!(audit(&d, Some(&outsider.subject), Some(Action::Read), None)
        .await
        .is_empty());
    assert_eq!(status(&d, &rx).await, Status::AwaitingVerification);
}

#[tokio::test]
async fn technician_may_not_verify_and_nothing_is_opened() {
    let d = open();
    let rx = queued(&d, &Order::lisinopril()).await;

    let err = handle(&d.svc, &technician(), None, &rx, &approve())
        .await
        .expect_err("role");

    assert!(matches!(err, StepError::Forbidden(_)), "{err:?}");
    assert_eq!(denials(&d, "tech-1").await.len(), 1);
    assert!(audit(&d, Some("tech-1"), Some(Action::Read), None)
        .await
        .is_empty());
}

#[tokio::test]
async fn the_same_decision_again_is_answered_without_a_new_write() {
    let d = open();
    let rx = queued(&d, &Order::lisinopril()).await;
    let first = handle(&d.svc, &pharmacist("rph-1", false), None, &rx, &approve())
        .await
        .expect("approved");
    let trail = transitions(&d, &rx).await;

    let again = handle(&d.svc, &pharmacist("rph-1", false), None, &rx, &approve())
        .await
        .expect("redelivery");

    assert!(again.duplicate);
    assert_eq!(again.version, first.version);
    assert_eq!(again.status, Status::Verified);
    assert_eq!(
        again.events, first.events,
        "the verified event is announced again"
    );
    assert_eq!(transitions(&d, &rx).await, trail);
    assert_eq!(
        audit(&d, Some("rph-1"), Some(Action::Update), None)
            .await
            .len(),
        1,
        "the redelivery wrote nothing"
    );
}

/// Another pharmacist's approval of an order already approved verified nothing: a conflict, not
/// a redelivery telling them the order is verified by their request.
#[tokio::test]
async fn the_same_decision_by_another_pharmacist_conflicts_and_writes_nothing() {
    let d = open();
    let rx = queued(&d, &Order::lisinopril()).await;
    handle(&d.svc, &pharmacist("rph-1", false), None, &rx, &approve())
        .await
        .expect("approved");
    let trail = transitions(&d, &rx).await;

    let err = handle(&d.svc, &pharmacist("rph-2", false), None, &rx, &approve())
        .await
        .expect_err("verified by someone else");

    assert!(matches!(err, StepError::Conflict(_)), "{err:?}");
    let m = err.to_string();
    assert!(m.contains("already verified by another pharmacist"), "{m}");
    assert!(!m.contains("rph-1"), "the verifier is not named: {m}");
    assert_eq!(transitions(&d, &rx).await, trail);
    assert!(audit(&d, Some("rph-2"), Some(Action::Update), None)
        .await
        .is_empty());
    assert_eq!(
        stored(&d, &rx).await.verification.expect("v").pharmacist,
        "rph-1"
    );

    // The same for a rejection.
    let rx = queued(&d, &Order::lisinopril()).await;
    let reject = request(json!({"decision": "reject", "reason": "duplicate therapy"}));
    handle(&d.svc, &pharmacist("rph-1", false), None, &rx, &reject)
        .await
        .expect("rejected");
    let err = handle(&d.svc, &pharmacist("rph-2", false), None, &rx, &reject)
        .await
        .expect_err("rejected by someone else");
    assert!(
        err.to_string()
            .contains("already rejected by another pharmacist"),
        "{err}"
    );
}

#[tokio::test]
async fn the_opposite_decision_after_approval_conflicts() {
    let d = open();
    let rx = queued(&d, &Order::lisinopril()).await;
    handle(&d.svc, &pharmacist("rph-1", false), None, &rx, &approve())
        .await
        .expect("approved");
    let req = request(json!({"decision": "reject", "reason": "changed my mind"}));

    let err = handle(&d.svc, &pharmacist("rph-1", false), None, &rx, &req)
        .await
        .expect_err("conflict");

    assert!(
        matches!(&err, StepError::Conflict(m) if m.contains("verified")),
        "{err:?}"
    );
}

#[test]
fn request_with_an_unknown_alert_kind_or_field_does_not_parse() {
    let bad = [
        json!({"decision": "approve", "overrides": [{"alert": "bad-vibes", "reason": "x"}]}),
        json!({"decision": "maybe"}),
        json!({"decision": "approve", "pharmacist": "someone-else"}),
    ];
    for v in bad {
        assert!(
            serde_json::from_value::<VerifyRequest>(v.clone()).is_err(),
            "{v}"
        );
    }
}

/// An order that expired while it waited for a pharmacist is not approved (the counter would
/// refuse it); it stays in the queue, unchanged, for the pharmacist to reject with a reason.
#[tokio::test]
async fn an_order_that_expired_in_the_queue_cannot_be_approved_but_can_be_rejected() {
    let d = open();
    let rx = queued(&d, &Order::lisinopril()).await;
    let before = load(&d, &rx).await.row.version;
    let mut later = d.svc.clone();
    later.clock = Arc::new(ManualClock::new(Utc::now() + Duration::days(400)));

    let err = handle(&later, &pharmacist("rph-1", false), None, &rx, &approve())
        .await
        .expect_err("an expired order is not approved");
    match err {
        StepError::Refused(m) => {
            assert!(m.contains("365 days ago"), "{m}");
            assert!(m.contains("reject it"), "{m}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(load(&d, &rx).await.row.version, before, "nothing written");
    assert_eq!(status(&d, &rx).await, Status::AwaitingVerification);

    let req = request(
        json!({"decision": "reject", "reason": "expired while waiting; new prescription needed"}),
    );
    let out = handle(&later, &pharmacist("rph-1", false), None, &rx, &req)
        .await
        .expect("rejected");
    assert_eq!(out.status, Status::Rejected);
}
