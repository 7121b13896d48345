//! At-least-once delivery: every queue step, given the same event again (SQS, a Knative Broker
//! and the local bus all redeliver), changes nothing and re-announces where the order stands.

use std::sync::Arc;

use rx_platform::config::Config;
use rx_platform::services::Embedded;
use rx_platform::{EventKind, ManualClock};
use rx_store::repo::AuditCtx;
use rx_store::RecordStore;
use rxflow::pipeline::dispatch;
use serde_json::json;

fn order(id: &str) -> serde_json::Value {
    json!({
        "resourceType": "Bundle", "type": "collection",
        "entry": [
            {"fullUrl": "urn:uuid:p1", "resource": {"resourceType": "Patient", "id": "pat-9",
              "name": [{"family": "Redelivera", "given": ["Ines"]}]}},
            {"fullUrl": "urn:uuid:d1", "resource": {"resourceType": "Practitioner", "id": "dr-9",
              "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": "1234567893"}]}},
            {"fullUrl": "urn:uuid:o1", "resource": {"resourceType": "MedicationRequest", "id": id,
              "status": "active", "intent": "order",
              "subject": {"reference": "urn:uuid:p1"}, "requester": {"reference": "urn:uuid:d1"},
              "authoredOn": "2026-11-30T10:00:00Z",
              "medicationCodeableConcept": {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "314076"}]},
              "dispenseRequest": {"quantity": {"value": 30}, "expectedSupplyDuration": {"value": 30, "unit": "days"}, "numberOfRepeatsAllowed": 1}}}
        ]
    })
}

#[tokio::test]
async fn each_queue_step_is_idempotent_under_redelivery() {
    let dir = tempfile::tempdir().unwrap();
    let config =
        Config::from_lookup(|k| (k == "RXFLOW_DATA_DIR").then(|| dir.path().display().to_string()))
            .unwrap();
    // Business time fixed a day after the order was written, so the test never ages.
    let day_after = chrono::DateTime::parse_from_rfc3339("2026-12-01T10:00:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    let emb = Embedded::open(&config, Arc::new(ManualClock::new(day_after))).unwrap();
    let svc = &emb.services;
    let cx = AuditCtx::system("intake", "default");
    let out = rx_fn_intake::handle(svc, &cx, "default", &order("mr-redeliver"))
        .await
        .unwrap();
    let received = out.events[0].clone();
    assert_eq!(received.kind, EventKind::Received);

    let validated = dispatch(svc, &received).await.unwrap();
    assert_eq!(validated[0].kind, EventKind::Validated);
    let reviewed = dispatch(svc, &validated[0]).await.unwrap();
    assert_eq!(reviewed[0].kind, EventKind::Reviewed);
    let rx_id = &received.rx_id;
    let transitions = emb.store.transitions("default", rx_id).await.unwrap().len();
    let row = emb
        .store
        .get(rx_store::Table::Prescriptions, "default", rx_id)
        .await
        .unwrap()
        .unwrap();

    // Every event delivered again, in any order: no new transition, no new version, and no
    // step re-announces a status it did not produce.
    for ev in [&received, &validated[0], &received, &validated[0]] {
        let again = dispatch(svc, ev).await.unwrap();
        for a in &again {
            assert_ne!(a.kind, EventKind::Received);
        }
    }
    assert_eq!(
        emb.store.transitions("default", rx_id).await.unwrap().len(),
        transitions
    );
    let after = emb
        .store
        .get(rx_store::Table::Prescriptions, "default", rx_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after.version, row.version);
    assert_eq!(after.status, "awaiting-verification");

    // The same order submitted again is the same prescription.
    let again = rx_fn_intake::handle(svc, &cx, "default", &order("mr-redeliver"))
        .await
        .unwrap();
    assert!(again.accepted[0].duplicate);
    assert_eq!(&again.accepted[0].rx_id, rx_id);
    assert!(
        again.events.is_empty(),
        "no new event for an order past intake"
    );
}
