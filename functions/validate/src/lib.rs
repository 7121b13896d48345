//! validate: on `prescription.received`, check the order against the rules of the trade
//! (prescriber NPI and DEA, patient, drug, quantity, refills, expiry, schedule rules) and move it
//! to validated, rejected or needs-clarification.

use rx_domain::validate::validate;
use rx_domain::{PrescriberRecord, PrescriberRef, Status, Transition, Validation};
use rx_platform::event::PipelineEvent;
use rx_platform::flow::{emit, load_rx, redeliver, save_rx};
use rx_platform::{Services, StepError};
use rx_store::repo::{domains, AuditCtx, Stored};
use rx_store::{Changes, Table};

pub const FUNCTION: &str = "validate";

pub async fn handle(
    svc: &Services,
    event: &PipelineEvent,
) -> Result<Vec<PipelineEvent>, StepError> {
    let cx = AuditCtx::system(FUNCTION, &event.tenant);
    let rx = load_rx(svc, &cx, &event.tenant, &event.rx_id).await?;
    if rx.status != Status::Received {
        return Ok(redeliver(
            &rx,
            &[
                Status::Validated,
                Status::Rejected,
                Status::NeedsClarification,
            ],
        ));
    }
    let mut record = rx.record.clone();
    let prescriber = resolve_prescriber(svc, &cx, &event.tenant, &record.order.requester).await?;
    let outcome = validate(
        &record.order,
        prescriber.as_ref(),
        svc.drugs,
        &svc.rules,
        svc.clock.now(),
    );
    let t = match &outcome {
        Validation::Valid => Transition::Validate,
        Validation::Rejected(_) => Transition::Reject,
        Validation::NeedsClarification(_) => Transition::AskClarification,
    };
    record.prescriber = prescriber;
    record.validation = Some(outcome);
    let saved = save_rx(svc, &cx, &rx, &[t], &record, Changes::default()).await?;
    Ok(emit(&rx, &saved))
}

/// Find the prescriber the order names in the directory. `None` when the directory does not
/// know them (validation then says so).
pub async fn resolve_prescriber(
    svc: &Services,
    cx: &AuditCtx,
    tenant: &str,
    requester: &PrescriberRef,
) -> Result<Option<PrescriberRecord>, StepError> {
    Ok(match requester {
        PrescriberRef::Inline(p) => Some((**p).clone()),
        PrescriberRef::Npi(npi) => {
            let key = svc.vault.blind(domains::NPI, npi);
            let found: Option<Stored<PrescriberRecord>> = svc
                .vault
                .read_by_key(cx, Table::Prescribers, tenant, &key)
                .await?;
            found.map(|d| d.body)
        }
        PrescriberRef::Reference(id) => {
            let idx = svc.vault.blind(domains::PRACTITIONER, id);
            let found: Vec<Stored<PrescriberRecord>> = svc
                .vault
                .read_by_index(cx, Table::Prescribers, tenant, &idx)
                .await?;
            found.into_iter().next().map(|d| d.body)
        }
        PrescriberRef::Missing => None,
    })
}
