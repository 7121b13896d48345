//! `rxflow serve`: the HTTP API of every person-facing step on one port, over the embedded
//! deployment in a data directory, with the queue steps (validate, review) run in-process after
//! intake so a submitted order reaches the pharmacist queue.
//!
//! Routes are thin: the shared layer in [`rx_platform::http`] authenticates the caller, turns
//! errors into OperationOutcomes and wraps everything in the middleware stack; the step handlers
//! decide and audit.

use std::collections::{BTreeSet, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRef, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use chrono::Utc;
use rx_domain::fhir::{self, Submission};
use rx_domain::{MedicationOrder, PrescriberRef};
use rx_guard::access::{Action, DevIssuer, JwksSource, JwtConfig, JwtVerifier, Resource};
use rx_guard::audit::ResourceRef;
use rx_guard::GuardError;
use rx_platform::break_glass::{self, BreakGlassRequest, Opened};
use rx_platform::clock::earliest_time;
use rx_platform::config::{Config, ConfigError, DEFAULT_DATA_DIR};
use rx_platform::event::{EventKind, PipelineEvent};
use rx_platform::flow::break_glass_active;
use rx_platform::http::{
    self as rxhttp, AppState, Caller, FhirJson, FhirPath, FhirQuery, Limits, NoParams,
};
use rx_platform::services::{Embedded, KeyFiles, SetupError};
use rx_platform::{Services, StepError, SystemClock};
use rx_store::repo::domains;
use rx_store::sqlite::SqliteStore;
use rx_store::Table;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Function name of intake in audit events.
const INTAKE: &str = "intake";
/// Pipeline events processed at once (each is a short chain of sealed reads and one commit).
const PIPELINE_WORKERS: usize = 4;
/// How long shutdown waits for the pipeline to finish what it has accepted.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long shutdown waits for open connections to finish before closing them.
const CONNECTIONS_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// Data directory of the embedded deployment (store, keys, dev token issuer).
    #[arg(long = "data-dir", env = "RXFLOW_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error("{0}")]
    Tokens(String),
    #[error("cannot listen on {addr}: {source} (is another server running? pick another --addr)")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the server stopped: {0}")]
    Serve(#[source] std::io::Error),
}

// ---------------------------------------------------------------------------------------------
// Token verification

/// The verifier `serve` trusts: a real IdP when `RXFLOW_JWKS` names its key set (file or URL,
/// with `RXFLOW_JWT_ISSUER` and `RXFLOW_JWT_AUDIENCE`), else the data directory's dev issuer
/// (the one `rxflow token` signs with).
pub fn verifier_from_env(
    data_dir: &std::path::Path,
    get: impl Fn(&str) -> Option<String>,
) -> Result<JwtVerifier, ServeError> {
    let tokens = |what: String| ServeError::Tokens(what);
    match get("RXFLOW_JWKS").filter(|s| !s.trim().is_empty()) {
        Some(jwks) => {
            let need = |name: &str| {
                get(name).filter(|s| !s.trim().is_empty()).ok_or_else(|| {
                    tokens(format!(
                        "RXFLOW_JWKS is set, so {name} must name what tokens of that issuer carry"
                    ))
                })
            };
            let cfg = JwtConfig::new(need("RXFLOW_JWT_ISSUER")?, need("RXFLOW_JWT_AUDIENCE")?);
            let source = if jwks.starts_with("https://") || jwks.starts_with("http://") {
                JwksSource::Url(jwks)
            } else {
                JwksSource::File(PathBuf::from(jwks))
            };
            JwtVerifier::new(cfg, source)
                .map_err(|e| tokens(format!("the key set in RXFLOW_JWKS: {e}")))
        }
        None => {
            let dir = crate::token::issuer_dir(data_dir);
            let issuer = DevIssuer::open_or_create(&dir).map_err(|e: GuardError| {
                tokens(format!("the dev token issuer in {}: {e}", dir.display()))
            })?;
            tracing::warn!(
                "trusting dev tokens from this data directory (`rxflow token`); set RXFLOW_JWKS, RXFLOW_JWT_ISSUER and RXFLOW_JWT_AUDIENCE for a real identity provider"
            );
            issuer
                .verifier()
                .map_err(|e| tokens(format!("the dev token issuer: {e}")))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The in-process pipeline

/// Events waiting for the pipeline, at most. Past it an accepted order's event is not queued
/// (the order is stored, as `received`) and its tenant is swept for pending orders once the
/// pipeline has caught up: memory stays bounded under a sustained overload and nothing accepted
/// is left behind.
const PIPELINE_QUEUE: usize = 65_536;
/// Pending orders read per page when sweeping a tenant.
const SWEEP_PAGE: usize = 500;

/// Hands accepted orders' events to the queue steps. Cheap to clone.
#[derive(Clone)]
pub struct Pipeline {
    tx: mpsc::Sender<PipelineEvent>,
    /// Tenants with an order whose event did not fit in the queue.
    overflow: Arc<std::sync::Mutex<BTreeSet<String>>>,
}

impl Pipeline {
    fn publish(&self, events: Vec<PipelineEvent>) {
        for ev in events {
            match self.tx.try_send(ev) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(ev)) => {
                    if let Ok(mut tenants) = self.overflow.lock() {
                        if tenants.insert(ev.tenant.clone()) {
                            tracing::warn!(tenant = %ev.tenant, "pipeline queue full; the tenant's pending orders are swept once it catches up");
                        }
                    }
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    // Only while shutting down; the order is stored and the startup sweep resumes it.
                    tracing::warn!("pipeline closed; the order waits for the next start");
                }
            }
        }
    }
}

/// The tenants that overflowed since the last call.
fn take_overflow(overflow: &std::sync::Mutex<BTreeSet<String>>) -> Vec<String> {
    overflow
        .lock()
        .map(|mut t| std::mem::take(&mut *t).into_iter().collect())
        .unwrap_or_default()
}

/// Run `first` and the events it leads to through the queue steps ([`crate::pipeline::dispatch`]).
/// Unlike a batch run, the server never gives up on a transient failure (store or key
/// service unavailable) or a lost conditional write: it retries with backoff, so an accepted
/// order is never dropped while the server runs. Other failures are logged (ids only).
async fn run_chain(svc: Arc<Services>, first: PipelineEvent) {
    let mut todo = VecDeque::from([first]);
    while let Some(ev) = todo.pop_front() {
        let mut backoff = Duration::from_millis(20);
        loop {
            match crate::pipeline::dispatch(&svc, &ev).await {
                Ok(next) => {
                    todo.extend(next);
                    break;
                }
                Err(e) if e.is_transient() || matches!(e, StepError::Conflict(_)) => {
                    tracing::warn!(rx = %ev.rx_id, step = ev.kind.type_name(), error = %e, retry_in_ms = backoff.as_millis() as u64, "pipeline step failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    tracing::error!(rx = %ev.rx_id, step = ev.kind.type_name(), error = %e, "pipeline step refused the order; it stays in its current status");
                    break;
                }
            }
        }
    }
}

/// Start a chain for `ev` once one of the worker slots is free.
async fn start_chain(svc: &Arc<Services>, slots: &Arc<Semaphore>, ev: PipelineEvent) {
    let Ok(slot) = slots.clone().acquire_owned().await else {
        return;
    };
    let svc = svc.clone();
    tokio::spawn(async move {
        run_chain(svc, ev).await;
        drop(slot);
    });
}

/// Run every order of `tenant` that is accepted but not yet through validate and review: at
/// start (a crash or a shutdown mid-chain left them) and after a queue overflow. Page by page,
/// so the sweep's memory is one page whatever the backlog. An order that is already on its way
/// is harmless to run again: every step is idempotent.
async fn sweep(svc: &Arc<Services>, slots: &Arc<Semaphore>, tenant: &str) {
    for (status, kind) in [
        (rx_domain::Status::Received, EventKind::Received),
        (rx_domain::Status::Validated, EventKind::Validated),
    ] {
        let mut after: Option<String> = None;
        let mut resumed = 0usize;
        loop {
            let rows = match svc
                .vault
                .store
                .list(
                    Table::Prescriptions,
                    tenant,
                    Some(status.as_str()),
                    after.as_deref(),
                    SWEEP_PAGE,
                )
                .await
            {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::warn!(error = %e, "could not list pending orders to resume");
                    return;
                }
            };
            let Some(last) = rows.last() else { break };
            after = Some(last.id.clone());
            let n = rows.len();
            for r in rows {
                start_chain(
                    svc,
                    slots,
                    PipelineEvent::new(kind, &r.id, tenant, r.version),
                )
                .await;
            }
            resumed += n;
            if n < SWEEP_PAGE {
                break;
            }
        }
        if resumed > 0 {
            tracing::info!(
                count = resumed,
                status = status.as_str(),
                "resumed pending orders"
            );
        }
    }
}

/// [`sweep`] every tenant that has orders. The server takes orders for whichever pharmacy a
/// trusted token names (the deployment's own tenant is only where refused sign-ins are
/// audited), so any of them may have orders left pending in the one store.
async fn sweep_every_tenant(svc: &Arc<Services>, slots: &Arc<Semaphore>) {
    match svc.vault.store.tenants(Table::Prescriptions).await {
        Ok(tenants) => {
            for t in tenants {
                sweep(svc, slots, &t).await;
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not list the tenants whose pending orders to resume")
        }
    }
}

/// What the pipeline does first when it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// Resume the orders of every tenant left pending (accepted, not yet through validate and
    /// review) by a crash or a stop mid-chain: what `serve` does.
    Pending,
    /// Nothing: only the events it is handed (a test of the queue alone).
    Nothing,
}

/// The pipeline runs on a thread of its own (a single-threaded runtime): however much work
/// queues up behind a burst of submissions, it takes at most one core from the HTTP side, so
/// intake keeps answering fast. With [`Resume::Pending`] it first resumes every tenant's pending
/// orders. `done` completes once every sender is gone and the chains still running have
/// finished.
pub fn spawn_pipeline(
    svc: Arc<Services>,
    resume: Resume,
    capacity: usize,
) -> Result<(Pipeline, oneshot::Receiver<()>), ServeError> {
    let (tx, mut rx) = mpsc::channel::<PipelineEvent>(capacity.max(1));
    let (done_tx, done) = oneshot::channel::<()>();
    let pipeline = Pipeline {
        tx,
        overflow: Arc::new(std::sync::Mutex::new(BTreeSet::new())),
    };
    // The worker holds no sender: the channel closes when the server's are gone.
    let overflow = pipeline.overflow.clone();
    let worker = async move {
        let slots = Arc::new(Semaphore::new(PIPELINE_WORKERS));
        if resume == Resume::Pending {
            sweep_every_tenant(&svc, &slots).await;
        }
        loop {
            let ev = match rx.try_recv() {
                Ok(ev) => ev,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    // Shutting down: finish the orders that overflowed, then stop.
                    for t in take_overflow(&overflow) {
                        sweep(&svc, &slots, &t).await;
                    }
                    break;
                }
                Err(mpsc::error::TryRecvError::Empty) => {
                    // Caught up: now the orders whose events did not fit.
                    let tenants = take_overflow(&overflow);
                    if !tenants.is_empty() {
                        for t in tenants {
                            sweep(&svc, &slots, &t).await;
                        }
                        continue;
                    }
                    match rx.recv().await {
                        Some(ev) => ev,
                        None => break,
                    }
                }
            };
            start_chain(&svc, &slots, ev).await;
        }
        // Every sender is gone (the server stopped): wait for the chains still running.
        let _all = slots.acquire_many(PIPELINE_WORKERS as u32).await;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ServeError::Serve)?;
    std::thread::Builder::new()
        .name("rxflow-pipeline".into())
        .spawn(move || {
            runtime.block_on(worker);
            let _ = done_tx.send(());
        })
        .map_err(ServeError::Serve)?;
    Ok((pipeline, done))
}

/// How long the pipeline's own change sets (no caller waits on them) may stay in the open group
/// before they are made durable.
const GROUP_COMMIT_EVERY: Duration = Duration::from_millis(10);

/// Syncs the store every [`GROUP_COMMIT_EVERY`] until it is closed.
fn spawn_group_committer(store: &Arc<SqliteStore>) -> Result<(), ServeError> {
    let weak = Arc::downgrade(store);
    std::thread::Builder::new()
        .name("rxflow-group-commit".into())
        .spawn(move || loop {
            std::thread::sleep(GROUP_COMMIT_EVERY);
            let Some(store) = weak.upgrade() else { break };
            if let Err(e) = store.sync() {
                tracing::error!(error = %e, "a group commit failed; the pipeline's latest steps are redone at the next start");
            }
        })
        .map_err(ServeError::Serve)?;
    Ok(())
}

/// How often the log is copied into the database file, off the commit path: often, so that
/// each round syncs little and the round that holds the writers has few frames left to copy.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(5);

/// The log length (in pages: 128 MiB of 4 KiB pages) past which a round holds the writers for
/// the few frames left, so that the log starts again from its beginning. Each such round is a
/// wait of a few milliseconds for the requests behind it: the longer the log, the rarer they
/// are (at 1,000 orders/s about one a second; with 64 MiB, two, and p99 some 1-2 ms higher).
const CHECKPOINT_RESTART_AT: u64 = 32_768;

/// A log this long (512 MiB) means a reader has kept it from starting again: said once in the
/// log until it starts again.
const CHECKPOINT_HELD_BACK_AT: u64 = 4 * CHECKPOINT_RESTART_AT;

/// Runs the store's WAL checkpoints on a thread and a connection of their own, so that no
/// request waits behind the two fsyncs of a checkpoint (see [`rx_store::sqlite::Checkpointer`]).
/// Stopped, it runs a last round and closes its connection, so that the store's own close
/// finds itself the last and folds the log into the database file.
fn spawn_checkpointer(store: &Arc<SqliteStore>) -> Result<Stoppable, ServeError> {
    let checkpointer = store
        .checkpoint_separately(CHECKPOINT_RESTART_AT)
        .map_err(|source| SetupError::Store {
            path: store.path().display().to_string(),
            source,
        })?;
    Stoppable::spawn("rxflow-wal-checkpoint", move |stopped| {
        // Whether the operator has been told that a reader holds the log back.
        let mut held_back = false;
        loop {
            let last = stop_asked(&stopped, Some(CHECKPOINT_EVERY));
            match checkpointer.round() {
                Ok(Some(round)) => {
                    if !held_back && round.log_frames >= CHECKPOINT_HELD_BACK_AT {
                        held_back = true;
                        tracing::warn!(
                            log_mib = round.log_frames * 4 / 1024,
                            behind_frames = round.behind,
                            "the store's log cannot start again: a reader of rxflow.db has been \
                             in the middle of a read for a while (a report, a backup, a long \
                             `rxflow audit` command); it grows until that read ends"
                        );
                    } else if held_back && round.log_frames < CHECKPOINT_RESTART_AT {
                        held_back = false;
                        tracing::info!("the store's log started again");
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(error = %e, "a checkpoint of the store's log failed; the next round tries again");
                }
            }
            if last {
                break;
            }
        }
    })
}

/// Waits `wait` (for ever with `None`) and says whether the stop came meanwhile: a message, or
/// the [`Stoppable`] handle gone.
fn stop_asked(stopped: &std::sync::mpsc::Receiver<()>, wait: Option<Duration>) -> bool {
    match wait {
        Some(wait) => !matches!(
            stopped.recv_timeout(wait),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout)
        ),
        None => {
            let _ = stopped.recv();
            true
        }
    }
}

/// A background thread that runs until told to stop (or until its handle is dropped).
struct Stoppable {
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Stoppable {
    /// Starts `run` on a thread named `name`; `run` watches the receiver for the stop (a
    /// message, or the sender gone).
    fn spawn(
        name: &str,
        run: impl FnOnce(std::sync::mpsc::Receiver<()>) + Send + 'static,
    ) -> Result<Self, ServeError> {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || run(stopped))
            .map_err(ServeError::Serve)?;
        Ok(Stoppable { stop, thread })
    }

    /// Tells the thread to stop and waits for it to end, off the runtime's workers. Whether it
    /// ended normally.
    async fn stop(self) -> bool {
        let Stoppable { stop, thread } = self;
        let _ = stop.send(());
        matches!(
            tokio::task::spawn_blocking(move || thread.join()).await,
            Ok(Ok(()))
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Scheduled sealing of the audit trail

/// How often the server seals the trail into a signed checkpoint by default.
pub const SEAL_EVERY_DEFAULT: Duration = Duration::from_secs(300);

/// `RXFLOW_SEAL_EVERY_SECS`: seconds between the server's checkpoints (default 300); `0` seals
/// only when the server stops.
pub fn seal_every_from(
    get: impl Fn(&str) -> Option<String>,
) -> Result<Option<Duration>, ConfigError> {
    const NAME: &str = "RXFLOW_SEAL_EVERY_SECS";
    match get(NAME) {
        None => Ok(Some(SEAL_EVERY_DEFAULT)),
        Some(v) => match v.trim().parse::<u64>() {
            Ok(0) => Ok(None),
            Ok(secs) if secs <= 86_400 => Ok(Some(Duration::from_secs(secs))),
            _ => Err(ConfigError {
                name: NAME,
                value: v,
                expected: "a whole number of seconds up to 86400, a day (0: seal only at shutdown)",
            }),
        },
    }
}

/// The thread that seals the trail on a schedule and once more when the server stops, so that
/// an event changed, added or removed after it was written fails `rxflow audit verify` against
/// a signed root at most one period later (not only when an operator runs `rxflow audit
/// seal`). It reads the events through a second connection, which sees committed events only.
fn spawn_audit_sealer(
    data_dir: PathBuf,
    store: Arc<SqliteStore>,
    every: Option<Duration>,
) -> Result<Stoppable, ServeError> {
    Stoppable::spawn("rxflow-audit-seal", move |stopped| {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "the audit sealer could not start; run `rxflow audit seal`");
                return;
            }
        };
        let mut events = None;
        loop {
            let last = stop_asked(&stopped, every);
            seal_now(&rt, &data_dir, &store, &mut events, last);
            if last {
                break;
            }
        }
    })
}

/// One scheduled seal. A failure is logged and the next period tries again.
fn seal_now(
    rt: &tokio::runtime::Runtime,
    data_dir: &std::path::Path,
    store: &Arc<SqliteStore>,
    events: &mut Option<SqliteStore>,
    at_stop: bool,
) {
    // What was answered so far is committed, so the events connection sees it.
    if let Err(e) = store.sync() {
        tracing::error!(error = %e, "a group commit before the audit seal failed");
        return;
    }
    if events.is_none() {
        match SqliteStore::open(&rx_platform::services::DataDir(data_dir).db()) {
            Ok(s) => *events = Some(s),
            Err(e) => {
                tracing::error!(error = %e, "the audit sealer could not open the store");
                return;
            }
        }
    }
    let Some(reader) = events.as_ref() else {
        return;
    };
    match rt.block_on(crate::audit::seal_from(data_dir, reader, store.as_ref())) {
        Ok(Some(cp)) => tracing::info!(
            checkpoint = cp.number,
            last_seq = cp.last_seq,
            at = if at_stop { "stop" } else { "schedule" },
            "audit checkpoint sealed by the server"
        ),
        Ok(None) => {}
        Err(e) => {
            tracing::error!(error = %e, "the scheduled audit seal failed; the next one tries again")
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Routes

#[derive(Clone)]
struct ServeState {
    app: AppState,
    pipeline: Pipeline,
    /// The key files the server opened, checked by `/healthz`.
    keys: KeyFiles,
}

impl FromRef<ServeState> for AppState {
    fn from_ref(s: &ServeState) -> AppState {
        s.app.clone()
    }
}

type Answer = Result<Response, StepError>;

/// The router of every endpoint, wrapped in the shared HTTP layer.
pub fn app(state: AppState, pipeline: Pipeline, keys: KeyFiles, limits: &Limits) -> Router {
    let svc = state.svc.clone();
    let routes = Router::new()
        .route("/healthz", get(healthz))
        .route("/prescriptions", post(submit))
        .route("/prescriptions/{id}", get(read_prescription))
        .route("/prescriptions/{id}/cancel", post(cancel))
        .route("/prescriptions/{id}/verification", post(verify))
        .route("/prescriptions/{id}/dispenses", post(dispense))
        .route("/patients/{id}/prescriptions", get(patient_prescriptions))
        .route("/queue", get(queue))
        .route("/break-glass", post(open_break_glass))
        .route("/audit/events", get(audit_events))
        .route("/audit/disclosures", get(audit_disclosures))
        .route("/audit/export", get(audit_export))
        .route("/audit/break-glass", get(audit_break_glass))
        .with_state(ServeState {
            app: state,
            pipeline,
            keys,
        })
        .layer(axum::middleware::from_fn_with_state(
            svc,
            rxhttp::durable_before_answer,
        ));
    rxhttp::with_layers(routes, limits)
}

/// Passes while the key files the server opened are in place and unchanged: with one removed or
/// replaced, what it seals from then on could never be opened again (the keys live on in memory).
async fn healthz(State(st): State<ServeState>) -> Response {
    match st.keys.check() {
        Err(e) => {
            tracing::error!(error = %e, "key files changed under the server");
            rxhttp::fhir(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"status": "fail", "output": e.to_string()}),
            )
        }
        Ok(()) => rxhttp::fhir(StatusCode::OK, &json!({"status": "pass"})),
    }
}

/// The NPI an order names as its prescriber (looked up in the submission's Practitioners for a
/// literal reference).
fn requester_npi<'a>(order: &'a MedicationOrder, submission: &'a Submission) -> Option<&'a str> {
    match &order.requester {
        PrescriberRef::Npi(n) => Some(n.as_str()),
        PrescriberRef::Inline(p) => p.npi.as_deref(),
        PrescriberRef::Reference(id) => submission
            .prescribers
            .iter()
            .find(|p| p.source_id.as_deref() == Some(id.as_str()))
            .and_then(|p| p.npi.as_deref()),
        PrescriberRef::Missing => None,
    }
}

/// `POST /prescriptions`: a MedicationRequest or a Bundle. Each order is authorized
/// (`submit-prescription`: a prescriber their own, a service any of its tenant) before anything
/// is stored; then intake stores them and the pipeline takes them on in the background.
async fn submit(
    State(st): State<ServeState>,
    caller: Caller,
    req: axum::extract::Request,
) -> Answer {
    let svc = &st.app.svc;
    let p = &caller.principal;
    // A role that may never submit is refused before its body is read or parsed.
    caller
        .may_at_all(
            svc,
            Action::SubmitPrescription,
            ResourceRef {
                kind: "MedicationRequest".into(),
                id: "-".into(),
            },
            INTAKE,
        )
        .await?;
    let body: Value =
        match <FhirJson<Value> as axum::extract::FromRequest<()>>::from_request(req, &()).await {
            Ok(FhirJson(body)) => body,
            Err(refused) => return Ok(refused),
        };
    let submission = fhir::parse_submission(&body)?;
    for order in &submission.orders {
        let controlled = order
            .medication
            .rxnorm
            .as_deref()
            .and_then(|c| svc.drugs.product(c))
            .is_none_or(|prod| prod.is_controlled());
        let res = Resource {
            tenant: &p.tenant,
            prescriber_subject: None,
            prescriber_npi: requester_npi(order, &submission),
            controlled,
        };
        let patient = svc.vault.blind(domains::PATIENT, &order.patient_ref);
        caller
            .authorize(
                svc,
                Action::SubmitPrescription,
                Some(&res),
                ResourceRef {
                    kind: "MedicationRequest".into(),
                    id: "-".into(),
                },
                Some(&patient),
                INTAKE,
            )
            .await?;
    }
    let cx = caller.cx(INTAKE, break_glass_active(p, Utc::now()));
    let out = rx_fn_intake::handle(svc, &cx, &p.tenant, &body).await?;
    st.pipeline.publish(out.events);

    let created = out.accepted.iter().any(|a| !a.duplicate);
    let entries: Vec<Value> = out
        .accepted
        .iter()
        .map(|a| {
            json!({
                "response": {
                    "status": if a.duplicate { "200 OK" } else { "201 Created" },
                    "location": format!("MedicationRequest/{}", a.rx_id),
                },
                "extension": [{
                    "url": "https://rxflow.dev/fhir/StructureDefinition/workflow-status",
                    "valueCode": a.status,
                }],
            })
        })
        .collect();
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut res = rxhttp::fhir(
        status,
        &json!({"resourceType": "Bundle", "type": "transaction-response", "entry": entries}),
    );
    if let Some(first) = out.accepted.first() {
        set_location(&mut res, &format!("/prescriptions/{}", first.rx_id));
    }
    Ok(res)
}

/// The `Location` of what a request created (ids are UUIDs, always a valid header value).
fn set_location(res: &mut Response, path: &str) {
    if let Ok(v) = HeaderValue::from_str(path) {
        res.headers_mut().insert(header::LOCATION, v);
    }
}

async fn read_prescription(
    State(st): State<ServeState>,
    caller: Caller,
    FhirPath(id): FhirPath<String>,
) -> Answer {
    let v = rx_fn_records::get(&st.app.svc, &caller.principal, caller.source_ip, &id).await?;
    Ok(rxhttp::fhir(StatusCode::OK, &v))
}

async fn patient_prescriptions(
    State(st): State<ServeState>,
    caller: Caller,
    FhirPath(patient): FhirPath<String>,
    FhirQuery(NoParams {}): FhirQuery<NoParams>,
) -> Answer {
    let v =
        rx_fn_records::list_for_patient(&st.app.svc, &caller.principal, caller.source_ip, &patient)
            .await?;
    Ok(rxhttp::fhir(StatusCode::OK, &v))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelRequest {
    reason: String,
}

async fn cancel(
    State(st): State<ServeState>,
    caller: Caller,
    FhirPath(id): FhirPath<String>,
    FhirJson(req): FhirJson<CancelRequest>,
) -> Answer {
    let v = rx_fn_records::cancel(
        &st.app.svc,
        &caller.principal,
        caller.source_ip,
        &id,
        &req.reason,
    )
    .await?;
    Ok(rxhttp::fhir(StatusCode::OK, &v))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QueueParams {
    #[serde(default)]
    limit: Option<String>,
    /// The `next` of the page before (checked by the queue step: a cursor it never gave is a 400).
    #[serde(default)]
    after: Option<String>,
}

async fn queue(
    State(st): State<ServeState>,
    caller: Caller,
    FhirQuery(q): FhirQuery<QueueParams>,
) -> Answer {
    let asked = rxhttp::query_param("limit", q.limit.as_deref(), rxhttp::LIMIT_EXPECTED)?;
    let limit = rxhttp::page_limit(asked, rx_fn_records::MAX_QUEUE, rx_fn_records::MAX_QUEUE);
    let v = rx_fn_records::queue(
        &st.app.svc,
        &caller.principal,
        caller.source_ip,
        q.after.as_deref(),
        limit,
    )
    .await?;
    Ok(rxhttp::fhir(StatusCode::OK, &v))
}

async fn verify(
    State(st): State<ServeState>,
    caller: Caller,
    FhirPath(id): FhirPath<String>,
    FhirJson(req): FhirJson<rx_fn_verify::VerifyRequest>,
) -> Answer {
    let out =
        rx_fn_verify::handle(&st.app.svc, &caller.principal, caller.source_ip, &id, &req).await?;
    st.pipeline.publish(out.events.clone());
    Ok(rxhttp::fhir(StatusCode::OK, &out))
}

async fn dispense(
    State(st): State<ServeState>,
    caller: Caller,
    FhirPath(id): FhirPath<String>,
    headers: axum::http::HeaderMap,
    FhirJson(mut req): FhirJson<rx_fn_dispense::DispenseRequest>,
) -> Answer {
    // The `Idempotency-Key` header is the same as a `requestId` in the body; it has one value.
    if headers.get_all("idempotency-key").iter().count() > 1 {
        return Err(StepError::Invalid {
            code: "value",
            message: "the request carries more than one Idempotency-Key header; send one".into(),
            expression: Some("Idempotency-Key".into()),
        });
    }
    if let Some(key) = headers.get("idempotency-key") {
        let key = key.to_str().map_err(|_| idempotency_key_invalid())?;
        match &req.request_id {
            Some(id) if id != key => {
                return Err(StepError::Invalid {
                    code: "value",
                    message: "the Idempotency-Key header and the body's requestId differ; send \
                              one, or the same in both"
                        .into(),
                    expression: Some("requestId".into()),
                })
            }
            _ => req.request_id = Some(key.to_string()),
        }
    }
    let out =
        rx_fn_dispense::handle(&st.app.svc, &caller.principal, caller.source_ip, &id, &req).await?;
    st.pipeline.publish(out.events);
    let status = if out.duplicate {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    let mut res = rxhttp::fhir(status, &out.dispense);
    if let Some(did) = out.dispense.get("id").and_then(Value::as_str) {
        set_location(&mut res, &format!("/prescriptions/{id}/dispenses/{did}"));
    }
    Ok(res)
}

fn idempotency_key_invalid() -> StepError {
    StepError::Invalid {
        code: "value",
        message: format!(
            "the Idempotency-Key header must be 1 to {} visible ASCII characters",
            rx_fn_dispense::MAX_REQUEST_ID
        ),
        expression: Some("Idempotency-Key".into()),
    }
}

async fn open_break_glass(
    State(st): State<ServeState>,
    caller: Caller,
    FhirJson(req): FhirJson<BreakGlassRequest>,
) -> Answer {
    let grant = break_glass::open(
        &st.app.svc,
        &st.app.grants,
        &caller.principal,
        caller.source_ip,
        &req,
    )
    .await?;
    Ok(rxhttp::fhir(StatusCode::CREATED, &Opened::from(&grant)).into_response())
}

// ---------------------------------------------------------------------------------------------
// Audit (the auditor's reads)
//
// The trail is one chain for the whole deployment; an auditor sees the events of actors of their
// own organisation (tenant) only. Each read of the trail is itself audited.

/// Function name of the audit endpoints in audit events.
const AUDIT: &str = "audit";
/// Entries `GET /audit/events` returns by default, and at most.
const AUDIT_DEFAULT_LIMIT: usize = 1000;
const AUDIT_MAX_LIMIT: usize = 10_000;
/// Without `from`, a search covers this many hours back.
const AUDIT_DEFAULT_WINDOW_HOURS: i64 = 24;

fn trail_ref(what: &str) -> ResourceRef {
    ResourceRef {
        kind: "AuditEvent".into(),
        id: what.into(),
    }
}

fn audit_failure(e: rx_fn_audit::AuditError) -> StepError {
    tracing::error!(error = %e, "audit trail read failed");
    StepError::Unavailable("the audit trail could not be read; retry later".into())
}

/// Authorize an auditor's read of the trail and record it (allowed reads are audited as well).
async fn audit_read(
    svc: &Services,
    caller: &Caller,
    action: Action,
    what: &str,
    patient: Option<&[u8]>,
) -> Result<(), StepError> {
    let target = trail_ref(what);
    let flagged = caller
        .authorize(svc, action, None, target.clone(), patient, AUDIT)
        .await?;
    let mut ev = rx_guard::access::audit_event(
        &caller.principal,
        action,
        &rx_guard::access::Decision::Allow {
            via_break_glass: flagged,
        },
        target,
        AUDIT,
    );
    ev.source_ip = caller.source_ip.clone();
    ev.patient = patient.map(hex::encode);
    svc.vault.audit(&[ev]).await?;
    Ok(())
}

/// The query string of `GET /audit/events`, as sent: each value is checked by
/// [`AuditSearch::of`], which names the parameter it refuses.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditParams {
    /// The patient's reference (as submitted); matched through its blind index.
    #[serde(default)]
    patient: Option<String>,
    /// The acting user (JWT subject).
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    to: Option<String>,
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    limit: Option<String>,
    /// The `seq` of the last event of the page before (the Bundle's `next` link sets it).
    #[serde(default)]
    after: Option<String>,
}

/// An audit search as asked, every value checked: one that does not fit is a 400 naming its
/// parameter, never a search that silently drops it or cannot match anything.
struct AuditSearch {
    patient: Option<String>,
    user: Option<String>,
    action: Option<rx_guard::audit::Action>,
    from: chrono::DateTime<Utc>,
    to: Option<chrono::DateTime<Utc>>,
    after: Option<u64>,
    limit: usize,
}

impl AuditSearch {
    fn of(q: AuditParams, now: chrono::DateTime<Utc>) -> Result<Self, StepError> {
        let from = rxhttp::query_time("from", q.from.as_deref())?;
        let to = rxhttp::query_time("to", q.to.as_deref())?;
        if let (Some(f), Some(t)) = (from, to) {
            if f > t {
                return Err(rxhttp::bad_parameter(
                    "from",
                    "is later than `to`: no event could match; give `from` before `to`",
                ));
            }
        }
        let action = match q.action.as_deref() {
            None => None,
            Some(a) => Some(
                serde_json::from_value(Value::String(a.to_string())).map_err(|_| {
                    rxhttp::bad_parameter(
                        "action",
                        "must be one of create, read, update, decrypt, disclose, deny, \
                         break-glass, quarantine, login",
                    )
                })?,
            ),
        };
        let asked = rxhttp::query_param("limit", q.limit.as_deref(), rxhttp::LIMIT_EXPECTED)?;
        let after = rxhttp::query_param(
            "after",
            q.after.as_deref(),
            "must be the position (seq) of an event: the page before's last, as its next link \
             gives it",
        )?;
        // Without `from`: the 24 hours before `to`, or before now if that is earlier (a `to`
        // further back than a day would otherwise leave an empty window), never before the
        // earliest time a search may name.
        let from = from.unwrap_or_else(|| {
            let window_end = to.map_or(now, |t| t.min(now));
            window_end
                .checked_sub_signed(chrono::Duration::hours(AUDIT_DEFAULT_WINDOW_HOURS))
                .map_or(earliest_time(), |t| t.max(earliest_time()))
        });
        Ok(AuditSearch {
            patient: rxhttp::query_filter("patient", q.patient)?,
            user: rxhttp::query_filter("user", q.user)?,
            action,
            from,
            to,
            after,
            limit: rxhttp::page_limit(asked, AUDIT_DEFAULT_LIMIT, AUDIT_MAX_LIMIT),
        })
    }
}

/// `GET /audit/events?patient=&user=&from=&to=&action=&limit=`: a FHIR searchset Bundle of
/// AuditEvents, oldest first. Without `from`, the 24 hours before `to` (or now).
async fn audit_events(
    State(st): State<ServeState>,
    caller: Caller,
    FhirQuery(q): FhirQuery<AuditParams>,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
) -> Answer {
    let svc = &st.app.svc;
    let q = AuditSearch::of(q, Utc::now())?;
    let patient = q.patient.as_deref().map(|p| svc.vault.patient_hex(p));
    let patient_bytes = q
        .patient
        .as_deref()
        .map(|p| svc.vault.blind(domains::PATIENT, p));
    audit_read(
        svc,
        &caller,
        Action::ReadAuditEvents,
        "search",
        patient_bytes.as_deref(),
    )
    .await?;
    let limit = q.limit;
    let query = rx_guard::audit::AuditQuery {
        patient,
        subject: q.user,
        action: q.action,
        from: Some(q.from),
        to: q.to,
        after_seq: q.after,
        ..Default::default()
    };
    let found = rx_fn_audit::search(svc.vault.store.as_ref(), &query)
        .await
        .map_err(audit_failure)?;
    let tenant = &caller.principal.tenant;
    let mine = found.iter().filter(|e| &e.event.actor.tenant == tenant);
    let total = mine.clone().count();
    let page: Vec<_> = mine.take(limit).collect();
    let entries: Vec<Value> = page
        .iter()
        .map(|e| {
            json!({
                "fullUrl": format!("urn:uuid:{}", e.event.id),
                "resource": rx_guard::audit::fhir::to_fhir(&e.event, e.seq),
                "search": {"mode": "match"},
            })
        })
        .collect();
    let mut bundle =
        json!({"resourceType": "Bundle", "type": "searchset", "total": total, "entry": entries});
    // More match than the page holds: the next page starts after its last event (events of one
    // millisecond may be many, so a time cannot say where a page ended).
    if let (Some(last), true) = (page.last(), total > page.len()) {
        bundle["link"] = json!([{
            "relation": "next",
            "url": format!("/audit/events?{}", with_after(raw.as_deref(), last.seq)),
        }]);
    }
    Ok(rxhttp::fhir(StatusCode::OK, &bundle))
}

/// Whether the query pair `pair` (still percent-encoded) is an `after`, however its name is
/// encoded (`%61fter` is `after` too).
fn names_after(pair: &str) -> bool {
    let name = pair.split('=').next().unwrap_or("");
    let mut bytes = Vec::with_capacity(name.len());
    let mut rest = name.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        let hex = |c: u8| char::from(c).to_digit(16);
        match (b, tail) {
            (b'%', [h, l, more @ ..]) if hex(*h).is_some() && hex(*l).is_some() => {
                let v = hex(*h).unwrap_or(0) * 16 + hex(*l).unwrap_or(0);
                bytes.push(u8::try_from(v).unwrap_or(0));
                rest = more;
            }
            (b'+', _) => {
                bytes.push(b' ');
                rest = tail;
            }
            _ => {
                bytes.push(b);
                rest = tail;
            }
        }
    }
    bytes == b"after"
}

/// The query string `raw` (as the caller sent it, still percent-encoded) with `after` set to
/// `seq` in place of any it had.
fn with_after(raw: Option<&str>, seq: u64) -> String {
    let mut parts: Vec<&str> = raw
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty() && !names_after(p))
        .collect();
    let after = format!("after={seq}");
    parts.push(&after);
    parts.join("&")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DisclosureParams {
    patient: String,
}

/// `GET /audit/disclosures?patient=`: the accounting of disclosures of one patient (45 CFR
/// 164.528), oldest first. The patient is named in the answer by blind index only.
async fn audit_disclosures(
    State(st): State<ServeState>,
    caller: Caller,
    FhirQuery(q): FhirQuery<DisclosureParams>,
) -> Answer {
    let svc = &st.app.svc;
    if q.patient.trim().is_empty() {
        return Err(StepError::Invalid {
            code: "required",
            message: "name the patient: /audit/disclosures?patient=<patient reference>".into(),
            expression: Some("patient".into()),
        });
    }
    let patient = svc.vault.patient_hex(&q.patient);
    let blind = Some(svc.vault.blind(domains::PATIENT, &q.patient));
    audit_read(
        svc,
        &caller,
        Action::ReadDisclosures,
        "disclosures",
        blind.as_deref(),
    )
    .await?;
    let store = svc.vault.store.as_ref();
    let all = rx_fn_audit::disclosures(store, &patient)
        .await
        .map_err(audit_failure)?;
    // Disclosures carry no tenant: keep those whose event an actor of this tenant wrote.
    let ours: std::collections::HashSet<String> = rx_fn_audit::search(
        store,
        &rx_guard::audit::AuditQuery {
            patient: Some(patient.clone()),
            action: Some(rx_guard::audit::Action::Disclose),
            ..Default::default()
        },
    )
    .await
    .map_err(audit_failure)?
    .into_iter()
    .filter(|e| e.event.actor.tenant == caller.principal.tenant)
    .map(|e| e.event.id)
    .collect();
    let list: Vec<_> = all
        .into_iter()
        .filter(|d| ours.contains(&d.event_id))
        .collect();
    Ok(rxhttp::fhir(
        StatusCode::OK,
        &json!({"patient": patient, "count": list.len(), "disclosures": list}),
    ))
}

/// `GET /audit/break-glass`: every break-glass session of this tenant with what it touched.
async fn audit_break_glass(
    State(st): State<ServeState>,
    caller: Caller,
    FhirQuery(NoParams {}): FhirQuery<NoParams>,
) -> Answer {
    let svc = &st.app.svc;
    audit_read(
        svc,
        &caller,
        Action::ReadAuditEvents,
        "break-glass-sessions",
        None,
    )
    .await?;
    let sessions: Vec<_> = rx_fn_audit::break_glass_sessions(svc.vault.store.as_ref())
        .await
        .map_err(audit_failure)?
        .into_iter()
        .filter(|s| s.tenant == caller.principal.tenant)
        .collect();
    Ok(rxhttp::fhir(
        StatusCode::OK,
        &json!({"count": sessions.len(), "sessions": sessions}),
    ))
}

/// `GET /audit/export`: the tenant's events as FHIR R4 AuditEvents, one per line
/// (`application/fhir+ndjson`), streamed page by page (constant memory, whatever the trail's
/// length). The same conversion as `rx_fn_audit::export_fhir_ndjson`, scoped to the tenant.
async fn audit_export(
    State(st): State<ServeState>,
    caller: Caller,
    FhirQuery(NoParams {}): FhirQuery<NoParams>,
) -> Answer {
    let svc = &st.app.svc;
    audit_read(svc, &caller, Action::ExportAudit, "export", None).await?;
    let (tx, rx) = futures::channel::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(2);
    let store = svc.vault.store.clone();
    let tenant = caller.principal.tenant.clone();
    tokio::spawn(export_pages(store, tenant, tx));
    let mut res = axum::body::Body::from_stream(rx).into_response();
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/fhir+ndjson"),
    );
    Ok(res)
}

async fn export_pages(
    store: Arc<dyn rx_store::RecordStore>,
    tenant: String,
    mut tx: futures::channel::mpsc::Sender<Result<Vec<u8>, std::io::Error>>,
) {
    use futures::SinkExt;
    let mut next = 1u64;
    loop {
        let page = match store.audit_range(next, rx_fn_audit::PAGE).await {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "audit export stopped: the trail could not be read");
                let _ = tx
                    .send(Err(std::io::Error::other("audit trail read failed")))
                    .await;
                return;
            }
        };
        let Some(last) = page.last() else { return };
        next = last.seq.saturating_add(1);
        let mut chunk = Vec::with_capacity(page.len() * 512);
        for ev in &page {
            let event: rx_guard::audit::AuditEvent = match serde_json::from_slice(&ev.body) {
                Ok(e) => e,
                Err(_) => {
                    tracing::error!(
                        seq = ev.seq,
                        "audit export stopped: an event does not decode"
                    );
                    let _ = tx
                        .send(Err(std::io::Error::other("unreadable audit event")))
                        .await;
                    return;
                }
            };
            if event.actor.tenant != tenant {
                continue;
            }
            let line = rx_guard::audit::fhir::to_fhir(&event, ev.seq);
            if serde_json::to_writer(&mut chunk, &line).is_err() {
                return;
            }
            chunk.push(b'\n');
        }
        // The client went away: stop reading.
        if tx.send(Ok(chunk)).await.is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Server

/// A bound server, not yet serving: tests read its address and services.
pub struct Server {
    listener: TcpListener,
    router: Router,
    pipeline_done: oneshot::Receiver<()>,
    addr: SocketAddr,
    state: AppState,
    sealer: Stoppable,
    checkpointer: Stoppable,
    keys: KeyFiles,
    /// The data directory's writer lock, held while the server lives.
    _lock: std::fs::File,
}

/// Open the embedded deployment in `args.data_dir`, build the verifier and the router, start the
/// pipeline (resuming orders left pending) and bind `args.addr` (port 0 picks a free port).
pub async fn bind(args: &ServeArgs) -> Result<Server, ServeError> {
    bind_with(args, Limits::default()).await
}

/// [`bind`] with chosen limits.
pub async fn bind_with(args: &ServeArgs, limits: Limits) -> Result<Server, ServeError> {
    let mut config = Config::from_env()?;
    config.data_dir = args.data_dir.clone();
    let lock = rx_platform::services::hold_data_dir(&config.data_dir)?;
    let embedded = Embedded::open(&config, Arc::new(SystemClock))?;
    // Group commit: concurrent requests and the pipeline share commits; every answer waits for
    // its own changes to be durable (rxhttp::durable_before_answer), the rest is synced here.
    embedded.store.group_commit(true);
    spawn_group_committer(&embedded.store)?;
    let checkpointer = spawn_checkpointer(&embedded.store)?;
    let seal_every = seal_every_from(|k| std::env::var(k).ok())?;
    let sealer = spawn_audit_sealer(
        embedded.data_dir.clone(),
        embedded.store.clone(),
        seal_every,
    )?;
    let verifier = verifier_from_env(&args.data_dir, |k| std::env::var(k).ok())?;
    let keys = embedded.key_files();
    let state = AppState::new(embedded.services, verifier, &config.tenant);
    let (pipeline, pipeline_done) =
        spawn_pipeline(state.svc.clone(), Resume::Pending, PIPELINE_QUEUE)?;
    let router = app(state.clone(), pipeline, keys.clone(), &limits);
    let listener = TcpListener::bind(args.addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: args.addr,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: args.addr,
        source,
    })?;
    Ok(Server {
        listener,
        router,
        pipeline_done,
        addr,
        state,
        sealer,
        checkpointer,
        keys,
        _lock: lock,
    })
}

impl Server {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The services the server runs over (tests put fixtures in place through them).
    pub fn services(&self) -> Arc<Services> {
        self.state.svc.clone()
    }

    /// Serve until `shutdown` completes; then finish the requests in progress, stop accepting
    /// pipeline work and wait (up to 30 s) for the pipeline to finish what it accepted.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        tracing::info!(addr = %self.addr, "rxflow serving");
        // Refused sign-ins counted past their limit are recorded as summaries once their
        // window has passed, and all of them when the server stops. A tick that has taken the
        // counts out always writes them: the stop is only seen between ticks.
        let app = self.state.clone();
        let (stop_summaries, mut summaries_stopped) = oneshot::channel::<()>();
        let summaries = tokio::spawn(async move {
            let mut every = tokio::time::interval(app.logins.window / 4);
            every.tick().await;
            loop {
                tokio::select! {
                    _ = every.tick() => {
                        rxhttp::record_counted_logins(&app, false).await;
                    }
                    _ = &mut summaries_stopped => break,
                }
            }
        });
        let served = accept_loop(self.listener, self.router, shutdown).await;
        // The router (and its pipeline senders) is gone now: the worker drains and ends.
        match tokio::time::timeout(DRAIN_TIMEOUT, self.pipeline_done).await {
            Ok(_) => tracing::info!("pipeline drained"),
            Err(_) => tracing::warn!(
                "pipeline still busy at shutdown; unfinished orders resume at the next start"
            ),
        }
        let _ = stop_summaries.send(());
        let _ = summaries.await;
        rxhttp::record_counted_logins(&self.state, true).await;
        // A last checkpoint over everything the server wrote (the sealer makes it durable
        // first, the summaries just recorded included).
        if !self.sealer.stop().await {
            tracing::error!("the audit sealer did not finish; run `rxflow audit seal`");
        }
        if !self.checkpointer.stop().await {
            tracing::error!("the checkpointer did not finish; the next open folds the log in");
        }
        // A key file removed or replaced while serving: say so, and do not end as if all is well.
        self.keys.check()?;
        served.map_err(ServeError::Serve)
    }
}

