//! The embedded pipeline: the in-process bus that carries events between the queue steps, and the
//! driver that takes one order from intake to the pharmacist queue (and, when a pharmacist is
//! named, through verification and dispensing).
//!
//! At-least-once, as on SQS or a Knative Broker: a step that fails transiently is retried with the
//! same event, and every step is idempotent under redelivery.

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::stream::{FuturesOrdered, StreamExt};
use rx_domain::{AlertKind, MedicationOrder, Severity, Status};
use rx_guard::access::{Principal, Role};
use rx_guard::audit::{Actor, Purpose};
use rx_guard::blind::normalize;
use rx_platform::config::Config;
use rx_platform::event::{EventKind, PipelineEvent};
use rx_platform::flow::{load_rx, Rx};
use rx_platform::services::{Embedded, SetupError};
use rx_platform::{Clock, ManualClock, Services, StepError, SystemClock};
use rx_store::repo::AuditCtx;
use rx_store::sqlite::{Spin, StoreThread};
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
///
/// The steps reach the store through a [`StoreThread`], so SQLite runs on a thread of its own
/// while the steps of other orders run on the caller's ([`Lanes`] keeps several in flight).
pub struct Pipeline {
    pub emb: Embedded,
    clock: Option<Arc<ManualClock>>,
    pub tenant: String,
    operator: AuditCtx,
    pharmacist: Option<Principal>,
    in_batch: Cell<u32>,
    front: Arc<StoreThread>,
    /// The data directory's writer lock, held while the pipeline lives.
    _lock: std::fs::File,
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
        let lock = rx_platform::services::hold_data_dir(&config.data_dir)?;
        let mut emb = Embedded::open(config, svc_clock)?;
        let front = StoreThread::spawn(emb.store.clone()).map_err(|e| SetupError::Store {
            path: emb.store.path().display().to_string(),
            source: rx_store::StoreError::Unavailable(format!("cannot start its thread: {e}")),
        })?;
        let front = Arc::new(front);
        emb.services.vault.store = front.clone();
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
            in_batch: Cell::new(0),
            front,
            _lock: lock,
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

    /// Group change sets into one durable transaction every [`BATCH`] calls (bulk runs). The
    /// batch is opened and committed on the store's thread, between the jobs sent before and
    /// after.
    /// A full batch is committed first, so what follows the call is always inside an open one.
    pub async fn tick_batch(&self) -> Result<(), StepError> {
        if self.batch_full() {
            self.flush().await?;
        }
        if self.in_batch.get() == 0 {
            self.front.begin_batch().await?;
        }
        self.in_batch.set(self.in_batch.get() + 1);
        Ok(())
    }

    /// Whether the next [`Pipeline::tick_batch`] commits the batch.
    pub fn batch_full(&self) -> bool {
        self.in_batch.get() >= BATCH
    }

    /// Make everything so far durable.
    pub async fn flush(&self) -> Result<(), StepError> {
        if self.in_batch.get() > 0 {
            self.in_batch.set(0);
            self.front.end_batch().await?;
        }
        Ok(())
    }

    /// Stops the store's thread once nothing is in flight (what follows uses the store directly).
    pub fn stop_store_thread(&self) {
        self.front.stop();
    }

    /// The services one order's steps use: in [`TimeMode::AsWritten`], a clock of its own set
    /// to when the order was written (orders in flight side by side each keep their own time).
    fn order_services(&self, at: Option<DateTime<Utc>>) -> Services {
        let mut svc = self.emb.services.clone();
        if let (Some(_), Some(at)) = (&self.clock, at) {
            svc.clock = Arc::new(ManualClock::new(at));
        }
        svc
    }

    /// [`Pipeline::process`], with every refusal of the order itself as its outcome: `Err` only
    /// when the store or a key service fails (the run stops; rerunning resumes it).
    pub async fn submit(
        &self,
        order: MedicationOrder,
        at: Option<DateTime<Utc>>,
    ) -> Result<OrderOutcome, StepError> {
        let source_id = order.source_id.clone();
        match self.process(order, at).await {
            Err(e) if !e.is_transient() => Ok(refused(source_id, e)),
            other => other,
        }
    }

    /// Take one order from intake through the queue steps, then (with a pharmacist named)
    /// verification and dispensing, judged as of `at` in [`TimeMode::AsWritten`]. `Err` only
    /// for failures that say nothing about the order itself (the store or key service failing);
    /// a refused order is an `Ok` outcome.
    pub async fn process(
        &self,
        order: MedicationOrder,
        at: Option<DateTime<Utc>>,
    ) -> Result<OrderOutcome, StepError> {
        let source_id = order.source_id.clone();
        let svc = self.order_services(at);
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
        let rx_id = accepted.rx_id;
        let mut events: Vec<PipelineEvent> = event.into_iter().collect();
        // One read for the report (and the pharmacist's decision); verify and dispense say
        // what they changed. An order already stored is read before the queue steps, and again
        // only if they carry it on.
        let mut read = None;
        if accepted.duplicate && events.is_empty() {
            // An earlier run that stopped between the queue steps left the order validated
            // (intake itself sends a received one on again): carry it on from there.
            let stored = load_rx(&svc, &self.report_cx(), &tenant, &rx_id).await?;
            events = rx_platform::flow::redeliver(&stored, &[Status::Validated]);
            read = Some(stored);
        }
        let resumed = !events.is_empty();
        drain(&svc, events).await?;
        let rx = match read {
            Some(stored) if !resumed => stored,
            _ => load_rx(&svc, &self.report_cx(), &tenant, &rx_id).await?,
        };
        let mut status = rx.status;
        let mut notes = Vec::new();
        let mut acted = false;
        if let Some(p) = self.pharmacist.clone() {
            // New orders, and those an earlier run left in the queue or verified but not filled.
            let unblocked = !rx.record.alerts.iter().any(|a| a.is_blocking());
            if matches!(rx.status, Status::AwaitingVerification | Status::Verified) && unblocked {
                let (now, note) = self.verify_and_dispense(&svc, &p, &rx).await?;
                acted = now.is_some_and(|now| now != rx.status);
                status = now.unwrap_or(status);
                notes.extend(note);
            }
        }
        let mut outcome = self.outcome(source_id, &rx);
        outcome.status = status.as_str().to_string();
        outcome.reasons.extend(notes);
        outcome.already_stored = accepted.duplicate && !resumed && !acted;
        Ok(outcome)
    }

