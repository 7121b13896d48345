//! intake: a prescriber's order arrives (FHIR MedicationRequest, or a Bundle with the Patient,
//! Practitioner and AllergyIntolerance it refers to). Check its shape, seal the PHI, store it,
//! announce `prescription.received`.
//!
//! Intake is idempotent: the same source order (same MedicationRequest id) submitted twice is
//! stored once; the second submission gets the first one's id back.

use chrono::Datelike;
use rx_domain::fhir::{self, Submission};
use rx_domain::{Allergy, MedicationOrder, PatientRecord, PrescriberRecord, PrescriptionRecord};
use rx_platform::event::{EventKind, PipelineEvent};
use rx_platform::flow::load_patient;
use rx_platform::{Services, StepError};
use rx_store::repo::{domains, transition, AuditCtx, PatientFile, Stored};
use rx_store::{Changes, Table, Write};
use serde::Serialize;
use serde_json::Value;

/// One order taken in.
#[derive(Debug, Clone, Serialize)]
pub struct Accepted {
    /// rxflow's id of the prescription.
    pub rx_id: String,
    /// The MedicationRequest id in the submitter's system.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_id: Option<String>,
    pub status: String,
    /// True when this order had been submitted before: nothing new was stored.
    pub duplicate: bool,
}

#[derive(Debug, Default)]
pub struct IntakeOutput {
    pub accepted: Vec<Accepted>,
    pub events: Vec<PipelineEvent>,
}

/// Take a FHIR body (MedicationRequest or Bundle) in.
pub async fn handle(
    svc: &Services,
    cx: &AuditCtx,
    tenant: &str,
    body: &Value,
) -> Result<IntakeOutput, StepError> {
    let submission = fhir::parse_submission(body)?;
    if submission.orders.is_empty() {
        return Err(StepError::Invalid {
            code: "required",
            message: "the submission holds no MedicationRequest".into(),
            expression: Some("Bundle.entry.resource".into()),
        });
    }
    submit(svc, cx, tenant, submission).await
}

/// The most entries (orders, patients, practitioners, allergies) one submission may carry. Each
/// is at least one sealed write, and an allergy rewrites its patient's file: a 1 MiB Bundle of
/// 7,500 allergies kept a server busy for 20 s and took 450 MB.
pub const MAX_ENTRIES: usize = 500;

/// Register what a submission carries, then take its orders in. Everything that can refuse the
/// submission is checked before anything is written: its size, that every Patient, allergy and
/// Practitioner in it is one its orders name, each order's shape, and that no order reuses an
/// id for other content. So a refused submission leaves nothing behind (only a failure of the
/// store itself, part way, can leave the entries before it stored).
pub async fn submit(
    svc: &Services,
    cx: &AuditCtx,
    tenant: &str,
    submission: Submission,
) -> Result<IntakeOutput, StepError> {
    check_entries(&submission)?;
    let mut planned = Vec::with_capacity(submission.orders.len());
    for order in submission.orders {
        planned.push(prepare_order(svc, cx, tenant, order).await?);
    }
    for p in submission.prescribers {
        register_prescriber(svc, cx, tenant, p).await?;
    }
    for p in submission.patients {
        register_patient(svc, cx, tenant, p).await?;
    }
    for (patient_ref, a) in submission.allergies {
        add_allergy(svc, cx, tenant, &patient_ref, a).await?;
    }
    let mut out = IntakeOutput::default();
    for plan in planned {
        // The same order twice in one submission (check_entries refused two that differ) is
        // stored once; its repeat is answered as the redelivery it is.
        if let Plan::New(order, _) = &plan {
            let first = order.source_id.as_deref().and_then(|sid| {
                out.accepted
                    .iter()
                    .find(|a| a.source_id.as_deref() == Some(sid))
            });
            if let Some(first) = first {
                out.accepted.push(Accepted {
                    duplicate: true,
                    ..first.clone()
                });
                continue;
            }
        }
        let (accepted, event) = store_order(svc, cx, tenant, plan).await?;
        out.accepted.push(accepted);
        out.events.extend(event);
    }
    Ok(out)
}