/// How long a client may take to send a request's headers (slow-header clients are cut off).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The answers after which the connection is closed: the request timed out (504, 408) or its
/// body was refused as too large (413). Such a request's body may still be on its way, a byte at
/// a time: the connection takes it back ([`Severance::sever`]) and says `Connection: close`, so
/// hyper stops reading and closes once the answer is written.
fn closes_connection(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::REQUEST_TIMEOUT | StatusCode::PAYLOAD_TOO_LARGE | StatusCode::GATEWAY_TIMEOUT
    )
}

/// A request body shared between the router, which reads it, and the connection, which can take
/// it back. After a timeout the handler is still running on the blocking pool and still reading
/// the body (a 504 does not stop it); while it holds hyper's body, hyper keeps reading the
/// connection to the body's end, whatever the answer said, and a client trickling a byte now and
/// then holds the connection, the task and a blocking thread for as long as it likes. `Connection:
/// close` alone does not change that.
struct Severance {
    body: std::sync::Mutex<Option<hyper::body::Incoming>>,
    /// Whoever last polled the body: woken when it is taken back, to get its error.
    reader: futures::task::AtomicWaker,
}

impl Severance {
    fn new(body: hyper::body::Incoming) -> Arc<Self> {
        Arc::new(Severance {
            body: std::sync::Mutex::new(Some(body)),
            reader: futures::task::AtomicWaker::new(),
        })
    }

