//! dispense on a real embedded deployment: orders are submitted, validated, reviewed and verified
//! first.

#[path = "../../verify/tests/support/mod.rs"]
mod support;

use std::sync::Arc;

use chrono::{Duration, Utc};
use rx_domain::{AlertKind, Status};
use rx_fn_dispense::{handle, DispenseRequest};
use rx_guard::audit::Action;
use rx_platform::{EventKind, ManualClock, StepError};
use serde_json::json;
use support::*;

fn request(v: serde_json::Value) -> DispenseRequest {
    serde_json::from_value(v).expect("request parses")
}

fn rph() -> rx_guard::access::Principal {
    pharmacist("rph-dispenser", true)
}

/// A deployment whose business time the test moves (to let a supply run down).
fn open_with_clock() -> (Deployment, Arc<ManualClock>) {
    let mut d = open();
    let clock = Arc::new(ManualClock::new(Utc::now()));
    d.svc.clock = clock.clone();
    (d, clock)
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
    let (d, clock) = open_with_clock();
    let rx = ready(&d, &Order::lisinopril().refills(1)).await;

    let first = handle(&d.svc, &rph(), None, &rx, &DispenseRequest::default())
        .await
        .expect("first fill");
    assert_eq!(first.status, Status::PartiallyDispensed, "a refill remains");
    assert_eq!(first.dispense["type"]["coding"][0]["code"], "FF");

    // 23 days into the 30-day supply: more than 75% used, the refill is due.
    clock.set(Utc::now() + Duration::days(23));
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
async fn a_refill_before_75_percent_of_the_supply_is_used_is_refused() {
    let (d, clock) = open_with_clock();
    let start = Utc::now();
    let rx = ready(&d, &Order::lisinopril().refills(2)).await;
    handle(&d.svc, &rph(), None, &rx, &DispenseRequest::default())
        .await
        .expect("first fill");
    let version = load(&d, &rx).await.row.version;

    // The tester's case: the next full 30-day fill a second later, and again 22 days on.
    for later in [Duration::seconds(1), Duration::days(22)] {
        clock.set(start + later);
        let err = handle(&d.svc, &rph(), None, &rx, &DispenseRequest::default())
            .await
            .expect_err("refill too soon");
        assert!(
            matches!(&err, StepError::Refused(m) if m.contains("30-day supply") && m.contains("75%")),
            "{err:?}"
        );
    }
    assert_eq!(load(&d, &rx).await.row.version, version, "nothing written");
    assert_eq!(stored(&d, &rx).await.fills.len(), 1);

    clock.set(start + Duration::days(23));
    let refill = handle(&d.svc, &rph(), None, &rx, &DispenseRequest::default())
        .await
        .expect("refill once 75% is used");
    assert_eq!(refill.dispense["type"]["coding"][0]["code"], "RF");
}

#[tokio::test]
async fn a_partial_fill_is_completed_at_once_and_the_refill_waits() {
    let (d, clock) = open_with_clock();
    let start = Utc::now();
    let rx = ready(&d, &Order::lisinopril().refills(1)).await;
    handle(&d.svc, &rph(), None, &rx, &request(json!({"quantity": 10})))
        .await
        .expect("part fill");

    // Completing the fill is not a refill.
    clock.set(start + Duration::seconds(1));
    let rest = handle(&d.svc, &rph(), None, &rx, &DispenseRequest::default())
        .await
        .expect("rest of the fill");
    assert_eq!(rest.dispense["quantity"]["value"], 20.0);

    let err = handle(&d.svc, &rph(), None, &rx, &DispenseRequest::default())
        .await
        .expect_err("refill too soon");
    assert!(
        matches!(&err, StepError::Refused(m) if m.contains("refill 1")),
        "{err:?}"
    );
    assert_eq!(stored(&d, &rx).await.fills.len(), 2);
}

#[tokio::test]
async fn a_quantity_too_small_to_measure_is_refused() {
    let d = open();
    let rx = ready(&d, &Order::lisinopril()).await;
    let version = load(&d, &rx).await.row.version;

    for q in [1e-320, 0.0005] {
        let err = handle(
            &d.svc,
            &rph(),
            None,
            &rx,
            &request(json!({ "quantity": q })),
        )
        .await
        .expect_err("too small");
        assert!(
            matches!(&err, StepError::Invalid { message, expression, .. }
                if message.contains("0.001") && expression.as_deref() == Some("quantity")),
            "{q}: {err:?}"
        );
    }
    let err = handle(
        &d.svc,
        &rph(),
        None,
        &rx,
        &request(json!({"daysSupply": 100_000})),
    )
    .await
    .expect_err("more than a year");
    assert!(
        matches!(&err, StepError::Invalid { expression, .. } if expression.as_deref() == Some("daysSupply")),
        "{err:?}"
    );
    assert_eq!(load(&d, &rx).await.row.version, version, "nothing written");
    assert!(stored(&d, &rx).await.fills.is_empty());
}

#[tokio::test]
async fn a_fill_leaving_less_than_can_be_measured_completes_the_fill() {
    let d = open();
    let rx = ready(&d, &Order::lisinopril()).await;

    let out = handle(
        &d.svc,
        &rph(),
        None,
        &rx,
        &request(json!({"quantity": 29.9995})),
    )
    .await
    .expect("fill");

    assert_eq!(
        out.status,
        Status::Dispensed,
        "no unfillable remnant is left open"
    );
    assert_eq!(out.dispense["type"]["coding"][0]["code"], "FF");
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
    // The file keeps what review reads of the order and the fill: not who filled it, the
    // request's key, the prescriber, the patient reference, units or status.
    assert!(last.by.is_empty() && last.request_id.is_none());
    let kept = serde_json::to_value(entry).unwrap();
    for gone in ["by", "request_id"] {
        assert!(kept["last_fill"].get(gone).is_none(), "{gone} kept: {kept}");
    }
    for gone in [
        "requester",
        "patient_ref",
        "status",
        "intent",
        "quantity_unit",
        "note",
    ] {
        assert!(kept["order"].get(gone).is_none(), "{gone} kept: {kept}");
    }
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

/// A dispense sent again with its requestId (a retry after a lost answer or a 504) is answered
/// with the fill it made, recording no second one; by another pharmacist it is a conflict; a
/// request without one is a new fill each time.
#[tokio::test]
async fn a_repeated_request_id_is_answered_with_its_fill_not_a_second_one() {
    let d = open();
    let rx = ready(&d, &Order::oxycodone()).await;
    let body = json!({"quantity": 8, "requestId": "fill-0001"});
    let first = handle(&d.svc, &rph(), None, &rx, &request(body.clone()))
        .await
        .expect("part fill");
    assert!(!first.duplicate);
    let version = load(&d, &rx).await.row.version;

    let again = handle(&d.svc, &rph(), None, &rx, &request(body.clone()))
        .await
        .expect("the same request");
    assert!(again.duplicate);
    assert_eq!(again.dispense["id"], first.dispense["id"]);
    assert_eq!(again.dispense["quantity"]["value"], 8.0);
    assert!(again.events.is_empty());
    assert_eq!(load(&d, &rx).await.row.version, version, "nothing written");
    assert_eq!(stored(&d, &rx).await.fills.len(), 1);

    // The same key for another quantity is not a retry.
    let err = handle(
        &d.svc,
        &rph(),
        None,
        &rx,
        &request(json!({"quantity": 9, "requestId": "fill-0001"})),
    )
    .await
    .expect_err("another request under the same key");
    assert!(matches!(err, StepError::Conflict(_)), "{err:?}");
    // Without a quantity it asks for the rest of the fill: the same key answers the fill made.
    let bare = handle(
        &d.svc,
        &rph(),
        None,
        &rx,
        &request(json!({"requestId": "fill-0001"})),
    )
    .await
    .expect("a retry without the quantity");
    assert!(bare.duplicate);

    let other = pharmacist("rph-other", true);
    let err = handle(&d.svc, &other, None, &rx, &request(body))
        .await
        .expect_err("another pharmacist's key");
    assert!(matches!(err, StepError::Conflict(_)), "{err:?}");

    for bad in ["", "has space", &"x".repeat(129)] {
        let err = handle(
            &d.svc,
            &rph(),
            None,
            &rx,
            &request(json!({"quantity": 1, "requestId": bad})),
        )
        .await
        .expect_err("not a request id");
        assert!(matches!(err, StepError::Invalid { .. }), "{err:?}");
    }
    // Without a requestId each request is a fill of its own.
    handle(&d.svc, &rph(), None, &rx, &request(json!({"quantity": 2})))
        .await
        .expect("second part fill");
    assert_eq!(stored(&d, &rx).await.fills.len(), 2);
}