/// A submission's size, and that what it says about patients and prescribers is about its own
/// orders: a Bundle may carry the Patient, allergies and Practitioner of the orders it sends,
/// not another patient's file (a prescriber could otherwise rewrite any patient's details, or
/// mark their allergy resolved, by sending them beside an order of their own).
fn check_entries(s: &Submission) -> Result<(), StepError> {
    let entries = s.orders.len() + s.patients.len() + s.prescribers.len() + s.allergies.len();
    if entries > MAX_ENTRIES {
        return Err(StepError::Invalid {
            code: "too-costly",
            message: format!(
                "the submission carries {entries} entries; at most {MAX_ENTRIES} are taken at \
                 once, send the rest in further submissions"
            ),
            expression: Some("Bundle.entry".into()),
        });
    }
    // Two different entries for one patient, prescriber or order would leave which one is meant
    // to chance (and a twin of one's own Practitioner could carry another prescriber's NPI).
    // The same entry twice (an integration engine joining per-order Bundles repeats them, each
    // under its own fullUrl) is one.
    let same = |a: &Option<String>, b: &Option<String>| a.is_some() && a == b;
    let doubled = s.prescribers.iter().enumerate().any(|(i, a)| {
        s.prescribers[i + 1..].iter().any(|b| {
            let apart_from_id = PrescriberRecord {
                source_id: a.source_id.clone(),
                ..b.clone()
            };
            (same(&a.source_id, &b.source_id) && a != b)
                || (same(&a.npi, &b.npi) && *a != apart_from_id)
        })
    });
    if doubled {
        return Err(twice("Practitioner", "an id or NPI"));
    }
    let doubled = s.patients.iter().enumerate().any(|(i, a)| {
        s.patients[i + 1..]
            .iter()
            .any(|b| a.source_id == b.source_id && a != b)
    });
    if doubled {
        return Err(twice("Patient", "an id"));
    }
    let doubled = s.orders.iter().enumerate().any(|(i, a)| {
        s.orders[i + 1..]
            .iter()
            .any(|b| a.source_id.is_some() && a.source_id == b.source_id && a != b)
    });
    if doubled {
        return Err(twice("MedicationRequest", "an id"));
    }
    let ordered = |patient_ref: &str| s.orders.iter().any(|o| o.patient_ref == patient_ref);
    if !s.patients.iter().all(|p| ordered(&p.source_id)) {
        return Err(unbound(
            "Patient",
            "the patient of one of its MedicationRequests",
        ));
    }
    if !s
        .allergies
        .iter()
        .all(|(patient_ref, _)| ordered(patient_ref))
    {
        return Err(unbound(
            "AllergyIntolerance",
            "about the patient of one of its MedicationRequests",
        ));
    }
    if !s
        .prescribers
        .iter()
        .all(|p| s.orders.iter().any(|o| requested_by(o, p)))
    {
        return Err(unbound(
            "Practitioner",
            "the requester of one of its MedicationRequests",
        ));
    }
    Ok(())
}

fn twice(what: &str, shared: &str) -> StepError {
    StepError::Invalid {
        code: "invalid",
        message: format!("two {what} entries in the submission share {shared} but differ; send one entry for each"),
        expression: Some(format!("Bundle.entry.resource.ofType({what})")),
    }
}

fn unbound(what: &str, must_be: &str) -> StepError {
    StepError::Invalid {
        code: "invalid",
        message: format!(
            "a {what} in the submission is not {must_be}; a Bundle carries only the records of \
             the orders it sends"
        ),
        expression: Some(format!("Bundle.entry.resource.ofType({what})")),
    }
}

/// Whether `order` names `p` as its requester (by reference or NPI).
fn requested_by(order: &MedicationOrder, p: &PrescriberRecord) -> bool {
    let same = |a: &Option<String>, b: &str| a.as_deref() == Some(b);
    match &order.requester {
        rx_domain::PrescriberRef::Reference(id) => same(&p.source_id, id),
        rx_domain::PrescriberRef::Npi(npi) => same(&p.npi, npi),
        // The record the requester resolved to: the same NPI, or the same id with no other NPI.
        rx_domain::PrescriberRef::Inline(q) => {
            (q.npi.is_some() && q.npi == p.npi)
                || (q.source_id.is_some()
                    && q.source_id == p.source_id
                    && (q.npi.is_none() || p.npi.is_none() || q.npi == p.npi))
        }
        rx_domain::PrescriberRef::Missing => false,
    }
}

