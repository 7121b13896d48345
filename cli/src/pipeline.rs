//! The embedded pipeline: the in-process bus that carries events between the queue steps, and the
//! driver that takes one order from intake to the pharmacist queue (and, when a pharmacist is
//! named, through verification and dispensing).
//!
//! At-least-once, as on SQS or a Knative Broker: a step that fails transiently is retried with the
//! same event, and every step is idempotent under redelivery.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rx_domain::{AlertKind, MedicationOrder, Severity, Status};
use rx_guard::access::{Principal, Role};
use rx_guard::audit::{Actor, Purpose};
use rx_platform::config::Config;
use rx_platform::event::{EventKind, PipelineEvent};
use rx_platform::flow::{load_rx, Rx};
use rx_platform::services::{Embedded, SetupError};
use rx_platform::{Clock, ManualClock, Services, StepError, SystemClock};
use rx_store::repo::AuditCtx;
use serde::Serialize;

/// How many times a step is tried on a transient failure before the order is left where it is.
const ATTEMPTS: u32 = 4;

/// Run one queue step for `event`; the events it returns go back on the bus.
pub async fn dispatch(
    svc: &Services,
    event: &PipelineEvent,
) -> Result<Vec<PipelineEvent>, StepError> {
    match event.kind {
        EventKind::Received => rx_fn_validate::handle(svc, event).await,
        EventKind::Validated => rx_fn_review::handle(svc, event).await,
        // Reviewed orders wait for a pharmacist; the other events end the queue part.
        _ => Ok(Vec::new()),
    }
}