    /// Drop hyper's body (hyper, its receiver gone, stops reading the connection) and wake the
    /// reader, whose next read is an error.
    fn sever(&self) {
        let body = self
            .body
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        drop(body);
        self.reader.wake();
    }
}

/// The router's side of a [`Severance`].
struct SeverableBody(Arc<Severance>);

impl hyper::body::Body for SeverableBody {
    type Data = hyper::body::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        self.0.reader.register(cx.waker());
        let mut body = self
            .0
            .body
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match body.as_mut() {
            Some(b) => std::pin::Pin::new(b).poll_frame(cx).map_err(Into::into),
            None => std::task::Poll::Ready(Some(Err(
                "the connection is closing; the rest of the request body was not read".into(),
            ))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0
            .body
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .is_some_and(hyper::body::Body::is_end_stream)
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.0
            .body
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(hyper::body::Body::size_hint)
            .unwrap_or_default()
    }
}

/// Accepts connections and serves each over HTTP/1.1 with a header-read timeout, until
/// `shutdown` completes; then stops accepting, lets the requests in progress finish, and closes
/// the connections still open after [`CONNECTIONS_GRACE`] (so the router, and with it the
/// pipeline's senders, are gone when this returns). The peer address reaches the handlers as
/// axum's `ConnectInfo`.
async fn accept_loop(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use tower::ServiceExt;
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little, then go on.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let mut stopping = stopping.clone();
        conns.spawn(async move {
            let service =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let router = router.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = Severance::new(body);
                        let mut req = hyper::Request::from_parts(
                            parts,
                            axum::body::Body::new(SeverableBody(body.clone())),
                        );
                        req.extensions_mut()
                            .insert(axum::extract::ConnectInfo(peer));
                        let mut res = router.oneshot(req).await?;
                        if closes_connection(res.status()) {
                            body.sever();
                            res.headers_mut()
                                .insert(header::CONNECTION, HeaderValue::from_static("close"));
                        }
                        Ok::<_, std::convert::Infallible>(res)
                    }
                });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            let stop_asked = async move {
                let _ = stopping.wait_for(|s| *s).await.map(|_| ());
            };
            tokio::select! {
                _ = conn.as_mut() => {}
                () = stop_asked => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
        // Reap the connections that ended.
        while conns.try_join_next().is_some() {}
    }
    drop(listener);
    let _ = stop.send(true);
    let finished = tokio::time::timeout(CONNECTIONS_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        tracing::warn!(
            open = conns.len(),
            grace_s = CONNECTIONS_GRACE.as_secs(),
            "connections still open after the stop signal were closed"
        );
        conns.shutdown().await;
    }
    Ok(())
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received; finishing requests in progress");
}