/// Take one order in: store it sealed as `received` and return the event announcing it.
pub async fn submit_order(
    svc: &Services,
    cx: &AuditCtx,
    tenant: &str,
    order: MedicationOrder,
) -> Result<(Accepted, Option<PipelineEvent>), StepError> {
    let plan = prepare_order(svc, cx, tenant, order).await?;
    store_order(svc, cx, tenant, plan).await
}

/// What intake will do with an order, decided before anything is written.
pub enum Plan {
    /// Submitted before: answered with what was stored (and announced again while it still
    /// waits for validation, so an event lost after the first commit is not lost for good).
    Stored(Accepted, Option<PipelineEvent>),
    /// A new order, with the blind key of its source id.
    New(Box<MedicationOrder>, Option<Vec<u8>>),
}

/// Check an order's shape and whether it was submitted before (with the same content: a
/// redelivery; with other content: a conflict).
pub async fn prepare_order(
    svc: &Services,
    cx: &AuditCtx,
    tenant: &str,
    order: MedicationOrder,
) -> Result<Plan, StepError> {
    check_shape(&order)?;
    let key = order
        .source_id
        .as_deref()
        .map(|sid| svc.vault.blind(domains::SOURCE_ORDER, sid));
    if let Some(k) = &key {
        let existing: Option<Stored<PrescriptionRecord>> = svc
            .vault
            .read_by_key(cx, Table::Prescriptions, tenant, k)
            .await?;
        if let Some(doc) = existing {
            // The same id with other content is not a redelivery: refuse it rather than answer
            // with (and so disclose) the order stored under that id. A changed status alone is
            // the same order later in its life.
            let mut stored = doc.body.order;
            stored.status.clone_from(&order.status);
            if stored != order {
                return Err(StepError::Conflict(
                    "an order with this MedicationRequest.id was already submitted with other \
                     content; give a new order its own id"
                        .into(),
                ));
            }
            let row = doc.row;
            let event = (row.status == rx_domain::Status::Received.as_str())
                .then(|| PipelineEvent::new(EventKind::Received, &row.id, tenant, row.version));
            return Ok(Plan::Stored(
                Accepted {
                    rx_id: row.id.clone(),
                    source_id: order.source_id.clone(),
                    status: row.status,
                    duplicate: true,
                },
                event,
            ));
        }
    }
    Ok(Plan::New(Box::new(order), key))
}

/// Carry out a [`Plan`]: store a new order sealed as `received`.
pub async fn store_order(
    svc: &Services,
    cx: &AuditCtx,
    tenant: &str,
    plan: Plan,
) -> Result<(Accepted, Option<PipelineEvent>), StepError> {
    let (order, key) = match plan {
        Plan::Stored(accepted, event) => return Ok((accepted, event)),
        Plan::New(order, key) => (*order, key),
    };
    let rx_id = uuid::Uuid::now_v7().to_string();
    let source_id = order.source_id.clone();
    let patient = svc.vault.blind(domains::PATIENT, &order.patient_ref);
    let record = PrescriptionRecord::new(order, cx.actor.subject.clone());
    let status = rx_domain::Status::Received.as_str();
    let (write, ev) = svc
        .vault
        .new_row(
            cx,
            Table::Prescriptions,
            tenant,
            &rx_id,
            status,
            Some(patient),
            key,
            &record,
        )
        .await?;
    let row = match &write {
        Write::Insert(r) => r.clone(),
        Write::Update { row, .. } => row.clone(),
    };
    let changes = Changes {
        writes: vec![write],
        transitions: vec![transition(cx, &row, None, status, 1)],
        audit: vec![ev],
    };
    svc.vault.commit(changes).await?;
    Ok((
        Accepted {
            rx_id: rx_id.clone(),
            source_id,
            status: status.to_string(),
            duplicate: false,
        },
        Some(PipelineEvent::new(EventKind::Received, &rx_id, tenant, 1)),
    ))
}

/// What intake itself insists on (the rules of the trade are validate's business).
fn check_shape(order: &MedicationOrder) -> Result<(), StepError> {
    if order.patient_ref.trim().is_empty() {
        return Err(StepError::Invalid {
            code: "required",
            message: "the order names no patient".into(),
            expression: Some("MedicationRequest.subject".into()),
        });
    }
    let m = &order.medication;
    if m.rxnorm.is_none() && m.ndc.is_none() && m.display.is_none() {
        return Err(StepError::Invalid {
            code: "required",
            message: "the order names no medication (RxNorm, NDC or text)".into(),
            expression: Some("MedicationRequest.medication[x]".into()),
        });
    }
    if let Some(q) = order.quantity {
        if !(q.is_finite() && q > 0.0) {
            return Err(StepError::Invalid {
                code: "value",
                message: "the dispense quantity must be a positive number".into(),
                expression: Some("MedicationRequest.dispenseRequest.quantity".into()),
            });
        }
    }
    Ok(())
}

