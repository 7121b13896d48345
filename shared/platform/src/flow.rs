//! What every step does around its decision: load the prescription (audited), apply transitions
//! through the one state machine, seal and store the new version with its transition rows and
//! audit events in one atomic change set.

use rx_domain::{PrescriptionRecord, Status, Transition};
use rx_guard::access::Principal;
use rx_guard::audit::{Action, Outcome, Purpose};
use rx_store::repo::{domains, transition, AuditCtx, PatientFile, Stored};
use rx_store::{Changes, Row, Table};

use crate::error::StepError;
use crate::event::{EventKind, PipelineEvent};
use crate::services::Services;

/// A prescription as read by a step.
pub struct Rx {
    pub row: Row,
    pub status: Status,
    pub record: PrescriptionRecord,
}

impl Rx {
    pub fn id(&self) -> &str {
        &self.row.id
    }
    pub fn tenant(&self) -> &str {
        &self.row.tenant
    }
}

/// Load a prescription, auditing the read; NotFound if there is none in this tenant.
pub async fn load_rx(
    svc: &Services,
    cx: &AuditCtx,
    tenant: &str,
    rx_id: &str,
) -> Result<Rx, StepError> {
    let doc: Stored<PrescriptionRecord> = svc
        .vault
        .read(cx, Table::Prescriptions, tenant, rx_id)
        .await?
        .ok_or_else(|| StepError::NotFound(format!("no prescription {rx_id} in this pharmacy")))?;
    let status = doc
        .row
        .status
        .parse::<Status>()
        .map_err(|e| StepError::Unavailable(format!("stored prescription {rx_id}: {e}")))?;
    Ok(Rx {
        row: doc.row,
        status,
        record: doc.body,
    })
}

/// The result of [`save_rx`].
pub struct Saved {
    pub status: Status,
    pub version: u64,
}

/// Apply `transitions` in order to `rx`, store `record` as the new version with one transition
/// row per step, plus `extra` (other rows, events) — all in one atomic commit.
pub async fn save_rx(
    svc: &Services,
    cx: &AuditCtx,
    rx: &Rx,
    transitions: &[Transition],
    record: &PrescriptionRecord,
    mut extra: Changes,
) -> Result<Saved, StepError> {
    let mut status = rx.status;
    let mut trail = Vec::with_capacity(transitions.len());
    for (i, t) in transitions.iter().enumerate() {
        let next = status.apply(*t)?;
        trail.push(transition(
            cx,
            &rx.row,
            Some(status.as_str()),
            next.as_str(),
            rx.row.version + 1 + i as u64,
        ));
        status = next;
    }
    // One stored version per call; transitions inside it are numbered from it.
    let (write, ev) = svc
        .vault
        .updated_row(cx, &rx.row, status.as_str(), record)
        .await?;
    let version = rx.row.version + 1;
    for t in trail.iter_mut() {
        t.version = version;
    }
    extra.writes.insert(0, write);
    extra.transitions.extend(trail);
    extra.audit.insert(0, ev);
    svc.vault.commit(extra).await?;
    Ok(Saved { status, version })
}

/// The event that announces a status (what a step emits after moving a prescription there).
pub fn event_for(status: Status) -> Option<EventKind> {
    match status {
        Status::Received => Some(EventKind::Received),
        Status::Validated => Some(EventKind::Validated),
        Status::Rejected => Some(EventKind::Rejected),
        Status::NeedsClarification => Some(EventKind::NeedsClarification),
        Status::Reviewed | Status::AwaitingVerification => Some(EventKind::Reviewed),
        Status::Verified => Some(EventKind::Verified),
        Status::PartiallyDispensed | Status::Dispensed => Some(EventKind::Dispensed),
        Status::Cancelled => Some(EventKind::Cancelled),
    }
}

/// The events to emit after a save.
pub fn emit(rx: &Rx, saved: &Saved) -> Vec<PipelineEvent> {
    event_for(saved.status)
        .map(|k| vec![PipelineEvent::new(k, rx.id(), rx.tenant(), saved.version)])
        .unwrap_or_default()
}

/// At-least-once delivery: a step that finds its transition already made re-emits the event of
/// the status it finds, if that status is one the step itself produces.
pub fn redeliver(rx: &Rx, produces: &[Status]) -> Vec<PipelineEvent> {
    if produces.contains(&rx.status) {
        event_for(rx.status)
            .map(|k| vec![PipelineEvent::new(k, rx.id(), rx.tenant(), rx.row.version)])
            .unwrap_or_default()
    } else {
        Vec::new()
    }
}

/// Load the patient's file (demographics, allergies, medication profile), auditing the read.
pub async fn load_patient(
    svc: &Services,
    cx: &AuditCtx,
    tenant: &str,
    patient_ref: &str,
) -> Result<Option<Stored<PatientFile>>, StepError> {
    let key = svc.vault.blind(domains::PATIENT, patient_ref);
    Ok(svc
        .vault
        .read_by_key(cx, Table::Patients, tenant, &key)
        .await?)
}

/// The audit context of a person acting through the API or the CLI.
pub fn person_cx(
    p: &Principal,
    function: &'static str,
    source_ip: Option<String>,
    via_break_glass: bool,
) -> AuditCtx {
    AuditCtx {
        actor: p.actor(),
        function,
        purpose: if via_break_glass {
            Purpose::Emergency
        } else {
            Purpose::Treatment
        },
        source_ip,
        break_glass: via_break_glass,
    }
}

/// Record a refused access in the audit trail, then return the refusal. If the denial cannot be
/// audited the request still fails (as unavailable).
pub async fn deny(
    svc: &Services,
    cx: &AuditCtx,
    kind: &str,
    id: &str,
    patient: Option<&[u8]>,
    code: &str,
    sentence: String,
) -> StepError {
    let mut ev = cx.event(Action::Deny, kind, id, patient, Outcome::Denied);
    ev.detail = Some(code.to_string());
    match svc.vault.audit(&[ev]).await {
        Ok(()) => StepError::Forbidden(sentence),
        Err(e) => e.into(),
    }
}
