//! FHIR R4 out: OperationOutcome, MedicationDispense, and a MedicationRequest view of a record.

use crate::model::{
    Alert, Dosage, Fill, MedicationCode, PrescriberRef, PrescriptionRecord, NDC, NPI_SYSTEM, RXNORM,
};
use crate::Status;
use serde_json::{json, Map, Value};

/// The extension that carries rxflow's own workflow status on a MedicationRequest.
pub const WORKFLOW_STATUS_EXTENSION: &str =
    "https://rxflow.dev/fhir/StructureDefinition/workflow-status";
/// Code system of [`crate::AlertKind`] codes (DetectedIssue.code).
pub const ALERT_KIND_SYSTEM: &str = "https://rxflow.dev/fhir/CodeSystem/alert-kind";
/// Code system of [`crate::Reason`] codes (MedicationRequest.statusReason).
pub const REASON_SYSTEM: &str = "https://rxflow.dev/fhir/CodeSystem/reason";
const PHARMACIST_SYSTEM: &str = "https://rxflow.dev/fhir/sid/pharmacist";
const DATA_ABSENT_REASON: &str = "http://hl7.org/fhir/StructureDefinition/data-absent-reason";
const UCUM: &str = "http://unitsofmeasure.org";
const ACT_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";

/// An R4 OperationOutcome with one issue. `severity`: fatal | error | warning | information;
/// `code`: an IssueType (invalid, required, value, security, not-found, conflict, exception, ...).
pub fn operation_outcome(severity: &str, code: &str, diagnostics: &str) -> Value {
    operation_outcome_issues(&[(severity, code, diagnostics.to_owned(), None)])
}

/// An R4 OperationOutcome with an issue per `(severity, code, diagnostics, expression)`;
/// `expression` is the FHIRPath of the element at fault (e.g. a [`super::FhirError`] path).
pub fn operation_outcome_issues(issues: &[(&str, &str, String, Option<String>)]) -> Value {
    let issue: Vec<Value> = issues
        .iter()
        .map(|(severity, code, diagnostics, expression)| {
            let mut i = Map::new();
            i.insert("severity".into(), json!(severity));
            i.insert("code".into(), json!(code));
            if !diagnostics.is_empty() {
                i.insert("diagnostics".into(), json!(diagnostics));
            }
            if let Some(e) = expression {
                i.insert("expression".into(), json!([e]));
            }
            Value::Object(i)
        })
        .collect();
    json!({ "resourceType": "OperationOutcome", "issue": issue })
}

/// An R4 MedicationDispense (status completed) for one fill of a record. `type` says first fill or
/// refill, partial or not (v3 ActCode FF / FFP / RF / RFP); the performer is the pharmacist by
/// identifier; `patient_reference` (e.g. `Patient/<id>`) becomes the subject.
pub fn medication_dispense(
    dispense_id: &str,
    rx_id: &str,
    record: &PrescriptionRecord,
    fill: &Fill,
    patient_reference: &str,
) -> Value {
    let order = &record.order;
    let (type_code, type_display) = match (fill.refill_number, fill.partial) {
        (0, false) => ("FF", "First Fill"),
        (0, true) => ("FFP", "First Fill - Part Fill"),
        (_, false) => ("RF", "Refill"),
        (_, true) => ("RFP", "Refill - Part Fill"),
    };
    let mut d = Map::new();
    d.insert("resourceType".into(), json!("MedicationDispense"));
    d.insert("id".into(), json!(dispense_id));
    d.insert("status".into(), json!("completed"));
    d.insert(
        "type".into(),
        json!({ "coding": [{ "system": ACT_CODE, "code": type_code, "display": type_display }] }),
    );
    d.insert(
        "medicationCodeableConcept".into(),
        medication_concept(&order.medication),
    );
    d.insert("subject".into(), json!({ "reference": patient_reference }));
    d.insert(
        "performer".into(),
        json!([{ "actor": { "identifier": { "system": PHARMACIST_SYSTEM, "value": fill.by } } }]),
    );
    d.insert(
        "authorizingPrescription".into(),
        json!([{ "reference": format!("MedicationRequest/{rx_id}") }]),
    );
    d.insert(
        "quantity".into(),
        quantity(fill.quantity, order.quantity_unit.as_deref()),
    );
    if let Some(days) = fill.days_supply {
        d.insert("daysSupply".into(), days_quantity(days));
    }
    d.insert("whenHandedOver".into(), json!(fill.at.to_rfc3339()));
    if !order.dosage.is_empty() {
        d.insert(
            "dosageInstruction".into(),
            Value::Array(order.dosage.iter().enumerate().map(dosage).collect()),
        );
    }
    Value::Object(d)
}

