//! dispense on a real embedded deployment: orders are submitted, validated, reviewed and verified
//! first.

#[path = "../../verify/tests/support/mod.rs"]
mod support;

use rx_domain::{AlertKind, Status};
use rx_fn_dispense::{handle, DispenseRequest};
use rx_guard::audit::Action;
use rx_platform::{EventKind, StepError};
use serde_json::json;
use support::*;

fn request(v: serde_json::Value) -> DispenseRequest {
    serde_json::from_value(v).expect("request parses")
}

fn rph() -> rx_guard::access::Principal {
    pharmacist("rph-dispenser", true)
}

async fn ready(d: &Deployment, order: &Order) -> String {
    let rx = queued(d, order).await;
    verified(d, &rx).await;
    rx
}

#[tokio::test]
async fn partial_fill_then_the_rest_completes_a_schedule_ii_order() {
    let d = open();
    let rx = ready(&d, &Order::oxycodone()).await;

    let first = handle(&d.svc, &rph(), None, &rx, &request(json!({"quantity": 8})))
        .await
        .expect("part fill");

    assert_eq!(first.status, Status::PartiallyDispensed);
    assert_eq!(first.events.len(), 1);
    assert_eq!(first.events[0].kind, EventKind::Dispensed);
    let md = &first.dispense;
    assert_eq!(md["resourceType"], "MedicationDispense");
    assert_eq!(md["type"]["coding"][0]["code"], "FFP");
    assert_eq!(md["quantity"]["value"], 8.0);
    assert_eq!(
        md["daysSupply"]["value"], 2,
        "a part fill lasts its share of the supply"
    );
    assert_eq!(
        md["authorizingPrescription"][0]["reference"],
        format!("MedicationRequest/{rx}")
    );
    assert_eq!(md["subject"]["reference"], "Patient/pat-1");

    // No quantity: what remains of the fill (12 of 20).
    let rest = handle(&d.svc, &rph(), None, &rx, &DispenseRequest::default())
        .await
        .expect("rest of the fill");

    assert_eq!(rest.status, Status::Dispensed);
    assert_eq!(rest.dispense["quantity"]["value"], 12.0);
    assert_eq!(rest.dispense["type"]["coding"][0]["code"], "FF");
    assert_eq!(rest.version, first.version + 1);
    let fills = stored(&d, &rx).await.fills;
    assert_eq!(fills.len(), 2);
    assert!(fills
        .iter()
        .all(|f| f.refill_number == 0 && f.by == "rph-dispenser"));
}

#[tokio::test]
async fn a_schedule_ii_order_is_not_refilled() {
    let d = open();
    let rx = ready(&d, &Order::oxycodone()).await;
    handle(&d.svc, &rph(), None, &rx, &DispenseRequest::default())
        .await
        .expect("first fill");

    let err = handle(&d.svc, &rph(), None, &rx, &DispenseRequest::default())
        .await
        .expect_err("no refill of schedule II");

    assert!(
        matches!(&err, StepError::Refused(m) if m.contains("schedule II")),
        "{err:?}"
    );
    assert_eq!(stored(&d, &rx).await.fills.len(), 1);
}

#[tokio::test]
async fn refills_are_dispensed_until_none_remain() {
    let d = open();
    let rx = ready(&d, &Order::lisinopril().refills(1)).await;

    let first = handle(&d.svc, &rph(), None, &rx, &DispenseRequest::default())
        .await
        .expect("first fill");
    assert_eq!(first.status, Status::PartiallyDispensed, "a refill remains");
    assert_eq!(first.dispense["type"]["coding"][0]["code"], "FF");

    let refill = handle(&d.svc, &rph(), None, &rx, &DispenseRequest::default())
        .await
        .expect("refill");
    assert_eq!(refill.status, Status::Dispensed);
    assert_eq!(refill.dispense["type"]["coding"][0]["code"], "RF");

    let err = handle(&d.svc, &rph(), None, &rx, &DispenseRequest::default())
        .await
        .expect_err("refills exhausted");
    assert!(
        matches!(&err, StepError::Refused(m) if m.contains("refill")),
        "{err:?}"
    );
    assert_eq!(stored(&d, &rx).await.fills.len(), 2);
}