/// Deliver `events` and everything they lead to, in order. A step that keeps failing leaves its
/// prescription in its last stored state (nothing is lost: rerunning resumes it) and the error is
/// returned after the rest of the queue has been delivered.
pub async fn drain(svc: &Services, events: Vec<PipelineEvent>) -> Result<(), StepError> {
    let mut bus: VecDeque<PipelineEvent> = events.into();
    let mut first_error = None;
    while let Some(ev) = bus.pop_front() {
        match with_retry(true, || dispatch(svc, &ev)).await {
            Ok(next) => bus.extend(next),
            Err(e) => {
                tracing::warn!(event = ev.kind.type_name(), rx_id = %ev.rx_id, error = %e, "step failed");
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Try `f` again on a transient failure, and on a lost conditional write when `on_conflict`
/// (a queue step redelivered reads the new state; intake's conflicts are about the input and
/// would only be waited out).
async fn with_retry<T, F, Fut>(on_conflict: bool, mut f: F) -> Result<T, StepError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StepError>>,
{
    let mut attempt = 1;
    loop {
        match f().await {
            Err(e)
                if attempt < ATTEMPTS
                    && (e.is_transient()
                        || (on_conflict && matches!(e, StepError::Conflict(_)))) =>
            {
                tokio::time::sleep(Duration::from_millis(5 << attempt)).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// What became of one order.
#[derive(Debug, Clone, Serialize)]
pub struct OrderOutcome {
    /// The MedicationRequest id in the input.
    #[serde(rename = "id")]
    pub source_id: Option<String>,
    pub rx_id: Option<String>,
    pub status: String,
    pub reasons: Vec<ReasonOut>,
    pub alerts: Vec<AlertOut>,
    /// The order was already in the data directory (an earlier run stored it): not processed
    /// again, reported as it stands.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub already_stored: bool,
    #[serde(skip)]
    pub controlled: bool,
    #[serde(skip)]
    pub schedule: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReasonOut {
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct AlertOut {
    pub kind: AlertKind,
    pub severity: Severity,
}

/// Which clock the run keeps.
pub enum TimeMode {
    /// Orders are judged as of now.
    Now,
    /// Orders are judged as of their `authoredOn` (a replay of history).
    AsWritten,
}

/// The embedded pipeline over one data directory.
pub struct Pipeline {
    pub emb: Embedded,
    clock: Option<Arc<ManualClock>>,
    pub tenant: String,
    operator: AuditCtx,
    pharmacist: Option<Principal>,
    in_batch: u32,
}

/// Change sets per durable commit in a bulk run.
const BATCH: u32 = 2_000;

impl Pipeline {
    pub fn open(
        config: &Config,
        time: TimeMode,
        operator: &str,
        verify_as: Option<&str>,
    ) -> Result<Self, SetupError> {
        let (clock, svc_clock): (Option<Arc<ManualClock>>, Arc<dyn Clock>) = match time {
            TimeMode::Now => (None, Arc::new(SystemClock)),
            TimeMode::AsWritten => {
                let c = Arc::new(ManualClock::new(Utc::now()));
                (Some(c.clone()), c)
            }
        };
        let emb = Embedded::open(config, svc_clock)?;
        let tenant = config.tenant.clone();
        let operator = AuditCtx {
            actor: Actor {
                subject: format!("cli:{operator}"),
                role: "service".into(),
                tenant: tenant.clone(),
            },
            function: "intake",
            purpose: Purpose::Treatment,
            source_ip: None,
            break_glass: false,
        };
        let pharmacist = verify_as.map(|sub| Principal {
            subject: sub.to_string(),
            role: Role::Pharmacist,
            tenant: tenant.clone(),
            // The operator who names a pharmacist on the command line vouches for their
            // second factor, as the pharmacy system's sign-in would.
            mfa: true,
            npi: None,
            break_glass: None,
        });
        Ok(Pipeline {
            emb,
            clock,
            tenant,
            operator,
            pharmacist,
            in_batch: 0,
        })
    }

    pub fn services(&self) -> &Services {
        &self.emb.services
    }

    /// The audit context of the operator's own accesses (intake of files, the report).
    pub fn operator(&self) -> &AuditCtx {
        &self.operator
    }

    /// Set business time (only in [`TimeMode::AsWritten`]).
    pub fn set_time(&self, at: DateTime<Utc>) {
        if let Some(c) = &self.clock {
            c.set(at);
        }
    }

    /// Group change sets into one durable transaction every [`BATCH`] calls (bulk runs).
    pub fn tick_batch(&mut self) -> Result<(), StepError> {
        if self.in_batch == 0 {
            self.emb.store.begin_batch()?;
        }
        self.in_batch += 1;
        if self.in_batch >= BATCH {
            self.flush()?;
        }
        Ok(())
    }

    /// Make everything so far durable.
    pub fn flush(&mut self) -> Result<(), StepError> {
        if self.in_batch > 0 {
            self.in_batch = 0;
            self.emb.store.end_batch()?;
        }
        Ok(())
    }

    /// [`Pipeline::process`], with every refusal of the order itself as its outcome: `Err` only
    /// when the store or a key service fails (the run stops; rerunning resumes it).
    pub async fn submit(&mut self, order: MedicationOrder) -> Result<OrderOutcome, StepError> {
        let source_id = order.source_id.clone();
        match self.process(order).await {
            Err(e) if !e.is_transient() => Ok(refused(source_id, e)),
            other => other,
        }
    }

    /// Take one order from intake through the queue steps, then (with a pharmacist named)
    /// verification and dispensing. `Err` only for failures that say nothing about the order
    /// itself (the store or key service failing); a refused order is an `Ok` outcome.
    pub async fn process(&mut self, order: MedicationOrder) -> Result<OrderOutcome, StepError> {
        self.tick_batch()?;
        let source_id = order.source_id.clone();
        let svc = self.emb.services.clone();
        let tenant = self.tenant.clone();
        let submitted = with_retry(false, || {
            rx_fn_intake::submit_order(&svc, &self.operator, &tenant, order.clone())
        })
        .await;
        let (accepted, event) = match submitted {
            Ok(x) => x,
            Err(e @ StepError::Invalid { .. }) => {
                return Ok(refused(source_id, e));
            }
            Err(e) => return Err(e),
        };
        drain(&svc, event.into_iter().collect()).await?;
        let rx_id = accepted.rx_id;
        // One read for the report (and the pharmacist's decision); verify and dispense say
        // what they changed.
        let rx = load_rx(&svc, &self.report_cx(), &tenant, &rx_id).await?;
        let mut status = rx.status;
        let mut notes = Vec::new();
        if accepted.duplicate {
            let mut outcome = self.outcome(source_id, &rx);
            outcome.already_stored = true;
            return Ok(outcome);
        }
        if let Some(p) = self.pharmacist.clone() {
            if rx.status == Status::AwaitingVerification
                && !rx.record.alerts.iter().any(|a| a.is_blocking())
            {
                let (now, note) = self.verify_and_dispense(&p, &rx).await?;
                status = now.unwrap_or(status);
                notes.extend(note);
            }
        }
        let mut outcome = self.outcome(source_id, &rx);
        outcome.status = status.as_str().to_string();
        outcome.reasons.extend(notes);
        Ok(outcome)
    }

    /// Verify and fill an order as the named pharmacist. A refusal leaves the order where it is
    /// and comes back as a note saying why; only infrastructure failures are errors.
    async fn verify_and_dispense(
        &self,
        p: &Principal,
        rx: &Rx,
    ) -> Result<(Option<Status>, Option<ReasonOut>), StepError> {
        let svc = &self.emb.services;
        let rx_id = rx.id();
        let approve: rx_fn_verify::VerifyRequest =
            serde_json::from_value(serde_json::json!({ "decision": "approve" }))
                .map_err(|e| StepError::invalid(format!("verification request: {e}")))?;
        let verified =
            match with_retry(true, || rx_fn_verify::handle(svc, p, None, rx_id, &approve)).await {
                Ok(v) => v.status,
                Err(e) => return Ok((None, left_with_pharmacist(e, "verification-refused")?)),
            };
        // An order that states no quantity is filled for the default supply at the dose its
        // dosage gives; with neither, the pharmacist has to enter the quantity.
        let order = &rx.record.order;
        let days = order.days_supply.unwrap_or(svc.dur.default_active_days);
        let quantity = match order.quantity {
            Some(_) => None,
            None => match rx_domain::dur::units_per_day(order) {
                Some(per_day) => Some((per_day * f64::from(days)).ceil()),
                None => {
                    return Ok((
                        Some(verified),
                        Some(ReasonOut {
                            code: "quantity-needed".into(),
                            message: "Verified; the order states no quantity and its dosage gives no daily amount, so the pharmacist must enter the quantity to dispense.".into(),
                        }),
                    ))
                }
            },
        };
        let fill = rx_fn_dispense::DispenseRequest {
            quantity,
            days_supply: order.days_supply.is_none().then_some(days),
            // A retry after a failure that had in fact committed finds this fill instead of
            // making a second one.
            request_id: Some(format!("rxflow-run-{rx_id}")),
        };
        match with_retry(true, || rx_fn_dispense::handle(svc, p, None, rx_id, &fill)).await {
            Ok(d) => Ok((Some(d.status), None)),
            Err(e) => Ok((Some(verified), left_with_pharmacist(e, "dispense-refused")?)),
        }
    }

    /// The report reads each order once, as the operator, for the record of what happened.
    fn report_cx(&self) -> AuditCtx {
        AuditCtx {
            function: "cli",
            ..self.operator.clone()
        }
    }

    fn outcome(&self, source_id: Option<String>, rx: &Rx) -> OrderOutcome {
        let product = rx
            .record
            .order
            .medication
            .rxnorm
            .as_deref()
            .and_then(|c| self.emb.services.drugs.product(c));
        let schedule = product.and_then(|p| p.schedule).map(|s| s.as_str());
        OrderOutcome {
            source_id,
            rx_id: Some(rx.id().to_string()),
            status: rx.status.as_str().to_string(),
            reasons: rx
                .record
                .reasons()
                .into_iter()
                .map(|r| ReasonOut {
                    code: r.code.clone(),
                    message: r.message.clone(),
                })
                .collect(),
            alerts: rx
                .record
                .alerts
                .iter()
                .map(|a| AlertOut {
                    kind: a.kind,
                    severity: a.severity,
                })
                .collect(),
            already_stored: false,
            controlled: schedule.is_some(),
            schedule,
        }
    }
}

/// A refusal by verify or dispense leaves the order waiting, with the refusal as a note.
fn left_with_pharmacist(e: StepError, code: &str) -> Result<Option<ReasonOut>, StepError> {
    if e.is_transient() {
        return Err(e);
    }
    Ok(Some(ReasonOut {
        code: code.to_string(),
        message: e.to_string(),
    }))
}

/// An order intake refused outright (it never got a prescription id).
pub fn refused(source_id: Option<String>, e: StepError) -> OrderOutcome {
    OrderOutcome {
        source_id,
        rx_id: None,
        status: "refused-at-intake".into(),
        reasons: vec![ReasonOut {
            code: e.issue_code().to_string(),
            message: e.to_string(),
        }],
        alerts: Vec::new(),
        already_stored: false,
        controlled: false,
        schedule: None,
    }
}