    /// Verify and fill an order as the named pharmacist. A refusal leaves the order where it is
    /// and comes back as a note saying why; only infrastructure failures are errors.
    async fn verify_and_dispense(
        &self,
        svc: &Services,
        p: &Principal,
        rx: &Rx,
    ) -> Result<(Option<Status>, Option<ReasonOut>), StepError> {
        let rx_id = rx.id();
        let approve: rx_fn_verify::VerifyRequest =
            serde_json::from_value(serde_json::json!({ "decision": "approve" }))
                .map_err(|e| StepError::invalid(format!("verification request: {e}")))?;
        // An order verified by an earlier run that stopped before the fill goes straight on.
        let verified = if rx.status == Status::Verified {
            Status::Verified
        } else {
            match with_retry(true, || rx_fn_verify::handle(svc, p, None, rx_id, &approve)).await {
                Ok(v) => v.status,
                Err(e) => return Ok((None, left_with_pharmacist(e, "verification-refused")?)),
            }
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

/// Orders a bulk run keeps in flight at once: enough that the store's thread always has the
/// next job while the steps of other orders run on the caller's thread (4, 8, 16 and 32 gave
/// the same throughput on 10,000 orders; 1 was a third slower).
pub const IN_FLIGHT: usize = 8;

type Flight<'p, T> =
    Pin<Box<dyn Future<Output = (Result<OrderOutcome, StepError>, Vec<String>, T)> + 'p>>;

/// Several orders in flight through one [`Pipeline`], in lanes: an order waits while an earlier
/// one of the same patient (or with the same source id) is still in flight, so each patient's
/// orders are reviewed and filled in the order given, exactly as one at a time, while different
/// patients' orders overlap. Outcomes come back in the order the orders went in; `T` is the
/// caller's tag for each (its input line, say).
pub struct Lanes<'p, T> {
    p: &'p Pipeline,
    width: usize,
    flights: FuturesOrdered<Flight<'p, T>>,
    busy: HashMap<String, u32>,
}

impl<'p, T: 'p> Lanes<'p, T> {
    /// Lanes keeping at most `width` orders (at least one) in flight.
    pub fn new(p: &'p Pipeline, width: usize) -> Self {
        Lanes {
            p,
            width: width.max(1),
            flights: FuturesOrdered::new(),
            busy: HashMap::new(),
        }
    }

    /// Sends `order` on its way (judged as of `at` when the run keeps business time), once there
    /// is room and its lane is free. Returns the outcomes that ended meanwhile, in input order.
    /// `Err` when the store or a key service failed (the run stops; rerunning resumes it).
    pub async fn push(
        &mut self,
        order: MedicationOrder,
        at: Option<DateTime<Utc>>,
        tag: T,
    ) -> Result<Vec<(OrderOutcome, T)>, StepError> {
        // The store finds a patient's file and an order by the blind index of the normalized
        // reference (case and spacing aside): two spellings of one are one lane.
        let mut lanes = vec![format!("patient:{}", normalize(&order.patient_ref))];
        if let Some(id) = &order.source_id {
            lanes.push(format!("source:{}", normalize(id)));
        }
        let mut ended = Vec::new();
        // Each durable batch holds whole orders: before it is committed, every order in flight
        // ends (a killed run then loses whole orders, which a rerun redoes from the start).
        let wait_all = self.p.batch_full();
        while self.flights.len() >= self.width
            || (wait_all && !self.flights.is_empty())
            || lanes.iter().any(|l| self.busy.contains_key(l))
        {
            match self.next().await? {
                Some(done) => ended.push(done),
                None => break,
            }
        }
        self.p.tick_batch().await?;
        for l in &lanes {
            *self.busy.entry(l.clone()).or_default() += 1;
        }
        let p = self.p;
        self.flights.push_back(Box::pin(
            async move { (p.submit(order, at).await, lanes, tag) },
        ));
        Ok(ended)
    }

    /// Waits for every order in flight; their outcomes in input order.
    pub async fn finish(mut self) -> Result<Vec<(OrderOutcome, T)>, StepError> {
        let mut ended = Vec::new();
        while let Some(done) = self.next().await? {
            ended.push(done);
        }
        Ok(ended)
    }

    async fn next(&mut self) -> Result<Option<(OrderOutcome, T)>, StepError> {
        // While every order in flight waits for the store's thread, look again a few times
        // before sleeping (see [`Spin`]).
        let mut spin = Spin::default();
        let next = std::future::poll_fn(|cx| loop {
            match self.flights.poll_next_unpin(cx) {
                Poll::Ready(done) => return Poll::Ready(done),
                Poll::Pending if spin.again() => {}
                Poll::Pending => return Poll::Pending,
            }
        });
        let Some((outcome, lanes, tag)) = next.await else {
            return Ok(None);
        };
        for l in lanes {
            if let Some(n) = self.busy.get_mut(&l) {
                *n -= 1;
                if *n == 0 {
                    self.busy.remove(&l);
                }
            }
        }
        Ok(Some((outcome?, tag)))
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
