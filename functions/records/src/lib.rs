//! records: role-scoped views of prescriptions ("minimum necessary", 45 CFR 164.502(b)) —
//! `GET /prescriptions/{id}`, `GET /patients/{id}/prescriptions`, the pharmacist's queue — and
//! cancellation.
//!
//! What a role sees is the policy's [`View`]: pharmacists the full record with the patient's
//! demographics; prescribers the clinical view (no SSN, no address); technicians the operational
//! view (no SSN, no address, no free-text notes); auditors ids and status only, and the patient's
//! file is not even opened for them.

use rx_domain::fhir::medication_request;
use rx_domain::{PatientRecord, PrescriptionRecord, Reason, Status, Transition};
use rx_guard::access::{Action, Decision, Policy, Principal, Role, View};
use rx_guard::audit::{self, Outcome};
use rx_platform::flow::{
    authorize, break_glass_active, emit, load_patient, load_rx_as, person_cx, redeliver,
    resource_of, save_rx, Rx,
};
use rx_platform::{Services, StepError};
use rx_store::repo::{domains, kind_of, Stored};
use rx_store::{Changes, Table};
use serde_json::{json, Map, Value};

pub const FUNCTION: &str = "records";

/// The most orders one queue page lists.
pub const MAX_QUEUE: usize = 200;

const SOURCE_ID_SYSTEM: &str = "https://rxflow.dev/fhir/sid/source-id";
const SSN_SYSTEM: &str = "http://hl7.org/fhir/sid/us-ssn";
const DATA_ABSENT_REASON: &str = "http://hl7.org/fhir/StructureDefinition/data-absent-reason";
/// The keys of a MedicationRequest an audit-only view keeps: ids and workflow status.
const AUDIT_ONLY_KEYS: [&str; 7] = [
    "resourceType",
    "id",
    "extension",
    "identifier",
    "status",
    "intent",
    "authoredOn",
];

/// One prescription as a FHIR MedicationRequest, in the caller's view.
pub async fn get(
    svc: &Services,
    p: &Principal,
    source_ip: Option<String>,
    rx_id: &str,
) -> Result<Value, StepError> {
    let (cx, rx) = load_rx_as(svc, p, FUNCTION, source_ip, Action::ReadPrescription, rx_id).await?;
    let view = Policy::embedded().view(p.role);
    let patient = if view == View::AuditOnly {
        None
    } else {
        load_patient(svc, &cx, rx.tenant(), &rx.record.order.patient_ref)
            .await?
            .map(|d| d.body.patient)
    };
    Ok(request_view(&rx, view, patient.as_ref()))
}

/// A patient's prescriptions as a FHIR searchset Bundle of MedicationRequests in the caller's
/// view. A prescriber gets only the orders they wrote (unless under break-glass); each order
/// withheld is audited as a denial.
pub async fn list_for_patient(
    svc: &Services,
    p: &Principal,
    source_ip: Option<String>,
    patient_ref: &str,
) -> Result<Value, StepError> {
    let cx = person_cx(
        p,
        FUNCTION,
        source_ip,
        break_glass_active(p, chrono::Utc::now()),
    );
    if patient_ref.trim().is_empty() {
        return Err(StepError::Invalid {
            code: "required",
            message: "name the patient whose prescriptions to list".into(),
            expression: Some("patient".into()),
        });
    }
    let action = Action::ListPatientPrescriptions;
    let idx = svc.vault.blind(domains::PATIENT, patient_ref);
    let patient_id = svc.vault.patient_hex(patient_ref);
    authorize(
        svc,
        &cx,
        p,
        action,
        None,
        "Patient",
        &patient_id,
        Some(&idx),
    )
    .await?;
    let docs: Vec<Stored<PrescriptionRecord>> = svc
        .vault
        .read_by_index(&cx, Table::Prescriptions, &p.tenant, &idx)
        .await?;
    let view = Policy::embedded().view(p.role);
    let mut entries = Vec::new();
    let mut withheld = Vec::new();
    for doc in docs {
        let rx = into_rx(doc)?;
        let res = resource_of(svc, &rx);
        match Policy::embedded().decide(p, action, Some(&res), chrono::Utc::now()) {
            Decision::Allow { .. } => entries.push(json!({
                "fullUrl": format!("urn:uuid:{}", rx.id()),
                "resource": request_view(&rx, view, None),
                "search": { "mode": "match" },
            })),
            Decision::Deny(why) => {
                let mut ev = cx.event(
                    audit::Action::Deny,
                    kind_of(Table::Prescriptions),
                    rx.id(),
                    rx.row.index.as_deref(),
                    Outcome::Denied,
                );
                ev.detail = Some(format!("{}:{}", action.as_str(), why.code()));
                withheld.push(ev);
            }
        }
    }
    if !withheld.is_empty() {
        svc.vault.audit(&withheld).await?;
    }
    Ok(json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": entries.len(),
        "entry": entries,
    }))
}

