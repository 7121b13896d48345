//! review: on `prescription.validated`, run drug-utilization review against the patient's other
//! active orders and allergies (interactions, opioid + benzodiazepine, allergy, duplicate therapy,
//! MME, early refill) and queue the order, with its alerts, for a pharmacist.

use rx_domain::dur::{self, OtherOrder};
use rx_domain::{Status, Transition};
use rx_platform::event::PipelineEvent;
use rx_platform::flow::{emit, load_patient, load_rx, redeliver, save_rx};
use rx_platform::{Services, StepError};
use rx_store::repo::{AuditCtx, PatientFile, ProfileEntry};
use rx_store::Changes;

pub const FUNCTION: &str = "review";

pub async fn handle(
    svc: &Services,
    event: &PipelineEvent,
) -> Result<Vec<PipelineEvent>, StepError> {
    let cx = AuditCtx::system(FUNCTION, &event.tenant);
    let rx = load_rx(svc, &cx, &event.tenant, &event.rx_id).await?;
    if rx.status != Status::Validated {
        return Ok(redeliver(&rx, &[Status::AwaitingVerification]));
    }
    let now = svc.clock.now();
    let patient = load_patient(svc, &cx, &event.tenant, &rx.record.order.patient_ref).await?;
    let mut record = rx.record.clone();
    let (file, patient_row) = match patient {
        Some(doc) => (doc.body, Some(doc.row)),
        None => (PatientFile::new(&record.order.patient_ref), None),
    };
    let others: Vec<OtherOrder<'_>> = file
        .profile
        .iter()
        .filter(|e| e.rx_id != rx.id())
        .map(|e| OtherOrder {
            id: &e.rx_id,
            order: &e.order,
            last_fill: e.last_fill.as_ref(),
        })
        .collect();
    record.alerts = dur::review(
        &record.order,
        &others,
        &file.patient.allergies,
        svc.drugs,
        &svc.dur,
        now,
    );

    // The order joins the patient's medication profile; orders no longer active leave it.
    let mut file = file;
    file.profile.retain(|e| {
        e.rx_id != rx.id() && dur::is_active(&e.order, e.last_fill.as_ref(), &svc.dur, now)
    });
    file.profile
        .push(ProfileEntry::new(rx.id(), &record.order, None));
    let (write, ev, _) = svc
        .vault
        .patient_write(
            &cx,
            &event.tenant,
            &record.order.patient_ref,
            patient_row.as_ref(),
            &file,
        )
        .await?;
    let extra = Changes::single(write, ev);
    let saved = save_rx(
        svc,
        &cx,
        &rx,
        &[Transition::Review, Transition::Queue],
        &record,
        extra,
    )
    .await?;
    Ok(emit(&rx, &saved))
}
