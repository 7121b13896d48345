//! What every step does around its decision: load the prescription (audited), apply transitions
//! through the one state machine, seal and store the new version with its transition rows and
//! audit events in one atomic change set.

use chrono::{DateTime, Utc};
use rx_domain::{PrescriberRef, PrescriptionRecord, Status, Transition};
use rx_guard::access::{self, Decision, DenyReason, Policy, Principal, Resource};
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

// People acting on one prescription (verify, dispense, records): the access policy decides with
// the record's attributes, and every refusal lands in the audit trail.

/// Whether `p` holds an active break-glass grant of their own at `now`: the rule the access
/// policy applies, so the audit context can flag every access of the request from its first read.
pub fn break_glass_active(p: &Principal, now: DateTime<Utc>) -> bool {
    p.break_glass
        .as_ref()
        .is_some_and(|g| g.subject == p.subject && g.is_active(now))
}

/// The attributes the access policy needs of a prescription (no PHI). An order whose product the
/// reference table does not know counts as controlled: nothing shows it is not (fail closed).
pub fn resource_of<'a>(svc: &Services, rx: &'a Rx) -> Resource<'a> {
    let r = &rx.record;
    let controlled = r
        .order
        .medication
        .rxnorm
        .as_deref()
        .and_then(|c| svc.drugs.product(c))
        .is_none_or(|p| p.is_controlled());
    let npi = r
        .prescriber
        .as_ref()
        .and_then(|p| p.npi.as_deref())
        .or(match &r.order.requester {
            PrescriberRef::Npi(n) => Some(n.as_str()),
            PrescriberRef::Inline(p) => p.npi.as_deref(),
            _ => None,
        });
    Resource {
        tenant: rx.tenant(),
        prescriber_subject: Some(r.submitted_by.as_str()),
        prescriber_npi: npi,
        controlled,
    }
}

/// Decide `action` by `p` (on `res`, when it concerns one record) with the embedded policy; a
/// refusal is audited against `kind`/`id` (and the patient's blind index) and returned as
/// Forbidden. The audit detail is `<action>:<reason code>`, as [`rx_guard::access::audit_event`]
/// writes it.
#[allow(clippy::too_many_arguments)]
pub async fn authorize(
    svc: &Services,
    cx: &AuditCtx,
    p: &Principal,
    action: access::Action,
    res: Option<&Resource<'_>>,
    kind: &str,
    id: &str,
    patient: Option<&[u8]>,
) -> Result<(), StepError> {
    match Policy::embedded().decide(p, action, res, Utc::now()) {
        Decision::Allow { .. } => Ok(()),
        Decision::Deny(why) => Err(deny(
            svc,
            cx,
            kind,
            id,
            patient,
            &format!("{}:{}", action.as_str(), why.code()),
            why.sentence(),
        )
        .await),
    }
}

/// Load prescription `rx_id` of the caller's tenant for `action` by a person, and return it with
/// the audit context the rest of the request acts under (flagged under break-glass).
///
/// A role that may never do `action` is refused before anything is opened. An id that is not a
/// prescription of the caller's tenant is NotFound (whether it exists elsewhere is not told) and
/// audited as a denial. Otherwise the record is read (that read is the request's one audited
/// read) and the policy decides with its attributes: tenant, own order, MFA, separation of duties.
pub async fn load_rx_as(
    svc: &Services,
    p: &Principal,
    function: &'static str,
    source_ip: Option<String>,
    action: access::Action,
    rx_id: &str,
) -> Result<(AuditCtx, Rx), StepError> {
    let cx = person_cx(p, function, source_ip, break_glass_active(p, Utc::now()));
    // Ids come from a URL: only a UUID reaches the store, the audit trail or a message.
    if uuid::Uuid::parse_str(rx_id).is_err() {
        return Err(StepError::Invalid {
            code: "value",
            message: "the prescription id is not an rxflow id (a UUID as returned at intake)"
                .into(),
            expression: None,
        });
    }
    if let Decision::Deny(why) = Policy::embedded().decide(p, action, None, Utc::now()) {
        if !matches!(why, DenyReason::ResourceRequired { .. }) {
            let code = format!("{}:{}", action.as_str(), why.code());
            return Err(deny(svc, &cx, RX_KIND, rx_id, None, &code, why.sentence()).await);
        }
    }
    let rx = match load_rx(svc, &cx, &p.tenant, rx_id).await {
        Ok(rx) => rx,
        Err(StepError::NotFound(m)) => {
            let mut ev = cx.event(Action::Deny, RX_KIND, rx_id, None, Outcome::Denied);
            ev.detail = Some(format!("{}:not-found", action.as_str()));
            svc.vault.audit(&[ev]).await?;
            return Err(StepError::NotFound(m));
        }
        Err(e) => return Err(e),
    };
    let res = resource_of(svc, &rx);
    authorize(
        svc,
        &cx,
        p,
        action,
        Some(&res),
        RX_KIND,
        rx.id(),
        rx.row.index.as_deref(),
    )
    .await?;
    Ok((cx, rx))
}

/// How audit events name a prescription.
const RX_KIND: &str = "MedicationRequest";