/// Cancel an order that has not been dispensed in full. Answers
/// `{"rxId", "status", "version", "duplicate", "events": [PipelineEvent…], "medicationRequest"}`;
/// the `events` (one `prescription.cancelled`) are for the runtime to publish. Cancelling again
/// an order one cancelled oneself writes nothing and re-announces it (`duplicate: true`); an
/// order someone else cancelled is a conflict.
pub async fn cancel(
    svc: &Services,
    p: &Principal,
    source_ip: Option<String>,
    rx_id: &str,
    reason: &str,
) -> Result<Value, StepError> {
    let (cx, rx) = load_rx_as(
        svc,
        p,
        FUNCTION,
        source_ip,
        Action::CancelPrescription,
        rx_id,
    )
    .await?;
    let view = Policy::embedded().view(p.role);
    if rx.status == Status::Cancelled {
        // A redelivery only for whoever cancelled it: anyone else cancelled nothing.
        let cancelled_by = svc
            .vault
            .store
            .transitions(rx.tenant(), rx.id())
            .await?
            .into_iter()
            .rev()
            .find(|t| t.to == Status::Cancelled.as_str())
            .map(|t| t.actor);
        if cancelled_by.as_deref() != Some(p.subject.as_str()) {
            return Err(StepError::Conflict(format!(
                "prescription {} was already cancelled by someone else; nothing was recorded for this request",
                rx.id()
            )));
        }
        let events = redeliver(&rx, &[Status::Cancelled]);
        return Ok(cancelled(
            &rx,
            rx.status,
            rx.row.version,
            true,
            &events,
            view,
        ));
    }
    let reason = reason.trim();
    if reason.is_empty() {
        return Err(StepError::Invalid {
            code: "required",
            message: "cancelling an order needs a reason".into(),
            expression: Some("reason".into()),
        });
    }
    let code = if p.role == Role::Prescriber {
        "cancelled-by-prescriber"
    } else {
        "cancelled-by-pharmacy"
    };
    let mut record = rx.record.clone();
    record.cancellation = Some(Reason::new(code, reason));
    let saved = save_rx(
        svc,
        &cx,
        &rx,
        &[Transition::Cancel],
        &record,
        Changes::default(),
    )
    .await?;
    let events = emit(&rx, &saved);
    let after = Rx {
        row: rx.row.clone(),
        status: saved.status,
        record,
    };
    Ok(cancelled(
        &after,
        saved.status,
        saved.version,
        false,
        &events,
        view,
    ))
}

/// The orders of the caller's tenant awaiting verification, oldest id first, after the id
/// `after` when given, at most `limit` (capped at [`MAX_QUEUE`]): ids, the drug's display and
/// the DUR alerts (kind, severity, message); nothing about the patient. A full page names the
/// id to pass as `after` for the next one (`next`). An `after` that is no such cursor (not a
/// prescription id of the caller's tenant) is refused (400, naming `after`): paging on from it
/// would answer a page that means nothing, or an empty one.
pub async fn queue(
    svc: &Services,
    p: &Principal,
    source_ip: Option<String>,
    after: Option<&str>,
    limit: usize,
) -> Result<Value, StepError> {
    let limit = limit.clamp(1, MAX_QUEUE);
    let cx = person_cx(
        p,
        FUNCTION,
        source_ip,
        break_glass_active(p, chrono::Utc::now()),
    );
    let kind = kind_of(Table::Prescriptions);
    authorize(svc, &cx, p, Action::ReadQueue, None, kind, "queue", None).await?;
    if let Some(a) = after {
        // A `next` is an order's id as this server writes it (a hyphenated UUID), and the order
        // stays in the tenant's table whatever became of it since. Only the row's presence is
        // looked at: nothing sealed is opened.
        let ours = uuid::Uuid::try_parse(a).is_ok_and(|u| u.hyphenated().to_string() == a)
            && svc
                .vault
                .store
                .get(Table::Prescriptions, &p.tenant, a)
                .await?
                .is_some();
        if !ours {
            return Err(StepError::Invalid {
                code: "value",
                message: "the query parameter `after` is not a cursor this server gave: pass \
                          the `next` of the page before, or leave `after` out for the first page"
                    .into(),
                expression: Some("after".into()),
            });
        }
    }
    let rows = svc
        .vault
        .store
        .list(
            Table::Prescriptions,
            &p.tenant,
            Some(Status::AwaitingVerification.as_str()),
            after,
            limit,
        )
        .await?;
    let next = (rows.len() == limit)
        .then(|| rows.last().map(|r| r.id.clone()))
        .flatten();
    let mut entries = Vec::with_capacity(rows.len());
    for row in rows {
        let doc: Stored<PrescriptionRecord> = svc.vault.open_audited(&cx, row, kind).await?;
        let r = &doc.body;
        let alerts: Vec<Value> = r
            .alerts
            .iter()
            .map(|a| {
                json!({
                    "kind": a.kind.as_str(),
                    "severity": a.severity.as_str(),
                    "message": a.message,
                })
            })
            .collect();
        entries.push(json!({
            "rxId": doc.row.id,
            "version": doc.row.version,
            "queuedAt": doc.row.updated_at.to_rfc3339(),
            "drug": drug_display(svc, r),
            "blocking": r.alerts.iter().any(|a| a.is_blocking()),
            "alerts": alerts,
        }));
    }
    let mut page = json!({ "count": entries.len(), "entries": entries });
    if let Some(next) = next {
        page["next"] = Value::from(next);
    }
    Ok(page)
}