#[tokio::test]
async fn a_quantity_above_what_remains_of_the_fill_is_refused() {
    let d = open();
    let rx = ready(&d, &Order::oxycodone()).await;
    handle(&d.svc, &rph(), None, &rx, &request(json!({"quantity": 15})))
        .await
        .expect("part fill");
    let version = load(&d, &rx).await.row.version;

    let err = handle(&d.svc, &rph(), None, &rx, &request(json!({"quantity": 6})))
        .await
        .expect_err("only 5 remain");

    assert!(
        matches!(&err, StepError::Refused(m) if m.contains("5 tablet")),
        "{err:?}"
    );
    assert_eq!(load(&d, &rx).await.row.version, version, "nothing written");
    for body in [
        json!({"quantity": 0}),
        json!({"quantity": -2}),
        json!({"quantity": 1, "daysSupply": 0}),
    ] {
        let err = handle(&d.svc, &rph(), None, &rx, &request(body))
            .await
            .expect_err("not positive");
        assert!(matches!(err, StepError::Invalid { .. }), "{err:?}");
    }
}

#[tokio::test]
async fn an_order_not_yet_verified_cannot_be_dispensed() {
    let d = open();
    let rx = queued(&d, &Order::lisinopril()).await;

    let err = handle(&d.svc, &rph(), None, &rx, &DispenseRequest::default())
        .await
        .expect_err("awaiting verification");

    assert!(
        matches!(&err, StepError::Conflict(m) if m.contains("awaiting-verification")),
        "{err:?}"
    );
}

#[tokio::test]
async fn controlled_dispense_without_mfa_is_denied_and_audited() {
    let d = open();
    let rx = ready(&d, &Order::oxycodone()).await;
    let no_mfa = pharmacist("rph-dispenser", false);

    let err = handle(&d.svc, &no_mfa, None, &rx, &DispenseRequest::default())
        .await
        .expect_err("mfa");

    assert!(matches!(err, StepError::Forbidden(_)), "{err:?}");
    let denied = denials(&d, "rph-dispenser").await;
    assert_eq!(denied.len(), 1);
    assert_eq!(
        denied[0].detail.as_deref(),
        Some("dispense-prescription:mfa-required")
    );
    assert!(stored(&d, &rx).await.fills.is_empty());
}

#[tokio::test]
async fn technician_may_not_dispense() {
    let d = open();
    let rx = ready(&d, &Order::lisinopril()).await;

    let err = handle(
        &d.svc,
        &technician(),
        None,
        &rx,
        &DispenseRequest::default(),
    )
    .await
    .expect_err("role");

    assert!(matches!(err, StepError::Forbidden(_)), "{err:?}");
    assert_eq!(denials(&d, "tech-1").await.len(), 1);
}

#[tokio::test]
async fn a_fill_lands_in_the_patient_profile_so_an_early_refill_is_caught() {
    let d = open();
    let rx = ready(&d, &Order::lisinopril()).await;

    let out = handle(&d.svc, &rph(), None, &rx, &DispenseRequest::default())
        .await
        .expect("fill");

    let file = patient_file(&d, "pat-1").await;
    let entry = file
        .profile
        .iter()
        .find(|e| e.rx_id == rx)
        .expect("profile entry");
    let last = entry.last_fill.as_ref().expect("last fill recorded");
    assert_eq!(out.dispense["id"], last.id.as_str());
    assert_eq!(last.days_supply, Some(30));
    // One commit: the prescription update and the patient update, each with its audit event.
    assert_eq!(
        audit(&d, Some("rph-dispenser"), Some(Action::Update), None)
            .await
            .len(),
        2
    );

    // A new order for the same product the day after: DUR sees the fill.
    let again = queued(&d, &Order::lisinopril()).await;
    let alerts = stored(&d, &again).await.alerts;
    assert!(
        alerts.iter().any(|a| a.kind == AlertKind::EarlyRefill),
        "{alerts:?}"
    );
}

#[test]
fn request_with_an_unknown_field_does_not_parse() {
    let v = json!({"quantity": 1, "patient": "someone"});
    assert!(serde_json::from_value::<DispenseRequest>(v).is_err());
    let r: DispenseRequest = serde_json::from_value(json!({"daysSupply": 7})).expect("parses");
    assert_eq!(r.days_supply, Some(7));
}
