//! FHIR out: OperationOutcome, MedicationDispense and the MedicationRequest view, in R4 shape.

use chrono::{TimeZone, Utc};
use rx_domain::fhir::{self, WORKFLOW_STATUS_EXTENSION};
use rx_domain::{
    Alert, AlertKind, Dosage, Evidence, Fill, MedicationCode, MedicationOrder, PrescriberRef,
    PrescriptionRecord, Reason, Severity, Status, Validation,
};
use serde_json::{json, Value};

fn record() -> PrescriptionRecord {
    let order = MedicationOrder {
        source_id: Some("src-1".into()),
        status: "active".into(),
        intent: "order".into(),
        patient_ref: "p1".into(),
        requester: PrescriberRef::Npi("1234567893".into()),
        medication: MedicationCode {
            rxnorm: Some("1049621".into()),
            ndc: Some("00574407205".into()),
            display: Some("oxycodone hydrochloride 5 MG Oral Tablet".into()),
        },
        authored_on: Some(Utc.with_ymd_and_hms(2025, 3, 1, 10, 0, 0).unwrap()),
        quantity: Some(20.0),
        quantity_unit: Some("tablet".into()),
        days_supply: Some(5),
        refills: Some(0),
        valid_until: Some(Utc.with_ymd_and_hms(2025, 9, 1, 0, 0, 0).unwrap()),
        dosage: vec![
            Dosage {
                text: Some("1 tablet every 4 hours as needed".into()),
                dose_quantity: Some(1.0),
                dose_unit: Some("tablet".into()),
                per_day: Some(6.0),
                as_needed: true,
            },
            Dosage {
                per_day: Some(0.5),
                ..Dosage::default()
            },
        ],
        note: Some("note".into()),
    };
    let mut r = PrescriptionRecord::new(order, "prescriber-1");
    r.alerts = vec![
        Alert {
            kind: AlertKind::OpioidBenzodiazepine,
            severity: Severity::High,
            message: "oxycodone with diazepam".into(),
            evidence: vec![Evidence {
                kind: "order".into(),
                reference: Some("rx-0".into()),
                detail: "diazepam 5 MG".into(),
            }],
        },
        Alert {
            kind: AlertKind::HighMme,
            severity: Severity::Moderate,
            message: "45 MME/day".into(),
            evidence: vec![],
        },
    ];
    r
}

#[test]
fn operation_outcome_has_r4_issue_shape() {
    let o = fhir::operation_outcome("error", "required", "MedicationRequest.subject is required");
    assert_eq!(
        o,
        json!({"resourceType": "OperationOutcome", "issue": [
            {"severity": "error", "code": "required", "diagnostics": "MedicationRequest.subject is required"}]})
    );
    let o = fhir::operation_outcome_issues(&[
        (
            "error",
            "invalid",
            "bad".into(),
            Some("MedicationRequest.status".into()),
        ),
        ("warning", "informational", "note".into(), None),
    ]);
    assert_eq!(
        o["issue"][0]["expression"],
        json!(["MedicationRequest.status"])
    );
    assert!(o["issue"][1].get("expression").is_none());
}