/// The FHIR MedicationRequest status for an rxflow status.
fn fhir_status(status: Status) -> &'static str {
    match status {
        Status::Received
        | Status::Validated
        | Status::Reviewed
        | Status::AwaitingVerification
        | Status::Verified
        | Status::PartiallyDispensed => "active",
        Status::NeedsClarification => "on-hold",
        Status::Rejected | Status::Cancelled => "cancelled",
        Status::Dispensed => "completed",
    }
}

/// An R4 MedicationRequest view of a stored record.
///
/// * `status` maps rxflow's status to FHIR (received … partially-dispensed → active,
///   needs-clarification → on-hold, rejected / cancelled → cancelled, dispensed → completed); the
///   rxflow status itself is kept in the [`WORKFLOW_STATUS_EXTENSION`] extension (valueCode).
/// * The reasons behind the outcome become `statusReason` (codes in [`REASON_SYSTEM`]).
/// * Each DUR alert becomes a contained DetectedIssue (`#alert-<n>`, code in
///   [`ALERT_KIND_SYSTEM`], severity high | moderate | low, detail = the message, evidence as
///   displays, the other order under `implicated`) listed in `detectedIssue`.
/// * `patient_reference` `None` (a view without the patient, "minimum necessary") masks the subject
///   with the data-absent-reason extension.
pub fn medication_request(
    rx_id: &str,
    status: Status,
    record: &PrescriptionRecord,
    patient_reference: Option<&str>,
) -> Value {
    let order = &record.order;
    let mut r = Map::new();
    r.insert("resourceType".into(), json!("MedicationRequest"));
    r.insert("id".into(), json!(rx_id));
    if !record.alerts.is_empty() {
        r.insert(
            "contained".into(),
            Value::Array(
                record
                    .alerts
                    .iter()
                    .enumerate()
                    .map(|(i, a)| detected_issue(i, a, rx_id))
                    .collect(),
            ),
        );
    }
    r.insert(
        "extension".into(),
        json!([{ "url": WORKFLOW_STATUS_EXTENSION, "valueCode": status.as_str() }]),
    );
    if let Some(source) = &order.source_id {
        r.insert(
            "identifier".into(),
            json!([{ "system": "https://rxflow.dev/fhir/sid/source-id", "value": source }]),
        );
    }
    r.insert("status".into(), json!(fhir_status(status)));
    let reasons = record.reasons();
    if !reasons.is_empty()
        && matches!(
            status,
            Status::Rejected | Status::Cancelled | Status::NeedsClarification
        )
    {
        let coding: Vec<Value> = reasons
            .iter()
            .map(|x| json!({ "system": REASON_SYSTEM, "code": x.code }))
            .collect();
        let text: Vec<&str> = reasons.iter().map(|x| x.message.as_str()).collect();
        r.insert(
            "statusReason".into(),
            json!({ "coding": coding, "text": text.join(" ") }),
        );
    }
    r.insert("intent".into(), json!(order.intent));
    r.insert(
        "medicationCodeableConcept".into(),
        medication_concept(&order.medication),
    );
    r.insert(
        "subject".into(),
        match patient_reference {
            Some(p) => json!({ "reference": p }),
            None => masked(),
        },
    );
    if let Some(at) = order.authored_on {
        r.insert("authoredOn".into(), json!(at.to_rfc3339()));
    }
    if let Some(req) = requester(record) {
        r.insert("requester".into(), req);
    }
    if !order.dosage.is_empty() {
        r.insert(
            "dosageInstruction".into(),
            Value::Array(order.dosage.iter().enumerate().map(dosage).collect()),
        );
    }
    let mut dr = Map::new();
    if let Some(end) = order.valid_until {
        dr.insert("validityPeriod".into(), json!({ "end": end.to_rfc3339() }));
    }
    if let Some(n) = order.refills {
        dr.insert("numberOfRepeatsAllowed".into(), json!(n));
    }
    if let Some(q) = order.quantity {
        dr.insert(
            "quantity".into(),
            quantity(q, order.quantity_unit.as_deref()),
        );
    }
    if let Some(days) = order.days_supply {
        dr.insert("expectedSupplyDuration".into(), days_quantity(days));
    }
    if !dr.is_empty() {
        r.insert("dispenseRequest".into(), Value::Object(dr));
    }
    if let Some(n) = &order.note {
        r.insert("note".into(), json!([{ "text": n }]));
    }
    if !record.alerts.is_empty() {
        r.insert(
            "detectedIssue".into(),
            Value::Array(
                (0..record.alerts.len())
                    .map(|i| json!({ "reference": format!("#alert-{i}") }))
                    .collect(),
            ),
        );
    }
    Value::Object(r)
}

