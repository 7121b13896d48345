//! dispense (`POST /prescriptions/{id}/dispenses`): record one fill of a verified order — all or
//! part of the current fill — and answer with the FHIR MedicationDispense.
//!
//! The fill and the patient's medication profile (its last fill, which early-refill DUR reads)
//! are written in one commit with their audit events.

use rx_domain::fhir::medication_dispense;
use rx_domain::validate::{
    check_fill, check_fill_days_supply, check_fill_quantity, next_refill_number, MIN_QUANTITY,
};
use rx_domain::Reason;
use rx_domain::{Fill, PrescriptionRecord, Status, Transition};
use rx_guard::access::{Action, Principal};
use rx_platform::event::PipelineEvent;
use rx_platform::flow::{emit, load_patient, load_rx_as, save_rx};
use rx_platform::{Services, StepError};
use rx_store::repo::{AuditCtx, PatientFile, ProfileEntry};
use rx_store::Changes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub const FUNCTION: &str = "dispense";

/// Quantities closer than this count as equal (decimal units such as mL).
const EPSILON: f64 = 1e-6;

/// The request body: `{"quantity": 10, "daysSupply": 5}`, both optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DispenseRequest {
    /// Defaults to what remains of the current fill.
    #[serde(default)]
    pub quantity: Option<f64>,
    /// Defaults to the order's days supply, in proportion for a part fill.
    #[serde(default)]
    pub days_supply: Option<u32>,
    /// The client's key for this request (1 to 128 visible ASCII characters). Sent again, by
    /// the same pharmacist, the request is answered with the fill it made (a retry after a lost
    /// answer or a 504 records no second fill); without it every request is a new fill.
    #[serde(default)]
    pub request_id: Option<String>,
}

/// The most characters a `requestId` may have.
pub const MAX_REQUEST_ID: usize = 128;

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DispenseOutput {
    pub rx_id: String,
    pub status: Status,
    pub version: u64,
    /// The FHIR R4 MedicationDispense of this fill.
    pub dispense: Value,
    pub events: Vec<PipelineEvent>,
    /// The request had been made before (same `requestId`, same pharmacist): nothing new was
    /// recorded, and `dispense` is the fill it made then.
    pub duplicate: bool,
}

/// Record a fill of a verified (or partially dispensed) order.
pub async fn handle(
    svc: &Services,
    p: &Principal,
    source_ip: Option<String>,
    rx_id: &str,
    req: &DispenseRequest,
) -> Result<DispenseOutput, StepError> {
    let (cx, rx) = load_rx_as(
        svc,
        p,
        FUNCTION,
        source_ip,
        Action::DispensePrescription,
        rx_id,
    )
    .await?;
    if let Some(key) = &req.request_id {
        check_request_id(key)?;
        if let Some(done) = rx
            .record
            .fills
            .iter()
            .find(|f| f.request_id.as_deref() == Some(key.as_str()))
        {
            if done.by != p.subject {
                return Err(StepError::Conflict(
                    "this requestId was used by another pharmacist's dispense of this order; \
                     give a new request its own id"
                        .into(),
                ));
            }
            // The same key for another request is a client's mistake, not a retry.
            let other_quantity = req
                .quantity
                .is_some_and(|q| (q - done.quantity).abs() > EPSILON);
            let other_days = req.days_supply.is_some() && req.days_supply != done.days_supply;
            if other_quantity || other_days {
                return Err(StepError::Conflict(
                    "this requestId was used for a dispense of another quantity or supply; a \
                     retry sends the same request, a new request needs its own id"
                        .into(),
                ));
            }
            let patient_reference = format!("Patient/{}", rx.record.order.patient_ref);
            return Ok(DispenseOutput {
                rx_id: rx.id().to_string(),
                status: rx.status,
                version: rx.row.version,
                dispense: medication_dispense(
                    &done.id,
                    rx.id(),
                    &rx.record,
                    done,
                    &patient_reference,
                ),
                events: Vec::new(),
                duplicate: true,
            });
        }
    }
    if !matches!(
        rx.status,
        Status::Verified | Status::PartiallyDispensed | Status::Dispensed
    ) {
        return Err(not_dispensable(rx.id(), rx.status));
    }
    let now = svc.clock.now();
    // The rule that refuses another fill says why better than the status does.
    check_fill(&rx.record, svc.drugs, &svc.rules, &svc.dur, now)
        .map_err(|r| StepError::Refused(r.message))?;
    if rx.status == Status::Dispensed {
        return Err(not_dispensable(rx.id(), rx.status));
    }

    let mut record = rx.record.clone();
    let fill = next_fill(&record, req, &p.subject, now)?;
    let more_later = fill.partial || fill.refill_number < record.order.refills.unwrap_or(0);
    let transition = if more_later {
        Transition::DispensePartial
    } else {
        Transition::DispenseComplete
    };
    record.fills.push(fill.clone());

    let profile = profile_update(svc, &cx, rx.tenant(), rx.id(), &record, &fill).await?;
    let saved = save_rx(svc, &cx, &rx, &[transition], &record, profile).await?;
    let patient_reference = format!("Patient/{}", record.order.patient_ref);
    Ok(DispenseOutput {
        rx_id: rx.id().to_string(),
        status: saved.status,
        version: saved.version,
        dispense: medication_dispense(&fill.id, rx.id(), &record, &fill, &patient_reference),
        events: emit(&rx, &saved),
        duplicate: false,
    })
}