/// Store (or refresh) a patient's demographics, keeping the allergies and medication profile
/// already on file. Returns the patient row id.
pub async fn register_patient(
    svc: &Services,
    cx: &AuditCtx,
    tenant: &str,
    patient: PatientRecord,
) -> Result<String, StepError> {
    if patient.source_id.trim().is_empty() {
        return Err(StepError::Invalid {
            code: "required",
            message: "the Patient has no id".into(),
            expression: Some("Patient.id".into()),
        });
    }
    if let Some(born) = patient.birth_date {
        let today = chrono::Utc::now().date_naive();
        if born > today || born.year() < 1870 {
            return Err(StepError::Invalid {
                code: "value",
                message:
                    "the Patient's birth date is in the future or not a plausible date of birth"
                        .into(),
                expression: Some("Patient.birthDate".into()),
            });
        }
    }
    let source_id = patient.source_id.clone();
    upsert_patient(svc, cx, tenant, &source_id, move |record| {
        let allergies = std::mem::take(&mut record.allergies);
        *record = patient.clone();
        // Allergies from the Patient resource itself are none in FHIR; keep those on file.
        if record.allergies.is_empty() {
            record.allergies = allergies;
        }
    })
    .await
}

/// Add an allergy to a patient's file (creating the file if the patient is not known yet). An
/// allergy sent before (same id) is the submitter's latest word on it and replaces the one on
/// file: one since resolved, or of another criticality, must not stay as it was for review. One
/// without an id is added unless the very same is on file already.
pub async fn add_allergy(
    svc: &Services,
    cx: &AuditCtx,
    tenant: &str,
    patient_ref: &str,
    allergy: Allergy,
) -> Result<String, StepError> {
    upsert_patient(svc, cx, tenant, patient_ref, move |record| {
        let on_file = record
            .allergies
            .iter_mut()
            .find(|a| match &allergy.source_id {
                Some(_) => a.source_id == allergy.source_id,
                None => **a == allergy,
            });
        match on_file {
            Some(a) => a.clone_from(&allergy),
            None => record.allergies.push(allergy.clone()),
        }
    })
    .await
}

/// Tries of a write that lost its conditional update to a concurrent writer.
const CONFLICT_ATTEMPTS: u32 = 10;

/// Before try `attempt` (from 0) of such a write: a pause that grows with each retry.
async fn pause_before(attempt: u32) {
    if attempt > 0 {
        tokio::time::sleep(std::time::Duration::from_millis(2 * u64::from(attempt))).await;
    }
}

