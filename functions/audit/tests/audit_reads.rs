//! The auditor's reads: search, accounting of disclosures, FHIR NDJSON export, break-glass
//! sessions.

mod support;

use chrono::Duration;
use rx_fn_audit::{break_glass_sessions, disclosures, export_fhir_ndjson, search};
use rx_guard::audit::{Action, Actor, AuditEvent, AuditQuery, AuditSink, Purpose, ResourceRef};
use rx_store::{Changes, RecordStore, Row, Table, Write};
use support::*;

#[tokio::test]
async fn search_returns_matching_events_in_order() {
    let t = trail(30, 10).await;
    let found = search(
        &t.store,
        &AuditQuery {
            subject: Some("user-1".into()),
            action: Some(Action::Read),
            ..AuditQuery::default()
        },
    )
    .await
    .unwrap();
    assert!(!found.is_empty());
    assert!(found.windows(2).all(|w| w[0].seq < w[1].seq));
    for e in &found {
        assert_eq!(e.event.actor.subject, "user-1");
        assert_eq!(e.event.action, Action::Read);
        assert_eq!(e.hash.len(), 64);
    }
}

#[tokio::test]
async fn disclosures_list_date_recipient_what_and_purpose_of_one_patient() {
    let t = trail(0, 10).await;
    let patient = format!("{:064x}", 7);
    let mut given = event(1);
    given.action = Action::Disclose;
    given.patient = Some(patient.clone());
    given.detail = Some("Acme Payer".into());
    given.purpose = Purpose::Payment;
    let mut read = event(2);
    read.patient = Some(patient.clone());
    let mut other = event(3);
    other.action = Action::Disclose;
    t.store.append(&[given.clone(), read, other]).await.unwrap();

    let list = disclosures(&t.store, &patient).await.unwrap();
    assert_eq!(list.len(), 1);
    let d = &list[0];
    assert_eq!(d.date, given.at);
    assert_eq!(d.recipient.as_deref(), Some("Acme Payer"));
    assert_eq!(d.what, given.resource);
    assert_eq!(d.purpose, Purpose::Payment);
    assert_eq!(d.by, "user-1");
    let json = serde_json::to_value(d).unwrap();
    assert_eq!(json["purpose"], "HPAYMT");
}

#[tokio::test]
async fn fhir_export_writes_one_audit_event_per_line() {
    let t = trail(25, 10).await;
    let mut out = Vec::new();
    let n = export_fhir_ndjson(&t.store, &mut out).await.unwrap();
    assert_eq!(n, 25);
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<_> = text.lines().collect();
    assert_eq!(lines.len(), 25);
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["resourceType"], "AuditEvent");
    }
}

fn actor(subject: &str) -> Actor {
    Actor {
        subject: subject.into(),
        role: "pharmacist".into(),
        tenant: "t1".into(),
    }
}

fn flagged(subject: &str, minutes: i64, rx: &str) -> AuditEvent {
    let mut e = AuditEvent::new(
        actor(subject),
        Action::Read,
        ResourceRef {
            kind: "MedicationRequest".into(),
            id: rx.into(),
        },
        "records",
        Purpose::Emergency,
    );
    e.at = t0() + Duration::minutes(minutes);
    e.break_glass = true;
    e
}

#[tokio::test]
async fn break_glass_sessions_list_what_each_grant_touched_inside_its_window() {
    let t = trail(0, 10).await;
    let grant_id = "019ae000-0000-7000-8000-0000000000bb";
    let mut opened = AuditEvent::new(
        actor("dr-a"),
        Action::BreakGlass,
        ResourceRef {
            kind: "BreakGlass".into(),
            id: grant_id.into(),
        },
        "break-glass",
        Purpose::Emergency,
    );
    opened.at = t0();
    opened.break_glass = true;
    opened.detail = Some("break-glass-alert".into());
    // The stored grant: a 30-minute window in the row's status, the body sealed (opaque here).
    let row = Row {
        table: Table::BreakGlass,
        id: grant_id.into(),
        tenant: "t1".into(),
        status: format!(
            "{}/{}",
            t0().to_rfc3339(),
            (t0() + Duration::minutes(30)).to_rfc3339()
        ),
        version: 1,
        created_at: t0(),
        updated_at: t0(),
        index: None,
        key: None,
        sealed: vec![1, 2, 3],
    };
    t.store
        .commit(Changes {
            writes: vec![Write::Insert(row)],
            transitions: vec![],
            audit: vec![opened],
        })
        .await
        .unwrap();
    t.store
        .append(&[
            flagged("dr-a", 5, "rx-1"),
            flagged("dr-b", 6, "rx-2"),  // another person
            flagged("dr-a", 29, "rx-3"), // inside
            flagged("dr-a", 31, "rx-4"), // after the window
        ])
        .await
        .unwrap();
    let mut plain = flagged("dr-a", 7, "rx-5");
    plain.break_glass = false; // not granted by break-glass
    t.store.append(&[plain]).await.unwrap();

    let sessions = break_glass_sessions(&t.store).await.unwrap();
    assert_eq!(sessions.len(), 1);
    let s = &sessions[0];
    assert_eq!(s.grant_id, grant_id);
    assert_eq!(s.subject, "dr-a");
    assert!(s.window_from_grant);
    assert_eq!(s.expires_at, t0() + Duration::minutes(30));
    let touched: Vec<_> = s.touched.iter().map(|t| t.resource.id.as_str()).collect();
    assert_eq!(touched, ["rx-1", "rx-3"]);
    assert!(t.store.audit_len().await.unwrap() == 6);
}
