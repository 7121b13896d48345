//! records on a real embedded deployment: role-scoped views, a patient's list, cancel, the queue.

#[path = "../../verify/tests/support/mod.rs"]
mod support;

use rx_domain::Status;
use rx_fn_records::{cancel, get, list_for_patient, queue};
use rx_guard::audit::Action;
use rx_platform::{EventKind, PipelineEvent, StepError};
use serde_json::Value;
use support::*;

fn text(v: &Value) -> String {
    v.to_string()
}

/// The contained Patient of a MedicationRequest view, if any.
fn contained_patient(mr: &Value) -> Option<&Value> {
    mr["contained"]
        .as_array()?
        .iter()
        .find(|r| r["resourceType"] == "Patient")
}

#[tokio::test]
async fn pharmacist_view_is_full_and_technician_view_lacks_ssn_address_and_notes() {
    let d = open();
    let rx = queued(&d, &Order::lisinopril()).await;

    let full = get(&d.svc, &pharmacist("rph-1", false), None, &rx)
        .await
        .expect("pharmacist view");
    let tech = get(&d.svc, &technician(), None, &rx)
        .await
        .expect("technician view");

    // The full view carries what the technician view must not: the test can fail.
    let full_text = text(&full);
    assert!(full_text.contains(SSN), "{full}");
    assert!(full_text.contains(STREET), "{full}");
    assert!(full_text.contains(ORDER_NOTE), "{full}");
    assert_eq!(full["subject"]["reference"], "#patient");

    let tech_text = text(&tech);
    assert!(!tech_text.contains(SSN), "{tech}");
    assert!(!tech_text.contains(STREET), "{tech}");
    assert!(!tech_text.contains(ORDER_NOTE), "{tech}");
    let patient = contained_patient(&tech).expect("technician sees who the patient is");
    assert!(patient["name"][0]["text"].as_str().is_some());
    assert_eq!(tech["resourceType"], "MedicationRequest");
    assert_eq!(
        tech["medicationCodeableConcept"]["coding"][0]["code"],
        LISINOPRIL
    );
}

#[tokio::test]
async fn prescriber_view_is_clinical_without_ssn_or_address() {
    let d = open();
    let rx = queued(&d, &Order::lisinopril()).await;

    let mr = get(&d.svc, &prescriber(DR_PUMP), None, &rx)
        .await
        .expect("own order");

    let t = text(&mr);
    assert!(!t.contains(SSN) && !t.contains(STREET), "{mr}");
    assert!(t.contains(ORDER_NOTE), "notes are clinical content: {mr}");
    assert!(t.contains("MRN-pat-1"), "other identifiers stay: {mr}");
}

#[tokio::test]
async fn auditor_view_has_no_clinical_content_and_the_patient_file_stays_closed() {
    let d = open();
    let rx = queued(&d, &Order::amoxicillin().allergic_to("Penicillin")).await;

    let mr = get(&d.svc, &auditor(), None, &rx)
        .await
        .expect("auditor view");

    assert_eq!(mr["id"], rx.as_str());
    assert_eq!(mr["extension"][0]["valueCode"], "awaiting-verification");
    let t = text(&mr);
    for absent in [
        SSN,
        STREET,
        ORDER_NOTE,
        AMOXICILLIN,
        "Amoxicillin",
        "pat-1",
        "allergy",
    ] {
        assert!(!t.contains(absent), "{absent} in {mr}");
    }
    for key in [
        "contained",
        "dosageInstruction",
        "dispenseRequest",
        "note",
        "detectedIssue",
    ] {
        assert!(mr.get(key).is_none(), "{key} in {mr}");
    }
    assert_eq!(mr["subject"]["extension"][0]["valueCode"], "masked");
    // One read of the order, none of the patient.
    let reads = audit(&d, Some("auditor-1"), Some(Action::Read), None).await;
    assert_eq!(reads.len(), 1, "{reads:?}");
    assert_eq!(reads[0].resource.kind, "MedicationRequest");
}

#[tokio::test]
async fn every_read_is_audited_once() {
    let d = open();
    let rx = queued(&d, &Order::lisinopril()).await;

    get(
        &d.svc,
        &pharmacist("rph-1", false),
        Some("203.0.113.9".into()),
        &rx,
    )
    .await
    .expect("view");

    let reads = audit(&d, Some("rph-1"), Some(Action::Read), None).await;
    let kinds: Vec<&str> = reads.iter().map(|e| e.resource.kind.as_str()).collect();
    assert_eq!(kinds, ["MedicationRequest", "Patient"]);
    assert!(reads
        .iter()
        .all(|e| e.source_ip.as_deref() == Some("203.0.113.9")));
    assert!(reads
        .iter()
        .all(|e| e.function == "records" && !e.break_glass));
    assert_eq!(audit(&d, Some("rph-1"), None, None).await.len(), 2);
}

