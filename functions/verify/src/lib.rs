//! verify (`POST /prescriptions/{id}/verification`): a pharmacist approves an order that review
//! queued, overriding each blocking DUR alert with a reason, or rejects it with a reason.
//!
//! Redelivery: the same decision by the same pharmacist on an order they already decided that way
//! answers with the current state and writes nothing. Another pharmacist's decision on it is a
//! conflict: they decided nothing, and must not be told the order is verified by their request.

use std::collections::BTreeSet;

use rx_domain::validate::check_fill;
use rx_domain::{AlertKind, Override, Reason, Status, Transition, Verification};
use rx_guard::access::{Action, Principal};
use rx_platform::event::PipelineEvent;
use rx_platform::flow::{emit, load_rx_as, redeliver, save_rx, Rx};
use rx_platform::{Services, StepError};
use rx_store::Changes;
use serde::{Deserialize, Serialize};

pub const FUNCTION: &str = "verify";

/// The pharmacist's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decision {
    Approve,
    Reject,
}

/// The request body: `{"decision": "approve" | "reject", "overrides": [{"alert": "<alert kind>",
/// "reason": "…"}], "reason": "…"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    pub decision: Decision,
    /// For each blocking alert the pharmacist overrides: its kind and why.
    #[serde(default)]
    pub overrides: Vec<Override>,
    /// Required to reject; a note when approving.
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyOutput {
    pub rx_id: String,
    pub status: Status,
    pub version: u64,
    pub events: Vec<PipelineEvent>,
    /// True when this pharmacist had already decided the order this way (a redelivery): nothing
    /// new was written.
    pub duplicate: bool,
}

/// Record a pharmacist's decision on an order awaiting verification.
pub async fn handle(
    svc: &Services,
    p: &Principal,
    source_ip: Option<String>,
    rx_id: &str,
    req: &VerifyRequest,
) -> Result<VerifyOutput, StepError> {
    let (cx, rx) = load_rx_as(
        svc,
        p,
        FUNCTION,
        source_ip,
        Action::VerifyPrescription,
        rx_id,
    )
    .await?;
    if rx.status != Status::AwaitingVerification {
        return already_decided(&rx, &p.subject, req.decision);
    }
    let reason = req
        .reason
        .as_deref()
        .map(str::trim)
        .filter(|r| !r.is_empty());
    let (transition, reason) = match req.decision {
        Decision::Approve => {
            check_overrides(&rx, &req.overrides)?;
            // An order that could not be filled now (expired, past the controlled fill window)
            // is not approved only to be refused at the counter.
            check_fill(&rx.record, svc.drugs, &svc.rules, &svc.dur, svc.clock.now()).map_err(
                |r| {
                    StepError::Refused(format!(
                        "{} It cannot be approved; reject it with a reason the prescriber can act on.",
                        r.message
                    ))
                },
            )?;
            (
                Transition::Verify,
                reason.map(|r| Reason::new("pharmacist-note", r)),
            )
        }
        Decision::Reject => {
            let r = reason.ok_or_else(|| StepError::Invalid {
                code: "required",
                message: "rejecting an order needs a reason the prescriber can act on".into(),
                expression: Some("reason".into()),
            })?;
            (
                Transition::Reject,
                Some(Reason::new("pharmacist-rejected", r)),
            )
        }
    };
    let mut record = rx.record.clone();
    record.verification = Some(Verification {
        pharmacist: p.subject.clone(),
        at: svc.clock.now(),
        approved: req.decision == Decision::Approve,
        overrides: req
            .overrides
            .iter()
            .map(|o| Override {
                alert: o.alert,
                reason: o.reason.trim().to_string(),
            })
            .collect(),
        reason,
    });
    let saved = save_rx(svc, &cx, &rx, &[transition], &record, Changes::default()).await?;
    Ok(VerifyOutput {
        rx_id: rx.id().to_string(),
        status: saved.status,
        version: saved.version,
        events: emit(&rx, &saved),
        duplicate: false,
    })
}

/// An order no longer awaiting verification: the same decision again by the pharmacist who made
/// it is a redelivery; the same decision by another pharmacist (who lost a race, or came late) is
/// a conflict saying it was already decided, without naming by whom; anything else a conflict
/// naming the status it is in.
fn already_decided(rx: &Rx, subject: &str, decision: Decision) -> Result<VerifyOutput, StepError> {
    let approved = decision == Decision::Approve;
    match &rx.record.verification {
        Some(v) if v.approved == approved && v.pharmacist == subject => Ok(VerifyOutput {
            rx_id: rx.id().to_string(),
            status: rx.status,
            version: rx.row.version,
            events: redeliver(rx, &[Status::Verified, Status::Rejected]),
            duplicate: true,
        }),
        Some(v) if v.approved == approved => Err(StepError::Conflict(format!(
            "prescription {} was already {} by another pharmacist; nothing was recorded for this request",
            rx.id(),
            if approved { "verified" } else { "rejected" },
        ))),
        _ => Err(StepError::Conflict(format!(
            "prescription {} is {}; only an order awaiting verification can be verified or rejected",
            rx.id(),
            rx.status
        ))),
    }
}

/// Approval needs an override with a reason for every kind of blocking alert on the order, and
/// overrides only of alerts the order carries.
fn check_overrides(rx: &Rx, overrides: &[Override]) -> Result<(), StepError> {
    let on_order: BTreeSet<AlertKind> = rx.record.alerts.iter().map(|a| a.kind).collect();
    if let Some(o) = overrides.iter().find(|o| !on_order.contains(&o.alert)) {
        return Err(StepError::Invalid {
            code: "value",
            message: format!(
                "the override names a {} alert, but the order carries none; override only the alerts review raised",
                o.alert.as_str()
            ),
            expression: Some("overrides.alert".into()),
        });
    }
    let given: BTreeSet<AlertKind> = overrides
        .iter()
        .filter(|o| !o.reason.trim().is_empty())
        .map(|o| o.alert)
        .collect();
    let missing: Vec<&str> = rx
        .record
        .alerts
        .iter()
        .filter(|a| a.is_blocking())
        .map(|a| a.kind)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|k| !given.contains(k))
        .map(AlertKind::as_str)
        .collect();
    if !missing.is_empty() {
        return Err(StepError::Refused(format!(
            "the order has blocking alerts that need an override with a reason before it can be approved: {}",
            missing.join(", ")
        )));
    }
    if let Some(o) = overrides.iter().find(|o| o.reason.trim().is_empty()) {
        return Err(StepError::Invalid {
            code: "required",
            message: format!(
                "the override of the {} alert has no reason; say why it is safe to dispense",
                o.alert.as_str()
            ),
            expression: Some("overrides.reason".into()),
        });
    }
    Ok(())
}