#[test]
fn medication_dispense_points_at_its_prescription_and_carries_the_fill() {
    let r = record();
    let fill = Fill {
        id: "d1".into(),
        at: Utc.with_ymd_and_hms(2025, 3, 2, 9, 0, 0).unwrap(),
        quantity: 10.0,
        days_supply: Some(3),
        by: "pharmacist-9".into(),
        refill_number: 1,
        partial: true,
        request_id: None,
    };
    let d = fhir::medication_dispense("d1", "rx-42", &r, &fill, "Patient/p1");
    assert_eq!(d["resourceType"], "MedicationDispense");
    assert_eq!(d["id"], "d1");
    assert_eq!(d["status"], "completed");
    assert_eq!(
        d["authorizingPrescription"],
        json!([{"reference": "MedicationRequest/rx-42"}])
    );
    assert_eq!(d["subject"]["reference"], "Patient/p1");
    assert_eq!(d["quantity"], json!({"value": 10.0, "unit": "tablet"}));
    assert_eq!(d["daysSupply"]["value"], 3);
    assert_eq!(d["daysSupply"]["code"], "d");
    assert_eq!(d["whenHandedOver"], "2025-03-02T09:00:00+00:00");
    assert_eq!(d["type"]["coding"][0]["code"], "RFP", "a partial refill");
    assert_eq!(
        d["performer"][0]["actor"]["identifier"]["value"],
        "pharmacist-9"
    );
    let codes: Vec<&str> = d["medicationCodeableConcept"]["coding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["code"].as_str().unwrap())
        .collect();
    assert_eq!(codes, ["1049621", "00574407205"]);
    let first = Fill {
        refill_number: 0,
        partial: false,
        ..fill
    };
    let d = fhir::medication_dispense("d0", "rx-42", &r, &first, "Patient/p1");
    assert_eq!(d["type"]["coding"][0]["code"], "FF");
}

#[test]
fn medication_request_maps_every_status_and_keeps_ours_in_an_extension() {
    let expected = [
        (Status::Received, "active"),
        (Status::Validated, "active"),
        (Status::Rejected, "cancelled"),
        (Status::NeedsClarification, "on-hold"),
        (Status::Reviewed, "active"),
        (Status::AwaitingVerification, "active"),
        (Status::Verified, "active"),
        (Status::PartiallyDispensed, "active"),
        (Status::Dispensed, "completed"),
        (Status::Cancelled, "cancelled"),
    ];
    assert_eq!(expected.len(), Status::ALL.len());
    for (status, fhir_status) in expected {
        let v = fhir::medication_request("rx-1", status, &record(), Some("Patient/p1"));
        assert_eq!(v["status"], fhir_status, "{status}");
        let ext = v["extension"].as_array().unwrap();
        let ours = ext
            .iter()
            .find(|e| e["url"] == WORKFLOW_STATUS_EXTENSION)
            .unwrap();
        assert_eq!(ours["valueCode"], status.as_str());
    }
}

#[test]
fn medication_request_alerts_are_contained_detected_issues_each_referenced() {
    let v = fhir::medication_request(
        "rx-1",
        Status::AwaitingVerification,
        &record(),
        Some("Patient/p1"),
    );
    let contained = v["contained"].as_array().unwrap();
    let refs: Vec<&str> = v["detectedIssue"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["reference"].as_str().unwrap())
        .collect();
    assert_eq!(contained.len(), 2);
    for c in contained {
        assert_eq!(c["resourceType"], "DetectedIssue");
        assert_eq!(c["status"], "final");
        assert!(refs.contains(&format!("#{}", c["id"].as_str().unwrap()).as_str()));
    }
    assert_eq!(contained[0]["severity"], "high");
    assert_eq!(
        contained[0]["code"]["coding"][0]["code"],
        "opioid-benzodiazepine"
    );
    assert_eq!(contained[0]["detail"], "oxycodone with diazepam");
    assert_eq!(
        contained[0]["implicated"][1]["reference"],
        "MedicationRequest/rx-0"
    );
    assert_eq!(contained[1]["severity"], "moderate");
}

#[test]
fn medication_request_without_patient_masks_the_subject() {
    let v = fhir::medication_request("rx-1", Status::Verified, &record(), None);
    assert!(v["subject"].get("reference").is_none());
    assert_eq!(v["subject"]["extension"][0]["valueCode"], "masked");
}

#[test]
fn rejected_medication_request_gives_the_reasons() {
    let mut r = record();
    r.validation = Some(Validation::Rejected(vec![Reason::new(
        "dea-required",
        "A DEA number is required.",
    )]));
    let v = fhir::medication_request("rx-1", Status::Rejected, &r, Some("Patient/p1"));
    assert_eq!(v["statusReason"]["coding"][0]["code"], "dea-required");
    assert_eq!(v["statusReason"]["text"], "A DEA number is required.");
    let v = fhir::medication_request("rx-1", Status::Verified, &record(), Some("Patient/p1"));
    assert!(v.get("statusReason").is_none());
}

#[test]
fn medication_request_view_parses_back_to_the_same_order() {
    let r = record();
    let v: Value = fhir::medication_request("rx-1", Status::Verified, &r, Some("Patient/p1"));
    let back = fhir::parse_medication_request(&v).unwrap();
    let o = &r.order;
    assert_eq!(back.medication, o.medication);
    assert_eq!(back.patient_ref, "p1");
    assert_eq!(back.requester, PrescriberRef::Npi("1234567893".into()));
    assert_eq!(back.authored_on, o.authored_on);
    assert_eq!(back.valid_until, o.valid_until);
    assert_eq!(
        (
            back.quantity,
            back.quantity_unit.as_deref(),
            back.days_supply,
            back.refills
        ),
        (
            o.quantity,
            o.quantity_unit.as_deref(),
            o.days_supply,
            o.refills
        )
    );
    assert_eq!(back.dosage.len(), 2);
    for (b, d) in back.dosage.iter().zip(&o.dosage) {
        assert!((b.per_day.unwrap() - d.per_day.unwrap()).abs() < 1e-6);
        assert_eq!(
            (b.dose_quantity, b.as_needed, &b.text),
            (d.dose_quantity, d.as_needed, &d.text)
        );
    }
    assert_eq!(back.note, o.note);
    assert_eq!(back.status, "active");
}