#[tokio::test]
async fn prescriber_cannot_read_another_prescribers_order_and_the_denial_is_audited() {
    let d = open();
    let rx = queued(&d, &Order::lisinopril().by(DR_SMITH)).await;

    let err = get(&d.svc, &prescriber(DR_PUMP), None, &rx)
        .await
        .expect_err("not own order");

    assert!(matches!(err, StepError::Forbidden(_)), "{err:?}");
    let denied = denials(&d, DR_PUMP.subject).await;
    assert_eq!(denied.len(), 1);
    assert_eq!(
        denied[0].detail.as_deref(),
        Some("read-prescription:not-own-patient-order")
    );
}

#[tokio::test]
async fn prescriber_under_break_glass_reads_any_order_of_the_tenant_flagged() {
    let d = open();
    let rx = queued(&d, &Order::lisinopril().by(DR_SMITH)).await;
    let p = with_break_glass(prescriber(DR_PUMP));

    let mr = get(&d.svc, &p, None, &rx).await.expect("emergency access");

    assert_eq!(mr["id"], rx.as_str());
    let events = audit(&d, Some(DR_PUMP.subject), None, None).await;
    assert!(!events.is_empty());
    assert!(events.iter().all(|e| e.break_glass), "{events:?}");
    assert!(events.iter().all(|e| e.purpose.code() == "ETREAT"));
}

#[tokio::test]
async fn prescriber_lists_only_their_own_orders_of_a_patient() {
    let d = open();
    let mine = queued(&d, &Order::lisinopril()).await;
    let theirs = queued(&d, &Order::amoxicillin().by(DR_SMITH)).await;
    let unrelated = queued(&d, &Order::lisinopril().patient("pat-2")).await;

    let own = list_for_patient(&d.svc, &prescriber(DR_PUMP), None, "pat-1")
        .await
        .expect("list");
    let all = list_for_patient(&d.svc, &pharmacist("rph-1", false), None, "pat-1")
        .await
        .expect("list");

    let ids = |b: &Value| -> Vec<String> {
        b["entry"]
            .as_array()
            .expect("entries")
            .iter()
            .map(|e| e["resource"]["id"].as_str().expect("id").to_string())
            .collect()
    };
    assert_eq!(own["resourceType"], "Bundle");
    assert_eq!(own["type"], "searchset");
    assert_eq!(ids(&own), std::slice::from_ref(&mine));
    assert_eq!(own["total"], 1);
    let mut both = ids(&all);
    both.sort();
    let mut expected = vec![mine, theirs.clone()];
    expected.sort();
    assert_eq!(both, expected);
    assert!(!ids(&all).contains(&unrelated));
    // The withheld order is recorded as a denial.
    let denied = denials(&d, DR_PUMP.subject).await;
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0].resource.id, theirs);
}

#[tokio::test]
async fn technician_may_list_a_patients_orders_only_under_break_glass() {
    let d = open();
    queued(&d, &Order::lisinopril()).await;

    let err = list_for_patient(&d.svc, &technician(), None, "pat-1")
        .await
        .expect_err("needs break-glass");
    assert!(matches!(err, StepError::Forbidden(_)), "{err:?}");
    assert_eq!(denials(&d, "tech-1").await.len(), 1);
    assert!(!text(&err.operation_outcome()).contains("pat-1"));
    assert!(audit(&d, Some("tech-1"), Some(Action::Read), None)
        .await
        .is_empty());

    let list = list_for_patient(&d.svc, &with_break_glass(technician()), None, "pat-1")
        .await
        .expect("under break-glass");
    assert_eq!(list["total"], 1);
    let reads = audit(&d, Some("tech-1"), Some(Action::Read), None).await;
    assert!(!reads.is_empty() && reads.iter().all(|e| e.break_glass));
}