fn into_rx(doc: Stored<PrescriptionRecord>) -> Result<Rx, StepError> {
    let status =
        doc.row.status.parse::<Status>().map_err(|e| {
            StepError::Unavailable(format!("stored prescription {}: {e}", doc.row.id))
        })?;
    Ok(Rx {
        row: doc.row,
        status,
        record: doc.body,
    })
}

fn cancelled(
    rx: &Rx,
    status: Status,
    version: u64,
    duplicate: bool,
    events: &[rx_platform::PipelineEvent],
    view: View,
) -> Value {
    json!({
        "rxId": rx.id(),
        "status": status.as_str(),
        "version": version,
        "duplicate": duplicate,
        "events": events,
        "medicationRequest": request_view(rx, view, None),
    })
}

/// What the queue shows of the product: the order's text, else the reference table's name.
fn drug_display(svc: &Services, r: &PrescriptionRecord) -> String {
    let m = &r.order.medication;
    m.display
        .clone()
        .or_else(|| {
            m.rxnorm
                .as_deref()
                .and_then(|c| svc.drugs.product(c))
                .map(|p| p.name.clone())
        })
        .or_else(|| m.rxnorm.as_ref().map(|c| format!("RxNorm {c}")))
        .or_else(|| m.ndc.as_ref().map(|c| format!("NDC {c}")))
        .unwrap_or_else(|| "unnamed product".to_string())
}

/// The MedicationRequest of `rx` as `view` allows; `patient` (the demographics on file) is
/// contained in the views that show the patient.
fn request_view(rx: &Rx, view: View, patient: Option<&PatientRecord>) -> Value {
    if view == View::AuditOnly {
        let full = medication_request(rx.id(), rx.status, &rx.record, None);
        let mut kept: Map<String, Value> = match full {
            Value::Object(m) => m
                .into_iter()
                .filter(|(k, _)| AUDIT_ONLY_KEYS.contains(&k.as_str()))
                .collect(),
            _ => Map::new(),
        };
        kept.insert("medicationCodeableConcept".into(), masked());
        kept.insert("subject".into(), masked());
        return Value::Object(kept);
    }
    let subject = format!("Patient/{}", rx.record.order.patient_ref);
    let mut mr = medication_request(rx.id(), rx.status, &rx.record, Some(&subject));
    let Value::Object(m) = &mut mr else {
        return mr;
    };
    if view == View::Operational {
        m.remove("note");
    }
    if let Some(pat) = patient {
        let contained = m
            .entry("contained")
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(list) = contained {
            list.insert(0, patient_resource(view, pat));
            m.insert("subject".into(), json!({ "reference": "#patient" }));
        }
    }
    mr
}

/// The patient as a contained FHIR Patient: the full view with every identifier and the address,
/// the clinical view without SSN and address, the operational view with name, birth date and
/// phone only.
fn patient_resource(view: View, p: &PatientRecord) -> Value {
    let mut o = Map::new();
    o.insert("resourceType".into(), json!("Patient"));
    o.insert("id".into(), json!("patient"));
    let mut ids = vec![json!({ "system": SOURCE_ID_SYSTEM, "value": p.source_id })];
    ids.extend(
        p.identifiers
            .iter()
            .filter(|c| match view {
                View::Full => true,
                View::Clinical => c.system != SSN_SYSTEM,
                View::Operational | View::AuditOnly => false,
            })
            .map(|c| json!({ "system": c.system, "value": c.code })),
    );
    o.insert("identifier".into(), Value::Array(ids));
    if let Some(n) = &p.name {
        o.insert("name".into(), json!([{ "text": n }]));
    }
    if let Some(phone) = &p.phone {
        o.insert(
            "telecom".into(),
            json!([{ "system": "phone", "value": phone }]),
        );
    }
    if view != View::Operational {
        if let Some(g) = &p.gender {
            o.insert("gender".into(), json!(g));
        }
    }
    if let Some(b) = p.birth_date {
        o.insert("birthDate".into(), json!(b.to_string()));
    }
    if view == View::Full {
        if let Some(a) = &p.address {
            o.insert("address".into(), json!([{ "text": a }]));
        }
    }
    Value::Object(o)
}

fn masked() -> Value {
    json!({ "extension": [{ "url": DATA_ABSENT_REASON, "valueCode": "masked" }] })
}