async fn upsert_patient(
    svc: &Services,
    cx: &AuditCtx,
    tenant: &str,
    patient_ref: &str,
    change: impl Fn(&mut PatientRecord),
) -> Result<String, StepError> {
    // Every Bundle may carry its patient again: an unchanged file is not rewritten. A
    // concurrent writer (another request, review or dispense adding to the profile) may win the
    // conditional write: read again and re-apply, after a short pause that grows each time.
    for attempt in 0..CONFLICT_ATTEMPTS {
        pause_before(attempt).await;
        let existing: Option<Stored<PatientFile>> =
            load_patient(svc, cx, tenant, patient_ref).await?;
        let (mut file, row) = match existing {
            Some(doc) => (doc.body, Some(doc.row)),
            None => (PatientFile::new(patient_ref), None),
        };
        // Only the patient's own record changes here (the medication profile is review's and
        // dispense's): that part alone is compared, not the whole file.
        let before = row.as_ref().map(|_| file.patient.clone());
        change(&mut file.patient);
        if let (Some(before), Some(row)) = (&before, &row) {
            if *before == file.patient {
                return Ok(row.id.clone());
            }
        }
        let (write, ev, id) = svc
            .vault
            .patient_write(cx, tenant, patient_ref, row.as_ref(), &file)
            .await?;
        let changes = Changes::single(write, ev);
        match svc.vault.store.commit(changes).await {
            Ok(()) => return Ok(id),
            Err(rx_store::StoreError::Conflict(_)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(StepError::Conflict(
        "the patient's record kept changing while it was updated; retry".into(),
    ))
}

/// Store (or refresh) a prescriber in the directory, found later by NPI or by source id.
pub async fn register_prescriber(
    svc: &Services,
    cx: &AuditCtx,
    tenant: &str,
    prescriber: PrescriberRecord,
) -> Result<String, StepError> {
    let key = prescriber
        .npi
        .as_deref()
        .map(|n| svc.vault.blind(domains::NPI, n));
    let index = prescriber
        .source_id
        .as_deref()
        .map(|s| svc.vault.blind(domains::PRACTITIONER, s));
    if key.is_none() && index.is_none() {
        return Err(StepError::Invalid {
            code: "required",
            message: "the Practitioner has neither an id nor an NPI".into(),
            expression: Some("Practitioner.identifier".into()),
        });
    }
    // Every Bundle may carry its prescriber again: an unchanged record is not rewritten, and a
    // concurrent writer winning the conditional write means read again and re-apply.
    for attempt in 0..CONFLICT_ATTEMPTS {
        pause_before(attempt).await;
        let existing: Option<Stored<PrescriberRecord>> = match &key {
            Some(k) => {
                svc.vault
                    .read_by_key(cx, Table::Prescribers, tenant, k)
                    .await?
            }
            None => None,
        };
        let (write, ev, id) = match existing {
            Some(doc) if doc.body == prescriber => return Ok(doc.row.id),
            Some(doc) => {
                let (w, e) = svc
                    .vault
                    .updated_row(cx, &doc.row, "active", &prescriber)
                    .await?;
                (w, e, doc.row.id)
            }
            None => {
                let id = uuid::Uuid::now_v7().to_string();
                let (w, e) = svc
                    .vault
                    .new_row(
                        cx,
                        Table::Prescribers,
                        tenant,
                        &id,
                        "active",
                        index.clone(),
                        key.clone(),
                        &prescriber,
                    )
                    .await?;
                (w, e, id)
            }
        };
        match svc.vault.store.commit(Changes::single(write, ev)).await {
            Ok(()) => return Ok(id),
            Err(rx_store::StoreError::Conflict(_)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(StepError::Conflict(
        "the prescriber's record kept changing while it was updated; retry".into(),
    ))
}

/// An input that could not be taken in (a malformed NDJSON line, a resource that does not
/// parse), kept sealed in the inputs table for follow-up so nothing submitted is lost.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct QuarantinedInput {
    /// Where it came from: `<file>:<line>` or `http:<request id>`.
    pub origin: String,
    /// The input as received (may hold PHI: sealed).
    pub raw: String,
    /// Why it was refused (PHI-free: the parsers never quote values).
    pub error: String,
}

/// Keep an input that could not be processed, sealed, with one quarantine audit event. Returns
/// the input's id. The same input from the same place (a rerun of the same export) is kept
/// once: its id comes back and nothing is written.
pub async fn quarantine(
    svc: &Services,
    cx: &AuditCtx,
    tenant: &str,
    input: &QuarantinedInput,
) -> Result<String, StepError> {
    let key = svc.vault.blind(
        rx_store::repo::domains::INPUT,
        &format!("{}\n{}", input.origin, input.raw),
    );
    let kept = |key: Vec<u8>| async move {
        Ok::<_, StepError>(
            svc.vault
                .store
                .get_by_key(Table::Inputs, tenant, &key)
                .await?
                .map(|row| row.id),
        )
    };
    if let Some(id) = kept(key.clone()).await? {
        return Ok(id);
    }
    let id = uuid::Uuid::now_v7().to_string();
    let (write, mut ev) = svc
        .vault
        .new_row(
            cx,
            Table::Inputs,
            tenant,
            &id,
            "quarantined",
            None,
            Some(key.clone()),
            input,
        )
        .await?;
    ev.action = rx_guard::audit::Action::Quarantine;
    match svc.vault.commit(Changes::single(write, ev)).await {
        Ok(()) => Ok(id),
        // Kept meanwhile by someone else (two requests with the same input at once).
        Err(e) => match kept(key).await? {
            Some(id) => Ok(id),
            None => Err(e.into()),
        },
    }
}