/// A `requestId` is 1 to [`MAX_REQUEST_ID`] visible ASCII characters.
fn check_request_id(key: &str) -> Result<(), StepError> {
    if key.is_empty() || key.len() > MAX_REQUEST_ID || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(StepError::Invalid {
            code: "value",
            message: format!(
                "requestId must be 1 to {MAX_REQUEST_ID} visible ASCII characters (a UUID, say)"
            ),
            expression: Some("requestId".into()),
        });
    }
    Ok(())
}

fn not_dispensable(rx_id: &str, status: Status) -> StepError {
    StepError::Conflict(format!(
        "prescription {rx_id} is {status}; only a verified or partially dispensed order can be dispensed"
    ))
}

/// The fill this request makes: its refill number, quantity (at most what remains of the current
/// fill), days supply and whether it leaves part of the fill for later.
fn next_fill(
    record: &PrescriptionRecord,
    req: &DispenseRequest,
    by: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Fill, StepError> {
    let refill_number = next_refill_number(record);
    let already: f64 = record
        .fills
        .iter()
        .filter(|f| f.refill_number == refill_number)
        .map(|f| f.quantity)
        .sum();
    let per_fill = record.order.quantity;
    let remaining = per_fill.map(|q| (q - already).max(0.0));
    let quantity = match (req.quantity, remaining) {
        (Some(q), _) => q,
        (None, Some(r)) => r,
        (None, None) => {
            return Err(StepError::Invalid {
                code: "required",
                message: "the order states no quantity per fill, so the dispense must give one"
                    .into(),
                expression: Some("quantity".into()),
            })
        }
    };
    check_fill_quantity(quantity).map_err(|r| invalid(r, "quantity"))?;
    if let Some(d) = req.days_supply {
        check_fill_days_supply(d).map_err(|r| invalid(r, "daysSupply"))?;
    }
    if let Some(r) = remaining {
        if quantity > r + EPSILON {
            let unit = record.order.quantity_unit.as_deref().unwrap_or("unit(s)");
            return Err(StepError::Refused(format!(
                "the dispense asks for {quantity} {unit}, but only {r} {unit} remain of this fill; dispense at most what remains"
            )));
        }
    }
    // A fill that leaves less than can be dispensed completes it (the rest could never be).
    let partial = remaining.is_some_and(|r| r - quantity >= MIN_QUANTITY);
    let days_supply = req
        .days_supply
        .or(match (record.order.days_supply, per_fill) {
            // A part fill lasts its share of the fill's supply (early-refill DUR counts from it).
            (Some(d), Some(q)) if partial && q > 0.0 => {
                Some(((f64::from(d) * quantity / q).floor() as u32).max(1))
            }
            (d, _) => d,
        });
    Ok(Fill {
        id: uuid::Uuid::now_v7().to_string(),
        at: now,
        quantity,
        days_supply,
        by: by.to_string(),
        refill_number,
        partial,
        request_id: req.request_id.clone(),
    })
}

/// A request value the rules refuse, as a FHIR `value` issue on `field`.
fn invalid(reason: Reason, field: &str) -> StepError {
    StepError::Invalid {
        code: "value",
        message: reason.message,
        expression: Some(field.into()),
    }
}

/// The patient's file with this fill as the order's last fill, ready for the same commit.
async fn profile_update(
    svc: &Services,
    cx: &AuditCtx,
    tenant: &str,
    rx_id: &str,
    record: &PrescriptionRecord,
    fill: &Fill,
) -> Result<Changes, StepError> {
    let patient_ref = &record.order.patient_ref;
    let existing = load_patient(svc, cx, tenant, patient_ref).await?;
    let mut file = existing
        .as_ref()
        .map(|d| d.body.clone())
        .unwrap_or_else(|| PatientFile::new(patient_ref));
    match file.profile.iter_mut().find(|e| e.rx_id == rx_id) {
        Some(e) => e.last_fill = Some(ProfileEntry::fill(fill)),
        None => file
            .profile
            .push(ProfileEntry::new(rx_id, &record.order, Some(fill))),
    }
    let (write, ev, _) = svc
        .vault
        .patient_write(
            cx,
            tenant,
            patient_ref,
            existing.as_ref().map(|d| &d.row),
            &file,
        )
        .await?;
    Ok(Changes::single(write, ev))
}