fn masked() -> Value {
    json!({ "extension": [{ "url": DATA_ABSENT_REASON, "valueCode": "masked" }] })
}

fn requester(record: &PrescriptionRecord) -> Option<Value> {
    let npi =
        record
            .prescriber
            .as_ref()
            .and_then(|p| p.npi.clone())
            .or(match &record.order.requester {
                PrescriberRef::Npi(n) => Some(n.clone()),
                PrescriberRef::Inline(p) => p.npi.clone(),
                _ => None,
            });
    if let Some(npi) = npi {
        return Some(json!({ "identifier": { "system": NPI_SYSTEM, "value": npi } }));
    }
    match &record.order.requester {
        PrescriberRef::Reference(id) => Some(json!({ "reference": format!("Practitioner/{id}") })),
        _ => None,
    }
}

fn detected_issue(i: usize, alert: &Alert, rx_id: &str) -> Value {
    let mut d = Map::new();
    d.insert("resourceType".into(), json!("DetectedIssue"));
    d.insert("id".into(), json!(format!("alert-{i}")));
    d.insert("status".into(), json!("final"));
    d.insert(
        "code".into(),
        json!({ "coding": [{ "system": ALERT_KIND_SYSTEM, "code": alert.kind.as_str() }] }),
    );
    d.insert("severity".into(), json!(alert.severity.as_str()));
    let mut implicated = vec![json!({ "reference": format!("MedicationRequest/{rx_id}") })];
    for e in &alert.evidence {
        if let (Some(other), "order") = (&e.reference, e.kind.as_str()) {
            implicated.push(json!({ "reference": format!("MedicationRequest/{other}") }));
        }
    }
    d.insert("implicated".into(), Value::Array(implicated));
    if !alert.evidence.is_empty() {
        d.insert(
            "evidence".into(),
            Value::Array(
                alert
                    .evidence
                    .iter()
                    .map(|e| {
                        json!({
                            "code": [{ "coding": [{ "system": ALERT_KIND_SYSTEM, "code": format!("evidence-{}", e.kind) }] }],
                            "detail": [{ "display": e.detail }],
                        })
                    })
                    .collect(),
            ),
        );
    }
    d.insert("detail".into(), json!(alert.message));
    Value::Object(d)
}

fn medication_concept(m: &MedicationCode) -> Value {
    let mut coding = Vec::new();
    if let Some(rx) = &m.rxnorm {
        let mut c = json!({ "system": RXNORM, "code": rx });
        if let Some(d) = &m.display {
            c["display"] = json!(d);
        }
        coding.push(c);
    }
    if let Some(ndc) = &m.ndc {
        coding.push(json!({ "system": NDC, "code": ndc }));
    }
    let mut cc = Map::new();
    if !coding.is_empty() {
        cc.insert("coding".into(), Value::Array(coding));
    }
    match &m.display {
        Some(d) => {
            cc.insert("text".into(), json!(d));
        }
        None if cc.is_empty() => {
            cc.insert(
                "extension".into(),
                json!([{ "url": DATA_ABSENT_REASON, "valueCode": "unknown" }]),
            );
        }
        None => {}
    }
    Value::Object(cc)
}

fn quantity(value: f64, unit: Option<&str>) -> Value {
    let mut q = json!({ "value": value });
    if let Some(u) = unit {
        q["unit"] = json!(u);
    }
    q
}

fn days_quantity(days: u32) -> Value {
    json!({ "value": days, "unit": "days", "system": UCUM, "code": "d" })
}

fn dosage((i, d): (usize, &Dosage)) -> Value {
    let mut o = Map::new();
    o.insert("sequence".into(), json!(i + 1));
    if let Some(t) = &d.text {
        o.insert("text".into(), json!(t));
    }
    if let Some(per_day) = d.per_day.filter(|p| *p > 0.0) {
        // Whole numbers per day stay "n per 1 d"; anything else becomes "1 per <hours> h".
        let repeat = if (per_day - per_day.round()).abs() < 1e-9 && per_day >= 1.0 {
            json!({ "frequency": per_day.round() as u64, "period": 1, "periodUnit": "d" })
        } else {
            let hours = (24.0 / per_day * 10_000.0).round() / 10_000.0;
            json!({ "frequency": 1, "period": hours, "periodUnit": "h" })
        };
        o.insert("timing".into(), json!({ "repeat": repeat }));
    }
    o.insert("asNeededBoolean".into(), json!(d.as_needed));
    if let Some(q) = d.dose_quantity {
        o.insert(
            "doseAndRate".into(),
            json!([{ "doseQuantity": quantity(q, d.dose_unit.as_deref()) }]),
        );
    }
    Value::Object(o)
}
