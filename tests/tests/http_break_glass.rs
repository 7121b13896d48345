//! Break-glass over HTTP: a reason is required, a grant lasts at most an hour and cannot be
//! extended, every access under it is flagged, an expired grant opens nothing, a grant claimed in
//! a token counts for nothing, and opening one raises an alert for review.

mod http_support;

use chrono::{Duration, Utc};
use http_support::*;
use rx_guard::access::{grant_break_glass, Principal, Role};
use rx_guard::audit::{Action as AuditAction, AuditQuery, Purpose};
use serde_json::json;

const REASON: &str = "patient unconscious in the emergency department";

fn principal(who: &Who) -> Principal {
    Principal {
        subject: who.subject.clone(),
        role: who.role,
        tenant: who.tenant.clone(),
        mfa: who.mfa,
        npi: who.npi.clone(),
        break_glass: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reason_is_required_and_each_refusal_is_audited() {
    let s = TestServer::start().await;
    let tech = Who::new(Role::Technician, "tech-noreason");
    for body in [
        json!({}),
        json!({"reason": "   "}),
        json!({"reason": "because"}),
    ] {
        let r = s.as_who(&tech, "POST", "/break-glass", Some(&body)).await;
        r.assert_outcome(400);
        assert_eq!(r.json["issue"][0]["expression"][0], "reason", "{}", r.text);
    }
    let refusals = s.denials("tech-noreason").await;
    assert_eq!(refusals.len(), 3, "{refusals:?}");
    assert!(refusals
        .iter()
        .all(|e| e.detail.as_deref() == Some("break-glass:reason-required")));
    // Nothing was opened: the technician still cannot list a patient's orders.
    let list = s
        .as_who(&tech, "GET", "/patients/pat-x/prescriptions", None)
        .await;
    list.assert_outcome(403);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_is_capped_audited_raised_as_an_alert_and_never_extended() {
    let s = TestServer::start().await;
    let rph = Who::pharmacist("rph-glass");
    let r = s
        .as_who(
            &rph,
            "POST",
            "/break-glass",
            Some(&json!({"reason": REASON, "minutes": 600})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.json["minutes"], 60, "capped at an hour: {}", r.text);
    let grant_id = r.json["id"].as_str().expect("grant id").to_string();
    assert!(
        !r.text.contains(REASON),
        "the reason is not echoed: {}",
        r.text
    );

    let alerts = s
        .audit(AuditQuery {
            subject: Some("rph-glass".into()),
            action: Some(AuditAction::BreakGlass),
            ..AuditQuery::default()
        })
        .await;
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    let alert = &alerts[0];
    assert_eq!(alert.detail.as_deref(), Some("break-glass-alert"));
    assert_eq!(alert.resource.id, grant_id);
    assert!(alert.break_glass);
    assert_eq!(alert.purpose, Purpose::Emergency);
    let stored_events = serde_json::to_string(&s.events_of("rph-glass").await).expect("json");
    assert!(
        !stored_events.contains("unconscious"),
        "the reason stays sealed"
    );

    let again = s
        .as_who(
            &rph,
            "POST",
            "/break-glass",
            Some(&json!({"reason": REASON})),
        )
        .await;
    again.assert_outcome(409);
    assert!(s
        .denials("rph-glass")
        .await
        .iter()
        .any(|e| e.detail.as_deref() == Some("break-glass:already-active")));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_without_break_glass_are_refused() {
    let s = TestServer::start().await;
    for role in [Role::Auditor, Role::Admin, Role::Service] {
        let who = Who::new(role, &format!("{role}-glass"));
        let r = s
            .as_who(
                &who,
                "POST",
                "/break-glass",
                Some(&json!({"reason": REASON})),
            )
            .await;
        r.assert_outcome(403);
        assert!(!s.denials(&who.subject).await.is_empty(), "{role}");
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accesses_under_a_grant_are_allowed_and_flagged() {
    let s = TestServer::start().await;
    let id = s.queued("pat-bg").await;
    let tech = Who::new(Role::Technician, "tech-bg");
    let smith = Who::prescriber("dr-smith-bg", DR_SMITH);

    // Before: the technician cannot list, the other prescriber cannot read.
    s.as_who(&tech, "GET", "/patients/pat-bg/prescriptions", None)
        .await
        .assert_outcome(403);
    s.as_who(&smith, "GET", &format!("/prescriptions/{id}"), None)
        .await
        .assert_outcome(403);

    let granted = Utc::now();
    for who in [&tech, &smith] {
        let r = s
            .as_who(
                who,
                "POST",
                "/break-glass",
                Some(&json!({"reason": REASON, "minutes": 15})),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
    }
    let list = s
        .as_who(&tech, "GET", "/patients/pat-bg/prescriptions", None)
        .await;
    assert_eq!(list.status, 200, "{}", list.text);
    assert_eq!(list.json["total"], 1, "{}", list.text);
    let read = s
        .as_who(&smith, "GET", &format!("/prescriptions/{id}"), None)
        .await;
    assert_eq!(read.status, 200, "{}", read.text);

    for subject in ["tech-bg", "dr-smith-bg"] {
        let reads: Vec<_> = s
            .events_of(subject)
            .await
            .into_iter()
            .filter(|e| e.action == AuditAction::Read && e.resource.id == id && e.at >= granted)
            .collect();
        assert!(!reads.is_empty(), "{subject} read nothing");
        assert!(
            reads
                .iter()
                .all(|e| e.break_glass && e.purpose == Purpose::Emergency),
            "{subject}: {reads:?}"
        );
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_grant_opens_nothing_and_a_new_one_may_be_asked_for() {
    let s = TestServer::start().await;
    let id = s.queued("pat-exp").await;
    let tech = Who::new(Role::Technician, "tech-expired");
    let p = principal(&tech);
    let old = grant_break_glass(
        &p,
        REASON,
        Utc::now() - Duration::hours(2),
        Some(Duration::minutes(30)),
    )
    .expect("grant");
    rx_platform::break_glass::record(&s.svc, &p, None, &old)
        .await
        .expect("expired grant stored");

    let list = s
        .as_who(&tech, "GET", "/patients/pat-exp/prescriptions", None)
        .await;
    list.assert_outcome(403);
    assert!(s
        .denials("tech-expired")
        .await
        .iter()
        .any(|e| e.detail.as_deref() == Some("list-patient-prescriptions:break-glass-expired")));

    let fresh = s
        .as_who(
            &tech,
            "POST",
            "/break-glass",
            Some(&json!({"reason": REASON})),
        )
        .await;
    assert_eq!(fresh.status, 201, "{}", fresh.text);
    assert_ne!(fresh.json["id"], old.id.as_str());
    let list = s
        .as_who(&tech, "GET", "/patients/pat-exp/prescriptions", None)
        .await;
    assert_eq!(list.status, 200, "{}", list.text);
    let _ = id;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_claimed_in_the_token_counts_for_nothing() {
    let s = TestServer::start().await;
    s.queued("pat-claim").await;
    let now = Utc::now().timestamp();
    let token = s
        .issuer
        .sign_json(&json!({
            "iss": s.issuer.issuer(), "aud": s.issuer.audience(),
            "sub": "tech-claims", "iat": now, "nbf": now, "exp": now + 600,
            "role": "technician", "tenant": TENANT, "amr": ["pwd", "mfa"],
            "break_glass": {"id": "x", "subject": "tech-claims", "reason": "trust me please",
                            "granted_at": Utc::now().to_rfc3339(),
                            "expires_at": (Utc::now() + Duration::minutes(30)).to_rfc3339()}
        }))
        .expect("token");
    let r = s
        .call(
            "GET",
            "/patients/pat-claim/prescriptions",
            Some(&token),
            None,
        )
        .await;
    r.assert_outcome(403);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_counts_only_in_its_own_tenant() {
    let s = TestServer::start().await;
    s.queued("pat-cross").await;
    let tech_a = Who::new(Role::Technician, "tech-cross");
    let r = s
        .as_who(
            &tech_a,
            "POST",
            "/break-glass",
            Some(&json!({"reason": REASON})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    // The same subject signed in under another organisation holds no grant there.
    let tech_b = tech_a.clone().in_tenant(OTHER_TENANT);
    let list = s
        .as_who(&tech_b, "GET", "/patients/pat-cross/prescriptions", None)
        .await;
    list.assert_outcome(403);
    s.stop().await;
}