#[tokio::test]
async fn prescriber_cancels_their_order_once() {
    let d = open();
    let rx = queued(&d, &Order::lisinopril()).await;

    let out = cancel(
        &d.svc,
        &prescriber(DR_PUMP),
        None,
        &rx,
        "dose changed after labs",
    )
    .await
    .expect("cancelled");

    assert_eq!(out["status"], "cancelled");
    assert_eq!(out["duplicate"], false);
    let events: Vec<PipelineEvent> = serde_json::from_value(out["events"].clone()).expect("events");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind, EventKind::Cancelled);
    assert_eq!(out["medicationRequest"]["status"], "cancelled");
    assert_eq!(status(&d, &rx).await, Status::Cancelled);
    let reason = stored(&d, &rx).await.cancellation.expect("reason kept");
    assert_eq!(reason.code, "cancelled-by-prescriber");

    let trail = transitions(&d, &rx).await;
    let again = cancel(&d.svc, &prescriber(DR_PUMP), None, &rx, "again")
        .await
        .expect("redelivery");
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["version"], out["version"]);
    assert_eq!(transitions(&d, &rx).await, trail);

    // Anyone else cancelled nothing: a conflict, not a redelivery.
    let err = cancel(
        &d.svc,
        &pharmacist("rph-1", false),
        None,
        &rx,
        "entered twice",
    )
    .await
    .expect_err("cancelled by someone else");
    assert!(matches!(err, StepError::Conflict(_)), "{err:?}");
    assert!(
        err.to_string()
            .contains("already cancelled by someone else"),
        "{err}"
    );
    assert_eq!(transitions(&d, &rx).await, trail);
}

#[tokio::test]
async fn cancel_needs_a_reason_and_the_right_to_cancel() {
    let d = open();
    let rx = queued(&d, &Order::lisinopril().by(DR_SMITH)).await;

    let err = cancel(&d.svc, &prescriber(DR_SMITH), None, &rx, "  ")
        .await
        .expect_err("reason");
    assert!(matches!(err, StepError::Invalid { .. }), "{err:?}");

    let err = cancel(&d.svc, &prescriber(DR_PUMP), None, &rx, "not mine")
        .await
        .expect_err("not own order");
    assert!(matches!(err, StepError::Forbidden(_)), "{err:?}");
    assert_eq!(status(&d, &rx).await, Status::AwaitingVerification);
}

#[tokio::test]
async fn a_dispensed_order_cannot_be_cancelled() {
    let d = open();
    let rx = queued(&d, &Order::lisinopril()).await;
    verified(&d, &rx).await;
    rx_fn_dispense::handle(
        &d.svc,
        &pharmacist("rph-2", true),
        None,
        &rx,
        &Default::default(),
    )
    .await
    .expect("dispensed");

    let err = cancel(&d.svc, &pharmacist("rph-2", true), None, &rx, "too late")
        .await
        .expect_err("final");

    assert!(matches!(err, StepError::Conflict(_)), "{err:?}");
}

#[tokio::test]
async fn queue_lists_awaiting_orders_of_the_tenant_with_alerts_and_no_patient() {
    let d = open();
    let allergic = queued(&d, &Order::amoxicillin().allergic_to("Penicillin")).await;
    let plain = queued(&d, &Order::lisinopril().patient("pat-2")).await;
    let done = queued(&d, &Order::lisinopril().patient("pat-3")).await;
    verified(&d, &done).await;

    let q = queue(&d.svc, &technician(), None, None, 50)
        .await
        .expect("queue");

    assert_eq!(q["count"], 2);
    let entries = q["entries"].as_array().expect("entries");
    let ids: Vec<&str> = entries
        .iter()
        .map(|e| e["rxId"].as_str().expect("id"))
        .collect();
    assert!(ids.contains(&allergic.as_str()) && ids.contains(&plain.as_str()));
    let a = entries
        .iter()
        .find(|e| e["rxId"] == allergic.as_str())
        .expect("allergic order");
    assert_eq!(a["drug"], "Amoxicillin 500 MG Oral Tablet");
    assert_eq!(a["blocking"], true);
    assert_eq!(a["alerts"][0]["kind"], "allergy");
    assert_eq!(a["alerts"][0]["severity"], "high");
    assert!(a["alerts"][0]["message"].as_str().is_some());
    let t = text(&q);
    for absent in ["pat-1", "pat-2", SSN, STREET, ORDER_NOTE] {
        assert!(!t.contains(absent), "{absent} in {q}");
    }

    // Another pharmacy's queue is its own; an auditor has no queue.
    let other = queue(&d.svc, &pharmacist_of(OTHER_TENANT), None, None, 50)
        .await
        .expect("other queue");
    assert_eq!(other["count"], 0);
    let err = queue(&d.svc, &auditor(), None, None, 50)
        .await
        .expect_err("role");
    assert!(matches!(err, StepError::Forbidden(_)), "{err:?}");
    assert_eq!(denials(&d, "auditor-1").await.len(), 1);
}

#[tokio::test]
async fn reading_an_id_that_is_not_an_rxflow_id_is_refused_without_echoing_it() {
    let d = open();
    let err = get(
        &d.svc,
        &pharmacist("rph-1", false),
        None,
        "Jane Doe 1961-04-12",
    )
    .await
    .expect_err("not a uuid");
    assert_eq!(err.status(), 400);
    assert!(!err.to_string().contains("Jane"));
    assert!(audit(&d, Some("rph-1"), None, None).await.is_empty());
}