/// `rxflow serve`: serve until SIGINT/SIGTERM. Installs a JSON log subscriber (RUST_LOG, default
/// `info`) unless the caller installed one.
pub async fn run(args: ServeArgs) -> Result<(), ServeError> {
    let _ = tracing_subscriber::fmt()
        .json()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_current_span(true)
        .with_span_list(false)
        .try_init();
    let server = bind(&args).await?;
    eprintln!(
        "rxflow serve: listening on http://{} over {} (Ctrl-C stops; JSON logs on stderr)",
        server.local_addr(),
        args.data_dir.display()
    );
    server.serve(shutdown_signal()).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use rx_store::repo::AuditCtx;

    const TENANT: &str = "pharmacy-t";
    const OTHER_TENANT: &str = "pharmacy-u";

    /// The next link's query replaces the `after` the caller sent, however its name was
    /// encoded (a `%61fter` kept beside the new `after` made the link a 400), and keeps the rest
    /// as sent.
    #[test]
    fn the_next_link_replaces_after_however_it_is_spelled() {
        assert_eq!(with_after(None, 7), "after=7");
        assert_eq!(with_after(Some("limit=3&after=2"), 7), "limit=3&after=7");
        assert_eq!(with_after(Some("limit=3&%61fter=2"), 7), "limit=3&after=7");
        assert_eq!(
            with_after(Some("%61%66ter=2&user=a%20b"), 7),
            "user=a%20b&after=7"
        );
        assert_eq!(with_after(Some("after&limit=3"), 7), "limit=3&after=7");
        assert_eq!(
            with_after(Some("afterx=1&limit=3"), 7),
            "afterx=1&limit=3&after=7"
        );
        assert_eq!(with_after(Some("%6=1"), 7), "%6=1&after=7");
    }

    /// An order by a prescriber the Bundle registers, for its own patient.
    /// The embedded services over a new data directory in `dir`.
    fn services_in(dir: &std::path::Path) -> Arc<Services> {
        let mut config = Config::from_lookup(|_| None).expect("config");
        config.data_dir = dir.join("data");
        Arc::new(
            Embedded::open(&config, Arc::new(SystemClock))
                .expect("embedded")
                .services,
        )
    }

    fn bundle(i: usize) -> Value {
        json!({"resourceType": "Bundle", "type": "collection", "entry": [
            {"fullUrl": "urn:uuid:dr", "resource": {"resourceType": "Practitioner",
                "identifier": [
                    {"system": "http://hl7.org/fhir/sid/us-npi", "value": "1234567893"},
                    {"system": "http://terminology.hl7.org/NamingSystem/DEANumber", "value": "AP5836727"}],
                "name": [{"family": "Pump"}]}},
            {"resource": {"resourceType": "MedicationRequest", "id": format!("mr-{i}"),
                "status": "active", "intent": "order",
                "medicationCodeableConcept": {"coding": [{
                    "system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "314076"}]},
                "subject": {"reference": format!("Patient/p-{i}")},
                "requester": {"reference": "urn:uuid:dr"},
                "dispenseRequest": {"quantity": {"value": 30, "unit": "tablet"},
                    "expectedSupplyDuration": {"value": 30, "unit": "days", "code": "d"}}}}
        ]})
    }

    async fn queued(svc: &Services) -> usize {
        queued_in(svc, TENANT).await
    }

    async fn queued_in(svc: &Services, tenant: &str) -> usize {
        let status = rx_domain::Status::AwaitingVerification;
        svc.vault
            .store
            .list(
                Table::Prescriptions,
                tenant,
                Some(status.as_str()),
                None,
                1000,
            )
            .await
            .expect("list")
            .len()
    }

    async fn waiting(svc: &Services) -> usize {
        waiting_in(svc, TENANT).await
    }

    async fn waiting_in(svc: &Services, tenant: &str) -> usize {
        let mut n = 0;
        for status in [rx_domain::Status::Received, rx_domain::Status::Validated] {
            n += svc
                .vault
                .store
                .list(
                    Table::Prescriptions,
                    tenant,
                    Some(status.as_str()),
                    None,
                    1000,
                )
                .await
                .expect("list")
                .len();
        }
        n
    }

    /// Under group commit a handler's change sets wait in the open group: the answer leaves only
    /// once they are durable, and a caller whose changes could not be made durable gets a 503
    /// OperationOutcome, not the handler's success.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_answer_leaves_only_once_its_changes_are_durable() {
        use tower::ServiceExt;
        let dir = tempfile::tempdir().expect("dir");
        let mut config = Config::from_lookup(|_| None).expect("config");
        config.data_dir = dir.path().join("data");
        let emb = Embedded::open(&config, Arc::new(SystemClock)).expect("embedded");
        emb.store.group_commit(true);
        let svc = Arc::new(emb.services);
        let db = emb.store.path().to_path_buf();
        let from = db.clone();
        let durable = move || {
            let c = rusqlite::Connection::open(&db).expect("second connection");
            c.query_row("SELECT COUNT(*) FROM audit", [], |r| r.get::<_, i64>(0))
                .expect("count")
        };
        let app = |svc: Arc<Services>, move_to: Option<PathBuf>| {
            let from = from.clone();
            Router::new()
                .route(
                    "/write",
                    post(move |State(svc): State<Arc<Services>>| async move {
                        let from = from.clone();
                        let cx = AuditCtx::system(INTAKE, TENANT);
                        let ev = cx.event(
                            rx_guard::audit::Action::Read,
                            "MedicationRequest",
                            "rx-1",
                            None,
                            rx_guard::audit::Outcome::Success,
                        );
                        svc.vault
                            .audit(&[ev])
                            .await
                            .expect("append joins the group");
                        if let Some(to) = &move_to {
                            // The store file goes away before the group is committed.
                            std::fs::rename(&from, to).expect("move");
                        }
                        StatusCode::CREATED
                    }),
                )
                .with_state(svc.clone())
                .layer(axum::middleware::from_fn_with_state(
                    svc,
                    rxhttp::durable_before_answer,
                ))
        };
        let before = durable();
        let req = || {
            axum::http::Request::post("/write")
                .body(axum::body::Body::empty())
                .expect("request")
        };
        let res = app(svc.clone(), None).oneshot(req()).await.expect("answer");
        assert_eq!(res.status(), StatusCode::CREATED);
        assert_eq!(
            durable(),
            before + 1,
            "the event was durable when the answer left"
        );

        let res = app(svc.clone(), Some(dir.path().join("moved.db")))
            .oneshot(req())
            .await
            .expect("answer");
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = axum::body::to_bytes(res.into_body(), 1 << 16)
            .await
            .expect("body");
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["resourceType"], "OperationOutcome");
        assert_eq!(svc.vault.store.lost_commits(), 1);
    }

    /// Every Bundle carries its prescriber again: concurrent submissions naming the same one all
    /// succeed (an unchanged record is not rewritten; a lost conditional write is re-applied).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_bundles_with_the_same_prescriber_are_all_taken() {
        let dir = tempfile::tempdir().expect("dir");
        let svc = services_in(dir.path());
        let tasks: Vec<_> = (0..24)
            .map(|i| {
                let svc = svc.clone();
                tokio::spawn(async move {
                    let cx = AuditCtx::system(INTAKE, TENANT);
                    rx_fn_intake::handle(&svc, &cx, TENANT, &bundle(i)).await
                })
            })
            .collect();
        for t in tasks {
            let taken = t.await.expect("task");
            assert!(taken.is_ok(), "{:?}", taken.err());
        }
        assert_eq!(waiting(&svc).await, 24);
    }

    /// The README's Bundle carries its Patient too: submitted concurrently for one patient while
    /// the pipeline reviews (and so rewrites the patient's file), every order is taken (an
    /// unchanged Patient is not rewritten; a lost conditional write is retried after a pause).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_bundles_for_one_patient_are_all_taken_while_the_pipeline_runs() {
        let dir = tempfile::tempdir().expect("dir");
        let svc = services_in(dir.path());
        let (pipeline, _done) =
            spawn_pipeline(svc.clone(), Resume::Pending, PIPELINE_QUEUE).expect("pipeline");
        let example: Value =
            serde_json::from_str(include_str!("../../events/bundle-order.json")).expect("bundle");
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let (svc, pipeline) = (svc.clone(), pipeline.clone());
                let mut b = example.clone();
                for e in b["entry"].as_array_mut().expect("entries") {
                    if e["resource"]["resourceType"] == "MedicationRequest" {
                        e["resource"]["id"] = Value::from(format!("one-patient-{i}"));
                    }
                }
                tokio::spawn(async move {
                    let cx = AuditCtx::system(INTAKE, TENANT);
                    let out = rx_fn_intake::handle(&svc, &cx, TENANT, &b).await?;
                    pipeline.publish(out.events);
                    Ok::<_, StepError>(())
                })
            })
            .collect();
        for t in tasks {
            let taken = t.await.expect("task");
            assert!(taken.is_ok(), "{:?}", taken.err());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn orders_whose_events_overflow_the_queue_still_reach_the_pharmacist_queue() {
        let dir = tempfile::tempdir().expect("dir");
        let svc = services_in(dir.path());
        let cx = AuditCtx::system(INTAKE, TENANT);
        let mut events = Vec::new();
        for i in 0..30 {
            let out = rx_fn_intake::handle(&svc, &cx, TENANT, &bundle(i))
                .await
                .expect("intake");
            events.extend(out.events);
        }
        assert_eq!(waiting(&svc).await, 30);
        // A queue of one: nearly every event overflows.
        let (pipeline, _done) = spawn_pipeline(svc.clone(), Resume::Nothing, 1).expect("pipeline");
        pipeline.publish(events);
        for _ in 0..1000 {
            if waiting(&svc).await == 0 {
                assert_eq!(queued(&svc).await, 30);
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{} orders were left behind", waiting(&svc).await);
    }

    /// Orders of every tenant, not only the deployment's own (`default` here): the server takes
    /// orders for any tenant a trusted token names.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn orders_left_pending_by_a_previous_run_are_resumed_at_start() {
        let dir = tempfile::tempdir().expect("dir");
        let svc = services_in(dir.path());
        for tenant in [TENANT, OTHER_TENANT] {
            let cx = AuditCtx::system(INTAKE, tenant);
            for i in 0..5 {
                rx_fn_intake::handle(&svc, &cx, tenant, &bundle(i))
                    .await
                    .expect("intake");
            }
        }
        // Nothing published: only the start-up sweep finds them.
        let (_pipeline, _done) =
            spawn_pipeline(svc.clone(), Resume::Pending, PIPELINE_QUEUE).expect("pipeline");
        for _ in 0..1000 {
            if waiting_in(&svc, TENANT).await + waiting_in(&svc, OTHER_TENANT).await == 0 {
                assert_eq!(queued_in(&svc, TENANT).await, 5);
                assert_eq!(queued_in(&svc, OTHER_TENANT).await, 5);
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "orders were not resumed: {} in {TENANT}, {} in {OTHER_TENANT}",
            waiting_in(&svc, TENANT).await,
            waiting_in(&svc, OTHER_TENANT).await
        );
    }
}
